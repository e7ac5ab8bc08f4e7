//! Reconcile core: per-guest queue, desired state, normalization, plan, engine, journal.
//! (Issue 5.)
