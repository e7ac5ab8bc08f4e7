//! Test-only in-memory Proxmox node behind the [`Pve`] seam: guests with PVE's config
//! round-trip rules ([`super::testmodel`]), tasks that take time and change the guest when
//! they end, synchronous LXC config writes, `qmconfig` tasks, refusals PVE gives (already
//! running, locked, a config `digest` that is out of date), and a log of every mutating
//! call. Every config write moves the digest, as in PVE. The end-to-end version of these
//! tests runs the real daemon against `felhom-pvesim`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use felhom_protocol::Vmid;
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::normalize::{GuestKind, Param};
use super::plan::ActualGuest;
use super::pve::{BoxFut, GuestSummary, Pve};
use super::testmodel::pve_write;
use crate::proxmox::GuestPermit;
use crate::proxmox::{ConfigChange, ConfigValue, ProxmoxError, SetConfigOutcome, TaskDone, Upid};

pub(crate) const TOKEN: &str = "felhom@pve!agent";

#[derive(Debug, Clone)]
pub(crate) struct FakeGuest {
    pub kind: GuestKind,
    pub status: String,
    pub template: bool,
    pub lock: Option<String>,
    pub ha_managed: bool,
    pub config: Map<String, Value>,
    /// Ignores a graceful shutdown (needs the hard stop).
    pub ignores_shutdown: bool,
}

impl FakeGuest {
    pub fn new(kind: GuestKind, status: &str) -> FakeGuest {
        let mut config = Map::new();
        config.insert("digest".into(), Value::String("0".into()));
        FakeGuest {
            kind,
            status: status.into(),
            template: false,
            lock: None,
            ha_managed: false,
            config,
            ignores_shutdown: false,
        }
    }
}

/// One mutating call that reached the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Call {
    pub vmid: Vmid,
    pub what: &'static str,
    pub payload: String,
}

#[derive(Debug)]
enum Effect {
    Status(&'static str),
    Shutdown,
    Config(Vec<Param>),
}

#[derive(Debug)]
struct Task {
    upid: Upid,
    vmid: Vmid,
    ends_at: Instant,
    exit: Option<String>,
    effect: Option<Effect>,
    done: bool,
}

#[derive(Debug, Default)]
struct State {
    guests: BTreeMap<Vmid, FakeGuest>,
    tasks: Vec<Task>,
    calls: Vec<Call>,
    next_pid: u32,
    /// (vmid, call) → error message for the next such calls.
    faults: BTreeMap<(Vmid, &'static str), String>,
}

/// Called with every mutating call as it arrives, before the node acts on it.
pub(crate) type CallHook = Box<dyn Fn(&Call) + Send + Sync>;

pub(crate) struct FakeNode {
    state: Mutex<State>,
    pub task_time: Duration,
    hook: Mutex<Option<CallHook>>,
}

impl std::fmt::Debug for FakeNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeNode").finish_non_exhaustive()
    }
}

fn epoch_s() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

fn api(status: u16, endpoint: &str, message: String) -> ProxmoxError {
    ProxmoxError::Api {
        endpoint: endpoint.to_string(),
        status,
        message,
        errors: BTreeMap::new(),
    }
}

impl FakeNode {
    pub fn new(guests: Vec<(u32, FakeGuest)>, task_time: Duration) -> FakeNode {
        let mut st = State {
            next_pid: 0x1000,
            ..State::default()
        };
        for (v, g) in guests {
            st.guests.insert(Vmid::new(u64::from(v)).unwrap(), g);
        }
        FakeNode {
            state: Mutex::new(st),
            task_time,
            hook: Mutex::new(None),
        }
    }

    pub fn on_call(&self, hook: CallHook) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        settle(&mut st);
        st
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn guest_state(&self, vmid: u32) -> FakeGuest {
        self.lock().guests[&Vmid::new(u64::from(vmid)).unwrap()].clone()
    }

    pub fn with_guest(&self, vmid: u32, f: impl FnOnce(&mut FakeGuest)) {
        let mut st = self.lock();
        if let Some(g) = st.guests.get_mut(&Vmid::new(u64::from(vmid)).unwrap()) {
            f(g);
        }
    }

    pub fn fail(&self, vmid: u32, what: &'static str, message: &str) {
        self.lock()
            .faults
            .insert((Vmid::new(u64::from(vmid)).unwrap(), what), message.into());
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Whether every task has ended.
    pub fn idle(&self) -> bool {
        self.lock().tasks.iter().all(|t| t.done)
    }

    /// A power action as PVE does it: refused with its 500 when the guest is already in
    /// the state it leads to (start on a running guest, shutdown/stop on a stopped one),
    /// else a task of type `<qm|vz><op>`.
    fn power(
        &self,
        permit: &GuestPermit,
        kind: GuestKind,
        op: &'static str,
        params: String,
        effect: Effect,
    ) -> Result<Upid, ProxmoxError> {
        let vmid = permit.vmid();
        let mut st = self.begin(vmid, op, params)?;
        let running = st.guests[&vmid].status == "running";
        match (op, running) {
            ("start", true) => return Err(api(500, op, format!("CT {vmid} already running"))),
            ("shutdown" | "stop", false) => {
                return Err(api(500, op, format!("CT {vmid} not running")));
            }
            _ => {}
        }
        Ok(self.task(
            &mut st,
            vmid,
            &format!("{}{op}", prefix(kind)),
            None,
            effect,
        ))
    }

    fn begin(
        &self,
        vmid: Vmid,
        what: &'static str,
        payload: String,
    ) -> Result<std::sync::MutexGuard<'_, State>, ProxmoxError> {
        let call = Call {
            vmid,
            what,
            payload,
        };
        if let Some(hook) = self.hook.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            hook(&call);
        }
        let mut st = self.lock();
        st.calls.push(call);
        if let Some(msg) = st.faults.get(&(vmid, what)) {
            return Err(api(500, what, msg.clone()));
        }
        let Some(g) = st.guests.get(&vmid) else {
            return Err(api(
                500,
                what,
                format!("Configuration file for {vmid} does not exist"),
            ));
        };
        if let Some(l) = &g.lock {
            return Err(api(500, what, format!("CT is locked ({l})")));
        }
        Ok(st)
    }

    fn task(
        &self,
        st: &mut State,
        vmid: Vmid,
        task_type: &str,
        exit: Option<String>,
        effect: Effect,
    ) -> Upid {
        st.next_pid += 1;
        let raw = format!(
            "UPID:pve1:{:08X}:{:08X}:{:08X}:{task_type}:{vmid}:{TOKEN}:",
            st.next_pid,
            st.next_pid * 7,
            epoch_s()
        );
        let upid: Upid = raw.parse().expect("fake UPID parses");
        st.tasks.push(Task {
            upid: upid.clone(),
            vmid,
            ends_at: Instant::now() + self.task_time,
            exit,
            effect: Some(effect),
            done: false,
        });
        upid
    }
}

/// Ends due tasks and applies their effects.
fn settle(st: &mut State) {
    let now = Instant::now();
    let State { tasks, guests, .. } = st;
    for t in tasks.iter_mut().filter(|t| !t.done && t.ends_at <= now) {
        t.done = true;
        let Some(g) = guests.get_mut(&t.vmid) else {
            continue;
        };
        match t.effect.take() {
            Some(Effect::Status(s)) => g.status = s.to_string(),
            Some(Effect::Shutdown) => {
                if g.ignores_shutdown {
                    t.exit = Some("shutdown timeout".into());
                } else {
                    g.status = "stopped".into();
                }
            }
            Some(Effect::Config(params)) => pve_write(g.kind, &mut g.config, &params),
            None => {}
        }
    }
}

fn prefix(kind: GuestKind) -> &'static str {
    match kind {
        GuestKind::Lxc => "vz",
        GuestKind::Qemu => "qm",
    }
}

fn params_of(change: &ConfigChange) -> Vec<Param> {
    let mut out: Vec<Param> = change
        .set
        .iter()
        .map(|(k, v)| {
            let v = match v {
                ConfigValue::Str(s) => s.clone(),
                ConfigValue::Int(i) => i.to_string(),
                ConfigValue::Bool(b) => if *b { "1" } else { "0" }.to_string(),
            };
            Param::Set(k.clone(), v)
        })
        .collect();
    out.extend(change.delete.iter().map(|k| Param::Delete(k.clone())));
    out
}

impl Pve for FakeNode {
    fn list(&self) -> BoxFut<'_, Result<Vec<GuestSummary>, ProxmoxError>> {
        let out = self
            .lock()
            .guests
            .iter()
            .map(|(v, g)| GuestSummary {
                vmid: *v,
                kind: g.kind,
                status: g.status.clone(),
            })
            .collect();
        Box::pin(async move { Ok(out) })
    }

    fn guest(&self, _kind: GuestKind, vmid: Vmid) -> BoxFut<'_, Result<ActualGuest, ProxmoxError>> {
        let r = self
            .lock()
            .guests
            .get(&vmid)
            .map(|g| ActualGuest {
                vmid,
                kind: g.kind,
                status: g.status.clone(),
                template: g.template,
                lock: g.lock.clone(),
                ha_managed: g.ha_managed,
                config: g.config.clone(),
            })
            .ok_or_else(|| api(500, "status", format!("no guest {vmid}")));
        Box::pin(async move { r })
    }

    fn start<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
    ) -> BoxFut<'a, Result<Upid, ProxmoxError>> {
        let r = self.power(
            permit,
            kind,
            "start",
            String::new(),
            Effect::Status("running"),
        );
        Box::pin(async move { r })
    }

    fn shutdown<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
        timeout: Duration,
    ) -> BoxFut<'a, Result<Upid, ProxmoxError>> {
        let params = format!("timeout={}", timeout.as_secs());
        let r = self.power(permit, kind, "shutdown", params, Effect::Shutdown);
        Box::pin(async move { r })
    }

    fn stop<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
    ) -> BoxFut<'a, Result<Upid, ProxmoxError>> {
        let r = self.power(
            permit,
            kind,
            "stop",
            String::new(),
            Effect::Status("stopped"),
        );
        Box::pin(async move { r })
    }

    fn set_config<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
        change: &'a ConfigChange,
    ) -> BoxFut<'a, Result<SetConfigOutcome, ProxmoxError>> {
        let r = (|| {
            let vmid = permit.vmid();
            let params = params_of(change);
            let payload = format!("{params:?} digest={:?}", change.digest);
            let mut st = self.begin(vmid, "set_config", payload)?;
            // PVE compares the digest only when one is sent, before writing anything.
            let current = st.guests[&vmid].config.get("digest").cloned();
            if let Some(d) = &change.digest
                && current.as_ref().and_then(Value::as_str) != Some(d.as_str())
            {
                return Err(ProxmoxError::ConfigChanged {
                    endpoint: "set_config".into(),
                    message:
                        "detected modified configuration - file changed by other user? Try again."
                            .into(),
                });
            }
            match kind {
                GuestKind::Lxc => {
                    if let Some(g) = st.guests.get_mut(&vmid) {
                        pve_write(g.kind, &mut g.config, &params);
                    }
                    Ok(SetConfigOutcome::Applied)
                }
                GuestKind::Qemu => Ok(SetConfigOutcome::Task(self.task(
                    &mut st,
                    vmid,
                    "qmconfig",
                    None,
                    Effect::Config(params),
                ))),
            }
        })();
        Box::pin(async move { r })
    }

    fn wait<'a>(
        &'a self,
        upid: &'a Upid,
        timeout: Duration,
    ) -> BoxFut<'a, Result<TaskDone, ProxmoxError>> {
        Box::pin(async move {
            let deadline = Instant::now() + timeout;
            loop {
                {
                    let st = self.lock();
                    let Some(t) = st.tasks.iter().find(|t| &t.upid == upid) else {
                        return Err(api(400, "task status", "no such task".into()));
                    };
                    if t.done {
                        return match &t.exit {
                            None => Ok(TaskDone {
                                upid: upid.clone(),
                                exitstatus: "OK".into(),
                                warnings: None,
                            }),
                            Some(e) => Err(ProxmoxError::TaskFailed {
                                upid: upid.clone(),
                                exitstatus: e.clone(),
                                permission: None,
                            }),
                        };
                    }
                }
                if Instant::now() >= deadline {
                    return Err(ProxmoxError::TaskTimeout {
                        upid: upid.clone(),
                        waited: timeout,
                    });
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    }

    fn find_task<'a>(
        &'a self,
        vmid: Vmid,
        task_type: &'a str,
        since: i64,
        exclude: &'a [String],
    ) -> BoxFut<'a, Result<Option<Upid>, ProxmoxError>> {
        let found = self
            .lock()
            .tasks
            .iter()
            .filter(|t| {
                t.vmid == vmid
                    && t.upid.task_type() == task_type
                    && t.upid.user() == TOKEN
                    && i64::from(t.upid.starttime()) >= since
                    && !exclude.iter().any(|x| x == t.upid.as_str())
            })
            .map(|t| t.upid.clone())
            .next();
        Box::pin(async move { Ok(found) })
    }
}
