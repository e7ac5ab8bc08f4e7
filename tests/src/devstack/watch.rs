//! What the devstack watches while the stack runs, each as a small polling task that
//! turns what it sees into [`Event`]s: the reports the hub received (`felhom-hubsim`'s
//! `/_sim/reports`), the mutating requests the simulated node received (`felhom-pvesim`'s
//! `/_sim/requests`), the helper's audit log as it grows, the agent's journal (its
//! control socket, `journal_show`), and the agent's warnings and errors in its log.
//!
//! Every watcher only reads: it never changes a component's state. A watcher that cannot
//! read (the agent not up yet, a simulator between answers) says nothing and tries again.
//!
//! Must never: follow a file it did not open by path (the audit log is read from the
//! offset it reached; a file that shrank was rotated and is read from its start).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc::UnboundedSender;

use super::narrate;

/// Something to tell, from a watcher.
#[derive(Debug)]
pub enum Event {
    /// A line of narrative.
    Line { who: &'static str, text: String },
    /// A report the hub received (`accepted` counts towards `--cycles`; `applied`: its
    /// reconcile section says the desired generation is applied).
    Report {
        seq: u64,
        accepted: bool,
        applied: bool,
        lines: Vec<String>,
    },
    /// An action of the agent's journal finished (applied or failed).
    Finished { ok: bool },
    /// The signed operations were shown ([`super::signed`]); `error` when one did not end
    /// as it must.
    SignedDone { error: Option<String> },
    /// The restore test was shown ([`super::restore`]); `error` when it did not pass as
    /// it must.
    RestoreDone { error: Option<String> },
}

fn line(who: &'static str, text: String) -> Event {
    Event::Line { who, text }
}

/// How many polling rounds a watcher has finished. The devstack waits on these before it
/// stops: two more rounds than now means one began after now, so whatever happened
/// before now has been told, however slowly the machine runs.
#[derive(Debug, Clone, Default)]
pub struct Rounds(Arc<AtomicU64>);

impl Rounds {
    fn done(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A `/_sim/` client for one simulator.
#[derive(Debug, Clone)]
pub struct SimApi {
    pub client: reqwest::Client,
    pub url: String,
    pub admin_token: String,
}

impl SimApi {
    pub async fn get(&self, path: &str) -> Option<Value> {
        let resp = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        serde_json::from_slice(&resp.bytes().await.ok()?).ok()
    }
}

/// Polls the hub's received reports; appends each to `keep` (one JSON line each).
pub async fn hub_reports(hub: SimApi, keep: PathBuf, tx: UnboundedSender<Event>, rounds: Rounds) {
    let mut since = 0u64;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&keep)
        .ok();
    loop {
        if let Some(v) = hub.get(&format!("/_sim/reports?since={since}")).await {
            for r in v["reports"].as_array().into_iter().flatten() {
                let Some(seq) = r["seq"].as_u64() else {
                    continue;
                };
                since = since.max(seq);
                if let Some(f) = file.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{r}");
                }
                let outcome = r["outcome"].as_str().unwrap_or("?");
                let reconcile = &r["report"]["reconcile"];
                let _ = tx.send(Event::Report {
                    seq,
                    accepted: outcome == "accepted",
                    applied: reconcile["applied_generation"].is_u64()
                        && reconcile["applied_generation"] == reconcile["desired_generation"],
                    lines: narrate::report_lines(seq, outcome, &r["report"]),
                });
            }
        }
        rounds.done();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls the simulated node's request log for what changes guests (everything but GET).
pub async fn pve_requests(pve: SimApi, tx: UnboundedSender<Event>, rounds: Rounds) {
    let mut since = 0u64;
    let mut told: HashSet<u64> = HashSet::new();
    loop {
        if let Some(v) = pve.get(&format!("/_sim/requests?since={since}")).await {
            let mut pending_min: Option<u64> = None;
            let mut last = since;
            for r in v["requests"].as_array().into_iter().flatten() {
                let Some(seq) = r["seq"].as_u64() else {
                    continue;
                };
                last = last.max(seq);
                let method = r["method"].as_str().unwrap_or("?");
                if method == "GET" || told.contains(&seq) {
                    continue;
                }
                let Some(status) = r["status"].as_u64() else {
                    // still in flight: look again from here next time
                    pending_min = Some(pending_min.map_or(seq, |m| m.min(seq)));
                    continue;
                };
                told.insert(seq);
                let path = r["path"].as_str().unwrap_or("?");
                let path = path.strip_prefix("/api2/json").unwrap_or(path);
                let params: Vec<String> = r["params"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter(|(k, _)| *k != "digest")
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = tx.send(line(
                    "pve",
                    format!(
                        "← {method} {path}{} → {status}",
                        if params.is_empty() {
                            String::new()
                        } else {
                            format!(" {}", params.join(" "))
                        }
                    ),
                ));
            }
            since = match pending_min {
                Some(m) => m.saturating_sub(1),
                None => last,
            };
        }
        rounds.done();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// New complete lines of `path` since `offset` (moved past them). A file shorter than
/// `offset` was rotated: read from its start.
pub fn read_new_lines(path: &Path, offset: &mut u64) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < *offset {
        *offset = 0;
    }
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.take(len - *offset).read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
        return Vec::new();
    };
    *offset += end as u64 + 1;
    String::from_utf8_lossy(&buf[..end])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Follows the helper's audit log.
pub async fn audit_log(path: PathBuf, tx: UnboundedSender<Event>, rounds: Rounds) {
    let mut offset = 0u64;
    loop {
        let mut records = Vec::new();
        for l in read_new_lines(&path, &mut offset) {
            match serde_json::from_str::<Value>(&l) {
                Ok(v) => records.push(v),
                Err(e) => {
                    let _ = tx.send(line("audit", format!("a line that is not JSON ({e})")));
                }
            }
        }
        for text in narrate::audit_lines(&records) {
            let _ = tx.send(line("audit", text));
        }
        rounds.done();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Follows the reconcile engine's queue through the agent's control socket (`status`):
/// tells each action once, when it is first seen waiting in its guest's lane.
pub async fn queue(socket: PathBuf, tx: UnboundedSender<Event>, rounds: Rounds) {
    let mut told: HashSet<(u64, String)> = HashSet::new();
    loop {
        if let Some(body) = control(&socket, json!({"cmd": "status"})).await {
            let rec = &body["reconcile"];
            let mut fresh = Vec::new();
            for (list, state) in [(&rec["queued"], "queued"), (&rec["running"], "running")] {
                for a in list.as_array().into_iter().flatten() {
                    let key = (
                        a["vmid"].as_u64().unwrap_or(0),
                        a["action"].as_str().unwrap_or("?").to_string(),
                    );
                    if told.insert(key.clone()) && state == "queued" {
                        fresh.push(format!("{} {}", key.1, key.0));
                    }
                }
            }
            if !fresh.is_empty() {
                let _ = tx.send(line(
                    "reconcile",
                    format!(
                        "queued (waiting for a worker or for their guest's running action): {}",
                        fresh.join(", ")
                    ),
                ));
            }
        }
        rounds.done();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Follows the agent's log for warnings, errors and the reconcile engine's milestones.
pub async fn agent_log(path: PathBuf, tx: UnboundedSender<Event>, rounds: Rounds) {
    let mut offset = 0u64;
    loop {
        for l in read_new_lines(&path, &mut offset) {
            if let Some(text) = agent_log_line(&l) {
                let _ = tx.send(line("agent", text));
            }
        }
        rounds.done();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The part of an agent log line worth showing, if any: `WARN …`/`ERROR …` (without the
/// timestamp and module), and the engine's "desired state applied".
pub fn agent_log_line(l: &str) -> Option<String> {
    let level = ["ERROR", "WARN", "INFO"]
        .into_iter()
        .find(|lv| l.contains(&format!(" {lv} ")))?;
    let rest = l.split_once(&format!(" {level} "))?.1;
    // drop the module path (`felhom_agent::hub::service: `) when the log has one
    let msg = match rest.split_once(": ") {
        Some((module, m)) if module.starts_with("felhom_agent") && !module.contains(' ') => m,
        _ => rest,
    };
    match level {
        "INFO" if msg.contains("desired state applied") => Some(msg.to_string()),
        "INFO" => None,
        _ => Some(format!("{level} {msg}")),
    }
}

/// One request over the agent's control socket (one JSON line each way); the reply's
/// `body` when it is `ok`.
async fn control(socket: &Path, request: Value) -> Option<Value> {
    let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    let (r, mut w) = stream.into_split();
    let mut req = serde_json::to_vec(&request).ok()?;
    req.push(b'\n');
    w.write_all(&req).await.ok()?;
    let mut reply = String::new();
    let mut reader = BufReader::new(r).take(8 * 1024 * 1024);
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut reply))
        .await
        .ok()?
        .ok()?;
    let v: Value = serde_json::from_str(&reply).ok()?;
    (v["result"] == "ok").then(|| v["body"].clone())
}

/// Follows the agent's journal through its control socket: an action is told when its
/// intent is recorded and again when it finished.
pub async fn journal(socket: PathBuf, tx: UnboundedSender<Event>, rounds: Rounds) {
    // entry id → whether its outcome was told
    let mut told: HashMap<i64, bool> = HashMap::new();
    loop {
        if let Some(body) = control(&socket, json!({"cmd": "journal_show", "limit": 500})).await {
            let mut entries: Vec<&Value> =
                body["entries"].as_array().into_iter().flatten().collect();
            entries.sort_by_key(|e| e["id"].as_i64().unwrap_or(0));
            for e in entries {
                let Some(id) = e["id"].as_i64() else { continue };
                let (text, finished) = narrate::journal_line(e);
                let seen = told.get(&id).copied();
                if seen == Some(true) || (seen == Some(false) && !finished) {
                    continue;
                }
                told.insert(id, finished);
                let _ = tx.send(line("reconcile", text));
                if finished {
                    let ok = e["outcome"]["result"] != "failed";
                    let _ = tx.send(Event::Finished { ok });
                }
            }
        }
        rounds.done();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_lines_only_complete_ones_and_rotation_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let mut off = 0;
        assert!(read_new_lines(&p, &mut off).is_empty());
        std::fs::write(&p, "a\nb\npart").unwrap();
        assert_eq!(read_new_lines(&p, &mut off), ["a", "b"]);
        assert_eq!(off, 4);
        std::fs::write(&p, "a\nb\npartial\nc\n").unwrap();
        assert_eq!(read_new_lines(&p, &mut off), ["partial", "c"]);
        std::fs::write(&p, "new\n").unwrap();
        assert_eq!(read_new_lines(&p, &mut off), ["new"]);
    }

    #[test]
    fn agent_log_lines_worth_showing() {
        assert_eq!(
            agent_log_line(
                "2026-11-25T21:00:00.000000Z  WARN felhom_agent::hub::service: cloudflared unreachable kind=unreachable"
            ),
            Some("WARN cloudflared unreachable kind=unreachable".to_string())
        );
        assert_eq!(
            agent_log_line(
                "2026-11-25T21:00:00.000000Z  INFO felhom_agent::reconcile::engine: desired state applied generation=1"
            ),
            Some("desired state applied generation=1".to_string())
        );
        assert_eq!(
            agent_log_line("2026-11-25T21:00:00.000000Z  INFO felhom_agent: report sent"),
            None
        );
        assert_eq!(agent_log_line("garbage"), None);
    }
}
