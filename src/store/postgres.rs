//! The ledger on PostgreSQL, for several replicas behind one load balancer.
//!
//! Positions come from a one-row counter (`hypertool_sequence`) that each append moves forward in
//! its own transaction: the row lock is held until the commit, so positions are handed out in
//! commit order and a reader that has seen position `n` has seen everything before it. That is
//! what lets every replica apply the whole fleet's events in one order ([`Ledger::shared`]).
//!
//! The schema is versioned (`hypertool_schema_migrations`); start-up applies what is missing under
//! an advisory lock, so replicas starting together migrate once, and refuses a database migrated
//! by a newer hypertool. The URL may carry a password: it is never logged nor put in an error
//! (errors show [`redacted`]).

use std::sync::Mutex;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use crate::config::secret::redacted;
use crate::tls::PgConnector;

use super::{Columns, Ledger, LedgerError, LedgerTotals, Origin};
use crate::core::budget::BudgetSpec;
use crate::core::event::{Event, Stamped};

/// Each migration once, in order; never edit one that shipped, add the next.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
    "CREATE TABLE hypertool_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     INSERT INTO hypertool_meta (key, value) VALUES ('ledger_id', md5(random()::text || clock_timestamp()::text));
     CREATE TABLE hypertool_sequence (one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), last BIGINT NOT NULL);
     INSERT INTO hypertool_sequence (one, last) VALUES (TRUE, 0);
     CREATE TABLE hypertool_events (
         seq BIGINT PRIMARY KEY,
         at_ms BIGINT NOT NULL,
         kind TEXT NOT NULL,
         persona TEXT,
         chatmode TEXT,
         model TEXT,
         prompt_tokens BIGINT,
         completion_tokens BIGINT,
         cost_usd DOUBLE PRECISION,
         origin TEXT NOT NULL,
         body TEXT NOT NULL
     );
     CREATE INDEX hypertool_events_persona_at ON hypertool_events (persona, at_ms);
     CREATE TABLE hypertool_budget_overrides (
         persona TEXT PRIMARY KEY,
         spec TEXT NOT NULL,
         updated_at_ms BIGINT NOT NULL
     );",
    ),
    // The runbook's investigations and the gate history read by kind and time.
    (
        2,
        "CREATE INDEX hypertool_events_kind_at ON hypertool_events (kind, at_ms);",
    ),
    // Each replica's heartbeat: the calls a replica admitted stop holding budget once its lease
    // lapses (it died), instead of after STALE_ADMISSION_MS.
    (
        3,
        "CREATE TABLE hypertool_replicas (origin TEXT PRIMARY KEY, seen_ms BIGINT NOT NULL);",
    ),
];

/// Every event after a position, in order, with who stored it.
const EVENTS_AFTER: &str =
    "SELECT seq, at_ms, body, origin FROM hypertool_events WHERE seq > $1 ORDER BY seq";
/// The ledger's write lock: the position counter's row, held until the commit.
const LOCK_COUNTER: &str = "SELECT last FROM hypertool_sequence FOR UPDATE";

/// Taken while migrating (an arbitrary constant: "hypertool").
const MIGRATION_LOCK: i64 = 0x6879_7065_7274_6f6f;

pub struct PostgresLedger {
    connector: PgConnector,
    /// This replica's name in the `origin` column (its events count in its own counters).
    origin: String,
    /// `None` after the connection was lost: the next use reconnects.
    client: Mutex<Option<Client>>,
    shown: String,
}

/// How to reach the ledger at `url` (the settings' `[ledger] url` or `HYPERTOOL_LEDGER_URL`), with
/// the TLS its `sslmode` asks for and the ledger's trust. `application` names the connections in
/// `pg_stat_activity`.
pub fn connector(
    url: &str,
    settings: &crate::config::settings::Settings,
    application: &str,
) -> Result<PgConnector, LedgerError> {
    PgConnector::new(
        url,
        &settings.trust.ledger,
        settings.trust.config_dir.as_deref(),
        application,
        Duration::from_secs(5),
    )
    .map_err(|e| LedgerError::new("open", format!("{}: {e}", redacted(url))))
}

/// A connection error with its causes (a TLS refusal says why only in its source), and what to do
/// about a certificate the trust does not accept.
pub fn explain(e: &postgres::Error) -> String {
    let text = crate::core::text::error_chain(e);
    if text.contains("invalid peer certificate") {
        format!(
            "{text} (the server's certificate is not accepted: sslrootcert=FILE or [ledger] ca_file / [tls] ca_file must hold the CA that signed it; verify-full also needs the URL's host in the certificate)"
        )
    } else {
        text
    }
}

/// This replica's name on a shared ledger: made once, kept in `DATA_DIR/replica-id` (so each
/// replica needs a data directory of its own, which it has anyway for snapshots and spools).
pub fn replica_id(data_dir: &std::path::Path) -> Result<String, LedgerError> {
    let path = data_dir.join("replica-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| LedgerError::new("open", "no randomness for the replica id"))?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(data_dir)
        .and_then(|()| std::fs::write(&path, &id))
        .map_err(|e| LedgerError::new("open", format!("cannot write {}: {e}", path.display())))?;
    Ok(id)
}

fn pg(op: &'static str, e: postgres::Error) -> LedgerError {
    LedgerError::new(op, e)
}

impl PostgresLedger {
    /// Connects, applies missing migrations, and checks the schema is one this hypertool knows.
    pub fn open(url: &str, connector: PgConnector, origin: &str) -> Result<Self, LedgerError> {
        let shown = redacted(url);
        let mut client = connector.connect().map_err(|e| {
            LedgerError::new(
                "open",
                format!("cannot connect to {shown}: {}", explain(&e)),
            )
        })?;
        migrate(&mut client)?;
        Ok(Self {
            connector,
            origin: origin.to_string(),
            client: Mutex::new(Some(client)),
            shown,
        })
    }

    /// Runs `f` on the connection, reconnecting first when it was lost.
    fn with<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, LedgerError> {
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = None;
            let client = self.connector.connect().map_err(|e| {
                LedgerError::new(
                    op,
                    format!("cannot connect to {}: {}", self.shown, explain(&e)),
                )
            })?;
            *slot = Some(client);
        }
        let Some(client) = slot.as_mut() else {
            return Err(LedgerError::new(op, "no connection"));
        };
        let result = f(client);
        if result.is_err() && client.is_closed() {
            *slot = None;
        }
        result.map_err(|e| pg(op, e))
    }
}

fn migrate(client: &mut Client) -> Result<(), LedgerError> {
    let mut tx = client.transaction().map_err(|e| pg("migrate", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|e| pg("migrate", e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS hypertool_schema_migrations (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .map_err(|e| pg("migrate", e))?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM hypertool_schema_migrations", &[])
        .map_err(|e| pg("migrate", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(newer) = applied.iter().copied().filter(|v| *v > known).max() {
        return Err(LedgerError::new(
            "migrate",
            format!("the ledger's schema is at version {newer}, this hypertool knows up to {known}: run a hypertool at least as new as the one that migrated it"),
        ));
    }
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).map_err(|e| pg("migrate", e))?;
        tx.execute(
            "INSERT INTO hypertool_schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .map_err(|e| pg("migrate", e))?;
        tracing::info!(version, "ledger schema migrated");
    }
    tx.commit().map_err(|e| pg("migrate", e))
}

/// Events as the columns of one multi-row insert.
struct Rows<'a> {
    ats: Vec<i64>,
    kinds: Vec<&'static str>,
    personas: Vec<Option<&'a str>>,
    chatmodes: Vec<Option<&'a str>>,
    models: Vec<Option<&'a str>>,
    prompts: Vec<Option<i64>>,
    completions: Vec<Option<i64>>,
    costs: Vec<Option<f64>>,
    bodies: Vec<String>,
}

impl<'a> Rows<'a> {
    fn of(events: &'a [Stamped]) -> Result<Rows<'a>, LedgerError> {
        let mut rows = Rows {
            ats: Vec::with_capacity(events.len()),
            kinds: Vec::with_capacity(events.len()),
            personas: Vec::with_capacity(events.len()),
            chatmodes: Vec::with_capacity(events.len()),
            models: Vec::with_capacity(events.len()),
            prompts: Vec::with_capacity(events.len()),
            completions: Vec::with_capacity(events.len()),
            costs: Vec::with_capacity(events.len()),
            bodies: Vec::with_capacity(events.len()),
        };
        for s in events {
            let c = Columns::of(&s.event);
            rows.ats.push(s.at);
            rows.kinds.push(s.event.kind());
            rows.personas.push(c.persona);
            rows.chatmodes.push(c.chatmode);
            rows.models.push(c.model);
            rows.prompts.push(c.prompt_tokens);
            rows.completions.push(c.completion_tokens);
            rows.costs.push(c.cost_usd);
            rows.bodies
                .push(serde_json::to_string(&s.event).map_err(|e| LedgerError::new("append", e))?);
        }
        Ok(rows)
    }

    /// One statement for the whole batch, at positions from `first` on.
    fn insert(
        &self,
        tx: &mut postgres::Transaction<'_>,
        first: i64,
        origin: &str,
    ) -> Result<(), postgres::Error> {
        let seqs: Vec<i64> = (first..first + self.ats.len() as i64).collect();
        tx.execute(
            "INSERT INTO hypertool_events (seq, at_ms, kind, persona, chatmode, model, \
             prompt_tokens, completion_tokens, cost_usd, body, origin) \
             SELECT *, $11 FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], \
             $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::float8[], $10::text[])",
            &[
                &seqs,
                &self.ats,
                &self.kinds,
                &self.personas,
                &self.chatmodes,
                &self.models,
                &self.prompts,
                &self.completions,
                &self.costs,
                &self.bodies,
                &origin,
            ],
        )?;
        Ok(())
    }
}

/// Commits a batch stored at `positions`. When the answer to COMMIT does not say it was refused,
/// the commit may or may not have happened: the positions are kept in `doubt`, to be looked up
/// once the database is back. That is the case when the connection is lost before the answer (no
/// SQLSTATE: an I/O error), and when the server is shutting the session down (class 57: a fast
/// shutdown's `57P01 admin_shutdown` can answer a COMMIT whose record is already durable) or
/// reports the connection broken (class 08).
fn commit(
    tx: postgres::Transaction<'_>,
    positions: (i64, i64),
    doubt: &mut Option<(u64, u64)>,
) -> Result<(), postgres::Error> {
    tx.commit().inspect_err(|e| {
        if outcome_unknown(e.code().map(|c| c.code())) {
            *doubt = Some((positions.0.max(0) as u64, positions.1.max(0) as u64));
        }
    })
}

/// Whether an error answering COMMIT leaves its outcome unknown (see [`commit`]).
fn outcome_unknown(sqlstate: Option<&str>) -> bool {
    match sqlstate {
        None => true,
        Some(code) => code.starts_with("57") || code.starts_with("08"),
    }
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Ledger for PostgresLedger {
    fn append(&mut self, events: &[Stamped]) -> Result<u64, LedgerError> {
        if events.is_empty() {
            return self.last_seq();
        }
        let rows = Rows::of(events)?;
        let origin = &self.origin;
        let mut doubt = None;
        self.with("append", |client| {
            let mut tx = client.transaction()?;
            // Holds the counter's row lock until the commit: positions in commit order.
            let last: i64 = tx
                .query_one(
                    "UPDATE hypertool_sequence SET last = last + $1 RETURNING last",
                    &[&(events.len() as i64)],
                )?
                .get(0);
            let first = last - events.len() as i64 + 1;
            rows.insert(&mut tx, first, origin)?;
            commit(tx, (first, last), &mut doubt)?;
            Ok(last.max(0) as u64)
        })
        .map_err(|e| e.in_doubt(doubt))
    }

    fn append_synced(
        &mut self,
        events: &[Stamped],
        applied: u64,
        sync: &mut dyn FnMut(u64, Stamped, Origin),
        decide: &mut dyn FnMut() -> Vec<bool>,
    ) -> Result<u64, LedgerError> {
        let me = self.origin.clone();
        let mut bad: Option<LedgerError> = None;
        let mut rows_error: Option<LedgerError> = None;
        let mut doubt = None;
        let last = self
            .with("append", |client| {
                let mut tx = client.transaction()?;
                // The write lock first: everything stored before it is committed and visible now.
                let last: i64 = tx.query_one(LOCK_COUNTER, &[])?.get(0);
                for row in tx.query(EVENTS_AFTER, &[&i64_of(applied)])? {
                    let seq: i64 = row.get(0);
                    let origin = if row.get::<_, &str>(3) == me {
                        Origin::Own
                    } else {
                        Origin::Other
                    };
                    match serde_json::from_str::<Event>(row.get(2)) {
                        Ok(event) => {
                            let at = row.get(1);
                            sync(seq.max(0) as u64, Stamped { at, event }, origin);
                        }
                        Err(e) => {
                            let why = format!("event #{seq} cannot be read back: {e}");
                            bad = Some(LedgerError::new("append", why));
                            return Ok(last);
                        }
                    }
                }
                let kept = super::kept(events, &decide());
                if kept.is_empty() {
                    tx.commit()?;
                    return Ok(last);
                }
                let rows = match Rows::of(&kept) {
                    Ok(rows) => rows,
                    Err(e) => {
                        rows_error = Some(e);
                        return Ok(last);
                    }
                };
                let n = kept.len() as i64;
                tx.execute("UPDATE hypertool_sequence SET last = $1", &[&(last + n)])?;
                rows.insert(&mut tx, last + 1, &me)?;
                commit(tx, (last + 1, last + n), &mut doubt)?;
                Ok(last + n)
            })
            .map_err(|e| e.in_doubt(doubt))?;
        match bad.or(rows_error) {
            Some(e) => Err(e),
            None => Ok(last.max(0) as u64),
        }
    }

    fn replay_after(
        &self,
        after: u64,
        f: &mut dyn FnMut(u64, Stamped, Origin),
    ) -> Result<u64, LedgerError> {
        let mut bad: Option<LedgerError> = None;
        let me = self.origin.as_str();
        let n = self.with("replay", |client| {
            let mut rows = client.query_raw(EVENTS_AFTER, [i64_of(after)])?;
            let mut n = 0u64;
            while let Some(row) = rows.next()? {
                let seq: i64 = row.get(0);
                let at: i64 = row.get(1);
                let body: &str = row.get(2);
                let origin = if row.get::<_, &str>(3) == me {
                    Origin::Own
                } else {
                    Origin::Other
                };
                match serde_json::from_str::<Event>(body) {
                    Ok(event) => {
                        f(seq.max(0) as u64, Stamped { at, event }, origin);
                        n += 1;
                    }
                    Err(e) => {
                        bad = Some(LedgerError::new(
                            "replay",
                            format!("event #{seq} cannot be read back: {e}"),
                        ));
                        break;
                    }
                }
            }
            Ok(n)
        })?;
        match bad {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    fn origin(&self) -> Option<String> {
        Some(self.origin.clone())
    }

    fn heartbeat(
        &mut self,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<super::Replicas>, LedgerError> {
        let me = self.origin.clone();
        self.with("heartbeat", |client| {
            client.execute(
                "INSERT INTO hypertool_replicas (origin, seen_ms) VALUES ($1, $2) \
                 ON CONFLICT (origin) DO UPDATE SET seen_ms = GREATEST(hypertool_replicas.seen_ms, EXCLUDED.seen_ms)",
                &[&me, &now_ms],
            )?;
            let mut replicas = super::Replicas::default();
            for row in client.query("SELECT origin, seen_ms FROM hypertool_replicas", &[])? {
                let (origin, seen): (String, i64) = (row.get(0), row.get(1));
                if seen >= now_ms - lease_ms {
                    replicas.live.push(origin);
                } else {
                    replicas.dead.push(origin);
                }
            }
            Ok(Some(replicas))
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn stored_own(&self, first: u64, last: u64) -> Result<bool, LedgerError> {
        let expected = last.saturating_sub(first) as i64 + 1;
        let found: i64 = self.with("resolve", |c| {
            c.query_one(
                "SELECT COUNT(*) FROM hypertool_events WHERE seq BETWEEN $1 AND $2 AND origin = $3",
                &[&i64_of(first), &i64_of(last), &self.origin],
            )
            .map(|r| r.get(0))
        })?;
        // The batch is one transaction: all of its rows or none. (Without it, another replica
        // may have stored its own events at these positions.)
        match found {
            0 => Ok(false),
            n if n == expected => Ok(true),
            n => Err(LedgerError::new(
                "resolve",
                format!("{n} of the {expected} events at positions {first}..={last} are stored: the ledger was changed by hand"),
            )),
        }
    }

    fn last_seq(&self) -> Result<u64, LedgerError> {
        self.with("last_seq", |c| {
            c.query_one("SELECT last FROM hypertool_sequence", &[])
                .map(|r| r.get::<_, i64>(0).max(0) as u64)
        })
    }

    fn first_seq(&self) -> Result<Option<u64>, LedgerError> {
        self.with("first_seq", |c| {
            c.query_one("SELECT MIN(seq) FROM hypertool_events", &[])
                .map(|r| r.get::<_, Option<i64>>(0).map(|n| n.max(0) as u64))
        })
    }

    fn ledger_id(&self) -> Result<String, LedgerError> {
        self.with("ledger_id", |c| {
            c.query_one(
                "SELECT value FROM hypertool_meta WHERE key = 'ledger_id'",
                &[],
            )
            .map(|r| r.get(0))
        })
    }

    fn remove_old(
        &mut self,
        through: u64,
        before_ms: i64,
        limit: usize,
    ) -> Result<u64, LedgerError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with("retention", |c| {
            c.execute(
                "DELETE FROM hypertool_events WHERE seq IN (SELECT seq FROM hypertool_events \
                 WHERE seq <= $1 AND at_ms < $2 ORDER BY seq LIMIT $3)",
                &[&i64_of(through), &before_ms, &limit],
            )
        })
    }

    fn overrides(&self) -> Result<Vec<(String, BudgetSpec)>, LedgerError> {
        let rows = self.with("overrides", |c| {
            c.query(
                "SELECT persona, spec FROM hypertool_budget_overrides ORDER BY persona",
                &[],
            )
        })?;
        rows.iter()
            .map(|r| {
                let persona: String = r.get(0);
                let spec: String = r.get(1);
                serde_json::from_str(&spec)
                    .map(|spec| (persona.clone(), spec))
                    .map_err(|e| {
                        LedgerError::new(
                            "overrides",
                            format!("override of {persona} unreadable: {e}"),
                        )
                    })
            })
            .collect()
    }

    fn set_override(
        &mut self,
        persona: &str,
        spec: Option<&BudgetSpec>,
    ) -> Result<(), LedgerError> {
        match spec {
            Some(spec) => {
                let text =
                    serde_json::to_string(spec).map_err(|e| LedgerError::new("override", e))?;
                let now = chrono::Utc::now().timestamp_millis();
                self.with("override", |c| {
                    c.execute(
                        "INSERT INTO hypertool_budget_overrides (persona, spec, updated_at_ms) \
                         VALUES ($1, $2, $3) ON CONFLICT (persona) DO UPDATE \
                         SET spec = excluded.spec, updated_at_ms = excluded.updated_at_ms",
                        &[&persona, &text, &now],
                    )
                })?;
            }
            None => {
                self.with("override", |c| {
                    c.execute(
                        "DELETE FROM hypertool_budget_overrides WHERE persona = $1",
                        &[&persona],
                    )
                })?;
            }
        }
        Ok(())
    }

    fn totals(&self) -> Result<LedgerTotals, LedgerError> {
        self.with("totals", |c| {
            c.query_one(
                "SELECT COUNT(*), COALESCE(SUM((kind = 'usage')::int), 0)::bigint, \
                 COALESCE(SUM(COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0)), 0)::bigint \
                 FROM hypertool_events",
                &[],
            )
            .map(|r| LedgerTotals {
                events: r.get::<_, i64>(0).max(0) as u64,
                usage_events: r.get::<_, i64>(1).max(0) as u64,
                tokens: r.get::<_, i64>(2).max(0) as u64,
            })
        })
    }

    fn probe(&mut self, now: i64) -> Result<(), LedgerError> {
        let now = now.to_string();
        self.with("probe", |c| {
            c.execute(
                "INSERT INTO hypertool_meta (key, value) VALUES ('last_probe_ms', $1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&now],
            )
            .map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_answered_by_a_shutdown_or_a_broken_connection_is_in_doubt() {
        assert!(outcome_unknown(None));
        assert!(outcome_unknown(Some("57P01")), "admin_shutdown");
        assert!(outcome_unknown(Some("57P02")), "crash_shutdown");
        assert!(outcome_unknown(Some("08006")), "connection_failure");
        assert!(
            !outcome_unknown(Some("40001")),
            "serialization_failure: rolled back"
        );
        assert!(
            !outcome_unknown(Some("23505")),
            "unique_violation: rolled back"
        );
    }

    use super::redacted;

    #[test]
    fn passwords_never_show() {
        for (url, shown) in [
            (
                "postgres://ht:s3cret@db:5432/ht",
                "postgres://ht:***@db:5432/ht",
            ),
            ("postgresql://ht@db/ht", "postgresql://ht@db/ht"),
            (
                "postgres://db/ht?user=a&password=s3cret",
                "postgres://db/ht?user=a&password=***",
            ),
            (
                "host=db user=ht password=s3cret dbname=ht",
                "host=db user=ht password=*** dbname=ht",
            ),
        ] {
            assert_eq!(redacted(url), shown);
            assert!(!redacted(url).contains("s3cret"));
        }
    }
}
