//! Anthropic Messages: requests checked and translated to and from chat, answers parsed and
//! rendered, streams (`message_start` … `message_stop`) decoded and encoded.

use axum::body::Bytes;
use serde_json::{json, Map, Value};

use super::{
    bad, content_text, orphan_result, unknown_type, Answer, Block, Decoded, Delta, StopReason,
    TokenUsage, Untranslatable,
};
use crate::web::error::ApiError;

/// `max_tokens` of a Messages request translated from a chat request that set none (Anthropic
/// requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The `anthropic-version` sent to an Anthropic upstream when the client did not send one.
pub const DEFAULT_VERSION: &str = "2023-06-01";

/// Content block types hypertool reads or passes on. Anything else is refused at the door with
/// the list, rather than sent where it cannot be understood.
pub const KNOWN_BLOCKS: [&str; 16] = [
    "text",
    "image",
    "document",
    "search_result",
    "tool_use",
    "tool_result",
    "thinking",
    "redacted_thinking",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "mcp_tool_use",
    "mcp_tool_result",
];

/// Checks a Messages request's shape: the messages, their roles and content blocks, each
/// `tool_result` after the `tool_use` it answers, the system prompt and tools. The first problem
/// is named (with where it is); unknown top-level fields are left alone.
pub fn check_request(body: &Map<String, Value>) -> Result<(), ApiError> {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return Err(bad(
            "missing_messages",
            "messages".into(),
            "`messages` is required: an array of {role, content}".into(),
        ));
    };
    if messages.is_empty() {
        return Err(bad(
            "missing_messages",
            "messages".into(),
            "`messages` must hold at least one message".into(),
        ));
    }
    match body.get("system") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(blocks)) => {
            for (i, b) in blocks.iter().enumerate() {
                if b.get("type").and_then(Value::as_str) != Some("text")
                    || !b.get("text").is_some_and(Value::is_string)
                {
                    return Err(bad(
                        "invalid_system",
                        format!("system[{i}]"),
                        format!("`system[{i}]` must be a text block: {{\"type\": \"text\", \"text\": \"…\"}}"),
                    ));
                }
            }
        }
        Some(_) => {
            return Err(bad(
                "invalid_system",
                "system".into(),
                "`system` must be a string or an array of text blocks".into(),
            ))
        }
    }
    let mut tool_uses: Vec<&str> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        // `system` messages inside the conversation are Anthropic's (Claude Code sends them).
        if !matches!(role, Some("user" | "assistant" | "system")) {
            return Err(bad(
                "invalid_role",
                format!("messages[{i}].role"),
                format!("`messages[{i}].role` must be \"user\", \"assistant\" or \"system\""),
            ));
        }
        let blocks = match m.get("content") {
            Some(Value::String(_)) => continue,
            Some(Value::Array(blocks)) => blocks,
            _ => {
                return Err(bad(
                    "invalid_content",
                    format!("messages[{i}].content"),
                    format!(
                        "`messages[{i}].content` must be a string or an array of content blocks"
                    ),
                ))
            }
        };
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("messages[{i}].content[{j}]");
            let Some(kind) = b.get("type").and_then(Value::as_str) else {
                return Err(bad(
                    "invalid_content",
                    at.clone(),
                    format!("`{at}` must be an object with a string `type`"),
                ));
            };
            if !KNOWN_BLOCKS.contains(&kind) {
                return Err(unknown_type(&at, kind, &KNOWN_BLOCKS));
            }
            let field_ok = |f: &str, check: fn(&Value) -> bool| b.get(f).is_some_and(check);
            let problem = match kind {
                "text" if !field_ok("text", Value::is_string) => {
                    Some("a text block needs `text` (a string)")
                }
                "image" | "document" if !field_ok("source", Value::is_object) => {
                    Some("an image or document block needs a `source` object")
                }
                "tool_use"
                    if !(field_ok("id", Value::is_string)
                        && field_ok("name", Value::is_string)
                        && field_ok("input", Value::is_object)) =>
                {
                    Some("a tool_use block needs `id`, `name` (strings) and `input` (an object)")
                }
                "tool_result" if !field_ok("tool_use_id", Value::is_string) => {
                    Some("a tool_result block needs `tool_use_id` (a string)")
                }
                "thinking" if !field_ok("thinking", Value::is_string) => {
                    Some("a thinking block needs `thinking` (a string)")
                }
                _ => None,
            };
            if let Some(p) = problem {
                return Err(bad("invalid_content", at.clone(), format!("`{at}`: {p}")));
            }
            match kind {
                "tool_use" if role == Some("assistant") => {
                    tool_uses.extend(b.get("id").and_then(Value::as_str));
                }
                "tool_result" => {
                    let id = b.get("tool_use_id").and_then(Value::as_str).unwrap_or("");
                    if !tool_uses.contains(&id) {
                        return Err(orphan_result(&at, "tool_use_id", id));
                    }
                }
                _ => {}
            }
        }
    }
    if let Some(tools) = body.get("tools") {
        let Some(tools) = tools.as_array() else {
            return Err(bad(
                "invalid_tools",
                "tools".into(),
                "`tools` must be an array".into(),
            ));
        };
        for (i, t) in tools.iter().enumerate() {
            if !t.get("name").is_some_and(Value::is_string) {
                return Err(bad(
                    "invalid_tools",
                    format!("tools[{i}].name"),
                    format!("`tools[{i}]` needs a `name` (a string)"),
                ));
            }
        }
    }
    Ok(())
}

/// The system prompt's text.
fn system_text(body: &Map<String, Value>) -> Option<String> {
    match body.get("system")? {
        Value::String(s) => Some(s.clone()),
        v @ Value::Array(_) => Some(content_text(v)),
        _ => None,
    }
}

/// The text of a block as counted: a tool call's name and input, a result's content.
fn block_text(b: &Value) -> String {
    match b.get("type").and_then(Value::as_str) {
        Some("tool_use") => format!(
            "{} {}",
            b.get("name").and_then(Value::as_str).unwrap_or(""),
            b.get("input").map(Value::to_string).unwrap_or_default()
        ),
        Some("tool_result") => b.get("content").map(content_text).unwrap_or_default(),
        Some("thinking") => b
            .get("thinking")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        _ => b
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    }
}

/// The prompt as chat-shaped messages with string content, for counting and the mock.
pub fn prompt_for_count(body: &Map<String, Value>) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(s) = system_text(body) {
        out.push(json!({"role": "system", "content": s}));
    }
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = m.get("role").cloned().unwrap_or(Value::Null);
        let text = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(blocks)) => blocks
                .iter()
                .map(block_text)
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        };
        out.push(json!({"role": role, "content": text}));
    }
    out
}

fn untranslatable(what: String) -> Untranslatable {
    Untranslatable(what)
}

/// An image or document block as a chat content part.
fn media_to_chat(b: &Value, at: &str) -> Result<Value, Untranslatable> {
    let source = b.get("source").cloned().unwrap_or(Value::Null);
    let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
    let media = source
        .get("media_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let data = source.get("data").and_then(Value::as_str).unwrap_or("");
            let url = format!("data:{media};base64,{data}");
            Ok(if kind == "image" {
                json!({"type": "image_url", "image_url": {"url": url}})
            } else {
                json!({"type": "file", "file": {"file_data": url, "filename": "document.pdf"}})
            })
        }
        Some("url") if kind == "image" => Ok(
            json!({"type": "image_url", "image_url": {"url": source.get("url").cloned().unwrap_or(Value::Null)}}),
        ),
        Some("text") => Ok(
            json!({"type": "text", "text": source.get("data").and_then(Value::as_str).unwrap_or("")}),
        ),
        _ => Err(untranslatable(format!(
            "`{at}`: a {kind} source of this type cannot be sent to an OpenAI-compatible model"
        ))),
    }
}

/// A Messages request as a chat request (the model not set).
pub fn to_chat(body: &Map<String, Value>) -> Result<Map<String, Value>, Untranslatable> {
    let mut out = Map::new();
    for field in ["stream", "temperature", "top_p"] {
        if let Some(v) = body.get(field) {
            out.insert(field.into(), v.clone());
        }
    }
    if let Some(v) = body.get("max_tokens") {
        out.insert("max_tokens".into(), v.clone());
    }
    if let Some(v) = body.get("stop_sequences") {
        out.insert("stop".into(), v.clone());
    }
    if let Some(u) = body.get("metadata").and_then(|m| m.get("user_id")) {
        out.insert("user".into(), u.clone());
    }
    let mut messages = Vec::new();
    if let Some(s) = system_text(body) {
        messages.push(json!({"role": "system", "content": s}));
    }
    for (i, m) in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let blocks = match m.get("content") {
            Some(Value::String(s)) => {
                messages.push(json!({"role": role, "content": s}));
                continue;
            }
            Some(Value::Array(b)) => b,
            _ => continue,
        };
        if role == "system" {
            messages.push(
                json!({"role": "system", "content": content_text(&Value::Array(blocks.clone()))}),
            );
            continue;
        }
        if role == "assistant" {
            let mut text = String::new();
            let mut calls = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                    Some("tool_use") => calls.push(json!({
                        "id": b.get("id"), "type": "function",
                        "function": {"name": b.get("name"), "arguments": b.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into())}
                    })),
                    // The model's reasoning is not sent back to a chat model.
                    Some("thinking" | "redacted_thinking") => {}
                    Some(other) => {
                        return Err(untranslatable(format!(
                            "`messages[{i}].content[{j}]` is a `{other}` block, which an OpenAI-compatible model cannot take"
                        )))
                    }
                    None => {}
                }
            }
            let mut msg = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            messages.push(msg);
            continue;
        }
        // A user message: tool results first (chat wants them right after the call), then the rest.
        let mut parts = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("messages[{i}].content[{j}]");
            match b.get("type").and_then(Value::as_str) {
                Some("tool_result") => {
                    let mut content = b.get("content").map(content_text).unwrap_or_default();
                    if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                        content = format!("Error: {content}");
                    }
                    messages.push(json!({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": content}));
                }
                Some("text") => parts.push(json!({"type": "text", "text": b.get("text")})),
                Some("image" | "document") => parts.push(media_to_chat(b, &at)?),
                Some(other) => {
                    return Err(untranslatable(format!(
                        "`{at}` is a `{other}` block, which an OpenAI-compatible model cannot take"
                    )))
                }
                None => {}
            }
        }
        if parts.len() == 1 && parts[0].get("type").and_then(Value::as_str) == Some("text") {
            messages.push(json!({"role": "user", "content": parts[0]["text"]}));
        } else if !parts.is_empty() {
            messages.push(json!({"role": "user", "content": parts}));
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let mut chat_tools = Vec::new();
        for t in tools {
            // Anthropic's server tools (web search, code execution, …) run only at Anthropic:
            // another model is offered the rest.
            if t.get("type")
                .and_then(Value::as_str)
                .is_some_and(|k| k != "custom")
            {
                continue;
            }
            let mut f = json!({"name": t.get("name"), "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"}))});
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            chat_tools.push(json!({"type": "function", "function": f}));
        }
        out.insert("tools".into(), Value::Array(chat_tools));
    }
    if let Some(choice) = body.get("tool_choice") {
        let chat_choice = match choice.get("type").and_then(Value::as_str) {
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": choice.get("name")}}),
            _ => json!("auto"),
        };
        out.insert("tool_choice".into(), chat_choice);
        if choice
            .get("disable_parallel_tool_use")
            .and_then(Value::as_bool)
            == Some(true)
        {
            out.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    Ok(out)
}

/// A chat content part as a Messages block.
fn part_to_block(p: &Value, at: &str) -> Result<Value, Untranslatable> {
    match p.get("type").and_then(Value::as_str) {
        Some("text") => {
            Ok(json!({"type": "text", "text": p.get("text").cloned().unwrap_or(json!(""))}))
        }
        Some("image_url") => {
            let url = p
                .pointer("/image_url/url")
                .and_then(Value::as_str)
                .unwrap_or("");
            Ok(match data_url(url) {
                Some((media, data)) => {
                    json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
                }
                None => json!({"type": "image", "source": {"type": "url", "url": url}}),
            })
        }
        Some("file") => {
            let url = p
                .pointer("/file/file_data")
                .and_then(Value::as_str)
                .unwrap_or("");
            match data_url(url) {
                Some((media, data)) => Ok(
                    json!({"type": "document", "source": {"type": "base64", "media_type": media, "data": data}}),
                ),
                None => Err(untranslatable(format!(
                    "`{at}`: only files sent inline (file_data) can go to an Anthropic model"
                ))),
            }
        }
        other => Err(untranslatable(format!(
            "`{at}` is a `{}` part, which an Anthropic model cannot take",
            other.unwrap_or("untyped")
        ))),
    }
}

/// `data:{media};base64,{data}` → (media, data).
fn data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (media, data) = rest.split_once(";base64,")?;
    Some((media, data))
}

/// Appends `blocks` to the last message if it has `role`, else as a new message.
fn push_blocks(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut() {
        if last.get("role").and_then(Value::as_str) == Some(role) {
            if let Some(Value::Array(existing)) = last.get_mut("content") {
                existing.extend(blocks);
                return;
            }
        }
    }
    messages.push(json!({"role": role, "content": blocks}));
}

/// A chat tool call's JSON-text arguments as a `tool_use` block's `input` (an object; `{}` when the
/// text is not one — a model's malformed arguments must not make the request unsendable).
fn tool_input(arguments: &str) -> Value {
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or(json!({}))
}

/// A chat request as a Messages request (the model not set).
pub fn from_chat(body: &Map<String, Value>) -> Result<Map<String, Value>, Untranslatable> {
    let mut out = Map::new();
    for field in ["stream", "top_p"] {
        if let Some(v) = body.get(field) {
            out.insert(field.into(), v.clone());
        }
    }
    if let Some(t) = body.get("temperature").and_then(Value::as_f64) {
        // Chat's range is 0–2, Anthropic's 0–1.
        out.insert("temperature".into(), json!(t.min(1.0)));
    }
    let max = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max));
    match body.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(v @ Value::Array(_)) => {
            out.insert("stop_sequences".into(), v.clone());
        }
        _ => {}
    }
    if let Some(u) = body.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": u}));
    }
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for (i, m) in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => system.push(content_text(content)),
            "tool" => {
                let block = json!({"type": "tool_result", "tool_use_id": m.get("tool_call_id").cloned().unwrap_or(json!("")), "content": content_text(content)});
                push_blocks(&mut messages, "user", vec![block]);
            }
            "assistant" => {
                let mut blocks = Vec::new();
                let text = content_text(content);
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                for call in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let args = call
                        .pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .unwrap_or("{}");
                    let input = tool_input(args);
                    blocks.push(json!({"type": "tool_use", "id": call.get("id"), "name": call.pointer("/function/name"), "input": input}));
                }
                push_blocks(&mut messages, "assistant", blocks);
            }
            _ => {
                let blocks = match content {
                    Value::String(s) => vec![json!({"type": "text", "text": s})],
                    Value::Array(parts) => parts
                        .iter()
                        .enumerate()
                        .map(|(j, p)| part_to_block(p, &format!("messages[{i}].content[{j}]")))
                        .collect::<Result<Vec<_>, _>>()?,
                    _ => Vec::new(),
                };
                push_blocks(&mut messages, "user", blocks);
            }
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::String(system.join("\n\n")));
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                let f = t.get("function").cloned().unwrap_or(Value::Null);
                let mut tool = json!({"name": f.get("name"), "input_schema": f.get("parameters").cloned().unwrap_or(json!({"type": "object"}))});
                if let Some(d) = f.get("description") {
                    tool["description"] = d.clone();
                }
                tool
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    let mut choice = match body.get("tool_choice") {
        Some(Value::String(s)) if s == "required" => Some(json!({"type": "any"})),
        Some(Value::String(s)) if s == "none" => Some(json!({"type": "none"})),
        Some(Value::String(_)) => Some(json!({"type": "auto"})),
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .map(|n| json!({"type": "tool", "name": n})),
        _ => None,
    };
    if body.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false)
        && out.contains_key("tools")
    {
        choice
            .get_or_insert_with(|| json!({"type": "auto"}))
            .as_object_mut()
            .map(|c| c.insert("disable_parallel_tool_use".into(), Value::Bool(true)));
    }
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    Ok(out)
}

pub fn stop_reason(s: &str) -> StopReason {
    match s {
        "max_tokens" => StopReason::MaxTokens,
        "tool_use" => StopReason::ToolUse,
        "stop_sequence" => StopReason::StopSequence,
        "refusal" => StopReason::Refusal,
        _ => StopReason::EndTurn,
    }
}

pub fn stop_name(stop: StopReason) -> &'static str {
    match stop {
        StopReason::EndTurn => "end_turn",
        StopReason::MaxTokens => "max_tokens",
        StopReason::ToolUse => "tool_use",
        StopReason::StopSequence => "stop_sequence",
        StopReason::Refusal => "refusal",
    }
}

/// Anthropic's usage object read into `into` (fields it lacks keep their value): `input_tokens`
/// is only the uncached part, so the cache's parts are added to it.
fn read_usage(u: &Value, into: &mut TokenUsage) -> bool {
    let field = |f: &str| u.get(f).and_then(Value::as_u64);
    let (plain, write, read, output) = (
        field("input_tokens"),
        field("cache_creation_input_tokens"),
        field("cache_read_input_tokens"),
        field("output_tokens"),
    );
    if plain.is_some() || write.is_some() || read.is_some() {
        let uncached = plain.unwrap_or(
            into.input
                .saturating_sub(into.cache_read + into.cache_write),
        );
        into.cache_write = write.unwrap_or(into.cache_write);
        into.cache_read = read.unwrap_or(into.cache_read);
        into.input = uncached + into.cache_write + into.cache_read;
    }
    if let Some(o) = output {
        into.output = o;
    }
    plain.is_some() || write.is_some() || read.is_some() || output.is_some()
}

fn render_usage(u: &TokenUsage) -> Value {
    json!({
        "input_tokens": u.input.saturating_sub(u.cache_read + u.cache_write),
        "output_tokens": u.output,
        "cache_creation_input_tokens": u.cache_write,
        "cache_read_input_tokens": u.cache_read,
    })
}

pub fn parse_answer(v: &Value) -> Result<Answer, String> {
    let content = v
        .get("content")
        .and_then(Value::as_array)
        .ok_or("no `content` array")?;
    let mut blocks = Vec::new();
    for b in content {
        let s = |f: &str| b.get(f).and_then(Value::as_str).unwrap_or("").to_string();
        match b.get("type").and_then(Value::as_str) {
            Some("text") => blocks.push(Block::Text(s("text"))),
            Some("tool_use") => blocks.push(Block::ToolCall {
                id: s("id"),
                name: s("name"),
                arguments: b
                    .get("input")
                    .map(Value::to_string)
                    .unwrap_or_else(|| "{}".into()),
            }),
            Some("thinking") => blocks.push(Block::Thinking {
                text: s("thinking"),
                signature: b
                    .get("signature")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            }),
            _ => {}
        }
    }
    let usage = v.get("usage").and_then(|u| {
        let mut t = TokenUsage::default();
        read_usage(u, &mut t).then_some(t)
    });
    Ok(Answer {
        id: v
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        model: v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        blocks,
        stop: stop_reason(
            v.get("stop_reason")
                .and_then(Value::as_str)
                .unwrap_or("end_turn"),
        ),
        usage,
    })
}

fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_string()
    } else {
        super::new_id(super::Dialect::Messages)
    }
}

fn render_block(b: &Block) -> Value {
    match b {
        Block::Text(t) => json!({"type": "text", "text": t}),
        Block::ToolCall {
            id,
            name,
            arguments,
        } => {
            let input = tool_input(arguments);
            json!({"type": "tool_use", "id": tool_id(id), "name": name, "input": input})
        }
        Block::Thinking { text, signature } => {
            json!({"type": "thinking", "thinking": text, "signature": signature.clone().unwrap_or_default()})
        }
    }
}

/// A tool call's id as Anthropic clients expect (`toolu_…`), kept when the source had one.
fn tool_id(id: &str) -> String {
    if id.is_empty() {
        format!("toolu_{}", &super::new_id(super::Dialect::Messages)[4..])
    } else {
        id.to_string()
    }
}

pub fn render_answer(a: &Answer) -> Value {
    json!({
        "id": message_id(&a.id),
        "type": "message",
        "role": "assistant",
        "model": a.model,
        "content": a.blocks.iter().map(render_block).collect::<Vec<_>>(),
        "stop_reason": stop_name(a.stop),
        "stop_sequence": null,
        "usage": render_usage(&a.usage.unwrap_or_default()),
    })
}

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
enum Open {
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
            out.push(super::comment(c));
        }
        out.push(event("message_stop", &json!({"type": "message_stop"})));
    }
}
