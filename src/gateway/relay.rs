//! Streamed calls: the upstream's SSE relayed chunk by chunk (usage read on the way, the gate's
//! verdict as a comment before `[DONE]`), and cached or mocked answers as SSE.

use super::*;

pub(super) type SourceStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// A cached answer replayed as an SSE stream.
/// A JSON response from bytes that already are JSON.
pub(super) fn json_bytes(body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub(super) fn cached_stream(entry: &cache::Entry, wants_usage: bool) -> Response {
    let value = Completion::value(&entry.response);
    let r = &value;
    let id = r.get("id").cloned().unwrap_or(Value::Null);
    let model = r.get("model").cloned().unwrap_or(Value::Null);
    let created = r.get("created").cloned().unwrap_or(Value::Null);
    let mut out: Vec<Result<Bytes, Infallible>> = Vec::new();
    for c in r
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let index = c.get("index").cloned().unwrap_or(json!(0));
        let message = c.get("message").cloned().unwrap_or(json!({}));
        let chunk = |delta: Value, finish: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})
            .to_string()
        };
        let mut delta = json!({"role": "assistant", "content": message.get("content").cloned().unwrap_or(Value::Null)});
        if let Some(calls) = message.get("tool_calls") {
            delta["tool_calls"] = calls.clone();
        }
        out.push(Ok(sse(&chunk(delta, Value::Null))));
        out.push(Ok(sse(&chunk(
            json!({}),
            c.get("finish_reason").cloned().unwrap_or(json!("stop")),
        ))));
    }
    if wants_usage {
        out.push(Ok(sse(&json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": r.get("usage").cloned().unwrap_or(Value::Null)}).to_string())));
    }
    out.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    let mut resp = Response::new(Body::from_stream(futures_util::stream::iter(out)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

pub(super) async fn stream_call(
    state: GatewayState,
    settings: Arc<GatewaySettings>,
    meta: CallMeta,
    mut request: Map<String, Value>,
    reservation: Reservation,
    started: Instant,
) -> Result<Response, ApiError> {
    // Ask the upstream for usage; remember whether the client asked, to strip it otherwise.
    let client_wants_usage = request
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut options = request
        .get("stream_options")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    options.insert("include_usage".into(), Value::Bool(true));
    request.insert("stream_options".into(), Value::Object(options));
    let mut body = Value::Object(request);

    // Streams are not retried once they have begun; before the first byte, fallbacks are tried.
    let mut opened = None;
    let mut last_error = None;
    for candidate in candidates(&settings, &meta.route) {
        body["model"] = Value::String(candidate.upstream_model.clone());
        let attempt_body = &body;
        let traced = trace::Attempt::begin(&state, &meta);
        let opening = trace::Attempt::scope(traced.as_ref(), async {
            match Provider::of(&settings, &state.http, &candidate) {
                Ok(provider) => provider.open_stream(attempt_body, &candidate.name).await,
                Err(e) => Err(e),
            }
        })
        .await;
        match opening {
            Ok(s) => {
                opened = Some((candidate, s, traced));
                break;
            }
            Err(e) => {
                trace::generation(
                    &state,
                    &meta,
                    traced,
                    body.get("messages"),
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
    let Some((answered_by, source, traced)) = opened else {
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
    state.tasks.clone().spawn(relay(
        state,
        task_meta,
        Arc::new(body),
        source,
        tx,
        client_wants_usage,
        timeout,
        reservation,
        started,
        traced,
    ));
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response_headers(&mut resp, &meta);
    Ok(resp)
}

/// Copies the upstream's SSE events to the client, watching for usage, and records the call when
/// the stream ends — with the upstream's usage, or estimated when there was none or the client left.
#[allow(clippy::too_many_arguments)]
pub(super) async fn relay(
    state: GatewayState,
    meta: CallMeta,
    request: Arc<Value>,
    mut source: SourceStream,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    client_wants_usage: bool,
    timeout: Duration,
    reservation: Reservation,
    started: Instant,
    traced: Option<trace::Attempt>,
) {
    let generation = traced.as_ref().map(|a| a.span_id);
    let mut verdict = None;
    let mut decoder = super::sse::SseDecoder::default();
    let mut datas: Vec<String> = Vec::new();
    let mut content = String::new();
    let mut usage: Option<(u64, u64)> = None;
    let mut done = false;
    let mut client_gone = false;
    let mut failure: Option<UpstreamError> = None;
    // Taken when the usage is stored (at `[DONE]`, or after the stream when it was cut).
    let mut unsettled = Some(reservation);
    // When the completion streamed so far was last written down (`call_progress`).
    let mut progress_at = Instant::now();
    'read: loop {
        let next = match tokio::time::timeout(timeout, source.next()).await {
            Ok(n) => n,
            Err(_) => {
                failure = Some(UpstreamError::Timeout {
                    upstream: meta.route.upstream.clone(),
                    after: timeout,
                });
                break;
            }
        };
        let bytes = match next {
            None => break,
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                failure = Some(e);
                break;
            }
        };
        datas.clear();
        if decoder.push(&bytes, &mut datas).is_err() {
            failure = Some(UpstreamError::Invalid {
                upstream: meta.route.upstream.clone(),
                detail: format!("a stream line longer than {} bytes", super::sse::MAX_LINE),
            });
            break;
        }
        for data in &datas {
            let data = data.as_str();
            let out = if data.trim() == "[DONE]" {
                done = true;
                // A gated stage: the verdict on the complete output goes out as an SSE
                // comment (clients ignore comments; headers are long gone).
                let (prompt, completion, estimated) = final_usage(usage, &request, &meta, &content);
                verdict = judge(&state, &meta, &content, completion, 1, generation).await;
                // The usage is stored before the last event goes out: a client that saw the
                // stream end finds its call in the ledger with these numbers, however the
                // process ends after.
                settle_once(
                    &state,
                    &meta,
                    &mut unsettled,
                    (prompt, completion, estimated),
                    started,
                )
                .await;
                match &verdict {
                    Some(v) => Some(Bytes::from(format!(
                        ": x-hypertool-quality-gate: {}\n\ndata: [DONE]\n\n",
                        stage::header_safe(&v.summary())
                    ))),
                    None => Some(Bytes::from_static(b"data: [DONE]\n\n")),
                }
            } else {
                match serde_json::from_str::<Value>(data) {
                    Ok(mut chunk) => {
                        if let Some(u) = usage_of(&chunk) {
                            usage = Some(u);
                        }
                        for c in chunk
                            .get("choices")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                        {
                            if let Some(piece) = c.pointer("/delta/content").and_then(Value::as_str)
                            {
                                content.push_str(piece);
                            }
                            if let Some(calls) = c.pointer("/delta/tool_calls") {
                                content.push_str(&calls.to_string());
                            }
                        }
                        if client_wants_usage {
                            Some(sse(data))
                        } else {
                            let no_choices = chunk
                                .get("choices")
                                .and_then(Value::as_array)
                                .is_some_and(|c| c.is_empty());
                            if no_choices && chunk.get("usage").is_some_and(|u| !u.is_null()) {
                                None
                            } else if let Some(obj) = chunk.as_object_mut() {
                                obj.remove("usage");
                                Some(sse(&Value::Object(obj.clone()).to_string()))
                            } else {
                                Some(sse(data))
                            }
                        }
                    }
                    // Not JSON: pass it on untouched.
                    Err(_) => Some(sse(data)),
                }
            };
            if let Some(out) = out {
                if tx.send(Ok(out)).await.is_err() {
                    client_gone = true;
                    break 'read;
                }
            }
        }
        if !done && progress_at.elapsed() >= PROGRESS_EVERY {
            progress_at = Instant::now();
            note_progress(&state, &meta, tokens::count_text(&content)).await;
        }
    }
    drop(source);
    if failure.is_none() && !done && !client_gone {
        failure = Some(UpstreamError::Invalid {
            upstream: meta.route.upstream.clone(),
            detail: "the stream ended before [DONE]".into(),
        });
    }
    if let Some(e) = &failure {
        if let Some(held_back) =
            state
                .warnings
                .admit(&meta.route.name, "stream_ended_early", Instant::now())
        {
            tracing::warn!(persona = %meta.persona, model = %meta.route.name,
                similar_held_back = held_back, "stream ended early: {}", e.message());
        }
        let err =
            json!({"error": {"message": e.message(), "type": "upstream_error", "code": e.code()}});
        let _ = tx.send(Ok(sse(&err.to_string()))).await;
    }
    drop(tx);
    let (prompt, completion, estimated) = final_usage(usage, &request, &meta, &content);
    if client_gone {
        tracing::info!(persona = %meta.persona, model = %meta.route.name, "client left mid-stream; usage estimated");
    }
    if meta.trace.is_some() {
        trace::generation(
            &state,
            &meta,
            traced,
            request.get("messages"),
            trace::AttemptOutcome {
                route: &meta.route,
                usage: Some((prompt, completion)),
                output: Some(&content),
                error: failure.as_ref(),
                gate_attempt: 1,
                retry: 0,
                streamed: true,
                operation: "chat",
            },
        );
        trace::request(
            &state,
            &meta,
            trace::CallOutcome {
                status: 200,
                attempts: 1,
                verdict: verdict.as_ref(),
                usage: Some((prompt, completion)),
                error: failure.as_ref().map(|e| e.message()),
                ..Default::default()
            },
        );
    }
    // A stream cut before `[DONE]` (the client left, the upstream failed): its completion so
    // far, counted, or the upstream's usage if it came.
    settle_once(
        &state,
        &meta,
        &mut unsettled,
        (prompt, completion, estimated),
        started,
    )
    .await;
    state.count(
        &meta.route.upstream,
        if failure.is_some() {
            "upstream_error"
        } else {
            "ok"
        },
    );
}

/// Stores the stream's usage (and settles its reservation) unless that was done already: at
/// `[DONE]`, or after a stream that was cut before it.
async fn settle_once(
    state: &GatewayState,
    meta: &CallMeta,
    unsettled: &mut Option<Reservation>,
    (prompt, completion, estimated): (u64, u64, bool),
    started: Instant,
) {
    if let Some(reservation) = unsettled.take() {
        record(
            state,
            meta,
            (prompt, completion),
            estimated,
            started,
            reservation,
        )
        .await;
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
        at: state.clock.now_ms(),
        event: Event::CallProgress {
            call,
            completion_tokens,
        },
    };
    state.writer.append_accounting(vec![event], |_| {}).await;
}

/// A stream's usage: the upstream's, else the prompt counted and the completion so far counted
/// (`estimated`).
fn final_usage(
    usage: Option<(u64, u64)>,
    request: &Value,
    meta: &CallMeta,
    content: &str,
) -> (u64, u64, bool) {
    match usage {
        Some((p, c)) => (p, c, false),
        None => (
            request
                .as_object()
                .map(counted_prompt)
                .unwrap_or(meta.prompt_estimate),
            tokens::count_text(content),
            true,
        ),
    }
}

#[cfg(test)]
mod warn_throttle_tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_logged_once_per_window_with_the_count_held_back() {
        let t = WarnThrottle::default();
        let t0 = Instant::now();
        assert_eq!(t.admit("gpt", "upstream_timeout", t0), Some(0));
        assert_eq!(
            t.admit("gpt", "upstream_timeout", t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            t.admit("gpt", "upstream_timeout", t0 + Duration::from_secs(9)),
            None
        );
        // Another model or kind has its own window.
        assert_eq!(
            t.admit("gpt", "upstream_error", t0 + Duration::from_secs(9)),
            Some(0)
        );
        assert_eq!(
            t.admit("mini", "upstream_timeout", t0 + Duration::from_secs(9)),
            Some(0)
        );
        assert_eq!(t.admit("gpt", "upstream_timeout", t0 + WARN_EVERY), Some(2));
        assert_eq!(t.admit("gpt", "upstream_timeout", t0 + WARN_EVERY), None);
    }
}
