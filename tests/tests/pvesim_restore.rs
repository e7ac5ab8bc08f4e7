//! Restores into new guests (LXC `vzrestore`, QEMU `qmrestore`) with their backed-up
//! config and the call's overrides, the space they take on the target storage, their
//! time, the control flags (corrupt archive, guest that does not start, full storage)
//! and destroy freeing the space again, all over the real binary and HTTP.

#[path = "pvesim_common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use felhom_testbed::harness::PveSim;
use serde_json::{Value, json};

const GIB: u64 = 1 << 30;

fn upid_of(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a UPID: {v}"))
        .to_owned()
}

/// A control call with the admin token; answers (status, JSON body).
async fn control(sim: &PveSim, method: &str, path: &str, body: Value) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let resp = sim
        .client()
        .request(m, format!("{}{path}", sim.url()))
        .header("Authorization", format!("Bearer {}", sim.admin_token()))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn set_volume(sim: &PveSim, volid: &str, flags: Value) {
    let (status, body) = control(sim, "PUT", &format!("/_sim/volumes/{}", enc(volid)), flags).await;
    assert_eq!(status, 200, "{body}");
}

async fn avail(sim: &PveSim, storage: &str) -> u64 {
    get(sim, &format!("/nodes/pve1/storage?storage={storage}")).await[0]["avail"]
        .as_u64()
        .unwrap()
}

async fn backup_of(sim: &PveSim, storage: &str, vmid: u32) -> String {
    let items = get(
        sim,
        &format!("/nodes/pve1/storage/{storage}/content?content=backup&vmid={vmid}"),
    )
    .await;
    items[0]["volid"].as_str().unwrap().to_owned()
}

async fn task_log(sim: &PveSim, upid: &str) -> Vec<String> {
    let log = get(
        sim,
        &format!("/nodes/pve1/tasks/{}/log?limit=500", enc(upid)),
    )
    .await;
    log.as_array()
        .unwrap()
        .iter()
        .map(|l| l["t"].as_str().unwrap().to_owned())
        .collect()
}

/// Starts a task, checks its UPID against PVE's regex (type, id, user), waits for it.
async fn task(
    sim: &PveSim,
    method: &str,
    path: &str,
    form: &[(&str, &str)],
    wtype: &str,
    id: &str,
) -> (String, Value) {
    let upid = upid_of(&api(sim, method, path, form).await.data());
    let c = regex_lite::Regex::new(UPID_RE)
        .unwrap()
        .captures(&upid)
        .unwrap_or_else(|| panic!("not a PVE UPID: {upid}"));
    assert_eq!((&c[6], &c[7], &c[8]), (wtype, id, "root@pam!felhom"));
    let st = sim.wait_task(&upid, Duration::from_secs(30)).await.unwrap();
    (upid, st)
}

fn prop(s: &Value, key: &str) -> String {
    s.as_str()
        .unwrap_or_else(|| panic!("not a string: {s}"))
        .split(',')
        .find_map(|p| p.strip_prefix(&format!("{key}=")))
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn lxc_restore_into_a_new_guest_applies_overrides_uses_space_and_destroy_frees_it() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let volid = backup_of(&sim, "local", 101).await;
    let orig = get(&sim, "/nodes/pve1/lxc/101/config").await;
    let root_size =
        felhom_testbed::pvesim::guest::volume_size(orig["rootfs"].as_str().unwrap()).unwrap();
    let before = avail(&sim, "local-lvm").await;
    let (upid, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "9900"),
            ("ostemplate", &volid),
            ("restore", "1"),
            ("storage", "local-lvm"),
            ("unique", "1"),
            ("start", "0"),
            ("onboot", "0"),
            ("hostname", "web01-restoretest"),
            ("description", "restore test of an archive"),
            ("net0", "name=eth0,bridge=vmbr0,link_down=1"),
        ],
        "vzrestore",
        "9900",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK", "{st}");
    let log = task_log(&sim, &upid).await;
    assert_eq!(log[0], format!("restoring '{volid}' now.."));
    assert_eq!(log.last().unwrap(), "TASK OK");
    let c = get(&sim, "/nodes/pve1/lxc/9900/config").await;
    assert_eq!(c["hostname"], "web01-restoretest");
    assert_eq!(c["onboot"], 0);
    assert_eq!(c["description"], "restore test of an archive\n");
    assert_eq!(prop(&c["net0"], "link_down"), "1", "{c}");
    assert_ne!(prop(&c["net0"], "hwaddr"), prop(&orig["net0"], "hwaddr"));
    // The backed-up config, with the root disk a new volume of the same size.
    assert_eq!(c["memory"], orig["memory"]);
    assert_eq!(c["unprivileged"], orig["unprivileged"]);
    assert_eq!(
        c["rootfs"],
        format!("local-lvm:vm-9900-disk-0,size={}G", root_size >> 30)
    );
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/9900/status/current").await["status"],
        "stopped"
    );
    assert_eq!(avail(&sim, "local-lvm").await, before - root_size);

    // Destroy, as a restore test does: the disk's space comes back, the backup stays.
    let (upid, st) = task(
        &sim,
        "DELETE",
        "/nodes/pve1/lxc/9900",
        &[("purge", "1"), ("destroy-unreferenced-disks", "1")],
        "vzdestroy",
        "9900",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK", "{st}");
    assert!(
        task_log(&sim, &upid)
            .await
            .contains(&"  Logical volume \"vm-9900-disk-0\" successfully removed.".to_owned())
    );
    let r = api(&sim, "GET", "/nodes/pve1/lxc/9900/config", &[]).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Configuration file 'nodes/pve1/lxc/9900.conf' does not exist")
    );
    assert_eq!(avail(&sim, "local-lvm").await, before);
    assert_eq!(backup_of(&sim, "local", 101).await, volid);
}

#[tokio::test]
async fn qemu_restore_from_pbs_with_overrides_and_destroy() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let volid = backup_of(&sim, "pbs-offsite", 103).await;
    let orig = get(&sim, "/nodes/pve1/qemu/103/config").await;
    let before = avail(&sim, "local-lvm").await;
    // Drives cannot be given with an archive.
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/qemu",
        &[
            ("vmid", "9901"),
            ("archive", &volid),
            ("scsi0", "local-lvm:8"),
        ],
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["errors"]["scsi0"],
        "option conflicts with option 'archive'"
    );
    // A target storage that cannot hold VM images fails in the task.
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/qemu",
        &[("vmid", "9911"), ("archive", &volid), ("storage", "local")],
        "qmrestore",
        "9911",
    )
    .await;
    assert_eq!(
        st["exitstatus"],
        "storage 'local' does not support vm images"
    );
    let (_, st) = task(
        &sim,
        "DELETE",
        "/nodes/pve1/qemu/9911",
        &[("purge", "1")],
        "qmdestroy",
        "9911",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    // An existing vmid is refused before any task.
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/qemu",
        &[("vmid", "101"), ("archive", &volid)],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("unable to restore VM 101 - CT 101 already exists on node 'pve1'")
    );
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/qemu",
        &[
            ("vmid", "9901"),
            ("archive", &volid),
            ("storage", "local-lvm"),
            ("unique", "1"),
            ("start", "0"),
            ("onboot", "0"),
            ("name", "vm103-restoretest"),
            ("net0", "virtio,bridge=vmbr0,link_down=1"),
        ],
        "qmrestore",
        "9901",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK", "{st}");
    let c = get(&sim, "/nodes/pve1/qemu/9901/config").await;
    assert_eq!(c["name"], "vm103-restoretest");
    assert_eq!(c["onboot"], 0);
    assert_eq!(prop(&c["net0"], "link_down"), "1", "{c}");
    assert!(
        c["net0"].as_str().unwrap().starts_with("virtio=BC:24:11:"),
        "{c}"
    );
    assert_eq!(c["scsi0"], "local-lvm:vm-9901-disk-0,iothread=1,size=32G");
    assert_eq!(c["agent"], orig["agent"]);
    assert_ne!(prop(&c["smbios1"], "uuid"), prop(&orig["smbios1"], "uuid"));
    assert_eq!(avail(&sim, "local-lvm").await, before - 32 * GIB);
    let (_, st) = task(
        &sim,
        "DELETE",
        "/nodes/pve1/qemu/9901",
        &[("purge", "1"), ("destroy-unreferenced-disks", "1")],
        "qmdestroy",
        "9901",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK", "{st}");
    assert_eq!(avail(&sim, "local-lvm").await, before);
}

#[tokio::test]
async fn corrupt_archives_fail_in_pve_form_and_leave_what_pve_leaves() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let before = avail(&sim, "local-lvm").await;
    // LXC from a file archive: tar's exit, the new container removed.
    let lxc = backup_of(&sim, "local", 101).await;
    set_volume(&sim, &lxc, json!({"corrupt": true})).await;
    let (upid, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "9902"),
            ("ostemplate", &lxc),
            ("restore", "1"),
            ("storage", "local-lvm"),
        ],
        "vzrestore",
        "9902",
    )
    .await;
    let exit = st["exitstatus"].as_str().unwrap();
    assert!(
        exit.starts_with("unable to restore CT 9902 - command 'lxc-usernsexec ")
            && exit.contains(" tar xpf - --zstd ")
            && exit.ends_with("' failed: exit code 2"),
        "{exit}"
    );
    let log = task_log(&sim, &upid).await;
    assert!(
        log.contains(&"tar: Unexpected EOF in archive".to_owned()),
        "{log:?}"
    );
    assert_eq!(log.last().unwrap(), &format!("TASK ERROR: {exit}"));
    assert_eq!(
        api(&sim, "GET", "/nodes/pve1/lxc/9902/config", &[])
            .await
            .status,
        500
    );
    assert_eq!(avail(&sim, "local-lvm").await, before);
    // Clearing the flag makes the same archive restorable.
    set_volume(&sim, &lxc, json!({"corrupt": false})).await;
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "9902"),
            ("ostemplate", &lxc),
            ("restore", "1"),
            ("storage", "local-lvm"),
        ],
        "vzrestore",
        "9902",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");

    // QEMU from PBS: pbs-restore's exit; qemu-server leaves the empty VM behind.
    let vm = backup_of(&sim, "pbs-offsite", 103).await;
    set_volume(&sim, &vm, json!({"corrupt": true})).await;
    let before = avail(&sim, "local-lvm").await;
    let (upid, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/qemu",
        &[("vmid", "9903"), ("archive", &vm), ("storage", "local-lvm")],
        "qmrestore",
        "9903",
    )
    .await;
    let exit = st["exitstatus"].as_str().unwrap();
    assert!(
        exit.starts_with("command '/usr/bin/pbs-restore ")
            && exit.ends_with("' failed: exit code 255"),
        "{exit}"
    );
    assert!(task_log(&sim, &upid).await.contains(
        &"error before or during data restore, some or all disks were not completely restored. VM 9903 state is NOT cleaned up.".to_owned()
    ));
    let c = get(&sim, "/nodes/pve1/qemu/9903/config").await;
    let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["digest"], "an empty, unlocked config: {c}");
    assert_eq!(avail(&sim, "local-lvm").await, before);
    let (_, st) = task(
        &sim,
        "DELETE",
        "/nodes/pve1/qemu/9903",
        &[("purge", "1"), ("destroy-unreferenced-disks", "1")],
        "qmdestroy",
        "9903",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
}

#[tokio::test]
async fn a_restored_guest_can_be_made_to_fail_its_start() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let lxc = backup_of(&sim, "local", 101).await;
    set_volume(&sim, &lxc, json!({"start_fails": true})).await;
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "9904"),
            ("ostemplate", &lxc),
            ("restore", "1"),
            ("storage", "local-lvm"),
        ],
        "vzrestore",
        "9904",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    let (upid, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc/9904/status/start",
        &[],
        "vzstart",
        "9904",
    )
    .await;
    assert_eq!(st["exitstatus"], "startup for container '9904' failed");
    assert!(
        task_log(&sim, &upid)
            .await
            .contains(&"__lxc_start: 2034 Failed to initialize container \"9904\"".to_owned())
    );
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/9904/status/current").await["status"],
        "stopped"
    );
    // The guest flag, set directly, and cleared again.
    let (status, g) = control(
        &sim,
        "PUT",
        "/_sim/guests/103",
        json!({"start_fails": true}),
    )
    .await;
    assert_eq!((status, &g["start_fails"]), (200, &json!(true)));
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/qemu/103/status/stop",
        &[],
        "qmstop",
        "103",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/qemu/103/status/start",
        &[],
        "qmstart",
        "103",
    )
    .await;
    assert_eq!(st["exitstatus"], "start failed: QEMU exited with code 1");
    control(
        &sim,
        "PUT",
        "/_sim/guests/103",
        json!({"start_fails": false}),
    )
    .await;
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/qemu/103/status/start",
        &[],
        "qmstart",
        "103",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    // A running container is destroyed only with force (stopped in the task).
    let r = api(&sim, "DELETE", "/nodes/pve1/lxc/101", &[("purge", "1")]).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("unable to destroy CT 101 - container is running")
    );
    let (_, st) = task(
        &sim,
        "DELETE",
        "/nodes/pve1/lxc/9904",
        &[("purge", "1")],
        "vzdestroy",
        "9904",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
}

#[tokio::test]
async fn a_full_storage_fails_the_restore_and_takes_nothing() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let lxc = backup_of(&sim, "local", 101).await;
    let (status, s) = control(
        &sim,
        "PUT",
        "/_sim/storages/local-lvm",
        json!({"avail": GIB}),
    )
    .await;
    assert_eq!((status, &s["avail"]), (200, &json!(GIB)), "{s}");
    assert_eq!(avail(&sim, "local-lvm").await, GIB);
    let (upid, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "9905"),
            ("ostemplate", &lxc),
            ("restore", "1"),
            ("storage", "local-lvm"),
        ],
        "vzrestore",
        "9905",
    )
    .await;
    let exit = st["exitstatus"].as_str().unwrap();
    assert!(
        exit.starts_with("unable to restore CT 9905 - command 'lxc-usernsexec ")
            && exit.ends_with("' failed: exit code 2"),
        "{exit}"
    );
    assert!(
        task_log(&sim, &upid)
            .await
            .iter()
            .any(|l| l.ends_with("Cannot write: No space left on device"))
    );
    assert_eq!(
        api(&sim, "GET", "/nodes/pve1/lxc/9905/config", &[])
            .await
            .status,
        500
    );
    assert_eq!(avail(&sim, "local-lvm").await, GIB);
    let (status, _) = control(&sim, "PUT", "/_sim/storages/nope", json!({"avail": 1})).await;
    assert_eq!(status, 400);
    let (status, _) = control(
        &sim,
        "PUT",
        "/_sim/volumes/local%3Abackup%2Fnope",
        json!({"corrupt": true}),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn restore_time_follows_archive_size_and_a_killed_restore_is_undone() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let lxc = backup_of(&sim, "local", 101).await;
    let size = get(
        &sim,
        "/nodes/pve1/storage/local/content?content=backup&vmid=101",
    )
    .await[0]["size"]
        .as_u64()
        .unwrap();
    // Reading the archive takes about 10 minutes at this speed.
    let (status, s) = control(
        &sim,
        "PUT",
        "/_sim/settings",
        json!({"restore_bytes_per_second": size as f64 / 600.0}),
    )
    .await;
    assert_eq!(status, 200, "{s}");
    let before = avail(&sim, "local-lvm").await;
    let upid = upid_of(
        &api(
            &sim,
            "POST",
            "/nodes/pve1/lxc",
            &[
                ("vmid", "9906"),
                ("ostemplate", &lxc),
                ("restore", "1"),
                ("storage", "local-lvm"),
            ],
        )
        .await
        .data(),
    );
    // A short task started after it ends first; the restore still runs, its disk taken.
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc/102/status/start",
        &[],
        "vzstart",
        "102",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    let status = get(&sim, &format!("/nodes/pve1/tasks/{}/status", enc(&upid))).await;
    assert_eq!(status["status"], "running");
    assert!(avail(&sim, "local-lvm").await < before);
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/9906/config").await["lock"],
        "create"
    );
    // Stopping the task undoes it: no container, no disk.
    api(
        &sim,
        "DELETE",
        &format!("/nodes/pve1/tasks/{}", enc(&upid)),
        &[],
    )
    .await
    .data();
    let st = sim.wait_task(&upid, Duration::from_secs(10)).await.unwrap();
    assert_ne!(st["exitstatus"], "OK");
    assert_eq!(
        api(&sim, "GET", "/nodes/pve1/lxc/9906/config", &[])
            .await
            .status,
        500
    );
    assert_eq!(avail(&sim, "local-lvm").await, before);
}

#[tokio::test]
async fn a_token_restore_skips_raw_lxc_lines_with_a_warning_and_refuses_bind_mounts() {
    let sim = spawn(&["--guests", "8", "--task-seconds", "0.05"]);
    // CT 108 carries raw lxc.* lines; 104 gets a bind mount point.
    sim.set_guest(104, json!({"config": {"mp0": "/srv/data,mp=/data"}}))
        .await
        .unwrap();
    for vmid in ["108", "104"] {
        let (_, st) = task(
            &sim,
            "POST",
            "/nodes/pve1/vzdump",
            &[("vmid", vmid), ("storage", "local"), ("compress", "zstd")],
            "vzdump",
            vmid,
        )
        .await;
        assert_eq!(st["exitstatus"], "OK", "{st}");
    }
    let raw = backup_of(&sim, "local", 108).await;
    let (upid, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "9907"),
            ("ostemplate", &raw),
            ("restore", "1"),
            ("storage", "local-lvm"),
        ],
        "vzrestore",
        "9907",
    )
    .await;
    assert_eq!(st["exitstatus"], "WARNINGS: 1", "{st}");
    let log = task_log(&sim, &upid).await;
    let at = log
        .iter()
        .position(|l| l == "WARN: skipping custom lxc options, restore manually as root:")
        .unwrap_or_else(|| panic!("{log:?}"));
    assert_eq!(log[at + 2], "lxc.cgroup2.devices.allow: c 226:0 rwm");
    assert_eq!(log.last().unwrap(), "TASK WARNINGS: 1");
    assert!(
        get(&sim, "/nodes/pve1/lxc/9907/config")
            .await
            .get("lxc")
            .is_none()
    );

    let bind = backup_of(&sim, "local", 104).await;
    let before = avail(&sim, "local-lvm").await;
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "9908"),
            ("ostemplate", &bind),
            ("restore", "1"),
            ("storage", "local-lvm"),
        ],
        "vzrestore",
        "9908",
    )
    .await;
    assert_eq!(
        st["exitstatus"],
        "unable to restore CT 9908 - restoring 'mp0' to bind mount is only possible for root"
    );
    assert_eq!(
        api(&sim, "GET", "/nodes/pve1/lxc/9908/config", &[])
            .await
            .status,
        500
    );
    assert_eq!(avail(&sim, "local-lvm").await, before);
}

#[tokio::test]
async fn guest_agent_ping_follows_config_power_state_and_the_control_flag() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let ping = |vmid: u32| {
        let sim = &sim;
        async move {
            api(
                sim,
                "POST",
                &format!("/nodes/pve1/qemu/{vmid}/agent/ping"),
                &[],
            )
            .await
        }
    };
    // VM 103 runs with `agent: 1`.
    assert_eq!(ping(103).await.data(), json!({"result": {}}));
    // A VM restored from an archive flagged `agent_fails` boots, but its agent is silent.
    let vm = backup_of(&sim, "pbs-offsite", 103).await;
    set_volume(&sim, &vm, json!({"agent_fails": true})).await;
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/qemu",
        &[
            ("vmid", "9909"),
            ("archive", &vm),
            ("storage", "local-lvm"),
            ("unique", "1"),
        ],
        "qmrestore",
        "9909",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    let r = ping(9909).await;
    assert_eq!(
        (r.status, r.reason.as_deref()),
        (500, Some("VM 9909 is not running"))
    );
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/qemu/9909/status/start",
        &[],
        "qmstart",
        "9909",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    let r = ping(9909).await;
    assert_eq!(r.reason.as_deref(), Some("QEMU guest agent is not running"));
    let (status, _) = control(
        &sim,
        "PUT",
        "/_sim/guests/9909",
        json!({"agent_fails": false}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ping(9909).await.data(), json!({"result": {}}));
    // Without the agent enabled in the config.
    sim.set_guest(103, json!({"config": {"agent": "0"}}))
        .await
        .unwrap();
    let r = ping(103).await;
    assert_eq!(r.reason.as_deref(), Some("No QEMU guest agent configured"));
}

/// The privileges a token needs for a whole restore test (restore into the scratch vmid
/// with overrides, start, agent ping, stop, destroy), and what each missing one answers.
#[tokio::test]
async fn a_restore_test_works_with_these_privileges_and_not_without_each() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = |vmid: &str, extra: &[&str]| {
        let mut privs = vec![
            "VM.Allocate",
            "VM.Audit",
            "VM.PowerMgmt",
            "VM.Config.Network",
            "VM.Config.Options",
        ];
        privs.extend_from_slice(extra);
        json!({"path": format!("/vms/{vmid}"), "privs": privs})
    };
    let full = vec![
        scratch("9900", &[]),
        scratch("9901", &["VM.GuestAgent.Audit"]),
        json!({"path": "/vms/101", "privs": ["VM.Backup"]}),
        json!({"path": "/vms/103", "privs": ["VM.Backup"]}),
        json!({"path": "/storage/local", "privs": ["Datastore.AllocateSpace"]}),
        json!({"path": "/storage/pbs-offsite", "privs": ["Datastore.AllocateSpace"]}),
        json!({"path": "/storage/local-lvm", "privs": ["Datastore.AllocateSpace"]}),
    ];
    let without = |path: &str, privilege: &str| -> Vec<Value> {
        full.iter()
            .map(|e| {
                let mut e = e.clone();
                if e["path"] == path {
                    let privs: Vec<Value> = e["privs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|p| *p != privilege)
                        .cloned()
                        .collect();
                    e["privs"] = Value::Array(privs);
                }
                e
            })
            .collect()
    };
    let acl = write_acl(
        &dir,
        &json!({"tokens": [
            {"token_id": "felhom@pve!agent", "secret": "s", "acl": full},
            {"token_id": "felhom@pve!noalloc", "secret": "s", "acl": without("/vms/9900", "VM.Allocate")},
            {"token_id": "felhom@pve!nobackup", "secret": "s", "acl": without("/vms/101", "VM.Backup")},
            {"token_id": "felhom@pve!nospace", "secret": "s", "acl": without("/storage/local-lvm", "Datastore.AllocateSpace")},
            {"token_id": "felhom@pve!nonet", "secret": "s", "acl": without("/vms/9900", "VM.Config.Network")},
            {"token_id": "felhom@pve!noopts", "secret": "s", "acl": without("/vms/9900", "VM.Config.Options")},
            {"token_id": "felhom@pve!nodumps", "secret": "s", "acl": without("/storage/local", "Datastore.AllocateSpace")},
        ]}),
    );
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05", "--acl", &acl]);
    let lxc = backup_of(&sim, "local", 101).await;
    let vm = backup_of(&sim, "pbs-offsite", 103).await;
    let as_token = |name: &'static str| token_header(&format!("felhom@pve!{name}"), "s");
    let lxc_form = [
        ("vmid", "9900"),
        ("ostemplate", lxc.as_str()),
        ("restore", "1"),
        ("storage", "local-lvm"),
        ("unique", "1"),
        ("start", "0"),
        ("onboot", "0"),
        ("hostname", "web01-restoretest"),
        ("description", "restore test"),
        ("net0", "name=eth0,bridge=vmbr0,link_down=1"),
    ];
    for (name, reason) in [
        ("noalloc", "Permission check failed"),
        ("nobackup", "Permission check failed (/vms/101, VM.Backup)"),
        (
            "nospace",
            "Permission check failed (/storage/local-lvm, Datastore.AllocateSpace)",
        ),
        (
            "nonet",
            "Permission check failed (/vms/9900, VM.Config.Network)",
        ),
        (
            "noopts",
            "Permission check failed (/vms/9900, VM.Config.Options)",
        ),
        (
            "nodumps",
            "Permission check failed (/storage/local, Datastore.AllocateSpace)",
        ),
    ] {
        let r = call(
            &sim,
            Some(&as_token(name)),
            "POST",
            "/nodes/pve1/lxc",
            &lxc_form,
        )
        .await;
        assert_eq!(
            (r.status, r.reason.as_deref()),
            (403, Some(reason)),
            "{name}"
        );
    }
    let agent = as_token("agent");
    let run = |method: &'static str, path: String, form: Vec<(&'static str, String)>| {
        let sim = &sim;
        let agent = agent.clone();
        async move {
            let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = call(sim, Some(&agent), method, &path, &form).await;
            let upid = upid_of(&r.data());
            assert!(upid.ends_with(":felhom@pve!agent:"), "{upid}");
            sim.wait_task(&upid, Duration::from_secs(30)).await.unwrap()
        }
    };
    let owned = |f: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        f.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
    };
    let st = run("POST", "/nodes/pve1/lxc".into(), owned(&lxc_form)).await;
    assert_eq!(st["exitstatus"], "OK", "{st}");
    let st = run(
        "POST",
        "/nodes/pve1/qemu".into(),
        owned(&[
            ("vmid", "9901"),
            ("archive", &vm),
            ("storage", "local-lvm"),
            ("unique", "1"),
            ("onboot", "0"),
            ("name", "vm103-restoretest"),
            ("net0", "virtio,bridge=vmbr0,link_down=1"),
        ]),
    )
    .await;
    assert_eq!(st["exitstatus"], "OK", "{st}");
    for (kind, vmid) in [("lxc", "9900"), ("qemu", "9901")] {
        let st = run(
            "POST",
            format!("/nodes/pve1/{kind}/{vmid}/status/start"),
            vec![],
        )
        .await;
        assert_eq!(st["exitstatus"], "OK", "{st}");
        let r = call(
            &sim,
            Some(&agent),
            "GET",
            &format!("/nodes/pve1/{kind}/{vmid}/status/current"),
            &[],
        )
        .await;
        assert_eq!(r.data()["status"], "running");
    }
    let r = call(
        &sim,
        Some(&agent),
        "POST",
        "/nodes/pve1/qemu/9901/agent/ping",
        &[],
    )
    .await;
    assert_eq!(r.data(), json!({"result": {}}));
    for (kind, vmid) in [("lxc", "9900"), ("qemu", "9901")] {
        let st = run(
            "POST",
            format!("/nodes/pve1/{kind}/{vmid}/status/stop"),
            vec![],
        )
        .await;
        assert_eq!(st["exitstatus"], "OK", "{st}");
        let st = run(
            "DELETE",
            format!("/nodes/pve1/{kind}/{vmid}"),
            owned(&[("purge", "1"), ("destroy-unreferenced-disks", "1")]),
        )
        .await;
        assert_eq!(st["exitstatus"], "OK", "{st}");
    }
    // Nothing outside the scratch vmids: the same token cannot destroy a real guest.
    let r = call(
        &sim,
        Some(&agent),
        "DELETE",
        "/nodes/pve1/lxc/102",
        &[("purge", "1")],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Permission check failed (/vms/102, VM.Allocate)")
    );
}

#[tokio::test]
async fn a_restored_guest_can_be_made_to_stop_on_its_own_after_starting() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let lxc = backup_of(&sim, "local", 101).await;
    // Zero seconds: it is stopped by the next request after its start task; no task.
    set_volume(&sim, &lxc, json!({"stops_after_seconds": 0})).await;
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "9910"),
            ("ostemplate", &lxc),
            ("restore", "1"),
            ("storage", "local-lvm"),
        ],
        "vzrestore",
        "9910",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    let tasks_before = sim.state().await.unwrap()["tasks"]
        .as_array()
        .unwrap()
        .len();
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc/9910/status/start",
        &[],
        "vzstart",
        "9910",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/9910/status/current").await["status"],
        "stopped"
    );
    let state = sim.state().await.unwrap();
    assert_eq!(state["tasks"].as_array().unwrap().len(), tasks_before + 1);
    // An hour: it stays up. Clearing the flag on a running guest cancels its countdown.
    let (status, g) = control(
        &sim,
        "PUT",
        "/_sim/guests/9910",
        json!({"stops_after_seconds": 3600}),
    )
    .await;
    assert_eq!((status, &g["stops_after_seconds"]), (200, &json!(3600.0)));
    let (_, st) = task(
        &sim,
        "POST",
        "/nodes/pve1/lxc/9910/status/start",
        &[],
        "vzstart",
        "9910",
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/9910/status/current").await["status"],
        "running"
    );
    // A running guest given zero stops at once.
    control(
        &sim,
        "PUT",
        "/_sim/guests/9910",
        json!({"stops_after_seconds": 0}),
    )
    .await;
    assert_eq!(sim.guest(9910).await.unwrap()["status"], "stopped");
    let (status, _) = control(
        &sim,
        "PUT",
        "/_sim/guests/9910",
        json!({"stops_after_seconds": -1}),
    )
    .await;
    assert_eq!(status, 400);
}
