//! Per-class capability sets. Right after set-up an instance drops its bounding set and
//! its effective/permitted sets to what its class needs, clears the inheritable and
//! ambient sets, and so every tool it runs (as uid 0, which gets the bounding set on
//! exec) holds at most those capabilities.

use caps::{CapSet, Capability, CapsHashSet};
use felhom_protocol::Class;

#[derive(Debug, thiserror::Error)]
pub enum CapError {
    #[error("capabilities: {0}")]
    Caps(String),
}

/// Capabilities `pct create` cannot need (the same list the pct unit's
/// `CapabilityBoundingSet=~` removes).
pub const PCT_DENIED: [Capability; 17] = [
    Capability::CAP_SYS_MODULE,
    Capability::CAP_SYS_BOOT,
    Capability::CAP_SYS_TIME,
    Capability::CAP_WAKE_ALARM,
    Capability::CAP_SYS_PACCT,
    Capability::CAP_BLOCK_SUSPEND,
    Capability::CAP_MAC_ADMIN,
    Capability::CAP_MAC_OVERRIDE,
    Capability::CAP_SYSLOG,
    Capability::CAP_SYS_TTY_CONFIG,
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_LEASE,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_BROADCAST,
    Capability::CAP_NET_RAW,
    Capability::CAP_AUDIT_CONTROL,
];

/// What a class may hold.
pub fn class_caps(class: Class) -> CapsHashSet {
    match class {
        // SG_IO ATA pass-through needs CAP_SYS_RAWIO; NVMe admin commands CAP_SYS_ADMIN.
        Class::Smart => [Capability::CAP_SYS_RAWIO, Capability::CAP_SYS_ADMIN]
            .into_iter()
            .collect(),
        // mount(2)/umount2(2). Files we touch (fstab, mount root, audit log) are root's.
        Class::Usb => [Capability::CAP_SYS_ADMIN].into_iter().collect(),
        // pct create is effectively full root (pmxcfs, storage, template extraction,
        // user namespaces); only what it cannot need is dropped.
        Class::Pct => caps::all()
            .into_iter()
            .filter(|c| !PCT_DENIED.contains(c))
            .collect(),
    }
}

fn last_cap() -> u8 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops to the class's set. Returns the set kept (class set ∩ what we had).
///
/// Only real changes are made: under the shipped units the bounding set is already the
/// class's (`CapabilityBoundingSet=`, and on systemd 257 the inheritable set too), so
/// no `capset(2)` is needed — which matters
/// because the smart and usb units' system call filters refuse `@privileged` (capset).
/// A capability that cannot be dropped is an error only if we still hold it.
pub fn drop_to_class(class: Class) -> Result<CapsHashSet, CapError> {
    let err = |e: caps::errors::CapsError| CapError::Caps(e.to_string());
    let had = caps::read(None, CapSet::Permitted).map_err(err)?;
    let keep: CapsHashSet = class_caps(class).intersection(&had).copied().collect();
    let last = last_cap();
    let bounding = caps::read(None, CapSet::Bounding).map_err(err)?;
    let extra: Vec<Capability> = bounding
        .iter()
        .filter(|c| c.index() <= last && !keep.contains(c))
        .copied()
        .collect();
    if !extra.is_empty()
        && caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(err)?
    {
        for cap in extra {
            caps::drop(None, CapSet::Bounding, cap).map_err(err)?;
        }
    }
    if !caps::read(None, CapSet::Ambient).map_err(err)?.is_empty() {
        caps::clear(None, CapSet::Ambient).map_err(err)?;
    }
    // systemd 257 (Debian 13, PVE 9; not 252) starts root services with the inheritable set
    // equal to the bounding set, i.e. the class's set. Inheritable capabilities within
    // what we keep grant a child nothing we could not pass anyway (and root's exec
    // takes the bounding set regardless), so only a wider set is cleared.
    if !caps::read(None, CapSet::Inheritable)
        .map_err(err)?
        .is_subset(&keep)
    {
        caps::clear(None, CapSet::Inheritable).map_err(err)?;
    }
    if caps::read(None, CapSet::Effective).map_err(err)? != keep {
        caps::set(None, CapSet::Effective, &keep).map_err(err)?;
    }
    if had != keep {
        caps::set(None, CapSet::Permitted, &keep).map_err(err)?;
    }
    Ok(keep)
}
