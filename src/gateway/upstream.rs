//! Calling upstreams: the built-in `mock` and any OpenAI-compatible HTTP API.
//!
//! Upstream keys are read from the environment variable named in the configuration at call time
//! and only ever placed in the `Authorization` header; error messages are scrubbed of them.

use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde_json::{json, Value};

use super::client::{SendError, UpstreamClient, UpstreamKey, UpstreamResponse};
use super::dialect::{parse_answer, render_answer, Answer, Dialect, TokenUsage};
use super::tokens;
use crate::config::gateway::{UpstreamKind, UpstreamSettings};

/// Why an upstream call failed; each maps to an HTTP status and an OpenAI-style error.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamError {
    /// The connection could not be made (refused, DNS, TLS).
    Unreachable { upstream: String },
    /// No (complete) answer within the timeout.
    Timeout { upstream: String, after: Duration },
    /// The upstream answered with an error status.
    Status {
        upstream: String,
        status: u16,
        message: String,
        /// The upstream's `Retry-After`, in seconds.
        retry_after: Option<u64>,
    },
    /// The upstream answered 2xx with something that is not an OpenAI response, or broke off.
    Invalid { upstream: String, detail: String },
    /// hypertool could not build the request (a key or URL a request cannot carry).
    Misconfigured { upstream: String, detail: String },
    /// The request holds something the upstream's dialect cannot express (a 400 naming it).
    Untranslatable { upstream: String, detail: String },
}

impl UpstreamError {
    /// Worth another attempt: the upstream may answer next time (429, 5xx, no connection).
    pub fn retryable(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. } => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Timeout { .. }
            | UpstreamError::Invalid { .. }
            | UpstreamError::Misconfigured { .. }
            | UpstreamError::Untranslatable { .. } => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Status { retry_after, .. } => retry_after.map(Duration::from_secs),
            _ => None,
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::Unreachable { .. }
            | UpstreamError::Invalid { .. }
            | UpstreamError::Misconfigured { .. } => 502,
            UpstreamError::Timeout { .. } => 504,
            UpstreamError::Untranslatable { .. } => 400,
            UpstreamError::Status { status, .. } => match *status {
                429 => 429,
                s if s >= 500 => 502,
                s => s,
            },
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable { .. } => "upstream_unreachable",
            UpstreamError::Timeout { .. } => "upstream_timeout",
            UpstreamError::Status { status: 429, .. } => "upstream_rate_limited",
            UpstreamError::Status { .. } => "upstream_error",
            UpstreamError::Invalid { .. } => "upstream_invalid_response",
            UpstreamError::Misconfigured { .. } => "upstream_misconfigured",
            UpstreamError::Untranslatable { .. } => "unsupported_content",
        }
    }

    pub fn message(&self) -> String {
        match self {
            UpstreamError::Unreachable { upstream } => {
                format!("upstream `{upstream}` could not be reached (connection failed); check its base_url and that it is running")
            }
            UpstreamError::Timeout { upstream, after } => {
                format!("upstream `{upstream}` did not answer within {}s; raise the model's `timeout` or try again", after.as_secs_f64())
            }
            UpstreamError::Status {
                upstream,
                status,
                message,
                ..
            } => {
                format!("upstream `{upstream}` answered {status}: {message}")
            }
            UpstreamError::Invalid { upstream, detail } => {
                format!("upstream `{upstream}` sent an invalid response: {detail}")
            }
            UpstreamError::Misconfigured { upstream, detail } => {
                format!(
                    "upstream `{upstream}` is misconfigured: {detail}; fix it in hypertool.toml"
                )
            }
            UpstreamError::Untranslatable { upstream, detail } => {
                format!("{detail} (upstream `{upstream}`); send it to a model of the other kind, or leave it out")
            }
        }
    }
}

/// Removes anything that looks like a credential from upstream-supplied text.
pub fn scrub(text: &str, secret: Option<&str>) -> String {
    let mut out = match secret {
        Some(s) if !s.is_empty() => text.replace(s, "<redacted>"),
        _ => text.to_string(),
    };
    // OpenAI echoes masked keys ("sk-abc***xyz"); drop any sk-… token entirely.
    while let Some(i) = out.find("sk-") {
        let end = out[i..]
            .find(|c: char| c.is_whitespace() || c == '"' || c == '.' || c == ',')
            .map(|e| i + e)
            .unwrap_or(out.len());
        out.replace_range(i..end, "<redacted>");
    }
    if out.len() > 500 {
        let mut cut = 500;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

fn api_key(upstream: &UpstreamSettings) -> Option<String> {
    upstream
        .api_key_env
        .as_ref()
        .and_then(|name| std::env::var(name).ok())
        .filter(|k| !k.is_empty())
}

/// `{base_url}/{path}` of `upstream`, parsed once at configuration load.
fn endpoint(upstream: &UpstreamSettings, path: &str) -> Result<http::Uri, UpstreamError> {
    let parsed = match (upstream.kind, path) {
        (UpstreamKind::Openai, "chat/completions") => upstream.chat_url.clone(),
        (UpstreamKind::Openai, "embeddings") => upstream.embeddings_url.clone(),
        (UpstreamKind::Anthropic, "messages") => upstream.messages_url.clone(),
        (UpstreamKind::Anthropic, "messages/count_tokens") => upstream.count_tokens_url.clone(),
        _ => None,
    };
    parsed.ok_or_else(|| UpstreamError::Misconfigured {
        upstream: upstream.name.clone(),
        detail: format!("no valid URL for `{path}`"),
    })
}

/// Sends `body` as JSON to `path`; the answer's head has arrived when this returns, its body not
/// yet read. An error status is read and classified here.
async fn send(
    http: &UpstreamClient,
    upstream: &UpstreamSettings,
    path: &str,
    body: &(impl serde::Serialize + ?Sized),
    headers: &[(&'static str, String)],
) -> Result<UpstreamResponse, UpstreamError> {
    let uri = endpoint(upstream, path)?;
    let json = serde_json::to_vec(body).map_err(|e| UpstreamError::Misconfigured {
        upstream: upstream.name.clone(),
        detail: format!("the request could not be encoded ({e})"),
    })?;
    let key = api_key(upstream);
    let key = match (upstream.kind, key.as_deref()) {
        (_, None) => UpstreamKey::None,
        (UpstreamKind::Openai, Some(k)) => UpstreamKey::Bearer(k),
        (UpstreamKind::Anthropic, Some(k)) => UpstreamKey::ApiKey(k),
    };
    let resp = http
        .post_json(
            uri,
            Bytes::from(json),
            key,
            headers,
            upstream.proxy.as_deref(),
        )
        .await
        .map_err(|e| match e {
            SendError::Connection => UpstreamError::Unreachable {
                upstream: upstream.name.clone(),
            },
            SendError::Build(detail) => UpstreamError::Misconfigured {
                upstream: upstream.name.clone(),
                detail,
            },
        })?;
    if !resp.status.is_success() {
        return Err(error_status(upstream, resp).await);
    }
    Ok(resp)
}

async fn error_status(upstream: &UpstreamSettings, resp: UpstreamResponse) -> UpstreamError {
    let status = resp.status.as_u16();
    let retry_after = resp
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let body = resp.bytes().await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let message = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            if text.trim().is_empty() {
                "no message".into()
            } else {
                text.into_owned()
            }
        });
    UpstreamError::Status {
        upstream: upstream.name.clone(),
        status,
        message: scrub(&message, api_key(upstream).as_deref()),
        retry_after,
    }
}

/// POSTs `body` to `path`; the body of a 2xx answer, else the classified error. `timeout` bounds
/// the whole exchange, the body included.
async fn post_bytes(
    http: &UpstreamClient,
    upstream: &UpstreamSettings,
    path: &str,
    body: &(impl serde::Serialize + ?Sized),
    headers: &[(&'static str, String)],
    timeout: Duration,
) -> Result<Bytes, UpstreamError> {
    let exchange = async {
        let resp = send(http, upstream, path, body, headers).await?;
        resp.bytes().await.map_err(|()| UpstreamError::Invalid {
            upstream: upstream.name.clone(),
            detail: "the connection broke off in the middle of the answer".into(),
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Timeout {
            upstream: upstream.name.clone(),
            after: timeout,
        }),
    }
}

/// POSTs `body` to `path` and returns the JSON answer, which must hold the array `required`
/// (embeddings; chat completions are read with [`Completion::parse`]).
async fn post_json(
    http: &UpstreamClient,
    upstream: &UpstreamSettings,
    path: &str,
    body: &(impl serde::Serialize + ?Sized),
    timeout: Duration,
    required: &str,
) -> Result<Value, UpstreamError> {
    let bytes = post_bytes(http, upstream, path, body, &[], timeout).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Invalid {
        upstream: upstream.name.clone(),
        detail: format!("not JSON ({e})"),
    })?;
    if !value.get(required).is_some_and(Value::is_array) {
        return Err(UpstreamError::Invalid {
            upstream: upstream.name.clone(),
            detail: format!("no `{required}` array"),
        });
    }
    Ok(value)
}

/// A non-streamed chat completion: the upstream's bytes exactly as they came (forwarded to the
/// client untouched, so no JSON tree is built and serialized again on the hot path), and what
/// hypertool reads from them.
#[derive(Debug, Clone)]
pub struct Completion {
    pub body: Bytes,
    /// The tokens, when the upstream reported prompt and completion.
    pub usage: Option<TokenUsage>,
    /// The answer's text (message contents, then tool calls), for gates and estimates.
    pub text: String,
}

/// Only the parts of a completion hypertool reads; everything else is skipped without allocating.
#[derive(serde::Deserialize)]
struct LightCompletion<'a> {
    #[serde(borrow)]
    choices: Vec<LightChoice<'a>>,
    #[serde(default)]
    usage: Option<LightUsage>,
}

#[derive(serde::Deserialize)]
struct LightChoice<'a> {
    #[serde(default, borrow)]
    message: Option<LightMessage<'a>>,
}

#[derive(serde::Deserialize)]
struct LightMessage<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<&'a serde_json::value::RawValue>,
}

#[derive(serde::Deserialize)]
struct LightUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<LightDetails>,
    #[serde(default)]
    completion_tokens_details: Option<LightDetails>,
}

#[derive(serde::Deserialize)]
struct LightDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl Completion {
    /// Reads an upstream's answer; it must be JSON with a `choices` array.
    pub fn parse(upstream: &str, body: Bytes) -> Result<Completion, UpstreamError> {
        let light: LightCompletion<'_> = serde_json::from_slice(&body).map_err(|e| {
            let detail = if e.is_data() {
                "no `choices` array".to_string()
            } else {
                format!("not JSON ({e})")
            };
            UpstreamError::Invalid {
                upstream: upstream.to_string(),
                detail,
            }
        })?;
        let mut text = String::new();
        for m in light.choices.iter().filter_map(|c| c.message.as_ref()) {
            if let Some(c) = &m.content {
                text.push_str(c);
            }
            if let Some(calls) = m.tool_calls {
                text.push_str(calls.get());
            }
        }
        let usage = light.usage.and_then(|u| {
            Some(TokenUsage {
                input: u.prompt_tokens?,
                output: u.completion_tokens?,
                cache_read: u
                    .prompt_tokens_details
                    .and_then(|d| d.cached_tokens)
                    .unwrap_or(0),
                cache_write: 0,
                reasoning: u
                    .completion_tokens_details
                    .and_then(|d| d.reasoning_tokens)
                    .unwrap_or(0),
            })
        });
        Ok(Completion { body, usage, text })
    }

    /// An answer hypertool made or translated, rendered in `dialect`.
    pub fn of_answer(answer: &Answer, dialect: Dialect) -> Completion {
        Completion {
            body: Bytes::from(render_answer(answer, dialect).to_string()),
            usage: answer.usage,
            text: answer.text(),
        }
    }

    /// An upstream's answer in `from`, for a client of `to`: forwarded as it came when the two
    /// are the same, else translated.
    pub fn read(
        upstream: &str,
        from: Dialect,
        to: Dialect,
        body: Bytes,
    ) -> Result<Completion, UpstreamError> {
        if from == Dialect::Chat && to == Dialect::Chat {
            return Completion::parse(upstream, body);
        }
        let answer = parse_answer(from, &body).map_err(|detail| UpstreamError::Invalid {
            upstream: upstream.to_string(),
            detail,
        })?;
        if from == to {
            return Ok(Completion {
                usage: answer.usage,
                text: answer.text(),
                body,
            });
        }
        Ok(Completion::of_answer(&answer, to))
    }
}

/// A non-streamed answer from an HTTP upstream, as its bytes (`path`: the dialect's endpoint).
pub async fn post_answer(
    http: &UpstreamClient,
    upstream: &UpstreamSettings,
    path: &str,
    body: &serde_json::Map<String, Value>,
    headers: &[(&'static str, String)],
    timeout: Duration,
) -> Result<Bytes, UpstreamError> {
    post_bytes(http, upstream, path, body, headers, timeout).await
}

/// Embeddings from an HTTP upstream.
pub async fn embeddings(
    http: &UpstreamClient,
    upstream: &UpstreamSettings,
    body: &Value,
    timeout: Duration,
) -> Result<Value, UpstreamError> {
    post_json(http, upstream, "embeddings", body, timeout, "data").await
}

/// The mock's embeddings: 8 deterministic dimensions per input, derived from its text.
pub fn mock_embeddings(inputs: &[String], model: &str) -> (Value, u64) {
    use std::hash::{Hash, Hasher};
    let mut tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            tokens += tokens::count_text(text);
            let vector: Vec<f64> = (0..8u64)
                .map(|d| {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    (text, d).hash(&mut h);
                    (h.finish() % 2001) as f64 / 1000.0 - 1.0
                })
                .collect();
            json!({"object": "embedding", "index": i, "embedding": vector})
        })
        .collect();
    (
        json!({"object": "list", "data": data, "model": model,
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
        tokens,
    )
}

/// Opens a streamed chat completion; yields the raw SSE bytes. `timeout` bounds the wait for the
/// answer's head; the relay bounds each wait for the next chunk the same way, so a long stream
/// that keeps sending is never cut.
pub async fn open_stream(
    http: &UpstreamClient,
    upstream: &UpstreamSettings,
    path: &str,
    body: &serde_json::Map<String, Value>,
    headers: &[(&'static str, String)],
    timeout: Duration,
) -> Result<impl Stream<Item = Result<Bytes, UpstreamError>>, UpstreamError> {
    let opened = tokio::time::timeout(timeout, send(http, upstream, path, body, headers));
    let resp = match opened.await {
        Ok(r) => r?,
        Err(_) => {
            return Err(UpstreamError::Timeout {
                upstream: upstream.name.clone(),
                after: timeout,
            })
        }
    };
    let name = upstream.name.clone();
    use futures_util::StreamExt;
    Ok(resp.into_stream().map(move |r| {
        r.map_err(|()| UpstreamError::Invalid {
            upstream: name.clone(),
            detail: "the stream broke off".into(),
        })
    }))
}

#[cfg(test)]
mod completion_tests {
    use super::*;

    #[test]
    fn a_completion_is_read_without_rebuilding_it() {
        let raw = r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi","tool_calls":[{"id":"c","function":{"name":"f","arguments":"{}"}}]}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"extra":{"deep":[1,2,3]}}"#;
        let c = Completion::parse("u", Bytes::from(raw)).unwrap();
        assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((3, 2)));
        assert!(c.text.starts_with("hi[{"));
        assert_eq!(&c.body[..], raw.as_bytes(), "forwarded byte for byte");
        let no_usage = Completion::parse(
            "u",
            Bytes::from(r#"{"choices":[{"message":{"content":null}}],"usage":null}"#),
        )
        .unwrap();
        assert_eq!((no_usage.usage, no_usage.text.as_str()), (None, ""));
        let partial = Completion::parse(
            "u",
            Bytes::from(r#"{"choices":[],"usage":{"prompt_tokens":3}}"#),
        )
        .unwrap();
        assert_eq!(partial.usage, None);
        match Completion::parse("u", Bytes::from("this is not json")) {
            Err(UpstreamError::Invalid { detail, .. }) => {
                assert!(detail.starts_with("not JSON"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        match Completion::parse("u", Bytes::from(r#"{"object":"error"}"#)) {
            Err(UpstreamError::Invalid { detail, .. }) => assert_eq!(detail, "no `choices` array"),
            other => panic!("{other:?}"),
        }
    }
}
