//! Reconcile benchmarks (issue 5). Prints figures and ratios against baselines measured in
//! the same run:
//! - queue: 100k no-op operations over 1000 vmids vs a plain tokio mpsc channel to one
//!   consumer (both answer through a oneshot); target ≤ 3× slower;
//! - journal: one intent commit (SQLite WAL, synchronous=FULL) vs a raw write + fsync of the
//!   same bytes; target ≤ 1.3× (median);
//! - plan: time at 1k and 10k guests; target linear (per-guest time about equal).
//!
//! Run: `cargo bench -p felhom-agent --bench reconcile` (all three), or name the parts to
//! run: `… -- plan`, `… -- queue journal`. `… -- plan-once N` plans N guests once and
//! prints nothing else, for an instruction count under
//! `valgrind --tool=callgrind --toggle-collect='*reconcile::plan::plan*'`, which is not
//! disturbed by other load on the machine.

use std::io::Write;
use std::time::{Duration, Instant};

use felhom_agent::proxmox::GuestKind;
use felhom_agent::reconcile::desired::DesiredState;
use felhom_agent::reconcile::journal::{IdemKey, Journal};
use felhom_agent::reconcile::normalize::Norm;
use felhom_agent::reconcile::plan::{Action, ActualGuest, Basis, Op, plan};
use felhom_agent::reconcile::{Queue, QueueConfig};
use felhom_protocol::Vmid;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

const OPS: usize = 100_000;
const VMIDS: u32 = 1000;

fn vmid(i: u32) -> Vmid {
    Vmid::new(u64::from(100 + i)).expect("bench vmid")
}

type Job = Box<dyn FnOnce() -> usize + Send>;

async fn mpsc_baseline() -> Duration {
    let (tx, mut rx) = mpsc::channel::<(Job, oneshot::Sender<usize>)>(OPS);
    let consumer = tokio::spawn(async move {
        while let Some((job, reply)) = rx.recv().await {
            let _ = reply.send(job());
        }
    });
    let t = Instant::now();
    let mut replies = Vec::with_capacity(OPS);
    for i in 0..OPS {
        let (rtx, rrx) = oneshot::channel();
        let job: Job = Box::new(move || i);
        tx.send((job, rtx)).await.expect("consumer alive");
        replies.push(rrx);
    }
    for r in replies {
        r.await.expect("reply");
    }
    let d = t.elapsed();
    drop(tx);
    let _ = consumer.await;
    d
}

async fn queue_run() -> Duration {
    let q = Queue::start(QueueConfig {
        max_running: 8,
        max_queued: OPS,
    });
    let t = Instant::now();
    let mut handles = Vec::with_capacity(OPS);
    for i in 0..OPS {
        let h = q
            .submit(vmid(i as u32 % VMIDS), "noop", move |_p| {
                Box::pin(async move { i })
            })
            .expect("room for all");
        handles.push(h);
    }
    for h in handles {
        h.await.expect("ran");
    }
    let d = t.elapsed();
    q.shutdown(Duration::from_secs(1)).await;
    d
}

fn best_of<F: FnMut() -> Duration>(n: usize, mut f: F) -> Duration {
    (0..n).map(|_| f()).min().unwrap_or_default()
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn action(i: u32) -> Action {
    Action {
        vmid: vmid(i % VMIDS),
        kind: GuestKind::Lxc,
        op: Op::Start,
        basis: Basis {
            status: "stopped".into(),
            digest: Some(format!("{i:040x}")),
        },
    }
}

fn bench_journal() {
    const N: usize = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(dir.path()).expect("journal");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("raw.log"))
        .expect("raw file");
    // Interleaved, so both see the same disk conditions (the machine is shared).
    let mut sqlite = Vec::with_capacity(N);
    let mut raw = Vec::with_capacity(N);
    for i in 0..N as u32 {
        let a = action(i);
        let key = IdemKey::derive(&a, Some(i64::from(i)));
        let mut bytes = serde_json::to_vec(&a).expect("json");
        bytes.extend_from_slice(key.as_str().as_bytes());
        bytes.push(b'\n');
        let t = Instant::now();
        j.record_intent(&key, &a).expect("commit");
        sqlite.push(t.elapsed());
        let t = Instant::now();
        f.write_all(&bytes).expect("write");
        f.sync_all().expect("fsync");
        raw.push(t.elapsed());
    }
    let (s50, s99) = (percentile(sqlite.clone(), 0.5), percentile(sqlite, 0.99));
    let (r50, r99) = (percentile(raw.clone(), 0.5), percentile(raw, 0.99));
    println!(
        "journal append (intent commit, {N} samples): median {s50:?} p99 {s99:?}; raw write+fsync: median {r50:?} p99 {r99:?}; ratio (median) {:.2}x (target <= 1.3x), p99 {:.2}x (the commits that checkpoint)",
        s50.as_secs_f64() / r50.as_secs_f64(),
        s99.as_secs_f64() / r99.as_secs_f64()
    );
}

fn plan_inputs(n: u32) -> (DesiredState, Vec<ActualGuest>) {
    let guests: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            json!({"vmid": 100 + i, "power": if i % 2 == 0 { "running" } else { "stopped" },
                   "config": {"memory": 1024, "description": format!("guest {i}"), "tags": "prod,web", "onboot": true}})
        })
        .collect();
    let desired = DesiredState::from_json(
        serde_json::to_vec(&json!({"generation": 1, "guests": guests}))
            .expect("json")
            .as_slice(),
    )
    .expect("desired");
    let actual = (0..n)
        .map(|i| {
            let config = json!({"memory": if i % 3 == 0 { 512 } else { 1024 }, "description": format!("guest {i}\n"),
                                "tags": "prod;web", "onboot": 1, "digest": format!("{i:040x}"), "hostname": "x"});
            ActualGuest {
                vmid: Vmid::new(u64::from(100 + i)).expect("vmid"),
                kind: if i % 4 == 0 { GuestKind::Qemu } else { GuestKind::Lxc },
                status: if i % 5 == 0 { "running" } else { "stopped" }.into(),
                template: false,
                lock: None,
                ha_managed: false,
                config: config.as_object().cloned().unwrap_or_default(),
            }
        })
        .collect();
    (desired, actual)
}

/// The memory-bound floor for the plan: read every byte of every desired and actual
/// config value once, in the same order the planner visits them. It does no planning
/// work, so its per-guest time grows only with the data falling out of the caches (1k
/// guests' configs fit into L2, 10k do not); the planner's time is divided by it.
fn walk(d: &DesiredState, a: &[ActualGuest]) -> u64 {
    let bytes = |s: &str| s.bytes().map(u64::from).sum::<u64>();
    let mut acc = 0u64;
    for (want, have) in d.guests.iter().zip(a) {
        acc += u64::from(want.vmid.get()) + bytes(&have.status);
        for (f, n) in &want.config {
            acc += *f as u64
                + match n {
                    Norm::Text(t) | Norm::Decimal(t) => bytes(t),
                    Norm::Tags(t) => t.iter().map(|s| bytes(s)).sum(),
                    Norm::Int(i) => *i,
                    Norm::Bool(b) => u64::from(*b),
                    Norm::Unset => 1,
                };
        }
        for (k, v) in &have.config {
            acc += bytes(k)
                + match v {
                    serde_json::Value::String(s) => bytes(s),
                    serde_json::Value::Number(n) => n.as_u64().unwrap_or(1),
                    _ => 1,
                };
        }
    }
    acc
}

fn bench_plan() {
    let mut per_guest = Vec::new();
    let mut relative = Vec::new();
    for n in [1_000u32, 10_000, 30_000] {
        let (d, a) = plan_inputs(n);
        let reps = if n == 1_000 { 50 } else { 9 };
        // Interleaved, so both see the same machine load.
        let mut took = Duration::MAX;
        let mut floor = Duration::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            std::hint::black_box(walk(&d, &a));
            floor = floor.min(t.elapsed());
            let t = Instant::now();
            let p = plan(&d, &a);
            took = took.min(t.elapsed());
            drop(std::hint::black_box(p));
        }
        let each = took / n;
        per_guest.push(each.as_secs_f64());
        relative.push(took.as_secs_f64() / floor.as_secs_f64());
        println!(
            "plan {n} guests: {took:?} ({each:?} per guest); reading the same configs once: {floor:?} ({:?} per guest); plan/read {:.1}",
            floor / n,
            took.as_secs_f64() / floor.as_secs_f64()
        );
    }
    println!(
        "plan scaling: per-guest time 10k/1k {:.2}, 30k/10k {:.2}; relative to reading the configs: 10k/1k {:.2}, 30k/10k {:.2} (target about 1: linear)",
        per_guest[1] / per_guest[0],
        per_guest[2] / per_guest[1],
        relative[1] / relative[0],
        relative[2] / relative[1],
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if let Some(i) = args.iter().position(|a| a == "plan-once") {
        let n: u32 = args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .expect("plan-once N");
        let (d, a) = plan_inputs(n);
        let p = plan(&d, &a);
        println!("planned {} actions for {n} guests", p.actions.len());
        return;
    }
    let wants = |part: &str| args.is_empty() || args.iter().any(|a| a == part);
    if wants("queue") {
        bench_queue();
    }
    if wants("journal") {
        bench_journal();
    }
    if wants("plan") {
        bench_plan();
    }
}

fn bench_queue() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let base = best_of(5, || rt.block_on(mpsc_baseline()));
    let ours = best_of(5, || rt.block_on(queue_run()));
    let rate = |d: Duration| OPS as f64 / d.as_secs_f64();
    println!(
        "queue: {OPS} no-op ops over {VMIDS} vmids: {ours:?} ({:.0} ops/s); tokio mpsc baseline: {base:?} ({:.0} ops/s); ratio {:.2}x slower (target <= 3x)",
        rate(ours),
        rate(base),
        ours.as_secs_f64() / base.as_secs_f64()
    );
}
