//! The workspace's own binaries for tests, benchmarks and the local stack: where they are
//! (next to the running executable, in `target/<profile>/`), whether they are older than
//! their sources, and one nested `cargo build` that brings the stale or missing ones up to
//! date.
//!
//! Owns: the source list per package (what a binary is built from), the staleness check,
//! and the one place that runs cargo for another package's binary. `cargo run`/`cargo
//! test` set `$CARGO`; without it `cargo` from `PATH` is used.
//!
//! Must never: build into another target directory or profile than the running
//! executable's (the binaries would not be found next to it), or build when
//! `FELHOM_TESTBED_NO_BUILD` is set (then what is there is used as is).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot tell where this executable is: {0}")]
    CurrentExe(#[source] std::io::Error),
    #[error("running `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status})")]
    Failed { command: String, status: String },
    #[error(
        "{} missing{}",
        missing.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        if *no_build { " (FELHOM_TESTBED_NO_BUILD is set, nothing was built)" } else { " after the build" }
    )]
    Missing {
        missing: Vec<PathBuf>,
        no_build: bool,
    },
    #[error(
        "package {0} is not one of this workspace's (felhom-agent, felhom-privhelper, felhom-testbed, felhom-sign)"
    )]
    UnknownPackage(String),
}

/// One binary of the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bin {
    pub package: &'static str,
    pub name: &'static str,
}

pub const AGENT: Bin = Bin {
    package: "felhom-agent",
    name: "felhom-agent",
};
pub const PRIVHELPER: Bin = Bin {
    package: "felhom-privhelper",
    name: "felhom-privhelper",
};
pub const PVESIM: Bin = Bin {
    package: "felhom-testbed",
    name: "felhom-pvesim",
};
pub const HUBSIM: Bin = Bin {
    package: "felhom-testbed",
    name: "felhom-hubsim",
};
pub const FAKE_SMARTCTL: Bin = Bin {
    package: "felhom-testbed",
    name: "felhom-fake-smartctl",
};
/// The operators' signing tool (not in the host package; the test bed signs with it).
pub const SIGN: Bin = Bin {
    package: "felhom-sign",
    name: "felhom-sign",
};
pub const FAKE_PCT: Bin = Bin {
    package: "felhom-testbed",
    name: "felhom-fake-pct",
};

/// The workspace root this test bed was compiled from.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `target/<profile>/` of the running executable (a test or bench binary sits one level
/// deeper, in `deps/`).
pub fn profile_dir() -> Result<PathBuf, BuildError> {
    let exe = std::env::current_exe().map_err(BuildError::CurrentExe)?;
    let mut dir = exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// What a package's binaries are built from (relative to the workspace root).
fn sources_of(package: &str) -> Result<&'static [&'static str], BuildError> {
    const COMMON: [&str; 4] = [
        "Cargo.toml",
        "Cargo.lock",
        "protocol/src",
        "protocol/Cargo.toml",
    ];
    Ok(match package {
        "felhom-agent" => &[
            "agent/src",
            "agent/Cargo.toml",
            "authz/src",
            "authz/Cargo.toml",
        ],
        "felhom-sign" => &[
            "sign/src",
            "sign/Cargo.toml",
            "authz/src",
            "authz/Cargo.toml",
        ],
        "felhom-privhelper" => &["privhelper/src", "privhelper/Cargo.toml"],
        "felhom-testbed" => &["tests/src", "tests/Cargo.toml"],
        "common" => &COMMON,
        other => return Err(BuildError::UnknownPackage(other.to_owned())),
    })
}

fn newest_under(p: &Path, newest: &mut Option<SystemTime>) {
    let Ok(md) = std::fs::metadata(p) else { return };
    if md.is_dir() {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                newest_under(&e.path(), newest);
            }
        }
    } else if let Ok(m) = md.modified() {
        *newest = Some(newest.map_or(m, |n| n.max(m)));
    }
}

/// The newest modification time among `package`'s sources (`None` when the sources are
/// not there, e.g. a binary copied away from its checkout).
pub fn newest_source(package: &str) -> Result<Option<SystemTime>, BuildError> {
    let root = workspace_root();
    let mut newest = None;
    for rel in sources_of("common")?.iter().chain(sources_of(package)?) {
        newest_under(&root.join(rel), &mut newest);
    }
    Ok(newest)
}

/// Missing, or older than its sources.
pub fn is_stale(dir: &Path, bin: Bin) -> Result<bool, BuildError> {
    let built = match std::fs::metadata(dir.join(bin.name)).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(_) => return Ok(true),
    };
    Ok(newest_source(bin.package)?.is_some_and(|src| src > built))
}

/// Whether `name` is one of the variables `cargo run`/`cargo test` set for the process
/// they start, describing *its* package (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, …).
/// A nested cargo must not inherit them: build scripts track some of them (ring's
/// `CARGO_MANIFEST_DIR`), so they would look changed and everything above them would be
/// rebuilt. Cargo's own configuration variables (`CARGO_HOME`, `CARGO_TARGET_DIR`, …)
/// are kept.
pub fn is_package_env(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
        )
}

/// The `cargo build` that (re)builds `bins` into `dir`'s target directory and profile.
pub fn build_command(dir: &Path, bins: &[Bin], quiet: bool) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_package_env) {
            cmd.env_remove(name);
        }
    }
    cmd.current_dir(workspace_root()).arg("build");
    if quiet {
        cmd.arg("--quiet");
    }
    let mut packages: Vec<&str> = bins.iter().map(|b| b.package).collect();
    packages.sort_unstable();
    packages.dedup();
    for p in packages {
        cmd.args(["-p", p]);
    }
    for b in bins {
        cmd.args(["--bin", b.name]);
    }
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    if let Some(target) = dir.parent() {
        cmd.arg("--target-dir").arg(target);
    }
    cmd
}

/// Makes sure every one of `bins` exists in `dir` and is not older than its sources,
/// running one `cargo build` for the stale ones (its output goes to our stderr; cargo's
/// progress too unless `quiet`). Returns the binaries that were stale.
pub fn ensure(dir: &Path, bins: &[Bin], quiet: bool) -> Result<Vec<Bin>, BuildError> {
    let mut stale = Vec::new();
    for b in bins {
        if is_stale(dir, *b)? {
            stale.push(*b);
        }
    }
    let no_build = std::env::var_os("FELHOM_TESTBED_NO_BUILD").is_some();
    if !stale.is_empty() && !no_build {
        let mut cmd = build_command(dir, &stale, quiet);
        let command = format!("{cmd:?}");
        let status = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .map_err(|source| BuildError::Spawn {
                command: command.clone(),
                source,
            })?;
        if !status.success() {
            return Err(BuildError::Failed {
                command,
                status: status.to_string(),
            });
        }
    }
    let missing: Vec<PathBuf> = bins
        .iter()
        .map(|b| dir.join(b.name))
        .filter(|p| !p.exists())
        .collect();
    if !missing.is_empty() {
        return Err(BuildError::Missing { missing, no_build });
    }
    Ok(stale)
}

/// One binary, built if needed; panics with the reason (for tests and benchmarks).
pub fn bin_for_tests(bin: Bin) -> PathBuf {
    let dir = profile_dir().unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = ensure(&dir, &[bin], true) {
        panic!("{}: {e}", bin.name);
    }
    dir.join(bin.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_command_keeps_the_profile_and_target_dir() {
        let cmd = build_command(Path::new("/x/target/release"), &[AGENT, PRIVHELPER], true);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "build",
                "--quiet",
                "-p",
                "felhom-agent",
                "-p",
                "felhom-privhelper",
                "--bin",
                "felhom-agent",
                "--bin",
                "felhom-privhelper",
                "--release",
                "--target-dir",
                "/x/target"
            ]
        );
        let cmd = build_command(Path::new("/x/target/debug"), &[PVESIM, HUBSIM], false);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "build",
                "-p",
                "felhom-testbed",
                "--bin",
                "felhom-pvesim",
                "--bin",
                "felhom-hubsim",
                "--target-dir",
                "/x/target"
            ]
        );
    }

    #[test]
    fn the_running_packages_variables_are_not_passed_to_the_nested_cargo() {
        for v in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_CRATE_NAME",
        ] {
            assert!(is_package_env(v), "{v}");
        }
        for v in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "PATH",
        ] {
            assert!(!is_package_env(v), "{v}");
        }
        // under `cargo test` this process has CARGO_MANIFEST_DIR; the command drops it
        if std::env::var_os("CARGO_MANIFEST_DIR").is_some() {
            let cmd = build_command(Path::new("/x/target/debug"), &[AGENT], true);
            assert!(
                cmd.get_envs()
                    .any(|(k, v)| k == "CARGO_MANIFEST_DIR" && v.is_none())
            );
        }
    }

    #[test]
    fn a_missing_binary_is_stale_and_a_fresh_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        assert!(is_stale(dir.path(), AGENT).unwrap());
        // newer than every source: a file written now (sources are older than this test)
        std::fs::write(dir.path().join("felhom-agent"), b"").unwrap();
        assert!(!is_stale(dir.path(), AGENT).unwrap());
        // the sources are there, so the check has something to compare against
        assert!(newest_source("felhom-agent").unwrap().is_some());
        assert!(matches!(
            newest_source("nope"),
            Err(BuildError::UnknownPackage(_))
        ));
    }
}
