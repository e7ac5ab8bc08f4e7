//! Reconcile core: per-guest queue, desired state, normalization, plan, engine, journal.
//! (Issue 5.)
//!
//! Every mutation of a guest, whatever its source, goes through [`queue::Queue`]: only a
//! running queue operation holds the [`GuestPermit`] the mutating Proxmox methods demand.

pub mod desired;
pub mod engine;
pub mod exec;
pub mod journal;
pub mod normalize;
pub mod permit;
pub mod plan;
pub mod pve;
pub mod queue;

#[cfg(test)]
pub(crate) mod fakenode;
#[cfg(test)]
mod testmodel;

pub use engine::{Engine, EngineHandle, EngineStatus, Gate};
pub use permit::GuestPermit;
pub use queue::{OpFuture, OpHandle, Queue, QueueConfig, QueueError, QueueStats};
