//! Bench only (cargo feature `bench-gate-off`, never in a production build): a switch that
//! runs a signed `set_config` through issue 12's journaled path with the reversibility gate
//! off, so `tests/benches/gate_overhead.rs` can measure what the gate adds against it in the
//! same run.
//!
//! With the switch on, a `set_config` goes through everything a signed operation goes
//! through before its first request (verification, replay store, lane, preconditions, the
//! committed intent) and then sends one config change, with `expect.config_digest` as its
//! digest when the payload names one, and its end is recorded as for any issue-12 kind: no
//! capability or previous-values reads, no gate steps, no undo point, no health check. A
//! QEMU change's task UPID is committed as soon as Proxmox answers and waited on, as issue
//! 12 does for its task kinds.
//!
//! Owns: the switch ([`set_gate_off`]) and that ungated path ([`set_config`]).
//! Must never: be compiled into the agent that ships (the feature is off by default and no
//! package build names it), or be used for anything but measuring.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value};

use super::exec::{ExecEnv, Final, GuestRef, Unfinished};
use crate::proxmox::{ConfigChange, ConfigValue, GuestPermit, ProxmoxError, SetConfigOutcome};
use crate::reconcile::pve::Pve;

static GATE_OFF: AtomicBool = AtomicBool::new(false);

/// Turns the gate off (`true`) or on again for the `set_config`s that leave their queue
/// from now on.
pub fn set_gate_off(off: bool) {
    GATE_OFF.store(off, Ordering::SeqCst);
}

/// Whether the gate is switched off.
pub fn gate_off() -> bool {
    GATE_OFF.load(Ordering::SeqCst)
}

fn change_of(config: &BTreeMap<String, Value>, digest: Option<&str>) -> ConfigChange {
    let mut c = ConfigChange::new();
    for (k, v) in config {
        c = match v {
            Value::Null => c.delete(k.clone()),
            Value::Bool(b) => c.set(k.clone(), ConfigValue::Bool(*b)),
            Value::Number(n) if n.is_i64() => {
                c.set(k.clone(), ConfigValue::Int(n.as_i64().unwrap_or_default()))
            }
            Value::String(s) => c.set(k.clone(), ConfigValue::Str(s.clone())),
            other => c.set(k.clone(), ConfigValue::Str(other.to_string())),
        };
    }
    match digest {
        Some(d) => c.digest(d),
        None => c,
    }
}

/// The ungated `set_config`: one config change, its end as issue 12 records one.
pub async fn set_config(
    env: &ExecEnv,
    guest: &GuestRef,
    config: &BTreeMap<String, Value>,
    permit: &GuestPermit,
    op_id: &str,
) -> Result<Final, Unfinished> {
    let change = change_of(config, guest.expect_digest.as_deref());
    let upid = match env.pve.set_config(permit, guest.kind, &change).await {
        Ok(SetConfigOutcome::Applied) => return Ok(Final::Applied(Map::new())),
        Ok(SetConfigOutcome::Task(u)) => u,
        Err(e) => return Ok(Final::Failed(e.to_string())),
    };
    let (id, u) = (op_id.to_string(), upid.as_str().to_string());
    let j = env.journal.clone();
    tokio::task::spawn_blocking(move || j.op_update(&id, |r| r.upids.push(u), None))
        .await
        .map_err(|e| Unfinished::Blocking(e.to_string()))??;
    match Pve::wait(&env.pve, &upid, env.task_timeout).await {
        Ok(_) => Ok(Final::Applied(Map::new())),
        Err(e @ ProxmoxError::TaskFailed { .. }) => Ok(Final::Failed(e.to_string())),
        Err(source) => Err(Unfinished::Proxmox {
            what: "waiting for the task",
            source,
        }),
    }
}
