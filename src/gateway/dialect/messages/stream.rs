//! Messages streams: events forwarded as they came, decoded into the canonical deltas, or
//! encoded from them (`message_start` … `message_stop`).

use super::*;

/// One event of a Messages stream (`event:` and `data:`).
pub fn event(kind: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// An upstream's event forwarded as it came (its `event:` line from its `type`).
pub fn forward(data: &str, kind: Option<&str>) -> Bytes {
    match kind {
        Some(k) => Bytes::from(format!("event: {k}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

pub fn error_event(code: &str, message: &str) -> Bytes {
    let kind = if code == "upstream_timeout" || code == "overloaded" {
        "overloaded_error"
    } else {
        "api_error"
    };
    event(
        "error",
        &json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

/// Reads an Anthropic stream's events.
#[derive(Debug, Default)]
pub struct MessagesDecoder {
    usage: TokenUsage,
}

impl MessagesDecoder {
    pub fn decode(&mut self, data: &str, out: &mut Vec<Delta>) -> Decoded {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return Decoded::Event(None);
        };
        let s = |v: &Value, p: &str| {
            v.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let index = v.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                out.push(Delta::Start {
                    id: s(&v, "/message/id"),
                    model: s(&v, "/message/model"),
                });
                if let Some(u) = v.pointer("/message/usage") {
                    if read_usage(u, &mut self.usage) {
                        out.push(Delta::Usage(self.usage));
                    }
                }
            }
            Some("content_block_start") => {
                let block = v.get("content_block").cloned().unwrap_or(Value::Null);
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => out.push(Delta::ToolStart {
                        index,
                        id: s(&block, "/id"),
                        name: s(&block, "/name"),
                    }),
                    Some("text") => {
                        let t = s(&block, "/text");
                        if !t.is_empty() {
                            out.push(Delta::Text(t));
                        }
                    }
                    Some("thinking") => {
                        let t = s(&block, "/thinking");
                        if !t.is_empty() {
                            out.push(Delta::Thinking(t));
                        }
                    }
                    _ => {}
                }
            }
            Some("content_block_delta") => {
                let d = v.get("delta").cloned().unwrap_or(Value::Null);
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => out.push(Delta::Text(s(&d, "/text"))),
                    Some("input_json_delta") => out.push(Delta::ToolArgs {
                        index,
                        json: s(&d, "/partial_json"),
                    }),
                    Some("thinking_delta") => out.push(Delta::Thinking(s(&d, "/thinking"))),
                    Some("signature_delta") => {
                        out.push(Delta::ThinkingSignature(s(&d, "/signature")))
                    }
                    _ => {}
                }
            }
            Some("message_delta") => {
                if let Some(r) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    out.push(Delta::Stop(stop_reason(r)));
                }
                if let Some(u) = v.get("usage") {
                    if read_usage(u, &mut self.usage) {
                        out.push(Delta::Usage(self.usage));
                    }
                }
            }
            Some("message_stop") => return Decoded::End,
            Some("error") => {
                return Decoded::Error(
                    v.pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("the upstream reported an error in the stream")
                        .to_string(),
                )
            }
            _ => {}
        }
        Decoded::Event(Some(v))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Open {
    Text,
    Thinking,
    /// A tool call, by the source's index.
    Tool(usize),
}

/// Writes a Messages stream: `message_start` (and a `ping`), a content block per text, thinking
/// and tool call, and at the end `message_delta` with the stop and usage, then `message_stop`.
#[derive(Debug)]
pub struct MessagesEncoder {
    prompt_estimate: u64,
    started: bool,
    /// The open block and its index in this stream.
    open: Option<(Open, usize)>,
    next_index: usize,
    /// Tool blocks by the source's index → this stream's index.
    tools: Vec<(usize, usize)>,
    stop: Option<StopReason>,
    usage: Option<TokenUsage>,
    id: String,
    model: String,
}

impl MessagesEncoder {
    pub fn new(prompt_estimate: u64) -> Self {
        MessagesEncoder {
            prompt_estimate,
            started: false,
            open: None,
            next_index: 0,
            tools: Vec::new(),
            stop: None,
            usage: None,
            id: String::new(),
            model: String::new(),
        }
    }

    fn start(&mut self, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        let usage = self.usage.unwrap_or(TokenUsage {
            input: self.prompt_estimate,
            ..Default::default()
        });
        let mut u = render_usage(&usage);
        u["output_tokens"] = json!(0);
        out.push(event(
            "message_start",
            &json!({"type": "message_start", "message": {"id": message_id(&self.id), "type": "message",
                "role": "assistant", "model": self.model, "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": u}}),
        ));
        out.push(event("ping", &json!({"type": "ping"})));
    }

    fn close(&mut self, out: &mut Vec<Bytes>) {
        if let Some((_, index)) = self.open.take() {
            out.push(event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    /// Opens a block of `kind` unless it is the open one; returns its index.
    fn open(&mut self, kind: Open, block: Value, out: &mut Vec<Bytes>) -> usize {
        self.start(out);
        if let Some((open, index)) = self.open {
            if open == kind {
                return index;
            }
        }
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((kind, index));
        out.push(event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    fn delta(index: usize, delta: Value) -> Bytes {
        event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        )
    }

    pub fn encode(&mut self, delta: &Delta, out: &mut Vec<Bytes>) {
        match delta {
            Delta::Start { id, model } => {
                if !self.started {
                    self.id = id.clone();
                    self.model = model.clone();
                }
                self.start(out);
            }
            Delta::Text(t) => {
                let i = self.open(Open::Text, json!({"type": "text", "text": ""}), out);
                out.push(Self::delta(i, json!({"type": "text_delta", "text": t})));
            }
            Delta::Thinking(t) => {
                let i = self.open(
                    Open::Thinking,
                    json!({"type": "thinking", "thinking": ""}),
                    out,
                );
                out.push(Self::delta(
                    i,
                    json!({"type": "thinking_delta", "thinking": t}),
                ));
            }
            Delta::ThinkingSignature(s) => {
                if let Some((Open::Thinking, i)) = self.open {
                    out.push(Self::delta(
                        i,
                        json!({"type": "signature_delta", "signature": s}),
                    ));
                }
            }
            Delta::ToolStart { index, id, name } => {
                let i = self.open(
                    Open::Tool(*index),
                    json!({"type": "tool_use", "id": tool_id(id), "name": name, "input": {}}),
                    out,
                );
                self.tools.push((*index, i));
            }
            Delta::ToolArgs { index, json: args } => {
                let i = match self.tools.iter().find(|(s, _)| s == index) {
                    Some((_, i)) => *i,
                    // Arguments before the call's start: open it without a name.
                    None => {
                        let i = self.open(
                            Open::Tool(*index),
                            json!({"type": "tool_use", "id": tool_id(""), "name": "", "input": {}}),
                            out,
                        );
                        self.tools.push((*index, i));
                        i
                    }
                };
                out.push(Self::delta(
                    i,
                    json!({"type": "input_json_delta", "partial_json": args}),
                ));
            }
            Delta::Stop(s) => self.stop = Some(*s),
            Delta::Usage(u) => self.usage = Some(*u),
        }
    }

    pub fn finish(&mut self, comment: Option<&str>, out: &mut Vec<Bytes>) {
        self.start(out);
        self.close(out);
        let usage = self.usage.unwrap_or_default();
        out.push(event(
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_name(self.stop.unwrap_or_default()), "stop_sequence": null},
                "usage": render_usage(&usage)}),
        ));
        if let Some(c) = comment {
            out.push(super::super::comment(c));
        }
        out.push(event("message_stop", &json!({"type": "message_stop"})));
    }
}
