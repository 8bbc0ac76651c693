//! The HTTP client the gateway calls upstreams with.
//!
//! Calls go through hyper's pooled HTTP/1.1 client directly (rustls for `https://`, webpki roots),
//! not through reqwest: reqwest wraps the same client but costs about 40 µs more CPU per call
//! (URL re-parsing, IDNA, its service stack) — measured on this machine, the difference between a
//! zero-logic proxy doing ~10,000 and ~16,000 calls/s on one core. reqwest is still used where it
//! earns its cost: upstreams that the environment sends through a proxy (`HTTP_PROXY`,
//! `HTTPS_PROXY`, `ALL_PROXY`, minus `NO_PROXY`, read once at start-up the way reqwest reads them)
//! and upstreams with a `proxy` of their own in the configuration. Both paths give the same
//! [`UpstreamResponse`], so everything after the send is written once, and both trust the same
//! roots: the webpki (Mozilla) roots and the certificates of `gateway.ca_file`.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, BodyStream, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How an upstream is sent its key.
#[derive(Debug, Clone, Copy)]
pub enum UpstreamKey<'a> {
    None,
    /// `Authorization: Bearer` (OpenAI-compatible upstreams).
    Bearer(&'a str),
    /// `x-api-key` (Anthropic).
    ApiKey(&'a str),
}

/// Why a send failed, as far as the caller needs to know: no answer is an answer it can classify.
#[derive(Debug)]
pub enum SendError {
    /// The request could not be built (a URL or header the configuration let through).
    Build(String),
    /// No connection, or it broke before the answer's head arrived.
    Connection,
}

/// An upstream's answer: status and headers, and the body still to be read.
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: UnsyncBoxBody<Bytes, BoxError>,
}

impl UpstreamResponse {
    fn from_http<B>(response: http::Response<B>) -> Self
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (head, body) = response.into_parts();
        UpstreamResponse {
            status: head.status,
            headers: head.headers,
            body: body.map_err(Into::into).boxed_unsync(),
        }
    }

    /// The whole body; `Err` when the connection broke while reading it.
    pub async fn bytes(self) -> Result<Bytes, ()> {
        self.body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|_| ())
    }

    /// The body as it arrives; `Err` when the connection broke.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, ()>> + Send {
        BodyStream::new(self.body).filter_map(|frame| async move {
            match frame {
                Ok(f) => f.into_data().ok().map(Ok),
                Err(_) => Some(Err(())),
            }
        })
    }
}

/// The gateway's upstream client: direct hyper for most upstreams, reqwest behind proxies.
pub struct UpstreamClient {
    direct: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The environment's proxy settings; `None` when it names no proxy (the common case costs
    /// nothing per call).
    env_proxies: Option<Matcher>,
    /// reqwest with the environment's proxies (built only when there are some).
    via_env_proxy: Option<reqwest::Client>,
    /// reqwest clients for upstreams with their own `proxy`, by proxy URL, built on first use.
    via_configured_proxy: Mutex<HashMap<String, reqwest::Client>>,
    /// A reqwest builder with the same trusted roots as the direct client.
    reqwest_builder: Box<dyn Fn() -> reqwest::ClientBuilder + Send + Sync>,
}

const ENV_PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

impl UpstreamClient {
    /// A client trusting the webpki roots and `extra_roots` (`gateway.ca_file`).
    pub fn new(extra_roots: &[CertificateDer<'static>]) -> Self {
        let connector = hyper_rustls::HttpsConnectorBuilder::new();
        let trust = crate::tls::Trust::new(extra_roots.to_vec());
        let connector = match trust.client_config() {
            Ok(config) => connector.with_tls_config(config),
            Err(_) => {
                tracing::error!(
                    "the TLS configuration could not be built; using the webpki roots only"
                );
                connector.with_webpki_roots()
            }
        };
        // As reqwest did: no Nagle delay on upstream requests, and https:// URLs allowed through.
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let https = connector.https_or_http().enable_http1().wrap_connector(tcp);
        let direct = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build(https);
        let env_named_a_proxy = ENV_PROXY_VARS
            .iter()
            .any(|v| std::env::var(v).is_ok_and(|p| !p.trim().is_empty()));
        let reqwest_builder =
            move || trust.reqwest(reqwest::Client::builder().pool_max_idle_per_host(256));
        let (env_proxies, via_env_proxy) = if env_named_a_proxy {
            (Some(Matcher::from_env()), reqwest_builder().build().ok())
        } else {
            (None, None)
        };
        UpstreamClient {
            direct,
            env_proxies,
            via_env_proxy,
            via_configured_proxy: Mutex::new(HashMap::new()),
            reqwest_builder: Box::new(reqwest_builder),
        }
    }

    /// POSTs a JSON body with `headers` beside the key. `proxy` is the upstream's own proxy from
    /// the configuration.
    pub async fn post_json(
        &self,
        uri: Uri,
        body: Bytes,
        key: UpstreamKey<'_>,
        headers: &[(&'static str, String)],
        proxy: Option<&str>,
    ) -> Result<UpstreamResponse, SendError> {
        let via_proxy = self.proxied(&uri, proxy)?;
        let mut builder = Request::post(uri).header(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let (name, value) = match key {
            UpstreamKey::None => (None, None),
            UpstreamKey::Bearer(k) => (Some("authorization"), Some(format!("Bearer {k}"))),
            UpstreamKey::ApiKey(k) => (Some("x-api-key"), Some(k.to_string())),
        };
        if let (Some(name), Some(value)) = (name, value) {
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                SendError::Build("the upstream key holds characters a header cannot carry".into())
            })?;
            value.set_sensitive(true);
            builder = builder.header(name, value);
        }
        for (name, value) in headers {
            let value = HeaderValue::from_str(value).map_err(|_| {
                SendError::Build(format!("`{name}` holds characters a header cannot carry"))
            })?;
            builder = builder.header(*name, value);
        }
        // The traced attempt this request is (see `gateway::trace`).
        if let Some(tp) =
            super::trace::outgoing_traceparent().and_then(|t| HeaderValue::from_str(&t).ok())
        {
            builder = builder.header("traceparent", tp);
        }
        let request = builder.body(body).map_err(|_| {
            SendError::Build("the upstream URL is not a valid request target".into())
        })?;
        match via_proxy {
            None => {
                let response = self
                    .direct
                    .request(request.map(Full::new))
                    .await
                    .map_err(|_| SendError::Connection)?;
                Ok(UpstreamResponse::from_http(response))
            }
            Some(client) => {
                let request = reqwest::Request::try_from(request)
                    .map_err(|_| SendError::Build("the upstream URL is not valid".into()))?;
                let response = client
                    .execute(request)
                    .await
                    .map_err(|_| SendError::Connection)?;
                let response: http::Response<reqwest::Body> = response.into();
                Ok(UpstreamResponse::from_http(response))
            }
        }
    }

    /// The reqwest client to send through when `uri` goes via a proxy; `None` for a direct call.
    fn proxied(
        &self,
        uri: &Uri,
        proxy: Option<&str>,
    ) -> Result<Option<reqwest::Client>, SendError> {
        if let Some(proxy) = proxy {
            let mut clients = self
                .via_configured_proxy
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(c) = clients.get(proxy) {
                return Ok(Some(c.clone()));
            }
            let client = reqwest::Proxy::all(proxy)
                .and_then(|p| (self.reqwest_builder)().proxy(p).build())
                .map_err(|_| {
                    SendError::Build("the upstream's `proxy` is not a valid URL".into())
                })?;
            clients.insert(proxy.to_string(), client.clone());
            return Ok(Some(client));
        }
        match (&self.env_proxies, &self.via_env_proxy) {
            (Some(matcher), Some(client)) if matcher.intercept(uri).is_some() => {
                Ok(Some(client.clone()))
            }
            _ => Ok(None),
        }
    }
}
