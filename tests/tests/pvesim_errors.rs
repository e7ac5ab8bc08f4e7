//! Error forms per version: reason phrases (hyper's `ReasonPhrase`), bodies with or
//! without `message`, 401s with an empty body and the auth delay, 403 texts for
//! ACL-restricted tokens, 501s, boolean type checks, and the admin token separation.

#[path = "pvesim_common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test]
async fn error_form_per_version() {
    for (ver, with_message) in [("7.4", false), ("8.1", false), ("8.4", true), ("9.1", true)] {
        let sim = spawn(&["--pve-version", ver, "--guests", "6"]);
        let r = api(&sim, "POST", "/nodes/pve1/lxc/101/status/start", &[]).await;
        assert_eq!(r.status, 500, "{ver}");
        assert_eq!(r.reason.as_deref(), Some("CT 101 already running"), "{ver}");
        let body = r.json();
        if with_message {
            assert_eq!(
                body,
                json!({"data": null, "message": "CT 101 already running\n"}),
                "{ver}"
            );
        } else {
            assert_eq!(body, json!({"data": null}), "{ver}");
        }
        assert_eq!(r.headers["server"], "pve-api-daemon/3.0");
        assert_eq!(r.headers["content-type"], "application/json;charset=UTF-8");

        let r = api(
            &sim,
            "POST",
            "/nodes/pve1/lxc/101/status/start",
            &[("skiplock", "true")],
        )
        .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.reason.as_deref(), Some("Parameter verification failed."));
        let mut expected = json!({"data": null, "errors": {"skiplock": "type check ('boolean') failed - got 'true'"}});
        if with_message {
            expected["message"] = json!("Parameter verification failed.\n");
        }
        assert_eq!(r.json(), expected, "{ver}");

        let r = api(&sim, "GET", "/nodes/pve1/lxc/101/frobnicate", &[]).await;
        assert_eq!(r.status, 501);
        assert_eq!(
            r.reason.as_deref(),
            Some("Method 'GET /nodes/pve1/lxc/101/frobnicate' not implemented")
        );
        assert_eq!(r.json()["data"], json!(null));
        assert_eq!(r.json().get("message").is_some(), with_message);
    }
}

#[tokio::test]
async fn unauthorized_is_empty_and_names_the_detail() {
    let sim = spawn(&["--guests", "2"]);
    let id = sim.token_id().to_owned();
    let cases = [
        (None, "No ticket".to_owned()),
        (Some("Bearer nope".to_owned()), "No ticket".to_owned()),
        (
            Some(token_header(&id, "wrong")),
            "invalid token value!".to_owned(),
        ),
        (
            Some(token_header("root@pam!other", "x")),
            "no such token 'other' for user 'root@pam'".to_owned(),
        ),
        (
            Some(token_header("ghost@pve!t", "x")),
            "no such user ('ghost@pve')".to_owned(),
        ),
        (
            Some("PVEAPIToken=nosecret".to_owned()),
            "no tokenid specified".to_owned(),
        ),
    ];
    for (auth, reason) in cases {
        let r = call(&sim, auth.as_deref(), "GET", "/version", &[]).await;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.reason.as_deref(), Some(reason.as_str()), "{auth:?}");
        assert!(r.text.is_empty(), "401 body must be empty: {:?}", r.text);
    }
    // A space instead of '=' after PVEAPIToken is accepted, as PVE's regex allows.
    let ok = call(
        &sim,
        Some(&format!("PVEAPIToken {id}={}", sim.token_secret())),
        "GET",
        "/version",
        &[],
    )
    .await;
    assert_eq!(ok.status, 200);
    // The admin token is not a PVE token.
    let r = call(
        &sim,
        Some(&format!("Bearer {}", sim.admin_token())),
        "GET",
        "/nodes",
        &[],
    )
    .await;
    assert_eq!(r.status, 401);
}

/// A 401 is answered only after the auth delay, and while it waits, good requests are
/// answered: the order of events says so (the 401 is still held, by the simulator's own
/// log, when the good answer arrives), so the delay is long enough that no load on the
/// machine can stretch the good request past it, and no bound on its time is needed.
#[tokio::test]
async fn every_401_is_delayed_by_auth_delay() {
    let sim = spawn(&["--guests", "0", "--auth-delay", "3"]);
    let bad = tokio::spawn({
        let url = sim.api_url("/version");
        let client = sim.client().clone();
        let auth = token_header(sim.token_id(), "bad");
        async move {
            let t = Instant::now();
            let r = client.get(url).header("Authorization", auth).send().await;
            (r.map(|r| r.status().as_u16()), t.elapsed())
        }
    });
    let seq = wait_held(&sim, "/version").await;
    let r = api(&sim, "GET", "/version", &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        !answered(&sim, seq).await,
        "the 401 was answered before the good request: not delayed, or the good one waited"
    );
    let (status, took) = bad.await.unwrap();
    assert_eq!(status.unwrap(), 401);
    assert!(took >= Duration::from_millis(2990), "{took:?}");
}

#[tokio::test]
async fn body_on_delete_is_501_and_unknown_node_is_a_lookup_failure() {
    let sim = spawn(&["--guests", "2"]);
    let r = sim
        .client()
        .delete(sim.api_url("/nodes/pve1/lxc/101/snapshot/nightly"))
        .header("Authorization", sim.auth_header())
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("force=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 501);
    let reason = r
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|p| p.as_bytes().to_vec());
    assert_eq!(
        reason.as_deref(),
        Some(&b"Unexpected content for method 'DELETE'"[..])
    );
    // The guest index loads the config: a cheap existence probe.
    assert!(api(&sim, "GET", "/nodes/pve1/lxc/101", &[]).await.data()[0]["subdir"].is_string());
    let r = api(&sim, "GET", "/nodes/pve1/qemu/101", &[]).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Configuration file 'nodes/pve1/qemu-server/101.conf' does not exist")
    );
    let r = api(&sim, "GET", "/nodes/other/status", &[]).await;
    assert_eq!(r.status, 500);
    assert!(
        r.reason
            .unwrap()
            .starts_with("hostname lookup 'other' failed")
    );
}

#[tokio::test]
async fn restricted_tokens_get_pves_403_texts() {
    let dir = tempfile::tempdir().unwrap();
    let acl = write_acl(
        &dir,
        &json!({"tokens": [
            {"token_id": "felhom@pve!agent", "secret": "s3cr3t", "acl": [
                {"path": "/vms/101", "privs": ["VM.Audit", "VM.Config.Options"]},
                {"path": "/storage/local", "roles": ["PVEDatastoreUser"]}
            ]},
            {"token_id": "audit@pve!ro", "secret": "ro", "acl": [{"path": "/", "roles": ["PVEAuditor"]}]}
        ]}),
    );
    let sim = spawn(&["--guests", "6", "--pve-version", "8.1", "--acl", &acl]);
    let agent = token_header("felhom@pve!agent", "s3cr3t");
    let r = call(
        &sim,
        Some(&agent),
        "POST",
        "/nodes/pve1/lxc/101/status/stop",
        &[],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.reason.as_deref(),
        Some("Permission check failed (/vms/101, VM.PowerMgmt)")
    );
    assert_eq!(
        r.json(),
        fixture("pve8-error-403-permission-legacy.json"),
        "8.1: no message"
    );
    let r = call(&sim, Some(&agent), "GET", "/nodes/pve1/status", &[]).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Permission check failed (/nodes/pve1, Sys.Audit)")
    );
    let r = call(&sim, Some(&agent), "GET", "/nodes/pve1/lxc/102/config", &[]).await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Permission check failed (/vms/102, VM.Audit)")
    );
    // Lists are filtered rather than refused.
    let r = call(&sim, Some(&agent), "GET", "/nodes/pve1/lxc", &[]).await;
    let vmids: Vec<_> = r
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["vmid"].clone())
        .collect();
    assert_eq!(vmids, vec![json!("101")]);
    let r = call(&sim, Some(&agent), "GET", "/nodes/pve1/storage", &[]).await;
    assert_eq!(r.data().as_array().unwrap().len(), 1);
    // /nodes: still listed, without numbers.
    let r = call(&sim, Some(&agent), "GET", "/nodes", &[]).await;
    assert!(r.data()[0].get("maxmem").is_none());
    // PUT config: "any" check joins the privileges with '|'.
    let r = call(
        &sim,
        Some(&agent),
        "PUT",
        "/nodes/pve1/lxc/102/config",
        &[("onboot", "1")],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some(
            "Permission check failed (/vms/102, VM.Config.Disk|VM.Config.CPU|VM.Config.Memory|VM.Config.Network|VM.Config.Options)"
        )
    );
    // Per key: Options is there, CPU is not.
    let r = call(
        &sim,
        Some(&agent),
        "PUT",
        "/nodes/pve1/lxc/101/config",
        &[("onboot", "0")],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.reason);
    let r = call(
        &sim,
        Some(&agent),
        "PUT",
        "/nodes/pve1/lxc/101/config",
        &[("cores", "2")],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Permission check failed (/vms/101, VM.Config.CPU)")
    );
    // Restore without VM.Allocate or VM.Backup: the bare form.
    let r = call(
        &sim,
        Some(&agent),
        "POST",
        "/nodes/pve1/lxc",
        &[
            ("vmid", "150"),
            ("ostemplate", "local:backup/x"),
            ("restore", "1"),
        ],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.reason.as_deref(), Some("Permission check failed"));
    // The auditor reads everything and changes nothing.
    let ro = token_header("audit@pve!ro", "ro");
    assert_eq!(
        call(&sim, Some(&ro), "GET", "/nodes/pve1/status", &[])
            .await
            .status,
        200
    );
    let r = call(
        &sim,
        Some(&ro),
        "POST",
        "/nodes/pve1/lxc/102/status/start",
        &[],
    )
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("Permission check failed (/vms/102, VM.PowerMgmt)")
    );
}

#[tokio::test]
async fn version_8_4_403_has_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let acl = write_acl(
        &dir,
        &json!({"tokens": [{"token_id": "felhom@pve!agent", "secret": "s", "acl": [
            {"path": "/vms", "privs": ["VM.Audit"]}]}]}),
    );
    let sim = spawn(&["--guests", "6", "--pve-version", "8.4", "--acl", &acl]);
    let r = call(
        &sim,
        Some(&token_header("felhom@pve!agent", "s")),
        "POST",
        "/nodes/pve1/lxc/101/status/start",
        &[],
    )
    .await;
    let mut f = fixture("pve8-error-403-permission-with-message.json");
    assert_eq!(r.json(), f.take());
}

#[tokio::test]
async fn control_api_refuses_pve_tokens() {
    let sim = spawn(&["--guests", "1"]);
    let r = sim
        .client()
        .get(format!("{}/_sim/state", sim.url()))
        .header("Authorization", sim.auth_header())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = sim
        .client()
        .get(format!("{}/_sim/state", sim.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(sim.state().await.unwrap()["guests"].is_array());
}
