//! Crash safety of the reversibility gate over real processes: gated `rollback`s (undo
//! point: a snapshot) and force-`restore`s (undo point: a backup) flow from
//! `felhom-hubsim` to `felhom-agent run`, which is killed with SIGKILL at seeded-random
//! moments (so at every step boundary: the decision, the undo point's task, the action's
//! task, the health check) and restarted, at least 40 times, then left to finish.
//! Afterwards:
//! - every operation has its final result at the hub, with its undo point: `applied`,
//!   except the first rollback of one guest, whose rollback task is made to fail
//!   (pvesim task fault): `rolled_back`, through one rollback to its undo snapshot;
//! - `felhom-pvesim`'s request log shows each step's request exactly once per operation:
//!   one undo snapshot (named after the operation) and one rollback per rollback, one
//!   vzdump and one restore per force-restore, and nothing else;
//! - every undo point exists on the node exactly once (the snapshot in the guest's list,
//!   the archive on `nas-backup`) and the agent lists each once (`ops list --json`).
//!
//! The kill moments come from a seeded RNG; the seed is printed (set
//! `FELHOM_GATE_CRASH_SEED=N` to replay one). Needs root (see `ops_support`).

mod gate_support;
mod hub_support;
mod ops_support;
mod proxmox_client_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gate_support::*;
use ops_support::*;
use serde_json::{Value, json};

/// Kill -9 rounds while operations flow.
const ROUNDS: usize = 40;
/// Operations per guest.
const PER_GUEST: usize = 4;
/// How long a pvesim task runs: long enough that kills land while tasks run.
const TASK_SECONDS: f64 = 0.5;

const ROLLBACK_GUESTS: [u32; 3] = [361, 362, 363];
const RESTORE_GUESTS: [u32; 3] = [371, 372, 373];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_every_step_of_gated_operations_repeats_no_step_and_loses_no_undo_point() {
    needs_root!();
    let seed = std::env::var("FELHOM_GATE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("gate_crash: seed {seed} (FELHOM_GATE_CRASH_SEED={seed} replays it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let t0 = Instant::now();

    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 30}}));
    let sim = &stack.pve.pve;
    for vmid in ROLLBACK_GUESTS {
        lvm_ct(sim, vmid, "stopped").await;
        snapshot(sim, "lxc", vmid, "before").await;
    }
    lvm_ct(sim, 360, "stopped").await;
    let archive = backup(sim, 360).await;
    for vmid in RESTORE_GUESTS {
        lvm_ct(sim, vmid, "stopped").await;
    }
    stack
        .pve
        .settings(Some(TASK_SECONDS), None)
        .await
        .expect("PUT /_sim/settings");
    // The first rollback of this guest fails in its task: undone.
    let faulted = ROLLBACK_GUESTS[2];
    sim.add_task_fault("vzrollback", Some(faulted), None)
        .await
        .expect("task fault");
    stack.pve.clear_log().await;

    // (op_id, vmid, kind, envelope), guests interleaved round-robin.
    let mut planned: Vec<(String, u32, &str, String)> = Vec::new();
    for _ in 0..PER_GUEST {
        for vmid in ROLLBACK_GUESTS {
            let p = stack.gated(
                "rollback",
                "lxc",
                vmid,
                json!({"snapshot": "before"}),
                "reversible",
            );
            planned.push((op_id_of(&p), vmid, "rollback", stack.signed(&p).text()));
        }
        for vmid in RESTORE_GUESTS {
            let p = stack.gated(
                "restore",
                "lxc",
                vmid,
                json!({"archive": archive, "storage": "local-lvm", "force": true}),
                "reversible",
            );
            planned.push((op_id_of(&p), vmid, "restore", stack.signed(&p).text()));
        }
    }
    // One operation per round at first, so kills keep landing inside operations.
    let per_round = planned.len().div_ceil(ROUNDS * 3 / 4);
    let mut next = 0;
    let mut during_task = 0;
    let mut during_op = 0;
    for round in 0..ROUNDS {
        let agent = stack.start_agent();
        let base = stack.ops.result_list(0).await.expect("results").len();
        for _ in 0..per_round {
            let Some((_, _, _, text)) = planned.get(next) else {
                break;
            };
            stack.deliver_text(text).await;
            next += 1;
        }
        // Kill once this incarnation answered something (or nothing is left to do), then
        // at a seeded moment.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let list = stack.ops.result_list(0).await.expect("results");
            let all_final = planned.iter().take(next).all(|(id, ..)| {
                list.iter().any(|r| {
                    r["result"]["op_id"].as_str() == Some(id.as_str())
                        && r["result"]["state"] != "held"
                })
            });
            if list.len() > base || all_final {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round} (seed {seed}): no progress\n{}",
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..1000))).await;
        agent.kill9();
        let list = stack.ops.result_list(0).await.expect("results");
        if planned.iter().take(next).any(|(id, ..)| {
            !list.iter().any(|r| {
                r["result"]["op_id"].as_str() == Some(id.as_str()) && r["result"]["state"] != "held"
            })
        }) {
            during_op += 1;
        }
        let running = stack.pve.state_json().await["tasks"]
            .as_array()
            .map(|t| t.iter().filter(|t| t["status"] == "running").count())
            .unwrap_or(0);
        if running > 0 {
            during_task += 1;
        }
    }
    assert_eq!(next, planned.len(), "every operation was enqueued");
    eprintln!(
        "{ROUNDS} kills ({during_op} while an operation was unfinished, {during_task} while a pvesim task ran) in {:?}",
        t0.elapsed()
    );
    assert!(
        during_op >= ROUNDS / 2,
        "only {during_op} kills landed inside an operation (seed {seed})"
    );

    let agent = stack.start_agent();
    let mut finals: BTreeMap<String, Value> = BTreeMap::new();
    for (id, ..) in &planned {
        finals.insert(
            id.clone(),
            stack.final_result(id, Duration::from_secs(300)).await,
        );
    }
    let first_faulted = planned
        .iter()
        .find(|(_, v, ..)| *v == faulted)
        .map(|(id, ..)| id.clone())
        .expect("a rollback of the faulted guest");
    for (id, vmid, kind, _) in &planned {
        let r = &finals[id];
        let want = if *id == first_faulted {
            "rolled_back"
        } else {
            "applied"
        };
        assert_eq!(
            r["state"],
            want,
            "{kind} on {vmid} (seed {seed}): {r}\n{}",
            agent.log_text()
        );
        let undo = &r["result"]["undo"];
        assert_eq!(undo["status"], "kept", "{r}");
        match *kind {
            "rollback" => assert_eq!(
                undo["ref"],
                json!(format!("felhom-undo-{}", &id[..12])),
                "{r}"
            ),
            _ => assert_eq!(undo["kind"], "backup", "{r}"),
        }
    }

    // Each step's request exactly once per operation, and nothing else.
    let mut seen: BTreeMap<(u32, String), usize> = BTreeMap::new();
    for m in stack.mutations().await {
        let parts: Vec<&str> = m.path.split('/').collect();
        let (vmid, what) = if parts.get(5) == Some(&"vzdump") {
            (
                m.params
                    .get("vmid")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                "vzdump".to_string(),
            )
        } else if parts.len() == 6 && parts[5] == "lxc" && m.method == "POST" {
            (
                m.params
                    .get("vmid")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                "restore".to_string(),
            )
        } else {
            let vmid = parts.get(6).and_then(|v| v.parse().ok()).unwrap_or(0);
            let rest = parts.get(7..).map(|p| p.join("/")).unwrap_or_default();
            let what = match (m.method.as_str(), rest.as_str()) {
                ("POST", "snapshot") => format!(
                    "snapshot {}",
                    m.params.get("snapname").cloned().unwrap_or_default()
                ),
                ("POST", "snapshot/before/rollback") => "rollback".to_string(),
                _ => format!("{} {}", m.method, m.path),
            };
            (vmid, what)
        };
        *seen.entry((vmid, what)).or_default() += 1;
    }
    let mut want: BTreeMap<(u32, String), usize> = BTreeMap::new();
    for (id, vmid, kind, _) in &planned {
        if *kind == "rollback" {
            *want
                .entry((*vmid, format!("snapshot felhom-undo-{}", &id[..12])))
                .or_default() += 1;
            *want.entry((*vmid, "rollback".into())).or_default() += 1;
            if *id == first_faulted {
                let back = format!(
                    "POST /api2/json/nodes/pve1/lxc/{vmid}/snapshot/felhom-undo-{}/rollback",
                    &id[..12]
                );
                *want.entry((*vmid, back)).or_default() += 1;
            }
        } else {
            *want.entry((*vmid, "vzdump".into())).or_default() += 1;
            *want.entry((*vmid, "restore".into())).or_default() += 1;
        }
    }
    assert_eq!(seen, want, "requests per guest (seed {seed})");

    // Every undo point on the node exactly once.
    for vmid in ROLLBACK_GUESTS {
        let mut names = comparable_without(sim, vmid, None).await.snapshots;
        names.retain(|n| n != "before");
        let mut expect: Vec<String> = planned
            .iter()
            .filter(|(_, v, ..)| *v == vmid)
            .map(|(id, ..)| format!("felhom-undo-{}", &id[..12]))
            .collect();
        expect.sort();
        assert_eq!(names, expect, "undo snapshots of {vmid}");
    }
    for vmid in RESTORE_GUESTS {
        let listed: Vec<String> = backups(sim, vmid)
            .await
            .iter()
            .map(|b| b["volid"].as_str().unwrap_or("").to_string())
            .collect();
        let mut refs: Vec<String> = planned
            .iter()
            .filter(|(_, v, ..)| *v == vmid)
            .map(|(id, ..)| {
                finals[id]["result"]["undo"]["ref"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        refs.sort();
        let mut l = listed.clone();
        l.sort();
        assert_eq!(l, refs, "undo backups of {vmid}");
    }
    // ... and listed by the agent once each.
    let (code, out, err) = stack.cli(&["ops", "list", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let points = v["undo_points"]
        .as_array()
        .unwrap_or_else(|| panic!("ops list --json has no undo_points: {v}"));
    for (id, ..) in &planned {
        let n = points.iter().filter(|p| p["op_id"] == id.as_str()).count();
        assert_eq!(n, 1, "undo point of {id} listed {n} times: {v}");
    }
    drop(agent);
}
