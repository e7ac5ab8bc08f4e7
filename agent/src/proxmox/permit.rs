//! The per-guest permit: proof that code runs inside the reconcile queue's lane for one
//! vmid. It lives here, beside the client whose mutating methods demand it, so the client
//! stays a leaf that depends on nothing of reconcile; the queue mints permits and hands
//! them to its operations.
//!
//! Every mutating method of the Proxmox client takes a `&GuestPermit` and acts on the
//! permit's vmid, so a mutation cannot be issued outside the queue, nor on a guest other
//! than the one whose lane is running.
//!
//! Must never: be `Clone`, `Copy`, or constructible outside the crate; inside the crate,
//! only `reconcile::queue` calls [`GuestPermit::mint`] (the queue hands operations a
//! `&GuestPermit` whose borrow ends with the operation, so a permit cannot outlive its
//! lane slot either). Rust cannot name a sibling module in a visibility, so the second
//! rule is held by a test that reads the crate's sources for calls of `mint`
//! (`only_the_queue_mints`).
//!
//! ```compile_fail
//! // Outside the crate there is no way to build a permit:
//! let vmid = felhom_protocol::Vmid::new(101).unwrap();
//! let _p = felhom_agent::proxmox::GuestPermit::mint(vmid);
//! ```

use felhom_protocol::Vmid;

/// Held by the one operation currently running in the lane for [`GuestPermit::vmid`].
#[derive(Debug)]
pub struct GuestPermit {
    vmid: Vmid,
}

impl GuestPermit {
    /// Only the reconcile queue calls this, when an operation gets its lane.
    pub(crate) fn mint(vmid: Vmid) -> Self {
        GuestPermit { vmid }
    }

    pub fn vmid(&self) -> Vmid {
        self.vmid
    }

    /// Unit tests of the client's mutating methods need a permit without a queue. Test
    /// builds only: production code cannot call this.
    #[cfg(test)]
    pub(crate) fn for_test(vmid: Vmid) -> Self {
        GuestPermit { vmid }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read the crate's sources") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The visibility of `mint` is the crate; the rule is narrower: only the queue mints.
    #[test]
    fn only_the_queue_mints() {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut minting: Vec<String> = files
            .iter()
            .filter(|f| {
                std::fs::read_to_string(f)
                    .expect("read a source file")
                    .contains(concat!("::", "mint("))
            })
            .map(|f| {
                f.strip_prefix(&src)
                    .unwrap_or(f)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        minting.sort();
        assert_eq!(
            minting,
            ["proxmox/permit.rs", "reconcile/queue.rs"],
            "only reconcile::queue may mint guest permits (this file names it in its docs)"
        );
    }
}
