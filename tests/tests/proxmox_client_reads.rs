//! The Proxmox client against `felhom-pvesim` over real TLS: every TLS mode, every typed
//! read checked against the simulator's own state, 401 and 403 in both PVE generations.

mod proxmox_client_support;

use felhom_agent::config::{Secret, TlsVerify, format_fingerprint};
use felhom_agent::proxmox::{Client, GuestKind, ProxmoxError, RunState, WaitOptions};
use felhom_protocol::Vmid;
use proxmox_client_support::{Sim, acl_file};
use serde_json::json;

fn vmid(n: u64) -> Vmid {
    Vmid::new(n).unwrap()
}

#[tokio::test]
async fn every_tls_mode_against_the_simulator() {
    let sim = Sim::start(&["--guests", "8"]);
    let node = sim.start.node.clone();

    let pinned = Client::new(&sim.pinned(), &node).unwrap();
    assert!(!pinned.version().await.unwrap().version.is_empty());

    let ca = Client::new(
        &sim.proxmox(TlsVerify::CaFile(sim.start.ca_file.clone())),
        &node,
    )
    .unwrap();
    ca.version().await.unwrap();

    let insecure = Client::new(&sim.proxmox(TlsVerify::Insecure), &node).unwrap();
    insecure.version().await.unwrap();

    let wrong = [0x42u8; 32];
    let e = Client::new(&sim.proxmox(TlsVerify::PinSha256(wrong)), &node)
        .unwrap()
        .version()
        .await
        .unwrap_err();
    let ProxmoxError::PinMismatch { expected, seen, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(expected, &format_fingerprint(&wrong));
    assert_eq!(seen, &format_fingerprint(&sim.pin()));
    // The pin from the start line is upper-case with colons, as `pvenode cert info` prints.
    assert_eq!(seen, &sim.start.pin_sha256);
}

#[tokio::test]
async fn reads_match_the_simulator_state() {
    let sim = Sim::start(&["--guests", "12", "--seed", "7"]);
    let client = Client::new(&sim.pinned(), &sim.start.node).unwrap();
    let state = sim.state_json().await;

    let nodes = client.nodes().await.unwrap();
    assert!(nodes.iter().any(|n| n.node == sim.start.node));
    let status = client.node_status().await.unwrap();
    assert_eq!(status.loadavg.len(), 3);
    assert!(status.memory.total.unwrap_or(0) > 0);

    let mut seen = 0;
    for kind in [GuestKind::Lxc, GuestKind::Qemu] {
        for g in client.guests(kind).await.unwrap() {
            seen += 1;
            let want = state["guests"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["vmid"] == g.vmid.get())
                .unwrap_or_else(|| panic!("guest {} not in state", g.vmid));
            assert_eq!(want["type"], kind.as_str());
            assert_eq!(want["status"], g.status.as_str());
            let st = client.guest_status(kind, g.vmid).await.unwrap();
            assert_eq!(st.vmid, g.vmid);
            assert_eq!(st.template, want["template"] == json!(true), "{}", g.vmid);
            assert_eq!(
                st.ha.managed,
                want["ha_managed"] == json!(true),
                "{}",
                g.vmid
            );
            assert_eq!(st.lock.as_deref(), want["lock"].as_str(), "{}", g.vmid);
            let cfg = client.guest_config(kind, g.vmid).await.unwrap();
            assert!(cfg.digest().unwrap().is_some(), "config has a digest");
            cfg.memory().unwrap();
            cfg.cpulimit().unwrap();
            cfg.onboot().unwrap();
            let snaps = client.snapshots(kind, g.vmid).await.unwrap();
            assert!(snaps.last().unwrap().is_current(), "`current` comes last");
        }
    }
    assert_eq!(seen, state["guests"].as_array().unwrap().len());
    // --guests 12 has at least one of each special case (docs/testbed.md).
    let lxc = client.guests(GuestKind::Lxc).await.unwrap();
    let qemu = client.guests(GuestKind::Qemu).await.unwrap();
    let all: Vec<_> = lxc.iter().chain(qemu.iter()).collect();
    assert!(all.iter().any(|g| g.template));
    assert!(all.iter().any(|g| g.lock.as_deref() == Some("backup")));
    assert!(all.iter().any(|g| g.status == RunState::Running));
    assert!(all.iter().any(|g| g.status == RunState::Stopped));

    let storages = client.storages().await.unwrap();
    assert!(!storages.is_empty());
    for s in storages
        .iter()
        .filter(|s| s.contents().any(|c| c == "backup"))
    {
        for b in client.backups(&s.storage, None).await.unwrap() {
            assert!(
                b.volid.starts_with(&format!("{}:", s.storage)),
                "{}",
                b.volid
            );
        }
    }
}

#[tokio::test]
async fn old_pve_string_vmids_parse() {
    let sim = Sim::start(&["--guests", "6", "--pve-version", "7.4"]);
    let client = Client::new(&sim.pinned(), &sim.start.node).unwrap();
    let v = client.version().await.unwrap();
    assert!(v.version.starts_with("7.4"), "{}", v.version);
    // PVE before 8.2 sends the list's vmids as strings; the typed list must still match
    // the simulator's guests.
    let list = client.guests(GuestKind::Lxc).await.unwrap();
    let mut got: Vec<u64> = list.iter().map(|g| g.vmid.get() as u64).collect();
    got.sort();
    let mut want: Vec<u64> = sim
        .guests_where(|g| g["type"] == "lxc")
        .await
        .iter()
        .filter_map(|g| g["vmid"].as_u64())
        .collect();
    want.sort();
    assert!(!got.is_empty());
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_wrong_secret_is_401() {
    let sim = Sim::start(&["--guests", "2"]);
    let mut cfg = sim.pinned();
    cfg.token_secret = Secret::new("00000000-0000-0000-0000-000000000000");
    let e = Client::new(&cfg, &sim.start.node)
        .unwrap()
        .version()
        .await
        .unwrap_err();
    assert!(matches!(e, ProxmoxError::Unauthorized { .. }), "{e:?}");
    assert!(e.is_config_problem());
    assert!(!e.to_string().contains(&sim.start.token_secret));
}

/// A restricted token: 403s name the path and privilege, from the body `message` on 9.1
/// and from the reason phrase alone on 7.4.
#[tokio::test]
async fn permission_failures_name_the_privilege_on_old_and_new_pve() {
    for version in ["7.4", "9.1"] {
        let dir = tempfile::tempdir().unwrap();
        let secret = "5b0f7e0c-1111-2222-3333-restricted";
        let acl = acl_file(
            dir.path(),
            "felhom@pve!agent",
            secret,
            json!([{"path": "/vms", "privs": ["VM.Audit"], "propagate": true}]),
        );
        let sim = Sim::start(&[
            "--guests",
            "6",
            "--seed",
            "3",
            "--pve-version",
            version,
            "--acl",
            acl.to_str().unwrap(),
        ]);
        let mut cfg = sim.pinned();
        cfg.token_id = "felhom@pve!agent".to_string();
        cfg.token_secret = Secret::new(secret);
        let client = Client::new(&cfg, &sim.start.node).unwrap();
        let target = sim.plain_guest("lxc", "stopped").await;

        // Allowed read.
        client
            .guest_status(GuestKind::Lxc, vmid(target))
            .await
            .unwrap();

        // Node status needs Sys.Audit on /nodes/{node}.
        let e = client.node_status().await.unwrap_err();
        let ProxmoxError::PermissionDenied { denied, .. } = &e else {
            panic!("{version}: {e:?}")
        };
        assert_eq!(
            denied.path.as_deref(),
            Some(format!("/nodes/{}", sim.start.node).as_str()),
            "{version}"
        );
        assert_eq!(denied.privileges, vec!["Sys.Audit"], "{version}");
        assert!(e.to_string().contains("Sys.Audit"), "{version}: {e}");

        // Waiting on a task is a read; an unknown UPID is a 400 with errors.upid.
        let bogus = format!(
            "UPID:{}:0000AAAA:0000BBBB:66A1B2C3:vzstart:{target}:felhom@pve!agent:",
            sim.start.node
        )
        .parse()
        .unwrap();
        let e = client
            .wait_task(&bogus, WaitOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProxmoxError::Api { status: 400, errors, .. } if errors.contains_key("upid")),
            "{version}: {e:?}"
        );
    }
}
