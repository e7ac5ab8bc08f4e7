//! Restore tests (`felhom_agent::restore`) against `felhom-pvesim` over real HTTP, with the
//! real reconcile queue and a journal on disk: a passing LXC and QEMU test, a corrupt
//! archive, a guest that does not start, a full storage, a foreign guest on the scratch
//! vmid, the gate closed, and a test interrupted mid-restore cleaned up by the next run.
//! In every case the scratch guest's network is checked in the simulator's own state.
//! Then the daemon: `felhom-agent restore-test run/list` through its control socket, and a
//! `kill -9` of the daemon mid-restore, cleaned up by the restarted daemon on its own.

mod hub_support;
mod ops_support;
mod proxmox_client_support;

use std::sync::Arc;
use std::time::Duration;

use felhom_agent::config::RestoreTestsConfig;
use felhom_agent::proxmox::{Client, WaitOptions};
use felhom_agent::reconcile::journal::{Journal, RestoreRecord};
use felhom_agent::reconcile::{Gate, Queue, QueueConfig};
use felhom_agent::restore::{NO_VERDICT, RestoreDeps, RestoreError, RestoreTests};
use felhom_protocol::Vmid;
use felhom_testbed::harness::Fault;
use proxmox_client_support::Sim;
use serde_json::{Value, json};
use tokio::sync::watch;

const LONG: Duration = Duration::from_secs(120);

fn vmid(n: u64) -> Vmid {
    Vmid::new(n).unwrap()
}

struct Bed {
    sim: Arc<Sim>,
    _dir: tempfile::TempDir,
    gate: watch::Sender<Gate>,
    tests: Arc<RestoreTests>,
    journal: Arc<Journal>,
}

fn settings(stable: u64) -> RestoreTestsConfig {
    RestoreTestsConfig {
        enabled: true,
        storage: Some("local-lvm".into()),
        stable_seconds: stable,
        boot_check_seconds: 60,
        ..Default::default()
    }
}

async fn bed_with(sim: Sim, scratch: std::ops::RangeInclusive<u32>, s: RestoreTestsConfig) -> Bed {
    let sim = Arc::new(sim);
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(Journal::open(dir.path()).unwrap());
    let (gate, rx) = watch::channel(Gate::Open);
    let deps = RestoreDeps {
        client: Client::new(&sim.pinned(), &sim.start.node).unwrap(),
        queue: Queue::start(QueueConfig::default()),
        journal: journal.clone(),
        gate: rx,
        scratch,
        settings: s,
        task_wait: WaitOptions {
            timeout: LONG,
            initial_interval: Duration::from_millis(20),
            max_interval: Duration::from_millis(200),
        },
        poll: Duration::from_millis(100),
    };
    Bed {
        sim,
        _dir: dir,
        gate,
        tests: Arc::new(RestoreTests::new(deps).unwrap()),
        journal,
    }
}

async fn bed(stable: u64) -> Bed {
    let sim = Sim::start(&["--guests", "12", "--task-seconds", "0.05"]);
    bed_with(sim, 9900..=9901, settings(stable)).await
}

/// A control call with the admin token.
async fn control(sim: &Sim, method: &str, path: &str, body: Value) -> Value {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let resp = sim
        .client()
        .request(m, format!("{}{path}", sim.url()))
        .header("Authorization", format!("Bearer {}", sim.admin_token()))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "{method} {path}: {}",
        resp.status()
    );
    resp.json().await.unwrap()
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The newest backup of `vmid` in the simulator's state.
async fn newest_backup(sim: &Sim, vmid: u64) -> String {
    let state = sim.state_json().await;
    let mut best: Option<(i64, String)> = None;
    for s in state["storages"].as_array().unwrap() {
        for v in s["volumes"].as_array().cloned().unwrap_or_default() {
            if v["vmid"].as_u64() == Some(vmid) && v["content"] == "backup" {
                let ctime = v["ctime"].as_i64().unwrap_or(0);
                if best.as_ref().is_none_or(|(c, _)| ctime > *c) {
                    best = Some((ctime, v["volid"].as_str().unwrap().to_string()));
                }
            }
        }
    }
    best.expect("a backup in the simulator").1
}

async fn sim_guest(sim: &Sim, vmid: u64) -> Option<Value> {
    sim.guests_where(|g| g["vmid"].as_u64() == Some(vmid))
        .await
        .pop()
}

/// Every `netN` of a guest config detached.
fn all_detached(cfg: &Value) -> bool {
    let nets: Vec<&str> = cfg
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("net"))
        .map(|(_, v)| v.as_str().unwrap())
        .collect();
    !nets.is_empty()
        && nets
            .iter()
            .all(|n| n.split(',').any(|p| p == "link_down=1"))
}

/// Watches the simulator until a guest appears on `scratch`, and returns every config it
/// was seen with while it existed (the test then checks each was detached).
fn watch_scratch(sim: Arc<Sim>, scratch: u64) -> tokio::task::JoinHandle<Vec<(String, Value)>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + LONG;
        let mut appeared = false;
        while tokio::time::Instant::now() < deadline {
            match sim_guest(&sim, scratch).await {
                Some(g) => {
                    appeared = true;
                    if g["lock"].is_null() {
                        seen.push((
                            g["status"].as_str().unwrap_or("").to_string(),
                            g["config"].clone(),
                        ));
                    }
                }
                None if appeared => break,
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        seen
    })
}

fn result(r: &RestoreRecord) -> (&str, Option<&str>) {
    (r.result.as_deref().unwrap(), r.reason.as_deref())
}

#[tokio::test]
async fn an_lxc_backup_restores_boots_and_its_scratch_guest_is_destroyed() {
    let b = bed(1).await;
    let archive = newest_backup(&b.sim, 101).await;
    let watcher = watch_scratch(b.sim.clone(), 9900);
    let r = b.tests.run(Some(vmid(101))).await.unwrap();
    assert_eq!(result(&r), ("passed", None), "{r:?}");
    assert_eq!(r.archive.as_deref(), Some(archive.as_str()));
    assert_eq!(r.scratch_vmid, Some(9900));
    assert_eq!(r.scratch, "gone");
    assert!(r.restore_seconds.is_some() && r.boot_seconds.is_some());
    assert!(sim_guest(&b.sim, 9900).await.is_none(), "scratch destroyed");
    let seen = watcher.await.unwrap();
    assert!(seen.iter().any(|(s, _)| s == "running"), "{seen:?}");
    for (status, cfg) in &seen {
        assert!(all_detached(cfg), "{status}: {cfg}");
        assert!(cfg["hostname"].as_str().unwrap().ends_with("-restoretest"));
        assert_eq!(cfg["onboot"], json!(0));
        assert!(cfg["description"].as_str().unwrap().contains(&archive));
    }
    // Every request that changed something named the scratch vmid, and the destroy purged.
    let log = b.sim.log().await;
    for req in log.iter().filter(|r| r.method != "GET") {
        let on_scratch = req.path.contains("/9900")
            || req.params.get("vmid").map(String::as_str) == Some("9900");
        assert!(on_scratch, "{} {}", req.method, req.path);
    }
    let del = log.iter().find(|r| r.method == "DELETE").unwrap();
    assert_eq!(del.params.get("purge").map(String::as_str), Some("1"));
    assert_eq!(
        del.params
            .get("destroy-unreferenced-disks")
            .map(String::as_str),
        Some("1")
    );
    let post = log
        .iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/nodes/pve1/lxc"))
        .unwrap();
    assert_eq!(post.params.get("unique").map(String::as_str), Some("1"));
    assert!(post.params.get("start").is_none_or(|s| s == "0"));
    // The history has it, with a report seq.
    let recent = b.journal.restore_recent(10).unwrap();
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0].seq, Some(1));
}

#[tokio::test]
async fn a_qemu_backup_passes_when_its_guest_agent_answers() {
    let b = bed(1).await;
    let watcher = watch_scratch(b.sim.clone(), 9900);
    let r = b.tests.run(Some(vmid(103))).await.unwrap();
    assert_eq!(result(&r), ("passed", None), "{r:?}");
    assert_eq!(r.kind, "qemu");
    let seen = watcher.await.unwrap();
    assert!(!seen.is_empty());
    for (_, cfg) in &seen {
        assert!(all_detached(cfg), "{cfg}");
        assert!(cfg["name"].as_str().unwrap().ends_with("-restoretest"));
    }
    let log = b.sim.log().await;
    assert!(
        log.iter()
            .any(|r| r.path.ends_with("/qemu/9900/agent/ping") && r.status == Some(200))
    );
    assert!(sim_guest(&b.sim, 9900).await.is_none());
}

#[tokio::test]
async fn a_guest_agent_that_never_answers_fails_the_test() {
    let mut s = settings(0);
    s.boot_check_seconds = 2;
    let b = bed_with(
        Sim::start(&["--guests", "12", "--task-seconds", "0.05"]),
        9900..=9900,
        s,
    )
    .await;
    let archive = newest_backup(&b.sim, 103).await;
    control(
        &b.sim,
        "PUT",
        &format!("/_sim/volumes/{}", enc(&archive)),
        json!({"agent_fails": true}),
    )
    .await;
    let r = b.tests.run(Some(vmid(103))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("failed"), "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("guest agent did not answer"),
        "{r:?}"
    );
    assert!(sim_guest(&b.sim, 9900).await.is_none());
}

#[tokio::test]
async fn a_corrupt_archive_fails_and_leaves_nothing() {
    let b = bed(0).await;
    let archive = newest_backup(&b.sim, 101).await;
    control(
        &b.sim,
        "PUT",
        &format!("/_sim/volumes/{}", enc(&archive)),
        json!({"corrupt": true}),
    )
    .await;
    let r = b.tests.run(Some(vmid(101))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("failed"), "{r:?}");
    let reason = r.reason.as_deref().unwrap();
    assert!(
        reason.starts_with("the restore failed: unable to restore CT 9900"),
        "{reason}"
    );
    assert!(sim_guest(&b.sim, 9900).await.is_none());
    assert_eq!(r.scratch, "gone");
    // QEMU: a failed restore leaves an empty VM, which the test destroys.
    let vm = newest_backup(&b.sim, 103).await;
    control(
        &b.sim,
        "PUT",
        &format!("/_sim/volumes/{}", enc(&vm)),
        json!({"corrupt": true}),
    )
    .await;
    let r = b.tests.run(Some(vmid(103))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("failed"), "{r:?}");
    assert!(
        sim_guest(&b.sim, 9900).await.is_none(),
        "empty VM destroyed"
    );
    assert!(
        b.sim
            .log()
            .await
            .iter()
            .any(|r| r.method == "DELETE" && r.path.ends_with("/qemu/9900"))
    );
}

#[tokio::test]
async fn a_guest_that_does_not_start_fails_and_is_still_destroyed() {
    let b = bed(0).await;
    let archive = newest_backup(&b.sim, 101).await;
    control(
        &b.sim,
        "PUT",
        &format!("/_sim/volumes/{}", enc(&archive)),
        json!({"start_fails": true}),
    )
    .await;
    let watcher = watch_scratch(b.sim.clone(), 9900);
    let r = b.tests.run(Some(vmid(101))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("failed"), "{r:?}");
    assert!(
        r.reason.as_deref().unwrap().contains("did not start"),
        "{r:?}"
    );
    let seen = watcher.await.unwrap();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|(_, c)| all_detached(c)));
    assert!(sim_guest(&b.sim, 9900).await.is_none());
    assert!(
        b.sim
            .log()
            .await
            .iter()
            .any(|r| r.method == "DELETE" && r.path.ends_with("/lxc/9900"))
    );
}

#[tokio::test]
async fn a_guest_that_stops_on_its_own_fails_the_stability_check() {
    let b = bed(3).await;
    let archive = newest_backup(&b.sim, 101).await;
    control(
        &b.sim,
        "PUT",
        &format!("/_sim/volumes/{}", enc(&archive)),
        json!({"stops_after_seconds": 1}),
    )
    .await;
    let r = b.tests.run(Some(vmid(101))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("failed"), "{r:?}");
    assert!(
        r.reason.as_deref().unwrap().contains("stopped within 3 s"),
        "{r:?}"
    );
    assert!(sim_guest(&b.sim, 9900).await.is_none());
}

#[tokio::test]
async fn a_storage_too_full_is_skipped_without_a_restore() {
    let b = bed(0).await;
    // 21 GiB of 100 GiB free: the scratch guest's disks would take it below 20 %.
    const GIB: u64 = 1 << 30;
    control(
        &b.sim,
        "PUT",
        "/_sim/storages/local-lvm",
        json!({"total": 100 * GIB, "avail": 21 * GIB}),
    )
    .await;
    b.sim.clear_log().await;
    let r = b.tests.run(Some(vmid(101))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("skipped"), "{r:?}");
    assert!(
        r.reason.as_deref().unwrap().contains("min_free_fraction"),
        "{r:?}"
    );
    assert!(b.sim.log().await.iter().all(|r| r.method == "GET"));
    assert_eq!(r.scratch_vmid, None);
}

#[tokio::test]
async fn a_foreign_guest_on_the_scratch_vmid_is_left_alone() {
    let sim = Sim::start(&["--guests", "12", "--task-seconds", "0.05"]);
    sim.put_guest(9900, json!({"type": "lxc", "status": "running", "config": {"hostname": "someone-elses", "net0": "name=eth0,bridge=vmbr0"}})).await;
    let b = bed_with(sim, 9900..=9900, settings(0)).await;
    let before = sim_guest(&b.sim, 9900).await.unwrap();
    b.sim.clear_log().await;
    let r = b.tests.run(Some(vmid(101))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("skipped"), "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("no free scratch vmid"),
        "{r:?}"
    );
    assert!(b.sim.log().await.iter().all(|r| r.method == "GET"));
    let after = sim_guest(&b.sim, 9900).await.unwrap();
    assert_eq!(before["config"], after["config"]);
    assert_eq!(after["status"], "running");
}

#[tokio::test]
async fn blocked_and_awaiting_envelope_send_nothing() {
    let b = bed(0).await;
    for g in [Gate::Blocked, Gate::AwaitingEnvelope] {
        b.gate.send(g).unwrap();
        b.sim.clear_log().await;
        let e = b.tests.run(Some(vmid(101))).await.unwrap_err();
        assert!(matches!(e, RestoreError::NotAllowed(_)), "{e}");
        assert!(b.sim.log().await.iter().all(|r| r.method == "GET"));
    }
    assert!(b.journal.restore_recent(10).unwrap().is_empty());
    b.gate.send(Gate::Open).unwrap();
    let r = b.tests.run(Some(vmid(101))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("passed"), "{r:?}");
}

#[tokio::test]
async fn a_test_interrupted_mid_restore_is_cleaned_up_by_the_next_run() {
    let sim = Sim::start(&["--guests", "12", "--task-seconds", "0.05"]);
    // A slow restore: the archive takes seconds to extract.
    control(
        &sim,
        "PUT",
        "/_sim/settings",
        json!({"restore_bytes_per_second": 1_000_000_000}),
    )
    .await;
    let b = bed_with(sim, 9900..=9901, settings(0)).await;
    let tests = b.tests.clone();
    let run = tokio::spawn(async move { tests.run(Some(vmid(101))).await });
    // Wait for the journal to record the restore's task, then drop the test mid-restore
    // (what a kill -9 leaves: the row says a scratch guest may exist).
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let left = b.journal.restore_left_behind().unwrap();
        if left.first().is_some_and(|r| !r.upids.is_empty()) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no restore started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.abort();
    let _ = run.await;
    let left = b.journal.restore_left_behind().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].step, "restoring");
    // The next run cleans up first (waiting for the restore task), then tests again.
    control(
        &b.sim,
        "PUT",
        "/_sim/settings",
        json!({"restore_bytes_per_second": 17179869184u64}),
    )
    .await;
    let r = b.tests.run(Some(vmid(101))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("passed"), "{r:?}");
    assert!(b.journal.restore_left_behind().unwrap().is_empty());
    let all = b.journal.restore_recent(10).unwrap();
    let first = all.iter().find(|x| x.id == left[0].id).unwrap();
    assert_eq!(first.result.as_deref(), Some("skipped"));
    assert!(
        first.reason.as_deref().unwrap().contains("did not finish"),
        "{first:?}"
    );
    assert!(sim_guest(&b.sim, 9900).await.is_none());
    assert!(sim_guest(&b.sim, 9901).await.is_none());
}

// ---- the daemon, over real processes -------------------------------------------------

fn daemon_stack() -> Option<ops_support::Stack> {
    if !ops_support::is_root() {
        eprintln!("skipped: needs root (the agent runs as another uid)");
        return None;
    }
    Some(ops_support::Stack::new(json!({
        "restore_tests": {
            "scratch_vmids": "9900-9901",
            "storage": "local-lvm",
            "boot_check_seconds": 60,
            "stable_seconds": 1
        }
    })))
}

/// Waits until the daemon answers `status` with the hub's envelope (its gate is open).
async fn wait_ready(stack: &ops_support::Stack) {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let (code, out, _) = stack.cli(&["status", "--json"]);
        if code == 0 {
            let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
            if v["daemon"] == "running" && !v["last_envelope"].is_null() {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the daemon did not come up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn restore_test_run_and_list_go_through_the_daemon() {
    let Some(stack) = daemon_stack() else { return };
    // Reports every second, so the result reaches the hub soon.
    let mut envelope = stack.hub.sim_envelope().await;
    envelope["poll_interval_seconds"] = json!(1);
    stack.hub.set_envelope(envelope).await;
    let agent = stack.start_agent();
    wait_ready(&stack).await;
    let (code, out, err) = stack.cli(&["restore-test", "run", "--vmid", "101", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", agent.log_text());
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["result"], "passed", "{r}");
    assert_eq!(r["scratch_vmid"], 9900);
    assert!(sim_guest(&stack.pve, 9900).await.is_none());
    let (code, out, _) = stack.cli(&["restore-test", "list", "--json"]);
    assert_eq!(code, 0);
    let l: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l["restore_tests"][0]["id"], r["id"]);
    // The next accepted report carries the result and the guest's proof; once accepted,
    // the result is not sent again (the cursor moved), the proof stays.
    let reports = stack
        .hub
        .wait_reports(LONG, |rs| {
            rs.iter().any(|x| {
                x["outcome"] == "accepted"
                    && x["report"]["restore_tests"]
                        .as_array()
                        .is_some_and(|t| t.iter().any(|t| t["started_at"].is_string()))
            })
        })
        .await;
    let carrying = reports
        .iter()
        .position(|x| {
            x["outcome"] == "accepted"
                && x["report"]["restore_tests"]
                    .as_array()
                    .is_some_and(|t| !t.is_empty())
        })
        .unwrap();
    let t = &reports[carrying]["report"]["restore_tests"][0];
    assert_eq!(t["vmid"], 101);
    assert_eq!(t["result"], "passed");
    assert_eq!(t["archive"], r["archive"]);
    assert_eq!(t["scratch_vmid"], 9900);
    assert!(t["upids"].as_array().unwrap().len() >= 3, "{t}");
    let n = reports.len();
    let later = stack
        .hub
        .wait_reports(LONG, |rs| {
            rs.len() > n && rs[n..].iter().any(|x| x["outcome"] == "accepted")
        })
        .await;
    let next = later[n..]
        .iter()
        .find(|x| x["outcome"] == "accepted")
        .unwrap();
    assert_eq!(next["report"]["restore_tests"], json!([]));
    let g101 = next["report"]["guests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["vmid"] == 101)
        .unwrap();
    assert_eq!(g101["restore_proof"]["archive"], r["archive"]);
    assert!(g101["restore_proof"]["passed_at"].is_string());

    // A guest that does not exist is a usage error, and nothing is restored.
    let (code, _, err) = stack.cli(&["restore-test", "run", "--vmid", "4242"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("4242"), "{err}");
    // Human output names the result.
    let (_, out, _) = stack.cli(&["restore-test", "list"]);
    assert!(out.contains("guest 101 passed in 9900"), "{out}");
}

#[tokio::test]
async fn a_daemon_killed_mid_restore_cleans_up_after_its_restart() {
    let Some(stack) = daemon_stack() else { return };
    let agent = stack.start_agent();
    wait_ready(&stack).await;
    // A restore that takes long enough to kill the daemon in the middle of it.
    control(
        &stack.pve,
        "PUT",
        "/_sim/settings",
        json!({"restore_bytes_per_second": 50_000_000}),
    )
    .await;
    let mut cli = std::process::Command::new(proxmox_client_support::agent_bin());
    {
        use std::os::unix::process::CommandExt;
        cli.args(["restore-test", "run", "--vmid", "101", "--config"])
            .arg(&stack.config)
            .env_clear()
            .uid(ops_support::AGENT_UID)
            .gid(ops_support::AGENT_UID)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    let mut cli = cli.spawn().unwrap();
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        if let Some(g) = sim_guest(&stack.pve, 9900).await
            && g["lock"] == "create"
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no restore started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.kill9();
    let _ = cli.wait();
    control(
        &stack.pve,
        "PUT",
        "/_sim/settings",
        json!({"restore_bytes_per_second": 17179869184u64}),
    )
    .await;
    // The restarted daemon finds the left-behind test in its journal and cleans up by
    // itself (scheduled tests are off: only the cleanup runs).
    let agent = stack.start_agent();
    wait_ready(&stack).await;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let (code, out, _) = stack.cli(&["restore-test", "list", "--json"]);
        if code == 0 {
            let l: Value = serde_json::from_str(&out).unwrap();
            let t = &l["restore_tests"][0];
            if t["scratch"] == "gone" && t["result"] == "skipped" {
                assert!(
                    t["reason"].as_str().unwrap().contains("did not finish"),
                    "{t}"
                );
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cleanup: {}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        sim_guest(&stack.pve, 9900).await.is_none(),
        "{}",
        agent.log_text()
    );
    let deletes: Vec<_> = stack
        .pve
        .log()
        .await
        .into_iter()
        .filter(|r| r.method == "DELETE" && r.status == Some(200))
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}\n{}", agent.log_text());
    assert!(deletes[0].path.ends_with("/lxc/9900"));
}

#[tokio::test]
async fn a_blocked_daemon_runs_no_restore_test() {
    let Some(stack) = daemon_stack() else { return };
    let mut envelope = stack.hub.sim_envelope().await;
    envelope["blocked"] = json!(true);
    envelope["poll_interval_seconds"] = json!(1);
    stack.hub.set_envelope(envelope).await;
    let _agent = stack.start_agent();
    // Wait until the daemon holds the blocked envelope.
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let (code, out, _) = stack.cli(&["status", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        if code == 0 && v["last_envelope"]["envelope"]["blocked"] == json!(true) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never blocked: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.pve.clear_log().await;
    let (code, _, err) = stack.cli(&["restore-test", "run", "--vmid", "101"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("blocked by the hub"), "{err}");
    assert!(
        stack.pve.log().await.iter().all(|r| r.method == "GET"),
        "a blocked daemon sent a mutation"
    );
    assert!(sim_guest(&stack.pve, 9900).await.is_none());
}

// ---- errors that say nothing about the backup ----------------------------------------

/// The requests that changed something on `vmid` in the simulator's log.
async fn changes_on(sim: &Sim, path_end: &str) -> Vec<String> {
    sim.log()
        .await
        .into_iter()
        .filter(|r| r.method != "GET" && r.path.ends_with(path_end))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[tokio::test]
async fn a_proxmox_read_error_mid_test_is_no_verdict_and_the_guest_is_tested_again() {
    let b = bed(0).await;
    // First run: the scratch guest's first status read after its start finds the
    // connection dropped (PVE unreachable for a moment).
    b.sim
        .fault(Fault::drop_connection("/nodes/pve1/lxc/9900/status/current").times(1))
        .await;
    let first = b.tests.run(None).await.unwrap();
    assert_eq!(first.vmid, 101, "the oldest-tested guest first: {first:?}");
    assert_eq!(first.result.as_deref(), Some("skipped"), "{first:?}");
    let reason = first.reason.as_deref().unwrap();
    assert!(reason.starts_with(NO_VERDICT), "{reason}");
    assert!(first.retry);
    // The scratch guest was made, started, and is destroyed all the same.
    assert_eq!(first.scratch, "gone");
    assert!(sim_guest(&b.sim, 9900).await.is_none());
    assert!(
        changes_on(&b.sim, "/lxc/9900")
            .await
            .iter()
            .any(|c| c.starts_with("DELETE")),
        "no destroy"
    );
    // Second run: the restore task's status cannot be read (PVE answers 500).
    b.sim
        .fault(
            Fault::http_500("/nodes/pve1/tasks/*", "proxy loop detected")
                .method("GET")
                .times(1),
        )
        .await;
    let second = b.tests.run(None).await.unwrap();
    assert_eq!(
        second.vmid, 101,
        "a test without a verdict keeps the guest's turn: {second:?}"
    );
    assert_eq!(second.result.as_deref(), Some("skipped"), "{second:?}");
    assert!(
        second.reason.as_deref().unwrap().starts_with(NO_VERDICT),
        "{second:?}"
    );
    assert!(sim_guest(&b.sim, 9900).await.is_none());
    assert!(b.journal.restore_left_behind().unwrap().is_empty());
    // Third run: PVE answers; the same guest passes. The fourth goes on to another guest.
    let third = b.tests.run(None).await.unwrap();
    assert_eq!(
        (third.vmid, third.result.as_deref()),
        (101, Some("passed")),
        "{third:?}"
    );
    let fourth = b.tests.run(None).await.unwrap();
    assert_ne!(fourth.vmid, 101, "{fourth:?}");
    // Nothing of this was a `failed`.
    assert!(
        b.journal
            .restore_recent(10)
            .unwrap()
            .iter()
            .all(|r| r.result.as_deref() != Some("failed"))
    );
}

#[tokio::test]
async fn a_restore_pve_refuses_before_it_starts_is_skipped_with_its_reason() {
    let b = bed(0).await;
    let refusal = "unable to restore CT 9900 - CT 9900 already exists on node 'pve2'";
    b.sim
        .fault(
            Fault::http_500("/nodes/pve1/lxc", refusal)
                .method("POST")
                .times(1),
        )
        .await;
    let r = b.tests.run(Some(vmid(101))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("skipped"), "{r:?}");
    let reason = r.reason.as_deref().unwrap();
    assert!(reason.contains("PVE refused the restore"), "{reason}");
    assert!(reason.contains(refusal), "{reason}");
    assert_eq!(r.scratch, "gone");
    assert!(sim_guest(&b.sim, 9900).await.is_none());
    assert!(b.journal.restore_left_behind().unwrap().is_empty());
    // Only the refused POST changed (tried to change) anything.
    let changes: Vec<_> = b
        .sim
        .log()
        .await
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| (r.method, r.path, r.status))
        .collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].2, Some(500));
}

#[tokio::test]
async fn a_scratch_guest_that_cannot_be_destroyed_blocks_further_tests_until_it_is() {
    let b = bed(0).await;
    let lock = "can't lock file '/run/lock/lxc/pve-config-9900.conf' - got timeout";
    b.sim
        .fault(Fault::task_fail("/nodes/pve1/lxc/9900", lock).method("DELETE"))
        .await;
    let r = b.tests.run(Some(vmid(101))).await.unwrap();
    // The backup is proven; the leftover is recorded with its error and since when.
    assert_eq!(r.result.as_deref(), Some("passed"), "{r:?}");
    assert_eq!(r.scratch, "maybe");
    assert!(r.cleanup_error.as_deref().unwrap().contains(lock), "{r:?}");
    let since = r.cleanup_failing_since_ms.unwrap();
    assert!(sim_guest(&b.sim, 9900).await.is_some());
    let stuck = b.tests.not_destroyed().await.unwrap();
    assert_eq!(stuck.len(), 1);
    // The next test only retries the destroy, fails loudly, and restores nothing.
    b.sim.clear_log().await;
    let e = b.tests.run(Some(vmid(103))).await.unwrap_err();
    assert!(
        matches!(&e, RestoreError::ScratchNotDestroyed { scratch: 9900, .. }),
        "{e}"
    );
    assert!(e.to_string().contains(lock), "{e}");
    let posts: Vec<_> = b
        .sim
        .log()
        .await
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert!(posts.is_empty(), "a test ran over a leftover: {posts:?}");
    let stuck = b.tests.not_destroyed().await.unwrap();
    assert_eq!(
        stuck[0].cleanup_failing_since_ms,
        Some(since),
        "since the first"
    );
    // Once PVE lets it go, the next run cleans up and tests again.
    b.sim.clear_faults().await.unwrap();
    let r = b.tests.run(Some(vmid(103))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("passed"), "{r:?}");
    assert!(b.tests.not_destroyed().await.unwrap().is_empty());
    assert!(sim_guest(&b.sim, 9900).await.is_none());
}

#[tokio::test]
async fn status_and_the_report_say_loudly_when_a_scratch_guest_cannot_be_destroyed() {
    let Some(stack) = daemon_stack() else { return };
    let mut envelope = stack.hub.sim_envelope().await;
    envelope["poll_interval_seconds"] = json!(1);
    stack.hub.set_envelope(envelope).await;
    let lock = "can't lock file '/run/lock/lxc/pve-config-9900.conf' - got timeout";
    stack
        .pve
        .fault(Fault::task_fail("/nodes/pve1/lxc/9900", lock).method("DELETE"))
        .await;
    let agent = stack.start_agent();
    wait_ready(&stack).await;
    let (code, out, err) = stack.cli(&["restore-test", "run", "--vmid", "101", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", agent.log_text());
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["result"], "passed", "{r}");
    assert!(sim_guest(&stack.pve, 9900).await.is_some());

    // status names the vmid, since when and the last error, as JSON and for people.
    let (code, out, _) = stack.cli(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    let rt = &v["restore_tests"];
    assert_eq!(rt["blocked"], true, "{v}");
    let n = &rt["not_destroyed"][0];
    assert_eq!(n["scratch_vmid"], 9900, "{rt}");
    assert_eq!(n["vmid"], 101);
    assert!(n["since"].is_string(), "{rt}");
    assert!(n["last_error"].as_str().unwrap().contains(lock), "{rt}");
    let (_, human, _) = stack.cli(&["status"]);
    assert!(
        human.contains("restore tests BLOCKED: scratch guest 9900") && human.contains(lock),
        "{human}"
    );
    // A further test refuses, naming it.
    let (code, _, err) = stack.cli(&["restore-test", "run", "--vmid", "103"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("scratch guest 9900"), "{err}");

    // The report carries it as an error.
    let reports = stack
        .hub
        .wait_reports(LONG, |rs| {
            rs.iter().any(|x| {
                x["report"]["errors"].as_array().is_some_and(|e| {
                    e.iter()
                        .any(|e| e["message"].as_str().is_some_and(|m| m.contains("9900")))
                })
            })
        })
        .await;
    let e = reports
        .iter()
        .flat_map(|x| {
            x["report"]["errors"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|e| e["message"].as_str().is_some_and(|m| m.contains("9900")))
        .unwrap();
    assert_eq!(e["subject"], "9900", "{e}");
    let m = e["message"].as_str().unwrap();
    assert!(m.contains("cannot be destroyed") && m.contains(lock), "{m}");

    // PVE lets go: the next test cleans up, and status and the report are quiet again.
    stack.pve.clear_faults().await.unwrap();
    let (code, out, err) = stack.cli(&["restore-test", "run", "--vmid", "103", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(sim_guest(&stack.pve, 9900).await.is_none());
    let (_, out, _) = stack.cli(&["status", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["restore_tests"]["blocked"], false, "{v}");
    let n = stack.hub.reports().await.len();
    let later = stack.hub.wait_reports(LONG, |rs| rs.len() > n + 1).await;
    let last = &later.last().unwrap()["report"];
    assert!(
        !last["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot be destroyed"))),
        "{last}"
    );
}

// ---- review fixes -------------------------------------------------------------------

#[tokio::test]
async fn the_guest_agent_check_follows_the_backed_up_config_not_the_current_one() {
    let mut s = settings(0);
    s.boot_check_seconds = 2;
    let b = bed_with(
        Sim::start(&["--guests", "12", "--task-seconds", "0.05"]),
        9900..=9900,
        s,
    )
    .await;
    // The backup enables the agent (and its agent never answers); the guest's current
    // config no longer does. The restored guest is what boots: its agent is checked.
    let archive = newest_backup(&b.sim, 103).await;
    control(
        &b.sim,
        "PUT",
        &format!("/_sim/volumes/{}", enc(&archive)),
        json!({"agent_fails": true}),
    )
    .await;
    b.sim
        .put_guest(103, json!({"config": {"agent": null}}))
        .await;
    let r = b.tests.run(Some(vmid(103))).await.unwrap();
    assert_eq!(r.result.as_deref(), Some("failed"), "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("guest agent did not answer"),
        "{r:?}"
    );
    assert!(sim_guest(&b.sim, 9900).await.is_none());
}

#[tokio::test]
async fn after_a_crash_an_unmarked_guest_on_the_scratch_vmid_is_left_alone() {
    let sim = Sim::start(&["--guests", "12", "--task-seconds", "0.05"]);
    // Someone's `qm create 9900 --memory 512`: no name, no description.
    sim.put_guest(
        9900,
        json!({"type": "qemu", "status": "stopped", "config": {"memory": "512"}}),
    )
    .await;
    let b = bed_with(sim, 9900..=9901, settings(0)).await;
    // What a kill -9 during a QEMU restore on 9900 leaves in the journal (the restore
    // then failed, and PVE removed its config before that guest was made).
    let mut left = RestoreRecord {
        id: 0,
        vmid: 103,
        kind: "qemu".into(),
        archive: Some(newest_backup(&b.sim, 103).await),
        archive_ctime: None,
        archive_size: None,
        scratch_vmid: Some(9900),
        started_ms: 1,
        step: "restoring".into(),
        scratch: "maybe".into(),
        restore_seconds: None,
        boot_seconds: None,
        duration_seconds: None,
        result: None,
        reason: None,
        upids: vec!["UPID:pve1:00001234:00005678:6B15BCC7:qmrestore:9900:root@pam!felhom:".into()],
        finished_ms: None,
        seq: None,
        retry: false,
        cleanup_error: None,
        cleanup_failing_since_ms: None,
    };
    b.journal.restore_put(&mut left).unwrap();
    let before = sim_guest(&b.sim, 9900).await.unwrap();
    b.sim.clear_log().await;
    assert_eq!(b.tests.cleanup().await.unwrap(), 1);
    let after = sim_guest(&b.sim, 9900)
        .await
        .expect("the foreign guest is still there");
    assert_eq!(before["config"], after["config"]);
    assert!(
        b.sim.log().await.iter().all(|r| r.method == "GET"),
        "something was sent to the foreign guest"
    );
    assert!(b.journal.restore_left_behind().unwrap().is_empty());
}

// ---- the daemon's schedule under a stepped wall clock --------------------------------

/// The guests the schedule can test: not templates, with a backup in the simulator.
async fn guests_with_backups(sim: &Sim) -> Vec<u64> {
    let state = sim.state_json().await;
    let mut with: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    for s in state["storages"].as_array().unwrap() {
        for v in s["volumes"].as_array().cloned().unwrap_or_default() {
            if v["content"] == "backup"
                && let Some(id) = v["vmid"].as_u64()
            {
                with.insert(id);
            }
        }
    }
    sim.guests_where(|g| g["template"] != json!(true))
        .await
        .iter()
        .filter_map(|g| g["vmid"].as_u64())
        .filter(|v| with.contains(v) && !(9900..=9901).contains(v))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// libfaketime's preload library (`.ci/run` installs faketime), preloaded directly so the
/// agent is the process the test signals (the `faketime` wrapper forks).
fn libfaketime() -> std::path::PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
    .expect("libfaketime (apt-get install faketime)")
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The local minutes (TZ=UTC) at which the schedule looked and found nothing due.
fn not_due_minutes(log: &str) -> Vec<u16> {
    log.lines()
        .filter(|l| l.contains("restore tests: not due"))
        .filter_map(|l| {
            let rest = &l[l.find("local_minute")? + "local_minute".len()..];
            let digits: String = rest
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// The daemon's restore tests, oldest first: (vmid, started_ms on the daemon's clock,
/// result once final).
fn history(stack: &ops_support::Stack) -> Vec<(u64, i64, Option<String>)> {
    let (code, out, err) = stack.cli(&["restore-test", "list", "--limit", "100", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let l: Value = serde_json::from_str(&out).unwrap();
    let mut h: Vec<(u64, i64, Option<String>)> = l["restore_tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["vmid"].as_u64().unwrap(),
                t["started_ms"].as_i64().unwrap(),
                t["result"].as_str().map(str::to_string),
            )
        })
        .collect();
    h.reverse();
    h
}

/// The daemon's schedule, over days of its wall clock in seconds of the test's: the
/// daemon runs under `faketime` (wall clock set, monotonic clock real, so every timeout
/// keeps its real length), once per step of the clock. Each start looks at once (its
/// gate opens on the kept envelope); what it decides comes from the journal it shares
/// with the earlier starts (when the last test started, which guest was tested when),
/// so the interval, the window and the order are the schedule's own, not the test's.
#[tokio::test]
async fn the_daemon_tests_one_guest_per_interval_oldest_first_and_only_inside_the_window() {
    if !ops_support::is_root() {
        eprintln!("skipped: needs root (the agent runs as another uid)");
        return;
    }
    let stack = ops_support::Stack::new(json!({
        "restore_tests": {
            "enabled": true,
            "scratch_vmids": "9900-9901",
            "storage": "local-lvm",
            "interval_hours": 1,
            "window": "01:00-05:00",
            "boot_check_seconds": 60,
            "stable_seconds": 0
        }
    }));
    let guests = guests_with_backups(&stack.pve).await;
    assert!(
        (2..=4).contains(&guests.len()),
        "the steps below fit 2 to 4 guests in one window: {guests:?}"
    );
    // Tomorrow (UTC) and on, so the daemon's clock only ever moves forward.
    let day = (now_unix() / 86_400 + 1) * 86_400;
    let at = |d: i64, h: i64, m: i64| day + d * 86_400 + h * 3600 + m * 60;
    let lib = libfaketime();
    let run_at = |target: i64| {
        let offset = format!("{:+}", target - now_unix());
        stack.start_agent_with(
            &[
                ("LD_PRELOAD", lib.to_str().unwrap()),
                ("FAKETIME", &offset),
                ("TZ", "UTC"),
                // The schedule's "not due" is a debug line (the CLI's logging, which
                // `run` keeps, reads RUST_LOG).
                ("RUST_LOG", "info,felhom_agent::restore=debug"),
            ],
            None,
        )
    };
    // The daemon started at `target` looks and finds nothing due; nothing is tested.
    let not_due = |target: i64, tested: usize| {
        let stack = &stack;
        async move {
            let agent = run_at(target);
            wait_ready(stack).await;
            let minute = ((target / 60) % (24 * 60)) as u16;
            let deadline = tokio::time::Instant::now() + LONG;
            while !not_due_minutes(&agent.log_text())
                .iter()
                .any(|m| (minute..=minute + 2).contains(m))
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the schedule never looked at minute {minute}: {}",
                    agent.log_text()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(
                history(stack).len(),
                tested,
                "a test ran at minute {minute}"
            );
            assert!(agent.term(Duration::from_secs(30)).is_some());
        }
    };
    // The daemon started at `target` runs the `n`th test by itself.
    let tested = |target: i64, n: usize| {
        let stack = &stack;
        async move {
            let agent = run_at(target);
            wait_ready(stack).await;
            let deadline = tokio::time::Instant::now() + LONG;
            loop {
                let h = history(stack);
                assert!(h.len() <= n, "more tests than steps: {h:?}");
                if h.len() == n && h[n - 1].2.is_some() {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "test {n} never ran: {h:?}\n{}",
                    agent.log_text()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(agent.term(Duration::from_secs(30)).is_some());
        }
    };
    // The first start takes the hub's envelope (kept in the state dir from then on).
    let first = run_at(at(0, 0, 50));
    wait_ready(&stack).await;
    drop(first);

    // 00:50: before the window.
    not_due(at(0, 0, 50), 0).await;
    // 01:00: the first test. 01:40: not an hour since.
    tested(at(0, 1, 0), 1).await;
    not_due(at(0, 1, 40), 1).await;
    // One guest per hour while the window is open.
    for i in 1..guests.len() {
        tested(at(0, 1 + i as i64, 1), i + 1).await;
    }
    // 05:10: the interval has passed, but the window is closed.
    not_due(at(0, 5, 10), guests.len()).await;
    // The next night, the guest tested longest ago comes first again.
    tested(at(1, 1, 5), guests.len() + 1).await;

    let h = history(&stack);
    let order: Vec<u64> = h.iter().map(|(v, _, _)| *v).collect();
    let mut expected = guests.clone();
    expected.push(guests[0]);
    assert_eq!(order, expected, "oldest-tested first, never-tested by vmid");
    for (v, started_ms, result) in &h {
        assert_eq!(result.as_deref(), Some("passed"), "guest {v}");
        let minute = (started_ms / 60_000).rem_euclid(24 * 60);
        assert!(
            (60..300).contains(&minute),
            "guest {v} was tested at minute {minute}, outside 01:00-05:00"
        );
    }
    assert!(sim_guest(&stack.pve, 9900).await.is_none());
}
