//! `felhom-agent selftest` and `config check` as a separate process against
//! `felhom-pvesim`: the health report, the gated task exercise (refusals, cleanup after an
//! injected failure), exit codes, and a fully captured run that never shows the secret.

mod proxmox_client_support;

use felhom_testbed::harness::{Fault, LoggedRequest};
use proxmox_client_support::{Run, Sim, acl_file, run_agent};
use serde_json::json;

const SECRET_VAR: &str = "FELHOM_AGENT_PROXMOX_TOKEN_SECRET";

/// Config (secret via env) for the simulator's full-privilege token, pinned.
fn setup(sim: &Sim) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sim.write_agent_config(dir.path(), json!({"pin_sha256": sim.start.pin_sha256}));
    (dir, cfg.to_str().unwrap().to_string())
}

fn agent(sim: &Sim, cfg: &str, args: &[&str]) -> Run {
    let mut all = vec!["--config", cfg];
    all.extend_from_slice(args);
    run_agent(&all, &[(SECRET_VAR, sim.start.token_secret.as_str())])
}

fn mutating_requests(reqs: &[LoggedRequest]) -> Vec<String> {
    reqs.iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[tokio::test]
async fn health_report_lists_guests_and_storages() {
    let sim = Sim::start(&["--guests", "8"]);
    let (_dir, cfg) = setup(&sim);
    let run = agent(&sim, &cfg, &["selftest", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let report = run.json();
    assert_eq!(report["ok"], true);
    assert_eq!(report["proxmox"]["node"], sim.start.node);
    assert!(
        report["proxmox"]["version"]
            .as_str()
            .is_some_and(|v| !v.is_empty())
    );
    let state = sim.state_json().await;
    assert_eq!(
        report["guests"].as_array().unwrap().len(),
        state["guests"].as_array().unwrap().len()
    );
    for g in report["guests"].as_array().unwrap() {
        let s = state["guests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["vmid"] == g["vmid"])
            .unwrap();
        assert_eq!(s["status"], g["status"]);
        assert_eq!(s["type"], g["type"]);
    }
    assert!(!report["storages"].as_array().unwrap().is_empty());
    // Read-only: nothing but GETs reached the simulator.
    assert!(mutating_requests(&sim.log().await).is_empty());

    // The human form says the same.
    let run = agent(&sim, &cfg, &["selftest"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("healthy"), "{}", run.stdout);
}

#[tokio::test]
async fn task_selftest_snapshots_rolls_back_and_deletes() {
    let sim = Sim::start(&["--guests", "8", "--task-seconds", "0.05"]);
    let (_dir, cfg) = setup(&sim);
    let n = sim.plain_guest("lxc", "running").await;
    let before = sim.snapshot_names(n).await;
    sim.clear_log().await;

    let vm = n.to_string();
    let run = agent(&sim, &cfg, &["selftest", "--task", "--vmid", &vm, "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let report = run.json();
    assert_eq!(report["ok"], true);
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        vec![
            "list-before",
            "snapshot",
            "verify-created",
            "rollback",
            "delete",
            "verify-removed"
        ]
    );
    let snap = report["snapshot"].as_str().unwrap().to_string();
    assert!(snap.starts_with("felhom-selftest-"), "{snap}");

    // The snapshot list is back to what it was, and the guest still runs (start=1).
    assert_eq!(sim.snapshot_names(n).await, before);
    let g = sim.guests_where(|g| g["vmid"] == n).await;
    assert_eq!(g[0]["status"], "running");
    let node = &sim.start.node;
    let reqs = sim.log().await;
    assert_eq!(
        mutating_requests(&reqs),
        vec![
            format!("POST /api2/json/nodes/{node}/lxc/{n}/snapshot"),
            format!("POST /api2/json/nodes/{node}/lxc/{n}/snapshot/{snap}/rollback"),
            format!("DELETE /api2/json/nodes/{node}/lxc/{n}/snapshot/{snap}"),
        ]
    );
    let rollback = reqs.iter().find(|r| r.path.ends_with("/rollback")).unwrap();
    assert_eq!(rollback.params.get("start").map(String::as_str), Some("1"));
}

#[tokio::test]
async fn task_selftest_refuses_templates_locked_and_ha_guests() {
    let sim = Sim::start(&["--guests", "8"]);
    let (_dir, cfg) = setup(&sim);
    // Make three plain guests into the three refused kinds (through the control API, not
    // PVE requests), so the test does not depend on the generator's choices.
    let plain: Vec<u64> = sim
        .guests_where(|g| {
            g["type"] == "lxc"
                && g["template"] != json!(true)
                && g["lock"].is_null()
                && g["ha_managed"] != json!(true)
        })
        .await
        .iter()
        .filter_map(|g| g["vmid"].as_u64())
        .collect();
    assert!(plain.len() >= 3, "need three plain LXC guests: {plain:?}");
    sim.put_guest(plain[0], json!({"template": true})).await;
    sim.put_guest(plain[1], json!({"lock": "backup"})).await;
    sim.put_guest(plain[2], json!({"ha_managed": true})).await;
    sim.clear_log().await;

    for (n, why) in [
        (plain[0], "template"),
        (plain[1], "locked"),
        (plain[2], "HA-managed"),
    ] {
        let vm = n.to_string();
        let run = agent(&sim, &cfg, &["selftest", "--task", "--vmid", &vm]);
        assert_eq!(run.code, 1, "{run:?}");
        assert!(run.stderr.contains(why), "{why}: {}", run.stderr);
    }
    assert!(mutating_requests(&sim.log().await).is_empty());

    // --task without --vmid is a usage error.
    let run = agent(&sim, &cfg, &["selftest", "--task"]);
    assert_eq!(run.code, 2, "{run:?}");
}

#[tokio::test]
async fn task_selftest_cleans_up_after_a_failed_rollback() {
    let sim = Sim::start(&["--guests", "8", "--task-seconds", "0.05"]);
    let (_dir, cfg) = setup(&sim);
    let n = sim.plain_guest("lxc", "stopped").await;
    let before = sim.snapshot_names(n).await;
    let node = &sim.start.node;
    sim.fault(
        Fault::task_fail(
            &format!("/nodes/{node}/lxc/{n}/snapshot/*"),
            "zfs error: simulated rollback failure",
        )
        .method("POST")
        .times(1),
    )
    .await;

    let vm = n.to_string();
    let run = agent(&sim, &cfg, &["selftest", "--task", "--vmid", &vm, "--json"]);
    assert_eq!(run.code, 1, "{run:?}");
    let report = run.json();
    assert_eq!(report["ok"], false);
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("rollback"), "{error}");
    assert!(error.contains("simulated rollback failure"), "{error}");
    assert_eq!(report["cleanup"]["ok"], true, "{report}");
    // The selftest snapshot is gone again.
    assert_eq!(sim.snapshot_names(n).await, before);
    assert!(run.stderr.contains("cleanup"), "{}", run.stderr);
}

#[tokio::test]
async fn exit_codes_for_config_unreachable_and_missing_privilege() {
    let sim = Sim::start(&["--guests", "4"]);
    let (dir, cfg) = setup(&sim);

    // 2: invalid config (two TLS modes), error document on stdout with --json.
    let run = run_agent(
        &["--config", &cfg, "--json", "config", "check"],
        &[
            (SECRET_VAR, sim.start.token_secret.as_str()),
            ("FELHOM_AGENT_PROXMOX_TLS_INSECURE", "true"),
        ],
    );
    assert_eq!(run.code, 2, "{run:?}");
    let doc = run.json();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["exit"], 2);
    let err = doc["error"].as_str().unwrap();
    assert!(
        err.contains("proxmox.tls.pin_sha256") && err.contains("proxmox.tls.insecure"),
        "{err}"
    );

    // 0: config check shows where values came from, with the secret redacted.
    let run = agent(&sim, &cfg, &["--json", "config", "check"]);
    assert_eq!(run.code, 0, "{run:?}");
    let doc = run.json();
    let field = |name: &str| {
        doc["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["field"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(field("proxmox.token_secret")["value"], "<redacted>");
    assert_eq!(
        field("proxmox.token_secret")["source"],
        json!({"kind": "env", "var": SECRET_VAR})
    );
    assert_eq!(field("proxmox.url")["source"]["kind"], "file");
    assert_eq!(
        field("privhelper.timeout_seconds")["source"]["kind"],
        "default"
    );

    // 3: Proxmox unreachable.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let run = run_agent(
        &["--config", &cfg, "selftest"],
        &[
            (SECRET_VAR, sim.start.token_secret.as_str()),
            (
                "FELHOM_AGENT_PROXMOX_URL",
                &format!("https://127.0.0.1:{closed}"),
            ),
        ],
    );
    assert_eq!(run.code, 3, "{run:?}");

    // 2: certificate pin mismatch names both fingerprints.
    let wrong = "00".repeat(32);
    let run = run_agent(
        &["--config", &cfg, "selftest"],
        &[
            (SECRET_VAR, sim.start.token_secret.as_str()),
            ("FELHOM_AGENT_PROXMOX_TLS_PIN_SHA256", &wrong),
        ],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains(&sim.start.pin_sha256), "{}", run.stderr);

    // 2: a token without Sys.Audit on the node: the message names what to grant.
    drop(sim);
    let secret = "1c2d3e4f-aaaa-bbbb-cccc-restricted";
    let acl = acl_file(
        dir.path(),
        "felhom@pve!agent",
        secret,
        json!([{"path": "/vms", "privs": ["VM.Audit"], "propagate": true}]),
    );
    let sim = Sim::start(&[
        "--guests",
        "4",
        "--pve-version",
        "7.4",
        "--acl",
        acl.to_str().unwrap(),
    ]);
    let (_dir2, cfg) = setup(&sim);
    let run = run_agent(
        &["--config", &cfg, "selftest"],
        &[
            (SECRET_VAR, secret),
            ("FELHOM_AGENT_PROXMOX_TOKEN_ID", "felhom@pve!agent"),
        ],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("Sys.Audit"), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("/nodes/{}", sim.start.node)),
        "{}",
        run.stderr
    );
}

/// Everything the agent writes, across a successful run, a task exercise, a failing run
/// with the wrong secret and `config check`, with trace logging on: the secret never
/// appears, whether it came from the environment or a secret file.
#[tokio::test]
async fn the_token_secret_never_appears_in_any_output() {
    let sim = Sim::start(&["--guests", "8", "--task-seconds", "0.05"]);
    let (dir, cfg) = setup(&sim);
    let secret = sim.start.token_secret.clone();
    let secret_file = dir.path().join("proxmox-token");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let n = sim.plain_guest("lxc", "running").await.to_string();
    let wrong = format!("{secret}-wrong");

    let mut outputs: Vec<Run> = Vec::new();
    for json_flag in [false, true] {
        let mut runs: Vec<Vec<&str>> = vec![
            vec!["config", "check"],
            vec!["selftest"],
            vec!["selftest", "--task", "--vmid", &n],
        ];
        if json_flag {
            for r in &mut runs {
                r.insert(0, "--json");
            }
        }
        for args in &runs {
            let mut all = vec!["--config", cfg.as_str()];
            all.extend_from_slice(args);
            // Secret from the environment.
            outputs.push(run_agent(
                &all,
                &[(SECRET_VAR, &secret), ("RUST_LOG", "trace")],
            ));
            // Secret from a file.
            outputs.push(run_agent(
                &all,
                &[
                    (
                        "FELHOM_AGENT_PROXMOX_TOKEN_SECRET_FILE",
                        secret_file.to_str().unwrap(),
                    ),
                    ("RUST_LOG", "trace"),
                ],
            ));
        }
    }
    // A rejected secret must not be echoed either.
    let rejected = run_agent(
        &["--config", &cfg, "selftest"],
        &[(SECRET_VAR, &wrong), ("RUST_LOG", "trace")],
    );
    assert_eq!(rejected.code, 2, "{rejected:?}");
    outputs.push(rejected);

    for run in &outputs {
        assert!(
            run.code == 0 || run.code == 2,
            "unexpected exit {}: {}",
            run.code,
            run.stderr
        );
        assert!(
            !run.stdout.contains(&secret),
            "secret in stdout:\n{}",
            run.stdout
        );
        assert!(
            !run.stderr.contains(&secret),
            "secret in stderr:\n{}",
            run.stderr
        );
        assert!(!run.stderr.contains("PVEAPIToken="), "{}", run.stderr);
    }
    // The runs really did work (and really logged): the successes outnumber the failure,
    // and trace logging produced output.
    assert!(outputs.iter().filter(|r| r.code == 0).count() >= 12);
    assert!(
        outputs
            .iter()
            .any(|r| r.stderr.contains("TRACE") || r.stderr.contains("DEBUG"))
    );
}
