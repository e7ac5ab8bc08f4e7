//! The operator surface of the reversibility gate over real processes: `felhom-agent ops
//! list`, `ops show`, `status`, `ops undo` and `ops release` against a running daemon
//! (`felhom-agent run` as uid 65534) and without one, and the report's `ops.undo_points`
//! and undo-space error as `felhom-hubsim` receives them.
//!
//! In the first test the undo points are written into the agent's journal through the
//! agent's own library (`Journal::op_update_with_undo`, the call the gate makes when it
//! made one) before the daemon starts, so every kind and size can be laid out; the second
//! makes one through a real gated rollback and undoes and releases it from the host.
//!
//! Needs root (see `ops_support`; a CLI also runs as a uid that is neither root nor the
//! agent's).

mod hub_support;
mod ops_support;
mod proxmox_client_support;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use felhom_agent::reconcile::journal::{Journal, OpRecord, UndoPoint};
use ops_support::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);
const GIB: u64 = 1 << 30;
/// Neither root nor the agent (65534), but in the agent's group, so the socket (0660)
/// lets it connect: only the daemon's peer check stands in its way.
const STRANGER_UID: u32 = 4242;

/// An applied gated operation of `kind` on `vmid` and its undo point, as the gate leaves
/// them in the journal: the record (with a real signed envelope) and the point in one
/// transaction; its results already accepted by the hub.
fn seed_applied(
    stack: &Stack,
    journal: &Journal,
    kind: &str,
    vmid: u32,
    point: impl FnOnce(&str) -> UndoPoint,
) -> String {
    let payload = stack.guest_op(kind, "lxc", vmid).reason("gate_cli seed");
    let op_id = op_id_of(&payload);
    let now = felhom_agent::reconcile::journal::now_ms();
    let rec = OpRecord {
        op_id: op_id.clone(),
        payload_sha256: payload.sha256_hex(),
        not_after: payload.get("not_after").unwrap().parse().unwrap(),
        kind: kind.into(),
        vmid: Some(vmid),
        envelope: stack.signed(&payload).text(),
        delivery_id: None,
        signers: vec!["alice".into()],
        received_ms: now - 3_600_000,
        state: "held".into(),
        reason: None,
        message: None,
        upids: Vec::new(),
        result: serde_json::Map::new(),
        intent_ms: None,
        finished_ms: None,
        spec: Value::Null,
        gate: Value::Null,
    };
    let seq = journal
        .op_accept(&rec, |seq| {
            serde_json::to_string(&felhom_agent::ops::service::result_of(&rec, seq)).unwrap()
        })
        .unwrap()
        .expect("a new operation");
    journal.results_accepted(&[seq]).unwrap();
    let p = point(&op_id);
    journal
        .op_update_with_undo(
            &op_id,
            |r| {
                r.state = "applied".into();
                r.intent_ms = Some(now - 3_500_000);
                r.finished_ms = Some(now - 3_400_000);
            },
            &p,
            None,
        )
        .unwrap();
    op_id
}

fn undo_point(op_id: &str, op_kind: &str, vmid: u32, kind: &str) -> UndoPoint {
    UndoPoint {
        op_id: op_id.into(),
        op_kind: op_kind.into(),
        vmid,
        guest_kind: "lxc".into(),
        kind: kind.into(),
        reference: None,
        storage: None,
        size_bytes: None,
        detail: json!({"power": "running"}),
        created_ms: felhom_agent::reconcile::journal::now_ms() - 3_500_000,
        status: "kept".into(),
        released_ms: None,
        released_by: None,
    }
}

/// Gives every file below `dir` to the agent's uid (the journal was written as root).
fn give_tree_to_agent(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        std::os::unix::fs::chown(&p, Some(AGENT_UID), Some(AGENT_UID)).unwrap();
        if p.is_dir() {
            give_tree_to_agent(&p);
        }
    }
}

/// `felhom-agent ARGS --config …` as `uid` (group 65534, the agent's, so the socket lets it
/// in), or as root when `uid` is 0.
fn cli_as(stack: &Stack, uid: u32, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(proxmox_client_support::agent_bin());
    cmd.args(args)
        .arg("--config")
        .arg(&stack.config)
        .env_clear();
    if uid != 0 {
        cmd.uid(uid).gid(AGENT_UID);
    }
    let out = cmd.output().expect("run felhom-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The undo points `ops list --json` shows (as the agent's user).
fn listed(stack: &Stack) -> (Vec<Value>, usize) {
    let (code, out, err) = stack.cli(&["ops", "list", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    (
        v["undo_points"].as_array().cloned().unwrap_or_default(),
        v["ops"].as_array().map(Vec::len).unwrap_or(0),
    )
}

fn undo_space_subjects(report: &Value) -> Vec<String> {
    let mut s: Vec<String> = report["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["component"] == "ops" && e["kind"] == "undo_space")
        .filter_map(|e| e["subject"].as_str().map(str::to_owned))
        .collect();
    s.sort();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_undo_points_and_only_root_or_the_agent_may_undo_through_the_daemon() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"undo_warn_fraction": 0.001}}));
    // A backup pvesim lists on `local`: an undo point whose size the gate did not record
    // gets it from there.
    let (local_volid, local_size) = stack.pve.state_json().await["storages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["storage"] == "local")
        .flat_map(|s| s["volumes"].as_array().cloned().unwrap_or_default())
        .find(|v| v["content"] == "backup")
        .map(|v| {
            (
                v["volid"].as_str().unwrap().to_string(),
                v["size"].as_u64().unwrap(),
            )
        })
        .expect("pvesim seeds a backup on local");
    let (backup_op, listed_op, snapshot_op) = {
        let j = Journal::open(&stack.state_dir).unwrap();
        let a = seed_applied(&stack, &j, "rollback", 101, |id| UndoPoint {
            reference: Some("nas-backup:backup/vzdump-lxc-101-2026_12_01-03_00_00.tar.zst".into()),
            storage: Some("nas-backup".into()),
            size_bytes: Some(900 * GIB),
            ..undo_point(id, "rollback", 101, "backup")
        });
        let b = seed_applied(&stack, &j, "restore", 102, |id| UndoPoint {
            reference: Some(local_volid.clone()),
            storage: Some("local".into()),
            ..undo_point(id, "restore", 102, "backup")
        });
        let c = seed_applied(&stack, &j, "rollback", 103, |id| UndoPoint {
            reference: Some(format!("felhom-undo-{}", &id[..12])),
            ..undo_point(id, "rollback", 103, "snapshot")
        });
        (a, b, c)
    };
    give_tree_to_agent(&stack.state_dir);
    let agent = stack.start_agent();

    // The hub gets every kept point, the listed size filled in, and one undo_space error per
    // storage over the fraction (nas-backup by the recorded size, local by the listed one).
    let reports = stack
        .hub
        .wait_reports(T, |r| {
            r.iter().any(|x| {
                x["outcome"] == "accepted"
                    && x["report"]["ops"]["undo_points"]
                        .as_array()
                        .is_some_and(|a| a.len() == 3)
            })
        })
        .await;
    let report = reports
        .iter()
        .rev()
        .find(|x| {
            x["report"]["ops"]["undo_points"]
                .as_array()
                .is_some_and(|a| a.len() == 3)
        })
        .unwrap()["report"]
        .clone();
    hub_support::assert_valid_report(&report);
    let points = report["ops"]["undo_points"].as_array().unwrap();
    let ids: Vec<&str> = points
        .iter()
        .map(|p| p["op_id"].as_str().unwrap())
        .collect();
    assert!(
        [&backup_op, &listed_op, &snapshot_op]
            .iter()
            .all(|id| ids.contains(&id.as_str())),
        "{ids:?}"
    );
    let by_id = |id: &str| points.iter().find(|p| p["op_id"] == id).unwrap().clone();
    assert_eq!(
        by_id(&backup_op),
        json!({
            "op_id": backup_op, "vmid": 101, "kind": "backup",
            "ref": "nas-backup:backup/vzdump-lxc-101-2026_12_01-03_00_00.tar.zst",
            "storage": "nas-backup", "size_bytes": 900 * GIB,
            "created_at": by_id(&backup_op)["created_at"], "status": "kept"
        })
    );
    assert_eq!(by_id(&listed_op)["size_bytes"], local_size, "{report}");
    assert_eq!(by_id(&snapshot_op)["storage"], Value::Null);
    assert_eq!(
        undo_space_subjects(&report),
        ["local", "nas-backup"],
        "{}",
        report["errors"]
    );

    // `ops list`: every kept point with its kind, ref, storage, size and age.
    let (code, out, err) = stack.cli(&["ops", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("undo points kept: 3"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("  ") && l.contains(&backup_op))
        .unwrap_or_else(|| panic!("{backup_op} not listed:\n{out}"));
    for part in [
        "vmid 101",
        "backup",
        "nas-backup:backup/vzdump-lxc-101-2026_12_01-03_00_00.tar.zst on nas-backup",
        "900.0 GiB",
        "old",
        "made by rollback",
    ] {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
    let (points, ops_before) = listed(&stack);
    assert_eq!(points.len(), 3, "{points:?}");
    assert!(
        points
            .iter()
            .all(|p| p["status"] == "kept" && p["age_seconds"].as_u64().unwrap() >= 3000)
    );
    // `ops show`: the operation's undo point.
    let (code, out, err) = stack.cli(&["ops", "show", &snapshot_op, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["undo_point"]["kind"], "snapshot");
    assert_eq!(
        shown["undo_point"]["ref"],
        format!("felhom-undo-{}", &snapshot_op[..12])
    );
    assert_eq!(shown["undo_point"]["status"], "kept");

    // `status`: the count and the warnings.
    let (code, out, err) = stack.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("undo points kept: 3"), "{out}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.contains("warning: ")).collect();
    assert_eq!(warnings.len(), 2, "{out}");
    assert!(
        warnings.iter().any(|w| w.contains("storage nas-backup")),
        "{out}"
    );
    let (code, out, _) = stack.cli(&["status", "--json"]);
    assert_eq!(code, 0);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["ops"]["undo_points_kept"], 3, "{st}");

    // Invalid OP_IDs never reach the daemon.
    for bad in [
        "ABCDEF0123456789ABCDEF0123456789",
        "1234",
        "../../../../etc/passwd",
    ] {
        for verb in ["undo", "release"] {
            let (code, out, err) = stack.cli(&["ops", verb, bad]);
            assert_eq!(code, 2, "ops {verb} {bad}: {out}{err}");
            assert!(
                err.contains("op_id must be 32 lower-case hex characters"),
                "{err}"
            );
        }
    }

    // Neither root nor the agent: refused by the daemon, nothing queued or released.
    for verb in ["undo", "release"] {
        let (code, out, err) = cli_as(&stack, STRANGER_UID, &["ops", verb, &backup_op]);
        assert_eq!(code, 2, "ops {verb} as uid {STRANGER_UID}: {out}{err}");
        assert!(
            err.contains("only root or the agent's user") && err.contains("uid 4242"),
            "{err}"
        );
    }
    let (points_after, ops_after) = listed(&stack);
    assert_eq!(
        ops_after, ops_before,
        "a refused request queued an operation"
    );
    assert_eq!(points_after.len(), 3);
    // Root and the agent's user pass the check (what follows is the gate's).
    for uid in [0, AGENT_UID] {
        let (code, out, err) = cli_as(&stack, uid, &["ops", "undo", &snapshot_op, "--wait", "5"]);
        assert_ne!(code, 2, "ops undo as uid {uid}: {out}{err}");
        assert!(!err.contains("only root or the agent's user"), "{err}");
    }

    // The fraction comes from the config: raised (SIGHUP), the next report has no error.
    stack.patch_config(&json!({"gate": {"undo_warn_fraction": 0.3}}));
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log_count(&agent, "SIGHUP: configuration reloaded", 1, T).await;
    stack
        .hub
        .wait_reports(T, |r| {
            r.iter()
                .rev()
                .find(|x| x["outcome"] == "accepted")
                .is_some_and(|x| {
                    undo_space_subjects(&x["report"]).is_empty()
                        && x["report"]["ops"]["undo_points"].as_array().map(Vec::len) == Some(3)
                })
        })
        .await;

    // Daemon down: undo and release refuse cleanly (exit 3), change nothing; the listing
    // still works from the journal.
    assert_eq!(agent.term(T), Some(0));
    for verb in ["undo", "release"] {
        let (code, out, err) = stack.cli(&["ops", verb, &backup_op]);
        assert_eq!(code, 3, "ops {verb} without a daemon: {out}{err}");
        assert!(
            err.contains("no felhom-agent daemon is listening")
                && err.contains("nothing was changed"),
            "{err}"
        );
        let (code, out, _) = stack.cli(&["ops", verb, &backup_op, "--json"]);
        assert_eq!(code, 3);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["exit"], 3);
    }
    let (points_down, _) = listed(&stack);
    let kept: Vec<&str> = points_down
        .iter()
        .filter(|p| p["status"] == "kept")
        .filter_map(|p| p["op_id"].as_str())
        .collect();
    assert!(kept.contains(&backup_op.as_str()), "{points_down:?}");
    assert!(kept.contains(&listed_op.as_str()), "{points_down:?}");
    let j = Journal::open(&stack.state_dir).unwrap();
    assert_eq!(
        j.undo_point_get(&backup_op).unwrap().unwrap().status,
        "kept",
        "a refused release released it"
    );
}

/// A PVE API call as the test bed's full token; waits for the task it starts.
async fn pve_task(sim: &felhom_testbed::harness::PveSim, rel: &str, form: &[(&str, &str)]) {
    let resp = sim
        .client()
        .post(sim.api_url(rel))
        .header("Authorization", sim.auth_header())
        .form(form)
        .send()
        .await
        .expect("pvesim answers");
    assert!(resp.status().is_success(), "{rel}: {}", resp.status());
    let body: Value = resp.json().await.unwrap();
    let upid = body["data"].as_str().expect("a UPID").to_string();
    let st = sim.wait_task(&upid, T).await.expect("task ends");
    assert_eq!(st["exitstatus"], "OK", "{rel}: {st}");
}

async fn memory(sim: &felhom_testbed::harness::PveSim, vmid: u32) -> u64 {
    let v = sim.guest(vmid).await.unwrap()["config"]["memory"].clone();
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("memory of {vmid}: {v}"))
}

async fn snapshots(sim: &felhom_testbed::harness::PveSim, vmid: u32) -> Vec<String> {
    sim.comparable_guest(vmid).await.unwrap().snapshots
}

/// With the gate carrying operations out: a real gated rollback's undo snapshot is listed
/// exactly once; `ops undo` (the agent's user) brings back what the rollback discarded and
/// prints the decision; `ops release` (root) deletes the undo snapshot from the node; a
/// released point is neither listed nor released again, and can no longer be undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_rollback_is_undone_and_released_from_the_host() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 30}}));
    let sim = &stack.pve.pve;
    let vmid = 321;
    sim.set_guest(
        vmid,
        json!({"type": "lxc", "status": "stopped", "config": {
            "hostname": "ct321", "memory": "512", "cores": "1", "ostype": "debian",
            "arch": "amd64", "rootfs": "local-lvm:vm-321-disk-0,size=4G"}}),
    )
    .await
    .unwrap();
    pve_task(
        sim,
        &format!("/nodes/pve1/lxc/{vmid}/snapshot"),
        &[("snapname", "before")],
    )
    .await;
    sim.set_guest(vmid, json!({"config": {"memory": "640"}}))
        .await
        .unwrap();
    let agent = stack.start_agent();

    let p = stack
        .guest_op("rollback", "lxc", vmid)
        .params(json!({"snapshot": "before", "start": false}))
        .grant("reversible");
    let id = op_id_of(&p);
    let undo_name = format!("felhom-undo-{}", &id[..12]);
    stack.deliver(&stack.signed(&p)).await;
    let r = stack.final_result(&id, T).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert_eq!(memory(sim, vmid).await, 512);
    // Listed exactly once, as the gate made it.
    let (points, _) = listed(&stack);
    let mine: Vec<&Value> = points
        .iter()
        .filter(|p| p["op_id"] == id.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "{points:?}");
    assert_eq!(mine[0]["kind"], "snapshot");
    assert_eq!(mine[0]["ref"], undo_name.as_str());
    assert_eq!(mine[0]["op_kind"], "rollback");

    // `ops undo` as the agent's user: the memory the rollback discarded is back.
    let (code, out, err) = stack.cli(&["ops", "undo", &id, "--wait", "120"]);
    assert_eq!(code, 0, "{out}{err}\n{}", agent.log_text());
    assert!(
        out.starts_with(&format!("undo of {id}: applied (operation ")),
        "{out}"
    );
    assert!(out.contains("requested by local:"), "{out}");
    assert_eq!(memory(sim, vmid).await, 640);

    // `ops release` as root: the undo snapshot goes from the node, the point is released.
    let (code, out, err) = cli_as(&stack, 0, &["ops", "release", &id, "--json"]);
    assert_eq!(code, 0, "{out}{err}\n{}", agent.log_text());
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "applied", "{v}");
    assert_eq!(v["undo_point"]["status"], "released", "{v}");
    assert_eq!(v["undo_point"]["released_by"], "local:root", "{v}");
    assert_eq!(snapshots(sim, vmid).await, vec!["before".to_string()]);
    let (points, _) = listed(&stack);
    assert!(
        points.iter().all(|p| p["op_id"] != id.as_str()),
        "{points:?}"
    );
    let (code, out, _) = stack.cli(&["ops", "show", &id, "--json"]);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["undo_point"]["status"], "released");

    // Released: a second release is refused before it is queued, an undo is not_reversible.
    let (code, out, err) = stack.cli(&["ops", "release", &id]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("release not queued"), "{err}");
    let (code, out, err) = stack.cli(&["ops", "undo", &id, "--wait", "120"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("reason: not_reversible"), "{out}");
    assert_eq!(memory(sim, vmid).await, 640);
    drop(agent);
}
