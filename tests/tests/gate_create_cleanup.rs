//! A signed `create_container` whose pct helper call fails after a container appeared on
//! its vmid (issue 13: "a container that a failed create_container left half-made is
//! destroyed through the API (purge)"): the container the operation described is destroyed
//! through the API with `purge`, and one that someone else put there meanwhile (another
//! hostname) is left alone.
//!
//! The pct helper is a Unix socket at the agent's `privhelper-pct.sock` that accepts and
//! never answers, so the agent's call fails with its timeout; while the call hangs, the
//! test puts the container on the vmid in `felhom-pvesim` (as a `pct create` that got as
//! far as writing the config would). Run by `felhom-agent run` (uid 65534) against
//! `felhom-pvesim` and `felhom-hubsim`, as `gate_flow`. Needs root (see `ops_support`).

mod gate_support;
mod hub_support;
mod ops_support;
mod proxmox_client_support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;

use gate_support::*;
use ops_support::*;
use serde_json::{Value, json};

fn spec(vmid: u32) -> Value {
    json!({
        "vmid": vmid,
        "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
        "hostname": "web1", "memory_mib": 1024, "swap_mib": 512, "cores": 2,
        "rootfs": {"storage": "local-lvm", "size_gib": 8},
        "net": {"bridge": "vmbr0", "ip": "dhcp", "gw": null},
        "nesting": true, "ssh_public_keys": [], "start": false, "onboot": false
    })
}

/// A pct helper that accepts every connection and never answers; each accept is sent on
/// the returned channel. The connections are held until the test ends.
fn silent_pct_helper(stack: &Stack) -> tokio::sync::mpsc::UnboundedReceiver<()> {
    let dir = stack.dir.path().join("run").join("privhelper");
    std::fs::create_dir_all(&dir).expect("privhelper socket dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = dir.join("privhelper-pct.sock");
    let listener = UnixListener::bind(&path).expect("bind the pct socket");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(c) = conn else { break };
            held.push(c);
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Sends a signed `create_container` of `vmid`; when the helper call has begun, puts a
/// stopped container with `hostname` and the spec's sizes there; returns the result.
async fn create_while_a_container_appears(
    stack: &Stack,
    accepted: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
    vmid: u32,
    hostname: &str,
) -> Value {
    let p = stack
        .guest_op("create_container", "lxc", vmid)
        .params(spec(vmid));
    let id = op_id_of(&p);
    let env = stack.signed(&p);
    let appear = async {
        accepted
            .recv()
            .await
            .expect("the agent calls the pct helper");
        make_guest(
            &stack.pve.pve,
            vmid,
            "lxc",
            json!({
                "hostname": hostname, "memory": "1024", "swap": "512", "cores": "2",
                "rootfs": format!("local-lvm:vm-{vmid}-disk-0,size=8G"),
                "ostype": "debian"
            }),
            "stopped",
        )
        .await;
    };
    let (r, ()) = tokio::join!(stack.run_op(&env, &id), appear);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_container_destroys_only_the_container_it_described() {
    needs_root!();
    let stack = Stack::new(json!({"privhelper": {"timeout_seconds": 3}}));
    let mut accepted = silent_pct_helper(&stack);
    let agent = stack.start_agent();
    let sim = &stack.pve.pve;

    // The container the operation described: destroyed through the API, with purge.
    let r = create_while_a_container_appears(&stack, &mut accepted, 420, "web1").await;
    assert_eq!(r["state"], "failed", "{r}\n{}", agent.log_text());
    let msg = r["message"].as_str().unwrap_or("");
    assert!(msg.contains("pct helper"), "{r}");
    assert!(msg.contains("the half-made container was destroyed"), "{r}");
    assert!(
        !sim.comparable_guest(420).await.unwrap().exists,
        "420 is gone"
    );
    let deletes: Vec<String> = stack
        .mutations()
        .await
        .iter()
        .filter(|m| m.method == "DELETE" && m.path.contains("/lxc/420"))
        .map(|m| m.path.clone())
        .collect();
    assert_eq!(deletes.len(), 1, "one destroy of 420: {deletes:?}");

    // A container someone else put on the vmid meanwhile: left alone.
    let r = create_while_a_container_appears(&stack, &mut accepted, 421, "someone-else").await;
    assert_eq!(r["state"], "failed", "{r}");
    assert!(
        r["message"].as_str().unwrap_or("").contains("left alone"),
        "{r}"
    );
    let other = sim.comparable_guest(421).await.unwrap();
    assert!(other.exists, "421 is still there");
    assert_eq!(other.config["hostname"], "someone-else");
    assert!(
        !stack
            .mutations()
            .await
            .iter()
            .any(|m| m.method == "DELETE" && m.path.contains("/lxc/421")),
        "nothing deleted 421"
    );
    drop(agent);
}
