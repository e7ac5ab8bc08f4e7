//! Signed operations in the journal database: the replay store and each operation's
//! record, and the outbox of decisions for the hub.
//!
//! Owns two tables of `journal.db` and two `meta` keys:
//! - `signed_ops`: one row per accepted operation, keyed by its `op_id` (the replay
//!   identity from the signed payload) with its `payload_sha256` and `not_after`, the whole
//!   envelope as received, its lane, state (`held`, `running`, then a final one), UPIDs,
//!   result and times. The row is written when the operation is accepted, so the replay
//!   record exists before anything else happens; the intent (`running`, `intent_ms`) is
//!   committed in that same row before the first request reaches Proxmox or a helper.
//! - `op_results`: the decisions to send to the hub, by the agent's own `seq`, with whether
//!   the hub accepted them. A decision and the state change it reports are one transaction,
//!   so a kill -9 can never lose a result or send one for a change that did not happen.
//! - `meta.replay_floor`: the highest `not_after` of a pruned record. Anything at or below
//!   it is expired even when the clock was set back; `meta.result_seq`: the last `seq`.
//!
//! Every row carries a SHA-256 over its columns, checked on every read like the entries;
//! a mismatch puts the journal in safe mode.
//!
//! Must never: delete a record that is not final or whose window (plus skew) has not
//! passed, lower the replay floor, or reuse a `seq`.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Journal, JournalError};

/// Creates the tables (called from `Journal::setup`).
pub(super) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS signed_ops (
        op_id TEXT PRIMARY KEY,
        received_seq INTEGER NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL,
        not_after INTEGER NOT NULL,
        checksum TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS signed_ops_open ON signed_ops(received_seq)
        WHERE state IN ('held', 'running');
    CREATE TABLE IF NOT EXISTS op_results (
        seq INTEGER PRIMARY KEY,
        body TEXT NOT NULL,
        accepted INTEGER NOT NULL,
        checksum TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS op_results_pending ON op_results(seq) WHERE accepted = 0;
";

/// One accepted operation as the journal keeps it. The ops service gives the strings
/// their types; here they are data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    pub op_id: String,
    /// Hex SHA-256 of the signed payload bytes.
    pub payload_sha256: String,
    /// Unix seconds, from the payload.
    pub not_after: u64,
    /// The operation's kind (`stop`, `usb_mount`, …).
    pub kind: String,
    /// The guest; `None` for a host operation.
    pub vmid: Option<u32>,
    /// The whole envelope as received (verified again from this text).
    pub envelope: String,
    /// The delivery id of the newest delivery of this operation.
    pub delivery_id: Option<String>,
    /// Names of the keys that counted at acceptance.
    pub signers: Vec<String>,
    pub received_ms: i64,
    /// `held`, `running`, `applied`, `failed`, `refused` (the wire's decision states plus
    /// `running`).
    pub state: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub upids: Vec<String>,
    pub result: serde_json::Map<String, serde_json::Value>,
    /// When the intent was committed (the first request may follow); `None` while held.
    pub intent_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// What the verified payload asks for, typed by the ops service.
    pub spec: serde_json::Value,
    /// The reversibility gate's steps so far, typed by the gate; `null` for a kind the
    /// gate does not cover and for records written before it existed.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub gate: serde_json::Value,
}

impl OpRecord {
    /// Held or running: a final decision is still to come.
    pub fn is_open(&self) -> bool {
        self.state == "held" || self.state == "running"
    }
}

/// Builds a result's body from its `seq` and the changed record.
pub type ResultFor<'a> = &'a mut dyn FnMut(u64, &OpRecord) -> String;

/// A result row: its `seq`, body (the JSON the hub gets), and whether the hub has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultRow {
    pub seq: u64,
    pub body: String,
    pub accepted: bool,
}

fn checksum(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

fn op_checksum(op_id: &str, received_seq: i64, body: &str, state: &str, not_after: i64) -> String {
    checksum(&[
        op_id.as_bytes(),
        &received_seq.to_le_bytes(),
        body.as_bytes(),
        state.as_bytes(),
        &not_after.to_le_bytes(),
    ])
}

fn result_checksum(seq: i64, body: &str, accepted: bool) -> String {
    checksum(&[&seq.to_le_bytes(), body.as_bytes(), &[u8::from(accepted)]])
}

fn meta_u64(tx: &rusqlite::Connection, key: &str) -> rusqlite::Result<u64> {
    let v: Option<String> = tx
        .prepare_cached("SELECT v FROM meta WHERE k = ?1")?
        .query_row(params![key], |r| r.get(0))
        .optional()?;
    Ok(v.and_then(|s| s.parse().ok()).unwrap_or(0))
}

fn set_meta_u64(tx: &rusqlite::Connection, key: &str, v: u64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta (k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
    )?
    .execute(params![key, v.to_string()])
    .map(|_| ())
}

/// Writes the op row (insert or replace) with a fresh checksum.
fn put_op(tx: &rusqlite::Connection, rec: &OpRecord, received_seq: i64) -> rusqlite::Result<()> {
    let body = serde_json::to_string(rec).unwrap_or_default();
    let not_after = rec.not_after.min(i64::MAX as u64) as i64;
    let sum = op_checksum(&rec.op_id, received_seq, &body, &rec.state, not_after);
    tx.prepare_cached(
        "INSERT INTO signed_ops (op_id, received_seq, body, state, not_after, checksum)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(op_id) DO UPDATE SET body = excluded.body, state = excluded.state,
             checksum = excluded.checksum",
    )?
    .execute(params![
        rec.op_id,
        received_seq,
        body,
        rec.state,
        not_after,
        sum
    ])
    .map(|_| ())
}

/// Appends a result: the next `seq`, its body from `make(seq)`.
fn add_result(
    tx: &rusqlite::Connection,
    make: &mut dyn FnMut(u64) -> String,
) -> rusqlite::Result<u64> {
    let seq = meta_u64(tx, "result_seq")? + 1;
    set_meta_u64(tx, "result_seq", seq)?;
    let body = make(seq);
    let sum = result_checksum(seq as i64, &body, false);
    tx.prepare_cached(
        "INSERT INTO op_results (seq, body, accepted, checksum) VALUES (?1, ?2, 0, ?3)",
    )?
    .execute(params![seq as i64, body, sum])?;
    Ok(seq)
}

struct RawOp {
    op_id: String,
    received_seq: i64,
    body: String,
    state: String,
    not_after: i64,
    checksum: String,
}

const OP_COLUMNS: &str = "op_id, received_seq, body, state, not_after, checksum";

fn raw_op(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawOp> {
    Ok(RawOp {
        op_id: r.get(0)?,
        received_seq: r.get(1)?,
        body: r.get(2)?,
        state: r.get(3)?,
        not_after: r.get(4)?,
        checksum: r.get(5)?,
    })
}

impl Journal {
    fn decode_op(&self, r: RawOp) -> Result<(OpRecord, i64), JournalError> {
        let expect = op_checksum(&r.op_id, r.received_seq, &r.body, &r.state, r.not_after);
        let bad = |detail: String| JournalError::Decode {
            path: self.path.clone(),
            id: r.received_seq,
            what: "signed operation",
            detail,
        };
        if expect != r.checksum {
            return Err(bad(format!(
                "operation {} fails its checksum (a flipped byte or a torn write)",
                r.op_id
            )));
        }
        let rec: OpRecord = serde_json::from_str(&r.body).map_err(|e| bad(e.to_string()))?;
        if rec.op_id != r.op_id || rec.state != r.state {
            return Err(bad(format!("operation {}: columns disagree", r.op_id)));
        }
        Ok((rec, r.received_seq))
    }

    fn query_ops(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
    ) -> Result<Vec<(OpRecord, i64)>, JournalError> {
        let rows: Vec<RawOp> = {
            let c = self.lock();
            let mut stmt = c.db.prepare_cached(sql).map_err(|e| self.sql_err(e))?;
            stmt.query_map(p, raw_op)
                .map_err(|e| self.sql_err(e))?
                .collect::<Result<_, _>>()
                .map_err(|e| self.sql_err(e))?
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            match self.decode_op(r) {
                Ok(x) => out.push(x),
                Err(e) => {
                    self.enter_safe_mode(&e);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// The record of `op_id`, if the replay store has it.
    pub fn op_get(&self, op_id: &str) -> Result<Option<OpRecord>, JournalError> {
        Ok(self
            .query_ops(
                &format!("SELECT {OP_COLUMNS} FROM signed_ops WHERE op_id = ?1"),
                params![op_id],
            )?
            .pop()
            .map(|(r, _)| r))
    }

    /// Held and running operations, in the order they were accepted.
    pub fn ops_open(&self) -> Result<Vec<OpRecord>, JournalError> {
        Ok(self
            .query_ops(
                &format!(
                    "SELECT {OP_COLUMNS} FROM signed_ops WHERE state IN ('held', 'running')
                     ORDER BY received_seq"
                ),
                [],
            )?
            .into_iter()
            .map(|(r, _)| r)
            .collect())
    }

    /// The newest `limit` records, newest first.
    pub fn ops_recent(&self, limit: usize) -> Result<Vec<OpRecord>, JournalError> {
        Ok(self
            .query_ops(
                &format!("SELECT {OP_COLUMNS} FROM signed_ops ORDER BY received_seq DESC LIMIT ?1"),
                params![limit as i64],
            )?
            .into_iter()
            .map(|(r, _)| r)
            .collect())
    }

    /// Every UPID signed operations recorded for `vmid` (task adoption never takes one).
    pub fn op_upids_of(&self, vmid: u32) -> Result<Vec<String>, JournalError> {
        Ok(self
            .query_ops(&format!("SELECT {OP_COLUMNS} FROM signed_ops"), [])?
            .into_iter()
            .filter(|(r, _)| r.vmid == Some(vmid))
            .flat_map(|(r, _)| r.upids)
            .collect())
    }

    /// Accepts a new operation: its record (the replay entry) and the result `result(seq)`
    /// in one transaction. Fails with `Ok(None)` if `op_id` is taken meanwhile.
    pub fn op_accept(
        &self,
        rec: &OpRecord,
        mut result: impl FnMut(u64) -> String,
    ) -> Result<Option<u64>, JournalError> {
        self.write(|tx| {
            let taken: Option<i64> = tx
                .prepare_cached("SELECT 1 FROM signed_ops WHERE op_id = ?1")?
                .query_row(params![rec.op_id], |r| r.get(0))
                .optional()?;
            if taken.is_some() {
                return Ok(None);
            }
            let received_seq = meta_u64(tx, "op_received_seq")? + 1;
            set_meta_u64(tx, "op_received_seq", received_seq)?;
            put_op(tx, rec, received_seq as i64)?;
            add_result(tx, &mut result).map(Some)
        })
    }

    /// Read-modify-write of one record, with an optional result built from the changed
    /// record, in one transaction. Returns the changed record and the result's seq.
    pub fn op_update(
        &self,
        op_id: &str,
        change: impl FnOnce(&mut OpRecord),
        result: Option<ResultFor<'_>>,
    ) -> Result<(OpRecord, Option<u64>), JournalError> {
        self.op_update_then(op_id, change, result, |_| Ok(()))
    }

    /// [`Journal::op_update`] plus `also` in the same transaction (the undo point a step
    /// made, `journal/undo.rs`).
    pub(super) fn op_update_then(
        &self,
        op_id: &str,
        change: impl FnOnce(&mut OpRecord),
        result: Option<ResultFor<'_>>,
        also: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<()>,
    ) -> Result<(OpRecord, Option<u64>), JournalError> {
        if let Some(why) = self.safe_mode() {
            return Err(JournalError::SafeMode(why));
        }
        let (mut rec, received_seq) = self
            .query_ops(
                &format!("SELECT {OP_COLUMNS} FROM signed_ops WHERE op_id = ?1"),
                params![op_id],
            )?
            .pop()
            .ok_or_else(|| JournalError::Decode {
                path: self.path.clone(),
                id: 0,
                what: "signed operation",
                detail: format!("no record of operation {op_id}"),
            })?;
        change(&mut rec);
        let seq = self.write(|tx| {
            put_op(tx, &rec, received_seq)?;
            also(tx)?;
            match result {
                Some(make) => {
                    let r = &rec;
                    add_result(tx, &mut |seq| make(seq, r)).map(Some)
                }
                None => Ok(None),
            }
        })?;
        Ok((rec, seq))
    }

    /// A result that changes no record (a refusal at receipt, a desired-state decision).
    pub fn result_add(&self, mut make: impl FnMut(u64) -> String) -> Result<u64, JournalError> {
        self.write(|tx| add_result(tx, &mut make))
    }

    fn query_results(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
    ) -> Result<Vec<ResultRow>, JournalError> {
        let rows: Vec<(i64, String, i64, String)> = {
            let c = self.lock();
            let mut stmt = c.db.prepare_cached(sql).map_err(|e| self.sql_err(e))?;
            stmt.query_map(p, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(|e| self.sql_err(e))?
                .collect::<Result<_, _>>()
                .map_err(|e| self.sql_err(e))?
        };
        let mut out = Vec::with_capacity(rows.len());
        for (seq, body, accepted, sum) in rows {
            let accepted = accepted != 0;
            if result_checksum(seq, &body, accepted) != sum {
                let e = JournalError::Decode {
                    path: self.path.clone(),
                    id: seq,
                    what: "operation result",
                    detail: "fails its checksum (a flipped byte or a torn write)".into(),
                };
                self.enter_safe_mode(&e);
                return Err(e);
            }
            out.push(ResultRow {
                seq: seq as u64,
                body,
                accepted,
            });
        }
        Ok(out)
    }

    /// Results the hub has not accepted yet, oldest first, at most `limit`.
    pub fn results_pending(&self, limit: usize) -> Result<Vec<ResultRow>, JournalError> {
        self.query_results(
            "SELECT seq, body, accepted, checksum FROM op_results WHERE accepted = 0
             ORDER BY seq LIMIT ?1",
            params![limit as i64],
        )
    }

    /// The newest `limit` results, newest first.
    pub fn results_recent(&self, limit: usize) -> Result<Vec<ResultRow>, JournalError> {
        self.query_results(
            "SELECT seq, body, accepted, checksum FROM op_results ORDER BY seq DESC LIMIT ?1",
            params![limit as i64],
        )
    }

    /// The hub accepted these results.
    pub fn results_accepted(&self, seqs: &[u64]) -> Result<(), JournalError> {
        let rows: Vec<ResultRow> = {
            let mut out = Vec::new();
            for s in seqs {
                out.extend(self.query_results(
                    "SELECT seq, body, accepted, checksum FROM op_results WHERE seq = ?1",
                    params![*s as i64],
                )?);
            }
            out
        };
        if rows.iter().all(|r| r.accepted) {
            return Ok(());
        }
        self.write(|tx| {
            for r in rows.iter().filter(|r| !r.accepted) {
                let sum = result_checksum(r.seq as i64, &r.body, true);
                tx.prepare_cached(
                    "UPDATE op_results SET accepted = 1, checksum = ?1 WHERE seq = ?2",
                )?
                .execute(params![sum, r.seq as i64])?;
            }
            Ok(())
        })
    }

    /// The highest `not_after` of a pruned record (0 when none was pruned).
    pub fn replay_floor(&self) -> Result<u64, JournalError> {
        let c = self.lock();
        meta_u64(&c.db, "replay_floor").map_err(|e| self.sql_err(e))
    }

    /// Prunes final records whose window plus `skew` ended before `now` (Unix seconds) and
    /// that hold no kept undo point (an `undo` needs the record),
    /// raising the replay floor to the highest pruned `not_after`, and accepted results
    /// beyond the newest `keep_results`. Returns the records pruned.
    pub fn ops_prune(
        &self,
        now: u64,
        skew: u64,
        keep_results: usize,
    ) -> Result<usize, JournalError> {
        let cutoff = now.saturating_sub(skew).min(i64::MAX as u64) as i64;
        self.write(|tx| {
            let highest: Option<i64> = tx
                .prepare_cached(
                    "SELECT MAX(not_after) FROM signed_ops
                     WHERE state NOT IN ('held', 'running') AND not_after < ?1
                       AND op_id NOT IN (SELECT op_id FROM undo_points WHERE status = 'kept')",
                )?
                .query_row(params![cutoff], |r| r.get(0))?;
            let n = tx
                .prepare_cached(
                    "DELETE FROM signed_ops
                     WHERE state NOT IN ('held', 'running') AND not_after < ?1
                       AND op_id NOT IN (SELECT op_id FROM undo_points WHERE status = 'kept')",
                )?
                .execute(params![cutoff])?;
            if let Some(h) = highest {
                let floor = meta_u64(tx, "replay_floor")?;
                set_meta_u64(tx, "replay_floor", floor.max(h.max(0) as u64))?;
            }
            tx.prepare_cached(
                "DELETE FROM op_results WHERE accepted = 1
                 AND seq NOT IN (SELECT seq FROM op_results ORDER BY seq DESC LIMIT ?1)",
            )?
            .execute(params![keep_results as i64])?;
            Ok(n)
        })
    }

    /// Checksums of every signed-operation row and result (journal open and `verify`).
    pub(super) fn check_ops(&self) -> Result<(), JournalError> {
        self.query_ops(&format!("SELECT {OP_COLUMNS} FROM signed_ops"), [])?;
        self.query_results("SELECT seq, body, accepted, checksum FROM op_results", [])?;
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::reconcile::journal) fn rec(op_id: &str, not_after: u64) -> OpRecord {
        OpRecord {
            op_id: op_id.into(),
            payload_sha256: "ab".repeat(32),
            not_after,
            kind: "stop".into(),
            vmid: Some(101),
            envelope: "{}".into(),
            delivery_id: Some("d-1".into()),
            signers: vec!["alice".into()],
            received_ms: 1,
            state: "held".into(),
            reason: None,
            message: None,
            upids: vec![],
            result: Default::default(),
            intent_ms: None,
            finished_ms: None,
            spec: serde_json::Value::Null,
            gate: serde_json::Value::Null,
        }
    }

    #[test]
    fn accept_update_results_and_prune_keep_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let a = "a".repeat(32);
        let seq = j
            .op_accept(&rec(&a, 1000), |s| format!("held {s}"))
            .unwrap();
        assert_eq!(seq, Some(1));
        // the same op_id again is not accepted twice
        assert_eq!(
            j.op_accept(&rec(&a, 1000), |s| format!("x {s}")).unwrap(),
            None
        );
        let (r, seq) = j
            .op_update(
                &a,
                |r| {
                    r.state = "applied".into();
                    r.upids.push("UPID:x".into());
                },
                Some(&mut |s, r: &OpRecord| format!("{} {s}", r.state)),
            )
            .unwrap();
        assert_eq!((r.state.as_str(), seq), ("applied", Some(2)));
        let pending: Vec<String> = j
            .results_pending(10)
            .unwrap()
            .into_iter()
            .map(|r| r.body)
            .collect();
        assert_eq!(pending, ["held 1", "applied 2"]);
        j.results_accepted(&[1]).unwrap();
        assert_eq!(j.results_pending(10).unwrap()[0].seq, 2);
        assert_eq!(j.op_upids_of(101).unwrap(), ["UPID:x"]);

        let b = "b".repeat(32);
        j.op_accept(&rec(&b, 5000), |s| format!("held {s}"))
            .unwrap();
        // a is final and its window ended: pruned; b is held: kept whatever its window
        assert_eq!(j.ops_prune(10_000, 120, 100).unwrap(), 1);
        assert_eq!(j.replay_floor().unwrap(), 1000);
        assert!(j.op_get(&a).unwrap().is_none());
        assert!(j.op_get(&b).unwrap().is_some());
        // the floor never goes down, and survives a reopen
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.ops_prune(10_000, 120, 100).unwrap(), 0);
        assert_eq!(j.replay_floor().unwrap(), 1000);
        assert_eq!(j.ops_open().unwrap().len(), 1);
        // seq goes on after a reopen
        assert_eq!(j.result_add(|s| format!("r {s}")).unwrap(), 4);
    }

    #[test]
    fn a_flipped_byte_in_a_record_is_safe_mode() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let a = "a".repeat(32);
        j.op_accept(&rec(&a, 1000), |s| format!("held {s}"))
            .unwrap();
        {
            let c = j.lock();
            c.db.execute(
                "UPDATE signed_ops SET body = replace(body, 'alice', 'alicf')",
                [],
            )
            .unwrap();
        }
        assert!(j.op_get(&a).is_err());
        assert!(j.safe_mode().is_some());
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.safe_mode().is_some(), "the check at open finds it too");
    }

    /// Fails the commit numbered `n` (counting from 1).
    #[derive(Debug)]
    struct FailNth(u64);

    impl super::super::CommitGate for FailNth {
        fn before_commit(&self, n: u64) -> std::io::Result<()> {
            if n == self.0 {
                Err(std::io::Error::other("injected: disk full"))
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn a_record_and_its_result_commit_together_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let commits_at_open = {
            // count the commits an open makes (schema row on a fresh journal)
            let probe = tempfile::tempdir().unwrap();
            let j = Journal::open_with_gate(probe.path(), Box::new(FailNth(u64::MAX))).unwrap();
            j.result_add(|s| s.to_string()).unwrap();
            j.lock().commits - 1
        };
        let a = "a".repeat(32);
        {
            let j = Journal::open_with_gate(dir.path(), Box::new(FailNth(commits_at_open + 2)))
                .unwrap();
            // commit +1: accepted with its held result
            j.op_accept(&rec(&a, 1000), |s| format!("held {s}"))
                .unwrap();
            // commit +2 fails: the decision and its result are both lost, the journal is in
            // safe mode and refuses further writes
            let e = j.op_update(
                &a,
                |r| r.state = "applied".into(),
                Some(&mut |s, r: &OpRecord| format!("{} {s}", r.state)),
            );
            assert!(e.is_err());
            assert!(j.safe_mode().is_some());
            assert!(j.result_add(|s| s.to_string()).is_err());
        }
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.op_get(&a).unwrap().unwrap().state, "held");
        let bodies: Vec<String> = j
            .results_pending(10)
            .unwrap()
            .into_iter()
            .map(|r| r.body)
            .collect();
        assert_eq!(bodies, ["held 1"], "no result without its state change");
    }
}
