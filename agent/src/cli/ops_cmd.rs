//! `felhom-agent ops verify FILE`: full verification of a signed envelope against this
//! host's trust (the signers file, this agent's `agent_id` and `node`, the current time),
//! without running or recording it. Also the identity and trust lines that `status` and
//! `config check` show.
//!
//! Exit: 0 valid (prints the payload type, the operation's kind and target or the desired
//! generation, and the signers that counted); 1 refused (the reason code and message);
//! 2 configuration error (no signers file, one not safely owned or malformed, no
//! `agent_id` yet, the file unreadable).
//!
//! `--json`: `{"ok": true, "valid": true, "payload_type", "signers", "payload_sha256",
//! "op": {"op_id", "kind", "target", "grant", "not_before", "not_after", "reason"}}` (or
//! `"desired": {"generation", "guests"}`); refused: `{"ok": false, "valid": false,
//! "reason": "<code>", "message"}`.

use std::io::Read;
use std::path::Path;

use felhom_authz::{
    Action, Context, DESIRED_PAYLOAD_TYPE, Envelope, MAX_ENVELOPE_BYTES, Refusal, verify_desired,
    verify_op,
};
use serde_json::{Value, json};

use super::{Cli, CliError};
use crate::config::Config;
use crate::ops::identity;
use crate::ops::trust::{TrustState, agent_uid, load_trust};

/// `agent_id` and `ops` for `status` and `config check`: what the daemon would use.
/// Errors are shown in the document (`agent_id_error`, `ops.state = "invalid"`).
pub(crate) fn identity_and_ops(cfg: &Config) -> (Value, Value) {
    let id = match identity::current(cfg.agent_id.as_ref(), &cfg.state_dir) {
        Ok(Some((id, src))) => json!({"agent_id": id.as_str(), "agent_id_source": src.as_str()}),
        Ok(None) => json!({"agent_id": null, "agent_id_source": null,
            "agent_id_error": identity::IdentityError::NotCreated {
                path: identity::agent_id_path(&cfg.state_dir)
            }.to_string()}),
        Err(e) => {
            json!({"agent_id": null, "agent_id_source": null, "agent_id_error": e.to_string()})
        }
    };
    let ops = match load_trust(&cfg.authz.signers_file, agent_uid(&cfg.state_dir)) {
        Ok(state) => state.to_json(),
        Err(e) => json!({
            "enabled": false,
            "state": "invalid",
            "signers_file": cfg.authz.signers_file.display().to_string(),
            "reason": e.to_string(),
        }),
    };
    (id, ops)
}

/// Human lines for the values of [`identity_and_ops`].
pub(crate) fn render_identity_and_ops(id: &Value, ops: &Value) -> String {
    let mut out = String::new();
    match id["agent_id"].as_str() {
        Some(a) => out.push_str(&format!(
            "agent_id: {a} ({})\n",
            id["agent_id_source"].as_str().unwrap_or("?")
        )),
        None => out.push_str(&format!(
            "agent_id: none: {}\n",
            id["agent_id_error"].as_str().unwrap_or("?")
        )),
    }
    let line = match ops["state"].as_str() {
        Some("enabled") => format!(
            "enabled ({}: {}; threshold reversible {}, irreversible {})",
            ops["signers_file"].as_str().unwrap_or("?"),
            ops["signers"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            ops["threshold"]["reversible"],
            ops["threshold"]["irreversible"]
        ),
        _ => format!("disabled: {}", ops["reason"].as_str().unwrap_or("?")),
    };
    out.push_str(&format!("ops: {line}\n"));
    if let Some(held) = ops["held"].as_array() {
        for h in held {
            out.push_str(&format!(
                "  {} {} {}: {}{}\n",
                h["op_id"].as_str().unwrap_or("?"),
                h["op"].as_str().unwrap_or("?"),
                h["vmid"]
                    .as_u64()
                    .map_or_else(|| "host".to_string(), |v| v.to_string()),
                h["state"].as_str().unwrap_or("?"),
                h["waiting_for"]
                    .as_str()
                    .map(|w| format!(" (waiting for {w})"))
                    .unwrap_or_default(),
            ));
        }
    }
    if let Some(n) = ops["pending_results"].as_u64() {
        out.push_str(&format!("  results not yet accepted by the hub: {n}\n"));
    }
    out
}

/// The configuration errors `config check` fails on (exit 2): a corrupt agent id file,
/// a malformed signers file, and signed operations on (a trusted signers file in place)
/// without `gate.backup_storage`, where the gate's undo backups go. A missing or unsafely
/// owned signers file is not one: signed operations are simply off.
pub(crate) fn check_identity_and_trust(cfg: &Config) -> Result<(), CliError> {
    identity::current(cfg.agent_id.as_ref(), &cfg.state_dir)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let trust = load_trust(&cfg.authz.signers_file, agent_uid(&cfg.state_dir))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if matches!(trust, TrustState::Enabled { .. }) && cfg.gate.backup_storage.is_none() {
        return Err(CliError::Usage(format!(
            "gate.backup_storage is not set: signed operations are on ({} is in place) and \
             the reversibility gate needs a storage for undo backups",
            cfg.authz.signers_file.display()
        )));
    }
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_envelope_file(path: &Path) -> Result<Vec<u8>, CliError> {
    let file = std::fs::File::open(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let mut raw = Vec::new();
    // One byte over the cap, so an oversized file is refused `too_large`, not cut.
    file.take(MAX_ENVELOPE_BYTES as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    Ok(raw)
}

pub fn verify(cli: &Cli, file: &Path) -> Result<(), CliError> {
    let cfg = super::load_config(cli)?;
    let (agent_id, _) = identity::current(cfg.agent_id.as_ref(), &cfg.state_dir)
        .map_err(|e| CliError::Usage(e.to_string()))?
        .ok_or_else(|| {
            CliError::Usage(
                identity::IdentityError::NotCreated {
                    path: identity::agent_id_path(&cfg.state_dir),
                }
                .to_string(),
            )
        })?;
    let trust = match load_trust(&cfg.authz.signers_file, agent_uid(&cfg.state_dir))
        .map_err(|e| CliError::Usage(e.to_string()))?
    {
        TrustState::Enabled { trust, .. } => trust,
        state => {
            return Err(CliError::Usage(format!(
                "signed operations are {}: nothing can be verified",
                state.describe()
            )));
        }
    };
    let raw = read_envelope_file(file)?;
    let ctx = Context {
        agent_id,
        node: cfg.node.clone(),
        now: now(),
        scratch_vmids: cfg.scratch_vmids.clone(),
    };
    // Only the payload type is looked at before verification, to pick the checks; the
    // body stays untouched until the signatures verified.
    let is_desired = Envelope::parse(&raw).is_ok_and(|e| e.payload_type == DESIRED_PAYLOAD_TYPE);
    let outcome = if is_desired {
        verify_desired(&raw, &trust, &ctx).map(|d| {
            json!({
                "ok": true,
                "valid": true,
                "payload_type": DESIRED_PAYLOAD_TYPE,
                "signers": d.signers,
                "payload_sha256": hex::encode(d.payload_sha256),
                "desired": {"generation": d.generation, "guests": d.guests.len()},
            })
        })
    } else {
        verify_op(&raw, &trust, &ctx).map(|op| {
            let target = match &op.action {
                Action::Guest { target, .. } => json!(target),
                Action::Host(_) => Value::Null,
            };
            json!({
                "ok": true,
                "valid": true,
                "payload_type": felhom_authz::OP_PAYLOAD_TYPE,
                "signers": op.signers,
                "payload_sha256": hex::encode(op.payload_sha256),
                "op": {
                    "op_id": op.op_id.as_str(),
                    "kind": op.kind.as_str(),
                    "target": target,
                    "grant": op.grant.as_str(),
                    "not_before": op.not_before,
                    "not_after": op.not_after,
                    "reason": op.reason,
                },
            })
        })
    };
    match outcome {
        Ok(v) => {
            if cli.json {
                super::print_json(&v);
            } else {
                print!("{}", render_valid(&v));
            }
            Ok(())
        }
        Err(Refusal { reason, message }) => {
            if cli.json {
                super::print_json(&json!({
                    "ok": false,
                    "valid": false,
                    "reason": reason.as_str(),
                    "message": message,
                }));
            } else {
                println!("refused: {reason}: {message}");
            }
            Err(CliError::Reported {
                exit: super::Exit::Problem,
                summary: format!("{} refused ({reason}): {message}", file.display()),
            })
        }
    }
}

fn render_valid(v: &Value) -> String {
    let mut out = format!("valid: {}\n", v["payload_type"].as_str().unwrap_or("?"));
    if let Some(op) = v.get("op") {
        let target = match op["target"].as_object() {
            Some(t) => format!(
                " {} {}",
                t.get("type").and_then(Value::as_str).unwrap_or("?"),
                t.get("vmid").unwrap_or(&Value::Null)
            ),
            None => " (host)".to_string(),
        };
        out.push_str(&format!(
            "op: {}{target}\nop_id: {}\ngrant: {}\nvalid from {} until {} (Unix seconds)\nreason: {}\n",
            op["kind"].as_str().unwrap_or("?"),
            op["op_id"].as_str().unwrap_or("?"),
            op["grant"].as_str().unwrap_or("?"),
            op["not_before"],
            op["not_after"],
            op["reason"].as_str().unwrap_or(""),
        ));
    }
    if let Some(d) = v.get("desired") {
        out.push_str(&format!(
            "desired generation: {} ({} guests)\n",
            d["generation"], d["guests"]
        ));
    }
    let signers: Vec<&str> = v["signers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    out.push_str(&format!("signers: {}\n", signers.join(", ")));
    out
}
