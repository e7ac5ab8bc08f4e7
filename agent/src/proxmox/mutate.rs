//! Mutations. Each takes a [`GuestPermit`] and acts on the permit's vmid only, so nothing
//! changes a guest outside the reconcile queue's lane for it.
//!
//! Every call returns a typed [`Upid`] except where PVE says otherwise: LXC set-config is
//! synchronous (`null`) while QEMU's `POST .../config` is a task ([`SetConfigOutcome`]), and
//! vzdump may answer the plain string `OK` when it has nothing to do ([`VzdumpOutcome`]).
//! Top-level booleans go on the wire as `1`/`0` (PVE rejects `true`).
//!
//! Also here, because it is vzdump's result: [`Client::vzdump_archive`], the archive a
//! finished vzdump task wrote (a read; it needs no permit).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use felhom_protocol::Vmid;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::client::{Client, seg};
use super::error::ProxmoxError;
use super::permit::GuestPermit;
use super::types::{BackupItem, GuestKind};
use super::upid::Upid;

/// A snapshot name PVE accepts: `[a-zA-Z][a-zA-Z0-9_-]+`, at most 40 characters, not
/// `current` or `vzdump`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotName(String);

impl SnapshotName {
    pub fn new(s: impl Into<String>) -> Result<SnapshotName, ProxmoxError> {
        let s = s.into();
        let b = s.as_bytes();
        let ok = b.len() >= 2
            && b.len() <= 40
            && b[0].is_ascii_alphabetic()
            && b[1..]
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-');
        if !ok {
            return Err(ProxmoxError::InvalidRequest(format!(
                "{s:?} is not a snapshot name ([a-zA-Z][a-zA-Z0-9_-]+, at most 40 characters)"
            )));
        }
        if s == "current" || s == "vzdump" {
            return Err(ProxmoxError::InvalidRequest(format!(
                "snapshot name {s:?} is reserved by PVE"
            )));
        }
        Ok(SnapshotName(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SnapshotName {
    type Err = ProxmoxError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SnapshotName::new(s)
    }
}

impl TryFrom<String> for SnapshotName {
    type Error = ProxmoxError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        SnapshotName::new(s)
    }
}

impl From<SnapshotName> for String {
    fn from(s: SnapshotName) -> String {
        s.0
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A config value to set. Booleans are sent as `1`/`0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigValue {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl ConfigValue {
    fn to_form(&self) -> String {
        match self {
            ConfigValue::Str(s) => s.clone(),
            ConfigValue::Int(n) => n.to_string(),
            ConfigValue::Bool(true) => "1".to_string(),
            ConfigValue::Bool(false) => "0".to_string(),
        }
    }
}

impl From<&str> for ConfigValue {
    fn from(s: &str) -> Self {
        ConfigValue::Str(s.to_string())
    }
}
impl From<String> for ConfigValue {
    fn from(s: String) -> Self {
        ConfigValue::Str(s)
    }
}
impl From<i64> for ConfigValue {
    fn from(n: i64) -> Self {
        ConfigValue::Int(n)
    }
}
impl From<bool> for ConfigValue {
    fn from(b: bool) -> Self {
        ConfigValue::Bool(b)
    }
}

/// A set-config call: keys to set, keys to delete, and optionally the digest the change is
/// based on. PVE compares `digest` only when it is sent; then a config that changed since
/// makes it refuse the write ([`ProxmoxError::ConfigChanged`]) instead of overwriting what
/// someone else wrote. Reconcile sends it with every write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigChange {
    pub set: BTreeMap<String, ConfigValue>,
    pub delete: Vec<String>,
    pub digest: Option<String>,
}

/// Parameters of the config call that are not config keys.
const RESERVED_KEYS: &[&str] = &["delete", "digest", "revert", "skiplock", "node", "vmid"];

fn valid_key(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

impl ConfigChange {
    pub fn new() -> Self {
        ConfigChange::default()
    }
    pub fn set(mut self, key: impl Into<String>, value: impl Into<ConfigValue>) -> Self {
        self.set.insert(key.into(), value.into());
        self
    }
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.delete.push(key.into());
        self
    }
    pub fn digest(mut self, digest: impl Into<String>) -> Self {
        self.digest = Some(digest.into());
        self
    }

    fn form(&self) -> Result<Vec<(String, String)>, ProxmoxError> {
        if self.set.is_empty() && self.delete.is_empty() {
            return Err(ProxmoxError::InvalidRequest(
                "set-config with nothing to set or delete".to_string(),
            ));
        }
        let mut form = Vec::new();
        for (k, v) in &self.set {
            if !valid_key(k) || RESERVED_KEYS.contains(&k.as_str()) {
                return Err(ProxmoxError::InvalidRequest(format!(
                    "{k:?} is not a config key that can be set"
                )));
            }
            form.push((k.clone(), v.to_form()));
        }
        for k in &self.delete {
            if !valid_key(k) || RESERVED_KEYS.contains(&k.as_str()) {
                return Err(ProxmoxError::InvalidRequest(format!(
                    "{k:?} is not a config key that can be deleted"
                )));
            }
            if self.set.contains_key(k) {
                return Err(ProxmoxError::InvalidRequest(format!(
                    "config key {k:?} is both set and deleted"
                )));
            }
        }
        if !self.delete.is_empty() {
            form.push(("delete".to_string(), self.delete.join(",")));
        }
        if let Some(d) = &self.digest {
            // PVE's schema: a string of at most 40 characters (a SHA-1 in hex).
            if d.is_empty() || d.len() > 40 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ProxmoxError::InvalidRequest(format!(
                    "{d:?} is not a config digest"
                )));
            }
            form.push(("digest".to_string(), d.clone()));
        }
        Ok(form)
    }
}

/// How PVE words the refusal of a config write whose `digest` is out of date (a 500 from
/// the handler, before anything is written or a task is started): pve-container's
/// `assert_if_modified`, and qemu-server's own check in its update handler.
const DIGEST_REFUSALS: &[&str] = &[
    "detected modified configuration - file changed by other user?",
    "checksum missmatch (file change by other user?)",
];

/// A refused config write that carried a digest: [`ProxmoxError::ConfigChanged`] when PVE
/// said the digest is out of date, the error unchanged otherwise.
fn digest_refusal(change: &ConfigChange, e: ProxmoxError) -> ProxmoxError {
    match e {
        ProxmoxError::Api {
            endpoint,
            status: 500,
            message,
            ..
        } if change.digest.is_some() && DIGEST_REFUSALS.iter().any(|r| message.starts_with(r)) => {
            ProxmoxError::ConfigChanged {
                endpoint,
                message: message.trim_end().to_string(),
            }
        }
        other => other,
    }
}

/// What set-config did: LXC applies synchronously, QEMU's `POST` starts a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "upid", rename_all = "snake_case")]
pub enum SetConfigOutcome {
    Applied,
    Task(Upid),
}

/// What vzdump did: a task, or PVE's plain `OK` when no selected guest is on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "upid", rename_all = "snake_case")]
pub enum VzdumpOutcome {
    Task(Upid),
    NothingToDo,
}

/// vzdump `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VzdumpMode {
    Snapshot,
    Suspend,
    Stop,
}

/// vzdump `compress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VzdumpCompress {
    None,
    Gzip,
    Lzo,
    Zstd,
}

/// Options of a one-guest vzdump (the guest is the permit's).
#[derive(Debug, Clone, Default)]
pub struct VzdumpOptions {
    pub storage: Option<String>,
    pub mode: Option<VzdumpMode>,
    pub compress: Option<VzdumpCompress>,
    /// Prune older backups per `prune-backups` (PVE default: yes).
    pub remove: Option<bool>,
    pub notes_template: Option<String>,
    pub protected: Option<bool>,
}

/// Options of an LXC restore from a vzdump archive onto the permit's vmid.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// The backup volume, e.g. `local:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst`.
    pub archive: String,
    /// Target storage for the volumes when `rootfs` is not given.
    pub storage: Option<String>,
    /// Overwrite the existing (stopped) container.
    pub force: bool,
    /// New MAC addresses.
    pub unique: bool,
    /// Start after the restore.
    pub start: bool,
    /// e.g. `local-lvm:8`.
    pub rootfs: Option<String>,
    pub unprivileged: Option<bool>,
    pub pool: Option<String>,
    /// Config keys that override the backed-up config (`hostname`, `onboot`, `netN`, …).
    pub overrides: BTreeMap<String, ConfigValue>,
}

/// Options of a QEMU restore (`qmrestore`) from a vzdump archive or PBS snapshot onto the
/// permit's vmid: `POST /nodes/{node}/qemu` with `archive`.
#[derive(Debug, Clone, Default)]
pub struct QemuRestoreOptions {
    /// The backup volume, e.g. `pbs:backup/vm/103/2025-01-31T02:00:05Z`.
    pub archive: String,
    /// Target storage of every disk (else each disk's original storage).
    pub storage: Option<String>,
    /// Overwrite the existing (stopped) VM.
    pub force: bool,
    /// New MAC addresses, smbios uuid and vmgenid.
    pub unique: bool,
    /// Start after the restore.
    pub start: bool,
    /// Config keys that override the backed-up config (`name`, `onboot`, `netN`, …). A
    /// drive key is refused by PVE (`option conflicts with option 'archive'`).
    pub overrides: BTreeMap<String, ConfigValue>,
}

/// Parameters of the restore calls themselves: an override may not name one.
const RESTORE_PARAMS: &[&str] = &[
    "vmid",
    "ostemplate",
    "archive",
    "restore",
    "storage",
    "force",
    "unique",
    "start",
    "rootfs",
    "unprivileged",
    "pool",
    "bwlimit",
    "live-restore",
    "ignore-unpack-errors",
];

/// Appends the config overrides of a restore to its form.
fn push_overrides(
    form: &mut Vec<(String, String)>,
    overrides: &BTreeMap<String, ConfigValue>,
) -> Result<(), ProxmoxError> {
    for (k, v) in overrides {
        if !valid_key(k)
            || RESERVED_KEYS.contains(&k.as_str())
            || RESTORE_PARAMS.contains(&k.as_str())
        {
            return Err(ProxmoxError::InvalidRequest(format!(
                "{k:?} is not a config key a restore can override"
            )));
        }
        form.push((k.clone(), v.to_form()));
    }
    Ok(())
}

fn b01(b: bool) -> String {
    if b { "1" } else { "0" }.to_string()
}

fn check_storage(s: &str) -> Result<(), ProxmoxError> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ProxmoxError::InvalidRequest(format!(
            "{s:?} is not a storage id"
        )))
    }
}

fn check_text(what: &str, s: &str) -> Result<(), ProxmoxError> {
    if s.is_empty() || s.chars().any(char::is_control) {
        return Err(ProxmoxError::InvalidRequest(format!(
            "{what} {s:?} is empty or has control characters"
        )));
    }
    Ok(())
}

/// Lines of a task log read per request, and the most read before giving up.
const LOG_PAGE: u64 = 500;
const LOG_MAX_LINES: u64 = 100_000;

/// One item of `GET /nodes/{node}/tasks/{upid}/log`.
#[derive(Debug, Deserialize)]
struct TaskLogLine {
    t: String,
}

/// The archive named by a vzdump log line if it is `vmid`'s: the file name of
/// `creating vzdump archive '<dir>/<file>'` (`vzdump-<lxc|qemu>-<vmid>-…`), or the snapshot
/// path of `creating Proxmox Backup Server archive '<ct|vm>/<vmid>/<time>'`.
fn archive_in_log_line(line: &str, vmid: Vmid) -> Option<&str> {
    const FILE: &str = "creating vzdump archive '";
    const PBS: &str = "creating Proxmox Backup Server archive '";
    let quoted = |marker: &str| {
        let rest = &line[line.find(marker)? + marker.len()..];
        rest.strip_suffix('\'')
            .filter(|q| !q.is_empty() && !q.contains('\''))
    };
    let id = vmid.to_string();
    if let Some(path) = quoted(FILE) {
        let file = path.rsplit('/').next()?;
        let ours = ["lxc", "qemu"]
            .iter()
            .any(|k| file.starts_with(&format!("vzdump-{k}-{id}-")));
        return ours.then_some(file);
    }
    let snap = quoted(PBS)?;
    let mut parts = snap.split('/');
    let ours = matches!(parts.next(), Some("ct" | "vm"))
        && parts.next() == Some(id.as_str())
        && parts.next().is_some_and(|t| !t.is_empty())
        && parts.next().is_none();
    ours.then_some(snap)
}

fn expect_upid(endpoint: &str, v: Value) -> Result<Upid, ProxmoxError> {
    match v {
        Value::String(s) => s
            .parse()
            .map_err(|e: super::upid::UpidError| ProxmoxError::Decode {
                endpoint: endpoint.to_string(),
                detail: e.to_string(),
            }),
        other => Err(ProxmoxError::Decode {
            endpoint: endpoint.to_string(),
            detail: format!("expected a task id (UPID), found {other}"),
        }),
    }
}

impl Client {
    async fn task_call(
        &self,
        method: Method,
        path: String,
        form: Vec<(String, String)>,
        permit: &GuestPermit,
    ) -> Result<Upid, ProxmoxError> {
        let endpoint = format!("{method} {path}");
        let v: Value = if method == Method::DELETE {
            let query: Vec<(&str, String)> =
                form.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            self.call(method, &path, &query, None).await?
        } else {
            self.call(method, &path, &[], Some(&form)).await?
        };
        let upid = expect_upid(&endpoint, v)?;
        tracing::info!(vmid = %permit.vmid(), %endpoint, upid = %upid, "proxmox task started");
        Ok(upid)
    }

    /// `POST .../status/start` (`vzstart` / `qmstart`; `hastart` for HA guests).
    pub async fn start(&self, permit: &GuestPermit, kind: GuestKind) -> Result<Upid, ProxmoxError> {
        let path = format!("{}/status/start", self.guest_path(kind, permit.vmid()));
        self.task_call(Method::POST, path, Vec::new(), permit).await
    }

    /// `POST .../status/stop`: immediate stop.
    pub async fn stop(&self, permit: &GuestPermit, kind: GuestKind) -> Result<Upid, ProxmoxError> {
        let path = format!("{}/status/stop", self.guest_path(kind, permit.vmid()));
        self.task_call(Method::POST, path, Vec::new(), permit).await
    }

    /// `POST .../status/reboot` (`vzreboot` / `qmreboot`): PVE shuts the guest down, waiting
    /// up to `timeout` (whole seconds; PVE's default without it), and starts it again,
    /// which applies pending config values. A guest that is not running is refused before
    /// any task (500 `CT N not running` / `VM N not running`).
    pub async fn reboot(
        &self,
        permit: &GuestPermit,
        kind: GuestKind,
        timeout: Option<Duration>,
    ) -> Result<Upid, ProxmoxError> {
        let path = format!("{}/status/reboot", self.guest_path(kind, permit.vmid()));
        let form = timeout
            .map(|t| vec![("timeout".to_string(), t.as_secs().to_string())])
            .unwrap_or_default();
        self.task_call(Method::POST, path, form, permit).await
    }

    /// `POST .../status/shutdown` with `timeout` (seconds); `force_stop` stops the guest
    /// when the timeout passes.
    pub async fn shutdown(
        &self,
        permit: &GuestPermit,
        kind: GuestKind,
        timeout: Duration,
        force_stop: bool,
    ) -> Result<Upid, ProxmoxError> {
        let path = format!("{}/status/shutdown", self.guest_path(kind, permit.vmid()));
        let mut form = vec![("timeout".to_string(), timeout.as_secs().to_string())];
        if force_stop {
            form.push(("forceStop".to_string(), b01(true)));
        }
        self.task_call(Method::POST, path, form, permit).await
    }

    /// `POST .../snapshot` (`vzsnapshot` / `qmsnapshot`).
    pub async fn snapshot_create(
        &self,
        permit: &GuestPermit,
        kind: GuestKind,
        name: &SnapshotName,
        description: Option<&str>,
    ) -> Result<Upid, ProxmoxError> {
        let path = format!("{}/snapshot", self.guest_path(kind, permit.vmid()));
        let mut form = vec![("snapname".to_string(), name.to_string())];
        if let Some(d) = description {
            form.push(("description".to_string(), d.to_string()));
        }
        self.task_call(Method::POST, path, form, permit).await
    }

    /// `POST .../snapshot/{name}/rollback`. A running guest is stopped by the rollback;
    /// `start` starts it again at the end.
    pub async fn snapshot_rollback(
        &self,
        permit: &GuestPermit,
        kind: GuestKind,
        name: &SnapshotName,
        start: bool,
    ) -> Result<Upid, ProxmoxError> {
        let path = format!(
            "{}/snapshot/{}/rollback",
            self.guest_path(kind, permit.vmid()),
            seg(name.as_str())
        );
        let form = if start {
            vec![("start".to_string(), b01(true))]
        } else {
            Vec::new()
        };
        self.task_call(Method::POST, path, form, permit).await
    }

    /// `DELETE .../snapshot/{name}` (`force` removes it from the config even if the
    /// storage refuses).
    pub async fn snapshot_delete(
        &self,
        permit: &GuestPermit,
        kind: GuestKind,
        name: &SnapshotName,
        force: bool,
    ) -> Result<Upid, ProxmoxError> {
        let path = format!(
            "{}/snapshot/{}",
            self.guest_path(kind, permit.vmid()),
            seg(name.as_str())
        );
        let form = if force {
            vec![("force".to_string(), b01(true))]
        } else {
            Vec::new()
        };
        self.task_call(Method::DELETE, path, form, permit).await
    }

    /// Set and delete config keys. LXC: `PUT .../config`, synchronous → `Applied`. QEMU:
    /// `POST .../config`, a `qmconfig` task → `Task`. With a digest, a config that changed
    /// since gives [`ProxmoxError::ConfigChanged`] (for both kinds PVE checks it before
    /// writing or starting a task).
    pub async fn set_config(
        &self,
        permit: &GuestPermit,
        kind: GuestKind,
        change: &ConfigChange,
    ) -> Result<SetConfigOutcome, ProxmoxError> {
        let form = change.form()?;
        let path = format!("{}/config", self.guest_path(kind, permit.vmid()));
        match kind {
            GuestKind::Lxc => {
                let endpoint = format!("PUT {path}");
                let v: Value = self
                    .call(Method::PUT, &path, &[], Some(&form))
                    .await
                    .map_err(|e| digest_refusal(change, e))?;
                if !v.is_null() {
                    return Err(ProxmoxError::Decode {
                        endpoint,
                        detail: format!(
                            "expected null from the synchronous config update, found {v}"
                        ),
                    });
                }
                tracing::info!(vmid = %permit.vmid(), %endpoint, "proxmox config applied");
                Ok(SetConfigOutcome::Applied)
            }
            GuestKind::Qemu => Ok(SetConfigOutcome::Task(
                self.task_call(Method::POST, path, form, permit)
                    .await
                    .map_err(|e| digest_refusal(change, e))?,
            )),
        }
    }

    /// `POST /nodes/{node}/vzdump` for the permit's guest.
    pub async fn vzdump(
        &self,
        permit: &GuestPermit,
        opts: &VzdumpOptions,
    ) -> Result<VzdumpOutcome, ProxmoxError> {
        let mut form = vec![("vmid".to_string(), permit.vmid().to_string())];
        if let Some(s) = &opts.storage {
            check_storage(s)?;
            form.push(("storage".to_string(), s.clone()));
        }
        if let Some(m) = opts.mode {
            let m = match m {
                VzdumpMode::Snapshot => "snapshot",
                VzdumpMode::Suspend => "suspend",
                VzdumpMode::Stop => "stop",
            };
            form.push(("mode".to_string(), m.to_string()));
        }
        if let Some(c) = opts.compress {
            let c = match c {
                VzdumpCompress::None => "0",
                VzdumpCompress::Gzip => "gzip",
                VzdumpCompress::Lzo => "lzo",
                VzdumpCompress::Zstd => "zstd",
            };
            form.push(("compress".to_string(), c.to_string()));
        }
        if let Some(r) = opts.remove {
            form.push(("remove".to_string(), b01(r)));
        }
        if let Some(n) = &opts.notes_template {
            check_text("notes template", n)?;
            form.push(("notes-template".to_string(), n.clone()));
        }
        if let Some(p) = opts.protected {
            form.push(("protected".to_string(), b01(p)));
        }
        let path = format!("{}/vzdump", self.node_path());
        let endpoint = format!("POST {path}");
        let v: Value = self.call(Method::POST, &path, &[], Some(&form)).await?;
        if v.as_str() == Some("OK") {
            tracing::info!(vmid = %permit.vmid(), %endpoint, "vzdump had nothing to do");
            return Ok(VzdumpOutcome::NothingToDo);
        }
        let upid = expect_upid(&endpoint, v)?;
        tracing::info!(vmid = %permit.vmid(), %endpoint, upid = %upid, "proxmox task started");
        Ok(VzdumpOutcome::Task(upid))
    }

    /// The archive that the finished vzdump task `upid` wrote for `vmid` on `storage`, as
    /// `GET /nodes/{node}/storage/{storage}/content?content=backup&vmid=N` lists it (its
    /// `volid`, e.g. `nas:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst`, size, notes).
    ///
    /// The task log names the archive (`INFO: creating vzdump archive '<dir>/<file>'`, or
    /// `INFO: creating Proxmox Backup Server archive '<ct|vm>/<vmid>/<time>'` on PBS); its
    /// volid is `<storage>:backup/<file>` (PBS: `<storage>:backup/<that path>`), and the
    /// storage must list it. Reading the log, not picking the newest listed backup, names
    /// exactly this task's archive even when another backup of the guest ran meanwhile.
    /// Call it after [`Client::wait_task`] succeeded. A log without such a line for
    /// `vmid`, or an archive the storage does not list, is [`ProxmoxError::Decode`].
    pub async fn vzdump_archive(
        &self,
        upid: &Upid,
        storage: &str,
        vmid: Vmid,
    ) -> Result<BackupItem, ProxmoxError> {
        check_storage(storage)?;
        if upid.task_type() != "vzdump" {
            return Err(ProxmoxError::InvalidRequest(format!(
                "{upid} is a {} task, not vzdump",
                upid.task_type()
            )));
        }
        let path = format!(
            "/nodes/{}/tasks/{}/log",
            seg(upid.node()),
            seg(upid.as_str())
        );
        let endpoint = format!("GET {path}");
        let mut start = 0u64;
        let archive = 'pages: loop {
            let page: Vec<TaskLogLine> = self
                .get(
                    &path,
                    &[
                        ("start", start.to_string()),
                        ("limit", LOG_PAGE.to_string()),
                    ],
                )
                .await?;
            for line in &page {
                if let Some(a) = archive_in_log_line(&line.t, vmid) {
                    break 'pages a.to_string();
                }
            }
            start += page.len() as u64;
            if (page.len() as u64) < LOG_PAGE || start >= LOG_MAX_LINES {
                return Err(ProxmoxError::Decode {
                    endpoint,
                    detail: format!(
                        "the vzdump task's log ({start} lines read) names no archive of guest {vmid}"
                    ),
                });
            }
        };
        let volid = format!("{storage}:backup/{archive}");
        self.backups(storage, Some(vmid))
            .await?
            .into_iter()
            .find(|b| b.volid == volid)
            .ok_or_else(|| ProxmoxError::Decode {
                endpoint: format!("GET {}/storage/{}/content", self.node_path(), storage),
                detail: format!("the vzdump task wrote {volid}, which the storage does not list"),
            })
    }

    /// `POST /nodes/{node}/lxc` with `restore=1`: restore the permit's container from a
    /// vzdump archive (`vzrestore`).
    pub async fn lxc_restore(
        &self,
        permit: &GuestPermit,
        opts: &RestoreOptions,
    ) -> Result<Upid, ProxmoxError> {
        check_text("archive", &opts.archive)?;
        let mut form = vec![
            ("vmid".to_string(), permit.vmid().to_string()),
            ("ostemplate".to_string(), opts.archive.clone()),
            ("restore".to_string(), b01(true)),
        ];
        if let Some(s) = &opts.storage {
            check_storage(s)?;
            form.push(("storage".to_string(), s.clone()));
        }
        if opts.force {
            form.push(("force".to_string(), b01(true)));
        }
        if opts.unique {
            form.push(("unique".to_string(), b01(true)));
        }
        if opts.start {
            form.push(("start".to_string(), b01(true)));
        }
        if let Some(r) = &opts.rootfs {
            check_text("rootfs", r)?;
            form.push(("rootfs".to_string(), r.clone()));
        }
        if let Some(u) = opts.unprivileged {
            form.push(("unprivileged".to_string(), b01(u)));
        }
        if let Some(p) = &opts.pool {
            check_text("pool", p)?;
            form.push(("pool".to_string(), p.clone()));
        }
        push_overrides(&mut form, &opts.overrides)?;
        let path = format!("{}/lxc", self.node_path());
        self.task_call(Method::POST, path, form, permit).await
    }

    /// `POST /nodes/{node}/qemu` with `archive`: restore the permit's VM (`qmrestore`).
    pub async fn qemu_restore(
        &self,
        permit: &GuestPermit,
        opts: &QemuRestoreOptions,
    ) -> Result<Upid, ProxmoxError> {
        check_text("archive", &opts.archive)?;
        let mut form = vec![
            ("vmid".to_string(), permit.vmid().to_string()),
            ("archive".to_string(), opts.archive.clone()),
        ];
        if let Some(s) = &opts.storage {
            check_storage(s)?;
            form.push(("storage".to_string(), s.clone()));
        }
        if opts.force {
            form.push(("force".to_string(), b01(true)));
        }
        if opts.unique {
            form.push(("unique".to_string(), b01(true)));
        }
        if opts.start {
            form.push(("start".to_string(), b01(true)));
        }
        push_overrides(&mut form, &opts.overrides)?;
        let path = format!("{}/qemu", self.node_path());
        self.task_call(Method::POST, path, form, permit).await
    }

    /// `DELETE /nodes/{node}/{lxc|qemu}/{vmid}` (`vzdestroy` / `qmdestroy`): removes the
    /// permit's guest and its disks. `purge` also drops it from backup jobs, replication
    /// and HA; `destroy_unreferenced_disks` also removes disks of the vmid the config does
    /// not name. A running guest is refused by PVE (no `force` is sent).
    pub async fn destroy(
        &self,
        permit: &GuestPermit,
        kind: GuestKind,
        purge: bool,
        destroy_unreferenced_disks: bool,
    ) -> Result<Upid, ProxmoxError> {
        let mut form = Vec::new();
        if purge {
            form.push(("purge".to_string(), b01(true)));
        }
        if destroy_unreferenced_disks {
            form.push(("destroy-unreferenced-disks".to_string(), b01(true)));
        }
        let path = self.guest_path(kind, permit.vmid());
        self.task_call(Method::DELETE, path, form, permit).await
    }

    /// `PUT /nodes/{node}/storage/{storage}/content/{volid}` with `protected`: marks the
    /// permit's backup archive protected (prune jobs and the GUI keep it) or not. PVE
    /// answers `null`. The archive must be the permit's guest's backup.
    pub async fn backup_protect(
        &self,
        permit: &GuestPermit,
        storage: &str,
        volid: &str,
        protected: bool,
    ) -> Result<(), ProxmoxError> {
        let path = self.backup_content_path(permit, storage, volid)?;
        let form = vec![("protected".to_string(), b01(protected))];
        let _: Value = self.call(Method::PUT, &path, &[], Some(&form)).await?;
        tracing::info!(vmid = %permit.vmid(), %volid, protected, "backup protection set");
        Ok(())
    }

    /// `DELETE /nodes/{node}/storage/{storage}/content/{volid}`: removes the permit's
    /// backup archive. PVE ≥ 7 answers with a task (`imgdel`), older ones with `null`
    /// (removed synchronously): `Some(upid)` or `None`. PVE refuses a protected archive.
    pub async fn backup_delete(
        &self,
        permit: &GuestPermit,
        storage: &str,
        volid: &str,
    ) -> Result<Option<Upid>, ProxmoxError> {
        let path = self.backup_content_path(permit, storage, volid)?;
        let endpoint = format!("DELETE {path}");
        let v: Value = self.call(Method::DELETE, &path, &[], None).await?;
        if v.is_null() {
            tracing::info!(vmid = %permit.vmid(), %volid, "backup removed");
            return Ok(None);
        }
        let upid = expect_upid(&endpoint, v)?;
        tracing::info!(vmid = %permit.vmid(), %endpoint, upid = %upid, "proxmox task started");
        Ok(Some(upid))
    }

    /// The content path of a backup archive of the permit's guest on `storage`: the volid
    /// must be `<storage>:backup/...` and name the guest (`vzdump-<kind>-<vmid>-` or the
    /// PBS `ct|vm/<vmid>/`).
    fn backup_content_path(
        &self,
        permit: &GuestPermit,
        storage: &str,
        volid: &str,
    ) -> Result<String, ProxmoxError> {
        check_storage(storage)?;
        check_text("volid", volid)?;
        let vmid = permit.vmid().to_string();
        let ours = volid
            .strip_prefix(storage)
            .and_then(|r| r.strip_prefix(":backup/"))
            .is_some_and(|name| {
                ["lxc", "qemu"]
                    .iter()
                    .any(|k| name.starts_with(&format!("vzdump-{k}-{vmid}-")))
                    || ["ct", "vm"]
                        .iter()
                        .any(|k| name.starts_with(&format!("{k}/{vmid}/")))
            });
        if !ours {
            return Err(ProxmoxError::InvalidRequest(format!(
                "{volid:?} is not a backup of guest {vmid} on storage {storage}"
            )));
        }
        Ok(format!(
            "{}/storage/{}/content/{}",
            self.node_path(),
            seg(storage),
            seg(volid)
        ))
    }

    /// `POST /nodes/{node}/qemu/{vmid}/agent/ping` (synchronous): `Ok` when the guest agent
    /// of the permit's running VM answers. PVE's 500s (`No QEMU guest agent configured`,
    /// `VM N is not running`, `QEMU guest agent is not running`) are [`ProxmoxError::Api`].
    /// It changes nothing, but it talks to the guest, so it runs in the guest's lane too.
    pub async fn agent_ping(&self, permit: &GuestPermit) -> Result<(), ProxmoxError> {
        let path = format!(
            "{}/agent/ping",
            self.guest_path(GuestKind::Qemu, permit.vmid())
        );
        let _: Value = self.call(Method::POST, &path, &[], None).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_archive_is_read_from_vzdump_log_lines() {
        let v = Vmid::new(101).unwrap();
        let file = "INFO: creating vzdump archive '/mnt/pve/nas/dump/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst'";
        assert_eq!(
            archive_in_log_line(file, v),
            Some("vzdump-lxc-101-2025_01_31-02_00_05.tar.zst")
        );
        let qemu = "INFO: creating vzdump archive '/var/lib/vz/dump/vzdump-qemu-101-2025_01_31-02_00_05.vma.zst'";
        assert_eq!(
            archive_in_log_line(qemu, v),
            Some("vzdump-qemu-101-2025_01_31-02_00_05.vma.zst")
        );
        let pbs = "INFO: creating Proxmox Backup Server archive 'ct/101/2025-01-31T02:00:05Z'";
        assert_eq!(
            archive_in_log_line(pbs, v),
            Some("ct/101/2025-01-31T02:00:05Z")
        );
        // Another guest's archive (a job of several guests), vmids that only share a
        // prefix, and lines that name no archive.
        for other in [
            "INFO: creating vzdump archive '/mnt/pve/nas/dump/vzdump-lxc-102-2025_01_31-02_00_05.tar'",
            "INFO: creating vzdump archive '/mnt/pve/nas/dump/vzdump-lxc-1011-2025_01_31-02_00_05.tar'",
            "INFO: creating Proxmox Backup Server archive 'ct/1010/2025-01-31T02:00:05Z'",
            "INFO: creating Proxmox Backup Server archive 'ct/101'",
            "INFO: creating vzdump archive ''",
            "INFO: creating vzdump archive '/x/vzdump-lxc-101-a.tar' and more",
            "INFO: Starting Backup of VM 101 (lxc)",
            "",
        ] {
            assert_eq!(archive_in_log_line(other, v), None, "{other}");
        }
    }

    use super::*;

    #[test]
    fn a_backup_is_only_addressed_as_the_permits_guests_on_its_storage() {
        let client = Client::new(
            &crate::config::ProxmoxConfig {
                url: "https://127.0.0.1:1".into(),
                token_id: "felhom@pve!agent".into(),
                token_secret: crate::config::Secret::new("unused"),
                tls: crate::config::TlsVerify::Insecure,
            },
            "pve1",
        )
        .unwrap();
        let permit = GuestPermit::for_test(Vmid::new(101).unwrap());
        let ok = "nas:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst";
        let path = client.backup_content_path(&permit, "nas", ok).unwrap();
        assert!(
            path.ends_with(
                "/storage/nas/content/nas%3Abackup%2Fvzdump-lxc-101-2025_01_31-02_00_05.tar.zst"
            ),
            "{path}"
        );
        assert!(
            client
                .backup_content_path(&permit, "pbs", "pbs:backup/ct/101/2025-01-31T02:00:05Z")
                .is_ok()
        );
        for (storage, volid) in [
            (
                "nas",
                "nas:backup/vzdump-lxc-1010-2025_01_31-02_00_05.tar.zst",
            ),
            (
                "nas",
                "nas:backup/vzdump-qemu-102-2025_01_31-02_00_05.vma.zst",
            ),
            ("other", ok),
            ("nas", "nas:images/vm-101-disk-0"),
            ("pbs", "pbs:backup/vm/1010/2025-01-31T02:00:05Z"),
            ("nas", ""),
        ] {
            assert!(
                client.backup_content_path(&permit, storage, volid).is_err(),
                "{storage} {volid}"
            );
        }
    }

    #[test]
    fn snapshot_names() {
        assert!(SnapshotName::new("felhom-selftest-1718000000").is_ok());
        assert!(SnapshotName::new("a_b-C1").is_ok());
        for bad in [
            "",
            "a",
            "1abc",
            "has space",
            "current",
            "vzdump",
            "x/y",
            &"a".repeat(41),
        ] {
            assert!(SnapshotName::new(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<SnapshotName>("\"current\"").is_err());
    }

    #[test]
    fn restore_overrides_cannot_name_the_calls_own_parameters() {
        let mut form = Vec::new();
        let mut o = BTreeMap::new();
        o.insert("hostname".to_string(), ConfigValue::from("a-restoretest"));
        o.insert(
            "net0".to_string(),
            ConfigValue::from("name=eth0,link_down=1"),
        );
        push_overrides(&mut form, &o).unwrap();
        assert_eq!(form.len(), 2);
        for bad in [
            "vmid",
            "archive",
            "ostemplate",
            "force",
            "delete",
            "digest",
            "Bad Key",
        ] {
            let mut o = BTreeMap::new();
            o.insert(bad.to_string(), ConfigValue::from("x"));
            assert!(push_overrides(&mut Vec::new(), &o).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_change_form() {
        let c = ConfigChange::new()
            .set("memory", 1024)
            .set("onboot", true)
            .set("description", "hi")
            .delete("tags")
            .delete("cpulimit")
            .digest("3f8a5e0c7d9b1a2e4f6c8d0b2a4e6f8a0c2e4b6d");
        let form = c.form().unwrap();
        assert!(form.contains(&("onboot".into(), "1".into())));
        assert!(form.contains(&("memory".into(), "1024".into())));
        assert!(form.contains(&("delete".into(), "tags,cpulimit".into())));
        assert!(form.iter().any(|(k, _)| k == "digest"));

        assert!(ConfigChange::new().form().is_err());
        assert!(
            ConfigChange::new()
                .set("memory", 1)
                .delete("memory")
                .form()
                .is_err()
        );
        assert!(ConfigChange::new().set("delete", "x").form().is_err());
        assert!(ConfigChange::new().set("Bad Key", "x").form().is_err());
        assert!(ConfigChange::new().set("a", 1).digest("zz").form().is_err());
        assert!(ConfigChange::new().set("a", 1).digest("").form().is_err());
        let sha1 = "3f8a5e0c7d9b1a2e4f6c8d0b2a4e6f8a0c2e4b6d";
        assert!(ConfigChange::new().set("a", 1).digest(sha1).form().is_ok());
        let longer = format!("{sha1}0");
        assert!(
            ConfigChange::new()
                .set("a", 1)
                .digest(longer)
                .form()
                .is_err()
        );
    }

    fn api(status: u16, message: &str) -> ProxmoxError {
        ProxmoxError::Api {
            endpoint: "PUT /nodes/pve1/lxc/101/config".into(),
            status,
            message: message.into(),
            errors: BTreeMap::new(),
        }
    }

    #[test]
    fn an_out_of_date_digest_is_its_own_error() {
        let with = ConfigChange::new().set("memory", 1024).digest("abc");
        for text in [
            "detected modified configuration - file changed by other user? Try again.\n",
            "checksum missmatch (file change by other user?)\n",
        ] {
            let e = digest_refusal(&with, api(500, text));
            assert!(
                matches!(&e, ProxmoxError::ConfigChanged { endpoint, message }
                    if endpoint == "PUT /nodes/pve1/lxc/101/config" && !message.ends_with('\n')),
                "{e:?}"
            );
            assert!(e.to_string().contains("changed since it was read"), "{e}");
        }
        // Without a digest PVE cannot have compared one; other refusals stay what they are.
        let without = ConfigChange::new().set("memory", 1024);
        let text = "detected modified configuration - file changed by other user? Try again.";
        assert!(matches!(
            digest_refusal(&without, api(500, text)),
            ProxmoxError::Api { .. }
        ));
        assert!(matches!(
            digest_refusal(&with, api(500, "CT is locked (backup)")),
            ProxmoxError::Api { .. }
        ));
        assert!(matches!(
            digest_refusal(&with, api(400, text)),
            ProxmoxError::Api { .. }
        ));
    }
}
