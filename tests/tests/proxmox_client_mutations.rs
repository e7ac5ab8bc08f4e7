//! Mutations through the typed API against `felhom-pvesim`, each with a permit from the
//! reconcile queue (the only way to get one), plus wait_task outcomes (OK, WARNINGS,
//! failure), permission failures, and injected transport faults.

mod proxmox_client_support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use felhom_agent::config::Secret;
use felhom_agent::proxmox::{
    Client, ConfigChange, GuestKind, ProxmoxError, RestoreOptions, RunState, SetConfigOutcome,
    SnapshotName, TaskListFilter, TaskSource, Upid, VzdumpCompress, VzdumpOptions, VzdumpOutcome,
    WaitOptions,
};
use felhom_agent::reconcile::{GuestPermit, OpFuture, Queue, QueueConfig};
use felhom_protocol::Vmid;
use felhom_testbed::harness::Fault;
use proxmox_client_support::{Sim, acl_file};
use serde_json::json;

fn vmid(n: u64) -> Vmid {
    Vmid::new(n).unwrap()
}

fn fast() -> WaitOptions {
    WaitOptions {
        timeout: Duration::from_secs(30),
        initial_interval: Duration::from_millis(20),
        max_interval: Duration::from_millis(200),
    }
}

/// Runs `op` in `vmid`'s lane of the queue and returns its result.
async fn in_lane<T: Send + 'static>(
    q: &Queue,
    v: Vmid,
    op: impl for<'p> FnOnce(&'p GuestPermit) -> OpFuture<'p, T> + Send + 'static,
) -> T {
    q.submit(v, "test", op).expect("queued").await.expect("ran")
}

/// Starts a task in the lane, then waits for it outside (waiting needs no permit).
macro_rules! task {
    ($q:expr, $client:expr, $v:expr, |$c:ident, $p:ident| $call:expr) => {{
        let $c = $client.clone();
        let upid: Upid = in_lane(&$q, $v, move |$p| Box::pin(async move { $call.await }))
            .await
            .expect("task started");
        upid
    }};
}

#[tokio::test]
async fn lxc_lifecycle_backup_and_restore() {
    let sim = Sim::start(&["--guests", "12", "--task-seconds", "0.05"]);
    let client = Client::new(&sim.pinned(), &sim.start.node).unwrap();
    let q = Queue::start(QueueConfig::default());
    let n = sim.plain_guest("lxc", "stopped").await;
    let v = vmid(n);
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 5;

    // start
    let upid = task!(q, client, v, |c, p| c.start(p, GuestKind::Lxc));
    assert_eq!(upid.task_type(), "vzstart");
    assert_eq!(upid.id(), n.to_string());
    let done = client.wait_task(&upid, fast()).await.unwrap();
    assert_eq!(done.exitstatus, "OK");
    assert_eq!(
        client.guest_status(GuestKind::Lxc, v).await.unwrap().status,
        RunState::Running
    );

    // set-config on LXC is synchronous: Applied, and visible at once.
    let c = client.clone();
    let out = in_lane(&q, v, move |p| {
        Box::pin(async move {
            c.set_config(
                p,
                GuestKind::Lxc,
                &ConfigChange::new()
                    .set("memory", 768)
                    .set("onboot", true)
                    .set("description", "set by the client test"),
            )
            .await
        })
    })
    .await
    .unwrap();
    assert_eq!(out, SetConfigOutcome::Applied);
    let cfg = client.guest_config(GuestKind::Lxc, v).await.unwrap();
    assert_eq!(cfg.memory().unwrap(), Some(768));
    assert_eq!(cfg.onboot().unwrap(), Some(true));
    assert_eq!(cfg.description().unwrap(), Some("set by the client test\n"));

    // snapshot, rollback, delete
    let name = SnapshotName::new("clienttest").unwrap();
    let n1 = name.clone();
    let upid = task!(q, client, v, |c, p| c.snapshot_create(
        p,
        GuestKind::Lxc,
        &n1,
        None
    ));
    client.wait_task(&upid, fast()).await.unwrap();
    let names: Vec<String> = client
        .snapshots(GuestKind::Lxc, v)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert!(names.contains(&"clienttest".to_string()), "{names:?}");
    let n2 = name.clone();
    let upid = task!(q, client, v, |c, p| c.snapshot_rollback(
        p,
        GuestKind::Lxc,
        &n2,
        true
    ));
    assert_eq!(upid.task_type(), "vzrollback");
    client.wait_task(&upid, fast()).await.unwrap();
    let n3 = name.clone();
    let upid = task!(q, client, v, |c, p| c.snapshot_delete(
        p,
        GuestKind::Lxc,
        &n3,
        false
    ));
    client.wait_task(&upid, fast()).await.unwrap();
    assert!(
        sim.snapshot_names(n)
            .await
            .iter()
            .all(|s| s != "clienttest")
    );

    // shutdown with a timeout
    let upid = task!(q, client, v, |c, p| c.shutdown(
        p,
        GuestKind::Lxc,
        Duration::from_secs(20),
        true
    ));
    assert_eq!(upid.task_type(), "vzshutdown");
    client.wait_task(&upid, fast()).await.unwrap();
    assert_eq!(
        client.guest_status(GuestKind::Lxc, v).await.unwrap().status,
        RunState::Stopped
    );

    // vzdump to a backup storage, then find the archive and restore it over the guest.
    let storage = client
        .storages()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.contents().any(|c| c == "backup"))
        .expect("a backup storage")
        .storage;
    let opts = VzdumpOptions {
        storage: Some(storage.clone()),
        compress: Some(VzdumpCompress::Zstd),
        ..Default::default()
    };
    let c = client.clone();
    let out = in_lane(&q, v, move |p| {
        Box::pin(async move { c.vzdump(p, &opts).await })
    })
    .await
    .unwrap();
    let VzdumpOutcome::Task(upid) = out else {
        panic!("vzdump of a local guest is a task")
    };
    assert_eq!(upid.task_type(), "vzdump");
    client.wait_task(&upid, fast()).await.unwrap();
    let backups = client.backups(&storage, Some(v)).await.unwrap();
    let newest = backups
        .iter()
        .max_by_key(|b| b.ctime)
        .expect("the new backup is listed");
    // The task's own archive, named by its log and listed by the storage.
    let item = client.vzdump_archive(&upid, &storage, v).await.unwrap();
    assert_eq!(item.volid, newest.volid);
    assert_eq!(item.vmid, Some(v));
    let re = regex_lite::Regex::new(&format!(
        r"^{storage}:backup/vzdump-lxc-{n}-\d{{4}}_\d\d_\d\d-\d\d_\d\d_\d\d\.tar\.zst$"
    ))
    .unwrap();
    assert!(re.is_match(&item.volid), "{}", item.volid);
    let archive = item.volid;

    let restore = RestoreOptions {
        archive,
        storage: Some("local-lvm".into()),
        force: true,
        ..Default::default()
    };
    let c = client.clone();
    let upid: Upid = in_lane(&q, v, move |p| {
        Box::pin(async move { c.lxc_restore(p, &restore).await })
    })
    .await
    .unwrap();
    assert_eq!(upid.task_type(), "vzrestore");
    client.wait_task(&upid, fast()).await.unwrap();

    // The task list finds our tasks by vmid, type, user and time (crash recovery's query).
    let found = client
        .tasks(&TaskListFilter {
            vmid: Some(v),
            typefilter: Some("vzstart".into()),
            // PVE matches `userfilter` against the user part only (the token name is
            // split off into `tokenid` in the archive).
            userfilter: sim.start.token_id.split('!').next().map(str::to_string),
            source: Some(TaskSource::All),
            since: Some(since),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!found.is_empty());
    assert!(
        found
            .iter()
            .all(|t| t.task_type == "vzstart" && t.id == n.to_string())
    );
    assert!(found.iter().all(|t| t.auth_id() == sim.start.token_id));
    assert!(found.iter().any(|t| t.outcome().is_some()));
}

#[tokio::test]
async fn reboot_restarts_a_running_guest_and_is_refused_on_a_stopped_one() {
    let sim = Sim::start(&["--guests", "12", "--task-seconds", "0.05"]);
    let client = Client::new(&sim.pinned(), &sim.start.node).unwrap();
    let q = Queue::start(QueueConfig::default());
    for (kind, k, wtype) in [
        ("lxc", GuestKind::Lxc, "vzreboot"),
        ("qemu", GuestKind::Qemu, "qmreboot"),
    ] {
        let n = sim.plain_guest(kind, "running").await;
        let v = vmid(n);
        let before = client.guest_status(k, v).await.unwrap();
        assert_eq!(before.status, RunState::Running);
        let upid = task!(q, client, v, |c, p| c.reboot(
            p,
            k,
            Some(Duration::from_secs(45))
        ));
        assert_eq!(
            (upid.task_type(), upid.id()),
            (wtype, n.to_string().as_str())
        );
        let done = client.wait_task(&upid, fast()).await.unwrap();
        assert_eq!(done.exitstatus, "OK");
        let after = client.guest_status(k, v).await.unwrap();
        assert_eq!(after.status, RunState::Running);
        assert_ne!(after.pid, before.pid, "{kind}: restarted");
        // The timeout went on the wire in whole seconds; without one, nothing but the path.
        let upid = task!(q, client, v, |c, p| c.reboot(p, k, None));
        client.wait_task(&upid, fast()).await.unwrap();
        let posts: Vec<_> = sim
            .requests(0)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| {
                r.method == "POST" && r.path.ends_with(&format!("/{kind}/{n}/status/reboot"))
            })
            .map(|r| r.params)
            .collect();
        assert_eq!(posts.len(), 2, "{posts:?}");
        assert_eq!(posts[0].get("timeout").map(String::as_str), Some("45"));
        assert!(!posts[1].contains_key("timeout"), "{posts:?}");
    }
    // A stopped guest: PVE's refusal before any task, typed.
    let n = sim.plain_guest("lxc", "stopped").await;
    let v = vmid(n);
    let c = client.clone();
    let e = in_lane(&q, v, move |p| {
        Box::pin(async move { c.reboot(p, GuestKind::Lxc, None).await })
    })
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ProxmoxError::Api { status: 500, message, .. } if *message == format!("CT {n} not running")),
        "{e:?}"
    );
}

/// A vzdump to a Proxmox Backup Server storage: the log names the snapshot, not a file.
#[tokio::test]
async fn vzdump_archive_on_pbs_and_a_task_that_is_no_vzdump() {
    let sim = Sim::start(&["--guests", "12", "--task-seconds", "0.05"]);
    let client = Client::new(&sim.pinned(), &sim.start.node).unwrap();
    let q = Queue::start(QueueConfig::default());
    let n = sim.plain_guest("lxc", "running").await;
    let v = vmid(n);
    let opts = VzdumpOptions {
        storage: Some("pbs-offsite".into()),
        ..Default::default()
    };
    let c = client.clone();
    let out = in_lane(&q, v, move |p| {
        Box::pin(async move { c.vzdump(p, &opts).await })
    })
    .await
    .unwrap();
    let VzdumpOutcome::Task(upid) = out else {
        panic!("vzdump of a local guest is a task")
    };
    client.wait_task(&upid, fast()).await.unwrap();
    let item = client
        .vzdump_archive(&upid, "pbs-offsite", v)
        .await
        .unwrap();
    let re = regex_lite::Regex::new(&format!(
        r"^pbs-offsite:backup/ct/{n}/\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"
    ))
    .unwrap();
    assert!(re.is_match(&item.volid), "{}", item.volid);
    // The same task asked about another storage: the archive is not there.
    let e = client.vzdump_archive(&upid, "local", v).await.unwrap_err();
    assert!(matches!(e, ProxmoxError::Decode { .. }), "{e:?}");
    // Another guest's archive is not in this task's log.
    let e = client
        .vzdump_archive(&upid, "pbs-offsite", vmid(n + 1000))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ProxmoxError::Decode { detail, .. } if detail.contains("names no archive")),
        "{e:?}"
    );
    // Not a vzdump task: refused without a request.
    let upid = task!(q, client, v, |c, p| c.reboot(p, GuestKind::Lxc, None));
    let e = client
        .vzdump_archive(&upid, "pbs-offsite", v)
        .await
        .unwrap_err();
    assert!(matches!(e, ProxmoxError::InvalidRequest(_)), "{e:?}");
    client.wait_task(&upid, fast()).await.unwrap();
}

#[tokio::test]
async fn qemu_set_config_is_a_task_and_vzdump_of_an_unknown_guest_fails_in_its_task() {
    let sim = Sim::start(&["--guests", "8", "--task-seconds", "0.05"]);
    let client = Client::new(&sim.pinned(), &sim.start.node).unwrap();
    let q = Queue::start(QueueConfig::default());
    let n = sim.plain_guest("qemu", "stopped").await;
    let c = client.clone();
    let out = in_lane(&q, vmid(n), move |p| {
        Box::pin(async move {
            c.set_config(p, GuestKind::Qemu, &ConfigChange::new().set("onboot", true))
                .await
        })
    })
    .await
    .unwrap();
    let SetConfigOutcome::Task(upid) = out else {
        panic!("QEMU POST config is a task")
    };
    assert_eq!(upid.task_type(), "qmconfig");
    client.wait_task(&upid, fast()).await.unwrap();
    assert_eq!(
        client
            .guest_config(GuestKind::Qemu, vmid(n))
            .await
            .unwrap()
            .onboot()
            .unwrap(),
        Some(true)
    );

    // An unknown guest stays "local" for vzdump (get_included_guests): PVE starts the
    // task and it fails there, naming the guest. (A guest the cluster places on another
    // node gets the plain `OK` instead: see the next test.)
    let c = client.clone();
    let out = in_lane(&q, vmid(999_999), move |p| {
        Box::pin(async move { c.vzdump(p, &VzdumpOptions::default()).await })
    })
    .await
    .unwrap();
    let VzdumpOutcome::Task(upid) = out else {
        panic!("expected a task, got {out:?}")
    };
    assert_eq!(upid.id(), "999999");
    let e = client.wait_task(&upid, fast()).await.unwrap_err();
    assert!(
        matches!(&e, ProxmoxError::TaskFailed { upid: u, .. } if u.task_type() == "vzdump"),
        "{e:?}"
    );
}

/// PVE's silent exit: a vzdump of a guest that the cluster's vmlist places on another
/// node answers the plain string `OK` instead of a UPID (no task is started), which the
/// client types as `NothingToDo`; the same call for a local guest is a task.
#[tokio::test]
async fn vzdump_of_a_guest_on_another_node_has_nothing_to_do() {
    let sim = Sim::start(&["--guests", "8", "--task-seconds", "0.05"]);
    let node = sim.start.node.clone();
    let client = Client::new(&sim.pinned(), &node).unwrap();
    let q = Queue::start(QueueConfig::default());
    let away = sim.plain_guest("lxc", "stopped").await;
    let here = sim.plain_guest("qemu", "stopped").await;
    assert_ne!(away, here);
    // The guest is migrated to pve2 behind the agent's back.
    sim.put_guest(away, json!({"node": "pve2"})).await;
    let state = sim.state_json().await;
    assert!(
        state["other_nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["vmid"] == away && g["node"] == "pve2")
    );
    let tasks_before = state["tasks"].as_array().unwrap().len();
    sim.clear_log().await;

    let c = client.clone();
    let out = in_lane(&q, vmid(away), move |p| {
        Box::pin(async move {
            c.vzdump(
                p,
                &VzdumpOptions {
                    storage: Some("nas-backup".into()),
                    ..VzdumpOptions::default()
                },
            )
            .await
        })
    })
    .await
    .unwrap();
    assert_eq!(out, VzdumpOutcome::NothingToDo);
    let log = sim.log().await;
    let post: Vec<_> = log
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with(&format!("/nodes/{node}/vzdump")))
        .collect();
    assert_eq!(post.len(), 1, "{log:?}");
    assert_eq!(post[0].status, Some(200));
    assert_eq!(post[0].params.get("vmid"), Some(&away.to_string()));
    let state = sim.state_json().await;
    assert_eq!(
        state["tasks"].as_array().unwrap().len(),
        tasks_before,
        "no task was started"
    );

    // A local guest with the same options: a real backup task.
    let c = client.clone();
    let out = in_lane(&q, vmid(here), move |p| {
        Box::pin(async move {
            c.vzdump(
                p,
                &VzdumpOptions {
                    storage: Some("nas-backup".into()),
                    ..VzdumpOptions::default()
                },
            )
            .await
        })
    })
    .await
    .unwrap();
    let VzdumpOutcome::Task(upid) = out else {
        panic!("a local guest's backup is a task, got {out:?}")
    };
    assert_eq!(upid.id(), here.to_string());
    client.wait_task(&upid, fast()).await.unwrap();
}

#[tokio::test]
async fn wait_task_ok_warnings_and_failure() {
    let sim = Sim::start(&["--guests", "8", "--task-seconds", "0.05"]);
    let node = sim.start.node.clone();
    let client = Client::new(&sim.pinned(), &node).unwrap();
    let q = Queue::start(QueueConfig::default());
    let n = sim.plain_guest("lxc", "stopped").await;
    let v = vmid(n);
    let start_path = format!("/nodes/{node}/lxc/{n}/status/start");

    sim.fault(
        Fault::task_fail(&start_path, "WARNINGS: 2")
            .method("POST")
            .times(1),
    )
    .await;
    let upid = task!(q, client, v, |c, p| c.start(p, GuestKind::Lxc));
    let done = client.wait_task(&upid, fast()).await.unwrap();
    assert_eq!(done.warnings, Some(2));
    assert_eq!(done.exitstatus, "WARNINGS: 2");
    // (The simulator undoes an injected task's effect, so the guest is still stopped.)

    let failure = format!("command 'lxc-start -F -n {n}' failed: exit code 1");
    sim.fault(
        Fault::task_fail(&start_path, &failure)
            .method("POST")
            .times(1),
    )
    .await;
    let upid = task!(q, client, v, |c, p| c.start(p, GuestKind::Lxc));
    let e = client.wait_task(&upid, fast()).await.unwrap_err();
    let ProxmoxError::TaskFailed {
        exitstatus,
        permission,
        upid: failed,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(exitstatus, &failure);
    assert!(permission.is_none());
    assert_eq!(failed, &upid);
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("task vzstart on guest {n} failed")),
        "{msg}"
    );

    // Without a fault: OK, no warnings, and the guest runs.
    let upid = task!(q, client, v, |c, p| c.start(p, GuestKind::Lxc));
    let done = client.wait_task(&upid, fast()).await.unwrap();
    assert_eq!((done.exitstatus.as_str(), done.warnings), ("OK", None));
    assert!(
        client
            .guest_status(GuestKind::Lxc, v)
            .await
            .unwrap()
            .is_running()
    );
}

#[tokio::test]
async fn injected_transport_faults_are_typed() {
    let sim = Sim::start(&["--guests", "4"]);
    let node = sim.start.node.clone();
    let client = Client::new(&sim.pinned(), &node).unwrap();

    sim.fault(Fault::malformed_body(&format!("/nodes/{node}/storage")).times(1))
        .await;
    let e = client.storages().await.unwrap_err();
    assert!(
        matches!(&e, ProxmoxError::Decode { endpoint, .. } if endpoint == &format!("GET /nodes/{node}/storage")),
        "{e:?}"
    );

    sim.fault(Fault::drop_connection("/version").times(1)).await;
    let e = client.version().await.unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");

    sim.fault(Fault::http_500("/nodes", "simulated outage").times(1))
        .await;
    let e = client.nodes().await.unwrap_err();
    assert!(
        matches!(&e, ProxmoxError::Api { status: 500, message, .. } if message.contains("simulated outage")),
        "{e:?}"
    );
    // Faults with `times: 1` are spent; the next calls succeed.
    client.nodes().await.unwrap();
    client.version().await.unwrap();
}

/// A token with only VM.Audit: start is refused with 403 naming VM.PowerMgmt on the guest,
/// from the reason phrase (7.4) and from the body `message` (9.1). A token without VM.Backup
/// gets a UPID from vzdump and a task that fails on the permission check.
#[tokio::test]
async fn permission_failures_of_mutations() {
    for version in ["7.4", "9.1"] {
        let dir = tempfile::tempdir().unwrap();
        let secret = "9a8b7c6d-0000-1111-2222-restricted";
        let acl = acl_file(
            dir.path(),
            "felhom@pve!agent",
            secret,
            json!([
                {"path": "/vms", "privs": ["VM.Audit"], "propagate": true},
                {"path": "/storage", "privs": ["Datastore.AllocateSpace", "Datastore.Audit"], "propagate": true}
            ]),
        );
        let sim = Sim::start(&[
            "--guests",
            "6",
            "--task-seconds",
            "0.05",
            "--pve-version",
            version,
            "--acl",
            acl.to_str().unwrap(),
        ]);
        let mut cfg = sim.pinned();
        cfg.token_id = "felhom@pve!agent".into();
        cfg.token_secret = Secret::new(secret);
        let client = Client::new(&cfg, &sim.start.node).unwrap();
        let q = Queue::start(QueueConfig::default());
        let n = sim.plain_guest("lxc", "stopped").await;
        let v = vmid(n);

        let c = client.clone();
        let e = in_lane(&q, v, move |p| {
            Box::pin(async move { c.start(p, GuestKind::Lxc).await })
        })
        .await
        .unwrap_err();
        let ProxmoxError::PermissionDenied { denied, endpoint } = &e else {
            panic!("{version}: {e:?}")
        };
        assert_eq!(
            endpoint,
            &format!("POST /nodes/{}/lxc/{n}/status/start", sim.start.node)
        );
        assert_eq!(denied.path.as_deref(), Some(format!("/vms/{n}").as_str()));
        assert_eq!(denied.privileges, vec!["VM.PowerMgmt"]);
        assert!(
            e.to_string()
                .contains(&format!("grant VM.PowerMgmt on /vms/{n}")),
            "{version}: {e}"
        );

        // vzdump: VM.Backup is checked inside the task.
        let storage = client
            .storages()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.contents().any(|c| c == "backup"))
            .expect("a backup storage the token can see")
            .storage;
        let opts = VzdumpOptions {
            storage: Some(storage),
            ..Default::default()
        };
        let c = client.clone();
        let out = in_lane(&q, v, move |p| {
            Box::pin(async move { c.vzdump(p, &opts).await })
        })
        .await
        .unwrap();
        let VzdumpOutcome::Task(upid) = out else {
            panic!("{version}: vzdump returns a task even without VM.Backup")
        };
        let e = client.wait_task(&upid, fast()).await.unwrap_err();
        let ProxmoxError::TaskFailed { permission, .. } = &e else {
            panic!("{version}: {e:?}")
        };
        let permission = permission.as_ref().expect("a permission failure");
        assert_eq!(permission.privileges, vec!["VM.Backup"]);
        assert_eq!(
            permission.path.as_deref(),
            Some(format!("/vms/{n}").as_str())
        );
        assert!(e.to_string().contains("grant VM.Backup"), "{version}: {e}");
    }
}

/// A restore test's calls: a QEMU restore into a new vmid with config overrides, start,
/// the guest agent's ping, stop, and destroy with purge (the disks' space comes back).
#[tokio::test]
async fn qemu_restore_with_overrides_agent_ping_and_destroy() {
    use felhom_agent::proxmox::{ConfigValue, QemuRestoreOptions};
    let sim = Sim::start(&["--guests", "12", "--task-seconds", "0.05"]);
    let client = Client::new(&sim.pinned(), &sim.start.node).unwrap();
    let q = Queue::start(QueueConfig::default());
    let archive = client
        .backups("pbs-offsite", Some(vmid(103)))
        .await
        .unwrap()
        .into_iter()
        .max_by_key(|b| b.ctime)
        .expect("a backup of 103")
        .volid;
    let avail = |c: Client| async move {
        c.storages()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.storage == "local-lvm")
            .and_then(|s| s.avail)
            .unwrap()
    };
    let before = avail(client.clone()).await;
    let scratch = vmid(9901);
    let mut overrides = std::collections::BTreeMap::new();
    overrides.insert("name".to_string(), ConfigValue::from("vm103-restoretest"));
    overrides.insert("onboot".to_string(), ConfigValue::from(false));
    overrides.insert(
        "net0".to_string(),
        ConfigValue::from("virtio,bridge=vmbr0,link_down=1"),
    );
    let opts = QemuRestoreOptions {
        archive,
        storage: Some("local-lvm".into()),
        unique: true,
        overrides,
        ..Default::default()
    };
    let upid = task!(q, client, scratch, |c, p| c.qemu_restore(p, &opts));
    assert_eq!(upid.task_type(), "qmrestore");
    client.wait_task(&upid, fast()).await.unwrap();
    let cfg = client.guest_config(GuestKind::Qemu, scratch).await.unwrap();
    assert_eq!(cfg.str("name").unwrap(), Some("vm103-restoretest"));
    assert_eq!(cfg.onboot().unwrap(), Some(false));
    assert!(
        cfg.net0().unwrap().unwrap().contains("link_down=1"),
        "{:?}",
        cfg.net0()
    );
    assert!(avail(client.clone()).await < before);

    // The ping needs a running VM.
    let c = client.clone();
    let e = in_lane(&q, scratch, move |p| {
        Box::pin(async move { c.agent_ping(p).await })
    })
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ProxmoxError::Api { status: 500, message, .. } if message.contains("VM 9901 is not running")),
        "{e:?}"
    );
    let upid = task!(q, client, scratch, |c, p| c.start(p, GuestKind::Qemu));
    client.wait_task(&upid, fast()).await.unwrap();
    let c = client.clone();
    in_lane(&q, scratch, move |p| {
        Box::pin(async move { c.agent_ping(p).await })
    })
    .await
    .unwrap();

    // A running VM is not destroyed; a stopped one is, with its disks.
    let c = client.clone();
    let e = in_lane(&q, scratch, move |p| {
        Box::pin(async move { c.destroy(p, GuestKind::Qemu, true, true).await })
    })
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ProxmoxError::Api { status: 500, message, .. } if message.contains("is running - destroy failed")),
        "{e:?}"
    );
    let upid = task!(q, client, scratch, |c, p| c.stop(p, GuestKind::Qemu));
    client.wait_task(&upid, fast()).await.unwrap();
    let upid = task!(q, client, scratch, |c, p| c.destroy(
        p,
        GuestKind::Qemu,
        true,
        true
    ));
    assert_eq!(upid.task_type(), "qmdestroy");
    client.wait_task(&upid, fast()).await.unwrap();
    assert!(client.guest_config(GuestKind::Qemu, scratch).await.is_err());
    assert_eq!(avail(client.clone()).await, before);
    let req = sim
        .log()
        .await
        .into_iter()
        .rfind(|r| r.method == "DELETE")
        .unwrap();
    assert_eq!(req.params.get("purge").map(String::as_str), Some("1"));
    assert_eq!(
        req.params
            .get("destroy-unreferenced-disks")
            .map(String::as_str),
        Some("1")
    );
}

/// An LXC restore sends its overrides (a network interface detached) with the call.
#[tokio::test]
async fn lxc_restore_sends_its_config_overrides() {
    use felhom_agent::proxmox::ConfigValue;
    let sim = Sim::start(&["--guests", "12", "--task-seconds", "0.05"]);
    let client = Client::new(&sim.pinned(), &sim.start.node).unwrap();
    let q = Queue::start(QueueConfig::default());
    let archive = client
        .backups("local", Some(vmid(101)))
        .await
        .unwrap()
        .into_iter()
        .max_by_key(|b| b.ctime)
        .expect("a backup of 101")
        .volid;
    let mut overrides = std::collections::BTreeMap::new();
    overrides.insert("hostname".to_string(), ConfigValue::from("x-restoretest"));
    overrides.insert(
        "net0".to_string(),
        ConfigValue::from("name=eth0,bridge=vmbr0,link_down=1"),
    );
    let opts = RestoreOptions {
        archive,
        storage: Some("local-lvm".into()),
        unique: true,
        overrides,
        ..Default::default()
    };
    let scratch = vmid(9900);
    let upid = task!(q, client, scratch, |c, p| c.lxc_restore(p, &opts));
    client.wait_task(&upid, fast()).await.unwrap();
    let cfg = client.guest_config(GuestKind::Lxc, scratch).await.unwrap();
    assert_eq!(cfg.hostname().unwrap(), Some("x-restoretest"));
    assert!(cfg.net0().unwrap().unwrap().contains("link_down=1"));
    let upid = task!(q, client, scratch, |c, p| c.destroy(
        p,
        GuestKind::Lxc,
        true,
        true
    ));
    assert_eq!(upid.task_type(), "vzdestroy");
    client.wait_task(&upid, fast()).await.unwrap();
    assert!(client.guest_config(GuestKind::Lxc, scratch).await.is_err());
}
