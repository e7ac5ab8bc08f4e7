//! The reconcile engine inside the real daemon (`felhom-agent run`) against
//! `felhom-pvesim` (and `felhom-hubsim` where the hub matters), all real processes:
//! - a mutating CLI command (`selftest --task`) while the daemon runs goes through the
//!   daemon's queue, in the guest's lane, serialized with other operations on that guest;
//!   without a daemon it takes the `state_dir` lock and runs on a local queue;
//! - `privileged create-keyctl` likewise (needs root: it starts the root helper);
//! - blocked means no mutation: the hub's `blocked: true`, the kept envelope after a
//!   restart with the hub unreachable, and no envelope at all; unblocking (after a SIGHUP
//!   pointing at another hub) lets it converge;
//! - HA-managed, locked and template guests are never touched;
//! - a change by hand between the engine's read and its config write is not overwritten:
//!   the write carries the read's digest, PVE refuses it, the engine plans again at once;
//! - the report's `reconcile` section comes from the engine.

mod hub_support;
mod proxmox_client_support;
mod reconcile_support;

use std::time::Duration;

use felhom_testbed::harness::Fault;
use hub_support::HubSim;
use proxmox_client_support::Sim;
use reconcile_support::*;
use serde_json::{Value, json};

/// The guest mutations after `since` whose vmid is `vmid`, as `(op, seq)`, where snapshot
/// calls are named `snapshot`, `rollback`, `delsnapshot`.
async fn guest_mutations(sim: &Sim, since: u64, vmid: u32) -> Vec<String> {
    log_since(sim, since)
        .await
        .into_iter()
        .filter(|r| r.method != "GET")
        .filter(|r| r.path.split('/').nth(6) == Some(vmid.to_string().as_str()))
        .map(|r| {
            let rest: Vec<&str> = r.path.split('/').skip(7).collect();
            match (r.method.as_str(), rest.as_slice()) {
                ("POST", ["snapshot"]) => "snapshot".to_string(),
                ("POST", ["snapshot", _, "rollback"]) => "rollback".to_string(),
                ("DELETE", ["snapshot", _]) => "delsnapshot".to_string(),
                ("PUT", ["config"]) | ("POST", ["config"]) => "set_config".to_string(),
                (m, _) => format!("{m} {}", r.path),
            }
        })
        .collect()
}

fn running_lane(status: &Value, vmid: u64, action: &str) -> bool {
    status["reconcile"]["running"]
        .as_array()
        .is_some_and(|r| r.iter().any(|a| a["vmid"] == vmid && a["action"] == action))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_mutations_go_through_the_daemons_queue_in_the_guests_lane() {
    let sim = Sim::start(&["--task-seconds", "0.3"]);
    let vmid = sim.plain_guest("lxc", "running").await;
    let home = Home::new(&sim, json!({}));
    home.write_desired(&json!({"generation": 1, "guests": []}));
    let mut daemon = home.start_daemon(&home.log_path("daemon.log"));
    home.wait_status(&mut daemon, Duration::from_secs(30), |v| {
        v["reconcile"]["applied_generation"] == 1
    });
    let since = last_seq(&sim).await;

    // Two task selftests on one guest at once, and a config change of that guest while
    // they run: all three are operations in the guest's lane, one after the other.
    let vmid_arg = vmid.to_string();
    let (first, second) = std::thread::scope(|s| {
        let a = s.spawn(|| home.cli(&["selftest", "--task", "--vmid", &vmid_arg, "--json"]));
        let b = s.spawn(|| home.cli(&["selftest", "--task", "--vmid", &vmid_arg, "--json"]));
        let during = home.wait_status(&mut daemon, Duration::from_secs(30), |v| {
            running_lane(v, vmid, "selftest-task")
        });
        assert!(
            during["reconcile"]["lanes"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l["vmid"] == vmid)),
            "{during:#}"
        );
        home.write_desired(&json!({"generation": 2, "guests": [
            {"vmid": vmid, "config": {"description": "changed while the selftests ran"}}
        ]}));
        (a.join().expect("first"), b.join().expect("second"))
    });
    for run in [&first, &second] {
        assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
        let report = run.json();
        assert_eq!(report["ok"], true, "{report:#}");
        assert_eq!(report["vmid"], vmid);
    }
    home.wait_status(&mut daemon, Duration::from_secs(30), |v| {
        v["reconcile"]["applied_generation"] == 2
    });
    let seen = guest_mutations(&sim, since, vmid as u32).await;
    assert_eq!(
        seen,
        [
            "snapshot",
            "rollback",
            "delsnapshot",
            "snapshot",
            "rollback",
            "delsnapshot",
            "set_config"
        ],
        "the lane serializes both selftests and the engine's change"
    );
    let log = daemon.log_text();
    assert_eq!(
        log.matches(&format!(
            "control: selftest --task queued in the guest's lane vmid={vmid}"
        ))
        .count(),
        2,
        "{log}"
    );
    // A refusal made in the daemon comes back with the same exit code (1) and message.
    let r = home.cli(&["selftest", "--task", "--vmid", "106"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("it is a template"), "{}", r.stderr);
    assert_eq!(daemon.term(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_daemon_the_cli_owns_state_dir_for_its_mutation() {
    let sim = Sim::start(&["--task-seconds", "0.05"]);
    let vmid = sim.plain_guest("lxc", "stopped").await;
    let home = Home::new(&sim, json!({}));
    let since = last_seq(&sim).await;
    let vmid_arg = vmid.to_string();
    // Someone else owns state_dir (a daemon starting up, say): the CLI does nothing.
    let lock = felhom_agent::control::StateLock::acquire(&home.state_dir).expect("lock");
    let r = home.cli(&["selftest", "--task", "--vmid", &vmid_arg]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("in use by another felhom-agent process"),
        "{}",
        r.stderr
    );
    assert_eq!(
        guest_mutations(&sim, since, vmid as u32).await,
        Vec::<String>::new()
    );
    drop(lock);
    let r = home.cli(&["selftest", "--task", "--vmid", &vmid_arg, "--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.json()["ok"], true);
    assert_eq!(
        guest_mutations(&sim, since, vmid as u32).await,
        ["snapshot", "rollback", "delsnapshot"]
    );
}

/// The hub part of an agent config for `hub`.
fn hub_config(home: &Home, hub: &HubSim, name: &str) -> Value {
    let token = home.dir.path().join(format!("{name}-token"));
    write_private(&token, hub.token.as_bytes());
    let ca = home.dir.path().join(format!("{name}-ca.pem"));
    std::fs::copy(&hub.ca_file, &ca).expect("copy hub CA");
    json!({"url": hub.url, "token_file": token, "ca_file": ca, "test_min_poll_interval_seconds": 1})
}

fn set_config(home: &Home, key: &str, value: Value) {
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(&home.config).expect("config")).expect("json");
    cfg[key] = value;
    std::fs::write(&home.config, serde_json::to_vec_pretty(&cfg).expect("json")).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_means_no_mutation_also_right_after_a_restart() {
    let sim = Sim::start(&["--task-seconds", "0.05"]);
    let a = sim.plain_guest("lxc", "stopped").await;
    let b = sim.plain_guest("qemu", "running").await;
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 1, "blocked": true, "desired_generation": 7}))
        .await;
    let home = Home::new(&sim, json!({}));
    set_config(&home, "hub", hub_config(&home, &hub, "hub1"));
    home.write_desired(&json!({"generation": 7, "guests": [
        {"vmid": a, "power": "running", "config": {"description": "blocked test", "memory": 1024}},
        {"vmid": b, "power": "stopped", "config": {"tags": "blocked"}}
    ]}));
    let plan = planned(&home.cli_json(&["plan"]));
    assert_eq!(plan.len(), 4, "{plan:?}");
    let since = last_seq(&sim).await;

    // 1. The hub says blocked.
    let mut daemon = home.start_daemon(&home.log_path("daemon-1.log"));
    let reports = hub
        .wait_reports(Duration::from_secs(30), |r| {
            r.iter()
                .filter(|x| x["outcome"] == "accepted")
                .filter(|x| x["report"]["reconcile"]["desired_generation"] == 7)
                .count()
                >= 3
        })
        .await;
    let last = reports
        .iter()
        .rev()
        .find(|x| x["outcome"] == "accepted")
        .expect("accepted");
    let section = &last["report"]["reconcile"];
    hub_support::assert_valid_report(&last["report"]);
    assert_eq!(section["blocked"], true, "{section:#}");
    assert_eq!(section["safe_mode"], false);
    assert_eq!(section["applied_generation"], Value::Null);
    let status = home.wait_status(&mut daemon, Duration::from_secs(30), |v| {
        v["reconcile"]["cycles"].as_u64() >= Some(2)
    });
    assert_eq!(status["reconcile"]["gate"], "blocked", "{status:#}");
    assert_eq!(status["last_envelope"]["envelope"]["blocked"], true);
    assert_eq!(mutations(&log_since(&sim, since).await), vec![]);
    assert_eq!(daemon.term(Duration::from_secs(20)), Some(0));

    // 2. Restart with the hub gone: the kept envelope still says blocked.
    drop(hub);
    let mut daemon = home.start_daemon(&home.log_path("daemon-2.log"));
    let status = home.wait_status(&mut daemon, Duration::from_secs(30), |v| {
        v["reconcile"]["cycles"].as_u64() >= Some(1)
    });
    assert_eq!(status["reconcile"]["gate"], "blocked", "{status:#}");
    // The log line is written before the first cycle; wait for it rather than a time.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !daemon
        .log_text()
        .contains("reconcile gate at start gate=Blocked")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no 'reconcile gate at start gate=Blocked' in the log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mutations(&log_since(&sim, since).await), vec![]);
    assert_eq!(daemon.term(Duration::from_secs(20)), Some(0));

    // 3. No envelope ever (none kept), hub unreachable: awaiting it, still no mutation.
    std::fs::remove_file(home.state_dir.join("hub-envelope.json")).expect("kept envelope");
    let mut daemon = home.start_daemon(&home.log_path("daemon-3.log"));
    let status = home.wait_status(&mut daemon, Duration::from_secs(30), |v| {
        v["reconcile"]["cycles"].as_u64() >= Some(1)
    });
    assert_eq!(
        status["reconcile"]["gate"], "awaiting_envelope",
        "{status:#}"
    );
    // "Nothing happens" for a while: load can only make this check weaker, never fail it
    // (cycles run on triggers only, so there is no event to wait for).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(mutations(&log_since(&sim, since).await), vec![]);

    // 4. A new hub that does not block, taken on SIGHUP: now it converges, once.
    let hub2 = HubSim::start();
    hub2.set_envelope(json!({"poll_interval_seconds": 1, "blocked": false}))
        .await;
    set_config(&home, "hub", hub_config(&home, &hub2, "hub2"));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGHUP,
    );
    home.wait_status(&mut daemon, Duration::from_secs(30), |v| {
        v["reconcile"]["applied_generation"] == 7
    });
    let mut sent: Vec<(u32, String)> = mutations(&log_since(&sim, since).await)
        .into_iter()
        .map(|m| (m.vmid, m.op))
        .collect();
    sent.sort();
    assert_eq!(sent, plan);
    let reports = hub2
        .wait_reports(Duration::from_secs(30), |r| {
            r.iter().any(|x| {
                x["outcome"] == "accepted" && x["report"]["reconcile"]["applied_generation"] == 7
            })
        })
        .await;
    let done = reports
        .iter()
        .find(|x| x["report"]["reconcile"]["applied_generation"] == 7)
        .expect("report");
    assert_eq!(done["report"]["reconcile"]["blocked"], false);
    hub_support::assert_valid_report(&done["report"]);
    assert_eq!(daemon.term(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_managed_locked_and_template_guests_are_never_touched() {
    let sim = Sim::start(&["--task-seconds", "0.05", "--guests", "8"]);
    let state = sim.state_json().await;
    let find = |pred: &dyn Fn(&Value) -> bool| -> u64 {
        state["guests"]
            .as_array()
            .expect("guests")
            .iter()
            .find(|g| pred(g))
            .and_then(|g| g["vmid"].as_u64())
            .expect("a seeded guest")
    };
    let ha = find(&|g| g["ha_managed"] == true);
    let locked = find(&|g| !g["lock"].is_null());
    let template = find(&|g| g["template"] == true);
    let plain = sim.plain_guest("lxc", "stopped").await;
    let home = Home::new(&sim, json!({}));
    home.write_desired(&json!({"generation": 3, "guests": [
        {"vmid": ha, "power": "stopped", "config": {"description": "not mine", "memory": 4096}},
        {"vmid": locked, "power": "running", "config": {"tags": "nope", "onboot": false}},
        {"vmid": template, "power": "running", "config": {"cores": 4}},
        {"vmid": plain, "power": "running", "config": {"description": "mine"}}
    ]}));
    let since = last_seq(&sim).await;
    let mut daemon = home.start_daemon(&home.log_path("daemon.log"));
    let status = home.wait_status(&mut daemon, Duration::from_secs(30), |v| {
        v["reconcile"]["applied_generation"] == 3
    });
    // a few more cycles (a resync, a plan through the daemon) change nothing more
    let plan = home.cli_json(&["plan"]);
    assert_eq!(planned(&plan), vec![]);
    // A while with nothing more (load only weakens this check; see above).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let skipped: Vec<(u64, String)> = status["reconcile"]["skipped"]
        .as_array()
        .expect("skipped")
        .iter()
        .map(|s| {
            (
                s["vmid"].as_u64().expect("vmid"),
                s["reason"]["reason"].as_str().expect("reason").to_string(),
            )
        })
        .collect();
    let mut expect = vec![
        (ha, "ha_managed".to_string()),
        (locked, "locked".to_string()),
        (template, "template".to_string()),
    ];
    expect.sort();
    assert_eq!(skipped, expect, "{status:#}");
    let mut sent: Vec<(u32, String)> = mutations(&log_since(&sim, since).await)
        .into_iter()
        .map(|m| (m.vmid, m.op))
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        vec![
            (plain as u32, "set_config".to_string()),
            (plain as u32, "start".to_string())
        ]
    );
    assert_eq!(daemon.term(Duration::from_secs(20)), Some(0));
}

#[test]
fn create_keyctl_goes_through_the_daemons_queue() {
    use felhom_protocol::Class;
    use felhom_testbed::privhelper::{Bed, BedOptions, FakeBins, is_root};
    if !is_root() {
        eprintln!("SKIP: this test needs root (it starts the root helper)");
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sim = Sim::start(&["--task-seconds", "0.05"]);
    let bed = Bed::new(
        FakeBins {
            smartctl: env!("CARGO_BIN_EXE_felhom-fake-smartctl").into(),
            pct: env!("CARGO_BIN_EXE_felhom-fake-pct").into(),
        },
        BedOptions::default(),
    );
    let home = Home::new(
        &sim,
        json!({"privhelper": {"socket_dir": bed.run_dir, "audit_log": bed.audit_log, "timeout_seconds": 20}}),
    );
    home.write_desired(&json!({"generation": 1, "guests": []}));
    let spec = home.dir.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"vmid": 120, "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "hostname": "web1", "memory_mib": 1024, "swap_mib": 512, "cores": 2, "rootfs": {"storage": "local-lvm", "size_gib": 8}, "net": {"bridge": "vmbr0", "ip": "dhcp", "gw": null}, "nesting": true, "ssh_public_keys": [], "start": false, "onboot": true}"#,
    )
    .expect("spec");
    let spec_arg = spec.to_str().expect("utf-8 path");

    let mut daemon = home.start_daemon(&home.log_path("daemon.log"));
    home.wait_status(&mut daemon, Duration::from_secs(30), |v| {
        v["reconcile"]["applied_generation"] == 1
    });
    // One socket activation serves every connection until the helper idles out.
    let _helper = bed.activate(Class::Pct);
    let r = home.cli(&["privileged", "create-keyctl", spec_arg]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("container 120 created with keyctl=1"),
        "{}",
        r.stdout
    );
    assert_eq!(bed.pct_calls().len(), 1);
    let log = daemon.log_text();
    assert!(
        log.contains("control: create-keyctl queued in the guest's lane vmid=120")
            && log.contains("control: create-keyctl finished vmid=120"),
        "{log}"
    );
    assert_eq!(daemon.term(Duration::from_secs(20)), Some(0));

    // Without the daemon: refused while someone else owns state_dir, then run locally.
    let lock = felhom_agent::control::StateLock::acquire(&home.state_dir).expect("lock");
    let r = home.cli(&["privileged", "create-keyctl", spec_arg]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("in use by another felhom-agent process"),
        "{}",
        r.stderr
    );
    assert_eq!(bed.pct_calls().len(), 1, "nothing was created");
    drop(lock);
    let r = home.cli(&["privileged", "create-keyctl", spec_arg]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(bed.pct_calls().len(), 2);
    drop(rt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_actions_finish_then_exits_0() {
    let sim = Sim::start(&["--task-seconds", "1.5"]);
    let a = sim.plain_guest("lxc", "running").await;
    let home = Home::new(&sim, json!({}));
    home.write_desired(&json!({"generation": 1, "guests": [
        {"vmid": a, "power": "stopped"}
    ]}));
    let mut daemon = home.start_daemon(&home.log_path("daemon.log"));
    home.wait_status(&mut daemon, Duration::from_secs(30), |v| {
        running_lane(v, a, "stop")
    });
    let t0 = std::time::Instant::now();
    let log = daemon.log.clone();
    assert_eq!(daemon.term(Duration::from_secs(40)), Some(0));
    let log = std::fs::read_to_string(log).expect("log");
    assert!(
        log.contains("reconcile engine stopped cancelled_queued=0 cancelled_running=0"),
        "{log}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    // the stop ran to its end: the guest is stopped and its journal entry is closed
    assert_eq!(
        sim.pve.guest(a as u32).await.expect("guest")["status"],
        "stopped"
    );
    let journal = home.cli_json(&["journal", "show"]);
    let entries = journal["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{journal:#}");
    assert_eq!(entries[0]["outcome"]["result"], "succeeded", "{journal:#}");
}

/// Someone changes a guest in the GUI after the engine read it and before its config write
/// arrives (an `edit` fault lands the change right before the simulator serves the write,
/// so nothing races on time). The write carries the digest of the engine's read and the
/// simulator refuses it as PVE does (LXC: `PUT`, QEMU: `POST` config, each in PVE's words);
/// the refusal is no failure (no backoff, no `failing` entry): the engine plans again from
/// a fresh read and its second write, based on the new digest, keeps the change by hand.
/// Without the digest the container's `features` written from the old read would drop the
/// `keyctl=1` set by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_by_hand_between_read_and_write_is_not_overwritten() {
    let sim = Sim::start(&["--task-seconds", "0.05"]);
    let node = sim.node().to_string();
    let ct = sim.plain_guest("lxc", "stopped").await;
    let vm = sim.plain_guest("qemu", "stopped").await;
    // nesting is a flag an API token may change only on an unprivileged container
    sim.put_guest(
        ct,
        json!({"config": {"unprivileged": "1", "features": null, "description": null}}),
    )
    .await;
    let digest_of = |v: &Value| v["config"]["digest"].as_str().expect("digest").to_string();
    let ct_before = digest_of(&sim.pve.guest(ct as u32).await.expect("guest"));
    let vm_before = digest_of(&sim.pve.guest(vm as u32).await.expect("guest"));
    sim.fault(
        Fault::edit(
            &format!("/nodes/{node}/lxc/{ct}/config"),
            ct as u32,
            json!({"config": {"features": "keyctl=1"}}),
        )
        .method("PUT")
        .times(1),
    )
    .await;
    sim.fault(
        Fault::edit(
            &format!("/nodes/{node}/qemu/{vm}/config"),
            vm as u32,
            json!({"config": {"tags": "by-hand"}}),
        )
        .method("POST")
        .times(1),
    )
    .await;
    let home = Home::new(&sim, json!({}));
    home.write_desired(&json!({"generation": 1, "guests": [
        {"vmid": ct, "config": {"nesting": true, "description": "managed"}},
        {"vmid": vm, "config": {"memory": 1536}}
    ]}));
    let since = last_seq(&sim).await;
    let mut daemon = home.start_daemon(&home.log_path("daemon.log"));
    let status = home.wait_status(&mut daemon, Duration::from_secs(30), |v| {
        v["reconcile"]["applied_generation"] == 1
    });
    assert_eq!(status["reconcile"]["failing"], json!([]), "{status:#}");

    let log = log_since(&sim, since).await;
    for (vmid, method, before, refusal) in [
        (
            ct,
            "PUT",
            &ct_before,
            "detected modified configuration - file changed by other user? Try again.",
        ),
        (
            vm,
            "POST",
            &vm_before,
            "checksum missmatch (file change by other user?)",
        ),
    ] {
        let writes: Vec<_> = log
            .iter()
            .filter(|r| r.method != "GET" && r.path.ends_with(&format!("/{vmid}/config")))
            .collect();
        assert_eq!(writes.len(), 2, "{vmid}: {writes:#?}");
        assert!(writes.iter().all(|w| w.method == method), "{writes:#?}");
        // the first write was based on the engine's read, and refused
        assert_eq!(writes[0].params.get("digest"), Some(before), "{vmid}");
        assert_eq!(writes[0].status, Some(500), "{vmid}");
        // the second on the read after the change by hand, and taken
        let second = writes[1].params.get("digest").expect("digest sent");
        assert_ne!(second, before, "{vmid}");
        assert_eq!(second.len(), 40, "{vmid}: {second}");
        assert_eq!(writes[1].status, Some(200), "{vmid}");
        let entries = home.cli_json(&["journal", "show"])["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["vmid"] == vmid)
            .map(|e| e["outcome"].clone())
            .collect::<Vec<_>>();
        // newest first
        assert_eq!(entries.len(), 2, "{vmid}: {entries:#?}");
        assert_eq!(entries[0]["result"], "succeeded", "{vmid}: {entries:#?}");
        assert_eq!(entries[1]["result"], "stale", "{vmid}: {entries:#?}");
        let detail = entries[1]["detail"].as_str().expect("detail");
        assert!(detail.contains(refusal), "{vmid}: {detail}");
    }
    let ct_now = sim.pve.guest(ct as u32).await.expect("guest");
    assert_eq!(
        ct_now["config"]["features"], "keyctl=1,nesting=1",
        "the flag set by hand is kept: {ct_now:#}"
    );
    assert_eq!(ct_now["config"]["description"], "managed\n");
    let vm_now = sim.pve.guest(vm as u32).await.expect("guest");
    assert_eq!(vm_now["config"]["tags"], "by-hand", "{vm_now:#}");
    assert_eq!(vm_now["config"]["memory"], 1536, "{vm_now:#}");
    let text = daemon.log_text();
    assert!(!text.contains("action failed"), "{text}");
    assert_eq!(daemon.term(Duration::from_secs(20)), Some(0));
}
