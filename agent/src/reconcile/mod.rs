//! Reconcile core: per-guest queue, desired state, normalization, plan, engine, journal,
//! and the status the hub report embeds ([`status`]). (Issue 5.)
//!
//! Layering: reconcile builds on the Proxmox client ([`crate::proxmox`]), never the other
//! way round; the hub report embeds reconcile's status types, reconcile takes nothing from
//! the hub.
//!
//! Every mutation of a guest, whatever its source, goes through [`queue::Queue`]: only a
//! running queue operation holds the [`GuestPermit`] the mutating Proxmox methods demand.

pub mod desired;
pub mod engine;
pub mod exec;
pub mod journal;
pub mod normalize;
pub mod plan;
pub mod pve;
pub mod queue;
pub mod status;

#[cfg(test)]
pub(crate) mod fakenode;
#[cfg(test)]
mod testmodel;

/// The permit is the client's type ([`crate::proxmox::permit`]); only [`queue`] mints it.
pub use crate::proxmox::GuestPermit;
pub use engine::{Engine, EngineHandle, EngineStatus, Gate};
pub use queue::{OpFuture, OpHandle, Queue, QueueConfig, QueueError, QueueStats};

#[cfg(test)]
mod layering {
    use std::path::{Path, PathBuf};

    /// Production sources under `dir` (test-only files, `tests.rs` and `*_tests.rs`, left
    /// out), each with its code lines (comment lines left out).
    fn code(dir: &Path) -> Vec<(PathBuf, Vec<String>)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).expect("read the crate's sources") {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                out.extend(code(&path));
            } else if name.ends_with(".rs") && name != "tests.rs" && !name.ends_with("_tests.rs") {
                let lines = std::fs::read_to_string(&path)
                    .expect("read a source file")
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .map(str::to_string)
                    .collect();
                out.push((path, lines));
            }
        }
        out
    }

    fn names(line: &str, module: &str) -> bool {
        line.contains(&format!("crate::{module}"))
            || (line.contains("crate::{") && line.contains(module))
    }

    /// The Proxmox client is a leaf that reconcile builds on; the hub report embeds
    /// reconcile's status, never the other way round.
    #[test]
    fn dependencies_point_one_way() {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut wrong = Vec::new();
        for (dir, forbidden) in [
            ("proxmox", &["reconcile", "hub"][..]),
            ("reconcile", &["hub"][..]),
        ] {
            for (file, lines) in code(&src.join(dir)) {
                for line in lines {
                    if forbidden.iter().any(|m| names(&line, m)) {
                        wrong.push(format!("{}: {}", file.display(), line.trim()));
                    }
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "dependencies against the layering:\n{}",
            wrong.join("\n")
        );
    }
}
