//! Signed operations end to end over real processes: the hub (`felhom-hubsim`) relays
//! envelopes signed by the test bed's operator keys, the agent (`felhom-agent run` as uid
//! 65534, a root-owned `signers.json`) verifies, records and runs them against
//! `felhom-pvesim`, and answers each with results the hub records.
//!
//! Needs root (see `ops_support`).

mod hub_support;
mod ops_support;
mod proxmox_client_support;

use std::time::Duration;

use ops_support::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

fn mutation_paths(m: &[felhom_testbed::harness::LoggedRequest]) -> Vec<String> {
    m.iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_stop_is_held_then_applied_and_the_hub_learns_both() {
    needs_root!();
    let stack = Stack::new(json!({}));
    let vmid = stack.pve.plain_guest("lxc", "running").await as u32;
    let agent = stack.start_agent();
    let payload = stack
        .guest_op("stop", "lxc", vmid)
        .params(json!({"timeout_seconds": 5}))
        .reason("kernel update");
    let op_id = op_id_of(&payload);
    let delivery = stack.deliver(&stack.signed(&payload)).await;
    let done = stack.final_result(&op_id, T).await;
    assert_eq!(done["state"], "applied", "{done}\n{}", agent.log_text());
    assert_eq!(done["signers"], json!(["alice"]));
    assert_eq!(done["payload_sha256"], payload.sha256_hex());
    assert!(!done["upids"].as_array().unwrap().is_empty(), "{done}");
    let all = stack.results_for(&op_id).await;
    let states: Vec<&str> = all.iter().filter_map(|r| r["state"].as_str()).collect();
    assert_eq!(states, ["held", "applied"], "{all:?}");
    assert!(
        all.iter()
            .all(|r| r["delivery_id"] == Value::String(delivery.clone()))
    );
    let g = stack.pve.guest(vmid).await.unwrap();
    assert_eq!(g["status"], "stopped", "{g}");
    let paths = mutation_paths(&stack.mutations().await);
    assert_eq!(
        paths
            .iter()
            .filter(|p| p.ends_with("/status/shutdown"))
            .count(),
        1,
        "{paths:?}"
    );
    // `ops list` shows it with its decision
    let (code, out, err) = stack.cli(&["ops", "list", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ops"][0]["op_id"], op_id.as_str(), "{v}");
    assert_eq!(v["ops"][0]["state"], "applied", "{v}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_on_the_restore_tests_scratch_range_is_refused_invalid_params() {
    needs_root!();
    let stack = Stack::new(json!({"restore_tests": {"scratch_vmids": "9900-9909"}}));
    let agent = stack.start_agent();
    let payload = stack.guest_op("start", "lxc", 9901);
    let op_id = op_id_of(&payload);
    stack.deliver(&stack.signed(&payload)).await;
    let done = stack.final_result(&op_id, T).await;
    assert_eq!(done["state"], "refused", "{done}\n{}", agent.log_text());
    assert_eq!(done["reason"], "invalid_params", "{done}");
    assert!(
        done["message"].as_str().unwrap().contains("scratch range"),
        "{done}"
    );
    assert!(stack.mutations().await.is_empty());
    // the same check offline: `ops verify` uses the configured range too
    let file = stack.dir.path().join("scratch-op.json");
    std::fs::write(&file, stack.signed(&payload).text()).unwrap();
    let (code, out, err) = stack.cli(&["ops", "verify", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("invalid_params") || err.contains("invalid_params"),
        "{out}{err}"
    );
}
