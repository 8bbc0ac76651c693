//! Reading the ledger beside the writer: the history the runbook's investigations, the quality-gate
//! history and `budget suggest` are computed from.
//!
//! The writer thread owns the ledger's write connection; a reader opens connections of its own
//! (SQLite: read-only, which WAL lets run beside the writer without blocking it; PostgreSQL: one
//! connection per query, with the connect timeout). Every query is bounded: a time range, the
//! event kinds, and a row limit — the newest rows are kept when the limit cuts.
//! Calls block: run them on a blocking thread.

use std::path::PathBuf;
use std::time::Duration;

use super::LedgerError;
use crate::core::event::{Event, Stamped};

/// Where to read.
#[derive(Clone)]
pub enum LedgerReader {
    Sqlite(PathBuf),
    /// How to connect, and the URL as it may be shown (see `config::secret::redacted`).
    Postgres(Box<crate::tls::PgConnector>, String),
}

/// Which events to read.
#[derive(Debug, Clone)]
pub struct EventQuery {
    /// `at_ms` from (inclusive) and to (exclusive).
    pub from_ms: i64,
    pub to_ms: i64,
    /// The event kinds (`usage`, `quality_gate`, …); at least one.
    pub kinds: Vec<&'static str>,
    /// At most this many; the newest are kept.
    pub limit: usize,
}

/// What a query found: events oldest first, and whether the limit cut older ones off.
#[derive(Debug, Default)]
pub struct Found {
    pub events: Vec<Stamped>,
    pub truncated: bool,
}

/// Tokens of one persona (as recorded) on one UTC day.
#[derive(Debug, Clone, PartialEq)]
pub struct DailyTokens {
    pub persona: String,
    /// Start of the UTC day, in milliseconds.
    pub day_ms: i64,
    pub tokens: u64,
}

const DAY_MS: i64 = 86_400_000;

fn decode(at: i64, body: &str) -> Option<Stamped> {
    // A row this hypertool cannot read (written by a newer one) is skipped, not fatal: the
    // investigation is about the rows it understands.
    serde_json::from_str::<Event>(body)
        .ok()
        .map(|event| Stamped { at, event })
}

impl LedgerReader {
    /// The events of `query`, oldest first.
    pub fn events(&self, query: &EventQuery) -> Result<Found, LedgerError> {
        let limit = query.limit.max(1);
        // One more than asked: it tells whether the limit cut.
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let kinds: Vec<String> = query.kinds.iter().map(|k| k.to_string()).collect();
        let mut rows: Vec<(i64, String)> = match self {
            LedgerReader::Sqlite(path) => {
                let conn = open_sqlite(path)?;
                let placeholders = vec!["?"; kinds.len()].join(",");
                let sql = format!(
                    "SELECT at_ms, body FROM events WHERE kind IN ({placeholders}) \
                     AND at_ms >= ? AND at_ms < ? ORDER BY at_ms DESC, seq DESC LIMIT ?"
                );
                let mut params: Vec<rusqlite::types::Value> = kinds
                    .iter()
                    .map(|k| rusqlite::types::Value::Text(k.clone()))
                    .collect();
                params.push(query.from_ms.into());
                params.push(query.to_ms.into());
                params.push(fetch.into());
                sqlite_rows(&conn, &sql, rusqlite::params_from_iter(params), |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })?
            }
            LedgerReader::Postgres(connector, shown) => {
                let mut client = connect_postgres(connector, shown)?;
                client
                    .query(
                        "SELECT at_ms, body FROM hypertool_events WHERE kind = ANY($1) \
                         AND at_ms >= $2 AND at_ms < $3 ORDER BY at_ms DESC, seq DESC LIMIT $4",
                        &[&kinds, &query.from_ms, &query.to_ms, &fetch],
                    )
                    .map_err(|e| LedgerError::new("read", e))?
                    .into_iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                    .collect()
            }
        };
        let truncated = rows.len() > limit;
        rows.truncate(limit);
        rows.reverse();
        Ok(Found {
            events: rows
                .iter()
                .filter_map(|(at, body)| decode(*at, body))
                .collect(),
            truncated,
        })
    }

    /// Tokens per persona per UTC day over the whole ledger (the history `budget suggest` sizes
    /// budgets from). Personas are as recorded (aliases not yet folded).
    pub fn daily_tokens(&self) -> Result<Vec<DailyTokens>, LedgerError> {
        let rows: Vec<(String, i64, i64)> = match self {
            LedgerReader::Sqlite(path) => {
                let conn = open_sqlite(path)?;
                sqlite_rows(
                    &conn,
                    "SELECT persona, (at_ms / ?1) * ?1 AS day, \
                     SUM(COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0)) \
                     FROM events WHERE kind = 'usage' AND persona IS NOT NULL \
                     GROUP BY persona, day ORDER BY persona, day",
                    [DAY_MS],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?
            }
            LedgerReader::Postgres(connector, shown) => {
                let mut client = connect_postgres(connector, shown)?;
                client
                    .query(
                        "SELECT persona, (at_ms / $1) * $1 AS day, \
                         SUM(COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0))::BIGINT \
                         FROM hypertool_events WHERE kind = 'usage' AND persona IS NOT NULL \
                         GROUP BY persona, day ORDER BY persona, day",
                        &[&DAY_MS],
                    )
                    .map_err(|e| LedgerError::new("read", e))?
                    .into_iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect()
            }
        };
        Ok(rows
            .into_iter()
            .map(|(persona, day_ms, tokens)| DailyTokens {
                persona,
                day_ms,
                tokens: tokens.max(0) as u64,
            })
            .collect())
    }
}

/// Every row of one SQLite query, mapped.
fn sqlite_rows<T>(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, LedgerError> {
    let read = |e: rusqlite::Error| LedgerError::new("read", e);
    let mut stmt = conn.prepare(sql).map_err(read)?;
    let rows = stmt.query_map(params, map).map_err(read)?;
    rows.collect::<Result<_, _>>().map_err(read)
}

fn open_sqlite(path: &std::path::Path) -> Result<rusqlite::Connection, LedgerError> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| LedgerError::new("read", format!("{}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| LedgerError::new("read", e))?;
    Ok(conn)
}

fn connect_postgres(
    connector: &crate::tls::PgConnector,
    shown: &str,
) -> Result<postgres::Client, LedgerError> {
    let mut connector = connector.clone();
    connector.config.application_name("hypertool-reader");
    connector.connect().map_err(|e| {
        LedgerError::new(
            "read",
            format!(
                "cannot connect to {shown}: {}",
                super::postgres::explain(&e)
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::{Event, Usage};
    use crate::store::sqlite::SqliteLedger;
    use crate::store::Ledger;

    fn usage(persona: &str, tokens: u64) -> Event {
        Event::Usage(Usage {
            persona: persona.into(),
            chatmode: "c".into(),
            model: "m".into(),
            prompt_tokens: tokens,
            ..Usage::default()
        })
    }

    #[test]
    fn reads_a_time_range_by_kind_newest_kept_and_days_summed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hypertool.db");
        let mut ledger = SqliteLedger::open(&path, crate::config::LedgerSync::Normal).unwrap();
        let day = 1_764_288_000_000; // 2025-11-28T00:00:00Z
        let events: Vec<Stamped> = (0..10)
            .map(|i| Stamped {
                at: day + i * 3_600_000,
                event: usage(if i % 2 == 0 { "a" } else { "b" }, 10 + i as u64),
            })
            .chain([Stamped {
                at: day + DAY_MS + 1,
                event: Event::BudgetReset {
                    persona: "a".into(),
                },
            }])
            .chain([Stamped {
                at: day + DAY_MS + 2,
                event: usage("a", 5),
            }])
            .collect();
        ledger.append(&events).unwrap();
        let reader = LedgerReader::Sqlite(path);
        let found = reader
            .events(&EventQuery {
                from_ms: day + 3_600_000,
                to_ms: day + 8 * 3_600_000,
                kinds: vec!["usage"],
                limit: 4,
            })
            .unwrap();
        assert!(found.truncated);
        let ats: Vec<i64> = found
            .events
            .iter()
            .map(|s| (s.at - day) / 3_600_000)
            .collect();
        assert_eq!(ats, vec![4, 5, 6, 7], "the newest four, oldest first");
        let all = reader
            .events(&EventQuery {
                from_ms: 0,
                to_ms: i64::MAX,
                kinds: vec!["budget_reset"],
                limit: 100,
            })
            .unwrap();
        assert_eq!((all.events.len(), all.truncated), (1, false));
        let days = reader.daily_tokens().unwrap();
        assert_eq!(
            days,
            vec![
                DailyTokens {
                    persona: "a".into(),
                    day_ms: day,
                    tokens: 10 + 12 + 14 + 16 + 18
                },
                DailyTokens {
                    persona: "a".into(),
                    day_ms: day + DAY_MS,
                    tokens: 5
                },
                DailyTokens {
                    persona: "b".into(),
                    day_ms: day,
                    tokens: 11 + 13 + 15 + 17 + 19
                },
            ]
        );
    }
}
