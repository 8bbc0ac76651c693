//! What a running server does besides answering requests: the ticker (idle sessions, budget
//! periods, the settlement of a dead replica's calls), the shared ledger's tail, the embedded
//! alert engine's evaluation (and the experiments' decisions), and the configuration reloader with
//! its audit entry.

use std::sync::Mutex;
use std::time::Duration;

use super::metrics::render_metrics;
use super::{audit, experiments, lock_alerts, AppState};
use crate::alerts::delivery::Deliverer;
use crate::alerts::AlertState;
use crate::config::{self, Config, ConfigErrors};
use crate::store::writer::lock;
use crate::telemetry::exposition::Format;

/// What the audit log keeps of a configuration at a reload: its fingerprint, its keys by name
/// (the variables they are read from, never the keys), and the size of what it configures.
fn config_summary(cfg: &Config) -> serde_json::Value {
    let names = |keys: &[crate::config::settings::RoleKey]| -> Vec<String> {
        keys.iter().map(|k| k.key_env.clone()).collect()
    };
    serde_json::json!({
        "fingerprint": format!("{:016x}", cfg.fingerprint),
        "keys": {
            "admin": names(&cfg.settings.auth.admin),
            "viewer": names(&cfg.settings.auth.viewer),
            "gateway": cfg.settings.gateway.keys.iter()
                .map(|k| serde_json::json!({"key_env": k.key_env, "persona": k.persona}))
                .collect::<Vec<_>>(),
        },
        "personas": cfg.personas.len(),
        "budgets": cfg.budgets.len(),
        "workflows": cfg.workflows.workflows.keys().collect::<Vec<_>>(),
    })
}

/// The ticker (idle sessions, budget periods) and the configuration reloader.
pub(super) fn spawn_background(
    state: &AppState,
    cfg: Config,
    addr_overridden: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let ticker_state = state.clone();
    tasks.push(tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u64;
        loop {
            interval.tick().await;
            let now = ticker_state.clock.now_ms();
            lock(&ticker_state.engine).tick(now);
            // Calls a dead replica left in flight: settled by one survivor once its lease lapsed.
            if let Some(me) = ticker_state.writer.origin.clone() {
                settle_orphans(&ticker_state, &me).await;
            }
            // A ledger that cannot write is tried again every 2 s, so that service resumes by
            // itself even when nothing else writes (a load balancer sends nothing to an unready
            // instance).
            ticks += 1;
            if ticks.is_multiple_of(2) && ticker_state.writer.health.failing() {
                ticker_state.writer.probe();
            }
        }
    }));

    if state.writer.shared {
        // Several replicas on one ledger: apply what the others stored, so that budgets and
        // counters here follow the fleet within a fraction of a second.
        let writer = state.writer.clone();
        tasks.push(tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(200));
            loop {
                interval.tick().await;
                writer.tail();
            }
        }));
    }

    let alert_state = state.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            evaluate_alerts(&alert_state).await;
            experiments::record_decisions(&alert_state).await;
            // Re-read each time: a reload may change the interval.
            let every = lock_alerts(&alert_state.alerts)
                .settings()
                .evaluation_interval
                .ms()
                .max(1000);
            tokio::time::sleep(Duration::from_millis(every as u64)).await;
        }
    }));

    let reload_state = state.clone();
    let reject_stats = state.stats.clone();
    let trace_settings = Mutex::new((cfg.settings.tracing.clone(), cfg.settings.langfuse.clone()));
    let initial = cfg.settings.clone();
    let last_summary = Mutex::new(config_summary(&cfg));
    let source = cfg.source.clone();
    let interval = Duration::from_millis(cfg.settings.reload_interval_ms);
    tasks.push(tokio::spawn(config::reload::watch(
        source,
        interval,
        cfg.fingerprint,
        move |new: Config| {
            if !addr_overridden
                && (new.settings.listen != initial.listen || new.settings.metrics_listen != initial.metrics_listen)
            {
                tracing::warn!("listen addresses changed in the configuration; they take effect at the next restart");
            }
            let now = reload_state.clock.now_ms();
            // The audit log's entry of the reload: what the files changed, keys by name.
            let after = config_summary(&new);
            let before = {
                let mut last = last_summary.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::replace(&mut *last, after.clone())
            };
            let keys_changed = before["keys"] != after["keys"];
            let mut audited = after.clone();
            audited["keys_changed"] = serde_json::Value::Bool(keys_changed);
            let audit_entry = audit::entry(
                &reload_state,
                "config files".to_string(),
                "config.reload",
                &new.source.describe(),
                Some(before),
                Some(audited),
            );
            if keys_changed {
                tracing::warn!("the reload changed the configured keys (see GET /api/audit)");
            }
            lock(&reload_state.engine).reconfigure(new.engine_config(), now);
            reload_state
                .gateway
                .reconfigure(new.settings.gateway.clone(), new.workflows.clone());
            let mut gate_changes = reload_state.gates.reload(&new.workflows, now);
            gate_changes.extend(reload_state.variants.reload(&new.workflows, now));
            gate_changes.push(audit_entry);
            if !gate_changes.is_empty() {
                let writer = reload_state.writer.clone();
                tokio::spawn(async move {
                    if let Err(e) = writer.append(gate_changes).await {
                        tracing::warn!("the gate changes of this reload could not be recorded: {e}");
                    }
                });
            }
            reload_state
                .door
                .reconfigure(&new.settings.auth, &new.settings.gateway.keys);
            reload_state
                .gateway
                .limits
                .configure(&new.settings.gateway.keys, &new.rate_limits);
            reload_state
                .metrics_gate
                .reconfigure(new.settings.auth.metrics_token.as_ref().map(|k| k.hash));
            let old_delivery = lock_alerts(&reload_state.alerts).settings().delivery.clone();
            // The exporter runs with the destinations it started with; alert 7 keeps judging them.
            let running_langfuse = lock_alerts(&reload_state.alerts).langfuse().clone();
            {
                let mut traced = trace_settings.lock().unwrap_or_else(|p| p.into_inner());
                if traced.0 != new.settings.tracing || traced.1 != new.settings.langfuse {
                    tracing::warn!("[tracing] or [langfuse] changed: trace destinations change at the next restart");
                    *traced = (new.settings.tracing.clone(), new.settings.langfuse.clone());
                }
            }
            let mut alert_settings = new.settings.alerts.clone();
            alert_settings.served_at(reload_state.api_addr);
            lock_alerts(&reload_state.alerts).reconfigure(alert_settings, running_langfuse);
            if new.settings.alerts.delivery != old_delivery {
                let fresh = Deliverer::start(
                    &new.settings.alerts.delivery,
                    reload_state.generator_url.clone(),
                    reload_state.delivery_stats.clone(),
                );
                *reload_state.deliverer.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
            }
            reload_state.stats.reloaded(true);
            tracing::info!(personas = new.personas.len(), budgets = new.budgets.len(), "configuration reloaded");
        },
        move |errors: ConfigErrors| {
            reject_stats.reloaded(false);
            tracing::error!("configuration reload refused; keeping the last good configuration:\n{errors}");
        },
    )));
    tasks
}

/// Settles the calls replicas whose lease lapsed left in flight, when this replica is the one to
/// (see `Engine::orphan_settlements`): each at its estimate plus what it had streamed.
async fn settle_orphans(state: &AppState, me: &str) {
    let orphans = lock(&state.engine).orphan_settlements(me);
    if orphans.is_empty() {
        return;
    }
    let n = orphans.len();
    let replicas: std::collections::BTreeSet<String> = orphans
        .iter()
        .filter_map(|(_, c)| c.replica.clone())
        .collect();
    let events: Vec<crate::core::event::Stamped> = orphans
        .into_iter()
        .map(|(at, c)| crate::core::event::Stamped {
            at,
            event: crate::core::event::Event::Usage(c.as_settlement()),
        })
        .collect();
    match state.writer.append(events).await {
        Ok(()) => {
            tracing::warn!(calls = n, replicas = %replicas.into_iter().collect::<Vec<_>>().join(","),
            "calls of replicas whose heartbeat lapsed were settled here at their admission estimate")
        }
        Err(e) => tracing::warn!(
            "the calls of a dead replica could not be settled yet (tried again in a second): {e}"
        ),
    }
}

/// One evaluation of the embedded alert engine at the clock's now: scrape our own metrics
/// listener (for `up`), sample the core, evaluate, log and count the state changes.
pub async fn evaluate_alerts(state: &AppState) {
    let url = format!("http://{}/metrics", state.metrics_addr);
    let up = match state
        .http
        .get(&url)
        .bearer_auth(&state.scrape_token)
        .send()
        .await
    {
        Ok(r) => r.status().is_success() && r.text().await.is_ok(),
        Err(_) => false,
    };
    let now = state.clock.now_ms();
    let text = render_metrics(state, Format::Classic);
    let (transitions, firing) = {
        let mut alerts = lock_alerts(&state.alerts);
        alerts.ingest_exposition(now, &text);
        alerts.ingest_up(now, &state.metrics_addr.to_string(), up);
        let transitions = alerts.evaluate(now);
        let firing: Vec<_> = alerts.firing().into_iter().cloned().collect();
        (transitions, firing)
    };
    {
        let changed: Vec<_> = transitions.iter().map(|t| t.instance.clone()).collect();
        let mut deliverer = state.deliverer.lock().unwrap_or_else(|p| p.into_inner());
        if !deliverer.is_empty() {
            deliverer.offer(now, &changed, &firing);
        }
    }
    for t in &transitions {
        let a = &t.instance;
        let labels: Vec<String> = a.series_labels().map(|(k, v)| format!("{k}={v}")).collect();
        let summary = a.annotations.get("summary").cloned().unwrap_or_default();
        match a.state {
            AlertState::Firing => {
                tracing::warn!(alert = a.alertname, labels = %labels.join(","), value = a.value,
                runbook = a.annotations.get("runbook").map(String::as_str).unwrap_or(""), "alert firing: {summary}")
            }
            AlertState::Pending => {
                tracing::info!(alert = a.alertname, labels = %labels.join(","), value = a.value,
                "alert pending: {summary}")
            }
            AlertState::Inactive => tracing::info!(alert = a.alertname, labels = %labels.join(","),
                was = ?t.from, "alert resolved: {summary}"),
        }
        state.stats.transition(a.alertname, a.state);
    }
}
