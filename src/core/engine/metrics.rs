//! Every series the core keeps, as plain data (rebuilt by replaying the ledger, rendered by
//! `telemetry::exposition`).

use super::*;

/// Every series the core keeps. Budget gauges and persona info are derived at render time.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    /// from_persona, to_persona, chatmode
    pub switches: CounterVec<3>,
    /// persona, chatmode
    pub persona_duration: HistogramVec<2>,
    /// persona, chatmode, model
    pub tokens: CounterVec<3>,
    /// persona, chatmode, model
    pub cost_usd: CounterVec<3>,
    /// workflow, stage, persona
    pub stage_duration: HistogramVec<3>,
    /// workflow, stage, model, result
    pub quality_gates: CounterVec<4>,
    /// model (fed by the gateway)
    pub generation_duration: HistogramVec<1>,
    /// persona, model: prompt tokens per call (snapshots from before it start it empty)
    #[serde(default = "crate::core::series::prompt_tokens_histogram")]
    pub prompt_tokens: HistogramVec<2>,
    /// Traces created in Langfuse (fed by the Langfuse exporter).
    pub langfuse_traces_created: f64,
    /// type
    pub events_applied: CounterVec<1>,
    /// label
    pub label_values_folded: CounterVec<1>,
    /// persona: budgets that reached their soft limit (once per period each)
    pub soft_limit_reached: CounterVec<1>,
    /// chatmode, reason: switches refused by the switch policy
    pub switches_suppressed: CounterVec<2>,
    /// chatmode: A→B→A→B patterns seen in sessions
    pub oscillations: CounterVec<1>,
    /// workflow
    pub runs_started: CounterVec<1>,
    /// workflow, status
    pub runs_finished: CounterVec<2>,
    /// persona, server, tool, result: tool calls through the MCP proxy
    #[serde(default)]
    pub mcp_tool_calls: CounterVec<4>,
    /// persona, server, tool
    #[serde(default = "crate::core::series::tool_call_duration_histogram")]
    pub mcp_tool_duration: HistogramVec<3>,
    /// workflow, stage, variant: runs whose stage started on the variant
    #[serde(default)]
    pub variant_runs: CounterVec<3>,
    /// workflow, stage, variant, result: gate verdicts of the variant's outputs
    #[serde(default)]
    pub variant_gates: CounterVec<4>,
    /// workflow, stage, variant: calls made on the variant
    #[serde(default)]
    pub variant_calls: CounterVec<3>,
    /// workflow, stage, variant: their cost
    #[serde(default)]
    pub variant_cost_usd: CounterVec<3>,
    /// workflow, stage, variant: gate retries (verdicts of attempts after the first)
    #[serde(default)]
    pub variant_retries: CounterVec<3>,
    /// workflow, stage, variant: gate retries sent to the stage's escalation model
    #[serde(default)]
    pub variant_escalations: CounterVec<3>,
    /// workflow, stage, variant: how long the variant's stages took
    #[serde(default = "crate::core::series::stage_duration_histogram")]
    pub variant_stage_duration: HistogramVec<3>,
    /// workflow, stage, variant: experiments decided for the variant (once each)
    #[serde(default)]
    pub experiment_decisions: CounterVec<3>,
    /// Usage events of a call already settled (stored twice across replicas), not counted.
    #[serde(default)]
    pub duplicate_settlements: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            switches: CounterVec::default(),
            persona_duration: HistogramVec::new(PERSONA_DURATION_BUCKETS),
            tokens: CounterVec::default(),
            cost_usd: CounterVec::default(),
            stage_duration: HistogramVec::new(STAGE_DURATION_BUCKETS),
            quality_gates: CounterVec::default(),
            generation_duration: HistogramVec::new(GENERATION_DURATION_BUCKETS),
            prompt_tokens: HistogramVec::new(PROMPT_TOKENS_BUCKETS),
            langfuse_traces_created: 0.0,
            events_applied: CounterVec::default(),
            label_values_folded: CounterVec::default(),
            soft_limit_reached: CounterVec::default(),
            switches_suppressed: CounterVec::default(),
            oscillations: CounterVec::default(),
            runs_started: CounterVec::default(),
            runs_finished: CounterVec::default(),
            mcp_tool_calls: CounterVec::default(),
            mcp_tool_duration: crate::core::series::tool_call_duration_histogram(),
            variant_runs: CounterVec::default(),
            variant_gates: CounterVec::default(),
            variant_calls: CounterVec::default(),
            variant_cost_usd: CounterVec::default(),
            variant_retries: CounterVec::default(),
            variant_escalations: CounterVec::default(),
            variant_stage_duration: crate::core::series::stage_duration_histogram(),
            experiment_decisions: CounterVec::default(),
            duplicate_settlements: 0.0,
        }
    }
}
