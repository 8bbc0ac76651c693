//! Token estimates with a real tokenizer (cl100k_base, tiktoken), for admission control and for
//! calls whose upstream gave no usage (or whose client left mid-stream).

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

fn bpe() -> Option<&'static CoreBPE> {
    static BPE: OnceLock<Option<CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::cl100k_base().ok()).as_ref()
}

/// Tokens in `text`; a rough chars/4 when the tokenizer is unavailable.
pub fn count_text(text: &str) -> u64 {
    match bpe() {
        Some(b) => b.encode_ordinary(text).len() as u64,
        None => (text.chars().count() as u64).div_ceil(4),
    }
}

/// The text of a message's content as counted: strings, text parts and blocks, and — for
/// Messages blocks — a tool call's input and a tool result's content.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("tool_use") => p.get("input").map(Value::to_string).unwrap_or_default(),
                Some("tool_result") => p.get("content").map(content_text).unwrap_or_default(),
                _ => p
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            })
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Prompt tokens of a chat request, counted the way OpenAI documents for its chat models:
/// 3 per message, the tokens of role, name and content, and 3 to prime the reply.
pub fn count_messages(messages: &[Value]) -> u64 {
    3 + messages.iter().map(message_tokens).sum::<u64>()
}

/// One message's share of [`count_messages`].
fn message_tokens(m: &Value) -> u64 {
    let mut total = 3;
    if let Some(role) = m.get("role").and_then(Value::as_str) {
        total += count_text(role);
    }
    if let Some(name) = m.get("name").and_then(Value::as_str) {
        total += count_text(name) + 1;
    }
    if let Some(content) = m.get("content") {
        total += count_text(&content_text(content));
    }
    if let Some(calls) = m.get("tool_calls") {
        total += count_text(&calls.to_string());
    }
    total
}

/// A cheap upper-leaning guess (about 4 characters a token), for reservations that do not enforce.
pub fn rough_count_messages(messages: &[Value]) -> u64 {
    3 + messages
        .iter()
        .map(|m| {
            let chars = m.get("content").map(|c| content_text(c).len()).unwrap_or(0);
            4 + (chars as u64).div_ceil(4)
        })
        .sum::<u64>()
}

/// What [`truncate_messages`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    pub removed_messages: usize,
    pub tokens_before: u64,
    pub tokens_after: u64,
}

/// A chat `tool` message, or a Messages user message holding a `tool_result` block: it goes with
/// the call it answers.
fn answers_a_tool_call(m: &Value) -> bool {
    role(m) == "tool"
        || m.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.ends_with("_call_output"))
        || m.get("content")
            .and_then(Value::as_array)
            .is_some_and(|blocks| {
                blocks
                    .iter()
                    .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            })
}

fn role(m: &Value) -> &str {
    m.get("role").and_then(Value::as_str).unwrap_or("")
}

/// Cuts a prompt to at most `max` tokens (the runbook's `truncate_context`): the oldest
/// non-system messages go first; the last message always stays. An assistant message's tool
/// results go with it, so no `tool` message is left without the call it answers. `None` when the
/// prompt fits already; `Err(tokens)` when even system messages plus the last message are too long.
pub fn truncate_messages(messages: &mut Vec<Value>, max: u64) -> Result<Option<Truncation>, u64> {
    // Each message is tokenized once; removals subtract its share.
    let mut shares: Vec<u64> = messages.iter().map(message_tokens).collect();
    let before = 3 + shares.iter().sum::<u64>();
    if before <= max {
        return Ok(None);
    }
    let mut removed = 0;
    let mut now = before;
    while now > max {
        let last = messages.len().saturating_sub(1);
        let Some(i) = (0..last).find(|&i| role(&messages[i]) != "system") else {
            return Err(now);
        };
        messages.remove(i);
        now -= shares.remove(i);
        removed += 1;
        // Tool results of a removed call (or left orphaned at the front) go too.
        while i < messages.len().saturating_sub(1) && answers_a_tool_call(&messages[i]) {
            messages.remove(i);
            now -= shares.remove(i);
            removed += 1;
        }
    }
    Ok(Some(Truncation {
        removed_messages: removed,
        tokens_before: before,
        tokens_after: now,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn truncation_drops_the_oldest_non_system_messages_and_keeps_tool_pairs_whole() {
        let long = "word ".repeat(100);
        let mut msgs = vec![
            json!({"role": "system", "content": "be brief"}),
            json!({"role": "user", "content": long}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": long}),
            json!({"role": "user", "content": "and now?"}),
        ];
        let full = count_messages(&msgs);
        assert_eq!(truncate_messages(&mut msgs.clone(), full).unwrap(), None);
        let cut = truncate_messages(&mut msgs, full - 10).unwrap().unwrap();
        // The first user message alone was enough.
        assert_eq!(cut.removed_messages, 1);
        assert_eq!(cut.tokens_before, full);
        assert!(cut.tokens_after <= full - 10);
        assert_eq!(cut.tokens_after, count_messages(&msgs));
        assert_eq!(msgs.len(), 4);
        // Cutting into the tool exchange removes the call and its result together.
        let cut = truncate_messages(&mut msgs, 40).unwrap().unwrap();
        assert_eq!(cut.removed_messages, 2);
        let roles: Vec<&str> = msgs.iter().map(role).collect();
        assert_eq!(roles, ["system", "user"]);
        // Nothing left to cut: the caller is told how long the rest is.
        assert!(truncate_messages(&mut msgs, 5).is_err());
    }

    #[test]
    fn counts_like_tiktoken() {
        assert_eq!(count_text("hello world"), 2);
        let msgs = [json!({"role": "user", "content": "hello world"})];
        assert_eq!(count_messages(&msgs), 3 + 3 + 1 + 2);
    }
}
