//! The reversibility gate's own overhead for a signed `set_config` (issue 13: "as a ratio
//! to the same signed `set_config` through the previous issue's journaled path with the
//! gate switched off, in the same run; target ≤ 1.5×").
//!
//! In process: the agent's `OpsService` (with its reconcile engine, whose desired state is
//! empty and whose cycles are an hour apart, so it stays quiet) on a real journal in a
//! temporary directory (SQLite WAL, synchronous=FULL, as in production) and a real
//! `felhom-pvesim` over loopback TLS. One running LXC guest on `local-lvm`. Each sample
//! is one signed `set_config` of `memory` (alternating 512/768, so every one changes the
//! config) carrying `expect.config_digest`, timed from the envelope handed to
//! `OpsService::receive` to its final result committed (seen through the service's
//! change counter and the journal). Signing and reading the digest for the next envelope
//! happen outside the timed span.
//!
//! The two paths, switched per operation by the agent's bench-only switch (cargo feature
//! `bench-gate-off`, never in a production build):
//! - gate off (issue 12's path): verification, replay store, lane, preconditions (the
//!   guest listed, its config read for the digest), intent committed, one `PUT …/config`
//!   with that digest, the final record;
//! - gate on: the same, then the gate's steps: the guest listed and its config read
//!   (previous values, digest, power state), the decision and the previous-values undo
//!   point committed, the action's slot committed before and after the `PUT`, the config
//!   read again for the digest after and committed, the power state read once (the guest
//!   stays running, so the health check's first read passes) and its verdict committed.
//!
//! Interleaved ABBA (gate on, off, off, on, …) so load on the shared machine falls on both
//! alike; 10 of each first as warm-up, then 200 of each (`-- N` changes it). Prints
//! median, p90 and max per path and the ratio of the medians, and exits 1 when it is
//! above 1.5. To show where the time goes it also prints: the PVE requests of one
//! operation per path (the most frequent list; the reconcile cycle that the end of every
//! operation kicks adds the last guest listings), the fastest operation of each path with
//! the arrival time of each of its requests at the simulator (the gaps between them are
//! the journal commits and the hops between tasks), the gate steps the record holds, and,
//! after the operations, one config read and one commit of an operation record timed
//! alone. `-- --latency-ms M` adds M ms to every simulated PVE request (a real node
//! answers in milliseconds, not microseconds), to see how the ratio moves with a slower
//! node.
//!
//! `cargo bench -p felhom-testbed --features bench-gate-off --bench gate_overhead`

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use felhom_agent::config::{PrivhelperConfig, ProxmoxConfig, Secret, TlsVerify};
use felhom_agent::ops::bench_gate_off::set_gate_off;
use felhom_agent::ops::exec::ExecEnv;
use felhom_agent::ops::service::{OpsDeps, OpsService};
use felhom_agent::ops::{AgentId, TrustState};
use felhom_agent::privileged;
use felhom_agent::proxmox::{Client, GuestKind};
use felhom_agent::reconcile::desired::EmptyProvider;
use felhom_agent::reconcile::engine::{EngineDeps, EngineSettings};
use felhom_agent::reconcile::journal::Journal;
use felhom_agent::reconcile::pve::Pve;
use felhom_agent::reconcile::{Engine, Gate};
use felhom_protocol::Vmid;
use felhom_testbed::build;
use felhom_testbed::harness::PveSim;
use felhom_testbed::signing::{Payload, SignersFile, TestKey, random_agent_id};
use serde_json::{Value, json};
use tokio::sync::watch;

const VMID: u32 = 301;
const WARMUP: usize = 10;
const DEFAULT_N: usize = 200;
const TARGET: f64 = 1.5;
/// One operation that takes longer than this is reported as stuck.
const STUCK: Duration = Duration::from_secs(120);

fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[Duration], p: usize) -> Duration {
    let rank = (p * v.len()).div_ceil(100).max(1);
    v[rank - 1]
}

struct Bed {
    pve: PveSim,
    client: Client,
    ops: Arc<OpsService>,
    journal: Arc<Journal>,
    key: TestKey,
    agent_id: String,
    vmid: Vmid,
    /// Operations sent so far (the next one's memory value alternates with it).
    sent: usize,
    /// The last request the simulator's log showed.
    seen: u64,
    /// The last operation's id.
    last_op: String,
}

/// One operation: its time, the PVE requests seen while it ran and until its result was
/// read (`METHOD path`; the reconcile cycle the end of every operation kicks may add a
/// guest listing or two), and the steps its record's `gate` object holds.
struct Sample {
    took: Duration,
    requests: Vec<String>,
    /// Each request's arrival after the envelope was handed over (µs, the simulator's
    /// clock, which is this machine's), with the request.
    timeline: Vec<(i64, String)>,
    steps: Vec<String>,
}

/// What the record's `gate` object holds: its non-null top-level entries, and the
/// request slots by name.
fn steps_of(gate: &Value) -> Vec<String> {
    let Some(m) = gate.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in m {
        match v {
            Value::Null => {}
            Value::Object(slots) if k == "slots" => {
                out.extend(slots.keys().map(|n| format!("slot {n} (before and after)")));
            }
            _ => out.push(k.clone()),
        }
    }
    out
}

/// The most frequent of `lists`, and how often it occurred.
fn most_common(lists: &[Vec<String>]) -> (Vec<String>, usize) {
    let mut counts: std::collections::BTreeMap<&Vec<String>, usize> = Default::default();
    for l in lists {
        *counts.entry(l).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(l, n)| (l.clone(), n))
        .unwrap_or_default()
}

impl Bed {
    async fn digest(&self) -> Result<String, String> {
        let c = self
            .client
            .guest_config(GuestKind::Lxc, self.vmid)
            .await
            .map_err(|e| format!("reading the guest's config: {e}"))?;
        c.raw()
            .get("digest")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| "the guest's config has no digest".into())
    }

    /// Runs one signed `set_config` with the gate on or off and times it.
    async fn one(&mut self, gate_off: bool) -> Result<Sample, String> {
        let memory = if self.sent.is_multiple_of(2) {
            768
        } else {
            512
        };
        self.sent += 1;
        let digest = self.digest().await?;
        let payload = Payload::guest_op(&self.agent_id, self.pve.node(), "set_config", "lxc", VMID)
            .params(json!({"config": {"memory": memory}}))
            .expect_digest(&digest)
            .valid_for(3600)
            .reason("gate_overhead bench");
        let op_id: String = payload
            .get("op_id")
            .and_then(|t| serde_json::from_str(t).ok())
            .ok_or("payload without op_id")?;
        let raw = payload.sign(&[&self.key]).text().into_bytes();
        let since = self
            .pve
            .requests(self.seen)
            .await
            .map_err(|e| e.to_string())?
            .last()
            .map_or(self.seen, |r| r.seq);
        set_gate_off(gate_off);
        let mut changes = self.ops.changes();

        let t = Instant::now();
        let t_wall = unix_us();
        let receipt = self
            .ops
            .receive_async(raw, None)
            .await
            .map_err(|e| format!("receive: {e}"))?;
        let rec = loop {
            changes.borrow_and_update();
            let id = op_id.clone();
            let j = self.journal.clone();
            let rec = tokio::task::spawn_blocking(move || j.op_get(&id))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("journal: {e}"))?
                .ok_or_else(|| format!("operation {op_id} not recorded: {receipt:?}"))?;
            if !matches!(rec.state.as_str(), "held" | "running") {
                break rec;
            }
            match tokio::time::timeout(STUCK, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(format!("operation {op_id} stuck in {}", rec.state)),
            }
        };
        let took = t.elapsed();

        if rec.state != "applied" {
            return Err(format!(
                "set_config (gate {}) ended {}: {:?} {}",
                if gate_off { "off" } else { "on" },
                rec.state,
                rec.message,
                Value::Object(rec.result.clone())
            ));
        }
        let undo = rec.result.get("undo").cloned().unwrap_or(Value::Null);
        let gated = undo["kind"] == "previous_values";
        if gated == gate_off {
            return Err(format!(
                "the switch did not take: gate {} but the result is {}",
                if gate_off { "off" } else { "on" },
                Value::Object(rec.result.clone())
            ));
        }
        // The hub accepted the results (as it does in production), so the pending list
        // the service re-reads on every change stays short.
        let seqs: Vec<u64> = self
            .journal
            .results_pending(1000)
            .map_err(|e| format!("journal: {e}"))?
            .iter()
            .map(|r| r.seq)
            .collect();
        self.ops.delivered_now(&seqs).await;
        let logged = self.pve.requests(since).await.map_err(|e| e.to_string())?;
        self.seen = logged.last().map_or(since, |r| r.seq);
        let logged: Vec<_> = logged
            .into_iter()
            .filter(|r| r.seq > since && !r.path.starts_with("/_sim"))
            .collect();
        let requests = logged
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        let timeline = logged
            .iter()
            .map(|r| {
                let at = r.received_unix_us.map_or(-1, |u| u as i64 - t_wall);
                (
                    at,
                    format!(
                        "{} {} (held {} µs)",
                        r.method,
                        r.path,
                        r.held_us.unwrap_or(0)
                    ),
                )
            })
            .collect();
        self.last_op = op_id;
        Ok(Sample {
            took,
            requests,
            timeline,
            steps: steps_of(&rec.gate),
        })
    }

    /// The two things the gate adds, each timed alone, interleaved: one read of the
    /// guest's config as the gate makes it, and one commit of an operation record (with
    /// the journal worker hop) as a gate step makes it.
    async fn parts(&self, n: usize, op_id: &str) -> Result<(Vec<Duration>, Vec<Duration>), String> {
        let (mut reads, mut commits) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let t = Instant::now();
            self.client
                .guest_config(GuestKind::Lxc, self.vmid)
                .await
                .map_err(|e| format!("reading the guest's config: {e}"))?;
            reads.push(t.elapsed());
            let (id, j) = (op_id.to_string(), self.journal.clone());
            let t = Instant::now();
            tokio::task::spawn_blocking(move || {
                j.op_update(&id, |r| r.gate = r.gate.clone(), None)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("journal: {e}"))?;
            commits.push(t.elapsed());
        }
        Ok((reads, commits))
    }
}

async fn setup(latency_ms: u64) -> Result<(Bed, tempfile::TempDir), String> {
    let pvesim = build::bin_for_tests(build::PVESIM);
    let latency = latency_ms.to_string();
    let pve = PveSim::spawn(&pvesim, &["--guests", "4", "--latency-ms", &latency])
        .map_err(|e| e.to_string())?;
    pve.set_guest(
        VMID,
        json!({"type": "lxc", "status": "running", "config": {
            "hostname": "bench", "memory": "512", "cores": "1", "ostype": "debian",
            "arch": "amd64", "rootfs": format!("local-lvm:vm-{VMID}-disk-0,size=4G"),
        }}),
    )
    .await
    .map_err(|e| format!("making the guest: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let client = Client::new(
        &ProxmoxConfig {
            url: pve.url().to_string(),
            token_id: pve.token_id().to_string(),
            token_secret: Secret::new(pve.token_secret()),
            tls: TlsVerify::CaFile(pve.ca_file().to_path_buf()),
        },
        pve.node(),
    )
    .map_err(|e| e.to_string())?;
    let journal = Arc::new(Journal::open(dir.path()).map_err(|e| e.to_string())?);
    let key = TestKey::generate("bench-operator").map_err(|e| e.to_string())?;
    let signers = SignersFile::new(&[&key]);
    let trust = signers.trust().map_err(|e| e.to_string())?;
    let (_trust_tx, trust_rx) = watch::channel(TrustState::Enabled {
        path: dir.path().join("signers.json"),
        trust: Arc::new(trust),
    });
    let (gate_tx, gate_rx) = watch::channel(Gate::Open);
    // Both senders live as long as the process: the service sees no change.
    std::mem::forget(_trust_tx);
    let engine = Arc::new(Engine::spawn(EngineDeps {
        pve: Arc::new(client.clone()) as Arc<dyn Pve>,
        journal: journal.clone(),
        provider: Arc::new(EmptyProvider::default()),
        gate: gate_tx.subscribe(),
        settings: EngineSettings {
            poll_interval: Duration::from_secs(3600),
            resync_interval: Duration::from_secs(3600),
            ..EngineSettings::default()
        },
    }));
    std::mem::forget(gate_tx);
    let agent_id = random_agent_id();
    let ops = OpsService::start(OpsDeps {
        journal: journal.clone(),
        agent_id: AgentId::new(agent_id.clone()).map_err(|e| e.to_string())?,
        node: pve.node().to_string(),
        trust: trust_rx,
        gate: gate_rx,
        engine,
        env: ExecEnv {
            pve: client.clone(),
            privileged: privileged::Client::new(&PrivhelperConfig {
                socket_dir: dir.path().join("no-helpers"),
                audit_log: dir.path().join("audit.log"),
                timeout: Duration::from_secs(5),
            }),
            journal: journal.clone(),
            shutdown_timeout: Duration::from_secs(60),
            task_timeout: Duration::from_secs(600),
            backup_storage: Some("nas-backup".into()),
            // High, so a slow read never fails the check: the guest stays running and
            // the check passes on its first read.
            health_timeout: Duration::from_secs(600),
        },
        scratch_vmids: None,
    });
    let vmid = Vmid::new(u64::from(VMID)).map_err(|e| e.to_string())?;
    Ok((
        Bed {
            pve,
            client,
            ops,
            journal,
            key,
            agent_id,
            vmid,
            sent: 0,
            seen: 0,
            last_op: String::new(),
        },
        dir,
    ))
}

fn summary(what: &str, v: &mut [Duration]) -> Duration {
    v.sort();
    let median = pct(v, 50);
    println!(
        "  {what:<28} median {:8.2} ms  p90 {:8.2} ms  max {:8.2} ms",
        ms(median),
        ms(pct(v, 90)),
        ms(v[v.len() - 1])
    );
    median
}

async fn bench(n: usize, latency_ms: u64) -> Result<bool, String> {
    let (mut bed, dir) = setup(latency_ms).await?;
    // ABBA: gate on, off, off, on, ...
    let order = |i: usize| -> bool { matches!(i % 4, 1 | 2) };
    for i in 0..2 * WARMUP {
        bed.one(order(i)).await?;
    }
    let mut on = Vec::with_capacity(n);
    let mut off = Vec::with_capacity(n);
    let (mut req_on, mut req_off) = (Vec::new(), Vec::new());
    let mut steps_on = Vec::new();
    // The fastest operation of each path, its requests in time: where the time goes.
    let (mut fast_on, mut fast_off): (Option<Sample>, Option<Sample>) = (None, None);
    for i in 0..2 * n {
        let gate_off = order(i);
        let s = bed.one(gate_off).await?;
        let fast = if gate_off {
            &mut fast_off
        } else {
            &mut fast_on
        };
        if fast.as_ref().is_none_or(|f| s.took < f.took) {
            *fast = Some(Sample {
                took: s.took,
                requests: Vec::new(),
                timeline: s.timeline.clone(),
                steps: Vec::new(),
            });
        }
        if gate_off {
            off.push(s.took);
            req_off.push(s.requests);
        } else {
            on.push(s.took);
            req_on.push(s.requests);
            steps_on = s.steps;
        }
    }
    let last = bed.last_op.clone();
    let (mut reads, mut commits) = bed.parts(n, &last).await?;
    bed.ops.stop();
    drop(dir);
    println!(
        "signed set_config of one running LXC guest, envelope received → final result committed, {n} of each interleaved (ABBA), pvesim latency {latency_ms} ms:"
    );
    let m_on = summary("gate on", &mut on);
    let m_off = summary("gate off (issue 12's path)", &mut off);
    for (what, lists) in [("gate on", &req_on), ("gate off", &req_off)] {
        let (r, seen) = most_common(lists);
        println!(
            "  PVE requests of one operation, {what} ({}; the most frequent list, {seen} of {n}):",
            r.len()
        );
        for line in r {
            println!("    {line}");
        }
    }
    for (what, f) in [("gate on", &fast_on), ("gate off", &fast_off)] {
        let Some(f) = f else { continue };
        println!(
            "  the fastest operation, {what}: {:.2} ms; its requests arrived at (µs after receive):",
            ms(f.took)
        );
        for (at, r) in &f.timeline {
            println!("    {at:>7} {r}");
        }
    }
    println!("  gate steps the record holds: {}", steps_on.join(", "));
    println!("  what the gate adds, each alone ({n} of each, interleaved):");
    summary("one config read", &mut reads);
    summary("one record commit", &mut commits);
    let ratio = m_on.as_secs_f64() / m_off.as_secs_f64();
    let ok = ratio <= TARGET;
    println!(
        "  gate's own overhead: {:.2} ms per operation (median); ratio of medians {ratio:.2}x (target <= {TARGET}x){}",
        ms(m_on.saturating_sub(m_off)),
        if ok { "" } else { "  MISSED" }
    );
    Ok(ok)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut n = DEFAULT_N;
    let mut latency_ms = 0;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let parsed = match a.as_str() {
            "--latency-ms" => it
                .next()
                .and_then(|v| v.parse().ok())
                .map(|v| latency_ms = v),
            other => other.parse().ok().filter(|v| *v > 0).map(|v| n = v),
        };
        if parsed.is_none() {
            eprintln!("usage: gate_overhead [N] [--latency-ms M]");
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gate_overhead: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(bench(n, latency_ms)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("gate_overhead: {e}");
            ExitCode::from(1)
        }
    }
}
