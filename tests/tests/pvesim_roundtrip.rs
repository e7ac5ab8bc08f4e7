//! PVE's round-trip rules on config writes (description newline, tags, canonical net0
//! with a generated MAC, digest changes, pending values on running CTs), the keyctl /
//! feature-flag rules for every token, and lock handling.

#[path = "pvesim_common/mod.rs"]
mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn description_tags_net0_and_digest() {
    let sim = spawn(&["--guests", "6"]);
    let path = "/nodes/pve1/lxc/102/config";
    let before = get(&sim, path).await;
    let r = api(
        &sim,
        "PUT",
        path,
        &[
            ("description", "hello\n\nworld\n\n"),
            ("tags", "Web,prod;web  DB"),
            (
                "net0",
                "bridge=vmbr1,name=eth0,ip=10.0.0.5/24,gw=10.0.0.1,firewall=true",
            ),
        ],
    )
    .await;
    assert_eq!(r.json(), json!({"data": null}));
    let after = get(&sim, path).await;
    assert_eq!(after["description"], "hello\n\nworld\n");
    assert_eq!(after["tags"], "db;prod;web");
    let net0 = after["net0"].as_str().unwrap();
    let mac = net0
        .split(',')
        .find_map(|p| p.strip_prefix("hwaddr="))
        .expect("generated hwaddr");
    assert!(
        mac.starts_with("BC:24:11:") && mac == mac.to_uppercase(),
        "{mac}"
    );
    assert_eq!(
        net0,
        format!(
            "name=eth0,bridge=vmbr1,firewall=1,gw=10.0.0.1,hwaddr={mac},ip=10.0.0.5/24,type=veth"
        )
    );
    assert_ne!(before["digest"], after["digest"]);
    // Sending net0 again without hwaddr generates a new MAC: a real drift source.
    api(
        &sim,
        "PUT",
        path,
        &[("net0", "name=eth0,bridge=vmbr1,ip=10.0.0.5/24")],
    )
    .await
    .data();
    let again = get(&sim, path).await;
    assert!(!again["net0"].as_str().unwrap().contains(mac));
    // A supplied MAC keeps its case.
    api(
        &sim,
        "PUT",
        path,
        &[("net0", "name=eth0,bridge=vmbr1,hwaddr=bc:24:11:aa:bb:cc")],
    )
    .await
    .data();
    assert_eq!(
        get(&sim, path).await["net0"],
        "name=eth0,bridge=vmbr1,hwaddr=bc:24:11:aa:bb:cc,type=veth"
    );
    // Deleting the description: absent afterwards, not null.
    api(&sim, "PUT", path, &[("delete", "description,tags")])
        .await
        .data();
    let cleared = get(&sim, path).await;
    assert!(
        cleared.get("description").is_none() && cleared.get("tags").is_none(),
        "{cleared}"
    );
    // Digest optimistic locking.
    let r = api(
        &sim,
        "PUT",
        path,
        &[
            ("onboot", "1"),
            ("digest", before["digest"].as_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.reason.as_deref(),
        Some("detected modified configuration - file changed by other user? Try again.")
    );
    let current = get(&sim, path).await["digest"].as_str().unwrap().to_owned();
    let r = api(&sim, "PUT", path, &[("onboot", "1"), ("digest", &current)]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn put_config_errors() {
    let sim = spawn(&["--guests", "6"]);
    let path = "/nodes/pve1/lxc/102/config";
    let r = api(&sim, "PUT", path, &[]).await;
    assert_eq!(
        (r.status, r.reason.as_deref()),
        (500, Some("no options specified"))
    );
    let r = api(
        &sim,
        "PUT",
        path,
        &[("memory", "1024"), ("delete", "memory")],
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["errors"]["delete"],
        "you can't use '-memory' and -delete memory' at the same time"
    );
    let r = api(&sim, "PUT", path, &[("delete", "memory")]).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("unable to delete required option 'memory'")
    );
    let r = api(&sim, "PUT", path, &[("unprivileged", "0")]).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("unable to modify read-only option: 'unprivileged'")
    );
    let r = api(&sim, "PUT", path, &[("bogus", "1")]).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["errors"]["bogus"]
            .as_str()
            .unwrap()
            .starts_with("property is not defined")
    );
    let r = api(&sim, "PUT", path, &[("onboot", "yes")]).await;
    assert_eq!(
        r.json()["errors"]["onboot"],
        "type check ('boolean') failed - got 'yes'"
    );
    // Locked guest: CT is locked (backup).
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/105/config",
        &[("onboot", "1")],
    )
    .await;
    assert_eq!(
        (r.status, r.reason.as_deref()),
        (500, Some("CT is locked (backup)"))
    );
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/999/config",
        &[("onboot", "1")],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Configuration file 'nodes/pve1/lxc/999.conf' does not exist")
    );
}

#[tokio::test]
async fn running_ct_keeps_non_hotpluggable_changes_pending() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let path = "/nodes/pve1/lxc/101/config";
    api(
        &sim,
        "PUT",
        path,
        &[
            ("memory", "768"),
            ("hostname", "renamed"),
            ("nameserver", "1.1.1.1 8.8.8.8"),
            ("ostype", "ubuntu"),
        ],
    )
    .await
    .data();
    let merged = get(&sim, path).await;
    assert_eq!(merged["memory"], 768);
    assert_eq!(merged["ostype"], "ubuntu");
    let current = get(&sim, &format!("{path}?current=1")).await;
    assert_eq!(current["memory"], 768, "memory is hot-plugged");
    assert_eq!(current["hostname"], "renamed", "hostname applies at once");
    assert_eq!(current["ostype"], "debian", "ostype stays pending");
    assert!(current.get("nameserver").is_none());
    let pending = get(&sim, "/nodes/pve1/lxc/101/pending").await;
    let os = pending
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["key"] == "ostype")
        .unwrap();
    assert_eq!(
        (os["value"].clone(), os["pending"].clone()),
        (json!("debian"), json!("ubuntu"))
    );
    // Stop and start: pending values are applied.
    run_task(&sim, "POST", "/nodes/pve1/lxc/101/status/stop", &[]).await;
    run_task(&sim, "POST", "/nodes/pve1/lxc/101/status/start", &[]).await;
    let current = get(&sim, &format!("{path}?current=1")).await;
    assert_eq!(current["ostype"], "ubuntu");
    assert_eq!(current["nameserver"], "1.1.1.1 8.8.8.8");
    assert!(
        get(&sim, "/nodes/pve1/lxc/101/pending")
            .await
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p.get("pending").is_none())
    );
}

#[tokio::test]
async fn keyctl_is_refused_for_every_token_and_nesting_needs_vm_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let acl = write_acl(
        &dir,
        &json!({"tokens": [
            {"token_id": "felhom@pve!agent", "secret": "s", "acl": [
                {"path": "/vms", "privs": ["VM.Audit", "VM.Config.Options"]}]},
            {"token_id": "admin@pve!full", "secret": "f", "privsep": false}
        ]}),
    );
    let sim = spawn(&["--guests", "8", "--acl", &acl]);
    let keyctl_403 = "Permission check failed (changing feature flags (except nesting) is only allowed for root@pam)";
    for auth in [
        sim.auth_header(),
        token_header("admin@pve!full", "f"),
        token_header("felhom@pve!agent", "s"),
    ] {
        for features in ["keyctl=1", "nesting=1,keyctl=1", "keyctl=true"] {
            let r = call(
                &sim,
                Some(&auth),
                "PUT",
                "/nodes/pve1/lxc/102/config",
                &[("features", features)],
            )
            .await;
            assert_eq!(
                (r.status, r.reason.as_deref()),
                (403, Some(keyctl_403)),
                "{auth} {features}"
            );
        }
    }
    // Privileged CT (108): any feature change.
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/108/config",
        &[("features", "nesting=1")],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some(
            "Permission check failed (changing feature flags for privileged container is only allowed for root@pam)"
        )
    );
    // Nesting alone: VM.Allocate.
    let r = call(
        &sim,
        Some(&token_header("felhom@pve!agent", "s")),
        "PUT",
        "/nodes/pve1/lxc/102/config",
        &[("features", "nesting=1")],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Permission check failed (/vms/102, VM.Allocate)")
    );
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/102/config",
        &[("features", "nesting=1")],
    )
    .await;
    assert_eq!(r.status, 200);
    // Once set (as by the root CLI), re-sending the same flags in another spelling passes.
    sim.set_guest(102, json!({"config": {"features": "nesting=1,keyctl=1"}}))
        .await
        .unwrap();
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/102/config",
        &[("features", "keyctl=yes,nesting=true")],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.reason);
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/102/config").await["features"],
        "keyctl=yes,nesting=true"
    );
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/102/config",
        &[("delete", "features")],
    )
    .await;
    assert_eq!(r.reason.as_deref(), Some(keyctl_403));
}

#[tokio::test]
async fn qemu_config_put_and_post() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    let path = "/nodes/pve1/qemu/103/config";
    api(
        &sim,
        "PUT",
        path,
        &[
            ("description", "vm"),
            ("tags", "B,a"),
            ("net1", "virtio,bridge=vmbr0"),
        ],
    )
    .await
    .data();
    let cfg = get(&sim, path).await;
    assert_eq!(cfg["description"], "vm\n");
    assert_eq!(cfg["tags"], "a;b");
    assert!(
        cfg["net1"]
            .as_str()
            .unwrap()
            .starts_with("virtio=BC:24:11:"),
        "{cfg}"
    );
    assert!(cfg["net1"].as_str().unwrap().ends_with(",bridge=vmbr0"));
    // Running VM: memory stays pending.
    api(&sim, "PUT", path, &[("memory", "8192")]).await.data();
    assert_eq!(
        get(&sim, &format!("{path}?current=1")).await["memory"],
        cfg["memory"]
    );
    let st = run_task(&sim, "POST", path, &[("name", "renamed")]).await;
    assert_eq!(st["type"], "qmconfig");
    assert_eq!(st["exitstatus"], "OK");
    assert_eq!(get(&sim, path).await["name"], "renamed");
    let r = api(&sim, "PUT", path, &[("args", "-foo")]).await;
    assert_eq!(r.reason.as_deref(), Some("only root can set 'args' config"));
}
