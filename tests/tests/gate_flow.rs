//! The reversibility gate end to end over real processes: signed gated operations from
//! the hub (`felhom-hubsim`) run by `felhom-agent run` (uid 65534) against
//! `felhom-pvesim`, each with its undo point made first, its health checked after, and an
//! injected failure (a pvesim task fault, a guest a config change stops) undone so that
//! the guest's state (config, snapshots, existence, power state) equals the state before,
//! modulo the undo point the agent keeps.
//!
//! Needs root (see `ops_support`).

mod gate_support;
mod hub_support;
mod ops_support;
mod proxmox_client_support;

use felhom_testbed::harness::Fault;
use gate_support::*;
use ops_support::*;
use serde_json::{Value, json};

fn undo_of(r: &Value) -> Value {
    r["result"]["undo"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_applies_a_broken_change_is_undone_and_a_signed_undo_writes_back() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 8}}));
    let sim = &stack.pve.pve;
    lvm_ct(sim, 301, "running").await;
    lvm_ct(sim, 302, "running").await;
    let agent = stack.start_agent();

    // A change that works: applied, the previous values kept as its undo point.
    let p = stack.gated(
        "set_config",
        "lxc",
        301,
        json!({"config": {"memory": 1024}}),
        "reversible",
    );
    let first = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &first).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert_eq!(
        undo_of(&r),
        json!({"kind": "previous_values", "ref": null, "status": "kept"}),
        "{r}"
    );
    assert_eq!(memory(sim, 301).await, 1024);

    // A change that stops the guest: the health check fails, the old values are written
    // back and the guest started: everything as before.
    sim.set_guest(302, json!({"stops_after_config_change": true}))
        .await
        .unwrap();
    let before = comparable_without(sim, 302, None).await;
    let p = stack.gated(
        "set_config",
        "lxc",
        302,
        json!({"config": {"memory": 2048, "cores": 2}}),
        "reversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "rolled_back", "{r}\n{}", agent.log_text());
    assert_eq!(undo_of(&r)["status"], "kept", "{r}");
    assert_eq!(comparable_without(sim, 302, None).await, before);

    // A signed undo of the first change writes its previous values back.
    let u = stack.gated("undo", "lxc", 301, json!({"op_id": first}), "reversible");
    let uid = op_id_of(&u);
    let r = stack.run_op(&stack.signed(&u), &uid).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert_eq!(r["result"]["undone_op_id"], json!(first), "{r}");
    assert_eq!(memory(sim, 301).await, 512);
    assert_eq!(status(sim, 301).await, "running");

    // A change edited by someone else afterwards is not overwritten by an undo.
    let p = stack.gated(
        "set_config",
        "lxc",
        301,
        json!({"config": {"memory": 768}}),
        "reversible",
    );
    let third = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &third).await;
    assert_eq!(r["state"], "applied", "{r}");
    sim.set_guest(301, json!({"config": {"memory": "999"}}))
        .await
        .unwrap();
    let u = stack.gated("undo", "lxc", 301, json!({"op_id": third}), "reversible");
    let uid = op_id_of(&u);
    let r = stack.run_op(&stack.signed(&u), &uid).await;
    assert_eq!(r["state"], "failed", "{r}\n{}", agent.log_text());
    assert_eq!(undo_of(&r)["status"], "not_possible", "{r}");
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("digest") && msg.contains("not overwritten"),
        "{msg}"
    );
    assert_eq!(memory(sim, 301).await, 999);

    // A config write Proxmox refuses changed nothing: failed, and nothing is written back
    // over what is there.
    sim.add_fault(
        &Fault::http_500("/nodes/pve1/lxc/301/config", "simulated refusal")
            .method("PUT")
            .times(1),
    )
    .await
    .unwrap();
    let writes_before = config_writes(&stack, 301).await;
    let p = stack.gated(
        "set_config",
        "lxc",
        301,
        json!({"config": {"memory": 256}}),
        "reversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "failed", "{r}\n{}", agent.log_text());
    assert_eq!(memory(sim, 301).await, 999);
    assert_eq!(
        config_writes(&stack, 301).await,
        writes_before + 1,
        "only the refused write"
    );

    // A VM's config change is a qmconfig task.
    make_guest(
        sim,
        303,
        "qemu",
        json!({"name": "vm303", "memory": "2048", "cores": "2",
            "scsi0": "local-lvm:vm-303-disk-0,size=8G"}),
        "stopped",
    )
    .await;
    let p = stack.gated(
        "set_config",
        "qemu",
        303,
        json!({"config": {"memory": 4096}}),
        "reversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert_eq!(memory(sim, 303).await, 4096);
    drop(agent);
}

async fn config_writes(stack: &Stack, vmid: u32) -> usize {
    let path = format!("/lxc/{vmid}/config");
    stack
        .mutations()
        .await
        .iter()
        .filter(|m| m.path.ends_with(&path))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_keeps_an_undo_snapshot_a_failed_one_is_undone_and_release_needs_two_keys() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 8}}));
    let sim = &stack.pve.pve;
    for vmid in [311, 312] {
        lvm_ct(sim, vmid, "stopped").await;
        snapshot(sim, "lxc", vmid, "before").await;
        sim.set_guest(vmid, json!({"config": {"memory": "640"}}))
            .await
            .unwrap();
    }
    let agent = stack.start_agent();

    let p = stack.gated(
        "rollback",
        "lxc",
        311,
        json!({"snapshot": "before", "start": true}),
        "reversible",
    );
    let first = op_id_of(&p);
    let undo_name = format!("felhom-undo-{}", &first[..12]);
    let r = stack.run_op(&stack.signed(&p), &first).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert_eq!(
        undo_of(&r),
        json!({"kind": "snapshot", "ref": undo_name, "status": "kept"}),
        "{r}"
    );
    assert_eq!(memory(sim, 311).await, 512);
    assert_eq!(status(sim, 311).await, "running");
    let snaps = comparable_without(sim, 311, None).await.snapshots;
    assert_eq!(snaps, vec!["before".to_string(), undo_name.clone()]);

    // The rollback task fails: rolled back to the undo snapshot, as before.
    let before = comparable_without(sim, 312, None).await;
    sim.add_task_fault("vzrollback", Some(312), None)
        .await
        .unwrap();
    let p = stack.gated(
        "rollback",
        "lxc",
        312,
        json!({"snapshot": "before", "start": false}),
        "reversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "rolled_back", "{r}\n{}", agent.log_text());
    let undo2 = format!("felhom-undo-{}", &id[..12]);
    assert_eq!(comparable_without(sim, 312, Some(&undo2)).await, before);

    // A signed undo of the first rollback: the memory it discarded is back.
    let u = stack.gated("undo", "lxc", 311, json!({"op_id": first}), "reversible");
    let uid = op_id_of(&u);
    let r = stack.run_op(&stack.signed(&u), &uid).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert_eq!(memory(sim, 311).await, 640);
    assert_eq!(
        status(sim, 311).await,
        "stopped",
        "the power state from before"
    );

    // release_undo is irreversible: one key is not enough, two are.
    let rel = stack.gated(
        "release_undo",
        "lxc",
        311,
        json!({"op_id": first}),
        "irreversible",
    );
    let rid = op_id_of(&rel);
    let r = stack.run_op(&stack.signed(&rel), &rid).await;
    assert_eq!(r["state"], "refused", "{r}");
    assert_eq!(r["reason"], "below_threshold", "{r}");
    let rel = stack.gated(
        "release_undo",
        "lxc",
        311,
        json!({"op_id": first}),
        "irreversible",
    );
    let rid = op_id_of(&rel);
    let r = stack.run_op(&stack.cosigned(&rel), &rid).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert_eq!(undo_of(&r)["status"], "released", "{r}");
    let snaps = comparable_without(sim, 311, None).await.snapshots;
    assert_eq!(snaps, vec!["before".to_string()]);
    // Released: nothing left to undo from.
    let u = stack.gated("undo", "lxc", 311, json!({"op_id": first}), "reversible");
    let uid = op_id_of(&u);
    let r = stack.run_op(&stack.signed(&u), &uid).await;
    assert_eq!(r["state"], "refused", "{r}");
    assert_eq!(r["reason"], "not_reversible", "{r}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_on_zfs_keeps_a_backup_and_one_that_cannot_be_undone_needs_the_irreversible_grant()
{
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 8}}));
    let sim = &stack.pve.pve;
    sim.set_storage("local-zfs", json!({"type": "zfspool"}))
        .await
        .unwrap();
    make_guest(
        sim,
        321,
        "lxc",
        json!({"hostname": "zfs", "memory": "512", "ostype": "debian",
            "rootfs": "local-zfs:subvol-321-disk-0,size=4G"}),
        "stopped",
    )
    .await;
    snapshot(sim, "lxc", 321, "before").await;
    // A container whose snapshot was taken before it moved to `dir` with a bind mount.
    lvm_ct(sim, 322, "stopped").await;
    snapshot(sim, "lxc", 322, "before").await;
    sim.set_guest(
        322,
        json!({"config": {"rootfs": "local:322/vm-322-disk-0.raw,size=4G", "mp0": "/srv/share,mp=/share"}}),
    )
    .await
    .unwrap();
    // A VM with a qcow2 disk on a `dir` storage: snapshots work there.
    sim.set_storage(
        "dirimg",
        json!({"type": "dir", "content": ["rootdir", "images"]}),
    )
    .await
    .unwrap();
    make_guest(
        sim,
        323,
        "qemu",
        json!({"name": "vm323", "memory": "2048",
            "scsi0": "dirimg:323/vm-323-disk-0.qcow2,size=8G"}),
        "stopped",
    )
    .await;
    snapshot(sim, "qemu", 323, "before").await;
    let agent = stack.start_agent();

    let p = stack.gated(
        "rollback",
        "qemu",
        323,
        json!({"snapshot": "before"}),
        "reversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert_eq!(undo_of(&r)["kind"], "snapshot", "{r}");

    let p = stack.gated(
        "rollback",
        "lxc",
        321,
        json!({"snapshot": "before"}),
        "reversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    let undo = undo_of(&r);
    assert_eq!(undo["kind"], "backup", "{r}");
    let volid = undo["ref"].as_str().unwrap().to_string();
    assert!(
        volid.starts_with("nas-backup:backup/vzdump-lxc-321-"),
        "{volid}"
    );
    assert!(
        backups(sim, 321)
            .await
            .iter()
            .any(|b| b["volid"] == volid.as_str())
    );
    assert_eq!(
        comparable_without(sim, 321, None).await.snapshots,
        vec!["before".to_string()],
        "no snapshot on zfs: the target stays the most recent"
    );

    // dir + bind mount: neither a snapshot nor a complete backup.
    let before = comparable_without(sim, 322, None).await;
    let p = stack.gated(
        "rollback",
        "lxc",
        322,
        json!({"snapshot": "before"}),
        "reversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "refused", "{r}");
    assert_eq!(r["reason"], "not_reversible", "{r}");
    assert!(r["message"].as_str().unwrap().contains("mp0"), "{r}");
    assert_eq!(
        comparable_without(sim, 322, None).await,
        before,
        "nothing changed"
    );
    // Granted irreversible with two keys it runs without an undo point and says so.
    let p = stack.gated(
        "rollback",
        "lxc",
        322,
        json!({"snapshot": "before"}),
        "irreversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.cosigned(&p), &id).await;
    assert_ne!(r["state"], "refused", "{r}\n{}", agent.log_text());
    assert_eq!(
        undo_of(&r),
        json!({"kind": null, "ref": null, "status": "not_possible"}),
        "{r}"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_a_new_vmid_and_over_a_guest_with_failures_undone() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 8}}));
    let sim = &stack.pve.pve;
    lvm_ct(sim, 330, "stopped").await;
    let archive = backup(sim, 330).await;
    lvm_ct(sim, 333, "stopped").await;
    lvm_ct(sim, 334, "stopped").await;
    make_guest(
        sim,
        335,
        "lxc",
        json!({"hostname": "prot", "memory": "512", "protection": "1",
            "rootfs": "local-lvm:vm-335-disk-0,size=4G"}),
        "stopped",
    )
    .await;
    let agent = stack.start_agent();
    let restore = |vmid: u32, force: bool| {
        stack.gated(
            "restore",
            "lxc",
            vmid,
            json!({"archive": archive, "storage": "local-lvm", "force": force}),
            "reversible",
        )
    };

    // To a free vmid: applied, no undo point needed.
    let p = restore(331, false);
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert!(sim.comparable_guest(331).await.unwrap().exists);

    // The restore task fails: the half-made guest is destroyed.
    sim.add_task_fault("vzrestore", Some(332), None)
        .await
        .unwrap();
    let p = restore(332, false);
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "rolled_back", "{r}\n{}", agent.log_text());
    assert!(!sim.comparable_guest(332).await.unwrap().exists);

    // Over an existing guest: a backup of it first.
    let p = restore(333, true);
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    let undo = undo_of(&r);
    assert_eq!(undo["kind"], "backup", "{r}");
    assert!(
        backups(sim, 333)
            .await
            .iter()
            .any(|b| b["volid"] == undo["ref"])
    );

    // ... and when that restore fails, the backup is restored over it.
    let before = comparable_without(sim, 334, None).await;
    sim.add_task_fault("vzrestore", Some(334), None)
        .await
        .unwrap();
    let p = restore(334, true);
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "rolled_back", "{r}\n{}", agent.log_text());
    let after = comparable_without(sim, 334, None).await;
    assert_eq!(after.exists, before.exists);
    assert_eq!(after.status, before.status);
    assert_eq!(after.snapshots, before.snapshots);
    assert_eq!(after.config["memory"], before.config["memory"]);
    assert_eq!(after.config["hostname"], before.config["hostname"]);

    // protection: 1 is never restored over, whatever the grant.
    let p = stack.gated(
        "restore",
        "lxc",
        335,
        json!({"archive": archive, "storage": "local-lvm", "force": true}),
        "irreversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.cosigned(&p), &id).await;
    assert_eq!(r["state"], "refused", "{r}");
    assert_eq!(r["reason"], "protected", "{r}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_and_delete_snapshot_need_two_keys_keep_a_protected_backup_and_can_be_undone() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 8}}));
    let sim = &stack.pve.pve;
    lvm_ct(sim, 341, "stopped").await;
    lvm_ct(sim, 342, "stopped").await;
    snapshot(sim, "lxc", 342, "old").await;
    make_guest(
        sim,
        343,
        "lxc",
        json!({"hostname": "prot", "memory": "512", "protection": "1",
            "rootfs": "local-lvm:vm-343-disk-0,size=4G"}),
        "stopped",
    )
    .await;
    let agent = stack.start_agent();

    let p = stack.gated(
        "destroy",
        "lxc",
        341,
        json!({"purge": true}),
        "irreversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "refused", "{r}");
    assert_eq!(r["reason"], "below_threshold", "{r}");
    assert!(sim.comparable_guest(341).await.unwrap().exists);

    // A failed destroy changes nothing; its backup stays.
    let before = comparable_without(sim, 341, None).await;
    sim.add_task_fault("vzdestroy", Some(341), None)
        .await
        .unwrap();
    let p = stack.gated(
        "destroy",
        "lxc",
        341,
        json!({"purge": true}),
        "irreversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.cosigned(&p), &id).await;
    assert_eq!(r["state"], "failed", "{r}\n{}", agent.log_text());
    assert_eq!(comparable_without(sim, 341, None).await, before);

    let p = stack.gated(
        "destroy",
        "lxc",
        341,
        json!({"purge": true}),
        "irreversible",
    );
    let destroyed = op_id_of(&p);
    let r = stack.run_op(&stack.cosigned(&p), &destroyed).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert!(!sim.comparable_guest(341).await.unwrap().exists);
    let undo = undo_of(&r);
    assert_eq!(undo["kind"], "backup", "{r}");
    let kept = backups(sim, 341).await;
    let b = kept
        .iter()
        .find(|b| b["volid"] == undo["ref"])
        .unwrap_or_else(|| panic!("{undo} listed in {kept:?}"));
    assert_eq!(b["protected"], json!(1), "{b}");

    // A signed undo restores the destroyed guest from its protected backup.
    let u = stack.gated(
        "undo",
        "lxc",
        341,
        json!({"op_id": destroyed}),
        "reversible",
    );
    let uid = op_id_of(&u);
    let r = stack.run_op(&stack.signed(&u), &uid).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    let back = sim.comparable_guest(341).await.unwrap();
    assert!(back.exists);
    assert_eq!(back.config["memory"], before.config["memory"]);

    // protection: 1 is never destroyed.
    let p = stack.gated("destroy", "lxc", 343, json!({}), "irreversible");
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.cosigned(&p), &id).await;
    assert_eq!(r["state"], "refused", "{r}");
    assert_eq!(r["reason"], "protected", "{r}");

    // delete_snapshot: irreversible, no undo point.
    let p = stack.gated(
        "delete_snapshot",
        "lxc",
        342,
        json!({"name": "old"}),
        "irreversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.cosigned(&p), &id).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    assert!(
        comparable_without(sim, 342, None)
            .await
            .snapshots
            .is_empty()
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_point_that_cannot_be_made_refuses_and_a_failed_snapshot_leaves_none() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 8}}));
    let sim = &stack.pve.pve;
    lvm_ct(sim, 351, "stopped").await;
    snapshot(sim, "lxc", 351, "before").await;
    lvm_ct(sim, 352, "stopped").await;
    lvm_ct(sim, 353, "running").await;
    lvm_ct(sim, 354, "stopped").await;
    let archive = backup(sim, 354).await;
    let agent = stack.start_agent();

    // The undo snapshot's task fails midway: refused, its partial snapshot deleted.
    let before = comparable_without(sim, 351, None).await;
    sim.add_task_fault("vzsnapshot", Some(351), None)
        .await
        .unwrap();
    let p = stack.gated(
        "rollback",
        "lxc",
        351,
        json!({"snapshot": "before"}),
        "reversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "refused", "{r}\n{}", agent.log_text());
    assert_eq!(r["reason"], "undo_point_failed", "{r}");
    assert_eq!(
        comparable_without(sim, 351, None).await,
        before,
        "nothing changed"
    );

    // No room for the undo backup: refused, nothing changed.
    let before = comparable_without(sim, 352, None).await;
    sim.set_storage("nas-backup", json!({"avail": 1024}))
        .await
        .unwrap();
    let p = stack.gated(
        "restore",
        "lxc",
        352,
        json!({"archive": archive, "storage": "local-lvm", "force": true}),
        "reversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "refused", "{r}\n{}", agent.log_text());
    assert_eq!(r["reason"], "undo_point_failed", "{r}");
    assert_eq!(
        comparable_without(sim, 352, None).await,
        before,
        "nothing changed"
    );

    // A plain signed snapshot whose task fails midway: the partial snapshot is deleted.
    sim.add_task_fault("vzsnapshot", Some(353), None)
        .await
        .unwrap();
    let p = stack
        .guest_op("snapshot", "lxc", 353)
        .params(json!({"name": "halfway"}));
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.signed(&p), &id).await;
    assert_eq!(r["state"], "failed", "{r}\n{}", agent.log_text());
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("partial snapshot halfway was deleted"),
        "{r}"
    );
    assert!(
        comparable_without(sim, 353, None)
            .await
            .snapshots
            .is_empty()
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gated_kind_is_refused_on_a_guest_the_desired_state_manages() {
    needs_root!();
    let stack = Stack::new(json!({"gate": {"health_timeout_seconds": 8}}));
    let sim = &stack.pve.pve;
    lvm_ct(sim, 381, "running").await;
    snapshot(sim, "lxc", 381, "old").await;
    stack.write_desired(&json!({"generation": 1, "guests": [{"vmid": 381, "power": "running"}]}));
    stack.patch_config(&json!({"reconcile": {"desired_file": stack.desired}}));
    let before = comparable_without(sim, 381, None).await;
    let agent = stack.start_agent();
    let other = "0123456789abcdef0123456789abcdef";
    for (kind, params, grant) in [
        (
            "set_config",
            json!({"config": {"memory": 1024}}),
            "reversible",
        ),
        ("rollback", json!({"snapshot": "old"}), "reversible"),
        ("destroy", json!({"purge": true}), "irreversible"),
        ("undo", json!({"op_id": other}), "reversible"),
    ] {
        let p = stack.gated(kind, "lxc", 381, params, grant);
        let id = op_id_of(&p);
        let r = stack.run_op(&stack.cosigned(&p), &id).await;
        assert_eq!(r["state"], "refused", "{kind}: {r}\n{}", agent.log_text());
        assert_eq!(r["reason"], "conflicts_with_desired", "{kind}: {r}");
    }
    assert_eq!(comparable_without(sim, 381, None).await, before);
    let touched: Vec<String> = stack
        .mutations()
        .await
        .iter()
        .filter(|m| m.path.contains("/381"))
        .map(|m| format!("{} {}", m.method, m.path))
        .collect();
    assert!(
        touched.iter().all(|t| t.ends_with("/381/snapshot")),
        "only the setup's snapshot: {touched:?}"
    );
    // Removing snapshots is not what the desired state governs (taking one is not either):
    // a release of an unknown undo point gets its own answer, and a snapshot is deleted.
    let p = stack.gated(
        "release_undo",
        "lxc",
        381,
        json!({"op_id": other}),
        "irreversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.cosigned(&p), &id).await;
    assert_eq!(r["state"], "refused", "{r}");
    assert_ne!(r["reason"], "conflicts_with_desired", "{r}");
    let p = stack.gated(
        "delete_snapshot",
        "lxc",
        381,
        json!({"name": "old"}),
        "irreversible",
    );
    let id = op_id_of(&p);
    let r = stack.run_op(&stack.cosigned(&p), &id).await;
    assert_eq!(r["state"], "applied", "{r}\n{}", agent.log_text());
    let after = comparable_without(sim, 381, None).await;
    assert!(!after.snapshots.iter().any(|s| s == "old"), "{after:?}");
    drop(agent);
}
