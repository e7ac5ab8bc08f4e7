//! The one writer: per-guest FIFO lanes that every guest mutation goes through.
//!
//! Owns: the lanes (one per [`Vmid`] with work), the fair run order across lanes, the global
//! limit on running operations, the bound on queued operations, and shutdown. It mints the
//! [`GuestPermit`] an operation needs to call a mutating Proxmox method, and only while that
//! operation runs in its lane.
//!
//! Rules (client-go workqueue / kubelet pod_workers lessons, with one deliberate
//! difference):
//! - A vmid is never worked on by two operations at once; its operations run strictly one at
//!   a time in submit order. Unlike a workqueue we never coalesce or reorder: an operation
//!   is a command with a payload, not a "resync this key" hint.
//! - Different vmids run in parallel up to [`QueueConfig::max_running`], served round-robin:
//!   a lane that has run one operation goes to the back of the ready list, so a guest with
//!   a thousand queued operations cannot starve one with a single operation.
//! - A lane with no running and no queued operation is removed at once; the map of lanes
//!   holds only guests with work (unbounded per-key state was a real kubelet bug).
//! - At most [`QueueConfig::max_queued`] operations wait (not counting running ones); past
//!   that, [`Queue::submit`] fails with [`QueueError::QueueFull`] instead of growing.
//! - [`Queue::shutdown`] stops taking work, resolves every operation that has not started
//!   as [`QueueError::Cancelled`], lets running operations finish within the grace period
//!   and cancels (drops) those still running after it.
//!
//! Must never: run two operations of one vmid concurrently, run operations of one vmid out
//! of submit order, hand out a permit outside a running operation, or lose a submitted
//! operation without resolving its handle.
//!
//! Design: a fixed pool of `max_running` worker tasks pulls the next ready lane's head
//! operation from one mutex-protected state (critical sections are a few pointer moves).
//! Operations are type-erased boxed futures; each submitter gets an [`OpHandle`] resolved
//! through a oneshot channel. A panicking operation resolves its handle as
//! [`QueueError::Panicked`] and the lane goes on with its next operation.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use felhom_protocol::Vmid;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

use crate::proxmox::GuestPermit;

/// An operation's name in `status` and errors; a `&'static str` costs no allocation.
pub type Label = Cow<'static, str>;

/// The future an operation returns; it may borrow the permit it was given.
pub type OpFuture<'p, T> = Pin<Box<dyn Future<Output = T> + Send + 'p>>;

/// Limits of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Operations running at once, across all vmids (at least 1).
    pub max_running: usize,
    /// Operations waiting (submitted, not yet started), across all vmids (at least 1).
    pub max_queued: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_running: 4,
            max_queued: 4096,
        }
    }
}

/// Why an operation was not run, or did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error(
        "queue full: {queued} operations already waiting (limit {limit}); `{label}` for guest {vmid} was not queued"
    )]
    QueueFull {
        vmid: Vmid,
        label: String,
        queued: usize,
        limit: usize,
    },
    #[error("queue is shutting down; `{label}` for guest {vmid} was not accepted")]
    ShuttingDown { vmid: Vmid, label: String },
    #[error("`{label}` for guest {vmid} was cancelled by shutdown")]
    Cancelled { vmid: Vmid, label: String },
    #[error("`{label}` for guest {vmid} panicked")]
    Panicked { vmid: Vmid, label: String },
}

/// A snapshot of the queue for `felhom-agent status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Operations waiting to start.
    pub queued: usize,
    /// Operations running now.
    pub running: usize,
    /// Lanes that exist (guests with work).
    pub lanes: usize,
    /// True once shutdown has begun.
    pub closed: bool,
}

/// One lane's content, for `status` and the report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LaneView {
    pub vmid: Vmid,
    /// Label of the running operation.
    pub running: Option<String>,
    /// Labels of the waiting operations, in run order.
    pub queued: Vec<String>,
}

/// What [`Queue::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Operations that had not started and were resolved as cancelled.
    pub cancelled_queued: usize,
    /// Operations still running when the grace period ended, dropped and cancelled.
    pub cancelled_running: usize,
}

/// Resolves to the operation's result once it has run (or why it did not).
#[must_use = "an operation's handle says whether it ran"]
pub struct OpHandle<T> {
    vmid: Vmid,
    label: Label,
    rx: oneshot::Receiver<Result<T, QueueError>>,
}

impl<T> OpHandle<T> {
    pub fn vmid(&self) -> Vmid {
        self.vmid
    }
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl<T> fmt::Debug for OpHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpHandle")
            .field("vmid", &self.vmid)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl<T> Future for OpHandle<T> {
    type Output = Result<T, QueueError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            // The operation was dropped without answering: shutdown cancelled it.
            Poll::Ready(Err(_)) => Poll::Ready(Err(QueueError::Cancelled {
                vmid: self.vmid,
                label: self.label.to_string(),
            })),
        }
    }
}

/// The type-erased operation the workers run.
type Job = Box<dyn for<'p> FnOnce(&'p GuestPermit) -> OpFuture<'p, ()> + Send>;

struct Pending {
    label: Label,
    job: Job,
}

#[derive(Default)]
struct Lane {
    pending: VecDeque<Pending>,
    running: Option<Label>,
}

#[derive(Default)]
struct State {
    lanes: HashMap<Vmid, Lane>,
    /// Lanes with a waiting operation and none running, in service order. A vmid is in
    /// here at most once.
    ready: VecDeque<Vmid>,
    queued: usize,
    running: usize,
    /// Workers waiting for work that no submit has claimed yet; a submit wakes one only
    /// if there is one (a busy worker finds the work when it finishes).
    idle: usize,
    closed: bool,
}

struct Inner {
    cfg: QueueConfig,
    state: Mutex<State>,
    /// Wakes a worker when a lane becomes ready (or shutdown begins).
    work: Notify,
    /// Wakes `shutdown` when the last running operation finishes.
    drained: Notify,
}

enum Next {
    Run(Vmid, Pending),
    Wait,
    Exit,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker never panics while holding the lock (operations run outside it), so a
        // poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finishes the previous operation of this worker (if any) and takes the next one, under
    /// one lock.
    fn finish_and_take(&self, finished: Option<Vmid>) -> Next {
        let mut st = self.lock();
        if let Some(vmid) = finished {
            st.running -= 1;
            let has_more = match st.lanes.get_mut(&vmid) {
                Some(lane) => {
                    lane.running = None;
                    !lane.pending.is_empty()
                }
                None => false,
            };
            if has_more && !st.closed {
                st.ready.push_back(vmid);
            } else {
                st.lanes.remove(&vmid);
            }
            if st.closed && st.running == 0 {
                self.drained.notify_waiters();
            }
        }
        if st.closed {
            return Next::Exit;
        }
        let Some(vmid) = st.ready.pop_front() else {
            st.idle += 1;
            return Next::Wait;
        };
        let Some(lane) = st.lanes.get_mut(&vmid) else {
            return Next::Wait; // unreachable by construction: a ready vmid has a lane
        };
        let Some(op) = lane.pending.pop_front() else {
            return Next::Wait; // unreachable by construction: a ready lane has work
        };
        lane.running = Some(op.label.clone());
        st.queued -= 1;
        st.running += 1;
        if !st.ready.is_empty() && st.idle > 0 {
            // More lanes are ready: make sure another idle worker looks.
            st.idle -= 1;
            self.work.notify_one();
        }
        Next::Run(vmid, op)
    }
}

async fn worker(inner: Arc<Inner>) {
    let mut finished = None;
    loop {
        match inner.finish_and_take(finished.take()) {
            Next::Run(vmid, op) => {
                let permit = GuestPermit::mint(vmid);
                (op.job)(&permit).await;
                finished = Some(vmid);
            }
            Next::Wait => inner.work.notified().await,
            Next::Exit => return,
        }
    }
}

/// Polls an operation's future, turning a panic into `Err(())`.
struct Guarded<'p, T> {
    fut: OpFuture<'p, T>,
}

impl<T> Future for Guarded<'_, T> {
    type Output = Result<T, ()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match catch_unwind(AssertUnwindSafe(|| self.fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        }
    }
}

/// Ends the workers when the last [`Queue`] clone is dropped without a shutdown.
struct Owner {
    inner: Arc<Inner>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        let workers = self.workers.get_mut().unwrap_or_else(|p| p.into_inner());
        for w in workers.drain(..) {
            w.abort();
        }
    }
}

/// The per-guest operation queue. Cheap to clone; all clones are the same queue.
#[derive(Clone)]
pub struct Queue {
    owner: Arc<Owner>,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("cfg", &self.owner.inner.cfg)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Queue {
    /// Starts the queue's workers on the current Tokio runtime (call from within one).
    pub fn start(cfg: QueueConfig) -> Queue {
        let cfg = QueueConfig {
            max_running: cfg.max_running.max(1),
            max_queued: cfg.max_queued.max(1),
        };
        let inner = Arc::new(Inner {
            cfg,
            state: Mutex::new(State::default()),
            work: Notify::new(),
            drained: Notify::new(),
        });
        let workers = (0..cfg.max_running)
            .map(|_| tokio::spawn(worker(inner.clone())))
            .collect();
        Queue {
            owner: Arc::new(Owner {
                inner,
                workers: Mutex::new(workers),
            }),
        }
    }

    pub fn config(&self) -> QueueConfig {
        self.owner.inner.cfg
    }

    /// Queues `op` at the end of `vmid`'s lane. `label` names it in `status` and errors.
    ///
    /// `op` receives the lane's permit by reference; the future it returns may borrow it.
    /// Write it as `|permit| Box::pin(async move { … })`.
    pub fn submit<T, F>(
        &self,
        vmid: Vmid,
        label: impl Into<Label>,
        op: F,
    ) -> Result<OpHandle<T>, QueueError>
    where
        T: Send + 'static,
        F: for<'p> FnOnce(&'p GuestPermit) -> OpFuture<'p, T> + Send + 'static,
    {
        let label: Label = label.into();
        let inner = &self.owner.inner;
        let mut st = inner.lock();
        if st.closed {
            return Err(QueueError::ShuttingDown {
                vmid,
                label: label.to_string(),
            });
        }
        if st.queued >= inner.cfg.max_queued {
            return Err(QueueError::QueueFull {
                vmid,
                label: label.to_string(),
                queued: st.queued,
                limit: inner.cfg.max_queued,
            });
        }
        let (tx, rx) = oneshot::channel();
        let job_label = label.clone();
        let job: Job = Box::new(move |permit: &GuestPermit| -> OpFuture<'_, ()> {
            Box::pin(async move {
                let out = match catch_unwind(AssertUnwindSafe(|| op(permit))) {
                    Ok(fut) => Guarded { fut }.await,
                    Err(_) => Err(()),
                };
                let out = out.map_err(|()| QueueError::Panicked {
                    vmid,
                    label: job_label.to_string(),
                });
                // The submitter may have dropped its handle; the result is then unwanted.
                let _ = tx.send(out);
            })
        });
        let lane = st.lanes.entry(vmid).or_default();
        let newly_ready = lane.running.is_none() && lane.pending.is_empty();
        lane.pending.push_back(Pending {
            label: label.clone(),
            job,
        });
        st.queued += 1;
        if newly_ready {
            st.ready.push_back(vmid);
            if st.idle > 0 {
                st.idle -= 1;
                drop(st);
                inner.work.notify_one();
            }
        }
        Ok(OpHandle { vmid, label, rx })
    }

    pub fn stats(&self) -> QueueStats {
        let st = self.owner.inner.lock();
        QueueStats {
            queued: st.queued,
            running: st.running,
            lanes: st.lanes.len(),
            closed: st.closed,
        }
    }

    /// Every lane with work, ordered by vmid.
    pub fn lanes(&self) -> Vec<LaneView> {
        let st = self.owner.inner.lock();
        let mut out: Vec<LaneView> = st
            .lanes
            .iter()
            .map(|(vmid, lane)| LaneView {
                vmid: *vmid,
                running: lane.running.as_deref().map(str::to_string),
                queued: lane.pending.iter().map(|p| p.label.to_string()).collect(),
            })
            .collect();
        out.sort_by_key(|l| l.vmid);
        out
    }

    /// Stops taking work, cancels everything not started, waits up to `grace` for running
    /// operations, then cancels those still running. Idempotent.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let inner = &self.owner.inner;
        let dropped: Vec<Pending> = {
            let mut st = inner.lock();
            st.closed = true;
            st.ready.clear();
            st.queued = 0;
            let mut dropped = Vec::new();
            st.lanes.retain(|_, lane| {
                dropped.extend(lane.pending.drain(..));
                lane.running.is_some()
            });
            dropped
        };
        let cancelled_queued = dropped.len();
        // Dropping a job drops its result sender: its handle resolves as Cancelled.
        drop(dropped);
        inner.work.notify_waiters();

        let wait_drained = async {
            loop {
                let notified = inner.drained.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if inner.lock().running == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(grace, wait_drained).await;

        let cancelled_running = inner.lock().running;
        let workers: Vec<JoinHandle<()>> = {
            let mut w = self.owner.workers.lock().unwrap_or_else(|p| p.into_inner());
            w.drain(..).collect()
        };
        for w in &workers {
            w.abort();
        }
        for w in workers {
            let _ = w.await;
        }
        {
            let mut st = inner.lock();
            st.running = 0;
            st.lanes.clear();
        }
        ShutdownReport {
            cancelled_queued,
            cancelled_running,
        }
    }
}

#[cfg(test)]
mod tests;
