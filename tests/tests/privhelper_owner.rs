//! Whose files the helper trusts: root's, and its own effective uid's (a helper running as
//! an ordinary user gains nothing from files that user can write; the local stack runs it
//! so). Checked both ways with the real binary and throw-away users: a helper running as
//! user A serves with a config and tool owned by A, refuses them when owned by user B,
//! and a helper running as root refuses A's. Needs root (it creates the users).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use felhom_protocol::{DiskDevice, Request, Response};
use felhom_testbed::privhelper::{
    Client, ThrowawayUser, hosttools_fixtures, is_root, privhelper_bin,
};
use serde_json::json;

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

/// A helper environment below `dir`, every file and directory in it owned by `owner`.
struct Env {
    config: PathBuf,
    tool: PathBuf,
    socket: PathBuf,
    audit_log: PathBuf,
}

fn env(dir: &Path, owner: &ThrowawayUser) -> Env {
    let home = dir.join("home");
    for d in ["", "etc", "tools", "audit", "run"] {
        let p = home.join(d);
        std::fs::create_dir_all(&p).unwrap();
        set_mode(&p, 0o755);
        chown(&p, owner.uid, owner.gid);
    }
    let tool = home.join("tools/felhom-fake-smartctl");
    std::fs::copy(env!("CARGO_BIN_EXE_felhom-fake-smartctl"), &tool).unwrap();
    set_mode(&tool, 0o755);
    chown(&tool, owner.uid, owner.gid);
    let settings = home.join("tools/felhom-fake-smartctl.json");
    std::fs::write(
        &settings,
        json!({"devices": {"sda": {"fixture": hosttools_fixtures().join("smartctl-sata-healthy.json")}}})
            .to_string(),
    )
    .unwrap();
    chown(&settings, owner.uid, owner.gid);
    let audit_log = home.join("audit/privhelper-audit.jsonl");
    let config = home.join("etc/privhelper.json");
    std::fs::write(
        &config,
        json!({
            "agent_uid": owner.uid, "agent_gid": owner.gid,
            "audit_log": audit_log,
            "mount_root": home.join("mnt"), "fstab": home.join("etc/fstab"),
            "tools": {"smartctl": tool, "pct": "/bin/false", "blkid": "/bin/false"},
            "idle_exit_seconds": 30
        })
        .to_string(),
    )
    .unwrap();
    set_mode(&config, 0o644);
    chown(&config, owner.uid, owner.gid);
    Env {
        config,
        tool,
        socket: home.join("run/privhelper-smart.sock"),
        audit_log,
    }
}

fn serve_cmd(mut cmd: Command, e: &Env) -> Command {
    cmd.args(["serve", "--class", "smart", "--config"])
        .arg(&e.config)
        .arg("--listen")
        .arg(&e.socket);
    cmd
}

/// Starts the helper and expects it to refuse at start (exit 2); its stderr.
fn refused(cmd: Command, e: &Env) -> String {
    let out: Output = serve_cmd(cmd, e).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}

#[test]
fn the_helper_trusts_files_of_root_or_its_own_uid_and_nobody_elses() {
    if !is_root() {
        eprintln!("SKIP: this test needs root (it creates throw-away users)");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP: setpriv (util-linux) is missing");
        return;
    }
    let bin = privhelper_bin();
    let a = ThrowawayUser::create("oa", None);
    let b = ThrowawayUser::create("ob", None);
    if !a
        .command(Path::new("/usr/bin/test"), &[])
        .arg("-x")
        .arg(&bin)
        .status()
        .unwrap()
        .success()
    {
        eprintln!("SKIP: user {} cannot execute {}", a.name, bin.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    set_mode(tmp.path(), 0o755);
    let e = env(tmp.path(), &a);

    // As A, with A's config and tool: it serves, and runs A's tool.
    let mut helper = serve_cmd(a.command(&bin, &[]), &e).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        if let Ok(c) = Client::hello(&e.socket) {
            break c;
        }
        assert!(
            helper.try_wait().unwrap().is_none(),
            "the helper running as {} refused its own files",
            a.name
        );
        assert!(Instant::now() < deadline, "the helper never listened");
        std::thread::sleep(Duration::from_millis(20));
    };
    let resp = client
        .call(&Request::SmartRead {
            device: DiskDevice::new("sda").unwrap(),
        })
        .unwrap();
    assert!(
        matches!(resp, Response::Smart(ref s) if s.exit_status == 0),
        "{resp:?}"
    );
    let _ = helper.kill();
    let _ = helper.wait();
    let audit = std::fs::read_to_string(&e.audit_log).unwrap();
    assert!(audit.contains("\"smart_read\""), "{audit}");

    // As A, with the config owned by B: refused.
    chown(&e.config, b.uid, b.gid);
    let err = refused(a.command(&bin, &[]), &e);
    assert!(
        err.contains("refused")
            && err.contains(&format!(
                "owned by uid {}, neither root nor this helper's uid {}",
                b.uid, a.uid
            )),
        "{err}"
    );
    chown(&e.config, a.uid, a.gid);

    // As A, with the tool owned by B: refused.
    chown(&e.tool, b.uid, b.gid);
    let err = refused(a.command(&bin, &[]), &e);
    assert!(err.contains(&format!("owned by uid {}", b.uid)), "{err}");
    chown(&e.tool, a.uid, a.gid);

    // As A, with a directory above the config owned by B: refused.
    let etc = e.config.parent().unwrap().to_path_buf();
    chown(&etc, b.uid, b.gid);
    let err = refused(a.command(&bin, &[]), &e);
    assert!(
        err.contains(&format!("directory owned by uid {}", b.uid)),
        "{err}"
    );
    chown(&etc, a.uid, a.gid);

    // As root, A's files are not root's: refused (production is unchanged).
    let err = refused(Command::new(&bin), &e);
    assert!(
        err.contains(&format!("owned by uid {}, not root", a.uid)),
        "{err}"
    );
}
