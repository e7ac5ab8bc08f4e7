//! Reconcile core: per-guest queue, desired state, normalization, plan, engine, journal.
//! (Issue 5.)

pub mod permit;

pub use permit::GuestPermit;
