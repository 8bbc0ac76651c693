//! Every route of the API listener, each with who may call it. The router and the access layer
//! are both built from [`routes`], so a route cannot be served without an access decision; the
//! route × role test (`tests/it/access.rs`) walks [`table`] with every kind of caller.

use axum::routing::{delete, get, post, put, MethodRouter};

use super::{
    admin, audit, dashboard, events, experiments, insight, mcp, personas, workflows, AppState,
};
use crate::web::auth::{Access, RouteAccess};

/// The routes, their access and their handlers. One list on purpose, however long it grows: it
/// is the API's table of contents, read top to bottom with who may call each route beside it.
pub fn routes() -> Vec<(RouteAccess, MethodRouter<AppState>)> {
    use Access::{Admin, AnyKey, Gateway, PersonaScoped, Public, View, ViewOrOwnPersona};
    let r = |method, path, access| RouteAccess {
        method,
        path,
        access,
    };
    vec![
        (r("GET", "/healthz", Public), get(admin::healthz)),
        (r("GET", "/readyz", Public), get(admin::readyz)),
        // The gateway: persona keys (their own persona) and admin keys.
        (
            r("POST", "/v1/chat/completions", Gateway),
            post(crate::gateway::chat_completions),
        ),
        (
            r("POST", "/v1/embeddings", Gateway),
            post(crate::gateway::embeddings),
        ),
        (
            r("GET", "/v1/models", Gateway),
            get(crate::gateway::list_models),
        ),
        // Anthropic Messages (Claude Code, the `anthropic` SDKs); errors in Anthropic's shape.
        (
            r("POST", "/v1/messages", Gateway),
            post(crate::gateway::messages),
        ),
        (
            r("POST", "/v1/messages/count_tokens", Gateway),
            post(crate::gateway::count_tokens),
        ),
        // OpenAI Responses (Codex, the `openai` SDKs' `responses`).
        (
            r("POST", "/v1/responses", Gateway),
            post(crate::gateway::responses),
        ),
        // Facts reported by agents: a persona key only for its own persona (checked per event).
        (
            r("POST", "/v1/events", PersonaScoped),
            post(events::post_events),
        ),
        (
            r("POST", "/v1/personas/switch", PersonaScoped),
            post(personas::switch),
        ),
        (
            r("POST", "/v1/personas/route", PersonaScoped),
            post(personas::route),
        ),
        // The MCP proxy (streamable HTTP): a persona key's session is its persona's.
        (r("POST", "/mcp", PersonaScoped), post(mcp::endpoint)),
        (r("GET", "/mcp", PersonaScoped), get(mcp::endpoint)),
        (r("DELETE", "/mcp", PersonaScoped), delete(mcp::endpoint)),
        (
            r("POST", "/v1/quality-gates/evaluate", PersonaScoped),
            post(workflows::evaluate_gate),
        ),
        (r("GET", "/v1/whoami", AnyKey), get(admin::whoami)),
        (
            r("GET", "/v1/workflows", AnyKey),
            get(workflows::list_workflows),
        ),
        (
            r("GET", "/v1/workflows/{workflow}", AnyKey),
            get(workflows::get_workflow),
        ),
        (
            r("POST", "/v1/workflows/{workflow}/runs", PersonaScoped),
            post(workflows::create_run),
        ),
        (
            r("GET", "/v1/workflows/{workflow}/runs", AnyKey),
            get(workflows::list_runs),
        ),
        (
            r("GET", "/v1/workflows/{workflow}/runs/{run}", AnyKey),
            get(workflows::get_run),
        ),
        (
            r(
                "POST",
                "/v1/workflows/{workflow}/runs/{run}/finish",
                PersonaScoped,
            ),
            post(workflows::finish_run),
        ),
        (
            r(
                "POST",
                "/v1/workflows/{workflow}/runs/{run}/stages/{stage}/start",
                PersonaScoped,
            ),
            post(workflows::start_stage),
        ),
        (
            r(
                "POST",
                "/v1/workflows/{workflow}/runs/{run}/stages/{stage}/finish",
                PersonaScoped,
            ),
            post(workflows::finish_stage),
        ),
        // The operator's API: viewer and admin keys; budgets change with admin keys only.
        (
            r("GET", "/api/sessions/{session}", View),
            get(personas::get_session),
        ),
        (
            r("GET", "/api/oscillations", View),
            get(personas::list_oscillations),
        ),
        (r("GET", "/api/personas", View), get(admin::list_personas)),
        (r("GET", "/api/budgets", View), get(admin::list_budgets)),
        (
            r("GET", "/api/budgets/suggestions", View),
            get(insight::budget_suggestions),
        ),
        (
            r("GET", "/api/quality-gates/history", View),
            get(insight::gate_history),
        ),
        (r("GET", "/api/experiments", View), get(experiments::list)),
        (
            r("GET", "/api/experiments/{workflow}/{stage}", View),
            get(experiments::show),
        ),
        (
            r("GET", "/api/investigations/{alert}", View),
            get(insight::investigation),
        ),
        (
            r("GET", "/api/budgets/{persona}", ViewOrOwnPersona),
            get(admin::get_budget),
        ),
        (
            r("PUT", "/api/budgets/{persona}", Admin),
            put(admin::put_budget),
        ),
        (
            r("DELETE", "/api/budgets/{persona}", Admin),
            delete(admin::delete_budget_override),
        ),
        (
            r("POST", "/api/budgets/{persona}/reset", Admin),
            post(admin::reset_budget),
        ),
        (r("GET", "/api/alerts", View), get(admin::list_alerts)),
        (r("GET", "/api/server", View), get(admin::server_info)),
        (r("GET", "/api/audit", View), get(audit::list)),
        (
            r("POST", "/api/experiments/{workflow}/{stage}/promote", Admin),
            post(experiments::promote),
        ),
        (r("GET", "/runbook", View), get(admin::runbook)),
        // The dashboard: a page and the one document it polls.
        (r("GET", "/", View), get(dashboard::page)),
        (r("GET", "/api/dashboard", View), get(dashboard::data)),
    ]
}

/// Each route's method, path and access.
pub fn table() -> Vec<RouteAccess> {
    routes().into_iter().map(|(r, _)| r).collect()
}
