//! Restore tests in the journal database: one row per test, written before each step.
//!
//! Owns the `restore_tests` table and the `meta.restore_seq` key. A row holds the whole
//! [`RestoreRecord`] as JSON plus the columns it is looked up by (the scratch vmid, whether
//! a scratch guest may exist there, the result and its report `seq`), with a SHA-256 over
//! all of them, checked on every read; a mismatch puts the journal in safe mode.
//!
//! Rules: the row saying a scratch guest may exist (`scratch = 'maybe'`) is committed
//! before the restore request is sent, so after a kill -9 the next run knows which vmid to
//! look at; it says `gone` only once the scratch guest is destroyed (or was never made).
//! A result gets the next `restore_seq` when it becomes final; the report sends results by
//! that `seq`, after the last one the hub accepted.
//!
//! Must never: change a final result, reuse a `seq`, or write anything but a whole row in
//! one transaction.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Journal, JournalError};

/// Creates the table (called from `Journal::setup`).
pub(super) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS restore_tests (
        id INTEGER PRIMARY KEY,
        vmid INTEGER NOT NULL,
        scratch_vmid INTEGER,
        scratch TEXT NOT NULL,
        result TEXT,
        seq INTEGER,
        body TEXT NOT NULL,
        checksum TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS restore_tests_scratch ON restore_tests(scratch_vmid)
        WHERE scratch = 'maybe';
    CREATE INDEX IF NOT EXISTS restore_tests_seq ON restore_tests(seq) WHERE seq IS NOT NULL;
";

/// One restore test as the journal keeps it. The restore module gives the strings their
/// meaning; here they are data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreRecord {
    /// Row id (0 before the first write).
    pub id: i64,
    /// The guest whose backup is tested.
    pub vmid: u32,
    /// `lxc` or `qemu`.
    pub kind: String,
    pub archive: Option<String>,
    /// The archive's `ctime` (Unix seconds).
    pub archive_ctime: Option<i64>,
    pub archive_size: Option<u64>,
    pub scratch_vmid: Option<u32>,
    pub started_ms: i64,
    /// The step reached: `planned`, `restoring`, `restored`, `prepared`, `starting`,
    /// `checking`, `cleaning`, `done`.
    pub step: String,
    /// `maybe`: a scratch guest made by this test may exist on `scratch_vmid`; `gone`.
    pub scratch: String,
    pub restore_seconds: Option<f64>,
    pub boot_seconds: Option<f64>,
    pub duration_seconds: Option<f64>,
    /// `passed`, `failed`, `skipped`; `None` while running.
    pub result: Option<String>,
    pub reason: Option<String>,
    pub upids: Vec<String>,
    pub finished_ms: Option<i64>,
    /// Report order, given when the result became final.
    pub seq: Option<u64>,
    /// The result is no verdict on the backup (PVE could not be read, or refused the
    /// restore before it started): the guest keeps its place in the round-robin, so the
    /// next run tests it again.
    #[serde(default)]
    pub retry: bool,
    /// The last error destroying the scratch guest, while it is not destroyed.
    #[serde(default)]
    pub cleanup_error: Option<String>,
    /// Since when the scratch guest cannot be destroyed (the first failed attempt).
    #[serde(default)]
    pub cleanup_failing_since_ms: Option<i64>,
}

fn checksum(
    id: i64,
    vmid: i64,
    scratch_vmid: Option<i64>,
    scratch: &str,
    result: Option<&str>,
    seq: Option<i64>,
    body: &str,
) -> String {
    let mut h = Sha256::new();
    let mut part = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    part(&id.to_le_bytes());
    part(&vmid.to_le_bytes());
    part(
        &scratch_vmid
            .map(|v| v.to_le_bytes().to_vec())
            .unwrap_or_default(),
    );
    part(scratch.as_bytes());
    part(result.unwrap_or("\0").as_bytes());
    part(&seq.map(|v| v.to_le_bytes().to_vec()).unwrap_or_default());
    part(body.as_bytes());
    hex::encode(h.finalize())
}

struct RawRow {
    id: i64,
    vmid: i64,
    scratch_vmid: Option<i64>,
    scratch: String,
    result: Option<String>,
    seq: Option<i64>,
    body: String,
    checksum: String,
}

const COLUMNS: &str = "id, vmid, scratch_vmid, scratch, result, seq, body, checksum";

fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: r.get(0)?,
        vmid: r.get(1)?,
        scratch_vmid: r.get(2)?,
        scratch: r.get(3)?,
        result: r.get(4)?,
        seq: r.get(5)?,
        body: r.get(6)?,
        checksum: r.get(7)?,
    })
}

impl Journal {
    /// Writes `rec` (a new row when its id is 0; the id is set). When `rec.result` is set
    /// and the stored row has none yet, the result gets the next `seq` in the same
    /// transaction. A final result cannot be changed.
    pub fn restore_put(&self, rec: &mut RestoreRecord) -> Result<(), JournalError> {
        let path = self.path.clone();
        let mut out = rec.clone();
        let stored = if rec.id == 0 {
            None
        } else {
            self.restore_get(rec.id)?
        };
        if let Some(old) = &stored
            && old.result.is_some()
            && old.result != rec.result
        {
            return Err(JournalError::Decode {
                path,
                id: rec.id,
                what: "restore test",
                detail: "a final result cannot be changed".to_string(),
            });
        }
        let needs_seq = rec.result.is_some() && stored.as_ref().is_none_or(|o| o.seq.is_none());
        out = self.write(move |tx| {
            if out.id == 0 {
                let next: i64 = tx.query_row(
                    "SELECT COALESCE(MAX(id), 0) + 1 FROM restore_tests",
                    [],
                    |r| r.get(0),
                )?;
                out.id = next;
            }
            if needs_seq {
                let seq: Option<String> = tx
                    .prepare_cached("SELECT v FROM meta WHERE k = 'restore_seq'")?
                    .query_row([], |r| r.get(0))
                    .optional()?;
                let seq = seq.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) + 1;
                tx.prepare_cached(
                    "INSERT INTO meta (k, v) VALUES ('restore_seq', ?1)
                     ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                )?
                .execute(params![seq.to_string()])?;
                out.seq = Some(seq);
            }
            let body = serde_json::to_string(&out).unwrap_or_default();
            let scratch_vmid = out.scratch_vmid.map(i64::from);
            let seq = out.seq.map(|s| s as i64);
            let sum = checksum(
                out.id,
                i64::from(out.vmid),
                scratch_vmid,
                &out.scratch,
                out.result.as_deref(),
                seq,
                &body,
            );
            tx.prepare_cached(
                "INSERT INTO restore_tests (id, vmid, scratch_vmid, scratch, result, seq, body, checksum)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(id) DO UPDATE SET scratch_vmid = excluded.scratch_vmid,
                     scratch = excluded.scratch, result = excluded.result, seq = excluded.seq,
                     body = excluded.body, checksum = excluded.checksum",
            )?
            .execute(params![
                out.id,
                i64::from(out.vmid),
                scratch_vmid,
                out.scratch,
                out.result,
                seq,
                body,
                sum
            ])?;
            Ok(out)
        })?;
        *rec = out;
        Ok(())
    }

    fn restore_query(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
    ) -> Result<Vec<RestoreRecord>, JournalError> {
        let rows: Vec<RawRow> = {
            let c = self.lock();
            let mut stmt = c.db.prepare_cached(sql).map_err(|e| self.sql_err(e))?;
            stmt.query_map(p, raw_row)
                .map_err(|e| self.sql_err(e))?
                .collect::<Result<_, _>>()
                .map_err(|e| self.sql_err(e))?
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let bad = |detail: String| JournalError::Decode {
                path: self.path.clone(),
                id: r.id,
                what: "restore test",
                detail,
            };
            let expect = checksum(
                r.id,
                r.vmid,
                r.scratch_vmid,
                &r.scratch,
                r.result.as_deref(),
                r.seq,
                &r.body,
            );
            let decoded = if expect != r.checksum {
                Err(bad(
                    "fails its checksum (a flipped byte or a torn write)".to_string()
                ))
            } else {
                serde_json::from_str::<RestoreRecord>(&r.body)
                    .map_err(|e| bad(e.to_string()))
                    .and_then(|rec| {
                        if rec.id == r.id
                            && rec.scratch == r.scratch
                            && rec.result == r.result
                            && rec.seq.map(|s| s as i64) == r.seq
                        {
                            Ok(rec)
                        } else {
                            Err(bad("columns disagree".to_string()))
                        }
                    })
            };
            match decoded {
                Ok(rec) => out.push(rec),
                Err(e) => {
                    self.enter_safe_mode(&e);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    pub fn restore_get(&self, id: i64) -> Result<Option<RestoreRecord>, JournalError> {
        Ok(self
            .restore_query(
                &format!("SELECT {COLUMNS} FROM restore_tests WHERE id = ?1"),
                params![id],
            )?
            .pop())
    }

    /// Tests whose scratch guest may still exist, oldest first.
    pub fn restore_left_behind(&self) -> Result<Vec<RestoreRecord>, JournalError> {
        self.restore_query(
            &format!("SELECT {COLUMNS} FROM restore_tests WHERE scratch = 'maybe' ORDER BY id"),
            [],
        )
    }

    /// The newest `limit` tests, newest first.
    pub fn restore_recent(&self, limit: usize) -> Result<Vec<RestoreRecord>, JournalError> {
        self.restore_query(
            &format!("SELECT {COLUMNS} FROM restore_tests ORDER BY id DESC LIMIT ?1"),
            params![limit.min(i64::MAX as usize) as i64],
        )
    }

    /// Final results with `seq > after`, in `seq` order, at most `limit`.
    pub fn restore_results_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RestoreRecord>, JournalError> {
        self.restore_query(
            &format!("SELECT {COLUMNS} FROM restore_tests WHERE seq > ?1 ORDER BY seq LIMIT ?2"),
            params![
                after.min(i64::MAX as u64) as i64,
                limit.min(i64::MAX as usize) as i64
            ],
        )
    }

    /// The highest result `seq` a report the hub accepted carried (0: none).
    pub fn restore_reported(&self) -> Result<u64, JournalError> {
        let c = self.lock();
        let v: Option<String> =
            c.db.query_row("SELECT v FROM meta WHERE k = 'restore_reported'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.sql_err(e))?;
        Ok(v.and_then(|s| s.parse().ok()).unwrap_or(0))
    }

    /// The hub accepted a report carrying the results up to `seq`; the cursor never goes back.
    pub fn restore_mark_reported(&self, seq: u64) -> Result<(), JournalError> {
        self.write(|tx| {
            let cur: Option<String> = tx
                .query_row("SELECT v FROM meta WHERE k = 'restore_reported'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            let cur = cur.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            if seq > cur {
                tx.execute(
                    "INSERT INTO meta (k, v) VALUES ('restore_reported', ?1)
                     ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                    params![seq.to_string()],
                )?;
            }
            Ok(())
        })
    }

    /// Per tested guest: its newest test that counts for the round-robin (any result but
    /// a `retry`) and its newest passed one. A guest with only `retry` results is absent.
    pub fn restore_per_guest(
        &self,
    ) -> Result<std::collections::BTreeMap<u32, (RestoreRecord, Option<RestoreRecord>)>, JournalError>
    {
        let mut out: std::collections::BTreeMap<u32, (RestoreRecord, Option<RestoreRecord>)> =
            std::collections::BTreeMap::new();
        let all = self.restore_query(
            &format!("SELECT {COLUMNS} FROM restore_tests ORDER BY id"),
            [],
        )?;
        for rec in all.into_iter().filter(|r| !r.retry) {
            let passed = rec.result.as_deref() == Some("passed");
            let e = out.entry(rec.vmid).or_insert_with(|| (rec.clone(), None));
            e.0 = rec.clone();
            if passed {
                e.1 = Some(rec);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(vmid: u32) -> RestoreRecord {
        RestoreRecord {
            id: 0,
            vmid,
            kind: "lxc".into(),
            archive: Some("local:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst".into()),
            archive_ctime: Some(1_738_288_805),
            archive_size: Some(1 << 20),
            scratch_vmid: Some(9900),
            started_ms: 1,
            step: "restoring".into(),
            scratch: "maybe".into(),
            restore_seconds: None,
            boot_seconds: None,
            duration_seconds: None,
            result: None,
            reason: None,
            upids: Vec::new(),
            finished_ms: None,
            seq: None,
            retry: false,
            cleanup_error: None,
            cleanup_failing_since_ms: None,
        }
    }

    #[test]
    fn rows_survive_reopen_results_get_a_seq_once_and_stay_final() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut a = rec(101);
        j.restore_put(&mut a).unwrap();
        assert_eq!(a.id, 1);
        assert_eq!(a.seq, None);
        let mut b = rec(102);
        b.scratch_vmid = Some(9901);
        j.restore_put(&mut b).unwrap();
        assert_eq!(b.id, 2);
        drop(j);

        let j = Journal::open(dir.path()).unwrap();
        assert!(j.safe_mode().is_none());
        let left: Vec<i64> = j
            .restore_left_behind()
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(left, [1, 2]);

        b.result = Some("passed".into());
        b.scratch = "gone".into();
        j.restore_put(&mut b).unwrap();
        assert_eq!(b.seq, Some(1));
        a.result = Some("failed".into());
        j.restore_put(&mut a).unwrap();
        assert_eq!(a.seq, Some(2));
        // Writing the final record again keeps its seq.
        a.scratch = "gone".into();
        j.restore_put(&mut a).unwrap();
        assert_eq!(a.seq, Some(2));
        assert!(j.restore_left_behind().unwrap().is_empty());
        // A final result cannot change.
        let mut changed = a.clone();
        changed.result = Some("passed".into());
        assert!(j.restore_put(&mut changed).is_err());

        let after: Vec<i64> = j
            .restore_results_after(0, 10)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(after, [2, 1]);
        assert_eq!(j.restore_results_after(1, 10).unwrap().len(), 1);
        let per = j.restore_per_guest().unwrap();
        assert_eq!(per[&102].1.as_ref().map(|r| r.id), Some(2));
        assert!(per[&101].1.is_none());
        assert_eq!(j.restore_recent(1).unwrap()[0].id, 2);
        // A result that is no verdict on the backup does not move the guest back in the
        // round-robin: its newest counted test stays the passed one.
        let mut c = rec(102);
        c.retry = true;
        c.scratch = "gone".into();
        c.result = Some("skipped".into());
        j.restore_put(&mut c).unwrap();
        assert_eq!(j.restore_per_guest().unwrap()[&102].0.id, 2);
        assert_eq!(j.restore_recent(1).unwrap()[0].id, 3);

        // The report cursor moves forward only.
        assert_eq!(j.restore_reported().unwrap(), 0);
        j.restore_mark_reported(2).unwrap();
        j.restore_mark_reported(1).unwrap();
        assert_eq!(j.restore_reported().unwrap(), 2);
    }

    #[test]
    fn a_tampered_row_puts_the_journal_in_safe_mode() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut a = rec(101);
        j.restore_put(&mut a).unwrap();
        drop(j);
        let db = rusqlite::Connection::open(dir.path().join(super::super::JOURNAL_FILE)).unwrap();
        db.execute("UPDATE restore_tests SET scratch = 'gone'", [])
            .unwrap();
        drop(db);
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.restore_recent(10).is_err());
        assert!(j.safe_mode().is_some());
    }
}
