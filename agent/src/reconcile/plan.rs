//! `plan(desired, actual)`: the minimal set of actions that makes the node match the desired
//! state. Pure: no I/O, no clock.
//!
//! Owns: the decision what to do per guest, and what to leave alone and why.
//! - Guests on both sides get at most: one `SetConfig` carrying only the fields that differ
//!   after normalization, and one `Start` or `Stop`. For a guest that should run, the config
//!   is written first so it starts with it; for one that should stop, it is stopped first.
//! - Guests on one side only are reported (`only_desired`, `only_actual`), never touched
//!   (create and destroy are out of scope).
//! - HA-managed guests (their power belongs to the HA manager), templates, locked guests
//!   (e.g. during a backup; retried next cycle) and guests in a state other than running or
//!   stopped are skipped with the reason.
//! - A desired field that does not exist for the guest's kind (e.g. `hostname` on QEMU) or
//!   a config value that cannot be read is reported in `problems`; that guest's config is
//!   then not written, since the plan could not be computed safely.
//!
//! Must never: plan an action for a guest that is not on both sides, or put a field into a
//! `SetConfig` that did not differ after normalization.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use felhom_protocol::Vmid;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::desired::{DesiredState, Power};
use super::normalize::{Field, GuestKind, Norm, Param, write_param};

/// One guest as read from the node.
#[derive(Debug, Clone, PartialEq)]
pub struct ActualGuest {
    pub vmid: Vmid,
    pub kind: GuestKind,
    /// `running`, `stopped`, or whatever else PVE said.
    pub status: String,
    pub template: bool,
    /// `lock` from the config or list (`backup`, `snapshot`, …).
    pub lock: Option<String>,
    pub ha_managed: bool,
    /// The raw config (GET …/config, pending values merged in).
    pub config: Map<String, Value>,
}

impl ActualGuest {
    /// The state an action is planned against: status and the config digest. Part of the
    /// action's idempotency key.
    pub fn basis(&self) -> Basis {
        Basis {
            status: self.status.clone(),
            digest: self
                .config
                .get("digest")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }
}

/// The guest state an action was planned against.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Basis {
    pub status: String,
    pub digest: Option<String>,
}

/// What to do to a guest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Start,
    /// Graceful shutdown with a timeout, then a hard stop if still running.
    Stop,
    /// Only the fields that differ; `params` are the PUT parameters that write them.
    SetConfig {
        fields: Vec<Field>,
        params: Vec<Param>,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::SetConfig { .. } => "set-config",
        }
    }
}

/// An action on one guest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Action {
    pub vmid: Vmid,
    pub kind: GuestKind,
    pub op: Op,
    pub basis: Basis,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            Op::SetConfig { fields, .. } => {
                let names: Vec<&str> = fields.iter().map(|f| f.key()).collect();
                write!(
                    f,
                    "set-config {} {} ({})",
                    self.kind,
                    self.vmid,
                    names.join(", ")
                )
            }
            op => write!(f, "{} {} {}", op.name(), self.kind, self.vmid),
        }
    }
}

/// Why a guest on both sides was left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum SkipReason {
    HaManaged,
    Template,
    Locked(String),
    UnknownStatus(String),
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::HaManaged => {
                f.write_str("HA-managed (its power belongs to the HA manager)")
            }
            SkipReason::Template => f.write_str("template"),
            SkipReason::Locked(l) => write!(f, "locked ({l}); retried next cycle"),
            SkipReason::UnknownStatus(s) => {
                write!(f, "status {s:?} is neither running nor stopped")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub vmid: Vmid,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub vmid: Vmid,
    pub message: String,
}

/// The plan: actions in execution order (per guest), and what was left alone.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    pub generation: u64,
    pub actions: Vec<Action>,
    pub skipped: Vec<Skipped>,
    pub only_desired: Vec<Vmid>,
    pub only_actual: Vec<Vmid>,
    pub problems: Vec<Problem>,
}

impl Plan {
    pub fn is_converged(&self) -> bool {
        self.actions.is_empty()
    }
}

/// Plans the actions that make `actual` match `desired`.
pub fn plan(desired: &DesiredState, actual: &[ActualGuest]) -> Plan {
    let by_vmid: HashMap<Vmid, &ActualGuest> = actual.iter().map(|g| (g.vmid, g)).collect();
    let mut out = Plan {
        generation: desired.generation,
        ..Plan::default()
    };
    let mut desired_vmids = std::collections::HashSet::with_capacity(desired.guests.len());
    for want in &desired.guests {
        desired_vmids.insert(want.vmid);
        let Some(have) = by_vmid.get(&want.vmid) else {
            out.only_desired.push(want.vmid);
            continue;
        };
        if let Some(reason) = skip_reason(have) {
            out.skipped.push(Skipped {
                vmid: have.vmid,
                reason,
            });
            continue;
        }
        let basis = have.basis();
        let action = |op| Action {
            vmid: have.vmid,
            kind: have.kind,
            op,
            basis: basis.clone(),
        };

        let set_config = match config_diff(&want.config, have) {
            Ok(Some(op)) => Some(action(op)),
            Ok(None) => None,
            Err(message) => {
                out.problems.push(Problem {
                    vmid: have.vmid,
                    message,
                });
                None
            }
        };
        let running = have.status == "running";
        let power = match want.power {
            Some(Power::Running) if !running => Some(action(Op::Start)),
            Some(Power::Stopped) if running => Some(action(Op::Stop)),
            _ => None,
        };
        match want.power {
            Some(Power::Stopped) => out.actions.extend(power.into_iter().chain(set_config)),
            _ => out.actions.extend(set_config.into_iter().chain(power)),
        }
    }
    out.only_actual = actual
        .iter()
        .map(|g| g.vmid)
        .filter(|v| !desired_vmids.contains(v))
        .collect();
    out.only_actual.sort();
    out
}

fn skip_reason(g: &ActualGuest) -> Option<SkipReason> {
    if g.ha_managed {
        Some(SkipReason::HaManaged)
    } else if g.template {
        Some(SkipReason::Template)
    } else if let Some(lock) = &g.lock {
        Some(SkipReason::Locked(lock.clone()))
    } else if g.status != "running" && g.status != "stopped" {
        Some(SkipReason::UnknownStatus(g.status.clone()))
    } else {
        None
    }
}

/// The `SetConfig` for the fields that differ, or why it cannot be computed.
fn config_diff(want: &BTreeMap<Field, Norm>, have: &ActualGuest) -> Result<Option<Op>, String> {
    let mut fields = Vec::new();
    let mut params = Vec::new();
    for (field, value) in want {
        if !field.applies_to(have.kind) {
            return Err(format!("{field} does not exist for a {} guest", have.kind));
        }
        let current = field
            .actual(have.kind, &have.config)
            .map_err(|e| format!("reading the current {field}: {e}"))?;
        if current == *value {
            continue;
        }
        let Some(param) = write_param(*field, value, &have.config) else {
            continue;
        };
        fields.push(*field);
        params.push(param);
    }
    Ok((!fields.is_empty()).then_some(Op::SetConfig { fields, params }))
}

#[cfg(test)]
mod tests;
