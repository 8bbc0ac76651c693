//! A finished span as hypertool records it, before any destination's encoding.

use std::borrow::Cow;

use super::ids::{SpanId, TraceId};

/// An attribute value (the OTLP `AnyValue` kinds hypertool uses).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}
impl From<u64> for Value {
    fn from(n: u64) -> Value {
        Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}
impl From<u32> for Value {
    fn from(n: u32) -> Value {
        Value::Int(i64::from(n))
    }
}
impl From<f64> for Value {
    fn from(n: f64) -> Value {
        Value::Float(n)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal,
    /// A request hypertool serves.
    Server,
    /// A request hypertool makes (the upstream call).
    Client,
}

/// What kind of work a span is, for the destinations that map kinds (Langfuse's observation types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The gateway request as the client made it.
    Request,
    /// One call to a model: Langfuse's generation.
    Generation,
    Run,
    Stage,
    Switch,
    Gate,
    /// A tool call through the MCP proxy: Langfuse's tool observation.
    Tool,
}

/// The prompt and answer of a generation, already redacted; a destination sends them only when
/// it captures content.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    pub input: String,
    pub output: String,
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    /// A remote parent (continued `traceparent`) makes this span the root of hypertool's part.
    pub parent_is_remote: bool,
    pub name: String,
    pub kind: Kind,
    pub role: Role,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(Cow<'static, str>, Value)>,
    /// `Some(message)` when the span failed.
    pub error: Option<String>,
    pub content: Option<Content>,
}

impl SpanRecord {
    pub fn new(
        trace_id: TraceId,
        span_id: SpanId,
        parent: Option<SpanId>,
        name: impl Into<String>,
        role: Role,
    ) -> SpanRecord {
        SpanRecord {
            trace_id,
            span_id,
            parent,
            parent_is_remote: false,
            name: name.into(),
            kind: Kind::Internal,
            role,
            start_ns: 0,
            end_ns: 0,
            // Sized for a generation's attributes: no regrowth on the call path.
            attributes: Vec::with_capacity(24),
            error: None,
            content: None,
        }
    }

    pub fn kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    /// Start and end in Unix milliseconds (event times).
    pub fn between_ms(mut self, start_ms: i64, end_ms: i64) -> Self {
        self.start_ns = ms_to_ns(start_ms);
        self.end_ns = ms_to_ns(end_ms.max(start_ms));
        self
    }

    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        self.attributes.push((Cow::Borrowed(key), value.into()));
    }

    pub fn set_opt(&mut self, key: &'static str, value: Option<impl Into<Value>>) {
        if let Some(v) = value {
            self.set(key, v);
        }
    }

    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    pub fn attr_str(&self, key: &str) -> Option<&str> {
        match self.attr(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// Whether this span begins a trace as far as hypertool's receivers can see.
    pub fn is_root(&self) -> bool {
        self.parent.is_none() || self.parent_is_remote
    }
}

pub fn ms_to_ns(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0).saturating_mul(1_000_000)
}

/// A quality-gate verdict as a score on the generation it judged (Langfuse's scores API).
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// Stable across re-sends: Langfuse updates a score with a known id instead of adding one.
    pub id: String,
    pub trace_id: TraceId,
    pub observation: Option<SpanId>,
    pub name: &'static str,
    pub value: f64,
    pub comment: Option<String>,
    pub at_ms: i64,
}
