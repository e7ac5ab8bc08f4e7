//! The published schema accepts what the agent's types produce, with every optional part
//! filled, and rejects what they cannot produce (so the validation in the e2e tests can
//! fail).

mod hub_support;

use felhom_agent::hub::report::*;
use felhom_agent::hub::smart::parse_smartctl;
use felhom_agent::ops::wire::{UndoKind, UndoPointReport, UndoStatus};
use hub_support::{assert_valid_report, test_agent_id};
use serde_json::{Value, json};

fn full_report() -> HostReport {
    let at = Timestamp::from_unix(1_764_100_000).unwrap();
    let fixtures = hub_support::repo_root().join("tests/fixtures/hosttools");
    let disk = |dev: &str, file: &str| {
        let bytes = std::fs::read(fixtures.join(file)).unwrap();
        let status = serde_json::from_slice::<Value>(&bytes).unwrap()["smartctl"]["exit_status"]
            .as_i64()
            .unwrap() as i32;
        parse_smartctl(dev, &bytes, status, false, at).disk
    };
    let mut r = HostReport::new(&test_agent_id(), "pve1");
    r.errors.push(CollectError {
        component: Component::Smart,
        subject: Some("sdz".into()),
        kind: ErrorKind::Other,
        message: "sdz: smartctl exit status 2: No such device".into(),
    });
    r.host = Some(HostInfo {
        pve_version: Some("9.1.1".into()),
        kernel: Some("6.8.12-4-pve".into()),
        uptime_seconds: 12345,
        cpu: CpuInfo {
            usage: 0.12,
            cores: 16,
            loadavg: vec![0.5, 0.25, 0.1],
        },
        memory: UsageBytes {
            total_bytes: 64 << 30,
            used_bytes: 12 << 30,
        },
        rootfs: UsageBytes {
            total_bytes: 100 << 30,
            used_bytes: 10 << 30,
        },
        disks: vec![
            disk("sda", "smartctl-sata-healthy.json"),
            disk("nvme0n1", "smartctl-nvme-failing-critical-warning.json"),
            disk("sdz", "probe-smartctl-no-such-device.json"),
        ],
        sensors: vec![SensorReport {
            chip: "coretemp".into(),
            label: "Package id 0".into(),
            temperature_c: 41.0,
        }],
    });
    r.guests.push(GuestReport {
        vmid: 101,
        guest_type: GuestType::Lxc,
        name: "web01".into(),
        status: GuestStatus::Running,
        ha_managed: true,
        lock: Some("backup".into()),
        template: false,
        spec: Some(GuestSpec {
            memory: 1024,
            swap: Some(512),
            cores: Some(2),
            cpulimit: "1.5".into(),
            onboot: true,
            description: "managed".into(),
            tags: vec!["prod".into()],
            hostname: Some("web01".into()),
            nesting: Some(true),
        }),
        restore_proof: Some(RestoreProof {
            archive: "local:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst".into(),
            passed_at: at,
        }),
    });
    r.guests.push(GuestReport {
        vmid: 102,
        guest_type: GuestType::Qemu,
        name: "VM102".into(),
        status: GuestStatus::Unknown,
        ha_managed: false,
        lock: None,
        template: false,
        spec: None,
        restore_proof: None,
    });
    r.cloudflared = CloudflaredReport {
        state: CloudflaredState::Ready,
        ready_connections: Some(4),
        connector_id: Some("0b5f-…".into()),
    };
    r.storage.push(StorageReport {
        id: "local".into(),
        storage_type: "dir".into(),
        content: vec!["backup".into(), "iso".into()],
        active: true,
        total_bytes: Some(1),
        used_bytes: Some(1),
        avail_bytes: Some(0),
    });
    r.backups.push(BackupReport {
        volid: "local:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst".into(),
        storage: "local".into(),
        vmid: Some(101),
        ctime: Some(1_738_288_805),
        size_bytes: Some(1 << 20),
        format: Some("tar.zst".into()),
        protected: false,
        verification: Some(BackupVerification {
            state: "ok".into(),
            upid: None,
        }),
    });
    r.pbs.push(PbsReport {
        id: "pbs1".into(),
        state: PbsState::Inactive,
        total_bytes: None,
        used_bytes: None,
        avail_bytes: None,
        backup_count: None,
        newest_backup_ctime: None,
    });
    r.restore_tests.push(RestoreTestReport {
        vmid: 101,
        archive: Some("local:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst".into()),
        archive_ctime: Some(at),
        scratch_vmid: Some(9900),
        started_at: at,
        duration_seconds: 42.5,
        restore_seconds: Some(30.25),
        boot_seconds: Some(2.5),
        result: RestoreTestResult::Passed,
        reason: None,
        upids: vec!["UPID:pve1:00155655:0684A712:6B15A074:vzrestore:9900:root@pam!felhom:".into()],
    });
    r.restore_tests.push(RestoreTestReport {
        vmid: 102,
        archive: None,
        archive_ctime: None,
        scratch_vmid: None,
        started_at: at,
        duration_seconds: 0.5,
        restore_seconds: None,
        boot_seconds: None,
        result: RestoreTestResult::Skipped,
        reason: Some("guest 102 has no backup".into()),
        upids: vec![],
    });
    r.audit.push(
        AuditRecord::from_line(r#"{"seq":1,"prev":"00","kind":"intent","args":{"x":[1,2]}}"#)
            .unwrap(),
    );
    r.reconcile = Some(ReconcileReport {
        blocked: false,
        safe_mode: false,
        safe_mode_reason: None,
        desired_generation: Some(3),
        applied_generation: Some(2),
        queued: vec![ReconcileAction {
            vmid: 101,
            action: "set_config".into(),
            op_id: Some("op-1".into()),
        }],
        running: vec![],
        failing: vec![FailingAction {
            vmid: 102,
            action: "start".into(),
            attempts: 3,
            last_error: "CT 102 is locked".into(),
            next_retry_at: Some(at),
        }],
        skipped: vec![SkippedGuest {
            vmid: 103,
            reason: "template".into(),
        }],
        desired_only: vec![104],
        actual_only: vec![105],
    });
    r.ops = OpsReport {
        enabled: true,
        signers: vec!["alice".into(), "bob".into()],
        held: vec![felhom_agent::ops::wire::HeldOp {
            op_id: "5f0c6a1e9b3d4c2f8a7e6d5c4b3a2918".into(),
            op: "stop".into(),
            vmid: Some(101),
            state: "held".into(),
            waiting_for: Some("blocked".into()),
            received_at: at,
        }],
        pending_results: vec![felhom_agent::ops::wire::OpResult {
            seq: 7,
            kind: felhom_agent::ops::wire::ResultKind::Op,
            op_id: Some("5f0c6a1e9b3d4c2f8a7e6d5c4b3a2918".into()),
            generation: None,
            payload_sha256: Some("ab".repeat(32)),
            delivery_id: Some("d-1".into()),
            state: felhom_agent::ops::wire::DecisionState::Applied,
            reason: None,
            message: None,
            signers: vec!["alice".into()],
            upids: vec![
                "UPID:pve1:0000A1B2:0001C3D4:6575A1B0:vzshutdown:101:felhom@pve!agent:".into(),
            ],
            result: serde_json::Map::new(),
            started_at: Some(at),
            finished_at: Some(at),
        }],
        undo_points: vec![
            UndoPointReport {
                op_id: "00112233445566778899aabbccddeeff".into(),
                vmid: 101,
                kind: UndoKind::Backup,
                reference: Some(
                    "nas-backup:backup/vzdump-lxc-101-2025_11_25-19_46_40.tar.zst".into(),
                ),
                storage: Some("nas-backup".into()),
                size_bytes: Some(3 << 30),
                created_at: at,
                status: UndoStatus::Kept,
            },
            UndoPointReport {
                op_id: "ffeeddccbbaa99887766554433221100".into(),
                vmid: 102,
                kind: UndoKind::Snapshot,
                reference: Some("felhom-undo-ffeeddccbbaa".into()),
                storage: None,
                size_bytes: None,
                created_at: at,
                status: UndoStatus::Kept,
            },
        ],
    };
    r.errors.push(CollectError {
        component: Component::Ops,
        subject: Some("nas-backup".into()),
        kind: ErrorKind::UndoSpace,
        message: "1 kept undo backup uses 30.0% of storage nas-backup (3.0 GiB of 10.0 GiB), above gate.undo_warn_fraction 0.2".into(),
    });
    r
}

#[test]
fn a_fully_populated_report_validates() {
    let v = serde_json::to_value(full_report()).unwrap();
    assert_valid_report(&v);
    // and the minimal one (Proxmox down)
    assert_valid_report(&serde_json::to_value(HostReport::new(&test_agent_id(), "pve1")).unwrap());
}

#[test]
fn the_schema_rejects_what_the_agent_cannot_send() {
    let good = serde_json::to_value(full_report()).unwrap();
    let validator = hub_support::report_validator();
    type Mutation = Box<dyn Fn(&mut Value)>;
    let mutations: Vec<(&str, Mutation)> = vec![
        (
            "missing field",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("guests");
            }),
        ),
        (
            "unknown field",
            Box::new(|v| {
                v["surprise"] = json!(1);
            }),
        ),
        (
            "wrong schema_version",
            Box::new(|v| v["schema_version"] = json!(2)),
        ),
        (
            "bad enum",
            Box::new(|v| v["host"]["disks"][0]["health"] = json!("ok")),
        ),
        (
            "bad timestamp",
            Box::new(|v| v["sent_at"] = json!("yesterday")),
        ),
        (
            "audit record without seq",
            Box::new(|v| v["audit"][0] = json!({"prev": "00"})),
        ),
        (
            "nested unknown field",
            Box::new(|v| v["guests"][0]["spec"]["keyctl"] = json!(true)),
        ),
        (
            "wrong type",
            Box::new(|v| v["host"]["uptime_seconds"] = json!("12345")),
        ),
        (
            "no agent_id",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("agent_id");
            }),
        ),
        (
            "upper-case agent_id",
            Box::new(|v| v["agent_id"] = json!("0123456789ABCDEF0123456789ABCDEF")),
        ),
        (
            "unknown field in ops",
            Box::new(|v| v["ops"]["held"] = json!(0)),
        ),
        (
            "ops without enabled",
            Box::new(|v| {
                v["ops"].as_object_mut().unwrap().remove("enabled");
            }),
        ),
        (
            "undo point of an unknown kind",
            Box::new(|v| v["ops"]["undo_points"][0]["kind"] = json!("clone")),
        ),
        (
            "undo point without ref",
            Box::new(|v| {
                v["ops"]["undo_points"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("ref");
            }),
        ),
        (
            "undo point with a short op_id",
            Box::new(|v| v["ops"]["undo_points"][1]["op_id"] = json!("ffee")),
        ),
        (
            "short agent_id",
            Box::new(|v| v["agent_id"] = json!("0123456789abcdef")),
        ),
    ];
    for (what, mutate) in mutations {
        let mut bad = good.clone();
        mutate(&mut bad);
        assert!(!validator.is_valid(&bad), "{what}: the schema accepted it");
    }
    assert!(validator.is_valid(&good));
}

#[test]
fn reports_round_trip_through_the_types() {
    let r = full_report();
    let text = serde_json::to_string(&r).unwrap();
    let back: HostReport = serde_json::from_str(&text).unwrap();
    assert_eq!(back, r);
}
