//! What a running server does besides answering requests: the ticker (idle sessions, budget
//! periods, the settlement of a dead replica's calls), the shared ledger's tail, the embedded
//! alert engine's evaluation (and the experiments' decisions), and the configuration reloader with
//! its audit entry.

use std::time::Duration;

use super::metrics::render_metrics;
use super::{audit, experiments, lock_alerts, AppState};
use crate::alerts::delivery::Deliverer;
use crate::alerts::AlertState;
use crate::config::settings::{LangfuseSettings, Settings};
use crate::config::tracing::TracingSettings;
use crate::config::{self, Config, ConfigErrors};
use crate::core::event::Stamped;
use crate::store::writer::{lock, WriterHandle};
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

/// The ticker, the shared ledger's tail, the alert evaluation and the configuration reloader.
pub(super) fn spawn_background(
    state: &AppState,
    cfg: Config,
    addr_overridden: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![tokio::spawn(ticker(state.clone()))];
    if state.writer.shared {
        tasks.push(tokio::spawn(tail_the_ledger(state.writer.clone())));
    }
    tasks.push(tokio::spawn(evaluation(state.clone())));
    let reject_stats = state.stats.clone();
    let (source, fingerprint) = (cfg.source.clone(), cfg.fingerprint);
    let interval = Duration::from_millis(cfg.settings.reload_interval_ms);
    let mut reloader = Reloader {
        state: state.clone(),
        addr_overridden,
        traced: (cfg.settings.tracing.clone(), cfg.settings.langfuse.clone()),
        last_summary: config_summary(&cfg),
        initial: cfg.settings,
    };
    tasks.push(tokio::spawn(config::reload::watch(
        source,
        interval,
        fingerprint,
        move |new: Config| reloader.apply(new),
        move |errors: ConfigErrors| {
            reject_stats.reloaded(false);
            tracing::error!(
                "configuration reload refused; keeping the last good configuration:\n{errors}"
            );
        },
    )));
    tasks
}

/// Every second: idle sessions and budget periods (the engine's tick), a dead replica's calls
/// settled, a failing ledger probed.
async fn ticker(state: AppState) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u64;
    loop {
        interval.tick().await;
        let now = state.clock.now_ms();
        lock(&state.engine).tick(now);
        // Calls a dead replica left in flight: settled by one survivor once its lease lapsed.
        if let Some(me) = state.writer.origin.clone() {
            settle_orphans(&state, &me).await;
        }
        // A ledger that cannot write is tried again every 2 s, so that service resumes by itself
        // even when nothing else writes (a load balancer sends nothing to an unready instance).
        ticks += 1;
        if ticks.is_multiple_of(2) && state.writer.health.failing() {
            state.writer.probe();
        }
    }
}

/// Several replicas on one ledger: what the others stored is applied here, so that budgets and
/// counters follow the fleet within a fraction of a second.
async fn tail_the_ledger(writer: WriterHandle) {
    let mut interval = tokio::time::interval(Duration::from_millis(200));
    loop {
        interval.tick().await;
        writer.tail();
    }
}

/// The alerts evaluated, and the experiments' decisions looked at, every evaluation interval.
async fn evaluation(state: AppState) {
    loop {
        evaluate_alerts(&state).await;
        experiments::record_decisions(&state).await;
        // Re-read each time: a reload may change the interval.
        let every = lock_alerts(&state.alerts)
            .settings()
            .evaluation_interval
            .ms()
            .max(1000);
        tokio::time::sleep(Duration::from_millis(every as u64)).await;
    }
}

/// Applies a reloaded configuration to the running server, with its audit entry.
struct Reloader {
    state: AppState,
    /// The settings the server started with (listen addresses change only at a restart).
    initial: Settings,
    addr_overridden: bool,
    /// The trace destinations in force (they change only at a restart).
    traced: (TracingSettings, LangfuseSettings),
    /// The audit summary of the configuration in force.
    last_summary: serde_json::Value,
}

impl Reloader {
    fn apply(&mut self, new: Config) {
        let listen_changed = new.settings.listen != self.initial.listen
            || new.settings.metrics_listen != self.initial.metrics_listen;
        if !self.addr_overridden && listen_changed {
            tracing::warn!(
                "listen addresses changed in the configuration; they take effect at the next restart"
            );
        }
        let now = self.state.clock.now_ms();
        let audit_entry = self.audit_entry(&new);
        let state = &self.state;
        lock(&state.engine).reconfigure(new.engine_config(), now);
        state
            .gateway
            .reconfigure(new.settings.gateway.clone(), new.workflows.clone());
        let mut changes = state.gates.reload(&new.workflows, now);
        changes.extend(state.variants.reload(&new.workflows, now));
        changes.push(audit_entry);
        let writer = state.writer.clone();
        tokio::spawn(async move {
            if let Err(e) = writer.append(changes).await {
                tracing::warn!("the gate changes of this reload could not be recorded: {e}");
            }
        });
        state
            .door
            .reconfigure(&new.settings.auth, &new.settings.gateway.keys);
        state
            .gateway
            .limits
            .configure(&new.settings.gateway.keys, &new.rate_limits);
        state
            .metrics_gate
            .reconfigure(new.settings.auth.metrics_token.as_ref().map(|k| k.hash));
        if self.traced.0 != new.settings.tracing || self.traced.1 != new.settings.langfuse {
            tracing::warn!(
                "[tracing] or [langfuse] changed: trace destinations change at the next restart"
            );
            self.traced = (new.settings.tracing.clone(), new.settings.langfuse.clone());
        }
        self.reconfigure_alerts(&new);
        self.state.stats.reloaded(true);
        tracing::info!(
            personas = new.personas.len(),
            budgets = new.budgets.len(),
            "configuration reloaded"
        );
    }

    /// The audit log's entry of the reload: what the files changed, keys by name.
    fn audit_entry(&mut self, new: &Config) -> Stamped {
        let after = config_summary(new);
        let before = std::mem::replace(&mut self.last_summary, after.clone());
        let keys_changed = before["keys"] != after["keys"];
        let mut audited = after;
        audited["keys_changed"] = serde_json::Value::Bool(keys_changed);
        if keys_changed {
            tracing::warn!("the reload changed the configured keys (see GET /api/audit)");
        }
        audit::entry(
            &self.state,
            "config files".to_string(),
            "config.reload",
            &new.source.describe(),
            Some(before),
            Some(audited),
        )
    }

    /// The alert engine's new rules; a new deliverer when the delivery settings changed.
    fn reconfigure_alerts(&self, new: &Config) {
        let state = &self.state;
        let old_delivery = lock_alerts(&state.alerts).settings().delivery.clone();
        // The exporter runs with the destinations it started with; alert 7 keeps judging them.
        let running_langfuse = lock_alerts(&state.alerts).langfuse().clone();
        let mut alert_settings = new.settings.alerts.clone();
        alert_settings.served_at(state.api_addr);
        lock_alerts(&state.alerts).reconfigure(alert_settings, running_langfuse);
        if new.settings.alerts.delivery != old_delivery {
            let fresh = Deliverer::start(
                &new.settings.alerts.delivery,
                state.generator_url.clone(),
                state.delivery_stats.clone(),
            );
            *state.deliverer.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        }
    }
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
