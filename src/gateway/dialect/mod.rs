//! The dialects agents speak, as adapters around one canonical call.
//!
//! A call arrives in its client's dialect ([`Dialect`]: OpenAI Chat Completions, Anthropic
//! Messages) and stays in it as a [`CallRequest`] — the body as sent, so fields hypertool does not
//! know (`cache_control`, betas, vendor options) survive. The pipeline (admission, routing, cache,
//! gates, accounting, traces) reads it through the dialect-neutral views here: the prompt for
//! counting, the tools for the persona's scope, `max_tokens`, `stream`. A provider speaks one dialect
//! upstream: where it is the client's, the body goes as sent (only `model` rewritten); where not,
//! [`translate_request`] renders it in the provider's dialect, and the answer comes back through the
//! canonical [`Answer`] (plain) or [`Delta`]s (streamed), rendered in the client's dialect.
//!
//! `chat.rs` and `messages.rs` each hold one dialect: its request checks and translation, its
//! answer's parse and render, its stream's decoder and encoder.

pub mod chat;
pub mod messages;
pub mod responses;

use std::borrow::Cow;

use axum::body::Bytes;
use serde_json::{Map, Value};

/// The wire format of a call, on either side of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// OpenAI Chat Completions (`/v1/chat/completions`): what OpenAI-compatible upstreams speak.
    Chat,
    /// Anthropic Messages (`/v1/messages`): Claude Code, the `anthropic` SDKs, Anthropic's API.
    Messages,
    /// OpenAI Responses (`/v1/responses`): Codex, the `openai` SDKs' `responses`. No upstream kind
    /// speaks it: calls go to chat (or Messages) upstreams translated, or to the mock.
    Responses,
}

impl Dialect {
    /// The route clients of this dialect call (for spans and logs).
    pub fn route(self) -> &'static str {
        match self {
            Dialect::Chat => "/v1/chat/completions",
            Dialect::Messages => "/v1/messages",
            Dialect::Responses => "/v1/responses",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Chat => "chat",
            Dialect::Messages => "messages",
            Dialect::Responses => "responses",
        }
    }
}

/// A call's body in the dialect its client sent it, with the headers a provider of the same
/// dialect must see (`anthropic-version`, `anthropic-beta`).
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub dialect: Dialect,
    pub body: Map<String, Value>,
    /// Headers forwarded to a provider that speaks the same dialect (checked: visible ASCII).
    pub forward: Vec<(&'static str, String)>,
    /// About the body's length as JSON: what counting its prompt costs in proportion to
    /// (`tokens::off_the_workers` decides by it where the count runs).
    pub size: usize,
}

impl CallRequest {
    pub fn new(dialect: Dialect, body: Map<String, Value>) -> Self {
        let size = body.iter().map(|(k, v)| k.len() + 4 + json_len(v)).sum();
        CallRequest {
            dialect,
            body,
            forward: Vec::new(),
            size,
        }
    }

    pub fn stream(&self) -> bool {
        self.body
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// The most output the client allows (0: not said).
    pub fn max_tokens(&self) -> u64 {
        let field = match self.dialect {
            Dialect::Chat => self
                .body
                .get("max_completion_tokens")
                .or_else(|| self.body.get("max_tokens")),
            Dialect::Messages => self.body.get("max_tokens"),
            Dialect::Responses => self.body.get("max_output_tokens"),
        };
        field.and_then(Value::as_u64).unwrap_or(0)
    }

    /// The prompt as chat-shaped messages (`role`, `content`), for counting and for the mock: the
    /// system prompt first, as a system message.
    pub fn prompt(&self) -> Cow<'_, [Value]> {
        match self.dialect {
            Dialect::Chat => Cow::Borrowed(
                self.body
                    .get("messages")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or(&[]),
            ),
            Dialect::Messages => Cow::Owned(messages::prompt_for_count(&self.body)),
            Dialect::Responses => Cow::Owned(responses::prompt_for_count(&self.body)),
        }
    }

    /// What the prompt digest is taken of (equal prompts give equal digests), borrowed from the
    /// body: it is written as JSON into the digest, never copied.
    pub fn digest_source(&self) -> Option<DigestSource<'_>> {
        match self.dialect {
            Dialect::Chat => self.body.get("messages").map(DigestSource::Messages),
            Dialect::Messages | Dialect::Responses => {
                let fields = ["system", "messages", "instructions", "input"]
                    .into_iter()
                    .filter_map(|f| self.body.get(f).map(|v| (f, v)))
                    .collect();
                Some(DigestSource::Fields(fields))
            }
        }
    }

    /// The names of the tools the call offers, in order.
    pub fn tool_names(&self) -> Vec<String> {
        self.body
            .get("tools")
            .and_then(Value::as_array)
            .map(|tools| {
                tools
                    .iter()
                    .map(|t| self.tool_name(t).to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn tool_name<'a>(&self, tool: &'a Value) -> &'a str {
        let name = match self.dialect {
            Dialect::Chat => tool.pointer("/function/name"),
            Dialect::Messages => tool.get("name"),
            // A hosted tool (`web_search`) has no name: its type names it.
            Dialect::Responses => tool.get("name").or_else(|| tool.get("type")),
        };
        name.and_then(Value::as_str).unwrap_or("")
    }

    /// Keeps only the tools `keep` says yes to; with none left, the tool choice goes too.
    pub fn retain_tools(&mut self, keep: impl Fn(&str) -> bool) {
        let dialect = self.dialect;
        let Some(Value::Array(tools)) = self.body.get_mut("tools") else {
            return;
        };
        tools.retain(|t| {
            let name = match dialect {
                Dialect::Chat => t.pointer("/function/name"),
                Dialect::Messages => t.get("name"),
                Dialect::Responses => t.get("name").or_else(|| t.get("type")),
            };
            keep(name.and_then(Value::as_str).unwrap_or(""))
        });
        if tools.is_empty() {
            self.body.remove("tools");
            self.body.remove("tool_choice");
        }
    }

    /// Puts `text` first in the system prompt, in the dialect's place for it: a chat system
    /// message, Messages' `system`, Responses' `instructions`.
    pub fn prepend_system(&mut self, text: &str) {
        match self.dialect {
            Dialect::Chat => {
                if let Some(Value::Array(messages)) = self.body.get_mut("messages") {
                    messages.insert(0, serde_json::json!({"role": "system", "content": text}));
                }
            }
            Dialect::Messages => {
                let system = match self.body.remove("system") {
                    None | Some(Value::Null) => Value::String(text.to_string()),
                    Some(Value::String(s)) => Value::String(format!("{text}\n\n{s}")),
                    Some(Value::Array(mut blocks)) => {
                        blocks.insert(0, serde_json::json!({"type": "text", "text": text}));
                        Value::Array(blocks)
                    }
                    Some(other) => other,
                };
                self.body.insert("system".into(), system);
            }
            Dialect::Responses => {
                let instructions = match self.body.get("instructions").and_then(Value::as_str) {
                    Some(s) => format!("{text}\n\n{s}"),
                    None => text.to_string(),
                };
                self.body
                    .insert("instructions".into(), Value::String(instructions));
            }
        }
    }

    /// The messages a stage's `max_prompt_tokens` may cut (the system prompt is never cut).
    pub fn messages_mut(&mut self) -> Option<&mut Vec<Value>> {
        let field = match self.dialect {
            Dialect::Responses => "input",
            _ => "messages",
        };
        match self.body.get_mut(field) {
            Some(Value::Array(m)) => Some(m),
            _ => None,
        }
    }

    /// The text of the last user message (the mock echoes it).
    /// The first `max_chars` characters of [`CallRequest::last_user_text`], without copying a
    /// long message whole (for a chat request, nothing of the prompt is copied).
    pub fn last_user_text_start(&self, max_chars: usize) -> String {
        let prompt = self.prompt();
        let Some(content) = prompt
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .and_then(|m| m.get("content"))
        else {
            return String::new();
        };
        match content {
            Value::String(s) => s.chars().take(max_chars).collect(),
            Value::Array(parts) => {
                let texts = parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str));
                let mut out = String::new();
                for (i, text) in texts.enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    out.extend(text.chars().take(max_chars));
                    if out.chars().count() >= max_chars {
                        break;
                    }
                }
                out.chars().take(max_chars).collect()
            }
            _ => String::new(),
        }
    }

    pub fn last_user_text(&self) -> String {
        let prompt = self.prompt();
        prompt
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .and_then(|m| m.get("content"))
            .map(content_text)
            .unwrap_or_default()
    }

    /// Whether the client made a tool call mandatory, and which tool (`None`: the first).
    pub fn forced_tool(&self) -> Option<Option<String>> {
        let choice = self.body.get("tool_choice")?;
        match self.dialect {
            Dialect::Chat => match choice {
                Value::String(s) if s == "required" => Some(None),
                Value::Object(o) => o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .map(|n| Some(n.to_string())),
                _ => None,
            },
            Dialect::Responses => match choice {
                Value::String(s) if s == "required" => Some(None),
                Value::Object(o) => o
                    .get("name")
                    .and_then(Value::as_str)
                    .map(|n| Some(n.to_string())),
                _ => None,
            },
            Dialect::Messages => match choice.get("type").and_then(Value::as_str) {
                Some("any") => Some(None),
                Some("tool") => choice
                    .get("name")
                    .and_then(Value::as_str)
                    .map(|n| Some(n.to_string())),
                _ => None,
            },
        }
    }

    /// The tool's JSON schema and name, when the call offers it (the first, when `name` is None).
    pub fn tool(&self, name: Option<&str>) -> Option<(String, Value)> {
        let tools = self.body.get("tools")?.as_array()?;
        let tool = tools
            .iter()
            .find(|t| name.is_none_or(|n| self.tool_name(t) == n))?;
        let schema = match self.dialect {
            Dialect::Chat => tool.pointer("/function/parameters"),
            Dialect::Messages => tool.get("input_schema"),
            Dialect::Responses => tool.get("parameters"),
        };
        Some((
            self.tool_name(tool).to_string(),
            schema.cloned().unwrap_or(Value::Null),
        ))
    }

    /// The last message is the result of a tool call (the mock then answers in text).
    pub fn ends_with_tool_result(&self) -> bool {
        let field = if self.dialect == Dialect::Responses {
            "input"
        } else {
            "messages"
        };
        let Some(last) = self
            .body
            .get(field)
            .and_then(Value::as_array)
            .and_then(|m| m.last())
        else {
            return false;
        };
        match self.dialect {
            Dialect::Responses => last
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("_output")),
            Dialect::Chat => last.get("role").and_then(Value::as_str) == Some("tool"),
            Dialect::Messages => {
                last.get("content")
                    .and_then(Value::as_array)
                    .is_some_and(|blocks| {
                        blocks
                            .iter()
                            .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
                    })
            }
        }
    }
}

/// The text of a message's content: a string, or the text of its parts and blocks.
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// A 400 naming the part of a request that is wrong (`param`: where).
fn bad(code: &'static str, param: String, message: String) -> crate::web::error::ApiError {
    crate::web::error::ApiError::bad_request(code, message).param(param)
}

/// A part of a request (`at`) whose type hypertool does not know: a 400 listing the known ones.
fn unknown_type(at: &str, kind: &str, known: &[&str]) -> crate::web::error::ApiError {
    let kind = crate::web::error::bounded(kind, 64);
    bad(
        "unsupported_content",
        format!("{at}.type"),
        format!(
            "`{at}` has the type `{kind}`, which hypertool does not know; known: {}",
            known.join(", ")
        ),
    )
}

/// A tool's result (`at`, its `field` naming call `id`) that follows no call of that id.
fn orphan_result(at: &str, field: &str, id: &str) -> crate::web::error::ApiError {
    let id = crate::web::error::bounded(id, 128);
    bad(
        "invalid_tool_result",
        format!("{at}.{field}"),
        format!("`{at}` answers the tool call `{id}`, which no earlier message makes; each result must follow the call it answers"),
    )
}

/// Why a request cannot be rendered in another dialect (a 400 naming the part).
#[derive(Debug, Clone, PartialEq)]
pub struct Untranslatable(pub String);

/// The body a provider speaking `to` is sent, from the client's request (the model not yet set).
pub fn translate_request(
    request: &CallRequest,
    to: Dialect,
) -> Result<Cow<'_, Map<String, Value>>, Untranslatable> {
    match (request.dialect, to) {
        (Dialect::Chat, Dialect::Chat)
        | (Dialect::Messages, Dialect::Messages)
        | (Dialect::Responses, Dialect::Responses) => Ok(Cow::Borrowed(&request.body)),
        (Dialect::Messages, Dialect::Chat) => messages::to_chat(&request.body).map(Cow::Owned),
        (Dialect::Chat, Dialect::Messages) => messages::from_chat(&request.body).map(Cow::Owned),
        (Dialect::Responses, Dialect::Chat) => responses::to_chat(&request.body).map(Cow::Owned),
        (Dialect::Responses, Dialect::Messages) => {
            messages::from_chat(&responses::to_chat(&request.body)?).map(Cow::Owned)
        }
        // No upstream speaks Responses (the mock answers every client in its own dialect).
        (_, Dialect::Responses) => Err(Untranslatable(
            "no upstream kind speaks OpenAI Responses".into(),
        )),
    }
}

/// Token counts of one call, in every kind the dialects report. `input` counts every prompt token,
/// cached ones included (as OpenAI's `prompt_tokens` does; Anthropic's `input_tokens` is only the
/// uncached part); `cache_read` and `cache_write` are parts of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub output: u64,
    /// Part of `output`.
    pub reasoning: u64,
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StopReason {
    #[default]
    EndTurn,
    MaxTokens,
    ToolUse,
    StopSequence,
    Refusal,
}

/// One part of an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Text(String),
    /// A tool call; `arguments` is JSON text.
    ToolCall {
        id: String,
        name: String,
        arguments: String,
    },
    Thinking {
        text: String,
        signature: Option<String>,
    },
}

/// A whole answer in no dialect.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub id: String,
    pub model: String,
    pub blocks: Vec<Block>,
    pub stop: StopReason,
    pub usage: Option<TokenUsage>,
}

impl Answer {
    /// What a quality gate reads and an estimate counts: the text, then each tool call.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for b in &self.blocks {
            if let Block::Text(t) = b {
                out.push_str(t);
            }
        }
        for b in &self.blocks {
            if let Block::ToolCall {
                id,
                name,
                arguments,
            } = b
            {
                out.push_str(
                    &serde_json::json!([{"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}])
                        .to_string(),
                );
            }
        }
        out
    }

    /// The answer as the events of a stream: its start, the text (in word-sized pieces when
    /// `by_word`, as the mock streams; whole, as the cache replays), each tool call, the stop and
    /// the usage.
    pub fn deltas(&self, by_word: bool) -> Vec<Delta> {
        let mut out = vec![Delta::Start {
            id: self.id.clone(),
            model: self.model.clone(),
        }];
        for (index, b) in self.blocks.iter().enumerate() {
            match b {
                Block::Text(t) if !by_word => out.push(Delta::Text(t.clone())),
                Block::Text(t) => {
                    for (i, word) in t.split(' ').enumerate() {
                        out.push(Delta::Text(if i == 0 {
                            word.to_string()
                        } else {
                            format!(" {word}")
                        }));
                    }
                }
                Block::Thinking { text, signature } => {
                    out.push(Delta::Thinking(text.clone()));
                    if let Some(s) = signature {
                        out.push(Delta::ThinkingSignature(s.clone()));
                    }
                }
                Block::ToolCall {
                    id,
                    name,
                    arguments,
                } => {
                    out.push(Delta::ToolStart {
                        index,
                        id: id.clone(),
                        name: name.clone(),
                    });
                    out.push(Delta::ToolArgs {
                        index,
                        json: arguments.clone(),
                    });
                }
            }
        }
        out.push(Delta::Stop(self.stop));
        if let Some(u) = self.usage {
            out.push(Delta::Usage(u));
        }
        out
    }
}

/// One event of a streamed answer, in no dialect. Tool calls are told apart by `index`, the
/// source's own numbering; an encoder numbers them its dialect's way.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Start {
        id: String,
        model: String,
    },
    Text(String),
    Thinking(String),
    ThinkingSignature(String),
    ToolStart {
        index: usize,
        id: String,
        name: String,
    },
    ToolArgs {
        index: usize,
        json: String,
    },
    Stop(StopReason),
    /// The usage so far (each one replaces the last).
    Usage(TokenUsage),
}

/// What one upstream stream event meant.
#[derive(Debug)]
pub enum Decoded {
    /// An event of the answer; for chat, the chunk as parsed (so forwarding does not parse twice).
    Event(Option<Value>),
    /// The end of the stream (`[DONE]`, `message_stop`): held back until the usage is stored.
    End,
    /// The upstream reported an error inside the stream.
    Error(String),
}

/// Reads an upstream's stream events into [`Delta`]s.
#[derive(Debug)]
pub enum StreamDecoder {
    Chat(chat::ChatDecoder),
    Messages(messages::MessagesDecoder),
    Responses(responses::ResponsesDecoder),
}

impl StreamDecoder {
    pub fn new(dialect: Dialect) -> Self {
        match dialect {
            Dialect::Chat => StreamDecoder::Chat(chat::ChatDecoder::default()),
            Dialect::Messages => StreamDecoder::Messages(messages::MessagesDecoder::default()),
            Dialect::Responses => StreamDecoder::Responses(responses::ResponsesDecoder),
        }
    }

    /// One event's data; its deltas go onto `out`.
    pub fn decode(&mut self, data: &str, out: &mut Vec<Delta>) -> Decoded {
        match self {
            StreamDecoder::Chat(d) => d.decode(data, out),
            StreamDecoder::Messages(d) => d.decode(data, out),
            StreamDecoder::Responses(d) => d.decode(data, out),
        }
    }
}

/// Writes [`Delta`]s as a client's stream events.
#[derive(Debug)]
pub enum StreamEncoder {
    Chat(chat::ChatEncoder),
    Messages(messages::MessagesEncoder),
    Responses(responses::ResponsesEncoder),
}

impl StreamEncoder {
    /// `include_usage`: a chat client's `stream_options.include_usage` (other dialects always
    /// carry usage); `prompt_estimate`: the input tokens a Messages `message_start` announces
    /// before the upstream has said.
    pub fn new(dialect: Dialect, include_usage: bool, prompt_estimate: u64) -> Self {
        match dialect {
            Dialect::Chat => StreamEncoder::Chat(chat::ChatEncoder::new(include_usage)),
            Dialect::Messages => {
                StreamEncoder::Messages(messages::MessagesEncoder::new(prompt_estimate))
            }
            Dialect::Responses => StreamEncoder::Responses(responses::ResponsesEncoder::default()),
        }
    }

    pub fn encode(&mut self, delta: &Delta, out: &mut Vec<Bytes>) {
        match self {
            StreamEncoder::Chat(e) => e.encode(delta, out),
            StreamEncoder::Messages(e) => e.encode(delta, out),
            StreamEncoder::Responses(e) => e.encode(delta, out),
        }
    }

    /// The end of the stream, after `comment` (the quality gate's verdict) if any.
    pub fn finish(&mut self, comment: Option<&str>, out: &mut Vec<Bytes>) {
        match self {
            StreamEncoder::Chat(e) => e.finish(comment, out),
            StreamEncoder::Messages(e) => e.finish(comment, out),
            StreamEncoder::Responses(e) => e.finish(comment, out),
        }
    }

    /// An error inside the stream, in the dialect's shape.
    pub fn error(&mut self, code: &str, message: &str, out: &mut Vec<Bytes>) {
        match self {
            StreamEncoder::Chat(_) => out.push(chat::error_event(code, message)),
            StreamEncoder::Messages(_) => out.push(messages::error_event(code, message)),
            StreamEncoder::Responses(_) => out.push(responses::error_event(code, message)),
        }
    }
}

/// An SSE comment line (clients ignore it), made safe for one line.
pub fn comment(text: &str) -> Bytes {
    let safe: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Bytes::from(format!(": {safe}\n\n"))
}

/// The whole answer as a client's stream (the mock's, word by word, and the cache's).
pub fn answer_stream(
    answer: &Answer,
    dialect: Dialect,
    include_usage: bool,
    prompt_estimate: u64,
    by_word: bool,
) -> Vec<Bytes> {
    let mut encoder = StreamEncoder::new(dialect, include_usage, prompt_estimate);
    let mut out = Vec::new();
    for d in answer.deltas(by_word) {
        encoder.encode(&d, &mut out);
    }
    encoder.finish(None, &mut out);
    out
}

/// Parses an answer in `dialect`.
pub fn parse_answer(dialect: Dialect, body: &[u8]) -> Result<Answer, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    match dialect {
        Dialect::Chat => chat::parse_answer(&value),
        Dialect::Messages => messages::parse_answer(&value),
        Dialect::Responses => responses::parse_answer(&value),
    }
}

/// Renders an answer in `dialect`.
pub fn render_answer(answer: &Answer, dialect: Dialect) -> Value {
    match dialect {
        Dialect::Chat => chat::render_answer(answer),
        Dialect::Messages => messages::render_answer(answer),
        Dialect::Responses => responses::render_answer(answer),
    }
}

/// A fresh id in `dialect`'s style for answers hypertool makes (the mock's, translated ones).
/// What a call's prompt digest is taken of: a chat request's messages, or the prompt fields of
/// the others by name (written as one JSON object, its keys in order, as serde_json writes a map).
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum DigestSource<'a> {
    Messages(&'a Value),
    Fields(std::collections::BTreeMap<&'static str, &'a Value>),
}

/// About the length of a value written as JSON, without writing it (a walk of its tree).
pub fn json_len(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len() + 2,
        Value::Array(items) => 2 + items.iter().map(|i| json_len(i) + 1).sum::<usize>(),
        Value::Object(map) => {
            2 + map
                .iter()
                .map(|(k, v)| k.len() + 4 + json_len(v))
                .sum::<usize>()
        }
        _ => 8,
    }
}

pub fn new_id(dialect: Dialect) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let prefix = match dialect {
        Dialect::Chat => "chatcmpl-ht",
        Dialect::Messages => "msg_ht",
        Dialect::Responses => "resp_ht",
    };
    format!(
        "{prefix}{:x}{:06x}",
        chrono::Utc::now().timestamp_millis(),
        SEQ.fetch_add(1, Ordering::Relaxed) & 0xff_ffff
    )
}

#[cfg(test)]
mod tests;
