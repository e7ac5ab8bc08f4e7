//! Reconcile core: per-guest queue, desired state, normalization, plan, engine, journal.
//! (Issue 5.)
//!
//! Every mutation of a guest, whatever its source, goes through [`queue::Queue`]: only a
//! running queue operation holds the [`GuestPermit`] the mutating Proxmox methods demand.

pub mod desired;
pub mod journal;
pub mod normalize;
pub mod permit;
pub mod plan;
pub mod queue;

#[cfg(test)]
mod testmodel;

pub use permit::GuestPermit;
pub use queue::{OpFuture, OpHandle, Queue, QueueConfig, QueueError, QueueStats};
