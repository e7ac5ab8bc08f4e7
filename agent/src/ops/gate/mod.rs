//! The reversibility gate (issue 13): every gated signed guest operation prepares its way
//! back before it acts, checks the guest after, and undoes by itself on failure.
//!
//! Owns: the capability decision ([`capability`]), the crash-safe step machine kept in the
//! operation record's `gate` object ([`steps`]), and running an undo.
//!
//! Must never: remove an undo point on its own (only a signed `release_undo` or a local
//! `ops release` does), send a request whose step is not committed first, or repeat a
//! finished step after a restart.

pub mod capability;
pub mod run;
pub mod steps;

pub use run::{GateOp, Gated, Who, run};
