//! USB mount + fstab with a real ext4 loop device (marked USB-attached in a fake sysfs
//! tree, with a `usb-` udev link): mount with nosuid,nodev,noexec (checked in
//! /proc/self/mountinfo and by trying), managed fstab entry, idempotence, unmount with the
//! fstab restored byte for byte; refusals (not USB, wrong kind of device, unknown
//! filesystem, symlinked mount point, name taken, UUID on another fstab line, a path or
//! link leading out of /dev, a foreign mount at the mount point); an operator's options
//! kept; btrfs mounted again; blkid without capabilities; the line as systemd reads it at
//! boot; and a helper killed during the fstab write.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use felhom_agent::config::PrivhelperConfig;
use felhom_agent::privileged::Client;
use felhom_protocol::{BlockDevicePath, Class, ErrorKind, Fstype, MountName, Request};
use felhom_testbed::privhelper::{
    Bed, BedOptions, FakeBins, LoopDisk, SAMPLE_FSTAB, is_root, mount_at, mounted_at,
};

fn fakes() -> FakeBins {
    FakeBins {
        smartctl: env!("CARGO_BIN_EXE_felhom-fake-smartctl").into(),
        pct: env!("CARGO_BIN_EXE_felhom-fake-pct").into(),
    }
}

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("SKIP: this test needs root (loop devices, mount, the root helper)");
            return;
        }
    };
}

fn client(bed: &Bed) -> Client {
    Client::new(&PrivhelperConfig {
        socket_dir: bed.run_dir.clone(),
        audit_log: bed.audit_log.clone(),
        timeout: Duration::from_secs(30),
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn dev(d: &LoopDisk) -> BlockDevicePath {
    BlockDevicePath::new(d.dev.to_string_lossy()).unwrap()
}

fn name(s: &str) -> MountName {
    MountName::new(s).unwrap()
}

#[test]
fn mount_and_unmount_a_usb_partition_restores_fstab_byte_for_byte() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let disk = LoopDisk::new(&bed.dir, "usb", 32, &["mkfs.ext4", "-q", "-F"]);
    bed.mark_usb_partition(&disk);
    let _h = bed.activate(Class::Usb);
    let c = client(&bed);
    let rt = rt();

    let m = rt
        .block_on(c.usb_mount(&dev(&disk), &name("backup")))
        .unwrap();
    let mp = bed.mount_root.join("backup");
    assert_eq!(m.fstype, Fstype::Ext4);
    assert_eq!(m.uuid.as_str(), disk.uuid());
    assert_eq!(m.mount_point, mp.to_string_lossy());
    assert!(!m.already_mounted && m.fstab_changed);
    assert_eq!(
        mounted_at(&mp),
        Some(format!("{}:{}", disk.rdev.0, disk.rdev.1)),
        "mounted in the host namespace"
    );
    let want_line = format!(
        "{} {} ext4 nosuid,nodev,noexec,noatime,nofail,x-systemd.requires=/dev/disk/by-uuid/{},x-felhom.name=backup 0 0\n",
        disk.by_id().display(),
        mp.display(),
        disk.uuid(),
    );
    assert_eq!(
        want_line,
        format!("{}\n", disk.managed_line(&mp, "ext4", "backup", None))
    );
    assert_eq!(
        std::fs::read_to_string(&bed.fstab).unwrap(),
        format!("{SAMPLE_FSTAB}{want_line}")
    );
    // The mount itself carries the same flags.
    let m = mount_at(&mp).unwrap();
    for flag in ["nosuid", "nodev", "noexec", "noatime"] {
        assert!(m.options.iter().any(|o| o == flag), "{flag} missing: {m:?}");
    }
    // The mount root is created 0700: no local account reaches a medium's files.
    let root_md = std::fs::metadata(&bed.mount_root).unwrap();
    assert_eq!(root_md.permissions().mode() & 0o7777, 0o700);
    assert_eq!(root_md.uid(), 0);
    // The filesystem is really there.
    std::fs::write(mp.join("hello.txt"), "hi").unwrap();
    // A root-owned set-user-ID shell on the medium is not run, not even by root, and a
    // device node on it does not open.
    let sh = mp.join("rootshell");
    std::fs::copy("/bin/sh", &sh).unwrap();
    std::fs::set_permissions(&sh, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let e = Command::new(&sh)
        .args(["-c", "exit 0"])
        .status()
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    let node = mp.join("null");
    let st = Command::new("mknod")
        .arg(&node)
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(st.success());
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&node)
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    std::fs::remove_file(&node).unwrap();
    std::fs::remove_file(&sh).unwrap();

    // Idempotent: same device, same name.
    let again = rt
        .block_on(c.usb_mount(&dev(&disk), &name("backup")))
        .unwrap();
    assert!(again.already_mounted && !again.fstab_changed);
    assert_eq!(
        std::fs::read_to_string(&bed.fstab)
            .unwrap()
            .matches("x-felhom.name=backup")
            .count(),
        1
    );

    let u = rt.block_on(c.usb_unmount(&name("backup"))).unwrap();
    assert!(u.was_mounted && u.fstab_changed);
    assert_eq!(mounted_at(&mp), None);
    assert_eq!(
        std::fs::read(&bed.fstab).unwrap(),
        SAMPLE_FSTAB.as_bytes(),
        "fstab restored byte for byte"
    );
    assert!(!mp.exists(), "the empty mount point is removed");
    let u = rt.block_on(c.usb_unmount(&name("backup"))).unwrap();
    assert!(!u.was_mounted && !u.fstab_changed, "unmount is idempotent");

    let recs = bed.audit_records();
    let outcomes: Vec<_> = recs.iter().filter(|r| r["kind"] == "outcome").collect();
    assert_eq!(outcomes.len(), 4);
    assert!(outcomes.iter().all(|r| r["result"] == "ok"));
    assert_eq!(outcomes[0]["detail"]["fstab_changed"], true);
    assert!(bed.verify().status.success());
}

#[test]
fn usb_refusals_are_typed_audited_and_change_nothing() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let ext4 = LoopDisk::new(&bed.dir, "ext4", 32, &["mkfs.ext4", "-q", "-F"]);
    let swap = LoopDisk::new(&bed.dir, "swap", 16, &["mkswap"]);
    let blank = LoopDisk::new(&bed.dir, "blank", 8, &[]);
    bed.mark_usb_partition(&swap);
    bed.mark_usb_partition(&blank);
    let _h = bed.activate(Class::Usb);
    let c = client(&bed);
    let rt = rt();
    let kind = |r: Result<
        felhom_agent::privileged::UsbMounted,
        felhom_agent::privileged::PrivilegedError,
    >| { r.unwrap_err().helper_kind().unwrap() };

    // Not in sysfs as USB at all (an internal disk, as far as /sys says).
    assert_eq!(
        kind(rt.block_on(c.usb_mount(&dev(&ext4), &name("a")))),
        ErrorKind::NotUsb
    );
    bed.mark_sata_partition(&ext4);
    assert_eq!(
        kind(rt.block_on(c.usb_mount(&dev(&ext4), &name("a")))),
        ErrorKind::NotUsb
    );
    // Wrong kind of device: a character device, a missing node, a directory, a missing
    // udev link.
    for d in [
        "/dev/null",
        "/dev/sdzz9",
        "/dev/shm",
        "/dev/disk/by-id/felhom-test-missing",
    ] {
        let r = rt.block_on(c.usb_mount(&BlockDevicePath::new(d).unwrap(), &name("a")));
        assert_eq!(kind(r), ErrorKind::NotUsb, "{d}");
    }
    // Unknown filesystems.
    assert_eq!(
        kind(rt.block_on(c.usb_mount(&dev(&swap), &name("a")))),
        ErrorKind::UnsupportedFilesystem
    );
    assert_eq!(
        kind(rt.block_on(c.usb_mount(&dev(&blank), &name("a")))),
        ErrorKind::UnsupportedFilesystem
    );

    // A symlink where the mount point would be is refused, and nothing is mounted behind it.
    bed.mark_usb_partition(&ext4);
    std::fs::create_dir_all(&bed.mount_root).unwrap();
    let elsewhere = bed.dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, bed.mount_root.join("evil")).unwrap();
    assert_eq!(
        kind(rt.block_on(c.usb_mount(&dev(&ext4), &name("evil")))),
        ErrorKind::NameInUse
    );
    assert_eq!(mounted_at(&elsewhere), None);

    // A name whose mount point another fstab line already uses.
    let mut taken = SAMPLE_FSTAB.to_string();
    taken.push_str(&format!(
        "/dev/sdq1 {} xfs defaults 0 0\n",
        bed.mount_root.join("taken").display()
    ));
    std::fs::write(&bed.fstab, &taken).unwrap();
    assert_eq!(
        kind(rt.block_on(c.usb_mount(&dev(&ext4), &name("taken")))),
        ErrorKind::NameInUse
    );
    assert_eq!(
        std::fs::read_to_string(&bed.fstab).unwrap(),
        taken,
        "fstab untouched"
    );
    assert_eq!(mounted_at(&bed.mount_root.join("taken")), None);

    let recs = bed.audit_records();
    let outcomes: Vec<_> = recs.iter().filter(|r| r["kind"] == "outcome").collect();
    assert_eq!(outcomes.len(), 10);
    assert!(
        outcomes.iter().all(|r| r["result"] == "denied"),
        "{outcomes:?}"
    );
    assert!(bed.verify().status.success());
}

#[test]
fn the_real_sysfs_check_refuses_a_loop_device() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    bed.set_config("sysfs_root", serde_json::json!("/sys"));
    let disk = LoopDisk::new(&bed.dir, "plain", 16, &["mkfs.ext4", "-q", "-F"]);
    let _h = bed.activate(Class::Usb);
    let e = rt()
        .block_on(client(&bed).usb_mount(&dev(&disk), &name("a")))
        .unwrap_err();
    assert_eq!(e.helper_kind(), Some(ErrorKind::NotUsb), "{e}");
    assert!(e.to_string().contains("not attached through USB"), "{e}");
}

#[test]
fn killing_the_helper_during_the_fstab_write_leaves_old_or_new() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let disk = LoopDisk::new(&bed.dir, "kill", 32, &["mkfs.ext4", "-q", "-F"]);
    bed.mark_usb_partition(&disk);
    // A large fstab makes the write (and the window for a kill) long.
    let mut old = SAMPLE_FSTAB.to_string();
    let filler = "# padding line to make the rewrite take a while ..............................\n";
    while old.len() < 24 * 1024 * 1024 {
        old.push_str(filler);
    }
    let mp = bed.mount_root.join("k");
    let new = format!("{old}{}\n", disk.managed_line(&mp, "ext4", "k", None));
    let reset = || {
        if mounted_at(&mp).is_some() {
            assert!(
                std::process::Command::new("umount")
                    .arg(&mp)
                    .status()
                    .unwrap()
                    .success()
            );
        }
        std::fs::write(&bed.fstab, &old).unwrap();
    };
    let request = Request::UsbMount {
        device: dev(&disk),
        name: name("k"),
    };
    // One full run to learn how long it takes.
    reset();
    let h = bed.listen(Class::Usb);
    let t = Instant::now();
    let mut c = felhom_testbed::privhelper::Client::hello(&bed.socket(Class::Usb)).unwrap();
    c.call(&request).unwrap();
    let full = t.elapsed();
    drop(h);
    assert_eq!(std::fs::read_to_string(&bed.fstab).unwrap(), new);
    let (mut saw_old, mut saw_new) = (0, 0);
    // Kill delays spread over the operation's length; if load made one side never
    // happen, a few more runs push further out (or back to 0) so both are seen.
    let mut delays: Vec<Duration> = (0..16).map(|i| full.mul_f64(i as f64 / 12.0)).collect();
    let mut i = 0;
    while i < delays.len() {
        let delay = delays[i];
        reset();
        let mut h = bed.listen(Class::Usb);
        let mut c = felhom_testbed::privhelper::Client::hello(&bed.socket(Class::Usb)).unwrap();
        c.send_raw(&felhom_protocol::encode_request(&request).unwrap())
            .unwrap();
        std::thread::sleep(delay);
        h.child.kill().unwrap();
        h.child.wait().unwrap();
        let now = std::fs::read_to_string(&bed.fstab).unwrap();
        if now == old {
            saw_old += 1;
        } else if now == new {
            saw_new += 1;
        } else {
            panic!(
                "run {i} (kill after {delay:?}): fstab is neither the old nor the new file ({} bytes)",
                now.len()
            );
        }
        i += 1;
        if i == delays.len() && delays.len() < 24 {
            if saw_new == 0 {
                delays.push(delay * 2);
            } else if saw_old == 0 {
                delays.push(Duration::ZERO);
            }
        }
    }
    reset();
    eprintln!("kill runs: {saw_old} left the old fstab, {saw_new} the new one (full op {full:?})");
    assert!(
        saw_old > 0 && saw_new > 0,
        "kills landed on both sides of the rename"
    );
    // A killed run leaves its intent without an outcome: verify names it on a warning
    // line (every run before the rename was killed mid-operation), and the chain is whole.
    let out = bed.verify();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("intent for usb_mount has no outcome"),
        "no open intent reported:\n{text}"
    );
}

/// Same variant order and shapes as `felhom_protocol::Request`, with a plain string where
/// the real type validates: to send a device path the agent's types cannot build.
#[derive(serde::Serialize)]
#[allow(dead_code)]
enum RawRequest {
    Hello { version: u32 },
    Ping,
    PctCreateKeyctl(()),
    UsbMount { device: String, name: String },
}

fn raw_frame(r: &RawRequest) -> Vec<u8> {
    let cfg = bincode::config::standard().with_big_endian();
    let payload = bincode::serde::encode_to_vec(r, cfg).unwrap();
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&payload);
    out
}

/// Removes a path when dropped (links the test plants in /dev).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn paths_and_links_out_of_dev_are_refused_without_saying_where_they_lead() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    // A root-only place with a secret name, and links to it where the agent can plant
    // them (/dev/shm) and where only root can (a udev link directory).
    let secret_dir = bed.dir.join("root-only-4f1b");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::set_permissions(&secret_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = secret_dir.join("id_ed25519-9c2e");
    std::fs::write(&secret, "x").unwrap();
    let tag = std::process::id();
    let shm = RemoveOnDrop(format!("/dev/shm/felhom-probe-{tag}").into());
    std::os::unix::fs::symlink(&secret, &shm.0).unwrap();
    std::fs::create_dir_all("/dev/disk/by-id").unwrap();
    let out_abs = RemoveOnDrop(format!("/dev/disk/by-id/usb-felhom-probe-{tag}-abs").into());
    std::os::unix::fs::symlink(&secret, &out_abs.0).unwrap();
    let via_shm = RemoveOnDrop(format!("/dev/disk/by-id/usb-felhom-probe-{tag}-shm").into());
    std::os::unix::fs::symlink(format!("../../shm/felhom-probe-{tag}"), &via_shm.0).unwrap();
    let up = RemoveOnDrop(format!("/dev/disk/by-id/usb-felhom-probe-{tag}-up").into());
    std::os::unix::fs::symlink("../../../root-only-4f1b", &up.0).unwrap();
    let _h = bed.activate(Class::Usb);

    let mut answers = Vec::new();
    for (device, want) in [
        (shm.0.clone(), ErrorKind::Invalid),
        (out_abs.0.clone(), ErrorKind::NotUsb),
        (via_shm.0.clone(), ErrorKind::NotUsb),
        (up.0.clone(), ErrorKind::NotUsb),
    ] {
        let mut c = felhom_testbed::privhelper::Client::hello(&bed.socket(Class::Usb)).unwrap();
        c.send_raw(&raw_frame(&RawRequest::UsbMount {
            device: device.to_string_lossy().into_owned(),
            name: "probe".into(),
        }))
        .unwrap();
        match c.read_response().unwrap() {
            Some(felhom_protocol::Response::Error { kind, message }) => {
                assert_eq!(kind, want, "{}: {message}", device.display());
                answers.push(message);
            }
            other => panic!("{}: {other:?}", device.display()),
        }
    }
    // Neither the answers, nor the audit log, nor the helper's log say where a link
    // leads, or whether it leads anywhere.
    let audit = std::fs::read_to_string(&bed.audit_log).unwrap();
    let log = bed.helper_log(Class::Usb);
    for secret_part in [
        "root-only-4f1b",
        "id_ed25519-9c2e",
        "No such file",
        "Permission denied",
        "os error",
    ] {
        for a in &answers {
            assert!(!a.contains(secret_part), "answer says {secret_part:?}: {a}");
        }
        assert!(
            !audit.contains(secret_part),
            "audit says {secret_part:?}:\n{audit}"
        );
        assert!(
            !log.contains(secret_part),
            "log says {secret_part:?}:\n{log}"
        );
    }
    assert_eq!(mounted_at(&bed.mount_root.join("probe")), None);
    assert!(bed.verify().status.success());
}

#[test]
fn unmount_leaves_a_mount_it_does_not_manage_alone() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    std::fs::create_dir(&bed.mount_root).unwrap();
    std::fs::set_permissions(&bed.mount_root, std::fs::Permissions::from_mode(0o700)).unwrap();
    let foreign = bed.mount_root.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "felhom-foreign"])
        .arg(&foreign)
        .status()
        .unwrap();
    assert!(st.success());
    let _h = bed.activate(Class::Usb);
    let e = rt()
        .block_on(client(&bed).usb_unmount(&name("foreign")))
        .unwrap_err();
    let still = mount_at(&foreign);
    let _ = Command::new("umount").arg(&foreign).status();
    assert_eq!(e.helper_kind(), Some(ErrorKind::NameInUse), "{e}");
    assert!(e.to_string().contains("not a felhom mount"), "{e}");
    assert_eq!(
        still.map(|m| m.fstype),
        Some("tmpfs".to_string()),
        "left mounted"
    );
    assert_eq!(std::fs::read(&bed.fstab).unwrap(), SAMPLE_FSTAB.as_bytes());
    let recs = bed.audit_records();
    assert_eq!(recs.last().unwrap()["result"], "denied");
}

#[test]
fn a_uuid_on_another_fstab_line_is_refused() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let disk = LoopDisk::new(&bed.dir, "dup", 32, &["mkfs.ext4", "-q", "-F"]);
    bed.mark_usb_partition(&disk);
    // The host's own line for a file system with the same UUID (as a crafted medium
    // would carry it).
    let fstab = format!(
        "{SAMPLE_FSTAB}UUID={} /srv/data ext4 defaults 0 2\n",
        disk.uuid()
    );
    std::fs::write(&bed.fstab, &fstab).unwrap();
    let _h = bed.activate(Class::Usb);
    let e = rt()
        .block_on(client(&bed).usb_mount(&dev(&disk), &name("backup")))
        .unwrap_err();
    assert_eq!(e.helper_kind(), Some(ErrorKind::NameInUse), "{e}");
    assert!(e.to_string().contains("file system UUID"), "{e}");
    assert_eq!(std::fs::read_to_string(&bed.fstab).unwrap(), fstab);
    assert_eq!(mounted_at(&bed.mount_root.join("backup")), None);
}

#[test]
fn an_operators_options_are_kept_and_an_old_line_is_brought_up_to_date() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let disk = LoopDisk::new(&bed.dir, "kept", 32, &["mkfs.ext4", "-q", "-F"]);
    bed.mark_usb_partition(&disk);
    let _h = bed.activate(Class::Usb);
    let c = client(&bed);
    let rt = rt();
    let mp = bed.mount_root.join("backup");
    let line = disk.managed_line(&mp, "ext4", "backup", None);

    // An earlier version's line, with an option the operator added: rewritten in place,
    // the operator's option kept, `defaults` (suid,dev,exec) and fsck pass 2 gone.
    let old_line = format!(
        "UUID={} {} ext4 defaults,nofail,noatime,x-felhom.name=backup,x-systemd.device-timeout=5s 0 2\n",
        disk.uuid(),
        mp.display()
    );
    std::fs::write(&bed.fstab, format!("{SAMPLE_FSTAB}{old_line}# after\n")).unwrap();
    let m = rt
        .block_on(c.usb_mount(&dev(&disk), &name("backup")))
        .unwrap();
    assert!(m.fstab_changed);
    let tightened = line.replace(" 0 0", ",x-systemd.device-timeout=5s 0 0");
    assert_eq!(
        std::fs::read_to_string(&bed.fstab).unwrap(),
        format!("{SAMPLE_FSTAB}{tightened}\n# after\n")
    );

    // Tightened by hand further: kept byte for byte.
    let by_hand = format!(
        "{SAMPLE_FSTAB}{}\n# after\n",
        tightened.replace(" 0 0", ",nosymfollow\t0  0")
    );
    std::fs::write(&bed.fstab, &by_hand).unwrap();
    let m = rt
        .block_on(c.usb_mount(&dev(&disk), &name("backup")))
        .unwrap();
    assert!(m.already_mounted && !m.fstab_changed);
    assert_eq!(std::fs::read_to_string(&bed.fstab).unwrap(), by_hand);

    // Loosened by hand (suid): that option goes, the rest stays.
    let loosened = by_hand.replace(",nosymfollow", ",suid,nosymfollow");
    std::fs::write(&bed.fstab, &loosened).unwrap();
    let m = rt
        .block_on(c.usb_mount(&dev(&disk), &name("backup")))
        .unwrap();
    assert!(m.fstab_changed);
    assert_eq!(
        std::fs::read_to_string(&bed.fstab).unwrap(),
        format!(
            "{SAMPLE_FSTAB}{}\n# after\n",
            line.replace(" 0 0", ",x-systemd.device-timeout=5s,nosymfollow 0 0")
        )
    );
    rt.block_on(c.usb_unmount(&name("backup"))).unwrap();
    assert_eq!(
        std::fs::read_to_string(&bed.fstab).unwrap(),
        format!("{SAMPLE_FSTAB}# after\n")
    );
}

#[test]
fn the_fstab_line_is_what_systemd_mounts_at_boot() {
    need_root!();
    let generator = Path::new("/usr/lib/systemd/system-generators/systemd-fstab-generator");
    if !generator.exists() {
        eprintln!("SKIP: {} is missing (package systemd)", generator.display());
        return;
    }
    let bed = Bed::new(fakes(), BedOptions::default());
    let disk = LoopDisk::new(&bed.dir, "boot", 32, &["mkfs.ext4", "-q", "-F"]);
    bed.mark_usb_partition(&disk);
    let _h = bed.activate(Class::Usb);
    rt().block_on(client(&bed).usb_mount(&dev(&disk), &name("backup")))
        .unwrap();
    let out = bed.dir.join("generated");
    std::fs::create_dir(&out).unwrap();
    let st = Command::new(generator)
        .args([&out, &out, &out])
        .env("SYSTEMD_FSTAB", &bed.fstab)
        .env("SYSTEMD_PROC_CMDLINE", "")
        .status()
        .unwrap();
    assert!(st.success());
    let mp = bed.mount_root.join("backup");
    let unit_name = Command::new("systemd-escape")
        .args(["--path", "--suffix=mount"])
        .arg(&mp)
        .output()
        .unwrap();
    let unit_name = String::from_utf8(unit_name.stdout).unwrap();
    let unit = std::fs::read_to_string(out.join(unit_name.trim())).unwrap();
    let uuid_unit = Command::new("systemd-escape")
        .args(["--path", "--suffix=device"])
        .arg(format!("/dev/disk/by-uuid/{}", disk.uuid()))
        .output()
        .unwrap();
    let uuid_unit = String::from_utf8(uuid_unit.stdout).unwrap();
    // Keyed on the USB disk's udev name; mounted only with the UUID present too; never
    // suid, dev or exec; no fsck (pass 0: no systemd-fsck@ dependency).
    for want in [
        format!("What={}", disk.by_id().display()),
        format!("Requires={}", uuid_unit.trim()),
        format!("After={}", uuid_unit.trim()),
        "Type=ext4".to_string(),
    ] {
        assert!(unit.lines().any(|l| l == want), "{want} missing:\n{unit}");
    }
    let opts = unit
        .lines()
        .find_map(|l| l.strip_prefix("Options="))
        .unwrap();
    assert!(
        opts.starts_with("nosuid,nodev,noexec,noatime,nofail,"),
        "{opts}"
    );
    assert!(!unit.contains("systemd-fsck"), "{unit}");
    rt().block_on(client(&bed).usb_unmount(&name("backup")))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn btrfs_mounted_again_is_already_mounted() {
    need_root!();
    if Command::new("mkfs.btrfs")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("mkfs.btrfs is missing: install btrfs-progs (it is in .ci/run's package list)");
    }
    if !std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some("btrfs"))
    {
        eprintln!("SKIP: this kernel has no btrfs (not in /proc/filesystems)");
        return;
    }
    let bed = Bed::new(fakes(), BedOptions::default());
    let disk = LoopDisk::new(&bed.dir, "btrfs", 128, &["mkfs.btrfs", "-q", "-f"]);
    bed.mark_usb_partition(&disk);
    let _h = bed.activate(Class::Usb);
    let c = client(&bed);
    let rt = rt();
    let mp = bed.mount_root.join("pool");
    let m = rt
        .block_on(c.usb_mount(&dev(&disk), &name("pool")))
        .unwrap();
    assert_eq!(m.fstype, Fstype::Btrfs);
    assert!(!m.already_mounted && m.fstab_changed);
    let info = mount_at(&mp).unwrap();
    // What made this a `name_in_use` before: btrfs shows an anonymous device number.
    assert_ne!(
        info.dev,
        format!("{}:{}", disk.rdev.0, disk.rdev.1),
        "{info:?}"
    );
    assert_eq!(info.source, disk.dev.to_string_lossy());
    for flag in ["nosuid", "nodev", "noexec"] {
        assert!(info.options.iter().any(|o| o == flag), "{flag}: {info:?}");
    }
    let again = rt
        .block_on(c.usb_mount(&dev(&disk), &name("pool")))
        .unwrap();
    assert!(again.already_mounted && !again.fstab_changed);
    let u = rt.block_on(c.usb_unmount(&name("pool"))).unwrap();
    assert!(u.was_mounted && u.fstab_changed);
    assert_eq!(mount_at(&mp), None);
}

#[test]
fn vfat_gets_owner_group_and_mask_when_the_kernel_has_it() {
    need_root!();
    let has_vfat = std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some("vfat"));
    if !has_vfat || Command::new("mkfs.vfat").arg("--help").output().is_err() {
        eprintln!(
            "SKIP: vfat not in /proc/filesystems or mkfs.vfat (dosfstools) missing; the option string is unit-tested in felhom-privhelper (fstab::tests)"
        );
        return;
    }
    let bed = Bed::new(fakes(), BedOptions::default());
    let disk = LoopDisk::new(&bed.dir, "vfat", 32, &["mkfs.vfat"]);
    bed.mark_usb_partition(&disk);
    let _h = bed.activate(Class::Usb);
    let c = client(&bed);
    let rt = rt();
    let mp = bed.mount_root.join("stick");
    rt.block_on(c.usb_mount(&dev(&disk), &name("stick")))
        .unwrap();
    let gid = bed.opts.agent_gid;
    let data = format!("uid=0,gid={gid},umask=0027");
    assert_eq!(
        std::fs::read_to_string(&bed.fstab).unwrap(),
        format!(
            "{SAMPLE_FSTAB}{}\n",
            disk.managed_line(&mp, "vfat", "stick", Some(&data))
        )
    );
    let info = mount_at(&mp).unwrap();
    for o in [
        "uid=0".to_string(),
        format!("gid={gid}"),
        "fmask=0027".into(),
        "dmask=0027".into(),
    ] {
        assert!(info.super_options.contains(&o), "{o}: {info:?}");
    }
    rt.block_on(c.usb_unmount(&name("stick"))).unwrap();
}

#[test]
fn blkid_runs_without_capabilities() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    // A stand-in blkid: records its own capability sets, then runs the real one.
    let caps = bed.dir.join("blkid-status.txt");
    let stand_in = bed.dir.join("tools/blkid-caps");
    std::fs::write(
        &stand_in,
        format!(
            "#!/bin/sh\nwhile IFS= read -r l; do case \"$l\" in Cap*|NoNewPrivs*) echo \"$l\";; esac; done < /proc/self/status > {}\nexec /usr/sbin/blkid \"$@\"\n",
            caps.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).unwrap();
    bed.set_config(
        "tools",
        serde_json::json!({"pct": bed.dir.join("tools/felhom-fake-pct"),
                           "smartctl": bed.dir.join("tools/felhom-fake-smartctl"),
                           "blkid": stand_in}),
    );
    let disk = LoopDisk::new(&bed.dir, "caps", 32, &["mkfs.ext4", "-q", "-F"]);
    bed.mark_usb_partition(&disk);
    let _h = bed.activate(Class::Usb);
    let m = rt()
        .block_on(client(&bed).usb_mount(&dev(&disk), &name("caps")))
        .unwrap();
    assert_eq!(
        m.uuid.as_str(),
        disk.uuid(),
        "the real blkid read the medium"
    );
    let status = std::fs::read_to_string(&caps).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{k} missing:\n{status}"))
    };
    for k in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(field(k), "0000000000000000", "{k}\n{status}");
    }
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    rt().block_on(client(&bed).usb_unmount(&name("caps")))
        .unwrap();
}

#[test]
fn a_mount_made_without_the_flags_gets_them_when_adopted() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let disk = LoopDisk::new(&bed.dir, "adopt", 32, &["mkfs.ext4", "-q", "-F"]);
    bed.mark_usb_partition(&disk);
    // Mounted by hand (or by a version of the helper without these flags).
    std::fs::create_dir(&bed.mount_root).unwrap();
    std::fs::set_permissions(&bed.mount_root, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mp = bed.mount_root.join("backup");
    std::fs::create_dir(&mp).unwrap();
    let st = Command::new("mount")
        .arg(&disk.dev)
        .arg(&mp)
        .status()
        .unwrap();
    assert!(st.success());
    let before = mount_at(&mp).unwrap();
    assert!(!before.options.iter().any(|o| o == "nosuid"), "{before:?}");
    let _h = bed.activate(Class::Usb);
    let m = rt()
        .block_on(client(&bed).usb_mount(&dev(&disk), &name("backup")))
        .unwrap();
    assert!(m.already_mounted && m.fstab_changed);
    let after = mount_at(&mp).unwrap();
    for flag in ["nosuid", "nodev", "noexec", "noatime"] {
        assert!(after.options.iter().any(|o| o == flag), "{flag}: {after:?}");
    }
    assert_eq!(after.dev, before.dev, "the same mount, not a second one");
    let recs = bed.audit_records();
    assert_eq!(recs.last().unwrap()["detail"]["flags_restricted"], true);
    rt().block_on(client(&bed).usb_unmount(&name("backup")))
        .unwrap();
    assert_eq!(mount_at(&mp), None, "one mount only, and it is gone");
}

#[test]
fn a_mount_root_open_to_others_is_closed_and_traverse_only_is_kept() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let disk = LoopDisk::new(&bed.dir, "root", 32, &["mkfs.ext4", "-q", "-F"]);
    bed.mark_usb_partition(&disk);
    let _h = bed.activate(Class::Usb);
    let c = client(&bed);
    let rt = rt();
    let mode = || {
        std::fs::metadata(&bed.mount_root)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    // What earlier versions created: readable and traversable by everyone.
    std::fs::create_dir(&bed.mount_root).unwrap();
    std::fs::set_permissions(&bed.mount_root, std::fs::Permissions::from_mode(0o755)).unwrap();
    rt.block_on(c.usb_mount(&dev(&disk), &name("backup")))
        .unwrap();
    assert_eq!(mode(), 0o750);
    rt.block_on(c.usb_unmount(&name("backup"))).unwrap();
    // Traverse-only for others, set by an operator for vzdump's suspend mode: kept.
    std::fs::set_permissions(&bed.mount_root, std::fs::Permissions::from_mode(0o711)).unwrap();
    rt.block_on(c.usb_mount(&dev(&disk), &name("backup")))
        .unwrap();
    assert_eq!(mode(), 0o711);
    rt.block_on(c.usb_unmount(&name("backup"))).unwrap();
}
