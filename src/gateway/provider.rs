//! Where a route's calls go: one interface over every upstream, chosen once per call from the
//! route. [`Provider::Http`] speaks HTTP to a configured upstream in its kind's dialect (OpenAI
//! Chat Completions or Anthropic Messages; `upstream.rs` sends); [`Provider::Mock`] is the built-in
//! upstream that answers `mock/*` models at once in the client's own dialect, so a fresh install
//! works with no model server (and the benchmarks and tests have a fixed, free upstream).
//!
//! A request in the provider's dialect is sent as the client wrote it (only `model` set); in
//! another, it is translated (`dialect::translate_request`), and the answer is translated back
//! through the canonical `Answer`. Nothing else in the gateway asks which kind of upstream a route
//! has.

use std::borrow::Cow;
use std::time::Duration;

use axum::body::Bytes;
use futures_util::Stream;
use serde_json::{json, Map, Value};

use super::client::UpstreamClient;
use super::dialect::{self, Answer, Block, CallRequest, Dialect, StopReason, TokenUsage};
use super::upstream::{self, Completion, UpstreamError};
use super::{faults, tokens};
use crate::config::gateway::{
    GatewaySettings, MockSettings, ModelRoute, UpstreamKind, UpstreamSettings, MOCK_UPSTREAM,
};

/// The SSE bytes of a streamed answer.
pub type SseStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// A route's upstream, with what calling it needs.
pub enum Provider<'a> {
    Mock(&'a MockSettings),
    Http {
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
            Some(upstream) => Ok(Provider::Http {
                upstream,
                http,
                timeout: route.timeout.unwrap_or(upstream.timeout),
            }),
            None => Err(UpstreamError::Unreachable {
                upstream: route.upstream.clone(),
            }),
        }
    }

    /// The dialect this provider is called in for a client speaking `client` (the mock speaks
    /// every client's own).
    pub fn dialect(&self, client: Dialect) -> Dialect {
        match self {
            Provider::Mock(_) => client,
            Provider::Http { upstream, .. } => match upstream.kind {
                UpstreamKind::Openai => Dialect::Chat,
                UpstreamKind::Anthropic => Dialect::Messages,
            },
        }
    }

    fn name(&self) -> &str {
        match self {
            Provider::Mock(_) => MOCK_UPSTREAM,
            Provider::Http { upstream, .. } => &upstream.name,
        }
    }

    /// The body sent upstream: the client's (its `model` already set) or its translation.
    fn body<'r>(
        &self,
        request: &'r CallRequest,
        stream: bool,
    ) -> Result<(Dialect, Cow<'r, Map<String, Value>>), UpstreamError> {
        let to = self.dialect(request.dialect);
        let mut body =
            dialect::translate_request(request, to).map_err(|u| UpstreamError::Untranslatable {
                upstream: self.name().to_string(),
                detail: u.0,
            })?;
        if let Cow::Owned(b) = &mut body {
            if let Some(model) = request.body.get("model") {
                b.insert("model".into(), model.clone());
            }
            if stream && to == Dialect::Chat {
                b.insert("stream_options".into(), json!({"include_usage": true}));
            }
        }
        Ok((to, body))
    }

    /// The headers an upstream of `to` is sent beside its key.
    fn headers(request: &CallRequest, to: Dialect) -> Vec<(&'static str, String)> {
        if to != Dialect::Messages {
            return Vec::new();
        }
        let mut out: Vec<(&'static str, String)> = Vec::new();
        if request.dialect == Dialect::Messages {
            out.extend(request.forward.iter().cloned());
        }
        if !out.iter().any(|(n, _)| *n == "anthropic-version") {
            out.push((
                "anthropic-version",
                dialect::messages::DEFAULT_VERSION.to_string(),
            ));
        }
        out
    }

    fn path(to: Dialect) -> &'static str {
        match to {
            Dialect::Chat => "chat/completions",
            Dialect::Messages => "messages",
            Dialect::Responses => "responses",
        }
    }

    /// A plain answer, whole, in the client's dialect.
    pub async fn complete(
        &self,
        request: &CallRequest,
        model: &str,
    ) -> Result<Completion, UpstreamError> {
        match self {
            Provider::Mock(mock) => {
                tokio::time::sleep(mock.latency).await;
                faults::strike_call(|| request.last_user_text());
                let prompt = tokens::count_prompt(request, tokens::DEFAULT_DEADLINE).await;
                let answer = mock_answer(mock, request, model, prompt);
                Ok(Completion::of_answer(&answer, request.dialect))
            }
            Provider::Http {
                upstream,
                http,
                timeout,
            } => {
                let (to, body) = self.body(request, false)?;
                let headers = Self::headers(request, to);
                let bytes = upstream::post_answer(
                    http,
                    upstream,
                    Self::path(to),
                    &body,
                    &headers,
                    *timeout,
                )
                .await?;
                Completion::read(&upstream.name, to, request.dialect, bytes)
            }
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
                faults::strike_call(|| inputs.join(" "));
                let bytes = inputs.iter().map(String::len).sum();
                tokens::off_the_workers(bytes, tokens::DEFAULT_DEADLINE, || {
                    upstream::mock_embeddings(inputs, model).0
                })
                .await
                .ok_or_else(|| UpstreamError::Invalid {
                    upstream: MOCK_UPSTREAM.to_string(),
                    detail: "the mock had no thread free to embed the input in time".into(),
                })
            }
            Provider::Http { upstream, .. } if upstream.kind == UpstreamKind::Anthropic => {
                Err(UpstreamError::Untranslatable {
                    upstream: upstream.name.clone(),
                    detail: "Anthropic's API has no embeddings".into(),
                })
            }
            Provider::Http {
                upstream,
                http,
                timeout,
            } => upstream::embeddings(http, upstream, request, *timeout).await,
        }
    }

    /// Opens a streamed answer; its events are in the returned dialect (the upstream's).
    pub async fn open_stream(
        &self,
        request: &CallRequest,
        model: &str,
    ) -> Result<(SseStream, Dialect), UpstreamError> {
        match self {
            Provider::Mock(mock) => {
                tokio::time::sleep(mock.latency).await;
                let fault = faults::strike_call(|| request.last_user_text());
                let prompt = tokens::count_prompt(request, tokens::DEFAULT_DEADLINE).await;
                let answer = mock_answer(mock, request, model, prompt);
                let events = dialect::answer_stream(&answer, request.dialect, true, prompt, true);
                let mid_stream = fault == Some(faults::Fault::MidStream);
                let events = events.into_iter().enumerate().map(move |(i, e)| {
                    if mid_stream && i == 1 {
                        panic!("a fault planted by a test: the mock stream panics");
                    }
                    Ok(e)
                });
                Ok((
                    Box::pin(futures_util::stream::iter(events)),
                    request.dialect,
                ))
            }
            Provider::Http {
                upstream,
                http,
                timeout,
            } => {
                let (to, body) = self.body(request, true)?;
                let headers = Self::headers(request, to);
                let stream = upstream::open_stream(
                    http,
                    upstream,
                    Self::path(to),
                    &body,
                    &headers,
                    *timeout,
                )
                .await?;
                Ok((Box::pin(stream), to))
            }
        }
    }

    /// The prompt's input tokens as the model counts them: an Anthropic upstream is asked; for
    /// others (and the mock) they are counted here, as admission counts them.
    pub async fn count_tokens(&self, request: &CallRequest) -> Result<u64, UpstreamError> {
        match self {
            Provider::Http {
                upstream,
                http,
                timeout,
            } if upstream.kind == UpstreamKind::Anthropic => {
                let (to, body) = self.body(request, false)?;
                let mut body = body.into_owned();
                // count_tokens takes the prompt only.
                for field in [
                    "max_tokens",
                    "stream",
                    "temperature",
                    "top_p",
                    "stop_sequences",
                    "metadata",
                ] {
                    body.remove(field);
                }
                let headers = Self::headers(request, to);
                let bytes = upstream::post_answer(
                    http,
                    upstream,
                    "messages/count_tokens",
                    &body,
                    &headers,
                    *timeout,
                )
                .await?;
                serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("input_tokens").and_then(Value::as_u64))
                    .ok_or_else(|| UpstreamError::Invalid {
                        upstream: upstream.name.clone(),
                        detail: "no `input_tokens` in the count".into(),
                    })
            }
            Provider::Http { timeout, .. } => Ok(tokens::count_prompt(request, *timeout).await),
            Provider::Mock(_) => {
                faults::strike_call(|| request.last_user_text());
                Ok(tokens::count_prompt(request, tokens::DEFAULT_DEADLINE).await)
            }
        }
    }
}

/// One SSE event of a chat stream.
pub fn sse(json: &str) -> Bytes {
    dialect::chat::sse(json)
}

/// The mock's answer: deterministic text echoing the last user message, or — when the client
/// made a tool call mandatory (`tool_choice` required/any or a named tool) and the conversation
/// does not end in a tool's result — a call of that tool with arguments from its schema.
/// `prompt` is the prompt's tokens, counted by the caller (off the async workers).
pub fn mock_answer(mock: &MockSettings, request: &CallRequest, model: &str, prompt: u64) -> Answer {
    let forced = request
        .forced_tool()
        .filter(|_| !request.ends_with_tool_result());
    let tool = forced.and_then(|name| request.tool(name.as_deref()));
    let (blocks, stop) = match tool {
        Some((name, schema)) => (
            vec![Block::ToolCall {
                id: format!(
                    "call_{}",
                    &dialect::new_id(Dialect::Messages)["msg_".len()..]
                ),
                name,
                arguments: example_of(&schema).to_string(),
            }],
            StopReason::ToolUse,
        ),
        None => {
            let echo = request.last_user_text_start(60);
            (
                vec![Block::Text(format!(
                    "Mock answer from hypertool to: {echo}"
                ))],
                StopReason::EndTurn,
            )
        }
    };
    Answer {
        id: dialect::new_id(request.dialect),
        model: model.to_string(),
        blocks,
        stop,
        usage: Some(TokenUsage {
            input: prompt,
            output: mock.completion_tokens,
            ..Default::default()
        }),
    }
}

/// A value that fits a JSON schema's required properties (the mock's tool arguments).
fn example_of(schema: &Value) -> Value {
    match schema.get("type").and_then(Value::as_str) {
        Some("object") | None => {
            let mut out = Map::new();
            let props = schema.get("properties").and_then(Value::as_object);
            for name in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let sub = props.and_then(|p| p.get(name)).unwrap_or(&Value::Null);
                out.insert(name.to_string(), example_of(sub));
            }
            Value::Object(out)
        }
        Some("string") => schema
            .get("enum")
            .and_then(Value::as_array)
            .and_then(|e| e.first().cloned())
            .unwrap_or(json!("mock")),
        Some("integer" | "number") => json!(1),
        Some("boolean") => json!(true),
        Some("array") => json!([]),
        _ => Value::Null,
    }
}
