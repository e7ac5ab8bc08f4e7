//! Typed Proxmox VE REST client.
//!
//! Background: the agent talks to the local PVE API (`https://HOST:8006/api2/json`) with
//! an API token (`Authorization: PVEAPIToken=<id>=<secret>`). Reads are synchronous; most
//! mutations fork a worker and return its task id ([`Upid`]), which [`Client::wait_task`]
//! polls until it stops.
//!
//! Design:
//! - [`Client`] holds one reqwest client (connection reuse), rustls with the ring provider,
//!   and exactly one verification mode ([`crate::config::TlsVerify`]): a SHA-256 pin of the
//!   leaf certificate, a CA file, or the explicit `insecure` (warned at every start).
//!   Proxies from the environment are ignored.
//! - Answers are typed to match real PVE JSON ([`types`]): numbers sent as strings, 0/1
//!   booleans, absent-means-default, unknown fields ignored. Guest config is kept raw with
//!   typed accessors.
//! - Every mutating method takes a [`GuestPermit`] and acts on its vmid. The permit is
//!   defined here and minted only by the reconcile queue ([`permit`]), so the client
//!   depends on nothing of reconcile.
//! - Errors ([`ProxmoxError`]) name the endpoint; a 403 (or a task failing on a permission
//!   check) names the ACL path and privilege(s) to grant. PVE's message comes from the
//!   body's `message` (PVE ≥ 8.4) or the HTTP reason phrase (older PVE).
//!
//! Must never: put the token or the Authorization header into an error, log line or
//! `Debug` output; switch off certificate verification unless the config says `insecure`;
//! mutate a guest without a permit for it.

mod client;
mod de;
mod error;
mod mutate;
pub mod permit;
mod task;
mod tls;
pub mod types;
mod upid;

pub use client::{Client, DEFAULT_REQUEST_TIMEOUT};
pub use error::{PermissionDenied, ProxmoxError};
pub use mutate::{
    ConfigChange, ConfigValue, QemuRestoreOptions, RestoreOptions, SetConfigOutcome, SnapshotName,
    VzdumpCompress, VzdumpMode, VzdumpOptions, VzdumpOutcome,
};
pub use permit::GuestPermit;
pub use task::{TaskDone, WaitOptions};
pub use tls::{PinMismatch, fingerprint};
pub use types::{
    BackupItem, BackupVerification, GuestConfig, GuestKind, GuestListItem, GuestStatus, HaStatus,
    KernelInfo, NodeListItem, NodeStatus, RunState, SnapshotItem, StorageItem, TaskListFilter,
    TaskListItem, TaskOutcome, TaskSource, TaskState, TaskStatus, Version,
};
pub use upid::{Upid, UpidError};

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod tls_tests;
