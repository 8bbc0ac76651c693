//! The persona switch policy (cooldown, oscillation) and capability routing, on the manual clock.

use hypertool::config::Source;
use serde_json::{json, Value};

use crate::common::*;

async fn switch(s: &TestServer, session: &str, to: &str, chatmode: &str) -> Value {
    let (status, body) = s
        .post_raw(
            "/v1/personas/switch",
            json!({"session": session, "to": to, "chatmode": chatmode}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_inside_the_cooldown_keeps_the_current_persona() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let first = switch(&s, "s1", "backend-engineer", "feature-implementation").await;
    assert_eq!(
        (first["switched"].as_bool(), first["from"].is_null()),
        (Some(true), true)
    );
    // The first persona of a session is not a switch: the next one may follow at once.
    s.clock.advance_ms(1_000);
    let second = switch(&s, "s1", "tta-testing-specialist", "feature-implementation").await;
    assert_eq!(second["switched"], true);
    assert_eq!(second["persona"], "testing-specialist");
    assert_eq!(second["from"], "backend-engineer");
    // 1 s after that switch, inside the 5 s default cooldown: refused, with when to retry.
    s.clock.advance_ms(1_000);
    let third = switch(&s, "s1", "backend-engineer", "feature-implementation").await;
    assert_eq!(third["switched"], false);
    assert_eq!(third["persona"], "testing-specialist");
    assert_eq!(third["reason"], "cooldown");
    assert_eq!(third["requested"], "backend-engineer");
    assert_eq!(third["retry_after_seconds"], 4.0);
    // Asking for the persona already in force changes nothing.
    let same = switch(&s, "s1", "testing-specialist", "feature-implementation").await;
    assert_eq!(same["reason"], "already_current");
    // At exactly 5 s the cooldown is over.
    s.clock.advance_ms(4_000);
    let fourth = switch(&s, "s1", "backend-engineer", "feature-implementation").await;
    assert_eq!(fourth["switched"], true);

    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_persona_switches_suppressed_total",
            &[
                ("chatmode", "feature-implementation"),
                ("reason", "cooldown")
            ]
        ),
        Some(1.0)
    );
    let switches = |from, to| {
        m.get(
            "hypertool_persona_switches_total",
            &[
                ("from_persona", from),
                ("to_persona", to),
                ("chatmode", "feature-implementation"),
            ],
        )
    };
    assert_eq!(
        switches("backend-engineer", "testing-specialist"),
        Some(1.0)
    );
    assert_eq!(
        switches("testing-specialist", "backend-engineer"),
        Some(1.0)
    );

    // chatmodes.yml gives `incident` a 2 s cooldown.
    switch(&s, "s2", "devops-engineer", "incident").await;
    s.clock.advance_ms(100);
    switch(&s, "s2", "observability-expert", "incident").await;
    s.clock.advance_ms(1_999);
    let early = switch(&s, "s2", "devops-engineer", "incident").await;
    assert_eq!(early["reason"], "cooldown", "{early}");
    s.clock.advance_ms(1);
    let after = switch(&s, "s2", "devops-engineer", "incident").await;
    assert_eq!(after["switched"], true, "{after}");

    // The session view: persona, time in it, history.
    s.clock.advance_ms(3_000);
    let (status, view) = s.get_json("/api/sessions/s1").await;
    assert_eq!(status, 200);
    assert_eq!(view["persona"], "backend-engineer");
    assert_eq!(view["seconds_in_persona"], 5.1);
    let history: Vec<&str> = view["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["persona"].as_str().unwrap())
        .collect();
    assert_eq!(
        history,
        ["backend-engineer", "testing-specialist", "backend-engineer"]
    );

    // Bad input.
    let (status, body) = s
        .post_raw(
            "/v1/personas/switch",
            json!({"session": "s1", "to": "wizard"}).to_string(),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unknown_persona"))
    );
    let (status, body) = s
        .post_raw("/v1/personas/switch", json!({"to": "wizard"}).to_string())
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oscillation_is_flagged_and_in_suppress_mode_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let personas = ["backend-engineer", "testing-specialist"];
    let mut last = Value::Null;
    for i in 0..4 {
        last = switch(&s, "loop", personas[i % 2], "incident").await;
        assert_eq!(last["switched"], true, "{last}");
        if i < 3 {
            assert!(last["oscillation"].is_null(), "{last}");
        }
        s.clock.advance_secs(3);
    }
    assert_eq!(
        last["oscillation"]["personas"],
        json!(["backend-engineer", "testing-specialist"])
    );
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_persona_oscillations_total",
            &[("chatmode", "incident")]
        ),
        Some(1.0)
    );
    let (_, list) = s.get_json("/api/oscillations").await;
    assert_eq!(list["data"][0]["session"], "loop");
    // The same four switches spread wider than the window (120 s) are no oscillation.
    for i in 0..4 {
        let r = switch(&s, "slow", personas[i % 2], "incident").await;
        assert!(r["oscillation"].is_null(), "{r}");
        s.clock.advance_secs(50);
    }
    // Oscillations are derived from the ledger: a restart counts the same.
    let clock = s.clock.clone();
    s.stop().await;
    let s = start(Source::Embedded, dir.path(), clock).await;
    assert_eq!(
        s.metrics().await.get(
            "hypertool_persona_oscillations_total",
            &[("chatmode", "incident")]
        ),
        Some(1.0)
    );
    s.stop().await;

    // With oscillation_action = "suppress" the fourth switch is refused.
    let dir = tempfile::tempdir().unwrap();
    let s = start_edited(
        dir.path(),
        &[(
            "oscillation_action = \"flag\"",
            "oscillation_action = \"suppress\"",
        )],
    )
    .await;
    for i in 0..3 {
        switch(&s, "loop", personas[i % 2], "incident").await;
        s.clock.advance_secs(3);
    }
    let refused = switch(&s, "loop", personas[1], "incident").await;
    assert_eq!(refused["switched"], false);
    assert_eq!(refused["reason"], "oscillation");
    assert_eq!(refused["persona"], "backend-engineer");
    assert_eq!(
        s.metrics().await.get(
            "hypertool_persona_switches_suppressed_total",
            &[("chatmode", "incident"), ("reason", "oscillation")]
        ),
        Some(1.0)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_keeps_a_capable_persona_and_moves_an_incapable_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let route = |body: Value| {
        let s = &s;
        async move {
            let (status, r) = s.post_raw("/v1/personas/route", body.to_string()).await;
            assert_eq!(status, 200, "{r}");
            r
        }
    };
    let fresh = route(json!({"task": "Improve pytest coverage for the integration tests"})).await;
    assert_eq!(fresh["persona"], "testing-specialist");
    assert_eq!(fresh["keep"], false);

    switch(&s, "s", "backend-engineer", "default").await;
    let kept =
        route(json!({"session": "s", "task": "Improve pytest coverage for the integration tests"}))
            .await;
    assert_eq!(kept["current"], "backend-engineer");
    assert_eq!(kept["persona"], "backend-engineer", "{kept}");
    assert_eq!(kept["keep"], true);

    let moved = route(json!({"session": "s", "task": "Build Grafana dashboards and Prometheus alert configuration"})).await;
    assert_eq!(moved["persona"], "observability-expert", "{moved}");
    assert_eq!(moved["keep"], false);

    let (status, body) = s
        .post_raw("/v1/personas/route", json!({"task": "  "}).to_string())
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_task"))
    );
    s.stop().await;
}
