//! Shared pieces of the hub tests: the simulator as a real process, its `/_sim/` API, the
//! agent daemon as a real process, a fake helper audit-log writer, and the schema check.
#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The workspace's target directory for this profile (where cargo put our binaries).
pub fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_felhom-hubsim"))
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

/// The agent binary, built by `cargo test --workspace` (or `cargo build -p felhom-agent`).
pub fn agent_bin() -> PathBuf {
    let p = bin_dir().join("felhom-agent");
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, or `cargo build -p felhom-agent` first",
        p.display()
    );
    p
}

/// The `agent_id` the tests' hand-made reports carry.
pub const TEST_AGENT_ID: &str = "0123456789abcdef0123456789abcdef";

pub fn test_agent_id() -> felhom_agent::ops::AgentId {
    felhom_agent::ops::AgentId::new(TEST_AGENT_ID).unwrap()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running `felhom-hubsim`.
pub struct HubSim {
    child: Child,
    pub url: String,
    pub token: String,
    pub admin_token: String,
    pub ca_file: PathBuf,
    http: reqwest::Client,
}

impl HubSim {
    pub fn start() -> HubSim {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> HubSim {
        let mut child = Command::new(env!("CARGO_BIN_EXE_felhom-hubsim"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start felhom-hubsim");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("hubsim start line");
        let v: Value = serde_json::from_str(&line).expect("hubsim prints JSON");
        let ca_file = PathBuf::from(v["ca_file"].as_str().unwrap());
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(client_tls(&ca_file))
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        HubSim {
            child,
            url: v["url"].as_str().unwrap().to_owned(),
            token: v["token"].as_str().unwrap().to_owned(),
            admin_token: v["admin_token"].as_str().unwrap().to_owned(),
            ca_file,
            http,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    async fn sim(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.body(serde_json::to_vec(&b).unwrap());
        }
        let resp = req.send().await.expect("hubsim /_sim request");
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    }

    /// Every report request received so far, with `seq`, `outcome` and `report`.
    pub async fn reports(&self) -> Vec<Value> {
        self.sim(reqwest::Method::GET, "/_sim/reports", None).await["reports"]
            .as_array()
            .unwrap()
            .clone()
    }

    pub async fn accepted(&self) -> Vec<Value> {
        self.reports()
            .await
            .into_iter()
            .filter(|r| r["outcome"] == "accepted")
            .map(|r| r["report"].clone())
            .collect()
    }

    /// The envelope the hub answers accepted reports with (`GET /_sim/envelope`).
    pub async fn sim_envelope(&self) -> Value {
        self.sim(reqwest::Method::GET, "/_sim/envelope", None).await
    }

    pub async fn set_envelope(&self, envelope: Value) {
        self.sim(reqwest::Method::PUT, "/_sim/envelope", Some(envelope))
            .await;
    }

    pub async fn add_fault(&self, fault: Value) {
        self.sim(reqwest::Method::POST, "/_sim/faults", Some(fault))
            .await;
    }

    pub async fn clear_faults(&self) {
        self.sim(reqwest::Method::DELETE, "/_sim/faults", None)
            .await;
    }

    pub async fn set_token(&self, token: &str) {
        self.sim(
            reqwest::Method::PUT,
            "/_sim/token",
            Some(json!({ "token": token })),
        )
        .await;
    }

    pub async fn state(&self) -> Value {
        self.sim(reqwest::Method::GET, "/_sim/state", None).await
    }

    /// Polls `reports()` until `pred` holds or `timeout` passes.
    pub async fn wait_reports(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.reports().await;
            if pred(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting; reports so far: {}",
                summary(&r)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl HubSim {
    /// Polls `state()` until `pred` holds or `timeout` passes.
    pub async fn wait_state(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.state().await;
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting; state: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Polls the agent's log until it contains `needle` or `timeout` passes; returns the log.
pub async fn wait_log(agent: &Agent, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = agent.log_text();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needle:?} in the agent log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The hub's receipt times of `reports`.
pub fn received_times(reports: &[&Value]) -> Vec<time::OffsetDateTime> {
    reports
        .iter()
        .map(|r| {
            time::OffsetDateTime::parse(
                r["received_at"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        })
        .collect()
}

fn summary(reports: &[Value]) -> String {
    reports
        .iter()
        .map(|r| format!("#{} {}", r["seq"], r["outcome"]))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Drop for HubSim {
    fn drop(&mut self) {
        signal(self.child.id() as i32, Sig::Term);
        let _ = self.child.wait();
    }
}

pub fn client_tls(ca_file: &Path) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_file).unwrap();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg
}

#[derive(Debug, Clone, Copy)]
pub enum Sig {
    Term,
    Int,
    Hup,
}

impl From<Sig> for nix::sys::signal::Signal {
    fn from(sig: Sig) -> Self {
        match sig {
            Sig::Term => nix::sys::signal::Signal::SIGTERM,
            Sig::Int => nix::sys::signal::Signal::SIGINT,
            Sig::Hup => nix::sys::signal::Signal::SIGHUP,
        }
    }
}

pub fn signal(pid: i32, sig: Sig) {
    let sig: nix::sys::signal::Signal = sig.into();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// A port on loopback where nothing listens (connection refused).
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A temporary agent installation: config, state dir, token file, audit log directory.
pub struct AgentHome {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub token_file: PathBuf,
    pub audit_log: PathBuf,
}

impl AgentHome {
    /// Config for `hub`, Proxmox at `proxmox_url` (a dead port: Proxmox down), the test
    /// floor of 1 s, no SMART devices, cloudflared on a dead port.
    pub fn new(hub: &HubSim, proxmox_url: &str, proxmox_extra: Value) -> AgentHome {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).unwrap();
        let token_file = dir.path().join("hub-token");
        write_secret(&token_file, &hub.token);
        let audit_dir = dir.path().join("audit");
        std::fs::create_dir(&audit_dir).unwrap();
        let audit_log = audit_dir.join("privhelper-audit.jsonl");
        // a copy, so the config stays valid after the simulator (and its temp dir) is gone
        let hub_ca = dir.path().join("hub-ca.pem");
        std::fs::copy(&hub.ca_file, &hub_ca).unwrap();
        let hwmon = dir.path().join("hwmon");
        std::fs::create_dir(&hwmon).unwrap();
        let mut proxmox = json!({
            "url": proxmox_url,
            "token_id": "root@pam!felhom",
            "token_secret": "pve-secret-not-the-hub-token",
            "tls": { "insecure": true }
        });
        if let (Some(p), Some(extra)) = (proxmox.as_object_mut(), proxmox_extra.as_object()) {
            for (k, v) in extra {
                p.insert(k.clone(), v.clone());
            }
        }
        let config = dir.path().join("agent.json");
        let body = json!({
            "node": "pve1",
            "state_dir": state_dir,
            "proxmox": proxmox,
            "hub": {
                "url": hub.url,
                "token_file": token_file,
                "ca_file": hub_ca,
                "test_min_poll_interval_seconds": 1
            },
            "privhelper": {
                "audit_log": audit_log,
                "socket_dir": dir.path().join("run"),
                "timeout_seconds": 2
            },
            "sensors": { "hwmon_root": hwmon },
            "smart": { "devices": [] },
            "cloudflared": { "metrics_url": format!("http://127.0.0.1:{}", dead_port()) },
            "control": { "socket": dir.path().join("agent.sock") }
        });
        std::fs::write(&config, serde_json::to_vec_pretty(&body).unwrap()).unwrap();
        AgentHome {
            dir,
            config,
            state_dir,
            token_file,
            audit_log,
        }
    }

    /// Sets one config field by dotted path (`sensors.hwmon_root`).
    pub fn set(&self, path: &str, value: Value) {
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(&self.config).unwrap()).unwrap();
        let mut at = &mut cfg;
        let parts: Vec<&str> = path.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            at = &mut at[*p];
        }
        at[parts[parts.len() - 1]] = value;
        std::fs::write(&self.config, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    }

    pub fn start(&self) -> Agent {
        self.start_with_env(&[])
    }

    /// `felhom-agent run` with a clean environment plus `env`.
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Agent {
        let log = self
            .dir
            .path()
            .join(format!("agent-{}.log", fastrand::u32(..)));
        let child = Command::new(agent_bin())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env_clear()
            .env("FELHOM_AGENT_LOG", "debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start felhom-agent run");
        Agent { child, log }
    }
}

/// Runs `felhom-agent ARGS… --config <home>` to completion: (exit code, stdout, stderr).
pub fn agent_command(home: &AgentHome, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(agent_bin())
        .args(args)
        .arg("--config")
        .arg(&home.config)
        .env_clear()
        .output()
        .expect("run felhom-agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn write_secret(path: &Path, value: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(value.as_bytes()).unwrap();
}

/// A running `felhom-agent run`.
pub use felhom_testbed::harness::AgentProcess as Agent;

/// Writes audit lines the way felhom-privhelper does: `seq`, `prev` chain, `\n`, rotation
/// by rename.
pub struct HelperLog {
    pub path: PathBuf,
    pub seq: u64,
    prev: String,
}

impl HelperLog {
    pub fn new(path: &Path) -> HelperLog {
        HelperLog {
            path: path.to_path_buf(),
            seq: 0,
            prev: "0".repeat(64),
        }
    }

    pub fn append(&mut self, n: usize) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .unwrap();
        for _ in 0..n {
            self.seq += 1;
            let line = format!(
                r#"{{"seq":{},"prev":"{}","time":"2026-11-25T20:00:00Z","kind":"outcome","class":"smart","op":"smart_read","args":{{"device":"sda"}}}}"#,
                self.seq, self.prev
            );
            self.prev = hex::encode(Sha256::digest(line.as_bytes()));
            f.write_all(format!("{line}\n").as_bytes()).unwrap();
        }
    }

    pub fn rotate(&self, keep: u32) {
        let name = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
        let _ = std::fs::remove_file(name(keep));
        for n in (1..keep).rev() {
            if name(n).exists() {
                std::fs::rename(name(n), name(n + 1)).unwrap();
            }
        }
        std::fs::rename(&self.path, name(1)).unwrap();
    }
}

/// A validator for the published report schema, with `format` (date-time) asserted.
pub fn report_validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_slice(
        &std::fs::read(repo_root().join("docs/hub-report.schema.json")).expect("schema file"),
    )
    .unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles")
}

/// Validates `report` against the published schema; panics with every violation.
pub fn assert_valid_report(report: &Value) {
    let validator = report_validator();
    let errors: Vec<String> = validator
        .iter_errors(report)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "report does not match the schema:\n{}\n{report:#}",
        errors.join("\n")
    );
}

/// The audit `seq`s a report carried.
pub fn audit_seqs(report: &Value) -> Vec<u64> {
    report["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect()
}
