//! Where a route's calls go: one interface over every upstream, chosen once per call from the
//! route. [`Provider::OpenAiCompatible`] speaks HTTP to a configured upstream (`upstream.rs`);
//! [`Provider::Mock`] is the built-in upstream that answers `mock/*` models at once, so a fresh
//! install works with no model server (and the benchmarks and tests have a fixed, free upstream).
//! Nothing else in the gateway asks which kind of upstream a route has.

use std::time::Duration;

use axum::body::Bytes;
use futures_util::Stream;
use serde_json::{Map, Value};

use super::client::UpstreamClient;
use super::upstream::{self, Completion, UpstreamError};
use crate::config::gateway::{
    GatewaySettings, MockSettings, ModelRoute, UpstreamSettings, MOCK_UPSTREAM,
};

/// The SSE bytes of a streamed answer.
pub type SseStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// A route's upstream, with what calling it needs.
pub enum Provider<'a> {
    Mock(&'a MockSettings),
    OpenAiCompatible {
        upstream: &'a UpstreamSettings,
        http: &'a UpstreamClient,
        timeout: Duration,
    },
}

impl<'a> Provider<'a> {
    /// The provider of `route`; an upstream missing from the configuration is unreachable.
    pub fn of(
        settings: &'a GatewaySettings,
        http: &'a UpstreamClient,
        route: &ModelRoute,
    ) -> Result<Self, UpstreamError> {
        if route.upstream == MOCK_UPSTREAM {
            return Ok(Provider::Mock(&settings.mock));
        }
        match settings.upstreams.get(&route.upstream) {
            Some(upstream) => Ok(Provider::OpenAiCompatible {
                upstream,
                http,
                timeout: route.timeout.unwrap_or(upstream.timeout),
            }),
            None => Err(UpstreamError::Unreachable {
                upstream: route.upstream.clone(),
            }),
        }
    }

    /// A plain chat completion, answered whole.
    pub async fn complete(
        &self,
        body: &Map<String, Value>,
        model: &str,
    ) -> Result<Completion, UpstreamError> {
        match self {
            Provider::Mock(mock) => {
                tokio::time::sleep(mock.latency).await;
                let (value, _, _) = upstream::mock_completion(
                    mock,
                    body,
                    model,
                    &new_id(),
                    chrono::Utc::now().timestamp(),
                );
                Completion::parse(MOCK_UPSTREAM, Bytes::from(value.to_string()))
            }
            Provider::OpenAiCompatible {
                upstream,
                http,
                timeout,
            } => upstream::complete(http, upstream, body, *timeout).await,
        }
    }

    /// Embeddings of `inputs` (the request is sent as it is).
    pub async fn embeddings(
        &self,
        request: &Value,
        inputs: &[String],
        model: &str,
    ) -> Result<Value, UpstreamError> {
        match self {
            Provider::Mock(mock) => {
                tokio::time::sleep(mock.latency).await;
                Ok(upstream::mock_embeddings(inputs, model).0)
            }
            Provider::OpenAiCompatible {
                upstream,
                http,
                timeout,
            } => upstream::embeddings(http, upstream, request, *timeout).await,
        }
    }

    /// Opens a streamed chat completion.
    pub async fn open_stream(&self, body: &Value, model: &str) -> Result<SseStream, UpstreamError> {
        match self {
            Provider::Mock(mock) => {
                tokio::time::sleep(mock.latency).await;
                let chunks = mock_stream(mock, body, model);
                Ok(Box::pin(futures_util::stream::iter(
                    chunks.into_iter().map(Ok),
                )))
            }
            Provider::OpenAiCompatible {
                upstream,
                http,
                timeout,
            } => Ok(Box::pin(
                upstream::open_stream(http, upstream, body, *timeout).await?,
            )),
        }
    }
}

/// An id in OpenAI's shape for answers hypertool makes itself.
pub fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "chatcmpl-ht{:x}{:06x}",
        chrono::Utc::now().timestamp_millis(),
        SEQ.fetch_add(1, Ordering::Relaxed) & 0xff_ffff
    )
}

/// One SSE event.
pub fn sse(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

/// The mock's answer as SSE chunks: the role, a chunk per word, the finish, usage, `[DONE]`.
fn mock_stream(mock: &MockSettings, body: &Value, model: &str) -> Vec<Bytes> {
    use serde_json::json;
    let id = new_id();
    let created = chrono::Utc::now().timestamp();
    let empty = Map::new();
    let request = body.as_object().unwrap_or(&empty);
    let (_, prompt, content) = upstream::mock_completion(mock, request, model, &id, created);
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string()
    };
    let mut out = vec![sse(&chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ))];
    for (i, word) in content.split(' ').enumerate() {
        let piece = if i == 0 {
            word.to_string()
        } else {
            format!(" {word}")
        };
        out.push(sse(&chunk(json!({"content": piece}), Value::Null)));
    }
    out.push(sse(&chunk(json!({}), json!("stop"))));
    let completion = mock.completion_tokens;
    out.push(sse(&json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}).to_string()));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}
