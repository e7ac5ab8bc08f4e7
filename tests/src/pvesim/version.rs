//! The Proxmox VE versions the simulator can imitate, and every behaviour that depends
//! on the version. Owns that table and nothing else: handlers ask it, never compare
//! version numbers themselves.

use std::fmt;
use std::str::FromStr;

/// A PVE release line. `9.1` means 9.1.x before 9.1.5: from 9.1.5 on, every 401 says
/// `Authentication failed!`; before it the 401 reason is the detail. We imitate the older
/// form because it is what most installed 9.1 nodes and all older ones send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PveVersion {
    V7_4,
    V8_1,
    V8_4,
    V9_1,
}

/// An unknown `--pve-version` value.
#[derive(Debug, thiserror::Error)]
#[error("unknown PVE version {given:?}: expected one of 9.1, 8.4, 8.1, 7.4")]
pub struct UnknownVersion {
    pub given: String,
}

impl FromStr for PveVersion {
    type Err = UnknownVersion;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "7.4" => Ok(PveVersion::V7_4),
            "8.1" => Ok(PveVersion::V8_1),
            "8.4" => Ok(PveVersion::V8_4),
            "9.1" => Ok(PveVersion::V9_1),
            _ => Err(UnknownVersion {
                given: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for PveVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PveVersion::V7_4 => "7.4",
            PveVersion::V8_1 => "8.1",
            PveVersion::V8_4 => "8.4",
            PveVersion::V9_1 => "9.1",
        })
    }
}

impl PveVersion {
    /// `vmid` in `GET /nodes/{node}/lxc` is a JSON string before pve-container 5.0.10 (8.2).
    pub fn lxc_list_vmid_is_string(self) -> bool {
        self < PveVersion::V8_4
    }

    /// Error bodies carry `message` from libpve-http-server-perl 5.2.0 (8.3/8.4 updates, 9.x).
    pub fn error_body_has_message(self) -> bool {
        self >= PveVersion::V8_4
    }

    /// `overrule-shutdown` on stop exists from pve-container 5.0.10 / qemu-server 8.2.
    pub fn has_overrule_shutdown(self) -> bool {
        self >= PveVersion::V8_4
    }

    /// `current-kernel` and `boot-info` in node status, new in 8.1.
    pub fn node_status_has_kernel_and_boot_info(self) -> bool {
        self >= PveVersion::V8_1
    }

    /// `memory.available` in node status, new in 9.0.
    pub fn node_status_has_memory_available(self) -> bool {
        self >= PveVersion::V9_1
    }

    /// `pressure*` fields for running containers, new in 9.0.
    /// PVE 9 split `VM.Monitor` into `VM.GuestAgent.*`: the guest agent's read-only
    /// calls (ping) need `VM.GuestAgent.Audit` or `.Unrestricted` there, `VM.Monitor` on 8.
    pub fn has_guest_agent_privs(self) -> bool {
        self >= PveVersion::V9_1
    }

    pub fn lxc_has_pressure_fields(self) -> bool {
        self >= PveVersion::V9_1
    }

    /// `(version, release, repoid)` of `GET /version`.
    pub fn version_triple(self) -> (&'static str, &'static str, &'static str) {
        match self {
            PveVersion::V7_4 => ("7.4-16", "7.4", "0f39f621"),
            PveVersion::V8_1 => ("8.1.4", "8.1", "ec5affc9e41f1d79"),
            PveVersion::V8_4 => ("8.4.14", "8.4", "b502d23c55afcba1"),
            PveVersion::V9_1 => ("9.1.2", "9.1", "9d436f37a0ac4172"),
        }
    }

    /// `pveversion` in node status.
    pub fn pveversion(self) -> String {
        let (v, _, r) = self.version_triple();
        format!("pve-manager/{v}/{r}")
    }

    /// `(kversion, release, version)` of the running kernel.
    pub fn kernel(self) -> (&'static str, &'static str, &'static str) {
        match self {
            PveVersion::V7_4 => (
                "Linux 5.15.108-1-pve #1 SMP PVE 5.15.108-2 (2023-07-20T10:06Z)",
                "5.15.108-1-pve",
                "#1 SMP PVE 5.15.108-2 (2023-07-20T10:06Z)",
            ),
            PveVersion::V8_1 => (
                "Linux 6.5.13-1-pve #1 SMP PREEMPT_DYNAMIC PMX 6.5.13-1 (2024-02-05T13:50Z)",
                "6.5.13-1-pve",
                "#1 SMP PREEMPT_DYNAMIC PMX 6.5.13-1 (2024-02-05T13:50Z)",
            ),
            PveVersion::V8_4 => (
                "Linux 6.8.12-15-pve #1 SMP PREEMPT_DYNAMIC PMX 6.8.12-15 (2025-09-12T11:02Z)",
                "6.8.12-15-pve",
                "#1 SMP PREEMPT_DYNAMIC PMX 6.8.12-15 (2025-09-12T11:02Z)",
            ),
            PveVersion::V9_1 => (
                "Linux 6.17.2-1-pve #1 SMP PREEMPT_DYNAMIC PMX 6.17.2-1 (2025-10-21T11:55Z)",
                "6.17.2-1-pve",
                "#1 SMP PREEMPT_DYNAMIC PMX 6.17.2-1 (2025-10-21T11:55Z)",
            ),
        }
    }

    /// `running-qemu` / machine type of running VMs.
    pub fn qemu(self) -> (&'static str, &'static str) {
        match self {
            PveVersion::V7_4 => ("7.2.0", "pc-i440fx-7.2+pve0"),
            PveVersion::V8_1 => ("8.1.5", "pc-i440fx-8.1+pve0"),
            PveVersion::V8_4 => ("9.2.0", "pc-i440fx-9.2+pve1"),
            PveVersion::V9_1 => ("10.1.2", "pc-i440fx-10.1+pve0"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_versions_and_rejects_others() {
        for v in ["7.4", "8.1", "8.4", "9.1"] {
            assert_eq!(v.parse::<PveVersion>().unwrap().to_string(), v);
        }
        assert!("8.2".parse::<PveVersion>().is_err());
    }

    #[test]
    fn version_table() {
        assert!(PveVersion::V7_4.lxc_list_vmid_is_string());
        assert!(PveVersion::V8_1.lxc_list_vmid_is_string());
        assert!(!PveVersion::V8_4.lxc_list_vmid_is_string());
        assert!(!PveVersion::V8_1.error_body_has_message());
        assert!(PveVersion::V8_4.error_body_has_message());
        assert!(!PveVersion::V7_4.node_status_has_kernel_and_boot_info());
        assert!(PveVersion::V8_1.node_status_has_kernel_and_boot_info());
        assert!(PveVersion::V9_1.node_status_has_memory_available());
        assert!(!PveVersion::V8_4.node_status_has_memory_available());
        assert_eq!(PveVersion::V7_4.version_triple().2.len(), 8);
        assert_eq!(PveVersion::V9_1.version_triple().2.len(), 16);
    }
}
