//! Reconcile core: per-guest queue, desired state, normalization, plan, engine, journal.
//! (Issue 5.)
//!
//! Every mutation of a guest, whatever its source, goes through [`queue::Queue`]: only a
//! running queue operation holds the [`GuestPermit`] the mutating Proxmox methods demand.

pub mod permit;
pub mod queue;

pub use permit::GuestPermit;
pub use queue::{OpFuture, OpHandle, Queue, QueueConfig, QueueError, QueueStats};
