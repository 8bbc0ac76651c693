//! What only Langfuse needs: its endpoints and auth, and quality-gate verdicts as scores through
//! its ingestion API (the one use left for that API now that traces go through OTLP).

use std::sync::Arc;

use serde_json::json;

use super::span::Score;
use crate::core::clock::to_rfc3339;

/// `{host}/api/public/otel/v1/traces`
pub fn traces_url(host: &str) -> String {
    format!("{}/api/public/otel/v1/traces", host.trim_end_matches('/'))
}

/// `{host}/api/public/ingestion`
pub fn scores_url(host: &str) -> String {
    format!("{}/api/public/ingestion", host.trim_end_matches('/'))
}

/// The JSON body of one ingestion batch of `score-create` events. Event and score ids are the
/// score's own stable id, so a re-sent batch updates rather than duplicates.
pub fn score_batch(scores: &[Arc<Score>]) -> Vec<u8> {
    let batch: Vec<serde_json::Value> = scores
        .iter()
        .map(|s| {
            let mut body = json!({
                "id": s.id,
                "traceId": s.trace_id.hex(),
                "name": s.name,
                "value": s.value,
                "dataType": "NUMERIC",
            });
            if let Some(o) = s.observation {
                body["observationId"] = json!(o.hex());
            }
            if let Some(c) = &s.comment {
                body["comment"] = json!(c);
            }
            json!({
                "id": format!("{}-event", s.id),
                "type": "score-create",
                "timestamp": to_rfc3339(s.at_ms),
                "body": body,
            })
        })
        .collect();
    json!({ "batch": batch }).to_string().into_bytes()
}
