//! Every metric family hypertool exports, declared once: name, type, help and label names. The
//! exposition writes them from here, the alert rules name them from here, and the tests read
//! them from here, so a name cannot drift between the three. The names of the runbook's contract
//! (`hypertool_persona_*`, `hypertool_workflow_*`, `langfuse_*`) are fixed by the runbook.

/// A metric family's type, as the exposition's `# TYPE` line says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Label names, in the order the exposition writes them (`le` of histograms not included).
    pub labels: &'static [&'static str],
}

pub const PERSONA_SWITCHES_TOTAL: Family = Family {
    name: "hypertool_persona_switches_total",
    kind: Kind::Counter,
    help:
        "Persona switches within a session, explicit or inferred from usage under another persona.",
    labels: &["from_persona", "to_persona", "chatmode"],
};

pub const PERSONA_DURATION_SECONDS: Family = Family {
    name: "hypertool_persona_duration_seconds",
    kind: Kind::Histogram,
    help: "Time a session spent in a persona before switching away or going idle.",
    labels: &["persona", "chatmode"],
};

pub const PERSONA_TOKENS_USED_TOTAL: Family = Family {
    name: "hypertool_persona_tokens_used_total",
    kind: Kind::Counter,
    help: "Tokens (prompt + completion) used by a persona.",
    labels: &["persona", "chatmode", "model"],
};

pub const BUDGET_SOFT_LIMIT_REACHED_TOTAL: Family = Family {
    name: "hypertool_budget_soft_limit_reached_total",
    kind: Kind::Counter,
    help: "Times a persona's usage reached the soft limit of its budget (at most once per period).",
    labels: &["persona"],
};

pub const PERSONA_COST_USD_TOTAL: Family = Family {
    name: "hypertool_persona_cost_usd_total",
    kind: Kind::Counter,
    help: "Cost in US dollars attributed to a persona.",
    labels: &["persona", "chatmode", "model"],
};

pub const WORKFLOW_STAGE_DURATION_SECONDS: Family = Family {
    name: "hypertool_workflow_stage_duration_seconds",
    kind: Kind::Histogram,
    help: "Duration of a workflow stage, retries included.",
    labels: &["workflow", "stage", "persona"],
};

pub const WORKFLOW_QUALITY_GATE_TOTAL: Family = Family {
    name: "hypertool_workflow_quality_gate_total",
    kind: Kind::Counter,
    help: "Quality gate verdicts per workflow stage; result is pass or fail.",
    labels: &["workflow", "stage", "model", "result"],
};

pub const VARIANT_RUNS_TOTAL: Family = Family {
    name: "hypertool_variant_runs_total",
    kind: Kind::Counter,
    help: "Runs whose stage started on this variant (a stage with variants: an experiment).",
    labels: &["workflow", "stage", "variant"],
};

pub const VARIANT_QUALITY_GATE_TOTAL: Family = Family {
    name: "hypertool_variant_quality_gate_total",
    kind: Kind::Counter,
    help: "Quality-gate verdicts on the outputs of a stage variant, by result.",
    labels: &["workflow", "stage", "variant", "result"],
};

pub const VARIANT_CALLS_TOTAL: Family = Family {
    name: "hypertool_variant_calls_total",
    kind: Kind::Counter,
    help: "Gateway calls made on a stage variant (gate retries included).",
    labels: &["workflow", "stage", "variant"],
};

pub const VARIANT_COST_USD_TOTAL: Family = Family {
    name: "hypertool_variant_cost_usd_total",
    kind: Kind::Counter,
    help: "The cost of the calls made on a stage variant, in USD (priced models only).",
    labels: &["workflow", "stage", "variant"],
};

pub const VARIANT_GATE_RETRIES_TOTAL: Family = Family {
    name: "hypertool_variant_gate_retries_total",
    kind: Kind::Counter,
    help: "Gate retries on a stage variant's outputs (verdicts of attempts after the first).",
    labels: &["workflow", "stage", "variant"],
};

pub const VARIANT_ESCALATIONS_TOTAL: Family = Family {
    name: "hypertool_variant_escalations_total",
    kind: Kind::Counter,
    help: "Gate retries of a stage variant sent to the stage's escalation model.",
    labels: &["workflow", "stage", "variant"],
};

pub const VARIANT_STAGE_DURATION_SECONDS: Family = Family {
    name: "hypertool_variant_stage_duration_seconds",
    kind: Kind::Histogram,
    help: "Duration of a workflow stage run on a variant, retries included.",
    labels: &["workflow", "stage", "variant"],
};

pub const EXPERIMENT_DECISIONS_TOTAL: Family = Family {
    name: "hypertool_experiment_decisions_total",
    kind: Kind::Counter,
    help: "Experiments decided: the variant became the best of its stage with the stage's decide_at probability (once per variant).",
    labels: &["workflow", "stage", "variant"],
};

pub const WORKFLOW_RUNS_STARTED_TOTAL: Family = Family {
    name: "hypertool_workflow_runs_started_total",
    kind: Kind::Counter,
    help: "Workflow runs started (POST /v1/workflows/{workflow}/runs).",
    labels: &["workflow"],
};

pub const WORKFLOW_RUNS_FINISHED_TOTAL: Family = Family {
    name: "hypertool_workflow_runs_finished_total",
    kind: Kind::Counter,
    help: "Workflow runs finished, by status (completed, failed, cancelled).",
    labels: &["workflow", "status"],
};

pub const PERSONA_SWITCHES_SUPPRESSED_TOTAL: Family = Family {
    name: "hypertool_persona_switches_suppressed_total",
    kind: Kind::Counter,
    help: "Persona switches refused by the switch policy; reason is cooldown or oscillation.",
    labels: &["chatmode", "reason"],
};

pub const PERSONA_OSCILLATIONS_TOTAL: Family = Family {
    name: "hypertool_persona_oscillations_total",
    kind: Kind::Counter,
    help: "Sessions seen switching A->B->A->B within the oscillation window.",
    labels: &["chatmode"],
};

pub const MCP_TOOL_CALLS_TOTAL: Family = Family {
    name: "hypertool_mcp_tool_calls_total",
    kind: Kind::Counter,
    help: "Tool calls through the MCP proxy, by persona, downstream server and tool; result is ok, error or refused.",
    labels: &["persona", "server", "tool", "result"],
};

pub const MCP_TOOL_CALL_DURATION_SECONDS: Family = Family {
    name: "hypertool_mcp_tool_call_duration_seconds",
    kind: Kind::Histogram,
    help: "Duration of a tool call through the MCP proxy, from the client's request to the downstream server's answer.",
    labels: &["persona", "server", "tool"],
};

pub const MCP_SESSIONS_OPEN: Family = Family {
    name: "hypertool_mcp_sessions_open",
    kind: Kind::Gauge,
    help: "MCP sessions open at the proxy (stdio: one; /mcp: until DELETE or 5 minutes idle; at most 1000).",
    labels: &[],
};

pub const MCP_SERVER_UP: Family = Family {
    name: "hypertool_mcp_server_up",
    kind: Kind::Gauge,
    help: "1 when a downstream MCP server of the proxy is connected and has listed its tools, 0 while it is starting or restarting.",
    labels: &["server"],
};

pub const MCP_SERVER_RESTARTS_TOTAL: Family = Family {
    name: "hypertool_mcp_server_restarts_total",
    kind: Kind::Counter,
    help:
        "Times a downstream MCP server went down or failed to start (it is restarted with backoff).",
    labels: &["server"],
};

pub const PROMPT_TOKENS: Family = Family {
    name: "hypertool_prompt_tokens",
    kind: Kind::Histogram,
    help: "Prompt tokens per LLM call, by persona and model (prompt length monitoring).",
    labels: &["persona", "model"],
};

pub const LANGFUSE_GENERATION_DURATION_SECONDS: Family = Family {
    name: "langfuse_generation_duration_seconds",
    kind: Kind::Histogram,
    help: "Duration of one LLM call (generation), by model.",
    labels: &["model"],
};

pub const EVENTS_APPLIED_TOTAL: Family = Family {
    name: "hypertool_events_applied_total",
    kind: Kind::Counter,
    help: "Events stored in the ledger and applied to the core, by type.",
    labels: &["type"],
};

pub const LABEL_VALUES_FOLDED_TOTAL: Family = Family {
    name: "hypertool_label_values_folded_total",
    kind: Kind::Counter,
    help: "Label values folded into \"other\" because the label reached its cap.",
    labels: &["label"],
};

pub const PERSONA_TOKEN_BUDGET_REMAINING: Family = Family {
    name: "hypertool_persona_token_budget_remaining",
    kind: Kind::Gauge,
    help: "Tokens left in the persona's budget for the current period; negative when over budget.",
    labels: &["persona"],
};

pub const PERSONA_TOKEN_BUDGET_LIMIT: Family = Family {
    name: "hypertool_persona_token_budget_limit",
    kind: Kind::Gauge,
    help: "Tokens allowed per period by the persona's budget.",
    labels: &["persona"],
};

pub const PERSONA_TOKEN_BUDGET_USED: Family = Family {
    name: "hypertool_persona_token_budget_used",
    kind: Kind::Gauge,
    help: "Tokens used by the persona in the current budget period.",
    labels: &["persona"],
};

pub const PERSONA_TOKEN_BUDGET_SOFT_LIMIT: Family = Family {
    name: "hypertool_persona_token_budget_soft_limit",
    kind: Kind::Gauge,
    help: "Tokens at which the persona's budget reaches its soft limit (budgets with a soft_limit only).",
    labels: &["persona"],
};

pub const PERSONA_COST_BUDGET_REMAINING_USD: Family = Family {
    name: "hypertool_persona_cost_budget_remaining_usd",
    kind: Kind::Gauge,
    help:
        "USD left in the persona's cost budget for the current period; negative when over budget.",
    labels: &["persona"],
};

pub const WORKFLOW_STAGE_RUNNING_SECONDS: Family = Family {
    name: "hypertool_workflow_stage_running_seconds",
    kind: Kind::Gauge,
    help: "Age of the oldest stage still running, per workflow and stage (a hung stage shows here before it ever ends).",
    labels: &["workflow", "stage"],
};

pub const PERSONA_INFO: Family = Family {
    name: "hypertool_persona_info",
    kind: Kind::Gauge,
    help: "Static facts about each configured persona (always 1).",
    labels: &["persona", "display_name", "aliases"],
};

pub const LANGFUSE_ENABLED: Family = Family {
    name: "hypertool_langfuse_enabled",
    kind: Kind::Gauge,
    help: "1 when traces are expected to reach Langfuse ([langfuse] enabled = true, or \"auto\" with a key set); LangfuseIntegrationFailing is evaluated only then.",
    labels: &[],
};

pub const LANGFUSE_TRACE_CREATED_TOTAL: Family = Family {
    name: "langfuse_trace_created_total",
    kind: Kind::Counter,
    help: "Traces Langfuse accepted from hypertool's exporter (2xx answers; not traces attempted).",
    labels: &[],
};

pub const LEDGER_WRITABLE: Family = Family {
    name: "hypertool_ledger_writable",
    kind: Kind::Gauge,
    help: "1 while the ledger's writes succeed; 0 while it cannot write (disk full, read-only, locked): gateway calls and events are then refused with 503 and /readyz is 503 (with on_outage = \"buffer\": until the outage buffer is full).",
    labels: &[],
};

pub const LEDGER_REPLICAS_LIVE: Family = Family {
    name: "hypertool_ledger_replicas_live",
    kind: Kind::Gauge,
    help: "Replicas on the shared ledger whose heartbeat lease holds, this one included (absent on a ledger of its own).",
    labels: &[],
};

pub const LEDGER_DUPLICATE_SETTLEMENTS_TOTAL: Family = Family {
    name: "hypertool_ledger_duplicate_settlements_total",
    kind: Kind::Counter,
    help: "Usage of a gateway call already settled (its replica, back, and a survivor past its lease both settled it): stored, not counted again.",
    labels: &[],
};

pub const LEDGER_WRITE_FAILURES_TOTAL: Family = Family {
    name: "hypertool_ledger_write_failures_total",
    kind: Kind::Counter,
    help: "Ledger commits and recovery probes that failed.",
    labels: &[],
};

pub const CACHE_SHARED_TOTAL: Family = Family {
    name: "hypertool_cache_shared_total",
    kind: Kind::Counter,
    help: "The shared (Redis) response cache: hit, miss, error (timed out or unreachable: the call went on without it), stored, write_dropped (too many writes in flight).",
    labels: &["result"],
};

pub const LEDGER_OUTAGE_HELD_EVENTS: Family = Family {
    name: "hypertool_ledger_outage_held_events",
    kind: Kind::Gauge,
    help: "Events applied to budgets and counters but held in memory because the ledger cannot write; stored when it can (bounded by ledger.outage_buffer_events).",
    labels: &[],
};

pub const LEDGER_SNAPSHOT_AGE_SECONDS: Family = Family {
    name: "hypertool_ledger_snapshot_age_seconds",
    kind: Kind::Gauge,
    help: "Seconds since the core's state was last snapshotted (start-up replays only the events after it); -1 before the first.",
    labels: &[],
};

pub const TRACE_EXPORT_TOTAL: Family = Family {
    name: "hypertool_trace_export_total",
    kind: Kind::Counter,
    help: "Trace batches posted per destination (otlp, langfuse) and result: ok (accepted), retry \
         (unreachable, 5xx, 429: kept in the spool), auth_refused (401/403), rejected (other 4xx, \
         dropped), dropped (the spool was full).",
    labels: &["destination", "result"],
};

pub const TRACE_SPOOL_BYTES: Family = Family {
    name: "hypertool_trace_spool_bytes",
    kind: Kind::Gauge,
    help: "Bytes of trace batches spooled on disk, waiting for their destination to accept them.",
    labels: &["destination"],
};

pub const TRACE_EXPORT_LAST_SUCCESS: Family = Family {
    name: "hypertool_trace_export_last_success_timestamp_seconds",
    kind: Kind::Gauge,
    help: "When the destination last accepted a batch (absent before the first).",
    labels: &["destination"],
};

pub const TRACE_ITEM_ERRORS_TOTAL: Family = Family {
    name: "hypertool_trace_item_errors_total",
    kind: Kind::Counter,
    help:
        "Items a destination refused inside an accepted batch (Langfuse's 207 answers), by kind: \
         transient (5xx, 429: the items are sent again) or permanent (dropped).",
    labels: &["destination", "kind"],
};

pub const TRACE_QUEUE_DROPPED_TOTAL: Family = Family {
    name: "hypertool_trace_queue_dropped_total",
    kind: Kind::Counter,
    help: "Spans and scores dropped because a destination's in-memory queue was full (the exporter could not keep up).",
    labels: &["destination"],
};

pub const EVENTS_REJECTED_TOTAL: Family = Family {
    name: "hypertool_events_rejected_total",
    kind: Kind::Counter,
    help: "Events refused by the events API, by reason.",
    labels: &["reason"],
};

pub const AUTH_FAILURES_TOTAL: Family = Family {
    name: "hypertool_auth_failures_total",
    kind: Kind::Counter,
    help: "API requests refused at the door: missing_key, unknown_key (401), role, other_persona (403).",
    labels: &["reason"],
};

pub const INTERNAL_ERRORS_TOTAL: Family = Family {
    name: "hypertool_internal_errors_total",
    kind: Kind::Counter,
    help: "API requests and gateway calls whose handling panicked (a bug; the log has the panic): \
           answered 500 internal_error, their accounting settled at the admission's estimate.",
    labels: &[],
};

pub const RATE_LIMITED_TOTAL: Family = Family {
    name: "hypertool_rate_limited_total",
    kind: Kind::Counter,
    help:
        "Gateway calls refused by requests_per_minute or tokens_per_minute (of a key or a persona).",
    labels: &["persona", "kind"],
};

pub const INFLIGHT_BODY_BYTES: Family = Family {
    name: "hypertool_inflight_body_bytes",
    kind: Kind::Gauge,
    help: "Bytes of request bodies over 64 KiB held now (at most server.max_inflight_body_bytes; \
           past it new large bodies are answered 503 server_busy).",
    labels: &[],
};

pub const SESSIONS_OPEN: Family = Family {
    name: "hypertool_sessions_open",
    kind: Kind::Gauge,
    help: "Agent sessions with an open persona period.",
    labels: &[],
};

pub const GATEWAY_REQUESTS_TOTAL: Family = Family {
    name: "hypertool_gateway_requests_total",
    kind: Kind::Counter,
    help:
        "Calls through the gateway, by upstream and outcome (ok, cache_hit, budget_exceeded, \
         rate_limited, overloaded, upstream_error, model_not_found, retry, fallback, downgraded, gate_retry).",
    labels: &["upstream", "outcome"],
};

pub const CACHE_REQUESTS_TOTAL: Family = Family {
    name: "hypertool_cache_requests_total",
    kind: Kind::Counter,
    help: "Gateway response cache lookups: hit, miss, bypass (Cache-Control: no-cache), skip (not cacheable).",
    labels: &["result"],
};

pub const CACHE_TOKENS_SAVED_TOTAL: Family = Family {
    name: "hypertool_cache_tokens_saved_total",
    kind: Kind::Counter,
    help: "Tokens (prompt + completion) that cache hits did not spend.",
    labels: &[],
};

pub const GATEWAY_TOOLS_REMOVED_TOTAL: Family = Family {
    name: "hypertool_gateway_tools_removed_total",
    kind: Kind::Counter,
    help: "Tools removed from (or refused in) gateway calls because the persona's allowedTools does not list them.",
    labels: &["persona"],
};

pub const GATEWAY_UNPRICED_CALLS_TOTAL: Family = Family {
    name: "hypertool_gateway_unpriced_calls_total",
    kind: Kind::Counter,
    help: "Gateway calls that spent tokens on a model with no price (set prompt_usd_per_1k and completion_usd_per_1k): their cost is unknown, not zero.",
    labels: &["model"],
};

pub const PROMPT_TRUNCATIONS_TOTAL: Family = Family {
    name: "hypertool_prompt_truncations_total",
    kind: Kind::Counter,
    help: "Prompts cut to their workflow stage's max_prompt_tokens (oldest non-system messages first).",
    labels: &["workflow", "stage"],
};

pub const PROMPT_TOKENS_TRUNCATED_TOTAL: Family = Family {
    name: "hypertool_prompt_tokens_truncated_total",
    kind: Kind::Counter,
    help: "Prompt tokens removed by truncation to a stage's max_prompt_tokens.",
    labels: &["workflow", "stage"],
};

pub const ALERTS_FIRING: Family = Family {
    name: "hypertool_alerts_firing",
    kind: Kind::Gauge,
    help: "Alert instances firing in hypertool's embedded alert engine.",
    labels: &["alertname", "severity"],
};

pub const ALERT_TRANSITIONS_TOTAL: Family = Family {
    name: "hypertool_alert_transitions_total",
    kind: Kind::Counter,
    help: "State changes of the embedded alert engine's alerts, by the state entered.",
    labels: &["alertname", "state"],
};

pub const ALERT_DELIVERIES_TOTAL: Family = Family {
    name: "hypertool_alert_deliveries_total",
    kind: Kind::Counter,
    help: "Alert notifications sent to Alertmanager or the webhook, by target and result \
         (delivered, failed after retries, rejected, dropped on a full queue).",
    labels: &["target", "result"],
};

pub const CONFIG_RELOADS_TOTAL: Family = Family {
    name: "hypertool_config_reloads_total",
    kind: Kind::Counter,
    help: "Configuration reloads, by result (a failed reload keeps the last good configuration).",
    labels: &["result"],
};

pub const CONFIG_LAST_RELOAD_SUCCESSFUL: Family = Family {
    name: "hypertool_config_last_reload_successful",
    kind: Kind::Gauge,
    help:
        "1 when the configuration on disk is the one in force, 0 when the last reload was refused.",
    labels: &[],
};

pub const BUILD_INFO: Family = Family {
    name: "hypertool_build_info",
    kind: Kind::Gauge,
    help: "The running hypertool version (always 1).",
    labels: &["version"],
};

pub const START_TIME_SECONDS: Family = Family {
    name: "hypertool_start_time_seconds",
    kind: Kind::Gauge,
    help: "When this hypertool process started, in Unix seconds.",
    labels: &[],
};

/// Every family, in exposition order.
pub const ALL: &[Family] = &[
    PERSONA_SWITCHES_TOTAL,
    PERSONA_DURATION_SECONDS,
    PERSONA_TOKENS_USED_TOTAL,
    BUDGET_SOFT_LIMIT_REACHED_TOTAL,
    PERSONA_COST_USD_TOTAL,
    WORKFLOW_STAGE_DURATION_SECONDS,
    WORKFLOW_QUALITY_GATE_TOTAL,
    WORKFLOW_RUNS_STARTED_TOTAL,
    WORKFLOW_RUNS_FINISHED_TOTAL,
    VARIANT_RUNS_TOTAL,
    VARIANT_QUALITY_GATE_TOTAL,
    VARIANT_CALLS_TOTAL,
    VARIANT_COST_USD_TOTAL,
    VARIANT_GATE_RETRIES_TOTAL,
    VARIANT_ESCALATIONS_TOTAL,
    VARIANT_STAGE_DURATION_SECONDS,
    EXPERIMENT_DECISIONS_TOTAL,
    PERSONA_SWITCHES_SUPPRESSED_TOTAL,
    PERSONA_OSCILLATIONS_TOTAL,
    MCP_TOOL_CALLS_TOTAL,
    MCP_TOOL_CALL_DURATION_SECONDS,
    MCP_SESSIONS_OPEN,
    MCP_SERVER_UP,
    MCP_SERVER_RESTARTS_TOTAL,
    LANGFUSE_GENERATION_DURATION_SECONDS,
    PROMPT_TOKENS,
    EVENTS_APPLIED_TOTAL,
    LABEL_VALUES_FOLDED_TOTAL,
    PERSONA_TOKEN_BUDGET_REMAINING,
    PERSONA_TOKEN_BUDGET_LIMIT,
    PERSONA_TOKEN_BUDGET_USED,
    PERSONA_TOKEN_BUDGET_SOFT_LIMIT,
    PERSONA_COST_BUDGET_REMAINING_USD,
    WORKFLOW_STAGE_RUNNING_SECONDS,
    PERSONA_INFO,
    LANGFUSE_ENABLED,
    LANGFUSE_TRACE_CREATED_TOTAL,
    LEDGER_WRITABLE,
    LEDGER_WRITE_FAILURES_TOTAL,
    LEDGER_REPLICAS_LIVE,
    LEDGER_DUPLICATE_SETTLEMENTS_TOTAL,
    LEDGER_OUTAGE_HELD_EVENTS,
    LEDGER_SNAPSHOT_AGE_SECONDS,
    CACHE_SHARED_TOTAL,
    TRACE_EXPORT_TOTAL,
    TRACE_SPOOL_BYTES,
    TRACE_EXPORT_LAST_SUCCESS,
    TRACE_QUEUE_DROPPED_TOTAL,
    TRACE_ITEM_ERRORS_TOTAL,
    EVENTS_REJECTED_TOTAL,
    AUTH_FAILURES_TOTAL,
    INTERNAL_ERRORS_TOTAL,
    INFLIGHT_BODY_BYTES,
    RATE_LIMITED_TOTAL,
    SESSIONS_OPEN,
    GATEWAY_REQUESTS_TOTAL,
    CACHE_REQUESTS_TOTAL,
    CACHE_TOKENS_SAVED_TOTAL,
    GATEWAY_TOOLS_REMOVED_TOTAL,
    GATEWAY_UNPRICED_CALLS_TOTAL,
    PROMPT_TRUNCATIONS_TOTAL,
    PROMPT_TOKENS_TRUNCATED_TOTAL,
    ALERTS_FIRING,
    ALERT_TRANSITIONS_TOTAL,
    ALERT_DELIVERIES_TOTAL,
    CONFIG_RELOADS_TOTAL,
    CONFIG_LAST_RELOAD_SUCCESSFUL,
    BUILD_INFO,
    START_TIME_SECONDS,
];
