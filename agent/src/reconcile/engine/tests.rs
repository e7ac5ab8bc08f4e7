//! Engine tests against the in-memory node: commit/call ordering under an injected journal
//! failure at every commit position, exactly-once across simulated crashes, the gate,
//! skipped guests, and backoff.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::reconcile::GuestPermit;
use crate::reconcile::desired::DesiredState;
use crate::reconcile::fakenode::{Call, FakeGuest, FakeNode};
use crate::reconcile::journal::CommitGate;
use crate::reconcile::normalize::GuestKind;

#[derive(Debug, Default)]
struct StaticProvider(Mutex<Option<Arc<DesiredState>>>);

impl DesiredProvider for StaticProvider {
    fn poll(&self) -> Option<Result<Arc<DesiredState>, Arc<DesiredError>>> {
        lock(&self.0).take().map(Ok)
    }
    fn describe(&self) -> String {
        "test".into()
    }
}

fn provider(json: &str) -> Arc<dyn DesiredProvider> {
    let d = DesiredState::from_json(json.as_bytes()).expect("test desired state");
    Arc::new(StaticProvider(Mutex::new(Some(Arc::new(d)))))
}

fn settings() -> EngineSettings {
    EngineSettings {
        shutdown_timeout: Duration::from_secs(1),
        task_timeout: Duration::from_secs(10),
        resync_interval: Duration::from_millis(50),
        poll_interval: Duration::from_millis(5),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..EngineSettings::default()
    }
}

const DESIRED: &str = r#"{"generation": 4, "guests": [
    {"vmid": 101, "power": "running", "config": {"memory": 1024, "description": "web"}},
    {"vmid": 102, "power": "stopped", "config": {"tags": "prod,Web", "nesting": true}},
    {"vmid": 103, "power": "running", "config": {"cores": 2}},
    {"vmid": 104, "power": "stopped"},
    {"vmid": 105, "power": "running"},
    {"vmid": 106, "power": "running"},
    {"vmid": 107, "power": "running", "config": {"memory": 2048}},
    {"vmid": 108, "power": "running"}
]}"#;

fn node(task_ms: u64) -> Arc<FakeNode> {
    let mut g102 = FakeGuest::new(GuestKind::Lxc, "running");
    g102.config
        .insert("features".into(), serde_json::json!("keyctl=1"));
    let mut g104 = FakeGuest::new(GuestKind::Qemu, "running");
    g104.ignores_shutdown = true;
    let mut g105 = FakeGuest::new(GuestKind::Lxc, "stopped");
    g105.ha_managed = true;
    let mut g106 = FakeGuest::new(GuestKind::Qemu, "stopped");
    g106.template = true;
    let mut g107 = FakeGuest::new(GuestKind::Lxc, "stopped");
    g107.lock = Some("backup".into());
    Arc::new(FakeNode::new(
        vec![
            (101, FakeGuest::new(GuestKind::Lxc, "stopped")),
            (102, g102),
            (103, FakeGuest::new(GuestKind::Qemu, "stopped")),
            (104, g104),
            (105, g105),
            (106, g106),
            (107, g107),
            (109, FakeGuest::new(GuestKind::Lxc, "running")),
        ],
        Duration::from_millis(task_ms),
    ))
}

/// The calls a full convergence of DESIRED makes, each exactly once.
fn expected_calls() -> BTreeMap<(u32, &'static str), usize> {
    [
        ((101, "set_config"), 1),
        ((101, "start"), 1),
        ((102, "shutdown"), 1),
        ((102, "set_config"), 1),
        ((103, "set_config"), 1),
        ((103, "start"), 1),
        ((104, "shutdown"), 1),
        ((104, "stop"), 1),
    ]
    .into_iter()
    .collect()
}

fn count(calls: &[Call]) -> BTreeMap<(u32, &'static str), usize> {
    let mut m = BTreeMap::new();
    for c in calls {
        *m.entry((c.vmid.get(), c.what)).or_insert(0) += 1;
    }
    m
}

fn converged(n: &FakeNode) -> bool {
    let p = |v| n.guest_state(v);
    p(101).status == "running"
        && p(101).config.get("memory") == Some(&serde_json::json!(1024))
        && p(102).status == "stopped"
        && p(102).config.get("tags") == Some(&serde_json::json!("prod;web"))
        && p(103).status == "running"
        && p(103).config.get("cores").is_some()
        && p(104).status == "stopped"
}

/// Waits (generously) until `more` further engine cycles have begun: a cycle count, not
/// a time, so "nothing happens on later cycles" means the same on a loaded machine.
async fn cycles_pass(h: &EngineHandle, more: u64) -> bool {
    let target = h.status().cycles + more;
    wait_until(Duration::from_secs(30), || h.status().cycles >= target).await
}

async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f()
}

fn spawn(
    n: &Arc<FakeNode>,
    journal: Arc<Journal>,
    gate: Gate,
) -> (EngineHandle, watch::Sender<Gate>) {
    let (tx, rx) = watch::channel(gate);
    let h = Engine::spawn(EngineDeps {
        pve: n.clone(),
        journal,
        provider: provider(DESIRED),
        gate: rx,
        settings: settings(),
    });
    (h, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_once_and_leaves_skipped_guests_alone() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(5);
    let (h, _gate) = spawn(&n, Arc::new(Journal::open(dir.path()).unwrap()), Gate::Open);
    assert!(
        wait_until(Duration::from_secs(10), || converged(&n)).await,
        "converged: {:?}",
        h.status()
    );
    assert!(
        wait_until(Duration::from_secs(5), || h.status().applied_generation
            == Some(4))
        .await
    );
    let s = h.status();
    assert_eq!(count(&n.calls()), expected_calls());
    // nesting merged, keyctl kept
    assert_eq!(
        n.guest_state(102).config.get("features"),
        Some(&serde_json::json!("keyctl=1,nesting=1"))
    );
    let skipped: Vec<(u32, String)> = s
        .skipped
        .iter()
        .map(|k| (k.vmid.get(), k.reason.to_string()))
        .collect();
    assert_eq!(skipped.len(), 3);
    assert!(skipped[0].1.contains("HA"));
    assert!(skipped[1].1.contains("template"));
    assert!(skipped[2].1.contains("backup"));
    assert_eq!(s.only_desired, vec![Vmid::new(108).unwrap()]);
    assert_eq!(s.only_actual, vec![Vmid::new(109).unwrap()]);
    assert!(!s.blocked);
    assert_eq!(s.safe_mode, None);
    // Nothing more happens on later cycles.
    assert!(cycles_pass(&h, 3).await, "{:?}", h.status());
    assert_eq!(count(&n.calls()), expected_calls());
    h.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_means_no_mutation_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(5);
    let journal = Arc::new(Journal::open(dir.path()).unwrap());
    // An unfinished intent from a "previous run" that would be sent if allowed.
    let a = crate::reconcile::plan::Action {
        vmid: Vmid::new(101).unwrap(),
        kind: GuestKind::Lxc,
        op: crate::reconcile::plan::Op::Start,
        basis: crate::reconcile::plan::Basis {
            status: "stopped".into(),
            digest: Some("0".into()),
        },
    };
    journal
        .record_intent(&crate::reconcile::journal::IdemKey::derive(&a, None), &a)
        .unwrap();
    for gate in [Gate::AwaitingEnvelope, Gate::Blocked] {
        let (h, _tx) = spawn(&n, journal.clone(), gate);
        assert!(wait_until(Duration::from_secs(5), || h.status().cycles >= 3).await);
        let s = h.status();
        assert!(s.blocked);
        assert_eq!(s.gate, gate);
        assert!(n.calls().is_empty(), "no mutation while {gate:?}");
        assert_eq!(s.skipped.len(), 3, "reporting goes on");
        h.shutdown(Duration::from_secs(1)).await;
    }
    // Opening the gate lets it converge, resuming the open intent (sent once).
    let (h, tx) = spawn(&n, journal.clone(), Gate::Blocked);
    assert!(cycles_pass(&h, 2).await, "{:?}", h.status());
    assert!(n.calls().is_empty());
    tx.send(Gate::Open).unwrap();
    assert!(wait_until(Duration::from_secs(10), || converged(&n)).await);
    assert!(
        wait_until(Duration::from_secs(5), || journal
            .open_entries()
            .unwrap()
            .is_empty())
        .await
    );
    assert_eq!(count(&n.calls()), expected_calls());
    // Blocked again: a new drift is not corrected. The drift comes only once a cycle has
    // seen the closed gate (every later cycle reads it afresh).
    tx.send(Gate::Blocked).unwrap();
    assert!(wait_until(Duration::from_secs(30), || h.status().gate == Gate::Blocked).await);
    let before = n.calls().len();
    n.with_guest(101, |g| g.status = "stopped".into());
    assert!(cycles_pass(&h, 3).await, "{:?}", h.status());
    assert_eq!(n.calls().len(), before);
    // Open: the later drift is a new action (new key), corrected once.
    tx.send(Gate::Open).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || n.guest_state(101).status
            == "running")
        .await
    );
    assert_eq!(count(&n.calls())[&(101, "start")], 2);
    h.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_action_backs_off_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(2);
    n.fail(101, "start", "CT 101: simulated start failure");
    // When each start of 101 reached the node.
    let starts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    {
        let starts = starts.clone();
        n.on_call(Box::new(move |c: &Call| {
            if c.vmid.get() == 101 && c.what == "start" {
                lock(&starts).push(Instant::now());
            }
        }));
    }
    let (h, _gate) = spawn(&n, Arc::new(Journal::open(dir.path()).unwrap()), Gate::Open);
    assert!(
        wait_until(Duration::from_secs(30), || h
            .status()
            .failing
            .iter()
            .any(|f| f.attempts >= 5))
        .await,
        "{:?}",
        h.status()
    );
    let s = h.status();
    let f = s.failing.iter().find(|f| f.vmid.get() == 101).unwrap();
    assert_eq!(f.action, "start");
    assert!(
        f.last_error.contains("simulated start failure"),
        "{}",
        f.last_error
    );
    assert!(f.next_retry_ms > 0);
    // Once it works, it converges and is no longer failing.
    n.clear_faults();
    assert!(wait_until(Duration::from_secs(30), || converged(&n)).await);
    assert!(wait_until(Duration::from_secs(30), || h.status().failing.is_empty()).await);
    h.shutdown(Duration::from_secs(1)).await;
    // Exponential: the k-th failure holds the next attempt back by at least
    // min(20 ms × 2^(k-1), 200 ms) (20, 40, 80, 160, 200 ms …). Lower bounds only: a
    // loaded machine makes the gaps longer, never shorter.
    let starts = lock(&starts).clone();
    assert!(starts.len() >= 6, "5 failed starts and the one that worked");
    for (k, pair) in starts.windows(2).enumerate() {
        let backoff = Duration::from_millis(20 << k.min(16)).min(Duration::from_millis(200));
        let gap = pair[1] - pair[0];
        assert!(
            gap >= backoff,
            "start {} came {gap:?} after failure {} (backoff {backoff:?})",
            k + 2,
            k + 1
        );
    }
}

/// Counts commits; fails the Nth (0 = never).
#[derive(Debug, Default)]
struct Counting {
    fail_at: AtomicU64,
    seen: AtomicU64,
}

impl CommitGate for Arc<Counting> {
    fn before_commit(&self, n: u64) -> std::io::Result<()> {
        self.seen.store(n, Ordering::SeqCst);
        if self.fail_at.load(Ordering::SeqCst) == n {
            Err(std::io::Error::other("injected commit failure"))
        } else {
            Ok(())
        }
    }
}

fn call_matches(c: &Call, e: &crate::reconcile::journal::Entry) -> bool {
    use crate::reconcile::plan::Op;
    c.vmid == e.vmid
        && matches!(
            (c.what, &e.action.op),
            ("start", Op::Start)
                | ("shutdown", Op::Stop)
                | ("stop", Op::Stop)
                | ("set_config", Op::SetConfig { .. })
        )
}

/// For every commit position N: a journal whose Nth commit fails goes to safe mode; every
/// Proxmox call arrives while its action's intent is committed and open (checked at the
/// moment of the call), so the action whose intent commit failed is never sent; and no
/// new intent is committed after the failure.
#[test]
fn nth_commit_failure_means_no_call_for_that_action() {
    // A clean run tells how many commits a convergence takes.
    let total = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Counting::default());
        rt.block_on(async {
            let n = node(1);
            let j = Arc::new(Journal::open_with_gate(dir.path(), Box::new(gate.clone())).unwrap());
            let (h, _g) = spawn(&n, j.clone(), Gate::Open);
            assert!(
                wait_until(Duration::from_secs(10), || converged(&n)
                    && j.open_entries().unwrap().is_empty())
                .await
            );
            h.shutdown(Duration::from_secs(1)).await;
        });
        gate.seen.load(Ordering::SeqCst)
    };
    assert!(
        total > 10,
        "a convergence commits intents, UPIDs and outcomes ({total})"
    );
    for fail_at in 1..=total {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Counting::default());
        gate.fail_at.store(fail_at, Ordering::SeqCst);
        rt.block_on(async {
            let n = node(1);
            let j = Arc::new(Journal::open_with_gate(dir.path(), Box::new(gate.clone())).unwrap());
            let violations = Arc::new(Mutex::new(Vec::new()));
            {
                let j = j.clone();
                let v = violations.clone();
                n.on_call(Box::new(move |c: &Call| {
                    let open = j.open_entries().unwrap_or_default();
                    if !open.iter().any(|e| call_matches(c, e)) {
                        lock(&v).push(c.clone());
                    }
                }));
            }
            let (h, _g) = spawn(&n, j.clone(), Gate::Open);
            assert!(
                wait_until(Duration::from_secs(10), || j.safe_mode().is_some()).await,
                "commit {fail_at} failed: safe mode"
            );
            let entries_at_failure = j.recent(1000).unwrap().len();
            assert!(
                cycles_pass(&h, 2).await,
                "commit {fail_at}: {:?}",
                h.status()
            );
            assert_eq!(
                lock(&violations).clone(),
                Vec::<Call>::new(),
                "commit {fail_at}: calls without a committed open intent"
            );
            assert_eq!(
                j.recent(1000).unwrap().len(),
                entries_at_failure,
                "commit {fail_at}: an intent committed after safe mode"
            );
            let s = h.status();
            assert!(s.safe_mode.unwrap().contains("injected"));
            h.shutdown(Duration::from_secs(1)).await;
        });
    }
}

/// Simulated kill -9: each incarnation runs on its own runtime, which is torn down at a
/// random moment (every task dropped at its await point; finished journal commits stay,
/// as the page cache does). Restarted until converged, every action reaches the node
/// exactly once.
#[test]
fn crash_at_random_moments_converges_with_each_action_sent_once() {
    let mut rng = fastrand::Rng::with_seed(5);
    for round in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let n = node(rng.u64(3..20));
        let mut incarnations = 0;
        loop {
            incarnations += 1;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let kill_after = Duration::from_micros(rng.u64(0..12_000));
            let last = incarnations > 60;
            let done = rt.block_on(async {
                let j = Arc::new(Journal::open(dir.path()).unwrap());
                assert_eq!(
                    j.safe_mode(),
                    None,
                    "round {round}: journal healthy after a crash"
                );
                let (h, _g) = spawn(&n, j.clone(), Gate::Open);
                if last {
                    wait_until(Duration::from_secs(10), || {
                        converged(&n) && j.open_entries().unwrap().is_empty()
                    })
                    .await;
                } else {
                    tokio::time::sleep(kill_after).await;
                }
                std::mem::forget(h); // no orderly shutdown: the runtime dies under it
                converged(&n) && n.idle() && j.open_entries().unwrap().is_empty()
            });
            rt.shutdown_timeout(Duration::from_secs(5));
            let calls = count(&n.calls());
            for (k, c) in &calls {
                assert!(
                    expected_calls().get(k).is_some_and(|e| c <= e),
                    "round {round}, incarnation {incarnations}: {k:?} sent {c} times: {calls:?}"
                );
            }
            if done {
                break;
            }
            assert!(!last, "round {round}: did not converge");
        }
        eprintln!("round {round}: converged after {incarnations} incarnations");
        assert_eq!(count(&n.calls()), expected_calls(), "round {round}");
    }
}

fn start_action(vmid: u32, digest: &str) -> crate::reconcile::plan::Action {
    crate::reconcile::plan::Action {
        vmid: Vmid::new(u64::from(vmid)).unwrap(),
        kind: GuestKind::Lxc,
        op: crate::reconcile::plan::Op::Start,
        basis: crate::reconcile::plan::Basis {
            status: "stopped".into(),
            digest: Some(digest.into()),
        },
    }
}

/// An interrupted start must not adopt an earlier start of the same guest that began in
/// the same second and is already in the journal: it finds no task of its own, sees the
/// guest stopped, and starts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adoption_skips_a_same_second_task_the_journal_already_holds() {
    use crate::reconcile::journal::{IdemKey, Outcome};
    let vmid = Vmid::new(101).unwrap();
    let permit = GuestPermit::for_test(vmid);
    // Retry until the earlier task and the new intent fall into the same second (without
    // that the time filter alone would hide the old task, and this test would prove
    // nothing).
    for attempt in 0.. {
        assert!(attempt < 20, "could not place both in one second");
        let dir = tempfile::tempdir().unwrap();
        let n = Arc::new(FakeNode::new(
            vec![(101, FakeGuest::new(GuestKind::Lxc, "stopped"))],
            Duration::from_millis(1),
        ));
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        // Entry A: a start that ran to completion, its UPID recorded.
        let a = start_action(101, "a");
        let ea = journal
            .record_intent(&IdemKey::derive(&a, None), &a)
            .unwrap();
        let first = n.start(&permit, GuestKind::Lxc).await.unwrap();
        n.wait(&first, Duration::from_secs(5)).await.unwrap();
        journal.record_upid(ea.id, first.as_str()).unwrap();
        journal
            .record_outcome(ea.id, &Outcome::Succeeded { detail: None })
            .unwrap();
        // Someone stops the guest; entry B (a new start) is interrupted before its
        // request went out.
        n.with_guest(101, |g| g.status = "stopped".into());
        let b = start_action(101, "b");
        let eb = journal
            .record_intent(&IdemKey::derive(&b, Some(ea.id)), &b)
            .unwrap();
        if eb.intent_ms.div_euclid(1000) != i64::from(first.starttime()) {
            continue;
        }
        let ctx = ExecCtx {
            pve: n.clone(),
            journal: journal.clone(),
            shutdown_timeout: Duration::from_secs(1),
            task_timeout: Duration::from_secs(5),
            observer: None,
        };
        let outcome = exec::resume(&ctx, &permit, eb.clone()).await.unwrap();
        assert_eq!(outcome, Outcome::Succeeded { detail: None });
        assert_eq!(count(&n.calls())[&(101, "start")], 2, "started again");
        assert_eq!(n.guest_state(101).status, "running");
        let eb = journal.get(eb.id).unwrap().unwrap();
        assert_eq!(eb.upids.len(), 1);
        assert_ne!(
            eb.upids[0],
            first.as_str(),
            "the earlier task was not adopted"
        );
        break;
    }
}

/// Open entries whose resumption does not fit into the queue are resumed on later
/// cycles, without a restart. Their recorded basis is stale, so only resumption (not a
/// re-plan that derives the same key) can close them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_entries_that_did_not_fit_the_queue_are_resumed_next_cycle() {
    use crate::reconcile::journal::IdemKey;
    let dir = tempfile::tempdir().unwrap();
    let guests: Vec<u32> = (201..=206).collect();
    let n = Arc::new(FakeNode::new(
        guests
            .iter()
            .map(|v| (*v, FakeGuest::new(GuestKind::Lxc, "stopped")))
            .collect(),
        Duration::from_millis(20),
    ));
    let journal = Arc::new(Journal::open(dir.path()).unwrap());
    for v in &guests {
        let a = start_action(*v, "stale");
        journal
            .record_intent(&IdemKey::derive(&a, None), &a)
            .unwrap();
    }
    let desired = format!(
        r#"{{"generation": 1, "guests": [{}]}}"#,
        guests
            .iter()
            .map(|v| format!(r#"{{"vmid": {v}, "power": "running"}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (_tx, rx) = watch::channel(Gate::Open);
    let h = Engine::spawn(EngineDeps {
        pve: n.clone(),
        journal: journal.clone(),
        provider: provider(&desired),
        gate: rx,
        settings: EngineSettings {
            queue: crate::reconcile::QueueConfig {
                max_running: 1,
                max_queued: 1,
            },
            ..settings()
        },
    });
    assert!(
        wait_until(Duration::from_secs(10), || journal
            .open_entries()
            .unwrap()
            .is_empty())
        .await,
        "open entries left: {:?}",
        journal.open_entries().unwrap()
    );
    let calls = count(&n.calls());
    for v in &guests {
        assert_eq!(calls.get(&(*v, "start")), Some(&1), "{v}: {calls:?}");
        assert_eq!(n.guest_state(*v).status, "running");
    }
    // every entry ended as a real send, none as a guess
    for e in journal.recent(100).unwrap() {
        assert!(
            matches!(
                e.outcome,
                Some(crate::reconcile::journal::Outcome::Succeeded { .. })
            ),
            "{e:?}"
        );
    }
    h.shutdown(Duration::from_secs(1)).await;
}

/// A change by hand lands between the engine's last read of a guest and its config write
/// (the fake applies it as the write arrives, `edits` times in a row). The write carries
/// the digest of the read it was planned from, the node refuses it, and the engine plans
/// again at once from a fresh read, without backoff (an hour here: a backoff would stall
/// the test) and without a `failing` entry, until a write goes through. Its `features`
/// are merged from what the guest has then, so the flag set by hand is kept.
async fn edit_between_read_and_write(edits: usize) {
    use crate::reconcile::journal::Outcome;
    use crate::reconcile::normalize::Param;
    let dir = tempfile::tempdir().unwrap();
    let n = Arc::new(FakeNode::new(
        vec![(101, FakeGuest::new(GuestKind::Lxc, "stopped"))],
        Duration::from_millis(2),
    ));
    {
        let node = Arc::downgrade(&n);
        let seen = AtomicU64::new(0);
        n.on_call(Box::new(move |c: &Call| {
            if c.what != "set_config" || seen.fetch_add(1, Ordering::SeqCst) >= edits as u64 {
                return;
            }
            let flag = format!("keyctl=1,mknod={}", seen.load(Ordering::SeqCst) % 2);
            if let Some(node) = node.upgrade() {
                node.with_guest(101, |g| {
                    crate::reconcile::testmodel::pve_write(
                        g.kind,
                        &mut g.config,
                        &[Param::Set("features".into(), flag)],
                    )
                });
            }
        }));
    }
    let journal = Arc::new(Journal::open(dir.path()).unwrap());
    let (_tx, rx) = watch::channel(Gate::Open);
    let h = Engine::spawn(EngineDeps {
        pve: n.clone(),
        journal: journal.clone(),
        provider: provider(
            r#"{"generation": 1, "guests": [
                {"vmid": 101, "config": {"nesting": true, "description": "web"}}]}"#,
        ),
        gate: rx,
        settings: EngineSettings {
            resync_interval: Duration::from_secs(3600),
            backoff_base: Duration::from_secs(3600),
            backoff_max: Duration::from_secs(3600),
            ..settings()
        },
    });
    assert!(
        wait_until(Duration::from_secs(10), || h.status().applied_generation
            == Some(1))
        .await,
        "converged: {:?}\ncalls: {:?}",
        h.status(),
        n.calls()
    );
    let want_features = format!("keyctl=1,mknod={},nesting=1", edits % 2);
    assert_eq!(
        n.guest_state(101).config.get("features"),
        Some(&serde_json::json!(want_features)),
        "the flag set by hand survives"
    );
    assert_eq!(
        n.guest_state(101).config.get("description"),
        Some(&serde_json::json!("web\n"))
    );
    // Each write carried the digest of the read before it: the first the initial one,
    // each later one the digest the hand edit before it left.
    let writes: Vec<String> = n.calls().into_iter().map(|c| c.payload).collect();
    assert_eq!(writes.len(), edits + 1, "{writes:#?}");
    for (i, w) in writes.iter().enumerate() {
        assert!(
            w.ends_with(&format!("digest=Some(\"{i}\")")),
            "write {i}: {w}"
        );
    }
    // The refused writes ended as stale, not failed, and nothing is failing.
    let outcomes: Vec<Option<Outcome>> = journal
        .recent(100)
        .unwrap()
        .into_iter()
        .rev()
        .map(|e| e.outcome)
        .collect();
    assert_eq!(outcomes.len(), edits + 1, "{outcomes:?}");
    for o in &outcomes[..edits] {
        assert!(
            matches!(o, Some(Outcome::Stale { detail }) if detail.contains("changed since it was read")),
            "{o:?}"
        );
    }
    assert!(matches!(outcomes[edits], Some(Outcome::Succeeded { .. })));
    assert!(h.status().failing.is_empty(), "{:?}", h.status().failing);
    // Converged: two more cycles send nothing.
    let cycles = h.status().cycles;
    h.kick();
    assert!(wait_until(Duration::from_secs(10), || h.status().cycles > cycles).await);
    h.kick();
    assert!(wait_until(Duration::from_secs(10), || h.status().cycles > cycles + 1).await);
    assert_eq!(n.calls().len(), edits + 1);
    h.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_edit_between_read_and_write_makes_the_engine_plan_again() {
    edit_between_read_and_write(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_before_several_writes_in_a_row_still_converge() {
    edit_between_read_and_write(3).await;
}

/// After a crash between an intent and its write, someone changes the guest by hand while
/// the agent is down. The resumed write still carries the digest of the read the intent
/// was planned from, so it cannot overwrite that change: refused, the entry ends `stale`
/// (no backoff), and the plan made from a fresh read keeps the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_write_does_not_overwrite_a_change_made_while_the_agent_was_down() {
    use crate::reconcile::journal::{IdemKey, Outcome};
    use crate::reconcile::normalize::Param;
    let dir = tempfile::tempdir().unwrap();
    let n = Arc::new(FakeNode::new(
        vec![(101, FakeGuest::new(GuestKind::Lxc, "stopped"))],
        Duration::from_millis(2),
    ));
    let desired = r#"{"generation": 1, "guests": [{"vmid": 101, "config": {"nesting": true}}]}"#;
    // The previous run planned and committed its intent, then died before the write.
    let p = plan_now(
        n.as_ref(),
        &DesiredState::from_json(desired.as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    let [action] = p.actions.as_slice() else {
        panic!("{p:?}")
    };
    let journal = Arc::new(Journal::open(dir.path()).unwrap());
    journal
        .record_intent(&IdemKey::derive(action, None), action)
        .unwrap();
    // The change by hand while it was down.
    n.with_guest(101, |g| {
        crate::reconcile::testmodel::pve_write(
            g.kind,
            &mut g.config,
            &[Param::Set("features".into(), "keyctl=1".into())],
        )
    });
    let (_tx, rx) = watch::channel(Gate::Open);
    let h = Engine::spawn(EngineDeps {
        pve: n.clone(),
        journal: journal.clone(),
        provider: provider(desired),
        gate: rx,
        settings: EngineSettings {
            resync_interval: Duration::from_secs(3600),
            backoff_base: Duration::from_secs(3600),
            backoff_max: Duration::from_secs(3600),
            ..settings()
        },
    });
    assert!(
        wait_until(Duration::from_secs(10), || h.status().applied_generation
            == Some(1)
            && journal.open_entries().unwrap().is_empty())
        .await,
        "{:?}\n{:?}",
        h.status(),
        n.calls()
    );
    assert_eq!(
        n.guest_state(101).config.get("features"),
        Some(&serde_json::json!("keyctl=1,nesting=1"))
    );
    let writes: Vec<String> = n.calls().into_iter().map(|c| c.payload).collect();
    assert_eq!(writes.len(), 2, "{writes:#?}");
    assert!(writes[0].ends_with("digest=Some(\"0\")"), "{}", writes[0]);
    assert!(writes[1].ends_with("digest=Some(\"1\")"), "{}", writes[1]);
    let outcomes: Vec<Option<Outcome>> = journal
        .recent(10)
        .unwrap()
        .into_iter()
        .rev()
        .map(|e| e.outcome)
        .collect();
    assert!(
        matches!(
            outcomes.as_slice(),
            [Some(Outcome::Stale { .. }), Some(Outcome::Succeeded { .. })]
        ),
        "{outcomes:?}"
    );
    assert!(h.status().failing.is_empty());
    h.shutdown(Duration::from_secs(1)).await;
}
