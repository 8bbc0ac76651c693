//! The embedded default ledger: one SQLite file in WAL mode.
//!
//! Each append is one transaction. With `synchronous=NORMAL` in WAL mode a committed transaction
//! survives the process being killed (the WAL is in the OS page cache); `FULL` also survives a power
//! cut. Events are stored as their JSON with the columns analysts query most alongside.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::{Columns, Ledger, LedgerError, LedgerTotals, Origin};
use crate::config::LedgerSync;
use crate::core::budget::BudgetSpec;
use crate::core::event::{Event, Stamped};

pub struct SqliteLedger {
    conn: Connection,
    /// Stops the checkpointer thread when the ledger is dropped.
    _checkpointer: Option<Checkpointer>,
}

/// Checkpoints the WAL from a thread and connection of its own. SQLite's automatic checkpoint runs
/// inside the commit that crosses the threshold, with an fsync of the database: that commit — and
/// the gateway call waiting on it (its admission) — took milliseconds. A PASSIVE checkpoint here
/// never blocks the writer, whose commits (synchronous = NORMAL) do not wait on the disk.
struct Checkpointer {
    stop: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

impl Checkpointer {
    fn start(path: &Path) -> Option<Checkpointer> {
        let conn = Connection::open(path).ok()?;
        conn.execute_batch("PRAGMA busy_timeout=5000;").ok()?;
        let stop = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ledger-checkpoint".into())
            .spawn(move || {
                let (lock, wake) = &*flag;
                loop {
                    let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
                    let (guard, _) = wake
                        .wait_timeout_while(guard, CHECKPOINT_EVERY, |stopped| !*stopped)
                        .unwrap_or_else(|p| p.into_inner());
                    let stopped = *guard;
                    drop(guard);
                    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE);") {
                        tracing::warn!("ledger checkpoint failed (retried): {e}");
                    }
                    if stopped {
                        return;
                    }
                }
            })
            .ok()?;
        Some(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    persona TEXT,
    chatmode TEXT,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost_usd REAL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_persona_at ON events (persona, at_ms);
CREATE INDEX IF NOT EXISTS events_kind_at ON events (kind, at_ms);
CREATE TABLE IF NOT EXISTS budget_overrides (
    persona TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1');
INSERT OR IGNORE INTO meta (key, value) VALUES ('ledger_id', lower(hex(randomblob(16))));
";

/// Why a ledger file may not be writable, and what to do, when its directory is the reason.
fn not_writable_hint(path: &Path) -> String {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let probe = dir.join(".hypertool-write-test");
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            String::new()
        }
        Err(e) => format!(
            " (the data directory {} cannot be written: {e}); hypertool stores its ledger there: mount it read-write, give this user write access, or start with --data-dir on a writable disk",
            dir.display()
        ),
    }
}

impl SqliteLedger {
    pub fn open(path: &Path, sync: LedgerSync) -> Result<Self, LedgerError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    LedgerError::new(
                        "open",
                        format!(
                            "cannot create the data directory {}: {e}; hypertool stores its ledger there: create it writable, or start with --data-dir on a writable disk",
                            dir.display()
                        ),
                    )
                })?;
            }
        }
        let conn = Connection::open(path).map_err(|e| {
            LedgerError::new(
                "open",
                format!("{}: {e}{}", path.display(), not_writable_hint(path)),
            )
        })?;
        // On a read-only file system SQLite quietly opens the file read-only; hypertool would then
        // fail at its first write. Say so now, with the fix.
        if conn
            .is_readonly(rusqlite::DatabaseName::Main)
            .unwrap_or(false)
        {
            return Err(LedgerError::new(
                "open",
                format!(
                    "{} can only be opened read-only{}",
                    path.display(),
                    not_writable_hint(path)
                ),
            ));
        }
        let sync = match sync {
            LedgerSync::Normal => "NORMAL",
            LedgerSync::Full => "FULL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA busy_timeout=5000;"
        ))
        .map_err(|e| LedgerError::new("open", e))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| LedgerError::new("migrate", format!("{e}{}", not_writable_hint(path))))?;
        // Checkpoints move to their own thread; without it, SQLite's automatic one stays on.
        let checkpointer = Checkpointer::start(path);
        if checkpointer.is_some() {
            conn.execute_batch("PRAGMA wal_autocheckpoint=0;")
                .map_err(|e| LedgerError::new("open", e))?;
        }
        Ok(Self {
            conn,
            _checkpointer: checkpointer,
        })
    }
}

impl Ledger for SqliteLedger {
    fn probe(&mut self, now: i64) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_probe_ms', ?1)",
                params![now.to_string()],
            )
            .map(|_| ())
            .map_err(|e| LedgerError::new("probe", e))
    }

    fn append(&mut self, events: &[Stamped]) -> Result<u64, LedgerError> {
        let tx = self
            .conn
            .transaction()
            .map_err(|e| LedgerError::new("append", e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO events (at_ms, kind, persona, chatmode, model, prompt_tokens, \
                     completion_tokens, cost_usd, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(|e| LedgerError::new("append", e))?;
            for s in events {
                let body =
                    serde_json::to_string(&s.event).map_err(|e| LedgerError::new("append", e))?;
                let Columns {
                    persona,
                    chatmode,
                    model,
                    prompt_tokens: pt,
                    completion_tokens: ct,
                    cost_usd: cost,
                } = Columns::of(&s.event);
                stmt.execute(params![
                    s.at,
                    s.event.kind(),
                    persona,
                    chatmode,
                    model,
                    pt,
                    ct,
                    cost,
                    body
                ])
                .map_err(|e| LedgerError::new("append", e))?;
            }
        }
        let last = tx.last_insert_rowid();
        tx.commit().map_err(|e| LedgerError::new("commit", e))?;
        if events.is_empty() {
            return self.last_seq();
        }
        Ok(last.max(0) as u64)
    }

    fn replay_after(
        &self,
        after: u64,
        f: &mut dyn FnMut(u64, Stamped, Origin),
    ) -> Result<u64, LedgerError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, at_ms, body FROM events WHERE seq > ?1 ORDER BY seq")
            .map_err(|e| LedgerError::new("replay", e))?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let mut rows = stmt
            .query(params![after])
            .map_err(|e| LedgerError::new("replay", e))?;
        let mut n = 0;
        while let Some(row) = rows.next().map_err(|e| LedgerError::new("replay", e))? {
            let seq: i64 = row.get(0).map_err(|e| LedgerError::new("replay", e))?;
            let at: i64 = row.get(1).map_err(|e| LedgerError::new("replay", e))?;
            let body: String = row.get(2).map_err(|e| LedgerError::new("replay", e))?;
            let event: Event = serde_json::from_str(&body).map_err(|e| {
                LedgerError::new("replay", format!("event #{seq} cannot be read back: {e}"))
            })?;
            f(seq.max(0) as u64, Stamped { at, event }, Origin::Own);
            n += 1;
        }
        Ok(n)
    }

    fn last_seq(&self) -> Result<u64, LedgerError> {
        self.conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n.max(0) as u64)
            .map_err(|e| LedgerError::new("last_seq", e))
    }

    fn first_seq(&self) -> Result<Option<u64>, LedgerError> {
        self.conn
            .query_row("SELECT MIN(seq) FROM events", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|n| n.map(|n| n.max(0) as u64))
            .map_err(|e| LedgerError::new("first_seq", e))
    }

    fn ledger_id(&self) -> Result<String, LedgerError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'ledger_id'", [], |r| {
                r.get::<_, String>(0)
            })
            .map_err(|e| LedgerError::new("ledger_id", e))
    }

    fn remove_old(
        &mut self,
        through: u64,
        before_ms: i64,
        limit: usize,
    ) -> Result<u64, LedgerError> {
        let through = i64::try_from(through).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Oldest first by position; an event is removed only when both bounds allow it. The
        // newest event always stays: positions must keep growing (SQLite would reuse them in an
        // emptied table, and a snapshot's position would then hide new events).
        self.conn
            .execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq <= ?1 \
                 AND at_ms < ?2 AND seq < (SELECT MAX(seq) FROM events) ORDER BY seq LIMIT ?3)",
                params![through, before_ms, limit],
            )
            .map(|n| n as u64)
            .map_err(|e| LedgerError::new("retention", e))
    }

    fn overrides(&self) -> Result<Vec<(String, BudgetSpec)>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare("SELECT persona, spec FROM budget_overrides ORDER BY persona")
            .map_err(|e| LedgerError::new("overrides", e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| LedgerError::new("overrides", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (persona, spec) = row.map_err(|e| LedgerError::new("overrides", e))?;
            let spec: BudgetSpec = serde_json::from_str(&spec).map_err(|e| {
                LedgerError::new(
                    "overrides",
                    format!("override of {persona} unreadable: {e}"),
                )
            })?;
            out.push((persona, spec));
        }
        Ok(out)
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
                self.conn
                    .execute(
                        "INSERT INTO budget_overrides (persona, spec, updated_at_ms) VALUES (?1, ?2, ?3) \
                         ON CONFLICT(persona) DO UPDATE SET spec = excluded.spec, updated_at_ms = excluded.updated_at_ms",
                        params![persona, text, chrono::Utc::now().timestamp_millis()],
                    )
                    .map_err(|e| LedgerError::new("override", e))?;
            }
            None => {
                self.conn
                    .execute(
                        "DELETE FROM budget_overrides WHERE persona = ?1",
                        params![persona],
                    )
                    .map_err(|e| LedgerError::new("override", e))?;
            }
        }
        Ok(())
    }

    fn totals(&self) -> Result<LedgerTotals, LedgerError> {
        self.conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(kind = 'usage'), 0), \
                 COALESCE(SUM(COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0)), 0) FROM events",
                [],
                |r| {
                    Ok(LedgerTotals {
                        events: r.get::<_, i64>(0)? as u64,
                        usage_events: r.get::<_, i64>(1)? as u64,
                        tokens: r.get::<_, i64>(2)? as u64,
                    })
                },
            )
            .optional()
            .map_err(|e| LedgerError::new("totals", e))
            .map(|t| t.unwrap_or_default())
    }
}
