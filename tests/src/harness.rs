//! Starting a simulator binary from a test and talking to its control API.
//!
//! Owns: the child process (killed on drop), reading its start line with a timeout, a
//! reqwest client that trusts the simulator's CA, and typed helpers for `/_sim/`.
//! Must never: leave a simulator running after the test, or trust any certificate but
//! the one the simulator printed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("starting {bin}: {source}")]
    Spawn {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the simulator printed no start line within {secs} s (exit status: {status:?})")]
    NoStartLine { secs: u64, status: Option<String> },
    #[error("the start line is not the expected JSON: {detail}")]
    BadStartLine { detail: String },
    #[error("reading the CA file {path}: {source}")]
    Ca {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("{method} {path}: {source}")]
    Request {
        method: &'static str,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{what}: unexpected answer: {detail}")]
    Decode { what: String, detail: String },
    #[error("task {upid} still running after {secs} s")]
    TaskTimeout { upid: String, secs: u64 },
}

/// The JSON line a simulator prints at start.
#[derive(Debug, Clone, Deserialize)]
pub struct StartLine {
    pub url: String,
    pub pin_sha256: String,
    pub ca_file: PathBuf,
    pub node: String,
    pub token_id: String,
    pub token_secret: String,
    pub admin_token: String,
    #[serde(default)]
    pub pve_version: Option<String>,
}

/// One entry of `GET /_sim/requests`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LoggedRequest {
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub params: std::collections::BTreeMap<String, String>,
    pub token_id: Option<String>,
    pub status: Option<u16>,
    /// Microseconds the simulator held the request (arrival to answer ready).
    #[serde(default)]
    pub held_us: Option<u64>,
    /// When it arrived, in microseconds since the Unix epoch (the simulator's wall clock).
    #[serde(default)]
    pub received_unix_us: Option<u64>,
}

/// A fault for `POST /_sim/faults`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Fault {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Below `/api2/json`; a trailing `*` makes it a prefix.
    pub path: String,
    /// `http_500`, `task_fail`, `latency`, `malformed_body`, `drop_connection`, `edit`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
    /// For `edit`: `{"vmid": …, "patch": <PUT /_sim/guests body>}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edit: Option<Value>,
}

impl Fault {
    fn of(kind: &str, path: &str) -> Fault {
        Fault {
            path: path.to_owned(),
            kind: kind.to_owned(),
            ..Fault::default()
        }
    }
    pub fn http_500(path: &str, message: &str) -> Fault {
        Fault {
            message: Some(message.to_owned()),
            ..Fault::of("http_500", path)
        }
    }
    pub fn task_fail(path: &str, message: &str) -> Fault {
        Fault {
            message: Some(message.to_owned()),
            ..Fault::of("task_fail", path)
        }
    }
    pub fn latency(path: &str, ms: u64) -> Fault {
        Fault {
            latency_ms: Some(ms),
            ..Fault::of("latency", path)
        }
    }
    pub fn malformed_body(path: &str) -> Fault {
        Fault::of("malformed_body", path)
    }
    pub fn drop_connection(path: &str) -> Fault {
        Fault::of("drop_connection", path)
    }
    /// Changes guest `vmid` (a `PUT /_sim/guests/{vmid}` body) right before the matching
    /// request is served: a change by hand between a client's read and its write.
    pub fn edit(path: &str, vmid: u32, patch: Value) -> Fault {
        Fault {
            edit: Some(serde_json::json!({"vmid": vmid, "patch": patch})),
            ..Fault::of("edit", path)
        }
    }
    /// Only for this HTTP method.
    pub fn method(mut self, m: &str) -> Fault {
        self.method = Some(m.to_owned());
        self
    }
    /// Only this many times.
    pub fn times(mut self, n: u32) -> Fault {
        self.times = Some(n);
        self
    }
}

/// What a gate test compares of one guest before and after an operation: whether it
/// exists, its power state, its config without `digest` and `lock`, and its snapshot
/// names (sorted). Equal values mean "the guest is as it was".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestComparable {
    pub exists: bool,
    /// `running` / `stopped`; `None` when it does not exist.
    pub status: Option<String>,
    /// The config as `GET …/config` shows it (pending values merged), without `digest`
    /// and `lock`.
    pub config: std::collections::BTreeMap<String, Value>,
    pub snapshots: Vec<String>,
}

/// A running `felhom-pvesim` child.
#[derive(Debug)]
pub struct PveSim {
    child: Child,
    pub start: StartLine,
    ca_pem: String,
    client: reqwest::Client,
}

impl PveSim {
    /// Starts `bin` with `args` and waits (up to 30 s) for its start line.
    pub fn spawn(bin: impl AsRef<Path>, args: &[&str]) -> Result<PveSim, HarnessError> {
        let bin = bin.as_ref();
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                bin: bin.display().to_string(),
                source,
            })?;
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let Some(out) = stdout else { return };
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let secs = 30;
        let line = match rx.recv_timeout(Duration::from_secs(secs)) {
            Ok(l) => l,
            Err(_) => {
                let status = child.try_wait().ok().flatten().map(|s| s.to_string());
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::NoStartLine { secs, status });
            }
        };
        let kill = |mut c: Child| {
            let _ = c.kill();
            let _ = c.wait();
        };
        let start: StartLine = match serde_json::from_str(&line) {
            Ok(s) => s,
            Err(e) => {
                kill(child);
                return Err(HarnessError::BadStartLine {
                    detail: format!("{e}: {line}"),
                });
            }
        };
        let ca_pem = match std::fs::read_to_string(&start.ca_file) {
            Ok(p) => p,
            Err(source) => {
                let path = start.ca_file.clone();
                kill(child);
                return Err(HarnessError::Ca { path, source });
            }
        };
        let client = match build_client(&ca_pem) {
            Ok(c) => c,
            Err(e) => {
                kill(child);
                return Err(e);
            }
        };
        Ok(PveSim {
            child,
            start,
            ca_pem,
            client,
        })
    }

    pub fn url(&self) -> &str {
        &self.start.url
    }
    pub fn node(&self) -> &str {
        &self.start.node
    }
    pub fn token_id(&self) -> &str {
        &self.start.token_id
    }
    pub fn token_secret(&self) -> &str {
        &self.start.token_secret
    }
    pub fn admin_token(&self) -> &str {
        &self.start.admin_token
    }
    pub fn pin_sha256(&self) -> &str {
        &self.start.pin_sha256
    }
    pub fn ca_file(&self) -> &Path {
        &self.start.ca_file
    }
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `PVEAPIToken=<id>=<secret>` for the full-privilege token.
    pub fn auth_header(&self) -> String {
        format!(
            "PVEAPIToken={}={}",
            self.start.token_id, self.start.token_secret
        )
    }

    /// `<url>/api2/json<rel>`.
    pub fn api_url(&self, rel: &str) -> String {
        format!("{}/api2/json{rel}", self.start.url)
    }

    /// A client trusting only this simulator's CA.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    async fn control(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, HarnessError> {
        let url = format!("{}{path}", self.start.url);
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut rb = self.client.request(m, &url).header(
            "Authorization",
            format!("Bearer {}", self.start.admin_token),
        );
        if let Some(b) = body {
            rb = rb
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let resp = rb.send().await.map_err(|source| HarnessError::Request {
            method,
            path: path.to_owned(),
            source,
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|source| HarnessError::Request {
            method,
            path: path.to_owned(),
            source,
        })?;
        if status != 200 {
            return Err(HarnessError::Status {
                method,
                path: path.to_owned(),
                status,
                body: text,
            });
        }
        serde_json::from_str(&text).map_err(|e| HarnessError::Decode {
            what: path.to_owned(),
            detail: e.to_string(),
        })
    }

    /// The request log after sequence number `since` (0 = all kept entries).
    pub async fn requests(&self, since: u64) -> Result<Vec<LoggedRequest>, HarnessError> {
        let v = self
            .control("GET", &format!("/_sim/requests?since={since}"), None)
            .await?;
        serde_json::from_value(v["requests"].clone()).map_err(|e| HarnessError::Decode {
            what: "requests".into(),
            detail: e.to_string(),
        })
    }

    pub async fn clear_requests(&self) -> Result<(), HarnessError> {
        self.control("DELETE", "/_sim/requests", None)
            .await
            .map(|_| ())
    }

    /// Adds a fault; returns its id.
    pub async fn add_fault(&self, fault: &Fault) -> Result<u64, HarnessError> {
        let body = serde_json::to_value(fault).map_err(|e| HarnessError::Decode {
            what: "fault".into(),
            detail: e.to_string(),
        })?;
        let v = self.control("POST", "/_sim/faults", Some(body)).await?;
        v["id"].as_u64().ok_or_else(|| HarnessError::Decode {
            what: "fault id".into(),
            detail: v.to_string(),
        })
    }

    pub async fn clear_faults(&self) -> Result<(), HarnessError> {
        self.control("DELETE", "/_sim/faults", None)
            .await
            .map(|_| ())
    }

    /// The whole state (`GET /_sim/state`).
    pub async fn state(&self) -> Result<Value, HarnessError> {
        self.control("GET", "/_sim/state", None).await
    }

    /// One guest's state (`GET /_sim/guests/{vmid}`).
    pub async fn guest(&self, vmid: u32) -> Result<Value, HarnessError> {
        self.control("GET", &format!("/_sim/guests/{vmid}"), None)
            .await
    }

    /// Changes (or with `"type"` creates) a guest directly.
    pub async fn set_guest(&self, vmid: u32, patch: Value) -> Result<Value, HarnessError> {
        self.control("PUT", &format!("/_sim/guests/{vmid}"), Some(patch))
            .await
    }

    /// The comparable state of guest `vmid` ([`GuestComparable`]); a guest that does
    /// not exist is `exists: false`, not an error.
    pub async fn comparable_guest(&self, vmid: u32) -> Result<GuestComparable, HarnessError> {
        let v = match self.guest(vmid).await {
            Ok(v) => v,
            Err(HarnessError::Status { status: 404, .. }) => {
                return Ok(GuestComparable {
                    exists: false,
                    status: None,
                    config: Default::default(),
                    snapshots: Vec::new(),
                });
            }
            Err(e) => return Err(e),
        };
        let mut config: std::collections::BTreeMap<String, Value> = v["config"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        config.remove("digest");
        config.remove("lock");
        let mut snapshots: Vec<String> = v["snapshots"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["name"].as_str())
                    .filter(|n| *n != "current")
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        snapshots.sort();
        Ok(GuestComparable {
            exists: true,
            status: v["status"].as_str().map(str::to_owned),
            config,
            snapshots,
        })
    }

    /// Arms a task fault (`POST /_sim/task-faults`): the next task of worker type
    /// `wtype` (for guest `vmid` when given) fails midway with its type's partial effect;
    /// returns the fault's id.
    pub async fn add_task_fault(
        &self,
        wtype: &str,
        vmid: Option<u32>,
        message: Option<&str>,
    ) -> Result<u64, HarnessError> {
        let body = serde_json::json!({"type": wtype, "vmid": vmid, "message": message});
        let v = self
            .control("POST", "/_sim/task-faults", Some(body))
            .await?;
        v["id"].as_u64().ok_or_else(|| HarnessError::Decode {
            what: "task fault id".into(),
            detail: v.to_string(),
        })
    }

    /// Arms a task fault from a full `POST /_sim/task-faults` body (e.g. with
    /// `"keep_lock": true` or `"times"`); returns its id.
    pub async fn add_task_fault_spec(&self, spec: Value) -> Result<u64, HarnessError> {
        let v = self
            .control("POST", "/_sim/task-faults", Some(spec))
            .await?;
        v["id"].as_u64().ok_or_else(|| HarnessError::Decode {
            what: "task fault id".into(),
            detail: v.to_string(),
        })
    }

    /// Disarms every task fault.
    pub async fn clear_task_faults(&self) -> Result<(), HarnessError> {
        self.control("DELETE", "/_sim/task-faults", None)
            .await
            .map(|_| ())
    }

    /// Changes (or with `"type"` creates) a storage (`PUT /_sim/storages/{sid}`).
    pub async fn set_storage(&self, sid: &str, patch: Value) -> Result<Value, HarnessError> {
        self.control("PUT", &format!("/_sim/storages/{sid}"), Some(patch))
            .await
    }

    /// Changes task duration and/or latency.
    pub async fn settings(
        &self,
        task_seconds: Option<f64>,
        latency_ms: Option<u64>,
    ) -> Result<Value, HarnessError> {
        let mut b = serde_json::Map::new();
        if let Some(t) = task_seconds {
            b.insert("task_seconds".into(), t.into());
        }
        if let Some(l) = latency_ms {
            b.insert("latency_ms".into(), l.into());
        }
        self.control("PUT", "/_sim/settings", Some(Value::Object(b)))
            .await
    }

    /// Polls the task status (PVE API, full token) until stopped; returns its `data`.
    pub async fn wait_task(&self, upid: &str, timeout: Duration) -> Result<Value, HarnessError> {
        let enc = percent_encoding::utf8_percent_encode(upid, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
        let path = format!("/nodes/{}/tasks/{enc}/status", self.start.node);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let resp = self
                .client
                .get(self.api_url(&path))
                .header("Authorization", self.auth_header())
                .send()
                .await
                .map_err(|source| HarnessError::Request {
                    method: "GET",
                    path: path.clone(),
                    source,
                })?;
            let status = resp.status().as_u16();
            let text = resp.text().await.map_err(|source| HarnessError::Request {
                method: "GET",
                path: path.clone(),
                source,
            })?;
            if status != 200 {
                return Err(HarnessError::Status {
                    method: "GET",
                    path,
                    status,
                    body: text,
                });
            }
            let v: Value = serde_json::from_str(&text).map_err(|e| HarnessError::Decode {
                what: path.clone(),
                detail: e.to_string(),
            })?;
            if v["data"]["status"] == "stopped" {
                return Ok(v["data"].clone());
            }
            if std::time::Instant::now() > deadline {
                return Err(HarnessError::TaskTimeout {
                    upid: upid.to_owned(),
                    secs: timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PveSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reqwest client (ring provider) trusting only the CA in `ca_pem`.
pub fn build_client(ca_pem: &str) -> Result<reqwest::Client, HarnessError> {
    let tls = crate::tls::client_config_trusting(ca_pem)?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(HarnessError::Client)
}

/// A `felhom-agent run` started by a test, its stderr going to `log`. Killed and reaped
/// on drop if it is still running.
#[derive(Debug)]
pub struct AgentProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl AgentProcess {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: impl Into<nix::sys::signal::Signal>) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig.into());
    }

    /// SIGKILL, and reap it.
    pub fn kill9(mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits for exit; `None` if it did not exit within `timeout` (it is then killed).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM; the exit code (`None` if it did not exit within `timeout`, or died of a
    /// signal).
    pub fn term(mut self, timeout: Duration) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(timeout).and_then(|s| s.code())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
