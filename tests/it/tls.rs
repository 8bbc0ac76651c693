//! TLS to the stores, against the real servers: a PostgreSQL that accepts TLS only (`ssl = on`,
//! `hostssl` lines alone) and a `redis-server --tls-port`, with certificates the test makes (a CA,
//! a server certificate it signs, and a CA that signed nothing of theirs).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hypertool::config::Source;
use hypertool::core::clock::{Clock, ManualClock};
use hypertool::server::{self, ServeOptions};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use serde_json::json;

use crate::common::*;

/// A CA of the test's, and a server certificate it signed.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA named `name`, and a certificate it signs for `names` (DNS names; an IP address is an IP
/// name).
pub fn pki(name: &str, names: &[&str]) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut leaf = CertificateParams::new(names).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "hypertool test server");
    let cert = leaf.signed_by(&key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A configuration copy whose ledger is `url`, with `extra` lines `ledger.KEY = …` and
/// `tls.KEY = …` in those sections; its directory holds `ca.pem` (the servers' CA) and
/// `other-ca.pem` (one that signed nothing of theirs).
fn config_with_ledger(dir: &Path, url: &str, pki: &Pki, extra: &str) -> PathBuf {
    let toml = config_copy(dir);
    let config = toml.parent().unwrap();
    std::fs::write(config.join("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(config.join("other-ca.pem"), pki_other().ca_pem).unwrap();
    let mut text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("[ledger]\n"));
    // `ledger.KEY = …` and `tls.KEY = …` lines go into those sections (the file has both).
    let in_section = |prefix: &str| -> String {
        extra
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let (ledger, tls) = (in_section("ledger."), in_section("tls."));
    text = text.replacen(
        "[ledger]\n",
        &format!("[ledger]\nurl = \"{url}\"\n{ledger}"),
        1,
    );
    assert!(text.contains("\n[tls]\n"));
    text = text.replacen("\n[tls]\n", &format!("\n[tls]\n{tls}"), 1);
    std::fs::write(&toml, text).unwrap();
    toml
}

fn pki_other() -> Pki {
    pki("a CA that signed nothing of theirs", &["localhost"])
}

/// Starts hypertool on `toml`; its start-up error when it refuses.
async fn serve(toml: &Path, data: &Path) -> Result<TestServer, String> {
    let clock = Arc::new(ManualClock::new(T0));
    let running = server::start(
        ServeOptions {
            config: Source::File(toml.to_path_buf()),
            data_dir: data.to_path_buf(),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            mcp_servers: None,
        },
        clock.clone() as Arc<dyn Clock>,
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(TestServer {
        api: format!("http://{}", running.api_addr),
        metrics: format!("http://{}", running.metrics_addr),
        running: Some(running),
        clock,
        http: reqwest::Client::new(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_over_tls_by_sslmode_and_a_certificate_the_ca_did_not_sign_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The certificate names `localhost` only: verify-full must reach it by that name.
    let pki = pki("hypertool test CA", &["localhost"]);
    let pg = Postgres::start_tls(dir.path(), &pki.cert_pem, &pki.key_pem).await;
    let port = pg
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let url =
        |host: &str, params: &str| format!("postgres://hypertool@{host}:{port}/postgres?{params}");
    let attempt = |name: &str, url: String, extra: &str| {
        let d = dir.path().join(name);
        let toml = config_with_ledger(&d, &url, &pki, extra);
        async move { serve(&toml, &d.join("data")).await }
    };

    // verify-full against the test's CA, by name: hypertool starts and its events are stored.
    let s = attempt(
        "full",
        url("localhost", "sslmode=verify-full&sslrootcert=ca.pem"),
        "",
    )
    .await
    .expect("verify-full with the CA that signed the certificate");
    let (status, body) = s
        .post_events(json!([usage("backend-engineer", "c", "m", 30, 12)]))
        .await;
    assert_eq!(status, 200, "{body}");
    // hypertool's connections are TLS ones: PostgreSQL says so of each client connection.
    let tls = pg.query(
        "SELECT count(*) FILTER (WHERE ssl), count(*) FILTER (WHERE NOT ssl) \
         FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE client_addr IS NOT NULL",
    );
    let (encrypted, plain): (i64, i64) = (tls[0].get(0), tls[0].get(1));
    assert!(
        encrypted >= 1 && plain == 0,
        "{encrypted} TLS, {plain} plain"
    );
    s.stop().await;
    let stored = pg.query("SELECT count(*) FROM hypertool_events WHERE kind = 'usage'");
    assert_eq!(stored[0].get::<_, i64>(0), 1);

    // The CA once for every client (`[tls] ca_file`), no sslrootcert: the same.
    let s = attempt(
        "shared-ca",
        url("localhost", "sslmode=verify-full"),
        "tls.ca_file = \"ca.pem\"",
    )
    .await
    .expect("verify-full with [tls] ca_file");
    s.stop().await;
    // The ledger's own ca_file wins over the shared one.
    let e = attempt(
        "own-ca",
        url("localhost", "sslmode=verify-full"),
        "ledger.ca_file = \"other-ca.pem\"\ntls.ca_file = \"ca.pem\"",
    )
    .await
    .err()
    .expect("the ledger's own CA did not sign the server's certificate");
    assert!(
        e.contains("invalid peer certificate") && e.contains("UnknownIssuer"),
        "{e}"
    );

    // A certificate the CA did not sign: refused at start, the problem named.
    let e = attempt(
        "other",
        url("localhost", "sslmode=verify-full&sslrootcert=other-ca.pem"),
        "",
    )
    .await
    .err()
    .expect("a certificate the trusted CA did not sign");
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
    assert!(e.contains("sslrootcert=FILE or [ledger] ca_file"), "{e}");
    assert!(!e.contains("password"), "{e}");

    // By address the name does not match: verify-full refuses, verify-ca (the chain only) and
    // require (encryption only) accept.
    let e = attempt(
        "by-ip",
        url("127.0.0.1", "sslmode=verify-full&sslrootcert=ca.pem"),
        "",
    )
    .await
    .err()
    .expect("verify-full with a name the certificate does not carry");
    assert!(e.contains("not valid for name \"127.0.0.1\""), "{e}");
    for (name, params) in [
        ("ca-only", "sslmode=verify-ca&sslrootcert=ca.pem"),
        ("require", "sslmode=require"),
    ] {
        let s = attempt(name, url("127.0.0.1", params), "")
            .await
            .unwrap_or_else(|e| panic!("{params}: {e}"));
        s.stop().await;
    }
    // verify-ca still checks the chain.
    let e = attempt(
        "ca-other",
        url("127.0.0.1", "sslmode=verify-ca&sslrootcert=other-ca.pem"),
        "",
    )
    .await
    .err()
    .expect("verify-ca with another CA");
    assert!(e.contains("UnknownIssuer"), "{e}");

    // Without TLS the server (hostssl only) turns hypertool away, and says why.
    let e = attempt("plain", url("127.0.0.1", "sslmode=disable"), "")
        .await
        .err()
        .expect("a plain connection to a TLS-only server");
    assert!(
        e.contains("no encryption") || e.contains("pg_hba.conf"),
        "{e}"
    );

    // A missing or unreadable CA file is a configuration error with the file and line.
    let d = dir.path().join("bad-ca");
    let toml = config_with_ledger(
        &d,
        &url("localhost", "sslmode=verify-full"),
        &pki,
        "tls.ca_file = \"missing.pem\"",
    );
    let e = serve(&toml, &d.join("data"))
        .await
        .err()
        .expect("a missing CA file");
    assert!(
        e.contains("tls.ca_file") && e.contains("missing.pem") && e.contains("cannot be read"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_cache_over_rediss_with_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki("hypertool test CA", &["localhost"]);
    let redis = Redis::start_tls(dir.path(), &pki.cert_pem, &pki.key_pem).await;
    let upstream = FakeUpstream::start(dir.path()).await;
    // `ca` is the CA file `[gateway.cache]` trusts (its own `ca_file`, or `[tls]`'s).
    let serve_with = |name: &str, trust: &str| {
        let home = dir.path().join(name);
        let toml = gateway_config(&home, &upstream.base_url, "");
        let config = toml.parent().unwrap().to_path_buf();
        std::fs::write(config.join("ca.pem"), &pki.ca_pem).unwrap();
        std::fs::write(config.join("other-ca.pem"), pki_other().ca_pem).unwrap();
        let mut text = std::fs::read_to_string(&toml).unwrap();
        assert!(text.contains("[gateway.cache]\n"));
        let (cache, shared) = match trust.strip_prefix("tls:") {
            Some(file) => (String::new(), format!("ca_file = \"{file}\"\n")),
            None => (format!("ca_file = \"{trust}\"\n"), String::new()),
        };
        text = text.replacen(
            "[gateway.cache]\n",
            &format!("[gateway.cache]\nurl = \"{}\"\n{cache}", redis.url),
            1,
        );
        assert!(text.contains("\n[tls]\n"));
        text = text.replacen("\n[tls]\n", &format!("\n[tls]\n{shared}"), 1);
        std::fs::write(&toml, text).unwrap();
        async move {
            start(
                Source::File(toml),
                &home.join("data"),
                Arc::new(ManualClock::new(T0)),
            )
            .await
        }
    };
    let ask = |s: &TestServer| {
        let req = s
            .http
            .post(format!("{}/v1/chat/completions", s.api))
            .header("x-hypertool-persona", "backend-engineer")
            .json(&json!({"model": "ok", "temperature": 0,
                          "messages": [{"role": "user", "content": "what is a ledger?"}]}));
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let shared = |m: &Exposition, result: &str| {
        m.get("hypertool_cache_shared_total", &[("result", result)])
            .unwrap_or(0.0)
    };
    // Trusting the CA by its own ca_file: the answer is stored in Redis over TLS; by the shared
    // one, a second hypertool is answered from there.
    for (name, trust, result) in [("own", "ca.pem", "stored"), ("shared", "tls:ca.pem", "hit")] {
        let s = serve_with(name, trust).await;
        assert_eq!(ask(&s).await, 200);
        eventually(
            &format!("{name}: {result} in Redis"),
            Duration::from_secs(10),
            || async { (shared(&s.metrics().await, result) >= 1.0).then_some(()) },
        )
        .await;
        assert_eq!(shared(&s.metrics().await, "error"), 0.0);
        s.stop().await;
    }
    // Trusting another CA: Redis is never reached (counted as errors), and calls still succeed.
    let s = serve_with("other", "other-ca.pem").await;
    assert_eq!(ask(&s).await, 200);
    eventually(
        "the refused TLS handshake counted",
        Duration::from_secs(10),
        || async { (shared(&s.metrics().await, "error") >= 1.0).then_some(()) },
    )
    .await;
    assert_eq!(shared(&s.metrics().await, "stored"), 0.0);
    s.stop().await;
}
