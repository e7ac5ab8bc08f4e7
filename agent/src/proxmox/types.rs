//! Typed answers of the PVE endpoints the agent reads. Unknown fields are ignored, optional
//! fields are `Option` (PVE leaves them out rather than sending null), and the deserializers
//! in [`super::de`] accept PVE's strings-for-numbers and 0/1 booleans.

use std::fmt;

use felhom_protocol::Vmid;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::de;
use super::error::ProxmoxError;
use super::upid::{Upid, UpidError};

/// The two guest kinds; they share most endpoints under `/lxc` or `/qemu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    Lxc,
    Qemu,
}

impl GuestKind {
    /// The path segment: `lxc` or `qemu`.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestKind::Lxc => "lxc",
            GuestKind::Qemu => "qemu",
        }
    }
}

impl fmt::Display for GuestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /version` (and `/nodes/{node}/version`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Version {
    /// `8.0.3` (PVE ≥ 8) or `7.4-16`.
    pub version: String,
    /// `8.0`
    pub release: String,
    pub repoid: String,
    #[serde(default)]
    pub console: Option<String>,
}

/// One item of `GET /nodes`. The numbers are absent for offline nodes or without
/// `Sys.Audit`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NodeListItem {
    pub node: String,
    /// `online`, `offline` or `unknown`.
    pub status: String,
    #[serde(default)]
    pub ssl_fingerprint: Option<String>,
    #[serde(default, deserialize_with = "de::opt_f64")]
    pub cpu: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub maxcpu: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub mem: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub maxmem: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub disk: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub maxdisk: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub uptime: Option<u64>,
    #[serde(default)]
    pub level: Option<String>,
}

/// `{total, used, free, available?}` in bytes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct MemoryInfo {
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub total: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub used: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub free: Option<u64>,
    /// PVE 9 and later.
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub available: Option<u64>,
    /// `rootfs` only.
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub avail: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CpuInfo {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub sockets: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub cores: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub cpus: Option<u64>,
    /// A string on the wire (`"3400.000"`).
    #[serde(default, deserialize_with = "de::opt_f64")]
    pub mhz: Option<f64>,
    /// A string on the wire (`"1"`).
    #[serde(default, deserialize_with = "de::opt_bool01")]
    pub hvm: Option<bool>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub user_hz: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BootInfo {
    /// `efi` or `legacy-bios`.
    pub mode: String,
    #[serde(default, deserialize_with = "de::opt_bool01")]
    pub secureboot: Option<bool>,
}

/// `current-kernel` of node status (PVE 8.1 and later): `uname(2)`'s fields.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct KernelInfo {
    /// `Linux`
    #[serde(default)]
    pub sysname: Option<String>,
    /// `6.8.12-4-pve`
    pub release: String,
    /// `#1 SMP PREEMPT_DYNAMIC PMX 6.8.12-4 (2024-11-06T15:04Z)`
    #[serde(default)]
    pub version: Option<String>,
    /// `x86_64`
    #[serde(default)]
    pub machine: Option<String>,
}

/// `GET /nodes/{node}/status`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NodeStatus {
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub uptime: Option<u64>,
    /// Sent as strings.
    #[serde(default, deserialize_with = "de::f64_list")]
    pub loadavg: Vec<f64>,
    /// `Linux 6.8.12-4-pve #1 SMP …` (sysname, release and version joined).
    #[serde(default)]
    pub kversion: Option<String>,
    /// PVE 8.1 and later: the same kernel, field by field.
    #[serde(default, rename = "current-kernel")]
    pub current_kernel: Option<KernelInfo>,
    #[serde(default, deserialize_with = "de::opt_f64")]
    pub cpu: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_f64")]
    pub wait: Option<f64>,
    #[serde(default)]
    pub memory: MemoryInfo,
    #[serde(default)]
    pub swap: MemoryInfo,
    #[serde(default)]
    pub rootfs: MemoryInfo,
    #[serde(default)]
    pub cpuinfo: Option<CpuInfo>,
    /// `pve-manager/8.0.3/bbf3993334bfa916`
    #[serde(default)]
    pub pveversion: Option<String>,
    /// PVE 8.1 and later.
    #[serde(default, rename = "boot-info")]
    pub boot_info: Option<BootInfo>,
}

/// A guest's run state. PVE knows `running` and `stopped`; anything else is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum RunState {
    Running,
    Stopped,
    Other(String),
}

impl From<String> for RunState {
    fn from(s: String) -> Self {
        match s.as_str() {
            "running" => RunState::Running,
            "stopped" => RunState::Stopped,
            _ => RunState::Other(s),
        }
    }
}

impl From<RunState> for String {
    fn from(s: RunState) -> String {
        s.as_str().to_string()
    }
}

impl RunState {
    pub fn as_str(&self) -> &str {
        match self {
            RunState::Running => "running",
            RunState::Stopped => "stopped",
            RunState::Other(s) => s,
        }
    }
}

/// One item of `GET /nodes/{node}/lxc` or `/qemu`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct GuestListItem {
    /// A string before PVE 8.2 (LXC); both accepted.
    #[serde(deserialize_with = "de::vmid")]
    pub vmid: Vmid,
    pub status: RunState,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "de::opt_f64")]
    pub cpus: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_f64")]
    pub cpu: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub mem: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub maxmem: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub maxswap: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub disk: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub maxdisk: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub uptime: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub pid: Option<u64>,
    /// The raw `;`-joined tag string.
    #[serde(default)]
    pub tags: Option<String>,
    #[serde(default)]
    pub lock: Option<String>,
    #[serde(default, deserialize_with = "de::bool01")]
    pub template: bool,
}

/// The `ha` object of `status/current`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct HaStatus {
    #[serde(default, deserialize_with = "de::bool01")]
    pub managed: bool,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
}

/// `GET /nodes/{node}/{lxc|qemu}/{vmid}/status/current`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct GuestStatus {
    #[serde(deserialize_with = "de::vmid")]
    pub vmid: Vmid,
    pub status: RunState,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub ha: HaStatus,
    #[serde(default)]
    pub lock: Option<String>,
    #[serde(default, deserialize_with = "de::bool01")]
    pub template: bool,
    #[serde(default)]
    pub tags: Option<String>,
    #[serde(default, deserialize_with = "de::opt_f64")]
    pub cpus: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_f64")]
    pub cpu: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub mem: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub maxmem: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub maxdisk: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub uptime: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub pid: Option<u64>,
    /// QEMU only: `running`, `paused`, `prelaunch`, …
    #[serde(default)]
    pub qmpstatus: Option<String>,
}

impl GuestStatus {
    pub fn is_running(&self) -> bool {
        self.status == RunState::Running
    }
}

/// `GET /nodes/{node}/{lxc|qemu}/{vmid}/config`: every key kept raw, plus typed accessors.
///
/// Raw because the reconcile side normalizes values itself (description newlines, net0
/// key order, tag sorting, …); the accessors only type what PVE sends.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(transparent)]
pub struct GuestConfig {
    raw: Map<String, Value>,
}

impl GuestConfig {
    pub fn from_raw(raw: Map<String, Value>) -> Self {
        GuestConfig { raw }
    }
    pub fn raw(&self) -> &Map<String, Value> {
        &self.raw
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key)
    }

    fn bad(key: &str, v: &Value, want: &str) -> ProxmoxError {
        ProxmoxError::BadConfigValue {
            key: key.to_string(),
            detail: format!("expected {want}, found {v}"),
        }
    }

    /// An integer key (sent as a number, tolerated as a numeric string).
    pub fn u64(&self, key: &str) -> Result<Option<u64>, ProxmoxError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| Self::bad(key, &self.raw[key], "a whole number")),
            Some(v @ Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| Self::bad(key, v, "a whole number")),
            Some(v) => Err(Self::bad(key, v, "a whole number")),
        }
    }

    /// A schema-`number` key (sent as a string: `"1.5"`).
    pub fn f64(&self, key: &str) -> Result<Option<f64>, ProxmoxError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(v @ Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| Self::bad(key, v, "a number")),
            Some(v) => Err(Self::bad(key, v, "a number")),
        }
    }

    /// A 0/1 boolean key; absent is `None` (the schema default applies).
    pub fn bool(&self, key: &str) -> Result<Option<bool>, ProxmoxError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => de::value_to_bool(v)
                .map(Some)
                .ok_or_else(|| Self::bad(key, v, "0 or 1")),
        }
    }

    /// A string key (property strings are strings too).
    pub fn str(&self, key: &str) -> Result<Option<&str>, ProxmoxError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Self::bad(key, v, "a string")),
        }
    }

    /// MiB.
    pub fn memory(&self) -> Result<Option<u64>, ProxmoxError> {
        self.u64("memory")
    }
    /// MiB.
    pub fn swap(&self) -> Result<Option<u64>, ProxmoxError> {
        self.u64("swap")
    }
    pub fn cores(&self) -> Result<Option<u64>, ProxmoxError> {
        self.u64("cores")
    }
    pub fn cpulimit(&self) -> Result<Option<f64>, ProxmoxError> {
        self.f64("cpulimit")
    }
    pub fn onboot(&self) -> Result<Option<bool>, ProxmoxError> {
        self.bool("onboot")
    }
    /// As PVE returns it: each line with a trailing `\n`.
    pub fn description(&self) -> Result<Option<&str>, ProxmoxError> {
        self.str("description")
    }
    /// The raw `;`-joined string.
    pub fn tags(&self) -> Result<Option<&str>, ProxmoxError> {
        self.str("tags")
    }
    pub fn hostname(&self) -> Result<Option<&str>, ProxmoxError> {
        self.str("hostname")
    }
    /// Verbatim as written (not re-printed by PVE).
    pub fn features(&self) -> Result<Option<&str>, ProxmoxError> {
        self.str("features")
    }
    pub fn net0(&self) -> Result<Option<&str>, ProxmoxError> {
        self.str("net0")
    }
    pub fn digest(&self) -> Result<Option<&str>, ProxmoxError> {
        self.str("digest")
    }
    pub fn lock(&self) -> Result<Option<&str>, ProxmoxError> {
        self.str("lock")
    }
    /// The raw `lxc.*` lines, as `[key, value]` pairs.
    pub fn lxc_raw(&self) -> Result<Vec<(String, String)>, ProxmoxError> {
        let Some(v) = self.raw.get("lxc") else {
            return Ok(Vec::new());
        };
        let Value::Array(items) = v else {
            return Err(Self::bad("lxc", v, "an array of [key, value] pairs"));
        };
        items
            .iter()
            .map(|item| match item.as_array().map(Vec::as_slice) {
                Some([Value::String(k), Value::String(v)]) => Ok((k.clone(), v.clone())),
                _ => Err(Self::bad("lxc", item, "a [key, value] pair of strings")),
            })
            .collect()
    }
}

/// One item of `GET .../snapshot`. The last item is the `current` pseudo-snapshot.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SnapshotItem {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default, deserialize_with = "de::opt_i64")]
    pub snaptime: Option<i64>,
    #[serde(default)]
    pub parent: Option<String>,
    /// `prepare` or `delete` while an operation is half done.
    #[serde(default)]
    pub snapstate: Option<String>,
    /// `current` only.
    #[serde(default, deserialize_with = "de::opt_bool01")]
    pub running: Option<bool>,
    /// `current` only.
    #[serde(default)]
    pub digest: Option<String>,
    /// QEMU only.
    #[serde(default, deserialize_with = "de::bool01")]
    pub vmstate: bool,
}

impl SnapshotItem {
    /// The `current` pseudo-snapshot ("You are here!").
    pub fn is_current(&self) -> bool {
        self.name == "current"
    }
}

/// One item of `GET /nodes/{node}/storage`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct StorageItem {
    pub storage: String,
    #[serde(rename = "type")]
    pub storage_type: String,
    /// Comma list, unordered (`rootdir,images`).
    #[serde(default)]
    pub content: String,
    #[serde(default, deserialize_with = "de::opt_bool01")]
    pub active: Option<bool>,
    #[serde(default, deserialize_with = "de::opt_bool01")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "de::opt_bool01")]
    pub shared: Option<bool>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub total: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub used: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub avail: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_f64")]
    pub used_fraction: Option<f64>,
}

impl StorageItem {
    pub fn contents(&self) -> impl Iterator<Item = &str> {
        self.content
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }
}

/// One item of `GET /nodes/{node}/storage/{storage}/content?content=backup`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BackupItem {
    /// `local:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst`
    pub volid: String,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub format: Option<String>,
    /// `lxc` or `qemu`.
    #[serde(default)]
    pub subtype: Option<String>,
    #[serde(default, deserialize_with = "de::opt_vmid")]
    pub vmid: Option<Vmid>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub size: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_i64")]
    pub ctime: Option<i64>,
    #[serde(default)]
    pub notes: Option<String>,
    #[serde(default, deserialize_with = "de::bool01")]
    pub protected: bool,
    /// The last verification, only on Proxmox Backup Server storages (PBS verify jobs).
    #[serde(default)]
    pub verification: Option<BackupVerification>,
}

/// `verification` of a backup item: `{state, upid}` as PBS reports its last verify task.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct BackupVerification {
    /// `ok` or `failed`.
    pub state: String,
    /// The PBS verify task (a PBS UPID, not a PVE one: kept as text).
    #[serde(default)]
    pub upid: Option<String>,
}

/// `running` or `stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Running,
    Stopped,
}

/// How a stopped task ended, from its exit text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome {
    Ok,
    /// `WARNINGS: N`, a success.
    Warnings(u32),
    /// Anything else, including `unexpected status`.
    Failed(String),
}

impl TaskOutcome {
    pub fn from_exitstatus(s: &str) -> TaskOutcome {
        if s == "OK" {
            return TaskOutcome::Ok;
        }
        if let Some(n) = s.strip_prefix("WARNINGS: ")
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
            && let Ok(n) = n.parse()
        {
            return TaskOutcome::Warnings(n);
        }
        TaskOutcome::Failed(s.to_string())
    }
}

/// `GET /nodes/{node}/tasks/{upid}/status`. There is no `endtime` here.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TaskStatus {
    /// Kept as text: [`TaskStatus::parsed_upid`] types it. (One public capture carries a
    /// UPID mangled by a client's test suite; the rest of its shape is still real.)
    pub upid: String,
    pub node: String,
    #[serde(deserialize_with = "de::u64_flex")]
    pub pid: u64,
    #[serde(deserialize_with = "de::u64_flex")]
    pub pstart: u64,
    #[serde(deserialize_with = "de::u64_flex")]
    pub starttime: u64,
    #[serde(rename = "type")]
    pub task_type: String,
    #[serde(default)]
    pub id: String,
    /// For a token: just `user@realm`; the token name is in `tokenid`.
    pub user: String,
    #[serde(default)]
    pub tokenid: Option<String>,
    pub status: TaskState,
    /// Present once stopped.
    #[serde(default)]
    pub exitstatus: Option<String>,
}

impl TaskStatus {
    pub fn parsed_upid(&self) -> Result<Upid, UpidError> {
        self.upid.parse()
    }
    /// `None` while running.
    pub fn outcome(&self) -> Option<TaskOutcome> {
        match self.status {
            TaskState::Running => None,
            TaskState::Stopped => Some(TaskOutcome::from_exitstatus(
                self.exitstatus.as_deref().unwrap_or("unexpected status"),
            )),
        }
    }
}

/// One item of `GET /nodes/{node}/tasks`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TaskListItem {
    pub upid: Upid,
    pub node: String,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub pid: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub pstart: Option<u64>,
    #[serde(deserialize_with = "de::u64_flex")]
    pub starttime: u64,
    #[serde(rename = "type")]
    pub task_type: String,
    #[serde(default)]
    pub id: String,
    /// Archived tasks split a token's auth id: `user` is `user@realm`, `tokenid` the
    /// token name (PVE's `userfilter` matches `user` only). Active tasks carry the full
    /// auth id in `user`. [`TaskListItem::auth_id`] joins them.
    pub user: String,
    #[serde(default)]
    pub tokenid: Option<String>,
    #[serde(default, deserialize_with = "de::opt_u64")]
    pub endtime: Option<u64>,
    /// The exit text (`OK`, `WARNINGS: n`, error text) or `RUNNING`; absent while running
    /// on some versions.
    #[serde(default)]
    pub status: Option<String>,
}

impl TaskListItem {
    /// The full auth id that started the task (`user@realm!token` for a token).
    pub fn auth_id(&self) -> String {
        match &self.tokenid {
            Some(t) if !self.user.contains('!') => format!("{}!{t}", self.user),
            _ => self.user.clone(),
        }
    }

    /// `None` while running.
    pub fn outcome(&self) -> Option<TaskOutcome> {
        match self.status.as_deref() {
            None | Some("RUNNING") => None,
            Some(s) => Some(TaskOutcome::from_exitstatus(s)),
        }
    }
}

/// `source` of the task list: PVE's default is `archive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskSource {
    Archive,
    Active,
    All,
}

impl TaskSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskSource::Archive => "archive",
            TaskSource::Active => "active",
            TaskSource::All => "all",
        }
    }
}

/// Filters of `GET /nodes/{node}/tasks`; `None` leaves PVE's default.
#[derive(Debug, Clone, Default)]
pub struct TaskListFilter {
    pub vmid: Option<Vmid>,
    /// Worker type, e.g. `vzrestore`.
    pub typefilter: Option<String>,
    /// The auth id that started the task.
    pub userfilter: Option<String>,
    pub source: Option<TaskSource>,
    /// Epoch seconds: tasks started at or after.
    pub since: Option<i64>,
    /// Epoch seconds: tasks started at or before.
    pub until: Option<i64>,
    /// Only failed tasks.
    pub errors: bool,
    pub limit: Option<u32>,
    pub start: Option<u32>,
}

impl TaskListFilter {
    pub(crate) fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(v) = self.vmid {
            q.push(("vmid", v.to_string()));
        }
        if let Some(t) = &self.typefilter {
            q.push(("typefilter", t.clone()));
        }
        if let Some(u) = &self.userfilter {
            q.push(("userfilter", u.clone()));
        }
        if let Some(s) = self.source {
            q.push(("source", s.as_str().to_string()));
        }
        if let Some(s) = self.since {
            q.push(("since", s.to_string()));
        }
        if let Some(u) = self.until {
            q.push(("until", u.to_string()));
        }
        if self.errors {
            q.push(("errors", "1".to_string()));
        }
        if let Some(l) = self.limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(s) = self.start {
            q.push(("start", s.to_string()));
        }
        q
    }
}
