//! Signed operations, the agent's side (issue 12): this host's identity and its trust in
//! operator keys, and the offline check `felhom-agent ops verify`.
//!
//! Owns: [`identity`] (the `agent_id`, created once in `state_dir/agent-id` or set in the
//! config) and [`trust`] (`authz.signers_file` loaded with its owner/mode rule). The
//! envelope format, the key rules and the payload checks are `felhom-authz`'s.
//! Must never: run, queue or record an operation (delivery, the journal and the replay
//! store come later), or replace an existing identity.
//!
//! Limitations: the daemon loads identity and trust and reloads trust on SIGHUP, but
//! does not fetch or run signed operations yet.

pub mod identity;
pub mod trust;

pub use felhom_authz::AgentId;
pub use identity::{IdentityError, IdentitySource};
pub use trust::{TrustFileError, TrustState};
