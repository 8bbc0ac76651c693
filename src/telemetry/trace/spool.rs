//! A destination's spool: every batch is written here before it is sent and removed once the
//! destination accepted it, so a collector that is down, or a restart, loses nothing. Batches are
//! files named by a sequence number (sent oldest first); the directory has a size bound, and
//! reaching it drops the oldest batches, loudly.
//!
//! A file is `[u32 roots, big-endian][u8 kind][payload]`: the payload is sent as it is, so a
//! re-sent span keeps its ids.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a spooled batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// An OTLP/HTTP protobuf export request.
    Spans = 1,
    /// A Langfuse ingestion batch (JSON) of scores.
    Scores = 2,
}

/// One spooled batch.
#[derive(Debug)]
pub struct Item {
    pub seq: u64,
    pub kind: ItemKind,
    /// Traces this batch begins (spans) or scores it holds.
    pub count: u32,
    pub payload: Vec<u8>,
}

/// What [`Spool::push`] had to drop to stay within its bound.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub batches: u64,
    pub bytes: u64,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// seq → file size
    files: BTreeMap<u64, u64>,
    bytes: u64,
    next: u64,
}

const HEADER: usize = 5;

impl Spool {
    /// Opens (creating) the spool directory and takes stock of what an earlier process left.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(seq) = name
                .strip_suffix(".batch")
                .and_then(|s| s.parse::<u64>().ok())
            {
                files.insert(seq, entry.metadata()?.len());
            } else if name.ends_with(".tmp") {
                // A batch being written when the process died: it was never acknowledged.
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let bytes = files.values().sum();
        let next = files.keys().next_back().map_or(1, |s| s + 1);
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            files,
            bytes,
            next,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.batch"))
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn batches(&self) -> usize {
        self.files.len()
    }

    /// Appends a batch (written to a temporary file, then renamed: a crash leaves no half batch),
    /// dropping the oldest batches first if the bound requires it.
    pub fn push(&mut self, kind: ItemKind, count: u32, payload: &[u8]) -> std::io::Result<Dropped> {
        let size = (HEADER + payload.len()) as u64;
        if size > self.max_bytes {
            // A single batch above the bound cannot be kept at all (and must not evict the rest).
            return Ok(Dropped {
                batches: 1,
                bytes: size,
            });
        }
        let mut dropped = Dropped::default();
        while self.bytes + size > self.max_bytes {
            let Some((&seq, &len)) = self.files.iter().next() else {
                break;
            };
            let _ = std::fs::remove_file(self.path(seq));
            self.files.remove(&seq);
            self.bytes -= len;
            dropped.batches += 1;
            dropped.bytes += len;
        }
        let seq = self.next;
        self.next += 1;
        let tmp = self.dir.join(format!("{seq:020}.tmp"));
        let mut data = Vec::with_capacity(size as usize);
        data.extend_from_slice(&count.to_be_bytes());
        data.push(kind as u8);
        data.extend_from_slice(payload);
        std::fs::write(&tmp, &data)?;
        std::fs::rename(&tmp, self.path(seq))?;
        self.files.insert(seq, size);
        self.bytes += size;
        Ok(dropped)
    }

    /// The oldest batch, read from disk. A file that cannot be read or makes no sense is removed
    /// (and reported as `Err`), so one bad file never blocks the rest.
    pub fn oldest(&mut self) -> Option<Result<Item, String>> {
        let (&seq, _) = self.files.iter().next()?;
        let path = self.path(seq);
        let read = std::fs::read(&path);
        let parsed = match read {
            Ok(data) if data.len() >= HEADER => {
                let count = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                match data[4] {
                    1 => Ok((ItemKind::Spans, count, data[HEADER..].to_vec())),
                    2 => Ok((ItemKind::Scores, count, data[HEADER..].to_vec())),
                    k => Err(format!("unknown batch kind {k}")),
                }
            }
            Ok(_) => Err("truncated batch".to_string()),
            Err(e) => Err(e.to_string()),
        };
        match parsed {
            Ok((kind, count, payload)) => Some(Ok(Item {
                seq,
                kind,
                count,
                payload,
            })),
            Err(e) => {
                self.remove(seq);
                Some(Err(format!("{}: {e}", path.display())))
            }
        }
    }

    /// Forgets a batch (sent, or refused for good).
    pub fn remove(&mut self, seq: u64) {
        if let Some(len) = self.files.remove(&seq) {
            let _ = std::fs::remove_file(self.path(seq));
            self.bytes -= len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_survive_reopening_in_order_and_the_bound_drops_the_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spool::open(dir.path(), 100).expect("open");
        s.push(ItemKind::Spans, 1, &[1; 40]).expect("push");
        s.push(ItemKind::Scores, 2, &[2; 40]).expect("push");
        assert_eq!(s.bytes(), 90);
        drop(s);
        let mut s = Spool::open(dir.path(), 100).expect("reopen");
        assert_eq!((s.batches(), s.bytes()), (2, 90));
        let first = s.oldest().expect("item").expect("readable");
        assert_eq!(
            (first.kind, first.count, first.payload[0]),
            (ItemKind::Spans, 1, 1)
        );
        // A third batch does not fit: the oldest goes.
        let dropped = s.push(ItemKind::Spans, 3, &[3; 40]).expect("push");
        assert_eq!(
            dropped,
            Dropped {
                batches: 1,
                bytes: 45
            }
        );
        let next = s.oldest().expect("item").expect("readable");
        assert_eq!((next.kind, next.payload[0]), (ItemKind::Scores, 2));
        s.remove(next.seq);
        let last = s.oldest().expect("item").expect("readable");
        assert_eq!(last.payload[0], 3);
        // A batch larger than the whole bound is refused, not written.
        let too_big = s.push(ItemKind::Spans, 1, &[0; 200]).expect("push");
        assert_eq!(too_big.batches, 1);
        // A corrupt file is reported and removed, and does not block the next one.
        std::fs::write(dir.path().join(format!("{:020}.batch", 0)), b"x").expect("write");
        let mut s = Spool::open(dir.path(), 100).expect("reopen");
        assert!(s.oldest().expect("item").is_err());
        assert_eq!(s.oldest().expect("item").expect("ok").payload[0], 3);
    }
}
