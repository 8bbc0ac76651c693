//! The door every API request goes through: who is calling (the key), and may they call this route.
//!
//! One layer in front of the whole router decides each request from a table of routes, each with
//! its [`Access`]: a route is either public (`/healthz`, `/readyz`) or needs a key. The router is
//! built from the same table (`server::routes`), so a route cannot exist without a decision, and a
//! test walks the table with every kind of caller.
//!
//! Roles: **admin** keys (`[[server.admin_keys]]`, `HYPERTOOL_ADMIN_KEY`) may do everything;
//! **persona** keys (`[[gateway.keys]]`) may call the gateway and post facts for their own persona
//! only (handlers ask [`Door::require_own`], the one ownership rule); **viewer** keys
//! (`[[server.viewer_keys]]`) may read `/api/*`, alerts and the runbook. With no key configured at
//! all, every caller is an admin: hypertool then refuses to listen off loopback (see `server`).
//!
//! A key comes as `Authorization: Bearer`, `x-api-key`, or — for a browser on the dashboard or the
//! runbook page — as the password of `Authorization: Basic` (a 401 carries the Basic challenge).
//!
//! Keys are kept only as SHA-256 digests and compared in constant time against every known key (no
//! early exit), so neither a log line nor the time an answer takes says anything about a key.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;

use super::error::{ApiError, ErrorKind};
use crate::config::gateway::VirtualKey;
use crate::config::secret::KeyHash;
use crate::config::settings::AuthSettings;
use crate::telemetry::registry::{Counter, Total};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a key (health checks).
    Public,
    /// Any key: admin, viewer or persona (workflow definitions and runs, read-only).
    AnyKey,
    /// Persona keys (for their own persona) and admin keys: the LLM gateway.
    Gateway,
    /// Persona keys and admin keys; the handler refuses a persona key acting for another persona.
    PersonaScoped,
    /// Viewer and admin keys: the read-only operator API.
    View,
    /// Viewer and admin keys, and the persona key of the persona the path names (its own budget).
    ViewOrOwnPersona,
    /// Admin keys only: changes to budgets.
    Admin,
}

impl Access {
    /// Which keys may call a route of this access, for error messages and the docs.
    pub fn who(self) -> &'static str {
        match self {
            Access::Public => "anyone",
            Access::AnyKey => "any key",
            Access::Gateway | Access::PersonaScoped => {
                "a persona key ([[gateway.keys]]) or an admin key"
            }
            Access::View => "a viewer key ([[server.viewer_keys]]) or an admin key",
            Access::ViewOrOwnPersona => {
                "a viewer or admin key, or the persona key of the persona in the path"
            }
            Access::Admin => "an admin key ([[server.admin_keys]] or $HYPERTOOL_ADMIN_KEY)",
        }
    }
}

/// Who is calling, as the door decided; handlers take it as an extractor.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No key was needed: a public route.
    Anonymous,
    /// An admin key, or any caller when no key is configured (`authenticated: false`).
    Admin {
        authenticated: bool,
        /// How the configuration names the key: the variable it is read from.
        key_env: Option<Arc<str>>,
    },
    Viewer {
        key_env: Arc<str>,
    },
    Persona(Arc<VirtualKey>),
}

impl Caller {
    /// The key's persona, for a persona key.
    pub fn persona_key(&self) -> Option<&VirtualKey> {
        match self {
            Caller::Persona(k) => Some(k),
            _ => None,
        }
    }

    pub fn role(&self) -> &'static str {
        match self {
            Caller::Anonymous => "anonymous",
            Caller::Admin { .. } => "admin",
            Caller::Viewer { .. } => "viewer",
            Caller::Persona(_) => "persona",
        }
    }

    /// Who did something, as the audit log names them: the role and the key's configured name
    /// (the variable it is read from) — never the key.
    pub fn actor(&self) -> String {
        match self {
            Caller::Anonymous => "anonymous".into(),
            Caller::Admin {
                authenticated: false,
                ..
            } => "admin (no keys configured: a loopback caller)".into(),
            Caller::Admin { key_env, .. } => match key_env {
                Some(k) => format!("admin {k}"),
                None => "admin".into(),
            },
            Caller::Viewer { key_env } => format!("viewer {key_env}"),
            Caller::Persona(k) => format!("persona {} ({})", k.persona, k.key_env),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // Only a route outside the door could miss this; refuse rather than guess a role.
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(
                ErrorKind::Internal,
                "no_access_decision",
                "this route was reached without an access decision",
            )
        })
    }
}

/// The 403 a handler answers when a persona key names another persona (`field` names where).
fn other_persona(own: &str, field: &str, what: &str, owner: Option<&str>) -> ApiError {
    let message = match owner {
        Some(owner) => format!(
            "this key belongs to persona `{own}` and may not act on {what} of persona `{owner}`"
        ),
        None => format!(
            "this key belongs to persona `{own}` and may not act on {what}: it is no persona's (an admin key created it, or nothing names its persona)"
        ),
    };
    ApiError::new(ErrorKind::Forbidden, "persona_not_allowed", message).param(field)
}

/// Every configured key, hashed, with the caller it makes.
struct Keyring {
    entries: Vec<(KeyHash, Caller)>,
}

impl Keyring {
    fn new(auth: &AuthSettings, persona_keys: &[VirtualKey]) -> Self {
        let mut entries = Vec::new();
        for k in &auth.admin {
            entries.push((
                k.hash,
                Caller::Admin {
                    authenticated: true,
                    key_env: Some(Arc::from(k.key_env.as_str())),
                },
            ));
        }
        for k in &auth.viewer {
            entries.push((
                k.hash,
                Caller::Viewer {
                    key_env: Arc::from(k.key_env.as_str()),
                },
            ));
        }
        for k in persona_keys {
            entries.push((k.hash, Caller::Persona(Arc::new(k.clone()))));
        }
        Keyring { entries }
    }

    /// Compares with every key (no early exit): the time taken does not depend on which matched.
    fn identify(&self, presented: &str) -> Option<Caller> {
        let presented = KeyHash::of(presented);
        let mut found = None;
        for (hash, caller) in &self.entries {
            if hash.matches(&presented) && found.is_none() {
                found = Some(caller.clone());
            }
        }
        found
    }
}

/// The key a request presents: `Authorization: Bearer KEY`, else `x-api-key: KEY`, else a
/// browser's `Authorization: Basic` with the key as the password (the user name is ignored).
pub fn presented_key(headers: &HeaderMap) -> Option<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '));
    let bearer = authorization
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, rest)| Cow::Borrowed(rest.trim()));
    let basic = || {
        let (scheme, rest) = authorization?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (_, password) = text.split_once(':')?;
        Some(Cow::Owned(password.trim().to_string()))
    };
    bearer
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(|k| Cow::Borrowed(k.trim()))
        })
        .or_else(basic)
        .filter(|k| !k.is_empty())
}

/// A route and who may call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteAccess {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
}

/// The access decision for every request, and the counts of refusals.
pub struct Door {
    keyring: RwLock<Arc<Keyring>>,
    routes: matchit::Router<Vec<(Method, Access)>>,
    /// `hypertool_auth_failures_total{reason}`.
    pub failures: Counter<1>,
    /// `hypertool_internal_errors_total`: handlers that panicked (see [`layer`]), and gateway
    /// calls whose task did.
    pub internal_errors: Total,
    /// Maps a persona name or alias to its canonical name (from the live persona registry).
    canonical: Box<dyn Fn(&str) -> String + Send + Sync>,
}

impl Door {
    pub fn new(
        table: &[RouteAccess],
        auth: &AuthSettings,
        persona_keys: &[VirtualKey],
        canonical: Box<dyn Fn(&str) -> String + Send + Sync>,
    ) -> Self {
        let mut by_path: BTreeMap<&str, Vec<(Method, Access)>> = BTreeMap::new();
        for r in table {
            let method = Method::from_bytes(r.method.as_bytes()).unwrap_or(Method::GET);
            by_path.entry(r.path).or_default().push((method, r.access));
        }
        let mut routes = matchit::Router::new();
        for (path, methods) in by_path {
            if let Err(e) = routes.insert(path, methods) {
                // The table is ours: a conflict is a programming error, caught by the route test.
                tracing::error!(path, "route table conflict: {e}");
            }
        }
        Door {
            keyring: RwLock::new(Arc::new(Keyring::new(auth, persona_keys))),
            routes,
            failures: Counter::new(&crate::telemetry::families::AUTH_FAILURES_TOTAL),
            internal_errors: Total::new(&crate::telemetry::families::INTERNAL_ERRORS_TOTAL),
            canonical,
        }
    }

    /// New keys after a configuration reload (keys are read from the environment at load).
    pub fn reconfigure(&self, auth: &AuthSettings, persona_keys: &[VirtualKey]) {
        *self.keyring.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Keyring::new(auth, persona_keys));
    }

    fn keyring(&self) -> Arc<Keyring> {
        self.keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn canonical(&self, persona: &str) -> String {
        (self.canonical)(persona)
    }

    /// The one ownership rule, for every route: a persona key acts only on what belongs to its
    /// own persona — a persona it names, a run its persona created, a stage its persona runs (the
    /// workflow says which), a session, an event. `owner` is that persona (`None`: nothing of a
    /// persona's, e.g. a run an admin key created). Admin keys act on anything. A refusal is
    /// counted (`hypertool_auth_failures_total{reason="other_persona"}`) and names `field`, the
    /// part of the request that named it, and `what`, e.g. "run `r1`".
    pub fn require_own(
        &self,
        caller: &Caller,
        field: &str,
        what: &str,
        owner: Option<&str>,
    ) -> Result<(), ApiError> {
        let key = match caller {
            Caller::Admin { .. } => return Ok(()),
            Caller::Persona(key) => key,
            // Neither reaches a route that acts for a persona (the door refuses them first).
            Caller::Anonymous | Caller::Viewer { .. } => {
                self.count("role");
                return Err(forbidden(format!(
                    "a {} key may not act on {what}",
                    caller.role()
                )));
            }
        };
        // The usual case, the key's own name, needs no registry lookup.
        if let Some(owner) = owner {
            if owner == key.persona || self.canonical(owner) == self.canonical(&key.persona) {
                return Ok(());
            }
        }
        self.count("other_persona");
        Err(other_persona(
            &key.persona,
            field,
            what,
            owner.map(|o| crate::web::error::bounded(o, 200)).as_deref(),
        ))
    }

    fn count(&self, reason: &'static str) {
        self.failures.inc([reason]);
    }

    /// The access of `method path`. A path outside the table needs an admin key (deny by default:
    /// were a route ever added to the router without its entry, only admins could reach it; for
    /// anyone else an unknown path is 401 or 403, for an admin 404). `HEAD` is decided as the
    /// `GET` it runs (axum answers HEAD with the GET handler). A method the table does not list
    /// for a known path needs any key, and is then answered 405 here, before any handler.
    fn access(&self, method: &Method, path: &str) -> Decision {
        let Ok(m) = self.routes.at(path) else {
            return Decision::Route(Access::Admin, None, None);
        };
        let runs = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        match m.value.iter().find(|(allowed, _)| allowed == runs) {
            Some((_, access)) => {
                // Every name in a path follows the rules of every other name.
                let bad_name = m.params.iter().find_map(|(param, raw)| {
                    let field = path_name_field(param);
                    let decoded = percent_decode(raw);
                    crate::core::labels::check_name(field, &decoded)
                        .err()
                        .map(|e| (param.to_string(), e.reason))
                });
                Decision::Route(
                    *access,
                    m.params.get("persona").map(percent_decode),
                    bad_name,
                )
            }
            None => Decision::MethodNotAllowed(
                m.value
                    .iter()
                    .map(|(allowed, _)| allowed.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        }
    }

    /// Decides one request: the caller, or the refusal (401 without or with an unknown key, 403
    /// for a known key outside its role, 405 for a method the route does not take), counted by
    /// reason.
    pub fn decide(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Caller, ApiError> {
        let (access, path_persona, not_allowed, bad_name) = match self.access(method, path) {
            Decision::Route(access, persona, bad_name) => (access, persona, None, bad_name),
            Decision::MethodNotAllowed(allow) => (Access::AnyKey, None, Some(allow), None),
        };
        if access == Access::Public {
            return Ok(Caller::Anonymous);
        }
        let caller = self.identify(access, path_persona.as_deref(), method, path, headers)?;
        if let Some((param, reason)) = bad_name {
            return Err(ApiError::bad_request(
                "invalid_name",
                format!("`{param}` in the path {reason}"),
            )
            .param(param));
        }
        if let Some(allow) = not_allowed {
            return Err(ApiError::new(
                ErrorKind::MethodNotAllowed,
                "method_not_allowed",
                format!("{path} does not take {method}; it takes {allow}"),
            )
            .allow(allow));
        }
        Ok(caller)
    }

    fn identify(
        &self,
        access: Access,
        path_persona: Option<&str>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Caller, ApiError> {
        let keyring = self.keyring();
        if keyring.entries.is_empty() {
            return Ok(Caller::Admin {
                authenticated: false,
                key_env: None,
            });
        }
        let Some(presented) = presented_key(headers) else {
            self.count("missing_key");
            return Err(unauthorized(
                "this route needs a key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`)",
            ));
        };
        let Some(caller) = keyring.identify(&presented) else {
            self.count("unknown_key");
            return Err(unauthorized("the key is not known to this hypertool"));
        };
        let allowed = match (access, &caller) {
            (_, Caller::Admin { .. }) => true,
            (Access::Public | Access::AnyKey, _) => true,
            (Access::Gateway | Access::PersonaScoped, Caller::Persona(_)) => true,
            (Access::View, Caller::Viewer { .. }) => true,
            (Access::ViewOrOwnPersona, Caller::Viewer { .. }) => true,
            (Access::ViewOrOwnPersona, Caller::Persona(_)) => {
                self.require_own(&caller, "persona", "the budget", path_persona)?;
                true
            }
            _ => false,
        };
        if !allowed {
            self.count("role");
            return Err(forbidden(format!(
                "a {} key may not call {method} {}; it needs {}",
                caller.role(),
                crate::web::error::bounded(path, 200),
                access.who()
            )));
        }
        Ok(caller)
    }
}

/// What the table says of a request's method and path.
enum Decision {
    /// The route's access, the persona its path names (`/api/budgets/{persona}`), and the first
    /// name in the path that breaks the name rules (the parameter, and why).
    Route(Access, Option<String>, Option<(String, String)>),
    /// A known path that does not take this method: the methods it takes.
    MethodNotAllowed(String),
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(ErrorKind::Unauthorized, "invalid_api_key", message)
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(ErrorKind::Forbidden, "permission_denied", message)
}

/// The name rules a path parameter follows (`{run}` and `{session}` are ids, the rest names).
fn path_name_field(param: &str) -> crate::core::labels::NameField {
    use crate::core::labels::NameField;
    match param {
        "persona" => NameField::Persona,
        "workflow" => NameField::Workflow,
        "stage" => NameField::Stage,
        "run" => NameField::Run,
        "session" => NameField::Session,
        _ => NameField::Model,
    }
}

/// `%XX` sequences of a path segment decoded (persona names in paths may be encoded by clients).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// What the one layer in front of the API needs: the door, and the body's limits.
pub struct Entry {
    pub door: Arc<Door>,
    pub body: super::body::BodyLimits,
}

/// The layer in front of the whole API: the door decides from the head alone (a refused request
/// costs no body read), then the body is read within its time and size, then the handler runs with
/// the [`Caller`]. One layer, not two: each layer costs every request a boxed future.
///
/// A `GET` or `HEAD` has no body to read: whatever a client sends after its head is left unread
/// (hyper closes such a connection after the answer), so a public route never waits on a body.
///
/// A handler that panics is answered 500 `internal_error` (in its route's shape) and counted,
/// instead of the connection being dropped: the panic is a bug, and the log has it.
pub async fn layer(State(entry): State<Arc<Entry>>, req: Request, next: Next) -> Response {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let handled = match entry.door.decide(&method, uri.path(), req.headers()) {
        Err(e) => Ok(e.into_response()),
        Ok(caller) if method == Method::GET || method == Method::HEAD => {
            let (mut parts, _unread) = req.into_parts();
            parts.extensions.insert(caller);
            super::conn::handling(&parts.extensions);
            let req = Request::from_parts(parts, axum::body::Body::empty());
            std::panic::AssertUnwindSafe(next.run(req))
                .catch_unwind()
                .await
        }
        Ok(caller) => match super::body::read(&entry.body, req).await {
            Ok(mut req) => {
                req.extensions_mut().insert(caller);
                super::conn::handling(req.extensions());
                let held = req.extensions_mut().remove::<super::body::HeldBody>();
                let answered = std::panic::AssertUnwindSafe(next.run(req))
                    .catch_unwind()
                    .await;
                // A large body's share of the budget is given back once its answer is sent.
                match held {
                    Some(held) => answered.map(|resp| {
                        resp.map(|b| axum::body::Body::new(super::conn::GuardedBody::new(b, held)))
                    }),
                    None => answered,
                }
            }
            Err(refusal) => Ok(refusal),
        },
    };
    let mut resp = handled.unwrap_or_else(|_| {
        entry.door.internal_errors.add(1);
        ApiError::internal_error().into_response()
    });
    // Every error answer, from here or from a handler, is logged once, at its kind's level.
    super::error::log(&method, uri.path(), &resp);
    // The Messages routes answer errors in Anthropic's shape, the door's own included.
    if uri.path() == "/v1/messages" || uri.path().starts_with("/v1/messages/") {
        resp = super::error::in_anthropic_shape(resp);
    }
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The metrics listener's check: with `server.metrics_bearer_token_env` set, a scrape must send
/// that token (Prometheus's `authorization` scrape option) or the process's own scrape token.
pub struct MetricsGate {
    tokens: RwLock<Vec<KeyHash>>,
    internal: KeyHash,
}

impl MetricsGate {
    /// `internal` is the token hypertool's own scrape (for `up`) sends.
    pub fn new(configured: Option<KeyHash>, internal: &str) -> Self {
        MetricsGate {
            tokens: RwLock::new(configured.into_iter().collect()),
            internal: KeyHash::of(internal),
        }
    }

    pub fn reconfigure(&self, configured: Option<KeyHash>) {
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = configured.into_iter().collect();
    }

    pub fn required(&self) -> bool {
        !self
            .tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn admits(&self, headers: &HeaderMap) -> bool {
        if !self.required() {
            return true;
        }
        let Some(presented) = presented_key(headers).map(|k| KeyHash::of(&k)) else {
            return false;
        };
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        let mut ok = self.internal.matches(&presented);
        for t in tokens.iter() {
            ok |= t.matches(&presented);
        }
        ok
    }
}

/// The metrics listener's layer (`/healthz` there stays public).
pub async fn metrics_layer(
    State(gate): State<Arc<MetricsGate>>,
    req: Request,
    next: Next,
) -> Response {
    if req.uri().path() == "/healthz" || gate.admits(req.headers()) {
        return next.run(req).await;
    }
    unauthorized("the metrics listener needs the bearer token of server.metrics_bearer_token_env")
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_of_path_personas() {
        assert_eq!(percent_decode("backend%2Dengineer"), "backend-engineer");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("%"), "%");
    }

    #[test]
    fn bearer_x_api_key_and_a_browsers_basic() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", "k1".parse().unwrap());
        assert_eq!(presented_key(&h).as_deref(), Some("k1"));
        h.insert(header::AUTHORIZATION, "bearer  k2 ".parse().unwrap());
        assert_eq!(presented_key(&h).as_deref(), Some("k2"));
        // base64("viewer:k3"); x-api-key wins over Basic.
        h.insert(header::AUTHORIZATION, "Basic dmlld2VyOmsz".parse().unwrap());
        assert_eq!(presented_key(&h).as_deref(), Some("k1"));
        h.remove("x-api-key");
        assert_eq!(presented_key(&h).as_deref(), Some("k3"));
        h.insert(header::AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert_eq!(presented_key(&h), None);
    }
}
