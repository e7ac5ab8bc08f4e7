//! The Debian package built by `packaging/build-deb`: every file with its owner and mode,
//! the control fields, conffiles and maintainer scripts, that the packaged files are the
//! tree's, and lintian.
//!
//! Needs the .deb: `.ci/run` builds it and sets `FELHOM_DEB` to its path. Without that
//! variable every test here prints SKIP and passes; run them by hand with
//! `packaging/build-deb && FELHOM_DEB=target/debian/felhom-agent_<v>_amd64.deb \
//!  cargo test -p felhom-testbed --test deb_package`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The package under test, or `None` (after saying SKIP) when `FELHOM_DEB` is unset.
fn deb() -> Option<PathBuf> {
    match std::env::var_os("FELHOM_DEB") {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "FELHOM_DEB={} does not exist (packaging/build-deb)",
                p.display()
            );
            Some(p)
        }
        None => {
            eprintln!(
                "SKIP: FELHOM_DEB is not set (.ci/run builds the .deb with packaging/build-deb and sets it)"
            );
            None
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("UTF-8 output")
}

/// The package's files, extracted (`dpkg-deb -x`) into a temporary directory.
fn extracted(deb: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir.path()));
    dir
}

/// Every entry of the archive and its `mode owner/group`, exactly.
const CONTENTS: &[(&str, &str)] = &[
    ("./", "drwxr-xr-x root/root"),
    ("./etc/", "drwxr-xr-x root/root"),
    ("./etc/felhom/", "drwxr-xr-x root/root"),
    // The group felhom-agent is set by postinst (dpkg-statoverride): it may hold secrets.
    ("./etc/felhom/agent.json", "-rw-r----- root/root"),
    ("./etc/felhom/privhelper.json", "-rw-r--r-- root/root"),
    ("./lib/", "drwxr-xr-x root/root"),
    ("./lib/systemd/", "drwxr-xr-x root/root"),
    ("./lib/systemd/system/", "drwxr-xr-x root/root"),
    (
        "./lib/systemd/system/felhom-agent.service",
        "-rw-r--r-- root/root",
    ),
    (
        "./lib/systemd/system/felhom-privhelper-pct.service",
        "-rw-r--r-- root/root",
    ),
    (
        "./lib/systemd/system/felhom-privhelper-pct.socket",
        "-rw-r--r-- root/root",
    ),
    (
        "./lib/systemd/system/felhom-privhelper-smart.service",
        "-rw-r--r-- root/root",
    ),
    (
        "./lib/systemd/system/felhom-privhelper-smart.socket",
        "-rw-r--r-- root/root",
    ),
    (
        "./lib/systemd/system/felhom-privhelper-usb.service",
        "-rw-r--r-- root/root",
    ),
    (
        "./lib/systemd/system/felhom-privhelper-usb.socket",
        "-rw-r--r-- root/root",
    ),
    ("./usr/", "drwxr-xr-x root/root"),
    ("./usr/bin/", "drwxr-xr-x root/root"),
    ("./usr/bin/felhom-agent", "-rwxr-xr-x root/root"),
    ("./usr/lib/", "drwxr-xr-x root/root"),
    ("./usr/lib/sysusers.d/", "drwxr-xr-x root/root"),
    (
        "./usr/lib/sysusers.d/felhom-agent.conf",
        "-rw-r--r-- root/root",
    ),
    ("./usr/lib/tmpfiles.d/", "drwxr-xr-x root/root"),
    (
        "./usr/lib/tmpfiles.d/felhom-agent.conf",
        "-rw-r--r-- root/root",
    ),
    ("./usr/libexec/", "drwxr-xr-x root/root"),
    ("./usr/libexec/felhom/", "drwxr-xr-x root/root"),
    (
        "./usr/libexec/felhom/felhom-privhelper",
        "-rwxr-xr-x root/root",
    ),
    ("./usr/share/", "drwxr-xr-x root/root"),
    ("./usr/share/doc/", "drwxr-xr-x root/root"),
    ("./usr/share/doc/felhom-agent/", "drwxr-xr-x root/root"),
    (
        "./usr/share/doc/felhom-agent/README.md",
        "-rw-r--r-- root/root",
    ),
    (
        "./usr/share/doc/felhom-agent/changelog.gz",
        "-rw-r--r-- root/root",
    ),
    (
        "./usr/share/doc/felhom-agent/copyright",
        "-rw-r--r-- root/root",
    ),
    (
        "./usr/share/doc/felhom-agent/hub-contract.md",
        "-rw-r--r-- root/root",
    ),
    (
        "./usr/share/doc/felhom-agent/privhelper.md",
        "-rw-r--r-- root/root",
    ),
    ("./usr/share/lintian/", "drwxr-xr-x root/root"),
    ("./usr/share/lintian/overrides/", "drwxr-xr-x root/root"),
    (
        "./usr/share/lintian/overrides/felhom-agent",
        "-rw-r--r-- root/root",
    ),
    ("./usr/share/man/", "drwxr-xr-x root/root"),
    ("./usr/share/man/man1/", "drwxr-xr-x root/root"),
    (
        "./usr/share/man/man1/felhom-agent.1.gz",
        "-rw-r--r-- root/root",
    ),
    ("./usr/share/man/man8/", "drwxr-xr-x root/root"),
    (
        "./usr/share/man/man8/felhom-privhelper.8.gz",
        "-rw-r--r-- root/root",
    ),
];

#[test]
fn every_file_with_its_owner_and_mode() {
    let Some(deb) = deb() else { return };
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let mut seen = BTreeMap::new();
    for line in listing.lines() {
        // drwxr-xr-x root/root 0 2026-11-25 12:00 ./etc/
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() == 6, "unexpected dpkg-deb -c line: {line}");
        seen.insert(f[5].to_string(), format!("{} {}", f[0], f[1]));
    }
    let expected: BTreeMap<String, String> = CONTENTS
        .iter()
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect();
    for (path, mode) in &expected {
        assert_eq!(
            seen.get(path),
            Some(mode),
            "{path}: expected {mode}, the package has {:?}",
            seen.get(path)
        );
    }
    let extra: Vec<&String> = seen.keys().filter(|p| !expected.contains_key(*p)).collect();
    assert!(
        extra.is_empty(),
        "files not in the expected list: {extra:?}"
    );
}

#[test]
fn control_fields_conffiles_and_maintainer_scripts() {
    let Some(deb) = deb() else { return };
    let field = |name: &str| {
        stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name))
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "felhom-agent");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(field("Architecture"), "amd64");
    assert_eq!(field("Section"), "admin");
    assert_eq!(field("Priority"), "optional");
    let depends = field("Depends");
    for d in ["libc6 (>= ", "systemd"] {
        assert!(depends.contains(d), "Depends lacks {d}: {depends}");
    }
    assert_eq!(field("Recommends"), "smartmontools");
    assert!(field("Maintainer").contains('@'));
    assert!(field("Description").starts_with("Proxmox VE host agent"));
    let size: u64 = field("Installed-Size").parse().expect("Installed-Size");
    assert!(size > 1000, "Installed-Size {size} KiB is implausible");

    let ctl = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(ctl.path()));
    let mut names: Vec<String> = std::fs::read_dir(ctl.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "conffiles",
            "control",
            "md5sums",
            "postinst",
            "postrm",
            "prerm"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(ctl.path().join("conffiles")).unwrap(),
        "/etc/felhom/agent.json\n/etc/felhom/privhelper.json\n"
    );
    for s in ["postinst", "prerm", "postrm"] {
        let p = ctl.path().join(s);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{s} mode {mode:o}");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("#!/bin/sh\n"), "{s}: not a /bin/sh script");
        assert!(text.contains("\nset -e\n"), "{s}: no set -e");
        run(Command::new("sh").arg("-n").arg(&p));
        // Nothing but daemon-reload goes to systemctl directly (deb-systemd-invoke
        // respects policy-rc.d and an operator's disable).
        for line in text.lines().filter(|l| l.contains("systemctl ")) {
            let l = line.trim_start();
            assert!(
                l.starts_with('#') || l.starts_with("echo") || l.contains("daemon-reload"),
                "{s}: systemctl called directly: {line}"
            );
        }
    }
    let postinst = std::fs::read_to_string(ctl.path().join("postinst")).unwrap();
    // The agent is enabled but, on a fresh install, never started.
    assert!(postinst.contains("deb-systemd-invoke start $SOCKETS"));
    assert!(!postinst.contains("deb-systemd-invoke start \"$AGENT\""));
    assert!(postinst.contains("try-restart \"$AGENT\""));
    let postrm = std::fs::read_to_string(ctl.path().join("postrm")).unwrap();
    assert!(postrm.contains("FELHOM_PURGE_STATE"));
    assert!(
        !postrm.contains("rm -rf /var/log"),
        "postrm must never remove the audit log"
    );

    // md5sums covers every regular file except the conffiles, and matches.
    let files = extracted(&deb);
    let sums = std::fs::read_to_string(ctl.path().join("md5sums")).unwrap();
    assert!(
        !sums.contains("etc/felhom"),
        "conffiles belong in conffiles"
    );
    assert!(sums.contains("usr/bin/felhom-agent"));
    let check = Command::new("md5sum")
        .arg("--check")
        .arg("--quiet")
        .arg(ctl.path().join("md5sums"))
        .current_dir(files.path())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "md5sums do not match: {}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn packaged_files_are_the_trees() {
    let Some(deb) = deb() else { return };
    let files = extracted(&deb);
    let root = files.path();
    let same = |packaged: &str, tree: &str| {
        let a = std::fs::read(root.join(packaged)).unwrap();
        let b = std::fs::read(repo().join(tree)).unwrap();
        assert!(a == b, "{packaged} differs from {tree} (stale package?)");
    };
    for e in std::fs::read_dir(repo().join("systemd")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".service") || name.ends_with(".socket") {
            same(
                &format!("lib/systemd/system/{name}"),
                &format!("systemd/{name}"),
            );
        }
    }
    same(
        "usr/lib/sysusers.d/felhom-agent.conf",
        "systemd/felhom.sysusers",
    );
    same(
        "usr/lib/tmpfiles.d/felhom-agent.conf",
        "systemd/felhom.tmpfiles",
    );
    same("etc/felhom/agent.json", "packaging/etc/agent.json");
    same(
        "etc/felhom/privhelper.json",
        "packaging/etc/privhelper.json",
    );
    same("usr/share/doc/felhom-agent/README.md", "README.md");
    same(
        "usr/share/doc/felhom-agent/privhelper.md",
        "docs/privhelper.md",
    );
    // The units' ExecStart= names the packaged binaries.
    for unit in std::fs::read_dir(root.join("lib/systemd/system")).unwrap() {
        let text = std::fs::read_to_string(unit.unwrap().path()).unwrap();
        for l in text.lines().filter(|l| l.starts_with("ExecStart=")) {
            let bin = l["ExecStart=".len()..].split_whitespace().next().unwrap();
            assert!(
                root.join(bin.trim_start_matches('/')).is_file(),
                "{l}: not in the package"
            );
        }
    }
    // The binaries run and are this version; they are stripped.
    let v = stdout(Command::new(root.join("usr/bin/felhom-agent")).arg("--version"));
    assert_eq!(
        v.trim(),
        format!("felhom-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(root.join("usr/libexec/felhom/felhom-privhelper"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    for bin in [
        "usr/bin/felhom-agent",
        "usr/libexec/felhom/felhom-privhelper",
    ] {
        let syms = Command::new("readelf")
            .args(["-S", "-W"])
            .arg(root.join(bin))
            .output();
        if let Ok(o) = syms {
            let t = String::from_utf8_lossy(&o.stdout);
            assert!(!t.contains(".symtab"), "{bin} is not stripped");
        }
    }
    // Every command of the CLI is in its manual page.
    let man = stdout(Command::new("zcat").arg(root.join("usr/share/man/man1/felhom-agent.1.gz")));
    let help = stdout(Command::new(root.join("usr/bin/felhom-agent")).arg("--help"));
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 8, "{help}");
    for c in commands {
        assert!(
            man.contains(&format!(".B {c}")),
            "the manual page does not describe `{c}`"
        );
    }
}

#[test]
fn the_example_config_is_refused_until_it_is_filled_in() {
    let Some(deb) = deb() else { return };
    let files = extracted(&deb);
    let check = |secret: Option<&str>| {
        let mut cmd = Command::new(files.path().join("usr/bin/felhom-agent"));
        cmd.arg("--config")
            .arg(files.path().join("etc/felhom/agent.json"))
            .args(["config", "check"])
            .env_clear();
        if let Some(s) = secret {
            cmd.env("FELHOM_AGENT_PROXMOX_TOKEN_SECRET", s);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // No secret yet: that is named first; with one, the placeholder pin is refused.
    let (code, err) = check(None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("proxmox.token_secret is not set"), "{err}");
    let (code, err) = check(Some("00000000-0000-0000-0000-000000000000"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("proxmox.tls.pin_sha256"), "{err}");
    let helper: serde_json::Value = serde_json::from_slice(
        &std::fs::read(files.path().join("etc/felhom/privhelper.json")).unwrap(),
    )
    .expect("privhelper.json is JSON");
    assert_eq!(helper["agent_user"], "felhom-agent");
    assert_eq!(
        helper["audit_log"],
        "/var/log/felhom/privhelper-audit.jsonl"
    );
}

#[test]
fn lintian_reports_no_errors_or_warnings() {
    let Some(deb) = deb() else { return };
    if Command::new("lintian").arg("--version").output().is_err() {
        eprintln!("SKIP: lintian is not installed (.ci/run installs it)");
        return;
    }
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--display-info", "--pedantic"])
        .arg(&deb)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("lintian:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "lintian failed:\n{text}");
    for l in text.lines() {
        assert!(
            !l.starts_with("E: ") && !l.starts_with("W: "),
            "lintian: {l}"
        );
    }
}
