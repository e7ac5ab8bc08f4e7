//! The PVE endpoints: routing, the declared permission of each endpoint, parameter
//! schemas, and the handlers, following the Perl sources (pve-manager, pve-container,
//! qemu-server, pve-storage, pve-guest-common) for order of checks and error texts.
//!
//! Owns: what each endpoint answers. Must never: treat a token as root@pam, hold the
//! state lock across an await (handlers are synchronous), or invent null values.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::acl::TokenPrivs;
use super::apischema;
use super::error::ApiError;
use super::guest::{self, Guest, Kind, Snapshot};
use super::schema::{self, Fmt, Params, Prop, Ty, opt, req};
use super::state::{self, SimState, TaskWork, now_epoch};
use super::storage::{self, parse_backup_name};
use super::tasks::{TaskFilter, decode_upid};

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `user@realm!token`.
    pub token_id: String,
    pub privs: TokenPrivs,
}

impl Caller {
    pub fn has(&self, path: &str, privilege: &str) -> bool {
        self.privs.privs_at(path).contains(privilege)
    }

    /// `$rpcenv->check`: every privilege, first missing one named in the 403.
    pub fn check(&self, path: &str, privs: &[&str]) -> Result<(), ApiError> {
        let set = self.privs.privs_at(path);
        for p in privs {
            if !set.contains(p) {
                return Err(ApiError::perm(format!("{path}, {p}")));
            }
        }
        Ok(())
    }

    /// `$rpcenv->check_any`: one of them, all joined by `|` in the 403.
    pub fn check_any(&self, path: &str, privs: &[&str]) -> Result<(), ApiError> {
        let set = self.privs.privs_at(path);
        if privs.iter().any(|p| set.contains(p)) {
            Ok(())
        } else {
            Err(ApiError::perm(format!("{path}, {}", privs.join("|"))))
        }
    }
}

/// A successful answer: `data` and optional `total`.
#[derive(Debug)]
pub struct Answer {
    pub data: Value,
    pub total: Option<usize>,
}

fn data(v: Value) -> Result<Answer, ApiError> {
    Ok(Answer {
        data: v,
        total: None,
    })
}

/// Per-request context the dispatcher passes in.
#[derive(Debug, Default)]
pub struct RequestCtx {
    /// A `task_fail` fault matched this request: the task it starts fails with this.
    pub task_fail: Option<String>,
    /// Set when a task was started with the fault above (so it can be counted).
    pub task_fail_used: bool,
}

const VM_CONFIG_PERMS_LXC: &[&str] = &[
    "VM.Config.Disk",
    "VM.Config.CPU",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
];
const VM_CONFIG_PERMS_QEMU: &[&str] = &[
    "VM.Config.Disk",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.HWType",
    "VM.Config.Options",
    "VM.Config.Cloudinit",
];

fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Dispatches one request below `/api2/json`. `rel` is the raw relative path.
pub fn dispatch(
    st: &mut SimState,
    caller: &Caller,
    method: &str,
    rel: &str,
    mut params: Params,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    let segs: Vec<String> = rel
        .split('/')
        .filter(|s| !s.is_empty())
        .map(pct_decode)
        .collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let ni = || ApiError::not_implemented(method, rel);

    // PVE's published schema: the template's `{param}`s join the parameters (a query or
    // body parameter of the same name with another value is refused, as pve-manager's
    // rest_handler does), and all of them are checked after the endpoint's permission,
    // before the handler's own, more specific checks.
    let api = apischema::global()
        .map_err(|e| ApiError::die(format!("pvesim cannot check parameters: {e}")))?;
    let matched = api.find(method, &s);
    let mut all = params.clone();
    if let Some(m) = &matched {
        for (k, v) in &m.uri {
            if params.get(k).is_some_and(|given| given != v) {
                return Err(ApiError::param(
                    k,
                    "duplicate parameter (already defined in URI) with conflicting values!",
                ));
            }
            all.insert(k.clone(), v.clone());
        }
    }
    let check_schema = || match &matched {
        Some(m) => api.validate(m, &all),
        None => Ok(()),
    };

    // Path parameters become parameters (PVE validates them with the rest).
    match s.as_slice() {
        ["version"] if method == "GET" => {
            check_schema()?;
            return get_version(st, &params);
        }
        ["nodes"] if method == "GET" => {
            check_schema()?;
            return get_nodes(st, caller, &params);
        }
        ["nodes", node, ..] => {
            params.insert("node".to_owned(), (*node).to_owned());
            if s.len() >= 4 && (s[2] == "lxc" || s[2] == "qemu") {
                params.insert("vmid".to_owned(), s[3].to_owned());
            }
            if s.len() >= 4 && s[2] == "storage" {
                params.insert("storage".to_owned(), s[3].to_owned());
            }
            if s.len() >= 6 && s[2] == "storage" && s[4] == "content" {
                params.insert("volume".to_owned(), s[5].to_owned());
            }
            if s.len() >= 4 && s[2] == "tasks" {
                params.insert("upid".to_owned(), s[3].to_owned());
            }
            if s.len() >= 6 && s[4] == "snapshot" {
                params.insert("snapname".to_owned(), s[5].to_owned());
            }
        }
        _ => return Err(ni()),
    }
    // Known route?
    let route = route_of(method, &s).ok_or_else(ni)?;
    // proxyto node: an unknown node is a failed hostname lookup.
    if s[1] != st.node {
        return Err(ApiError::die(format!(
            "hostname lookup '{0}' failed - failed to get address info for: {0}: Name or service not known",
            s[1]
        )));
    }
    let kind = match s.get(2) {
        Some(&"qemu") => Kind::Qemu,
        _ => Kind::Lxc,
    };
    let vmid_raw = params.get("vmid").cloned().unwrap_or_default();
    let vms = format!("/vms/{vmid_raw}");
    let nodes = format!("/nodes/{}", st.node);
    // The endpoint's declared permission, checked before parameter validation.
    match route {
        Route::NodeStatus => caller.check(&nodes, &["Sys.Audit"])?,
        Route::GuestConfig
        | Route::GuestPending
        | Route::GuestStatus
        | Route::SnapshotList
        | Route::SnapshotConfig => caller.check(&vms, &["VM.Audit"])?,
        Route::GuestUpdateConfig | Route::QemuPostConfig => caller.check_any(
            &vms,
            if kind == Kind::Lxc {
                VM_CONFIG_PERMS_LXC
            } else {
                VM_CONFIG_PERMS_QEMU
            },
        )?,
        Route::GuestAction(_) => caller.check(&vms, &["VM.PowerMgmt"])?,
        Route::GuestDestroy => caller.check(&vms, &["VM.Allocate"])?,
        Route::QemuAgentPing if st.version.has_guest_agent_privs() => {
            caller.check_any(&vms, &["VM.GuestAgent.Audit", "VM.GuestAgent.Unrestricted"])?
        }
        Route::QemuAgentPing => caller.check(&vms, &["VM.Monitor"])?,
        Route::SnapshotCreate | Route::SnapshotDelete | Route::SnapshotUpdateConfig => {
            caller.check(&vms, &["VM.Snapshot"])?
        }
        Route::SnapshotRollback => {
            caller.check_any(&vms, &["VM.Snapshot", "VM.Snapshot.Rollback"])?
        }
        Route::StorageContent => {
            let sid = params.get("storage").cloned().unwrap_or_default();
            caller.check_any(
                &format!("/storage/{sid}"),
                &["Datastore.Audit", "Datastore.AllocateSpace"],
            )?
        }
        _ => {}
    }
    check_schema()?;
    match route {
        Route::NodeVersion => get_version(st, &params),
        Route::NodeStatus => get_node_status(st, &params),
        Route::GuestList => get_guest_list(st, caller, kind, &params),
        Route::GuestIndex => get_guest_index(st, kind, &params),
        Route::GuestConfig => get_config(st, caller, kind, &params),
        Route::GuestPending => get_pending(st, kind, &params),
        Route::GuestStatus => get_status(st, kind, &params),
        Route::GuestUpdateConfig => match kind {
            Kind::Lxc => put_lxc_config(st, caller, params),
            Kind::Qemu => qemu_config(st, caller, params, false, ctx),
        },
        Route::QemuPostConfig => qemu_config(st, caller, params, true, ctx),
        Route::GuestAction(action) => guest_action(st, caller, kind, action, params, ctx),
        Route::SnapshotList => get_snapshots(st, kind, &params),
        Route::SnapshotCreate => snapshot_create(st, caller, kind, params, ctx),
        Route::SnapshotDelete => snapshot_delete(st, caller, kind, params, ctx),
        Route::SnapshotRollback => snapshot_rollback(st, caller, kind, params, ctx),
        Route::SnapshotConfig => snapshot_config(st, kind, &params),
        Route::SnapshotUpdateConfig => snapshot_update_config(st, kind, params),
        Route::LxcCreate => lxc_create(st, caller, params, ctx),
        Route::QemuCreate => qemu_create(st, caller, params, ctx),
        Route::GuestDestroy => guest_destroy(st, caller, kind, params, ctx),
        Route::QemuAgentPing => qemu_agent_ping(st, &params),
        Route::StorageList => get_storage_list(st, caller, &params),
        Route::StorageContent => get_storage_content(st, caller, &params),
        Route::StorageVolumeUpdate => update_volume(st, caller, &params),
        Route::StorageVolumeDelete => delete_volume(st, caller, &params, ctx),
        Route::Vzdump => vzdump(st, caller, params, ctx),
        Route::TaskList => get_task_list(st, caller, &params),
        Route::TaskStatus => get_task_status(st, caller, &params),
        Route::TaskLog => get_task_log(st, caller, &params),
        Route::TaskStop => stop_task(st, caller, &params),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Start,
    Stop,
    Shutdown,
    Reboot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    NodeVersion,
    NodeStatus,
    GuestList,
    GuestIndex,
    GuestConfig,
    GuestPending,
    GuestStatus,
    GuestUpdateConfig,
    QemuPostConfig,
    GuestAction(Action),
    SnapshotList,
    SnapshotCreate,
    SnapshotDelete,
    SnapshotRollback,
    SnapshotConfig,
    SnapshotUpdateConfig,
    LxcCreate,
    QemuCreate,
    GuestDestroy,
    QemuAgentPing,
    StorageList,
    StorageContent,
    StorageVolumeUpdate,
    StorageVolumeDelete,
    Vzdump,
    TaskList,
    TaskStatus,
    TaskLog,
    TaskStop,
}

fn route_of(method: &str, s: &[&str]) -> Option<Route> {
    let guest = |k: &str| k == "lxc" || k == "qemu";
    Some(match (method, s) {
        ("GET", ["nodes", _, "version"]) => Route::NodeVersion,
        ("GET", ["nodes", _, "status"]) => Route::NodeStatus,
        ("GET", ["nodes", _, k]) if guest(k) => Route::GuestList,
        ("POST", ["nodes", _, "lxc"]) => Route::LxcCreate,
        ("POST", ["nodes", _, "qemu"]) => Route::QemuCreate,
        ("POST", ["nodes", _, "qemu", _, "agent", "ping"]) => Route::QemuAgentPing,
        ("DELETE", ["nodes", _, k, _]) if guest(k) => Route::GuestDestroy,
        ("GET", ["nodes", _, k, _]) if guest(k) => Route::GuestIndex,
        ("GET", ["nodes", _, k, _, "config"]) if guest(k) => Route::GuestConfig,
        ("PUT", ["nodes", _, k, _, "config"]) if guest(k) => Route::GuestUpdateConfig,
        ("POST", ["nodes", _, "qemu", _, "config"]) => Route::QemuPostConfig,
        ("GET", ["nodes", _, k, _, "pending"]) if guest(k) => Route::GuestPending,
        ("GET", ["nodes", _, k, _, "status", "current"]) if guest(k) => Route::GuestStatus,
        ("POST", ["nodes", _, k, _, "status", a]) if guest(k) => Route::GuestAction(match *a {
            "start" => Action::Start,
            "stop" => Action::Stop,
            "shutdown" => Action::Shutdown,
            "reboot" => Action::Reboot,
            _ => return None,
        }),
        ("GET", ["nodes", _, k, _, "snapshot"]) if guest(k) => Route::SnapshotList,
        ("POST", ["nodes", _, k, _, "snapshot"]) if guest(k) => Route::SnapshotCreate,
        ("DELETE", ["nodes", _, k, _, "snapshot", _]) if guest(k) => Route::SnapshotDelete,
        ("POST", ["nodes", _, k, _, "snapshot", _, "rollback"]) if guest(k) => {
            Route::SnapshotRollback
        }
        ("GET", ["nodes", _, k, _, "snapshot", _, "config"]) if guest(k) => Route::SnapshotConfig,
        ("PUT", ["nodes", _, k, _, "snapshot", _, "config"]) if guest(k) => {
            Route::SnapshotUpdateConfig
        }
        ("GET", ["nodes", _, "storage"]) => Route::StorageList,
        ("GET", ["nodes", _, "storage", _, "content"]) => Route::StorageContent,
        ("PUT", ["nodes", _, "storage", _, "content", _]) => Route::StorageVolumeUpdate,
        ("DELETE", ["nodes", _, "storage", _, "content", _]) => Route::StorageVolumeDelete,
        ("POST", ["nodes", _, "vzdump"]) => Route::Vzdump,
        ("GET", ["nodes", _, "tasks"]) => Route::TaskList,
        ("GET", ["nodes", _, "tasks", _, "status"]) => Route::TaskStatus,
        ("GET", ["nodes", _, "tasks", _, "log"]) => Route::TaskLog,
        ("DELETE", ["nodes", _, "tasks", _]) => Route::TaskStop,
        _ => return None,
    })
}

const NODE: Prop = req("node", Ty::fmt(Fmt::Node));
const VMID: Prop = req("vmid", Ty::VMID);
const SNAPNAME: Prop = req(
    "snapname",
    Ty::Str {
        fmt: Fmt::ConfigId,
        max_len: Some(40),
    },
);

fn no_more(_: &str) -> Option<Ty> {
    None
}

fn validate(props: &[Prop], params: &Params) -> Result<(), ApiError> {
    schema::validate(props, &no_more, params)
}

fn flag(params: &Params, key: &str) -> bool {
    params.get(key).is_some_and(|v| v == "1")
}

fn vmid_of(params: &Params) -> u32 {
    params
        .get("vmid")
        .and_then(|v| v.trim_start_matches('+').parse().ok())
        .unwrap_or(0)
}

fn no_such_config(st: &SimState, kind: Kind, vmid: u32) -> String {
    format!(
        "Configuration file 'nodes/{}/{}/{vmid}.conf' does not exist",
        st.node,
        kind.conf_dir()
    )
}

/// `load_config`: the guest of this kind, or PVE's 500.
fn load(st: &SimState, kind: Kind, vmid: u32) -> Result<&Guest, ApiError> {
    match st.guests.get(&vmid) {
        Some(g) if g.kind == kind => Ok(g),
        _ => Err(ApiError::die(no_such_config(st, kind, vmid))),
    }
}

fn load_task(st: &SimState, kind: Kind, vmid: u32) -> Result<&Guest, String> {
    load(st, kind, vmid).map_err(|e| e.message)
}

// ---------------------------------------------------------------- node

fn get_version(st: &SimState, params: &Params) -> Result<Answer, ApiError> {
    let props: &[Prop] = if params.contains_key("node") {
        &[NODE]
    } else {
        &[]
    };
    validate(props, params)?;
    let (version, release, repoid) = st.version.version_triple();
    data(json!({"version": version, "release": release, "repoid": repoid}))
}

fn get_nodes(st: &SimState, caller: &Caller, params: &Params) -> Result<Answer, ApiError> {
    validate(&[], params)?;
    let mut m = Map::new();
    m.insert("node".into(), json!(st.node));
    m.insert("status".into(), json!("online"));
    m.insert("type".into(), json!("node"));
    m.insert("id".into(), json!(format!("node/{}", st.node)));
    m.insert("ssl_fingerprint".into(), json!(st.ssl_fingerprint));
    if caller.has(&format!("/nodes/{}", st.node), "Sys.Audit") {
        let n = node_numbers(st);
        m.insert("level".into(), json!(""));
        m.insert("maxcpu".into(), json!(8));
        m.insert("cpu".into(), json!(n.cpu));
        m.insert("mem".into(), json!(n.mem_used));
        m.insert("maxmem".into(), json!(n.mem_total));
        m.insert("disk".into(), json!(n.root_used));
        m.insert("maxdisk".into(), json!(n.root_total));
        m.insert("uptime".into(), json!(n.uptime));
    }
    data(json!([Value::Object(m)]))
}

struct NodeNumbers {
    cpu: f64,
    mem_total: u64,
    mem_used: u64,
    root_total: u64,
    root_used: u64,
    uptime: u64,
}

fn node_numbers(st: &SimState) -> NodeNumbers {
    let running_mem: u64 = st
        .guests
        .values()
        .filter(|g| g.running)
        .map(|g| g.memory_mib() << 18)
        .sum();
    let mem_total = 67_315_212_288u64;
    NodeNumbers {
        cpu: 0.012_345 + (st.guests.values().filter(|g| g.running).count() as f64) * 0.000_7,
        mem_total,
        mem_used: (4_294_967_296 + running_mem).min(mem_total - (1 << 30)),
        root_total: 100_861_726_720,
        root_used: 12_462_940_160,
        uptime: now_epoch().saturating_sub(st.boot_epoch),
    }
}

fn get_node_status(st: &SimState, params: &Params) -> Result<Answer, ApiError> {
    validate(&[NODE], params)?;
    let n = node_numbers(st);
    let v = st.version;
    let (kversion, krelease, kver) = v.kernel();
    let mut memory =
        json!({"total": n.mem_total, "used": n.mem_used, "free": n.mem_total - n.mem_used});
    if v.node_status_has_memory_available() {
        memory["available"] = json!(n.mem_total - n.mem_used + (2 << 30));
    }
    let mut m = json!({
        "uptime": n.uptime,
        "idle": 0,
        "loadavg": ["0.15", "0.10", "0.05"],
        "kversion": kversion,
        "cpuinfo": {"model": "Intel(R) Xeon(R) E-2236 CPU @ 3.40GHz", "sockets": 1, "cores": 6, "cpus": 8,
                    "mhz": "3400.000", "hvm": "1", "user_hz": 100,
                    "flags": "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx lm constant_tsc vmx aes avx avx2"},
        "cpu": n.cpu,
        "wait": 0.000_3,
        "memory": memory,
        "ksm": {"shared": 0},
        "swap": {"total": 8_589_930_496u64, "used": 0, "free": 8_589_930_496u64},
        "rootfs": {"total": n.root_total, "used": n.root_used, "free": n.root_total - n.root_used,
                   "avail": n.root_total - n.root_used - (5 << 30)},
        "pveversion": v.pveversion(),
    });
    if v.node_status_has_kernel_and_boot_info() {
        m["current-kernel"] =
            json!({"sysname": "Linux", "release": krelease, "version": kver, "machine": "x86_64"});
        m["boot-info"] = json!({"mode": "efi", "secureboot": 0});
    }
    data(m)
}

// ---------------------------------------------------------------- guests (read)

fn get_guest_list(
    st: &mut SimState,
    caller: &Caller,
    kind: Kind,
    params: &Params,
) -> Result<Answer, ApiError> {
    let mut props = vec![NODE];
    if kind == Kind::Qemu {
        props.push(opt("full", Ty::Bool));
    }
    validate(&props, params)?;
    let now = now_epoch();
    let mut items: Vec<Value> = st
        .guests
        .values()
        .filter(|g| g.kind == kind && caller.has(&format!("/vms/{}", g.vmid), "VM.Audit"))
        .map(|g| Value::Object(g.list_json(st.version, now)))
        .collect();
    st.rng.shuffle(&mut items);
    data(Value::Array(items))
}

fn get_config(
    st: &SimState,
    _caller: &Caller,
    kind: Kind,
    params: &Params,
) -> Result<Answer, ApiError> {
    validate(
        &[
            NODE,
            VMID,
            opt("current", Ty::Bool),
            opt(
                "snapshot",
                Ty::Str {
                    fmt: Fmt::ConfigId,
                    max_len: Some(40),
                },
            ),
        ],
        params,
    )?;
    let current = flag(params, "current");
    let snap = params.get("snapshot").filter(|s| !s.is_empty());
    if snap.is_some() && current {
        let mut e = BTreeMap::new();
        e.insert(
            "snapshot".to_owned(),
            "cannot use 'snapshot' parameter with 'current'".to_owned(),
        );
        e.insert(
            "current".to_owned(),
            "cannot use 'snapshot' parameter with 'current'".to_owned(),
        );
        return Err(ApiError::params(e));
    }
    let g = load(st, kind, vmid_of(params))?;
    if let Some(name) = snap {
        let s = g
            .snapshots
            .get(name)
            .ok_or_else(|| ApiError::die(format!("snapshot '{name}' does not exist")))?;
        return data(g.snapshot_config_json(s));
    }
    data(g.config_json(current))
}

/// `GET /nodes/{node}/lxc|qemu/{vmid}`: the directory index (loads the config first).
fn get_guest_index(st: &SimState, kind: Kind, params: &Params) -> Result<Answer, ApiError> {
    validate(&[NODE, VMID], params)?;
    load(st, kind, vmid_of(params))?;
    let subdirs: &[&str] = match kind {
        Kind::Lxc => &[
            "config",
            "pending",
            "status",
            "vncproxy",
            "termproxy",
            "vncwebsocket",
            "spiceproxy",
            "migrate",
            "clone",
            "rrd",
            "rrddata",
            "firewall",
            "snapshot",
            "resize",
        ],
        Kind::Qemu => &[
            "config",
            "pending",
            "status",
            "unlink",
            "vncproxy",
            "termproxy",
            "migrate",
            "resize",
            "move",
            "rrd",
            "rrddata",
            "monitor",
            "agent",
            "snapshot",
            "spiceproxy",
            "sendkey",
            "firewall",
        ],
    };
    data(Value::Array(
        subdirs.iter().map(|d| json!({"subdir": d})).collect(),
    ))
}

fn get_pending(st: &SimState, kind: Kind, params: &Params) -> Result<Answer, ApiError> {
    validate(&[NODE, VMID], params)?;
    let g = load(st, kind, vmid_of(params))?;
    data(g.pending_json())
}

fn get_status(st: &SimState, kind: Kind, params: &Params) -> Result<Answer, ApiError> {
    validate(&[NODE, VMID], params)?;
    let g = load(st, kind, vmid_of(params))?;
    data(g.status_json(st.version, now_epoch()))
}

fn get_snapshots(st: &mut SimState, kind: Kind, params: &Params) -> Result<Answer, ApiError> {
    validate(&[NODE, VMID], params)?;
    let g = load(st, kind, vmid_of(params))?;
    let mut list = g.snapshot_list_json();
    let current = g.current_snapshot_json();
    st.rng.shuffle(&mut list);
    list.push(current);
    data(Value::Array(list))
}

fn snapshot_config(st: &SimState, kind: Kind, params: &Params) -> Result<Answer, ApiError> {
    validate(&[NODE, VMID, SNAPNAME], params)?;
    let g = load(st, kind, vmid_of(params))?;
    let name = &params["snapname"];
    let s = g
        .snapshots
        .get(name)
        .ok_or_else(|| ApiError::die(format!("snapshot '{name}' does not exist")))?;
    data(g.snapshot_config_json(s))
}

fn snapshot_update_config(
    st: &mut SimState,
    kind: Kind,
    params: Params,
) -> Result<Answer, ApiError> {
    validate(
        &[NODE, VMID, SNAPNAME, opt("description", Ty::str())],
        &params,
    )?;
    let vmid = vmid_of(&params);
    load(st, kind, vmid)?;
    let name = params["snapname"].clone();
    let Some(desc) = params.get("description") else {
        return data(Value::Null);
    };
    let g = st
        .guests
        .get_mut(&vmid)
        .ok_or_else(|| ApiError::die("guest vanished"))?;
    let s = g
        .snapshots
        .get_mut(&name)
        .ok_or_else(|| ApiError::die(format!("snapshot '{name}' does not exist")))?;
    s.description = guest::normalize_description(desc);
    g.touch();
    data(Value::Null)
}

// ---------------------------------------------------------------- config (write)

/// What `check_ct_modify_config_perm` looks at besides the key.
struct PermCtx<'a> {
    caller: &'a Caller,
    st: &'a SimState,
    vmid: u32,
    old: Option<&'a BTreeMap<String, String>>,
    unprivileged: bool,
}

/// `check_ct_modify_config_perm` for one key.
fn lxc_key_perm(pc: &PermCtx<'_>, new: &Params, key: &str, delete: bool) -> Result<(), ApiError> {
    let PermCtx {
        caller,
        st,
        vmid,
        old,
        unprivileged,
    } = *pc;
    let vms = format!("/vms/{vmid}");
    match key {
        "cores" | "cpuunits" | "cpulimit" => caller.check(&vms, &["VM.Config.CPU"]),
        k if k == "rootfs" || guest::is_indexed(k, "mp") => {
            caller.check(&vms, &["VM.Config.Disk"])?;
            if delete {
                return Ok(());
            }
            let value = new.get(k).map(String::as_str).unwrap_or("");
            let vol = value.split(',').next().unwrap_or("");
            let vol = vol.strip_prefix("volume=").unwrap_or(vol);
            if vol.starts_with('/') {
                let t = if vol.starts_with("/dev/") {
                    "device"
                } else {
                    "bind"
                };
                return Err(ApiError::perm(format!(
                    "mount point type {t} is only allowed for root@pam"
                )));
            }
            if let Some((sid, name)) = schema::parse_volume_id(vol) {
                if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                    caller.check(&format!("/storage/{sid}"), &["Datastore.AllocateSpace"])?;
                } else {
                    check_volume_access(st, caller, Some(vmid), vol, Some("rootdir"))?;
                }
            }
            Ok(())
        }
        "memory" | "swap" => caller.check(&vms, &["VM.Config.Memory"]),
        k if guest::is_indexed(k, "net") => caller.check(&vms, &["VM.Config.Network"]),
        k if guest::is_indexed(k, "dev") => Err(ApiError::perm(
            "configuring device passthrough is only allowed for root@pam",
        )),
        "nameserver" | "searchdomain" | "hostname" => caller.check(&vms, &["VM.Config.Network"]),
        "features" => {
            if !unprivileged {
                return Err(ApiError::perm(
                    "changing feature flags for privileged container is only allowed for root@pam",
                ));
            }
            let parse = |s: &str| {
                schema::parse_propstr(&schema::FEATURES, s, "features").unwrap_or_default()
            };
            let old_f = old
                .and_then(|o| o.get("features"))
                .filter(|s| !s.is_empty());
            let (mut nesting, mut other) = (false, false);
            if !delete {
                let newf = parse(new.get("features").map(String::as_str).unwrap_or(""));
                match old_f {
                    Some(o) => {
                        let oldf = parse(o);
                        for k in oldf.keys().chain(newf.keys()) {
                            let a = oldf.get(k).map(String::as_str).unwrap_or("");
                            let b = newf.get(k).map(String::as_str).unwrap_or("");
                            if a != b {
                                if k == "nesting" {
                                    nesting = true;
                                } else {
                                    other = true;
                                }
                            }
                        }
                    }
                    None => {
                        if newf.len() == 1 && newf.contains_key("nesting") {
                            nesting = true;
                        } else if !newf.is_empty() {
                            other = true;
                        }
                    }
                }
            } else {
                let oldf = parse(old_f.map(String::as_str).unwrap_or(""));
                if oldf.len() == 1 && oldf.contains_key("nesting") {
                    nesting = true;
                } else if !oldf.is_empty() {
                    other = true;
                }
            }
            if other {
                return Err(ApiError::perm(
                    "changing feature flags (except nesting) is only allowed for root@pam",
                ));
            }
            if nesting {
                caller.check(&vms, &["VM.Allocate"])?;
            }
            Ok(())
        }
        "hookscript" => Err(ApiError::perm(
            "changing the hookscript is only allowed for root@pam",
        )),
        // tags: VM.Config.Options (datacenter tag-access is the default 'free').
        _ => caller.check(&vms, &["VM.Config.Options"]),
    }
}

fn lxc_additional(k: &str) -> Option<Ty> {
    guest::lxc_key_ty(k)
}

fn qemu_additional(k: &str) -> Option<Ty> {
    guest::qemu_key_ty(k)
}

const LXC_FASTPLUG: &[&str] = &[
    "description",
    "onboot",
    "startup",
    "protection",
    "hostname",
    "hookscript",
    "cores",
    "tags",
    "lock",
];

fn put_lxc_config(
    st: &mut SimState,
    caller: &Caller,
    mut params: Params,
) -> Result<Answer, ApiError> {
    schema::validate(
        &[
            NODE,
            VMID,
            opt("delete", Ty::fmt(Fmt::ConfigIdList)),
            opt("revert", Ty::fmt(Fmt::ConfigIdList)),
            opt(
                "digest",
                Ty::Str {
                    fmt: Fmt::None,
                    max_len: Some(40),
                },
            ),
        ],
        &lxc_additional,
        &params,
    )?;
    params.remove("node");
    let vmid = vmid_of(&params);
    params.remove("vmid");
    let digest = params.remove("digest");
    if params.is_empty() {
        return Err(ApiError::die("no options specified"));
    }
    let delete = schema::split_list(&params.remove("delete").unwrap_or_default());
    let revert = schema::split_list(&params.remove("revert").unwrap_or_default());
    let g = load(st, Kind::Lxc, vmid)?;
    g.check_lock().map_err(ApiError::die)?;
    if let Some(d) = &digest
        && *d != g.digest
    {
        return Err(ApiError::die(
            "detected modified configuration - file changed by other user? Try again.",
        ));
    }
    let unprivileged = g.conf.get("unprivileged").is_some_and(|v| v == "1");
    let old = g.merged_conf(true);
    let empty = Params::new();
    let pc = PermCtx {
        caller,
        st,
        vmid,
        old: Some(&old),
        unprivileged,
    };
    for k in &delete {
        lxc_key_perm(&pc, &empty, k, true)?;
    }
    for k in &revert {
        lxc_key_perm(&pc, &empty, k, true)?;
    }
    for k in &revert {
        if lxc_additional(k).is_none() {
            return Err(ApiError::param("revert", format!("unknown option '{k}'")));
        }
        if params.contains_key(k) {
            return Err(ApiError::param(
                "revert",
                format!("you can't use '-{k}' and '-revert {k}' at the same time"),
            ));
        }
    }
    for k in &delete {
        if lxc_additional(k).is_none() {
            return Err(ApiError::param("delete", format!("unknown option '{k}'")));
        }
        if params.contains_key(k) {
            return Err(ApiError::param(
                "delete",
                format!("you can't use '-{k}' and -delete {k}' at the same time"),
            ));
        }
        if revert.contains(k) {
            return Err(ApiError::param(
                "delete",
                format!("you can't use '-delete {k}' and '-revert {k}' at the same time"),
            ));
        }
    }
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort();
    for k in keys {
        lxc_key_perm(&pc, &params, k, false)?;
    }
    // update_pct_config
    let storages: Vec<(String, bool)> = st
        .storages
        .iter()
        .map(|s| (s.id.clone(), s.has_content("rootdir")))
        .collect();
    let mut rng = st.rng.fork();
    let node = st.node.clone();
    let g = st.guests.get_mut(&vmid).ok_or_else(|| {
        ApiError::die(format!(
            "Configuration file 'nodes/{node}/lxc/{vmid}.conf' does not exist"
        ))
    })?;
    let mut work = g.clone();
    for k in &revert {
        work.pending.remove(k);
        work.pending_delete.retain(|d| d != k);
    }
    let mut modified: Vec<String> = Vec::new();
    for k in &delete {
        if !work.conf.contains_key(k) && !work.pending.contains_key(k) {
            continue; // "cannot delete '$opt' - not set in current configuration!" (a warning)
        }
        modified.push(k.clone());
        if k == "memory" || k == "rootfs" || k == "ostype" {
            return Err(ApiError::die(format!(
                "unable to delete required option '{k}'"
            )));
        }
        if k == "unprivileged" {
            return Err(ApiError::die(format!(
                "unable to delete read-only option: '{k}'"
            )));
        }
        if !work.pending_delete.contains(k) {
            work.pending_delete.push(k.clone());
        }
    }
    for (k, v) in &params {
        modified.push(k.clone());
        let value = match k.as_str() {
            "unprivileged" => {
                return Err(ApiError::die(format!(
                    "unable to modify read-only option: '{k}'"
                )));
            }
            "tags" => guest::normalize_tags(v),
            "description" => guest::normalize_description(v).unwrap_or_default(),
            "nameserver" | "searchdomain" => schema::split_list(v).join(" "),
            k2 if k2 == "rootfs" || guest::is_indexed(k2, "mp") => {
                if let Some((sid, _)) = v.split(',').next().and_then(schema::parse_volume_id) {
                    if !storages.iter().any(|(id, _)| id == sid) {
                        return Err(ApiError::die(format!("storage '{sid}' does not exist")));
                    }
                    if !storages.iter().any(|(id, rd)| id == sid && *rd) {
                        return Err(ApiError::die(format!(
                            "storage '{sid}' does not allow content type 'rootdir' (Container)"
                        )));
                    }
                }
                v.clone()
            }
            _ => v.clone(),
        };
        if k != "description" && value.contains('\n') {
            return Err(ApiError::die(format!(
                "detected invalid newline inside property '{k}'"
            )));
        }
        work.pending.insert(k.clone(), value);
        work.pending_delete.retain(|d| d != k);
    }
    // cleanup_pending: drop pending values equal to the current ones.
    let same: Vec<String> = work
        .pending
        .iter()
        .filter(|(k, v)| work.conf.get(*k) == Some(*v) && !guest::is_indexed(k, "net"))
        .map(|(k, _)| k.clone())
        .collect();
    for k in same {
        work.pending.remove(&k);
    }
    let errors = BTreeMap::new();
    if work.running {
        // vmconfig_hotplug_pending
        let pending_keys: Vec<String> = work.pending.keys().cloned().collect();
        for k in &pending_keys {
            if !modified.contains(k) {
                continue;
            }
            if LXC_FASTPLUG.contains(&k.as_str())
                && let Some(v) = work.pending.remove(k)
            {
                set_or_remove(&mut work.conf, k, v);
            }
        }
        let dels: Vec<String> = work.pending_delete.clone();
        for k in &dels {
            if !modified.contains(k) {
                continue;
            }
            let hot = LXC_FASTPLUG.contains(&k.as_str())
                || guest::is_indexed(k, "unused")
                || guest::is_indexed(k, "net")
                || matches!(k.as_str(), "swap" | "cpulimit" | "cpuunits");
            if hot {
                work.conf.remove(k);
                work.pending_delete.retain(|d| d != k);
            }
        }
        let pending_keys: Vec<String> = work.pending.keys().cloned().collect();
        for k in &pending_keys {
            if !modified.contains(k) {
                continue;
            }
            let hot = guest::is_indexed(k, "net")
                || matches!(k.as_str(), "cpulimit" | "cpuunits" | "memory" | "swap")
                || (guest::is_indexed(k, "mp") && !work.conf.contains_key(k));
            if hot && let Some(v) = work.pending.remove(k) {
                let v = if guest::is_indexed(k, "net") {
                    guest::canonical_lxc_net(&v, k, &mut rng).unwrap_or(v)
                } else {
                    v
                };
                work.conf.insert(k.clone(), v);
            }
        }
    } else {
        for k in std::mem::take(&mut work.pending_delete) {
            if modified.contains(&k) {
                work.conf.remove(&k);
            } else {
                work.pending_delete.push(k);
            }
        }
        let pending_keys: Vec<String> = work.pending.keys().cloned().collect();
        for k in pending_keys {
            if !modified.contains(&k) {
                continue;
            }
            if let Some(v) = work.pending.remove(&k) {
                let v = if guest::is_indexed(&k, "net") {
                    guest::canonical_lxc_net(&v, &k, &mut rng).unwrap_or(v)
                } else {
                    v
                };
                set_or_remove(&mut work.conf, &k, v);
            }
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::params(errors));
    }
    work.touch();
    *g = work;
    st.config_changed(vmid);
    data(Value::Null)
}

/// Writes `v`, or removes the key when the value is empty (an empty description or tag
/// list writes nothing, so it reads back absent).
fn set_or_remove(conf: &mut BTreeMap<String, String>, k: &str, v: String) {
    if v.is_empty() {
        conf.remove(k);
    } else {
        conf.insert(k.to_owned(), v);
    }
}

/// qemu-server `check_vm_modify_config_perm` for one key.
fn qemu_key_perm(caller: &Caller, vmid: u32, key: &str) -> Result<(), ApiError> {
    let vms = format!("/vms/{vmid}");
    const CPU: &[&str] = &[
        "cores", "cpu", "cpulimit", "cpuunits", "numa", "smp", "sockets", "vcpus", "affinity",
    ];
    const MEM: &[&str] = &["memory", "balloon", "shares"];
    const HW: &[&str] = &[
        "acpi", "hotplug", "kvm", "machine", "scsihw", "smbios1", "tablet", "vga", "watchdog",
        "audio0",
    ];
    const GENERAL: &[&str] = &[
        "agent",
        "autostart",
        "bios",
        "description",
        "keyboard",
        "localtime",
        "migrate_downtime",
        "migrate_speed",
        "name",
        "onboot",
        "ostype",
        "protection",
        "reboot",
        "startup",
        "tags",
        "vmgenid",
        "meta",
        "serial0",
    ];
    const DISKOPT: &[&str] = &["boot", "bootdisk", "vmstatestorage"];
    const CLOUDINIT: &[&str] = &[
        "ciuser",
        "cipassword",
        "sshkeys",
        "citype",
        "nameserver",
        "searchdomain",
    ];
    if CPU.contains(&key) {
        caller.check(&vms, &["VM.Config.CPU"])
    } else if MEM.contains(&key) {
        caller.check(&vms, &["VM.Config.Memory"])
    } else if HW.contains(&key) || guest::is_indexed(key, "usb") {
        caller.check(&vms, &["VM.Config.HWType"])
    } else if GENERAL.contains(&key) {
        caller.check(&vms, &["VM.Config.Options"])?;
        if key == "startup" {
            caller.check("/", &["Sys.Modify"])?;
        }
        Ok(())
    } else if key == "freeze" {
        caller.check(&vms, &["VM.PowerMgmt"])
    } else if DISKOPT.contains(&key)
        || guest::is_disk_key(Kind::Qemu, key)
        || guest::is_indexed(key, "unused")
    {
        caller.check(&vms, &["VM.Config.Disk"])
    } else if guest::is_indexed(key, "net") || guest::is_indexed(key, "ipconfig") {
        caller.check(&vms, &["VM.Config.Network"])
    } else if CLOUDINIT.contains(&key) {
        caller.check(&vms, &["VM.Config.Cloudinit"])
    } else {
        Err(ApiError::die(format!("only root can set '{key}' config")))
    }
}

const QEMU_FASTPLUG: &[&str] = &[
    "description",
    "name",
    "onboot",
    "protection",
    "startup",
    "tags",
    "lock",
    "shares",
    "hookscript",
    "cpulimit",
    "cpuunits",
    "vmstatestorage",
];

/// Applies a QEMU config change to `g` (the part that runs under the config lock).
fn qemu_apply(
    g: &mut Guest,
    params: &Params,
    delete: &[String],
    revert: &[String],
    rng: &mut fastrand::Rng,
) -> Result<(), String> {
    g.check_lock()?;
    for k in revert {
        g.pending.remove(k);
        g.pending_delete.retain(|d| d != k);
    }
    for k in delete {
        if !g.conf.contains_key(k) && !g.pending.contains_key(k) {
            continue;
        }
        if g.running && !(QEMU_FASTPLUG.contains(&k.as_str()) || guest::is_indexed(k, "net")) {
            if !g.pending_delete.contains(k) {
                g.pending_delete.push(k.clone());
            }
        } else {
            g.conf.remove(k);
            g.pending.remove(k);
        }
    }
    for (k, v) in params {
        let value = match k.as_str() {
            "tags" => guest::normalize_tags(v),
            "description" => guest::normalize_description(v).unwrap_or_default(),
            k2 if guest::is_indexed(k2, "net") => guest::canonical_qemu_net(v, k2, rng)
                .map_err(|e| format!("unable to parse value of '{k2}' - {e}"))?,
            _ => v.clone(),
        };
        if k != "description" && value.contains('\n') {
            return Err(format!("detected invalid newline inside property '{k}'"));
        }
        let hot = QEMU_FASTPLUG.contains(&k.as_str())
            || guest::is_indexed(k, "net")
            || guest::is_disk_key(Kind::Qemu, k)
            || guest::is_indexed(k, "usb");
        if g.running && !hot {
            g.pending.insert(k.clone(), value);
        } else {
            g.pending.remove(k);
            set_or_remove(&mut g.conf, k, value);
        }
        g.pending_delete.retain(|d| d != k);
    }
    g.touch();
    Ok(())
}

fn qemu_config(
    st: &mut SimState,
    caller: &Caller,
    mut params: Params,
    is_async: bool,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    let mut props = vec![
        NODE,
        VMID,
        opt("delete", Ty::fmt(Fmt::ConfigIdList)),
        opt("revert", Ty::fmt(Fmt::ConfigIdList)),
        opt(
            "digest",
            Ty::Str {
                fmt: Fmt::None,
                max_len: Some(40),
            },
        ),
        opt("skiplock", Ty::Bool),
        opt("force", Ty::Bool),
    ];
    if is_async {
        props.push(opt("background_delay", Ty::int(1, 30)));
    }
    schema::validate(&props, &qemu_additional, &params)?;
    params.remove("node");
    let vmid = vmid_of(&params);
    params.remove("vmid");
    params.remove("background_delay");
    params.remove("force");
    if flag(&params, "skiplock") {
        return Err(ApiError::param(
            "skiplock",
            "Only root may use this option.",
        ));
    }
    params.remove("skiplock");
    let digest = params.remove("digest");
    let delete = schema::split_list(&params.remove("delete").unwrap_or_default());
    let revert = schema::split_list(&params.remove("revert").unwrap_or_default());
    if params.is_empty() && delete.is_empty() && revert.is_empty() {
        return Err(ApiError::die("no options specified"));
    }
    for k in &delete {
        if params.contains_key(k) {
            return Err(ApiError::param(
                "delete",
                format!("cannot set and delete '{k}' at the same time"),
            ));
        }
    }
    let mut keys: Vec<&String> = params
        .keys()
        .chain(delete.iter())
        .chain(revert.iter())
        .collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        qemu_key_perm(caller, vmid, k)?;
    }
    // qemu-server compares the digest in its update handler, under the config lock and
    // before it forks the `qmconfig` worker, in its own words: a 500 for PUT and POST.
    let g = load(st, Kind::Qemu, vmid)?;
    if let Some(d) = &digest
        && *d != g.digest
    {
        return Err(ApiError::die(
            "checksum missmatch (file change by other user?)",
        ));
    }
    if !is_async {
        let mut rng = st.rng.fork();
        let g = st
            .guests
            .get_mut(&vmid)
            .ok_or_else(|| ApiError::die("vanished"))?;
        let mut work = g.clone();
        qemu_apply(&mut work, &params, &delete, &revert, &mut rng).map_err(ApiError::die)?;
        *g = work;
        st.config_changed(vmid);
        return data(Value::Null);
    }
    let finish: state::FinishFn = Box::new(move |st: &mut SimState| {
        load_task(st, Kind::Qemu, vmid)?;
        let mut rng = st.rng.fork();
        let g = st.guests.get_mut(&vmid).ok_or("vanished")?;
        let mut work = g.clone();
        qemu_apply(&mut work, &params, &delete, &revert, &mut rng)?;
        *g = work;
        st.config_changed(vmid);
        Ok(vec![])
    });
    spawn(
        st,
        ctx,
        caller,
        NewTask {
            wtype: "qmconfig",
            id: vmid.to_string(),
            log: vec![],
            finish,
            cleanup: Box::new(|_| {}),
            partial: None,
        },
    )
}

/// A task to start: worker type, id, first log lines, and what it does.
struct NewTask {
    wtype: &'static str,
    id: String,
    log: Vec<String>,
    finish: state::FinishFn,
    cleanup: state::CleanupFn,
    /// What a task fault leaves (`None`: what `cleanup` leaves, i.e. nothing changed).
    partial: Option<state::PartialFn>,
}

/// The exit status of a task failed by a task fault that gave no message.
fn default_fault_message(wtype: &str) -> String {
    format!("{wtype} failed midway (pvesim task fault)")
}

/// Splits a task's work for a fault that strikes at its very end: the finish, and a
/// partial that does the whole work, then `after`, and then fails (a real error of the
/// work wins over the fault's message).
fn finish_then_fail(
    work: state::FinishFn,
    after: impl FnOnce(&mut SimState) + Send + 'static,
) -> (state::FinishFn, state::PartialFn) {
    let shared = std::sync::Arc::new(std::sync::Mutex::new(Some(work)));
    let s2 = shared.clone();
    let take = |s: &std::sync::Mutex<Option<state::FinishFn>>| {
        s.lock().unwrap_or_else(|e| e.into_inner()).take()
    };
    let finish: state::FinishFn = Box::new(move |st: &mut SimState| match take(&shared) {
        Some(w) => w(st),
        None => Err("task work already done".into()),
    });
    let partial: state::PartialFn = Box::new(move |st: &mut SimState, msg: String| {
        let Some(w) = take(&s2) else {
            return msg.into();
        };
        match w(st) {
            Err(e) => e,
            Ok(lines) => {
                after(st);
                state::TaskErr { lines, msg }
            }
        }
    });
    (finish, partial)
}

/// Starts the task and answers with its UPID, as PVE answers every async call.
fn spawn(
    st: &mut SimState,
    ctx: &mut RequestCtx,
    caller: &Caller,
    t: NewTask,
) -> Result<Answer, ApiError> {
    spawn_timed(st, ctx, caller, t, std::time::Duration::ZERO)
}

/// [`spawn`] for a task that runs `extra` longer than the configured task time.
fn spawn_timed(
    st: &mut SimState,
    ctx: &mut RequestCtx,
    caller: &Caller,
    t: NewTask,
    extra: std::time::Duration,
) -> Result<Answer, ApiError> {
    let injected_failure = ctx.task_fail.take();
    if injected_failure.is_some() {
        ctx.task_fail_used = true;
    }
    let midway = match injected_failure {
        Some(_) => None,
        None => st.task_faults.take(t.wtype, &t.id).map(|f| state::Midway {
            msg: f.message.unwrap_or_else(|| default_fault_message(t.wtype)),
            keep_lock: f.keep_lock.unwrap_or(false),
        }),
    };
    let upid = st.start_task(
        t.wtype,
        &t.id,
        &caller.token_id,
        t.log,
        TaskWork {
            finish: t.finish,
            cleanup: t.cleanup,
            injected_failure,
            midway,
            partial: t.partial,
        },
        extra,
    );
    data(json!(upid))
}

// ---------------------------------------------------------------- power

fn guest_action(
    st: &mut SimState,
    caller: &Caller,
    kind: Kind,
    action: Action,
    params: Params,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    if action == Action::Reboot {
        return guest_reboot(st, caller, kind, params, ctx);
    }
    let mut props = vec![NODE, VMID, opt("skiplock", Ty::Bool)];
    match (kind, action) {
        (_, Action::Stop) => {
            if st.version.has_overrule_shutdown() {
                props.push(opt("overrule-shutdown", Ty::Bool));
            }
            if kind == Kind::Qemu {
                props.push(opt("timeout", Ty::int_min(0)));
                props.push(opt("keepActive", Ty::Bool));
            }
        }
        (_, Action::Shutdown) => {
            props.push(opt("timeout", Ty::int_min(0)));
            props.push(opt("forceStop", Ty::Bool));
            if kind == Kind::Qemu {
                props.push(opt("keepActive", Ty::Bool));
            }
        }
        (Kind::Qemu, Action::Start) => {
            props.push(opt("timeout", Ty::int_min(0)));
            props.push(opt("machine", Ty::str()));
        }
        (Kind::Lxc, Action::Start) => props.push(opt("debug", Ty::Bool)),
        (_, Action::Reboot) => unreachable!("handled by guest_reboot"),
    }
    validate(&props, &params)?;
    if flag(&params, "skiplock") {
        return Err(ApiError::param(
            "skiplock",
            "Only root may use this option.",
        ));
    }
    if kind == Kind::Qemu && flag(&params, "keepActive") {
        return Err(ApiError::param(
            "keepActive",
            "Only root may use this option.",
        ));
    }
    let vmid = vmid_of(&params);
    let id = vmid.to_string();
    let label = kind.label();
    let exists = st.guests.get(&vmid).is_some_and(|g| g.kind == kind);
    let running = exists && st.guests.get(&vmid).is_some_and(|g| g.running);
    let ha = exists && st.guests.get(&vmid).is_some_and(|g| g.ha.is_some());
    if kind == Kind::Lxc {
        match action {
            Action::Start if running => {
                return Err(ApiError::die(format!("CT {vmid} already running")));
            }
            Action::Stop | Action::Shutdown if !running => {
                return Err(ApiError::die(format!("CT {vmid} not running")));
            }
            _ => {}
        }
    }
    let overrule = flag(&params, "overrule-shutdown");
    if ha {
        if action == Action::Stop && overrule {
            return Err(ApiError::param(
                "overrule-shutdown",
                "Not applicable for HA resources.",
            ));
        }
        let (wtype, want) = if action == Action::Start {
            ("hastart", true)
        } else {
            ("hastop", false)
        };
        let log = vec![format!(
            "Requesting HA {} for {label} {vmid}",
            if want { "start" } else { "stop" }
        )];
        let finish: state::FinishFn = Box::new(move |st: &mut SimState| {
            if st.guests.get(&vmid).is_some_and(|g| g.kind == kind) {
                st.set_running(vmid, want);
            }
            Ok(vec![])
        });
        return spawn(
            st,
            ctx,
            caller,
            NewTask {
                wtype,
                id: id.clone(),
                log,
                finish,
                cleanup: Box::new(|_| {}),
                partial: None,
            },
        );
    }
    let (wtype, want) = match (kind, action) {
        (Kind::Lxc, Action::Start) => ("vzstart", true),
        (Kind::Lxc, Action::Stop) => ("vzstop", false),
        (Kind::Lxc, Action::Shutdown) => ("vzshutdown", false),
        (Kind::Qemu, Action::Start) => ("qmstart", true),
        (Kind::Qemu, Action::Stop) => ("qmstop", false),
        (Kind::Qemu, Action::Shutdown) => ("qmshutdown", false),
        (_, Action::Reboot) => unreachable!("handled by guest_reboot"),
    };
    let mut log = Vec::new();
    if action == Action::Stop && overrule {
        let shutdown_type = if kind == Kind::Lxc {
            "vzshutdown"
        } else {
            "qmshutdown"
        };
        let victims = st.tasks.running_of(shutdown_type, &id);
        for u in &victims {
            st.kill_task(u, "received interrupt");
        }
        if !victims.is_empty() {
            log.push(format!(
                "overruled {shutdown_type} tasks: {}",
                victims.join(", ")
            ));
        }
    }
    let finish: state::FinishFn = Box::new(move |st: &mut SimState| {
        let g = load_task(st, kind, vmid)?;
        if want {
            if g.is_template() {
                return Err(match kind {
                    Kind::Lxc => "you can't start a CT if it's a template".into(),
                    Kind::Qemu => "you can't start a vm if it's a template".into(),
                });
            }
            if g.lock() != Some("mounted") {
                g.check_lock()?;
            }
            if g.running {
                return Err(format!("{label} {vmid} already running").into());
            }
            if g.start_fails {
                return Err(start_failure(kind, vmid));
            }
        } else if g.lock() != Some("mounted") {
            g.check_lock()?;
        }
        st.set_running(vmid, want);
        Ok(vec![])
    });
    spawn(
        st,
        ctx,
        caller,
        NewTask {
            wtype,
            id: id.clone(),
            log,
            finish,
            cleanup: Box::new(|_| {}),
            partial: None,
        },
    )
}

/// How the start task of a guest that does not boot ends (control flag `start_fails`):
/// pve-container's `startup for container 'N' failed` after lxc-start's own lines,
/// qemu-server's `start failed: QEMU exited with code 1`.
fn start_failure(kind: Kind, vmid: u32) -> state::TaskErr {
    match kind {
        Kind::Lxc => state::TaskErr {
            lines: vec![
                "run_buffer: 571 Script exited with status 1".to_owned(),
                format!("lxc_init: 845 Failed to run lxc.hook.pre-start for container \"{vmid}\""),
                format!("__lxc_start: 2034 Failed to initialize container \"{vmid}\""),
            ],
            msg: format!("startup for container '{vmid}' failed"),
        },
        Kind::Qemu => "start failed: QEMU exited with code 1".into(),
    }
}

/// `POST .../status/reboot` (`vzreboot` / `qmreboot`): only `timeout` besides the path
/// (no `skiplock`); a guest that is not running is refused before the fork with the same
/// 500 as shutdown (`CT N not running` / `VM N not running`; an unknown VM is qemu-server's
/// missing config). The task shuts the guest down
/// and starts it again: a new pid and start time, and pending changes applied, as a start
/// applies them. HA-managed guests are rebooted directly too (PVE's reboot handlers have no
/// HA path).
fn guest_reboot(
    st: &mut SimState,
    caller: &Caller,
    kind: Kind,
    params: Params,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    validate(&[NODE, VMID, opt("timeout", Ty::int_min(0))], &params)?;
    let vmid = vmid_of(&params);
    let label = kind.label();
    if kind == Kind::Qemu {
        // qemu-server's check_running loads the config first.
        load(st, kind, vmid)?;
    }
    let running = st
        .guests
        .get(&vmid)
        .is_some_and(|g| g.kind == kind && g.running);
    if !running {
        return Err(ApiError::die(format!("{label} {vmid} not running")));
    }
    let wtype = match kind {
        Kind::Lxc => "vzreboot",
        Kind::Qemu => "qmreboot",
    };
    let finish: state::FinishFn = Box::new(move |st: &mut SimState| {
        let g = load_task(st, kind, vmid)?;
        if g.lock() != Some("mounted") {
            g.check_lock()?;
        }
        if !g.running {
            return Err(format!("{label} {vmid} not running").into());
        }
        st.set_running(vmid, false);
        st.set_running(vmid, true);
        Ok(vec![])
    });
    spawn(
        st,
        ctx,
        caller,
        NewTask {
            wtype,
            id: vmid.to_string(),
            log: Vec::new(),
            finish,
            cleanup: Box::new(|_| {}),
            partial: None,
        },
    )
}

// ---------------------------------------------------------------- snapshots

/// `has_feature('snapshot')` over every volume of the config: each must sit on a
/// storage that can snapshot it in its format (section 11 of the API notes); a bind or
/// device mount point (a host path, not a volume) has no such feature at all.
fn snapshot_feature_ok(st: &SimState, g: &Guest) -> bool {
    g.conf
        .iter()
        .filter(|(k, v)| guest::is_disk_key(g.kind, k) && !v.contains("media=cdrom"))
        .all(|(_, v)| {
            guest::volume_of(v)
                .and_then(schema::parse_volume_id)
                .and_then(|(sid, name)| st.storage(sid).map(|s| (s, name)))
                .is_some_and(|(s, name)| storage::volume_can_snapshot(s.stype, name))
        })
}

/// ZFS's rule, checked for each volume of the snapshot before a rollback changes
/// anything: only the most recent snapshot of a dataset can be rolled back to. The
/// error names the first volume (rootfs first) that has a newer snapshot.
fn zfs_rollback_blocker(st: &SimState, g: &Guest, name: &str) -> Option<String> {
    let target = g.snapshots.get(name)?;
    let newer = g
        .snapshots
        .iter()
        .any(|(n, s)| n != name && s.order > target.order);
    if !newer {
        return None;
    }
    guest::config_disks(g.kind, &target.conf)
        .into_iter()
        .find(|(_, sid, _, _)| st.storage(sid).is_some_and(|s| s.stype == "zfspool"))
        .map(|(_, sid, vol, _)| {
            format!("can't rollback, '{name}' is not most recent snapshot on '{sid}:{vol}'")
        })
}

fn snapshot_create(
    st: &mut SimState,
    caller: &Caller,
    kind: Kind,
    params: Params,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    let mut props = vec![NODE, VMID, SNAPNAME, opt("description", Ty::str())];
    if kind == Kind::Qemu {
        props.push(opt("vmstate", Ty::Bool));
    }
    validate(&props, &params)?;
    let vmid = vmid_of(&params);
    let name = params["snapname"].clone();
    if name == "current" || name == "vzdump" {
        return Err(ApiError::die(format!(
            "unable to use snapshot name '{name}' (reserved name)"
        )));
    }
    let description = params
        .get("description")
        .and_then(|d| guest::normalize_description(d));
    let vmstate = flag(&params, "vmstate");
    // The worker prepares at once: lock, snapshot in state 'prepare'.
    let prepared: Result<(), String> = (|| {
        let g = load_task(st, kind, vmid)?;
        if g.is_template() {
            return Err("you can't take a snapshot if it's a template".into());
        }
        g.check_lock()?;
        if g.snapshots.contains_key(&name) {
            return Err(format!("snapshot name '{name}' already used"));
        }
        if !snapshot_feature_ok(st, g) {
            return Err("snapshot feature is not available".into());
        }
        let now = now_epoch();
        let g = st.guests.get_mut(&vmid).ok_or("vanished")?;
        let mut conf = g.conf.clone();
        for k in ["lock", "description", "digest"] {
            conf.remove(k);
        }
        conf.retain(|k, _| !guest::is_indexed(k, "unused"));
        g.conf.insert("lock".into(), "snapshot".into());
        g.snapshots.insert(
            name.clone(),
            Snapshot {
                conf,
                snaptime: now,
                description: description.clone(),
                snapstate: Some("prepare"),
                vmstate: vmstate && g.running,
                order: guest::next_snapshot_order(),
            },
        );
        g.touch();
        Ok(())
    })();
    let n2 = name.clone();
    let prepared2 = prepared.clone();
    let finish: state::FinishFn = Box::new(move |st: &mut SimState| {
        prepared?;
        let g = st.guests.get_mut(&vmid).ok_or("vanished")?;
        if let Some(s) = g.snapshots.get_mut(&n2) {
            s.snapstate = None;
        }
        g.conf.remove("lock");
        g.conf.insert("parent".into(), n2.clone());
        g.touch();
        Ok(vec![])
    });
    let n3 = name.clone();
    let cleanup: state::CleanupFn = Box::new(move |st: &mut SimState| {
        if let Some(g) = st.guests.get_mut(&vmid)
            && g.snapshots
                .get(&n3)
                .is_some_and(|s| s.snapstate == Some("prepare"))
        {
            g.snapshots.remove(&n3);
            if g.lock() == Some("snapshot") {
                g.conf.remove("lock");
            }
            g.touch();
        }
    });
    // A task fault: a volume snapshot failed and PVE's cleanup could not remove the
    // half-made snapshot, which stays in state `prepare` (delete it with `force=1`).
    let n4 = name.clone();
    let partial: state::PartialFn = Box::new(move |st: &mut SimState, msg: String| {
        if let Err(e) = prepared2 {
            return e.into();
        }
        if let Some(g) = st.guests.get_mut(&vmid) {
            if g.lock() == Some("snapshot") {
                g.conf.remove("lock");
            }
            g.touch();
        }
        state::TaskErr {
            lines: vec![
                "snapshot create failed: starting cleanup".into(),
                format!("unable to remove the partial snapshot '{n4}'"),
            ],
            msg,
        }
    });
    let wtype = if kind == Kind::Lxc {
        "vzsnapshot"
    } else {
        "qmsnapshot"
    };
    spawn(
        st,
        ctx,
        caller,
        NewTask {
            wtype,
            id: vmid.to_string(),
            log: vec![],
            finish,
            cleanup,
            partial: Some(partial),
        },
    )
}

fn snapshot_delete(
    st: &mut SimState,
    caller: &Caller,
    kind: Kind,
    params: Params,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    validate(&[NODE, VMID, SNAPNAME, opt("force", Ty::Bool)], &params)?;
    let vmid = vmid_of(&params);
    let name = params["snapname"].clone();
    let force = flag(&params, "force");
    let prepared: Result<Option<String>, String> = (|| {
        let g = load_task(st, kind, vmid)?;
        if !g.snapshots.contains_key(&name) {
            return Err(format!("snapshot '{name}' does not exist"));
        }
        g.check_lock()?;
        if g.is_template() {
            return Err("you can't delete a snapshot if vm is a template".into());
        }
        // A snapshot a failed task left in `prepare` has no volume snapshots to remove:
        // without `force`, removing the first one fails (the task dies there, leaving
        // the lock and `snapstate: delete`, as PVE's does).
        let missing = g
            .snapshots
            .get(&name)
            .filter(|s| s.snapstate == Some("prepare"))
            .and_then(|s| guest::config_disks(kind, &s.conf).into_iter().next())
            .map(|(_, sid, vol, _)| match st.storage(&sid).map(|s| s.stype) {
                Some("zfspool") => {
                    "zfs error: could not find any snapshots to destroy; check snapshot names."
                        .to_owned()
                }
                _ => format!("snapshot '{name}' of volume '{sid}:{vol}' does not exist"),
            })
            .filter(|_| !force);
        let g = st.guests.get_mut(&vmid).ok_or("vanished")?;
        g.conf.insert("lock".into(), "snapshot-delete".into());
        if let Some(s) = g.snapshots.get_mut(&name) {
            s.snapstate = Some("delete");
        }
        g.touch();
        Ok(missing)
    })();
    let n2 = name.clone();
    let finish: state::FinishFn = Box::new(move |st: &mut SimState| {
        if let Some(e) = prepared? {
            return Err(e.into());
        }
        let g = st.guests.get_mut(&vmid).ok_or("vanished")?;
        let removed = g.snapshots.remove(&n2);
        let new_parent = removed.and_then(|s| s.conf.get("parent").cloned());
        let relink = |c: &mut BTreeMap<String, String>| {
            if c.get("parent") == Some(&n2) {
                match &new_parent {
                    Some(p) => {
                        c.insert("parent".into(), p.clone());
                    }
                    None => {
                        c.remove("parent");
                    }
                }
            }
        };
        relink(&mut g.conf);
        for s in g.snapshots.values_mut() {
            relink(&mut s.conf);
        }
        g.conf.remove("lock");
        g.touch();
        Ok(vec![])
    });
    let n3 = name.clone();
    let cleanup: state::CleanupFn = Box::new(move |st: &mut SimState| {
        if let Some(g) = st.guests.get_mut(&vmid)
            && g.lock() == Some("snapshot-delete")
        {
            g.conf.remove("lock");
            if let Some(s) = g.snapshots.get_mut(&n3) {
                s.snapstate = None;
            }
            g.touch();
        }
    });
    let wtype = if kind == Kind::Lxc {
        "vzdelsnapshot"
    } else {
        "qmdelsnapshot"
    };
    spawn(
        st,
        ctx,
        caller,
        NewTask {
            wtype,
            id: vmid.to_string(),
            log: vec![],
            finish,
            cleanup,
            partial: None,
        },
    )
}

fn snapshot_rollback(
    st: &mut SimState,
    caller: &Caller,
    kind: Kind,
    params: Params,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    validate(&[NODE, VMID, SNAPNAME, opt("start", Ty::Bool)], &params)?;
    let vmid = vmid_of(&params);
    let name = params["snapname"].clone();
    let start = flag(&params, "start");
    let prepared: Result<(), String> = (|| {
        let g = load_task(st, kind, vmid)?;
        if g.is_template() {
            return Err("you can't rollback if vm is a template".into());
        }
        let s = g
            .snapshots
            .get(&name)
            .ok_or_else(|| format!("snapshot '{name}' does not exist"))?;
        if let Some(e) = zfs_rollback_blocker(st, g, &name) {
            return Err(e);
        }
        if let Some(state) = s.snapstate {
            return Err(format!(
                "unable to rollback to incomplete snapshot (snapstate = {state})"
            ));
        }
        g.check_lock()?;
        let g = st.guests.get_mut(&vmid).ok_or("vanished")?;
        g.conf.insert("lock".into(), "rollback".into());
        g.touch();
        Ok(())
    })();
    let n2 = name.clone();
    let prepared2 = prepared.clone();
    let finish: state::FinishFn = Box::new(move |st: &mut SimState| {
        prepared?;
        st.set_running(vmid, false);
        let g = st.guests.get_mut(&vmid).ok_or("vanished")?;
        let snap = g
            .snapshots
            .get(&n2)
            .cloned()
            .ok_or_else(|| format!("snapshot '{n2}' does not exist"))?;
        let mut conf: BTreeMap<String, String> = g
            .conf
            .iter()
            .filter(|(k, _)| k.as_str() == "description" || guest::is_indexed(k, "unused"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in snap.conf {
            conf.insert(k, v);
        }
        conf.insert("parent".into(), n2.clone());
        conf.remove("lock");
        g.conf = conf;
        g.pending.clear();
        g.pending_delete.clear();
        g.touch();
        let start_now = start && kind == Kind::Lxc || kind == Kind::Qemu && snap.vmstate;
        if start_now {
            st.set_running(vmid, true);
        }
        Ok(vec![])
    });
    let cleanup: state::CleanupFn = Box::new(move |st: &mut SimState| {
        if let Some(g) = st.guests.get_mut(&vmid)
            && g.lock() == Some("rollback")
        {
            g.conf.remove("lock");
            g.touch();
        }
    });
    // A task fault: the rollback fails before it changes anything (the lock is lifted).
    let partial: state::PartialFn = Box::new(move |st: &mut SimState, msg: String| {
        if let Some(g) = st.guests.get_mut(&vmid)
            && g.lock() == Some("rollback")
        {
            g.conf.remove("lock");
            g.touch();
        }
        match prepared2 {
            Err(e) => e.into(),
            Ok(()) => msg.into(),
        }
    });
    let wtype = if kind == Kind::Lxc {
        "vzrollback"
    } else {
        "qmrollback"
    };
    spawn(
        st,
        ctx,
        caller,
        NewTask {
            wtype,
            id: vmid.to_string(),
            log: vec![],
            finish,
            cleanup,
            partial: Some(partial),
        },
    )
}

// ---------------------------------------------------------------- storage

/// pve-storage `check_volume_access`.
fn check_volume_access(
    st: &SimState,
    caller: &Caller,
    vmid: Option<u32>,
    volid: &str,
    want: Option<&str>,
) -> Result<(), ApiError> {
    let Some((sid, volname)) = schema::parse_volume_id(volid) else {
        return Err(ApiError::die(
            "Only root can pass arbitrary filesystem paths.",
        ));
    };
    if st.storage(sid).is_none() {
        return Err(ApiError::die(format!("storage '{sid}' does not exist")));
    }
    let (vtype, owner) = if let Some((_, owner)) = parse_backup_name(volname) {
        ("backup", Some(owner))
    } else if volname.starts_with("vztmpl/") {
        ("vztmpl", None)
    } else if volname.starts_with("iso/") {
        ("iso", None)
    } else {
        let owner = volname
            .split(['-', '/'])
            .find_map(|p| p.parse::<u32>().ok())
            .filter(|_| volname.contains("vm-") || volname.contains("subvol-"));
        ("images", owner)
    };
    if let Some(w) = want
        && vtype != w
        && !(w == "rootdir" && vtype == "images")
    {
        return Err(ApiError::die(format!(
            "unable to use volume {volid} - content type needs to be '{w}'"
        )));
    }
    let spath = format!("/storage/{sid}");
    if caller.has(&spath, "Datastore.Allocate") {
        return Ok(());
    }
    match (vtype, owner) {
        ("iso" | "vztmpl", _) => {
            caller.check_any(&spath, &["Datastore.AllocateSpace", "Datastore.Audit"])
        }
        (_, Some(o)) if vmid == Some(o) => Ok(()),
        ("backup", Some(o)) => {
            caller.check(&spath, &["Datastore.AllocateSpace"])?;
            caller.check(&format!("/vms/{o}"), &["VM.Backup"])
        }
        ("images", Some(o)) => {
            caller.check(&spath, &["Datastore.Audit"])?;
            caller.check(&format!("/vms/{o}"), &["VM.Config.Disk"])
        }
        _ => Err(ApiError::die(format!(
            "missing privileges to access {volid}"
        ))),
    }
}

fn get_storage_list(st: &SimState, caller: &Caller, params: &Params) -> Result<Answer, ApiError> {
    validate(
        &[
            NODE,
            opt("storage", Ty::fmt(Fmt::StorageId)),
            opt("content", Ty::fmt(Fmt::StorageContentList)),
            opt("enabled", Ty::Bool),
            opt("target", Ty::fmt(Fmt::Node)),
            opt("format", Ty::Bool),
        ],
        params,
    )?;
    let content = params
        .get("content")
        .map(|c| schema::split_list(c))
        .unwrap_or_default();
    let only_enabled = flag(params, "enabled");
    let items: Vec<Value> = st
        .storages
        .iter()
        .filter(|s| params.get("storage").is_none_or(|id| *id == s.id))
        .filter(|s| content.iter().all(|c| s.has_content(c)))
        .filter(|s| !only_enabled || s.enabled)
        .filter(|s| {
            let p = format!("/storage/{}", s.id);
            caller.has(&p, "Datastore.Audit") || caller.has(&p, "Datastore.AllocateSpace")
        })
        .map(|s| s.list_json())
        .collect();
    data(Value::Array(items))
}

fn get_storage_content(
    st: &SimState,
    caller: &Caller,
    params: &Params,
) -> Result<Answer, ApiError> {
    validate(
        &[
            NODE,
            req("storage", Ty::fmt(Fmt::StorageId)),
            opt("content", Ty::fmt(Fmt::StorageContentList)),
            opt("vmid", Ty::VMID),
        ],
        params,
    )?;
    let sid = &params["storage"];
    let s = st
        .storage(sid)
        .ok_or_else(|| ApiError::die(format!("storage '{sid}' does not exist")))?;
    let want_vmid: Option<u32> = params.get("vmid").and_then(|v| v.parse().ok());
    let items: Vec<Value> = s
        .volumes
        .iter()
        .filter(|v| params.get("content").is_none_or(|c| v.content == c))
        .filter(|v| want_vmid.is_none_or(|id| v.vmid == Some(id)))
        .filter(|v| check_volume_access(st, caller, None, &v.volid, None).is_ok())
        .map(|v| v.content_json())
        .collect();
    data(Value::Array(items))
}

/// pve-storage's `real_volume_id`: a full volid must name the path's storage; a bare
/// volume name is taken on it.
fn real_volume_id(sid: &str, volume: &str) -> Result<String, ApiError> {
    match schema::parse_volume_id(volume) {
        Some((vsid, _)) if vsid != sid => Err(ApiError::die(format!(
            "storage ID mismatch ({vsid} != {sid})"
        ))),
        Some(_) => Ok(volume.to_owned()),
        None => Ok(format!("{sid}:{volume}")),
    }
}

/// How many protected backups per guest a caller without `Datastore.Allocate` on the
/// storage may keep there (pve-storage's default `max-protected-backups`).
const MAX_PROTECTED_BACKUPS: usize = 5;

/// `PUT /nodes/{node}/storage/{storage}/content/{volume}` (synchronous): `notes` and
/// `protected` of a backup, after pve-storage's `check_volume_access`.
fn update_volume(st: &mut SimState, caller: &Caller, params: &Params) -> Result<Answer, ApiError> {
    validate(
        &[
            NODE,
            opt("storage", Ty::fmt(Fmt::StorageId)),
            req("volume", Ty::str()),
            opt("notes", Ty::str()),
            opt("protected", Ty::Bool),
        ],
        params,
    )?;
    let sid = params.get("storage").cloned().unwrap_or_default();
    let volid = real_volume_id(&sid, &params["volume"])?;
    check_volume_access(st, caller, None, &volid, None)?;
    let s = st
        .storage(&sid)
        .ok_or_else(|| ApiError::die(format!("storage '{sid}' does not exist")))?;
    let vol = s
        .volumes
        .iter()
        .find(|v| v.volid == volid)
        .ok_or_else(|| ApiError::die(format!("volume '{volid}' does not exist")))?;
    if flag(params, "protected")
        && !vol.protected
        && vol.content == "backup"
        && !caller.has(&format!("/storage/{sid}"), "Datastore.Allocate")
    {
        let count = s
            .volumes
            .iter()
            .filter(|v| v.protected && v.vmid == vol.vmid && v.subtype == vol.subtype)
            .count();
        if count >= MAX_PROTECTED_BACKUPS {
            return Err(ApiError::die(format!(
                "The number of protected backups per guest is limited to {MAX_PROTECTED_BACKUPS} on storage '{sid}'"
            )));
        }
    }
    let vol = st
        .storage_mut(&sid)
        .and_then(|s| s.volumes.iter_mut().find(|v| v.volid == volid))
        .ok_or_else(|| ApiError::die("vanished"))?;
    if let Some(p) = params.get("protected") {
        vol.protected = p == "1";
    }
    if let Some(n) = params.get("notes") {
        vol.notes = (!n.is_empty()).then(|| n.clone());
    }
    data(Value::Null)
}

/// `DELETE /nodes/{node}/storage/{storage}/content/{volume}`: permission checked at
/// once (a backup: `Datastore.AllocateSpace` plus `VM.Backup` on its guest; anything
/// else `Datastore.Allocate`), then an `imgdel` task frees it; a protected volume makes
/// the task fail (`free_image`'s refusal) and stays.
fn delete_volume(
    st: &mut SimState,
    caller: &Caller,
    params: &Params,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    validate(
        &[
            NODE,
            opt("storage", Ty::fmt(Fmt::StorageId)),
            req("volume", Ty::str()),
            opt("delay", Ty::int(1, 30)),
        ],
        params,
    )?;
    let sid = params.get("storage").cloned().unwrap_or_default();
    let volid = real_volume_id(&sid, &params["volume"])?;
    let Some((_, volname)) = schema::parse_volume_id(&volid) else {
        return Err(ApiError::die(format!(
            "unable to parse volume ID '{volid}'"
        )));
    };
    let volname = volname.to_owned();
    if st.storage(&sid).is_none() {
        return Err(ApiError::die(format!("storage '{sid}' does not exist")));
    }
    let owner = parse_backup_name(&volname).map(|(_, o)| o);
    let spath = format!("/storage/{sid}");
    match owner {
        Some(o) => {
            caller.check(&spath, &["Datastore.AllocateSpace"])?;
            caller.check(&format!("/vms/{o}"), &["VM.Backup"])?;
        }
        None => caller.check(&spath, &["Datastore.Allocate"])?,
    }
    let v2 = volid.clone();
    let finish: state::FinishFn = Box::new(move |st: &mut SimState| {
        let s = st
            .storage_mut(&sid)
            .ok_or_else(|| format!("storage '{sid}' does not exist"))?;
        if let Some(i) = s.volumes.iter().position(|v| v.volid == v2) {
            if s.volumes[i].protected {
                return Err(
                    format!("cannot remove protected volume '{volname}' on '{sid}'").into(),
                );
            }
            s.volumes.remove(i);
        } else if s.allocated.remove(&volname).is_none() {
            return Err(format!("volume '{v2}' does not exist").into());
        }
        Ok(vec![format!("Removed volume '{v2}'")])
    });
    let id = match owner {
        Some(o) => format!("{o}@{}", params.get("storage").cloned().unwrap_or_default()),
        None => params.get("storage").cloned().unwrap_or_default(),
    };
    spawn(
        st,
        ctx,
        caller,
        NewTask {
            wtype: "imgdel",
            id,
            log: Vec::new(),
            finish,
            cleanup: Box::new(|_| {}),
            partial: None,
        },
    )
}

// ---------------------------------------------------------------- vzdump

fn vzdump(
    st: &mut SimState,
    caller: &Caller,
    params: Params,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    validate(
        &[
            NODE,
            opt("vmid", Ty::fmt(Fmt::VmidList)),
            opt("all", Ty::Bool),
            opt("exclude", Ty::fmt(Fmt::VmidList)),
            opt("pool", Ty::str()),
            opt("storage", Ty::fmt(Fmt::StorageId)),
            opt("mode", Ty::Enum(&["snapshot", "suspend", "stop"])),
            opt("compress", Ty::Enum(&["0", "1", "gzip", "lzo", "zstd"])),
            opt("remove", Ty::Bool),
            opt(
                "notes-template",
                Ty::Str {
                    fmt: Fmt::None,
                    max_len: Some(1024),
                },
            ),
            opt("protected", Ty::Bool),
            opt("prune-backups", Ty::str()),
            opt("mailto", Ty::str()),
            opt("mailnotification", Ty::Enum(&["always", "failure"])),
            opt(
                "notification-mode",
                Ty::Enum(&["auto", "legacy-sendmail", "notification-system"]),
            ),
            opt("stop", Ty::Bool),
            opt("bwlimit", Ty::int_min(0)),
            opt("ionice", Ty::int(0, 8)),
            opt("performance", Ty::str()),
            opt("tmpdir", Ty::str()),
            opt("dumpdir", Ty::str()),
            opt("script", Ty::str()),
            opt("job-id", Ty::str()),
            opt("zstd", Ty::int_min(0)),
            opt("pigz", Ty::int_min(0)),
            opt("lockwait", Ty::int_min(0)),
            opt("stopwait", Ty::int_min(0)),
            opt("quiet", Ty::Bool),
            opt("stdexcludes", Ty::Bool),
            opt("exclude-path", Ty::str()),
            opt("fleecing", Ty::str()),
            opt("stdout", Ty::Bool),
        ],
        &params,
    )?;
    if flag(&params, "stdout") {
        return Err(ApiError::param(
            "stdout",
            "option is only allowed on the command line interface.",
        ));
    }
    for k in ["tmpdir", "dumpdir", "script", "job-id"] {
        if params.contains_key(k) {
            return Err(ApiError::param(k, "Only root may set this option."));
        }
    }
    if ["bwlimit", "ionice", "performance"]
        .iter()
        .any(|k| params.contains_key(*k))
    {
        caller.check("/", &["Sys.Modify"])?;
    }
    let storage = params
        .get("storage")
        .cloned()
        .unwrap_or_else(|| "local".to_owned());
    if params.contains_key("prune-backups") {
        caller.check(&format!("/storage/{storage}"), &["Datastore.Allocate"])?;
    }
    let all = flag(&params, "all");
    let has_vmid = params.get("vmid").is_some_and(|v| !v.is_empty());
    for (k, other) in [
        ("all", all),
        ("exclude", params.contains_key("exclude")),
        ("pool", params.contains_key("pool")),
    ] {
        if other && has_vmid {
            return Err(ApiError::param(k, "option conflicts with option 'vmid'"));
        }
    }
    if let Some(t) = params.get("notes-template")
        && t.contains('\n')
    {
        return Err(ApiError::param("notes-template", "contains a line feed\n"));
    }
    let all = all || (params.contains_key("exclude") && !params.contains_key("pool"));
    let stop = flag(&params, "stop");
    if !(all || stop || params.contains_key("pool") || has_vmid) {
        return Err(ApiError::param("vmid", "property is missing"));
    }
    // get_included_guests: ids the cluster's vmlist places on another node are skipped;
    // unknown ids stay local (and fail visibly in the task).
    let mut local: Vec<u32> = Vec::new();
    if params.contains_key("pool") {
        // Pools are not modelled: a pool has no members on this node.
    } else if has_vmid {
        for id in schema::split_list(&params["vmid"]) {
            let n: u32 = id
                .parse()
                .map_err(|_| ApiError::die(format!("ERROR: strange VM ID '{id}'")))?;
            if n != 0 && !local.contains(&n) && !st.other_nodes.contains_key(&n) {
                local.push(n);
            }
        }
    } else if all {
        let exclude: Vec<u32> = params
            .get("exclude")
            .map(|e| {
                schema::split_list(e)
                    .iter()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        local = st
            .guests
            .keys()
            .copied()
            .filter(|v| !exclude.contains(v))
            .collect();
    }
    local.sort_unstable();
    if stop {
        caller.check(&format!("/nodes/{}", st.node), &["Sys.Modify"])?;
        let running: Vec<String> = st
            .tasks
            .all()
            .iter()
            .filter(|t| t.running() && t.wtype == "vzdump")
            .map(|t| t.upid.clone())
            .collect();
        for u in running {
            st.kill_task(&u, "interrupted by signal");
        }
        if local.is_empty() {
            return data(json!("OK"));
        }
    }
    if local.is_empty() && !all {
        return data(json!("OK"));
    }
    caller.check(&format!("/storage/{storage}"), &["Datastore.AllocateSpace"])?;
    let id = if local.len() == 1 {
        local[0].to_string()
    } else {
        String::new()
    };
    let mode = params
        .get("mode")
        .cloned()
        .unwrap_or_else(|| "snapshot".into());
    let compress = params
        .get("compress")
        .cloned()
        .unwrap_or_else(|| "0".into());
    let notes_template = params.get("notes-template").cloned();
    let protected = flag(&params, "protected");
    // Writing the archives takes their size / `backup_bytes_per_second`.
    let bytes: u64 = local
        .iter()
        .filter_map(|v| st.guests.get(v))
        .map(|g| state::backup_volume(&storage, false, g, 0, "0", None, false).size)
        .sum();
    let extra = std::time::Duration::from_secs_f64(
        bytes as f64 / st.settings.backup_bytes_per_second.max(1.0),
    );
    let mut cmdline = format!(
        "vzdump {}",
        local
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if all {
        cmdline = "vzdump --all 1".into();
    }
    for (k, v) in &params {
        if k != "vmid" && k != "all" && k != "node" {
            cmdline.push_str(&format!(" --{k} {v}"));
        }
    }
    cmdline.push_str(&format!(" --node {}", st.node));
    let mut log = vec![format!("INFO: starting new backup job: {cmdline}")];
    // The worker starts at once: storage check, VM.Backup check, then locks.
    let prepared: Result<(Vec<u32>, Vec<u32>), String> = (|| {
        let s = st
            .storage(&storage)
            .ok_or_else(|| format!("storage '{storage}' does not exist"))?;
        if !s.has_content("backup") {
            return Err(format!(
                "storage '{storage}' does not support vzdump backups"
            ));
        }
        let mut included = Vec::new();
        for v in &local {
            if st.guests.contains_key(v) && !caller.has(&format!("/vms/{v}"), "VM.Backup") {
                if all {
                    continue;
                }
                return Err(format!("Permission check failed (/vms/{v}, VM.Backup)"));
            }
            included.push(*v);
        }
        let mut locked = Vec::new();
        for v in &included {
            if let Some(g) = st.guests.get_mut(v)
                && g.lock().is_none()
            {
                g.conf.insert("lock".into(), "backup".into());
                g.touch();
                locked.push(*v);
            }
        }
        Ok((included, locked))
    })();
    if let Ok((included, locked)) = &prepared
        && let Some(first) = included.first()
        && let Some(g) = st.guests.get(first)
        && locked.contains(first)
    {
        log.push(format!(
            "INFO: Starting Backup of VM {first} ({})",
            g.kind.as_str()
        ));
    }
    let locked_for_cleanup = prepared.clone().map(|p| p.1).unwrap_or_default();
    let start_time = now_epoch();
    let node = st.node.clone();
    let finish: state::FinishFn = Box::new(move |st: &mut SimState| {
        let (included, locked) = prepared?;
        let mut lines = Vec::new();
        let mut errors = 0;
        for v in &included {
            let Some(g) = st.guests.get(v).cloned() else {
                lines.push(format!(
                    "ERROR: Backup of VM {v} failed - unable to find VM '{v}'"
                ));
                errors += 1;
                continue;
            };
            if !locked.contains(v) {
                lines.push(format!(
                    "ERROR: Backup of VM {v} failed - {}",
                    g.check_lock().err().unwrap_or_default()
                ));
                errors += 1;
                continue;
            }
            if Some(v) != included.first() {
                lines.push(format!(
                    "INFO: Starting Backup of VM {v} ({})",
                    g.kind.as_str()
                ));
            }
            lines.push(format!(
                "INFO: status = {}",
                if g.running { "running" } else { "stopped" }
            ));
            lines.push(format!("INFO: backup mode: {mode}"));
            if g.kind == Kind::Lxc {
                lines.extend(excluded_mount_points(&g.conf));
            }
            // Unique ctime per guest and storage (two backups in one second would collide).
            let mut ctime = start_time;
            let notes = notes_template.as_ref().map(|t| {
                t.replace("{{guestname}}", &g.name())
                    .replace("{{vmid}}", &v.to_string())
                    .replace("{{node}}", &node)
                    .replace("{{cluster}}", &node)
            });
            let pbs = st.storage(&storage).is_some_and(|s| s.is_pbs());
            let vol = loop {
                let vol = state::backup_volume(
                    &storage,
                    pbs,
                    &g,
                    ctime,
                    &compress,
                    notes.clone(),
                    protected,
                );
                let taken = st
                    .storage(&storage)
                    .is_some_and(|s| s.volumes.iter().any(|x| x.volid == vol.volid));
                if !taken {
                    break vol;
                }
                ctime += 1;
            };
            let file = vol
                .volid
                .split_once(":backup/")
                .map(|x| x.1.to_owned())
                .unwrap_or_default();
            // A full backup storage: the archive tool hits ENOSPC, vzdump removes the
            // partial file, the guest is unlocked and the job ends with errors.
            if st.storage(&storage).is_some_and(|s| s.avail() < vol.size) {
                lines.extend(backup_no_space(st, &storage, g.kind, *v, &file));
                errors += 1;
                if let Some(gm) = st.guests.get_mut(v)
                    && gm.lock() == Some("backup")
                {
                    gm.conf.remove("lock");
                    gm.touch();
                }
                continue;
            }
            if let Some(s) = st.storage_mut(&storage) {
                lines.push(if s.is_pbs() {
                    format!("INFO: creating Proxmox Backup Server archive '{file}'")
                } else {
                    format!("INFO: creating vzdump archive '{}'", s.dump_path(&file))
                });
                s.volumes.push(vol);
            }
            if let Some(gm) = st.guests.get_mut(v) {
                if gm.lock() == Some("backup") {
                    gm.conf.remove("lock");
                }
                gm.touch();
            }
            lines.push(format!("INFO: Finished Backup of VM {v} (00:00:01)"));
        }
        if errors > 0 {
            lines.push("INFO: Backup job finished with errors".into());
            return Err(state::TaskErr {
                lines,
                msg: "job errors".into(),
            });
        }
        lines.push("INFO: Backup job finished successfully".into());
        Ok(lines)
    });
    let cleanup: state::CleanupFn = Box::new(move |st: &mut SimState| {
        for v in &locked_for_cleanup {
            if let Some(g) = st.guests.get_mut(v)
                && g.lock() == Some("backup")
            {
                g.conf.remove("lock");
                g.touch();
            }
        }
    });
    spawn_timed(
        st,
        ctx,
        caller,
        NewTask {
            wtype: "vzdump",
            id: id.clone(),
            log,
            finish,
            cleanup,
            partial: None,
        },
        extra,
    )
}

/// pve-container's `mountpoint_backup_enabled`: the container mount points a backup
/// leaves out (bind and device mounts, and volumes without `backup=1`), as vzdump logs
/// them. Their data is not in the archive.
fn excluded_mount_points(conf: &BTreeMap<String, String>) -> Vec<String> {
    conf.iter()
        .filter(|(k, _)| guest::is_indexed(k, "mp"))
        .filter_map(|(k, v)| {
            let mut parts = v.split(',');
            let first = parts.next().unwrap_or("");
            let first = first.strip_prefix("volume=").unwrap_or(first);
            let opts: Vec<&str> = parts.collect();
            let mount = opts.iter().find_map(|o| o.strip_prefix("mp="))?;
            let (ty, reason) = if guest::volume_of(v).is_some() {
                let backup = opts
                    .iter()
                    .find_map(|o| o.strip_prefix("backup="))
                    .is_some_and(|b| matches!(b, "1" | "yes" | "on" | "true"));
                if backup {
                    return None;
                }
                ("volume", "disabled")
            } else if first.starts_with("/dev/") {
                ("device", "not a volume")
            } else {
                ("bind", "not a volume")
            };
            Some(format!(
                "INFO: excluding {ty} mount point {k} ('{mount}') from backup ({reason})"
            ))
        })
        .collect()
}

/// The log of a backup that ran out of space on `storage` (modelled on vzdump's
/// forms: tar's or vma's ENOSPC on a file storage, the PBS client's upload error).
fn backup_no_space(st: &SimState, storage: &str, kind: Kind, vmid: u32, file: &str) -> Vec<String> {
    let Some(s) = st.storage(storage) else {
        return Vec::new();
    };
    if s.is_pbs() {
        return vec![
            format!("INFO: creating Proxmox Backup Server archive '{file}'"),
            format!(
                "ERROR: Backup of VM {vmid} failed - backup write data failed: command error: write_data upload error: pipelined request failed: No space left on device (os error 28)"
            ),
        ];
    }
    let path = s.dump_path(file);
    let mut lines = vec![format!("INFO: creating vzdump archive '{path}'")];
    match kind {
        Kind::Lxc => {
            lines.push("INFO: tar: -: Cannot write: No space left on device".into());
            lines.push("INFO: tar: Error is not recoverable: exiting now".into());
            lines.push(format!(
                "ERROR: Backup of VM {vmid} failed - command 'set -o pipefail && lxc-usernsexec -m u:0:100000:65536 -m g:0:100000:65536 -- tar cpf - --totals --one-file-system -p --sparse --numeric-owner --acls --xattrs '--xattrs-include=user.*' '--xattrs-include=security.capability' '--warning=no-file-ignored' '--warning=no-xattr-write' --one-file-system '--warning=no-file-ignored' '--directory=/var/tmp/vzdumptmp{vmid}' ./etc/vzdump/pct.conf '--directory=/mnt/vzsnap0' --no-anchored '--exclude=lost+found' --anchored '--exclude=./tmp/?*' '--exclude=./var/tmp/?*' '--exclude=./var/run/?*.pid' ./ >{path}.dat' failed: exit code 2"
            ));
        }
        Kind::Qemu => lines.push(format!(
            "ERROR: Backup of VM {vmid} failed - job failed with err -28 - No space left on device"
        )),
    }
    lines
}

// ---------------------------------------------------------------- create / restore

fn lxc_create(
    st: &mut SimState,
    caller: &Caller,
    mut params: Params,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    schema::validate(
        &[
            NODE,
            VMID,
            req(
                "ostemplate",
                Ty::Str {
                    fmt: Fmt::None,
                    max_len: Some(255),
                },
            ),
            opt("restore", Ty::Bool),
            opt("force", Ty::Bool),
            opt("storage", Ty::fmt(Fmt::StorageId)),
            opt("unique", Ty::Bool),
            opt("start", Ty::Bool),
            opt("pool", Ty::str()),
            opt(
                "bwlimit",
                Ty::Num {
                    min: Some(0.0),
                    max: None,
                },
            ),
            opt("ignore-unpack-errors", Ty::Bool),
            opt(
                "password",
                Ty::Str {
                    fmt: Fmt::None,
                    max_len: Some(64),
                },
            ),
            opt("ssh-public-keys", Ty::str()),
            opt("ha-managed", Ty::Bool),
        ],
        &lxc_additional,
        &params,
    )?;
    params.remove("node");
    let vmid = vmid_of(&params);
    params.remove("vmid");
    params.remove("ignore-unpack-errors");
    params.remove("bwlimit");
    let start_after = flag(&params, "start");
    params.remove("start");
    let ha_managed = flag(&params, "ha-managed");
    params.remove("ha-managed");
    let unpriv_param = params.remove("unprivileged");
    let restore = flag(&params, "restore");
    params.remove("restore");
    let unique = flag(&params, "unique");
    params.remove("unique");
    let same_ct = st.guests.get(&vmid).is_some_and(|g| g.kind == Kind::Lxc);
    let mut unprivileged = unpriv_param.as_deref().map(|v| v == "1");
    if !restore {
        if unprivileged.is_none() {
            unprivileged = Some(true);
        }
        if unprivileged == Some(false) {
            caller.check("/", &["Sys.Modify"])?;
        }
    }
    if ha_managed {
        caller.check("/", &["Sys.Console"])?;
    }
    let force = flag(&params, "force");
    params.remove("force");
    if !(same_ct && restore && force) {
        if let Some(g) = st.guests.get(&vmid) {
            return Err(ApiError::die(format!(
                "{} {vmid} already exists on node '{}'",
                g.kind.label(),
                st.node
            )));
        }
        if let Some((node, kind)) = st.other_nodes.get(&vmid) {
            return Err(ApiError::die(format!(
                "{} {vmid} already exists on node '{node}'",
                kind.label()
            )));
        }
    } else {
        let g = load(st, Kind::Lxc, vmid)?;
        if g.running {
            return Err(ApiError::die("can't overwrite running container"));
        }
        if g.conf.get("protection").is_some_and(|v| v == "1") {
            return Err(ApiError::die(format!(
                "unable to restore CT {vmid} - protection mode enabled"
            )));
        }
    }
    params.remove("password");
    params.remove("ssh-public-keys");
    if let Some(pool) = params.remove("pool") {
        return Err(ApiError::die(format!("pool '{pool}' does not exist")));
    }
    let vms = format!("/vms/{vmid}");
    if caller.has(&vms, "VM.Allocate") {
    } else if restore && force && same_ct && caller.has(&vms, "VM.Backup") {
        let g = load(st, Kind::Lxc, vmid)?;
        if g.conf.get("unprivileged").is_some_and(|v| v == "1") && unprivileged == Some(false) {
            caller.check("/", &["Sys.Modify"])?;
        }
    } else {
        return Err(ApiError::perm_bare());
    }
    let ostemplate = params.remove("ostemplate").unwrap_or_default();
    let storage = params
        .remove("storage")
        .unwrap_or_else(|| "local".to_owned());
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort();
    let pc = PermCtx {
        caller,
        st,
        vmid,
        old: None,
        unprivileged: unprivileged.unwrap_or(true),
    };
    for k in keys {
        lxc_key_perm(&pc, &params, k, false)?;
    }
    check_volume_access(
        st,
        caller,
        Some(vmid),
        &ostemplate,
        Some(if restore { "backup" } else { "vztmpl" }),
    )?;
    let target_sid = match params.get("rootfs") {
        Some(r) => r.split([':', ',']).next().unwrap_or("").to_owned(),
        None => storage.clone(),
    };
    let s = st
        .storage(&target_sid)
        .ok_or_else(|| ApiError::die(format!("storage '{target_sid}' does not exist")))?;
    if !s.has_content("rootdir") {
        return Err(ApiError::param(
            "storage",
            format!("storage '{target_sid}' does not support container directories"),
        ));
    }
    caller.check(
        &format!("/storage/{target_sid}"),
        &["Datastore.AllocateSpace"],
    )?;
    let emsg = if restore {
        "unable to restore CT"
    } else {
        "unable to create CT"
    };
    // create_and_lock_config
    let existed = st.guests.get(&vmid).cloned();
    if let Some(g) = &existed {
        g.check_lock()
            .map_err(|e| ApiError::die(format!("{emsg} {vmid} - {e}")))?;
        if let Some(gm) = st.guests.get_mut(&vmid) {
            gm.conf.insert("lock".into(), "create".into());
            gm.touch();
        }
    } else {
        let mut conf = BTreeMap::new();
        conf.insert("lock".to_owned(), "create".to_owned());
        st.guests
            .insert(vmid, state::new_guest(vmid, Kind::Lxc, conf));
    }
    let wtype = if restore { "vzrestore" } else { "vzcreate" };
    let mut log = Vec::new();
    if restore {
        log.push(format!("restoring '{ostemplate}' now.."));
    }
    // `rootfs=<storage>:<GiB>` on the call sets the new root disk's size.
    let rootfs_gib: Option<u64> = params
        .get("rootfs")
        .and_then(|r| r.split(',').next())
        .and_then(|r| r.split_once(':'))
        .and_then(|(_, n)| n.parse().ok());
    let plan = restore.then(|| {
        let tsid = target_sid.clone();
        plan_restore(
            st,
            Kind::Lxc,
            vmid,
            &ostemplate,
            &move |key, _orig, size| match rootfs_gib {
                Some(g) if key == "rootfs" => (tsid.clone(), g << 30),
                _ => (tsid.clone(), size),
            },
        )
    });
    let extra = plan.as_ref().map(|p| p.duration).unwrap_or_default();
    let plan_for_cleanup = plan.clone();
    let existed_for_cleanup = existed.clone();
    let work: state::FinishFn = Box::new(move |st: &mut SimState| {
        // pve-container's error path: before the disks are made, only the `create` lock
        // goes; from then on the new disks are freed and the config is destroyed, even
        // over an existing container (whose old volumes were already freed when the
        // failure came after the new disks were made).
        let fail =
            |st: &mut SimState, stage: Stage, msg: String| -> Result<Vec<String>, state::TaskErr> {
                if let Some(p) = &plan {
                    free_plan(st, p);
                }
                match (stage, &existed) {
                    (Stage::Early, _) | (_, None) => undo_create(st, vmid, existed.as_ref()),
                    (Stage::Disks, Some(_)) => {
                        st.guests.remove(&vmid);
                    }
                    (Stage::Extract, Some(old)) => {
                        st.free_disks(Kind::Lxc, &old.conf);
                        st.guests.remove(&vmid);
                    }
                }
                Err(format!("{emsg} {vmid} - {msg}").into())
            };
        let (sid, _) = schema::parse_volume_id(&ostemplate).unwrap_or(("", ""));
        let vol = st
            .storage(sid)
            .and_then(|s| s.volumes.iter().find(|v| v.volid == ostemplate))
            .cloned();
        let Some(vol) = vol else {
            return fail(
                st,
                Stage::Early,
                format!("volume '{ostemplate}' does not exist"),
            );
        };
        if let Some(p) = &plan
            && let Some((lines, msg)) = plan_failure(Kind::Lxc, vmid, st, p)
        {
            let mut lines = lines;
            lines.insert(0, format!("extracting archive '{ostemplate}'"));
            let stage = if p.bad_target.is_some() || p.no_space.is_some() {
                Stage::Disks
            } else {
                Stage::Extract
            };
            return fail(st, stage, msg).map_err(|e| state::TaskErr { lines, msg: e.msg });
        }
        // Bind and device mount points come back only for root@pam (never a token).
        if restore
            && let Some(bc) = &vol.backup_conf
            && let Some((k, v)) = bc
                .conf
                .iter()
                .find(|(k, v)| guest::is_indexed(k, "mp") && guest::volume_of(v).is_none())
        {
            let ty = if v.starts_with("/dev/") {
                "device"
            } else {
                "bind"
            };
            return fail(
                st,
                Stage::Extract,
                format!("restoring '{k}' to {ty} mount is only possible for root"),
            );
        }
        let mut warn_lines = Vec::new();
        let mut rng = st.rng.fork();
        let mut conf: BTreeMap<String, String>;
        let raw_lxc;
        if restore {
            let Some(bc) = vol
                .backup_conf
                .clone()
                .filter(|_| vol.subtype == Some("lxc"))
            else {
                return fail(
                    st,
                    Stage::Early,
                    format!("unable to read config from archive '{ostemplate}'"),
                );
            };
            conf = bc.conf;
            // Raw lxc.* lines are restored only for root@pam: a token's restore skips
            // them with a warning (the task ends `WARNINGS: 1`).
            raw_lxc = Vec::new();
            if !bc.raw_lxc.is_empty() {
                warn_lines.push(
                    "WARN: skipping custom lxc options, restore manually as root:".to_owned(),
                );
                warn_lines.push("--------------------------------".to_owned());
                for (k, v) in &bc.raw_lxc {
                    warn_lines.push(format!("{k}: {v}"));
                }
                warn_lines.push("--------------------------------".to_owned());
            }
            for (key, volid, size) in plan.iter().flat_map(|p| p.disks.iter()) {
                if let Some(v) = conf.get(key).cloned() {
                    conf.insert(key.clone(), remap_disk(&v, volid, *size));
                }
            }
            if unique {
                for (k, v) in conf.iter_mut() {
                    if guest::is_indexed(k, "net")
                        && let Ok(mut m) = schema::parse_propstr(&schema::LXC_NET, v, k)
                    {
                        m.insert("hwaddr".into(), guest::random_mac(&mut rng));
                        *v = schema::print_propstr(&schema::LXC_NET, &m);
                    }
                }
            }
        } else {
            conf = BTreeMap::new();
            conf.insert("arch".into(), "amd64".into());
            conf.insert("ostype".into(), "debian".into());
            conf.insert(
                "rootfs".into(),
                format!("{target_sid}:vm-{vmid}-disk-0,size=4G"),
            );
            raw_lxc = Vec::new();
        }
        if let Some(u) = &unpriv_param {
            if u == "1" {
                conf.insert("unprivileged".into(), "1".into());
            } else {
                conf.remove("unprivileged");
            }
        } else if !restore {
            conf.insert("unprivileged".into(), "1".into());
        }
        for (k, v) in &params {
            let v = match k.as_str() {
                "tags" => guest::normalize_tags(v),
                "description" => guest::normalize_description(v).unwrap_or_default(),
                "rootfs" => {
                    let mut parts = v.splitn(2, ',');
                    let first = parts.next().unwrap_or("");
                    let rest = parts.next();
                    match first.split_once(':') {
                        Some((sid, size))
                            if size.bytes().all(|b| b.is_ascii_digit() || b == b'.') =>
                        {
                            let mut s = format!("{sid}:vm-{vmid}-disk-0,size={size}G");
                            if let Some(r) = rest {
                                s.push(',');
                                s.push_str(r);
                            }
                            s
                        }
                        _ => v.clone(),
                    }
                }
                k2 if guest::is_indexed(k2, "net") => {
                    guest::canonical_lxc_net(v, k2, &mut rng).unwrap_or(v.clone())
                }
                _ => v.clone(),
            };
            set_or_remove(&mut conf, k, v);
        }
        for (k, v) in conf.iter_mut() {
            if guest::is_indexed(k, "net") {
                *v = guest::canonical_lxc_net(v, k, &mut rng).unwrap_or(v.clone());
            }
        }
        conf.remove("lock");
        conf.remove("parent");
        if let Some(old) = &existed {
            free_replaced_disks(st, Kind::Lxc, &old.conf, plan.as_ref());
        }
        let mut g = state::new_guest(vmid, Kind::Lxc, conf);
        g.raw_lxc = raw_lxc;
        if restore {
            g.start_fails = vol.start_fails;
            g.stops_after_seconds = vol.stops_after_seconds;
        }
        if let Some(old) = &existed {
            g.ha = old.ha.clone();
        }
        if ha_managed {
            g.ha = Some(guest::Ha {
                state: "started".into(),
            });
        }
        g.touch();
        st.guests.insert(vmid, g);
        let mut lines = Vec::new();
        if restore {
            lines.push(format!("extracting archive '{ostemplate}'"));
            lines.push(format!(
                "Total bytes read: {} ({}MiB, 512MiB/s)",
                vol.size,
                vol.size >> 20
            ));
            lines.push("merging backed-up and given configuration..".into());
            lines.extend(warn_lines);
        }
        if start_after {
            if st.guests.get(&vmid).is_some_and(|g| g.start_fails) {
                lines.push(format!("startup for container '{vmid}' failed"));
            } else {
                st.set_running(vmid, true);
            }
        }
        Ok(lines)
    });
    // A task fault strikes after the restore is done (as a failed start after it): the
    // old volumes are freed, the new config is written, the guest stays stopped.
    let (finish, partial) = finish_then_fail(work, move |st: &mut SimState| {
        if st.guests.get(&vmid).is_some_and(|g| g.running) {
            st.set_running(vmid, false);
        }
    });
    let cleanup: state::CleanupFn = Box::new(move |st: &mut SimState| {
        if let Some(p) = &plan_for_cleanup {
            free_plan(st, p);
        }
        undo_create(st, vmid, existed_for_cleanup.as_ref());
    });
    spawn_timed(
        st,
        ctx,
        caller,
        NewTask {
            wtype,
            id: vmid.to_string(),
            log,
            finish,
            cleanup,
            partial: Some(partial),
        },
        extra,
    )
}

/// Where a container restore failed (its error path depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before the new disks were made: nothing but the lock changed.
    Early,
    /// Making the new disks.
    Disks,
    /// After the old volumes were freed (extracting, merging the config).
    Extract,
}

/// After a restore over an existing guest: its old disks are freed, except those the
/// restore reused by name (their space is the new allocation's now).
fn free_replaced_disks(
    st: &mut SimState,
    kind: Kind,
    old: &BTreeMap<String, String>,
    plan: Option<&RestorePlan>,
) {
    for (_, sid, name, size) in guest::config_disks(kind, old) {
        let volid = format!("{sid}:{name}");
        let reused = plan.is_some_and(|p| p.disks.iter().any(|(_, v, _)| *v == volid));
        if let Some(s) = st.storage_mut(&sid) {
            if reused {
                s.used = s.used.saturating_sub(size);
            } else {
                s.free_disk(&name, size);
            }
        }
    }
}

/// `POST /nodes/{node}/qemu` with `archive`: qemu-server's restore (`qmrestore`). The
/// config keys given on the call override the backed-up ones (`override_conf`); drives
/// may not be given (400 `option conflicts with option 'archive'`). Unlike a container,
/// a VM whose restore fails is NOT removed: qemu-server only drops the `create` lock and
/// warns that the state is not cleaned up, so an empty VM stays behind. A create
/// without `archive` is not modelled (the agent never creates VMs).
fn qemu_create(
    st: &mut SimState,
    caller: &Caller,
    mut params: Params,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    schema::validate(
        &[
            NODE,
            VMID,
            opt(
                "archive",
                Ty::Str {
                    fmt: Fmt::None,
                    max_len: Some(255),
                },
            ),
            opt("force", Ty::Bool),
            opt("storage", Ty::fmt(Fmt::StorageId)),
            opt("unique", Ty::Bool),
            opt("start", Ty::Bool),
            opt("pool", Ty::str()),
            opt("bwlimit", Ty::int_min(0)),
            opt("live-restore", Ty::Bool),
            opt("ha-managed", Ty::Bool),
        ],
        &qemu_additional,
        &params,
    )?;
    params.remove("node");
    let vmid = vmid_of(&params);
    params.remove("vmid");
    let Some(archive) = params.remove("archive") else {
        return Err(ApiError::die(
            "pvesim models POST /nodes/{node}/qemu only as a restore (with 'archive')",
        ));
    };
    params.remove("bwlimit");
    let force = flag(&params, "force");
    params.remove("force");
    let start_after = flag(&params, "start");
    params.remove("start");
    let unique = flag(&params, "unique");
    params.remove("unique");
    let storage = params.remove("storage");
    if flag(&params, "live-restore") {
        return Err(ApiError::die(
            "live-restore is only compatible with backup images from a Proxmox Backup Server",
        ));
    }
    params.remove("live-restore");
    if params.remove("ha-managed").as_deref() == Some("1") {
        caller.check("/", &["Sys.Console"])?;
    }
    if let Some(pool) = params.remove("pool") {
        return Err(ApiError::die(format!("pool '{pool}' does not exist")));
    }
    if let Some(sid) = &storage {
        caller.check(&format!("/storage/{sid}"), &["Datastore.AllocateSpace"])?;
    }
    let vms = format!("/vms/{vmid}");
    let exists = st.guests.get(&vmid).is_some_and(|g| g.kind == Kind::Qemu);
    if !(caller.has(&vms, "VM.Allocate") || (force && exists && caller.has(&vms, "VM.Backup"))) {
        return Err(ApiError::perm_bare());
    }
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort();
    for k in &keys {
        if guest::is_disk_key(Kind::Qemu, k) || k.as_str() == "cdrom" {
            return Err(ApiError::param(k, "option conflicts with option 'archive'"));
        }
    }
    check_volume_access(st, caller, Some(vmid), &archive, Some("backup"))?;
    for k in keys {
        qemu_key_perm(caller, vmid, k)?;
    }
    let emsg = format!("unable to restore VM {vmid} -");
    // create_and_lock_config($vmid, $force)
    if let Some(g) = st.guests.get(&vmid)
        && !(force && g.kind == Kind::Qemu)
    {
        return Err(ApiError::die(format!(
            "{emsg} {} {vmid} already exists on node '{}'",
            g.kind.label(),
            st.node
        )));
    }
    if let Some((node, kind)) = st.other_nodes.get(&vmid) {
        return Err(ApiError::die(format!(
            "{emsg} {} {vmid} already exists on node '{node}'",
            kind.label()
        )));
    }
    let existed = st.guests.get(&vmid).cloned();
    if let Some(g) = &existed {
        g.check_lock()
            .map_err(|e| ApiError::die(format!("{emsg} {e}")))?;
        if let Some(gm) = st.guests.get_mut(&vmid) {
            gm.conf.insert("lock".into(), "create".into());
            gm.touch();
        }
    } else {
        let mut conf = BTreeMap::new();
        conf.insert("lock".to_owned(), "create".to_owned());
        st.guests
            .insert(vmid, state::new_guest(vmid, Kind::Qemu, conf));
    }
    let plan = plan_restore(st, Kind::Qemu, vmid, &archive, &|_key, orig, size| {
        (storage.clone().unwrap_or_else(|| orig.to_owned()), size)
    });
    let extra = plan.duration;
    let mut log = Vec::new();
    if let Some(vol) = &plan.archive {
        let (sid, _) = schema::parse_volume_id(&archive).unwrap_or(("", ""));
        let file = archive.split_once(":backup/").map(|x| x.1).unwrap_or("");
        let path = st
            .storage(sid)
            .map(|s| s.dump_path(file))
            .unwrap_or_default();
        if !vol.format.starts_with("pbs-") {
            log.push(format!(
                "restore vma archive: {}",
                restore_command(Kind::Qemu, vmid, vol, &path)
                    .trim_start_matches("set -o pipefail && ")
            ));
        }
    }
    let plan_for_cleanup = plan.clone();
    let work: state::FinishFn = Box::new(move |st: &mut SimState| {
        let not_cleaned = format!(
            "error before or during data restore, some or all disks were not completely restored. VM {vmid} state is NOT cleaned up."
        );
        let fail = |st: &mut SimState, mut lines: Vec<String>, msg: String| {
            free_plan(st, &plan);
            if let Some(g) = st.guests.get_mut(&vmid)
                && g.lock() == Some("create")
            {
                g.conf.remove("lock");
                g.touch();
            }
            lines.push(not_cleaned.clone());
            Err(state::TaskErr { lines, msg })
        };
        // qemu-server checks protection, then the power state, in the worker.
        if st
            .guests
            .get(&vmid)
            .is_some_and(|g| g.conf.get("protection").is_some_and(|v| v == "1"))
        {
            return fail(st, Vec::new(), format!("{emsg} protection mode enabled"));
        }
        if st.guests.get(&vmid).is_some_and(|g| g.running) {
            return fail(st, Vec::new(), format!("{emsg} vm is running"));
        }
        let Some(vol) = plan.archive.clone() else {
            return fail(st, Vec::new(), format!("volume '{archive}' does not exist"));
        };
        let Some(bc) = vol
            .backup_conf
            .clone()
            .filter(|_| vol.subtype == Some("qemu"))
        else {
            return fail(
                st,
                Vec::new(),
                format!("unable to read config from archive '{archive}'"),
            );
        };
        if let Some((lines, msg)) = plan_failure(Kind::Qemu, vmid, st, &plan) {
            return fail(st, lines, msg);
        }
        let mut rng = st.rng.fork();
        let mut conf = bc.conf;
        let mut lines = vec![format!(
            "CFG: size: {} name: qemu-server.conf",
            400 + conf.len() * 24
        )];
        for (i, (key, _, size)) in plan.disks.iter().enumerate() {
            lines.push(format!(
                "DEV: dev_id={} size: {size} devname: drive-{key}",
                i + 1
            ));
        }
        lines.push(format!("CTIME: {}", guest_ctime(&vol)));
        for (key, volid, size) in &plan.disks {
            lines.push(format!("new volume ID is '{volid}'"));
            if let Some(v) = conf.get(key).cloned() {
                conf.insert(key.clone(), remap_disk(&v, volid, *size));
            }
        }
        lines.push(format!(
            "progress 100% (read {} bytes, duration 1 sec)",
            plan.disks.iter().map(|d| d.2).sum::<u64>()
        ));
        lines.push("rescan volumes...".into());
        if unique {
            for (k, v) in conf.iter_mut() {
                if guest::is_indexed(k, "net")
                    && let Ok(mut m) = schema::parse_propstr(&schema::QEMU_NET, v, k)
                {
                    m.insert("macaddr".into(), guest::random_mac(&mut rng));
                    *v = schema::print_propstr(&schema::QEMU_NET, &m);
                }
            }
            if conf.contains_key("vmgenid") {
                conf.insert("vmgenid".into(), random_uuid(&mut rng));
            }
            if let Some(s) = conf.get("smbios1").cloned() {
                let rest: Vec<&str> = s.split(',').filter(|p| !p.starts_with("uuid=")).collect();
                let mut v = format!("uuid={}", random_uuid(&mut rng));
                for p in rest {
                    v.push(',');
                    v.push_str(p);
                }
                conf.insert("smbios1".into(), v);
            }
        }
        for (k, v) in &params {
            let v = match k.as_str() {
                "tags" => guest::normalize_tags(v),
                "description" => guest::normalize_description(v).unwrap_or_default(),
                k2 if guest::is_indexed(k2, "net") => {
                    guest::canonical_qemu_net(v, k2, &mut rng).unwrap_or(v.clone())
                }
                _ => v.clone(),
            };
            set_or_remove(&mut conf, k, v);
        }
        conf.remove("lock");
        conf.remove("parent");
        if let Some(old) = &existed {
            free_replaced_disks(st, Kind::Qemu, &old.conf, Some(&plan));
        }
        let mut g = state::new_guest(vmid, Kind::Qemu, conf);
        g.start_fails = vol.start_fails;
        g.agent_fails = vol.agent_fails;
        g.stops_after_seconds = vol.stops_after_seconds;
        g.ha = existed.as_ref().and_then(|o| o.ha.clone());
        st.guests.insert(vmid, g);
        if start_after {
            lines.push("Execute autostart".into());
            if st.guests.get(&vmid).is_some_and(|g| g.start_fails) {
                lines.push("start failed: QEMU exited with code 1".into());
            } else {
                st.set_running(vmid, true);
            }
        }
        Ok(lines)
    });
    // A task fault strikes after the data was restored (qemu-server's "error after data
    // was restored" path): the old disks and snapshots are gone, the new config is
    // written, the lock dropped, the VM stopped.
    let (finish, partial) = finish_then_fail(work, move |st: &mut SimState| {
        if st.guests.get(&vmid).is_some_and(|g| g.running) {
            st.set_running(vmid, false);
        }
    });
    let partial: state::PartialFn = Box::new(move |st: &mut SimState, msg: String| {
        let mut e = partial(st, msg);
        if st.guests.get(&vmid).is_some_and(|g| g.lock().is_none()) {
            e.lines.push(format!(
                "error after data was restored, VM disks should be OK but config may require adaptions. VM {vmid} state is NOT cleaned up."
            ));
        }
        e
    });
    let cleanup: state::CleanupFn = Box::new(move |st: &mut SimState| {
        free_plan(st, &plan_for_cleanup);
        if let Some(g) = st.guests.get_mut(&vmid)
            && g.lock() == Some("create")
        {
            g.conf.remove("lock");
            g.touch();
        }
    });
    spawn_timed(
        st,
        ctx,
        caller,
        NewTask {
            wtype: "qmrestore",
            id: vmid.to_string(),
            log,
            finish,
            cleanup,
            partial: Some(partial),
        },
        extra,
    )
}

/// The backup's time as vma prints it (`CTIME: Fri Jan 31 02:00:05 2025`).
fn guest_ctime(vol: &storage::Volume) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(vol.ctime as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let wd = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
        [t.weekday().number_days_from_monday() as usize];
    let mo = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][u8::from(t.month()) as usize - 1];
    format!(
        "{wd} {mo} {:2} {:02}:{:02}:{:02} {}",
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.year()
    )
}

/// A random UUID (vmgenid, smbios1) in PVE's lowercase form.
fn random_uuid(rng: &mut fastrand::Rng) -> String {
    let h = format!("{:016x}{:016x}", rng.u64(..), rng.u64(..));
    format!(
        "{}-{}-4{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `POST /nodes/{node}/qemu/{vmid}/agent/ping` (synchronous): qemu-server's
/// `assert_agent_available` in its order (agent enabled in the config, VM running,
/// agent answering), then `{"result":{}}`.
fn qemu_agent_ping(st: &SimState, params: &Params) -> Result<Answer, ApiError> {
    validate(&[NODE, VMID], params)?;
    let vmid = vmid_of(params);
    let g = load(st, Kind::Qemu, vmid)?;
    let enabled = g.conf.get("agent").is_some_and(|a| {
        let first = a.split(',').next().unwrap_or("");
        let v = first.strip_prefix("enabled=").unwrap_or(first);
        matches!(v, "1" | "on" | "yes" | "true")
    });
    if !enabled {
        return Err(ApiError::die("No QEMU guest agent configured"));
    }
    if !g.running {
        return Err(ApiError::die(format!("VM {vmid} is not running")));
    }
    if g.agent_fails {
        return Err(ApiError::die("QEMU guest agent is not running"));
    }
    data(json!({"result": {}}))
}

// ---------------------------------------------------------------- destroy

/// `DELETE /nodes/{node}/{lxc|qemu}/{vmid}` (`vzdestroy` / `qmdestroy`): refused before
/// the fork when the guest is running (containers: unless `force`, which stops it in the
/// task), locked, protected, or HA-managed without `purge`. The task frees every disk
/// of the config (and with `destroy-unreferenced-disks` nothing more: the simulator
/// has no unreferenced disks) and removes the guest. Backups are not touched.
fn guest_destroy(
    st: &mut SimState,
    caller: &Caller,
    kind: Kind,
    params: Params,
    ctx: &mut RequestCtx,
) -> Result<Answer, ApiError> {
    let mut props = vec![
        NODE,
        VMID,
        opt("purge", Ty::Bool),
        opt("destroy-unreferenced-disks", Ty::Bool),
    ];
    match kind {
        Kind::Lxc => props.push(opt("force", Ty::Bool)),
        Kind::Qemu => props.push(opt("skiplock", Ty::Bool)),
    }
    validate(&props, &params)?;
    if flag(&params, "skiplock") {
        return Err(ApiError::param(
            "skiplock",
            "Only root may use this option.",
        ));
    }
    let vmid = vmid_of(&params);
    let label = kind.label();
    let g = load(st, kind, vmid)?;
    let force = flag(&params, "force");
    let purge = flag(&params, "purge");
    if g.conf.get("protection").is_some_and(|v| v == "1") {
        return Err(ApiError::die(format!(
            "can't remove {label} {vmid} - protection mode enabled"
        )));
    }
    g.check_lock().map_err(ApiError::die)?;
    if g.ha.is_some() && !purge {
        return Err(ApiError::die(format!(
            "unable to remove {label} {vmid} - used in HA resources and purge parameter not set."
        )));
    }
    if g.running && !force {
        return Err(ApiError::die(match kind {
            Kind::Lxc => format!("unable to destroy CT {vmid} - container is running"),
            Kind::Qemu => format!("VM {vmid} is running - destroy failed"),
        }));
    }
    let unreferenced = flag(&params, "destroy-unreferenced-disks");
    let wtype = match kind {
        Kind::Lxc => "vzdestroy",
        Kind::Qemu => "qmdestroy",
    };
    let finish: state::FinishFn = Box::new(move |st: &mut SimState| {
        let g = load_task(st, kind, vmid)?.clone();
        g.check_lock()?;
        let mut lines = Vec::new();
        if g.running {
            st.set_running(vmid, false);
        }
        for volid in st.free_disks(kind, &g.conf) {
            let (sid, name) = schema::parse_volume_id(&volid).unwrap_or(("", ""));
            if st
                .storage(sid)
                .is_some_and(|s| matches!(s.stype, "lvm" | "lvmthin"))
            {
                lines.push(format!("  Logical volume \"{name}\" successfully removed."));
            } else {
                lines.push(format!("removing volume '{volid}'"));
            }
        }
        if unreferenced {
            for (sid, name) in unreferenced_disks(st, vmid, &g.conf) {
                if let Some(s) = st.storage_mut(&sid) {
                    s.allocated.remove(&name);
                }
                lines.push(format!("removing volume '{sid}:{name}'"));
            }
        }
        if purge {
            lines.push(format!(
                "purging {label} {vmid} from related configurations.."
            ));
        }
        st.guests.remove(&vmid);
        Ok(lines)
    });
    spawn(
        st,
        ctx,
        caller,
        NewTask {
            wtype,
            id: vmid.to_string(),
            log: Vec::new(),
            finish,
            cleanup: Box::new(|_| {}),
            partial: None,
        },
    )
}

/// Disks the simulator allocated for `vmid` (its volume names carry the vmid) that the
/// config does not reference: what `destroy-unreferenced-disks` finds on the storages.
fn unreferenced_disks(
    st: &SimState,
    vmid: u32,
    conf: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let referenced: Vec<(String, String)> = conf
        .values()
        .filter_map(|v| guest::volume_of(v))
        .filter_map(schema::parse_volume_id)
        .map(|(s, n)| (s.to_owned(), n.to_owned()))
        .collect();
    let owned = |name: &str| {
        let file = name.rsplit('/').next().unwrap_or(name);
        [format!("vm-{vmid}-"), format!("subvol-{vmid}-")]
            .iter()
            .any(|p| file.starts_with(p.as_str()))
    };
    st.storages
        .iter()
        .flat_map(|s| s.allocated.keys().map(move |n| (s.id.clone(), n.clone())))
        .filter(|(sid, n)| owned(n) && !referenced.iter().any(|(rs, rn)| rs == sid && rn == n))
        .collect()
}

// ---------------------------------------------------------------- restore helpers

/// What a restore puts where, worked out when its task starts (PVE allocates the new
/// disks before it extracts the archive, so the space is taken while the task runs).
#[derive(Debug, Clone)]
struct RestorePlan {
    archive: Option<storage::Volume>,
    /// `(config key, new volume id, size)` of each storage-backed disk of the backup.
    disks: Vec<(String, String, u64)>,
    /// A target storage that does not exist or cannot hold the disk: the task's error.
    bad_target: Option<String>,
    /// The target storage too small for the disks (nothing was allocated then).
    no_space: Option<String>,
    /// How long reading the archive takes (size / `restore_bytes_per_second`).
    duration: std::time::Duration,
}

/// A new disk's volume name on a storage of type `stype` (`vm-N-disk-K` on block
/// storages, `N/vm-N-disk-K.raw` on file storages).
fn new_disk_name(stype: &str, vmid: u32, n: usize) -> String {
    match stype {
        "dir" | "nfs" | "cifs" | "glusterfs" | "btrfs" => format!("{vmid}/vm-{vmid}-disk-{n}.raw"),
        _ => format!("vm-{vmid}-disk-{n}"),
    }
}

/// Plans a restore of `volid` into `vmid`: each storage-backed disk of the backed-up
/// config goes to `target(key, original storage, size)` → `(storage, size)`; the disks
/// are allocated at once when every target has room.
fn plan_restore(
    st: &mut SimState,
    kind: Kind,
    vmid: u32,
    volid: &str,
    target: &dyn Fn(&str, &str, u64) -> (String, u64),
) -> RestorePlan {
    let (sid, _) = schema::parse_volume_id(volid).unwrap_or(("", ""));
    let archive = st
        .storage(sid)
        .and_then(|s| s.volumes.iter().find(|v| v.volid == volid))
        .cloned();
    let mut plan = RestorePlan {
        archive: archive.clone(),
        disks: Vec::new(),
        bad_target: None,
        no_space: None,
        duration: std::time::Duration::ZERO,
    };
    let Some(archive) = archive else {
        return plan;
    };
    let bps = st.settings.restore_bytes_per_second.max(1.0);
    plan.duration = std::time::Duration::from_secs_f64(archive.size as f64 / bps);
    let conf = archive
        .backup_conf
        .as_ref()
        .map(|b| b.conf.clone())
        .unwrap_or_default();
    let mut need: BTreeMap<String, u64> = BTreeMap::new();
    let in_use: Vec<(String, String)> = st
        .guests
        .get(&vmid)
        .map(|g| {
            guest::config_disks(g.kind, &g.conf)
                .into_iter()
                .map(|(_, sid, name, _)| (sid, name))
                .collect()
        })
        .unwrap_or_default();
    for (n, (key, orig, _, size)) in guest::config_disks(kind, &conf).into_iter().enumerate() {
        let (tsid, tsize) = target(&key, &orig, size);
        let Some(s) = st.storage(&tsid) else {
            plan.bad_target = Some(format!("storage '{tsid}' does not exist"));
            return plan;
        };
        let content = match kind {
            Kind::Lxc => "rootdir",
            Kind::Qemu => "images",
        };
        if !s.has_content(content) {
            plan.bad_target = Some(match kind {
                Kind::Lxc => format!("storage '{tsid}' does not support container directories"),
                Kind::Qemu => format!("storage '{tsid}' does not support vm images"),
            });
            return plan;
        }
        // pve-storage's `find_free_diskname`: the first index not in use on the target
        // (over an existing guest its old disks still exist when the new ones are made).
        let taken = |name: &str| {
            s.allocated.contains_key(name)
                || in_use.iter().any(|(sid, n)| *sid == tsid && n == name)
                || plan
                    .disks
                    .iter()
                    .any(|(_, v, _)| *v == format!("{tsid}:{name}"))
        };
        let mut k = n;
        let name = loop {
            let name = new_disk_name(s.stype, vmid, k);
            if !taken(&name) {
                break name;
            }
            k += 1;
        };
        *need.entry(tsid.clone()).or_default() += tsize;
        plan.disks.push((key, format!("{tsid}:{name}"), tsize));
    }
    for (sid, bytes) in &need {
        if st.storage(sid).is_some_and(|s| s.avail() < *bytes) {
            plan.no_space = Some(sid.clone());
            return plan;
        }
    }
    for (_, volid, size) in &plan.disks {
        if let Some((sid, name)) = schema::parse_volume_id(volid)
            && let Some(s) = st.storage_mut(sid)
        {
            s.allocated.insert(name.to_owned(), *size);
        }
    }
    plan
}

/// Frees the disks a plan allocated (a failed or killed restore).
fn free_plan(st: &mut SimState, plan: &RestorePlan) {
    if plan.no_space.is_some() || plan.bad_target.is_some() {
        return;
    }
    for (_, volid, _) in &plan.disks {
        if let Some((sid, name)) = schema::parse_volume_id(volid)
            && let Some(s) = st.storage_mut(sid)
        {
            s.allocated.remove(name);
        }
    }
}

/// A disk value with its volume replaced by `volid` and its size set to `size`.
fn remap_disk(value: &str, volid: &str, size: u64) -> String {
    let mut out = volid.to_owned();
    for part in value.split(',').skip(1) {
        if !part.starts_with("size=") {
            out.push(',');
            out.push_str(part);
        }
    }
    let size = if size.is_multiple_of(1 << 30) {
        format!("{}G", size >> 30)
    } else {
        format!("{}M", size.div_ceil(1 << 20))
    };
    out.push_str(&format!(",size={size}"));
    out
}

/// The command PVE runs to extract `vol` for `vmid` (named in its error on failure).
fn restore_command(kind: Kind, vmid: u32, vol: &storage::Volume, path: &str) -> String {
    let pbs_snapshot = vol.volid.split_once(":backup/").map(|x| x.1).unwrap_or("");
    match (kind, vol.format.starts_with("pbs-")) {
        (Kind::Lxc, false) => {
            let unpack = if vol.format.ends_with(".zst") {
                " --zstd"
            } else if vol.format.ends_with(".gz") {
                " -z"
            } else if vol.format.ends_with(".lzo") {
                " --lzop"
            } else {
                ""
            };
            format!(
                "lxc-usernsexec -m u:0:100000:65536 -m g:0:100000:65536 -- tar xpf -{unpack} --totals --one-file-system -p --sparse --numeric-owner --acls --xattrs '--xattrs-include=user.*' '--xattrs-include=security.capability' '--warning=no-file-ignored' '--warning=no-xattr-write' -C /var/lib/lxc/{vmid}/rootfs --skip-old-files --anchored --exclude './dev/*'"
            )
        }
        (Kind::Lxc, true) => format!(
            "/usr/bin/proxmox-backup-client restore '--crypt-mode=none' {pbs_snapshot} root.pxar /var/lib/lxc/{vmid}/rootfs --allow-existing-dirs"
        ),
        (Kind::Qemu, false) => {
            let cat = if vol.format.ends_with(".zst") {
                format!("zstd -q -d -c {path}")
            } else if vol.format.ends_with(".gz") {
                format!("zcat {path}")
            } else if vol.format.ends_with(".lzo") {
                format!("lzop -d -c {path}")
            } else {
                format!("cat {path}")
            };
            format!(
                "set -o pipefail && {cat} | vma extract -v -r /var/tmp/vzdumptmp{vmid}.fifo - /var/tmp/vzdumptmp{vmid}"
            )
        }
        (Kind::Qemu, true) => format!(
            "/usr/bin/pbs-restore {pbs_snapshot} drive-scsi0.img.fidx /dev/pve/vm-{vmid}-disk-0 --verbose --format raw --skip-zero"
        ),
    }
}

/// Why extraction failed, as the tools print it: the log lines and the exit code of
/// the extract command (tar 2, vma 133, the PBS clients 255).
fn extract_failure(kind: Kind, pbs: bool, corrupt: bool) -> (Vec<String>, u8) {
    match (kind, pbs, corrupt) {
        (_, true, true) => (vec!["Error: detected corrupt chunk".into()], 255),
        (_, true, false) => (
            vec!["restore failed: No space left on device (os error 28)".into()],
            255,
        ),
        (Kind::Lxc, false, true) => (
            vec![
                "/*stdin*\\ : Decoding error (36) : Corrupted block detected".into(),
                "tar: Unexpected EOF in archive".into(),
                "tar: Error is not recoverable: exiting now".into(),
            ],
            2,
        ),
        (Kind::Lxc, false, false) => (
            vec![
                "tar: ./usr/lib/x86_64-linux-gnu/libc.so.6: Cannot write: No space left on device"
                    .into(),
                "tar: Exiting with failure status due to previous errors".into(),
            ],
            2,
        ),
        (Kind::Qemu, false, true) => (
            vec!["vma: restore failed - wrong vma extent header chechsum".into()],
            133,
        ),
        (Kind::Qemu, false, false) => (
            vec!["vma: restore failed - blk_pwrite to  failed (-28)".into()],
            133,
        ),
    }
}

/// The failure of a planned restore that cannot finish (archive corrupt, no space, no
/// storage), or `None`: `(log lines, message)`, the message without `emsg`.
fn plan_failure(
    kind: Kind,
    vmid: u32,
    st: &SimState,
    plan: &RestorePlan,
) -> Option<(Vec<String>, String)> {
    let vol = plan.archive.as_ref()?;
    if let Some(e) = &plan.bad_target {
        return Some((Vec::new(), e.clone()));
    }
    if !(vol.corrupt || plan.no_space.is_some()) {
        return None;
    }
    let (sid, _) = schema::parse_volume_id(&vol.volid).unwrap_or(("", ""));
    let file = vol.volid.split_once(":backup/").map(|x| x.1).unwrap_or("");
    let path = st
        .storage(sid)
        .map(|s| s.dump_path(file))
        .unwrap_or_default();
    let pbs = vol.format.starts_with("pbs-");
    let (lines, code) = extract_failure(kind, pbs, vol.corrupt);
    let cmd = restore_command(kind, vmid, vol, &path);
    Some((lines, format!("command '{cmd}' failed: exit code {code}")))
}

/// After a failed create/restore: a new CT disappears, an existing one loses its lock.
fn undo_create(st: &mut SimState, vmid: u32, existed: Option<&Guest>) {
    match existed {
        None => {
            st.guests.remove(&vmid);
        }
        Some(_) => {
            if let Some(g) = st.guests.get_mut(&vmid)
                && g.lock() == Some("create")
            {
                g.conf.remove("lock");
                g.touch();
            }
        }
    }
}

// ---------------------------------------------------------------- tasks

fn task_props() -> Vec<Prop> {
    vec![NODE, req("upid", Ty::str())]
}

fn get_task_list(st: &SimState, caller: &Caller, params: &Params) -> Result<Answer, ApiError> {
    validate(
        &[
            NODE,
            opt("start", Ty::int_min(0)),
            opt("limit", Ty::int_min(0)),
            opt("userfilter", Ty::str()),
            opt("typefilter", Ty::str()),
            opt("vmid", Ty::VMID),
            opt("errors", Ty::Bool),
            opt("source", Ty::Enum(&["archive", "active", "all"])),
            opt(
                "since",
                Ty::Int {
                    min: None,
                    max: None,
                },
            ),
            opt(
                "until",
                Ty::Int {
                    min: None,
                    max: None,
                },
            ),
            opt("statusfilter", Ty::str()),
        ],
        params,
    )?;
    if let Some(sf) = params.get("statusfilter") {
        for s in schema::split_list(sf) {
            if !["ok", "error", "warning", "unknown"].contains(&s.to_lowercase().as_str()) {
                return Err(ApiError::param(
                    "statusfilter",
                    format!(
                        "invalid format - value '{s}' does not have a value in the enumeration 'ok, error, warning, unknown'\n"
                    ),
                ));
            }
        }
    }
    let num = |k: &str| {
        params
            .get(k)
            .and_then(|v| v.trim_start_matches('+').parse::<i64>().ok())
    };
    let f = TaskFilter {
        start: num("start").unwrap_or(0).max(0) as usize,
        limit: num("limit").unwrap_or(50).max(0) as usize,
        userfilter: params.get("userfilter").cloned().filter(|s| !s.is_empty()),
        typefilter: params.get("typefilter").cloned(),
        vmid: params
            .get("vmid")
            .map(|v| v.trim_start_matches('+').to_owned()),
        errors: flag(params, "errors"),
        source: params
            .get("source")
            .cloned()
            .unwrap_or_else(|| "archive".into()),
        since: num("since").map(|v| v.max(0) as u64),
        until: num("until").map(|v| v.max(0) as u64),
        statusfilter: params.get("statusfilter").map(|s| schema::split_list(s)),
    };
    let auditor = caller.has(&format!("/nodes/{}", st.node), "Sys.Audit");
    let (items, total) = st.tasks.list(&f, &caller.token_id, auditor);
    Ok(Answer {
        data: Value::Array(items),
        total: Some(total),
    })
}

/// The task owner may always; anyone else needs `privilege` on `/nodes/{node}`.
fn check_task_access(
    st: &SimState,
    caller: &Caller,
    owner_user: &str,
    privilege: &str,
) -> Result<(), ApiError> {
    let owned = match owner_user.split_once('!') {
        Some((u, _)) => caller.token_id == owner_user || caller.token_id == u,
        None => caller.token_id == owner_user,
    };
    if owned {
        Ok(())
    } else {
        caller.check(&format!("/nodes/{}", st.node), &[privilege])
    }
}

fn get_task_status(st: &SimState, caller: &Caller, params: &Params) -> Result<Answer, ApiError> {
    validate(&task_props(), params)?;
    let upid = &params["upid"];
    let Some(decoded) = decode_upid(upid) else {
        return Err(ApiError::param("upid", "unable to parse worker upid"));
    };
    let Some(task) = st.tasks.get(upid) else {
        return Err(ApiError::param("upid", "no such task"));
    };
    check_task_access(st, caller, &decoded.6, "Sys.Audit")?;
    data(task.status_json())
}

fn get_task_log(st: &SimState, caller: &Caller, params: &Params) -> Result<Answer, ApiError> {
    let mut props = task_props();
    props.push(opt("start", Ty::int_min(0)));
    props.push(opt("limit", Ty::int_min(0)));
    props.push(opt("download", Ty::Bool));
    validate(&props, params)?;
    let upid = &params["upid"];
    let Some(decoded) = decode_upid(upid) else {
        return Err(ApiError::param("upid", "unable to parse worker upid"));
    };
    check_task_access(st, caller, &decoded.6, "Sys.Audit")?;
    let Some(task) = st.tasks.get(upid) else {
        return Ok(Answer {
            data: json!([{"n": 1, "t": "unable to open file - No such file or directory"}]),
            total: Some(1),
        });
    };
    let start = params
        .get("start")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let limit = params
        .get("limit")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(50);
    let mut lines = Vec::new();
    for (i, t) in task.log.iter().enumerate() {
        if i < start {
            continue;
        }
        if limit != 0 && lines.len() >= limit {
            continue;
        }
        lines.push(json!({"n": i + 1, "t": t}));
    }
    let mut total = task.log.len();
    if total == 0 {
        total = 1;
        lines.push(json!({"n": 1, "t": "no content"}));
    }
    Ok(Answer {
        data: Value::Array(lines),
        total: Some(total),
    })
}

fn stop_task(st: &mut SimState, caller: &Caller, params: &Params) -> Result<Answer, ApiError> {
    validate(&task_props(), params)?;
    let upid = params["upid"].clone();
    let Some(decoded) = decode_upid(&upid) else {
        return Err(ApiError::param("upid", "unable to parse worker upid"));
    };
    check_task_access(st, caller, &decoded.6, "Sys.Modify")?;
    st.kill_task(&upid, "received interrupt");
    data(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_disks_keep_their_options_with_the_new_volume_and_size() {
        assert_eq!(
            remap_disk(
                "local-lvm:vm-103-disk-0,iothread=1,size=32G",
                "fast:vm-9901-disk-0",
                32 << 30
            ),
            "fast:vm-9901-disk-0,iothread=1,size=32G"
        );
        assert_eq!(
            remap_disk(
                "local-lvm:vm-103-disk-1,efitype=4m,size=4M",
                "local-lvm:vm-9901-disk-1",
                4 << 20
            ),
            "local-lvm:vm-9901-disk-1,efitype=4m,size=4M"
        );
        assert_eq!(new_disk_name("lvmthin", 9900, 0), "vm-9900-disk-0");
        assert_eq!(new_disk_name("dir", 9900, 1), "9900/vm-9900-disk-1.raw");
    }

    #[test]
    fn extract_failures_carry_the_tools_exit_codes() {
        assert_eq!(extract_failure(Kind::Lxc, false, true).1, 2);
        assert_eq!(extract_failure(Kind::Lxc, false, false).1, 2);
        assert_eq!(extract_failure(Kind::Qemu, false, true).1, 133);
        assert_eq!(extract_failure(Kind::Qemu, true, false).1, 255);
        assert!(extract_failure(Kind::Lxc, false, false).0[0].ends_with("No space left on device"));
    }
}
