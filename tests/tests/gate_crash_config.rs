//! Crash safety of a gated `set_config` at each of its step boundaries, over real
//! processes: `felhom-hubsim` delivers the operation to `felhom-agent run`, `felhom-pvesim`
//! holds every request to the guest (a latency fault on its path), and the agent is killed
//! with SIGKILL the moment a chosen request of the operation arrives, so the kill lands
//! while that request is in flight, after every step before it was committed. Then the
//! agent is restarted and the operation finishes. One guest per kill point:
//! - a change that works (the guest stays running), killed at its config read in the
//!   precheck (before the intent), at the write (after the one commit of the decision,
//!   undo point and action slot), at the config read after the write (the write done,
//!   nothing of it committed), at the health check's status read: `applied`, the signed
//!   value in the config, and exactly one config write with effect (answered 200);
//! - a change that stops the guest (health check fails, the previous values are written
//!   back and the guest started), killed at the same points and at the undo's config read,
//!   its write back and its start: `rolled_back`, the guest's state as before, exactly one
//!   change and one write back with effect (the previous value, once), one start;
//! - the write held and killed, then someone else edits the config before the restart:
//!   `failed`, undo `not_possible`, the edit not written over.
//!
//! Needs root (see `ops_support`).

mod gate_support;
mod hub_support;
mod ops_support;
mod proxmox_client_support;

use std::time::{Duration, Instant};

use felhom_testbed::harness::{Fault, LoggedRequest};
use gate_support::*;
use ops_support::*;
use serde_json::{Value, json};

/// How long pvesim holds each request to the guest under test: long enough that the
/// test sees the request arrive and kills the agent before it is answered.
const HOLD_MS: u64 = 1500;

/// A kill point: the `nth` (from 1) request of the operation to the guest whose method is
/// `method` and whose path ends with `suffix`.
#[derive(Debug, Clone, Copy)]
struct KillAt {
    method: &'static str,
    suffix: &'static str,
    nth: usize,
}

const fn at(method: &'static str, suffix: &'static str, nth: usize) -> KillAt {
    KillAt {
        method,
        suffix,
        nth,
    }
}

fn guest_requests(log: &[LoggedRequest], vmid: u32, since: u64) -> Vec<LoggedRequest> {
    let prefix = format!("/api2/json/nodes/pve1/lxc/{vmid}/");
    log.iter()
        .filter(|r| r.seq > since && r.path.starts_with(&prefix))
        .cloned()
        .collect()
}

fn count(reqs: &[LoggedRequest], method: &str, suffix: &str) -> usize {
    reqs.iter()
        .filter(|r| r.method == method && r.path.ends_with(suffix))
        .count()
}

/// Writes of the guest's config answered 200 (with effect), as their params.
fn config_writes(reqs: &[LoggedRequest]) -> Vec<std::collections::BTreeMap<String, String>> {
    reqs.iter()
        .filter(|r| r.method == "PUT" && r.path.ends_with("/config") && r.status == Some(200))
        .map(|r| r.params.clone())
        .collect()
}

/// Runs one `set_config` of `memory` on `vmid`, killing the agent at `kill`, then lets
/// a restarted agent finish it. `between` runs after the kill, before the restart.
/// Returns the final result and the guest's requests during the operation.
async fn crash_once(
    stack: &Stack,
    vmid: u32,
    memory: u64,
    kill: KillAt,
    between: Option<Value>,
) -> (Value, Vec<LoggedRequest>) {
    let sim = &stack.pve.pve;
    // The agent up and its first report sent (its reads of the guests done), so the
    // requests counted below are the operation's.
    let reports = stack.accepted_reports().await;
    let agent = stack.start_agent();
    stack
        .wait_accepted_reports(reports, 1, Duration::from_secs(60))
        .await;
    let since = stack.pve.log().await.last().map_or(0, |r| r.seq);
    sim.add_fault(&Fault::latency(
        &format!("/nodes/pve1/lxc/{vmid}/*"),
        HOLD_MS,
    ))
    .await
    .expect("latency fault");
    let p = stack.gated(
        "set_config",
        "lxc",
        vmid,
        json!({"config": {"memory": memory}}),
        "reversible",
    );
    let id = op_id_of(&p);
    stack.deliver(&stack.signed(&p)).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reqs = guest_requests(&stack.pve.log().await, vmid, since);
        if count(&reqs, kill.method, kill.suffix) >= kill.nth {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{kill:?} on {vmid} never came; requests {:?}\n{}",
            reqs.iter()
                .map(|r| format!("{} {}", r.method, r.path))
                .collect::<Vec<_>>(),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.kill9();
    if let Some(patch) = between {
        // Let a held request that outlived the agent be answered (or dropped) first.
        tokio::time::sleep(Duration::from_millis(HOLD_MS + 200)).await;
        sim.set_guest(vmid, patch).await.expect("edit the guest");
    }
    sim.clear_faults().await.expect("clear the fault");
    let agent = stack.start_agent();
    let r = stack.final_result(&id, Duration::from_secs(120)).await;
    let reqs = guest_requests(&stack.pve.log().await, vmid, since);
    eprintln!(
        "{vmid}, killed at {kill:?}: {} {:?}",
        r["state"],
        reqs.iter()
            .map(|r| format!("{} {} {:?}", r.method, r.path, r.status))
            .collect::<Vec<_>>()
    );
    drop(agent);
    (r, reqs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_each_step_of_a_set_config_writes_once_and_undoes_once() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 4}}));
    let sim = &stack.pve.pve;

    // A change that works.
    let ok_points = [
        at("GET", "/config", 1),
        at("PUT", "/config", 1),
        at("GET", "/config", 2),
        at("GET", "/status/current", 1),
    ];
    for (i, kill) in ok_points.into_iter().enumerate() {
        let vmid = 381 + i as u32;
        lvm_ct(sim, vmid, "running").await;
        let (r, reqs) = crash_once(&stack, vmid, 1024, kill, None).await;
        assert_eq!(r["state"], "applied", "{kill:?}: {r}");
        assert_eq!(
            r["result"]["undo"],
            json!({"kind": "previous_values", "ref": null, "status": "kept"}),
            "{kill:?}: {r}"
        );
        assert_eq!(memory(sim, vmid).await, 1024, "{kill:?}");
        assert_eq!(status(sim, vmid).await, "running", "{kill:?}");
        let writes = config_writes(&reqs);
        assert_eq!(
            writes.len(),
            1,
            "{kill:?}: one write with effect: {writes:?}"
        );
        assert_eq!(writes[0].get("memory").map(String::as_str), Some("1024"));
    }

    // A change that stops the guest: undone, exactly once.
    let undo_points = [
        at("PUT", "/config", 1),
        at("GET", "/config", 2),
        at("GET", "/status/current", 1),
        at("GET", "/config", 3),
        at("PUT", "/config", 2),
        at("POST", "/status/start", 1),
    ];
    for (i, kill) in undo_points.into_iter().enumerate() {
        let vmid = 391 + i as u32;
        lvm_ct(sim, vmid, "running").await;
        sim.set_guest(vmid, json!({"stops_after_config_change": true}))
            .await
            .unwrap();
        let before = comparable_without(sim, vmid, None).await;
        let (r, reqs) = crash_once(&stack, vmid, 2048, kill, None).await;
        assert_eq!(r["state"], "rolled_back", "{kill:?}: {r}");
        assert_eq!(r["result"]["undo"]["status"], "kept", "{kill:?}: {r}");
        let after = comparable_without(sim, vmid, None).await;
        assert_eq!(after, before, "{kill:?}: the guest as before");
        let writes = config_writes(&reqs);
        let values: Vec<Option<&str>> = writes
            .iter()
            .map(|w| w.get("memory").map(String::as_str))
            .collect();
        assert_eq!(
            values,
            [Some("2048"), Some("512")],
            "{kill:?}: the change once, the previous value written back once"
        );
        let starts = reqs
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/status/start"))
            .filter(|r| r.status == Some(200))
            .count();
        assert_eq!(starts, 1, "{kill:?}: one start");
    }

    // Killed with the write in flight; someone else edits the config meanwhile.
    let vmid = 399;
    lvm_ct(sim, vmid, "running").await;
    let (r, reqs) = crash_once(
        &stack,
        vmid,
        1024,
        at("PUT", "/config", 1),
        Some(json!({"config": {"memory": "999"}})),
    )
    .await;
    assert_eq!(r["state"], "failed", "{r}");
    assert_eq!(r["result"]["undo"]["status"], "not_possible", "{r}");
    assert_eq!(memory(sim, vmid).await, 999, "the edit is not written over");
    assert!(
        config_writes(&reqs).len() <= 1,
        "no write after the edit: {:?}",
        config_writes(&reqs)
    );
}
