//! The per-guest permit: proof that code runs inside the queue's lane for one vmid.
//!
//! Every mutating method of the Proxmox client takes a `&GuestPermit` and acts on the
//! permit's vmid, so a mutation cannot be issued outside the queue, nor on a guest other
//! than the one whose lane is running. Must never: be `Clone`, `Copy`, or constructible
//! outside the queue (the constructor's visibility narrows to the queue module once the
//! queue lands; until then it is crate-private).

use felhom_protocol::Vmid;

/// Held by the one operation currently running in the lane for [`GuestPermit::vmid`].
#[derive(Debug)]
pub struct GuestPermit {
    vmid: Vmid,
}

impl GuestPermit {
    /// Only the queue mints permits.
    #[allow(dead_code)] // first callers: the task selftest (issue 2) and the queue (issue 5)
    pub(crate) fn mint(vmid: Vmid) -> Self {
        GuestPermit { vmid }
    }

    pub fn vmid(&self) -> Vmid {
        self.vmid
    }
}
