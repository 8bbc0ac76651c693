//! Spans → one OTLP `ExportTraceServiceRequest` (protobuf, the OTLP/HTTP body), in the flavour a
//! destination reads: plain OpenTelemetry (`gen_ai.*` semantic conventions) or, for Langfuse, the
//! same plus Langfuse's attributes (generation, user, session, trace metadata and name).

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prost::Message;
use std::sync::Arc;

use super::span::{Kind, Role, SpanRecord, Value};

/// How a destination wants spans written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Otlp,
    Langfuse,
}

/// What the encoder needs to know of the process and the destination.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub flavour: Flavour,
    pub service_name: String,
    /// Send generations' prompts and answers.
    pub capture_content: bool,
}

fn kv(key: impl Into<String>, value: Value) -> KeyValue {
    let value = match value {
        Value::Str(s) => any_value::Value::StringValue(s),
        Value::Int(n) => any_value::Value::IntValue(n),
        Value::Float(f) => any_value::Value::DoubleValue(f),
        Value::Bool(b) => any_value::Value::BoolValue(b),
    };
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn str_kv(key: &str, value: &str) -> KeyValue {
    kv(key, Value::Str(value.to_string()))
}

/// The protobuf body of one export request holding `spans`. A span no other destination holds is
/// taken apart rather than copied.
///
/// Each span is encoded once, as it is converted, and the three envelopes around them
/// (`ExportTraceServiceRequest.resource_spans` = 1, `ResourceSpans.scope_spans` = 2,
/// `ScopeSpans.spans` = 2) are written around the encoded spans: protobuf appends repeated fields,
/// so this is byte for byte what encoding the whole tree gives, without walking every span once per
/// envelope to learn its length (which made encoding cost more than building the spans).
pub fn encode(spans: Vec<Arc<SpanRecord>>, opts: &EncodeOptions) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let mut encoded_spans = Vec::with_capacity(spans.len() * 512);
    for s in spans {
        let span = span_of(
            Arc::try_unwrap(s).unwrap_or_else(|shared| (*shared).clone()),
            opts,
        );
        prost::encoding::message::encode(2, &span, &mut encoded_spans);
    }
    let scope = ScopeSpans {
        scope: Some(InstrumentationScope {
            name: "hypertool".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        }),
        spans: Vec::new(),
        schema_url: String::new(),
    }
    .encode_to_vec();
    let resource = ResourceSpans {
        resource: Some(Resource {
            attributes: vec![
                str_kv("service.name", &opts.service_name),
                str_kv("service.version", env!("CARGO_PKG_VERSION")),
                str_kv("telemetry.sdk.name", "hypertool"),
            ],
            ..Default::default()
        }),
        scope_spans: Vec::new(),
        schema_url: String::new(),
    }
    .encode_to_vec();
    let scope_len = scope.len() + encoded_spans.len();
    let mut resource_spans = resource;
    encode_key(2, WireType::LengthDelimited, &mut resource_spans);
    encode_varint(scope_len as u64, &mut resource_spans);
    let mut out = Vec::with_capacity(resource_spans.len() + scope_len + 16);
    encode_key(1, WireType::LengthDelimited, &mut out);
    encode_varint((resource_spans.len() + scope_len) as u64, &mut out);
    out.extend_from_slice(&resource_spans);
    out.extend_from_slice(&scope);
    out.extend_from_slice(&encoded_spans);
    out
}

fn span_of(mut s: SpanRecord, opts: &EncodeOptions) -> Span {
    let mut attributes: Vec<KeyValue> = Vec::with_capacity(s.attributes.len() + 12);
    if opts.flavour == Flavour::Langfuse {
        langfuse_attributes(&s, &mut attributes);
    }
    attributes.extend(
        std::mem::take(&mut s.attributes)
            .into_iter()
            .map(|(k, v)| kv(k, v)),
    );
    if opts.capture_content {
        if let Some(c) = s.content.take() {
            let (input_key, output_key) = match opts.flavour {
                Flavour::Langfuse => ("langfuse.observation.input", "langfuse.observation.output"),
                Flavour::Otlp => ("gen_ai.input.messages", "gen_ai.output.messages"),
            };
            attributes.push(kv(input_key, Value::Str(c.input)));
            attributes.push(kv(output_key, Value::Str(c.output)));
        }
    }
    Span {
        trace_id: s.trace_id.0.to_vec(),
        span_id: s.span_id.0.to_vec(),
        parent_span_id: s.parent.map(|p| p.0.to_vec()).unwrap_or_default(),
        // Sampled; the parent's remoteness as the OTLP flags say it (bits 8 and 9).
        flags: 0x1 | 0x100 | if s.parent_is_remote { 0x200 } else { 0 },
        name: s.name,
        kind: match s.kind {
            Kind::Internal => span::SpanKind::Internal,
            Kind::Server => span::SpanKind::Server,
            Kind::Client => span::SpanKind::Client,
        } as i32,
        start_time_unix_nano: s.start_ns,
        end_time_unix_nano: s.end_ns.max(s.start_ns),
        attributes,
        status: Some(match s.error {
            Some(message) => Status {
                message,
                code: status::StatusCode::Error as i32,
            },
            None => Status {
                message: String::new(),
                code: status::StatusCode::Ok as i32,
            },
        }),
        ..Default::default()
    }
}

/// Langfuse reads its own keys first: the observation type, the persona as the user, the session,
/// chatmode/workflow/stage/run as trace metadata, and a trace name on the span that begins a trace.
fn langfuse_attributes(s: &SpanRecord, out: &mut Vec<KeyValue>) {
    let kind = match s.role {
        Role::Generation => "generation",
        Role::Gate => "event",
        Role::Tool => "tool",
        _ => "span",
    };
    out.push(str_kv("langfuse.observation.type", kind));
    if let Some(p) = s.attr_str("hypertool.persona") {
        out.push(str_kv("user.id", p));
    }
    for key in ["chatmode", "workflow", "stage", "run"] {
        let attr = format!("hypertool.{key}");
        if let Some(v) = s.attr_str(&attr) {
            out.push(str_kv(&format!("langfuse.trace.metadata.{key}"), v));
        }
    }
    if s.is_root() {
        out.push(str_kv("langfuse.trace.name", &s.name));
    }
    if s.error.is_some() {
        out.push(str_kv("langfuse.observation.level", "ERROR"));
    }
    if s.role == Role::Generation {
        if let Some(m) = s
            .attr_str("gen_ai.response.model")
            .or(s.attr_str("gen_ai.request.model"))
        {
            out.push(str_kv("langfuse.observation.model.name", m));
        }
        let int = |k: &str| match s.attr(k) {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        };
        if let (Some(i), Some(o)) = (
            int("gen_ai.usage.input_tokens"),
            int("gen_ai.usage.output_tokens"),
        ) {
            let usage = serde_json::json!({"input": i, "output": o, "total": i.saturating_add(o)});
            out.push(str_kv(
                "langfuse.observation.usage_details",
                &usage.to_string(),
            ));
        }
        if let Some(Value::Float(c)) = s.attr("hypertool.cost_usd") {
            let cost = serde_json::json!({"total": c});
            out.push(str_kv(
                "langfuse.observation.cost_details",
                &cost.to_string(),
            ));
        }
    }
}

/// How many spans of a request begin a trace (what `langfuse_trace_created_total` counts once
/// Langfuse accepted them).
pub fn roots(spans: &[impl AsRef<SpanRecord>]) -> u32 {
    spans.iter().filter(|s| s.as_ref().is_root()).count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::trace::ids::{SpanId, TraceId};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    #[test]
    fn the_spliced_envelope_is_what_prost_writes_for_the_whole_request() {
        let opts = EncodeOptions {
            flavour: Flavour::Langfuse,
            service_name: "svc".into(),
            capture_content: true,
        };
        let spans: Vec<Arc<SpanRecord>> = (0..3)
            .map(|i| {
                let mut s = SpanRecord::new(
                    TraceId::random(),
                    SpanId::random(),
                    None,
                    format!("s{i}"),
                    Role::Generation,
                );
                s.set("hypertool.persona", "p");
                s.set("gen_ai.usage.input_tokens", 3u64);
                Arc::new(s)
            })
            .collect();
        let bytes = encode(spans.clone(), &opts);
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("decodes");
        let whole = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: decoded.resource_spans[0].resource.clone(),
                scope_spans: vec![ScopeSpans {
                    scope: decoded.resource_spans[0].scope_spans[0].scope.clone(),
                    spans: spans
                        .iter()
                        .map(|s| span_of((**s).clone(), &opts))
                        .collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        assert_eq!(whole.encode_to_vec(), bytes);
        assert_eq!(decoded.resource_spans[0].scope_spans[0].spans.len(), 3);
        assert_eq!(roots(&spans), 3);
    }
}
