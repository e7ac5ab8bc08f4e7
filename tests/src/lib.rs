//! # felhom-testbed
//!
//! The product's test bed: `felhom-pvesim` (a faithful Proxmox VE node), `felhom-hubsim`
//! (the hub), and `felhom-devstack` (the whole stack on loopback, narrated). Integration
//! tests in `tests/tests/` drive the real binaries as separate processes over real
//! sockets.
//!
//! Modules: [`tls`] (a throw-away CA and server certificate), [`http`] (the HTTPS server
//! plumbing with custom reason phrases and dropped connections), [`pvesim`] (the PVE
//! simulator), [`hubsim`] (the hub simulator and a cloudflared `/ready` stand-in) and
//! [`harness`] (starting a simulator binary from a test and driving its control API).
//! - [`hwmon`]: a sample hwmon tree from a `sensors -j` fixture.
//! - [`privhelper`]: environments, socket activation, a raw client and throw-away users
//!   for the root helper's tests; the fake tools are the binaries `felhom-fake-pct` and
//!   `felhom-fake-smartctl`.
//! - [`build`]: the workspace's binaries next to the running executable, built when
//!   missing or older than their sources.
//! - [`devstack`]: the local stack behind `felhom-devstack`.
//! - [`opsbed`]: hubsim and an agent installation for signed operations (the agent as
//!   uid 65534 with a root-owned `signers.json`), for benchmarks.
//! - [`signing`]: throw-away operator keys, `signers.json`, and signed (and hostile)
//!   operation and desired-state envelopes for the signed-operations tests.

pub mod build;
pub mod devstack;
pub mod harness;
pub mod http;
pub mod hubsim;
pub mod hwmon;
pub mod opsbed;
pub mod privhelper;
pub mod pvesim;
pub mod signing;
pub mod tls;
