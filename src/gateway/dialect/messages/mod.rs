//! Anthropic Messages: requests checked and translated to and from chat, answers parsed and
//! rendered, streams (`message_start` … `message_stop`) decoded and encoded.

use axum::body::Bytes;
use serde_json::{json, Map, Value};

use super::{
    bad, content_text, orphan_result, unknown_type, Answer, Block, Decoded, Delta, StopReason,
    TokenUsage, Untranslatable,
};
use crate::web::error::ApiError;

mod stream;
mod translate;

pub use stream::*;
pub use translate::*;

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
