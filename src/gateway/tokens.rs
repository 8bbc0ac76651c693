//! Token counts for admission control and for calls whose upstream gave no usage (or whose client
//! left mid-stream): OpenAI's `cl100k_base`, counted by `bpe-openai` (GitHub's `rust-gems`).
//!
//! Why that tokenizer: it gives tiktoken's counts (a test compares them on real prompts and code),
//! and its cost is linear in the input whatever the input is. tiktoken-rs, used before, merged a
//! pre-token quadratically (`"i" * 300_000`: 28 s of CPU) and panicked on a 1.2 MB run of one
//! letter (its regex overflowed its stack). Measured worst case (`benches/counting.rs`, release):
//! 60–70 ns a byte (a long run of one letter, one word of random letters); ordinary prose and code
//! 26–38 ns.
//!
//! Linear is still ~300 ms of CPU for a 4 MiB prompt, so a count never runs long on an async
//! worker: [`off_the_workers`] runs work over more than [`INLINE_BYTES`] of input on a pool of
//! blocking threads bounded by [`COUNTING_THREADS`] permits, and a call waits for a permit under
//! its own deadline (past it, the caller uses a rough estimate). A stream's completion is counted
//! as it arrives ([`RunningCount`]), in bounded time per chunk. No count panics; should one ever,
//! it is caught and the rough estimate stands.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::LazyLock;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;

use super::dialect::{self, CallRequest};

/// Work over at most this many bytes of input runs where it is: at the worst measured cost it
/// takes about 1.5 ms.
pub const INLINE_BYTES: usize = 16 * 1024;

/// How long a count waits for the pool where no call's own timeout applies.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// How many counts over large inputs run at once: all cores but one (at least one), so a burst of
/// huge prompts leaves a core to the async workers.
fn counting_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .max(1)
}

/// See [`counting_threads`].
pub static COUNTING_THREADS: LazyLock<Semaphore> =
    LazyLock::new(|| Semaphore::new(counting_threads()));

fn tokenizer() -> &'static bpe_openai::Tokenizer {
    bpe_openai::cl100k_base()
}

/// The rough count used where counting did not happen: about 4 bytes a token, rounded up.
pub fn rough_text(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

/// Tokens in `text` (linear in its length; see the module's doc for what it costs).
pub fn count_text(text: &str) -> u64 {
    catch_unwind(AssertUnwindSafe(|| tokenizer().count(text) as u64))
        .unwrap_or_else(|_| rough_text(text.len()))
}

/// Runs CPU-bound `work` over `bytes` of input where it cannot stall other clients: at once when
/// the input is at most [`INLINE_BYTES`]; else, once a [`COUNTING_THREADS`] permit is free, on
/// this task's thread handed to the blocking pool (`block_in_place`: the runtime gives the async
/// work queued on it to another worker meanwhile). `None` when no permit came within `deadline`
/// (the call's own time: other clients do not wait for it) or the work panicked.
pub async fn off_the_workers<T>(
    bytes: usize,
    deadline: Duration,
    work: impl FnOnce() -> T + Send,
) -> Option<T> {
    let on_a_pool_runtime = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if bytes <= INLINE_BYTES || !on_a_pool_runtime {
        return catch_unwind(AssertUnwindSafe(work)).ok();
    }
    let permit = tokio::time::timeout(deadline, COUNTING_THREADS.acquire())
        .await
        .ok()?
        .ok()?;
    let result = tokio::task::block_in_place(|| catch_unwind(AssertUnwindSafe(work)).ok());
    drop(permit);
    result
}

/// A call's prompt tokens off the async workers (the prompt's chat-shaped messages are built
/// there too: for Messages and Responses that is a copy); the rough count when the pool had no
/// room within `deadline`.
pub async fn count_prompt(request: &CallRequest, deadline: Duration) -> u64 {
    off_the_workers(request.size, deadline, || count_messages(&request.prompt()))
        .await
        .unwrap_or_else(|| 3 + rough_text(request.size))
}

/// `text`'s tokens off the async workers; the rough count when the pool had no room in time.
pub async fn count_text_off(text: &str, deadline: Duration) -> u64 {
    off_the_workers(text.len(), deadline, || count_text(text))
        .await
        .unwrap_or_else(|| rough_text(text.len()))
}

/// The bytes of text a message's count reads (what its cost is proportional to), without copying.
fn message_bytes(m: &Value) -> usize {
    let field = |name: &str| m.get(name).and_then(Value::as_str).map_or(0, str::len);
    field("role")
        + field("name")
        + m.get("content").map_or(0, content_bytes)
        + m.get("tool_calls").map_or(0, dialect::json_len)
}

fn content_bytes(content: &Value) -> usize {
    match content {
        Value::String(s) => s.len(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("tool_use") => p.get("input").map_or(0, dialect::json_len),
                Some("tool_result") => p.get("content").map_or(0, content_bytes),
                _ => p.get("text").and_then(Value::as_str).map_or(0, str::len) + 1,
            })
            .sum(),
        _ => 0,
    }
}

/// A count kept while a stream's text arrives. Pieces the pre-tokenizer has closed (all but the
/// last of the text not yet counted) are counted once; the open tail is split again only after
/// [`RunningCount::SPLIT_EVERY`] more bytes, and counted whole past [`RunningCount::MAX_TAIL`], so
/// each chunk costs time in its own length, never in the length of the text so far. The total
/// can differ from counting the whole text at once by a token where a piece was cut.
#[derive(Debug, Default)]
pub struct RunningCount {
    counted: u64,
    tail: String,
    /// The tail's length when it was last split.
    split_at: usize,
}

impl RunningCount {
    const SPLIT_EVERY: usize = 4 * 1024;
    const MAX_TAIL: usize = 64 * 1024;

    pub fn push(&mut self, text: &str) {
        self.tail.push_str(text);
        if self.tail.len() < self.split_at + Self::SPLIT_EVERY {
            return;
        }
        let tk = tokenizer();
        let base = self.tail.as_ptr() as usize;
        let mut open_from = 0;
        let mut closed: u64 = 0;
        let mut previous: Option<&str> = None;
        for piece in tk.split(&self.tail) {
            if let Some(p) = previous {
                closed += tk.bpe.count(p.as_bytes()) as u64;
            }
            open_from = piece.as_ptr() as usize - base;
            previous = Some(piece);
        }
        self.counted += closed;
        self.tail.drain(..open_from);
        if self.tail.len() > Self::MAX_TAIL {
            self.counted += count_text(&self.tail);
            self.tail.clear();
        }
        self.split_at = self.tail.len();
    }

    /// The tokens of everything pushed (the open tail counted now: at most
    /// [`RunningCount::MAX_TAIL`] plus a chunk).
    pub fn total(&self) -> u64 {
        self.counted + count_text(&self.tail)
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
pub fn message_tokens(m: &Value) -> u64 {
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

/// A cheap upper-leaning guess (about 4 bytes a token), for reservations that do not enforce and
/// where counting had no room; nothing is copied.
pub fn rough_count_messages(messages: &[Value]) -> u64 {
    3 + messages
        .iter()
        .map(|m| 4 + rough_text(m.get("content").map_or(0, content_bytes)))
        .sum::<u64>()
}

/// [`message_tokens`] guessed at about 4 bytes a token (when counting had no room in time).
pub fn rough_message_tokens(m: &Value) -> u64 {
    4 + rough_text(message_bytes(m))
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
/// `shares` are the messages' [`message_tokens`], counted by the caller (off the async workers).
pub fn truncate_messages(
    messages: &mut Vec<Value>,
    mut shares: Vec<u64>,
    max: u64,
) -> Result<Option<Truncation>, u64> {
    // Each message is tokenized once; removals subtract its share.
    if shares.len() != messages.len() {
        shares = messages.iter().map(message_tokens).collect();
    }
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
        let shares = |m: &[Value]| m.iter().map(message_tokens).collect::<Vec<_>>();
        assert_eq!(
            truncate_messages(&mut msgs.clone(), shares(&msgs), full).unwrap(),
            None
        );
        let counted = shares(&msgs);
        let cut = truncate_messages(&mut msgs, counted, full - 10)
            .unwrap()
            .unwrap();
        // The first user message alone was enough.
        assert_eq!(cut.removed_messages, 1);
        assert_eq!(cut.tokens_before, full);
        assert!(cut.tokens_after <= full - 10);
        assert_eq!(cut.tokens_after, count_messages(&msgs));
        assert_eq!(msgs.len(), 4);
        // Cutting into the tool exchange removes the call and its result together.
        let counted = shares(&msgs);
        let cut = truncate_messages(&mut msgs, counted, 40).unwrap().unwrap();
        assert_eq!(cut.removed_messages, 2);
        let roles: Vec<&str> = msgs.iter().map(role).collect();
        assert_eq!(roles, ["system", "user"]);
        // Nothing left to cut: the caller is told how long the rest is.
        assert!(truncate_messages(&mut msgs, Vec::new(), 5).is_err());
    }

    #[test]
    fn counts_like_tiktoken() {
        assert_eq!(count_text("hello world"), 2);
        let msgs = [json!({"role": "user", "content": "hello world"})];
        assert_eq!(count_messages(&msgs), 3 + 3 + 1 + 2);
    }
}
