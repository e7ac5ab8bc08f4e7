//! The signed payloads, parsed only after their signatures were verified.
//!
//! Owns: the operation payload ([`OpPayload`], `application/vnd.felhom.op+json`) and the
//! desired-state payload ([`DesiredPayload`], `application/vnd.felhom.desired+json`), every
//! per-field rule of issue 12 (version, ids, binding to this agent and node, the time
//! window, the kind list and its params, the grant), the gated kinds of issue 13 and their
//! classes (which may depend on the params: [`GuestOp::class`]), and the mapping of each
//! failure to its reason code. The params types that need more than a struct live in
//! [`crate::params`].
//! Must never: accept an unknown field at any level (an old agent must not ignore a
//! restriction it does not understand), be called on bytes that were not verified (its
//! entry points take a [`Verified`]), or read the clock (the caller passes `now`).
//!
//! Order of the checks, so that one payload always gets the same reason: `bad_payload`
//! (not JSON, no `v`), `unsupported_version`, `bad_payload` (fields, types, unknown
//! top-level fields, `op_id`, `reason`), `wrong_agent`, `wrong_node`, `window_too_long`
//! (or `bad_payload` when `not_after <= not_before`), `not_yet_valid`, `expired`,
//! `unknown_op`, `grant_mismatch` (the grant is below the kind's class), `below_threshold`
//! (fewer distinct keys than the grant's threshold), `invalid_params` (`target`, `expect`,
//! `params`), then `grant_mismatch` again against the class the params make (a `set_config`
//! that clears `protection` is irreversible): the grant decides the threshold, so a payload
//! whose grant is too weak for its params is refused whatever the number of signatures.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use felhom_protocol::{BlockDevicePath, MountName, PctCreateSpec, StorageId, Vmid};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::params::{BackupVolid, SetConfigParams};
use crate::refusal::{Reason, Refusal};
use crate::trust::{Grant, Trust};
use crate::verify::Verified;

/// At most this many Unicode scalar values in `reason`.
pub const MAX_REASON_CHARS: usize = 200;
/// At most this many Unicode scalar values in a snapshot description or backup notes.
pub const MAX_TEXT_CHARS: usize = 1024;

/// What a payload is checked against: this agent and the current time.
#[derive(Debug, Clone)]
pub struct Context {
    pub agent_id: AgentId,
    pub node: String,
    /// Unix seconds.
    pub now: u64,
    /// The restore tests' scratch vmids; a guest operation on one is `invalid_params`.
    pub scratch_vmids: Option<RangeInclusive<u32>>,
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

macro_rules! hex_id {
    ($(#[$m:meta])* $name:ident, $len:literal, $what:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, String> {
                let s = s.into();
                if is_lower_hex(&s, $len) {
                    Ok($name(s))
                } else {
                    Err(format!(concat!($what, " must be ", $len, " lower-case hex characters")))
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                $name::new(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $name::new(s)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

hex_id!(
    /// An agent's identity: 128 random bits as 32 lower-case hex characters.
    AgentId, 32, "agent_id"
);
hex_id!(
    /// An operation's replay identity: 32 lower-case hex characters.
    OpId, 32, "op_id"
);
hex_id!(
    /// A Proxmox config digest (SHA-1, 40 lower-case hex characters).
    ConfigDigest, 40, "config_digest"
);

/// The kinds of operation this agent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Start,
    Stop,
    Reboot,
    Snapshot,
    Backup,
    CreateContainer,
    UsbMount,
    UsbUnmount,
    SetConfig,
    Rollback,
    Restore,
    DeleteSnapshot,
    Destroy,
    Undo,
    ReleaseUndo,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::Start,
        Kind::Stop,
        Kind::Reboot,
        Kind::Snapshot,
        Kind::Backup,
        Kind::CreateContainer,
        Kind::UsbMount,
        Kind::UsbUnmount,
        Kind::SetConfig,
        Kind::Rollback,
        Kind::Restore,
        Kind::DeleteSnapshot,
        Kind::Destroy,
        Kind::Undo,
        Kind::ReleaseUndo,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Start => "start",
            Kind::Stop => "stop",
            Kind::Reboot => "reboot",
            Kind::Snapshot => "snapshot",
            Kind::Backup => "backup",
            Kind::CreateContainer => "create_container",
            Kind::UsbMount => "usb_mount",
            Kind::UsbUnmount => "usb_unmount",
            Kind::SetConfig => "set_config",
            Kind::Rollback => "rollback",
            Kind::Restore => "restore",
            Kind::DeleteSnapshot => "delete_snapshot",
            Kind::Destroy => "destroy",
            Kind::Undo => "undo",
            Kind::ReleaseUndo => "release_undo",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The kind's class, whatever its params: the kinds of issue 12 are reversible by
    /// nature; of issue 13's gated kinds `delete_snapshot`, `destroy` and `release_undo`
    /// are irreversible. An operation's class can be stronger than its kind's
    /// ([`GuestOp::class`]).
    pub fn class(self) -> Grant {
        match self {
            Kind::Start
            | Kind::Stop
            | Kind::Reboot
            | Kind::Snapshot
            | Kind::Backup
            | Kind::CreateContainer
            | Kind::UsbMount
            | Kind::UsbUnmount
            | Kind::SetConfig
            | Kind::Rollback
            | Kind::Restore
            | Kind::Undo => Grant::Reversible,
            Kind::DeleteSnapshot | Kind::Destroy | Kind::ReleaseUndo => Grant::Irreversible,
        }
    }

    /// Whether the reversibility gate of issue 13 runs it (an undo point before, a health
    /// check after).
    pub fn is_gated(self) -> bool {
        matches!(
            self,
            Kind::SetConfig
                | Kind::Rollback
                | Kind::Restore
                | Kind::DeleteSnapshot
                | Kind::Destroy
                | Kind::Undo
                | Kind::ReleaseUndo
        )
    }

    /// Whether the kind acts on a guest (`target` required) or on the host (`target` null).
    pub fn is_guest(self) -> bool {
        !matches!(self, Kind::UsbMount | Kind::UsbUnmount)
    }
}

/// `lxc` or `qemu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestType {
    Lxc,
    Qemu,
}

/// The guest an operation acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(rename = "type")]
    pub guest_type: GuestType,
    pub vmid: Vmid,
}

/// Compare-and-set: run only if the guest's config digest is this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub config_digest: ConfigDigest,
}

fn check_text(s: &str, newlines: bool) -> Result<(), String> {
    if s.chars().count() > MAX_TEXT_CHARS {
        return Err(format!("longer than {MAX_TEXT_CHARS} characters"));
    }
    if s.chars()
        .any(|c| c.is_control() && !(newlines && c == '\n'))
    {
        return Err("contains a control character".into());
    }
    Ok(())
}

/// A snapshot description: ≤ 1024 characters, no control characters but `\n`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Description(String);

impl TryFrom<String> for Description {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        check_text(&s, true).map(|()| Description(s))
    }
}
impl From<Description> for String {
    fn from(v: Description) -> String {
        v.0
    }
}
impl Description {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// vzdump `notes-template`: one line, ≤ 1024 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Notes(String);

impl TryFrom<String> for Notes {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        check_text(&s, false).map(|()| Notes(s))
    }
}
impl From<Notes> for String {
    fn from(v: Notes) -> String {
        v.0
    }
}
impl Notes {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A PVE snapshot name: `[a-zA-Z][a-zA-Z0-9_-]+`, at most 40 characters, not `current`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotName(String);

impl TryFrom<String> for SnapshotName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let b = s.as_bytes();
        let ok = (2..=40).contains(&b.len())
            && b[0].is_ascii_alphabetic()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'));
        if !ok {
            return Err("snapshot name must match [a-zA-Z][a-zA-Z0-9_-]+, at most 40".into());
        }
        if s == "current" {
            return Err("snapshot name 'current' is reserved".into());
        }
        Ok(SnapshotName(s))
    }
}
impl From<SnapshotName> for String {
    fn from(v: SnapshotName) -> String {
        v.0
    }
}
impl SnapshotName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stop's graceful-shutdown timeout: 1..=3600 seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct TimeoutSeconds(u32);

impl TryFrom<u64> for TimeoutSeconds {
    type Error = String;
    fn try_from(v: u64) -> Result<Self, String> {
        if (1..=3600).contains(&v) {
            Ok(TimeoutSeconds(v as u32))
        } else {
            Err(format!("timeout_seconds must be 1..=3600, not {v}"))
        }
    }
}
impl From<TimeoutSeconds> for u64 {
    fn from(v: TimeoutSeconds) -> u64 {
        v.0 as u64
    }
}
impl TimeoutSeconds {
    pub fn get(self) -> u32 {
        self.0
    }
}

/// `params` of kinds that take none: `{}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// `stop`'s params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopParams {
    #[serde(default)]
    pub timeout_seconds: Option<TimeoutSeconds>,
}

/// `snapshot`'s params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotParams {
    pub name: SnapshotName,
    #[serde(default)]
    pub description: Option<Description>,
}

/// vzdump `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupMode {
    Snapshot,
    Suspend,
    Stop,
}

/// vzdump `compress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupCompress {
    #[serde(rename = "0")]
    None,
    #[serde(rename = "gzip")]
    Gzip,
    #[serde(rename = "lzo")]
    Lzo,
    #[serde(rename = "zstd")]
    Zstd,
}

/// `backup`'s params (vzdump).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupParams {
    pub storage: StorageId,
    pub mode: BackupMode,
    #[serde(default)]
    pub compress: Option<BackupCompress>,
    #[serde(default)]
    pub notes: Option<Notes>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackParams {
    snapshot: SnapshotName,
    #[serde(default)]
    start: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreParams {
    archive: BackupVolid,
    storage: StorageId,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    start: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteSnapshotParams {
    name: SnapshotName,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestroyParams {
    #[serde(default)]
    purge: bool,
}

/// `undo`'s and `release_undo`'s params.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct UndoParams {
    op_id: OpId,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsbMountParams {
    device: BlockDevicePath,
    name: MountName,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsbUnmountParams {
    name: MountName,
}

/// An operation on a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestOp {
    Start,
    Stop(StopParams),
    Reboot,
    Snapshot(SnapshotParams),
    Backup(BackupParams),
    CreateContainer(Box<PctCreateSpec>),
    /// Writes (or with `None`, deletes) the named config keys.
    SetConfig(SetConfigParams),
    /// Rolls the guest back to `snapshot`, then starts it when `start`.
    Rollback {
        snapshot: SnapshotName,
        start: bool,
    },
    /// Restores `archive` (of the target's guest type) as the target vmid onto `storage`;
    /// `force` overwrites an existing guest.
    Restore {
        archive: BackupVolid,
        storage: StorageId,
        force: bool,
        start: bool,
    },
    DeleteSnapshot {
        name: SnapshotName,
    },
    Destroy {
        purge: bool,
    },
    /// Undoes the operation `op_id` from its undo point.
    Undo {
        op_id: OpId,
    },
    /// Deletes the undo point of the operation `op_id`.
    ReleaseUndo {
        op_id: OpId,
    },
}

impl GuestOp {
    pub fn kind(&self) -> Kind {
        match self {
            GuestOp::Start => Kind::Start,
            GuestOp::Stop(_) => Kind::Stop,
            GuestOp::Reboot => Kind::Reboot,
            GuestOp::Snapshot(_) => Kind::Snapshot,
            GuestOp::Backup(_) => Kind::Backup,
            GuestOp::CreateContainer(_) => Kind::CreateContainer,
            GuestOp::SetConfig(_) => Kind::SetConfig,
            GuestOp::Rollback { .. } => Kind::Rollback,
            GuestOp::Restore { .. } => Kind::Restore,
            GuestOp::DeleteSnapshot { .. } => Kind::DeleteSnapshot,
            GuestOp::Destroy { .. } => Kind::Destroy,
            GuestOp::Undo { .. } => Kind::Undo,
            GuestOp::ReleaseUndo { .. } => Kind::ReleaseUndo,
        }
    }

    /// The operation's class, params included: the kind's class, except that a
    /// `set_config` that clears `protection` (false, 0 or null) is irreversible.
    pub fn class(&self) -> Grant {
        match self {
            GuestOp::SetConfig(p) if p.clears_protection() => Grant::Irreversible,
            op => op.kind().class(),
        }
    }
}

/// An operation on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOp {
    UsbMount {
        device: BlockDevicePath,
        name: MountName,
    },
    UsbUnmount {
        name: MountName,
    },
}

/// What a verified operation asks for, with its target and params typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Guest {
        target: Target,
        expect: Option<Expect>,
        op: GuestOp,
    },
    Host(HostOp),
}

impl Action {
    /// The least grant the operation needs ([`GuestOp::class`]; host operations are
    /// reversible).
    pub fn required_grant(&self) -> Grant {
        match self {
            Action::Guest { op, .. } => op.class(),
            Action::Host(_) => Grant::Reversible,
        }
    }
}

/// A verified, fully checked operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpPayload {
    pub op_id: OpId,
    pub agent_id: AgentId,
    pub node: String,
    pub not_before: u64,
    pub not_after: u64,
    pub kind: Kind,
    pub action: Action,
    pub grant: Grant,
    pub reason: String,
    /// The names of the distinct keys that counted.
    pub signers: Vec<String>,
    pub payload_sha256: [u8; 32],
}

/// A verified desired-state document. `guests` is checked by the agent's desired-state
/// parser (the same as for the desired file), not here.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPayload {
    pub agent_id: AgentId,
    pub node: String,
    pub generation: u64,
    pub guests: Vec<serde_json::Value>,
    pub signers: Vec<String>,
    pub payload_sha256: [u8; 32],
}

#[derive(Deserialize)]
struct VersionProbe {
    v: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOp<'a> {
    #[allow(dead_code)]
    v: u64,
    op_id: String,
    agent_id: String,
    node: String,
    not_before: u64,
    not_after: u64,
    op: String,
    #[serde(borrow)]
    target: &'a RawValue,
    #[serde(borrow)]
    params: &'a RawValue,
    #[serde(borrow)]
    expect: &'a RawValue,
    grant: Grant,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDesired {
    #[allow(dead_code)]
    v: u64,
    agent_id: String,
    node: String,
    generation: u64,
    guests: Vec<serde_json::Value>,
}

fn bad_payload(msg: impl Into<String>) -> Refusal {
    Refusal::new(Reason::BadPayload, msg)
}

fn invalid_params(msg: impl fmt::Display) -> Refusal {
    Refusal::new(Reason::InvalidParams, msg.to_string())
}

/// `v` first: a future version gets `unsupported_version`, not a complaint about a field
/// this agent has never heard of.
fn check_version(body: &[u8]) -> Result<(), Refusal> {
    let probe: VersionProbe = serde_json::from_slice(body)
        .map_err(|e| bad_payload(format!("payload is not a JSON object with a v: {e}")))?;
    match probe.v.as_u64() {
        Some(1) => Ok(()),
        _ if probe.v.is_number() => Err(Refusal::new(
            Reason::UnsupportedVersion,
            format!("payload version {} is not supported (1 is)", probe.v),
        )),
        _ => Err(bad_payload("v is not a number")),
    }
}

fn check_binding(agent_id: &str, node: &str, ctx: &Context) -> Result<(), Refusal> {
    if agent_id != ctx.agent_id.as_str() {
        return Err(Refusal::new(
            Reason::WrongAgent,
            format!(
                "for agent {:?}, this is {}",
                agent_id.chars().take(64).collect::<String>(),
                ctx.agent_id
            ),
        ));
    }
    if node != ctx.node {
        return Err(Refusal::new(
            Reason::WrongNode,
            format!(
                "for node {:?}, this is {:?}",
                node.chars().take(64).collect::<String>(),
                ctx.node
            ),
        ));
    }
    Ok(())
}

/// `not_before - skew <= now < not_after + skew`, `not_after - not_before <= max`.
fn check_window(nb: u64, na: u64, trust: &Trust, now: u64) -> Result<(), Refusal> {
    if na <= nb {
        return Err(bad_payload(format!(
            "not_after ({na}) is not after not_before ({nb})"
        )));
    }
    let max = trust.max_validity_seconds();
    if na - nb > max {
        return Err(Refusal::new(
            Reason::WindowTooLong,
            format!("valid for {} s, at most {max} s are accepted", na - nb),
        ));
    }
    let skew = trust.clock_skew_seconds() as u128;
    let (nb, na, now) = (nb as u128, na as u128, now as u128);
    if now + skew < nb {
        return Err(Refusal::new(
            Reason::NotYetValid,
            format!("valid from {nb}, now is {now} (skew {skew} s)"),
        ));
    }
    if now >= na + skew {
        return Err(Refusal::new(
            Reason::Expired,
            format!("valid until {na}, now is {now} (skew {skew} s)"),
        ));
    }
    Ok(())
}

fn params_of<T: for<'de> Deserialize<'de>>(kind: Kind, raw: &RawValue) -> Result<T, Refusal> {
    serde_json::from_str(raw.get())
        .map_err(|e| invalid_params(format!("params of {}: {e}", kind.as_str())))
}

/// Parses and checks a verified operation payload against this agent.
pub fn parse_op(v: &Verified, trust: &Trust, ctx: &Context) -> Result<OpPayload, Refusal> {
    check_version(&v.body)?;
    let raw: RawOp<'_> = serde_json::from_slice(&v.body)
        .map_err(|e| bad_payload(format!("operation payload: {e}")))?;
    let op_id = OpId::new(raw.op_id).map_err(bad_payload)?;
    if raw.reason.chars().count() > MAX_REASON_CHARS {
        return Err(bad_payload(format!(
            "reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    check_binding(&raw.agent_id, &raw.node, ctx)?;
    check_window(raw.not_before, raw.not_after, trust, ctx.now)?;
    let Some(kind) = Kind::parse(&raw.op) else {
        return Err(Refusal::new(
            Reason::UnknownOp,
            format!(
                "unknown operation {:?}",
                raw.op.chars().take(64).collect::<String>()
            ),
        ));
    };
    if raw.grant < kind.class() {
        return Err(Refusal::new(
            Reason::GrantMismatch,
            format!(
                "{} is {}, granted only {}",
                kind.as_str(),
                kind.class().as_str(),
                raw.grant.as_str()
            ),
        ));
    }
    let need = trust.threshold(raw.grant);
    if v.distinct_signers() < need {
        return Err(Refusal::new(
            Reason::BelowThreshold,
            format!(
                "grant {} needs {need} distinct keys, {} signed",
                raw.grant.as_str(),
                v.distinct_signers()
            ),
        ));
    }
    let target: Option<Target> = serde_json::from_str(raw.target.get())
        .map_err(|e| invalid_params(format!("target: {e}")))?;
    let expect: Option<Expect> = serde_json::from_str(raw.expect.get())
        .map_err(|e| invalid_params(format!("expect: {e}")))?;
    let action = if kind.is_guest() {
        let Some(target) = target else {
            return Err(invalid_params(format!(
                "{} needs a target guest",
                kind.as_str()
            )));
        };
        if let Some(r) = &ctx.scratch_vmids
            && r.contains(&target.vmid.get())
        {
            return Err(invalid_params(format!(
                "vmid {} is in the restore tests' scratch range",
                target.vmid
            )));
        }
        let op = match kind {
            Kind::Start => params_of::<NoParams>(kind, raw.params).map(|_| GuestOp::Start)?,
            Kind::Reboot => params_of::<NoParams>(kind, raw.params).map(|_| GuestOp::Reboot)?,
            Kind::Stop => GuestOp::Stop(params_of(kind, raw.params)?),
            Kind::Snapshot => GuestOp::Snapshot(params_of(kind, raw.params)?),
            Kind::Backup => GuestOp::Backup(params_of(kind, raw.params)?),
            Kind::CreateContainer => {
                let spec: PctCreateSpec = params_of(kind, raw.params)?;
                if target.guest_type != GuestType::Lxc {
                    return Err(invalid_params("create_container needs target type lxc"));
                }
                if spec.vmid != target.vmid {
                    return Err(invalid_params(format!(
                        "spec vmid {} is not the target's {}",
                        spec.vmid, target.vmid
                    )));
                }
                GuestOp::CreateContainer(Box::new(spec))
            }
            Kind::SetConfig => {
                let p: SetConfigParams = params_of(kind, raw.params)?;
                p.check_target(target.guest_type)
                    .map_err(|e| invalid_params(format!("params of set_config: {e}")))?;
                GuestOp::SetConfig(p)
            }
            Kind::Rollback => {
                let p: RollbackParams = params_of(kind, raw.params)?;
                GuestOp::Rollback {
                    snapshot: p.snapshot,
                    start: p.start,
                }
            }
            Kind::Restore => {
                let p: RestoreParams = params_of(kind, raw.params)?;
                if p.archive.guest_type() != target.guest_type {
                    return Err(invalid_params(format!(
                        "archive {} is a {} backup, the target is {}",
                        p.archive,
                        type_name(p.archive.guest_type()),
                        type_name(target.guest_type)
                    )));
                }
                GuestOp::Restore {
                    archive: p.archive,
                    storage: p.storage,
                    force: p.force,
                    start: p.start,
                }
            }
            Kind::DeleteSnapshot => {
                let p: DeleteSnapshotParams = params_of(kind, raw.params)?;
                GuestOp::DeleteSnapshot { name: p.name }
            }
            Kind::Destroy => {
                let p: DestroyParams = params_of(kind, raw.params)?;
                GuestOp::Destroy { purge: p.purge }
            }
            Kind::Undo => {
                let p: UndoParams = params_of(kind, raw.params)?;
                GuestOp::Undo { op_id: p.op_id }
            }
            Kind::ReleaseUndo => {
                let p: UndoParams = params_of(kind, raw.params)?;
                GuestOp::ReleaseUndo { op_id: p.op_id }
            }
            Kind::UsbMount | Kind::UsbUnmount => unreachable_host(kind)?,
        };
        Action::Guest { target, expect, op }
    } else {
        if target.is_some() {
            return Err(invalid_params(format!(
                "{} is a host operation: target must be null",
                kind.as_str()
            )));
        }
        if expect.is_some() {
            return Err(invalid_params(format!(
                "{} is a host operation: expect must be null",
                kind.as_str()
            )));
        }
        Action::Host(match kind {
            Kind::UsbMount => {
                let p: UsbMountParams = params_of(kind, raw.params)?;
                HostOp::UsbMount {
                    device: p.device,
                    name: p.name,
                }
            }
            Kind::UsbUnmount => {
                let p: UsbUnmountParams = params_of(kind, raw.params)?;
                HostOp::UsbUnmount { name: p.name }
            }
            _ => return Err(invalid_params("not a host operation")),
        })
    };
    let need = action.required_grant();
    if raw.grant < need {
        return Err(Refusal::new(
            Reason::GrantMismatch,
            format!(
                "this {} is {} ({}), granted only {}",
                kind.as_str(),
                need.as_str(),
                why_class(&action),
                raw.grant.as_str()
            ),
        ));
    }
    Ok(OpPayload {
        op_id,
        agent_id: ctx.agent_id.clone(),
        node: raw.node,
        not_before: raw.not_before,
        not_after: raw.not_after,
        kind,
        action,
        grant: raw.grant,
        reason: raw.reason,
        signers: v.signers.clone(),
        payload_sha256: v.payload_sha256,
    })
}

fn type_name(t: GuestType) -> &'static str {
    match t {
        GuestType::Lxc => "lxc",
        GuestType::Qemu => "qemu",
    }
}

/// Why an operation's class is above its kind's (for the `grant_mismatch` message).
fn why_class(action: &Action) -> &'static str {
    match action {
        Action::Guest {
            op: GuestOp::SetConfig(p),
            ..
        } if p.clears_protection() => "it clears protection",
        _ => "its kind",
    }
}

/// `is_guest` is false for the usb kinds, so this arm is never taken; it still answers
/// with a refusal rather than a panic.
fn unreachable_host(kind: Kind) -> Result<GuestOp, Refusal> {
    Err(invalid_params(format!(
        "{} is not a guest operation",
        kind.as_str()
    )))
}

/// Parses and checks a verified desired-state payload against this agent. The
/// generation's monotonicity is the agent's check (it knows the applied one).
pub fn parse_desired(v: &Verified, ctx: &Context) -> Result<DesiredPayload, Refusal> {
    check_version(&v.body)?;
    let raw: RawDesired = serde_json::from_slice(&v.body)
        .map_err(|e| bad_payload(format!("desired-state payload: {e}")))?;
    check_binding(&raw.agent_id, &raw.node, ctx)?;
    Ok(DesiredPayload {
        agent_id: ctx.agent_id.clone(),
        node: raw.node,
        generation: raw.generation,
        guests: raw.guests,
        signers: v.signers.clone(),
        payload_sha256: v.payload_sha256,
    })
}
