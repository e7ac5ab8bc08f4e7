//! Worker tasks: UPIDs in PVE's format, their log, status and the task list with PVE's
//! filters (pve-manager `API2/Tasks.pm`), and the task faults armed by worker type
//! (`/_sim/task-faults`). Owns the task table and the fault table; what a task *does*
//! when it finishes, or leaves when a fault strikes, lives with its handler (`api.rs`)
//! and the state (`state.rs`). Must never: decide a task's effect here.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

/// One task.
#[derive(Debug, Clone)]
pub struct Task {
    pub upid: String,
    pub node: String,
    pub pid: u32,
    pub pstart: u64,
    pub starttime: u64,
    pub wtype: String,
    pub id: String,
    /// The auth id that started it (`user@realm!token` for tokens).
    pub user: String,
    /// The exit status once stopped (`OK`, `WARNINGS: n`, or the error text).
    pub exit: Option<String>,
    pub endtime: Option<u64>,
    pub log: Vec<String>,
}

impl Task {
    pub fn running(&self) -> bool {
        self.exit.is_none()
    }

    /// `(user, tokenid)` the way `upid_decode` + `convert_token_task` split them.
    pub fn split_user(&self) -> (&str, Option<&str>) {
        match self.user.split_once('!') {
            Some((u, t)) => (u, Some(t)),
            None => (&self.user, None),
        }
    }

    /// Whether `caller` owns the task: a token sees its own tasks, a user its own and
    /// those of its tokens.
    pub fn owned_by(&self, caller: &str) -> bool {
        match self.split_user() {
            (u, Some(_)) => caller == self.user || caller == u,
            (u, None) => caller == u,
        }
    }

    /// `GET /nodes/{node}/tasks/{upid}/status`.
    pub fn status_json(&self) -> Value {
        let (user, tokenid) = self.split_user();
        let mut m = Map::new();
        m.insert("upid".to_owned(), json!(self.upid));
        m.insert("node".to_owned(), json!(self.node));
        m.insert("pid".to_owned(), json!(self.pid));
        m.insert("pstart".to_owned(), json!(self.pstart));
        m.insert("starttime".to_owned(), json!(self.starttime));
        m.insert("type".to_owned(), json!(self.wtype));
        m.insert("id".to_owned(), json!(self.id));
        m.insert("user".to_owned(), json!(user));
        if let Some(t) = tokenid {
            m.insert("tokenid".to_owned(), json!(t));
        }
        match &self.exit {
            None => {
                m.insert("status".to_owned(), json!("running"));
            }
            Some(e) => {
                m.insert("status".to_owned(), json!("stopped"));
                m.insert("exitstatus".to_owned(), json!(e));
            }
        }
        Value::Object(m)
    }

    /// A task-list item: archived tasks have `endtime` and `status` (the exit text) and
    /// split the token; active ones come from the `active` file as decoded (full auth
    /// id, `saved:"0"`) with `status:"RUNNING"`.
    pub fn list_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("upid".to_owned(), json!(self.upid));
        m.insert("node".to_owned(), json!(self.node));
        m.insert("pid".to_owned(), json!(self.pid));
        m.insert("pstart".to_owned(), json!(self.pstart));
        m.insert("starttime".to_owned(), json!(self.starttime));
        m.insert("type".to_owned(), json!(self.wtype));
        m.insert("id".to_owned(), json!(self.id));
        match &self.exit {
            None => {
                m.insert("user".to_owned(), json!(self.user));
                m.insert("saved".to_owned(), json!("0"));
                m.insert("status".to_owned(), json!("RUNNING"));
            }
            Some(e) => {
                let (user, tokenid) = self.split_user();
                m.insert("user".to_owned(), json!(user));
                if let Some(t) = tokenid {
                    m.insert("tokenid".to_owned(), json!(t));
                }
                m.insert("status".to_owned(), json!(e));
                if let Some(end) = self.endtime {
                    m.insert("endtime".to_owned(), json!(end));
                }
            }
        }
        Value::Object(m)
    }
}

/// PVE's `normalize_status_type`.
pub fn status_type(exit: Option<&str>) -> &'static str {
    match exit {
        None | Some("") | Some("unexpected status") => "unknown",
        Some("OK") => "ok",
        Some(s) if is_warnings(s) => "warning",
        Some(_) => "error",
    }
}

fn is_warnings(s: &str) -> bool {
    s.strip_prefix("WARNINGS: ")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Formats a UPID (`UPID:node:%08X:%08X:%08X:type:id:user:`).
pub fn encode_upid(
    node: &str,
    pid: u32,
    pstart: u64,
    starttime: u64,
    wtype: &str,
    id: &str,
    user: &str,
) -> String {
    format!("UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{wtype}:{id}:{user}:")
}

/// Decodes a UPID with PVE's rule; `None` when it does not parse.
pub fn decode_upid(upid: &str) -> Option<(String, u32, u64, u64, String, String, String)> {
    let rest = upid.strip_prefix("UPID:")?.strip_suffix(':')?;
    let parts: Vec<&str> = rest.split(':').collect();
    if parts.len() != 7 {
        return None;
    }
    let node = parts[0];
    let nb = node.as_bytes();
    let node_ok = !nb.is_empty()
        && nb[0].is_ascii_alphanumeric()
        && nb[nb.len() - 1].is_ascii_alphanumeric()
        && nb.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-');
    let hex = |s: &str, lens: &[usize]| {
        (lens.contains(&s.len()) && s.bytes().all(|c| c.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
    };
    let field_ok = |s: &str, allow_empty: bool| {
        (allow_empty || !s.is_empty()) && !s.contains(|c: char| c.is_whitespace() || c == '/')
    };
    if !node_ok
        || !field_ok(parts[4], false)
        || !field_ok(parts[5], true)
        || !field_ok(parts[6], false)
    {
        return None;
    }
    let pid = hex(parts[1], &[8])? as u32;
    let pstart = hex(parts[2], &[8, 9])?;
    let start = hex(parts[3], &[8])?;
    Some((
        node.to_owned(),
        pid,
        pstart,
        start,
        parts[4].to_owned(),
        parts[5].to_owned(),
        parts[6].to_owned(),
    ))
}

/// Filters of `GET /nodes/{node}/tasks`.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub start: usize,
    pub limit: usize,
    pub userfilter: Option<String>,
    pub typefilter: Option<String>,
    pub vmid: Option<String>,
    pub errors: bool,
    /// `archive` (default), `active` or `all`.
    pub source: String,
    pub since: Option<u64>,
    pub until: Option<u64>,
    pub statusfilter: Option<Vec<String>>,
}

/// A fault armed through `POST /_sim/task-faults`: the next task(s) of worker type
/// `wtype` (for guest `vmid` when given) fail midway, each with its type's partial
/// effect (see `docs/testbed.md`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFaultSpec {
    /// The worker type (`vzrollback`, `qmrestore`, `vzdump`, …).
    #[serde(rename = "type")]
    pub wtype: String,
    pub vmid: Option<u32>,
    /// The task's exit status; a per-type default when absent.
    pub message: Option<String>,
    /// How many tasks it fails (default 1).
    pub times: Option<u32>,
    /// The task dies holding the guest's lock (`snapshot`, `rollback`, `backup`,
    /// `create`), as a killed worker leaves it; without it the lock goes as the task's
    /// own error path lifts it.
    pub keep_lock: Option<bool>,
}

#[derive(Debug, Clone)]
struct TaskFault {
    id: u64,
    spec: TaskFaultSpec,
    remaining: u32,
    hits: u64,
}

/// The armed task faults.
#[derive(Debug, Default)]
pub struct TaskFaults {
    faults: Vec<TaskFault>,
    next_id: u64,
}

impl TaskFaults {
    /// Arms a fault; returns its id.
    pub fn add(&mut self, spec: TaskFaultSpec) -> Result<u64, String> {
        let ok_type = !spec.wtype.is_empty()
            && spec.wtype.len() <= 32
            && spec.wtype.bytes().all(|b| b.is_ascii_alphanumeric());
        if !ok_type {
            return Err(format!("bad worker type {:?}", spec.wtype));
        }
        if spec.times == Some(0) {
            return Err("times must be at least 1".into());
        }
        self.next_id += 1;
        self.faults.push(TaskFault {
            id: self.next_id,
            remaining: spec.times.unwrap_or(1),
            spec,
            hits: 0,
        });
        Ok(self.next_id)
    }

    pub fn clear(&mut self) {
        self.faults.clear();
    }

    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.faults.len();
        self.faults.retain(|f| f.id != id);
        before != self.faults.len()
    }

    /// Takes one use of the first fault matching a task of `wtype` for `id`.
    pub fn take(&mut self, wtype: &str, id: &str) -> Option<TaskFaultSpec> {
        let f = self
            .faults
            .iter_mut()
            .find(|f| f.spec.wtype == wtype && f.spec.vmid.is_none_or(|v| v.to_string() == id))?;
        f.remaining -= 1;
        f.hits += 1;
        let spec = f.spec.clone();
        self.faults.retain(|f| f.remaining > 0);
        Some(spec)
    }

    pub fn json(&self) -> Value {
        let items: Vec<Value> = self
            .faults
            .iter()
            .map(|f| {
                json!({"id": f.id, "type": f.spec.wtype, "vmid": f.spec.vmid,
                       "message": f.spec.message, "keep_lock": f.spec.keep_lock.unwrap_or(false),
                       "remaining": f.remaining, "hits": f.hits})
            })
            .collect();
        json!({"task_faults": items})
    }
}

/// All tasks, in creation order, with an index by UPID.
#[derive(Debug, Default)]
pub struct TaskTable {
    tasks: Vec<Task>,
    index: HashMap<String, usize>,
}

impl TaskTable {
    pub fn push(&mut self, task: Task) {
        self.index.insert(task.upid.clone(), self.tasks.len());
        self.tasks.push(task);
    }

    pub fn get(&self, upid: &str) -> Option<&Task> {
        self.index.get(upid).map(|i| &self.tasks[*i])
    }

    pub fn get_mut(&mut self, upid: &str) -> Option<&mut Task> {
        self.index.get(upid).map(|i| &mut self.tasks[*i])
    }

    pub fn all(&self) -> &[Task] {
        &self.tasks
    }

    /// Running tasks of `wtype` for guest `id`.
    pub fn running_of(&self, wtype: &str, id: &str) -> Vec<String> {
        self.tasks
            .iter()
            .filter(|t| t.running() && t.wtype == wtype && t.id == id)
            .map(|t| t.upid.clone())
            .collect()
    }

    /// The task list for `caller`; returns the page and `total`.
    pub fn list(&self, f: &TaskFilter, caller: &str, auditor: bool) -> (Vec<Value>, usize) {
        let mut statusfilter: HashMap<&str, bool> = [
            ("ok", true),
            ("warning", true),
            ("error", true),
            ("unknown", true),
        ]
        .into();
        if let Some(list) = &f.statusfilter
            && !f.errors
        {
            for v in statusfilter.values_mut() {
                *v = false;
            }
            for s in list {
                let key = s.to_lowercase();
                if let Some(slot) = statusfilter.get_mut(key.as_str()) {
                    *slot = true;
                }
            }
        } else if f.errors {
            statusfilter.insert("ok", false);
        }
        let mut count = 0usize;
        let mut limit = f.limit as i64;
        let mut out = Vec::new();
        let pass = |t: &Task, user_for_filter: &str, count: &mut usize, limit: &mut i64| -> bool {
            if let Some(u) = &f.userfilter
                && !user_for_filter.to_lowercase().contains(&u.to_lowercase())
            {
                return false;
            }
            if !(auditor || t.owned_by(caller)) {
                return false;
            }
            if let Some(tf) = &f.typefilter
                && !tf.is_empty()
                && t.wtype != *tf
            {
                return false;
            }
            if let Some(v) = &f.vmid
                && (t.id.is_empty() || t.id != *v)
            {
                return false;
            }
            if f.since.is_some_and(|s| t.starttime < s) || f.until.is_some_and(|u| t.starttime > u)
            {
                return false;
            }
            if !statusfilter
                .get(status_type(t.exit.as_deref()))
                .copied()
                .unwrap_or(false)
            {
                return false;
            }
            let c = *count;
            *count += 1;
            if c < f.start || *limit <= 0 {
                return false;
            }
            true
        };
        if f.source == "active" || f.source == "all" {
            let mut active: Vec<&Task> = self.tasks.iter().filter(|t| t.running()).collect();
            active.sort_by_key(|t| std::cmp::Reverse((t.starttime, t.pid)));
            for t in active {
                if pass(t, &t.user, &mut count, &mut limit) {
                    out.push(t.list_json());
                    limit -= 1;
                }
            }
        }
        if f.source != "active" {
            let mut archive: Vec<&Task> = self.tasks.iter().filter(|t| !t.running()).collect();
            archive.sort_by_key(|t| std::cmp::Reverse((t.endtime, t.starttime, t.pid)));
            for t in archive {
                let (u, _) = t.split_user();
                if pass(t, u, &mut count, &mut limit) {
                    out.push(t.list_json());
                    limit -= 1;
                }
            }
        }
        (out, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(user: &str, exit: Option<&str>, start: u64) -> Task {
        Task {
            upid: encode_upid(
                "pve1",
                100 + start as u32,
                5000,
                start,
                "vzstart",
                "101",
                user,
            ),
            node: "pve1".into(),
            pid: 100 + start as u32,
            pstart: 5000,
            starttime: start,
            wtype: "vzstart".into(),
            id: "101".into(),
            user: user.into(),
            exit: exit.map(str::to_owned),
            endtime: exit.map(|_| start + 1),
            log: vec![],
        }
    }

    #[test]
    fn task_faults_match_type_and_guest_and_count_down() {
        let mut f = TaskFaults::default();
        let spec = |t: &str, vmid: Option<u32>, times: Option<u32>| TaskFaultSpec {
            wtype: t.into(),
            vmid,
            message: None,
            times,
            keep_lock: None,
        };
        assert!(f.add(spec("vz rollback", None, None)).is_err());
        assert!(f.add(spec("vzdump", None, Some(0))).is_err());
        f.add(spec("vzrollback", Some(101), Some(2))).unwrap();
        let mut take = |t: &str, id: &str| f.take(t, id).map(|s| s.wtype);
        assert_eq!(take("vzrollback", "102"), None);
        assert_eq!(take("qmrollback", "101"), None);
        assert_eq!(take("vzrollback", "101").as_deref(), Some("vzrollback"));
        assert_eq!(take("vzrollback", "101").as_deref(), Some("vzrollback"));
        assert_eq!(take("vzrollback", "101"), None, "spent after two tasks");
        let id = f.add(spec("vzdump", None, None)).unwrap();
        assert!(f.remove(id));
        assert!(f.take("vzdump", "").is_none());
    }

    #[test]
    fn upid_round_trip_and_rejects() {
        let u = encode_upid(
            "proxmox2",
            883362,
            148218236,
            1675584165,
            "vzclone",
            "200",
            "root@pam!api_token",
        );
        assert_eq!(
            u,
            "UPID:proxmox2:000D7AA2:08D5A17C:63DF62A5:vzclone:200:root@pam!api_token:"
        );
        let d = decode_upid(&u).unwrap();
        assert_eq!((d.1, d.2, d.3), (883362, 148218236, 1675584165));
        assert!(decode_upid("UPID:n:1:2:3:t:i:u:").is_none());
        assert!(
            decode_upid("UPID:node1:000FF1FD:10F9374C:630D702C:vzdump:110:root@pam:done").is_none()
        );
        assert!(decode_upid("UPID:n:0000C346:165A0CE4:68D7279C:aptupdate::root@pam:").is_some());
    }

    #[test]
    fn status_splits_token_and_hides_exit_while_running() {
        let t = task("agent@pve!deploy", None, 10);
        let s = t.status_json();
        assert_eq!(s["user"], "agent@pve");
        assert_eq!(s["tokenid"], "deploy");
        assert_eq!(s["status"], "running");
        assert!(s.get("exitstatus").is_none() && s.get("endtime").is_none());
        let l = t.list_json();
        assert_eq!(l["status"], "RUNNING");
        assert_eq!(l["user"], "agent@pve!deploy");
    }

    #[test]
    fn list_filters_and_paging() {
        let mut tt = TaskTable::default();
        tt.push(task("a@pve!t", Some("OK"), 1));
        tt.push(task("a@pve!t", Some("boom"), 2));
        tt.push(task("a@pve!t", Some("WARNINGS: 2"), 3));
        tt.push(task("b@pve!t", Some("OK"), 4));
        tt.push(task("a@pve!t", None, 5));
        let base = TaskFilter {
            limit: 50,
            source: "archive".into(),
            ..Default::default()
        };
        let (items, total) = tt.list(&base, "a@pve!t", false);
        assert_eq!((items.len(), total), (3, 3));
        let (_, total) = tt.list(&base, "x@pve!t", true);
        assert_eq!(total, 4);
        let errs = TaskFilter {
            errors: true,
            ..base.clone()
        };
        let (items, _) = tt.list(&errs, "a@pve!t", false);
        assert_eq!(items.len(), 2);
        let all = TaskFilter {
            source: "all".into(),
            start: 1,
            limit: 2,
            ..base.clone()
        };
        let (items, total) = tt.list(&all, "a@pve!t", false);
        assert_eq!((items.len(), total), (2, 4));
        let ok = TaskFilter {
            statusfilter: Some(vec!["ok".into()]),
            source: "all".into(),
            ..base
        };
        let (items, _) = tt.list(&ok, "a@pve!t", false);
        assert_eq!(items.len(), 1, "running tasks are 'unknown', not ok");
    }
}
