//! The desired-state records of the journal database: per source (`file`, `hub`) the
//! document reconcile last adopted, so the generation never goes back, across restarts.
//!
//! Owns: the `desired_sources` table (one row per source: the adopted generation, the
//! document's SHA-256, for the hub the whole DSSE envelope as received, when, and a
//! checksum over all of it), [`Journal::desired_record`] and [`Journal::adopt_desired`].
//!
//! Rules: a row is replaced only by a higher generation, or by the same generation with
//! the same SHA-256 (a re-signed copy of the same document); the check runs inside the
//! writing transaction. Sources never compare with each other. A row that fails its
//! checksum or cannot be decoded puts the journal in safe mode, as an entry does.
//!
//! Must never: verify or parse an envelope (the caller does, against the current trust),
//! or write anything but a whole row in one transaction.

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::{Journal, JournalError, now_ms};

/// Where a desired state comes from. Each source keeps its own adopted generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DesiredSourceKind {
    /// `reconcile.desired_file`.
    File,
    /// The hub's signed document.
    Hub,
}

impl DesiredSourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredSourceKind::File => "file",
            DesiredSourceKind::Hub => "hub",
        }
    }

    fn parse(s: &str) -> Option<DesiredSourceKind> {
        [DesiredSourceKind::File, DesiredSourceKind::Hub]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// The document a source last adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredRecord {
    pub source: DesiredSourceKind,
    pub generation: u64,
    /// Hex SHA-256: of the signed payload for `hub` (`payload_sha256`), of the normalized
    /// state for `file`.
    pub sha256: String,
    /// `hub` only: the DSSE envelope as received, verified again at every start and reload.
    pub envelope: Option<String>,
    /// Wall-clock milliseconds since the epoch when it was adopted.
    pub adopted_ms: i64,
}

/// What [`Journal::adopt_desired`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// Written: the new record.
    Adopted(DesiredRecord),
    /// Not written: the stored record has a higher generation, or the same generation with
    /// another SHA-256 (a rollback).
    Refused(DesiredRecord),
}

/// Called from [`Journal::setup`] with its connection.
pub(super) fn create_tables(db: &Connection) -> rusqlite::Result<()> {
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS desired_sources (
             source TEXT PRIMARY KEY,
             -- the u64 generation's bits (compared in Rust, never in SQL)
             generation INTEGER NOT NULL,
             sha256 TEXT NOT NULL,
             envelope TEXT,
             adopted_ms INTEGER NOT NULL,
             checksum TEXT NOT NULL
         );",
    )
}

fn checksum(
    source: &str,
    generation: i64,
    sha256: &str,
    envelope: Option<&str>,
    adopted_ms: i64,
) -> String {
    let mut h = Sha256::new();
    h.update(b"felhom-desired-source-v1\0");
    for part in [source, sha256] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(generation.to_le_bytes());
    match envelope {
        Some(e) => {
            h.update([1]);
            h.update((e.len() as u64).to_le_bytes());
            h.update(e.as_bytes());
        }
        None => h.update([0]),
    }
    h.update(adopted_ms.to_le_bytes());
    hex::encode(h.finalize())
}

struct RawRecord {
    rowid: i64,
    source: String,
    generation: i64,
    sha256: String,
    envelope: Option<String>,
    adopted_ms: i64,
    checksum: String,
}

const SELECT: &str = "SELECT rowid, source, generation, sha256, envelope, adopted_ms, checksum
                      FROM desired_sources WHERE source = ?1";

fn read_raw(db: &Connection, source: DesiredSourceKind) -> rusqlite::Result<Option<RawRecord>> {
    db.prepare_cached(SELECT)?
        .query_row(params![source.as_str()], |r| {
            Ok(RawRecord {
                rowid: r.get(0)?,
                source: r.get(1)?,
                generation: r.get(2)?,
                sha256: r.get(3)?,
                envelope: r.get(4)?,
                adopted_ms: r.get(5)?,
                checksum: r.get(6)?,
            })
        })
        .optional()
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Journal {
    fn decode_desired(&self, r: RawRecord) -> Result<DesiredRecord, JournalError> {
        let expect = checksum(
            &r.source,
            r.generation,
            &r.sha256,
            r.envelope.as_deref(),
            r.adopted_ms,
        );
        if expect != r.checksum {
            return Err(JournalError::Checksum {
                path: self.path.clone(),
                id: r.rowid,
            });
        }
        let bad = |what, detail: String| JournalError::Decode {
            path: self.path.clone(),
            id: r.rowid,
            what,
            detail,
        };
        let source = DesiredSourceKind::parse(&r.source)
            .ok_or_else(|| bad("desired source", format!("{:?}", r.source)))?;
        if !is_sha256_hex(&r.sha256) {
            return Err(bad("desired sha256", format!("{:?}", r.sha256)));
        }
        if (source == DesiredSourceKind::Hub) != r.envelope.is_some() {
            return Err(bad(
                "desired envelope",
                "an envelope is kept for the hub source and only for it".to_string(),
            ));
        }
        Ok(DesiredRecord {
            source,
            generation: r.generation as u64,
            sha256: r.sha256,
            envelope: r.envelope,
            adopted_ms: r.adopted_ms,
        })
    }

    /// Decodes a row read from the table; a bad row puts the journal in safe mode.
    fn checked_desired(
        &self,
        raw: Option<RawRecord>,
    ) -> Result<Option<DesiredRecord>, JournalError> {
        match raw.map(|r| self.decode_desired(r)).transpose() {
            Ok(rec) => Ok(rec),
            Err(e) => {
                self.enter_safe_mode(&e);
                Err(e)
            }
        }
    }

    /// The document `source` last adopted, if any.
    pub fn desired_record(
        &self,
        source: DesiredSourceKind,
    ) -> Result<Option<DesiredRecord>, JournalError> {
        let raw = {
            let c = self.lock();
            read_raw(&c.db, source).map_err(|e| self.sql_err(e))?
        };
        self.checked_desired(raw)
    }

    /// Records that `source` adopted the document `generation` with hex SHA-256 `sha256`
    /// (and, for the hub, its envelope), in one transaction that first reads the stored
    /// record: a lower generation, or the same one with another SHA-256, is not written
    /// ([`Adoption::Refused`]). The same generation and SHA-256 is written again (the
    /// envelope may carry other signatures).
    pub fn adopt_desired(
        &self,
        source: DesiredSourceKind,
        generation: u64,
        sha256: &str,
        envelope: Option<&str>,
    ) -> Result<Adoption, JournalError> {
        let adopted_ms = now_ms();
        let gen_bits = generation as i64;
        let sum = checksum(source.as_str(), gen_bits, sha256, envelope, adopted_ms);
        let stored = self.write(|tx| {
            let stored = read_raw(tx, source)?;
            if let Some(s) = &stored {
                let (g, same) = (s.generation as u64, s.sha256 == sha256);
                if g > generation || (g == generation && !same) {
                    return Ok(stored);
                }
            }
            tx.prepare_cached(
                "INSERT INTO desired_sources
                     (source, generation, sha256, envelope, adopted_ms, checksum)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(source) DO UPDATE SET
                     generation = excluded.generation, sha256 = excluded.sha256,
                     envelope = excluded.envelope, adopted_ms = excluded.adopted_ms,
                     checksum = excluded.checksum",
            )?
            .execute(params![
                source.as_str(),
                gen_bits,
                sha256,
                envelope,
                adopted_ms,
                sum
            ])?;
            Ok(None)
        })?;
        match stored {
            // The refusing row is decoded (checksum checked) like any read.
            Some(raw) => match self.decode_desired(raw) {
                Ok(rec) => Ok(Adoption::Refused(rec)),
                Err(e) => {
                    self.enter_safe_mode(&e);
                    Err(e)
                }
            },
            None => Ok(Adoption::Adopted(DesiredRecord {
                source,
                generation,
                sha256: sha256.to_string(),
                envelope: envelope.map(str::to_string),
                adopted_ms,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn records_are_per_source_monotonic_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.desired_record(DesiredSourceKind::Hub).unwrap(), None);
        let a = j
            .adopt_desired(DesiredSourceKind::Hub, 5, SHA_A, Some("{\"env\":1}"))
            .unwrap();
        assert!(matches!(a, Adoption::Adopted(ref r) if r.generation == 5));
        // The file source has its own numbers: a lower generation there is fine.
        let f = j
            .adopt_desired(DesiredSourceKind::File, 2, SHA_B, None)
            .unwrap();
        assert!(matches!(f, Adoption::Adopted(_)));
        // Lower, and equal with another digest: not written.
        for (g, sha) in [(4, SHA_A), (5, SHA_B)] {
            match j
                .adopt_desired(DesiredSourceKind::Hub, g, sha, Some("{}"))
                .unwrap()
            {
                Adoption::Refused(r) => assert_eq!((r.generation, r.sha256.as_str()), (5, SHA_A)),
                other => panic!("{g}: {other:?}"),
            }
        }
        // Equal with the same digest: written again (a re-signed envelope).
        let again = j
            .adopt_desired(DesiredSourceKind::Hub, 5, SHA_A, Some("{\"env\":2}"))
            .unwrap();
        assert!(matches!(again, Adoption::Adopted(_)));
        // u64 generations above i64::MAX keep their value.
        j.adopt_desired(DesiredSourceKind::File, u64::MAX, SHA_A, None)
            .unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.safe_mode(), None);
        let hub = j.desired_record(DesiredSourceKind::Hub).unwrap().unwrap();
        assert_eq!(hub.generation, 5);
        assert_eq!(hub.envelope.as_deref(), Some("{\"env\":2}"));
        let file = j.desired_record(DesiredSourceKind::File).unwrap().unwrap();
        assert_eq!((file.generation, file.envelope), (u64::MAX, None));
    }

    #[test]
    fn a_flipped_value_puts_the_journal_in_safe_mode() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.adopt_desired(DesiredSourceKind::Hub, 3, SHA_A, Some("{\"env\":1}"))
            .unwrap();
        drop(j);
        // Raise the generation behind the journal's back (a flipped bit, or an edit).
        let db = Connection::open(dir.path().join(super::super::JOURNAL_FILE)).unwrap();
        db.execute(
            "UPDATE desired_sources SET generation = 300 WHERE source = 'hub'",
            [],
        )
        .unwrap();
        drop(db);
        let j = Journal::open(dir.path()).unwrap();
        let e = j.desired_record(DesiredSourceKind::Hub).unwrap_err();
        assert!(matches!(e, JournalError::Checksum { .. }), "{e}");
        assert!(j.safe_mode().is_some());
        let e = j
            .adopt_desired(DesiredSourceKind::Hub, 4, SHA_A, Some("{}"))
            .unwrap_err();
        assert!(matches!(e, JournalError::SafeMode(_)), "{e}");
    }
}
