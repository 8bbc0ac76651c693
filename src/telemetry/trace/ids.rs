//! Trace and span ids, and the W3C `traceparent` header that carries them between processes.
//!
//! Most ids are random. Ids of things that several events describe (a workflow run, its stages, a
//! session's switches) are derived from their names instead, so that the span of a stage, emitted
//! when the stage ends, is the parent of the calls made while it ran, and a span re-sent from the
//! spool keeps its id (receivers such as Langfuse deduplicate by id).

use std::cell::Cell;
use std::fmt;

/// A 16-byte trace id (never all zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id (never all zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

thread_local! {
    /// xorshift64* state, seeded once per thread from the operating system.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // No OS randomness: ids stay unique per process through the time and thread address.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (&b as *const _ as u64) | 1;
    }
    u64::from_le_bytes(b) | 1
}

/// A fast non-cryptographic random number: ids must be unique, not unguessable.
fn next_u64() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// The first bytes of SHA-256 over the parts (each followed by a 0 byte, so parts cannot run together).
fn digest(parts: &[&str]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
        ctx.update(&[0]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl TraceId {
    pub fn random() -> TraceId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&next_u64().to_be_bytes());
        b[8..].copy_from_slice(&next_u64().to_be_bytes());
        TraceId(b)
    }

    /// The same id for the same parts, in every process.
    pub fn derived(parts: &[&str]) -> TraceId {
        let d = digest(parts);
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        if b == [0; 16] {
            b[15] = 1;
        }
        TraceId(b)
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl SpanId {
    pub fn random() -> SpanId {
        let v = next_u64();
        SpanId(if v == 0 { 1u64 } else { v }.to_be_bytes())
    }

    pub fn derived(parts: &[&str]) -> SpanId {
        let d = digest(parts);
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[16..24]);
        if b == [0; 8] {
            b[7] = 1;
        }
        SpanId(b)
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nibble(s[2 * i])? << 4 | nibble(s[2 * i + 1])?;
    }
    Some(out)
}

/// Where a span sits: its trace and (for a continued trace) the remote parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent: SpanId,
    pub sampled: bool,
}

impl TraceParent {
    /// Reads a W3C `traceparent` header (version 00; later versions by their first four fields, as
    /// the recommendation asks). Anything malformed is ignored: a new trace starts.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let h = header.trim();
        let mut parts = h.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || version == "ff" || flags.len() != 2 {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = TraceId(unhex::<16>(trace)?);
        let parent = SpanId(unhex::<8>(parent)?);
        let flags = unhex::<1>(flags)?[0];
        unhex::<1>(version)?;
        if trace_id.0 == [0; 16] || parent.0 == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent,
            sampled: flags & 1 == 1,
        })
    }

    /// The header value that names `span` of `trace` as the parent of what the receiver does.
    pub fn header(trace: TraceId, span: SpanId) -> String {
        // Built in one allocation: this runs for every upstream attempt of a traced call.
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &trace.0);
        s.push('-');
        push_hex(&mut s, &span.0);
        s.push_str("-01");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_refuses_what_the_recommendation_refuses() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(h).expect("valid");
        assert_eq!(tp.trace_id.hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent.hex(), "00f067aa0ba902b7");
        assert!(tp.sampled);
        assert_eq!(TraceParent::header(tp.trace_id, tp.parent), h);
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more")
                .is_some_and(|t| !t.sampled)
        );
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(
            TraceId::derived(&["run", "r1"]),
            TraceId::derived(&["run", "r1"])
        );
        assert_ne!(
            TraceId::derived(&["run", "r1"]),
            TraceId::derived(&["run", "r2"])
        );
        assert_ne!(SpanId::derived(&["ab", "c"]), SpanId::derived(&["a", "bc"]));
        assert_ne!(SpanId::random(), SpanId::random());
    }
}
