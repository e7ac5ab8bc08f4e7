//! The full daemon: `felhom-agent run` against `felhom-pvesim` and `felhom-hubsim`, all
//! three real processes. Every report the hub receives must validate against the
//! published schema.

mod hub_support;

use std::collections::BTreeMap;
use std::time::Duration;

use felhom_testbed::harness::{Fault, PveSim};
use hub_support::*;
use serde_json::{Value, json};

fn pvesim(guests: u32) -> PveSim {
    PveSim::spawn(
        bin_dir().join("felhom-pvesim"),
        &["--guests", &guests.to_string(), "--seed", "7"],
    )
    .expect("start felhom-pvesim")
}

fn agent_home(hub: &HubSim, pve: &PveSim) -> AgentHome {
    AgentHome::new(
        hub,
        pve.url(),
        json!({
            "token_id": pve.token_id(),
            "token_secret": pve.token_secret(),
            "tls": { "ca_file": pve.ca_file() }
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_daemon_run_reports_the_simulated_node() {
    let pve = pvesim(12);
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 1})).await;
    let home = agent_home(&hub, &pve);
    // hwmon temperatures from a sample sysfs tree built from a real `sensors -j` capture
    let fixture = std::fs::read_to_string(
        repo_root().join("tests/fixtures/hosttools/sensors-intel-coretemp-nvme-acpitz.json"),
    )
    .unwrap();
    let tree =
        felhom_testbed::hwmon::write_sample_tree(&home.dir.path().join("sys"), &fixture).unwrap();
    home.set("sensors.hwmon_root", json!(tree.hwmon_root));
    let mut agent = home.start();
    let reports = hub
        .wait_reports(Duration::from_secs(60), |r| {
            r.iter().filter(|x| x["outcome"] == "accepted").count() >= 3
        })
        .await;
    let state = pve.state().await.unwrap();
    let sim_guests: BTreeMap<u64, &Value> = state["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["vmid"].as_u64().unwrap(), g))
        .collect();
    for r in reports.iter().filter(|x| x["outcome"] == "accepted") {
        let report = &r["report"];
        assert_valid_report(report);
        assert!(
            report["errors"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["component"] != "proxmox" && e["component"] != "guest"),
            "{:#}",
            report["errors"]
        );
        let host = &report["host"];
        assert!(host.is_object(), "{report:#}");
        assert!(host["pve_version"].is_string());
        assert!(host["uptime_seconds"].as_u64().unwrap() > 0);
        assert!(host["memory"]["total_bytes"].as_u64().unwrap() > 0);
        let guests = report["guests"].as_array().unwrap();
        assert_eq!(guests.len(), sim_guests.len());
        for g in guests {
            let vmid = g["vmid"].as_u64().unwrap();
            let sim = sim_guests[&vmid];
            assert_eq!(g["type"], sim["type"], "{vmid}");
            assert_eq!(g["status"], sim["status"], "{vmid}");
            assert_eq!(g["ha_managed"], sim["ha_managed"], "{vmid}");
            assert_eq!(g["template"], sim["template"], "{vmid}");
            assert_eq!(g["lock"], sim["lock"], "{vmid}");
            let spec = &g["spec"];
            assert!(spec.is_object(), "{vmid}: {g:#}");
            // the spec is the normalized config: memory as the sim has it (default 512)
            let mem = sim["config"]["memory"].as_u64().unwrap_or(512);
            assert_eq!(spec["memory"].as_u64(), Some(mem), "{vmid}");
        }
        // HA-managed, locked and template guests exist in a 12-guest sim and show up
        assert!(guests.iter().any(|g| g["ha_managed"] == true));
        assert!(guests.iter().any(|g| g["template"] == true));
        assert!(guests.iter().any(|g| g["lock"] == "backup"));
        assert!(!report["storage"].as_array().unwrap().is_empty());
        let sensors = host["sensors"].as_array().unwrap();
        assert_eq!(sensors.len(), tree.expected.len(), "{sensors:#?}");
        assert!(
            sensors
                .iter()
                .any(|s| s["chip"].as_str().unwrap().starts_with("coretemp")),
            "{sensors:#?}"
        );
    }
    // the agent only read: every request it made was a GET
    let requests = pve.requests(0).await.unwrap();
    assert!(!requests.is_empty());
    assert!(requests.iter().all(|r| r.method == "GET"), "{requests:?}");
    agent.signal(Sig::Term);
    assert_eq!(
        agent
            .wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert!(
        !agent.log_text().contains(pve.token_secret()),
        "the PVE secret leaked"
    );
    assert!(
        !agent.log_text().contains(&hub.token),
        "the hub token leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_guest_failing_is_unknown_and_the_rest_still_goes() {
    let pve = pvesim(8);
    let state = pve.state().await.unwrap();
    let guests = state["guests"].as_array().unwrap();
    let lxc = guests.iter().find(|g| g["type"] == "lxc").unwrap()["vmid"]
        .as_u64()
        .unwrap();
    let qemu = guests.iter().find(|g| g["type"] == "qemu").unwrap()["vmid"]
        .as_u64()
        .unwrap();
    // one container's config read fails with a PVE error, one VM's status is garbled
    pve.add_fault(&Fault::http_500(
        &format!("/nodes/pve1/lxc/{lxc}/config"),
        "config read exploded",
    ))
    .await
    .unwrap();
    pve.add_fault(&Fault::malformed_body(&format!(
        "/nodes/pve1/qemu/{qemu}/status/current"
    )))
    .await
    .unwrap();
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 1})).await;
    let home = agent_home(&hub, &pve);
    let _agent = home.start();
    let reports = hub
        .wait_reports(Duration::from_secs(60), |r| {
            r.iter().any(|x| x["outcome"] == "accepted")
        })
        .await;
    let report = &reports.iter().find(|x| x["outcome"] == "accepted").unwrap()["report"];
    assert_valid_report(report);
    assert!(report["host"].is_object());
    let listed = report["guests"].as_array().unwrap();
    assert_eq!(listed.len(), 8);
    for g in listed {
        let vmid = g["vmid"].as_u64().unwrap();
        if vmid == lxc || vmid == qemu {
            assert_eq!(g["status"], "unknown", "{g:#}");
            assert!(g["spec"].is_null());
        } else {
            assert_ne!(g["status"], "unknown", "{g:#}");
            assert!(g["spec"].is_object());
        }
    }
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    let by_subject = |v: u64| {
        errors
            .iter()
            .find(|e| e["subject"].as_str().and_then(|s| s.parse::<u64>().ok()) == Some(v))
            .unwrap()
    };
    let e = by_subject(lxc);
    assert_eq!(e["component"], "guest");
    assert_eq!(e["kind"], "http");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("config read exploded"),
        "{e:#}"
    );
    let e = by_subject(qemu);
    assert_eq!(e["component"], "guest");
    assert_eq!(e["kind"], "decode", "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxmox_going_down_mid_run_still_reports_with_host_null() {
    let pve = pvesim(4);
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 1})).await;
    let home = agent_home(&hub, &pve);
    let _agent = home.start();
    hub.wait_reports(Duration::from_secs(60), |r| {
        r.iter()
            .any(|x| x["outcome"] == "accepted" && x["report"]["host"].is_object())
    })
    .await;
    drop(pve); // the node's API goes away
    let reports = hub
        .wait_reports(Duration::from_secs(60), |r| {
            r.iter()
                .any(|x| x["outcome"] == "accepted" && x["report"]["host"].is_null())
        })
        .await;
    let down = &reports
        .iter()
        .rev()
        .find(|x| x["report"]["host"].is_null())
        .unwrap()["report"];
    assert_valid_report(down);
    assert_eq!(down["guests"], json!([]));
    assert!(
        down["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["component"] == "proxmox")
    );
}
