//! Streamed calls: the upstream's SSE relayed chunk by chunk (usage read on the way, the gate's
//! verdict as a comment before `[DONE]`), and cached or mocked answers as SSE.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use futures_util::{FutureExt, Stream, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::gateway::GatewaySettings;
use crate::core::event::{Event, Stamped};
use crate::core::workflow::GateVerdict;
use crate::telemetry::trace::ids::SpanId;
use crate::web::error::ApiError;

use super::accounting::{record, release_admission};
use super::admission::Reservation;
use super::dialect::{CallRequest, Dialect};
use super::dispatch::{candidates, gateway_error, judge, timeout_of};
use super::handlers::response_headers;
use super::provider::Provider;
use super::upstream::UpstreamError;
use super::{cache, dialect, stage, tokens, trace, upstream, CallMeta, GatewayState};

pub(super) type SourceStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// A JSON response from bytes that already are JSON.
pub(super) fn json_bytes(body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn event_stream(body: Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A chat client's `stream_options.include_usage` (other dialects always carry usage).
fn client_wants_usage(request: &CallRequest) -> bool {
    request.dialect != Dialect::Chat
        || request
            .body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
}

/// A cached answer (stored in the client's dialect) replayed as a stream in that dialect.
pub(super) fn cached_stream(
    entry: &cache::Entry,
    request: &CallRequest,
    prompt_estimate: u64,
) -> Response {
    let events = match dialect::parse_answer(request.dialect, &entry.response) {
        Ok(answer) => dialect::answer_stream(
            &answer,
            request.dialect,
            client_wants_usage(request),
            prompt_estimate,
            false,
        ),
        Err(_) => Vec::new(),
    };
    let chunks = events.into_iter().map(Ok::<Bytes, Infallible>);
    event_stream(Body::from_stream(futures_util::stream::iter(chunks)))
}

pub(super) async fn stream_call(
    state: GatewayState,
    settings: Arc<GatewaySettings>,
    meta: CallMeta,
    mut request: CallRequest,
    reservation: Reservation,
    started: Instant,
) -> Result<Response, ApiError> {
    // A chat upstream is asked for usage; whether the client asked is remembered, to strip it
    // otherwise.
    let wants_usage = client_wants_usage(&request);
    if request.dialect == Dialect::Chat {
        let mut options = request
            .body
            .get("stream_options")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        options.insert("include_usage".into(), Value::Bool(true));
        request
            .body
            .insert("stream_options".into(), Value::Object(options));
    }

    // Streams are not retried once they have begun; before the first byte, fallbacks are tried.
    let mut opened = None;
    let mut last_error = None;
    for candidate in candidates(&settings, &meta.route) {
        request.body.insert(
            "model".into(),
            Value::String(candidate.upstream_model.clone()),
        );
        let attempt_request = &request;
        let traced = trace::Attempt::begin(&state, &meta);
        let opening = trace::Attempt::scope(traced.as_ref(), async {
            match Provider::of(&settings, &state.http, &candidate) {
                Ok(provider) => provider.open_stream(attempt_request, &candidate.name).await,
                Err(e) => Err(e),
            }
        })
        .await;
        match opening {
            Ok((s, from)) => {
                opened = Some((candidate, s, from, traced));
                break;
            }
            Err(e) => {
                trace::generation(
                    &state,
                    &meta,
                    traced,
                    request.body.get("messages"),
                    trace::AttemptOutcome {
                        route: &candidate,
                        usage: None,
                        output: None,
                        error: Some(&e),
                        gate_attempt: 1,
                        retry: 0,
                        streamed: true,
                        operation: "chat",
                    },
                );
                if let Some(held_back) =
                    state
                        .warnings
                        .admit(&candidate.name, e.code(), Instant::now())
                {
                    tracing::warn!(model = %candidate.name, similar_held_back = held_back, "{}", e.message());
                }
                last_error = Some(e);
            }
        }
    }
    let Some((answered_by, source, from, traced)) = opened else {
        state.count(&meta.route.upstream, "upstream_error");
        let e = last_error.unwrap_or(UpstreamError::Unreachable {
            upstream: meta.route.upstream.clone(),
        });
        release_admission(&state, &meta, vec![reservation]).await;
        return Err(gateway_error(&e));
    };
    let mut meta = meta;
    meta.route = answered_by;
    let timeout = timeout_of(&settings, &meta.route);

    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let task_meta = meta.clone();
    let to = request.dialect;
    let relaying = relay(
        state.clone(),
        task_meta,
        Arc::new(request),
        Source {
            events: source,
            dialect: from,
        },
        tx.clone(),
        wants_usage,
        timeout,
        reservation,
        started,
        traced,
    );
    let upstream = meta.route.upstream.clone();
    state.shared.tasks.clone().spawn(async move {
        // A relay that panics (a bug) ends its stream with an error event in the client's
        // dialect, not a cut connection; its reservation settles the call at its estimate.
        if std::panic::AssertUnwindSafe(relaying)
            .catch_unwind()
            .await
            .is_err()
        {
            state.count_internal_error(&upstream);
            let e = ApiError::internal_error();
            let _ = tx.send(Ok(error_event(to, e.code, &e.message))).await;
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut resp = event_stream(Body::from_stream(stream));
    response_headers(&mut resp, &meta);
    Ok(resp)
}

/// An upstream's stream and the dialect of its events.
pub(super) struct Source {
    events: SourceStream,
    dialect: Dialect,
}

/// How the upstream's events reach the client: forwarded as they came (the same dialect), or
/// translated through their [`dialect::Delta`]s.
enum Output {
    Forward,
    Translate(Box<dialect::StreamEncoder>),
}

/// An upstream event forwarded in its own dialect. A chat chunk's usage is removed unless the
/// client asked for it (hypertool always asks the upstream).
fn forward(
    dialect: Dialect,
    data: &str,
    parsed: Option<Value>,
    wants_usage: bool,
    out: &mut Vec<Bytes>,
) {
    let Some(mut chunk) = parsed else {
        // Not JSON: passed on untouched.
        out.push(dialect::chat::sse(data));
        return;
    };
    if dialect != Dialect::Chat {
        let kind = chunk.get("type").and_then(Value::as_str);
        out.push(dialect::messages::forward(data, kind));
        return;
    }
    if wants_usage {
        out.push(dialect::chat::sse(data));
        return;
    }
    let no_choices = chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|c| c.is_empty());
    if no_choices && chunk.get("usage").is_some_and(|u| !u.is_null()) {
        return;
    }
    match chunk.as_object_mut() {
        Some(obj) if obj.contains_key("usage") => {
            obj.remove("usage");
            out.push(dialect::chat::sse(&chunk.to_string()));
        }
        _ => out.push(dialect::chat::sse(data)),
    }
}

/// What a stream has produced so far, read from its deltas, and counted as it came.
#[derive(Default)]
struct Produced {
    /// The text and tool calls (what a gate judges).
    content: String,
    content_count: tokens::RunningCount,
    /// The model's reasoning (counted, not judged).
    reasoning_count: tokens::RunningCount,
    usage: Option<dialect::TokenUsage>,
}

impl Produced {
    fn absorb(&mut self, deltas: &[dialect::Delta]) {
        use dialect::Delta;
        for d in deltas {
            let text = match d {
                Delta::Text(t) => t,
                Delta::ToolStart { name, .. } => name,
                Delta::ToolArgs { json, .. } => json,
                Delta::Thinking(t) => {
                    self.reasoning_count.push(t);
                    continue;
                }
                Delta::Usage(u) => {
                    self.usage = Some(*u);
                    continue;
                }
                Delta::Start { .. } | Delta::ThinkingSignature(_) | Delta::Stop(_) => continue,
            };
            self.content.push_str(text);
            self.content_count.push(text);
        }
    }

    /// The completion so far, counted (in bounded time: see [`tokens::RunningCount`]).
    fn counted(&self) -> u64 {
        self.content_count.total() + self.reasoning_count.total()
    }
}

/// Copies the upstream's stream events to the client — as they came, or translated into the
/// client's dialect — reading usage and content on the way, and records the call when the stream
/// ends: with the upstream's usage, or estimated when there was none or the stream was cut.
#[allow(clippy::too_many_arguments)]
pub(super) async fn relay(
    state: GatewayState,
    meta: CallMeta,
    request: Arc<CallRequest>,
    source: Source,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    wants_usage: bool,
    timeout: Duration,
    reservation: Reservation,
    started: Instant,
    traced: Option<trace::Attempt>,
) {
    let Source {
        events,
        dialect: from,
    } = source;
    let to = request.dialect;
    let output = if from == to {
        Output::Forward
    } else {
        Output::Translate(Box::new(dialect::StreamEncoder::new(
            to,
            wants_usage,
            meta.prompt_estimate,
        )))
    };
    let mut relay = Relay {
        generation: traced.as_ref().map(|a| a.span_id),
        state,
        meta,
        request,
        from,
        to,
        wants_usage,
        output,
        produced: Produced::default(),
        verdict: None,
        unsettled: Some(reservation),
        started,
    };
    let ending = relay.copy(events, &tx, timeout).await;
    if let Some(e) = &ending.failure {
        relay.tell_failure(e, &tx).await;
    }
    drop(tx);
    relay.finish(ending, traced).await;
}

/// One stream being relayed: where it comes from and goes to, what it has produced, and the
/// reservation its usage settles.
struct Relay {
    state: GatewayState,
    meta: CallMeta,
    request: Arc<CallRequest>,
    from: Dialect,
    to: Dialect,
    wants_usage: bool,
    /// The attempt's generation span (the gate's verdict is attached to it).
    generation: Option<SpanId>,
    output: Output,
    produced: Produced,
    verdict: Option<GateVerdict>,
    /// Taken when the usage is stored (at the stream's end, or after the stream when it was cut).
    unsettled: Option<Reservation>,
    started: Instant,
}

/// How the copying ended.
#[derive(Default)]
struct Ending {
    /// The terminal event came (and was sent on).
    done: bool,
    client_gone: bool,
    failure: Option<UpstreamError>,
}

impl Relay {
    /// Reads the upstream until its terminal event, a failure, a silence longer than `timeout`,
    /// or the client leaving; writes the completion so far down every [`PROGRESS_EVERY`].
    async fn copy(
        &mut self,
        mut source: SourceStream,
        tx: &mpsc::Sender<Result<Bytes, Infallible>>,
        timeout: Duration,
    ) -> Ending {
        let mut sse_decoder = super::sse::SseDecoder::default();
        let mut decoder = dialect::StreamDecoder::new(self.from);
        let mut datas: Vec<String> = Vec::new();
        let mut deltas: Vec<dialect::Delta> = Vec::new();
        let mut out: Vec<Bytes> = Vec::new();
        let mut ending = Ending::default();
        // When the completion streamed so far was last written down (`call_progress`).
        let mut progress_at = Instant::now();
        'read: loop {
            let bytes = match tokio::time::timeout(timeout, source.next()).await {
                Err(_) => {
                    ending.failure = Some(UpstreamError::Timeout {
                        upstream: self.meta.route.upstream.clone(),
                        after: timeout,
                    });
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    ending.failure = Some(e);
                    break;
                }
                Ok(Some(Ok(b))) => b,
            };
            datas.clear();
            if sse_decoder.push(&bytes, &mut datas).is_err() {
                ending.failure = Some(self.invalid(format!(
                    "a stream line longer than {} bytes",
                    super::sse::MAX_LINE
                )));
                break;
            }
            for data in &datas {
                deltas.clear();
                out.clear();
                match self
                    .on_event(&mut decoder, data, &mut deltas, &mut out)
                    .await
                {
                    Ok(done) => ending.done = done,
                    Err(e) => {
                        ending.failure = Some(e);
                        break 'read;
                    }
                }
                for chunk in out.drain(..) {
                    if tx.send(Ok(chunk)).await.is_err() {
                        ending.client_gone = true;
                        break 'read;
                    }
                }
                if ending.done {
                    break 'read;
                }
            }
            if progress_at.elapsed() >= PROGRESS_EVERY {
                progress_at = Instant::now();
                note_progress(&self.state, &self.meta, self.produced.counted()).await;
            }
        }
        drop(source);
        if ending.failure.is_none() && !ending.done && !ending.client_gone {
            ending.failure = Some(self.invalid(match self.from {
                Dialect::Chat => "the stream ended before [DONE]".into(),
                Dialect::Messages => "the stream ended before message_stop".into(),
                Dialect::Responses => "the stream ended before response.completed".into(),
            }));
        }
        ending
    }

    /// One upstream event: its deltas read and what goes to the client put in `out`; `Ok(true)`
    /// at the stream's end.
    async fn on_event(
        &mut self,
        decoder: &mut dialect::StreamDecoder,
        data: &str,
        deltas: &mut Vec<dialect::Delta>,
        out: &mut Vec<Bytes>,
    ) -> Result<bool, UpstreamError> {
        match decoder.decode(data, deltas) {
            dialect::Decoded::End => {
                self.end(data, deltas, out).await;
                Ok(true)
            }
            dialect::Decoded::Error(message) => Err(self.invalid(format!(
                "an error in the stream: {}",
                upstream::scrub(&message, None)
            ))),
            dialect::Decoded::Event(parsed) => {
                self.produced.absorb(deltas);
                match &mut self.output {
                    Output::Forward => forward(self.to, data, parsed, self.wants_usage, out),
                    Output::Translate(encoder) => {
                        for d in deltas.iter() {
                            encoder.encode(d, out);
                        }
                    }
                }
                Ok(false)
            }
        }
    }

    /// The terminal event: the gate's verdict on the complete output, the usage stored, then the
    /// last events (the verdict as an SSE comment before them).
    async fn end(&mut self, data: &str, deltas: &[dialect::Delta], out: &mut Vec<Bytes>) {
        // The end may carry the usage (`response.completed`).
        self.produced.absorb(deltas);
        let (used, estimated) = final_usage(&self.produced, true, &self.request).await;
        // A gated stage: the verdict on the complete output goes out as an SSE comment (clients
        // ignore comments; headers are long gone).
        self.verdict = judge(
            &self.state,
            &self.meta,
            &self.produced.content,
            used.output,
            1,
            false,
            self.generation,
        )
        .await;
        // The usage is stored before the last event goes out: a client that saw the stream end
        // finds its call in the ledger with these numbers, however the process ends after.
        self.settle((used, estimated)).await;
        let comment = self.verdict.as_ref().map(|v| {
            format!(
                "x-hypertool-quality-gate: {}",
                stage::header_safe(&v.summary())
            )
        });
        match &mut self.output {
            Output::Translate(encoder) => encoder.finish(comment.as_deref(), out),
            Output::Forward => {
                out.extend(comment.as_deref().map(dialect::comment));
                out.push(match self.to {
                    Dialect::Chat => Bytes::from_static(b"data: [DONE]\n\n"),
                    // The terminal event as it came (`message_stop`, `response.completed`), its
                    // `event:` line from its type.
                    Dialect::Messages | Dialect::Responses => {
                        let kind = serde_json::from_str::<Value>(data).ok().and_then(|v| {
                            v.get("type").and_then(Value::as_str).map(str::to_string)
                        });
                        dialect::messages::forward(data, kind.as_deref())
                    }
                });
            }
        }
    }

    /// A failed stream: warned about (rate-limited), and ended for the client with an error
    /// event in its dialect.
    async fn tell_failure(&self, e: &UpstreamError, tx: &mpsc::Sender<Result<Bytes, Infallible>>) {
        let meta = &self.meta;
        if let Some(held_back) =
            self.state
                .warnings
                .admit(&meta.route.name, "stream_ended_early", Instant::now())
        {
            tracing::warn!(persona = %meta.persona, model = %meta.route.name,
                similar_held_back = held_back, "stream ended early: {}", e.message());
        }
        let _ = tx
            .send(Ok(error_event(self.to, e.code(), &e.message())))
            .await;
    }

    /// After the stream: its trace, its usage (if the end did not store it) and its count.
    async fn finish(mut self, ending: Ending, traced: Option<trace::Attempt>) {
        let (used, estimated) = final_usage(&self.produced, ending.done, &self.request).await;
        let usage = Some((used.input, used.output));
        let (state, meta) = (&self.state, &self.meta);
        if ending.client_gone {
            tracing::info!(persona = %meta.persona, model = %meta.route.name, "client left mid-stream; usage estimated");
        }
        if meta.trace.is_some() {
            trace::generation(
                state,
                meta,
                traced,
                self.request.body.get("messages"),
                trace::AttemptOutcome {
                    route: &meta.route,
                    usage,
                    output: Some(&self.produced.content),
                    error: ending.failure.as_ref(),
                    gate_attempt: 1,
                    retry: 0,
                    streamed: true,
                    operation: "chat",
                },
            );
            trace::request(
                state,
                meta,
                trace::CallOutcome {
                    status: 200,
                    attempts: 1,
                    verdict: self.verdict.as_ref(),
                    usage,
                    error: ending.failure.as_ref().map(|e| e.message()),
                    ..Default::default()
                },
            );
        }
        // A stream cut before its end (the client left, the upstream failed): its completion so
        // far, counted, or the upstream's usage if it came.
        self.settle((used, estimated)).await;
        let outcome = if ending.failure.is_some() {
            "upstream_error"
        } else {
            "ok"
        };
        self.state.count(&self.meta.route.upstream, outcome);
    }

    /// Stores the stream's usage (and settles its reservation) unless that was done already: at
    /// the stream's end, or after a stream that was cut before it.
    async fn settle(&mut self, (used, estimated): (dialect::TokenUsage, bool)) {
        if let Some(reservation) = self.unsettled.take() {
            record(
                &self.state,
                &self.meta,
                used,
                estimated,
                self.started,
                reservation,
            )
            .await;
        }
    }

    fn invalid(&self, detail: String) -> UpstreamError {
        UpstreamError::Invalid {
            upstream: self.meta.route.upstream.clone(),
            detail,
        }
    }
}

/// A stream's error event in `to`'s dialect.
fn error_event(to: Dialect, code: &str, message: &str) -> Bytes {
    match to {
        Dialect::Chat => dialect::chat::error_event(code, message),
        Dialect::Messages => dialect::messages::error_event(code, message),
        Dialect::Responses => dialect::responses::error_event(code, message),
    }
}

/// How often a stream's completion so far is written down: a crash then under-counts a stream
/// it cuts off by at most this long of its output.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Writes down how much of the call's completion has been streamed (not awaited: it shares the
/// writer's next commit).
async fn note_progress(state: &GatewayState, meta: &CallMeta, completion_tokens: u64) {
    let Some(call) = meta.call_id.clone() else {
        return;
    };
    let event = Stamped {
        at: state.shared.clock.now_ms(),
        event: Event::CallProgress {
            call,
            completion_tokens,
        },
    };
    state
        .shared
        .writer
        .append_accounting(vec![event], |_| {})
        .await;
}

/// A stream's usage: the upstream's once the stream is complete; for a stream that was cut (or
/// had none), the prompt as the upstream said or counted, and the larger of the completion the
/// upstream had reported and what was streamed, counted (`estimated`): never zero for a stream
/// that produced something.
async fn final_usage(
    produced: &Produced,
    done: bool,
    request: &CallRequest,
) -> (dialect::TokenUsage, bool) {
    match produced.usage {
        Some(u) if done => (u, false),
        reported => {
            let mut used = reported.unwrap_or_default();
            if used.input == 0 {
                used.input = tokens::count_prompt(request, tokens::DEFAULT_DEADLINE).await;
            }
            used.output = used.output.max(produced.counted());
            (used, true)
        }
    }
}
