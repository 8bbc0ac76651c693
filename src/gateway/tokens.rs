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

fn content_text(content: &Value) -> String {
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

/// Prompt tokens of a chat request, counted the way OpenAI documents for its chat models:
/// 3 per message, the tokens of role, name and content, and 3 to prime the reply.
pub fn count_messages(messages: &[Value]) -> u64 {
    let mut total = 3;
    for m in messages {
        total += 3;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_like_tiktoken() {
        assert_eq!(count_text("hello world"), 2);
        let msgs = [json!({"role": "user", "content": "hello world"})];
        assert_eq!(count_messages(&msgs), 3 + 3 + 1 + 2);
    }
}
