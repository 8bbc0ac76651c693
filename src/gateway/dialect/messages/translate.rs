//! Messages to and from chat: a request translated for an upstream of the other dialect; what
//! cannot be said in the other dialect refused by name (`Untranslatable`).

use super::*;

pub(super) fn untranslatable(what: String) -> Untranslatable {
    Untranslatable(what)
}

/// An image or document block as a chat content part.
pub(super) fn media_to_chat(b: &Value, at: &str) -> Result<Value, Untranslatable> {
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
pub(super) fn part_to_block(p: &Value, at: &str) -> Result<Value, Untranslatable> {
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
pub(super) fn data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (media, data) = rest.split_once(";base64,")?;
    Some((media, data))
}

/// Appends `blocks` to the last message if it has `role`, else as a new message.
pub(super) fn push_blocks(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
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
pub(super) fn tool_input(arguments: &str) -> Value {
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
