//! The built-in dashboard: `GET /` (one self-contained HTML page: no external resources, it works
//! offline) and `GET /api/dashboard` (everything it shows, in one JSON document it polls).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{Html, IntoResponse};
use axum::Json;
use serde_json::{json, Value};

use super::{lock, lock_alerts, AppState};
use crate::alerts::promql::bucket_quantile;
use crate::core::clock::to_rfc3339;

/// The page (see `src/server/dashboard.html`).
const PAGE: &str = include_str!("dashboard.html");

pub async fn page() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_SECURITY_POLICY,
            content_security_policy(),
        )],
        Html(PAGE),
    )
}

/// The policy of every HTML page hypertool serves (the dashboard, the runbook): nothing from
/// elsewhere, and of inline code only the page's own `<script>` and `<style>` blocks, named by
/// their SHA-256 (so a name that ever slipped into the page as markup still could not run). The
/// dashboard's one request is its own `/api/dashboard`.
pub fn content_security_policy() -> &'static str {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        let scripts = inline_blocks(PAGE, "script");
        let mut styles = inline_blocks(PAGE, "style");
        styles.push(crate::runbook::STYLE);
        let hashes = |blocks: &[&str]| {
            blocks
                .iter()
                .map(|b| format!("'sha256-{}'", sha256_base64(b)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hashes(&scripts),
            hashes(&styles)
        )
    })
}

/// The contents of every `<tag>…</tag>` block of `html` (our own pages: no attributes on them).
fn inline_blocks<'a>(html: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut blocks = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else { break };
        blocks.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    blocks
}

fn sha256_base64(text: &str) -> String {
    use base64::Engine;
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

const HOUR_MS: i64 = 3_600_000;

/// One persona's budget on the dashboard: its bar, its burn-down (what remained at the end of each
/// hour of the period, 48 h at most) and the time it runs out at the pace of the last hour.
fn persona_budget(
    persona: &str,
    b: &crate::core::budget::BudgetState,
    now: i64,
    cost: f64,
    unpriced: f64,
) -> Value {
    let start = b.period_start().max(now - 48 * HOUR_MS);
    let mut burn = Vec::new();
    let mut hour = start - start.rem_euclid(HOUR_MS);
    let before = b.used_tokens() as i64 - b.usage_between(start, now + 1) as i64;
    let mut used = before.max(0);
    burn.push(json!({"at": to_rfc3339(start), "remaining": b.spec.tokens as i64 - used}));
    while hour < now {
        let next = (hour + HOUR_MS).min(now);
        used += b.usage_between(hour, hour + HOUR_MS) as i64;
        burn.push(json!({"at": to_rfc3339(next), "remaining": b.spec.tokens as i64 - used}));
        hour += HOUR_MS;
    }
    let last_hour = b.usage_between(now - HOUR_MS, now + 1) as f64;
    let remaining = b.remaining_tokens();
    let depletion = (last_hour > 0.0 && remaining > 0)
        .then(|| now + (remaining as f64 / last_hour * HOUR_MS as f64) as i64);
    json!({
        "persona": persona,
        "limit": b.spec.tokens,
        "used": b.used_tokens(),
        "remaining": remaining,
        "soft_limit": b.soft_limit_tokens(),
        "period": b.spec.period.as_str(),
        "mode": b.spec.mode.as_str(),
        "resets_at": b.resets_at().map(to_rfc3339),
        "depletion_at": depletion.map(to_rfc3339),
        "cost_usd": cost,
        "unpriced_tokens": unpriced,
        "burn": burn,
    })
}

/// `GET /api/dashboard`.
pub async fn data(State(state): State<AppState>) -> Json<Value> {
    let now = state.clock.now_ms();
    let alerts = lock_alerts(&state.alerts).view();
    let (cache_results, tokens_saved) = state.gateway.cache.stats();
    // Before the engine is held here: the reports take it themselves.
    let experiments = super::experiments::reports(&state);
    let mut engine = lock(&state.engine);
    engine.tick(now);
    let m = engine.metrics();
    // Cost per persona, summed once over the (persona, chatmode, model) series.
    let mut cost: BTreeMap<String, f64> = BTreeMap::new();
    for (k, v) in m.cost_usd.sorted() {
        *cost.entry(k[0].to_string()).or_default() += v;
    }
    // Tokens with no cost beside them (a model without prices, an agent that reported none):
    // their cost is unknown, and the page says so rather than showing $0.00. The mock is free.
    let mut unpriced: BTreeMap<String, f64> = BTreeMap::new();
    for (k, tokens) in m.tokens.sorted() {
        let [persona, chatmode, model]: [&str; 3] = [&k[0], &k[1], &k[2]];
        if tokens > 0.0
            && !model.starts_with("mock/")
            && m.cost_usd.get([persona, chatmode, model]) <= 0.0
        {
            *unpriced.entry(persona.to_string()).or_default() += tokens;
        }
    }

    // Budgets: bars, burn-down (remaining at the end of each hour of the period) and the ETA at
    // the pace of the last hour.
    let personas: Vec<Value> = engine
        .budgets()
        .iter()
        .map(|(persona, b)| {
            let cost = cost.get(persona.as_str()).copied().unwrap_or(0.0);
            let unpriced = unpriced.get(persona.as_str()).copied().unwrap_or(0.0);
            persona_budget(persona, b, now, cost, unpriced)
        })
        .collect();

    // Persona transitions (all chatmodes).
    let mut matrix: BTreeMap<(String, String), f64> = BTreeMap::new();
    for (k, v) in m.switches.sorted() {
        *matrix
            .entry((k[0].to_string(), k[1].to_string()))
            .or_default() += v;
    }

    // Stage durations: p95 from the histogram, and what is running now.
    // (workflow, stage) → cumulative buckets summed over personas, and the count.
    type Buckets = (Vec<(f64, f64)>, u64);
    let mut stage_buckets: BTreeMap<(String, String), Buckets> = BTreeMap::new();
    for (k, h) in m.stage_duration.sorted() {
        let entry = stage_buckets
            .entry((k[0].to_string(), k[1].to_string()))
            .or_insert_with(|| {
                let mut b: Vec<(f64, f64)> =
                    m.stage_duration.bounds.iter().map(|b| (*b, 0.0)).collect();
                b.push((f64::INFINITY, 0.0));
                (b, 0)
            });
        for (slot, c) in entry.0.iter_mut().zip(h.cumulative()) {
            slot.1 += c as f64;
        }
        entry.1 += h.count;
    }
    let stages: Vec<Value> = stage_buckets
        .into_iter()
        .map(|((w, s), (mut buckets, n))| {
            let p95 = bucket_quantile(0.95, &mut buckets);
            json!({"workflow": w, "stage": s, "p95_seconds": p95.is_finite().then_some(p95), "ended": n})
        })
        .collect();
    let running: Vec<Value> = engine
        .runs()
        .oldest_running()
        .into_iter()
        .map(|((w, s), since)| json!({"workflow": w, "stage": s, "age_seconds": (now - since) as f64 / 1000.0}))
        .collect();

    // Gate pass rates by stage and by model.
    let mut by_stage: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    let mut by_model: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (k, v) in m.quality_gates.sorted() {
        let pass = &*k[3] == "pass";
        let s = by_stage
            .entry((k[0].to_string(), k[1].to_string()))
            .or_default();
        let md = by_model.entry(k[2].to_string()).or_default();
        s.0 += v;
        md.0 += v;
        if pass {
            s.1 += v;
            md.1 += v;
        }
    }
    let rate = |(n, p): (f64, f64)| if n > 0.0 { Some(p / n) } else { None };
    let cache: BTreeMap<&str, f64> = cache_results.into_iter().collect();
    let lookups =
        cache.get("hit").copied().unwrap_or(0.0) + cache.get("miss").copied().unwrap_or(0.0);
    Json(json!({
        "at": to_rfc3339(now),
        "personas": personas,
        "alerts": alerts["alerts"],
        "transitions": matrix.into_iter().map(|((f, t), n)| json!({"from": f, "to": t, "switches": n})).collect::<Vec<_>>(),
        "stages": stages,
        "running": running,
        "gates_by_stage": by_stage.into_iter().map(|((w, s), c)| json!({"workflow": w, "stage": s, "verdicts": c.0, "pass_rate": rate(c)})).collect::<Vec<_>>(),
        "gates_by_model": by_model.into_iter().map(|(model, c)| json!({"model": model, "verdicts": c.0, "pass_rate": rate(c)})).collect::<Vec<_>>(),
        "cache": {
            "hits": cache.get("hit"),
            "misses": cache.get("miss"),
            "hit_rate": if lookups > 0.0 { Some(cache.get("hit").copied().unwrap_or(0.0) / lookups) } else { None },
            // Calls that were not looked up: not cacheable (a temperature above 0 — OpenAI's
            // default is 1 —, n > 1, caching off) or sent with `Cache-Control: no-cache`.
            "not_cacheable": cache.get("skip"),
            "bypassed": cache.get("bypass"),
            "tokens_saved": tokens_saved,
        },
        "experiments": experiments,
        "cost_usd": m.cost_usd.sum(),
        // `+ 0.0`: the sum of nothing is -0, which the page would show.
        "unpriced_tokens": unpriced.values().sum::<f64>() + 0.0,
        "tokens": m.tokens.sum(),
    }))
}
