//! Shared by the `ops_*` tests: a host as signed operations need it, over real processes.
//! `felhom-pvesim` is the node, `felhom-hubsim` the (untrusted) hub, and `felhom-agent run`
//! runs as uid 65534 (the owner of its state dir, as `felhom-agent` on a host) with a
//! root-owned `signers.json` written by the test bed's envelope factory.
//!
//! Needs root (a root-owned signers file while the agent runs as another uid); the tests
//! say so and skip otherwise.
#![allow(dead_code)] // each test file uses a different part

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use felhom_testbed::harness::{AgentProcess, LoggedRequest};
use felhom_testbed::hubsim::control::OpsControl;
use felhom_testbed::signing::{Envelope, Payload, SignersFile, TestKey};
use serde_json::{Value, json};

use crate::hub_support::{HubSim, client_tls, dead_port};
use crate::proxmox_client_support::{Sim, agent_bin};

/// The uid the agent runs as (owner of its state dir).
pub const AGENT_UID: u32 = 65534;
/// This host's agent_id (set in the config).
pub const AGENT_ID: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skips the calling test (with a loud line) unless it runs as root.
#[macro_export]
macro_rules! needs_root {
    () => {
        if !$crate::ops_support::is_root() {
            eprintln!(
                "skipped: needs root (a root-owned signers file while the agent runs as uid 65534)"
            );
            return;
        }
    };
}

/// The operator keys of these tests: alice and bob trusted, mallory not.
pub struct Keys {
    pub alice: TestKey,
    pub bob: TestKey,
    pub mallory: TestKey,
}

impl Keys {
    pub fn new() -> Keys {
        Keys {
            alice: TestKey::seeded("alice", 1),
            bob: TestKey::seeded("bob", 2),
            mallory: TestKey::seeded("mallory", 3),
        }
    }
    /// alice and bob, thresholds 1 (reversible) and 2 (irreversible).
    pub fn signers(&self) -> SignersFile {
        SignersFile::new(&[&self.alice, &self.bob]).threshold(1, 2)
    }
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new()
    }
}

/// pvesim + hubsim + an agent installation (not started).
pub struct Stack {
    pub pve: Sim,
    pub hub: HubSim,
    pub ops: OpsControl,
    pub keys: Keys,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub signers: PathBuf,
    pub desired: PathBuf,
    pub socket: PathBuf,
}

fn give_to_agent(path: &Path) {
    std::os::unix::fs::chown(path, Some(AGENT_UID), Some(AGENT_UID)).expect("chown to the agent");
}

fn write_agent_secret(path: &Path, value: &str) {
    std::fs::write(path, value).expect("write a secret");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    give_to_agent(path);
}

impl Stack {
    /// Everything started but the agent. `extra` is merged into the agent's config.
    pub fn new(extra: Value) -> Stack {
        let pve = Sim::start(&[]);
        let hub = HubSim::start();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(client_tls(&hub.ca_file))
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("hubsim control client");
        let ops = OpsControl::new(http, &hub.url, &hub.admin_token);
        let dir = tempfile::tempdir().expect("tempdir");
        // the agent (uid 65534) must reach its files below the temp dir
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).expect("state dir");
        give_to_agent(&state_dir);
        let run = dir.path().join("run");
        std::fs::create_dir(&run).expect("run dir");
        give_to_agent(&run);
        let pve_secret = dir.path().join("pve-token");
        write_agent_secret(&pve_secret, pve.token_secret());
        let hub_token = dir.path().join("hub-token");
        write_agent_secret(&hub_token, &hub.token);
        let hub_ca = dir.path().join("hub-ca.pem");
        std::fs::copy(&hub.ca_file, &hub_ca).expect("copy the hub CA");
        std::fs::set_permissions(&hub_ca, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let hwmon = dir.path().join("hwmon");
        std::fs::create_dir(&hwmon).expect("hwmon dir");
        let signers = dir.path().join("signers.json");
        let desired = dir.path().join("desired.json");
        let socket = run.join("agent.sock");
        let mut cfg = json!({
            "node": pve.node(),
            "agent_id": AGENT_ID,
            "state_dir": state_dir,
            "proxmox": {
                "url": pve.url(),
                "token_id": pve.token_id(),
                "token_secret_file": pve_secret,
                "tls": { "pin_sha256": pve.pin_sha256() }
            },
            "hub": {
                "url": hub.url,
                "token_file": hub_token,
                "ca_file": hub_ca,
                "test_min_poll_interval_seconds": 1
            },
            "authz": { "signers_file": signers },
            "gate": { "backup_storage": "nas-backup" },
            "privhelper": {
                "socket_dir": run.join("privhelper"),
                "audit_log": dir.path().join("audit.jsonl"),
                "timeout_seconds": 5
            },
            "sensors": { "hwmon_root": hwmon },
            "smart": { "devices": [] },
            "cloudflared": { "metrics_url": format!("http://127.0.0.1:{}", dead_port()) },
            "reconcile": { "shutdown_timeout_seconds": 10 },
            "control": { "socket": socket }
        });
        merge(&mut cfg, &extra);
        let config = dir.path().join("agent.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&cfg).expect("json")).expect("config");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let keys = Keys::new();
        keys.signers().write(&signers).expect("signers.json");
        Stack {
            pve,
            hub,
            ops,
            keys,
            dir,
            config,
            state_dir,
            signers,
            desired,
            socket,
        }
    }

    /// Replaces signers.json (root-owned 0644); the agent reads it at start and SIGHUP.
    pub fn write_signers(&self, s: &SignersFile) {
        s.write(&self.signers).expect("signers.json");
    }

    /// Writes the desired-state file (`reconcile.desired_file` must name it).
    pub fn write_desired(&self, v: &Value) {
        std::fs::write(&self.desired, serde_json::to_vec(v).expect("json")).expect("desired");
        std::fs::set_permissions(&self.desired, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }

    /// `felhom-agent run` as [`AGENT_UID`], log in the temp dir.
    pub fn start_agent(&self) -> AgentProcess {
        self.start_agent_with(&[], None)
    }

    /// As [`Self::start_agent`], with extra environment, optionally under `faketime`
    /// (`offset` like `-2h`: the agent's wall clock set back; its monotonic clock real).
    pub fn start_agent_with(&self, env: &[(&str, &str)], faketime: Option<&str>) -> AgentProcess {
        let log = self
            .dir
            .path()
            .join(format!("agent-{}.log", fastrand::u32(..)));
        let mut cmd = match faketime {
            Some(offset) => {
                let mut c = Command::new("faketime");
                c.arg("-f").arg(offset).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env_clear()
            .env("FELHOM_AGENT_LOG", "info,felhom_agent=debug")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .envs(env.iter().copied())
            .uid(AGENT_UID)
            .gid(AGENT_UID)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"));
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        let child = cmd.spawn().expect("start felhom-agent run");
        AgentProcess { child, log }
    }

    /// Runs a `felhom-agent` command as [`AGENT_UID`]: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(agent_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_clear()
            .uid(AGENT_UID)
            .gid(AGENT_UID)
            .output()
            .expect("run felhom-agent");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// An operation payload for this host (agent_id, node), valid for an hour.
    pub fn op(&self, kind: &str) -> Payload {
        Payload::op(AGENT_ID, self.pve.node(), kind).valid_for(3600)
    }

    /// A guest operation on `vmid` of `guest_type`.
    pub fn guest_op(&self, kind: &str, guest_type: &str, vmid: u32) -> Payload {
        self.op(kind).target(guest_type, vmid)
    }

    /// Signed by alice.
    pub fn signed(&self, p: &Payload) -> Envelope {
        p.sign(&[&self.keys.alice])
    }

    /// Enqueues the envelope's exact text at the hub; returns the delivery id.
    pub async fn deliver(&self, env: &Envelope) -> String {
        self.ops
            .enqueue_text(&env.text())
            .await
            .expect("enqueue at hubsim")
    }

    /// Waits until the hub holds a result satisfying `pred`; returns it.
    pub async fn wait_result(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let list = self.ops.result_list(0).await.expect("hubsim results");
            if let Some(r) = list.iter().find(|r| pred(&r["result"])) {
                return r["result"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for a result; the hub has:\n{}",
                serde_json::to_string_pretty(&list).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every result the hub holds about `op_id`, in arrival order.
    pub async fn results_for(&self, op_id: &str) -> Vec<Value> {
        self.ops
            .result_list(0)
            .await
            .expect("hubsim results")
            .into_iter()
            .map(|r| r["result"].clone())
            .filter(|r| r["op_id"].as_str() == Some(op_id))
            .collect()
    }

    /// The final decision about `op_id` (waits for it).
    pub async fn final_result(&self, op_id: &str, timeout: Duration) -> Value {
        let id = op_id.to_string();
        self.wait_result(timeout, move |r| {
            r["op_id"].as_str() == Some(id.as_str()) && r["state"].as_str() != Some("held")
        })
        .await
    }

    /// Mutating requests pvesim received (method not GET), in order.
    pub async fn mutations(&self) -> Vec<LoggedRequest> {
        self.pve
            .log()
            .await
            .into_iter()
            .filter(|r| r.method != "GET")
            .collect()
    }
}

/// A payload's `op_id` (its JSON text unquoted).
pub fn op_id_of(p: &Payload) -> String {
    let text = p.get("op_id").expect("payload has an op_id");
    serde_json::from_str::<String>(text).expect("op_id is a JSON string")
}

fn merge(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e.clone(),
    }
}

// Helpers of the hostile-envelope tests (`ops_hostile.rs`).
impl Stack {
    /// Merges `extra` into the agent's config file (read at start and on SIGHUP).
    pub fn patch_config(&self, extra: &Value) {
        let mut cfg: Value =
            serde_json::from_slice(&std::fs::read(&self.config).expect("read the config"))
                .expect("config is JSON");
        merge(&mut cfg, extra);
        std::fs::write(&self.config, serde_json::to_vec_pretty(&cfg).expect("json"))
            .expect("write the config");
    }

    /// Enqueues raw text at the hub (served verbatim when it is JSON, else as a JSON
    /// string); returns the delivery id.
    pub async fn deliver_text(&self, text: &str) -> String {
        self.ops
            .enqueue_text(text)
            .await
            .expect("enqueue at hubsim")
    }

    /// Enqueues an earlier delivery's exact envelope again (hubsim's `replay`); returns
    /// the new delivery id.
    pub async fn replay(&self, delivery_id: &str) -> String {
        let v = self
            .ops
            .misbehave(json!({"action": "replay", "delivery_id": delivery_id}))
            .await
            .expect("hubsim replay");
        v["delivery_id"].as_str().expect("delivery id").to_string()
    }

    /// Waits for the first result naming `delivery_id`.
    pub async fn result_for_delivery(&self, delivery_id: &str, timeout: Duration) -> Value {
        let d = delivery_id.to_string();
        self.wait_result(timeout, move |r| {
            r["delivery_id"].as_str() == Some(d.as_str())
        })
        .await
    }

    /// Waits until the hub accepted `n` more reports than `since` (the agent has then
    /// acted on at least `n - 1` control envelopes sent after that point).
    pub async fn wait_accepted_reports(&self, since: usize, n: usize, timeout: Duration) {
        self.hub
            .wait_reports(timeout, |r| {
                r.iter().filter(|x| x["outcome"] == "accepted").count() >= since + n
            })
            .await;
    }

    /// How many reports the hub accepted so far.
    pub async fn accepted_reports(&self) -> usize {
        self.hub.accepted().await.len()
    }
}

/// Waits until the agent's log has `needle` at least `count` times; returns the log.
pub async fn wait_log_count(
    agent: &AgentProcess,
    needle: &str,
    count: usize,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = agent.log_text();
        if log.matches(needle).count() >= count {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {count} × {needle:?} in the agent log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
