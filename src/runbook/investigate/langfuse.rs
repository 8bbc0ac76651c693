//! LangfuseIntegrationFailing: the keys, the host, the test call, the spool and the exporter's
//! own evidence.

// The investigations' shared vocabulary (evidence, findings, helpers) and their imports.
use super::*;

pub(super) const LANGFUSE_CAUSES: &[CauseSpec] = &[
    CauseSpec {
        name: "Missing credentials",
        prior: "high",
        indicator: "a key variable is not set",
        fix: "set LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY (under systemd: /etc/hypertool/hypertool.env) and restart",
    },
    CauseSpec {
        name: "Wrong credentials",
        prior: "high",
        indicator: "exports refused (401/403); the test call refused",
        fix: "use the public and secret key of one project on LANGFUSE_HOST; restart",
    },
    CauseSpec {
        name: "Network issue",
        prior: "medium",
        indicator: "exports retried; the test call cannot connect",
        fix: "check LANGFUSE_HOST from this machine (proxy: HTTPS_PROXY)",
    },
    CauseSpec {
        name: "Traces waiting",
        prior: "medium",
        indicator: "the spool grows while the host is reachable",
        fix: "nothing: the backlog drains oldest first; size [tracing] spool_max_bytes for longer outages",
    },
    CauseSpec {
        name: "Langfuse disabled",
        prior: "low",
        indicator: "hypertool_langfuse_enabled is 0",
        fix: "nothing to fix; set the keys or [langfuse] enabled = true to use Langfuse",
    },
];

pub(super) fn langfuse(ev: &Evidence) -> (Vec<Finding>, Scored) {
    let mut out = Vec::new();
    let mut scored: Scored = Vec::new();
    let Some(lf) = &ev.langfuse else {
        out.push(finding(
            "langfuse",
            Status::Info,
            "no Langfuse destination is configured",
            Value::Null,
        ));
        scored.push(("Langfuse disabled", 1.0, "no Langfuse destination".into()));
        return (out, scored);
    };
    let set = |b: bool| if b { "set" } else { "NOT set" };
    out.push(finding(
        "variables",
        if lf.public_key_set && lf.secret_key_set { Status::Ok } else { Status::Fail },
        format!("{} {}, {} {}; host {}; Langfuse {}", lf.public_key_env, set(lf.public_key_set), lf.secret_key_env, set(lf.secret_key_set), lf.host, if lf.enabled { "enabled" } else { "disabled" }),
        json!({"public_key_env": lf.public_key_env, "public_key_set": lf.public_key_set, "secret_key_env": lf.secret_key_env, "secret_key_set": lf.secret_key_set, "host": lf.host, "enabled": lf.enabled}),
    ));
    let (status, text) = match &lf.test_call {
        TestCall::Accepted => (Status::Ok, "Langfuse accepted the keys".to_string()),
        TestCall::Refused { status } => (
            Status::Fail,
            format!("Langfuse refused the keys (HTTP {status})"),
        ),
        TestCall::Unreachable { error } => {
            (Status::Fail, format!("cannot reach {}: {error}", lf.host))
        }
        TestCall::NotTried { why } => (Status::Info, format!("not tried: {why}")),
    };
    out.push(finding(
        "authenticated test call",
        status,
        text,
        json!(lf.test_call),
    ));
    out.push(finding(
        "spool and exports",
        if lf.spool_bytes > 0 { Status::Warn } else { Status::Info },
        format!(
            "{} bytes spooled; exports {}; last accepted {}; last error: {}",
            lf.spool_bytes,
            if lf.exports.is_empty() { "none (no Langfuse destination running)".to_string() } else { lf.exports.iter().map(|(r, n)| format!("{r} {n}")).collect::<Vec<_>>().join(", ") },
            lf.last_success_ms.map_or("never".into(), to_rfc3339),
            lf.last_error.as_deref().unwrap_or("none")
        ),
        json!({"spool_bytes": lf.spool_bytes, "exports": lf.exports, "last_success": lf.last_success_ms.map(to_rfc3339), "last_error": lf.last_error, "traces_accepted": lf.traces_accepted}),
    ));
    let missing = !(lf.public_key_set && lf.secret_key_set);
    scored.push((
        "Missing credentials",
        if missing && lf.enabled {
            1.0
        } else if missing {
            0.3
        } else {
            0.0
        },
        format!(
            "{} {}, {} {}",
            lf.public_key_env,
            set(lf.public_key_set),
            lf.secret_key_env,
            set(lf.secret_key_set)
        ),
    ));
    let refused = lf.exports.get("auth_refused").copied().unwrap_or(0);
    let wrong = matches!(lf.test_call, TestCall::Refused { .. }) || refused > 0;
    scored.push((
        "Wrong credentials",
        if wrong { 0.95 } else { 0.0 },
        format!(
            "test call: {}; {refused} exports refused",
            match &lf.test_call {
                TestCall::Refused { status } => format!("HTTP {status}"),
                TestCall::Accepted => "accepted".into(),
                TestCall::Unreachable { .. } => "unreachable".into(),
                TestCall::NotTried { .. } => "not tried".into(),
            }
        ),
    ));
    let retries = lf.exports.get("retry").copied().unwrap_or(0);
    let unreachable = matches!(lf.test_call, TestCall::Unreachable { .. });
    scored.push((
        "Network issue",
        if unreachable {
            0.9
        } else if retries > 0 {
            0.5
        } else {
            0.0
        },
        format!(
            "test call {}; {retries} exports retried",
            if unreachable {
                "could not connect"
            } else {
                "connected"
            }
        ),
    ));
    let waiting = lf.spool_bytes > 0 && matches!(lf.test_call, TestCall::Accepted);
    scored.push((
        "Traces waiting",
        if waiting { 0.7 } else { 0.0 },
        format!("{} bytes spooled", lf.spool_bytes),
    ));
    scored.push((
        "Langfuse disabled",
        if lf.enabled { 0.0 } else { 1.0 },
        format!("hypertool_langfuse_enabled is {}", u8::from(lf.enabled)),
    ));
    (out, scored)
}
