//! The one way facts enter the core. Metrics, the ledger, budgets and (later) alerts and traces are
//! all consumers of these values; nothing else mutates core state.

use serde::{Deserialize, Serialize};

use super::clock::UnixMillis;

/// A fact, as stored in the ledger (JSON, tagged by `type`) and applied to the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Usage(Usage),
    PersonaSwitch(PersonaSwitch),
    Stage(StageResult),
    /// An operator reset a persona's budget for the current period (`POST /api/budgets/{p}/reset`).
    BudgetReset {
        persona: String,
    },
    /// `POST /v1/workflows/{workflow}/runs`.
    RunStarted {
        run: String,
        workflow: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        /// The persona whose key created the run (absent: an admin key).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// A stage of a run began (through the API, or implicitly with the run's first call for it).
    StageStarted {
        run: String,
        workflow: String,
        stage: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        persona: Option<String>,
        /// The stage's variant this run uses (a stage with variants): every call and retry of the
        /// run's stage keeps it, whatever a reload changes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        variant: Option<String>,
    },
    /// A stage of a run ended; its duration is the time since it started.
    StageFinished {
        run: String,
        workflow: String,
        stage: String,
    },
    RunFinished {
        run: String,
        workflow: String,
        /// completed | failed | cancelled
        status: String,
    },
    /// One verdict of a stage's quality gate (one per attempt).
    QualityGate(GateVerdictEvent),
    /// A switch refused by the switch policy (cooldown, or an oscillation in `suppress` mode).
    SwitchSuppressed {
        session: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        to: String,
        chatmode: String,
        /// cooldown | oscillation
        reason: String,
    },
    /// A gateway call admitted, stored before its upstream is called and settled by the usage event
    /// that names it (`Usage::call`). One that a crash left unsettled is counted at its estimate
    /// when the ledger is next opened: an answered call is never missing from the ledger.
    CallAdmitted(CallAdmission),
    /// A gateway call that ended without usage (the upstream failed before answering): its
    /// admission is void.
    CallReleased {
        call: String,
    },
    /// How much of a streamed call's completion has gone to the client so far (written about
    /// once a second while it streams, never awaited): a crash that cuts the stream off settles
    /// the call at its estimate plus this much, not at the estimate alone.
    CallProgress {
        call: String,
        completion_tokens: u64,
    },
    /// A stage's quality gate changed in the configuration (seen at a reload, or at a start after
    /// the files changed while hypertool was down): what it was and what it is, as
    /// `GET /v1/workflows` shows them (`None`: no gate).
    GateChanged {
        workflow: String,
        stage: String,
        #[serde(default)]
        before: Option<serde_json::Value>,
        #[serde(default)]
        after: Option<serde_json::Value>,
    },
    /// A stage's variants changed (at a reload, or while hypertool was down): a prompt edited (a
    /// new version), a variant added or removed, a promotion, new weights. `before`/`after`: the
    /// variants and allocation as `GET /v1/workflows` shows them; absent: none.
    VariantsChanged {
        workflow: String,
        stage: String,
        #[serde(default)]
        before: Option<serde_json::Value>,
        #[serde(default)]
        after: Option<serde_json::Value>,
    },
    /// A tool call through the MCP proxy (`hypertool mcp`, `/mcp`): sent to a downstream server,
    /// or refused because the persona in force may not use it.
    McpToolCall(McpToolCall),
    /// A change made through the admin API or the CLI (a budget set or removed, a budget reset, an
    /// experiment promoted, a reload, a switch an admin made): who (the key's role and configured
    /// name — never the key), what, on what, and the values before and after.
    Audit(AuditEntry),
    /// An experiment became decided: `variant` is the best of its stage's variants with
    /// probability `p_best` (at least the stage's `decide_at`, after `min_runs_per_variant` runs
    /// each). Recorded once per (workflow, stage, variant); the allocation goes on until the
    /// operator promotes.
    ExperimentDecided {
        workflow: String,
        stage: String,
        variant: String,
        p_best: f64,
        /// Runs of the experiment (all variants) when it was decided.
        runs: u64,
    },
}

/// One tool call through the MCP proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McpToolCall {
    /// The MCP session (its persona is the session's persona in force).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub persona: String,
    /// The downstream server (`hypertool` for the built-in tools).
    pub server: String,
    /// The tool's name on that server.
    pub tool: String,
    pub result: ToolCallResult,
    pub duration_seconds: f64,
}

/// How a tool call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolCallResult {
    /// The server answered (a result, not an error).
    Ok,
    /// The server answered with an error, or could not be reached.
    Error,
    /// Not sent: the persona in force may not call it (or it does not exist).
    Refused,
}

impl ToolCallResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolCallResult::Ok => "ok",
            ToolCallResult::Error => "error",
            ToolCallResult::Refused => "refused",
        }
    }
}

/// Who a model call was for and where it belongs: the attribution every record of a call carries
/// (its admission, its usage) and every label of its metrics comes from. The stored events keep
/// these fields flat, as they are written in the ledger and sent to `/v1/events` (serde's
/// `flatten` would buffer every usage event on replay); [`Usage::attributed`],
/// [`CallAdmission::attributed`] and their `attribution()` are the one place they are copied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attribution {
    pub persona: String,
    pub chatmode: String,
    pub model: String,
    pub workflow: Option<String>,
    pub stage: Option<String>,
    pub session: Option<String>,
    /// The workflow run the call belongs to (its tokens count toward the stage's budget).
    pub run: Option<String>,
}

/// What a gateway call was admitted with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallAdmission {
    /// Unique per upstream attempt that draws on a reservation (a gate retry has its own).
    pub call: String,
    pub persona: String,
    pub chatmode: String,
    pub model: String,
    /// Tokens reserved: the prompt's estimate plus the completion's limit.
    pub estimate: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// The replica that admitted it (a shared ledger): while that replica's heartbeat lease
    /// holds, the call holds budget fleet-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Completion tokens streamed to the client so far, from the call's `call_progress` events
    /// (kept by the engine beside the admission; never part of the stored admission).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub streamed_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl CallAdmission {
    /// The admission of `call` for `who`, reserving `estimate` tokens.
    pub fn attributed(who: Attribution, call: String, estimate: u64) -> CallAdmission {
        CallAdmission {
            call,
            persona: who.persona,
            chatmode: who.chatmode,
            model: who.model,
            estimate,
            cost_usd: None,
            workflow: who.workflow,
            stage: who.stage,
            session: who.session,
            run: who.run,
            replica: None,
            streamed_tokens: 0,
        }
    }

    pub fn attribution(&self) -> Attribution {
        Attribution {
            persona: self.persona.clone(),
            chatmode: self.chatmode.clone(),
            model: self.model.clone(),
            workflow: self.workflow.clone(),
            stage: self.stage.clone(),
            session: self.session.clone(),
            run: self.run.clone(),
        }
    }

    /// The usage to count for a call that never settled: its whole estimate plus what it had
    /// streamed (a call without `max_tokens` reserves no completion), marked estimated.
    pub fn as_settlement(&self) -> Usage {
        Usage {
            prompt_tokens: self.estimate,
            completion_tokens: self.streamed_tokens,
            cost_usd: self.cost_usd,
            estimated: true,
            call: Some(self.call.clone()),
            ..Usage::attributed(self.attribution())
        }
    }
}

impl Usage {
    /// Usage attributed to `who`, with no tokens yet.
    pub fn attributed(who: Attribution) -> Usage {
        Usage {
            persona: who.persona,
            chatmode: who.chatmode,
            model: who.model,
            workflow: who.workflow,
            stage: who.stage,
            session: who.session,
            run: who.run,
            ..Usage::default()
        }
    }

    pub fn attribution(&self) -> Attribution {
        Attribution {
            persona: self.persona.clone(),
            chatmode: self.chatmode.clone(),
            model: self.model.clone(),
            workflow: self.workflow.clone(),
            stage: self.stage.clone(),
            session: self.session.clone(),
            run: self.run.clone(),
        }
    }
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// `admin HYPERTOOL_ADMIN_KEY`, `viewer …`, `config files` (a reload the files' change made).
    pub actor: String,
    /// `budget.set`, `budget.remove`, `budget.reset`, `experiment.promote`, `config.reload`,
    /// `persona.switch`.
    pub action: String,
    /// What it acted on: a persona, `workflow/stage`, a session, the configuration.
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
}

/// One quality-gate verdict, as counted by `hypertool_workflow_quality_gate_total`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateVerdictEvent {
    pub workflow: String,
    pub stage: String,
    pub model: String,
    pub result: GateResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasons: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// 1 for the first attempt of a call, 2 for its first gate retry, …
    #[serde(default = "one")]
    pub attempt: u32,
    /// The stage variant whose output was judged (a stage with variants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// A gate retry sent to the stage's escalation model (not to the model that failed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub escalated: bool,
}

fn one() -> u32 {
    1
}

/// Tokens spent by one LLM call.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub persona: String,
    pub chatmode: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The workflow run this call belongs to (its tokens count toward the stage's budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// How long the LLM call took (feeds `langfuse_generation_duration_seconds{model}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// A digest of the prompt (the gateway: SHA-256 of the messages, 32 hex digits), so that
    /// repeated identical prompts can be found in the ledger without keeping the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_hash: Option<String>,
    /// The token counts were estimated with a tokenizer (the upstream gave no usage, or the client
    /// went away mid-stream), not reported by the upstream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
    /// The gateway call (`Event::CallAdmitted`) this usage settles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
    /// Of `prompt_tokens`: read from the provider's prompt cache (priced at the model's
    /// `cache_read_usd_per_1k`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_read_tokens: u64,
    /// Of `prompt_tokens`: written to the provider's prompt cache (`cache_write_usd_per_1k`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u64,
    /// The stage variant the call used (a stage with variants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The version (content digest) of the variant's prompt the call was sent with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_version: Option<String>,
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// An agent moved a session from one persona to another. `from: None` is the first persona of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonaSwitch {
    pub session: String,
    pub from: Option<String>,
    pub to: String,
    pub chatmode: String,
}

/// Pass or fail of a quality gate. Serialized exactly as the alert rules expect: `pass` / `fail`
/// (the original system counted `passed`/`failed`, so its alert never matched).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateResult {
    Pass,
    Fail,
}

impl GateResult {
    pub fn as_str(self) -> &'static str {
        match self {
            GateResult::Pass => "pass",
            GateResult::Fail => "fail",
        }
    }
}

/// A finished workflow stage and the verdict of its quality gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageResult {
    pub workflow: String,
    pub stage: String,
    pub persona: String,
    pub model: String,
    pub duration_seconds: f64,
    pub gate: GateResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An event and the time it happened (the client's `timestamp`, else the time it was received).
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    pub at: UnixMillis,
    pub event: Event,
}

impl Event {
    /// The short name used in the ledger's `kind` column and in metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Usage(_) => "usage",
            Event::CallAdmitted(_) => "call_admitted",
            Event::CallReleased { .. } => "call_released",
            Event::CallProgress { .. } => "call_progress",
            Event::GateChanged { .. } => "gate_changed",
            Event::VariantsChanged { .. } => "variants_changed",
            Event::PersonaSwitch(_) => "persona_switch",
            Event::Stage(_) => "stage",
            Event::BudgetReset { .. } => "budget_reset",
            Event::RunStarted { .. } => "run_started",
            Event::StageStarted { .. } => "stage_started",
            Event::StageFinished { .. } => "stage_finished",
            Event::RunFinished { .. } => "run_finished",
            Event::QualityGate(_) => "quality_gate",
            Event::SwitchSuppressed { .. } => "switch_suppressed",
            Event::McpToolCall(_) => "mcp_tool_call",
            Event::ExperimentDecided { .. } => "experiment_decided",
            Event::Audit(_) => "audit",
        }
    }
}
