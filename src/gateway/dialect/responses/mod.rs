//! OpenAI Responses (`/v1/responses`, what Codex speaks): requests checked and translated to chat,
//! answers parsed and rendered, streams (`response.created` … `response.completed`) decoded and
//! encoded. hypertool keeps no responses: `previous_response_id` is refused, and a client sends its
//! whole conversation each time (Codex does, with `store: false`).

use axum::body::Bytes;
use serde_json::{json, Map, Value};

use super::{
    bad, orphan_result, unknown_type, Answer, Block, Decoded, Delta, StopReason, TokenUsage,
    Untranslatable,
};
use crate::web::error::ApiError;

mod stream;

pub use stream::*;

/// Input item types hypertool reads or passes on; anything else is refused with the list.
pub const KNOWN_ITEMS: [&str; 12] = [
    "message",
    "function_call",
    "function_call_output",
    "reasoning",
    "custom_tool_call",
    "custom_tool_call_output",
    "local_shell_call",
    "local_shell_call_output",
    "web_search_call",
    "file_search_call",
    "computer_call",
    "computer_call_output",
];

/// The type of an input item (a bare `{role, content}` is a message).
fn item_type(item: &Value) -> Option<&str> {
    match item.get("type").and_then(Value::as_str) {
        Some(t) => Some(t),
        None if item.get("role").is_some() => Some("message"),
        None => None,
    }
}

/// Checks a Responses request: `input` (a string or items of known types, each call's output after
/// the call), no `previous_response_id`, tools with names.
pub fn check_request(body: &Map<String, Value>) -> Result<(), ApiError> {
    if body
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err(bad(
            "previous_response_not_stored",
            "previous_response_id".into(),
            "hypertool does not store responses, so it cannot continue one by id; send the whole conversation in `input` (with `store: false`, as Codex does)".into(),
        ));
    }
    let items = match body.get("input") {
        Some(Value::String(_)) => return check_tools(body),
        Some(Value::Array(items)) if !items.is_empty() => items,
        _ => {
            return Err(bad(
                "missing_input",
                "input".into(),
                "`input` is required: a string, or an array of input items".into(),
            ))
        }
    };
    let mut calls: Vec<&str> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let Some(kind) = item_type(item) else {
            return Err(bad(
                "invalid_input",
                at.clone(),
                format!("`{at}` must be an object with a `type` or a `role`"),
            ));
        };
        if !KNOWN_ITEMS.contains(&kind) {
            return Err(unknown_type(&at, kind, &KNOWN_ITEMS));
        }
        match kind {
            "message" => {
                if !matches!(
                    item.get("role").and_then(Value::as_str),
                    Some("user" | "assistant" | "system" | "developer")
                ) {
                    return Err(bad(
                        "invalid_role",
                        format!("{at}.role"),
                        format!("`{at}.role` must be user, assistant, system or developer"),
                    ));
                }
                match item.get("content") {
                    Some(Value::String(_)) => {}
                    Some(Value::Array(parts)) => {
                        for (j, p) in parts.iter().enumerate() {
                            if !p.get("type").is_some_and(Value::is_string) {
                                let at = format!("{at}.content[{j}]");
                                return Err(bad(
                                    "invalid_content",
                                    at.clone(),
                                    format!("`{at}` must be an object with a string `type`"),
                                ));
                            }
                        }
                    }
                    _ => {
                        return Err(bad(
                            "invalid_content",
                            format!("{at}.content"),
                            format!("`{at}.content` must be a string or an array of parts"),
                        ))
                    }
                }
            }
            "function_call" | "custom_tool_call" | "local_shell_call" => {
                match item.get("call_id").and_then(Value::as_str) {
                    Some(id) => calls.push(id),
                    None => {
                        return Err(bad(
                            "invalid_input",
                            format!("{at}.call_id"),
                            format!("`{at}` needs a `call_id` (a string)"),
                        ))
                    }
                }
            }
            "function_call_output" | "custom_tool_call_output" | "local_shell_call_output" => {
                let id = item.get("call_id").and_then(Value::as_str).unwrap_or("");
                if !calls.contains(&id) {
                    return Err(orphan_result(&at, "call_id", id));
                }
            }
            _ => {}
        }
    }
    check_tools(body)
}

fn check_tools(body: &Map<String, Value>) -> Result<(), ApiError> {
    let Some(tools) = body.get("tools") else {
        return Ok(());
    };
    let Some(tools) = tools.as_array() else {
        return Err(bad(
            "invalid_tools",
            "tools".into(),
            "`tools` must be an array".into(),
        ));
    };
    for (i, t) in tools.iter().enumerate() {
        if !t.get("type").is_some_and(Value::is_string) {
            return Err(bad(
                "invalid_tools",
                format!("tools[{i}].type"),
                format!("`tools[{i}]` needs a `type` (\"function\", …)"),
            ));
        }
        if t.get("type").and_then(Value::as_str) == Some("function")
            && !t.get("name").is_some_and(Value::is_string)
        {
            return Err(bad(
                "invalid_tools",
                format!("tools[{i}].name"),
                format!("`tools[{i}]` is a function and needs a `name`"),
            ));
        }
    }
    Ok(())
}

fn output_text(output: Option<&Value>) -> String {
    match output {
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Array(_)) => super::content_text(v),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

/// The prompt as chat-shaped messages with string content, for counting and the mock.
pub fn prompt_for_count(body: &Map<String, Value>) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(s) = body.get("instructions").and_then(Value::as_str) {
        out.push(json!({"role": "system", "content": s}));
    }
    match body.get("input") {
        Some(Value::String(s)) => out.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for item in items {
                match item_type(item) {
                    Some("message") => out.push(json!({
                        "role": item.get("role").cloned().unwrap_or(json!("user")),
                        "content": item.get("content").map(super::content_text).unwrap_or_default(),
                    })),
                    Some("function_call" | "custom_tool_call") => out.push(json!({
                        "role": "assistant",
                        "content": format!(
                            "{} {}",
                            item.get("name").and_then(Value::as_str).unwrap_or(""),
                            item.get("arguments").or_else(|| item.get("input")).and_then(Value::as_str).unwrap_or("")
                        ),
                    })),
                    Some("function_call_output" | "custom_tool_call_output" | "local_shell_call_output") => {
                        out.push(json!({"role": "tool", "content": output_text(item.get("output"))}))
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    out
}

/// A content part of a Responses message as a chat part.
fn part_to_chat(p: &Value, at: &str) -> Result<Value, Untranslatable> {
    match p.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text" | "text") => {
            Ok(json!({"type": "text", "text": p.get("text").cloned().unwrap_or(json!(""))}))
        }
        Some("input_image") => match p.get("image_url").and_then(Value::as_str) {
            Some(url) => Ok(json!({"type": "image_url", "image_url": {"url": url}})),
            None => Err(Untranslatable(format!(
                "`{at}`: only images sent by URL or data URL can go to a chat model"
            ))),
        },
        Some("input_file") => match p.get("file_data").and_then(Value::as_str) {
            Some(data) => Ok(json!({"type": "file", "file": {"file_data": data,
                "filename": p.get("filename").cloned().unwrap_or(json!("file"))}})),
            None => Err(Untranslatable(format!(
                "`{at}`: only files sent inline (file_data) can go to a chat model"
            ))),
        },
        other => Err(Untranslatable(format!(
            "`{at}` is a `{}` part, which a chat model cannot take",
            other.unwrap_or("untyped")
        ))),
    }
}

/// A Responses request as a chat request (the model not set).
pub fn to_chat(body: &Map<String, Value>) -> Result<Map<String, Value>, Untranslatable> {
    let mut out = Map::new();
    for field in [
        "stream",
        "temperature",
        "top_p",
        "parallel_tool_calls",
        "user",
    ] {
        if let Some(v) = body.get(field) {
            out.insert(field.into(), v.clone());
        }
    }
    if let Some(v) = body.get("max_output_tokens") {
        out.insert("max_completion_tokens".into(), v.clone());
    }
    if let Some(effort) = body.get("reasoning").and_then(|r| r.get("effort")) {
        out.insert("reasoning_effort".into(), effort.clone());
    }
    let mut messages = Vec::new();
    if let Some(s) = body.get("instructions").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": s}));
    }
    match body.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = format!("input[{i}]");
                match item_type(item) {
                    Some("message") => {
                        let role = match item.get("role").and_then(Value::as_str) {
                            Some("developer") => "system",
                            Some(r) => r,
                            None => "user",
                        };
                        let content = match item.get("content") {
                            Some(Value::Array(parts)) if role == "user" => Value::Array(
                                parts
                                    .iter()
                                    .enumerate()
                                    .map(|(j, p)| part_to_chat(p, &format!("{at}.content[{j}]")))
                                    .collect::<Result<Vec<_>, _>>()?,
                            ),
                            Some(c) => Value::String(super::content_text(c)),
                            None => Value::String(String::new()),
                        };
                        messages.push(json!({"role": role, "content": content}));
                    }
                    Some(kind @ ("function_call" | "custom_tool_call")) => {
                        let arguments = if kind == "function_call" {
                            item.get("arguments")
                                .and_then(Value::as_str)
                                .unwrap_or("{}")
                                .to_string()
                        } else {
                            json!({"input": item.get("input").and_then(Value::as_str).unwrap_or("")}).to_string()
                        };
                        let call = json!({"id": item.get("call_id"), "type": "function",
                            "function": {"name": item.get("name"), "arguments": arguments}});
                        // Calls one after the other are one assistant turn.
                        match messages.last_mut() {
                            Some(last)
                                if last["role"] == "assistant"
                                    && last.get("tool_calls").is_some() =>
                            {
                                if let Some(Value::Array(calls)) = last.get_mut("tool_calls") {
                                    calls.push(call);
                                }
                            }
                            _ => messages.push(
                                json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                            ),
                        }
                    }
                    Some("function_call_output" | "custom_tool_call_output") => {
                        messages.push(json!({
                            "role": "tool", "tool_call_id": item.get("call_id"),
                            "content": output_text(item.get("output")),
                        }))
                    }
                    // The model's reasoning is not sent back to a chat model.
                    Some("reasoning") => {}
                    Some(other) => {
                        return Err(Untranslatable(format!(
                            "`{at}` is a `{other}` item, which a chat model cannot take"
                        )))
                    }
                    None => {}
                }
            }
        }
        _ => {}
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let mut chat_tools = Vec::new();
        for t in tools {
            match t.get("type").and_then(Value::as_str) {
                Some("function") => {
                    let mut f = json!({"name": t.get("name"),
                        "parameters": t.get("parameters").cloned().unwrap_or(json!({"type": "object"}))});
                    if let Some(d) = t.get("description") {
                        f["description"] = d.clone();
                    }
                    chat_tools.push(json!({"type": "function", "function": f}));
                }
                // A free-form tool takes its text as one string argument.
                Some("custom") => {
                    let mut f = json!({"name": t.get("name"), "parameters": {"type": "object",
                        "properties": {"input": {"type": "string"}}, "required": ["input"]}});
                    if let Some(d) = t.get("description") {
                        f["description"] = d.clone();
                    }
                    chat_tools.push(json!({"type": "function", "function": f}));
                }
                // Hosted tools (web_search, file_search, code_interpreter, …) and tool
                // namespaces run only at OpenAI: another model is offered the rest.
                _ => {}
            }
        }
        out.insert("tools".into(), Value::Array(chat_tools));
    }
    if let Some(choice) = body.get("tool_choice") {
        let chat_choice = match choice {
            Value::String(s) => json!(s),
            Value::Object(o) => match o.get("name") {
                Some(n) => json!({"type": "function", "function": {"name": n}}),
                None => json!("auto"),
            },
            _ => json!("auto"),
        };
        out.insert("tool_choice".into(), chat_choice);
    }
    Ok(out)
}

fn render_usage(u: &TokenUsage) -> Value {
    json!({
        "input_tokens": u.input,
        "input_tokens_details": {"cached_tokens": u.cache_read},
        "output_tokens": u.output,
        "output_tokens_details": {"reasoning_tokens": u.reasoning},
        "total_tokens": u.input + u.output,
    })
}

fn read_usage(u: &Value) -> Option<TokenUsage> {
    Some(TokenUsage {
        input: u.get("input_tokens")?.as_u64()?,
        output: u.get("output_tokens")?.as_u64()?,
        cache_read: u
            .pointer("/input_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        cache_write: 0,
        reasoning: u
            .pointer("/output_tokens_details/reasoning_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

fn suffix(id: &str) -> &str {
    id.split_once('_').map_or(id, |(_, rest)| rest)
}

fn response_id(id: &str) -> String {
    if id.starts_with("resp_") {
        id.to_string()
    } else {
        format!("resp_{}", suffix(&super::new_id(super::Dialect::Messages)))
    }
}

fn call_id(id: &str) -> String {
    if id.is_empty() {
        format!("call_{}", suffix(&super::new_id(super::Dialect::Messages)))
    } else {
        id.to_string()
    }
}

fn status_of(stop: StopReason) -> (&'static str, Value) {
    match stop {
        StopReason::MaxTokens => ("incomplete", json!({"reason": "max_output_tokens"})),
        StopReason::Refusal => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// The output items of an answer.
fn output_items(a: &Answer, rid: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut n = 0;
    for b in &a.blocks {
        n += 1;
        match b {
            Block::Thinking { text, .. } => items.push(json!({"type": "reasoning", "id": format!("rs_{rid}_{n}"),
                "summary": [{"type": "summary_text", "text": text}]})),
            Block::Text(t) => items.push(json!({"type": "message", "id": format!("msg_{rid}_{n}"), "status": "completed",
                "role": "assistant", "content": [{"type": "output_text", "text": t, "annotations": []}]})),
            Block::ToolCall {
                id,
                name,
                arguments,
            } => items.push(json!({"type": "function_call", "id": format!("fc_{rid}_{n}"), "call_id": call_id(id),
                "name": name, "arguments": arguments, "status": "completed"})),
        }
    }
    items
}

pub fn render_answer(a: &Answer) -> Value {
    let id = response_id(&a.id);
    let output = output_items(a, suffix(&id));
    let (status, incomplete) = status_of(a.stop);
    json!({
        "id": id, "object": "response", "created_at": chrono::Utc::now().timestamp(),
        "status": status, "incomplete_details": incomplete, "error": null,
        "model": a.model, "output": output,
        "usage": render_usage(&a.usage.unwrap_or_default()),
    })
}

pub fn parse_answer(v: &Value) -> Result<Answer, String> {
    let output = v
        .get("output")
        .and_then(Value::as_array)
        .ok_or("no `output` array")?;
    let s = |v: &Value, f: &str| v.get(f).and_then(Value::as_str).unwrap_or("").to_string();
    let mut blocks = Vec::new();
    for item in output {
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                let text = item
                    .get("content")
                    .map(super::content_text)
                    .unwrap_or_default();
                blocks.push(Block::Text(text));
            }
            Some("function_call") => blocks.push(Block::ToolCall {
                id: s(item, "call_id"),
                name: s(item, "name"),
                arguments: s(item, "arguments"),
            }),
            Some("reasoning") => blocks.push(Block::Thinking {
                text: item
                    .get("summary")
                    .map(super::content_text)
                    .unwrap_or_default(),
                signature: None,
            }),
            _ => {}
        }
    }
    let stop = if blocks.iter().any(|b| matches!(b, Block::ToolCall { .. })) {
        StopReason::ToolUse
    } else if v
        .pointer("/incomplete_details/reason")
        .and_then(Value::as_str)
        == Some("max_output_tokens")
    {
        StopReason::MaxTokens
    } else {
        StopReason::EndTurn
    };
    Ok(Answer {
        id: s(v, "id"),
        model: s(v, "model"),
        blocks,
        stop,
        usage: v.get("usage").and_then(read_usage),
    })
}
