//! The hub collector (`HostCollector`, driven directly, not through the daemon's loop)
//! against `felhom-pvesim` on every modelled PVE version: the host's kernel from
//! `current-kernel` (PVE ≥ 8.1) or `kversion` (7.4), and backups with their PBS
//! verification state, compared with what the simulator itself serves.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use felhom_agent::config::{Config, ProxmoxConfig, Secret, TlsVerify};
use felhom_agent::hub::collector::HostCollector;
use felhom_agent::hub::report::{HostReport, ReconcileReport};
use felhom_testbed::harness::{Fault, PveSim};
use serde_json::{Value, json};

fn start(version: &str) -> PveSim {
    PveSim::spawn(
        env!("CARGO_BIN_EXE_felhom-pvesim"),
        &[
            "--guests",
            "8",
            "--pve-version",
            version,
            "--task-seconds",
            "0.05",
        ],
    )
    .expect("start felhom-pvesim")
}

fn proxmox(sim: &PveSim) -> ProxmoxConfig {
    ProxmoxConfig {
        url: sim.url().to_owned(),
        token_id: sim.token_id().to_owned(),
        token_secret: Secret::new(sim.token_secret()),
        tls: TlsVerify::CaFile(sim.ca_file().to_path_buf()),
    }
}

fn collector(sim: &PveSim, dir: &Path) -> HostCollector {
    let mut cfg = Config::for_tests(sim.node(), dir.to_path_buf(), proxmox(sim));
    cfg.privhelper.audit_log = dir.join("no-audit-log.jsonl");
    // cloudflared is not part of this test: a port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    cfg.cloudflared.metrics_url = format!("http://{dead}");
    HostCollector::new(
        &cfg,
        felhom_agent::ops::AgentId::new("0123456789abcdef0123456789abcdef").unwrap(),
    )
}

/// `GET /api2/json{path}` with the simulator's token; the `data` member.
async fn pve_get(sim: &PveSim, path: &str) -> Value {
    let r = sim
        .client()
        .get(sim.api_url(path))
        .header("Authorization", sim.auth_header())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json::<Value>().await.unwrap()["data"].take()
}

fn only_proxmox_errors(report: &HostReport) -> Vec<String> {
    report
        .errors
        .iter()
        .filter(|e| {
            !matches!(
                e.component,
                felhom_agent::hub::report::Component::Cloudflared
                    | felhom_agent::hub::report::Component::Audit
            )
        })
        .map(|e| format!("{e:?}"))
        .collect()
}

#[tokio::test]
async fn kernel_comes_from_current_kernel_or_kversion_on_every_version() {
    for version in ["7.4", "8.1", "8.4", "9.1"] {
        let sim = start(version);
        let dir = tempfile::tempdir().unwrap();
        let status = pve_get(&sim, &format!("/nodes/{}/status", sim.node())).await;
        // The typed client sees current-kernel exactly where PVE sends it.
        let client = felhom_agent::proxmox::Client::new(&proxmox(&sim), sim.node()).unwrap();
        let typed = client.node_status().await.unwrap();
        let expected = if version == "7.4" {
            assert!(status.get("current-kernel").is_none());
            assert!(typed.current_kernel.is_none(), "{version}");
            // `Linux <release> <version…>`: the release is the second word.
            let kv = status["kversion"].as_str().unwrap();
            kv.split_whitespace().nth(1).unwrap().to_owned()
        } else {
            let release = status["current-kernel"]["release"].as_str().unwrap();
            let k = typed
                .current_kernel
                .as_ref()
                .expect("current-kernel parsed");
            assert_eq!(k.release, release, "{version}");
            assert_eq!(k.sysname.as_deref(), Some("Linux"));
            assert_eq!(k.machine.as_deref(), Some("x86_64"));
            release.to_owned()
        };
        let report = collector(&sim, dir.path()).collect_report().await;
        assert!(
            only_proxmox_errors(&report).is_empty(),
            "{version}: {:?}",
            report.errors
        );
        let host = report.host.expect("host");
        assert_eq!(host.kernel.as_deref(), Some(expected.as_str()), "{version}");
        assert!(host.kernel.unwrap().ends_with("-pve"));
    }
}

#[tokio::test]
async fn backups_carry_their_pbs_verification() {
    let sim = start("9.1");
    let dir = tempfile::tempdir().unwrap();
    let node = sim.node().to_owned();
    // A fresh backup to the PBS datastore: not verified yet.
    let r = sim
        .client()
        .post(sim.api_url(&format!("/nodes/{node}/vzdump")))
        .header("Authorization", sim.auth_header())
        .form(&[("vmid", "104"), ("storage", "pbs-offsite")])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let upid = r.json::<Value>().await.unwrap()["data"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = sim.wait_task(&upid, Duration::from_secs(10)).await.unwrap();
    assert_eq!(done["exitstatus"], "OK");

    // What the simulator serves, storage by storage.
    let mut served: BTreeMap<String, Value> = BTreeMap::new();
    let storages = pve_get(&sim, &format!("/nodes/{node}/storage")).await;
    for s in storages.as_array().unwrap() {
        let id = s["storage"].as_str().unwrap();
        if !s["content"]
            .as_str()
            .unwrap()
            .split(',')
            .any(|c| c == "backup")
        {
            continue;
        }
        let items = pve_get(
            &sim,
            &format!("/nodes/{node}/storage/{id}/content?content=backup"),
        )
        .await;
        for b in items.as_array().unwrap() {
            served.insert(b["volid"].as_str().unwrap().to_owned(), b.clone());
        }
    }
    let verified: Vec<&Value> = served
        .values()
        .filter(|b| b.get("verification").is_some())
        .collect();
    assert!(
        verified.iter().any(|b| b["verification"]["state"] == "ok")
            && verified
                .iter()
                .any(|b| b["verification"]["state"] == "failed"),
        "the simulator serves verified and failed PBS backups: {served:#?}"
    );

    let report = collector(&sim, dir.path()).collect_report().await;
    assert!(
        only_proxmox_errors(&report).is_empty(),
        "{:?}",
        report.errors
    );
    assert_eq!(report.backups.len(), served.len());
    for b in &report.backups {
        let s = &served[&b.volid];
        assert_eq!(b.vmid.map(u64::from), s["vmid"].as_u64(), "{}", b.volid);
        assert_eq!(b.ctime, s["ctime"].as_i64(), "{}", b.volid);
        match s.get("verification") {
            Some(v) => {
                let got = b.verification.as_ref().expect("verification reported");
                assert_eq!(got.state, v["state"].as_str().unwrap(), "{}", b.volid);
                assert_eq!(got.upid.as_deref(), v["upid"].as_str(), "{}", b.volid);
                assert!(got.upid.as_deref().unwrap().starts_with("UPID:pbs:"));
            }
            None => assert_eq!(b.verification, None, "{}", b.volid),
        }
    }
    // Only PBS backups are verified; the fresh one is not (yet).
    assert!(
        report
            .backups
            .iter()
            .filter(|b| b.verification.is_some())
            .all(|b| b.storage == "pbs-offsite" && b.format.as_deref().unwrap().starts_with("pbs-"))
    );
    let fresh = report
        .backups
        .iter()
        .find(|b| b.storage == "pbs-offsite" && b.vmid == Some(104))
        .expect("the new PBS backup");
    assert_eq!(fresh.verification, None);
    assert!(
        fresh.volid.starts_with("pbs-offsite:backup/ct/104/"),
        "{}",
        fresh.volid
    );
    // The PBS datastore itself.
    let pbs = report
        .pbs
        .iter()
        .find(|p| p.id == "pbs-offsite")
        .expect("pbs entry");
    let on_pbs: Vec<_> = report
        .backups
        .iter()
        .filter(|b| b.storage == "pbs-offsite")
        .collect();
    assert_eq!(pbs.backup_count, Some(on_pbs.len() as u64));
    assert_eq!(
        pbs.newest_backup_ctime,
        on_pbs.iter().filter_map(|b| b.ctime).max()
    );
    let v = serde_json::to_value(&report).unwrap();
    assert!(
        v["backups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["verification"]
                == json!({"state": "failed", "upid": b["verification"]["upid"]})
                && b["verification"]["upid"].is_string())
    );
}

fn reconcile_state(applied_generation: Option<u64>) -> ReconcileReport {
    ReconcileReport {
        blocked: false,
        safe_mode: false,
        safe_mode_reason: None,
        desired_generation: Some(1),
        applied_generation,
        queued: Vec::new(),
        running: Vec::new(),
        failing: Vec::new(),
        skipped: Vec::new(),
        desired_only: Vec::new(),
        actual_only: Vec::new(),
    }
}

/// A report's reconcile section is the engine's state from before the report's reads: a
/// report saying the desired state is applied lists the guests as they were after that.
/// Here the engine's state changes while the guest list is being read (the simulator holds
/// that request until the change is made; its 3 s latency is only what it may take).
#[tokio::test]
async fn the_reconcile_section_predates_the_guests_it_is_reported_with() {
    let sim = start("8.4");
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(Some(reconcile_state(None)));
    let mut c = collector(&sim, dir.path()).with_reconcile(rx);
    sim.add_fault(&Fault::latency("/nodes/pve1/lxc", 3000).times(1))
        .await
        .unwrap();
    let change_while_held = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let log = sim.requests(0).await.unwrap();
            if log
                .iter()
                .any(|r| r.path == "/api2/json/nodes/pve1/lxc" && r.status.is_none())
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never held: {log:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tx.send(Some(reconcile_state(Some(1)))).unwrap();
    };
    let (report, ()) = tokio::join!(c.collect_report(), change_while_held);
    assert!(
        sim.requests(0)
            .await
            .unwrap()
            .iter()
            .any(|r| r.path == "/api2/json/nodes/pve1/lxc" && r.status == Some(200)),
        "the held read was answered"
    );
    assert_eq!(report.reconcile, Some(reconcile_state(None)));
}
