//! The signed-operations channel's wire types, shared by the hub client, the report and
//! the ops service: the long poll's answer, one decision as `POST /ops/result` carries it,
//! and the report's `ops` section.
//!
//! Owns: the JSON shapes of issue 12's "Delivery and results" (`docs/signed-ops.md`).
//! Must never: carry an envelope's decoded payload or anything secret; a result names the
//! operation by `op_id` and `payload_sha256` only.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::timestamp::Timestamp;

/// Path of the long poll below the hub's base URL (`?wait=25`).
pub const OPS_PATH: &str = "/api/agent/v1/ops";
/// Path of the signed desired state below the hub's base URL.
pub const DESIRED_PATH: &str = "/api/agent/v1/desired";
/// Path results are POSTed to.
pub const RESULT_PATH: &str = "/api/agent/v1/ops/result";
/// Seconds the hub may hold a long poll open.
pub const LONG_POLL_WAIT_SECONDS: u64 = 25;
/// Longest `delivery_id` accepted (printable ASCII).
pub const MAX_DELIVERY_ID: usize = 64;

/// One pending delivery in the long poll's answer. The envelope is kept as raw JSON text:
/// it is verified byte for byte, never re-serialized.
#[derive(Debug, Clone, Deserialize)]
pub struct Delivery {
    /// The hub's own id; bookkeeping only, never a security decision. A value that is not
    /// 1..=64 printable ASCII characters is answered with `null` instead.
    #[serde(default)]
    pub delivery_id: Option<serde_json::Value>,
    pub envelope: Box<serde_json::value::RawValue>,
}

impl Delivery {
    /// The delivery id when it is 1..=64 printable ASCII characters.
    pub fn delivery_id(&self) -> Option<String> {
        let s = self.delivery_id.as_ref()?.as_str()?;
        let ok = !s.is_empty()
            && s.len() <= MAX_DELIVERY_ID
            && s.bytes().all(|b| (0x20..0x7f).contains(&b));
        ok.then(|| s.to_string())
    }
}

/// `GET /api/agent/v1/ops?wait=25`'s answer.
#[derive(Debug, Clone, Deserialize)]
pub struct OpsAnswer {
    pub ops: Vec<Delivery>,
}

/// What a result is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResultKind {
    Op,
    Desired,
}

/// An envelope's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecisionState {
    /// Valid and waiting (blocked, safe mode, or its lane); a final decision follows.
    Held,
    Applied,
    Failed,
    /// The next issue's reversibility gate undid it after a failure.
    RolledBack,
    Refused,
}

impl DecisionState {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionState::Held => "held",
            DecisionState::Applied => "applied",
            DecisionState::Failed => "failed",
            DecisionState::RolledBack => "rolled_back",
            DecisionState::Refused => "refused",
        }
    }
    pub fn parse(s: &str) -> Option<DecisionState> {
        [
            DecisionState::Held,
            DecisionState::Applied,
            DecisionState::Failed,
            DecisionState::RolledBack,
            DecisionState::Refused,
        ]
        .into_iter()
        .find(|d| d.as_str() == s)
    }
    /// Whether no other decision follows this one.
    pub fn is_final(self) -> bool {
        self != DecisionState::Held
    }
}

/// One decision, as `POST /api/agent/v1/ops/result` carries it and as the report's
/// `ops.pending_results` lists it until the hub accepted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpResult {
    /// The agent's own increasing number; the hub treats a repeated `seq` as the same
    /// result.
    pub seq: u64,
    pub kind: ResultKind,
    /// Null when the payload could not be verified, and for desired state.
    #[schemars(regex(pattern = r"^[0-9a-f]{32}$"))]
    pub op_id: Option<String>,
    /// Desired state only.
    pub generation: Option<u64>,
    /// Hex SHA-256 of the base64-decoded payload; null when it could not be decoded.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub payload_sha256: Option<String>,
    /// The hub's delivery id this answers; null for desired state.
    pub delivery_id: Option<String>,
    pub state: DecisionState,
    /// The refusal code (`refused`), or null.
    pub reason: Option<String>,
    /// For people: why, or what happened.
    pub message: Option<String>,
    /// Names of the distinct trusted keys that counted.
    pub signers: Vec<String>,
    /// Proxmox task ids, in order.
    pub upids: Vec<String>,
    /// Kind-specific result (e.g. `{"volid": …}` of a backup); `{}` when none.
    pub result: serde_json::Map<String, serde_json::Value>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

/// An accepted operation without its final decision yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeldOp {
    pub op_id: String,
    /// The operation's kind (`stop`, `snapshot`, …).
    pub op: String,
    /// The guest, or null for a host operation.
    pub vmid: Option<u32>,
    /// `held` (waiting: blocked, safe mode or its lane) or `running` (its first request
    /// went out; it completes or resumes).
    pub state: String,
    /// Why it waits, when held.
    pub waiting_for: Option<String>,
    pub received_at: Timestamp,
}

/// What an undo point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UndoKind {
    /// A snapshot of the guest (`ref`: its name, `felhom-undo-<12 hex>`).
    Snapshot,
    /// A backup archive (`ref`: its volid, on `storage`).
    Backup,
    /// The previous values of the config keys a `set_config` changed (`ref`: null).
    PreviousValues,
}

impl UndoKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UndoKind::Snapshot => "snapshot",
            UndoKind::Backup => "backup",
            UndoKind::PreviousValues => "previous_values",
        }
    }

    pub fn parse(s: &str) -> Option<UndoKind> {
        [
            UndoKind::Snapshot,
            UndoKind::Backup,
            UndoKind::PreviousValues,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// Whether an undo point is still held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UndoStatus {
    /// Held on the node until a signed `release_undo` or `felhom-agent ops release`.
    Kept,
    Released,
}

impl UndoStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UndoStatus::Kept => "kept",
            UndoStatus::Released => "released",
        }
    }

    pub fn parse(s: &str) -> Option<UndoStatus> {
        [UndoStatus::Kept, UndoStatus::Released]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// One undo point the reversibility gate holds, as the report's `ops.undo_points` lists
/// it (the kept ones, oldest first) so the hub can remind operators to release those no
/// longer needed: the agent never removes one on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UndoPointReport {
    /// The operation that made it (`felhom-agent ops undo OP_ID` undoes that operation).
    #[schemars(regex(pattern = r"^[0-9a-f]{32}$"))]
    pub op_id: String,
    pub vmid: u32,
    pub kind: UndoKind,
    /// The snapshot's name or the backup's volid; null for previous values.
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    /// The storage a backup is on; null for a snapshot or previous values.
    pub storage: Option<String>,
    /// The backup's size where PVE says it; null otherwise.
    pub size_bytes: Option<u64>,
    pub created_at: Timestamp,
    pub status: UndoStatus,
}
