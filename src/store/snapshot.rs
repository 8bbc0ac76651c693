//! Snapshots of the core's state, so that a start replays only the events after the last one.
//!
//! A snapshot is the [`EngineState`] after the ledger's event at position `seq`, as JSON, behind a
//! one-line header naming the ledger it came from, the position, the body's length and its
//! SHA-256. It is written to a temporary file, synced, and renamed into place, so a crash leaves
//! either the old set or the new one. The two newest are kept: retention removes only events the
//! older of them covers, so either one can rebuild the engine.
//!
//! On start, [`recover`] tries the newest snapshot, then the older, then replays the whole ledger:
//! a snapshot that is corrupt, from another ledger, ahead of the ledger (restored from a backup),
//! or of another format is logged and passed over, never trusted.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Ledger, LedgerError, Origin};
use crate::core::clock::UnixMillis;
use crate::core::engine::{Engine, EngineConfig, EngineState};

/// Bumped whenever [`EngineState`]'s shape changes: an older snapshot is then passed over once
/// (full replay) rather than misread.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &str = "hypertool-snapshot";
/// Snapshots kept on disk, newest first.
const KEEP: usize = 2;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    ledger_id: String,
    seq: u64,
    at_ms: UnixMillis,
    bytes: u64,
    sha256: String,
}

/// The snapshot directory (`DATA_DIR/snapshots`).
#[derive(Debug, Clone)]
pub struct Snapshots {
    dir: PathBuf,
}

/// A snapshot read back and checked.
pub struct Loaded {
    pub seq: u64,
    pub at_ms: UnixMillis,
    pub state: EngineState,
}

impl Snapshots {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("snapshots"),
        }
    }

    /// Snapshot files, newest (highest position) first.
    pub fn list(&self) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found: Vec<(u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let seq = name.strip_prefix("state-")?.strip_suffix(".snap")?;
                Some((seq.parse().ok()?, e.path()))
            })
            .collect();
        found.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        found
    }

    /// The position the oldest kept snapshot covers: events up to it may be removed.
    pub fn oldest_kept_seq(&self) -> Option<u64> {
        let list = self.list();
        (list.len() >= KEEP).then(|| list[KEEP - 1].0)
    }

    /// Writes the state after event `seq` durably, then removes all but the newest [`KEEP`].
    pub fn write(
        &self,
        ledger_id: &str,
        seq: u64,
        at_ms: UnixMillis,
        state: &EngineState,
    ) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let body = serde_json::to_vec(state).map_err(std::io::Error::other)?;
        let header = Header {
            format: MAGIC.into(),
            version: FORMAT_VERSION,
            ledger_id: ledger_id.into(),
            seq,
            at_ms,
            bytes: body.len() as u64,
            sha256: sha256(&body),
        };
        let path = self.dir.join(format!("state-{seq:020}.snap"));
        let tmp = self.dir.join(format!("state-{seq:020}.snap.tmp"));
        {
            let mut f = std::fs::File::create(&tmp)?;
            serde_json::to_writer(&mut f, &header).map_err(std::io::Error::other)?;
            f.write_all(b"\n")?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        for (_, old) in self.list().into_iter().skip(KEEP) {
            let _ = std::fs::remove_file(old);
        }
        Ok(path)
    }

    /// Reads and checks one snapshot against the ledger it must belong to.
    pub fn read(path: &Path, ledger_id: &str, last_seq: u64) -> Result<Loaded, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let newline = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("no header line")?;
        let header: Header = serde_json::from_slice(&bytes[..newline])
            .map_err(|e| format!("unreadable header: {e}"))?;
        if header.format != MAGIC || header.version != FORMAT_VERSION {
            return Err(format!(
                "format {} version {} (this hypertool reads version {FORMAT_VERSION})",
                header.format, header.version
            ));
        }
        if header.ledger_id != ledger_id {
            return Err("taken from another ledger".into());
        }
        if header.seq > last_seq {
            return Err(format!(
                "covers events up to #{} but the ledger ends at #{last_seq} (restored from an older copy?)",
                header.seq
            ));
        }
        let body = &bytes[newline + 1..];
        if body.len() as u64 != header.bytes || sha256(body) != header.sha256 {
            return Err("checksum mismatch (truncated or corrupt)".into());
        }
        let state: EngineState =
            serde_json::from_slice(body).map_err(|e| format!("unreadable state: {e}"))?;
        Ok(Loaded {
            seq: header.seq,
            at_ms: header.at_ms,
            state,
        })
    }
}

fn sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Applies the events after position `after` (this replica's own as they are, other replicas' as
/// foreign), quietly, then ticks to `now`; returns how many and the last position applied.
fn replay_into(
    ledger: &dyn Ledger,
    engine: &mut Engine,
    after: u64,
    now: UnixMillis,
) -> Result<(u64, u64), LedgerError> {
    engine.set_quiet(true);
    let mut applied_seq = after;
    let replayed = ledger.replay_after(after, &mut |seq, s, origin| {
        match origin {
            Origin::Own => engine.apply(&s),
            Origin::Other => engine.apply_foreign(&s),
        }
        applied_seq = seq;
    });
    engine.set_quiet(false);
    engine.tick(now);
    Ok((replayed?, applied_seq))
}

/// The engine rebuilt at start-up, and how.
pub struct Recovered {
    pub engine: Engine,
    /// Events replayed (after the snapshot, or all of them).
    pub replayed: u64,
    /// (position, time) of the snapshot loaded, if one was.
    pub snapshot: Option<(u64, UnixMillis)>,
    /// The position of the last event in the engine.
    pub applied_seq: u64,
}

/// Rebuilds the engine: the newest usable snapshot plus the events after it, else a full replay.
pub fn recover(
    ledger: &dyn Ledger,
    snapshots: &Snapshots,
    config: EngineConfig,
    now: UnixMillis,
) -> Result<Recovered, LedgerError> {
    let overrides = ledger.overrides()?;
    let last_seq = ledger.last_seq()?;
    let ledger_id = ledger.ledger_id()?;
    for (_, path) in snapshots.list() {
        let loaded = match Snapshots::read(&path, &ledger_id, last_seq) {
            Ok(loaded) => loaded,
            Err(why) => {
                tracing::warn!(snapshot = %path.display(), "snapshot not used: {why}");
                continue;
            }
        };
        let mut engine = match Engine::restore(config.clone(), overrides.clone(), loaded.state, now)
        {
            Ok(engine) => engine,
            Err(why) => {
                tracing::warn!(snapshot = %path.display(), "snapshot not used: {why}");
                continue;
            }
        };
        let (replayed, applied_seq) = replay_into(ledger, &mut engine, loaded.seq, now)?;
        return Ok(Recovered {
            engine,
            replayed,
            snapshot: Some((loaded.seq, loaded.at_ms)),
            applied_seq,
        });
    }
    if let Some(first) = ledger.first_seq()? {
        if first > 1 {
            tracing::error!(
                "no usable snapshot, and retention removed the events before #{first}: counters and budgets are rebuilt from the events kept only"
            );
        }
    }
    let mut engine = Engine::new(config, now);
    for (persona, spec) in overrides {
        engine.set_override(&persona, Some(spec), now);
    }
    let (replayed, applied_seq) = replay_into(ledger, &mut engine, 0, now)?;
    Ok(Recovered {
        engine,
        replayed,
        snapshot: None,
        applied_seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, LedgerSync, Source};
    use crate::core::synthetic;
    use crate::store::sqlite::SqliteLedger;
    use crate::telemetry::exposition::{render, Format};
    use crate::telemetry::registry::Snapshot;

    const T0: i64 = 1_795_856_400_000;

    fn config() -> EngineConfig {
        load(&Source::Embedded).unwrap().engine_config()
    }

    fn picture(engine: &Engine) -> String {
        let mut text = render(engine, &Snapshot::default(), Format::Classic);
        text.push_str(&format!(
            "{:?}\n{:?}\n{:?}\n{:?}",
            engine.unsettled_calls(),
            engine.session("s17"),
            engine.runs().get("run-2999").map(|r| r.tokens()),
            engine
                .budgets()
                .values()
                .map(|b| b.used_tokens())
                .collect::<Vec<_>>(),
        ));
        text
    }

    /// A ledger of `n` synthetic events appended in batches, with a snapshot taken after `cut`.
    fn ledger_with_snapshot(dir: &Path, n: u64, cut: u64) -> (SqliteLedger, Snapshots) {
        let mut ledger = SqliteLedger::open(&dir.join("l.db"), LedgerSync::Normal).unwrap();
        let snapshots = Snapshots::new(dir);
        let mut engine = Engine::new(config(), T0);
        let first: Vec<_> = synthetic::events(T0, 0..cut).collect();
        ledger.append(&first).unwrap();
        first.iter().for_each(|e| engine.apply(e));
        let seq = ledger.last_seq().unwrap();
        let id = ledger.ledger_id().unwrap();
        snapshots
            .write(&id, seq, T0 + cut as i64 * 10, &engine.state())
            .unwrap();
        let rest: Vec<_> = synthetic::events(T0, cut..n).collect();
        ledger.append(&rest).unwrap();
        (ledger, snapshots)
    }

    #[test]
    fn a_snapshot_plus_the_events_after_it_is_the_full_replay() {
        let dir = tempfile::tempdir().unwrap();
        let n = 60_000;
        let (ledger, snapshots) = ledger_with_snapshot(dir.path(), n, 41_337);
        let now = T0 + n as i64 * 10 + 1_000;
        let from_snapshot = recover(&ledger, &snapshots, config(), now).unwrap();
        assert_eq!(from_snapshot.snapshot.map(|s| s.0), Some(41_337));
        assert_eq!(from_snapshot.replayed, n - 41_337);
        let full = recover(
            &ledger,
            &Snapshots::new(&dir.path().join("none")),
            config(),
            now,
        )
        .unwrap();
        assert_eq!(full.snapshot, None);
        assert_eq!(full.replayed, n);
        let (a, b) = (picture(&from_snapshot.engine), picture(&full.engine));
        assert!(a.contains("hypertool_persona_tokens_used_total{"), "{a}");
        assert!(!full.engine.unsettled_calls().is_empty());
        assert_eq!(a, b);
    }

    #[test]
    fn a_corrupt_foreign_or_future_snapshot_is_passed_over_for_the_full_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, snapshots) = ledger_with_snapshot(dir.path(), 5_000, 3_000);
        let now = T0 + 60_000;
        let expected = picture(
            &recover(
                &ledger,
                &Snapshots::new(&dir.path().join("x")),
                config(),
                now,
            )
            .unwrap()
            .engine,
        );
        let (_, path) = snapshots.list().remove(0);
        let good = std::fs::read(&path).unwrap();

        // One byte of the body flipped.
        let mut bad = good.clone();
        let last = bad.len() - 2;
        bad[last] ^= 0x20;
        std::fs::write(&path, &bad).unwrap();
        let r = recover(&ledger, &snapshots, config(), now).unwrap();
        assert_eq!((r.snapshot, r.replayed), (None, 5_000));
        assert_eq!(picture(&r.engine), expected);

        // Truncated.
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert_eq!(
            recover(&ledger, &snapshots, config(), now)
                .unwrap()
                .snapshot,
            None
        );

        // Another ledger's snapshot.
        let other = SqliteLedger::open(&dir.path().join("other.db"), LedgerSync::Normal).unwrap();
        std::fs::write(&path, &good).unwrap();
        assert_eq!(
            recover(&other, &snapshots, config(), now).unwrap().snapshot,
            None
        );

        // A snapshot ahead of its ledger (the ledger restored from an older copy).
        let ahead = Snapshots::new(&dir.path().join("ahead"));
        ahead
            .write(
                &ledger.ledger_id().unwrap(),
                9_999,
                now,
                &Engine::new(config(), T0).state(),
            )
            .unwrap();
        assert_eq!(
            recover(&ledger, &ahead, config(), now).unwrap().snapshot,
            None
        );

        // The good one again: used.
        assert_eq!(
            recover(&ledger, &snapshots, config(), now)
                .unwrap()
                .snapshot
                .map(|s| s.0),
            Some(3_000)
        );
    }

    #[test]
    fn two_snapshots_are_kept_and_the_older_bounds_retention() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::new(dir.path());
        let state = Engine::new(config(), T0).state();
        assert_eq!(snapshots.oldest_kept_seq(), None);
        for seq in [10, 20, 30] {
            snapshots.write("id", seq, T0, &state).unwrap();
        }
        let kept: Vec<u64> = snapshots.list().into_iter().map(|(s, _)| s).collect();
        assert_eq!(kept, vec![30, 20]);
        assert_eq!(snapshots.oldest_kept_seq(), Some(20));
    }
}
