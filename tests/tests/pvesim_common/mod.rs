//! Helpers shared by the `pvesim_*` integration tests: start the real binary, talk to it
//! over real TLS with a plain reqwest client, compare JSON shapes.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use felhom_testbed::harness::PveSim;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_felhom-pvesim");

/// PVE's UPID decode regex (pve-common `PVE::UPID::decode`).
pub const UPID_RE: &str = r"^UPID:([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?):([0-9A-Fa-f]{8}):([0-9A-Fa-f]{8,9}):([0-9A-Fa-f]{8}):([^:\s/]+):([^:\s/]*):([^:\s/]+):$";

pub fn spawn(args: &[&str]) -> PveSim {
    PveSim::spawn(BIN, args).expect("start felhom-pvesim")
}

pub fn fixture(rel: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/pve")
        .join(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", p.display()))
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    /// The custom reason phrase (hyper's `ReasonPhrase` extension), if any.
    pub reason: Option<String>,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }
    pub fn data(&self) -> Value {
        assert_eq!(
            self.status, 200,
            "expected 200, got {} {:?}: {}",
            self.status, self.reason, self.text
        );
        self.json()["data"].clone()
    }
}

pub fn token_header(id: &str, secret: &str) -> String {
    format!("PVEAPIToken={id}={secret}")
}

pub async fn call(
    sim: &PveSim,
    auth: Option<&str>,
    method: &str,
    path: &str,
    form: &[(&str, &str)],
) -> Resp {
    let url = sim.api_url(path);
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut rb = sim.client().request(m.clone(), &url);
    if let Some(a) = auth {
        rb = rb.header("Authorization", a);
    }
    if !form.is_empty() {
        if m == reqwest::Method::GET || m == reqwest::Method::DELETE {
            rb = rb.query(form);
        } else {
            rb = rb.form(form);
        }
    }
    let resp = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let reason = resp
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    Resp {
        status,
        reason,
        headers,
        text,
    }
}

/// With the full-privilege token.
pub async fn api(sim: &PveSim, method: &str, path: &str, form: &[(&str, &str)]) -> Resp {
    let h = sim.auth_header();
    call(sim, Some(&h), method, path, form).await
}

pub async fn get(sim: &PveSim, path: &str) -> Value {
    api(sim, "GET", path, &[]).await.data()
}

/// Starts a task and waits for it; returns the final status object.
pub async fn run_task(sim: &PveSim, method: &str, path: &str, form: &[(&str, &str)]) -> Value {
    let upid = api(sim, method, path, form).await.data();
    let upid = upid
        .as_str()
        .unwrap_or_else(|| panic!("no UPID from {path}: {upid}"))
        .to_owned();
    sim.wait_task(&upid, Duration::from_secs(20))
        .await
        .expect("task finishes")
}

/// Waits until the simulator holds a request for `path` (below `/api2/json`): received,
/// logged, not answered yet. Returns its sequence number in the request log.
pub async fn wait_held(sim: &PveSim, path: &str) -> u64 {
    let full = format!("/api2/json{path}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = sim.requests(0).await.expect("request log");
        if let Some(r) = log.iter().find(|r| r.path == full && r.status.is_none()) {
            return r.seq;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the simulator never held {full}: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether the simulator has answered the request it logged as `seq`.
pub async fn answered(sim: &PveSim, seq: u64) -> bool {
    let log = sim.requests(seq - 1).await.expect("request log");
    let r = log
        .iter()
        .find(|r| r.seq == seq)
        .expect("the request is logged");
    r.status.is_some()
}

pub fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// JSON type name, with integers and floats both `number`.
pub fn ty(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Asserts that `actual` has the shape of `expected`: every key of `expected` is present
/// (unless listed in `may_miss`) with the same JSON type, `actual` has no key beyond
/// `expected`'s except those in `may_add`, and numbers that are 0/1 flags in `expected`
/// (keys in `flags`) are exactly 0 or 1. Nested objects are compared one level deep.
pub fn assert_shape(
    what: &str,
    expected: &Value,
    actual: &Value,
    may_miss: &[&str],
    may_add: &[&str],
    flags: &[&str],
) {
    let (Some(e), Some(a)) = (expected.as_object(), actual.as_object()) else {
        assert_eq!(ty(expected), ty(actual), "{what}: top-level type");
        return;
    };
    for (k, ev) in e {
        match a.get(k) {
            None => assert!(
                may_miss.contains(&k.as_str()),
                "{what}: key {k:?} missing in {actual}"
            ),
            Some(av) => {
                assert_eq!(
                    ty(ev),
                    ty(av),
                    "{what}: type of {k:?}: fixture {ev}, simulator {av}"
                );
                if let (Some(eo), Some(ao)) = (ev.as_object(), av.as_object()) {
                    for (kk, evv) in eo {
                        if let Some(avv) = ao.get(kk) {
                            assert_eq!(ty(evv), ty(avv), "{what}: type of {k}.{kk}");
                        }
                    }
                }
            }
        }
    }
    for (k, av) in a {
        assert!(
            e.contains_key(k) || may_add.contains(&k.as_str()),
            "{what}: unexpected key {k:?} = {av}"
        );
        if flags.contains(&k.as_str()) {
            assert!(
                av == &Value::from(0) || av == &Value::from(1),
                "{what}: {k} must be 0/1, got {av}"
            );
        }
    }
}

pub fn write_acl(dir: &tempfile::TempDir, body: &Value) -> String {
    let p = dir.path().join("acl.json");
    std::fs::write(&p, body.to_string()).unwrap();
    p.display().to_string()
}
