//! Error forms per version: reason phrases (hyper's `ReasonPhrase`), bodies with or
//! without `message`, 401s with an empty body and the auth delay, 403 texts for
//! ACL-restricted tokens, 501s, boolean type checks, and the admin token separation.

#[path = "pvesim_common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

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

/// Issue 11: every request is checked against PVE's published API schema, so what the
/// hand-written subset let through is refused with PVE's 400 and per-parameter errors: a
/// password under the schema's `minLength`, a property-string key outside its pattern,
/// and a VLAN trunk range that PVE 9's LXC `net[n]` no longer takes. Nothing changes.
#[tokio::test]
async fn the_published_schema_refuses_what_pve_refuses() {
    let sim = spawn(&["--guests", "6"]);
    let before = get(&sim, "/nodes/pve1/lxc/101/config").await;
    type Case = (
        &'static str,
        &'static str,
        Vec<(&'static str, &'static str)>,
        Value,
    );
    let cases: [Case; 3] = [
        (
            "PUT",
            "/nodes/pve1/lxc/101/config",
            vec![("features", "nesting=1,mount=nfs/x")],
            json!({"features": "invalid format - format error\nfeatures.mount: value does not match the regex pattern\n"}),
        ),
        (
            "PUT",
            "/nodes/pve1/lxc/101/config",
            vec![("net0", "name=eth0,bridge=vmbr0,trunks=10-20")],
            json!({"net0": "invalid format - format error\nnet0.trunks: value does not match the regex pattern\n"}),
        ),
        (
            "POST",
            "/nodes/pve1/lxc",
            vec![
                ("vmid", "150"),
                (
                    "ostemplate",
                    "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
                ),
                ("password", "abc"),
            ],
            json!({"password": "value must be at least 5 characters long"}),
        ),
    ];
    for (method, path, form, errors) in cases {
        let r = api(&sim, method, path, &form).await;
        assert_eq!(r.status, 400, "{method} {path} {form:?}: {}", r.text);
        assert_eq!(r.reason.as_deref(), Some("Parameter verification failed."));
        assert_eq!(
            r.json(),
            json!({"data": null, "errors": errors, "message": "Parameter verification failed.\n"}),
            "{method} {path} {form:?}"
        );
    }
    assert_eq!(get(&sim, "/nodes/pve1/lxc/101/config").await, before);
    let r = api(&sim, "GET", "/nodes/pve1/lxc/150/config", &[]).await;
    assert_eq!(r.status, 500, "{}", r.text);

    // Path parameters are parameters too; the same one again must not differ.
    let r = api(&sim, "GET", "/nodes/pve1/lxc/99/status/current", &[]).await;
    assert_eq!(
        r.json()["errors"],
        json!({"vmid": "invalid format - value does not look like a valid VM ID\n"})
    );
    let path = "/nodes/pve1/lxc/101/status/current";
    assert_eq!(api(&sim, "GET", path, &[("vmid", "101")]).await.status, 200);
    let r = api(&sim, "GET", path, &[("vmid", "102")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["errors"],
        json!({"vmid": "duplicate parameter (already defined in URI) with conflicting values!"})
    );
}

/// The schema pvesim loaded is the one its meta file describes, and it agrees with what
/// real PVE nodes answered (the captured fixtures).
#[test]
fn the_loaded_schema_matches_its_meta_and_the_captured_fixtures() {
    use felhom_testbed::pvesim::apischema;
    let api = apischema::global().unwrap_or_else(|e| panic!("{e}"));
    let meta = api.meta();
    assert_eq!((meta.paths, meta.methods), (449, 680));
    assert_eq!(
        (api.path_count(), api.method_count()),
        (meta.paths, meta.methods)
    );

    // A captured GET lxc config: every key is a property the schema returns, and the
    // values pass that property's check (property strings, patterns, numbers).
    let conf = fixture("pve7-lxc-config.json")["data"].clone();
    let returns = api
        .returns("/nodes/{node}/lxc/{vmid}/config", "GET")
        .expect("GET lxc config in the schema");
    let props = returns["properties"].as_object().expect("properties");
    for (k, v) in conf.as_object().expect("config object") {
        let stem = k.trim_end_matches(|c: char| c.is_ascii_digit());
        let sub = props
            .get(k)
            .or_else(|| props.get(&format!("{stem}[n]")))
            .unwrap_or_else(|| panic!("{k} is not a returned property"));
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        // `lxc` is raw pairs; the capture's `hwaddr` was anonymized to a multicast
        // address, which PVE refuses as a parameter.
        if k != "lxc" && k != "net0" {
            assert_eq!(api.check_value(sub, &text, k), Ok(()), "{k}={text}");
        }
    }

    // A captured 400 of POST /nodes/{node}/qemu: the same errors for the same mistakes.
    let captured = fixture("pve8-error-400-param-format.json");
    let m = api.find("POST", &["nodes", "pve1", "qemu"]).expect("route");
    let mut params: std::collections::BTreeMap<String, String> = m.uri.iter().cloned().collect();
    params.insert("vmid".into(), "0101".into());
    params.insert("ipconfig0".into(), "ip=10.0.0.5/24,gw=10.0.0.1.5".into());
    let err = api.validate(&m, &params).expect_err("refused");
    assert_eq!(json!(err.errors), captured["errors"]);

    // A captured 400 for an unknown property: the same text (PVE 9 knows that one).
    let captured = fixture("pve7-error-400-param-unknown-property.json");
    let m = api
        .find("POST", &["nodes", "pve1", "lxc", "101", "status", "stop"])
        .expect("route");
    let mut params: std::collections::BTreeMap<String, String> = m.uri.iter().cloned().collect();
    params.insert("overrule-shutdown".into(), "1".into());
    assert!(
        api.validate(&m, &params).is_ok(),
        "PVE 9 has overrule-shutdown"
    );
    params.insert("overrule-shutdowns".into(), "1".into());
    let err = api.validate(&m, &params).expect_err("refused");
    assert_eq!(
        json!(err.errors)["overrule-shutdowns"],
        captured["errors"]["overrule-shutdown"]
    );

    // Required parameters, ranges and enumerations with PVE's texts.
    let m = api.find("POST", &["nodes", "pve1", "lxc"]).expect("route");
    let mut params: std::collections::BTreeMap<String, String> = m.uri.iter().cloned().collect();
    params.insert("vmid".into(), "150".into());
    params.insert("cores".into(), "9000".into());
    params.insert("cmode".into(), "serial".into());
    let err = api.validate(&m, &params).expect_err("refused");
    assert_eq!(
        json!(err.errors),
        json!({
            "ostemplate": "property is missing and it is not optional",
            "cores": "value must have a maximum value of 8192",
            "cmode": "value 'serial' does not have a value in the enumeration 'shell, console, tty'",
        })
    );

    // What this check cannot evaluate is known and small (accepted, not refused): a
    // negative look-ahead, and one long Unicode class repetition `regex` does not compile.
    let un = api.unchecked();
    assert!(un.patterns.len() <= 2, "{:?}", un.patterns);
}
