//! OpenAI Chat Completions: answers parsed and rendered, streams decoded and encoded.

use axum::body::Bytes;
use serde_json::{json, Value};

use super::{Answer, Block, Decoded, Delta, StopReason, TokenUsage};

pub fn stop_reason(finish: &str) -> StopReason {
    match finish {
        "length" => StopReason::MaxTokens,
        "tool_calls" | "function_call" => StopReason::ToolUse,
        "content_filter" => StopReason::Refusal,
        _ => StopReason::EndTurn,
    }
}

pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::EndTurn | StopReason::StopSequence => "stop",
        StopReason::MaxTokens => "length",
        StopReason::ToolUse => "tool_calls",
        StopReason::Refusal => "content_filter",
    }
}

/// `usage` of a chat answer or chunk, when it has prompt and completion tokens.
pub fn usage(v: &Value) -> Option<TokenUsage> {
    let u = v.get("usage").filter(|u| !u.is_null())?;
    Some(TokenUsage {
        input: u.get("prompt_tokens")?.as_u64()?,
        output: u.get("completion_tokens")?.as_u64()?,
        cache_read: u
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        cache_write: 0,
        reasoning: u
            .pointer("/completion_tokens_details/reasoning_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

fn render_usage(u: &TokenUsage) -> Value {
    let mut v = json!({
        "prompt_tokens": u.input,
        "completion_tokens": u.output,
        "total_tokens": u.input + u.output,
    });
    if u.cache_read > 0 {
        v["prompt_tokens_details"] = json!({"cached_tokens": u.cache_read});
    }
    if u.reasoning > 0 {
        v["completion_tokens_details"] = json!({"reasoning_tokens": u.reasoning});
    }
    v
}

/// The first choice of a chat answer.
pub fn parse_answer(v: &Value) -> Result<Answer, String> {
    let choices = v
        .get("choices")
        .and_then(Value::as_array)
        .ok_or("no `choices` array")?;
    let mut blocks = Vec::new();
    let mut stop = StopReason::EndTurn;
    if let Some(choice) = choices.first() {
        let message = choice.get("message").cloned().unwrap_or(Value::Null);
        if let Some(r) = message
            .get("reasoning_content")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
        {
            blocks.push(Block::Thinking {
                text: r.to_string(),
                signature: None,
            });
        }
        if let Some(t) = message.get("content").and_then(Value::as_str) {
            if !t.is_empty() {
                blocks.push(Block::Text(t.to_string()));
            }
        }
        for call in message
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            blocks.push(Block::ToolCall {
                id: str_of(call, "/id"),
                name: str_of(call, "/function/name"),
                arguments: call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or("{}")
                    .to_string(),
            });
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            stop = stop_reason(f);
        }
    }
    Ok(Answer {
        id: str_of(v, "/id"),
        model: str_of(v, "/model"),
        blocks,
        stop,
        usage: usage(v),
    })
}

fn str_of(v: &Value, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

pub fn render_answer(a: &Answer) -> Value {
    let mut text: Option<String> = None;
    let mut reasoning: Option<String> = None;
    let mut calls = Vec::new();
    for b in &a.blocks {
        match b {
            Block::Text(t) => text.get_or_insert_with(String::new).push_str(t),
            Block::Thinking { text: t, .. } => {
                reasoning.get_or_insert_with(String::new).push_str(t)
            }
            Block::ToolCall {
                id,
                name,
                arguments,
            } => calls.push(
                json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}),
            ),
        }
    }
    let mut message = json!({"role": "assistant", "content": text});
    if let Some(r) = reasoning {
        message["reasoning_content"] = Value::String(r);
    }
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let mut v = json!({
        "id": chat_id(&a.id),
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": a.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(a.stop)}],
    });
    if let Some(u) = &a.usage {
        v["usage"] = render_usage(u);
    }
    v
}

fn chat_id(id: &str) -> String {
    if id.is_empty() {
        super::new_id(super::Dialect::Chat)
    } else {
        id.to_string()
    }
}

/// One SSE event of a chat stream.
pub fn sse(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

pub fn error_event(code: &str, message: &str) -> Bytes {
    sse(&json!({"error": {"message": message, "type": "upstream_error", "code": code}}).to_string())
}

/// Reads chat chunks: `[DONE]` ends the stream.
#[derive(Debug, Default)]
pub struct ChatDecoder {
    started: bool,
}

impl ChatDecoder {
    pub fn decode(&mut self, data: &str, out: &mut Vec<Delta>) -> Decoded {
        if data.trim() == "[DONE]" {
            return Decoded::End;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            // Not JSON: passed on untouched, read as nothing.
            return Decoded::Event(None);
        };
        if let Some(e) = chunk.get("error").filter(|e| !e.is_null()) {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the upstream reported an error in the stream");
            return Decoded::Error(message.to_string());
        }
        if !self.started {
            self.started = true;
            out.push(Delta::Start {
                id: str_of(&chunk, "/id"),
                model: str_of(&chunk, "/model"),
            });
        }
        for c in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let delta = c.get("delta");
            if let Some(r) = delta
                .and_then(|d| d.get("reasoning_content"))
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty())
            {
                out.push(Delta::Thinking(r.to_string()));
            }
            if let Some(t) = delta
                .and_then(|d| d.get("content"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                out.push(Delta::Text(t.to_string()));
            }
            for call in delta
                .and_then(|d| d.get("tool_calls"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let index = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let name = call.pointer("/function/name").and_then(Value::as_str);
                if call.get("id").is_some_and(|i| !i.is_null()) || name.is_some() {
                    out.push(Delta::ToolStart {
                        index,
                        id: str_of(call, "/id"),
                        name: name.unwrap_or("").to_string(),
                    });
                }
                if let Some(args) = call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .filter(|a| !a.is_empty())
                {
                    out.push(Delta::ToolArgs {
                        index,
                        json: args.to_string(),
                    });
                }
            }
            if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
                out.push(Delta::Stop(stop_reason(f)));
            }
        }
        if let Some(u) = usage(&chunk) {
            out.push(Delta::Usage(u));
        }
        Decoded::Event(Some(chunk))
    }
}

/// Writes chat chunks: the finish when the stop comes, the usage (if the client asked) and
/// `[DONE]` at the end.
#[derive(Debug)]
pub struct ChatEncoder {
    include_usage: bool,
    id: String,
    model: String,
    created: i64,
    started: bool,
    /// The source's tool index → this stream's tool index.
    tools: Vec<usize>,
    usage: Option<TokenUsage>,
}

impl ChatEncoder {
    pub fn new(include_usage: bool) -> Self {
        ChatEncoder {
            include_usage,
            id: String::new(),
            model: String::new(),
            created: chrono::Utc::now().timestamp(),
            started: false,
            tools: Vec::new(),
            usage: None,
        }
    }

    fn chunk(&self, delta: Value, finish: Value) -> Bytes {
        sse(&json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string())
    }

    fn start(&mut self, out: &mut Vec<Bytes>) {
        if !self.started {
            self.started = true;
            if self.id.is_empty() {
                self.id = super::new_id(super::Dialect::Chat);
            }
            out.push(self.chunk(json!({"role": "assistant", "content": ""}), Value::Null));
        }
    }

    fn tool_index(&mut self, source: usize) -> usize {
        match self.tools.iter().position(|s| *s == source) {
            Some(i) => i,
            None => {
                self.tools.push(source);
                self.tools.len() - 1
            }
        }
    }

    pub fn encode(&mut self, delta: &Delta, out: &mut Vec<Bytes>) {
        match delta {
            Delta::Start { id, model } => {
                if !self.started {
                    self.id = chat_id(id);
                    self.model = model.clone();
                }
                self.start(out);
            }
            Delta::Text(t) => {
                self.start(out);
                out.push(self.chunk(json!({"content": t}), Value::Null));
            }
            Delta::Thinking(t) => {
                self.start(out);
                out.push(self.chunk(json!({"reasoning_content": t}), Value::Null));
            }
            Delta::ThinkingSignature(_) => {}
            Delta::ToolStart { index, id, name } => {
                self.start(out);
                let i = self.tool_index(*index);
                out.push(self.chunk(
                    json!({"tool_calls": [{"index": i, "id": id, "type": "function",
                        "function": {"name": name, "arguments": ""}}]}),
                    Value::Null,
                ));
            }
            Delta::ToolArgs { index, json: args } => {
                self.start(out);
                let i = self.tool_index(*index);
                out.push(self.chunk(
                    json!({"tool_calls": [{"index": i, "function": {"arguments": args}}]}),
                    Value::Null,
                ));
            }
            Delta::Stop(stop) => {
                self.start(out);
                out.push(self.chunk(json!({}), json!(finish_reason(*stop))));
            }
            Delta::Usage(u) => self.usage = Some(*u),
        }
    }

    pub fn finish(&mut self, comment: Option<&str>, out: &mut Vec<Bytes>) {
        self.start(out);
        if let (true, Some(u)) = (self.include_usage, &self.usage) {
            out.push(sse(
                &json!({"id": self.id, "object": "chat.completion.chunk",
                "created": self.created, "model": self.model, "choices": [],
                "usage": render_usage(u)})
                .to_string(),
            ));
        }
        if let Some(c) = comment {
            out.push(super::comment(c));
        }
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }
}
