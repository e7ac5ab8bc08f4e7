//! # felhom-testbed
//!
//! The product's test bed: `felhom-pvesim` (a faithful Proxmox VE node), `felhom-hubsim`
//! (the hub), and later `felhom-devstack`. Integration tests in `tests/tests/` drive the
//! real binaries as separate processes over real sockets.
//!
//! - [`hwmon`]: a sample hwmon tree from a `sensors -j` fixture.
//! - [`privhelper`]: environments, socket activation, a raw client and throw-away users
//!   for the root helper's tests; the fake tools are the binaries `felhom-fake-pct` and
//!   `felhom-fake-smartctl`.

pub mod hwmon;
pub mod privhelper;

pub mod hubsim;
