//! Every vendored PVE fixture parses as the type of its endpoint, and the error fixtures
//! become the right typed errors (from the body `message` and from the reason phrase).

use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::client::error_from_answer;
use super::*;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pve")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixtures_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn data<T: DeserializeOwned>(name: &str) -> T {
    #[derive(serde::Deserialize)]
    struct Envelope<T> {
        data: T,
    }
    let env: Envelope<T> =
        serde_json::from_slice(&read(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    env.data
}

/// Which endpoint each success fixture is an answer of.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Version,
    Nodes,
    NodeStatus,
    GuestList,
    GuestConfig,
    GuestStatus,
    Snapshots,
    Storages,
    TaskStatus,
    /// A mutation answering a UPID.
    TaskStarted,
    /// LXC `PUT .../config`: `null`.
    ConfigApplied,
    /// An error body (`data: null`, maybe `message`/`errors`), with its HTTP status.
    Error(u16),
}

const TABLE: &[(&str, Endpoint)] = &[
    ("pve7-nodes.json", Endpoint::Nodes),
    ("pve7-nodes-status.json", Endpoint::NodeStatus),
    ("pve7-nodes-version.json", Endpoint::Version),
    ("pve7-lxc-list.json", Endpoint::GuestList),
    ("pve7-lxc-config.json", Endpoint::GuestConfig),
    (
        "pve7-lxc-status-current-stopped-template.json",
        Endpoint::GuestStatus,
    ),
    (
        "pve8-qemu-status-current-running.json",
        Endpoint::GuestStatus,
    ),
    (
        "pve7-task-status-running-apitoken.json",
        Endpoint::TaskStatus,
    ),
    (
        "pve7-task-status-stopped-ok-vzdump.json",
        Endpoint::TaskStatus,
    ),
    (
        "pve7-task-status-stopped-warnings.json",
        Endpoint::TaskStatus,
    ),
    (
        "pve7-error-400-param-unknown-property.json",
        Endpoint::Error(400),
    ),
    ("pve8-error-400-param-format.json", Endpoint::Error(400)),
    (
        "pve8-error-403-permission-legacy.json",
        Endpoint::Error(403),
    ),
    (
        "pve8-error-403-permission-with-message.json",
        Endpoint::Error(403),
    ),
    ("synthesized/pve8-version.json", Endpoint::Version),
    ("synthesized/pve8-lxc-list.json", Endpoint::GuestList),
    (
        "synthesized/pve8-lxc-config-typical.json",
        Endpoint::GuestConfig,
    ),
    (
        "synthesized/pve8-lxc-status-current-running.json",
        Endpoint::GuestStatus,
    ),
    (
        "synthesized/pve8-lxc-snapshot-list.json",
        Endpoint::Snapshots,
    ),
    ("synthesized/pve8-nodes-storage.json", Endpoint::Storages),
    (
        "synthesized/pve-task-status-running.json",
        Endpoint::TaskStatus,
    ),
    (
        "synthesized/pve-task-status-stopped-ok.json",
        Endpoint::TaskStatus,
    ),
    (
        "synthesized/pve-task-status-stopped-error.json",
        Endpoint::TaskStatus,
    ),
    ("synthesized/pve-post-lxc-start.json", Endpoint::TaskStarted),
    ("synthesized/pve-post-lxc-stop.json", Endpoint::TaskStarted),
    (
        "synthesized/pve-post-lxc-snapshot.json",
        Endpoint::TaskStarted,
    ),
    (
        "synthesized/pve-post-lxc-rollback.json",
        Endpoint::TaskStarted,
    ),
    (
        "synthesized/pve-post-lxc-restore.json",
        Endpoint::TaskStarted,
    ),
    ("synthesized/pve-post-vzdump.json", Endpoint::TaskStarted),
    (
        "synthesized/pve-delete-lxc-snapshot.json",
        Endpoint::TaskStarted,
    ),
    (
        "synthesized/pve-put-lxc-config.json",
        Endpoint::ConfigApplied,
    ),
    (
        "synthesized/pve-error-400-no-such-task.json",
        Endpoint::Error(400),
    ),
    (
        "synthesized/pve-error-403-keyctl-feature.json",
        Endpoint::Error(403),
    ),
    (
        "synthesized/pve-error-500-already-running.json",
        Endpoint::Error(500),
    ),
    (
        "synthesized/pve-error-500-no-such-ct.json",
        Endpoint::Error(500),
    ),
];

fn parse_as(name: &str, ep: Endpoint) {
    match ep {
        Endpoint::Version => {
            data::<Version>(name);
        }
        Endpoint::Nodes => {
            data::<Vec<NodeListItem>>(name);
        }
        Endpoint::NodeStatus => {
            data::<NodeStatus>(name);
        }
        Endpoint::GuestList => {
            data::<Vec<GuestListItem>>(name);
        }
        Endpoint::GuestConfig => {
            let c = data::<GuestConfig>(name);
            // Every typed accessor must accept what PVE sent.
            c.memory().unwrap();
            c.swap().unwrap();
            c.cores().unwrap();
            c.cpulimit().unwrap();
            c.onboot().unwrap();
            c.description().unwrap();
            c.tags().unwrap();
            c.hostname().unwrap();
            c.features().unwrap();
            c.net0().unwrap();
            c.digest().unwrap();
            c.lock().unwrap();
            c.lxc_raw().unwrap();
        }
        Endpoint::GuestStatus => {
            data::<GuestStatus>(name);
        }
        Endpoint::Snapshots => {
            data::<Vec<SnapshotItem>>(name);
        }
        Endpoint::Storages => {
            data::<Vec<StorageItem>>(name);
        }
        Endpoint::TaskStatus => {
            data::<TaskStatus>(name);
        }
        Endpoint::TaskStarted => {
            data::<Upid>(name);
        }
        Endpoint::ConfigApplied => {
            assert!(data::<Value>(name).is_null(), "{name}");
        }
        Endpoint::Error(status) => {
            let status = StatusCode::from_u16(status).unwrap();
            let e = error_from_answer("GET /x", status, None, &read(name));
            assert!(!e.to_string().is_empty());
        }
    }
}

fn all_fixture_files() -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["", "synthesized/"] {
        for entry in std::fs::read_dir(fixtures_dir().join(sub)).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "json") {
                out.push(format!("{sub}{}", p.file_name().unwrap().to_string_lossy()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_fixture_parses_as_its_endpoint() {
    for (name, ep) in TABLE {
        parse_as(name, *ep);
    }
    // Every response fixture is in the table (upid-samples.json is not a response; the
    // Upid tests read it).
    for f in all_fixture_files() {
        if f == "upid-samples.json" {
            continue;
        }
        assert!(
            TABLE.iter().any(|(n, _)| *n == f),
            "fixture {f} has no endpoint in the table"
        );
    }
}

#[test]
fn string_numbers_and_booleans_are_typed() {
    let list: Vec<GuestListItem> = data("pve7-lxc-list.json");
    assert_eq!(list.len(), 3);
    assert_eq!(list[0].vmid.get(), 106);
    assert_eq!(list[0].status, RunState::Running);
    let tmpl = list.iter().find(|g| g.vmid.get() == 101).unwrap();
    assert!(tmpl.template);
    assert!(!list[0].template);

    let list: Vec<GuestListItem> = data("synthesized/pve8-lxc-list.json");
    assert_eq!(list[1].vmid.get(), 102);
    assert_eq!(list[0].tags.as_deref(), Some("prod;web"));
    assert_eq!(list[1].pid, None);

    let s: NodeStatus = data("pve7-nodes-status.json");
    assert_eq!(s.loadavg, vec![0.0, 0.0, 0.0]);
    let cpu = s.cpuinfo.unwrap();
    assert_eq!(cpu.mhz, Some(3400.0));
    assert_eq!(cpu.hvm, Some(true));
    assert_eq!(s.memory.total, Some(65919459328));
    assert_eq!(s.memory.available, None);
    assert_eq!(s.pveversion.as_deref(), Some("pve-manager/7.4-16/0f39f621"));

    let c: GuestConfig = data("synthesized/pve8-lxc-config-typical.json");
    assert_eq!(c.cpulimit().unwrap(), Some(1.5));
    assert_eq!(c.memory().unwrap(), Some(1024));
    assert_eq!(c.onboot().unwrap(), Some(true));
    assert_eq!(
        c.description().unwrap(),
        Some("managed by agent\nsecond line\n")
    );
    assert_eq!(c.features().unwrap(), Some("keyctl=1,nesting=1"));
    assert_eq!(c.lock().unwrap(), None);
    assert_eq!(c.raw().get("unprivileged"), Some(&Value::from(1)));

    let c: GuestConfig = data("pve7-lxc-config.json");
    let lxc = c.lxc_raw().unwrap();
    assert_eq!(lxc.len(), 5);
    assert_eq!(
        lxc[3],
        (
            "lxc.mount.entry".to_string(),
            "/dev/dri dev/dri none bind,optional,create=dir".to_string()
        )
    );
    assert_eq!(c.tags().unwrap(), Some("tag1;tag2"));

    let st: GuestStatus = data("pve7-lxc-status-current-stopped-template.json");
    assert!(st.template);
    assert!(!st.ha.managed);
    assert_eq!(st.lock, None);
    assert!(!st.is_running());
    let st: GuestStatus = data("pve8-qemu-status-current-running.json");
    assert!(st.is_running());
    assert_eq!(st.qmpstatus.as_deref(), Some("running"));

    let snaps: Vec<SnapshotItem> = data("synthesized/pve8-lxc-snapshot-list.json");
    assert!(snaps.last().unwrap().is_current());
    assert_eq!(snaps.last().unwrap().running, Some(true));
    assert_eq!(snaps[1].parent.as_deref(), Some("pre-upgrade"));

    let storages: Vec<StorageItem> = data("synthesized/pve8-nodes-storage.json");
    assert_eq!(storages[0].storage_type, "dir");
    assert!(storages[0].contents().any(|c| c == "backup"));
    assert_eq!(storages[1].active, Some(true));

    let nodes: Vec<NodeListItem> = data("pve7-nodes.json");
    assert_eq!(nodes.len(), 4);
    assert_eq!(nodes[0].maxcpu, Some(12));
}

#[test]
fn task_status_fixtures() {
    let t: TaskStatus = data("pve7-task-status-running-apitoken.json");
    assert_eq!(t.status, TaskState::Running);
    assert_eq!(t.outcome(), None);
    assert_eq!(t.tokenid.as_deref(), Some("api_token"));
    assert_eq!(t.parsed_upid().unwrap().user(), "root@pam!api_token");

    let t: TaskStatus = data("pve7-task-status-stopped-warnings.json");
    assert_eq!(t.outcome(), Some(TaskOutcome::Warnings(1)));

    let t: TaskStatus = data("synthesized/pve-task-status-stopped-error.json");
    assert!(matches!(t.outcome(), Some(TaskOutcome::Failed(m)) if m.contains("can't overwrite")));

    // The proxmoxer capture's UPID was mangled by its test suite; the shape still parses,
    // the UPID does not (as PVE's own decoder would refuse it).
    let t: TaskStatus = data("pve7-task-status-stopped-ok-vzdump.json");
    assert_eq!(t.outcome(), Some(TaskOutcome::Ok));
    assert!(t.parsed_upid().is_err());
}

fn err(name: &str, status: u16, reason: Option<&str>) -> ProxmoxError {
    error_from_answer(
        "POST /nodes/pve1/lxc/101/status/start",
        StatusCode::from_u16(status).unwrap(),
        reason.map(str::to_string),
        &read(name),
    )
}

#[test]
fn permission_from_body_message_and_from_reason_phrase() {
    // PVE ≥ 8.4: in the body.
    let e = err("pve8-error-403-permission-with-message.json", 403, None);
    let ProxmoxError::PermissionDenied { denied, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(denied.path.as_deref(), Some("/vms/101"));
    assert_eq!(denied.privileges, vec!["VM.PowerMgmt"]);
    assert!(
        e.to_string().contains("grant VM.PowerMgmt on /vms/101"),
        "{e}"
    );

    // Older PVE: only the reason phrase; the body is `{"data":null}`.
    for (phrase, privs) in [
        (
            "Permission check failed (/vms/101, VM.PowerMgmt)",
            vec!["VM.PowerMgmt"],
        ),
        (
            "Permission check failed (/vms/101, VM.Config.Disk|VM.Config.CPU|VM.Config.Memory|VM.Config.Network|VM.Config.Options)",
            vec![
                "VM.Config.Disk",
                "VM.Config.CPU",
                "VM.Config.Memory",
                "VM.Config.Network",
                "VM.Config.Options",
            ],
        ),
    ] {
        let e = err("pve8-error-403-permission-legacy.json", 403, Some(phrase));
        let ProxmoxError::PermissionDenied { denied, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(denied.path.as_deref(), Some("/vms/101"));
        assert_eq!(denied.privileges, privs);
    }

    // Custom reason (keyctl), from the body.
    let e = err("synthesized/pve-error-403-keyctl-feature.json", 403, None);
    let ProxmoxError::PermissionDenied { denied, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(denied.privileges.is_empty());
    assert!(denied.reason.as_deref().unwrap().contains("root@pam"));
    // The same from the reason phrase only.
    let e = err(
        "pve8-error-403-permission-legacy.json",
        403,
        Some(
            "Permission check failed (changing feature flags (except nesting) is only allowed for root@pam)",
        ),
    );
    assert!(e.to_string().contains("only allowed for root@pam"), "{e}");

    // Bare, and no reason phrase at all: falls back to the canonical text.
    let e = err(
        "pve8-error-403-permission-legacy.json",
        403,
        Some("Permission check failed"),
    );
    assert!(e.to_string().contains("Permission check failed"), "{e}");
    let e = err("pve8-error-403-permission-legacy.json", 403, None);
    assert!(e.to_string().contains("Forbidden"), "{e}");
}

#[test]
fn parameter_errors_and_plain_errors() {
    let e = err(
        "pve7-error-400-param-unknown-property.json",
        400,
        Some("Parameter verification failed."),
    );
    let ProxmoxError::Api {
        status,
        message,
        errors,
        ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(*status, 400);
    assert_eq!(message, "Parameter verification failed.");
    assert!(errors["overrule-shutdown"].contains("not defined in schema"));

    let e = err("pve8-error-400-param-format.json", 400, None);
    let ProxmoxError::Api { errors, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(errors.len(), 2);
    assert!(e.to_string().contains("vmid: invalid format"), "{e}");

    let e = err("synthesized/pve-error-500-already-running.json", 500, None);
    assert!(
        matches!(&e, ProxmoxError::Api { status: 500, message, .. } if message == "CT 101 already running"),
        "{e:?}"
    );
    // The body's message wins over the reason phrase (it is the whole text).
    let e = err(
        "synthesized/pve-error-500-no-such-ct.json",
        500,
        Some("Configuration file 'nodes/pve/lxc/999.conf' does not exist"),
    );
    assert!(e.to_string().contains("999.conf' does not exist"));

    let e = error_from_answer(
        "GET /version",
        StatusCode::UNAUTHORIZED,
        Some("invalid token value!".into()),
        b"",
    );
    assert!(
        matches!(&e, ProxmoxError::Unauthorized { reason, .. } if reason == "invalid token value!")
    );
}
