//! # felhom-protocol
//!
//! Background: the agent runs unprivileged; the few operations the Proxmox API cannot do
//! cross an OS process boundary into `felhom-privhelper`, a small root program. This crate
//! is the only thing both sides share.
//!
//! Design: it owns the frame format ([`wire`]), the request/response enums, the closed
//! set of [`Operation`]s and their [`Class`]es, and the validated value types ([`values`]:
//! parse, don't validate — an invalid vmid, hostname or device name cannot be
//! constructed, and decoding re-runs the same constructors).
//!
//! Limitations / must never: this crate does no I/O, spawns nothing and holds no secrets.

#![forbid(unsafe_code)]

pub mod values;
pub mod wire;

pub use values::*;
pub use wire::*;
