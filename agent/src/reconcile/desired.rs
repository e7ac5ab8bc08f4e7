//! Desired state: what the guests of this node should look like, and where it comes from.
//!
//! Owns: [`DesiredState`] (validated and normalized at the boundary: vmids checked, keys
//! known, values normalized, vmids unique, size capped), the [`DesiredProvider`] trait, the
//! live default [`EmptyProvider`] (no guests, so no actions) and [`FileProvider`]
//! (`reconcile.desired_file`, re-read when its metadata or content changes). The hub's
//! signed document is served by [`crate::ops::desired::HubDesired`], through the same trait
//! and the same parser.
//!
//! Anti-rollback (file source): with the journal, the file provider records the generation
//! it adopted (source `file` in the journal database, with the SHA-256 of the normalized
//! state). A file whose generation is below it, or equal to it with other content, is an
//! error (`rollback: …`) and the engine mutates nothing until the file is fixed. Only
//! generations of the same source are compared.
//!
//! File format (config keys named as Proxmox names them; `power` and `config` optional):
//! `{"generation": 3, "guests": [{"vmid": 101, "power": "stopped", "config": {"memory": 2048,
//! "description": "web", "nesting": true}}]}`
//!
//! Must never: hand the engine a state that failed validation (an invalid file yields an
//! error, and the engine then mutates nothing), or read an unbounded file.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use felhom_protocol::Vmid;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::journal::desired::{Adoption, DesiredSourceKind};
use super::journal::{Journal, JournalError};
use super::normalize::{Field, Norm, NormalizeError};

/// Largest desired-state file read (a hard cap against a runaway or hostile file).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("desired state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("desired state {path}: larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("desired state: not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("desired state: guest {vmid}: {source}")]
    Field {
        vmid: Vmid,
        #[source]
        source: NormalizeError,
    },
    #[error("desired state: guest {0} appears more than once")]
    Duplicate(Vmid),
    #[error("rollback: generation {generation} is below the applied {applied}")]
    Rollback { generation: u64, applied: u64 },
    #[error(
        "rollback: generation {generation} is the applied one with different content (raise the generation to change it)"
    )]
    SameGenerationChanged { generation: u64 },
    #[error("desired state: recording the adopted generation: {0}")]
    Journal(#[source] JournalError),
    /// The hub's document is not in force (refused when verified again, say).
    #[error("desired state from the hub: {0}")]
    Hub(String),
}

/// Desired power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    Running,
    Stopped,
}

/// One guest's desired state: power (if managed) and normalized config fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesiredGuest {
    pub vmid: Vmid,
    pub power: Option<Power>,
    pub config: BTreeMap<Field, Norm>,
}

/// The whole desired state of this node, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DesiredState {
    pub generation: u64,
    /// Sorted by vmid, unique.
    pub guests: Vec<DesiredGuest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    generation: u64,
    #[serde(default)]
    guests: Vec<RawGuest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuest {
    vmid: Vmid,
    #[serde(default)]
    power: Option<Power>,
    #[serde(default)]
    config: serde_json::Map<String, Value>,
}

impl DesiredState {
    /// Hex SHA-256 of the normalized state (generation included): equal for two files
    /// that differ only in layout, key order or guest order.
    pub fn sha256_hex(&self) -> String {
        use sha2::{Digest, Sha256};
        // serde_json of these types is deterministic (structs, sorted Vec, BTreeMap).
        hex::encode(Sha256::digest(serde_json::to_vec(self).unwrap_or_default()))
    }

    /// Parses and validates the file format.
    pub fn from_json(bytes: &[u8]) -> Result<DesiredState, DesiredError> {
        let raw: RawState = serde_json::from_slice(bytes)?;
        let mut seen = HashSet::new();
        let mut guests = Vec::with_capacity(raw.guests.len());
        for g in raw.guests {
            if !seen.insert(g.vmid) {
                return Err(DesiredError::Duplicate(g.vmid));
            }
            let mut config = BTreeMap::new();
            for (k, v) in &g.config {
                let field = Field::from_key(k).map_err(|source| DesiredError::Field {
                    vmid: g.vmid,
                    source,
                })?;
                let norm = field.desired(v).map_err(|source| DesiredError::Field {
                    vmid: g.vmid,
                    source,
                })?;
                config.insert(field, norm);
            }
            guests.push(DesiredGuest {
                vmid: g.vmid,
                power: g.power,
                config,
            });
        }
        guests.sort_by_key(|g| g.vmid);
        Ok(DesiredState {
            generation: raw.generation,
            guests,
        })
    }
}

/// Where the desired state comes from. `poll` is cheap and called often (about once a
/// second): it returns `Some` only when the state changed since the last call (and at the
/// first call), so the engine can run a cycle on every change.
pub trait DesiredProvider: Send + Sync + std::fmt::Debug {
    fn poll(&self) -> Option<Result<Arc<DesiredState>, Arc<DesiredError>>>;
    /// A short description for logs and the report (`"empty"`, `"file /etc/…"`).
    fn describe(&self) -> String;
}

/// The live default: no desired guests, hence no actions.
#[derive(Debug, Default)]
pub struct EmptyProvider {
    served: std::sync::atomic::AtomicBool,
}

impl DesiredProvider for EmptyProvider {
    fn poll(&self) -> Option<Result<Arc<DesiredState>, Arc<DesiredError>>> {
        if self.served.swap(true, std::sync::atomic::Ordering::SeqCst) {
            None
        } else {
            Some(Ok(Arc::new(DesiredState::default())))
        }
    }
    fn describe(&self) -> String {
        "empty".to_string()
    }
}

/// What identifies a version of the file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    mtime: Option<SystemTime>,
    len: u64,
    ino: u64,
}

/// What the last poll saw: the stamp and the content, or the error text.
#[derive(Debug)]
struct Seen {
    stamp: Option<Stamp>,
    content: Result<Vec<u8>, String>,
}

/// A file modified this recently is re-read even if its stamp looks unchanged: file
/// timestamps are coarse, so two writes of the same length can share one ("racy git").
const RACY_WINDOW: std::time::Duration = std::time::Duration::from_secs(3);

/// Reads `reconcile.desired_file`, again whenever it changes.
#[derive(Debug)]
pub struct FileProvider {
    path: PathBuf,
    last: Mutex<Option<Seen>>,
    /// Where the adopted generation is kept (anti-rollback); `None`: not checked (planning
    /// from the command line, tests).
    journal: Option<Arc<Journal>>,
}

impl FileProvider {
    /// A provider without anti-rollback (nothing recorded): for read-only planning.
    pub fn new(path: impl Into<PathBuf>) -> FileProvider {
        FileProvider {
            path: path.into(),
            last: Mutex::new(None),
            journal: None,
        }
    }

    /// The daemon's provider: each new state is checked against, and recorded as, the
    /// generation the file source adopted (see the module docs).
    pub fn with_journal(path: impl Into<PathBuf>, journal: Arc<Journal>) -> FileProvider {
        FileProvider {
            journal: Some(journal),
            ..FileProvider::new(path)
        }
    }

    /// Refuses a rollback against the journal's record and records a new generation.
    fn adopt(&self, state: DesiredState) -> Result<DesiredState, DesiredError> {
        let Some(journal) = &self.journal else {
            return Ok(state);
        };
        let sha = state.sha256_hex();
        let refused = |applied: u64| {
            if state.generation < applied {
                DesiredError::Rollback {
                    generation: state.generation,
                    applied,
                }
            } else {
                DesiredError::SameGenerationChanged {
                    generation: state.generation,
                }
            }
        };
        // Read first: the same document again (every start) writes nothing.
        match journal
            .desired_record(DesiredSourceKind::File)
            .map_err(DesiredError::Journal)?
        {
            Some(r) if r.generation == state.generation && r.sha256 == sha => return Ok(state),
            Some(r) if r.generation >= state.generation => return Err(refused(r.generation)),
            _ => {}
        }
        match journal
            .adopt_desired(DesiredSourceKind::File, state.generation, &sha, None)
            .map_err(DesiredError::Journal)?
        {
            Adoption::Adopted(_) => Ok(state),
            Adoption::Refused(r) => Err(refused(r.generation)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn stamp(&self) -> Result<Stamp, DesiredError> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&self.path).map_err(|source| DesiredError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(Stamp {
            mtime: md.modified().ok(),
            len: md.len(),
            ino: md.ino(),
        })
    }

    fn read(&self) -> Result<Vec<u8>, DesiredError> {
        let f = std::fs::File::open(&self.path).map_err(|source| DesiredError::Io {
            path: self.path.clone(),
            source,
        })?;
        let mut buf = Vec::new();
        f.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(|source| DesiredError::Io {
                path: self.path.clone(),
                source,
            })?;
        if buf.len() as u64 > MAX_FILE_BYTES {
            return Err(DesiredError::TooLarge {
                path: self.path.clone(),
            });
        }
        Ok(buf)
    }

    /// Reads and parses the file now, whether or not it changed.
    pub fn load(&self) -> Result<DesiredState, DesiredError> {
        DesiredState::from_json(&self.read()?)
    }
}

impl DesiredProvider for FileProvider {
    fn poll(&self) -> Option<Result<Arc<DesiredState>, Arc<DesiredError>>> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = self.stamp().ok();
        if let (Some(now), Some(seen)) = (&stamp, last.as_ref()) {
            let settled = now
                .mtime
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > RACY_WINDOW);
            if seen.stamp.as_ref() == Some(now) && settled {
                return None;
            }
        }
        let read = self.read();
        let content = match &read {
            Ok(bytes) => Ok(bytes.clone()),
            Err(e) => Err(e.to_string()),
        };
        let unchanged = last.as_ref().is_some_and(|seen| seen.content == content);
        *last = Some(Seen { stamp, content });
        if unchanged {
            return None;
        }
        Some(
            read.and_then(|bytes| DesiredState::from_json(&bytes))
                .and_then(|state| self.adopt(state))
                .map(Arc::new)
                .map_err(Arc::new),
        )
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_format() {
        let s = DesiredState::from_json(
            br#"{"generation": 3, "guests": [{"vmid": 101, "power": "stopped", "config": {"memory": 2048, "description": "web", "nesting": true}}]}"#,
        )
        .unwrap();
        assert_eq!(s.generation, 3);
        assert_eq!(s.guests.len(), 1);
        let g = &s.guests[0];
        assert_eq!(g.vmid.get(), 101);
        assert_eq!(g.power, Some(Power::Stopped));
        assert_eq!(g.config[&Field::Memory], Norm::Int(2048));
        assert_eq!(g.config[&Field::Description], Norm::Text("web".into()));
        assert_eq!(g.config[&Field::Nesting], Norm::Bool(true));
    }

    #[test]
    fn bad_input_is_a_typed_error_naming_what_is_wrong() {
        let cases: [(&[u8], &str); 6] = [
            (br#"{"generation": 1, "guests": [{"vmid": 42}]}"#, "vmid"),
            (
                br#"{"generation": 1, "guests": [{"vmid": 101, "config": {"rootfs": "x"}}]}"#,
                "rootfs",
            ),
            (
                br#"{"generation": 1, "guests": [{"vmid": 101, "config": {"memory": "lots"}}]}"#,
                "memory",
            ),
            (
                br#"{"generation": 1, "guests": [{"vmid": 101}, {"vmid": 101}]}"#,
                "more than once",
            ),
            (
                br#"{"generation": 1, "guests": [{"vmid": 101, "power": "paused"}]}"#,
                "paused",
            ),
            (br#"{"generation": 1, "extra": true}"#, "extra"),
        ];
        for (input, needle) in cases {
            let e = DesiredState::from_json(input).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        }
    }

    #[test]
    fn empty_provider_serves_one_empty_state() {
        let p = EmptyProvider::default();
        let first = p.poll().unwrap().unwrap();
        assert!(first.guests.is_empty());
        assert!(p.poll().is_none());
    }

    #[test]
    fn file_provider_rereads_on_change_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired.json");
        std::fs::write(&path, br#"{"generation": 1, "guests": []}"#).unwrap();
        let p = FileProvider::new(&path);
        assert_eq!(p.poll().unwrap().unwrap().generation, 1);
        assert!(p.poll().is_none(), "unchanged file: no new state");
        // Same size, new content: found by content even if mtime granularity hides it.
        std::fs::write(&path, br#"{"generation": 2, "guests": []}"#).unwrap();
        let next = p.poll().expect("changed file is re-read").unwrap();
        assert_eq!(next.generation, 2);
        assert!(p.poll().is_none());
        // Invalid content: an error once, then quiet until it changes again.
        std::fs::write(&path, b"{not json").unwrap();
        assert!(p.poll().unwrap().is_err());
        std::fs::write(
            &path,
            br#"{"generation": 3, "guests": [{"vmid": 100, "power": "running"}]}"#,
        )
        .unwrap();
        assert_eq!(p.poll().unwrap().unwrap().generation, 3);
        // Removed: an error (the engine then mutates nothing).
        std::fs::remove_file(&path).unwrap();
        assert!(p.poll().unwrap().is_err());
        assert!(p.poll().is_none(), "the same error is reported once");
    }

    #[test]
    fn file_provider_refuses_a_rollback_against_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        let path = dir.path().join("desired.json");
        let g5 = br#"{"generation": 5, "guests": [{"vmid": 101, "power": "running"}]}"#;
        std::fs::write(&path, g5).unwrap();
        let p = FileProvider::with_journal(&path, journal.clone());
        assert_eq!(p.poll().unwrap().unwrap().generation, 5);
        let rec = journal
            .desired_record(DesiredSourceKind::File)
            .unwrap()
            .unwrap();
        assert_eq!(rec.generation, 5);

        // A lower generation: refused, naming both numbers; the record stays.
        std::fs::write(&path, br#"{"generation": 4, "guests": []}"#).unwrap();
        let e = p.poll().unwrap().unwrap_err().to_string();
        assert_eq!(e, "rollback: generation 4 is below the applied 5");
        // The same generation with other content: refused too.
        std::fs::write(
            &path,
            br#"{"generation": 5, "guests": [{"vmid": 101, "power": "stopped"}]}"#,
        )
        .unwrap();
        let e = p.poll().unwrap().unwrap_err().to_string();
        assert!(
            e.starts_with("rollback: generation 5 is the applied one"),
            "{e}"
        );
        assert_eq!(
            journal
                .desired_record(DesiredSourceKind::File)
                .unwrap()
                .unwrap(),
            rec,
            "a refused file changes nothing"
        );
        // The same document in another layout is the same document.
        std::fs::write(
            &path,
            br#"{"guests": [{"power": "running", "vmid": 101}],
                 "generation": 5}"#,
        )
        .unwrap();
        assert_eq!(p.poll().unwrap().unwrap().generation, 5);
        // A new provider on the same journal (a restart) keeps refusing the rollback.
        std::fs::write(&path, br#"{"generation": 1, "guests": []}"#).unwrap();
        let restarted = FileProvider::with_journal(&path, journal.clone());
        let e = restarted.poll().unwrap().unwrap_err().to_string();
        assert_eq!(e, "rollback: generation 1 is below the applied 5");
        // A higher generation is adopted and recorded.
        std::fs::write(&path, br#"{"generation": 6, "guests": []}"#).unwrap();
        assert_eq!(restarted.poll().unwrap().unwrap().generation, 6);
        let rec = journal.desired_record(DesiredSourceKind::File).unwrap();
        assert_eq!(rec.map(|r| r.generation), Some(6));
        // Another source's numbers are never compared: the hub's record is separate.
        assert_eq!(
            journal.desired_record(DesiredSourceKind::Hub).unwrap(),
            None
        );
    }

    #[test]
    fn file_provider_caps_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired.json");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_FILE_BYTES + 10).unwrap();
        let e = FileProvider::new(&path).load().unwrap_err();
        assert!(matches!(e, DesiredError::TooLarge { .. }), "{e}");
    }
}
