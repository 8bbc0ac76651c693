//! Throughput benchmark for issue 2's targets; prints numbers, asserts nothing.
//!
//!   cargo bench --bench ingest
//!
//! 1. Events per second through the core alone (`Engine::apply`), a realistic mix.
//! 2. Time to render `/metrics` with 6 personas × 20 chatmodes × 10 models of token series.
//! 3. Events per second through `POST /v1/events` (batches of 100, SQLite ledger on, loopback).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hypertool::config::{self, Source};
use hypertool::core::clock::{Clock, ManualClock, SystemClock};
use hypertool::core::engine::Engine;
use hypertool::core::event::{Event, GateResult, PersonaSwitch, StageResult, Stamped, Usage};
use hypertool::server::{self, ServeOptions};
use hypertool::telemetry::exposition::{self, Format};
use hypertool::telemetry::registry::Registry;

const PERSONAS: [&str; 6] = [
    "backend-engineer",
    "frontend-engineer",
    "devops-engineer",
    "testing-specialist",
    "observability-expert",
    "data-scientist",
];

fn mixed_events(n: usize, start: i64) -> Vec<Stamped> {
    let chatmodes: Vec<String> = (0..20).map(|i| format!("chatmode-{i}")).collect();
    let models: Vec<String> = (0..10).map(|i| format!("model-{i}")).collect();
    let sessions: Vec<String> = (0..1000).map(|i| format!("session-{i}")).collect();
    (0..n)
        .map(|i| {
            let event = match i % 20 {
                0 => Event::PersonaSwitch(PersonaSwitch {
                    session: sessions[i % 1000].clone(),
                    from: Some(PERSONAS[i % 6].into()),
                    to: PERSONAS[(i + 1) % 6].into(),
                    chatmode: chatmodes[i % 20].clone(),
                }),
                1 => Event::Stage(StageResult {
                    workflow: "feature-development".into(),
                    stage: format!("stage-{}", i % 5),
                    persona: PERSONAS[i % 6].into(),
                    model: models[i % 10].clone(),
                    duration_seconds: (i % 400) as f64,
                    gate: if i % 3 == 0 {
                        GateResult::Fail
                    } else {
                        GateResult::Pass
                    },
                    reason: None,
                }),
                _ => Event::Usage(Usage {
                    persona: PERSONAS[i % 6].into(),
                    chatmode: chatmodes[(i / 6) % 20].clone(),
                    model: models[(i / 120) % 10].clone(),
                    prompt_tokens: 100 + (i % 50) as u64,
                    completion_tokens: 20,
                    workflow: None,
                    stage: None,
                    session: (i % 2 == 0).then(|| sessions[i % 1000].clone()),
                    cost_usd: Some(0.001),
                    ..Usage::default()
                }),
            };
            Stamped {
                at: start + i as i64,
                event,
            }
        })
        .collect()
}

fn main() {
    let now = SystemClock.now_ms();
    let cfg = match config::load(&Source::Embedded) {
        Ok(c) => c,
        Err(e) => panic!("built-in configuration invalid: {e}"),
    };

    // 1. Core alone.
    let events = mixed_events(2_000_000, now);
    let mut engine = Engine::new(cfg.engine_config(), now);
    let started = Instant::now();
    for e in &events {
        engine.apply(e);
    }
    let core_secs = started.elapsed().as_secs_f64();
    let core_rate = events.len() as f64 / core_secs;
    println!(
        "core: {} events in {:.3} s = {:.0} events/s (target ≥ 1,000,000; ratio {:.2})",
        events.len(),
        core_secs,
        core_rate,
        core_rate / 1_000_000.0
    );

    // 2. Render with 6 × 20 × 10 token series (plus everything else the mix created).
    for (i, p) in PERSONAS.iter().enumerate() {
        for c in 0..20 {
            for m in 0..10 {
                engine.apply(&Stamped {
                    at: now + i as i64,
                    event: Event::Usage(Usage {
                        persona: p.to_string(),
                        chatmode: format!("chatmode-{c}"),
                        model: format!("model-{m}"),
                        prompt_tokens: 1,
                        completion_tokens: 1,
                        workflow: None,
                        stage: None,
                        session: None,
                        cost_usd: None,
                        ..Usage::default()
                    }),
                });
            }
        }
    }
    let process = Registry::new();
    process.collect(&hypertool::telemetry::families::BUILD_INFO, |emit| {
        emit(&["bench"], 1.0)
    });
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..50 {
        let t = Instant::now();
        let text = exposition::render(&engine, &process.snapshot(), Format::Classic);
        times.push(t.elapsed());
        size = text.len();
    }
    times.sort();
    let series = engine.metrics().tokens.len();
    println!(
        "render: {series} token series, {size} bytes: median {:.3} ms, max {:.3} ms (target ≤ 5 ms; ratio {:.2})",
        ms(times[25]),
        ms(times[49]),
        ms(times[25]) / 5.0
    );

    // 3. HTTP ingestion, ledger on.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => panic!("runtime: {e}"),
    };
    runtime.block_on(http_ingestion(now));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn http_ingestion(now: i64) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let running = match server::start(
        ServeOptions {
            config: Source::Embedded,
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().ok(),
            metrics_listen: "127.0.0.1:0".parse().ok(),
            mcp_servers: None,
        },
        Arc::new(ManualClock::new(now)),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => panic!("server: {e}"),
    };
    let url = format!("http://{}/v1/events", running.api_addr);
    let batch: Vec<serde_json::Value> = (0..100)
        .map(|i| {
            serde_json::json!({"type":"usage","persona":PERSONAS[i % 6],"chatmode":"bench","model":"m",
                "prompt_tokens":100,"completion_tokens":20,"session":format!("s{i}")})
        })
        .collect();
    let body = bytes_of(&serde_json::json!({ "events": batch }));
    let http = reqwest::Client::new();
    let clients = 16;
    let batches_per_client = 250;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..batches_per_client {
                match http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => panic!("status {}", r.status()),
                    Err(e) => panic!("request: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = clients * batches_per_client * 100;
    let rate = n as f64 / secs;
    println!(
        "http: {n} events in {} requests of 100 from {clients} clients in {secs:.3} s = {rate:.0} events/s \
         (target ≥ 100,000; ratio {:.2}; client and server share the 2 cores)",
        clients * batches_per_client,
        rate / 100_000.0
    );
    running.shutdown().await;
}

fn bytes_of(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}
