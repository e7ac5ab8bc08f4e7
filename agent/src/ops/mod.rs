//! Signed operations, the agent's side (issue 12): this host's identity and its trust in
//! operator keys, the channel from the hub, the replay store, and running what operators
//! signed through the same lanes and journal as reconcile.
//!
//! Owns: [`identity`] (the `agent_id`, created once in `state_dir/agent-id` or set in the
//! config), [`trust`] (`authz.signers_file` loaded with its owner/mode rule) and [`wire`]
//! (the channel's JSON shapes). The envelope format, the key rules and the payload checks
//! are `felhom-authz`'s.
//! Must never: run anything that did not verify against the host's current trust, or
//! replace an existing identity.

#[cfg(feature = "bench-gate-off")]
pub mod bench_gate_off;
pub mod channel;
pub mod desired;
pub mod exec;
pub mod gate;
pub mod identity;
pub mod service;
pub mod trust;
pub mod undo_view;
pub mod wire;

pub use felhom_authz::AgentId;
pub use identity::{IdentityError, IdentitySource};
pub use trust::{TrustFileError, TrustState};

/// What the hub report reads from the signed-operations service.
pub trait OpsFeed: Send + Sync + std::fmt::Debug {
    /// Held and running operations, and the results the hub has not accepted yet (at most
    /// 100, oldest first).
    fn snapshot(&self) -> (Vec<wire::HeldOp>, Vec<wire::OpResult>);
    /// The hub accepted a report carrying these results.
    fn delivered(&self, seqs: &[u64]);
}
