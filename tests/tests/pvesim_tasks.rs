//! Tasks: lifecycle and UPID format, reboot, the task list with its filters, vzdump (locks, OK
//! answers, VM.Backup inside the task, the archive in storage), restore, snapshots, HA
//! and locked guests, and tasks finishing without any client.

#[path = "pvesim_common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn upid_of(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a UPID: {v}"))
        .to_owned()
}

#[tokio::test]
async fn lifecycle_and_upid_format() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.3"]);
    let re = regex_lite::Regex::new(UPID_RE).unwrap();
    for s in fixture("upid-samples.json")["samples"].as_array().unwrap() {
        assert!(re.is_match(s["upid"].as_str().unwrap()), "{s}");
    }
    let upid = upid_of(
        &api(&sim, "POST", "/nodes/pve1/lxc/102/status/start", &[])
            .await
            .data(),
    );
    let c = re.captures(&upid).expect("PVE regex");
    assert_eq!(&c[1], "pve1");
    assert_eq!((&c[6], &c[7], &c[8]), ("vzstart", "102", "root@pam!felhom"));
    assert_eq!(c[3].len(), 8);
    let status = get(&sim, &format!("/nodes/pve1/tasks/{}/status", enc(&upid))).await;
    assert_eq!(status["status"], "running");
    assert_eq!(
        status["pid"],
        json!(u64::from_str_radix(&c[3], 16).unwrap())
    );
    assert_eq!(
        status["starttime"],
        json!(u64::from_str_radix(&c[5], 16).unwrap())
    );
    assert!(status.get("exitstatus").is_none());
    // The guest changes only when the task ends.
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/102/status/current").await["status"],
        "stopped"
    );
    let done = sim.wait_task(&upid, Duration::from_secs(10)).await.unwrap();
    assert_eq!(done["exitstatus"], "OK");
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/102/status/current").await["status"],
        "running"
    );
    let log = api(
        &sim,
        "GET",
        &format!("/nodes/pve1/tasks/{}/log", enc(&upid)),
        &[],
    )
    .await
    .json();
    assert_eq!(
        log["data"].as_array().unwrap().last().unwrap()["t"],
        "TASK OK"
    );
    assert_eq!(log["total"], json!(log["data"].as_array().unwrap().len()));
    // Raw (unencoded) UPIDs in the path work too.
    assert_eq!(
        get(&sim, &format!("/nodes/pve1/tasks/{upid}/status")).await["status"],
        "stopped"
    );
    let r = api(&sim, "GET", "/nodes/pve1/tasks/garbage/status", &[]).await;
    assert_eq!(r.json()["errors"]["upid"], "unable to parse worker upid");
}

#[tokio::test]
async fn task_errors_come_only_once_stopped() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    // Locked CT: start returns a UPID, the task fails.
    let st = run_task(&sim, "POST", "/nodes/pve1/lxc/105/status/start", &[]).await;
    assert_eq!(st["exitstatus"], "CT is locked (backup)");
    // Missing CT: start forks, stop is refused at once (check_running).
    let st = run_task(&sim, "POST", "/nodes/pve1/lxc/999/status/start", &[]).await;
    assert_eq!(
        st["exitstatus"],
        "Configuration file 'nodes/pve1/lxc/999.conf' does not exist"
    );
    let r = api(&sim, "POST", "/nodes/pve1/lxc/999/status/stop", &[]).await;
    assert_eq!(r.reason.as_deref(), Some("CT 999 not running"));
    // QEMU: already running is a task error.
    let st = run_task(&sim, "POST", "/nodes/pve1/qemu/103/status/start", &[]).await;
    assert_eq!(st["exitstatus"], "VM 103 already running");
    assert_eq!(st["type"], "qmstart");
    let st = run_task(&sim, "POST", "/nodes/pve1/qemu/106/status/start", &[]).await;
    assert_eq!(st["exitstatus"], "you can't start a vm if it's a template");
}

#[tokio::test]
async fn reboot_restarts_a_running_guest_in_a_task_and_applies_pending_values() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.3"]);
    let re = regex_lite::Regex::new(UPID_RE).unwrap();
    // A value that stays pending on a running CT until it starts again.
    api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/101/config",
        &[("ostype", "ubuntu")],
    )
    .await
    .data();
    let before = get(&sim, "/nodes/pve1/lxc/101/status/current").await;
    assert_eq!(before["status"], "running");
    let upid = upid_of(
        &api(
            &sim,
            "POST",
            "/nodes/pve1/lxc/101/status/reboot",
            &[("timeout", "30")],
        )
        .await
        .data(),
    );
    let c = re.captures(&upid).expect("PVE regex");
    assert_eq!(
        (&c[6], &c[7], &c[8]),
        ("vzreboot", "101", "root@pam!felhom")
    );
    // Nothing changes until the task ends.
    let during = get(&sim, "/nodes/pve1/lxc/101/status/current").await;
    assert_eq!(
        (during["status"].clone(), during["pid"].clone()),
        (json!("running"), before["pid"].clone())
    );
    let done = sim.wait_task(&upid, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        (done["type"].clone(), done["exitstatus"].clone()),
        (json!("vzreboot"), json!("OK"))
    );
    let after = get(&sim, "/nodes/pve1/lxc/101/status/current").await;
    assert_eq!(after["status"], "running");
    assert_ne!(after["pid"], before["pid"], "a new init process");
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/101/config?current=1").await["ostype"],
        "ubuntu",
        "the restart applied the pending value"
    );
    // QEMU: qmreboot, timeout optional.
    let st = run_task(&sim, "POST", "/nodes/pve1/qemu/103/status/reboot", &[]).await;
    assert_eq!(
        (
            st["type"].clone(),
            st["id"].clone(),
            st["exitstatus"].clone()
        ),
        (json!("qmreboot"), json!("103"), json!("OK"))
    );
    assert_eq!(
        get(&sim, "/nodes/pve1/qemu/103/status/current").await["status"],
        "running"
    );
    // A locked guest: the task forks and fails on the lock, as stop's does.
    sim.set_guest(101, json!({"lock": "snapshot"}))
        .await
        .unwrap();
    let st = run_task(&sim, "POST", "/nodes/pve1/lxc/101/status/reboot", &[]).await;
    assert_eq!(
        (st["type"].clone(), st["exitstatus"].clone()),
        (json!("vzreboot"), json!("CT is locked (snapshot)"))
    );
}

#[tokio::test]
async fn reboot_of_a_guest_that_is_not_running_is_refused_before_any_task() {
    let dir = tempfile::tempdir().unwrap();
    let acl = write_acl(
        &dir,
        &json!({"tokens": [{"token_id": "felhom@pve!agent", "secret": "s", "acl": [
            {"path": "/vms", "privs": ["VM.Audit"]}]}]}),
    );
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05", "--acl", &acl]);
    let post = |path: &'static str, form: &'static [(&'static str, &'static str)]| {
        let sim = &sim;
        async move { api(sim, "POST", path, form).await }
    };
    let tasks = || async {
        sim.state().await.unwrap()["tasks"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = tasks().await;
    // Stopped CT, stopped VM: PVE's synchronous 500, as for shutdown.
    let r = post("/nodes/pve1/lxc/102/status/reboot", &[]).await;
    assert_eq!(
        (r.status, r.reason.as_deref()),
        (500, Some("CT 102 not running"))
    );
    let r = post("/nodes/pve1/qemu/106/status/reboot", &[]).await;
    assert_eq!(
        (r.status, r.reason.as_deref()),
        (500, Some("VM 106 not running"))
    );
    let r = post("/nodes/pve1/qemu/999/status/reboot", &[]).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Configuration file 'nodes/pve1/qemu-server/999.conf' does not exist")
    );
    // The schema: only `timeout` (an integer ≥ 0); no `skiplock` on reboot.
    let r = post("/nodes/pve1/lxc/101/status/reboot", &[("skiplock", "1")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["errors"]["skiplock"],
        "property is not defined in schema and the schema does not allow additional properties"
    );
    let r = post("/nodes/pve1/qemu/103/status/reboot", &[("timeout", "-1")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["errors"]["timeout"],
        "value must have a minimum value of 0"
    );
    // VM.PowerMgmt, checked before anything else.
    let agent = token_header("felhom@pve!agent", "s");
    let r = call(
        &sim,
        Some(&agent),
        "POST",
        "/nodes/pve1/lxc/101/status/reboot",
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.reason.as_deref()),
        (
            403,
            Some("Permission check failed (/vms/101, VM.PowerMgmt)")
        )
    );
    assert_eq!(tasks().await, before, "no task was started");
}

#[tokio::test]
async fn ha_managed_guests_use_ha_tasks() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let st = run_task(
        &sim,
        "POST",
        "/nodes/pve1/lxc/104/status/shutdown",
        &[("timeout", "30")],
    )
    .await;
    assert_eq!(
        (st["type"].clone(), st["exitstatus"].clone()),
        (json!("hastop"), json!("OK"))
    );
    let cur = get(&sim, "/nodes/pve1/lxc/104/status/current").await;
    assert_eq!(cur["status"], "stopped");
    assert_eq!(cur["ha"], json!({"managed": 1, "state": "stopped"}));
    let st = run_task(&sim, "POST", "/nodes/pve1/lxc/104/status/start", &[]).await;
    assert_eq!(st["type"], "hastart");
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/lxc/104/status/stop",
        &[("overrule-shutdown", "1")],
    )
    .await;
    assert_eq!(
        r.json()["errors"]["overrule-shutdown"],
        "Not applicable for HA resources."
    );
}

#[tokio::test]
async fn overrule_shutdown_kills_the_running_shutdown() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.5"]);
    let shutdown = upid_of(
        &api(&sim, "POST", "/nodes/pve1/lxc/101/status/shutdown", &[])
            .await
            .data(),
    );
    let stop = upid_of(
        &api(
            &sim,
            "POST",
            "/nodes/pve1/lxc/101/status/stop",
            &[("overrule-shutdown", "1")],
        )
        .await
        .data(),
    );
    let s = get(
        &sim,
        &format!("/nodes/pve1/tasks/{}/status", enc(&shutdown)),
    )
    .await;
    assert_eq!(
        (s["status"].clone(), s["exitstatus"].clone()),
        (json!("stopped"), json!("received interrupt"))
    );
    assert_eq!(
        sim.wait_task(&stop, Duration::from_secs(10)).await.unwrap()["exitstatus"],
        "OK"
    );
}

#[tokio::test]
async fn task_list_filters() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    run_task(&sim, "POST", "/nodes/pve1/lxc/102/status/start", &[]).await;
    run_task(&sim, "POST", "/nodes/pve1/lxc/105/status/start", &[]).await; // fails: locked
    run_task(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/snapshot",
        &[("snapname", "t1")],
    )
    .await;
    sim.settings(Some(2.0), None).await.unwrap();
    let running = upid_of(
        &api(&sim, "POST", "/nodes/pve1/lxc/102/status/stop", &[])
            .await
            .data(),
    );

    let list = api(&sim, "GET", "/nodes/pve1/tasks", &[]).await.json();
    assert_eq!(list["total"], 3, "archive by default: {list}");
    let first = &list["data"][0];
    for k in [
        "upid",
        "node",
        "pid",
        "pstart",
        "starttime",
        "type",
        "id",
        "user",
        "endtime",
        "status",
    ] {
        assert!(first.get(k).is_some(), "{k} missing in {first}");
    }
    assert_eq!(first["user"], "root@pam");
    assert_eq!(first["tokenid"], "felhom");
    assert_eq!(first["type"], "vzsnapshot", "newest first");

    let q = |pairs: Vec<(&'static str, &'static str)>| {
        let sim = &sim;
        async move { api(sim, "GET", "/nodes/pve1/tasks", &pairs).await.json() }
    };
    assert_eq!(
        q(vec![("errors", "1")]).await["data"][0]["status"],
        "CT is locked (backup)"
    );
    assert_eq!(q(vec![("typefilter", "vzstart")]).await["total"], 2);
    assert_eq!(q(vec![("vmid", "105")]).await["total"], 1);
    assert_eq!(q(vec![("statusfilter", "ok")]).await["total"], 2);
    assert_eq!(q(vec![("statusfilter", "error,warning")]).await["total"], 1);
    assert_eq!(q(vec![("userfilter", "root@pam")]).await["total"], 3);
    let none = q(vec![("userfilter", "nobody")]).await;
    assert_eq!(none, json!({"data": []}), "PVE omits a zero total");
    let page = q(vec![("start", "1"), ("limit", "1")]).await;
    assert_eq!(
        (
            page["total"].clone(),
            page["data"].as_array().unwrap().len()
        ),
        (json!(3), 1)
    );
    assert_eq!(q(vec![("since", "4000000000")]).await["data"], json!([]));
    assert_eq!(q(vec![("until", "1")]).await["data"], json!([]));
    let active = q(vec![("source", "active")]).await;
    assert_eq!(active["total"], 1);
    let a = &active["data"][0];
    assert_eq!(
        (a["upid"].as_str(), a["status"].as_str()),
        (Some(running.as_str()), Some("RUNNING"))
    );
    assert_eq!(a["user"], "root@pam!felhom");
    assert!(a.get("endtime").is_none());
    assert_eq!(q(vec![("source", "all")]).await["total"], 4);
    assert_eq!(
        api(&sim, "GET", "/nodes/pve1/tasks", &[("source", "bogus")])
            .await
            .status,
        400
    );
    // DELETE stops a running task.
    api(
        &sim,
        "DELETE",
        &format!("/nodes/pve1/tasks/{}", enc(&running)),
        &[],
    )
    .await
    .data();
    let s = get(&sim, &format!("/nodes/pve1/tasks/{}/status", enc(&running))).await;
    assert_eq!(s["exitstatus"], "received interrupt");
}

#[tokio::test]
async fn tokens_see_only_their_tasks_without_sys_audit() {
    let dir = tempfile::tempdir().unwrap();
    let acl = write_acl(
        &dir,
        &json!({"tokens": [{"token_id": "felhom@pve!agent", "secret": "s", "acl": [
            {"path": "/vms", "roles": ["PVEVMUser"]}]}]}),
    );
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05", "--acl", &acl]);
    let agent = token_header("felhom@pve!agent", "s");
    let mine = upid_of(
        &call(
            &sim,
            Some(&agent),
            "POST",
            "/nodes/pve1/lxc/102/status/start",
            &[],
        )
        .await
        .data(),
    );
    let theirs = upid_of(
        &api(&sim, "POST", "/nodes/pve1/lxc/101/status/shutdown", &[])
            .await
            .data(),
    );
    sim.wait_task(&mine, Duration::from_secs(5)).await.unwrap();
    sim.wait_task(&theirs, Duration::from_secs(5))
        .await
        .unwrap();
    let r = call(
        &sim,
        Some(&agent),
        "GET",
        &format!("/nodes/pve1/tasks/{}/status", enc(&mine)),
        &[],
    )
    .await;
    assert_eq!(r.data()["tokenid"], "agent");
    let r = call(
        &sim,
        Some(&agent),
        "GET",
        &format!("/nodes/pve1/tasks/{}/status", enc(&theirs)),
        &[],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Permission check failed (/nodes/pve1, Sys.Audit)")
    );
    let r = call(&sim, Some(&agent), "GET", "/nodes/pve1/tasks", &[])
        .await
        .json();
    assert_eq!(r["total"], 1);
}

#[tokio::test]
async fn vzdump_locks_backs_up_and_answers_ok() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.4"]);
    let upid = upid_of(
        &api(
            &sim,
            "POST",
            "/nodes/pve1/vzdump",
            &[
                ("vmid", "101"),
                ("storage", "nas-backup"),
                ("compress", "zstd"),
                ("mode", "snapshot"),
                ("notes-template", "{{guestname}} on {{node}}"),
            ],
        )
        .await
        .data(),
    );
    assert!(upid.contains(":vzdump:101:"), "{upid}");
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/101/config").await["lock"],
        "backup"
    );
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/101/config",
        &[("onboot", "1")],
    )
    .await;
    assert_eq!(r.reason.as_deref(), Some("CT is locked (backup)"));
    let done = sim.wait_task(&upid, Duration::from_secs(10)).await.unwrap();
    assert_eq!(done["exitstatus"], "OK");
    assert!(
        get(&sim, "/nodes/pve1/lxc/101/config")
            .await
            .get("lock")
            .is_none()
    );
    let content = get(
        &sim,
        "/nodes/pve1/storage/nas-backup/content?content=backup&vmid=101",
    )
    .await;
    let b = &content[0];
    assert!(
        b["volid"]
            .as_str()
            .unwrap()
            .starts_with("nas-backup:backup/vzdump-lxc-101-")
    );
    assert!(b["volid"].as_str().unwrap().ends_with(".tar.zst"));
    assert!(b["notes"].as_str().unwrap().ends_with(" on pve1"));
    let log = get(&sim, &format!("/nodes/pve1/tasks/{}/log", enc(&upid))).await;
    let lines: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["t"].as_str().unwrap())
        .collect();
    let archive = lines
        .iter()
        .find(|l| l.starts_with("INFO: creating vzdump archive '"))
        .expect("archive line");
    assert!(
        archive.contains("/mnt/pve/nas-backup/dump/vzdump-lxc-101-"),
        "{archive}"
    );

    // "OK" instead of a UPID.
    assert_eq!(get_post(&sim, &[("stop", "1")]).await, json!("OK"));
    assert_eq!(get_post(&sim, &[("pool", "empty")]).await, json!("OK"));
    // A guest the cluster places on another node is skipped silently: "OK" too.
    let moved = sim.set_guest(104, json!({"node": "pve2"})).await.unwrap();
    assert_eq!(moved, json!({"vmid": 104, "type": "lxc", "node": "pve2"}));
    let tasks_before = sim.state().await.unwrap()["tasks"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(get_post(&sim, &[("vmid", "104")]).await, json!("OK"));
    assert_eq!(
        sim.state().await.unwrap()["tasks"]
            .as_array()
            .unwrap()
            .len(),
        tasks_before
    );
    // It has left this node's API; its vmid is still taken in the cluster.
    let list = get(&sim, "/nodes/pve1/lxc").await;
    assert!(!list.as_array().unwrap().iter().any(|g| g["vmid"] == 104));
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "104"),
            (
                "ostemplate",
                "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
            ),
        ],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("CT 104 already exists on node 'pve2'")
    );
    // Mixed with a local guest: only the local one is backed up.
    let st = run_task(&sim, "POST", "/nodes/pve1/vzdump", &[("vmid", "104,102")]).await;
    assert_eq!(st["exitstatus"], "OK");
    // Multiple guests: empty id; an unknown guest fails the job visibly.
    let st = run_task(&sim, "POST", "/nodes/pve1/vzdump", &[("vmid", "102,999")]).await;
    assert_eq!(st["id"], "");
    assert_eq!(st["exitstatus"], "job errors");
    // Locked guest: job errors too.
    let st = run_task(&sim, "POST", "/nodes/pve1/vzdump", &[("vmid", "105")]).await;
    assert_eq!(st["exitstatus"], "job errors");
    // Parameter rules.
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/vzdump",
        &[("vmid", "101"), ("tmpdir", "/tmp")],
    )
    .await;
    assert_eq!(
        r.json()["errors"]["tmpdir"],
        "Only root may set this option."
    );
    let r = api(&sim, "POST", "/nodes/pve1/vzdump", &[]).await;
    assert_eq!(r.json()["errors"]["vmid"], "property is missing");
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/vzdump",
        &[("vmid", "101"), ("all", "1")],
    )
    .await;
    assert_eq!(
        r.json()["errors"]["all"],
        "option conflicts with option 'vmid'"
    );
}

async fn get_post(sim: &felhom_testbed::harness::PveSim, form: &[(&str, &str)]) -> Value {
    api(sim, "POST", "/nodes/pve1/vzdump", form).await.data()
}

#[tokio::test]
async fn vzdump_checks_vm_backup_inside_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let acl = write_acl(
        &dir,
        &json!({"tokens": [{"token_id": "felhom@pve!agent", "secret": "s", "acl": [
            {"path": "/vms", "privs": ["VM.Audit"]},
            {"path": "/storage", "roles": ["PVEDatastoreUser"]}]}]}),
    );
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05", "--acl", &acl]);
    let agent = token_header("felhom@pve!agent", "s");
    let r = call(
        &sim,
        Some(&agent),
        "POST",
        "/nodes/pve1/vzdump",
        &[("vmid", "101"), ("storage", "local")],
    )
    .await;
    let upid = upid_of(&r.data());
    let st = sim.wait_task(&upid, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        st["exitstatus"],
        "Permission check failed (/vms/101, VM.Backup)"
    );
    assert!(
        get(&sim, "/nodes/pve1/lxc/101/config")
            .await
            .get("lock")
            .is_none()
    );
    // Without Datastore.AllocateSpace the POST itself is refused.
    let dir2 = tempfile::tempdir().unwrap();
    let acl2 = write_acl(
        &dir2,
        &json!({"tokens": [{"token_id": "x@pve!y", "secret": "s", "acl": [{"path": "/vms", "roles": ["PVEVMAdmin"]}]}]}),
    );
    let sim2 = spawn(&["--guests", "2", "--acl", &acl2]);
    let r = call(
        &sim2,
        Some(&token_header("x@pve!y", "s")),
        "POST",
        "/nodes/pve1/vzdump",
        &[("vmid", "101")],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Permission check failed (/storage/local, Datastore.AllocateSpace)")
    );
}

#[tokio::test]
async fn restore_from_a_backup() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let backups = get(
        &sim,
        "/nodes/pve1/storage/local/content?content=backup&vmid=102",
    )
    .await;
    let volid = backups[0]["volid"].as_str().unwrap().to_owned();
    let before = get(&sim, "/nodes/pve1/lxc/102/config").await;
    let restore = [
        ("vmid", "102"),
        ("ostemplate", volid.as_str()),
        ("restore", "1"),
        ("storage", "local-lvm"),
    ];
    let r = api(&sim, "POST", "/nodes/pve1/lxc", &restore).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("CT 102 already exists on node 'pve1'")
    );
    let mut forced = restore.to_vec();
    forced.push(("force", "1"));
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "101"),
            ("ostemplate", volid.as_str()),
            ("restore", "1"),
            ("force", "1"),
            ("storage", "local-lvm"),
        ],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("can't overwrite running container")
    );
    let upid = upid_of(&api(&sim, "POST", "/nodes/pve1/lxc", &forced).await.data());
    assert!(upid.contains(":vzrestore:102:"));
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/102/config").await["lock"],
        "create"
    );
    let st = sim.wait_task(&upid, Duration::from_secs(5)).await.unwrap();
    assert_eq!(st["exitstatus"], "OK");
    let after = get(&sim, "/nodes/pve1/lxc/102/config").await;
    assert_eq!(after["hostname"], before["hostname"]);
    assert_eq!(
        after["rootfs"].as_str().unwrap().split(',').next(),
        Some("local-lvm:vm-102-disk-0")
    );
    assert!(after.get("lock").is_none());
    // Restore to a new vmid, default storage 'local' cannot hold containers.
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "150"),
            ("ostemplate", volid.as_str()),
            ("restore", "1"),
        ],
    )
    .await;
    assert_eq!(
        r.json()["errors"]["storage"],
        "storage 'local' does not support container directories"
    );
    let st = run_task(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "150"),
            ("ostemplate", volid.as_str()),
            ("restore", "1"),
            ("storage", "local-lvm"),
            ("start", "1"),
            ("unique", "1"),
        ],
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/150/status/current").await["status"],
        "running"
    );
    // A backup that does not exist fails in the task, and the new CT disappears.
    let st = run_task(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "151"),
            (
                "ostemplate",
                "local:backup/vzdump-lxc-151-2020_01_01-00_00_00.tar.zst",
            ),
            ("restore", "1"),
            ("storage", "local-lvm"),
        ],
    )
    .await;
    assert!(
        st["exitstatus"]
            .as_str()
            .unwrap()
            .starts_with("unable to restore CT 151 - "),
        "{st}"
    );
    assert_eq!(
        api(&sim, "GET", "/nodes/pve1/lxc/151/config", &[])
            .await
            .status,
        500
    );
}

#[tokio::test]
async fn snapshot_lifecycle() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.3"]);
    let upid = upid_of(
        &api(
            &sim,
            "POST",
            "/nodes/pve1/lxc/101/snapshot",
            &[("snapname", "before-x"), ("description", "pre")],
        )
        .await
        .data(),
    );
    let list = get(&sim, "/nodes/pve1/lxc/101/snapshot").await;
    let prep = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "before-x")
        .unwrap();
    assert_eq!(prep["snapstate"], "prepare");
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/101/config").await["lock"],
        "snapshot"
    );
    sim.wait_task(&upid, Duration::from_secs(5)).await.unwrap();
    let cfg = get(&sim, "/nodes/pve1/lxc/101/config").await;
    assert_eq!(cfg["parent"], "before-x");
    assert!(cfg.get("lock").is_none());
    let list = get(&sim, "/nodes/pve1/lxc/101/snapshot").await;
    let s = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "before-x")
        .unwrap();
    assert_eq!(
        (s["description"].clone(), s["parent"].clone()),
        (json!("pre\n"), json!("nightly"))
    );
    sim.settings(Some(0.05), None).await.unwrap();
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/snapshot",
        &[("snapname", "current")],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("unable to use snapshot name 'current' (reserved name)")
    );
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/snapshot",
        &[("snapname", "1bad")],
    )
    .await;
    assert_eq!(
        r.json()["errors"]["snapname"],
        "invalid format - invalid configuration ID '1bad'\n"
    );
    let st = run_task(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/snapshot",
        &[("snapname", "before-x")],
    )
    .await;
    assert_eq!(st["exitstatus"], "snapshot name 'before-x' already used");
    let st = run_task(
        &sim,
        "POST",
        "/nodes/pve1/lxc/102/snapshot",
        &[("snapname", "s1")],
    )
    .await;
    assert_eq!(st["exitstatus"], "snapshot feature is not available");
    // Change the config, roll back: the snapshot's config returns, the CT is stopped.
    api(&sim, "PUT", "/nodes/pve1/lxc/101/config", &[("cores", "7")])
        .await
        .data();
    let st = run_task(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/snapshot/before-x/rollback",
        &[],
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    let cfg = get(&sim, "/nodes/pve1/lxc/101/config").await;
    assert_ne!(cfg["cores"], 7);
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/101/status/current").await["status"],
        "stopped"
    );
    run_task(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/snapshot/nightly/rollback",
        &[("start", "1")],
    )
    .await;
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/101/status/current").await["status"],
        "running"
    );
    // Delete: children are re-parented.
    let st = run_task(&sim, "DELETE", "/nodes/pve1/lxc/101/snapshot/nightly", &[]).await;
    assert_eq!(st["type"], "vzdelsnapshot");
    let list = get(&sim, "/nodes/pve1/lxc/101/snapshot").await;
    let s = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "before-x")
        .unwrap();
    assert_eq!(s["parent"], "pre-upgrade");
    let st = run_task(&sim, "DELETE", "/nodes/pve1/lxc/101/snapshot/nope", &[]).await;
    assert_eq!(st["exitstatus"], "snapshot 'nope' does not exist");
}

#[tokio::test]
async fn tasks_finish_without_any_client() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.3"]);
    let upid = {
        // A separate client that goes away right after the POST.
        let client = felhom_testbed::harness::build_client(sim.ca_pem()).unwrap();
        let r = client
            .post(sim.api_url("/nodes/pve1/lxc/102/status/start"))
            .header("Authorization", sim.auth_header())
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        upid_of(&v["data"])
    };
    // The (archive) list is read until the task is in it, ended (generously: its 0.3 s
    // may stretch on a loaded machine); nobody polls the task itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    let t = loop {
        let list = api(&sim, "GET", "/nodes/pve1/tasks", &[("vmid", "102")])
            .await
            .json();
        let found = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["upid"] == json!(upid))
            .cloned();
        if let Some(t) = found {
            break t;
        }
        assert!(Instant::now() < deadline, "never in the list: {list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(t["status"], "OK", "{t}");
    assert!(t["endtime"].as_u64().unwrap() >= t["starttime"].as_u64().unwrap());
}

#[tokio::test]
async fn many_short_tasks_all_finish() {
    let sim = spawn(&["--guests", "30", "--task-seconds", "0.01"]);
    let mut upids = Vec::new();
    for i in 0..40 {
        let vmid = 101 + (i % 30);
        let r = api(
            &sim,
            "POST",
            "/nodes/pve1/vzdump",
            &[("vmid", &vmid.to_string()), ("storage", "local")],
        )
        .await;
        upids.push(upid_of(&r.data()));
    }
    for u in &upids {
        sim.wait_task(u, Duration::from_secs(20)).await.unwrap();
    }
    let all = sim.state().await.unwrap();
    let running = all["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["status"] == "running")
        .count();
    assert_eq!(running, 0);
    let mut seen = std::collections::HashSet::new();
    assert!(
        upids.iter().all(|u| seen.insert(u.clone())),
        "UPIDs are unique"
    );
}
