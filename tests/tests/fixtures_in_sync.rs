//! The vendored fixtures must equal the team's shared reference whenever it is present
//! (`../shared` next to the repository), so tests never drift from the real captures.

use std::fs;
use std::path::{Path, PathBuf};

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read fixture dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(root).expect("under root").to_path_buf());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn vendored_fixtures_equal_shared_reference() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let shared = repo.join("../shared");
    if !shared.is_dir() {
        eprintln!("SKIPPED: ../shared is not present next to the repository; nothing to compare");
        return;
    }
    for (vendored, reference) in [
        ("tests/fixtures/pve", "pve/fixtures"),
        ("tests/fixtures/hosttools", "hosttools/fixtures"),
    ] {
        let ours = repo.join(vendored);
        let theirs = shared.join(reference);
        assert_eq!(
            files_under(&ours),
            files_under(&theirs),
            "file lists differ: {vendored}"
        );
        for rel in files_under(&theirs) {
            assert_eq!(
                fs::read(ours.join(&rel)).expect("read vendored"),
                fs::read(theirs.join(&rel)).expect("read shared"),
                "{vendored}/{} differs from the shared reference",
                rel.display()
            );
        }
    }
}
