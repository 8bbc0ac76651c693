//! The evidence of an experiment (a stage with variants): per variant its runs, gate pass rate with
//! a 95 % interval, calls per run, cost per passing output, and the probability that it is the
//! best — and whether the experiment is decided. Pure: the caller gives each variant's record
//! (the engine's counters).

use rand::SeedableRng;
use rand_distr::Distribution;
use serde::Serialize;

use super::workflow::{Allocation, Objective, Stage, VariantRecord};

/// Draws from the posteriors behind each P(best): its Monte Carlo error is below 0.005.
const DRAWS: usize = 20_000;

/// What one variant has shown.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VariantEvidence {
    pub variant: String,
    pub runs: f64,
    pub passes: f64,
    pub failures: f64,
    /// Passes over verdicts (`None` before the first verdict).
    pub pass_rate: Option<f64>,
    /// The Wilson score interval of the pass rate at 95 %.
    pub pass_rate_interval: Option<(f64, f64)>,
    /// Gate verdicts (attempts) per run: 1 means no gate retries.
    pub attempts_per_run: Option<f64>,
    /// Gate retries per run, and those of them sent to the escalation model.
    pub retries_per_run: Option<f64>,
    pub escalations_per_run: Option<f64>,
    /// The median and 95th percentile of the stage's duration on this variant.
    pub duration_p50_seconds: Option<f64>,
    pub duration_p95_seconds: Option<f64>,
    /// This variant's share of the experiment's runs.
    pub traffic_share: Option<f64>,
    pub cost_usd: f64,
    pub cost_per_pass_usd: Option<f64>,
    /// The probability that this variant is the best on the stage's objective, given the
    /// evidence (Beta posteriors, uniform priors).
    pub p_best: f64,
}

/// An experiment's evidence, and its decision.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ExperimentReport {
    pub workflow: String,
    pub stage: String,
    /// `weights` or `adaptive`.
    pub allocation: &'static str,
    /// What "best" means: `pass_rate` or `pass_per_dollar`.
    pub objective: &'static str,
    pub variants: Vec<VariantEvidence>,
    /// The variant most likely best.
    pub leader: Option<String>,
    /// The leader, once it is best with probability at least `decide_at` and every variant has
    /// at least `min_runs` runs.
    pub decided: Option<String>,
    pub decide_at: f64,
    pub min_runs: u64,
}

/// The Wilson score interval of `passes` out of `n` at 95 %.
pub fn wilson(passes: f64, n: f64) -> Option<(f64, f64)> {
    if n <= 0.0 {
        return None;
    }
    let z = 1.959_963_984_540_054_f64;
    let p = passes / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z * ((p * (1.0 - p) + z2 / (4.0 * n)) / n).sqrt() / (1.0 + z2 / n);
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

/// Each variant's probability of being best (the largest draw), by simulation from its Beta
/// posterior (scaled by its cost per run for `pass_per_dollar`), with a generator seeded by `seed`.
pub fn p_best(records: &[VariantRecord], objective: Objective, seed: u64) -> Vec<f64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let betas: Vec<Option<rand_distr::Beta<f64>>> = records
        .iter()
        .map(|r| rand_distr::Beta::new(1.0 + r.passes, 1.0 + r.failures).ok())
        .collect();
    let costs: Vec<f64> = records
        .iter()
        .map(|r| {
            if r.runs > 0.0 && r.cost_usd > 0.0 {
                r.cost_usd / r.runs
            } else {
                1.0
            }
        })
        .collect();
    let mut wins = vec![0usize; records.len()];
    for _ in 0..DRAWS {
        let mut best: Option<(usize, f64)> = None;
        for (i, beta) in betas.iter().enumerate() {
            let theta = beta.as_ref().map_or(0.5, |b| b.sample(&mut rng));
            let score = match objective {
                Objective::PassRate => theta,
                Objective::PassPerDollar => theta / costs[i].max(1e-9),
            };
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        if let Some((i, _)) = best {
            wins[i] += 1;
        }
    }
    wins.into_iter().map(|w| w as f64 / DRAWS as f64).collect()
}

/// The experiment on `stage` of `workflow`, from each variant's record.
pub fn report(
    workflow: &str,
    stage: &Stage,
    records: &dyn Fn(&str) -> VariantRecord,
) -> ExperimentReport {
    let seen: Vec<VariantRecord> = stage.variants.iter().map(|v| records(&v.name)).collect();
    let (allocation, objective) = match stage.allocation {
        Allocation::Weights => ("weights", Objective::PassRate),
        Allocation::Adaptive { objective, .. } => ("adaptive", objective),
    };
    let seed = u64::from_le_bytes(
        ring::digest::digest(
            &ring::digest::SHA256,
            format!("{workflow}/{}", stage.name).as_bytes(),
        )
        .as_ref()[..8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    let p = p_best(&seen, objective, seed);
    let total_runs: f64 = seen.iter().map(|r| r.runs).sum();
    let variants: Vec<VariantEvidence> = stage
        .variants
        .iter()
        .zip(&seen)
        .zip(&p)
        .map(|((v, r), p)| {
            let verdicts = r.passes + r.failures;
            VariantEvidence {
                variant: v.name.clone(),
                runs: r.runs,
                passes: r.passes,
                failures: r.failures,
                pass_rate: (verdicts > 0.0).then(|| r.passes / verdicts),
                pass_rate_interval: wilson(r.passes, verdicts),
                attempts_per_run: (r.runs > 0.0).then(|| verdicts / r.runs),
                retries_per_run: (r.runs > 0.0).then(|| r.retries / r.runs),
                escalations_per_run: (r.runs > 0.0).then(|| r.escalations / r.runs),
                duration_p50_seconds: r.duration_p50_seconds,
                duration_p95_seconds: r.duration_p95_seconds,
                traffic_share: (total_runs > 0.0).then(|| r.runs / total_runs),
                cost_usd: r.cost_usd,
                cost_per_pass_usd: (r.passes > 0.0 && r.cost_usd > 0.0)
                    .then(|| r.cost_usd / r.passes),
                p_best: *p,
            }
        })
        .collect();
    let leader = variants
        .iter()
        .max_by(|a, b| a.p_best.total_cmp(&b.p_best))
        .map(|v| v.variant.clone());
    let enough = !variants.is_empty()
        && variants
            .iter()
            .all(|v| v.runs >= stage.experiment.min_runs as f64);
    let decided = variants
        .iter()
        .find(|v| enough && v.p_best >= stage.experiment.decide_at)
        .map(|v| v.variant.clone());
    ExperimentReport {
        workflow: workflow.to_string(),
        stage: stage.name.clone(),
        allocation,
        objective: match objective {
            Objective::PassRate => "pass_rate",
            Objective::PassPerDollar => "pass_per_dollar",
        },
        variants,
        leader,
        decided,
        decide_at: stage.experiment.decide_at,
        min_runs: stage.experiment.min_runs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_intervals_cover_the_true_rate_about_95_percent_of_the_time() {
        use rand::Rng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (p, n) in [(0.35, 40.0), (0.8, 100.0), (0.5, 20.0)] {
            let trials = 4_000;
            let mut covered = 0;
            for _ in 0..trials {
                let passes = (0..n as usize).filter(|_| rng.random::<f64>() < p).count() as f64;
                let (lo, hi) = wilson(passes, n).unwrap();
                if lo <= p && p <= hi {
                    covered += 1;
                }
            }
            let coverage = covered as f64 / trials as f64;
            // Wilson's coverage hovers near 95 % (it oscillates with n and p): 92–98 %.
            assert!(
                (0.92..=0.98).contains(&coverage),
                "p {p}, n {n}: {coverage}"
            );
        }
        assert_eq!(wilson(0.0, 0.0), None);
    }

    #[test]
    fn p_best_matches_an_exact_reference() {
        // Two variants: P(θa > θb) for Beta(1+a_pass, 1+a_fail) against Beta(1+b_pass, 1+b_fail)
        // is, for integer parameters, the finite sum of Evan Miller's closed form.
        fn exact(a: (f64, f64), b: (f64, f64)) -> f64 {
            fn ln_beta(x: f64, y: f64) -> f64 {
                ln_gamma(x) + ln_gamma(y) - ln_gamma(x + y)
            }
            fn ln_gamma(x: f64) -> f64 {
                // Integers only here: ln((x-1)!).
                (1..x as u64).map(|k| (k as f64).ln()).sum()
            }
            let (aa, ba) = (1.0 + a.0, 1.0 + a.1);
            let (ab, bb) = (1.0 + b.0, 1.0 + b.1);
            let mut total = 0.0;
            for i in 0..ab as u64 {
                let i = i as f64;
                total += (ln_beta(aa + i, ba + bb)
                    - (bb + i).ln()
                    - ln_beta(1.0 + i, bb)
                    - ln_beta(aa, ba))
                .exp();
            }
            // `total` is P(θb > θa).
            1.0 - total
        }
        for (a, b) in [
            ((8.0, 2.0), (6.0, 4.0)),
            ((30.0, 70.0), (40.0, 60.0)),
            ((3.0, 3.0), (3.0, 3.0)),
        ] {
            let rec = |(p, f): (f64, f64)| VariantRecord {
                runs: p + f,
                passes: p,
                failures: f,
                ..VariantRecord::default()
            };
            let sim = p_best(&[rec(a), rec(b)], Objective::PassRate, 1)[0];
            let reference = exact(a, b);
            assert!(
                (sim - reference).abs() < 0.015,
                "{a:?} {b:?}: {sim} vs {reference}"
            );
        }
    }
}
