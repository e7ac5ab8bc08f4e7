use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::reconcile::normalize::{Field, GuestKind, Param};
use crate::reconcile::plan::Basis;

fn vmid(n: u32) -> Vmid {
    Vmid::new(u64::from(n)).unwrap()
}

fn action(v: u32, op: Op) -> Action {
    Action {
        vmid: vmid(v),
        kind: GuestKind::Lxc,
        op,
        basis: Basis {
            status: "stopped".into(),
            digest: Some("abc".into()),
        },
    }
}

fn set_memory(v: u32, mib: u64) -> Action {
    action(
        v,
        Op::SetConfig {
            fields: vec![Field::Memory],
            params: vec![Param::Set("memory".into(), mib.to_string())],
        },
    )
}

/// Fails the commit whose number equals `fail_at` (0 = never).
#[derive(Debug, Default)]
pub(crate) struct FailNth {
    pub fail_at: AtomicU64,
}

impl CommitGate for Arc<FailNth> {
    fn before_commit(&self, n: u64) -> std::io::Result<()> {
        if self.fail_at.load(Ordering::SeqCst) == n {
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "injected: no space left on device",
            ))
        } else {
            Ok(())
        }
    }
}

#[test]
fn intent_upid_outcome_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = action(101, Op::Start);
    let key = IdemKey::derive(&a, None);
    let id = {
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.safe_mode(), None);
        let e = j.record_intent(&key, &a).unwrap();
        j.record_upid(
            e.id,
            "UPID:pve1:00001234:00000001:65000000:vzstart:101:root@pam!felhom:",
        )
        .unwrap();
        let b = set_memory(102, 1024);
        let e2 = j.record_intent(&IdemKey::derive(&b, None), &b).unwrap();
        j.record_outcome(
            e2.id,
            &Outcome::Failed {
                error: "CT is locked (backup)".into(),
            },
        )
        .unwrap();
        e.id
    };
    let j = Journal::open(dir.path()).unwrap();
    assert_eq!(j.safe_mode(), None);
    let open = j.open_entries().unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].id, id);
    assert_eq!(open[0].action, a);
    assert_eq!(open[0].upids.len(), 1);
    assert_eq!(j.by_key(&key).unwrap().unwrap().id, id);
    assert_eq!(j.last_finished(vmid(102)).unwrap(), Some(id + 1));
    assert_eq!(j.last_finished(vmid(101)).unwrap(), None);
    let recent = j.recent(10).unwrap();
    assert_eq!(recent.len(), 2);
    assert_eq!(
        recent[0].outcome,
        Some(Outcome::Failed {
            error: "CT is locked (backup)".into()
        })
    );
    // WAL mode and FULL sync are really in effect.
    let c = j.lock();
    let mode: String =
        c.db.query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
    let sync: i64 =
        c.db.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(sync, 2, "synchronous=FULL");
}

#[test]
fn keys_same_for_a_retry_new_for_a_later_drift() {
    let a = action(101, Op::Start);
    assert_eq!(
        IdemKey::derive(&a, Some(5)),
        IdemKey::derive(&a.clone(), Some(5))
    );
    assert_ne!(IdemKey::derive(&a, Some(5)), IdemKey::derive(&a, Some(6)));
    let mut b = a.clone();
    b.basis.digest = Some("other".into());
    assert_ne!(IdemKey::derive(&a, None), IdemKey::derive(&b, None));
    assert_ne!(
        IdemKey::derive(&set_memory(101, 1024), None),
        IdemKey::derive(&set_memory(101, 2048), None)
    );
}

#[test]
fn a_failed_commit_means_safe_mode_and_nothing_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(FailNth::default());
    let j = Journal::open_with_gate(dir.path(), Box::new(gate.clone())).unwrap();
    let a = action(101, Op::Start);
    let key = IdemKey::derive(&a, None);
    gate.fail_at.store(j.lock().commits + 1, Ordering::SeqCst);
    let err = j.record_intent(&key, &a).unwrap_err();
    assert!(matches!(err, JournalError::Commit { .. }), "{err}");
    assert!(j.safe_mode().unwrap().contains("no space left"));
    // Rolled back: the intent is not there.
    assert!(j.by_key(&key).unwrap().is_none());
    // Every further write is refused while in safe mode, reads go on.
    let err = j.record_intent(&key, &a).unwrap_err();
    assert!(matches!(err, JournalError::SafeMode(_)), "{err}");
    assert!(err.to_string().contains("journal verify"));
    assert!(j.recent(5).is_ok());
    // Verify while the disk is still full fails and stays in safe mode.
    gate.fail_at.store(j.lock().commits + 1, Ordering::SeqCst);
    assert!(j.verify().is_err());
    assert!(j.safe_mode().is_some());
    // Healthy again: verify leaves safe mode and writes work.
    gate.fail_at.store(0, Ordering::SeqCst);
    let report = j.verify().unwrap();
    assert!(report.left_safe_mode.is_some());
    assert_eq!(j.safe_mode(), None);
    j.record_intent(&key, &a).unwrap();
}

#[test]
fn a_flipped_byte_in_a_value_is_caught_by_the_row_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let marker = "UPID:pve1:0000BEEF:00000001:65000000:vzstart:101:root@pam!felhom:";
    {
        let j = Journal::open(dir.path()).unwrap();
        let a = action(101, Op::Start);
        let e = j.record_intent(&IdemKey::derive(&a, None), &a).unwrap();
        j.record_upid(e.id, marker).unwrap();
    } // close: checkpoints the WAL into the main file
    let path = dir.path().join(JOURNAL_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = b"0000BEEF";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("value stored in the main file after checkpoint");
    bytes[at] ^= 0x01; // '0' -> '1': still valid text, still a valid page
    std::fs::write(&path, &bytes).unwrap();

    let j = Journal::open(dir.path()).unwrap();
    let why = j.safe_mode().expect("corruption leads to safe mode");
    assert!(why.contains("checksum"), "{why}");
    let a = action(102, Op::Start);
    assert!(matches!(
        j.record_intent(&IdemKey::derive(&a, None), &a),
        Err(JournalError::SafeMode(_))
    ));
    // verify does not paper over it.
    assert!(j.verify().is_err());
    assert!(j.safe_mode().is_some());
}

/// Flipping bytes anywhere in the file ends either in safe mode or in exactly the original
/// entries: never in different data.
#[test]
fn random_corruption_ends_in_safe_mode_or_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let original = {
        let j = Journal::open(dir.path()).unwrap();
        for i in 0..40u32 {
            let a = set_memory(100 + i % 7, 512 + u64::from(i));
            let e = j
                .record_intent(&IdemKey::derive(&a, Some(i64::from(i))), &a)
                .unwrap();
            j.record_upid(
                e.id,
                &format!(
                    "UPID:pve1:{i:08X}:00000001:65000000:qmconfig:{}:u@pve!t:",
                    100 + i % 7
                ),
            )
            .unwrap();
            if i % 3 != 0 {
                j.record_outcome(e.id, &Outcome::Succeeded { detail: None })
                    .unwrap();
            }
        }
        j.recent(1000).unwrap()
    };
    let path = dir.path().join(JOURNAL_FILE);
    let clean = std::fs::read(&path).unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let (mut safe, mut intact) = (0, 0);
    for _ in 0..60 {
        let mut bytes = clean.clone();
        let at = rng.usize(..bytes.len());
        bytes[at] ^= 1 << rng.u8(0..8);
        let case = tempfile::tempdir().unwrap();
        std::fs::write(case.path().join(JOURNAL_FILE), &bytes).unwrap();
        let j = Journal::open(case.path()).unwrap();
        if j.safe_mode().is_some() {
            safe += 1;
            continue;
        }
        // Healthy: the flip hit unused space. The data must be exactly the original.
        assert_eq!(
            j.recent(1000).unwrap(),
            original,
            "flip at {at} changed data silently"
        );
        intact += 1;
    }
    assert_eq!(safe + intact, 60);
    eprintln!("random flips: {safe} safe mode, {intact} in unused space");
}

/// A WAL torn at any byte (power loss during a write) opens as a prefix of what was
/// committed, or in safe mode; never as something else.
#[test]
fn torn_wal_opens_as_a_committed_prefix_or_safe_mode() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    {
        let c = j.lock();
        c.db.execute_batch("PRAGMA wal_autocheckpoint=0").unwrap();
    }
    let mut history = Vec::new(); // journal contents after each commit
    for i in 0..12u32 {
        let a = set_memory(100 + i % 3, 600 + u64::from(i));
        let e = j
            .record_intent(&IdemKey::derive(&a, Some(i64::from(i))), &a)
            .unwrap();
        history.push(j.recent(1000).unwrap());
        j.record_outcome(e.id, &Outcome::Succeeded { detail: None })
            .unwrap();
        history.push(j.recent(1000).unwrap());
    }
    let db = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
    let wal = std::fs::read(dir.path().join(format!("{JOURNAL_FILE}-wal"))).unwrap();
    assert!(wal.len() > 4096, "commits are in the WAL");
    let mut rng = fastrand::Rng::with_seed(11);
    let mut cuts: Vec<usize> = (0..40).map(|_| rng.usize(..wal.len())).collect();
    cuts.push(wal.len());
    for cut in cuts {
        let case = tempfile::tempdir().unwrap();
        std::fs::write(case.path().join(JOURNAL_FILE), &db).unwrap();
        std::fs::write(case.path().join(format!("{JOURNAL_FILE}-wal")), &wal[..cut]).unwrap();
        let j2 = Journal::open(case.path()).unwrap();
        if j2.safe_mode().is_some() {
            continue;
        }
        let now = j2.recent(1000).unwrap();
        assert!(
            now.is_empty() || history.contains(&now),
            "WAL cut at {cut}: contents are not a committed state"
        );
        if cut == wal.len() {
            assert_eq!(&now, history.last().unwrap());
        }
    }
}

#[test]
fn compaction_keeps_open_and_newest_per_guest() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let mut ids = Vec::new();
    for i in 0..10u32 {
        let a = set_memory(100 + i % 2, 512 + u64::from(i));
        let e = j
            .record_intent(&IdemKey::derive(&a, Some(i64::from(i))), &a)
            .unwrap();
        if i != 2 {
            j.record_outcome(e.id, &Outcome::Succeeded { detail: None })
                .unwrap();
        }
        ids.push(e.id);
    }
    let removed = j.compact(0, -1_000).unwrap();
    let left: Vec<i64> = j.recent(100).unwrap().iter().map(|e| e.id).rev().collect();
    // open entry (i=2) and the newest finished per vmid (i=8 for 100, i=9 for 101) stay
    assert_eq!(left, vec![ids[2], ids[8], ids[9]]);
    assert_eq!(removed, 7);
    assert_eq!(j.last_finished(vmid(100)).unwrap(), Some(ids[8]));
    // recent rows are kept by the row budget
    let kept = j.compact(100, -1_000).unwrap();
    assert_eq!(kept, 0);
}
