//! Responses streams: events forwarded as they came, decoded into the canonical deltas, or
//! encoded from them (`response.created` … `response.completed`).

use super::*;

pub fn error_event(code: &str, message: &str) -> Bytes {
    let data = json!({"type": "error", "code": code, "message": message, "param": null});
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

/// An upstream's event forwarded as it came (its `event:` line from its `type`).
pub fn forward(data: &str, kind: Option<&str>) -> Bytes {
    super::super::messages::forward(data, kind)
}

/// Reads a Responses stream (the mock's, relayed to a Responses client).
#[derive(Debug, Default)]
pub struct ResponsesDecoder;

impl ResponsesDecoder {
    pub fn decode(&mut self, data: &str, out: &mut Vec<Delta>) -> Decoded {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return Decoded::Event(None);
        };
        let index = v.get("output_index").and_then(Value::as_u64).unwrap_or(0) as usize;
        let s = |v: &Value, p: &str| {
            v.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        match v.get("type").and_then(Value::as_str) {
            Some("response.created") => out.push(Delta::Start {
                id: s(&v, "/response/id"),
                model: s(&v, "/response/model"),
            }),
            Some("response.output_text.delta") => out.push(Delta::Text(s(&v, "/delta"))),
            Some("response.reasoning_summary_text.delta") => {
                out.push(Delta::Thinking(s(&v, "/delta")))
            }
            Some("response.output_item.added")
                if v.pointer("/item/type").and_then(Value::as_str) == Some("function_call") =>
            {
                out.push(Delta::ToolStart {
                    index,
                    id: s(&v, "/item/call_id"),
                    name: s(&v, "/item/name"),
                })
            }
            Some("response.function_call_arguments.delta") => out.push(Delta::ToolArgs {
                index,
                json: s(&v, "/delta"),
            }),
            Some("response.completed" | "response.incomplete") => {
                if let Ok(a) = parse_answer(v.get("response").unwrap_or(&Value::Null)) {
                    out.push(Delta::Stop(a.stop));
                    if let Some(u) = a.usage {
                        out.push(Delta::Usage(u));
                    }
                }
                return Decoded::End;
            }
            Some("response.failed" | "error") => {
                let message = v
                    .pointer("/response/error/message")
                    .or_else(|| v.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("the upstream reported an error in the stream");
                return Decoded::Error(message.to_string());
            }
            _ => {}
        }
        Decoded::Event(Some(v))
    }
}

/// The item being written.
#[derive(Debug)]
pub(super) enum OpenItem {
    Message {
        id: String,
        text: String,
    },
    Reasoning {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        source: usize,
    },
}

/// Writes a Responses stream: `response.created`, an output item per message, reasoning and
/// function call (with their deltas and `done` events), and `response.completed` with the usage.
#[derive(Debug)]
pub struct ResponsesEncoder {
    sequence: u64,
    started: bool,
    id: String,
    model: String,
    created_at: i64,
    open: Option<(OpenItem, usize)>,
    done: Vec<Value>,
    stop: Option<StopReason>,
    usage: Option<TokenUsage>,
}

impl Default for ResponsesEncoder {
    fn default() -> Self {
        ResponsesEncoder {
            sequence: 0,
            started: false,
            id: String::new(),
            model: String::new(),
            created_at: chrono::Utc::now().timestamp(),
            open: None,
            done: Vec::new(),
            stop: None,
            usage: None,
        }
    }
}

impl ResponsesEncoder {
    fn event(&mut self, kind: &str, mut data: Value, out: &mut Vec<Bytes>) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        out.push(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")));
    }

    fn response(
        &self,
        status: &str,
        output: Vec<Value>,
        usage: Option<&TokenUsage>,
        incomplete: Value,
    ) -> Value {
        json!({"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "incomplete_details": incomplete, "error": null, "model": self.model, "output": output,
            "usage": usage.map(render_usage)})
    }

    fn start(&mut self, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        self.id = response_id(&self.id);
        let r = self.response("in_progress", Vec::new(), None, Value::Null);
        self.event("response.created", json!({"response": r}), out);
        let r = self.response("in_progress", Vec::new(), None, Value::Null);
        self.event("response.in_progress", json!({"response": r}), out);
    }

    fn item_id(&self, prefix: &str) -> String {
        format!("{prefix}_{}_{}", suffix(&self.id), self.done.len() + 1)
    }

    fn close(&mut self, out: &mut Vec<Bytes>) {
        let Some((item, index)) = self.open.take() else {
            return;
        };
        let done = match item {
            OpenItem::Message { id, text } => {
                let base = json!({"item_id": id, "output_index": index, "content_index": 0});
                let mut d = base.clone();
                d["text"] = json!(text);
                self.event("response.output_text.done", d, out);
                let mut d = base;
                d["part"] = json!({"type": "output_text", "text": text, "annotations": []});
                self.event("response.content_part.done", d, out);
                json!({"type": "message", "id": id, "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]})
            }
            OpenItem::Reasoning { id, text } => {
                json!({"type": "reasoning", "id": id, "summary": [{"type": "summary_text", "text": text}]})
            }
            OpenItem::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } => {
                self.event(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "arguments": arguments}),
                    out,
                );
                json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
                    "arguments": arguments, "status": "completed"})
            }
        };
        self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": done.clone()}),
            out,
        );
        self.done.push(done);
    }

    fn open(&mut self, item: OpenItem, out: &mut Vec<Bytes>) {
        self.close(out);
        let index = self.done.len();
        let added = match &item {
            OpenItem::Message { id, .. } => {
                json!({"type": "message", "id": id, "status": "in_progress",
                "role": "assistant", "content": []})
            }
            OpenItem::Reasoning { id, .. } => json!({"type": "reasoning", "id": id, "summary": []}),
            OpenItem::Call {
                id, call_id, name, ..
            } => json!({"type": "function_call", "id": id,
                "call_id": call_id, "name": name, "arguments": "", "status": "in_progress"}),
        };
        self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": added}),
            out,
        );
        if let OpenItem::Message { id, .. } = &item {
            let id = id.clone();
            self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []}}),
                out,
            );
        }
        self.open = Some((item, index));
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
                self.start(out);
                if !matches!(self.open, Some((OpenItem::Message { .. }, _))) {
                    let id = self.item_id("msg");
                    self.open(
                        OpenItem::Message {
                            id,
                            text: String::new(),
                        },
                        out,
                    );
                }
                if let Some((OpenItem::Message { id, text }, index)) = &mut self.open {
                    text.push_str(t);
                    let data = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": t});
                    self.event("response.output_text.delta", data, out);
                }
            }
            Delta::Thinking(t) => {
                self.start(out);
                if !matches!(self.open, Some((OpenItem::Reasoning { .. }, _))) {
                    let id = self.item_id("rs");
                    self.open(
                        OpenItem::Reasoning {
                            id,
                            text: String::new(),
                        },
                        out,
                    );
                }
                if let Some((OpenItem::Reasoning { id, text }, index)) = &mut self.open {
                    text.push_str(t);
                    let data = json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": t});
                    self.event("response.reasoning_summary_text.delta", data, out);
                }
            }
            Delta::ThinkingSignature(_) => {}
            Delta::ToolStart { index, id, name } => {
                self.start(out);
                let item_id = self.item_id("fc");
                self.open(
                    OpenItem::Call {
                        id: item_id,
                        call_id: call_id(id),
                        name: name.clone(),
                        arguments: String::new(),
                        source: *index,
                    },
                    out,
                );
            }
            Delta::ToolArgs { index, json: args } => {
                self.start(out);
                let open_here = matches!(&self.open, Some((OpenItem::Call { source, .. }, _)) if source == index);
                if !open_here {
                    let item_id = self.item_id("fc");
                    self.open(
                        OpenItem::Call {
                            id: item_id,
                            call_id: call_id(""),
                            name: String::new(),
                            arguments: String::new(),
                            source: *index,
                        },
                        out,
                    );
                }
                if let Some((OpenItem::Call { id, arguments, .. }, output_index)) = &mut self.open {
                    arguments.push_str(args);
                    let data = json!({"item_id": id, "output_index": output_index, "delta": args});
                    self.event("response.function_call_arguments.delta", data, out);
                }
            }
            Delta::Stop(s) => self.stop = Some(*s),
            Delta::Usage(u) => self.usage = Some(*u),
        }
    }

    pub fn finish(&mut self, comment: Option<&str>, out: &mut Vec<Bytes>) {
        self.start(out);
        self.close(out);
        let (status, incomplete) = status_of(self.stop.unwrap_or_default());
        let usage = self.usage.unwrap_or_default();
        let r = self.response(status, self.done.clone(), Some(&usage), incomplete);
        if let Some(c) = comment {
            out.push(super::super::comment(c));
        }
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.event(kind, json!({"response": r}), out);
    }
}
