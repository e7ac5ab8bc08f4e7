//! The systemd units: `systemd-analyze verify` (with stand-in binaries, as systemd is
//! not PID 1 here and verify needs ExecStart= to exist) and `systemd-analyze security
//! --offline=true --threshold=N` at the exposure limits, plus the contracts the
//! package and the helpers rely on (socket paths and modes, binaries, users, tmpfiles).
//!
//! Method for verify: copy every unit into a temporary directory, rewrite the two binary
//! paths to executable stand-ins in that directory, and verify the copies together (the
//! directory of the given files is on verify's unit path, so Requires=/Wants= resolve).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use felhom_testbed::privhelper::is_root;

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("systemd")
}

fn have_analyze() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

macro_rules! need_analyze {
    () => {
        if !have_analyze() {
            eprintln!("SKIP: systemd-analyze (package systemd) is not installed");
            return;
        }
    };
}

/// Where the helpers' sockets live: a directory only root can write, so the agent cannot
/// pre-empt a socket path (a directory or file it made there would stop the socket unit
/// from listening). The agent's own control socket stays in /run/felhom.
const HELPER_SOCKET_DIR: &str = "/run/felhom-privhelper";

const SERVICES: [(&str, u32); 4] = [
    // unit, threshold (0-100 scale; 15 = exposure 1.5)
    ("felhom-agent.service", 15),
    ("felhom-privhelper-smart.service", 20),
    ("felhom-privhelper-usb.service", 35),
    ("felhom-privhelper-pct.service", 70),
];

fn unit(name: &str) -> String {
    std::fs::read_to_string(systemd_dir().join(name)).unwrap()
}

/// Directive names set on non-comment lines.
fn directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('[') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

fn exposure(unit_path: &Path) -> String {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(unit_path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

#[test]
fn security_exposure_is_within_the_limits() {
    need_analyze!();
    for (name, threshold) in SERVICES {
        let path = systemd_dir().join(name);
        let st = Command::new("systemd-analyze")
            .args([
                "security",
                "--offline=true",
                &format!("--threshold={threshold}"),
            ])
            .arg(&path)
            .output()
            .unwrap();
        eprintln!("{}", exposure(&path));
        assert!(
            st.status.success(),
            "{name} is above {threshold}: {}",
            exposure(&path)
        );
    }
    // The gate can fail: a bare unit is far above any of these limits.
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("bare.service");
    std::fs::write(&bare, "[Service]\nExecStart=/bin/true\n").unwrap();
    let st = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=70"])
        .arg(&bare)
        .output()
        .unwrap();
    assert!(!st.status.success(), "a bare unit must fail the gate");
}

#[test]
fn units_verify_with_stand_in_binaries() {
    need_analyze!();
    let dir = tempfile::tempdir().unwrap();
    let standin = |name: &str| {
        let p = dir.path().join(name);
        std::fs::copy("/bin/true", &p).unwrap();
        p
    };
    let helper = standin("felhom-privhelper");
    let agent = standin("felhom-agent");
    let mut files = Vec::new();
    for e in std::fs::read_dir(systemd_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".service") || name.ends_with(".socket") {
            let text = std::fs::read_to_string(&p)
                .unwrap()
                .replace(
                    "/usr/libexec/felhom/felhom-privhelper",
                    &helper.to_string_lossy(),
                )
                .replace("/usr/bin/felhom-agent", &agent.to_string_lossy());
            let to = dir.path().join(&name);
            std::fs::write(&to, text).unwrap();
            files.push(to);
        }
    }
    assert_eq!(files.len(), 7, "agent service + 3 sockets + 3 services");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The check can fail: a missing ExecStart binary.
    std::fs::remove_file(&helper).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&files)
        .output()
        .unwrap();
    assert!(!out.status.success(), "verify must notice a missing binary");
}

#[test]
fn sockets_services_and_paths_match_the_contract() {
    for class in ["pct", "usb", "smart"] {
        let sock = directives(&unit(&format!("felhom-privhelper-{class}.socket")));
        let get = |d: &[(String, String)], k: &str| {
            d.iter()
                .filter(|(x, _)| x == k)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            get(&sock, "ListenStream"),
            [format!("{HELPER_SOCKET_DIR}/privhelper-{class}.sock")]
        );
        assert_eq!(get(&sock, "DirectoryMode"), ["0755"]);
        assert_eq!(get(&sock, "SocketMode"), ["0660"]);
        assert_eq!(get(&sock, "SocketUser"), ["root"]);
        assert_eq!(get(&sock, "SocketGroup"), ["felhom-agent"]);
        assert_eq!(get(&sock, "Accept"), ["no"]);
        let svc = directives(&unit(&format!("felhom-privhelper-{class}.service")));
        assert_eq!(
            get(&svc, "ExecStart"),
            [format!(
                "/usr/libexec/felhom/felhom-privhelper serve --class {class}"
            )]
        );
        assert_eq!(get(&svc, "User"), ["root"]);
        assert_eq!(
            get(&svc, "Restart"),
            ["no"],
            "idle exit is normal; systemd restarts via the socket"
        );
        assert!(
            get(&svc, "LogsDirectory").is_empty(),
            "LogsDirectory= would make /var/log/felhom 0700"
        );
    }
    let agent = directives(&unit("felhom-agent.service"));
    let has = |k: &str, v: &str| agent.iter().any(|(a, b)| a == k && b == v);
    assert!(has("ExecStart", "/usr/bin/felhom-agent run"));
    assert!(has("User", "felhom-agent"));
    assert!(has("ReadWritePaths", "/run/felhom"));
    assert!(has("StateDirectory", "felhom-agent"));
    assert!(
        !agent.iter().any(|(k, _)| k == "RuntimeDirectory"),
        "/run/felhom stays root's and sticky; see the unit's comment"
    );
    assert!(agent.iter().any(|(k, v)| k == "RestrictAddressFamilies"
        && v.contains("AF_UNIX")
        && v.contains("AF_INET")));

    // Every directive left out says why (a comment names it).
    for (name, left_out) in [
        (
            "felhom-privhelper-usb.service",
            vec![
                "ProtectSystem",
                "PrivateTmp",
                "PrivateDevices",
                "PrivateMounts",
                "ProtectKernelTunables",
                "PrivateUsers",
            ],
        ),
        (
            "felhom-privhelper-pct.service",
            vec![
                "RestrictSUIDSGID",
                "RestrictNamespaces",
                "PrivateUsers",
                "PrivateNetwork",
                "ProtectSystem",
                "KeyringMode",
            ],
        ),
        (
            "felhom-privhelper-smart.service",
            vec!["PrivateDevices", "PrivateUsers"],
        ),
        (
            "felhom-agent.service",
            vec!["PrivateNetwork", "RuntimeDirectory"],
        ),
    ] {
        let text = unit(name);
        let comments: String = text
            .lines()
            .filter(|l| l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        for d in left_out {
            assert!(
                comments.contains(d),
                "{name}: no comment says why {d} is left out"
            );
        }
    }

    let tmpfiles = std::fs::read_to_string(systemd_dir().join("felhom.tmpfiles")).unwrap();
    let entries: Vec<Vec<&str>> = tmpfiles
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(entries.contains(&vec!["d", HELPER_SOCKET_DIR, "0755", "root", "root", "-"]));
    assert!(entries.contains(&vec![
        "d",
        "/run/felhom",
        "1770",
        "root",
        "felhom-agent",
        "-"
    ]));
    assert!(entries.contains(&vec![
        "d",
        "/var/log/felhom",
        "2750",
        "root",
        "felhom-agent",
        "-"
    ]));
    let sysusers = std::fs::read_to_string(systemd_dir().join("felhom.sysusers")).unwrap();
    assert!(sysusers.lines().any(|l| l.starts_with("u felhom-agent ")));
}

/// Services that must mount in, or act on, the host's mount namespace: the usb helper
/// mounts the USB partition for the host; pct starts containers that must see the host's
/// mounts.
const HOST_MOUNTERS: [&str; 2] = [
    "felhom-privhelper-usb.service",
    "felhom-privhelper-pct.service",
];

/// Directives that give a service a mount namespace of its own whatever else is set
/// (systemd.exec(5); measured with systemd 252 as PID 1, PRIVSEP-NOTES §2). `MountFlags=`
/// is here with any value: `shared` does not restore propagation once a namespace exists.
const MOUNT_NAMESPACE: [&str; 26] = [
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateIPC",
    "IPCNamespacePath",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    "RootImage",
    "DynamicUser",
    "PrivateUsers",
    "MountFlags",
    "LogNamespace",
    "ExecPaths",
    "NoExecPaths",
];

/// What keeps a unit's mounts out of the host's mount namespace, on systemd 252 (Debian 12,
/// PVE 8) or on systemd >= 254 (Debian 13, PVE 9), where `PrivateNetwork=yes` (like any
/// directive that needs a network namespace) implies `PrivateMounts=yes` unless
/// `PrivateMounts=` is set. The rule: `PrivateMounts=no` said once, explicitly, and no
/// directive that creates a mount namespace on its own.
fn hides_host_mounts(text: &str) -> Vec<String> {
    let d = directives(text);
    let mut why = Vec::new();
    let private_mounts: Vec<&str> = d
        .iter()
        .filter(|(k, _)| k == "PrivateMounts")
        .map(|(_, v)| v.as_str())
        .collect();
    if private_mounts != ["no"] {
        let implied: Vec<&str> = d
            .iter()
            .filter(|(k, _)| k == "PrivateNetwork" || k == "NetworkNamespacePath")
            .map(|(k, _)| k.as_str())
            .collect();
        why.push(format!(
            "PrivateMounts= is {private_mounts:?}, not exactly [\"no\"] (implied by {implied:?} on systemd >= 254)"
        ));
    }
    for (k, v) in &d {
        if MOUNT_NAMESPACE.contains(&k.as_str()) {
            why.push(format!("{k}={v} creates a mount namespace"));
        }
    }
    why
}

#[test]
fn units_that_mount_for_the_host_say_private_mounts_no() {
    for name in HOST_MOUNTERS {
        let why = hides_host_mounts(&unit(name));
        assert!(
            why.is_empty(),
            "{name} would mount into a namespace of its own: {why:?}"
        );
    }
    // The rule can fail: the usb unit as it was before PrivateMounts=no (right on 252,
    // hides the mount on 257), and with one file-system directive added.
    let usb = unit("felhom-privhelper-usb.service");
    let without: String = usb
        .lines()
        .filter(|l| l.trim() != "PrivateMounts=no")
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, usb);
    let why = hides_host_mounts(&without);
    assert!(
        why.len() == 1 && why[0].contains("PrivateNetwork"),
        "{why:?}"
    );
    let why = hides_host_mounts(&format!("{usb}ProtectSystem=full\n"));
    assert!(
        why.len() == 1 && why[0].starts_with("ProtectSystem=full"),
        "{why:?}"
    );
    let why = hides_host_mounts(&format!("{usb}PrivateMounts=yes\n"));
    assert!(!why.is_empty(), "a second PrivateMounts= line overrides");
}

/// The agent's stand-in identity for the permission check: an unused uid and gid, given
/// the ownership tmpfiles.d would give user and group felhom-agent.
const AGENT_ID: u32 = 64_123;

#[test]
fn the_agent_cannot_create_anything_at_a_helper_socket_path() {
    if !is_root() {
        eprintln!("SKIP: needs root (chown to a stand-in uid, setpriv)");
        return;
    }
    let tmpfiles = std::fs::read_to_string(systemd_dir().join("felhom.tmpfiles")).unwrap();
    let entry = |dir: &str| -> (u32, u32, u32) {
        let f: Vec<&str> = tmpfiles
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() >= 5 && f[0] == "d" && f[1] == dir)
            .unwrap_or_else(|| panic!("felhom.tmpfiles has no `d {dir}` line"));
        let id = |name: &str| match name {
            "root" => 0,
            "felhom-agent" => AGENT_ID,
            other => panic!("unexpected owner {other} of {dir}"),
        };
        (u32::from_str_radix(f[2], 8).unwrap(), id(f[3]), id(f[4]))
    };
    // A copy of /run (0755 root) with each directory as tmpfiles.d makes it.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let make = |dir: &str| {
        let (mode, uid, gid) = entry(dir);
        let p = tmp.path().join(dir.trim_start_matches('/'));
        std::fs::create_dir_all(&p).unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    std::fs::create_dir(tmp.path().join("run")).unwrap();
    std::fs::set_permissions(
        tmp.path().join("run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    make("/run/felhom");
    let agent_rw: Vec<String> = directives(&unit("felhom-agent.service"))
        .into_iter()
        .filter(|(k, _)| k == "ReadWritePaths")
        .map(|(_, v)| v)
        .collect();
    // As the agent (its uid, its group): make a directory, then a file, at `path`.
    let as_agent = |path: &Path| -> Vec<bool> {
        ["mkdir \"$0\"", ": > \"$0\""]
            .iter()
            .map(|script| {
                let st = Command::new("setpriv")
                    .arg(format!("--reuid={AGENT_ID}"))
                    .arg(format!("--regid={AGENT_ID}"))
                    .arg(format!("--groups={AGENT_ID}"))
                    .args(["--", "/bin/sh", "-c", script])
                    .arg(path)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .expect("setpriv (package util-linux)");
                let made = st.success() && path.symlink_metadata().is_ok();
                let _ = std::fs::remove_dir(path).or_else(|_| std::fs::remove_file(path));
                made
            })
            .collect()
    };
    let mut seen = 0;
    for e in std::fs::read_dir(systemd_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "socket") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        for (k, path) in directives(&text) {
            if k != "ListenStream" {
                continue;
            }
            let sock = Path::new(&path);
            let parent = sock.parent().unwrap().to_str().unwrap();
            assert_eq!(
                sock.parent().and_then(Path::parent),
                Some(Path::new("/run")),
                "{path}: only /run (root's) may be above the socket directory"
            );
            assert!(
                !agent_rw.iter().any(|rw| Path::new(parent).starts_with(rw)),
                "{path}: below the agent's ReadWritePaths {agent_rw:?}"
            );
            make(parent);
            let at = tmp.path().join(path.trim_start_matches('/'));
            assert_eq!(
                as_agent(&at),
                [false, false],
                "the agent can create a directory or file at {path}"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 3, "one ListenStream per helper class");
    // The check can fail: in its own directory the agent can do both.
    let own = tmp.path().join("run/felhom/privhelper-usb.sock");
    assert_eq!(as_agent(&own), [true, true], "the agent's own directory");
}
