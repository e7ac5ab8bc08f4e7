//! What the reversibility gate depends on, over the real binary and HTTP: snapshot
//! support decided inside the task from each volume's storage type and format (bind
//! and device mount points: none), ZFS's most-recent-snapshot rule for rollback, a
//! force-restore that leaves nothing of the old guest, destroy's options and refusals,
//! `protection` as a config key, backups that take time and space (and protected ones),
//! task faults by worker type with each type's partial effect, a guest that a config
//! change stops, and the harness's comparable guest state.

#[path = "pvesim_common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use felhom_testbed::harness::PveSim;
use serde_json::{Value, json};

const GIB: u64 = 1 << 30;

fn sim() -> PveSim {
    spawn(&["--guests", "6", "--task-seconds", "0.05"])
}

fn upid_of(r: &Resp) -> String {
    let v = r.data();
    v.as_str()
        .unwrap_or_else(|| panic!("not a UPID: {v}"))
        .to_owned()
}

/// Sends an async call (which must answer a UPID, i.e. not fail before the fork) and
/// waits for its task; answers the final status.
async fn run(sim: &PveSim, method: &str, path: &str, form: &[(&str, &str)]) -> Value {
    let upid = upid_of(&api(sim, method, path, form).await);
    sim.wait_task(&upid, Duration::from_secs(60))
        .await
        .expect("task ends")
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

async fn storage_item(sim: &PveSim, sid: &str) -> Value {
    get(sim, &format!("/nodes/pve1/storage?storage={sid}")).await[0].clone()
}

async fn avail(sim: &PveSim, sid: &str) -> u64 {
    storage_item(sim, sid).await["avail"].as_u64().unwrap()
}

async fn backups(sim: &PveSim, sid: &str, vmid: u32) -> Vec<Value> {
    get(
        sim,
        &format!("/nodes/pve1/storage/{sid}/content?content=backup&vmid={vmid}"),
    )
    .await
    .as_array()
    .unwrap()
    .clone()
}

async fn make_guest(sim: &PveSim, vmid: u32, kind: &str, config: Value, status: &str) {
    sim.set_guest(
        vmid,
        json!({"type": kind, "config": config, "status": status}),
    )
    .await
    .unwrap();
}

async fn add_storages(sim: &PveSim) {
    for (sid, body) in [
        ("local-zfs", json!({"type": "zfspool", "total": 500 * GIB})),
        ("thick", json!({"type": "lvm"})),
        (
            "dirimg",
            json!({"type": "dir", "content": ["rootdir", "images"]}),
        ),
        ("nfsimg", json!({"type": "nfs", "content": ["images"]})),
    ] {
        sim.set_storage(sid, body).await.unwrap();
    }
}

fn guest_path(kind: &str, vmid: u32) -> String {
    format!("/nodes/pve1/{kind}/{vmid}")
}

#[tokio::test]
async fn storages_carry_their_type_and_can_be_added() {
    let sim = sim();
    add_storages(&sim).await;
    let list = get(&sim, "/nodes/pve1/storage").await;
    let ty = |sid: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|s| s["storage"] == sid)
            .unwrap_or_else(|| panic!("{sid} listed: {list}"))["type"]
            .clone()
    };
    for (sid, t) in [
        ("local", "dir"),
        ("local-lvm", "lvmthin"),
        ("nas-backup", "nfs"),
        ("pbs-offsite", "pbs"),
        ("local-zfs", "zfspool"),
        ("thick", "lvm"),
        ("dirimg", "dir"),
        ("nfsimg", "nfs"),
    ] {
        assert_eq!(ty(sid), t, "{sid}");
    }
    let zfs = storage_item(&sim, "local-zfs").await;
    assert_eq!(zfs["content"], "rootdir,images");
    assert_eq!(zfs["total"], json!(500 * GIB));
    assert_eq!(zfs["active"], 1);
    // Unknown types and contents are refused; an existing storage keeps its type.
    for (sid, body) in [
        ("x1", json!({"type": "floppy"})),
        ("x2", json!({"type": "dir", "content": ["music"]})),
        ("x3", json!({"total": 5})),
        ("local", json!({"type": "zfspool"})),
        ("bad id!", json!({"type": "dir"})),
    ] {
        assert!(sim.set_storage(sid, body).await.is_err(), "{sid}");
    }
}

#[tokio::test]
async fn snapshot_support_is_decided_in_the_task_from_each_volumes_storage_and_format() {
    let sim = sim();
    add_storages(&sim).await;
    let cases: Vec<(u32, &str, Value, bool)> = vec![
        (
            200,
            "lxc",
            json!({"rootfs": "local-zfs:subvol-200-disk-0,size=8G",
                   "mp0": "local-lvm:vm-200-disk-1,mp=/data,size=2G"}),
            true,
        ),
        (
            201,
            "lxc",
            json!({"rootfs": "local-zfs:subvol-201-disk-0,size=8G",
                   "mp0": "/srv/share,mp=/share"}),
            false,
        ),
        (
            202,
            "lxc",
            json!({"rootfs": "dirimg:202/vm-202-disk-0.raw,size=8G"}),
            false,
        ),
        (
            203,
            "lxc",
            json!({"rootfs": "thick:vm-203-disk-0,size=8G"}),
            false,
        ),
        (
            204,
            "qemu",
            json!({"scsi0": "dirimg:204/vm-204-disk-0.qcow2,size=32G",
                   "efidisk0": "local-lvm:vm-204-disk-1,efitype=4m,size=4M",
                   "ide2": "none,media=cdrom"}),
            true,
        ),
        (
            205,
            "qemu",
            json!({"scsi0": "nfsimg:205/vm-205-disk-0.raw,size=32G"}),
            false,
        ),
        (
            206,
            "qemu",
            json!({"virtio0": "local-zfs:vm-206-disk-0,size=32G",
                   "tpmstate0": "thick:vm-206-disk-1,size=4M,version=v2.0"}),
            false,
        ),
        (
            207,
            "lxc",
            json!({"rootfs": "local-lvm:vm-207-disk-0,size=8G",
                   "mp0": "/dev/sdb1,mp=/mnt/disk"}),
            false,
        ),
    ];
    for (vmid, kind, config, can) in cases {
        make_guest(&sim, vmid, kind, config, "running").await;
        let before = sim.comparable_guest(vmid).await.unwrap();
        let path = format!("{}/snapshot", guest_path(kind, vmid));
        // The POST always answers a UPID: the check is the task's.
        let st = run(&sim, "POST", &path, &[("snapname", "s1")]).await;
        let after = sim.comparable_guest(vmid).await.unwrap();
        if can {
            assert_eq!(st["exitstatus"], "OK", "{vmid}: {st}");
            assert_eq!(after.snapshots, vec!["s1".to_owned()], "{vmid}");
        } else {
            assert_eq!(
                st["exitstatus"], "snapshot feature is not available",
                "{vmid}"
            );
            assert_eq!(after, before, "{vmid}: nothing changed");
            assert_eq!(sim.guest(vmid).await.unwrap()["lock"], Value::Null);
        }
    }
}

#[tokio::test]
async fn on_zfs_only_the_most_recent_snapshot_can_be_rolled_back_to() {
    let sim = sim();
    add_storages(&sim).await;
    make_guest(
        &sim,
        210,
        "lxc",
        json!({"rootfs": "local-zfs:subvol-210-disk-0,size=8G", "memory": "512"}),
        "running",
    )
    .await;
    let snap = guest_path("lxc", 210) + "/snapshot";
    assert_eq!(
        run(&sim, "POST", &snap, &[("snapname", "first")]).await["exitstatus"],
        "OK"
    );
    // Taken in the same second as `first`: creation order, not snaptime, decides.
    assert_eq!(
        run(&sim, "POST", &snap, &[("snapname", "felhom-undo-1")]).await["exitstatus"],
        "OK"
    );
    sim.set_guest(210, json!({"config": {"memory": "2048"}}))
        .await
        .unwrap();
    let before = sim.comparable_guest(210).await.unwrap();
    let st = run(&sim, "POST", &format!("{snap}/first/rollback"), &[]).await;
    assert_eq!(
        st["exitstatus"],
        "can't rollback, 'first' is not most recent snapshot on 'local-zfs:subvol-210-disk-0'"
    );
    let after = sim.comparable_guest(210).await.unwrap();
    assert_eq!(after, before, "a refused rollback changes nothing");
    assert_eq!(after.status.as_deref(), Some("running"), "not even stopped");
    // The most recent one rolls back.
    let st = run(&sim, "POST", &format!("{snap}/felhom-undo-1/rollback"), &[]).await;
    assert_eq!(st["exitstatus"], "OK");
    let g = sim.comparable_guest(210).await.unwrap();
    assert_eq!(g.config["memory"], json!(512));
    assert_eq!(g.status.as_deref(), Some("stopped"));
    // Deleting the newer snapshot makes `first` the most recent: allowed again.
    let st = run(&sim, "DELETE", &format!("{snap}/felhom-undo-1"), &[]).await;
    assert_eq!(st["exitstatus"], "OK");
    let st = run(&sim, "POST", &format!("{snap}/first/rollback"), &[]).await;
    assert_eq!(st["exitstatus"], "OK");
    // On LVM-thin the rule does not exist: seeded 101 rolls back past `nightly`.
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/snapshot/pre-upgrade/rollback",
        &[],
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
}

/// A guest of `size_gib` on local-lvm with one snapshot, stopped, and a fresh backup of
/// it on `local`; answers the archive's volid.
async fn guest_with_backup(sim: &PveSim, vmid: u32, kind: &str) -> String {
    let disk = match kind {
        "lxc" => json!({"rootfs": format!("local-lvm:vm-{vmid}-disk-0,size=8G"),
                        "hostname": format!("ct{vmid}"), "memory": "512"}),
        _ => json!({"scsi0": format!("local-lvm:vm-{vmid}-disk-0,size=8G"),
                    "name": format!("vm{vmid}"), "memory": "512"}),
    };
    make_guest(sim, vmid, kind, disk, "stopped").await;
    let st = run(
        sim,
        "POST",
        "/nodes/pve1/vzdump",
        &[("vmid", &vmid.to_string()), ("storage", "local")],
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    let st = run(
        sim,
        "POST",
        &format!("{}/snapshot", guest_path(kind, vmid)),
        &[("snapname", "old")],
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    backups(sim, "local", vmid).await[0]["volid"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_force_restore_replaces_the_guest_and_leaves_no_snapshot_of_it() {
    let sim = sim();
    for (vmid, kind, create) in [
        (220, "lxc", "/nodes/pve1/lxc"),
        (221, "qemu", "/nodes/pve1/qemu"),
    ] {
        let archive = guest_with_backup(&sim, vmid, kind).await;
        sim.set_guest(vmid, json!({"config": {"memory": "4096"}}))
            .await
            .unwrap();
        let free = avail(&sim, "local-lvm").await;
        let vm = vmid.to_string();
        let form: Vec<(&str, &str)> = match kind {
            "lxc" => vec![
                ("vmid", &vm),
                ("ostemplate", &archive),
                ("restore", "1"),
                ("force", "1"),
                ("storage", "local-lvm"),
            ],
            _ => vec![
                ("vmid", &vm),
                ("archive", &archive),
                ("force", "1"),
                ("storage", "local-lvm"),
            ],
        };
        let st = run(&sim, "POST", create, &form).await;
        assert!(
            st["exitstatus"] == "OK" || st["exitstatus"] == "WARNINGS: 1",
            "{st}"
        );
        let g = sim.comparable_guest(vmid).await.unwrap();
        assert!(g.snapshots.is_empty(), "{vmid}: {g:?}");
        assert_eq!(g.config["memory"], json!(512), "the archive's config");
        // The old disk was freed, a new one of the same size made.
        assert_eq!(avail(&sim, "local-lvm").await, free, "{vmid}");
    }
    // A force-restore of a container that fails after the new disks were made (a
    // corrupt archive): pve-container frees the new disks and destroys the config, and
    // the old volumes are already gone.
    let archive = backups(&sim, "local", 220).await[0]["volid"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = control_put(
        &sim,
        &format!("/_sim/volumes/{}", enc(&archive)),
        json!({"corrupt": true}),
    )
    .await;
    assert_eq!(status, 200);
    let free = avail(&sim, "local-lvm").await;
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "220"),
            ("ostemplate", &archive),
            ("restore", "1"),
            ("force", "1"),
            ("storage", "local-lvm"),
        ],
    )
    .await;
    assert!(
        st["exitstatus"]
            .as_str()
            .unwrap()
            .starts_with("unable to restore CT 220 - command"),
        "{st}"
    );
    assert!(!sim.comparable_guest(220).await.unwrap().exists);
    assert_eq!(avail(&sim, "local-lvm").await, free + 8 * GIB);

    // One that fails making the new disks (no room): the config is destroyed all the
    // same, the old volumes stay behind (nothing is freed).
    let archive = guest_with_backup(&sim, 222, "lxc").await;
    sim.set_storage("local-lvm", json!({"avail": GIB}))
        .await
        .unwrap();
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "222"),
            ("ostemplate", &archive),
            ("restore", "1"),
            ("force", "1"),
            ("storage", "local-lvm"),
        ],
    )
    .await;
    assert!(
        st["exitstatus"]
            .as_str()
            .unwrap()
            .starts_with("unable to restore CT 222 - command"),
        "{st}"
    );
    assert!(!sim.comparable_guest(222).await.unwrap().exists);
    assert_eq!(avail(&sim, "local-lvm").await, GIB);
}

async fn control_put(sim: &PveSim, path: &str, body: Value) -> (u16, Value) {
    let resp = sim
        .client()
        .put(format!("{}{path}", sim.url()))
        .header("Authorization", format!("Bearer {}", sim.admin_token()))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn protection_is_a_config_key_that_blocks_destroy_and_restore_over_only() {
    let sim = sim();
    let archive = guest_with_backup(&sim, 230, "lxc").await;
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/230/config",
        &[("protection", "1")],
    )
    .await;
    assert_eq!(r.data(), Value::Null);
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/230/config").await["protection"],
        1
    );
    let r = api(&sim, "DELETE", "/nodes/pve1/lxc/230", &[("purge", "1")]).await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.reason.as_deref(),
        Some("can't remove CT 230 - protection mode enabled")
    );
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "230"),
            ("ostemplate", &archive),
            ("restore", "1"),
            ("force", "1"),
        ],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("unable to restore CT 230 - protection mode enabled")
    );
    // Not blocked: rollback, snapshot delete, start/stop.
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc/230/snapshot/old/rollback",
        &[],
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    let st = run(&sim, "DELETE", "/nodes/pve1/lxc/230/snapshot/old", &[]).await;
    assert_eq!(st["exitstatus"], "OK");
    // Cleared like any key; then destroy goes through.
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/230/config",
        &[("delete", "protection")],
    )
    .await;
    assert_eq!(r.data(), Value::Null);
    assert!(
        get(&sim, "/nodes/pve1/lxc/230/config")
            .await
            .get("protection")
            .is_none()
    );
    let st = run(&sim, "DELETE", "/nodes/pve1/lxc/230", &[("purge", "1")]).await;
    assert_eq!(st["exitstatus"], "OK");
    // QEMU too, through its PUT config.
    make_guest(&sim, 231, "qemu", json!({"memory": "512"}), "stopped").await;
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve1/qemu/231/config",
        &[("protection", "1")],
    )
    .await;
    assert_eq!(r.data(), Value::Null);
    let r = api(&sim, "DELETE", "/nodes/pve1/qemu/231", &[]).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("can't remove VM 231 - protection mode enabled")
    );
    // qemu-server refuses a restore over it in the worker, and drops the lock.
    let before = sim.comparable_guest(231).await.unwrap();
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/qemu",
        &[("vmid", "231"), ("archive", &archive), ("force", "1")],
    )
    .await;
    assert_eq!(
        st["exitstatus"],
        "unable to restore VM 231 - protection mode enabled"
    );
    assert_eq!(sim.comparable_guest(231).await.unwrap(), before);
    assert_eq!(sim.guest(231).await.unwrap()["lock"], Value::Null);
}

#[tokio::test]
async fn destroy_refuses_locked_and_running_guests_and_frees_unreferenced_disks() {
    let sim = sim();
    // Seeded 105 carries `lock: backup`.
    let r = api(&sim, "DELETE", "/nodes/pve1/lxc/105", &[("purge", "1")]).await;
    assert_eq!(
        (r.status, r.reason.as_deref()),
        (500, Some("CT is locked (backup)"))
    );
    let r = api(&sim, "DELETE", "/nodes/pve1/lxc/101", &[]).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("unable to destroy CT 101 - container is running")
    );
    let r = api(&sim, "DELETE", "/nodes/pve1/qemu/103", &[]).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("VM 103 is running - destroy failed")
    );
    // `force` stops a running container in the task.
    let upid = upid_of(&api(&sim, "DELETE", "/nodes/pve1/lxc/101", &[("force", "1")]).await);
    let st = sim.wait_task(&upid, Duration::from_secs(30)).await.unwrap();
    assert_eq!(st["exitstatus"], "OK");
    assert!(!sim.comparable_guest(101).await.unwrap().exists);

    // Restored guests whose first disk the config no longer names (left behind).
    let archive = guest_with_backup(&sim, 240, "lxc").await;
    for vmid in ["241", "242"] {
        let st = run(
            &sim,
            "POST",
            "/nodes/pve1/lxc",
            &[
                ("vmid", vmid),
                ("ostemplate", &archive),
                ("restore", "1"),
                ("storage", "local-lvm"),
            ],
        )
        .await;
        assert_eq!(st["exitstatus"], "OK");
        sim.set_guest(
            vmid.parse().unwrap(),
            json!({"config": {"rootfs": format!("local-lvm:vm-{vmid}-disk-7,size=1G")}}),
        )
        .await
        .unwrap();
    }
    let allocated = |state: &Value, name: &str| {
        state["storages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["storage"] == "local-lvm")
            .unwrap()["allocated"]
            .get(name)
            .is_some()
    };
    let upid = upid_of(
        &api(
            &sim,
            "DELETE",
            "/nodes/pve1/lxc/241",
            &[("purge", "1"), ("destroy-unreferenced-disks", "1")],
        )
        .await,
    );
    let st = sim.wait_task(&upid, Duration::from_secs(30)).await.unwrap();
    assert_eq!(st["exitstatus"], "OK");
    assert!(
        task_log(&sim, &upid)
            .await
            .contains(&"removing volume 'local-lvm:vm-241-disk-0'".to_owned())
    );
    let st = run(&sim, "DELETE", "/nodes/pve1/lxc/242", &[("purge", "1")]).await;
    assert_eq!(st["exitstatus"], "OK");
    let state = sim.state().await.unwrap();
    assert!(!allocated(&state, "vm-241-disk-0"), "freed with the flag");
    assert!(allocated(&state, "vm-242-disk-0"), "left without it");
}

#[tokio::test]
async fn backups_take_time_and_space_and_protected_ones_are_kept() {
    let sim = sim();
    make_guest(&sim, 250, "lxc", json!({"memory": "512"}), "running").await;
    // 512 MiB of memory makes a 128 MiB archive here; at 16 MiB/s that takes 8 s, far
    // longer than the status call below needs even on a loaded machine.
    let (status, _) = control_put(
        &sim,
        "/_sim/settings",
        json!({"backup_bytes_per_second": 16.0 * 1048576.0}),
    )
    .await;
    assert_eq!(status, 200);
    let free = avail(&sim, "nas-backup").await;
    let upid = upid_of(
        &api(
            &sim,
            "POST",
            "/nodes/pve1/vzdump",
            &[
                ("vmid", "250"),
                ("storage", "nas-backup"),
                ("protected", "1"),
            ],
        )
        .await,
    );
    let enc_upid = enc(&upid);
    let running = get(&sim, &format!("/nodes/pve1/tasks/{enc_upid}/status")).await;
    assert_eq!(running["status"], "running", "a backup takes time");
    assert_eq!(sim.guest(250).await.unwrap()["lock"], "backup");
    let st = sim
        .wait_task(&upid, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(st["exitstatus"], "OK");
    let items = backups(&sim, "nas-backup", 250).await;
    assert_eq!(items.len(), 1);
    let b = &items[0];
    let size = b["size"].as_u64().unwrap();
    assert!(size > 0 && b["ctime"].as_u64().unwrap() >= st["starttime"].as_u64().unwrap());
    assert_eq!(b["protected"], 1);
    assert_eq!(
        avail(&sim, "nas-backup").await,
        free - size,
        "it takes space"
    );
    let volid = b["volid"].as_str().unwrap().to_owned();
    let vpath = format!("/nodes/pve1/storage/nas-backup/content/{}", enc(&volid));

    // A protected backup is not removed: the task fails and the archive stays.
    let upid = upid_of(&api(&sim, "DELETE", &vpath, &[]).await);
    assert!(upid.contains(":imgdel:250@nas-backup:"), "{upid}");
    let st = sim.wait_task(&upid, Duration::from_secs(30)).await.unwrap();
    let volname = volid.split_once(':').unwrap().1;
    assert_eq!(
        st["exitstatus"],
        format!("cannot remove protected volume '{volname}' on 'nas-backup'")
    );
    assert_eq!(backups(&sim, "nas-backup", 250).await.len(), 1);
    // Unprotected (PUT content, synchronous), it goes and its space comes back.
    let r = api(&sim, "PUT", &vpath, &[("protected", "0")]).await;
    assert_eq!(r.data(), Value::Null);
    assert!(
        backups(&sim, "nas-backup", 250).await[0]
            .get("protected")
            .is_none()
    );
    let st = run(&sim, "DELETE", &vpath, &[]).await;
    assert_eq!(st["exitstatus"], "OK");
    assert!(backups(&sim, "nas-backup", 250).await.is_empty());
    assert_eq!(avail(&sim, "nas-backup").await, free);
    // A volid of another storage than the path's is refused.
    let r = api(
        &sim,
        "PUT",
        &format!("/nodes/pve1/storage/local/content/{}", enc(&volid)),
        &[("protected", "1")],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("storage ID mismatch (nas-backup != local)")
    );

    // A full backup storage: the job fails, no archive, the guest is unlocked.
    let (status, _) = control_put(
        &sim,
        "/_sim/settings",
        json!({"backup_bytes_per_second": 1e12}),
    )
    .await;
    assert_eq!(status, 200);
    for (sid, needle) in [
        (
            "nas-backup",
            "tar: -: Cannot write: No space left on device",
        ),
        ("pbs-offsite", "No space left on device (os error 28)"),
    ] {
        sim.set_storage(sid, json!({"avail": 4096})).await.unwrap();
        let upid = upid_of(
            &api(
                &sim,
                "POST",
                "/nodes/pve1/vzdump",
                &[("vmid", "250"), ("storage", sid)],
            )
            .await,
        );
        let st = sim.wait_task(&upid, Duration::from_secs(30)).await.unwrap();
        assert_eq!(st["exitstatus"], "job errors", "{sid}");
        let log = task_log(&sim, &upid).await;
        assert!(log.iter().any(|l| l.contains(needle)), "{sid}: {log:?}");
        assert!(
            log.iter()
                .any(|l| l.starts_with("ERROR: Backup of VM 250 failed - ")),
            "{log:?}"
        );
        assert!(backups(&sim, sid, 250).await.is_empty(), "{sid}");
        assert_eq!(sim.guest(250).await.unwrap()["lock"], Value::Null);
        assert_eq!(avail(&sim, sid).await, 4096);
    }
}

#[tokio::test]
async fn a_backup_leaves_out_bind_device_and_unmarked_volume_mount_points() {
    let sim = sim();
    make_guest(
        &sim,
        255,
        "lxc",
        json!({"rootfs": "local-lvm:vm-255-disk-0,size=8G",
               "mp0": "/srv/share,mp=/share",
               "mp1": "/dev/sdb1,mp=/mnt/disk",
               "mp2": "local-lvm:vm-255-disk-1,mp=/data,size=2G",
               "mp3": "local-lvm:vm-255-disk-2,mp=/keep,backup=1,size=2G"}),
        "stopped",
    )
    .await;
    let upid = upid_of(
        &api(
            &sim,
            "POST",
            "/nodes/pve1/vzdump",
            &[("vmid", "255"), ("storage", "local")],
        )
        .await,
    );
    let st = sim.wait_task(&upid, Duration::from_secs(30)).await.unwrap();
    assert_eq!(st["exitstatus"], "OK");
    let excluded: Vec<String> = task_log(&sim, &upid)
        .await
        .into_iter()
        .filter(|l| l.contains("excluding"))
        .collect();
    assert_eq!(
        excluded,
        [
            "INFO: excluding bind mount point mp0 ('/share') from backup (not a volume)",
            "INFO: excluding device mount point mp1 ('/mnt/disk') from backup (not a volume)",
            "INFO: excluding volume mount point mp2 ('/data') from backup (disabled)",
        ]
    );
}

#[tokio::test]
async fn a_task_fault_fails_the_next_task_of_its_type_with_that_types_partial_effect() {
    let sim = sim();
    // Snapshot: a partial snapshot stays (`snapstate: prepare`); `force=1` removes it.
    let before = sim.comparable_guest(101).await.unwrap();
    sim.add_task_fault("vzsnapshot", Some(102), None)
        .await
        .unwrap();
    sim.add_task_fault("vzsnapshot", Some(101), Some("zfs error: out of space"))
        .await
        .unwrap();
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/snapshot",
        &[("snapname", "felhom-undo-abc")],
    )
    .await;
    assert_eq!(st["exitstatus"], "zfs error: out of space");
    let g = sim.guest(101).await.unwrap();
    let partial = g["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "felhom-undo-abc")
        .expect("the partial snapshot stays")
        .clone();
    assert_eq!(partial["snapstate"], "prepare");
    assert_eq!(g["lock"], Value::Null);
    let st = run(
        &sim,
        "DELETE",
        "/nodes/pve1/lxc/101/snapshot/felhom-undo-abc",
        &[("force", "1")],
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    assert_eq!(sim.comparable_guest(101).await.unwrap(), before);
    // The fault armed for 102 is used by its next snapshot task.
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc/102/snapshot",
        &[("snapname", "xx")],
    )
    .await;
    // 102 lives on `local` (dir): the real error wins over the fault's.
    assert_eq!(st["exitstatus"], "snapshot feature is not available");
    // Without `force` a partial snapshot cannot be removed (its volume snapshots were
    // never made): the task dies there, holding the lock, as PVE's does.
    sim.add_task_fault("vzsnapshot", Some(104), None)
        .await
        .unwrap();
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc/104/snapshot",
        &[("snapname", "yy")],
    )
    .await;
    assert_eq!(
        st["exitstatus"],
        "vzsnapshot failed midway (pvesim task fault)"
    );
    let st = run(&sim, "DELETE", "/nodes/pve1/lxc/104/snapshot/yy", &[]).await;
    assert!(
        st["exitstatus"]
            .as_str()
            .unwrap()
            .starts_with("snapshot 'yy' of volume 'local-lvm:vm-104-disk-0'"),
        "{st}"
    );
    assert_eq!(sim.guest(104).await.unwrap()["lock"], "snapshot-delete");

    // As a killed worker: the partial snapshot keeps the `snapshot` lock, so even a
    // forced delete fails until the lock is lifted (`pct unlock` on a real node).
    let id = sim
        .add_task_fault_spec(json!({"type": "vzsnapshot", "vmid": 101, "keep_lock": true}))
        .await
        .unwrap();
    assert!(id > 0);
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/snapshot",
        &[("snapname", "killed")],
    )
    .await;
    assert_eq!(
        st["exitstatus"],
        "vzsnapshot failed midway (pvesim task fault)"
    );
    assert_eq!(sim.guest(101).await.unwrap()["lock"], "snapshot");
    let st = run(
        &sim,
        "DELETE",
        "/nodes/pve1/lxc/101/snapshot/killed",
        &[("force", "1")],
    )
    .await;
    assert_eq!(st["exitstatus"], "CT is locked (snapshot)");
    sim.set_guest(101, json!({"lock": null})).await.unwrap();
    let st = run(
        &sim,
        "DELETE",
        "/nodes/pve1/lxc/101/snapshot/killed",
        &[("force", "1")],
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");

    // Rollback: fails before changing anything (not even the power state).
    let before = sim.comparable_guest(101).await.unwrap();
    sim.add_task_fault("vzrollback", None, None).await.unwrap();
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/snapshot/nightly/rollback",
        &[],
    )
    .await;
    assert_eq!(
        st["exitstatus"],
        "vzrollback failed midway (pvesim task fault)"
    );
    assert_eq!(sim.comparable_guest(101).await.unwrap(), before);
    assert_eq!(before.status.as_deref(), Some("running"));
    // Spent: the next rollback works.
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/snapshot/nightly/rollback",
        &[],
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");

    // vzdump: no archive, no lock.
    let n = backups(&sim, "local", 101).await.len();
    sim.add_task_fault("vzdump", None, None).await.unwrap();
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/vzdump",
        &[("vmid", "101"), ("storage", "local")],
    )
    .await;
    assert_eq!(st["exitstatus"], "vzdump failed midway (pvesim task fault)");
    assert_eq!(backups(&sim, "local", 101).await.len(), n);
    assert_eq!(sim.guest(101).await.unwrap()["lock"], Value::Null);

    // Destroy: nothing happens.
    let before = sim.comparable_guest(102).await.unwrap();
    sim.add_task_fault("vzdestroy", Some(102), None)
        .await
        .unwrap();
    let st = run(&sim, "DELETE", "/nodes/pve1/lxc/102", &[("purge", "1")]).await;
    assert_eq!(
        st["exitstatus"],
        "vzdestroy failed midway (pvesim task fault)"
    );
    assert_eq!(sim.comparable_guest(102).await.unwrap(), before);

    // Restore to a new vmid: the guest is made (stopped, unlocked, not started though
    // `start=1`), the task fails; destroy with purge takes it and its space away.
    let archive = guest_with_backup(&sim, 260, "lxc").await;
    let free = avail(&sim, "local-lvm").await;
    sim.add_task_fault("vzrestore", Some(261), None)
        .await
        .unwrap();
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "261"),
            ("ostemplate", &archive),
            ("restore", "1"),
            ("storage", "local-lvm"),
            ("start", "1"),
        ],
    )
    .await;
    assert_eq!(
        st["exitstatus"],
        "vzrestore failed midway (pvesim task fault)"
    );
    let g = sim.guest(261).await.unwrap();
    assert_eq!(
        (g["status"].clone(), g["lock"].clone()),
        (json!("stopped"), Value::Null)
    );
    assert_eq!(avail(&sim, "local-lvm").await, free - 8 * GIB);
    let st = run(&sim, "DELETE", "/nodes/pve1/lxc/261", &[("purge", "1")]).await;
    assert_eq!(st["exitstatus"], "OK");
    assert_eq!(avail(&sim, "local-lvm").await, free);

    // A create (`vzcreate`) likewise leaves a half-made container to destroy.
    sim.add_task_fault("vzcreate", None, None).await.unwrap();
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "263"),
            (
                "ostemplate",
                "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
            ),
            ("storage", "local-lvm"),
        ],
    )
    .await;
    assert_eq!(
        st["exitstatus"],
        "vzcreate failed midway (pvesim task fault)"
    );
    assert!(sim.comparable_guest(263).await.unwrap().exists);
    let st = run(&sim, "DELETE", "/nodes/pve1/lxc/263", &[("purge", "1")]).await;
    assert_eq!(st["exitstatus"], "OK");

    // A force-restore of a VM: the old disks and snapshots are gone, the half-made VM
    // stays and can be destroyed.
    let archive = guest_with_backup(&sim, 262, "qemu").await;
    sim.add_task_fault(
        "qmrestore",
        None,
        Some("start failed: QEMU exited with code 1"),
    )
    .await
    .unwrap();
    let upid = upid_of(
        &api(
            &sim,
            "POST",
            "/nodes/pve1/qemu",
            &[("vmid", "262"), ("archive", &archive), ("force", "1")],
        )
        .await,
    );
    let st = sim.wait_task(&upid, Duration::from_secs(30)).await.unwrap();
    assert_eq!(st["exitstatus"], "start failed: QEMU exited with code 1");
    assert!(
        task_log(&sim, &upid)
            .await
            .iter()
            .any(|l| l.starts_with("error after data was restored")),
    );
    let g = sim.comparable_guest(262).await.unwrap();
    assert!(g.exists && g.snapshots.is_empty(), "{g:?}");
    let st = run(&sim, "DELETE", "/nodes/pve1/qemu/262", &[("purge", "1")]).await;
    assert_eq!(st["exitstatus"], "OK");

    // The control surface: list, refuse bad specs, clear.
    sim.add_task_fault("vzstart", Some(101), None)
        .await
        .unwrap();
    let (status, body) = control_put(&sim, "/_sim/task-faults", json!({})).await;
    assert_eq!(status, 404, "{body}");
    sim.clear_task_faults().await.unwrap();
    let st = run(&sim, "POST", "/nodes/pve1/lxc/102/status/start", &[]).await;
    assert_eq!(st["exitstatus"], "OK");
}

#[tokio::test]
async fn a_flagged_guest_stops_after_its_next_config_change_only() {
    let sim = sim();
    for (kind, vmid, key) in [("lxc", 101u32, "memory"), ("qemu", 103, "memory")] {
        let path = format!("{}/config", guest_path(kind, vmid));
        sim.set_guest(vmid, json!({"stops_after_config_change": true}))
            .await
            .unwrap();
        assert_eq!(
            sim.guest(vmid).await.unwrap()["stops_after_config_change"],
            true
        );
        let old = get(&sim, &path).await[key].to_string();
        let r = api(&sim, "PUT", &path, &[(key, "3072")]).await;
        assert_eq!(r.data(), Value::Null);
        let g = sim.guest(vmid).await.unwrap();
        assert_eq!(g["status"], "stopped", "{kind}");
        assert_eq!(g["stops_after_config_change"], false, "spent");
        // Writing the old value back and starting again works (as the gate's undo does).
        let r = api(&sim, "PUT", &path, &[(key, old.trim_matches('"'))]).await;
        assert_eq!(r.data(), Value::Null);
        let st = run(
            &sim,
            "POST",
            &format!("{}/status/start", guest_path(kind, vmid)),
            &[],
        )
        .await;
        assert_eq!(st["exitstatus"], "OK");
        let r = api(&sim, "PUT", &path, &[(key, "1024")]).await;
        assert_eq!(r.data(), Value::Null);
        assert_eq!(sim.guest(vmid).await.unwrap()["status"], "running");
    }
    // QEMU's asynchronous POST config too.
    sim.set_guest(103, json!({"stops_after_config_change": true}))
        .await
        .unwrap();
    let st = run(
        &sim,
        "POST",
        "/nodes/pve1/qemu/103/config",
        &[("memory", "2048")],
    )
    .await;
    assert_eq!(st["exitstatus"], "OK");
    assert_eq!(sim.guest(103).await.unwrap()["status"], "stopped");
}

#[tokio::test]
async fn the_comparable_state_sees_each_kind_of_change() {
    let sim = sim();
    let base = sim.comparable_guest(101).await.unwrap();
    assert!(base.exists && !base.config.contains_key("digest"));
    assert_eq!(base.snapshots, vec!["nightly", "pre-upgrade"]);
    // A lock or a new digest alone is not a change.
    sim.set_guest(101, json!({"lock": "backup"})).await.unwrap();
    assert_eq!(sim.comparable_guest(101).await.unwrap(), base);
    sim.set_guest(101, json!({"lock": null})).await.unwrap();
    sim.set_guest(101, json!({"config": {"cores": "7"}}))
        .await
        .unwrap();
    assert_ne!(sim.comparable_guest(101).await.unwrap(), base);
    sim.set_guest(
        101,
        json!({"config": {"cores": base.config["cores"].to_string()}}),
    )
    .await
    .unwrap();
    assert_eq!(sim.comparable_guest(101).await.unwrap(), base);
    sim.set_guest(101, json!({"status": "stopped"}))
        .await
        .unwrap();
    assert_ne!(sim.comparable_guest(101).await.unwrap(), base);
    let missing = sim.comparable_guest(4242).await.unwrap();
    assert!(!missing.exists && missing.status.is_none());
}
