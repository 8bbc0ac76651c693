//! Workflow runs: which stages of which run are running, since when, and what they spent.
//!
//! A stage is observed in `hypertool_workflow_stage_duration_seconds` only when it ends, so a hung
//! stage would never show there. The runs kept here let the exposition export the age of the oldest
//! running stage per workflow and stage (`hypertool_workflow_stage_running_seconds`), which
//! SlowWorkflowStage also watches. All times are event times: a ledger replay rebuilds the same runs.
//!
//! Stages of a run execute one at a time: starting a stage finishes the one running before it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::clock::UnixMillis;
use super::event::GateResult;

/// Where a stage of a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    Running,
    /// Ended with its last gate verdict `pass`.
    Passed,
    /// Ended with its last gate verdict `fail`.
    Failed,
    /// Ended with no gate verdict.
    Finished,
}

/// One stage within one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRun {
    pub status: StageStatus,
    pub persona: Option<String>,
    pub started_at: UnixMillis,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<UnixMillis>,
    /// Wall time of the stage, retries included (set when it ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Gate verdicts seen (one per attempt).
    pub attempts: u32,
    pub gate_passes: u32,
    pub gate_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_gate: Option<GateResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reasons: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_model: Option<String>,
    /// Tokens used by calls of this stage in this run (all attempts).
    pub tokens: u64,
    /// The stage's variant this run uses (fixed when the stage first starts in the run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn parse(s: &str) -> Option<RunStatus> {
        match s {
            "completed" => Some(RunStatus::Completed),
            "failed" => Some(RunStatus::Failed),
            "cancelled" => Some(RunStatus::Cancelled),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

/// One run of a workflow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub workflow: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub status: RunStatus,
    pub created_at: UnixMillis,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<UnixMillis>,
    /// By stage name.
    pub stages: BTreeMap<String, StageRun>,
    /// The persona whose key created the run (canonical); `None` when an admin key did. A persona
    /// key may finish only a run of its own persona.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl Run {
    pub fn tokens(&self) -> u64 {
        self.stages.values().map(|s| s.tokens).sum()
    }
}

/// A stage that just ended: what the duration histogram observes.
#[derive(Debug, Clone, PartialEq)]
pub struct EndedStage {
    pub run: String,
    pub workflow: String,
    pub stage: String,
    pub persona: Option<String>,
    pub started_at: UnixMillis,
    pub status: StageStatus,
    pub seconds: f64,
    /// The run's variant of the stage (a stage with variants).
    pub variant: Option<String>,
}

/// Every run kept, bounded: finished runs are forgotten oldest first beyond `max_finished`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Runs {
    runs: HashMap<Arc<str>, Run>,
    finished: VecDeque<Arc<str>>,
    max_finished: usize,
}

impl Default for Runs {
    fn default() -> Self {
        Self::new(10_000)
    }
}

impl Runs {
    pub fn new(max_finished: usize) -> Self {
        Self {
            runs: HashMap::new(),
            finished: VecDeque::new(),
            max_finished: max_finished.max(1),
        }
    }

    pub fn get(&self, id: &str) -> Option<&Run> {
        self.runs.get(id)
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Run> {
        self.runs.values()
    }

    pub fn start_run(
        &mut self,
        id: &str,
        workflow: &str,
        session: Option<&str>,
        owner: Option<&str>,
        at: UnixMillis,
    ) -> bool {
        if self.runs.contains_key(id) {
            return false;
        }
        self.runs.insert(
            Arc::from(id),
            Run {
                id: id.to_string(),
                workflow: workflow.to_string(),
                session: session.map(str::to_string),
                status: RunStatus::Running,
                created_at: at,
                finished_at: None,
                stages: BTreeMap::new(),
                owner: owner.map(str::to_string),
            },
        );
        true
    }

    /// Starts `stage` (no-op when it is already running); any other running stage of the run ends.
    pub fn start_stage(
        &mut self,
        id: &str,
        stage: &str,
        persona: Option<&str>,
        variant: Option<&str>,
        at: UnixMillis,
    ) -> Vec<EndedStage> {
        let mut ended = Vec::new();
        let Some(run) = self.runs.get_mut(id) else {
            return ended;
        };
        if run.status != RunStatus::Running {
            return ended;
        }
        if run
            .stages
            .get(stage)
            .is_some_and(|s| s.status == StageStatus::Running)
        {
            return ended;
        }
        for (name, s) in run.stages.iter_mut() {
            if s.status == StageStatus::Running {
                ended.push(end(&run.id, &run.workflow, name, s, at));
            }
        }
        let entry = run
            .stages
            .entry(stage.to_string())
            .or_insert_with(|| StageRun {
                status: StageStatus::Running,
                persona: None,
                started_at: at,
                finished_at: None,
                duration_seconds: None,
                attempts: 0,
                gate_passes: 0,
                gate_failures: 0,
                last_gate: None,
                last_reasons: None,
                last_model: None,
                tokens: 0,
                variant: None,
            });
        // The first start of the stage in the run fixes its variant.
        if entry.variant.is_none() {
            entry.variant = variant.map(str::to_string);
        }
        // A stage started again (after it ended) starts a new stretch of time; attempts and
        // tokens keep adding up within the run.
        entry.status = StageStatus::Running;
        entry.started_at = at;
        entry.finished_at = None;
        entry.duration_seconds = None;
        if let Some(p) = persona {
            entry.persona = Some(p.to_string());
        }
        ended
    }

    /// Ends a running stage.
    pub fn finish_stage(&mut self, id: &str, stage: &str, at: UnixMillis) -> Option<EndedStage> {
        let run = self.runs.get_mut(id)?;
        let s = run.stages.get_mut(stage)?;
        if s.status != StageStatus::Running {
            return None;
        }
        Some(end(&run.id, &run.workflow, stage, s, at))
    }

    /// Ends the run and any stage still running in it.
    pub fn finish_run(&mut self, id: &str, status: RunStatus, at: UnixMillis) -> Vec<EndedStage> {
        let mut ended = Vec::new();
        let Some(run) = self.runs.get_mut(id) else {
            return ended;
        };
        if run.status != RunStatus::Running {
            return ended;
        }
        for (name, s) in run.stages.iter_mut() {
            if s.status == StageStatus::Running {
                ended.push(end(&run.id, &run.workflow, name, s, at));
            }
        }
        run.status = status;
        run.finished_at = Some(at);
        let key: Arc<str> = Arc::from(id);
        self.finished.push_back(key);
        while self.finished.len() > self.max_finished {
            if let Some(old) = self.finished.pop_front() {
                self.runs.remove(&old);
            }
        }
        ended
    }

    /// A gate verdict for a stage of a run.
    pub fn gate(
        &mut self,
        id: &str,
        stage: &str,
        model: &str,
        result: GateResult,
        reasons: Option<&str>,
    ) {
        let Some(s) = self.runs.get_mut(id).and_then(|r| r.stages.get_mut(stage)) else {
            return;
        };
        s.attempts += 1;
        match result {
            GateResult::Pass => s.gate_passes += 1,
            GateResult::Fail => s.gate_failures += 1,
        }
        s.last_gate = Some(result);
        s.last_reasons = reasons.map(str::to_string);
        s.last_model = Some(model.to_string());
    }

    /// Tokens used by a call of a stage of a run.
    pub fn usage(&mut self, id: &str, stage: &str, tokens: u64) {
        if let Some(s) = self.runs.get_mut(id).and_then(|r| r.stages.get_mut(stage)) {
            s.tokens = s.tokens.saturating_add(tokens);
        }
    }

    /// The start of the oldest running stage, per (workflow, stage).
    pub fn oldest_running(&self) -> BTreeMap<(String, String), UnixMillis> {
        let mut out: BTreeMap<(String, String), UnixMillis> = BTreeMap::new();
        for run in self.runs.values() {
            for (name, s) in &run.stages {
                if s.status == StageStatus::Running {
                    let slot = out
                        .entry((run.workflow.clone(), name.clone()))
                        .or_insert(s.started_at);
                    *slot = (*slot).min(s.started_at);
                }
            }
        }
        out
    }
}

fn end(run: &str, workflow: &str, stage: &str, s: &mut StageRun, at: UnixMillis) -> EndedStage {
    let seconds = (at - s.started_at).max(0) as f64 / 1000.0;
    s.status = match s.last_gate {
        Some(GateResult::Pass) => StageStatus::Passed,
        Some(GateResult::Fail) => StageStatus::Failed,
        None => StageStatus::Finished,
    };
    s.finished_at = Some(at);
    s.duration_seconds = Some(seconds);
    EndedStage {
        run: run.to_string(),
        workflow: workflow.to_string(),
        stage: stage.to_string(),
        persona: s.persona.clone(),
        started_at: s.started_at,
        status: s.status,
        seconds,
        variant: s.variant.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_lasts_from_start_to_end_retries_included() {
        let mut runs = Runs::default();
        assert!(runs.start_run("r1", "wf", None, None, 0));
        assert!(!runs.start_run("r1", "wf", None, None, 5));
        assert!(runs
            .start_stage("r1", "design", Some("be"), None, 1_000)
            .is_empty());
        // Starting it again while it runs changes nothing.
        assert!(runs
            .start_stage("r1", "design", None, None, 2_000)
            .is_empty());
        runs.gate("r1", "design", "m", GateResult::Fail, Some("min_lines: 1"));
        runs.gate("r1", "design", "m2", GateResult::Pass, None);
        runs.usage("r1", "design", 30);
        assert_eq!(
            runs.oldest_running()[&("wf".to_string(), "design".to_string())],
            1_000
        );
        let ended = runs.finish_stage("r1", "design", 61_000).unwrap();
        assert_eq!(ended.seconds, 60.0);
        assert_eq!(ended.persona.as_deref(), Some("be"));
        let s = &runs.get("r1").unwrap().stages["design"];
        assert_eq!(
            (s.status, s.attempts, s.gate_failures, s.tokens),
            (StageStatus::Passed, 2, 1, 30)
        );
        assert!(runs.oldest_running().is_empty());
        assert!(runs.finish_stage("r1", "design", 70_000).is_none());
    }

    #[test]
    fn next_stage_and_run_end_close_running_stages() {
        let mut runs = Runs::default();
        runs.start_run("r", "wf", None, None, 0);
        runs.start_stage("r", "a", None, None, 0);
        let ended = runs.start_stage("r", "b", None, None, 10_000);
        assert_eq!(ended.len(), 1);
        assert_eq!((ended[0].stage.as_str(), ended[0].seconds), ("a", 10.0));
        let ended = runs.finish_run("r", RunStatus::Completed, 15_000);
        assert_eq!((ended[0].stage.as_str(), ended[0].seconds), ("b", 5.0));
        assert_eq!(runs.get("r").unwrap().status, RunStatus::Completed);
        // A finished run takes no more stages.
        assert!(runs.start_stage("r", "c", None, None, 20_000).is_empty());
        assert!(!runs.get("r").unwrap().stages.contains_key("c"));
    }

    #[test]
    fn finished_runs_are_bounded() {
        let mut runs = Runs::new(2);
        for i in 0..5 {
            let id = format!("r{i}");
            runs.start_run(&id, "wf", None, None, i);
            runs.finish_run(&id, RunStatus::Completed, i + 1);
        }
        runs.start_run("live", "wf", None, None, 9);
        assert_eq!(runs.len(), 3);
        assert!(runs.get("r4").is_some() && runs.get("r2").is_none());
        assert!(runs.get("live").is_some());
    }
}
