//! The whole chain with the real root helper: `felhom-agent run` reads SMART through
//! `felhom-privhelper --class smart` (fake smartctl serving the real captures), reports to
//! `felhom-hubsim` with Proxmox from `felhom-pvesim`, and forwards the helper's own audit
//! records verbatim. Needs root (it starts the root helper).

mod hub_support;

use std::collections::BTreeMap;
use std::time::Duration;

use felhom_protocol::Class;
use felhom_testbed::harness::PveSim;
use felhom_testbed::privhelper::{Bed, BedOptions, FakeBins, is_root};
use hub_support::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_through_the_helper_and_its_audit_records_reach_the_hub() {
    if !is_root() {
        eprintln!("SKIP: this test needs root (it starts the root helper)");
        return;
    }
    let bed = Bed::new(
        FakeBins {
            smartctl: env!("CARGO_BIN_EXE_felhom-fake-smartctl").into(),
            pct: env!("CARGO_BIN_EXE_felhom-fake-pct").into(),
        },
        BedOptions::default(),
    );
    let _helper = bed.listen(Class::Smart);
    let pve = PveSim::spawn(bin_dir().join("felhom-pvesim"), &["--guests", "3"]).unwrap();
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 1})).await;
    let home = AgentHome::new(
        &hub,
        pve.url(),
        json!({
            "token_id": pve.token_id(),
            "token_secret": pve.token_secret(),
            "tls": { "ca_file": pve.ca_file() }
        }),
    );
    home.set("privhelper.socket_dir", json!(bed.run_dir));
    home.set("privhelper.audit_log", json!(bed.audit_log));
    home.set(
        "smart.devices",
        json!(["sda", "sdb", "sdc", "sdd", "nvme0n1", "sdz"]),
    );
    let mut agent = home.start();

    // the helper writes one intent and one outcome per read: 12 records for 6 disks
    let reports = hub
        .wait_reports(Duration::from_secs(60), |r| {
            r.iter()
                .filter(|x| x["outcome"] == "accepted")
                .map(|x| x["report"]["audit"].as_array().map_or(0, Vec::len))
                .sum::<usize>()
                >= 12
        })
        .await;
    let first = &reports.iter().find(|x| x["outcome"] == "accepted").unwrap()["report"];
    assert_valid_report(first);
    let disks: BTreeMap<String, Value> = first["host"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["device"].as_str().unwrap().to_owned(), d.clone()))
        .collect();
    let health = |d: &str| disks[d]["health"].as_str().unwrap().to_owned();
    assert_eq!(health("sda"), "passed");
    assert_eq!(health("sdb"), "passed");
    assert_eq!(disks["sdb"]["reallocated_sectors"], 304);
    assert_eq!(health("sdc"), "failed");
    assert_eq!(health("sdd"), "standby");
    assert_eq!(health("nvme0n1"), "passed");
    assert_eq!(disks["nvme0n1"]["temperature_c"], 35);
    assert_eq!(health("sdz"), "unknown");
    let errors = first["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e["component"] == "smart" && e["subject"] == "sdz"),
        "{errors:#?}"
    );
    assert!(
        !errors.iter().any(|e| e["subject"] == "sdd"),
        "standby is not an error"
    );

    // SMART is on its own schedule: the next reports do not read the disks again
    hub.wait_reports(Duration::from_secs(30), |r| {
        r.iter().filter(|x| x["outcome"] == "accepted").count() >= 3
    })
    .await;
    assert_eq!(
        bed.smart_calls().len(),
        6,
        "one read per disk, not per cycle"
    );

    // the helper's records arrive verbatim: the SHA-256 chain checks out from what the hub got
    let audit_text = std::fs::read_to_string(&bed.audit_log).unwrap();
    let file_lines: Vec<&str> = audit_text.lines().collect();
    let received: Vec<String> = hub
        .accepted()
        .await
        .iter()
        .flat_map(|r| r["audit"].as_array().unwrap().clone())
        .map(|v| v.to_string())
        .collect();
    assert_eq!(received.len(), file_lines.len());
    for (got, line) in received.iter().zip(&file_lines) {
        // compare as JSON values (the hub simulator re-serializes what it stored)
        let a: Value = serde_json::from_str(got).unwrap();
        let b: Value = serde_json::from_str(line).unwrap();
        assert_eq!(a, b);
    }
    for w in file_lines.windows(2) {
        let prev: Value = serde_json::from_str(w[1]).unwrap();
        assert_eq!(prev["prev"], hex::encode(Sha256::digest(w[0].as_bytes())));
    }
    agent.signal(Sig::Term);
    assert_eq!(
        agent
            .wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
}
