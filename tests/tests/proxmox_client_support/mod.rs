//! Shared by the `proxmox_client_*` and `cli_*` tests: `felhom-pvesim` through the test
//! bed's harness (docs/testbed.md), guest picking from `/_sim/state`, agent configs, and
//! running the `felhom-agent` binary as a separate process.

#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use felhom_agent::config::{ProxmoxConfig, Secret, TlsVerify};
use felhom_testbed::harness::{Fault, LoggedRequest, PveSim};
use serde_json::{Value, json};

/// A running simulator (killed on drop) with the helpers these tests need.
pub struct Sim {
    pub pve: PveSim,
}

impl std::ops::Deref for Sim {
    type Target = PveSim;
    fn deref(&self) -> &PveSim {
        &self.pve
    }
}

impl Sim {
    pub fn start(args: &[&str]) -> Sim {
        let pve = PveSim::spawn(env!("CARGO_BIN_EXE_felhom-pvesim"), args)
            .unwrap_or_else(|e| panic!("felhom-pvesim {args:?}: {e}"));
        Sim { pve }
    }

    pub fn pin(&self) -> [u8; 32] {
        let hex_digits: String = self
            .start
            .pin_sha256
            .chars()
            .filter(|c| *c != ':')
            .collect();
        let mut pin = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut pin).expect("pin is hex");
        pin
    }

    /// The full-privilege token with the given TLS mode.
    pub fn proxmox(&self, tls: TlsVerify) -> ProxmoxConfig {
        ProxmoxConfig {
            url: self.start.url.clone(),
            token_id: self.start.token_id.clone(),
            token_secret: Secret::new(self.start.token_secret.clone()),
            tls,
        }
    }

    pub fn pinned(&self) -> ProxmoxConfig {
        self.proxmox(TlsVerify::PinSha256(self.pin()))
    }

    pub async fn state_json(&self) -> Value {
        self.pve.state().await.expect("GET /_sim/state")
    }

    pub async fn log(&self) -> Vec<LoggedRequest> {
        self.pve.requests(0).await.expect("GET /_sim/requests")
    }

    pub async fn clear_log(&self) {
        self.pve
            .clear_requests()
            .await
            .expect("DELETE /_sim/requests");
    }

    pub async fn fault(&self, fault: Fault) {
        self.pve.add_fault(&fault).await.expect("POST /_sim/faults");
    }

    pub async fn put_guest(&self, vmid: u64, patch: Value) {
        self.pve
            .set_guest(vmid as u32, patch)
            .await
            .expect("PUT /_sim/guests");
    }

    /// Guests of the simulator's state matching `pred`.
    pub async fn guests_where(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.state_json().await["guests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|g| pred(g))
            .collect()
    }

    /// A guest the task selftest may exercise (not a template, not locked, not HA-managed,
    /// its disk on a storage with snapshots), in `status`: one already in that state, else
    /// one put into it through the control API.
    pub async fn plain_guest(&self, kind: &str, status: &str) -> u64 {
        let plain = |g: &Value| {
            let disk = g["config"]["rootfs"]
                .as_str()
                .or_else(|| g["config"]["scsi0"].as_str())
                .unwrap_or("");
            g["type"] == kind
                && g["template"] != json!(true)
                && g["lock"].is_null()
                && g["ha_managed"] != json!(true)
                && !disk.starts_with("local:")
        };
        let all = self.guests_where(plain).await;
        if let Some(g) = all.iter().find(|g| g["status"] == status) {
            return g["vmid"].as_u64().expect("vmid");
        }
        let g = all
            .first()
            .unwrap_or_else(|| panic!("no plain {kind} guest in the simulator"));
        let vmid = g["vmid"].as_u64().expect("vmid");
        self.put_guest(vmid, json!({"status": status})).await;
        vmid
    }

    /// Snapshot names of a guest in the simulator's state (not `current`).
    pub async fn snapshot_names(&self, vmid: u64) -> Vec<String> {
        let g = self.pve.guest(vmid as u32).await.expect("GET /_sim/guests");
        let mut names: Vec<String> = g["snapshots"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|s| {
                s["name"]
                    .as_str()
                    .or_else(|| s.as_str())
                    .map(str::to_string)
            })
            .filter(|n| n != "current")
            .collect();
        names.sort();
        names
    }

    /// Writes an agent config for this simulator into `dir` and returns its path. The
    /// token secret is NOT in the file; give it through the environment or a secret file.
    pub fn write_agent_config(&self, dir: &Path, tls: Value) -> PathBuf {
        let cfg = json!({
            "node": self.start.node,
            "state_dir": dir.join("state"),
            "proxmox": {
                "url": self.start.url,
                "token_id": self.start.token_id,
                "tls": tls,
            },
            // never the default /run/felhom/agent.sock: a daemon there would take the
            // mutating commands
            "control": { "socket": dir.join("agent.sock") },
        });
        std::fs::create_dir_all(dir.join("state")).expect("state dir");
        let p = dir.join("agent.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&cfg).expect("json")).expect("write config");
        p
    }
}

/// An `--acl` file for the simulator with one restricted token.
pub fn acl_file(dir: &Path, token_id: &str, secret: &str, acl: Value) -> PathBuf {
    let p = dir.join("acl.json");
    let body =
        json!({"tokens": [{"token_id": token_id, "secret": secret, "privsep": true, "acl": acl}]});
    std::fs::write(&p, serde_json::to_vec(&body).expect("json")).expect("write acl");
    p
}

/// The `felhom-agent` binary, built on demand (another package's binary is not in
/// `CARGO_BIN_EXE_*`) into the same target directory when missing or older than its
/// sources (`felhom_testbed::build`). `FELHOM_AGENT_BIN` overrides.
pub fn agent_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("FELHOM_AGENT_BIN") {
            return PathBuf::from(p);
        }
        felhom_testbed::build::bin_for_tests(felhom_testbed::build::AGENT)
    })
    .clone()
}

/// A finished `felhom-agent` run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs the agent with a clean environment plus `env`.
pub fn run_agent(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(agent_bin());
    cmd.args(args).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run felhom-agent");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
