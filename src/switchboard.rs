//! The one path by which a persona switch is decided and recorded, whoever asks for it: the API
//! (`POST /v1/personas/switch`) and the MCP proxy's `equip-persona` answer the same thing the same
//! way.
//!
//! Decisions are serialized (two requests must not both pass a cooldown), taken by
//! [`Engine::decide_switch`] (cooldown of the chatmode, A→B→A→B oscillation), and stored before
//! they are answered: a `persona_switch` or a `switch_suppressed` event.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::core::clock::Clock;
use crate::core::engine::{Engine, SwitchDecision};
use crate::core::event::{Event, PersonaSwitch, Stamped};
use crate::store::writer::{lock, WriterHandle};
use crate::store::LedgerError;

/// What a switch needs: the engine that decides, the writer that records, and the lock that makes
/// decisions one at a time.
#[derive(Clone)]
pub struct Switchboard {
    pub engine: Arc<Mutex<Engine>>,
    pub writer: WriterHandle,
    pub serial: Arc<tokio::sync::Mutex<()>>,
    pub clock: Arc<dyn Clock>,
}

impl Switchboard {
    /// Decides and records a switch of `session` to `to` (a canonical persona name). The answer
    /// names the persona in force: `{"session", "persona", "switched", …}` — with `reason`
    /// (`already_current`, `cooldown`, `oscillation`) and `retry_after_seconds` when it did not
    /// switch.
    pub async fn switch(
        &self,
        session: &str,
        to: &str,
        chatmode: &str,
    ) -> Result<Value, LedgerError> {
        let _serial = self.serial.lock().await;
        let now = self.clock.now_ms();
        let decision = lock(&self.engine).decide_switch(session, to, chatmode, now);
        let oscillation_json = |o: &Option<(String, String)>| {
            o.as_ref()
                .map(|(a, b)| json!({ "personas": [a, b] }))
                .unwrap_or(Value::Null)
        };
        match decision {
            SwitchDecision::AlreadyCurrent => Ok(json!({
                "session": session,
                "persona": to,
                "switched": false,
                "reason": "already_current",
            })),
            SwitchDecision::Switch { from, oscillation } => {
                self.writer
                    .append(vec![Stamped {
                        at: now,
                        event: Event::PersonaSwitch(PersonaSwitch {
                            session: session.to_string(),
                            from: from.clone(),
                            to: to.to_string(),
                            chatmode: chatmode.to_string(),
                        }),
                    }])
                    .await?;
                Ok(json!({
                    "session": session,
                    "persona": to,
                    "switched": true,
                    "from": from,
                    "chatmode": chatmode,
                    "oscillation": oscillation_json(&oscillation),
                }))
            }
            SwitchDecision::Keep {
                current,
                reason,
                retry_after_ms,
                oscillation,
            } => {
                self.writer
                    .append(vec![Stamped {
                        at: now,
                        event: Event::SwitchSuppressed {
                            session: session.to_string(),
                            from: Some(current.clone()),
                            to: to.to_string(),
                            chatmode: chatmode.to_string(),
                            reason: reason.to_string(),
                        },
                    }])
                    .await?;
                tracing::info!(session, persona = %current, requested = %to, chatmode,
                    reason, "persona switch suppressed");
                Ok(json!({
                    "session": session,
                    "persona": current,
                    "switched": false,
                    "requested": to,
                    "chatmode": chatmode,
                    "reason": reason,
                    "retry_after_seconds": retry_after_ms.map(|ms| ms as f64 / 1000.0),
                    "oscillation": oscillation_json(&oscillation),
                }))
            }
        }
    }
}
