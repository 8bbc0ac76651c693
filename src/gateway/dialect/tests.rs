//! Tests of `dialect`.
use super::*;
use serde_json::json;

/// Every event's data of an SSE text.
fn datas(events: &[Bytes]) -> Vec<String> {
    let mut decoder = crate::gateway::sse::SseDecoder::default();
    let mut out = Vec::new();
    for e in events {
        decoder.push(e, &mut out).unwrap();
    }
    out
}

/// Decodes a stream in `dialect` back into deltas, and says whether it ended properly.
fn decode(dialect: Dialect, events: &[Bytes]) -> (Vec<Delta>, bool) {
    let mut d = StreamDecoder::new(dialect);
    let mut out = Vec::new();
    let mut ended = false;
    for data in datas(events) {
        if let Decoded::End = d.decode(&data, &mut out) {
            ended = true;
        }
    }
    (out, ended)
}

/// What a stream said: its text, tool calls (name, arguments), stop and usage.
type Said = (
    String,
    Vec<(String, String)>,
    Option<StopReason>,
    Option<TokenUsage>,
);

fn collapse(deltas: &[Delta]) -> Said {
    let (mut text, mut tools, mut stop, mut usage) =
        (String::new(), Vec::<(String, String)>::new(), None, None);
    for d in deltas {
        match d {
            Delta::Text(t) => text.push_str(t),
            Delta::ToolStart { name, .. } => tools.push((name.clone(), String::new())),
            Delta::ToolArgs { json, .. } => tools.last_mut().unwrap().1.push_str(json),
            Delta::Stop(s) => stop = Some(*s),
            Delta::Usage(u) => usage = Some(*u),
            _ => {}
        }
    }
    (text, tools, stop, usage)
}

fn answer() -> Answer {
    Answer {
        id: "x".into(),
        model: "m".into(),
        blocks: vec![
            Block::Text("Let me look it up.".into()),
            Block::ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
        ],
        stop: StopReason::ToolUse,
        usage: Some(TokenUsage {
            input: 20,
            cache_read: 5,
            cache_write: 3,
            output: 9,
            reasoning: 0,
        }),
    }
}

#[test]
fn a_stream_survives_each_dialect_both_ways() {
    for (first, second) in [
        (Dialect::Messages, Dialect::Chat),
        (Dialect::Chat, Dialect::Messages),
    ] {
        // The source stream, as an upstream of `first` sends it.
        let source = answer_stream(&answer(), first, true, 0, true);
        let (deltas, ended) = decode(first, &source);
        assert!(ended, "{first:?} stream has its end");
        // Relayed into `second`, then read back.
        let mut enc = StreamEncoder::new(second, true, 0);
        let mut out = Vec::new();
        for d in &deltas {
            enc.encode(d, &mut out);
        }
        enc.finish(Some("x-hypertool-quality-gate: pass"), &mut out);
        let (back, ended) = decode(second, &out);
        assert!(ended, "{second:?} stream has its end");
        let (text, tools, stop, usage) = collapse(&back);
        assert_eq!(text, "Let me look it up.");
        assert_eq!(
            tools,
            [("get_weather".to_string(), r#"{"city":"Paris"}"#.to_string())]
        );
        assert_eq!(stop, Some(StopReason::ToolUse));
        let u = usage.unwrap();
        // Chat has no cache-write field: its total input survives, and the cached reads.
        assert_eq!(
            (u.input, u.output, u.cache_read),
            (20, 9, 5),
            "{first:?} -> {second:?}"
        );
        assert!(
            out.iter()
                .any(|b| b.starts_with(b": x-hypertool-quality-gate: pass")),
            "the gate's comment"
        );
    }
}

#[test]
fn answers_translate_both_ways_with_their_usage() {
    let a = answer();
    let m = render_answer(&a, Dialect::Messages);
    assert_eq!(
        m["usage"]["input_tokens"], 12,
        "Anthropic counts the uncached part"
    );
    assert_eq!(m["content"][1]["input"], json!({"city": "Paris"}));
    assert_eq!(m["stop_reason"], "tool_use");
    let back = parse_answer(Dialect::Messages, m.to_string().as_bytes()).unwrap();
    assert_eq!(back.usage, a.usage);
    assert_eq!(back.blocks, a.blocks);
    let c = render_answer(&back, Dialect::Chat);
    assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(c["usage"]["prompt_tokens"], 20);
    assert_eq!(c["usage"]["prompt_tokens_details"]["cached_tokens"], 5);
    let again = parse_answer(Dialect::Chat, c.to_string().as_bytes()).unwrap();
    assert_eq!(again.text(), a.text());
}

#[test]
fn requests_translate_with_system_tools_images_and_results() {
    let m = json!({
        "model": "claude", "max_tokens": 100, "stop_sequences": ["END"],
        "system": [{"type": "text", "text": "be brief"}],
        "metadata": {"user_id": "u1"},
        "tools": [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any"},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                                         {"type": "text", "text": "and?"}]}
        ]
    });
    let body = m.as_object().unwrap();
    messages::check_request(body).unwrap();
    let chat = messages::to_chat(body).unwrap();
    assert_eq!(chat["stop"], json!(["END"]));
    assert_eq!(chat["user"], "u1");
    assert_eq!(chat["tool_choice"], "required");
    assert_eq!(chat["tools"][0]["function"]["name"], "get_weather");
    let msgs = chat["messages"].as_array().unwrap();
    let roles: Vec<&str> = msgs.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
    assert_eq!(
        msgs[1]["content"][1]["image_url"]["url"],
        "data:image/png;base64,AAAA"
    );
    assert_eq!(
        msgs[2]["tool_calls"][0]["function"]["arguments"],
        r#"{"city":"Paris"}"#
    );
    assert_eq!(msgs[3]["tool_call_id"], "t1");
    // And back: the tool's result joins the user's next words in one message.
    let back = messages::from_chat(&chat).unwrap();
    assert_eq!(back["system"], "be brief");
    assert_eq!(back["tool_choice"], json!({"type": "any"}));
    let msgs = back["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3);
    assert_eq!(msgs[1]["content"][0]["input"], json!({"city": "Paris"}));
    assert_eq!(msgs[2]["content"][0]["type"], "tool_result");
    assert_eq!(msgs[2]["content"][1]["text"], "and?");
    assert_eq!(msgs[0]["content"][1]["source"]["data"], "AAAA");
    messages::check_request(&back).unwrap();
    // A chat request with no max_tokens gets Anthropic's required one.
    let plain = json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 1.7});
    let m = messages::from_chat(plain.as_object().unwrap()).unwrap();
    assert_eq!(m["max_tokens"], messages::DEFAULT_MAX_TOKENS);
    assert_eq!(m["temperature"], 1.0);
    // A server tool runs only at Anthropic: a chat model is offered the other tools.
    let server = json!({"messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"},
                  {"name": "search", "input_schema": {"type": "object"}}]});
    let chat = messages::to_chat(server.as_object().unwrap()).unwrap();
    assert_eq!(chat["tools"].as_array().unwrap().len(), 1);
    assert_eq!(chat["tools"][0]["function"]["name"], "search");
}

#[test]
fn bad_messages_requests_are_named_where_they_are_wrong() {
    let check = |v: Value| {
        messages::check_request(v.as_object().unwrap())
            .err()
            .map(|e| (e.code, e.param.unwrap_or_default()))
    };
    assert_eq!(
        check(json!({"messages": [{"role": "user", "content": [{"type": "hologram"}]}]})),
        Some((
            "unsupported_content",
            "messages[0].content[0].type".to_string()
        ))
    );
    assert_eq!(
        check(
            json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope"}]}]})
        ),
        Some((
            "invalid_tool_result",
            "messages[0].content[0].tool_use_id".to_string()
        ))
    );
    assert_eq!(
        check(json!({"messages": [{"role": "robot", "content": "hi"}]})),
        Some(("invalid_role", "messages[0].role".to_string()))
    );
    assert_eq!(
        check(json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]})),
        Some(("invalid_content", "messages[0].content[0]".to_string()))
    );
    assert_eq!(
        check(json!({"messages": [{"role": "user", "content": [42]}]})),
        Some(("invalid_content", "messages[0].content[0]".to_string()))
    );
    assert_eq!(
        check(json!({"messages": []})).map(|e| e.0),
        Some("missing_messages")
    );
    assert_eq!(
        check(json!({"model": "m"})).map(|e| e.0),
        Some("missing_messages")
    );
    // Unknown top-level fields pass.
    assert_eq!(
        check(json!({"messages": [{"role": "user", "content": "hi"}], "context_management": {}})),
        None
    );
}

#[test]
fn a_responses_tool_round_keeps_every_call_and_output_through_chat_and_messages() {
    // Codex's turn after two tool calls: each output must reach the model with its call's id,
    // in a chat upstream's shape and, through chat, an Anthropic upstream's.
    let r = json!({
        "model": "gpt", "instructions": "be brief",
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list and read"}]},
            {"type": "function_call", "call_id": "c1", "name": "ls", "arguments": "{\"dir\":\".\"}"},
            {"type": "function_call", "call_id": "c2", "name": "cat", "arguments": "{\"f\":\"a\"}"},
            {"type": "function_call_output", "call_id": "c1", "output": "a b"},
            {"type": "custom_tool_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "contents of a"}]},
        ]
    });
    let body = r.as_object().unwrap();
    let chat = responses::to_chat(body).unwrap();
    let msgs = chat["messages"].as_array().unwrap();
    let roles: Vec<&str> = msgs.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool", "tool"]);
    let calls: Vec<&str> = msgs[2]["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(calls, ["c1", "c2"], "two calls, one assistant turn");
    assert_eq!(
        (
            msgs[3]["tool_call_id"].as_str(),
            msgs[3]["content"].as_str()
        ),
        (Some("c1"), Some("a b"))
    );
    assert_eq!(msgs[4]["tool_call_id"], "c2");
    assert!(
        msgs[4]["content"]
            .as_str()
            .unwrap()
            .contains("contents of a"),
        "{}",
        msgs[4]
    );
    // Through to Messages: both results, in one user turn after the assistant's two tool uses.
    let m = messages::from_chat(&chat).unwrap();
    let turns = m["messages"].as_array().unwrap();
    let results: Vec<(&str, String)> = turns
        .iter()
        .flat_map(|t| t["content"].as_array().into_iter().flatten())
        .filter(|b| b["type"] == "tool_result")
        .map(|b| (b["tool_use_id"].as_str().unwrap(), b["content"].to_string()))
        .collect();
    assert_eq!(results.len(), 2, "{m:?}");
    assert_eq!(results[0].0, "c1");
    assert!(results[0].1.contains("a b"));
    assert_eq!(results[1].0, "c2");
    assert!(results[1].1.contains("contents of a"));
    messages::check_request(&m).unwrap();
    // Counted too: the outputs are part of the prompt admission reserves.
    let counted = crate::gateway::tokens::count_messages(&responses::prompt_for_count(body));
    let without = {
        let mut b = body.clone();
        b["input"].as_array_mut().unwrap().truncate(3);
        crate::gateway::tokens::count_messages(&responses::prompt_for_count(&b))
    };
    assert!(counted > without + 4, "{counted} vs {without}");
}
