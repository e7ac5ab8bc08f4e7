//! # felhom-testbed
//!
//! The product's test bed: `felhom-pvesim` (a faithful Proxmox VE node), `felhom-hubsim`
//! (the hub), and later `felhom-devstack`. Integration tests in `tests/tests/` drive the
//! real binaries as separate processes over real sockets.
