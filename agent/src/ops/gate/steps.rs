//! The gate's step machine: what a gated operation has done so far, kept in its record's
//! `gate` object, and the one way a step that sends a request is run.
//!
//! Owns [`Steps`] (the record's `gate` object: the decision, one [`Slot`] per request, the
//! undo point made, the health verdict) and [`Machine`], which commits each step with
//! `op_update` before the next begins. A request's slot is committed (with its start time)
//! before the request goes out and its UPID the moment Proxmox answers; a resumed slot:
//! - with an outcome: is not run again;
//! - with a UPID: is waited on;
//! - without one: our token's task of the slot's type for the guest since the slot's start
//!   that no record knows is adopted (`find_task`); else the node is asked whether the
//!   step's effect is already there (a snapshot listed, a guest gone, ...); only then is the
//!   request sent.
//!
//! `set_config` (see `run`'s module doc) uses the slots without [`Machine::task`]: its slot
//! is committed together with the decision and the undo point, and a resumed open slot is
//! told done or not by the config's digest, so its outcome, the digest after and the
//! health verdict can wait in memory for the end's commit.
//!
//! Must never: send a request before its slot is committed, send one again whose slot has
//! an outcome, or write an undo point except in the same transaction as its step.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use felhom_protocol::Vmid;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::capability::Plan;
use crate::ops::exec::{ExecEnv, Unfinished};
use crate::proxmox::{GuestKind, ProxmoxError, Upid};
use crate::reconcile::journal::{JournalError, UndoPoint, UndoPointError, now_ms};
use crate::reconcile::pve::Pve;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the gate decided before acting (step 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decided {
    /// The undo point to make (or why none).
    pub plan: Plan,
    /// `true` for set_config: the previous values are the undo point.
    #[serde(default)]
    pub previous_values: bool,
    /// The guest's power state before (`running` / `stopped`), `None` for a new guest.
    pub power: Option<String>,
    /// set_config: the previous value of every key touched (`null`: absent).
    #[serde(default)]
    pub previous: Map<String, Value>,
    /// The config digest read before acting.
    #[serde(default)]
    pub digest: Option<String>,
    /// Whether the guest existed before (restore).
    #[serde(default)]
    pub existed: bool,
    /// Where an undo backup is restored to: the storage of the container's `rootfs`
    /// (PVE would otherwise put it on `local`); `None` for a VM (each disk goes back to
    /// its own storage).
    #[serde(default)]
    pub restore_storage: Option<String>,
    pub at_ms: i64,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Failed { error: String },
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok)
    }
}

/// One request of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    pub started_ms: i64,
    #[serde(default)]
    pub upid: Option<String>,
    #[serde(default)]
    pub outcome: Option<Outcome>,
}

/// The undo point as the step recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Made {
    pub kind: String,
    pub reference: Option<String>,
    pub storage: Option<String>,
}

/// A check's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub ok: bool,
    pub detail: String,
}

/// The record's `gate` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Steps {
    #[serde(default)]
    pub decided: Option<Decided>,
    #[serde(default)]
    pub slots: BTreeMap<String, Slot>,
    #[serde(default)]
    pub undo_point: Option<Made>,
    /// The config digest right after the action (set_config's undo writes with it).
    #[serde(default)]
    pub digest_after: Option<String>,
    #[serde(default)]
    pub health: Option<Verdict>,
    #[serde(default)]
    pub undo: Option<Verdict>,
}

/// What sending a request gave.
#[derive(Debug)]
pub enum Sent {
    /// A task to wait on.
    Task(Upid),
    /// Done synchronously (LXC config, a nothing-to-do).
    Done,
}

/// Runs the steps of one operation.
#[derive(Debug)]
pub struct Machine<'a> {
    pub env: &'a ExecEnv,
    pub op_id: String,
    pub vmid: Vmid,
    pub steps: Steps,
    pub resuming: bool,
}

fn undo_err(e: UndoPointError) -> Unfinished {
    match e {
        UndoPointError::Journal(j) => Unfinished::Journal(j),
        other => Unfinished::Blocking(other.to_string()),
    }
}

impl<'a> Machine<'a> {
    pub fn new(env: &'a ExecEnv, op_id: &str, vmid: Vmid, gate: &Value, resuming: bool) -> Self {
        Machine {
            env,
            op_id: op_id.to_string(),
            vmid,
            steps: serde_json::from_value(gate.clone()).unwrap_or_default(),
            resuming,
        }
    }

    async fn write(
        &mut self,
        upid: Option<String>,
        point: Option<UndoPoint>,
    ) -> Result<(), Unfinished> {
        let id = self.op_id.clone();
        let gate = serde_json::to_value(&self.steps).unwrap_or(Value::Null);
        let j = self.env.journal.clone();
        tokio::task::spawn_blocking(move || {
            let change = |r: &mut crate::reconcile::journal::OpRecord| {
                r.gate = gate;
                if let Some(u) = upid {
                    r.upids.push(u);
                }
            };
            match point {
                Some(p) => j
                    .op_update_with_undo(&id, change, &p, None)
                    .map(|_| ())
                    .map_err(undo_err),
                None => j
                    .op_update(&id, change, None)
                    .map(|_| ())
                    .map_err(Unfinished::from),
            }
        })
        .await
        .map_err(|e| Unfinished::Blocking(e.to_string()))?
    }

    /// Applies `f` to the steps and commits them.
    pub async fn commit(&mut self, f: impl FnOnce(&mut Steps)) -> Result<(), Unfinished> {
        f(&mut self.steps);
        self.write(None, None).await
    }

    /// Applies `f` and commits it together with the undo point.
    pub async fn commit_with_undo(
        &mut self,
        f: impl FnOnce(&mut Steps),
        point: UndoPoint,
    ) -> Result<(), Unfinished> {
        f(&mut self.steps);
        self.write(None, Some(point)).await
    }

    /// The outcome of slot `name` if it has one.
    pub fn outcome(&self, name: &str) -> Option<&Outcome> {
        self.steps.slots.get(name).and_then(|s| s.outcome.as_ref())
    }

    async fn set_outcome(&mut self, name: &str, o: Outcome) -> Result<Outcome, Unfinished> {
        let n = name.to_string();
        let oc = o.clone();
        self.commit(move |s| {
            if let Some(slot) = s.slots.get_mut(&n) {
                slot.outcome = Some(oc);
            }
        })
        .await?;
        Ok(o)
    }

    /// Runs request slot `name` exactly once: see the module doc. `ty` is the task type a
    /// resume searches for; `done_already` asks the node whether the effect is there;
    /// `send` sends the request.
    pub async fn task(
        &mut self,
        name: &str,
        ty: &str,
        done_already: impl FnOnce() -> BoxFut<'a, Result<bool, Unfinished>>,
        send: impl FnOnce() -> BoxFut<'a, Result<Sent, ProxmoxError>>,
    ) -> Result<Outcome, Unfinished> {
        if let Some(o) = self.outcome(name) {
            return Ok(o.clone());
        }
        let upid = match self.steps.slots.get(name).cloned() {
            Some(Slot { upid: Some(u), .. }) => Some(u.parse::<Upid>().map_err(|e| {
                Unfinished::Blocking(format!(
                    "the journal holds an unreadable task id {u:?}: {e}"
                ))
            })?),
            Some(Slot { .. }) => match self.adopt(name, ty).await? {
                Some(u) => Some(u),
                None if done_already().await? => {
                    return self.set_outcome(name, Outcome::Ok).await;
                }
                None => None,
            },
            None => {
                let n = name.to_string();
                let at = now_ms();
                self.commit(move |s| {
                    s.slots.insert(
                        n,
                        Slot {
                            started_ms: at,
                            upid: None,
                            outcome: None,
                        },
                    );
                })
                .await?;
                None
            }
        };
        let upid = match upid {
            Some(u) => u,
            None => match send().await {
                Ok(Sent::Task(u)) => {
                    self.record_upid(name, &u).await?;
                    u
                }
                Ok(Sent::Done) => return self.set_outcome(name, Outcome::Ok).await,
                Err(e) if e.is_transient() => {
                    // It may have reached Proxmox: the resume searches for it.
                    return Err(Unfinished::Proxmox {
                        what: "sending a gated step's request",
                        source: e,
                    });
                }
                Err(e) => {
                    return self
                        .set_outcome(
                            name,
                            Outcome::Failed {
                                error: e.to_string(),
                            },
                        )
                        .await;
                }
            },
        };
        let o = self.wait(&upid).await?;
        self.set_outcome(name, o).await
    }

    /// Waits for a task's end: its outcome, or `Err` when the wait itself was lost.
    pub async fn wait(&self, upid: &Upid) -> Result<Outcome, Unfinished> {
        match Pve::wait(&self.env.pve, upid, self.env.task_timeout).await {
            Ok(_) => Ok(Outcome::Ok),
            Err(e @ ProxmoxError::TaskFailed { .. }) => Ok(Outcome::Failed {
                error: e.to_string(),
            }),
            Err(source) => Err(Unfinished::Proxmox {
                what: "waiting for a gated step's task",
                source,
            }),
        }
    }

    /// For slot `name`, started before a crash without a UPID: our token's task of type
    /// `ty` for the guest since the slot's start that no record knows, adopted (its UPID
    /// committed).
    pub async fn adopt(&mut self, name: &str, ty: &str) -> Result<Option<Upid>, Unfinished> {
        let Some(started_ms) = self.started_ms(name) else {
            return Ok(None);
        };
        let vmid = self.vmid;
        let v = vmid.get();
        let j = self.env.journal.clone();
        let known = tokio::task::spawn_blocking(move || -> Result<Vec<String>, JournalError> {
            let mut k = j.upids_of(vmid)?;
            k.extend(j.op_upids_of(v)?);
            Ok(k)
        })
        .await
        .map_err(|e| Unfinished::Blocking(e.to_string()))??;
        let found = self
            .env
            .pve
            .find_task(self.vmid, ty, started_ms.div_euclid(1000), &known)
            .await
            .map_err(|source| Unfinished::Proxmox {
                what: "searching the task list",
                source,
            })?;
        match found {
            Some(u) => {
                tracing::info!(op_id = %self.op_id, slot = name, upid = %u, "adopting the task an interrupted step started");
                self.record_upid(name, &u).await?;
                Ok(Some(u))
            }
            None => Ok(None),
        }
    }

    /// Records slot `name`'s UPID (committed, with the record's `upids`).
    pub async fn record_upid(&mut self, name: &str, u: &Upid) -> Result<(), Unfinished> {
        if let Some(slot) = self.steps.slots.get_mut(name) {
            slot.upid = Some(u.as_str().to_string());
        }
        self.write(Some(u.as_str().to_string()), None).await
    }

    /// The slot's recorded UPID.
    pub fn upid(&self, name: &str) -> Option<Upid> {
        self.steps
            .slots
            .get(name)
            .and_then(|s| s.upid.as_deref())
            .and_then(|u| u.parse().ok())
    }

    /// When the slot was started (ms).
    pub fn started_ms(&self, name: &str) -> Option<i64> {
        self.steps.slots.get(name).map(|s| s.started_ms)
    }
}

/// Waits until the guest's power state is `want` (`running`/`stopped`), polling, at most
/// `timeout`. `Ok(None)` when reached, `Ok(Some(seen))` when not.
pub async fn await_power(
    env: &ExecEnv,
    kind: GuestKind,
    vmid: Vmid,
    want: &str,
    timeout: Duration,
) -> Result<Option<String>, Unfinished> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(100);
    loop {
        let seen = env
            .pve
            .guest_status(kind, vmid)
            .await
            .map_err(|source| Unfinished::Proxmox {
                what: "reading the guest's status",
                source,
            })?
            .status
            .as_str()
            .to_string();
        if seen == want {
            return Ok(None);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Some(seen));
        }
        tokio::time::sleep(pause.min(deadline - tokio::time::Instant::now())).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}
