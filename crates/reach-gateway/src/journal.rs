//! The mapping table's mirror on disk (DPF's "mirror file"): an
//! append-only journal of JSON lines, one per change, each written and
//! synced before the change is acted on further. At start the journal is
//! replayed and compacted: the live mappings are written to a new file,
//! synced, and renamed over the old one, so a crash at any point leaves
//! either the old journal or the new one whole.
//!
//! ```text
//! {"add":{"protocol":"tcp","external_port":40001,"internal":"10.0.0.5:22",...}}
//! {"del":["tcp",40001]}
//! ```
//!
//! A line cut short by a crash (the last one) is skipped with a warning;
//! a bad line elsewhere is an error that names it, not a guess.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::table::{Key, Mapping};

/// One journal line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Entry {
    /// A mapping was added or renewed (the newest line for a key wins).
    Add(Mapping),
    /// The mapping on this key was deleted.
    Del(Key),
}

/// Why the journal cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A line that is not an entry, before the last line.
    #[error("journal {path} line {line}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Its line number (from 1).
        line: usize,
        /// Why it does not read.
        why: String,
    },
}

/// The open journal, appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Lines appended since the last compaction.
    appended: usize,
}

impl Journal {
    /// Opens (or creates) the journal at `path`, replays it and compacts
    /// it. Returns the journal and the mappings it holds (by key, newest
    /// line winning; expiry is the caller's to judge).
    pub fn open(path: &Path) -> Result<(Self, Vec<Mapping>), JournalError> {
        let io_err = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut live: std::collections::BTreeMap<Key, Mapping> = Default::default();
        match File::open(path) {
            Ok(f) => {
                let lines: Vec<String> = BufReader::new(f)
                    .lines()
                    .collect::<Result<_, _>>()
                    .map_err(io_err)?;
                let last = lines.len();
                for (i, line) in lines.iter().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<Entry>(line) {
                        Ok(Entry::Add(m)) => {
                            live.insert((m.protocol, m.external_port), m);
                        }
                        Ok(Entry::Del(k)) => {
                            live.remove(&k);
                        }
                        Err(e) if i + 1 == last => {
                            tracing::warn!(path = %path.display(), "journal's last line is cut short (a crash while writing it): skipped: {e}");
                        }
                        Err(e) => {
                            return Err(JournalError::Corrupt {
                                path: path.to_path_buf(),
                                line: i + 1,
                                why: e.to_string(),
                            })
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let mappings: Vec<Mapping> = live.into_values().collect();
        let journal = Self::rewrite(path, &mappings)?;
        Ok((journal, mappings))
    }

    /// Writes `mappings` as a fresh journal beside `path`, syncs it and
    /// renames it into place; returns it open for appending.
    fn rewrite(path: &Path, mappings: &[Mapping]) -> Result<Self, JournalError> {
        let io_err = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("compacting");
        {
            let mut f = File::create(&tmp).map_err(io_err)?;
            let mut buf = Vec::new();
            for m in mappings {
                line(&mut buf, &Entry::Add(*m));
            }
            f.write_all(&buf).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
        }
        std::fs::rename(&tmp, path).map_err(io_err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename itself is durable once the directory is synced.
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        }
        let file = OpenOptions::new().append(true).open(path).map_err(io_err)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            appended: 0,
        })
    }

    /// Appends entries and syncs them (one write, one sync for a batch).
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), JournalError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for e in entries {
            line(&mut buf, e);
        }
        let path = self.path.clone();
        let io_err = |source| JournalError::Io { path, source };
        self.file.write_all(&buf).map_err(io_err.clone())?;
        self.file.sync_data().map_err(io_err)?;
        self.appended += entries.len();
        Ok(())
    }

    /// Lines appended since the journal was last compacted.
    pub fn appended(&self) -> usize {
        self.appended
    }

    /// Compacts the journal to `mappings` (the table's live ones).
    pub fn compact(&mut self, mappings: &[Mapping]) -> Result<(), JournalError> {
        *self = Self::rewrite(&self.path, mappings)?;
        Ok(())
    }
}

fn line(buf: &mut Vec<u8>, e: &Entry) {
    // Serialising these plain structs cannot fail.
    if serde_json::to_writer(&mut *buf, e).is_ok() {
        buf.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Protocol, Source};

    fn mapping(port: u16, expires: u64) -> Mapping {
        Mapping {
            protocol: Protocol::Tcp,
            external_port: port,
            internal: "10.0.0.5:22".parse().unwrap(),
            client: "10.0.0.5".parse().unwrap(),
            expires,
            source: Source::Pcp,
            nonce: Some([3; 12]),
        }
    }

    #[test]
    fn the_journal_replays_newest_wins_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mappings.journal");
        let (mut j, live) = Journal::open(&path).unwrap();
        assert!(live.is_empty());
        j.append(&[Entry::Add(mapping(1, 10)), Entry::Add(mapping(2, 10))])
            .unwrap();
        j.append(&[Entry::Add(mapping(1, 20)), Entry::Del((Protocol::Tcp, 2))])
            .unwrap();
        drop(j);
        let (_, live) = Journal::open(&path).unwrap();
        assert_eq!(live, [mapping(1, 20)]);
        // Compacted: one line left.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
    }

    #[test]
    fn a_last_line_cut_short_is_skipped_and_a_bad_line_before_it_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path).unwrap();
        j.append(&[Entry::Add(mapping(1, 10))]).unwrap();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"add\":{\"protocol\":\"tc").unwrap();
        drop(f);
        let (_, live) = Journal::open(&path).unwrap();
        assert_eq!(live, [mapping(1, 10)]);
        std::fs::write(&path, "garbage\n{\"del\":[\"tcp\",1]}\n").unwrap();
        let e = Journal::open(&path).unwrap_err();
        assert!(matches!(e, JournalError::Corrupt { line: 1, .. }), "{e}");
    }
}
