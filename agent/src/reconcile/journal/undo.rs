//! The reversibility gate's undo points in the journal database.
//!
//! Owns the table `undo_points` of `journal.db`: one row per undo point a gated signed
//! operation made (a snapshot of the guest, a backup archive, or the previous values of
//! the config keys it changed), keyed by the operation's `op_id`, so an operation has at
//! most one and a resumed step can never list a second. A row is only ever written in the
//! same transaction as the operation record's step that made it
//! ([`Journal::op_update_with_undo`]), so a kill -9 leaves either both or neither.
//!
//! Status: `kept` from the moment it is made, `released` once a signed `release_undo` or
//! `felhom-agent ops release` removed it from the node ([`Journal::undo_point_release`]).
//! While a point is kept, the operation record it belongs to is not pruned
//! (`ops_prune` skips it), so `undo` always finds what it needs.
//!
//! Every row carries a SHA-256 over its columns, checked on every read; a mismatch puts
//! the journal in safe mode, as for every other table.
//!
//! Must never: delete a row, turn a `released` point back to `kept`, or write a second row
//! for an operation. The agent removes an undo point only on a signed `release_undo` or a
//! local `ops release`: never on its own (that would let one key plus a waiting period do
//! what needs the irreversible threshold).

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ops::{OpRecord, ResultFor};
use super::{Journal, JournalError};

/// Creates the table (called from `Journal::setup`).
pub(super) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS undo_points (
        op_id TEXT PRIMARY KEY,
        vmid INTEGER NOT NULL,
        body TEXT NOT NULL,
        status TEXT NOT NULL,
        checksum TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS undo_points_kept ON undo_points(vmid) WHERE status = 'kept';
";

/// One undo point. The gate gives the strings their types; here they are data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UndoPoint {
    /// The operation that made it.
    pub op_id: String,
    /// That operation's kind (`set_config`, `rollback`, `restore`, `destroy`, ...).
    pub op_kind: String,
    pub vmid: u32,
    /// `lxc` or `qemu`.
    pub guest_kind: String,
    /// `snapshot`, `backup` or `previous_values`.
    pub kind: String,
    /// The snapshot's name, the backup's volid, or `null` for previous values.
    pub reference: Option<String>,
    /// Where it lives (the backup's storage); `None` for a snapshot or previous values.
    pub storage: Option<String>,
    /// Its size where PVE says it (a backup's `size`); `None` otherwise.
    pub size_bytes: Option<u64>,
    /// What an undo needs besides the reference (e.g. the previous values and digest, the
    /// previous power state), as the gate wrote it.
    pub detail: serde_json::Value,
    pub created_ms: i64,
    /// `kept` or `released`.
    pub status: String,
    pub released_ms: Option<i64>,
    /// Who released it: `signed:<op_id>` or `local:<user>`.
    pub released_by: Option<String>,
}

fn checksum(op_id: &str, vmid: i64, body: &str, status: &str) -> String {
    let mut h = Sha256::new();
    for p in [
        op_id.as_bytes(),
        &vmid.to_le_bytes(),
        body.as_bytes(),
        status.as_bytes(),
    ] {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

fn put(tx: &rusqlite::Connection, p: &UndoPoint) -> rusqlite::Result<()> {
    let body = serde_json::to_string(p).unwrap_or_default();
    let vmid = i64::from(p.vmid);
    let sum = checksum(&p.op_id, vmid, &body, &p.status);
    tx.prepare_cached(
        "INSERT INTO undo_points (op_id, vmid, body, status, checksum) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(op_id) DO UPDATE SET body = excluded.body, status = excluded.status,
             checksum = excluded.checksum",
    )?
    .execute(params![p.op_id, vmid, body, p.status, sum])
    .map(|_| ())
}

/// Why an undo point could not be written or released.
#[derive(Debug, thiserror::Error)]
pub enum UndoPointError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("operation {0} already has an undo point; an operation makes at most one")]
    Exists(String),
    #[error("operation {0} has no undo point")]
    Missing(String),
    #[error("the undo point of operation {0} was already released")]
    AlreadyReleased(String),
}

impl Journal {
    fn query_undo(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
    ) -> Result<Vec<UndoPoint>, JournalError> {
        let rows: Vec<(String, i64, String, String, String)> = {
            let c = self.lock();
            let mut stmt = c.db.prepare_cached(sql).map_err(|e| self.sql_err(e))?;
            stmt.query_map(p, |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(|e| self.sql_err(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.sql_err(e))?
        };
        let mut out = Vec::with_capacity(rows.len());
        for (op_id, vmid, body, status, sum) in rows {
            let bad = |detail: String| JournalError::Decode {
                path: self.path.clone(),
                id: vmid,
                what: "undo point",
                detail,
            };
            let decoded = if checksum(&op_id, vmid, &body, &status) != sum {
                Err(bad(format!(
                    "undo point of {op_id} fails its checksum (a flipped byte or a torn write)"
                )))
            } else {
                serde_json::from_str::<UndoPoint>(&body)
                    .map_err(|e| bad(e.to_string()))
                    .and_then(|p| {
                        if p.op_id == op_id && p.status == status && i64::from(p.vmid) == vmid {
                            Ok(p)
                        } else {
                            Err(bad(format!("undo point of {op_id}: columns disagree")))
                        }
                    })
            };
            match decoded {
                Ok(p) => out.push(p),
                Err(e) => {
                    self.enter_safe_mode(&e);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Updates the operation record and inserts its undo point in one transaction, with
    /// the result row when `result` is given. Refused when the operation already has an
    /// undo point that differs (`Exists`); the same point again (a resumed step) is a
    /// no-op for the table.
    pub fn op_update_with_undo(
        &self,
        op_id: &str,
        change: impl FnOnce(&mut OpRecord),
        point: &UndoPoint,
        result: Option<ResultFor<'_>>,
    ) -> Result<(OpRecord, Option<u64>), UndoPointError> {
        if let Some(have) = self.undo_point_get(&point.op_id)? {
            if have != *point {
                return Err(UndoPointError::Exists(point.op_id.clone()));
            }
            return Ok(self.op_update(op_id, change, result)?);
        }
        let p = point.clone();
        Ok(self.op_update_then(op_id, change, result, move |tx| put(tx, &p))?)
    }

    /// The undo point of `op_id`, if it made one.
    pub fn undo_point_get(&self, op_id: &str) -> Result<Option<UndoPoint>, JournalError> {
        Ok(self
            .query_undo(
                "SELECT op_id, vmid, body, status, checksum FROM undo_points WHERE op_id = ?1",
                params![op_id],
            )?
            .pop())
    }

    /// Every undo point still kept, oldest first.
    pub fn undo_points_kept(&self) -> Result<Vec<UndoPoint>, JournalError> {
        let mut v = self.query_undo(
            "SELECT op_id, vmid, body, status, checksum FROM undo_points WHERE status = 'kept'",
            [],
        )?;
        v.sort_by(|a, b| (a.created_ms, &a.op_id).cmp(&(b.created_ms, &b.op_id)));
        Ok(v)
    }

    /// Every undo point, kept or released, newest first, at most `limit`.
    pub fn undo_points_all(&self, limit: usize) -> Result<Vec<UndoPoint>, JournalError> {
        let mut v = self.query_undo(
            "SELECT op_id, vmid, body, status, checksum FROM undo_points",
            [],
        )?;
        v.sort_by(|a, b| (b.created_ms, &b.op_id).cmp(&(a.created_ms, &a.op_id)));
        v.truncate(limit);
        Ok(v)
    }

    /// Marks a kept undo point released (after the gate removed it from the node).
    pub fn undo_point_release(
        &self,
        op_id: &str,
        at_ms: i64,
        by: &str,
    ) -> Result<UndoPoint, UndoPointError> {
        let mut p = self
            .undo_point_get(op_id)?
            .ok_or_else(|| UndoPointError::Missing(op_id.to_string()))?;
        if p.status != "kept" {
            return Err(UndoPointError::AlreadyReleased(op_id.to_string()));
        }
        p.status = "released".into();
        p.released_ms = Some(at_ms);
        p.released_by = Some(by.to_string());
        let q = p.clone();
        self.write(move |tx| put(tx, &q))?;
        Ok(p)
    }

    /// Whether a kept undo point exists for `op_id` (a cheap check for pruning callers).
    pub fn undo_point_kept(&self, op_id: &str) -> Result<bool, JournalError> {
        let c = self.lock();
        let n: Option<i64> =
            c.db.prepare_cached("SELECT 1 FROM undo_points WHERE op_id = ?1 AND status = 'kept'")
                .map_err(|e| self.sql_err(e))?
                .query_row(params![op_id], |r| r.get(0))
                .optional()
                .map_err(|e| self.sql_err(e))?;
        Ok(n.is_some())
    }

    /// Checksums of every undo point (journal open and `verify`).
    pub(super) fn check_undo(&self) -> Result<(), JournalError> {
        self.query_undo(
            "SELECT op_id, vmid, body, status, checksum FROM undo_points",
            [],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::super::ops::tests::rec;
    use super::*;

    /// Fails every commit while the flag is set.
    #[derive(Debug)]
    struct FailWhile(Arc<AtomicBool>);

    impl super::super::CommitGate for FailWhile {
        fn before_commit(&self, _n: u64) -> std::io::Result<()> {
            if self.0.load(Ordering::SeqCst) {
                Err(std::io::Error::other("injected: disk full"))
            } else {
                Ok(())
            }
        }
    }

    fn point(op_id: &str) -> UndoPoint {
        UndoPoint {
            op_id: op_id.into(),
            op_kind: "rollback".into(),
            vmid: 101,
            guest_kind: "lxc".into(),
            kind: "snapshot".into(),
            reference: Some("felhom-undo-0123456789ab".into()),
            storage: None,
            size_bytes: None,
            detail: serde_json::json!({"power": "running"}),
            created_ms: 1_000,
            status: "kept".into(),
            released_ms: None,
            released_by: None,
        }
    }

    fn accepted(j: &Journal, op_id: &str) {
        j.op_accept(&rec(op_id, 1000), |s| format!("held {s}"))
            .unwrap();
    }

    #[test]
    fn a_point_is_written_with_its_step_once_and_released_once() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let id = "a".repeat(32);
        accepted(&j, &id);
        let p = point(&id);
        j.op_update_with_undo(
            &id,
            |r| r.message = Some("undo point made".into()),
            &p,
            None,
        )
        .unwrap();
        // A resumed step writes the same point again: still one row.
        j.op_update_with_undo(&id, |_| {}, &p, None).unwrap();
        assert_eq!(j.undo_points_kept().unwrap(), vec![p.clone()]);
        assert_eq!(
            j.op_get(&id).unwrap().unwrap().message.as_deref(),
            Some("undo point made")
        );
        // A different point for the same operation is refused.
        let mut other = p.clone();
        other.reference = Some("felhom-undo-ffffffffffff".into());
        assert!(matches!(
            j.op_update_with_undo(&id, |_| {}, &other, None),
            Err(UndoPointError::Exists(_))
        ));
        let r = j.undo_point_release(&id, 2_000, "local:root").unwrap();
        assert_eq!(r.status, "released");
        assert!(j.undo_points_kept().unwrap().is_empty());
        assert!(matches!(
            j.undo_point_release(&id, 3_000, "local:root"),
            Err(UndoPointError::AlreadyReleased(_))
        ));
        assert_eq!(j.undo_points_all(10).unwrap(), vec![r]);
    }

    #[test]
    fn a_failed_commit_writes_neither_the_step_nor_the_point() {
        let dir = tempfile::tempdir().unwrap();
        let id = "b".repeat(32);
        {
            let fail = Arc::new(AtomicBool::new(false));
            let j = Journal::open_with_gate(dir.path(), Box::new(FailWhile(fail.clone()))).unwrap();
            accepted(&j, &id);
            fail.store(true, Ordering::SeqCst);
            let r = j.op_update_with_undo(
                &id,
                |r| r.message = Some("undo point made".into()),
                &point(&id),
                None,
            );
            assert!(r.is_err());
        }
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.undo_point_get(&id).unwrap().is_none());
        assert_eq!(j.op_get(&id).unwrap().unwrap().message, None);
    }

    #[test]
    fn a_flipped_byte_is_safe_mode() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let id = "c".repeat(32);
        accepted(&j, &id);
        j.op_update_with_undo(&id, |_| {}, &point(&id), None)
            .unwrap();
        {
            let c = j.lock();
            c.db.execute(
                "UPDATE undo_points SET body = replace(body, 'felhom', 'felhoM')",
                [],
            )
            .unwrap();
        }
        assert!(j.undo_points_kept().is_err());
        assert!(j.safe_mode().is_some());
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.safe_mode().is_some(), "the check at open finds it too");
    }

    #[test]
    fn a_record_with_a_kept_point_is_not_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let id = "d".repeat(32);
        accepted(&j, &id);
        j.op_update_with_undo(&id, |r| r.state = "applied".into(), &point(&id), None)
            .unwrap();
        assert_eq!(j.ops_prune(1_000_000, 0, 10).unwrap(), 0);
        assert!(j.op_get(&id).unwrap().is_some());
        j.undo_point_release(&id, 5, "local:root").unwrap();
        assert_eq!(j.ops_prune(1_000_000, 0, 10).unwrap(), 1);
        assert!(j.op_get(&id).unwrap().is_none());
    }
}
