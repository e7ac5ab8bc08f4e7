//! USB mount + fstab with a real ext4 loop device (marked USB-attached in a fake sysfs
//! tree): mount, managed fstab entry, idempotence, unmount with the fstab restored byte
//! for byte; refusals (not USB, wrong kind of device, unknown filesystem, symlinked
//! mount point, name taken); and a helper killed during the fstab write.

use std::time::{Duration, Instant};

use felhom_agent::config::PrivhelperConfig;
use felhom_agent::privileged::Client;
use felhom_protocol::{BlockDevicePath, Class, ErrorKind, Fstype, MountName, Request};
use felhom_testbed::privhelper::{
    Bed, BedOptions, FakeBins, LoopDisk, SAMPLE_FSTAB, is_root, mounted_at,
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
        "UUID={} {} ext4 defaults,nofail,noatime,x-felhom.name=backup 0 2\n",
        disk.uuid(),
        mp.display()
    );
    assert_eq!(
        std::fs::read_to_string(&bed.fstab).unwrap(),
        format!("{SAMPLE_FSTAB}{want_line}")
    );
    // The filesystem is really there.
    std::fs::write(mp.join("hello.txt"), "hi").unwrap();

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
    // Wrong kind of device: a character device, a missing node, a directory.
    for d in ["/dev/null", "/dev/sdzz9", "/dev/disk"] {
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
    assert_eq!(outcomes.len(), 9);
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
    let new = format!(
        "{old}UUID={} {} ext4 defaults,nofail,noatime,x-felhom.name=k 0 2\n",
        disk.uuid(),
        mp.display()
    );
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
    // A killed run may leave intent records without outcomes; the chain is still whole.
    let out = bed.verify();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
