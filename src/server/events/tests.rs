//! Tests of `events`.
use super::*;
use serde_json::json;

const NOW: i64 = 1_796_000_000_000;

#[test]
fn a_full_usage_event_parses() {
    let s = parse_event(
        &json!({"type":"usage","persona":"backend-engineer","chatmode":"dev","model":"gpt-4",
                "prompt_tokens":10,"completion_tokens":5,"session":"s","cost_usd":0.01,
                "timestamp":"2026-11-28T09:00:00Z"}),
        NOW,
        &EventLimits::default(),
    )
    .unwrap();
    let Event::Usage(u) = s.event else {
        panic!("not usage")
    };
    assert_eq!(u.total_tokens(), 15);
    assert_eq!(s.at, 1_795_856_400_000);
}

#[test]
fn rejections_name_the_field() {
    let cases = [
        (
            json!({"type":"usage","persona":"p","chatmode":"c","model":"m","prompt_tokens":-1,"completion_tokens":0}),
            "prompt_tokens",
            "negative_tokens",
        ),
        (
            json!({"type":"usage","persona":"p","chatmode":"c","model":"m","prompt_tokens":"3","completion_tokens":0}),
            "prompt_tokens",
            "invalid_field",
        ),
        (
            json!({"type":"usage","persona":"p","chatmode":"c","prompt_tokens":1,"completion_tokens":0}),
            "model",
            "missing_field",
        ),
        (
            json!({"type":"usage","persona":"p","chatmode":"c","model":"m","prompt_tokens":1,"completion_tokens":0,"promt":1}),
            "promt",
            "unknown_field",
        ),
        (
            json!({"type":"stage","workflow":"w","stage":"s","persona":"p","model":"m","duration_seconds":1,"gate":"passed"}),
            "gate",
            "invalid_field",
        ),
        (json!({"type":"teleport"}), "type", "unknown_type"),
        (
            json!({"type":"usage","persona":"p","chatmode":"c","model":"m","prompt_tokens":18446744073709551615u64,"completion_tokens":0}),
            "prompt_tokens",
            "too_many_tokens",
        ),
        (
            json!({"type":"usage","persona":"p","chatmode":"c","model":"m","prompt_tokens":1,"completion_tokens":1_000_000_001u64}),
            "completion_tokens",
            "too_many_tokens",
        ),
        (
            json!({"type":"usage","persona":"p","chatmode":"c","model":"m","prompt_tokens":1,"completion_tokens":1,"cost_usd":1e308}),
            "cost_usd",
            "out_of_range",
        ),
        (
            json!({"type":"usage","persona":"p","chatmode":"c","model":"x".repeat(201),"prompt_tokens":1,"completion_tokens":1}),
            "model",
            "invalid_field",
        ),
        (
            json!({"type":"usage","persona":"p","chatmode":"c","model":"m","prompt_tokens":1,"completion_tokens":1,"duration_seconds":1e300}),
            "duration_seconds",
            "out_of_range",
        ),
        (
            json!({"type":"persona_switch","session":"s","to":"b","chatmode":"c","timestamp":"yesterday"}),
            "timestamp",
            "invalid_field",
        ),
        (
            json!({"type":"persona_switch","session":"s","to":"b","chatmode":"c","timestamp": (NOW / 1000 + 3600)}),
            "timestamp",
            "future_timestamp",
        ),
    ];
    for (event, field, category) in cases {
        let r = parse_event(&event, NOW, &EventLimits::default()).expect_err(&event.to_string());
        assert_eq!(r.field.as_deref(), Some(field), "{event}");
        assert_eq!(r.category, category, "{event}");
    }
}

#[test]
fn switch_from_may_be_null() {
    let s = parse_event(
        &json!({"type":"persona_switch","session":"s","from":null,"to":"b","chatmode":"c"}),
        NOW,
        &EventLimits::default(),
    )
    .unwrap();
    assert_eq!(s.at, NOW);
    assert!(matches!(
        s.event,
        Event::PersonaSwitch(PersonaSwitch { from: None, .. })
    ));
}

#[test]
fn a_word_field_names_its_choices_when_missing_or_wrong() {
    let reason = |event: serde_json::Value| {
        let e = parse_event(&event, NOW, &EventLimits::default()).unwrap_err();
        (e.category, e.reason)
    };
    let stage = json!({"type":"stage","workflow":"w","stage":"s","persona":"p","model":"m","duration_seconds":1});
    let mut wrong = stage.clone();
    wrong["gate"] = json!(true);
    assert_eq!(
        reason(stage),
        (
            "missing_field",
            "`gate` is required: \"pass\" or \"fail\"".to_string()
        )
    );
    assert_eq!(
        reason(wrong),
        (
            "invalid_field",
            "`gate` must be \"pass\" or \"fail\", got true".to_string()
        )
    );
    let tool = json!({"type":"mcp_tool_call","persona":"p","server":"git","tool":"log","duration_seconds":1,"result":"fine"});
    assert_eq!(
        reason(tool),
        (
            "invalid_field",
            "`result` must be \"ok\", \"error\" or \"refused\", got \"fine\"".to_string()
        )
    );
    let ok = json!({"type":"mcp_tool_call","persona":"p","server":"git","tool":"log","duration_seconds":1,"result":"refused"});
    let Event::McpToolCall(call) = parse_event(&ok, NOW, &EventLimits::default())
        .unwrap()
        .event
    else {
        panic!("not a tool call")
    };
    assert_eq!(call.result, ToolCallResult::Refused);
}
