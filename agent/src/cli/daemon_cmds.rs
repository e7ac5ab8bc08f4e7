//! `felhom-agent status | plan | journal show|verify | ops list|show|undo|release |
//! restore-test`: asked of the running daemon over the control socket; when no daemon runs,
//! done here (the journal commands take the `state_dir` lock first, as its owner), except
//! `ops undo` and `ops release`, which change a guest only through the daemon's queue.

use std::sync::Arc;

use serde_json::{Value, json};

use super::{Cli, CliError, JournalCmd};
use crate::config::Config;
use crate::control::{self, ControlError, ErrorKind, Request, StateLock};
use crate::reconcile::desired::{DesiredProvider, EmptyProvider, FileProvider};
use crate::reconcile::engine::plan_now;
use crate::reconcile::journal::Journal;

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Problem(format!("tokio runtime: {e}")))
}

impl From<ControlError> for CliError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Remote {
                kind: ErrorKind::Usage,
                message,
            } => CliError::Usage(message),
            ControlError::Remote {
                kind: ErrorKind::Unreachable,
                message,
            } => CliError::Unreachable(message),
            ControlError::Locked { .. } => CliError::Problem(e.to_string()),
            other => CliError::Problem(other.to_string()),
        }
    }
}

/// Asks the daemon; `Ok(None)` when none is listening.
fn ask_daemon(config: &Config, req: &Request) -> Result<Option<Value>, CliError> {
    let rt = runtime()?;
    match rt.block_on(control::request(&config.control.socket, req)) {
        Ok(v) => Ok(Some(v)),
        Err(ControlError::NotRunning { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn print(cli: &Cli, v: &Value, human: impl FnOnce(&Value) -> String) {
    if cli.json {
        super::print_json(v);
    } else {
        print!("{}", human(v));
    }
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

pub fn status(cli: &Cli) -> Result<(), CliError> {
    let config = super::load_config(cli)?;
    let v = match ask_daemon(&config, &Request::Status)? {
        Some(v) => v,
        None => {
            // No daemon: what can be told without owning state_dir.
            let journal = config
                .state_dir
                .join(crate::reconcile::journal::JOURNAL_FILE);
            json!({
                "daemon": "not running",
                "journal": journal.display().to_string(),
                "journal_exists": journal.exists(),
                "last_envelope": control::read_envelope(&config.state_dir),
            })
        }
    };
    // A running daemon tells its own identity and trust (as loaded at start or the last
    // SIGHUP); without one, both are read here as the daemon would load them.
    let mut v = v;
    if v.get("ops").is_none() {
        let (id, ops) = super::ops_cmd::identity_and_ops(&config);
        if let (Some(obj), Some(id)) = (v.as_object_mut(), id.as_object()) {
            for (k, val) in id {
                obj.insert(k.clone(), val.clone());
            }
            obj.insert("ops".into(), ops);
        }
    }
    add_undo_warnings(&config, &mut v);
    print(cli, &v, render_status);
    Ok(())
}

/// `ops.undo_points_kept` and `ops.undo_warnings` from the kept undo points the daemon
/// listed: the same per-storage sum the report carries, with the storages' totals read
/// from Proxmox now (only when undo backups are kept). Without a daemon nothing is added:
/// `status` does not take the `state_dir` lock (`ops list` does).
fn add_undo_warnings(config: &Config, v: &mut Value) {
    let Some(points) = v["ops"].get("undo_points").cloned() else {
        return;
    };
    let mut points: Vec<crate::ops::wire::UndoPointReport> = match serde_json::from_value(points) {
        Ok(p) => p,
        Err(e) => {
            v["ops"]["undo_points_error"] = format!("undo points: {e}").into();
            return;
        }
    };
    v["ops"]["undo_points_kept"] = points.len().into();
    let warned = runtime().and_then(|rt| {
        let client = crate::proxmox::Client::from_config(config)
            .map_err(|e| CliError::Usage(format!("proxmox: {e}")))?;
        rt.block_on(crate::ops::undo_view::warnings_from_node(
            &client,
            &mut points,
            config.gate.undo_warn_fraction,
        ))
        .map_err(|e| CliError::Unreachable(e.to_string()))
    });
    match warned {
        Ok(w) => {
            v["ops"]["undo_warnings"] = w
                .iter()
                .map(|w| json!({"storage": w.storage, "message": w.message()}))
                .collect();
        }
        Err(e) => {
            v["ops"]["undo_warnings"] = json!([]);
            v["ops"]["undo_warnings_error"] =
                format!("cannot read the storages' sizes: {e}").into();
        }
    }
    v["ops"]["undo_points"] = serde_json::to_value(&points).unwrap_or_default();
}

fn render_status(v: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "daemon: {}\n",
        v["daemon"].as_str().unwrap_or("?")
    ));
    out.push_str(&super::ops_cmd::render_identity_and_ops(v, &v["ops"]));
    out.push_str(&render_undo_status(&v["ops"]));
    if let Some(r) = v.get("reconcile") {
        out.push_str(&format!("gate: {}  blocked: {}\n", r["gate"], r["blocked"]));
        out.push_str(&format!(
            "safe mode: {}\n",
            r["safe_mode"].as_str().unwrap_or("no")
        ));
        out.push_str(&format!(
            "desired: {} generation {} (applied {})\n",
            r["desired_source"].as_str().unwrap_or("?"),
            r["desired_generation"],
            r["applied_generation"]
        ));
        if let Some(e) = r["desired_error"].as_str() {
            out.push_str(&format!("desired state error: {e}\n"));
        }
        out.push_str(&format!(
            "queue: {} queued, {} running\n",
            r["queue"]["queued"], r["queue"]["running"]
        ));
        for (what, list) in [("running", &r["running"]), ("queued", &r["queued"])] {
            for a in list.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{what}: {} {}{}\n",
                    a["action"].as_str().unwrap_or("?"),
                    a["vmid"],
                    a["op_id"]
                        .as_str()
                        .map(|k| format!(" (journal key {})", &k[..k.len().min(16)]))
                        .unwrap_or_default()
                ));
            }
        }
        for f in r["failing"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "failing: {} {} ({} attempts): {}\n",
                f["action"].as_str().unwrap_or("?"),
                f["vmid"],
                f["attempts"],
                f["last_error"].as_str().unwrap_or("")
            ));
        }
        for s in r["skipped"].as_array().into_iter().flatten() {
            out.push_str(&format!("skipped: {} {}\n", s["vmid"], s["reason"]));
        }
    }
    if let Some(rt) = v.get("restore_tests") {
        if let Some(e) = rt["error"].as_str() {
            out.push_str(&format!("restore tests: cannot read the journal: {e}\n"));
        }
        for n in rt["not_destroyed"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "restore tests BLOCKED: scratch guest {} (test #{} of guest {}) cannot be destroyed since {}: {}\n",
                n["scratch_vmid"],
                n["test"],
                n["vmid"],
                n["since"].as_str().unwrap_or("?"),
                n["last_error"].as_str().unwrap_or("?")
            ));
        }
    }
    out.push_str(&format!("last envelope: {}\n", v["last_envelope"]));
    out
}

/// `status`'s undo-point lines: how many are kept, and each warning.
fn render_undo_status(ops: &Value) -> String {
    let mut out = String::new();
    if let Some(n) = ops["undo_points_kept"].as_u64() {
        out.push_str(&format!(
            "  undo points kept: {n}{}\n",
            if n > 0 {
                " (felhom-agent ops list)"
            } else {
                ""
            }
        ));
    }
    for key in ["undo_points_error", "undo_warnings_error"] {
        if let Some(e) = ops[key].as_str() {
            out.push_str(&format!("  undo points: {e}\n"));
        }
    }
    for w in ops["undo_warnings"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  warning: {}\n",
            w["message"].as_str().unwrap_or("?")
        ));
    }
    out
}

pub fn plan(cli: &Cli) -> Result<(), CliError> {
    let config = super::load_config(cli)?;
    let v = match ask_daemon(&config, &Request::Plan)? {
        Some(v) => v,
        None => {
            // Planning only reads: no lock needed.
            let provider: Box<dyn DesiredProvider> = match &config.reconcile.desired_file {
                Some(p) => Box::new(FileProvider::new(p)),
                None => Box::new(EmptyProvider::default()),
            };
            let desired = match provider.poll() {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(CliError::Usage(e.to_string())),
                None => Arc::default(),
            };
            let client = crate::proxmox::Client::from_config(&config)?;
            let p = runtime()?
                .block_on(plan_now(&client, &desired))
                .map_err(|e| CliError::Unreachable(e.to_string()))?;
            serde_json::to_value(p).map_err(|e| CliError::Problem(e.to_string()))?
        }
    };
    print(cli, &v, render_plan);
    Ok(())
}

fn render_plan(v: &Value) -> String {
    let mut out = format!("desired generation {}\n", v["generation"]);
    let actions = v["actions"].as_array().cloned().unwrap_or_default();
    if actions.is_empty() {
        out.push_str("nothing to do\n");
    }
    for a in actions {
        let op = a["op"]["op"].as_str().unwrap_or("?");
        let fields = a["op"]["fields"]
            .as_array()
            .map(|f| {
                let names: Vec<&str> = f.iter().filter_map(Value::as_str).collect();
                format!(" ({})", names.join(", "))
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{op} {} {}{fields}\n",
            a["kind"].as_str().unwrap_or("?"),
            a["vmid"]
        ));
    }
    for s in v["skipped"].as_array().into_iter().flatten() {
        out.push_str(&format!("skipped {}: {}\n", s["vmid"], s["reason"]));
    }
    for p in v["problems"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "problem {}: {}\n",
            p["vmid"],
            p["message"].as_str().unwrap_or("")
        ));
    }
    out.push_str(&format!(
        "only in desired state: {}\nonly on the node: {}\n",
        v["only_desired"], v["only_actual"]
    ));
    out
}

/// Opens the journal as its owner, with the state_dir lock held.
fn local_journal(config: &Config, command: &str) -> Result<(StateLock, Journal), CliError> {
    crate::config::ensure_state_dir_owner(&config.state_dir, command)?;
    let lock = StateLock::acquire(&config.state_dir)?;
    let journal = Journal::open(&config.state_dir).map_err(|e| CliError::Problem(e.to_string()))?;
    Ok((lock, journal))
}

pub fn journal(cli: &Cli, cmd: &JournalCmd) -> Result<(), CliError> {
    let config = super::load_config(cli)?;
    match cmd {
        JournalCmd::Show => {
            let req = Request::JournalShow { limit: 50 };
            let v = match ask_daemon(&config, &req)? {
                Some(v) => v,
                None => {
                    let (_lock, j) = local_journal(&config, "journal show")?;
                    let entries = j.recent(50).map_err(|e| CliError::Problem(e.to_string()))?;
                    json!({"safe_mode": j.safe_mode(), "entries": entries})
                }
            };
            print(cli, &v, pretty);
            Ok(())
        }
        JournalCmd::Verify => {
            let v = match ask_daemon(&config, &Request::JournalVerify)? {
                Some(v) => v,
                None => {
                    let (_lock, j) = local_journal(&config, "journal verify")?;
                    let report = j.verify().map_err(|e| {
                        CliError::Problem(format!(
                            "{e}; the journal stays in safe mode (see README: Journal safe mode)"
                        ))
                    })?;
                    serde_json::to_value(report).map_err(|e| CliError::Problem(e.to_string()))?
                }
            };
            print(cli, &v, |v| {
                format!(
                    "journal healthy: {} entries, {} unfinished{}\n",
                    v["entries"],
                    v["open_entries"],
                    v["left_safe_mode"]
                        .as_str()
                        .map(|s| format!("; left safe mode ({s})"))
                        .unwrap_or_default()
                )
            });
            Ok(())
        }
    }
}

/// `ops list`: from the daemon, or from the journal when no daemon runs.
pub fn ops_list(cli: &Cli, limit: u32) -> Result<(), CliError> {
    let config = super::load_config(cli)?;
    let v = match ask_daemon(&config, &Request::OpsList { limit })? {
        Some(v) => v,
        None => {
            let (_lock, j) = local_journal(&config, "ops list")?;
            let mut v = crate::ops::service::list_json(&j, limit.clamp(1, 10_000) as usize)
                .map_err(|e| CliError::Problem(e.to_string()))?;
            v["undo_points"] = crate::ops::undo_view::list_json(&j, now_ms())
                .map_err(|e| CliError::Problem(e.to_string()))?;
            v
        }
    };
    print(cli, &v, render_ops_list);
    Ok(())
}

fn render_ops_list(v: &Value) -> String {
    let ops = v["ops"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    if ops.is_empty() {
        out.push_str("no signed operations\n");
    }
    for o in ops {
        let target = match o["vmid"].as_u64() {
            Some(n) => n.to_string(),
            None => "host".into(),
        };
        let why = o["reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .or_else(|| o["message"].as_str().map(|m| format!(" ({m})")))
            .unwrap_or_default();
        out.push_str(&format!(
            "{}  {:<16} {:<8} {}{}  signed by {}\n",
            o["op_id"].as_str().unwrap_or("?"),
            o["kind"].as_str().unwrap_or("?"),
            target,
            o["state"].as_str().unwrap_or("?"),
            why,
            o["signers"]
                .as_array()
                .map(|s| s
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
        ));
    }
    out.push_str(&format!(
        "results not yet accepted by the hub: {}\n",
        v["pending_results"]
    ));
    out.push_str(&crate::ops::undo_view::render_lines(
        v["undo_points"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]),
    ));
    out
}

/// `ops show OP_ID`: exit 1 when the replay store has no such operation.
pub fn ops_show(cli: &Cli, op_id: &str) -> Result<(), CliError> {
    let config = super::load_config(cli)?;
    let req = Request::OpsShow {
        op_id: op_id.to_string(),
    };
    let v = match control_request(&config, &req) {
        Ok(Some(v)) => v,
        Ok(None) => {
            let (_lock, j) = local_journal(&config, "ops show")?;
            match crate::ops::service::show_json(&j, op_id)
                .map_err(|e| CliError::Problem(e.to_string()))?
            {
                Some(mut v) => {
                    v["undo_point"] = crate::ops::undo_view::show_json(&j, op_id, now_ms())
                        .map_err(|e| CliError::Problem(e.to_string()))?;
                    v
                }
                None => {
                    return Err(CliError::Problem(format!(
                        "no operation {op_id} in the replay store"
                    )));
                }
            }
        }
        Err(ControlError::Remote { message, .. }) => {
            return Err(CliError::Problem(format!("operation {op_id}: {message}")));
        }
        Err(e) => return Err(e.into()),
    };
    print(cli, &v, pretty);
    Ok(())
}

/// Which local change `ops_local` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalOp {
    Undo,
    Release,
}

impl LocalOp {
    fn verb(self) -> &'static str {
        match self {
            LocalOp::Undo => "undo",
            LocalOp::Release => "release",
        }
    }
}

/// `ops undo OP_ID` / `ops release OP_ID`: only through the running daemon (its queue
/// runs the new operation in the guest's lane and its journal records it); with no daemon
/// nothing is changed (exit 3). Prints the new operation's decision: exit 0 `applied`, 1
/// anything else (refused, failed, or not decided within `--wait`).
pub fn ops_local(
    cli: &Cli,
    what: LocalOp,
    op_id: &felhom_authz::OpId,
    wait: u32,
) -> Result<(), CliError> {
    // Only the socket's path is needed: no Proxmox or hub secret.
    let config = super::load_host_config(cli)?;
    let wait_seconds = wait.clamp(1, control::MAX_LOCAL_WAIT.as_secs() as u32);
    let req = match what {
        LocalOp::Undo => Request::OpsUndo {
            op_id: op_id.clone(),
            wait_seconds,
        },
        LocalOp::Release => Request::OpsRelease {
            op_id: op_id.clone(),
            wait_seconds,
        },
    };
    let rt = runtime()?;
    let v = match rt.block_on(control::request(&config.control.socket, &req)) {
        Ok(v) => v,
        Err(ControlError::NotRunning { path }) => {
            return Err(CliError::Unreachable(format!(
                "no felhom-agent daemon is listening on {}: `ops {}` runs only through the daemon's queue (systemctl start felhom-agent); nothing was changed",
                path.display(),
                what.verb()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    print(cli, &v, |v| render_local(what, op_id.as_str(), v));
    let state = v["state"].as_str().unwrap_or("?");
    if v["final"] == Value::Bool(true) && state == "applied" {
        return Ok(());
    }
    let new_id = v["op_id"].as_str().unwrap_or("?");
    let summary = if v["final"] == Value::Bool(true) {
        format!(
            "{} of {}: {state}{}",
            what.verb(),
            op_id.as_str(),
            v["operation"]["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        )
    } else {
        format!(
            "{} of {}: not decided within {wait_seconds} s; follow it with `felhom-agent ops show {new_id}`",
            what.verb(),
            op_id.as_str()
        )
    };
    Err(CliError::Reported {
        exit: super::Exit::Problem,
        summary,
    })
}

fn render_local(what: LocalOp, target: &str, v: &Value) -> String {
    let mut out = format!(
        "{} of {target}: {}{} (operation {}, requested by {})\n",
        what.verb(),
        v["state"].as_str().unwrap_or("?"),
        if v["final"] == Value::Bool(true) {
            ""
        } else {
            ", not decided yet"
        },
        v["op_id"].as_str().unwrap_or("?"),
        v["requested_by"].as_str().unwrap_or("?"),
    );
    let op = &v["operation"];
    if let Some(r) = op["reason"].as_str() {
        out.push_str(&format!("reason: {r}\n"));
    }
    if let Some(m) = op["message"].as_str() {
        out.push_str(&format!("{m}\n"));
    }
    if v["undo_point"].is_object() {
        out.push_str("undo point:\n");
        out.push_str(&crate::ops::undo_view::render_one(&v["undo_point"]));
    }
    out
}

fn now_ms() -> i64 {
    crate::reconcile::journal::now_ms()
}

fn control_request(config: &Config, req: &Request) -> Result<Option<Value>, ControlError> {
    let rt = runtime().map_err(|e| ControlError::Remote {
        kind: crate::control::ErrorKind::Problem,
        message: e.to_string(),
    })?;
    match rt.block_on(control::request(&config.control.socket, req)) {
        Ok(v) => Ok(Some(v)),
        Err(ControlError::NotRunning { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `restore-test run`: through the daemon, or (no daemon) on a local queue with the
/// `state_dir` lock held, behind the gate the kept hub envelope gives.
pub fn restore_test_run(cli: &Cli, vmid: Option<u64>) -> Result<(), CliError> {
    let config = super::load_config(cli)?;
    let v = match ask_daemon(&config, &Request::RestoreTestRun { vmid })? {
        Some(v) => v,
        None => {
            let vmid = vmid
                .map(felhom_protocol::Vmid::new)
                .transpose()
                .map_err(|e| CliError::Usage(e.to_string()))?;
            let rt = runtime()?;
            rt.block_on(async {
                let local = super::mutations::LocalQueue::take(
                    &config.state_dir,
                    "felhom-agent restore-test run",
                )?;
                let journal = Arc::new(
                    Journal::open(&config.state_dir)
                        .map_err(|e| CliError::Problem(e.to_string()))?,
                );
                let client = crate::proxmox::Client::from_config(&config)
                    .map_err(|e| CliError::Usage(format!("proxmox: {e}")))?;
                let kept = crate::hub::envelope::EnvelopeStore::new(&config.state_dir)
                    .load()
                    .ok()
                    .flatten();
                let gate = super::run_cmd::gate_for(
                    matches!(config.hub.mode, crate::config::HubMode::Enabled { .. }),
                    kept.as_ref(),
                );
                let (_gate_tx, gate_rx) = tokio::sync::watch::channel(gate);
                let tests = crate::restore::RestoreTests::from_config(
                    &config,
                    client,
                    local.queue().clone(),
                    journal,
                    gate_rx,
                )
                .ok_or_else(|| {
                    CliError::Usage(
                        "restore tests are not configured (restore_tests.scratch_vmids and restore_tests.storage)".into(),
                    )
                })?;
                let r = tests.run(vmid).await;
                local.close().await;
                let rec = r.map_err(|e| CliError::Problem(e.to_string()))?;
                serde_json::to_value(rec).map_err(|e| CliError::Problem(e.to_string()))
            })?
        }
    };
    print(cli, &v, render_restore_test);
    match v["result"].as_str() {
        Some("passed") => Ok(()),
        _ => Err(CliError::Reported {
            exit: super::Exit::Problem,
            summary: format!(
                "restore test {}: {}",
                v["result"].as_str().unwrap_or("?"),
                v["reason"].as_str().unwrap_or("")
            ),
        }),
    }
}

fn render_restore_test(v: &Value) -> String {
    let scratch = v["scratch_vmid"]
        .as_u64()
        .map(|n| format!(" in {n}"))
        .unwrap_or_default();
    let reason = v["reason"]
        .as_str()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    format!(
        "#{} guest {} {}{scratch} ({}){reason}\n",
        v["id"],
        v["vmid"],
        v["result"].as_str().unwrap_or("running"),
        v["archive"].as_str().unwrap_or("no archive"),
    )
}

/// `restore-test list`: from the daemon, or from the journal when no daemon runs.
pub fn restore_test_list(cli: &Cli, limit: u32) -> Result<(), CliError> {
    let config = super::load_config(cli)?;
    let v = match ask_daemon(&config, &Request::RestoreTestList { limit })? {
        Some(v) => v,
        None => {
            let (_lock, j) = local_journal(&config, "restore-test list")?;
            let tests = j
                .restore_recent(limit.clamp(1, 10_000) as usize)
                .map_err(|e| CliError::Problem(e.to_string()))?;
            json!({ "restore_tests": tests })
        }
    };
    print(cli, &v, |v| {
        let tests = v["restore_tests"].as_array().cloned().unwrap_or_default();
        if tests.is_empty() {
            return "no restore tests\n".to_string();
        }
        tests.iter().map(render_restore_test).collect()
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_the_undo_count_and_each_warning() {
        let ops = json!({
            "undo_points_kept": 2,
            "undo_warnings": [{"storage": "nas", "message": "2 kept undo backups use 25.0% of storage nas"}],
        });
        assert_eq!(
            render_undo_status(&ops),
            "  undo points kept: 2 (felhom-agent ops list)\n  warning: 2 kept undo backups use 25.0% of storage nas\n"
        );
        let none = json!({"undo_points_kept": 0, "undo_warnings": []});
        assert_eq!(render_undo_status(&none), "  undo points kept: 0\n");
        let unread = json!({"undo_points_kept": 1, "undo_warnings": [],
            "undo_warnings_error": "cannot read the storages' sizes: timeout"});
        assert!(
            render_undo_status(&unread).contains("undo points: cannot read the storages' sizes")
        );
        // no daemon: nothing about undo points
        assert_eq!(render_undo_status(&json!({})), "");
    }

    #[test]
    fn a_local_undo_says_its_decision_and_why() {
        let v = json!({"op_id": "ab".repeat(16), "requested_by": "local:root", "state": "refused",
            "final": true, "operation": {"reason": "not_reversible", "message": "its undo point was released"}});
        let text = render_local(LocalOp::Undo, &"cd".repeat(16), &v);
        assert_eq!(
            text,
            format!(
                "undo of {}: refused (operation {}, requested by local:root)\nreason: not_reversible\nits undo point was released\n",
                "cd".repeat(16),
                "ab".repeat(16)
            )
        );
        let pending = json!({"op_id": "ab".repeat(16), "requested_by": "local:felhom-agent",
            "state": "running", "final": false, "operation": {}});
        assert!(
            render_local(LocalOp::Release, "x", &pending)
                .starts_with("release of x: running, not decided yet")
        );
        let released = json!({"op_id": "ab".repeat(16), "requested_by": "local:root", "state": "applied",
            "final": true, "operation": {}, "undo_point": {"op_id": "cd".repeat(16), "vmid": 101,
            "kind": "snapshot", "ref": "felhom-undo-cdcdcdcdcdcd", "storage": null, "size_bytes": null,
            "age_seconds": 90, "op_kind": "rollback", "status": "released", "released_by": "local:root"}});
        let text = render_local(LocalOp::Release, &"cd".repeat(16), &released);
        assert!(text.contains("undo point:\n  cdcd"), "{text}");
        assert!(text.contains("released by local:root"), "{text}");
    }
}
