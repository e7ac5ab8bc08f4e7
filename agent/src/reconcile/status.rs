//! The engine's status as the hub report carries it: the `reconcile` section of
//! [`crate::hub::report::HostReport`]. Reconcile owns these types (what it is doing is its
//! business); the report embeds them. [`EngineStatus::report`] builds them.
//!
//! They are part of the hub contract, so they follow its rules
//! ([`crate::hub::report`]): every field always serialized (`null`, never absent), no
//! unknown fields, and `docs/hub-report.schema.json` is generated from them: a change here
//! is a schema change.
//!
//! Must never: carry a secret or anything the hub could mistake for a command.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::engine::{ActionView, EngineStatus};
use crate::timestamp::Timestamp;

/// What the reconcile engine is doing, filled by the engine (issue 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileReport {
    /// The hub's `blocked` as the engine applies it.
    pub blocked: bool,
    /// The journal could not be trusted; the engine does nothing until `journal verify`.
    pub safe_mode: bool,
    /// Why it is in safe mode (the journal error), `null` when it is not.
    pub safe_mode_reason: Option<String>,
    pub desired_generation: Option<u64>,
    pub applied_generation: Option<u64>,
    pub queued: Vec<ReconcileAction>,
    pub running: Vec<ReconcileAction>,
    pub failing: Vec<FailingAction>,
    pub skipped: Vec<SkippedGuest>,
    /// Guests in the desired state that do not exist on the node.
    pub desired_only: Vec<u32>,
    /// Guests on the node that the desired state does not mention.
    pub actual_only: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileAction {
    pub vmid: u32,
    /// e.g. `start`, `stop`, `set_config`.
    pub action: String,
    /// The journal's operation id.
    pub op_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailingAction {
    pub vmid: u32,
    pub action: String,
    pub attempts: u32,
    pub last_error: String,
    pub next_retry_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SkippedGuest {
    pub vmid: u32,
    pub reason: String,
}

impl EngineStatus {
    /// The report's `reconcile` section.
    pub fn report(&self) -> ReconcileReport {
        let action = |a: &ActionView| ReconcileAction {
            vmid: a.vmid.get(),
            action: a.action.clone(),
            op_id: a.op_id.clone(),
        };
        ReconcileReport {
            blocked: self.blocked,
            safe_mode: self.safe_mode.is_some(),
            safe_mode_reason: self.safe_mode.clone(),
            desired_generation: self.desired_generation,
            applied_generation: self.applied_generation,
            queued: self.queued.iter().map(action).collect(),
            running: self.running.iter().map(action).collect(),
            failing: self
                .failing
                .iter()
                .map(|f| FailingAction {
                    vmid: f.vmid.get(),
                    action: f.action.clone(),
                    attempts: f.attempts,
                    last_error: f.last_error.clone(),
                    next_retry_at: time::OffsetDateTime::from_unix_timestamp_nanos(
                        i128::from(f.next_retry_ms) * 1_000_000,
                    )
                    .ok()
                    .map(Timestamp::from),
                })
                .collect(),
            skipped: self
                .skipped
                .iter()
                .map(|s| SkippedGuest {
                    vmid: s.vmid.get(),
                    reason: s.reason.to_string(),
                })
                .collect(),
            desired_only: self.only_desired.iter().map(|v| v.get()).collect(),
            actual_only: self.only_actual.iter().map(|v| v.get()).collect(),
        }
    }
}
