//! # felhom-testbed
//!
//! The product's test bed: `felhom-pvesim` (a faithful Proxmox VE node), `felhom-hubsim`
//! (the hub), and later `felhom-devstack`. Integration tests in `tests/tests/` drive the
//! real binaries as separate processes over real sockets.
//!
//! Modules: [`tls`] (a throw-away CA and server certificate), [`http`] (the HTTPS server
//! plumbing with custom reason phrases and dropped connections), [`pvesim`] (the PVE
//! simulator) and [`harness`] (starting a simulator binary from a test and driving its
//! control API).

pub mod harness;
pub mod http;
pub mod pvesim;
pub mod tls;
