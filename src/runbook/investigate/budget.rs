//! TokenBudgetExceeded, TokenBudgetSoftLimitReached and TokenBudgetDepletionPredicted: where the
//! tokens went (prompt sizes, repeated prompts, chatmodes, models, earlier periods) and when the
//! budget runs out.

// The investigations' shared vocabulary (evidence, findings, helpers) and their imports.
use super::*;

pub(super) const BUDGET_CAUSES: &[CauseSpec] = &[
    CauseSpec {
        name: "Prompt bloat",
        prior: "high",
        indicator: "the largest prompts far above the persona's median",
        fix: "set max_prompt_tokens on the stage (workflows/*.yml); trim the context agents send",
    },
    CauseSpec {
        name: "Inefficient caching",
        prior: "medium",
        indicator: "identical prompts (same hash) repeated",
        fix: "[gateway.cache] enabled = true (temperature 0 requests are answered from the cache); share it across replicas with [gateway.cache] url",
    },
    CauseSpec {
        name: "Unexpected usage",
        prior: "medium",
        indicator: "tokens from a chatmode not in chatmodes.yml",
        fix: "add the chatmode to chatmodes.yml and plan its budget, or stop the agent using this persona",
    },
    CauseSpec {
        name: "Budget too low",
        prior: "low",
        indicator: "over budget in most earlier periods too",
        fix: "hypertool budget suggest (p95 of daily usage + 20 %), then --apply or hypertool budget set PERSONA --tokens N",
    },
    CauseSpec {
        name: "Model change",
        prior: "low",
        indicator: "this hour's main model differs from the hour before and uses more tokens per call",
        fix: "move the stage back to the earlier model ([gateway.tiers] or the stage's model), or budget for the new one",
    },
];

pub(super) const DEPLETION_CAUSES: &[CauseSpec] = &[
    CauseSpec {
        name: "Expected spike",
        prior: "high",
        indicator: "runs of the persona's workflows active; usage ratio > 1.5",
        fix: "nothing if the work is planned; raise the budget for now with hypertool budget set PERSONA --tokens N",
    },
    CauseSpec {
        name: "Unexpected usage",
        prior: "medium",
        indicator: "tokens from a chatmode not in chatmodes.yml",
        fix: "add the chatmode to chatmodes.yml and plan its budget, or stop the agent using this persona",
    },
    CauseSpec {
        name: "Caching disabled",
        prior: "medium",
        indicator: "identical prompts repeated while [gateway.cache] is off",
        fix: "[gateway.cache] enabled = true in hypertool.toml",
    },
    CauseSpec {
        name: "Budget too low",
        prior: "low",
        indicator: "over budget in most earlier periods too",
        fix: "hypertool budget suggest --apply",
    },
];

/// A persona over, past the soft limit of, or heading over its budget: the budgets finding's data.
#[derive(Serialize)]
struct AtRisk<'a> {
    persona: &'a str,
    limit: u64,
    used: u64,
    remaining: i64,
    soft_limit: Option<u64>,
    period: &'a str,
    mode: &'a str,
    tokens_per_second: f64,
    depletion_at: Option<String>,
    resets_at: Option<String>,
}

/// What every step of the budget investigations reads: the window's usage (the whole window, the
/// one before it, its last half) and the personas in focus (those at risk; all when none is).
struct Window<'a> {
    ev: &'a Evidence,
    id: AlertId,
    now: UnixMillis,
    w: i64,
    recent: Vec<(UnixMillis, &'a Usage)>,
    before: Vec<(UnixMillis, &'a Usage)>,
    half: Vec<(UnixMillis, &'a Usage)>,
    focus: BTreeSet<String>,
}

impl Window<'_> {
    fn in_focus(&self, persona: &str) -> bool {
        self.focus.is_empty() || self.focus.contains(persona)
    }

    /// Tokens of the personas in focus in the window.
    fn window_tokens(&self) -> u64 {
        self.recent
            .iter()
            .filter(|(_, u)| self.in_focus(&u.persona))
            .map(|(_, u)| u.total_tokens())
            .sum()
    }
}

/// TokenBudgetExceeded, TokenBudgetSoftLimitReached and TokenBudgetDepletionPredicted: the
/// personas at risk, then each of the runbook's causes checked on their usage.
pub(super) fn budget(id: AlertId, ev: &Evidence) -> (Vec<Finding>, Scored) {
    let (now, w) = (ev.now, ev.window_ms);
    let mut out = Vec::new();
    let mut scored: Scored = Vec::new();
    let half = usages(&ev.events, now - w / 2, now + 1);
    let focus = at_risk(ev, &half, &mut out);
    let cx = Window {
        ev,
        id,
        now,
        w,
        recent: usages(&ev.events, now - w, now + 1),
        before: usages(&ev.events, now - 2 * w, now - w),
        half,
        focus,
    };
    by_chatmode_and_model(&cx, &mut out);
    largest_prompts(&cx, &mut out, &mut scored);
    repeated_prompts(&cx, &mut out, &mut scored);
    unplanned_chatmodes(&cx, &mut out, &mut scored);
    earlier_periods(&cx, &mut out, &mut scored);
    model_change(&cx, &mut out, &mut scored);
    let ratio = usage_ratio(&cx, &mut out);
    if id == AlertId::TokenBudgetDepletionPredicted {
        active_runs(&cx, &mut out, &mut scored, ratio);
    }
    (out, scored)
}

/// Step 1: Personas over, or heading over, budget (at the pace of the last half window): the finding,
/// and the personas the other steps look at.
fn at_risk(
    ev: &Evidence,
    half: &[(UnixMillis, &Usage)],
    out: &mut Vec<Finding>,
) -> BTreeSet<String> {
    let (now, w) = (ev.now, ev.window_ms);
    let mut rate_by_persona: HashMap<&str, f64> = HashMap::new();
    for (_, u) in half {
        *rate_by_persona.entry(u.persona.as_str()).or_default() += u.total_tokens() as f64;
    }
    let half_secs = (w / 2) as f64 / 1000.0;
    let mut at_risk = Vec::new();
    for b in &ev.budgets {
        let rate = rate_by_persona
            .get(b.persona.as_str())
            .copied()
            .unwrap_or(0.0)
            / half_secs;
        let eta = (rate > 0.0 && b.remaining > 0)
            .then(|| now + (b.remaining as f64 / rate * 1000.0) as i64);
        let over = b.remaining < 0;
        let past_soft = b.soft_limit.is_some_and(|s| b.used >= s);
        let before_reset = eta.is_some_and(|t| b.resets_at.is_none_or(|r| t < r));
        if over || past_soft || before_reset {
            at_risk.push(AtRisk {
                persona: &b.persona,
                limit: b.limit,
                used: b.used,
                remaining: b.remaining,
                soft_limit: b.soft_limit,
                period: b.period,
                mode: b.mode,
                tokens_per_second: (rate * 100.0).round() / 100.0,
                depletion_at: eta.map(to_rfc3339),
                resets_at: b.resets_at.map(to_rfc3339),
            });
        }
    }
    let over: Vec<&str> = at_risk
        .iter()
        .filter(|r| r.remaining < 0)
        .map(|r| r.persona)
        .collect();
    out.push(finding(
        "budgets",
        if over.is_empty() {
            if at_risk.is_empty() {
                Status::Ok
            } else {
                Status::Warn
            }
        } else {
            Status::Fail
        },
        if at_risk.is_empty() {
            "no persona is over or heading over its budget".to_string()
        } else {
            at_risk
                .iter()
                .map(|r| {
                    let eta = r
                        .depletion_at
                        .as_ref()
                        .map(|t| format!(", spent at {t} at this pace"))
                        .unwrap_or_default();
                    format!(
                        "{}: {} of {} used ({} left){eta}",
                        r.persona, r.used, r.limit, r.remaining
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
        json!(at_risk),
    ));
    at_risk.iter().map(|r| r.persona.to_string()).collect()
}

/// Step 2: Tokens by chatmode and model in the window.
fn by_chatmode_and_model(cx: &Window<'_>, out: &mut Vec<Finding>) {
    let Window { recent, .. } = cx;
    let in_focus = |p: &str| cx.in_focus(p);
    let mut by_group: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for (_, u) in recent.iter().filter(|(_, u)| in_focus(&u.persona)) {
        *by_group
            .entry((u.persona.clone(), u.chatmode.clone(), u.model.clone()))
            .or_default() += u.total_tokens();
    }
    let mut groups: Vec<_> = by_group.into_iter().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.1));
    out.push(finding(
        "tokens by chatmode and model",
        Status::Info,
        if groups.is_empty() {
            "no usage in the window".to_string()
        } else {
            groups
                .iter()
                .take(5)
                .map(|((p, c, m), t)| format!("{p}/{c}/{m}: {t}"))
                .collect::<Vec<_>>()
                .join("; ")
        },
        json!(groups
            .iter()
            .take(20)
            .map(|((p, c, m), t)| json!({"persona": p, "chatmode": c, "model": m, "tokens": t}))
            .collect::<Vec<_>>()),
    ));
}

/// Step 3: The largest prompts against the median.
fn largest_prompts(cx: &Window<'_>, out: &mut Vec<Finding>, scored: &mut Scored) {
    let Window { recent, .. } = cx;
    let in_focus = |p: &str| cx.in_focus(p);
    let mut calls: Vec<(UnixMillis, &Usage)> = recent
        .iter()
        .filter(|(_, u)| in_focus(&u.persona) && u.prompt_tokens > 0)
        .copied()
        .collect();
    let mut sizes: Vec<f64> = calls.iter().map(|(_, u)| u.prompt_tokens as f64).collect();
    let median = quantile(&mut sizes, 0.5);
    calls.sort_by_key(|c| std::cmp::Reverse(c.1.prompt_tokens));
    let largest = calls.first().map_or(0, |(_, u)| u.prompt_tokens);
    let bloat = if median > 0.0 {
        largest as f64 / median
    } else {
        0.0
    };
    out.push(finding(
        "largest prompts",
        if bloat >= 4.0 { Status::Warn } else { Status::Info },
        if calls.is_empty() {
            "no prompts in the window".to_string()
        } else {
            format!(
                "largest {largest} tokens, {bloat:.1}× the median of {median:.0} over {} calls",
                calls.len()
            )
        },
        json!(calls
            .iter()
            .take(5)
            .map(|(at, u)| json!({"at": to_rfc3339(*at), "persona": u.persona, "chatmode": u.chatmode,
                "model": u.model, "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "workflow": u.workflow, "stage": u.stage}))
            .collect::<Vec<_>>()),
    ));
    scored.push((
        "Prompt bloat",
        ((bloat - 2.0) / 6.0).max(0.0),
        format!("largest prompt {largest} tokens is {bloat:.1}× the median ({median:.0})"),
    ));
}

/// Step 4: Identical prompts repeated: what a cache would have saved.
fn repeated_prompts(cx: &Window<'_>, out: &mut Vec<Finding>, scored: &mut Scored) {
    let Window { ev, recent, .. } = cx;
    let id = cx.id;
    let in_focus = |p: &str| cx.in_focus(p);
    let mut repeats: HashMap<(&str, &str), (u64, u64)> = HashMap::new();
    for (_, u) in recent.iter().filter(|(_, u)| in_focus(&u.persona)) {
        if let Some(h) = &u.prompt_hash {
            let slot = repeats.entry((h.as_str(), u.model.as_str())).or_default();
            slot.0 += 1;
            slot.1 += u.total_tokens();
        }
    }
    let (mut repeated_calls, mut saved) = (0u64, 0u64);
    for (n, tokens) in repeats.values() {
        if *n > 1 {
            repeated_calls += n - 1;
            saved += tokens - tokens / n;
        }
    }
    let window_tokens = cx.window_tokens();
    let saved_share = if window_tokens > 0 {
        saved as f64 / window_tokens as f64
    } else {
        0.0
    };
    out.push(finding(
        "repeated prompts",
        if saved_share >= 0.1 { Status::Warn } else { Status::Info },
        format!(
            "{repeated_calls} calls repeated an earlier prompt; a cache would have saved {saved} tokens ({} of the window's); cache {}",
            pct(saved_share),
            if ev.cache_enabled { "on" } else { "off" }
        ),
        json!({"repeated_calls": repeated_calls, "tokens_saved": saved, "cache_enabled": ev.cache_enabled}),
    ));
    let cache_name = if id == AlertId::TokenBudgetDepletionPredicted {
        "Caching disabled"
    } else {
        "Inefficient caching"
    };
    let cache_score = if id == AlertId::TokenBudgetDepletionPredicted && ev.cache_enabled {
        saved_share * 0.5
    } else {
        saved_share * 3.0
    };
    scored.push((
        cache_name,
        cache_score,
        format!("{repeated_calls} repeated prompts, {saved} tokens ({}) a cache would have saved; cache {}", pct(saved_share), if ev.cache_enabled { "on" } else { "off" }),
    ));
}

/// Step 5: Chatmodes not in the plan.
fn unplanned_chatmodes(cx: &Window<'_>, out: &mut Vec<Finding>, scored: &mut Scored) {
    let Window { ev, recent, .. } = cx;
    let in_focus = |p: &str| cx.in_focus(p);
    let window_tokens = cx.window_tokens();
    let mut unplanned: BTreeMap<String, u64> = BTreeMap::new();
    for (_, u) in recent.iter().filter(|(_, u)| in_focus(&u.persona)) {
        if !ev.chatmodes.contains(&u.chatmode) {
            *unplanned.entry(u.chatmode.clone()).or_default() += u.total_tokens();
        }
    }
    let unplanned_tokens: u64 = unplanned.values().sum();
    let unplanned_share = if window_tokens > 0 {
        unplanned_tokens as f64 / window_tokens as f64
    } else {
        0.0
    };
    out.push(finding(
        "chatmodes not in the budget plan",
        if unplanned_share >= 0.25 {
            Status::Warn
        } else {
            Status::Info
        },
        if unplanned.is_empty() {
            "every chatmode used is in chatmodes.yml".to_string()
        } else {
            format!(
                "{} ({} of the tokens)",
                unplanned
                    .iter()
                    .map(|(c, t)| format!("{c}: {t}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                pct(unplanned_share)
            )
        },
        json!(unplanned),
    ));
    scored.push((
        "Unexpected usage",
        unplanned_share * 1.5,
        format!(
            "{} of the tokens from chatmodes not in chatmodes.yml",
            pct(unplanned_share)
        ),
    ));
}

/// Step 6: Consistent overage in earlier periods.
fn earlier_periods(cx: &Window<'_>, out: &mut Vec<Finding>, scored: &mut Scored) {
    let Window { ev, focus, .. } = cx;
    let mut too_low = (-1.0f64, String::from("no earlier periods recorded"));
    let mut history = Vec::new();
    for b in ev.budgets.iter().filter(|b| focus.contains(&b.persona)) {
        if b.previous_periods.is_empty() {
            continue;
        }
        let over = b.previous_periods.iter().filter(|u| **u > b.limit).count();
        let share = over as f64 / b.previous_periods.len() as f64;
        history.push(
            json!({"persona": b.persona, "periods": b.previous_periods, "over_budget": over}),
        );
        if share > too_low.0 {
            too_low = (
                share,
                format!(
                    "{}: over budget in {over} of the {} previous {} periods",
                    b.persona,
                    b.previous_periods.len(),
                    b.period
                ),
            );
        }
    }
    out.push(finding(
        "earlier periods",
        if too_low.0 >= 0.5 {
            Status::Warn
        } else {
            Status::Info
        },
        too_low.1.clone(),
        json!(history),
    ));
    scored.push(("Budget too low", too_low.0.max(0.0), too_low.1));
}

/// Step 7: A recent move to a model that uses more tokens per call.
fn model_change(cx: &Window<'_>, out: &mut Vec<Finding>, scored: &mut Scored) {
    let Window { recent, before, .. } = cx;
    let in_focus = |p: &str| cx.in_focus(p);
    let main_model = |calls: &[(UnixMillis, &Usage)]| {
        let mut by: HashMap<&str, (u64, u64)> = HashMap::new();
        for (_, u) in calls.iter().filter(|(_, u)| in_focus(&u.persona)) {
            let e = by.entry(u.model.as_str()).or_default();
            e.0 += 1;
            e.1 += u.total_tokens();
        }
        by.into_iter()
            .max_by_key(|(_, (n, _))| *n)
            .map(|(m, (n, t))| (m.to_string(), t as f64 / n as f64))
    };
    let (now_model, then_model) = (main_model(recent), main_model(before));
    let (model_score, model_text) = match (&now_model, &then_model) {
        (Some((m1, per1)), Some((m0, per0))) if m1 != m0 => (
            if per1 > per0 {
                ((per1 / per0.max(1.0)) - 1.0).clamp(0.4, 1.0)
            } else {
                0.2
            },
            format!("main model {m0} ({per0:.0} tokens/call) → {m1} ({per1:.0} tokens/call)"),
        ),
        (Some((m, per)), _) => (
            0.0,
            format!("main model {m} ({per:.0} tokens/call), unchanged"),
        ),
        _ => (0.0, "no calls to compare".into()),
    };
    out.push(finding(
        "model change",
        if model_score >= 0.4 { Status::Warn } else { Status::Info },
        model_text.clone(),
        json!({"now": now_model.as_ref().map(|m| &m.0), "before": then_model.as_ref().map(|m| &m.0)}),
    ));
    scored.push(("Model change", model_score, model_text));
}

/// Step 8: The usage ratio: the last half window against the window before it; returns it.
fn usage_ratio(cx: &Window<'_>, out: &mut Vec<Finding>) -> f64 {
    let Window { ev, half, .. } = cx;
    let (now, w) = (cx.now, cx.w);
    let in_focus = |p: &str| cx.in_focus(p);
    let last: u64 = half
        .iter()
        .filter(|(_, u)| in_focus(&u.persona))
        .map(|(_, u)| u.total_tokens())
        .sum();
    let earlier: u64 = usages(&ev.events, now - w * 3 / 2, now - w / 2)
        .iter()
        .filter(|(_, u)| in_focus(&u.persona))
        .map(|(_, u)| u.total_tokens())
        .sum();
    let ratio = if earlier > 0 {
        (last as f64 / (w / 2) as f64) / (earlier as f64 / w as f64)
    } else if last > 0 {
        f64::INFINITY
    } else {
        0.0
    };
    let ratio_text = if ratio.is_finite() {
        format!(
            "{ratio:.2} ({last} tokens in the last {}, {earlier} in the {} before)",
            crate::core::duration::PromDuration(w / 2),
            crate::core::duration::PromDuration(w)
        )
    } else {
        format!(
            "usage only in the last {} ({last} tokens)",
            crate::core::duration::PromDuration(w / 2)
        )
    };
    out.push(finding(
        "usage ratio (last half window / the window before)",
        if ratio > 1.5 {
            Status::Warn
        } else {
            Status::Info
        },
        format!("{ratio_text}{}", if ratio > 1.5 { ": a spike" } else { "" }),
        json!({"ratio": ratio.is_finite().then_some(ratio), "last": last, "before": earlier}),
    ));

    ratio
}

/// Step 9: (Depletion predicted) Runs of the persona's workflows in progress: an expected spike.
fn active_runs(cx: &Window<'_>, out: &mut Vec<Finding>, scored: &mut Scored, ratio: f64) {
    let Window { ev, focus, .. } = cx;
    let running: Vec<String> = ev
        .runs
        .iter()
        .filter(|r| r.status == crate::core::runs::RunStatus::Running)
        .filter(|r| {
            ev.stages.iter().any(|s| {
                s.workflow == r.workflow && s.persona.as_deref().is_some_and(|p| focus.contains(p))
            })
        })
        .map(|r| format!("{}/{}", r.workflow, r.id))
        .collect();
    out.push(finding(
        "active runs of the persona's workflows",
        Status::Info,
        if running.is_empty() {
            "none".to_string()
        } else {
            running.join(", ")
        },
        json!(running),
    ));
    let spike = if ratio > 1.5 { 0.5 } else { 0.0 } + if running.is_empty() { 0.0 } else { 0.5 };
    scored.push((
        "Expected spike",
        spike,
        format!(
            "{} active run(s); usage ratio {}",
            running.len(),
            if ratio.is_finite() {
                format!("{ratio:.2}")
            } else {
                "∞".into()
            }
        ),
    ));
}
