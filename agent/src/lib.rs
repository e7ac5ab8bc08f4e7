//! # felhom-agent
//!
//! Background: one agent runs on every Proxmox VE host. It reads the node through the PVE
//! REST API with an API token, reports to the hub on a heartbeat, reconciles desired guest
//! state, and asks `felhom-privhelper` (a separate root process) for the three things the
//! API cannot do.
//!
//! Design: one module per concern; the binary (`main.rs`) is a thin shell over [`cli`].
//! - [`config`]: the JSON config, environment overrides, secrets (never printed).
//! - [`proxmox`]: the typed PVE client (reads; mutations only through the reconcile queue).
//! - [`privileged`]: the client side of the root fence (Unix socket + `felhom-protocol`).
//! - [`sensors`]: hwmon temperatures, read here because they need no privilege.
//! - [`hub`]: the host report, its collector, the hub client and the heartbeat loop.
//! - [`reconcile`]: per-guest queue, desired state, normalization, plan, engine, journal.
//! - [`ops`]: signed operations: this host's `agent_id` and its trust in operator keys.
//! - [`control`]: the local control socket the CLI uses while the daemon runs.
//! - [`tls`]: certificate verification for Proxmox and the hub, and TLS failures explained.
//! - [`timestamp`]: the RFC 3339 point in time every wire format shares.
//!
//! Must never: run as root by design, spawn a process (a test greps the sources), or put
//! a secret (API token, hub token) into a log line, an error or `Debug` output.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod control;
mod error_chain;
pub mod hub;
pub mod ops;
pub mod privileged;
pub mod proxmox;
pub mod reconcile;
pub mod restore;
pub mod sensors;
pub mod timestamp;
pub mod tls;
