//! What a span costs: hypertool's path (build a `SpanRecord`, encode it to OTLP protobuf in
//! batches of 512) against an independent reference doing the same work — the OpenTelemetry SDK
//! (span builder with the same attributes, its batch span processor, and the conversion and
//! protobuf encoding its OTLP exporter does). Nothing is sent: both stop at the encoded bytes.
//! Prints CPU time per span (the process's user + system time, background threads included),
//! and the ratio. Same allocator as the binary (mimalloc).
//!
//!   cargo bench --bench spans

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hypertool::telemetry::trace::ids::{SpanId, TraceId};
use hypertool::telemetry::trace::otlp::{encode, EncodeOptions, Flavour};
use hypertool::telemetry::trace::span::{Kind, Role, SpanRecord};
use opentelemetry::trace::{Span as _, SpanKind, Tracer as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;
use prost::Message;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SPANS: usize = 200_000;

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// A generation as the gateway writes it.
fn ours() -> (f64, usize) {
    let opts = EncodeOptions {
        flavour: Flavour::Otlp,
        service_name: "hypertool".into(),
        capture_content: false,
    };
    let start = cpu_seconds();
    let mut bytes = 0;
    let mut batch = Vec::with_capacity(512);
    let parent = SpanId::random();
    for i in 0..SPANS {
        let mut s = SpanRecord::new(
            TraceId::random(),
            SpanId::random(),
            Some(parent),
            format!("chat {}", "bench-model"),
            Role::Generation,
        )
        .kind(Kind::Client);
        s.start_ns = 1_000 + i as u64;
        s.end_ns = 2_000 + i as u64;
        s.set("hypertool.persona", String::from("backend-engineer"));
        s.set("gen_ai.operation.name", "chat");
        s.set("gen_ai.provider.name", String::from("bench"));
        s.set("gen_ai.request.model", String::from("bench-model"));
        s.set("gen_ai.response.model", String::from("bench-model"));
        s.set("gen_ai.usage.input_tokens", 24u64);
        s.set("gen_ai.usage.output_tokens", 11u64);
        batch.push(Arc::new(s));
        if batch.len() == 512 {
            bytes += encode(std::mem::take(&mut batch), &opts).len();
        }
    }
    bytes += encode(batch, &opts).len();
    (cpu_seconds() - start, bytes)
}

/// The OTLP exporter's work without the network: SDK spans → protobuf.
#[derive(Debug)]
struct Encoding {
    resource: ResourceAttributesWithSchema,
    bytes: Arc<AtomicU64>,
}

impl SpanExporter for Encoding {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let request = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &self.resource),
        };
        self.bytes
            .fetch_add(request.encode_to_vec().len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn sdk() -> (f64, usize) {
    let bytes = Arc::new(AtomicU64::new(0));
    let resource = Resource::builder_empty()
        .with_attributes([KeyValue::new("service.name", "hypertool")])
        .build();
    let exporter = Encoding {
        resource: (&resource).into(),
        bytes: bytes.clone(),
    };
    // A queue that holds every span: the default (2,048) drops what the exporter has not taken yet,
    // which would measure dropping, not exporting.
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(SPANS + 1)
                .with_max_export_batch_size(512)
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_span_processor(processor)
        .build();
    let tracer = provider.tracer("hypertool");
    let start = cpu_seconds();
    for _ in 0..SPANS {
        let mut span = tracer
            .span_builder("chat bench-model")
            .with_kind(SpanKind::Client)
            .with_attributes(vec![
                KeyValue::new("hypertool.persona", String::from("backend-engineer")),
                KeyValue::new("gen_ai.operation.name", "chat"),
                KeyValue::new("gen_ai.provider.name", String::from("bench")),
                KeyValue::new("gen_ai.request.model", String::from("bench-model")),
                KeyValue::new("gen_ai.response.model", String::from("bench-model")),
                KeyValue::new("gen_ai.usage.input_tokens", 24i64),
                KeyValue::new("gen_ai.usage.output_tokens", 11i64),
            ])
            .start(&tracer);
        span.end();
    }
    let _ = provider.force_flush();
    let cpu = cpu_seconds() - start;
    let _ = provider.shutdown();
    (cpu, bytes.load(Ordering::Relaxed) as usize)
}

fn main() {
    // Warm up both paths once, then measure each twice, interleaved.
    let _ = ours();
    let _ = sdk();
    let mut rows = Vec::new();
    for _ in 0..2 {
        rows.push(("hypertool", ours()));
        rows.push((
            "OpenTelemetry SDK 0.33 (batch processor + OTLP encoding)",
            sdk(),
        ));
    }
    for (name, (cpu, bytes)) in &rows {
        println!(
            "{name}: {:.2} us CPU per span, {} bytes per span",
            cpu * 1e6 / SPANS as f64,
            bytes / SPANS
        );
    }
    let best = |n: &str| {
        rows.iter()
            .filter(|(name, _)| name.starts_with(n))
            .map(|(_, (cpu, _))| *cpu)
            .fold(f64::INFINITY, f64::min)
    };
    println!(
        "hypertool's span costs {:.2} of the SDK's (best of each)",
        best("hypertool") / best("OpenTelemetry")
    );
}
