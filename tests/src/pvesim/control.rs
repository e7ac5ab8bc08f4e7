//! The simulator's own control surface (`/_sim/…`, admin token only): the request log,
//! fault injection (including an `edit` of a guest that lands right before a chosen
//! request is served, so a test can put a change by hand between a client's read and its
//! write without racing on time), state inspection and direct state changes.
//!
//! Owns: the request log and the fault table (request faults; task faults by worker
//! type are kept with the state, [`super::tasks::TaskFaults`], since a task's type is
//! known only where it starts), and the guest, volume and storage patches (creating a
//! storage of a given type). Must never: accept a PVE token, or log a PVE request it
//! changed itself.

use std::collections::{BTreeMap, VecDeque};

use serde::Deserialize;
use serde_json::{Value, json};

use super::guest::{self, Ha, Kind};
use super::state::{self, SimState};

/// At most this many request-log entries are kept (oldest dropped; `seq` keeps counting).
pub const LOG_CAP: usize = 200_000;

/// One logged PVE request.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub params: BTreeMap<String, String>,
    pub token_id: Option<String>,
    /// `None` while in flight or when the connection was dropped.
    pub status: Option<u16>,
    /// When the request arrived.
    pub received: std::time::Instant,
    /// The same moment on the wall clock, in microseconds since the Unix epoch (so a
    /// client can relate it to another process's timestamps, e.g. hubsim's `enqueued_at`).
    pub received_unix_us: u64,
    /// Microseconds from arrival until the answer was ready (set with `status`).
    pub held_us: Option<u64>,
}

/// `at` (a moment in the past) on the wall clock, in microseconds since the Unix epoch.
fn wall_clock_us(at: std::time::Instant) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_sub(at.elapsed()).as_micros() as u64
}

/// A fault kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    #[serde(rename = "http_500")]
    Http500,
    TaskFail,
    Latency,
    MalformedBody,
    DropConnection,
    /// Not a failure: the fault's `edit` is applied to the state just before the request
    /// is served, as if someone had changed the guest in the GUI at that moment.
    Edit,
}

impl FaultKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Http500 => "http_500",
            FaultKind::TaskFail => "task_fail",
            FaultKind::Latency => "latency",
            FaultKind::MalformedBody => "malformed_body",
            FaultKind::DropConnection => "drop_connection",
            FaultKind::Edit => "edit",
        }
    }
}

/// A fault as posted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub method: Option<String>,
    pub path: String,
    pub kind: FaultKind,
    pub message: Option<String>,
    pub latency_ms: Option<u64>,
    pub times: Option<u32>,
    /// For `edit`: the guest change to apply (a `PUT /_sim/guests/{vmid}` body).
    pub edit: Option<GuestEdit>,
}

/// A guest change an `edit` fault applies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestEdit {
    pub vmid: u32,
    pub patch: GuestPatch,
}

#[derive(Debug, Clone)]
struct Fault {
    id: u64,
    spec: FaultSpec,
    remaining: Option<u32>,
    hits: u64,
}

/// What the faults want done with one request.
#[derive(Debug, Default)]
pub struct FaultMatch {
    pub latency_ms: u64,
    /// The first matching non-latency fault: `(id, kind, message)`.
    pub action: Option<(u64, FaultKind, Option<String>)>,
    /// The chosen fault's guest change when it is an `edit`.
    pub edit: Option<GuestEdit>,
}

/// Log and faults.
#[derive(Debug, Default)]
pub struct ControlState {
    log: VecDeque<LoggedRequest>,
    next_seq: u64,
    faults: Vec<Fault>,
    next_fault: u64,
}

impl ControlState {
    /// Appends a request; returns its sequence number.
    pub fn log_request(
        &mut self,
        method: &str,
        path: &str,
        params: BTreeMap<String, String>,
        received: std::time::Instant,
    ) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        let mut params = params;
        if let Some(p) = params.get_mut("password") {
            *p = "<redacted>".to_owned();
        }
        self.log.push_back(LoggedRequest {
            seq,
            method: method.to_owned(),
            path: path.to_owned(),
            params,
            received,
            received_unix_us: wall_clock_us(received),
            held_us: None,
            token_id: None,
            status: None,
        });
        if self.log.len() > LOG_CAP {
            self.log.pop_front();
        }
        seq
    }

    fn entry(&mut self, seq: u64) -> Option<&mut LoggedRequest> {
        let first = self.log.front()?.seq;
        let idx = seq.checked_sub(first)? as usize;
        self.log.get_mut(idx)
    }

    pub fn set_token(&mut self, seq: u64, token: &str) {
        if let Some(e) = self.entry(seq) {
            e.token_id = Some(token.to_owned());
        }
    }

    pub fn set_status(&mut self, seq: u64, status: u16) {
        if let Some(e) = self.entry(seq) {
            e.status = Some(status);
            e.held_us = Some(e.received.elapsed().as_micros() as u64);
        }
    }

    pub fn requests_json(&self, since: u64) -> Value {
        let items: Vec<Value> = self
            .log
            .iter()
            .filter(|e| e.seq > since)
            .map(|e| {
                json!({"seq": e.seq, "method": e.method, "path": e.path, "params": e.params,
                       "token_id": e.token_id, "status": e.status, "held_us": e.held_us,
                       "received_unix_us": e.received_unix_us})
            })
            .collect();
        json!({"requests": items, "last_seq": self.next_seq})
    }

    pub fn clear_log(&mut self) {
        self.log.clear();
    }

    pub fn add_fault(&mut self, spec: FaultSpec) -> Result<u64, String> {
        if !spec.path.starts_with('/') {
            return Err("path must start with '/' (below /api2/json)".into());
        }
        if spec.kind == FaultKind::Latency && spec.latency_ms.is_none() {
            return Err("a latency fault needs latency_ms".into());
        }
        if spec.times == Some(0) {
            return Err("times must be at least 1 (omit it for 'until cleared')".into());
        }
        if (spec.kind == FaultKind::Edit) != spec.edit.is_some() {
            return Err("an edit fault needs \"edit\", and only an edit fault takes one".into());
        }
        self.next_fault += 1;
        let id = self.next_fault;
        self.faults.push(Fault {
            id,
            remaining: spec.times,
            spec,
            hits: 0,
        });
        Ok(id)
    }

    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    pub fn remove_fault(&mut self, id: u64) -> bool {
        let before = self.faults.len();
        self.faults.retain(|f| f.id != id);
        before != self.faults.len()
    }

    pub fn faults_json(&self) -> Value {
        let items: Vec<Value> = self
            .faults
            .iter()
            .map(|f| {
                json!({"id": f.id, "method": f.spec.method, "path": f.spec.path,
                       "kind": f.spec.kind.as_str(), "message": f.spec.message,
                       "latency_ms": f.spec.latency_ms, "remaining": f.remaining, "hits": f.hits})
            })
            .collect();
        json!({"faults": items})
    }

    /// Matches faults against a request (`rel` is below `/api2/json`, decoded).
    /// Latency and the chosen action are counted now, except `task_fail`, which
    /// counts only when a task really used it ([`ControlState::consume`]).
    pub fn match_faults(&mut self, method: &str, rel: &str) -> FaultMatch {
        let mut m = FaultMatch::default();
        for f in &mut self.faults {
            if f.remaining == Some(0) {
                continue;
            }
            if let Some(fm) = &f.spec.method
                && !fm.eq_ignore_ascii_case(method)
            {
                continue;
            }
            let hit = match f.spec.path.strip_suffix('*') {
                Some(prefix) => rel.starts_with(prefix),
                None => rel == f.spec.path || rel.trim_end_matches('/') == f.spec.path,
            };
            if !hit {
                continue;
            }
            match f.spec.kind {
                FaultKind::Latency => {
                    m.latency_ms += f.spec.latency_ms.unwrap_or(0);
                    f.hits += 1;
                    if let Some(r) = &mut f.remaining {
                        *r -= 1;
                    }
                }
                kind if m.action.is_none() => {
                    m.action = Some((f.id, kind, f.spec.message.clone()));
                    m.edit = f.spec.edit.clone();
                    if kind != FaultKind::TaskFail {
                        f.hits += 1;
                        if let Some(r) = &mut f.remaining {
                            *r -= 1;
                        }
                    }
                }
                _ => {}
            }
        }
        self.faults.retain(|f| f.remaining != Some(0));
        m
    }

    /// Counts one use of a `task_fail` fault.
    pub fn consume(&mut self, id: u64) {
        if let Some(f) = self.faults.iter_mut().find(|f| f.id == id) {
            f.hits += 1;
            if let Some(r) = &mut f.remaining {
                *r = r.saturating_sub(1);
            }
        }
        self.faults.retain(|f| f.remaining != Some(0));
    }
}

/// The inspection view of one guest.
pub fn guest_state_json(g: &guest::Guest) -> Value {
    let mut snaps = g.snapshot_list_json();
    snaps.sort_by(|a, b| a["snaptime"].as_u64().cmp(&b["snaptime"].as_u64()));
    json!({
        "vmid": g.vmid,
        "type": g.kind.as_str(),
        "status": if g.running { "running" } else { "stopped" },
        "ha_managed": g.ha.is_some(),
        "ha_state": g.ha.as_ref().map(|h| h.state.clone()),
        "lock": g.lock(),
        "template": g.is_template(),
        "start_fails": g.start_fails,
        "agent_fails": g.agent_fails,
        "stops_after_seconds": g.stops_after_seconds,
        "stops_after_config_change": g.stops_after_config_change,
        "config": g.config_json(false),
        "current_config": g.config_json(true),
        "pending": g.pending,
        "pending_delete": g.pending_delete,
        "snapshots": snaps,
        "conf_file": g.render_conf(),
    })
}

/// `GET /_sim/state`.
pub fn state_json(st: &SimState) -> Value {
    let guests: Vec<Value> = st.guests.values().map(guest_state_json).collect();
    let other_nodes: Vec<Value> = st
        .other_nodes
        .iter()
        .map(|(vmid, (node, kind))| json!({"vmid": vmid, "type": kind.as_str(), "node": node}))
        .collect();
    let storages: Vec<Value> = st.storages.iter().map(storage_control_json).collect();
    let tasks: Vec<Value> = st
        .tasks
        .all()
        .iter()
        .map(|t| {
            json!({"upid": t.upid, "type": t.wtype, "id": t.id, "user": t.user,
                   "status": if t.running() { "running" } else { "stopped" },
                   "exitstatus": t.exit, "starttime": t.starttime, "endtime": t.endtime})
        })
        .collect();
    json!({"node": st.node, "version": st.version.to_string(), "guests": guests,
           "other_nodes": other_nodes, "storages": storages, "tasks": tasks})
}

/// `PUT /_sim/guests/{vmid}` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestPatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub status: Option<String>,
    #[serde(default, with = "double_option")]
    pub lock: Option<Option<String>>,
    pub ha_managed: Option<bool>,
    pub template: Option<bool>,
    /// Its start tasks fail (a guest that does not boot).
    pub start_fails: Option<bool>,
    /// Its QEMU guest agent never answers (VMs).
    pub agent_fails: Option<bool>,
    /// It stops on its own this many seconds after each start (`null` clears; a running
    /// guest's countdown starts now).
    #[serde(default, deserialize_with = "seconds_option")]
    pub stops_after_seconds: Option<Option<f64>>,
    /// Its next config change stops it if it runs (a change that breaks the guest).
    pub stops_after_config_change: Option<bool>,
    pub config: Option<BTreeMap<String, Option<String>>>,
    /// Another cluster node: the guest moves there (as after a migration done
    /// elsewhere) and leaves this node's API; only the cluster's vmlist still names it.
    pub node: Option<String>,
}

mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Option::<String>::deserialize(d).map(Some)
    }
}

/// Applies a patch; creates the guest when it does not exist and `type` is given.
pub fn patch_guest(st: &mut SimState, vmid: u32, p: GuestPatch) -> Result<Value, String> {
    if !(100..=999_999_999).contains(&vmid) {
        return Err(format!("vmid {vmid} out of range"));
    }
    if let Some(node) = &p.node {
        return move_to_other_node(st, vmid, node, &p);
    }
    if st.other_nodes.contains_key(&vmid) {
        return Err(format!(
            "guest {vmid} lives on another node; delete it before creating it here"
        ));
    }
    match st.guests.get(&vmid) {
        None => {
            let kind = match p.kind.as_deref() {
                Some("lxc") => Kind::Lxc,
                Some("qemu") => Kind::Qemu,
                Some(k) => return Err(format!("unknown type {k:?}")),
                None => {
                    return Err(format!(
                        "guest {vmid} does not exist; give \"type\" to create it"
                    ));
                }
            };
            st.guests
                .insert(vmid, state::new_guest(vmid, kind, BTreeMap::new()));
        }
        Some(g) => {
            if let Some(k) = &p.kind
                && g.kind.as_str() != k
            {
                return Err(format!("guest {vmid} exists with another type"));
            }
        }
    }
    if let Some(s) = &p.status
        && s != "running"
        && s != "stopped"
    {
        return Err(format!("status must be running or stopped, not {s:?}"));
    }
    let g = st.guests.get_mut(&vmid).ok_or("vanished")?;
    if let Some(cfg) = p.config {
        for (k, v) in cfg {
            match v {
                Some(v) if k == "description" => match guest::normalize_description(&v) {
                    Some(d) => {
                        g.conf.insert(k, d);
                    }
                    None => {
                        g.conf.remove(&k);
                    }
                },
                Some(v) => {
                    g.conf.insert(k, v);
                }
                None => {
                    g.conf.remove(&k);
                }
            }
        }
    }
    if let Some(lock) = p.lock {
        match lock {
            Some(l) => g.conf.insert("lock".into(), l),
            None => g.conf.remove("lock"),
        };
    }
    if let Some(f) = p.start_fails {
        g.start_fails = f;
    }
    if let Some(f) = p.agent_fails {
        g.agent_fails = f;
    }
    if let Some(f) = p.stops_after_config_change {
        g.stops_after_config_change = f;
    }
    if let Some(s) = p.stops_after_seconds {
        g.stops_after_seconds = s;
        g.stops_at = s
            .filter(|_| g.running)
            .map(|s| std::time::Instant::now() + std::time::Duration::from_secs_f64(s));
    }
    if let Some(t) = p.template {
        if t {
            g.conf.insert("template".into(), "1".into());
        } else {
            g.conf.remove("template");
        }
    }
    if let Some(h) = p.ha_managed {
        g.ha = h.then(|| Ha {
            state: if g.running { "started" } else { "stopped" }.into(),
        });
    }
    g.touch();
    if let Some(s) = p.status {
        st.set_running(vmid, s == "running");
    }
    let g = st.guests.get(&vmid).ok_or("vanished")?;
    Ok(guest_state_json(g))
}

/// `{"node": …}`: the guest leaves this node for another one of the cluster.
fn move_to_other_node(
    st: &mut SimState,
    vmid: u32,
    node: &str,
    p: &GuestPatch,
) -> Result<Value, String> {
    let others = p.status.is_some()
        || p.lock.is_some()
        || p.ha_managed.is_some()
        || p.template.is_some()
        || p.start_fails.is_some()
        || p.agent_fails.is_some()
        || p.stops_after_seconds.is_some()
        || p.stops_after_config_change.is_some()
        || p.config.is_some();
    if others {
        return Err("\"node\" cannot be combined with other changes".into());
    }
    if node == st.node {
        return Err(format!(
            "{node} is this node; a guest cannot come back (create it again with \"type\")"
        ));
    }
    if !super::schema::is_dns_name(node) || node.contains('.') {
        return Err(format!("bad node name {node:?}"));
    }
    let kind = match (st.guests.remove(&vmid), p.kind.as_deref()) {
        (Some(g), _) => g.kind,
        (None, Some("lxc")) => Kind::Lxc,
        (None, Some("qemu")) => Kind::Qemu,
        (None, Some(k)) => return Err(format!("unknown type {k:?}")),
        (None, None) => match st.other_nodes.get(&vmid) {
            Some((_, k)) => *k,
            None => {
                return Err(format!(
                    "guest {vmid} does not exist; give \"type\" to place it on {node}"
                ));
            }
        },
    };
    st.other_nodes.insert(vmid, (node.to_owned(), kind));
    Ok(json!({"vmid": vmid, "type": kind.as_str(), "node": node}))
}

/// `PUT /_sim/settings` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    pub task_seconds: Option<f64>,
    pub latency_ms: Option<u64>,
    pub restore_bytes_per_second: Option<f64>,
    pub backup_bytes_per_second: Option<f64>,
}

/// `PUT /_sim/volumes/{volid}` body: flags of a backup archive.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumePatch {
    /// Its data is damaged: a restore from it fails in the task.
    pub corrupt: Option<bool>,
    /// Guests restored from it fail to start.
    pub start_fails: Option<bool>,
    /// VMs restored from it have a guest agent that never answers.
    pub agent_fails: Option<bool>,
    /// Guests restored from it stop on their own this many seconds after a start
    /// (`null` clears).
    #[serde(default, deserialize_with = "seconds_option")]
    pub stops_after_seconds: Option<Option<f64>>,
}

/// `"stops_after_seconds"`: absent = unchanged, `null` = cleared, a number ≥ 0 = set.
fn seconds_option<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    let v = Option::<f64>::deserialize(d)?;
    if let Some(s) = v
        && !(s.is_finite() && (0.0..=86_400.0).contains(&s))
    {
        return Err(serde::de::Error::custom(
            "stops_after_seconds must be within 0..=86400",
        ));
    }
    Ok(Some(v))
}

/// Sets a volume's flags; answers its control view.
pub fn patch_volume(st: &mut SimState, volid: &str, p: VolumePatch) -> Result<Value, String> {
    let vol = st
        .storages
        .iter_mut()
        .flat_map(|s| s.volumes.iter_mut())
        .find(|v| v.volid == volid)
        .ok_or_else(|| format!("no volume {volid:?}"))?;
    if let Some(c) = p.corrupt {
        vol.corrupt = c;
    }
    if let Some(f) = p.start_fails {
        vol.start_fails = f;
    }
    if let Some(f) = p.agent_fails {
        vol.agent_fails = f;
    }
    if let Some(s) = p.stops_after_seconds {
        vol.stops_after_seconds = s;
    }
    Ok(vol.control_json())
}

/// `PUT /_sim/storages/{storage}` body: its size and how full it is; with `type`, a
/// storage that does not exist yet is created (empty, `total` default 1 TiB).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoragePatch {
    /// PVE's storage type (`zfspool`, `lvmthin`, `dir`, `lvm`, `nfs`, `pbs`, …): only to
    /// create a storage.
    #[serde(rename = "type")]
    pub stype: Option<String>,
    /// Content types (`["rootdir","images"]`); default `rootdir,images`, or `backup`
    /// for `pbs`. Only to create a storage.
    pub content: Option<Vec<String>>,
    pub total: Option<u64>,
    /// Bytes free afterwards (the untracked base usage is set to match).
    pub avail: Option<u64>,
    pub active: Option<bool>,
}

/// Creates storage `sid` from a patch with `type`.
fn create_storage(st: &mut SimState, sid: &str, p: &StoragePatch) -> Result<(), String> {
    let Some(t) = &p.stype else {
        return Err(format!("no storage {sid:?}; give \"type\" to create it"));
    };
    if !super::schema::is_dns_name(sid) || sid.contains('.') || sid.len() > 64 {
        return Err(format!("bad storage id {sid:?}"));
    }
    let stype =
        super::storage::known_type(t).ok_or_else(|| format!("unknown storage type {t:?}"))?;
    let content = match &p.content {
        Some(c) => c
            .iter()
            .map(|c| {
                super::storage::known_content(c).ok_or_else(|| format!("unknown content {c:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        None if stype == "pbs" => vec!["backup"],
        None => vec!["rootdir", "images"],
    };
    if stype == "pbs" && content != ["backup"] {
        return Err("a pbs storage holds only backup content".into());
    }
    st.storages.push(super::storage::Storage::new(
        sid,
        stype,
        content,
        p.total.unwrap_or(1 << 40),
    ));
    Ok(())
}

/// Resizes or fills a storage (creates it with `type`); answers its control view.
pub fn patch_storage(st: &mut SimState, sid: &str, p: StoragePatch) -> Result<Value, String> {
    match st.storage(sid) {
        None => create_storage(st, sid, &p)?,
        Some(s) => {
            if p.stype.as_deref().is_some_and(|t| t != s.stype) || p.content.is_some() {
                return Err(format!(
                    "storage {sid:?} exists; its type and content cannot change"
                ));
            }
        }
    }
    let s = st
        .storage_mut(sid)
        .ok_or_else(|| format!("no storage {sid:?}"))?;
    if let Some(t) = p.total {
        if t == 0 {
            return Err("total must be positive".into());
        }
        s.total = t;
    }
    if let Some(a) = p.avail {
        if a > s.total {
            return Err(format!("avail {a} exceeds total {}", s.total));
        }
        s.set_avail(a);
    }
    if let Some(a) = p.active {
        s.active = a;
    }
    Ok(storage_control_json(s))
}

/// The control view of a storage: its list item (numbers even when inactive), volumes
/// with their flags, and the disks allocated by restores.
pub fn storage_control_json(s: &super::storage::Storage) -> Value {
    let mut v = s.list_json();
    v["total"] = json!(s.total);
    v["used"] = json!(s.used_bytes());
    v["avail"] = json!(s.avail());
    v["volumes"] = Value::Array(s.volumes.iter().map(|x| x.control_json()).collect());
    v["allocated"] = json!(s.allocated);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &str, kind: FaultKind, times: Option<u32>) -> FaultSpec {
        FaultSpec {
            method: None,
            path: path.into(),
            kind,
            message: None,
            latency_ms: Some(5),
            times,
            edit: None,
        }
    }

    #[test]
    fn an_edit_fault_carries_its_change_and_needs_one() {
        let mut c = ControlState::default();
        assert!(
            c.add_fault(spec("/nodes/pve1/lxc/101/config", FaultKind::Edit, Some(1)))
                .is_err()
        );
        let edit: GuestEdit =
            serde_json::from_value(json!({"vmid": 101, "patch": {"config": {"tags": "gui"}}}))
                .unwrap();
        let mut with_edit = spec("/nodes/pve1/lxc/101/config", FaultKind::Http500, None);
        with_edit.edit = Some(edit.clone());
        assert!(c.add_fault(with_edit.clone()).is_err());
        with_edit.kind = FaultKind::Edit;
        with_edit.method = Some("PUT".into());
        with_edit.times = Some(1);
        c.add_fault(with_edit).unwrap();
        assert!(
            c.match_faults("GET", "/nodes/pve1/lxc/101/config")
                .edit
                .is_none()
        );
        let m = c.match_faults("PUT", "/nodes/pve1/lxc/101/config");
        assert_eq!(m.action.map(|a| a.1), Some(FaultKind::Edit));
        assert_eq!(m.edit.map(|e| e.vmid), Some(101));
        assert!(
            c.match_faults("PUT", "/nodes/pve1/lxc/101/config")
                .edit
                .is_none()
        );
    }

    #[test]
    fn faults_match_by_path_prefix_and_count_down() {
        let mut c = ControlState::default();
        c.add_fault(spec("/nodes/pve1/lxc/*", FaultKind::Http500, Some(1)))
            .unwrap();
        c.add_fault(spec("/version", FaultKind::Latency, None))
            .unwrap();
        assert!(
            c.match_faults("GET", "/nodes/pve1/lxc/101/config")
                .action
                .is_some()
        );
        assert!(
            c.match_faults("GET", "/nodes/pve1/lxc/101/config")
                .action
                .is_none()
        );
        assert_eq!(c.match_faults("GET", "/version").latency_ms, 5);
        assert_eq!(c.match_faults("GET", "/version").latency_ms, 5);
        assert!(
            c.add_fault(spec("nodes", FaultKind::Http500, None))
                .is_err()
        );
    }

    #[test]
    fn task_fail_counts_only_when_used() {
        let mut c = ControlState::default();
        let id = c
            .add_fault(spec("/nodes/pve1/vzdump", FaultKind::TaskFail, Some(1)))
            .unwrap();
        assert!(
            c.match_faults("POST", "/nodes/pve1/vzdump")
                .action
                .is_some()
        );
        assert!(
            c.match_faults("POST", "/nodes/pve1/vzdump")
                .action
                .is_some()
        );
        c.consume(id);
        assert!(
            c.match_faults("POST", "/nodes/pve1/vzdump")
                .action
                .is_none()
        );
    }

    #[test]
    fn log_keeps_order_and_redacts_passwords() {
        let mut c = ControlState::default();
        let mut p = BTreeMap::new();
        p.insert("password".to_owned(), "hunter2".to_owned());
        let now = std::time::Instant::now();
        let a = c.log_request("POST", "/api2/json/nodes/pve1/lxc", p, now);
        let b = c.log_request("GET", "/api2/json/version", BTreeMap::new(), now);
        c.set_status(a, 200);
        let j = c.requests_json(0);
        assert_eq!(j["requests"][0]["seq"], a);
        assert_eq!(j["requests"][1]["seq"], b);
        assert_eq!(j["requests"][0]["params"]["password"], "<redacted>");
        assert_eq!(c.requests_json(a)["requests"].as_array().unwrap().len(), 1);
    }
}
