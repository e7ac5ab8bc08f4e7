//! Shared by the `gate_*` tests: guests laid out on chosen storages in pvesim, direct PVE
//! calls for the setup (snapshots, backups), gated payloads and the comparison of a
//! guest's state "modulo the undo point".
#![allow(dead_code)] // each test file uses a different part

use std::time::Duration;

use felhom_testbed::harness::{GuestComparable, PveSim};
use felhom_testbed::signing::{Envelope, Payload};
use serde_json::{Value, json};

use crate::ops_support::Stack;

pub const T: Duration = Duration::from_secs(90);

/// A guest made through the control API: `kind`, `config`, `status`.
pub async fn make_guest(sim: &PveSim, vmid: u32, kind: &str, config: Value, status: &str) {
    sim.set_guest(
        vmid,
        json!({"type": kind, "config": config, "status": status}),
    )
    .await
    .expect("make a guest");
}

/// An LXC container on `local-lvm` (snapshots possible).
pub async fn lvm_ct(sim: &PveSim, vmid: u32, status: &str) {
    make_guest(
        sim,
        vmid,
        "lxc",
        json!({
            "hostname": format!("ct{vmid}"),
            "memory": "512",
            "cores": "1",
            "ostype": "debian",
            "arch": "amd64",
            "rootfs": format!("local-lvm:vm-{vmid}-disk-0,size=4G"),
        }),
        status,
    )
    .await;
}

/// A PVE API call as the test bed's token; the answer's `data`.
pub async fn pve(sim: &PveSim, method: &str, rel: &str, form: &[(&str, &str)]) -> Value {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let req = sim
        .client()
        .request(m, sim.api_url(rel))
        .header("Authorization", sim.auth_header());
    let req = if method == "GET" || method == "DELETE" {
        req.query(form)
    } else {
        req.form(form)
    };
    let resp = req.send().await.expect("pvesim answers");
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{method} {rel}: {status} {body}");
    body["data"].clone()
}

/// A PVE task call, waited on.
pub async fn pve_task(sim: &PveSim, method: &str, rel: &str, form: &[(&str, &str)]) {
    let upid = pve(sim, method, rel, form).await;
    let upid = upid
        .as_str()
        .unwrap_or_else(|| panic!("{rel}: no UPID: {upid}"));
    let st = sim.wait_task(upid, T).await.expect("task ends");
    assert_eq!(st["exitstatus"], "OK", "{rel}: {st}");
}

pub async fn snapshot(sim: &PveSim, kind: &str, vmid: u32, name: &str) {
    pve_task(
        sim,
        "POST",
        &format!("/nodes/pve1/{kind}/{vmid}/snapshot"),
        &[("snapname", name)],
    )
    .await;
}

/// A backup of `vmid` on `nas-backup`; its volid.
pub async fn backup(sim: &PveSim, vmid: u32) -> String {
    let v = vmid.to_string();
    pve_task(
        sim,
        "POST",
        "/nodes/pve1/vzdump",
        &[("vmid", v.as_str()), ("storage", "nas-backup")],
    )
    .await;
    let list = backups(sim, vmid).await;
    list.last().expect("a backup")["volid"]
        .as_str()
        .unwrap()
        .to_string()
}

pub async fn backups(sim: &PveSim, vmid: u32) -> Vec<Value> {
    let mut l = pve(
        sim,
        "GET",
        "/nodes/pve1/storage/nas-backup/content",
        &[("content", "backup"), ("vmid", &vmid.to_string())],
    )
    .await
    .as_array()
    .cloned()
    .unwrap_or_default();
    l.sort_by_key(|b| b["ctime"].as_i64());
    l
}

/// The guest's comparable state with the undo snapshot `undo` (if any) taken out: its
/// name from the snapshot list, and `parent` when it names it.
pub async fn comparable_without(sim: &PveSim, vmid: u32, undo: Option<&str>) -> GuestComparable {
    let mut c = sim.comparable_guest(vmid).await.expect("comparable state");
    if let Some(u) = undo {
        c.snapshots.retain(|s| s != u);
    }
    c.config.remove("parent");
    c
}

pub async fn status(sim: &PveSim, vmid: u32) -> String {
    sim.guest(vmid).await.unwrap()["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// The guest's `memory` (PVE gives it as a number, the control API as written).
pub async fn memory(sim: &PveSim, vmid: u32) -> u64 {
    let v = config(sim, vmid).await["memory"].clone();
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("memory of {vmid}: {v}"))
}

pub async fn config(sim: &PveSim, vmid: u32) -> Value {
    sim.guest(vmid).await.unwrap()["config"].clone()
}

impl Stack {
    /// A gated payload on `vmid` with `params`, granted `grant`.
    pub fn gated(&self, kind: &str, gtype: &str, vmid: u32, params: Value, grant: &str) -> Payload {
        self.guest_op(kind, gtype, vmid)
            .params(params)
            .set("grant", grant)
    }

    /// Signed by alice and bob (the irreversible threshold).
    pub fn cosigned(&self, p: &Payload) -> Envelope {
        p.sign(&[&self.keys.alice, &self.keys.bob])
    }

    /// Delivers and waits for the final result.
    pub async fn run_op(&self, env: &Envelope, op_id: &str) -> Value {
        self.deliver(env).await;
        self.final_result(op_id, T).await
    }
}
