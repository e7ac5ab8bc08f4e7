//! Collector pieces that need no Proxmox: the spec mapping over real captures, SMART on its
//! schedule over the real smartctl captures, and the change log. The Proxmox-facing rules
//! (Proxmox down, one guest failing; kernel and backup verification from real answers) are
//! tested against `felhom-pvesim` in `tests/tests/hub_collector.rs` and
//! `tests/tests/hub_pvesim.rs`.

use std::path::PathBuf;
use std::sync::atomic::AtomicU32;

use super::*;

fn pve_fixture(rel: &str) -> serde_json::Map<String, serde_json::Value> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/pve")
        .join(rel);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["data"].as_object().unwrap().clone()
}

#[test]
fn spec_of_real_lxc_configs() {
    let spec = guest_spec(
        proxmox::GuestKind::Lxc,
        &pve_fixture("pve7-lxc-config.json"),
    )
    .unwrap();
    assert_eq!(
        spec,
        GuestSpec {
            memory: 4096,
            swap: Some(512),
            cores: Some(2),
            cpulimit: "0".into(),
            onboot: true,
            description: String::new(),
            tags: vec!["tag1".into(), "tag2".into()],
            hostname: Some("test-container".into()),
            nesting: Some(true),
        }
    );
    let spec = guest_spec(
        proxmox::GuestKind::Lxc,
        &pve_fixture("synthesized/pve8-lxc-config-typical.json"),
    )
    .unwrap();
    assert_eq!(spec.cpulimit, "1.5");
    assert_eq!(spec.description, "managed by agent\nsecond line");
    assert_eq!(spec.tags, ["prod", "web"]);
    assert_eq!(spec.memory, 1024);
}

#[test]
fn spec_defaults_and_qemu_fields() {
    let empty = serde_json::Map::new();
    let lxc = guest_spec(proxmox::GuestKind::Lxc, &empty).unwrap();
    assert_eq!(lxc.memory, 512);
    assert_eq!(lxc.swap, Some(512));
    assert_eq!(lxc.cores, None);
    assert_eq!(lxc.nesting, Some(false));
    assert!(!lxc.onboot);
    let qemu = guest_spec(proxmox::GuestKind::Qemu, &empty).unwrap();
    assert_eq!(qemu.cores, Some(1));
    assert_eq!(qemu.swap, None);
    assert_eq!(qemu.hostname, None);
    assert_eq!(qemu.nesting, None);
    // a value of the wrong type is an error (the guest becomes unknown)
    let mut bad = serde_json::Map::new();
    bad.insert("memory".into(), serde_json::json!({"x": 1}));
    assert!(guest_spec(proxmox::GuestKind::Lxc, &bad).is_err());
}

#[test]
fn kernel_release_from_kversion() {
    assert_eq!(
        kernel_release(
            "Linux 6.8.12-4-pve #1 SMP PREEMPT_DYNAMIC PMX 6.8.12-4 (2024-11-06T15:04Z)"
        ),
        "6.8.12-4-pve"
    );
    assert_eq!(kernel_release("something else"), "something else");
}

#[test]
fn host_kernel_prefers_current_kernel_and_falls_back_to_kversion() {
    let status =
        |v: serde_json::Value| -> proxmox::NodeStatus { serde_json::from_value(v).unwrap() };
    // PVE ≥ 8.1: both are present; current-kernel's release wins (here they are made to
    // differ so the test tells which one was used).
    let s = status(serde_json::json!({
        "kversion": "Linux 6.8.12-4-pve #1 SMP PREEMPT_DYNAMIC PMX 6.8.12-4 (2024-11-06T15:04Z)",
        "current-kernel": {"sysname": "Linux", "release": "6.8.12-5-pve",
                           "version": "#1 SMP PREEMPT_DYNAMIC PMX 6.8.12-5 (2024-12-03T10:26Z)",
                           "machine": "x86_64"}
    }));
    assert_eq!(host_kernel(&s).as_deref(), Some("6.8.12-5-pve"));
    // PVE 7.4: no current-kernel.
    let s = status(serde_json::json!({
        "kversion": "Linux 5.15.108-1-pve #1 SMP PVE 5.15.108-2 (2023-07-20T10:06Z)"
    }));
    assert_eq!(host_kernel(&s).as_deref(), Some("5.15.108-1-pve"));
    // An empty release does not hide kversion; neither present: null.
    let s = status(serde_json::json!({
        "kversion": "Linux 6.5.13-1-pve #1 SMP",
        "current-kernel": {"sysname": "Linux", "release": " ", "version": "", "machine": "x86_64"}
    }));
    assert_eq!(host_kernel(&s).as_deref(), Some("6.5.13-1-pve"));
    assert_eq!(host_kernel(&status(serde_json::json!({}))), None);
}

/// Serves the real smartctl captures by device name and counts reads.
struct FixtureSmart {
    reads: AtomicU32,
    asleep: std::sync::Mutex<bool>,
}

impl SmartSource for FixtureSmart {
    fn read<'a>(&'a self, device: &'a str) -> BoxFuture<'a, Result<SmartRaw, String>> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let file = match device {
                "sda" if *self.asleep.lock().unwrap() => {
                    return Ok(SmartRaw {
                        stdout: br#"{"smartctl":{"messages":[{"string":"Device is in STANDBY mode, exit(2)","severity":"information"}],"exit_status":2},"power_mode":{"ata_value":0,"name":"STANDBY"}}"#.to_vec(),
                        exit_status: 2,
                        truncated: false,
                    });
                }
                "sda" => "smartctl-sata-healthy.json",
                "nvme0n1" => "smartctl-nvme-healthy.json",
                "sdz" => "probe-smartctl-no-such-device.json",
                _ => return Err(format!("helper refused {device}")),
            };
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/hosttools")
                .join(file);
            let stdout = std::fs::read(p).map_err(|e| e.to_string())?;
            let status = serde_json::from_slice::<serde_json::Value>(&stdout).unwrap()["smartctl"]["exit_status"]
                .as_i64()
                .unwrap() as i32;
            Ok(SmartRaw {
                stdout,
                exit_status: status,
                truncated: false,
            })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn smart_runs_on_its_own_schedule_and_keeps_identity_in_standby() {
    let source = Arc::new(FixtureSmart {
        reads: AtomicU32::new(0),
        asleep: std::sync::Mutex::new(false),
    });
    let mut s = SmartSchedule {
        source: source.clone(),
        devices: Some(vec![
            "sda".into(),
            "nvme0n1".into(),
            "sdz".into(),
            "sdq".into(),
        ]),
        block_dir: PathBuf::from("/nonexistent"),
        interval: Duration::from_secs(1800),
        last_run: None,
        disks: Vec::new(),
        errors: Vec::new(),
    };
    s.run_if_due().await;
    assert_eq!(source.reads.load(Ordering::SeqCst), 4);
    let health: Vec<(&str, DiskHealth)> = s
        .disks
        .iter()
        .map(|d| (d.device.as_str(), d.health))
        .collect();
    assert_eq!(
        health,
        [
            ("sda", DiskHealth::Passed),
            ("nvme0n1", DiskHealth::Passed),
            ("sdz", DiskHealth::Unknown),
            ("sdq", DiskHealth::Unknown)
        ]
    );
    let subjects: Vec<_> = s
        .errors
        .iter()
        .map(|e| e.subject.clone().unwrap())
        .collect();
    assert_eq!(subjects, ["sdz", "sdq"]);

    // not due yet: no helper call, the cached entries stay
    tokio::time::advance(Duration::from_secs(1799)).await;
    s.run_if_due().await;
    assert_eq!(source.reads.load(Ordering::SeqCst), 4);

    // due, and sda is asleep now: standby, not woken, identity kept
    *source.asleep.lock().unwrap() = true;
    tokio::time::advance(Duration::from_secs(2)).await;
    s.run_if_due().await;
    assert_eq!(source.reads.load(Ordering::SeqCst), 8);
    let sda = &s.disks[0];
    assert_eq!(sda.health, DiskHealth::Standby);
    assert_eq!(sda.model.as_deref(), Some("WDC WD20EFRX-68EUZN0"));
    assert_eq!(sda.temperature_c, None);
    assert!(!s.errors.iter().any(|e| e.subject.as_deref() == Some("sda")));
}

#[tokio::test]
async fn smart_discovers_disks_when_none_are_configured() {
    let dir = tempfile::tempdir().unwrap();
    for d in ["sda", "sda1", "nvme0n1", "loop0"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let source = Arc::new(FixtureSmart {
        reads: AtomicU32::new(0),
        asleep: std::sync::Mutex::new(false),
    });
    let mut s = SmartSchedule {
        source,
        devices: None,
        block_dir: dir.path().to_path_buf(),
        interval: Duration::from_secs(1800),
        last_run: None,
        disks: Vec::new(),
        errors: Vec::new(),
    };
    s.run_if_due().await;
    let devices: Vec<&str> = s.disks.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(devices, ["nvme0n1", "sda"]);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
}

#[test]
fn change_log_tracks_what_is_new_and_what_cleared() {
    let mut log = ChangeLog::default();
    let e = |c, s: Option<&str>, m: &str| err(c, s.map(str::to_owned), ErrorKind::Other, m.into());
    log.observe(&[e(Component::Smart, Some("sda"), "x")]);
    assert_eq!(log.last.len(), 1);
    log.observe(&[
        e(Component::Smart, Some("sda"), "x"),
        e(Component::Cloudflared, None, "y"),
    ]);
    assert_eq!(log.last.len(), 2);
    log.observe(&[]);
    assert!(log.last.is_empty());
}
