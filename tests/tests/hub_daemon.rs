//! `felhom-agent run` as a real process against `felhom-hubsim` as a real process.
//!
//! Proxmox is "down" here (its URL points at a closed loopback port), which is itself one
//! of the rules under test: the report still goes, with `host: null`.

mod hub_support;

use std::time::Duration;

use hub_support::*;
use serde_json::json;

fn proxmox_down() -> String {
    format!("https://127.0.0.1:{}", dead_port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxmox_down_still_reports_and_reports_match_the_schema() {
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 1})).await;
    let home = AgentHome::new(&hub, &proxmox_down(), json!({}));
    let mut agent = home.start();
    let reports = hub
        .wait_reports(Duration::from_secs(30), |r| r.len() >= 2)
        .await;
    for r in &reports {
        assert_eq!(r["outcome"], "accepted");
        let report = &r["report"];
        assert_valid_report(report);
        assert_eq!(report["schema_version"], 1);
        assert_eq!(report["node"], "pve1");
        assert!(report["host"].is_null(), "{report:#}");
        assert_eq!(report["guests"], json!([]));
        let errors = report["errors"].as_array().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e["component"] == "proxmox" && e["kind"] == "unreachable"),
            "{errors:#?}"
        );
        // cloudflared on a closed port is `down`, not an error
        assert_eq!(report["cloudflared"]["state"], "down");
        // the engine runs and reports even while Proxmox is down
        assert!(report["reconcile"].is_object(), "{report:#}");
    }
    agent.signal(Sig::Term);
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent exits on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", agent.log_text());
}

fn accepted(reports: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    reports
        .iter()
        .filter(|r| r["outcome"] == "accepted")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hubs_interval_is_adopted_and_clamped_to_the_floor() {
    let hub = HubSim::start();
    // An hour: the longest interval there is. Nothing below can pass if the agent waits
    // it out.
    hub.set_envelope(json!({"poll_interval_seconds": 3600}))
        .await;
    let home = AgentHome::new(&hub, &proxmox_down(), json!({}));
    let mut agent = home.start();
    hub.wait_reports(Duration::from_secs(30), |r| accepted(r).len() == 1)
        .await;
    wait_log(
        &agent,
        "poll_interval_seconds=3600",
        Duration::from_secs(30),
    )
    .await;

    // The hub shortens the interval to 0, below the test floor (1 s). The agent learns it
    // from the answer to its next report; SIGHUP sends that one at once.
    hub.set_envelope(json!({"poll_interval_seconds": 0})).await;
    agent.signal(Sig::Hup);
    // After the report that brought the new envelope, more follow without the hour.
    let reports = hub
        .wait_reports(Duration::from_secs(120), |r| accepted(r).len() >= 5)
        .await;
    let log = agent.log_text();
    assert!(
        log.contains("poll interval changed poll_interval_seconds=1 asked=Some(0)"),
        "{log}"
    );
    // Clamped to the floor, not a busy loop: from the second report on (the one that
    // brought the short interval) no two reports are closer than the floor. A lower bound
    // on gaps holds on a loaded machine; load only makes them longer.
    let times = received_times(&accepted(&reports));
    for w in times[1..].windows(2) {
        let gap = (w[1] - w[0]).as_seconds_f64();
        assert!(gap >= 0.9, "gap {gap} s at a 1 s floor");
    }
    agent.signal(Sig::Term);
    assert_eq!(
        agent
            .wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_reports_through_500_garbage_hang_and_drop() {
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 1})).await;
    let home = AgentHome::new(&hub, &proxmox_down(), json!({}));
    let agent = home.start();
    // one accepted report first: the interval is now 1 s, which also caps the backoff
    hub.wait_reports(Duration::from_secs(30), |r| !r.is_empty())
        .await;
    for fault in [
        json!({"kind": "status", "status": 500, "times": 1}),
        json!({"kind": "garbage", "times": 1}),
        json!({"kind": "hang", "times": 1}),
        json!({"kind": "drop_connection", "times": 1}),
    ] {
        hub.add_fault(fault).await;
    }
    let reports = hub
        .wait_reports(Duration::from_secs(60), |r| {
            r.iter().filter(|x| x["outcome"] == "accepted").count() >= 3
        })
        .await;
    let outcomes: Vec<&str> = reports
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    let start = outcomes.iter().position(|o| *o == "status_500").unwrap();
    assert_eq!(
        &outcomes[start..start + 5],
        [
            "status_500",
            "garbage",
            "hang",
            "drop_connection",
            "accepted"
        ],
        "{}",
        agent.log_text()
    );
    // Every retry was scheduled within the 1 s interval (the backoff alone would wait
    // 5 s, 10 s, 20 s …): read from the agent's own decisions, not from the wall clock.
    let log = agent.log_text();
    let retries: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("report failed"))
        .filter_map(|l| l.split("retry_in_ms=").nth(1))
        .map(|v| v.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(retries.len() >= 4, "{log}");
    assert!(retries.iter().all(|ms| *ms <= 1000), "{retries:?}");
    assert!(log.contains("report failed"), "{log}");
    assert!(log.contains("hub reachable again"), "{log}");
    assert!(
        !log.contains(&hub.token),
        "the hub token leaked into the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_hanging_post_exits_0_within_the_grace() {
    let hub = HubSim::start();
    hub.add_fault(json!({"kind": "hang"})).await;
    let home = AgentHome::new(&hub, &proxmox_down(), json!({}));
    let mut agent = home.start();
    hub.wait_reports(Duration::from_secs(30), |r| !r.is_empty())
        .await;
    agent.signal(Sig::Term);
    // The grace is 5 s and the test-bed request timeout 5 s too, whichever comes first;
    // the bound is three times that so a loaded machine cannot fail it.
    let status = agent.wait_exit(Duration::from_secs(15)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", agent.log_text());
    // SIGINT too
    hub.clear_faults().await;
    let mut agent = home.start();
    hub.wait_reports(Duration::from_secs(30), |r| {
        r.iter().any(|x| x["outcome"] == "accepted")
    })
    .await;
    agent.signal(Sig::Int);
    assert_eq!(
        agent
            .wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_rotated_token_without_a_restart() {
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 1})).await;
    let home = AgentHome::new(&hub, &proxmox_down(), json!({}));
    let mut agent = home.start();
    hub.wait_reports(Duration::from_secs(30), |r| !r.is_empty())
        .await;

    // the hub rotates the token: the agent's reports are refused
    let new_token = "rotated-token-0123456789abcdef";
    hub.set_token(new_token).await;
    let rejected_before = hub.state().await["rejected"].as_u64().unwrap();
    hub.wait_state(Duration::from_secs(30), |s| {
        s["rejected"].as_u64().unwrap() > rejected_before
    })
    .await;

    // the operator installs the new token and sends SIGHUP
    write_secret(&home.token_file, new_token);
    let accepted_before = hub.accepted().await.len();
    agent.signal(Sig::Hup);
    hub.wait_reports(Duration::from_secs(30), |r| {
        r.iter().filter(|x| x["outcome"] == "accepted").count() > accepted_before
    })
    .await;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "reload must not restart the process"
    );
    let log = agent.log_text();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(
        !log.contains(new_token) && !log.contains(&hub.token),
        "a token leaked into the log"
    );

    // a broken config on SIGHUP keeps the running one
    std::fs::write(&home.config, b"{ not json").unwrap();
    agent.signal(Sig::Hup);
    let n = hub.accepted().await.len();
    hub.wait_reports(Duration::from_secs(30), |r| {
        r.iter().filter(|x| x["outcome"] == "accepted").count() > n + 1
    })
    .await;
    assert!(agent.log_text().contains("reload failed"));
    agent.signal(Sig::Term);
    assert_eq!(
        agent
            .wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_arrive_once_in_order_across_restart_and_rotation() {
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 1})).await;
    let home = AgentHome::new(&hub, &proxmox_down(), json!({}));
    let mut helper = HelperLog::new(&home.audit_log);
    helper.append(700); // more than one report's bound (500)

    let mut agent = home.start();
    hub.wait_reports(Duration::from_secs(30), |r| {
        r.iter()
            .filter(|x| x["outcome"] == "accepted")
            .flat_map(|x| audit_seqs(&x["report"]))
            .max()
            == Some(700)
    })
    .await;
    // a failing hub does not move the cursor: the records of refused reports come again
    hub.add_fault(json!({"kind": "status", "status": 503, "times": 2}))
        .await;
    helper.append(5);
    hub.wait_reports(Duration::from_secs(30), |r| {
        r.iter().filter(|x| x["outcome"] == "status_503").count() == 2
            && r.iter()
                .filter(|x| x["outcome"] == "accepted")
                .flat_map(|x| audit_seqs(&x["report"]))
                .max()
                == Some(705)
    })
    .await;
    agent.signal(Sig::Term);
    assert_eq!(
        agent
            .wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );

    // while the agent is down the helper writes and rotates twice
    helper.append(10);
    helper.rotate(5);
    helper.append(10);
    helper.rotate(5);
    helper.append(3);
    let mut agent = home.start();
    hub.wait_reports(Duration::from_secs(30), |r| {
        r.iter()
            .filter(|x| x["outcome"] == "accepted")
            .flat_map(|x| audit_seqs(&x["report"]))
            .max()
            == Some(728)
    })
    .await;
    // and once more while it runs
    helper.rotate(5);
    helper.append(4);
    let reports = hub
        .wait_reports(Duration::from_secs(30), |r| {
            r.iter()
                .filter(|x| x["outcome"] == "accepted")
                .flat_map(|x| audit_seqs(&x["report"]))
                .max()
                == Some(732)
        })
        .await;
    agent.signal(Sig::Term);
    agent.wait_exit(Duration::from_secs(10));

    let accepted: Vec<u64> = reports
        .iter()
        .filter(|x| x["outcome"] == "accepted")
        .flat_map(|x| audit_seqs(&x["report"]))
        .collect();
    assert_eq!(
        accepted,
        (1..=732).collect::<Vec<_>>(),
        "each record exactly once, in order"
    );
    let largest = reports
        .iter()
        .map(|x| x["report"]["audit"].as_array().map_or(0, Vec::len))
        .max()
        .unwrap();
    assert_eq!(largest, 500, "bounded per report");
    for r in &reports {
        if r["outcome"] == "accepted" {
            assert_valid_report(&r["report"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_envelope_survives_a_restart() {
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 1, "blocked": true, "desired_generation": 9, "has_signed_ops": true, "future": [1]}))
        .await;
    let home = AgentHome::new(&hub, &proxmox_down(), json!({}));
    let mut agent = home.start();
    hub.wait_reports(Duration::from_secs(30), |r| !r.is_empty())
        .await;
    agent.signal(Sig::Term);
    agent.wait_exit(Duration::from_secs(10));
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.state_dir.join("hub-envelope.json")).unwrap())
            .unwrap();
    assert_eq!(saved["envelope"]["blocked"], true);
    assert_eq!(saved["envelope"]["desired_generation"], 9);
    let log = agent.log_text();
    assert!(log.contains("hub control changed"), "{log}");

    // next start: the saved envelope is loaded before the first report
    hub.add_fault(json!({"kind": "hang"})).await;
    let agent = home.start();
    let log = wait_log(
        &agent,
        "starting from the saved hub envelope",
        Duration::from_secs(30),
    )
    .await;
    assert!(log.contains("blocked=true"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_watchdog_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 60})).await;
    let home = AgentHome::new(&hub, &proxmox_down(), json!({}));
    let sock_path = home.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut agent = home.start_with_env(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ]);
    let mut seen = Vec::new();
    let recv = |seen: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    };
    recv(&mut seen);
    assert!(seen[0].contains("READY=1"), "{seen:?}");
    // pings keep coming (at half the 0.4 s watchdog interval); each must arrive within
    // the socket's 10 s read timeout
    while seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() < 3 {
        recv(&mut seen);
    }
    agent.signal(Sig::Hup);
    while !seen.iter().any(|m| m.contains("RELOADING=1")) {
        recv(&mut seen);
    }
    let reload = seen.iter().find(|m| m.contains("RELOADING=1")).unwrap();
    assert!(reload.contains("MONOTONIC_USEC="), "{reload}");
    agent.signal(Sig::Term);
    while !seen.iter().any(|m| m.contains("STOPPING=1")) {
        recv(&mut seen);
    }
    assert_eq!(
        agent
            .wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selftest_hub_sends_one_report_and_prints_the_envelope() {
    let hub = HubSim::start();
    hub.set_envelope(
        json!({"poll_interval_seconds": 120, "blocked": true, "desired_generation": 5}),
    )
    .await;
    let home = AgentHome::new(&hub, &proxmox_down(), json!({}));
    HelperLog::new(&home.audit_log).append(3);
    let home2 = &home;
    let (code, out, err) = tokio::task::spawn_blocking({
        let cfg = home2.config.clone();
        move || {
            let o = std::process::Command::new(agent_bin())
                .args(["selftest", "--hub", "--json", "--config"])
                .arg(cfg)
                .env_clear()
                .output()
                .unwrap();
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}\n{err}");
    let printed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(printed["poll_interval_seconds"], 120);
    assert_eq!(printed["blocked"], true);
    assert_eq!(printed["desired_generation"], 5);
    let reports = hub.accepted().await;
    assert_eq!(reports.len(), 1);
    assert_valid_report(&reports[0]);
    // selftest never touches the daemon's audit cursor
    assert_eq!(reports[0]["audit"], json!([]));
    assert!(!home.state_dir.join("audit-cursor.json").exists());
    assert!(!err.contains(&hub.token) && !out.contains(&hub.token));

    // human output
    let (code, out, _) = agent_command(&home, &["selftest", "--hub"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("blocked:               true"), "{out}");

    // the hub refuses the token: a configuration problem (exit 2), token not shown
    hub.set_token("another-token-entirely").await;
    let (code, out, err) = agent_command(&home, &["selftest", "--hub"]);
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains(&hub.token));

    // the hub is gone: unreachable (exit 3)
    drop(hub);
    let (code, _, err) = agent_command(&home, &["selftest", "--hub"]);
    assert_eq!(code, Some(3), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_hub_is_checked_and_a_wrong_pin_explained() {
    let hub = HubSim::start();
    let home = AgentHome::new(&hub, &proxmox_down(), json!({}));
    let wrong = ["AB"; 32].join(":");
    home.set("hub.ca_file", serde_json::Value::Null);
    home.set("hub.tls", json!({ "pin_sha256": wrong }));

    // `config check` shows the pin and where it comes from.
    let (code, out, err) = agent_command(&home, &["config", "check"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.contains("hub.tls.pin_sha256"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains(&wrong) && line.contains("file"), "{line}");

    // The hub presents another certificate: a configuration problem (exit 2) that shows
    // the pin the hub presented and names the key to change; nothing reached the hub.
    let (code, out, err) = agent_command(&home, &["selftest", "--hub"]);
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        err.contains("presented a certificate whose SHA-256 is"),
        "{err}"
    );
    assert!(
        err.contains(&wrong) && err.contains("hub.tls.pin_sha256"),
        "{err}"
    );
    assert!(!err.contains(&hub.token));
    assert!(hub.reports().await.is_empty());
}
