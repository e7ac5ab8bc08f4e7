//! The per-guest permit: proof that code runs inside the queue's lane for one vmid.
//!
//! Every mutating method of the Proxmox client takes a `&GuestPermit` and acts on the
//! permit's vmid, so a mutation cannot be issued outside the queue, nor on a guest other
//! than the one whose lane is running.
//!
//! Must never: be `Clone`, `Copy`, or constructible outside the queue. [`GuestPermit::mint`]
//! needs a [`MintKey`](super::queue::MintKey), whose only constructor is private to
//! [`queue`](super::queue); the queue hands operations a `&GuestPermit` whose borrow ends
//! with the operation, so a permit cannot outlive its lane slot either.
//!
//! ```compile_fail
//! // Outside the crate there is no way to build a permit:
//! let vmid = felhom_protocol::Vmid::new(101).unwrap();
//! let _p = felhom_agent::reconcile::GuestPermit::mint(vmid);
//! ```

use felhom_protocol::Vmid;

use super::queue::MintKey;

/// Held by the one operation currently running in the lane for [`GuestPermit::vmid`].
#[derive(Debug)]
pub struct GuestPermit {
    vmid: Vmid,
}

impl GuestPermit {
    /// Only the queue mints permits: the key can only be made inside `reconcile::queue`.
    pub(in crate::reconcile) fn mint(vmid: Vmid, _key: MintKey) -> Self {
        GuestPermit { vmid }
    }

    pub fn vmid(&self) -> Vmid {
        self.vmid
    }
}
