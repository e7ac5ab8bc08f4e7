//! For every PVE fixture (real captures and synthesized bodies), the simulator's answer
//! on the same endpoint has the same shape: same keys (allowing the documented optional
//! ones), same JSON types per key (strings vs numbers, 0/1 flags), same error bodies.

#[path = "pvesim_common/mod.rs"]
mod common;

use common::*;
use serde_json::{Value, json};

const LXC_OPTIONAL: &[&str] = &["pid", "tags", "lock", "template"];
const PRESSURE: &[&str] = &[
    "pressurecpusome",
    "pressurecpufull",
    "pressureiosome",
    "pressureiofull",
    "pressurememorysome",
    "pressurememoryfull",
];

fn find_vmid(list: &Value, vmid: u64) -> Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|i| i["vmid"] == json!(vmid) || i["vmid"] == json!(vmid.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("vmid {vmid} not in {list}"))
}

#[tokio::test]
async fn node_version_status_and_list_on_7_4() {
    let sim = spawn(&["--pve-version", "7.4", "--guests", "6"]);
    let nodes = get(&sim, "/nodes").await;
    let f = fixture("pve7-nodes.json");
    assert_shape("nodes", &f["data"][0], &nodes[0], &[], &[], &[]);
    assert_eq!(nodes[0]["ssl_fingerprint"], json!(sim.pin_sha256()));

    let status = get(&sim, "/nodes/pve1/status").await;
    assert_shape(
        "node status 7.4",
        &fixture("pve7-nodes-status.json")["data"],
        &status,
        &[],
        &[],
        &[],
    );
    assert!(status["loadavg"][0].is_string() && status["cpuinfo"]["mhz"].is_string());

    for path in ["/version", "/nodes/pve1/version"] {
        let v = get(&sim, path).await;
        assert_shape(
            path,
            &fixture("pve7-nodes-version.json")["data"],
            &v,
            &[],
            &[],
            &[],
        );
        assert_eq!(v["version"], "7.4-16");
        assert_eq!(v["repoid"].as_str().unwrap().len(), 8);
    }
}

#[tokio::test]
async fn node_status_grows_with_the_version() {
    let base = fixture("pve7-nodes-status.json")["data"].clone();
    let sim81 = spawn(&["--pve-version", "8.1", "--guests", "0"]);
    let s = get(&sim81, "/nodes/pve1/status").await;
    assert_shape("8.1", &base, &s, &[], &["current-kernel", "boot-info"], &[]);
    assert!(s["current-kernel"]["release"].is_string() && s["boot-info"]["mode"].is_string());
    assert!(s["memory"].get("available").is_none());
    let v = get(&sim81, "/version").await;
    assert_shape(
        "8.x version",
        &fixture("synthesized/pve8-version.json")["data"],
        &v,
        &[],
        &[],
        &[],
    );
    assert_eq!(v["repoid"].as_str().unwrap().len(), 16);

    let sim91 = spawn(&["--pve-version", "9.1", "--guests", "0"]);
    let s = get(&sim91, "/nodes/pve1/status").await;
    assert!(s["memory"]["available"].is_number(), "{s}");
    assert!(
        s["pveversion"]
            .as_str()
            .unwrap()
            .starts_with("pve-manager/9.1")
    );
}

#[tokio::test]
async fn lxc_list_vmid_is_a_string_before_8_2() {
    let old = fixture("pve7-lxc-list.json")["data"].clone();
    let new = fixture("synthesized/pve8-lxc-list.json")["data"].clone();
    for (ver, string_vmid) in [("7.4", true), ("8.1", true), ("8.4", false), ("9.1", false)] {
        let sim = spawn(&["--pve-version", ver, "--guests", "8"]);
        let list = get(&sim, "/nodes/pve1/lxc").await;
        let items = list.as_array().unwrap();
        assert_eq!(items.len(), 6, "8 guests, 2 of them QEMU");
        let running = old
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["status"] == "running")
            .unwrap();
        let stopped_template = &old[2];
        for item in items {
            assert_eq!(item["vmid"].is_string(), string_vmid, "{ver}: {item}");
            let extra: Vec<&str> = if ver == "9.1" && item["status"] == "running" {
                LXC_OPTIONAL.iter().chain(PRESSURE).copied().collect()
            } else {
                LXC_OPTIONAL.to_vec()
            };
            let reference = if item["status"] == "running" {
                running
            } else {
                stopped_template
            };
            let reference = if string_vmid {
                reference.clone()
            } else {
                new[0].clone()
            };
            assert_shape(
                &format!("{ver} lxc item"),
                &reference,
                item,
                LXC_OPTIONAL,
                &extra,
                &["template"],
            );
            if item["status"] == "stopped" {
                assert!(item.get("pid").is_none() && item["disk"] == 0, "{item}");
            }
        }
    }
}

#[tokio::test]
async fn qemu_list_and_status() {
    let sim = spawn(&["--pve-version", "8.4", "--guests", "6"]);
    let list = get(&sim, "/nodes/pve1/qemu").await;
    let vm = find_vmid(&list, 103);
    assert!(vm["vmid"].is_number() && vm["status"] == "running" && vm["pid"].is_number());
    let status = get(&sim, "/nodes/pve1/qemu/103/status/current").await;
    let f = fixture("pve8-qemu-status-current-running.json")["data"].clone();
    assert_shape(
        "qemu running",
        &f,
        &status,
        &["spice"],
        &["tags", "lock", "template"],
        &["agent"],
    );
    assert_eq!(status["ha"], json!({"managed": 0}));
    assert_eq!(status["blockstat"]["scsi0"]["account_failed"], json!(true));
}

#[tokio::test]
async fn lxc_status_current() {
    let sim = spawn(&["--pve-version", "8.4", "--guests", "6"]);
    let running = get(&sim, "/nodes/pve1/lxc/101/status/current").await;
    let f = fixture("synthesized/pve8-lxc-status-current-running.json")["data"].clone();
    assert_shape(
        "lxc running",
        &f,
        &running,
        &["tags"],
        &["lock", "template"],
        &[],
    );
    assert_eq!(running["ha"], json!({"managed": 0}));
    assert!(running["vmid"].is_number());

    // An LXC template, stopped: as in the real capture.
    sim.set_guest(
        102,
        json!({"template": true, "status": "stopped", "config": {"tags": "tag1;tag2"}}),
    )
    .await
    .unwrap();
    let tpl = get(&sim, "/nodes/pve1/lxc/102/status/current").await;
    let f = fixture("pve7-lxc-status-current-stopped-template.json")["data"].clone();
    assert_shape("lxc template", &f, &tpl, &[], &["lock"], &["template"]);
    assert_eq!(tpl["template"], 1);

    let ha = get(&sim, "/nodes/pve1/lxc/104/status/current").await;
    assert_eq!(ha["ha"]["managed"], 1);
    let locked = get(&sim, "/nodes/pve1/lxc/105/status/current").await;
    assert_eq!(locked["lock"], "backup");
}

#[tokio::test]
async fn lxc_config_shapes() {
    let sim = spawn(&["--pve-version", "8.4", "--guests", "10"]);
    // 105: unprivileged, description, tags, cpulimit, features (and locked).
    let cfg = get(&sim, "/nodes/pve1/lxc/105/config").await;
    let f = fixture("synthesized/pve8-lxc-config-typical.json")["data"].clone();
    assert_shape(
        "typical config",
        &f,
        &cfg,
        &[],
        &["lock", "parent"],
        &["onboot", "unprivileged"],
    );
    assert!(cfg["cpulimit"].is_string(), "cpulimit is a string: {cfg}");
    assert!(cfg["description"].as_str().unwrap().ends_with('\n'));
    assert_eq!(cfg["digest"].as_str().unwrap().len(), 40);
    // 108: privileged with raw lxc lines, like the real capture.
    let cfg = get(&sim, "/nodes/pve1/lxc/108/config").await;
    let f = fixture("pve7-lxc-config.json")["data"].clone();
    assert_shape(
        "raw lxc config",
        &f,
        &cfg,
        &["mp0", "tags"],
        &["parent", "unprivileged"],
        &["onboot"],
    );
    assert!(cfg["lxc"][0][1].is_string());
}

#[tokio::test]
async fn snapshot_list_shape_and_order() {
    let sim = spawn(&["--guests", "6"]);
    let f = fixture("synthesized/pve8-lxc-snapshot-list.json")["data"].clone();
    let mut orders = std::collections::HashSet::new();
    for _ in 0..12 {
        let list = get(&sim, "/nodes/pve1/lxc/101/snapshot").await;
        let items = list.as_array().unwrap();
        assert_eq!(items.len(), 3);
        let current = items.last().unwrap();
        assert_shape("current", &f[2], current, &[], &[], &["running"]);
        assert_eq!(current["description"], "You are here!");
        assert_eq!(current["parent"], "nightly");
        for s in &items[..2] {
            let reference = if s.get("parent").is_some() {
                &f[1]
            } else {
                &f[0]
            };
            assert_shape("snapshot", reference, s, &[], &[], &[]);
        }
        orders.insert(items[0]["name"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        orders.len(),
        2,
        "snapshot order is random (current stays last)"
    );
}

#[tokio::test]
async fn storage_list_and_backup_content() {
    let sim = spawn(&["--guests", "6"]);
    let list = get(&sim, "/nodes/pve1/storage").await;
    let f = fixture("synthesized/pve8-nodes-storage.json")["data"].clone();
    for s in list.as_array().unwrap() {
        assert_shape(
            "storage",
            &f[0],
            s,
            &[],
            &[],
            &["active", "enabled", "shared"],
        );
        assert!(s["used_fraction"].is_f64());
    }
    let backups = get(
        &sim,
        "/nodes/pve1/storage/local/content?content=backup&vmid=101",
    )
    .await;
    let items = backups.as_array().unwrap();
    assert_eq!(items.len(), 1);
    let b = &items[0];
    assert!(
        b["volid"]
            .as_str()
            .unwrap()
            .starts_with("local:backup/vzdump-lxc-101-")
    );
    assert_eq!(b["subtype"], "lxc");
    assert_eq!(b["content"], "backup");
    assert!(b["vmid"].is_number() && b["size"].is_number() && b["ctime"].is_number());
    assert_eq!(b["format"], "tar.zst");
}

#[tokio::test]
async fn task_status_shapes() {
    let sim = spawn(&["--task-seconds", "0.4", "--guests", "6"]);
    let upid = api(&sim, "POST", "/nodes/pve1/lxc/102/status/start", &[])
        .await
        .data();
    let upid = upid.as_str().unwrap();
    let running = get(&sim, &format!("/nodes/pve1/tasks/{}/status", enc(upid))).await;
    let real = fixture("pve7-task-status-running-apitoken.json")["data"].clone();
    assert_shape("running task", &real, &running, &[], &[], &[]);
    assert_shape(
        "running task",
        &fixture("synthesized/pve-task-status-running.json")["data"],
        &running,
        &[],
        &[],
        &[],
    );
    assert_eq!(running["user"], "root@pam");
    assert_eq!(running["tokenid"], "felhom");
    let stopped = sim
        .wait_task(upid, std::time::Duration::from_secs(10))
        .await
        .unwrap();
    for f in [
        "pve7-task-status-stopped-warnings.json",
        "pve7-task-status-stopped-ok-vzdump.json",
    ] {
        assert_shape(f, &fixture(f)["data"], &stopped, &[], &["tokenid"], &[]);
    }
    assert_shape(
        "ok",
        &fixture("synthesized/pve-task-status-stopped-ok.json")["data"],
        &stopped,
        &[],
        &[],
        &[],
    );
    assert_eq!(stopped["exitstatus"], "OK");
    assert!(stopped.get("endtime").is_none());
}

#[tokio::test]
async fn post_answers_are_bare_upids() {
    let sim = spawn(&["--task-seconds", "0.05", "--guests", "6"]);
    let re = regex_lite::Regex::new(UPID_RE).unwrap();
    type Case = (
        &'static str,
        &'static str,
        Vec<(&'static str, &'static str)>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "synthesized/pve-post-lxc-start.json",
            "/nodes/pve1/lxc/102/status/start",
            vec![],
            "vzstart",
        ),
        (
            "synthesized/pve-post-lxc-stop.json",
            "/nodes/pve1/lxc/101/status/stop",
            vec![],
            "vzstop",
        ),
        (
            "synthesized/pve-post-lxc-snapshot.json",
            "/nodes/pve1/lxc/109/snapshot",
            vec![("snapname", "s1")],
            "vzsnapshot",
        ),
        (
            "synthesized/pve-post-vzdump.json",
            "/nodes/pve1/vzdump",
            vec![("vmid", "102"), ("storage", "local")],
            "vzdump",
        ),
    ];
    for (f, path, form, wtype) in cases {
        let reference = fixture(f);
        let got = api(&sim, "POST", path, &form).await.json();
        assert_shape(f, &reference, &got, &[], &[], &[]);
        let upid = got["data"].as_str().unwrap();
        let caps = re
            .captures(upid)
            .unwrap_or_else(|| panic!("{upid} does not match PVE's regex"));
        assert_eq!(&caps[6], wtype);
        assert_eq!(&caps[8], "root@pam!felhom");
        sim.wait_task(upid, std::time::Duration::from_secs(10))
            .await
            .unwrap();
    }
    let put = api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/102/config",
        &[("onboot", "0")],
    )
    .await;
    assert_eq!(put.json(), fixture("synthesized/pve-put-lxc-config.json"));
}

#[tokio::test]
async fn error_bodies_equal_the_fixtures() {
    // Node "pve" like the synthesized fixtures, 9.1 (bodies with message).
    let sim = spawn(&["--node", "pve", "--guests", "6", "--pve-version", "9.1"]);
    let r = api(&sim, "GET", "/nodes/pve/lxc/999/config", &[]).await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.json(),
        fixture("synthesized/pve-error-500-no-such-ct.json")
    );
    let r = api(&sim, "POST", "/nodes/pve/lxc/101/status/start", &[]).await;
    assert_eq!(
        r.json(),
        fixture("synthesized/pve-error-500-already-running.json")
    );
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve/lxc/101/config",
        &[("features", "keyctl=1,nesting=1")],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json(),
        fixture("synthesized/pve-error-403-keyctl-feature.json")
    );
    let unknown = "UPID:pve:00001234:00005678:66A1B2C0:vzdump:101:root@pam!felhom:";
    let r = api(
        &sim,
        "GET",
        &format!("/nodes/pve/tasks/{}/status", enc(unknown)),
        &[],
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        fixture("synthesized/pve-error-400-no-such-task.json")
    );
}

#[tokio::test]
async fn param_errors_like_the_real_captures() {
    let sim = spawn(&["--pve-version", "7.4", "--guests", "6"]);
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/lxc/101/status/stop",
        &[("overrule-shutdown", "1")],
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.reason.as_deref(), Some("Parameter verification failed."));
    assert_eq!(
        r.json(),
        fixture("pve7-error-400-param-unknown-property.json")
    );

    let sim = spawn(&["--pve-version", "8.1", "--guests", "6"]);
    let r = api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/101/config",
        &[("net0", "name=eth0,gw=192.168.1")],
    )
    .await;
    let f = fixture("pve8-error-400-param-format.json");
    let body = r.json();
    assert_shape("400 format", &f, &body, &[], &[], &[]);
    let expected = f["errors"]["ipconfig0"]
        .as_str()
        .unwrap()
        .replace("ipconfig0", "net0");
    assert_eq!(body["errors"]["net0"], json!(expected));
    let r = api(&sim, "GET", "/nodes/pve1/lxc/12/config", &[]).await;
    assert_eq!(r.json()["errors"]["vmid"], f["errors"]["vmid"]);
}
