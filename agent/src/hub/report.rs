//! The wire types of the hub contract: [`HostReport`] (agent → hub) and the pieces it is
//! made of. `docs/hub-contract.md` explains them; `docs/hub-report.schema.json` is
//! generated from these types ([`report_schema`]) and a test keeps the file equal to it.
//!
//! Rules every type here follows, so the schema says exactly what is sent:
//! - every field is always serialized; a value that could not be read is `null`, never
//!   absent (the schema marks every property required);
//! - no unknown fields (`additionalProperties: false`): any change to these types is a
//!   schema change, and one that removes or renames a field bumps [`SCHEMA_VERSION`];
//! - units are in the field name (`_bytes`, `_seconds`, `_c`, `_hours`).
//!
//! The `reconcile` section is the engine's own type ([`crate::reconcile::status`]) and
//! [`Timestamp`] is a shared leaf ([`crate::timestamp`]): the report embeds and re-exports
//! them, and the rules above hold for them too (the schema test walks them).
//!
//! Must never: carry a secret (the report goes to the hub in the clear inside TLS and is
//! stored there), or anything the hub could mistake for a command.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use crate::reconcile::status::{FailingAction, ReconcileAction, ReconcileReport, SkippedGuest};
pub use crate::timestamp::Timestamp;

/// The report's `schema_version`.
pub const SCHEMA_VERSION: u32 = 1;

/// One heartbeat: everything the agent could read about its host this cycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "HostReport",
    description = "The agent's heartbeat report, POSTed to <hub.url>/api/agent/v1/report."
)]
pub struct HostReport {
    /// Always 1 for this contract.
    #[schemars(extend("const" = 1))]
    pub schema_version: u32,
    /// The agent's version (`felhom-agent --version`).
    pub agent_version: String,
    /// This host's identity for signed operations: 32 lower-case hex characters (128
    /// random bits), created once in `state_dir/agent-id` or set in the config. Node names
    /// repeat across clusters; this does not.
    #[schemars(regex(pattern = r"^[0-9a-f]{32}$"))]
    pub agent_id: String,
    /// The Proxmox node name this agent runs on (config `node`).
    pub node: String,
    /// When the agent sent this report (RFC 3339, UTC).
    pub sent_at: Timestamp,
    /// What could not be collected this cycle. Empty when everything was read.
    pub errors: Vec<CollectError>,
    /// The host; `null` when Proxmox could not be reached (the agent itself is alive).
    pub host: Option<HostInfo>,
    /// Every guest on the node; empty when Proxmox could not be reached.
    pub guests: Vec<GuestReport>,
    pub cloudflared: CloudflaredReport,
    /// Storages of the node as PVE lists them.
    pub storage: Vec<StorageReport>,
    /// Backup volumes on every active storage whose content includes `backup`.
    pub backups: Vec<BackupReport>,
    /// The Proxmox Backup Server storages and their state.
    pub pbs: Vec<PbsReport>,
    /// Restore tests finished since the last report the hub accepted, in order (each is
    /// sent until a report carrying it is accepted).
    pub restore_tests: Vec<RestoreTestReport>,
    /// The privileged helper's audit records since the last report the hub accepted, in
    /// order, verbatim (each is the exact JSON text of one audit-log line).
    pub audit: Vec<AuditRecord>,
    /// The reconcile engine's state; `null` when the engine is not running.
    pub reconcile: Option<ReconcileReport>,
    /// Signed operations on this host.
    pub ops: OpsReport,
}

/// Signed operations on this host: whether they are on, and which operator keys it trusts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpsReport {
    /// True when the signers file is present, safely owned and valid; false when it is
    /// absent or not safely owned (`felhom-agent status` on the host says why).
    pub enabled: bool,
    /// The names of the trusted keys, as in `signers.json`; empty when off.
    pub signers: Vec<String>,
    /// Accepted operations without their final decision yet, in the order received.
    pub held: Vec<crate::ops::wire::HeldOp>,
    /// Decisions the hub has not accepted yet (by `POST /ops/result` or in an accepted
    /// report), oldest first, at most 100; once a report carrying them is accepted they
    /// are not sent again (the cursor moves past their `seq`).
    pub pending_results: Vec<crate::ops::wire::OpResult>,
    /// The undo points the reversibility gate keeps (oldest first): each stays on the node
    /// until operators release it (a signed `release_undo`, or `felhom-agent ops release`
    /// on the host); the agent never removes one on its own.
    pub undo_points: Vec<crate::ops::wire::UndoPointReport>,
}

impl OpsReport {
    /// Off, no signers.
    pub fn disabled() -> OpsReport {
        OpsReport {
            enabled: false,
            signers: Vec::new(),
            held: Vec::new(),
            pending_results: Vec::new(),
            undo_points: Vec::new(),
        }
    }

    /// What `state` allows.
    pub fn from_trust(state: &crate::ops::TrustState) -> OpsReport {
        match state.trust() {
            Some(t) => OpsReport {
                enabled: true,
                signers: t.names().into_iter().map(str::to_owned).collect(),
                held: Vec::new(),
                pending_results: Vec::new(),
                undo_points: Vec::new(),
            },
            None => OpsReport::disabled(),
        }
    }
}

impl HostReport {
    /// An empty report for the agent `agent_id` on `node`: no host, no guests, cloudflared
    /// `unknown`. The collector fills it in.
    pub fn new(agent_id: &crate::ops::AgentId, node: &str) -> HostReport {
        HostReport {
            schema_version: SCHEMA_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            agent_id: agent_id.to_string(),
            node: node.to_owned(),
            sent_at: Timestamp::now(),
            errors: Vec::new(),
            host: None,
            guests: Vec::new(),
            cloudflared: CloudflaredReport {
                state: CloudflaredState::Unknown,
                ready_connections: None,
                connector_id: None,
            },
            storage: Vec::new(),
            backups: Vec::new(),
            pbs: Vec::new(),
            restore_tests: Vec::new(),
            audit: Vec::new(),
            reconcile: None,
            ops: OpsReport::disabled(),
        }
    }
}

/// Something that could not be collected. `component` and `kind` are for machines,
/// `message` for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectError {
    pub component: Component,
    /// What the error is about inside the component (a vmid, a device, a storage id), if
    /// it concerns one item only.
    pub subject: Option<String>,
    pub kind: ErrorKind,
    pub message: String,
}

/// Which part of the collection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The node itself (`/version`, node status, guest lists): `host` is `null`.
    Proxmox,
    /// One guest's status or config: that guest is `unknown`.
    Guest,
    Storage,
    Backups,
    Smart,
    Sensors,
    Cloudflared,
    Audit,
    Reconcile,
    /// Signed operations: the reversibility gate's undo points.
    Ops,
}

/// The class of a collection error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Could not connect, or the connection broke.
    Unreachable,
    /// No answer within the deadline.
    Timeout,
    /// Authentication failed (bad or expired token).
    Auth,
    /// Authenticated but not allowed (PVE 403).
    Permission,
    /// The other side answered with an error status.
    Http,
    /// An answer that could not be understood.
    Decode,
    /// A local file or socket error.
    Io,
    /// Data is missing or inconsistent (e.g. audit records rotated away before they were sent).
    Integrity,
    /// The undo points kept on a storage (`subject`) use more of it than
    /// `gate.undo_warn_fraction`; operators should release those no longer needed.
    UndoSpace,
    Other,
}

/// The host's numbers, from Proxmox plus the agent's own SMART and hwmon readers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    /// From `GET /version` (`version`, e.g. `8.4.1`); `null` if that call failed.
    pub pve_version: Option<String>,
    /// The running kernel from node status (`current-kernel.release` on PVE ≥ 8.1,
    /// else `kversion`).
    pub kernel: Option<String>,
    pub uptime_seconds: u64,
    pub cpu: CpuInfo,
    pub memory: UsageBytes,
    pub rootfs: UsageBytes,
    /// SMART data, read on its own slower schedule (see each entry's `read_at`).
    pub disks: Vec<DiskReport>,
    /// hwmon temperatures.
    pub sensors: Vec<SensorReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CpuInfo {
    /// Fraction 0–1 of all CPUs, as PVE gives it.
    pub usage: f64,
    /// Logical CPUs (PVE `cpuinfo.cpus`).
    pub cores: u32,
    /// 1, 5 and 15 minute load averages (PVE sends strings; these are numbers).
    pub loadavg: Vec<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageBytes {
    pub total_bytes: u64,
    pub used_bytes: u64,
}

/// One disk's SMART summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskReport {
    /// Kernel name, e.g. `sda`, `nvme0n1`.
    pub device: String,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub health: DiskHealth,
    pub temperature_c: Option<i64>,
    pub power_on_hours: Option<u64>,
    /// ATA attribute 5 (Reallocated_Sector_Ct) raw value; `null` for NVMe.
    pub reallocated_sectors: Option<u64>,
    /// NVMe `media_errors`; ATA attribute 187 (Reported_Uncorrect), else 198
    /// (Offline_Uncorrectable) raw value.
    pub media_errors: Option<u64>,
    /// When this disk was last read (SMART runs on its own schedule, not every cycle).
    pub read_at: Timestamp,
}

impl DiskReport {
    /// A disk known by name only: nothing read from it yet (health `unknown`).
    pub fn unread(device: &str, read_at: Timestamp) -> DiskReport {
        DiskReport {
            device: device.to_owned(),
            model: None,
            serial: None,
            health: DiskHealth::Unknown,
            temperature_c: None,
            power_on_hours: None,
            reallocated_sectors: None,
            media_errors: None,
            read_at,
        }
    }
}

/// SMART overall health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskHealth {
    /// SMART overall-health self-assessment passed.
    Passed,
    /// The disk says it is failing (`smart_status.passed == false`).
    Failed,
    /// The disk was asleep and was not woken to read it.
    Standby,
    /// Could not be read (see `errors`).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SensorReport {
    /// hwmon chip name, e.g. `coretemp`, `nvme`.
    pub chip: String,
    pub label: String,
    pub temperature_c: f64,
}

/// One guest (LXC container or QEMU VM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestReport {
    pub vmid: u32,
    #[serde(rename = "type")]
    pub guest_type: GuestType,
    pub name: String,
    pub status: GuestStatus,
    pub ha_managed: bool,
    /// PVE's config lock (`backup`, `snapshot`, …), if any.
    pub lock: Option<String>,
    pub template: bool,
    /// The normalized config (the fields the reconcile side manages, under Proxmox's
    /// names); `null` when the config could not be read (then `status` is `unknown`).
    pub spec: Option<GuestSpec>,
    /// Its last passed restore test; `null` when none passed (or none ran).
    pub restore_proof: Option<RestoreProof>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuestType {
    Lxc,
    Qemu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuestStatus {
    Running,
    Stopped,
    /// The guest is listed but its status or config could not be read.
    Unknown,
}

/// The managed subset of a guest's config, normalized by the reconcile side's rules
/// (`reconcile::normalize`) so Proxmox's round-trip quirks (0/1 booleans, string numbers,
/// `\n`-suffixed descriptions, unsorted tags, absent defaults) do not show: an absent key
/// carries PVE's default, so equal configs give equal specs. Keys are Proxmox's; a field
/// that does not exist for the guest's type is `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    /// MiB (absent in PVE: 512).
    pub memory: u64,
    /// MiB; LXC only.
    pub swap: Option<u64>,
    /// `null` when not set (an LXC container then uses all host cores; QEMU's default is 1).
    pub cores: Option<u64>,
    /// Decimal as PVE writes it (`"1.5"`); `"0"` is unlimited.
    pub cpulimit: String,
    pub onboot: bool,
    /// Trailing newlines removed, `\n` line endings; `""` when none.
    pub description: String,
    /// Lower-cased, sorted, de-duplicated.
    pub tags: Vec<String>,
    /// LXC only; `null` when not set.
    pub hostname: Option<String>,
    /// LXC only: the `nesting` flag of `features`.
    pub nesting: Option<bool>,
}

/// cloudflared's readiness, from `GET <cloudflared.metrics_url>/ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudflaredReport {
    pub state: CloudflaredState,
    pub ready_connections: Option<u32>,
    pub connector_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CloudflaredState {
    /// HTTP 200: at least one edge connection.
    Ready,
    /// HTTP 503: running, no edge connection.
    NotReady,
    /// Connection refused: not running (or not on this address).
    Down,
    /// Anything else (404, timeout, garbage).
    Unknown,
}

/// One storage as `GET /nodes/{node}/storage` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StorageReport {
    pub id: String,
    /// PVE storage type (`dir`, `lvmthin`, `zfspool`, `nfs`, `pbs`, …).
    #[serde(rename = "type")]
    pub storage_type: String,
    /// Content types, sorted (`backup`, `images`, `rootdir`, …).
    pub content: Vec<String>,
    pub active: bool,
    /// `null` while the storage is inactive (PVE leaves the numbers out).
    pub total_bytes: Option<u64>,
    pub used_bytes: Option<u64>,
    pub avail_bytes: Option<u64>,
}

/// One backup volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupReport {
    pub volid: String,
    pub storage: String,
    pub vmid: Option<u32>,
    /// Creation time, seconds since the epoch (as PVE gives it).
    pub ctime: Option<i64>,
    pub size_bytes: Option<u64>,
    /// e.g. `tar.zst`, `vma.zst`, `pbs-ct`.
    pub format: Option<String>,
    pub protected: bool,
    /// PBS verification state, if the backup has been verified.
    pub verification: Option<BackupVerification>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupVerification {
    /// `ok` or `failed`, as PBS reports it.
    pub state: String,
    pub upid: Option<String>,
}

/// A Proxmox Backup Server storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PbsReport {
    pub id: String,
    pub state: PbsState,
    pub total_bytes: Option<u64>,
    pub used_bytes: Option<u64>,
    pub avail_bytes: Option<u64>,
    /// Backups listed on it this cycle; `null` when the listing failed or it is inactive.
    pub backup_count: Option<u64>,
    /// `ctime` of its newest backup.
    pub newest_backup_ctime: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PbsState {
    /// Reachable: PVE reports it active.
    Active,
    /// Configured and enabled, but PVE could not activate it (server down, auth, …).
    Inactive,
}

/// One finished restore test: the guest's newest backup restored into a scratch guest
/// (network detached), started, checked and destroyed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreTestReport {
    /// The guest whose backup was tested.
    pub vmid: u32,
    /// The backup volume (`local:backup/vzdump-lxc-101-….tar.zst`); `null` when the guest
    /// had none.
    pub archive: Option<String>,
    /// When the archive was made (its `ctime`).
    pub archive_ctime: Option<Timestamp>,
    /// The scratch vmid it was restored into; `null` when it was skipped before that.
    pub scratch_vmid: Option<u32>,
    pub started_at: Timestamp,
    pub duration_seconds: f64,
    /// How long the restore task took.
    pub restore_seconds: Option<f64>,
    /// From the start request until the guest ran (and its agent answered).
    pub boot_seconds: Option<f64>,
    pub result: RestoreTestResult,
    /// Why it failed or was skipped; `null` when it passed.
    pub reason: Option<String>,
    /// The Proxmox tasks of the test (restore, start, stop, destroy).
    pub upids: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestoreTestResult {
    Passed,
    Failed,
    Skipped,
}

/// A guest's last passed restore test: "proven restorable".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreProof {
    /// The backup volume that restored and booted.
    pub archive: String,
    pub passed_at: Timestamp,
}

/// One line of the helper's audit log, sent byte for byte as the helper wrote it (minus
/// the `\n`), so the hub can re-check the `prev` SHA-256 chain. Holds valid JSON with an
/// integer `seq` (checked when read).
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AuditRecord(Box<RawValue>);

impl AuditRecord {
    /// Wraps one audit-log line (without its `\n`). The text must be JSON; callers check
    /// `seq` themselves.
    pub fn from_line(line: &str) -> Result<Self, serde_json::Error> {
        RawValue::from_string(line.to_owned()).map(AuditRecord)
    }

    /// The exact text of the line.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl fmt::Debug for AuditRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AuditRecord").field(&self.0.get()).finish()
    }
}

impl PartialEq for AuditRecord {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl JsonSchema for AuditRecord {
    fn schema_name() -> Cow<'static, str> {
        "AuditRecord".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "One audit-log line of felhom-privhelper, verbatim. Its fields are the helper's; `seq` counts 1, 2, 3 … across rotation and `prev` is the hex SHA-256 of the previous line's bytes.",
            "type": "object",
            "required": ["seq"],
            "properties": {
                "seq": { "type": "integer", "minimum": 1 },
                "prev": { "type": "string" }
            }
        })
    }
}

/// The JSON Schema (draft 2020-12) of [`HostReport`], describing what the agent sends.
pub fn report_schema() -> serde_json::Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator();
    generator.into_root_schema_for::<HostReport>().to_value()
}

/// The JSON Schema of [`super::envelope::ControlEnvelope`], describing what the agent
/// accepts.
pub fn envelope_schema() -> serde_json::Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .for_deserialize()
        .into_generator();
    generator
        .into_root_schema_for::<super::envelope::ControlEnvelope>()
        .to_value()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn the_ops_section_follows_the_trust() {
        use crate::ops::TrustState;
        let path = PathBuf::from("/etc/felhom/signers.json");
        assert_eq!(
            OpsReport::from_trust(&TrustState::Disabled { path: path.clone() }),
            OpsReport::disabled()
        );
        assert_eq!(
            OpsReport::from_trust(&TrustState::Untrusted {
                path: path.clone(),
                reason: felhom_authz::FileCheckError::NotRootOwned(1000),
            }),
            OpsReport::disabled()
        );
        // RFC 8032 test 1 and 2 public keys; the first under two names.
        let trust = felhom_authz::Trust::from_json(
            br#"{"keys": [{"name": "alice", "ed25519": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="},
                          {"name": "alice2", "ed25519": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="},
                          {"name": "bob", "ed25519": "PUAXw+hDiVqStwqnTRt+vJyYLM8uxJaMwM1V8Sr0Zgw="}],
                 "threshold": {"reversible": 1, "irreversible": 2}}"#,
        )
        .unwrap();
        let ops = OpsReport::from_trust(&TrustState::Enabled {
            path,
            trust: std::sync::Arc::new(trust),
        });
        assert!(ops.enabled);
        assert_eq!(ops.signers, ["alice", "alice2", "bob"]);
    }

    /// The published schema files must equal what the types generate. Regenerate with
    /// `FELHOM_UPDATE_SCHEMA=1 cargo test -p felhom-agent --lib published_schemas`.
    #[test]
    fn published_schemas_match_the_types() {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs");
        for (file, schema) in [
            ("hub-report.schema.json", report_schema()),
            ("hub-envelope.schema.json", envelope_schema()),
        ] {
            let path = docs.join(file);
            let mut generated = serde_json::to_string_pretty(&schema).unwrap();
            generated.push('\n');
            if std::env::var_os("FELHOM_UPDATE_SCHEMA").is_some() {
                std::fs::write(&path, &generated).unwrap();
            }
            let published = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                published == generated,
                "{} is out of date; regenerate it with FELHOM_UPDATE_SCHEMA=1 cargo test -p felhom-agent --lib published_schemas",
                path.display()
            );
        }
    }

    #[test]
    fn every_property_is_required_and_closed() {
        // Walk every object schema: all properties required, no unknown ones allowed.
        fn walk(v: &serde_json::Value, path: &str) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                let required: Vec<&str> = v["required"]
                    .as_array()
                    .map(|r| r.iter().filter_map(|x| x.as_str()).collect())
                    .unwrap_or_default();
                let is_audit = path.ends_with("AuditRecord");
                for k in props.keys() {
                    assert!(
                        is_audit || required.contains(&k.as_str()),
                        "{path}.{k} not required"
                    );
                }
                if !is_audit {
                    assert_eq!(v["additionalProperties"], false, "{path} is open");
                }
            }
            match v {
                serde_json::Value::Object(m) => {
                    m.iter().for_each(|(k, x)| walk(x, &format!("{path}/{k}")))
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, path)),
                _ => {}
            }
        }
        walk(&report_schema(), "#");
    }

    #[test]
    fn audit_records_are_sent_byte_for_byte() {
        let line = r#"{"seq":7,  "prev":"ab","op":"smart_read","args":{"b":1.50,"a":"é"}}"#;
        let rec = AuditRecord::from_line(line).unwrap();
        let out = serde_json::to_string(&vec![rec.clone()]).unwrap();
        assert_eq!(out, format!("[{line}]"));
        let back: Vec<AuditRecord> = serde_json::from_str(&out).unwrap();
        assert_eq!(back[0].as_str(), line);
        assert!(AuditRecord::from_line("{torn").is_err());
    }
}
