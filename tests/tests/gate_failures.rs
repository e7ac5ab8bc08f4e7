//! The reversibility gate's kinds that have no undo of their own, failing: a signed
//! `delete_snapshot`, `undo` and `release_undo` whose PVE task fails midway (a pvesim
//! task fault) end `failed` with the task's error, leave the guest's state (config,
//! snapshots, existence, power state) as it was before the operation, and keep the undo
//! point they were about, so that the same operation sent again once the fault is gone
//! succeeds. Run by `felhom-agent run` (uid 65534) against `felhom-pvesim` and
//! `felhom-hubsim`, as `gate_flow`.
//!
//! Needs root (see `ops_support`).

mod gate_support;
mod hub_support;
mod ops_support;
mod proxmox_client_support;

use gate_support::*;
use ops_support::*;
use serde_json::{Value, json};

/// The undo points `ops list --json` shows as kept.
fn kept_points(stack: &Stack) -> Vec<Value> {
    let (code, out, err) = stack.cli(&["ops", "list", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["undo_points"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("ops list --json has no undo_points: {v}"))
}

/// The status `ops list --json` shows for `op_id`'s undo point (`None`: not listed).
fn listed_status(stack: &Stack, op_id: &str) -> Option<String> {
    let points = kept_points(stack);
    let of: Vec<&Value> = points.iter().filter(|p| p["op_id"] == op_id).collect();
    assert!(of.len() <= 1, "listed more than once: {points:?}");
    of.first()
        .map(|p| p["status"].as_str().unwrap_or("").to_string())
}

/// A container on `local-lvm` with a snapshot `before` and a memory changed since, and a
/// gated rollback to `before` (starting it) applied: its op id and undo snapshot's name.
async fn rolled_back(stack: &Stack, vmid: u32, agent_log: impl Fn() -> String) -> (String, String) {
    let sim = &stack.pve.pve;
    let p = stack.gated(
        "rollback",
        "lxc",
        vmid,
        json!({"snapshot": "before", "start": true}),
        "reversible",
    );
    let id = op_id_of(&p);
    let undo_name = format!("felhom-undo-{}", &id[..12]);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent_log());
    assert_eq!(
        r["result"]["undo"],
        json!({"kind": "snapshot", "ref": undo_name, "status": "kept"}),
        "{r}"
    );
    assert_eq!(memory(sim, vmid).await, 512);
    assert_eq!(status(sim, vmid).await, "running");
    (id, undo_name)
}

async fn guest_with_snapshot(stack: &Stack, vmid: u32) {
    let sim = &stack.pve.pve;
    lvm_ct(sim, vmid, "stopped").await;
    snapshot(sim, "lxc", vmid, "before").await;
    sim.set_guest(vmid, json!({"config": {"memory": "640"}}))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_snapshot_whose_task_fails_keeps_the_snapshot_and_changes_nothing() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 8}}));
    let sim = &stack.pve.pve;
    lvm_ct(sim, 401, "running").await;
    snapshot(sim, "lxc", 401, "old").await;
    let agent = stack.start_agent();

    let before = comparable_without(sim, 401, None).await;
    assert_eq!(before.snapshots, vec!["old".to_string()]);
    sim.add_task_fault("vzdelsnapshot", Some(401), Some("simulated delete fault"))
        .await
        .unwrap();
    let p = stack.gated(
        "delete_snapshot",
        "lxc",
        401,
        json!({"name": "old"}),
        "irreversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.cosigned(&p), &id).await;
    assert_eq!(r["state"], "failed", "{r}\n{}", agent.log_text());
    let msg = r["message"].as_str().unwrap_or_default();
    assert!(msg.contains("simulated delete fault"), "{r}");
    assert_eq!(
        comparable_without(sim, 401, None).await,
        before,
        "the snapshot is still there, nothing else changed"
    );

    // The fault is spent: the same deletion sent again removes it.
    let p = stack.gated(
        "delete_snapshot",
        "lxc",
        401,
        json!({"name": "old"}),
        "irreversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.cosigned(&p), &id).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    let after = comparable_without(sim, 401, None).await;
    assert!(after.snapshots.is_empty(), "{after:?}");
    assert_eq!(after.status, before.status);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_whose_rollback_fails_changes_nothing_and_keeps_the_undo_point() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 8}}));
    let sim = &stack.pve.pve;
    guest_with_snapshot(&stack, 411).await;
    let agent = stack.start_agent();
    let (first, undo_name) = rolled_back(&stack, 411, || agent.log_text()).await;

    // The undo's own rollback to the undo snapshot fails: failed, not applied; the guest
    // as just before the undo (undo snapshot included), the undo point still kept.
    let before_undo = comparable_without(sim, 411, None).await;
    assert!(
        before_undo.snapshots.contains(&undo_name),
        "{before_undo:?}"
    );
    sim.add_task_fault("vzrollback", Some(411), Some("simulated rollback fault"))
        .await
        .unwrap();
    let u = stack.gated("undo", "lxc", 411, json!({"op_id": first}), "reversible");
    let uid = op_id_of(&u);
    let r = stack.run_op(&stack.signed(&u), &uid).await;
    assert_eq!(r["state"], "failed", "{r}\n{}", agent.log_text());
    let msg = r["message"].as_str().unwrap_or_default();
    assert!(msg.contains("simulated rollback fault"), "{r}");
    assert_eq!(r["result"]["undone_op_id"], json!(first), "{r}");
    assert_eq!(r["result"]["undo"]["status"], "kept", "{r}");
    assert_eq!(comparable_without(sim, 411, None).await, before_undo);
    assert_eq!(listed_status(&stack, &first).as_deref(), Some("kept"));

    // The fault cleared, a second undo of the same operation succeeds.
    sim.clear_task_faults().await.unwrap();
    let u = stack.gated("undo", "lxc", 411, json!({"op_id": first}), "reversible");
    let uid = op_id_of(&u);
    let r = stack.run_op(&stack.signed(&u), &uid).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert_eq!(memory(sim, 411).await, 640);
    assert_eq!(
        status(sim, 411).await,
        "stopped",
        "the power state from before"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_undo_whose_deletion_fails_keeps_the_undo_point_and_a_second_one_releases() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 8}}));
    let sim = &stack.pve.pve;
    guest_with_snapshot(&stack, 421).await;
    let agent = stack.start_agent();
    let (first, undo_name) = rolled_back(&stack, 421, || agent.log_text()).await;
    assert_eq!(listed_status(&stack, &first).as_deref(), Some("kept"));

    let before = comparable_without(sim, 421, None).await;
    sim.add_task_fault("vzdelsnapshot", Some(421), Some("simulated delete fault"))
        .await
        .unwrap();
    let rel = stack.gated(
        "release_undo",
        "lxc",
        421,
        json!({"op_id": first}),
        "irreversible",
    );
    let rid = op_id_of(&rel);
    let r = stack.run_op(&stack.cosigned(&rel), &rid).await;
    assert_eq!(r["state"], "failed", "{r}\n{}", agent.log_text());
    let msg = r["message"].as_str().unwrap_or_default();
    assert!(msg.contains("simulated delete fault"), "{r}");
    assert_ne!(r["result"]["undo"]["status"], "released", "{r}");
    let now = comparable_without(sim, 421, None).await;
    assert!(now.snapshots.contains(&undo_name), "{now:?}");
    assert_eq!(now, before, "nothing changed");
    assert_eq!(listed_status(&stack, &first).as_deref(), Some("kept"));

    // The fault cleared, a second release removes the snapshot and the point.
    sim.clear_task_faults().await.unwrap();
    let rel = stack.gated(
        "release_undo",
        "lxc",
        421,
        json!({"op_id": first}),
        "irreversible",
    );
    let rid = op_id_of(&rel);
    let r = stack.run_op(&stack.cosigned(&rel), &rid).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert_eq!(r["result"]["undo"]["status"], "released", "{r}");
    let after = comparable_without(sim, 421, None).await;
    assert_eq!(after.snapshots, vec!["before".to_string()], "{after:?}");
    assert_eq!(listed_status(&stack, &first), None, "released: not listed");
    drop(agent);
}
