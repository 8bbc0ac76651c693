//! Tests of `settings`.
use super::*;

/// Found by the mutation property test: the TOML parser gives no message for a key with no
/// value at the end of the file, and the error said only "h.toml:2: ".
#[test]
fn a_key_without_its_value_is_an_error_that_says_so() {
    for text in [
        "[server]\nlisten =",
        "[server]\nlisten =\n",
        "[ledger]\nsync = ",
    ] {
        let errs = Settings::parse("h.toml", text).unwrap_err();
        assert_eq!(errs[0].line, Some(2), "{text:?}");
        assert!(!errs[0].message.trim().is_empty(), "{:?}", errs[0]);
    }
    let errs = Settings::parse("h.toml", "[server]\nlisten =").unwrap_err();
    assert!(
        errs[0].message.contains("value is missing"),
        "{:?}",
        errs[0]
    );
}

#[test]
fn a_bad_ledger_url_is_reported_at_the_ledgers_url_line() {
    // (With HYPERTOOL_LEDGER_URL set, that URL is in force and named instead of a line.)
    let text =
        "[gateway.cache]\nurl = \"redis://127.0.0.1:6379/0\"\n\n[ledger]\nurl = \"mysql://db/h\"\n";
    let errs = Settings::parse("h.toml", text).unwrap_err();
    let bad = errs
        .iter()
        .find(|e| e.message.contains("is not a PostgreSQL URL"))
        .unwrap_or_else(|| panic!("{errs:?}"));
    assert_eq!(bad.line, Some(5), "{bad:?}");
}

#[test]
fn an_alerts_knob_is_reported_at_its_own_tables_line() {
    let text = "[alerts.TokenBudgetExceeded]\nthreshold = 0\nwindow = \"5m\"\n\n[alerts.HypertoolMetricsNotReported]\nthreshold = 1\n\n[alerts.SlowWorkflowStage]\nquantile = 2\n";
    let errs = Settings::parse("h.toml", text).unwrap_err();
    let at = |key: &str| {
        errs.iter()
            .find(|e| e.message.contains(key))
            .and_then(|e| e.line)
    };
    assert_eq!(
        at("alerts.HypertoolMetricsNotReported.threshold"),
        Some(6),
        "{errs:?}"
    );
    assert_eq!(at("alerts.SlowWorkflowStage.quantile"), Some(9), "{errs:?}");
}

#[test]
fn a_key_variable_that_is_not_set_is_named_with_its_line() {
    let text = "[server]\nlisten = \"127.0.0.1:1\"\n\n[[server.viewer_keys]]\nkey_env = \"HT_UNIT_TEST_NEVER_SET\"\n";
    let errs = Settings::parse("h.toml", text).unwrap_err();
    let shown = errs
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(shown.contains("h.toml:5"), "{shown}");
    assert!(shown.contains("server.viewer_keys[0].key_env"), "{shown}");
    assert!(
        shown.contains("$HT_UNIT_TEST_NEVER_SET is not set"),
        "{shown}"
    );
}

#[test]
fn langfuse_enabled_is_auto_true_or_false() {
    let mode = |v: &str| {
        Settings::parse("h.toml", &format!("[langfuse]\nenabled = {v}\n"))
            .map(|s| s.langfuse.enabled)
            .map_err(|e| {
                e.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
    };
    assert_eq!(
        Settings::parse("h.toml", "").unwrap().langfuse.enabled,
        LangfuseMode::Auto
    );
    assert_eq!(mode("\"auto\""), Ok(LangfuseMode::Auto));
    assert_eq!(mode("true"), Ok(LangfuseMode::On));
    assert_eq!(mode("false"), Ok(LangfuseMode::Off));
    let err = mode("\"maybe\"").unwrap_err();
    assert!(
        err.contains("h.toml:2") && err.contains("\"auto\""),
        "{err}"
    );
}

#[test]
fn empty_file_gives_defaults() {
    let s = Settings::parse("hypertool.toml", "").unwrap();
    assert_eq!(s.metrics_listen.port(), 9464);
    assert_eq!(s.listen.port(), 8080);
    assert_eq!(s.max_values_per_label, 50);
}

#[test]
fn unknown_key_names_file_and_line() {
    let errs =
        Settings::parse("h.toml", "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
    assert_eq!(errs[0].line, Some(3));
    assert!(
        errs[0].message.contains("unknown field `lisen`"),
        "{}",
        errs[0]
    );
}

#[test]
fn bad_address_names_the_key() {
    let errs = Settings::parse("h.toml", "[server]\nmetrics_listen = \"nope\"\n").unwrap_err();
    assert_eq!(errs[0].line, Some(2));
    assert!(errs[0].to_string().contains("metrics_listen"));
}

#[test]
fn a_bad_upstream_proxy_is_refused_without_echoing_it() {
    let text = "[[gateway.upstreams]]\nname = \"far\"\nbase_url = \"https://api.example.com/v1\"\nproxy = \"socks5://user:s3cret@proxy\"\n";
    let errs = Settings::parse("h.toml", text).unwrap_err();
    let shown = errs
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(shown.contains("gateway.upstreams[0].proxy"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
    let good = text.replace("socks5://user:s3cret@proxy", "http://proxy.internal:3128");
    let s = Settings::parse("h.toml", &good).unwrap();
    let far = &s.gateway.upstreams["far"];
    assert_eq!(far.proxy.as_deref(), Some("http://proxy.internal:3128"));
    assert_eq!(
        far.chat_url.as_ref().map(|u| u.to_string()).as_deref(),
        Some("https://api.example.com/v1/chat/completions")
    );
}
