//! Reconcile core: per-guest queue, desired state, normalization, plan, engine, journal,
//! and the status the hub report embeds ([`status`]). (Issue 5.)
//!
//! Layering: reconcile builds on the Proxmox client ([`crate::proxmox`]), never the other
//! way round; the hub report embeds reconcile's status types, reconcile takes nothing from
//! the hub.
//!
//! Every mutation of a guest, whatever its source, goes through [`queue::Queue`]: only a
//! running queue operation holds the [`GuestPermit`] the mutating Proxmox methods demand.

pub mod desired;
pub mod engine;
pub mod exec;
pub mod journal;
pub mod normalize;
pub mod plan;
pub mod pve;
pub mod queue;
pub mod status;

#[cfg(test)]
pub(crate) mod fakenode;
#[cfg(test)]
mod testmodel;

/// The permit is the client's type ([`crate::proxmox::permit`]); only [`queue`] mints it.
pub use crate::proxmox::GuestPermit;
pub use engine::{Engine, EngineHandle, EngineStatus, Gate};
pub use queue::{OpFuture, OpHandle, Queue, QueueConfig, QueueError, QueueStats};
