//! The control API: request log, each fault kind, settings and direct state changes.

#[path = "pvesim_common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use felhom_testbed::harness::Fault;
use serde_json::json;

#[tokio::test]
async fn request_log_in_order_with_params_and_tokens() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.05"]);
    api(&sim, "GET", "/version", &[]).await.data();
    api(&sim, "POST", "/nodes/pve1/lxc/102/status/start", &[])
        .await
        .data();
    api(
        &sim,
        "PUT",
        "/nodes/pve1/lxc/102/config",
        &[("onboot", "1"), ("description", "x y")],
    )
    .await
    .data();
    call(
        &sim,
        Some("PVEAPIToken=root@pam!felhom=nope"),
        "GET",
        "/nodes?x=1",
        &[],
    )
    .await;
    let log = sim.requests(0).await.unwrap();
    assert_eq!(log.len(), 4);
    assert!(log.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(
        (log[0].method.as_str(), log[0].path.as_str()),
        ("GET", "/api2/json/version")
    );
    assert_eq!(log[1].path, "/api2/json/nodes/pve1/lxc/102/status/start");
    assert_eq!(
        log[2].params.get("description").map(String::as_str),
        Some("x y")
    );
    assert_eq!(log[2].params.get("onboot").map(String::as_str), Some("1"));
    assert_eq!(log[2].token_id.as_deref(), Some("root@pam!felhom"));
    assert_eq!(log[2].status, Some(200));
    assert_eq!((log[3].token_id.clone(), log[3].status), (None, Some(401)));
    assert_eq!(log[3].params.get("x").map(String::as_str), Some("1"));
    let since = sim.requests(log[1].seq).await.unwrap();
    assert_eq!(since.len(), 2);
    // Control requests and direct changes are not logged.
    sim.set_guest(102, json!({"lock": "backup"})).await.unwrap();
    assert_eq!(sim.requests(0).await.unwrap().len(), 4);
    sim.clear_requests().await.unwrap();
    assert!(sim.requests(0).await.unwrap().is_empty());
    api(&sim, "GET", "/version", &[]).await.data();
    assert_eq!(
        sim.requests(0).await.unwrap()[0].seq,
        5,
        "seq keeps counting"
    );
}

#[tokio::test]
async fn http_500_fault_in_the_version_form() {
    let sim = spawn(&["--guests", "2", "--pve-version", "8.1"]);
    sim.add_fault(
        &Fault::http_500("/nodes/pve1/lxc/*", "storage is on fire")
            .method("GET")
            .times(2),
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let r = api(&sim, "GET", "/nodes/pve1/lxc/101/config", &[]).await;
        assert_eq!(
            (r.status, r.reason.as_deref()),
            (500, Some("storage is on fire"))
        );
        assert_eq!(r.json(), json!({"data": null}));
    }
    assert_eq!(
        api(&sim, "GET", "/nodes/pve1/lxc/101/config", &[])
            .await
            .status,
        200
    );
    // Method filter: a PUT is not affected by a GET fault.
    sim.add_fault(&Fault::http_500("/nodes/pve1/lxc/101/config", "x").method("GET"))
        .await
        .unwrap();
    assert_eq!(
        api(
            &sim,
            "PUT",
            "/nodes/pve1/lxc/101/config",
            &[("onboot", "1")]
        )
        .await
        .status,
        200
    );
    sim.clear_faults().await.unwrap();
    assert_eq!(
        api(&sim, "GET", "/nodes/pve1/lxc/101/config", &[])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn task_fail_fault_and_undo() {
    let sim = spawn(&["--guests", "6", "--task-seconds", "0.2"]);
    sim.add_fault(&Fault::task_fail("/nodes/pve1/vzdump", "vzdump: disk full").times(1))
        .await
        .unwrap();
    // A request that fails before forking does not use the fault up.
    let r = api(
        &sim,
        "POST",
        "/nodes/pve1/vzdump",
        &[("vmid", "101"), ("tmpdir", "/x")],
    )
    .await;
    assert_eq!(r.status, 400);
    let upid = api(&sim, "POST", "/nodes/pve1/vzdump", &[("vmid", "101")])
        .await
        .data();
    let upid = upid.as_str().unwrap().to_owned();
    assert_eq!(
        get(&sim, "/nodes/pve1/lxc/101/config").await["lock"],
        "backup"
    );
    let st = sim.wait_task(&upid, Duration::from_secs(5)).await.unwrap();
    assert_eq!(st["exitstatus"], "vzdump: disk full");
    assert!(
        get(&sim, "/nodes/pve1/lxc/101/config")
            .await
            .get("lock")
            .is_none(),
        "lock undone"
    );
    let backups = get(
        &sim,
        "/nodes/pve1/storage/local/content?content=backup&vmid=101",
    )
    .await;
    assert_eq!(backups.as_array().unwrap().len(), 1, "no new archive");
    let st = run_task(&sim, "POST", "/nodes/pve1/vzdump", &[("vmid", "101")]).await;
    assert_eq!(st["exitstatus"], "OK", "times=1 used up");
}

#[tokio::test]
async fn latency_fault_and_setting_are_asynchronous() {
    let sim = spawn(&["--guests", "2"]);
    // Long enough that no load on the machine stretches the request below past it: the
    // order of events (the slow request still held when the other is answered) is what
    // shows that it does not block others.
    sim.add_fault(&Fault::latency("/nodes/pve1/status", 3000))
        .await
        .unwrap();
    let slow = {
        let url = sim.api_url("/nodes/pve1/status");
        let client = sim.client().clone();
        let auth = sim.auth_header();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = client
                .get(url)
                .header("Authorization", auth)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), t.elapsed())
        })
    };
    let seq = wait_held(&sim, "/nodes/pve1/status").await;
    assert_eq!(api(&sim, "GET", "/version", &[]).await.status, 200);
    assert!(
        !answered(&sim, seq).await,
        "other requests are not blocked: the slow one was answered first"
    );
    let (status, took) = slow.await.unwrap();
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(2990), "{took:?}");
    sim.clear_faults().await.unwrap();
    let s = sim.settings(None, Some(150)).await.unwrap();
    assert_eq!(s["latency_ms"], 150);
    let t = Instant::now();
    api(&sim, "GET", "/version", &[]).await.data();
    assert!(t.elapsed() >= Duration::from_millis(145));
}

/// `--latency-ms N` adds N ms to each request, counted from its arrival: the simulator's
/// own measure (`held_us` in the request log: arrival to answer ready) is never below N
/// ms, and (a bound no load reaches, against a unit mix-up) not a second more. How
/// little more than N ms is added (not N rounded up to the runtime's timer tick) is an
/// idle machine's figure: the bench `precise_latency` measures it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_setting_adds_its_latency_and_never_less() {
    for latency_ms in [2u64, 7] {
        let sim = spawn(&["--guests", "2", "--latency-ms", &latency_ms.to_string()]);
        for _ in 0..20 {
            assert_eq!(api(&sim, "GET", "/version", &[]).await.status, 200);
        }
        let mut held: Vec<u64> = sim
            .requests(0)
            .await
            .unwrap()
            .iter()
            .map(|r| r.held_us.expect("held_us"))
            .collect();
        held.sort_unstable();
        assert_eq!(held.len(), 20);
        assert!(
            held[0] >= latency_ms * 1000,
            "--latency-ms {latency_ms}: a request held only {} µs",
            held[0]
        );
        assert!(
            held[10] < latency_ms * 1000 + 1_000_000,
            "--latency-ms {latency_ms}: median held {} µs",
            held[10]
        );
    }
}

#[tokio::test]
async fn malformed_body_and_dropped_connection() {
    let sim = spawn(&["--guests", "6"]);
    sim.add_fault(&Fault::malformed_body("/nodes/pve1/lxc").times(1))
        .await
        .unwrap();
    let r = api(&sim, "GET", "/nodes/pve1/lxc", &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        serde_json::from_str::<serde_json::Value>(&r.text).is_err(),
        "must not parse: {}",
        r.text
    );
    assert!(r.text.starts_with('{') && !r.text.is_empty());
    assert!(
        api(&sim, "GET", "/nodes/pve1/lxc", &[])
            .await
            .data()
            .is_array()
    );

    sim.add_fault(&Fault::drop_connection("/nodes/pve1/lxc/101/status/start").times(1))
        .await
        .unwrap();
    let err = sim
        .client()
        .post(sim.api_url("/nodes/pve1/lxc/101/status/start"))
        .header("Authorization", sim.auth_header())
        .send()
        .await
        .expect_err("the connection is dropped without a response");
    assert!(!err.is_timeout(), "{err}");
    let log = sim.requests(0).await.unwrap();
    let last = log.last().unwrap();
    assert_eq!(
        (last.path.as_str(), last.status),
        ("/api2/json/nodes/pve1/lxc/101/status/start", None)
    );
    // The next one goes through (times=1).
    assert_eq!(
        api(&sim, "POST", "/nodes/pve1/lxc/101/status/start", &[])
            .await
            .status,
        500
    );
}

#[tokio::test]
async fn direct_state_changes_and_inspection() {
    let sim = spawn(&["--guests", "6"]);
    let state = sim.state().await.unwrap();
    assert_eq!(state["node"], "pve1");
    assert_eq!(state["guests"].as_array().unwrap().len(), 6);
    let g = sim.guest(104).await.unwrap();
    assert_eq!(
        (g["ha_managed"].clone(), g["status"].clone()),
        (json!(true), json!("running"))
    );
    // Create a guest directly and see it through the PVE API.
    let created = sim
        .set_guest(
            200,
            json!({"type": "lxc", "status": "running", "config": {"hostname": "made", "memory": "256", "description": "d"}}),
        )
        .await
        .unwrap();
    assert_eq!(created["config"]["description"], "d\n");
    let cur = get(&sim, "/nodes/pve1/lxc/200/status/current").await;
    assert_eq!(
        (cur["name"].clone(), cur["maxmem"].clone()),
        (json!("made"), json!(256 * 1024 * 1024))
    );
    sim.set_guest(200, json!({"lock": "migrate", "config": {"memory": null}}))
        .await
        .unwrap();
    let cfg = get(&sim, "/nodes/pve1/lxc/200/config").await;
    assert_eq!(cfg["lock"], "migrate");
    assert!(cfg.get("memory").is_none());
    assert!(
        sim.set_guest(201, json!({"status": "running"}))
            .await
            .is_err(),
        "needs a type to create"
    );
    assert!(
        sim.set_guest(200, json!({"status": "paused"}))
            .await
            .is_err()
    );
    let bad = sim
        .client()
        .post(format!("{}/_sim/faults", sim.url()))
        .header("Authorization", format!("Bearer {}", sim.admin_token()))
        .body(r#"{"path":"/x","kind":"explode"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
}
