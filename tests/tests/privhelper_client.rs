//! The agent's `privileged::Client` against real helpers: typed results and errors,
//! the exact `pct create` command line, the SSH keys file, version mismatch.

use std::path::PathBuf;
use std::time::Duration;

use felhom_agent::config::PrivhelperConfig;
use felhom_agent::privileged::{self, Client, PrivilegedError};
use felhom_protocol::{Class, DiskDevice, ErrorKind, MountName, PctCreateSpec, Request, Response};
use felhom_testbed::privhelper::{Bed, BedOptions, FakeBins, is_root};

fn fakes() -> FakeBins {
    FakeBins {
        smartctl: env!("CARGO_BIN_EXE_felhom-fake-smartctl").into(),
        pct: env!("CARGO_BIN_EXE_felhom-fake-pct").into(),
    }
}

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("SKIP: this test needs root (it starts the root helper)");
            return;
        }
    };
}

fn client(bed: &Bed) -> Client {
    Client::new(&PrivhelperConfig {
        socket_dir: bed.run_dir.clone(),
        audit_log: bed.audit_log.clone(),
        timeout: Duration::from_secs(20),
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@host";

fn spec_json(extra_keys: bool) -> String {
    let keys = if extra_keys {
        format!("[\"{ED25519}\"]")
    } else {
        "[]".into()
    };
    format!(
        r#"{{"vmid": 120, "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "hostname": "web1", "memory_mib": 1024, "swap_mib": 512, "cores": 2, "rootfs": {{"storage": "local-lvm", "size_gib": 8}}, "net": {{"bridge": "vmbr0", "ip": "dhcp", "gw": null}}, "nesting": true, "ssh_public_keys": {keys}, "start": false, "onboot": true}}"#
    )
}

#[test]
fn create_keyctl_runs_exactly_the_documented_pct_command() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let _h = bed.activate(Class::Pct);
    let c = client(&bed);
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec_json(true)).unwrap();
    let spec = privileged::load_spec(&spec_path).unwrap();
    let created = rt().block_on(c.create_keyctl(&spec)).unwrap();
    assert_eq!(created.vmid.get(), 120);
    assert!(
        created.output.contains("extracting archive"),
        "{}",
        created.output
    );

    // Static address with gateway, no nesting, no keys, start + no onboot.
    let spec2 = PctCreateSpec::from_json(
        &spec_json(false)
            .replace(
                "\"ip\": \"dhcp\", \"gw\": null",
                "\"ip\": \"192.0.2.20/24\", \"gw\": \"192.0.2.1\"",
            )
            .replace("\"nesting\": true", "\"nesting\": false")
            .replace(
                "\"start\": false, \"onboot\": true",
                "\"start\": true, \"onboot\": false",
            )
            .replace("\"vmid\": 120", "\"vmid\": 121"),
    )
    .unwrap();
    rt().block_on(c.create_keyctl(&spec2)).unwrap();

    let calls = bed.pct_calls();
    assert_eq!(calls.len(), 2);
    let argv: Vec<String> = serde_json::from_value(calls[0]["argv"].clone()).unwrap();
    let keyfile = calls[0]["ssh_keys_file"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        argv.join(" "),
        format!(
            "create 120 local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst --hostname web1 --memory 1024 --swap 512 --cores 2 --rootfs local-lvm:8 --net0 name=eth0,bridge=vmbr0,ip=dhcp --unprivileged 1 --features keyctl=1,nesting=1 --ssh-public-keys {keyfile} --start 0 --onboot 1"
        )
    );
    assert_eq!(calls[0]["ssh_keys_file"]["mode"], "600");
    assert_eq!(calls[0]["ssh_keys_file"]["content"], format!("{ED25519}\n"));
    assert!(
        !PathBuf::from(&keyfile).exists(),
        "the keys file is removed after pct ran"
    );
    let argv2: Vec<String> = serde_json::from_value(calls[1]["argv"].clone()).unwrap();
    assert_eq!(
        argv2.join(" "),
        "create 121 local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst --hostname web1 --memory 1024 --swap 512 --cores 2 --rootfs local-lvm:8 --net0 name=eth0,bridge=vmbr0,ip=192.0.2.20/24,gw=192.0.2.1 --unprivileged 1 --features keyctl=1 --start 1 --onboot 0"
    );
    for call in &calls {
        assert_eq!(
            call["env"],
            serde_json::json!({"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
        );
        // pct keeps nearly all capabilities, but not e.g. CAP_SYS_MODULE (16) or CAP_SYS_BOOT (22).
        let bnd = u64::from_str_radix(call["status"]["CapBnd"].as_str().unwrap(), 16).unwrap();
        assert_eq!(bnd & (1 << 16), 0, "CAP_SYS_MODULE dropped");
        assert_eq!(bnd & (1 << 22), 0, "CAP_SYS_BOOT dropped");
        assert_ne!(bnd & (1 << 21), 0, "CAP_SYS_ADMIN kept");
        assert_ne!(bnd & (1 << 0), 0, "CAP_CHOWN kept");
    }
    // The audit log names the keys by fingerprint only.
    let recs = bed.audit_records();
    let intent = recs.iter().find(|r| r["kind"] == "intent").unwrap();
    assert_eq!(intent["op"], "pct_create_keyctl");
    assert_eq!(intent["args"]["net0"], "name=eth0,bridge=vmbr0,ip=dhcp");
    assert!(
        intent["args"]["ssh_public_keys"][0]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(
        !std::fs::read_to_string(&bed.audit_log)
            .unwrap()
            .contains("AAAAC3Nza")
    );
}

#[test]
fn pct_failure_and_unreachable_helpers_are_typed() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    bed.set_pct_settings(serde_json::json!({"exit": 2, "stderr": "unable to create CT 120 - CT 120 already exists on node 'pve1'"}));
    let _h = bed.activate(Class::Pct);
    let c = client(&bed);
    let spec = PctCreateSpec::from_json(&spec_json(false)).unwrap();
    let e = rt().block_on(c.create_keyctl(&spec)).unwrap_err();
    assert_eq!(e.helper_kind(), Some(ErrorKind::ToolFailed), "{e}");
    assert!(e.to_string().contains("already exists"), "{e}");
    let recs = bed.audit_records();
    let outcome = recs.iter().find(|r| r["kind"] == "outcome").unwrap();
    assert_eq!(outcome["result"], "failed");
    assert!(
        outcome["reason"]
            .as_str()
            .unwrap()
            .contains("already exists")
    );
    // No usb helper is running: a typed, "unreachable" error.
    let e = rt()
        .block_on(c.usb_unmount(&MountName::new("x").unwrap()))
        .unwrap_err();
    assert!(
        matches!(
            e,
            PrivilegedError::Connect {
                class: Class::Usb,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.is_unreachable());
}

#[test]
fn ping_smart_and_class_routing() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let _s = bed.activate(Class::Smart);
    let c = client(&bed);
    let pings = rt().block_on(privileged::ping_classes(&c, None));
    assert_eq!(pings.len(), 3);
    assert!(pings[0].1.as_ref().unwrap_err().is_unreachable());
    assert!(pings[1].1.as_ref().unwrap_err().is_unreachable());
    let p = pings[2].1.as_ref().unwrap();
    assert_eq!(
        (p.class, p.version),
        (Class::Smart, felhom_protocol::PROTOCOL_VERSION)
    );
    let out = rt()
        .block_on(c.smart_read(&DiskDevice::new("nvme0").unwrap()))
        .unwrap();
    assert_eq!(out.exit_status, 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Samsung SSD 970 EVO Plus"));
    let out = rt()
        .block_on(c.smart_read(&DiskDevice::new("sdd").unwrap()))
        .unwrap();
    assert!(out.is_standby());
}

#[test]
fn version_mismatch_is_clear_on_both_sides() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let _s = bed.activate(Class::Smart);
    let mut raw = felhom_testbed::privhelper::Client::connect(&bed.socket(Class::Smart)).unwrap();
    let r = raw.call(&Request::Hello { version: 999 }).unwrap();
    match r {
        Response::Error {
            kind: ErrorKind::VersionMismatch,
            message,
        } => {
            assert!(
                message.contains("999")
                    && message.contains(&felhom_protocol::PROTOCOL_VERSION.to_string()),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(raw.closed_by_peer());
    let recs = bed.audit_records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["kind"], "refused");
    assert_eq!(recs[0]["category"], "version");
    // The helper keeps serving.
    let c = client(&bed);
    assert!(rt().block_on(c.ping(Class::Smart)).is_ok());
}
