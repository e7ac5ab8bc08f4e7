//! The table of every known configuration field: its JSON path, its environment variable
//! and its kind. The loader walks this table; nothing ever derives a field from a variable
//! name (a test checks that each variable follows the naming rule).

/// What a field holds, for parsing file values and environment strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Str,
    Path,
    U64,
    Bool,
    /// JSON array of strings; in the environment a comma-separated list.
    StrList,
    /// A number from 0 to 1 (JSON number; in the environment a decimal like `0.2`).
    Fraction,
}

/// One known field.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    /// Dotted JSON path, e.g. `proxmox.tls.pin_sha256`.
    pub path: &'static str,
    /// `FELHOM_AGENT_` + the path upper-cased with `.` → `_`, spelled out.
    pub env: &'static str,
    pub kind: Kind,
    /// Never shown; `config check` prints `<redacted>`.
    pub secret: bool,
}

const fn field(path: &'static str, env: &'static str, kind: Kind) -> Field {
    Field {
        path,
        env,
        kind,
        secret: false,
    }
}

const fn secret(path: &'static str, env: &'static str) -> Field {
    Field {
        path,
        env,
        kind: Kind::Str,
        secret: true,
    }
}

/// Every field, in the order `config check` prints them.
pub(crate) const FIELDS: &[Field] = &[
    field("node", "FELHOM_AGENT_NODE", Kind::Str),
    field("agent_id", "FELHOM_AGENT_AGENT_ID", Kind::Str),
    field("state_dir", "FELHOM_AGENT_STATE_DIR", Kind::Path),
    field("proxmox.url", "FELHOM_AGENT_PROXMOX_URL", Kind::Str),
    field(
        "proxmox.token_id",
        "FELHOM_AGENT_PROXMOX_TOKEN_ID",
        Kind::Str,
    ),
    secret("proxmox.token_secret", "FELHOM_AGENT_PROXMOX_TOKEN_SECRET"),
    field(
        "proxmox.token_secret_file",
        "FELHOM_AGENT_PROXMOX_TOKEN_SECRET_FILE",
        Kind::Path,
    ),
    field(
        "proxmox.tls.pin_sha256",
        "FELHOM_AGENT_PROXMOX_TLS_PIN_SHA256",
        Kind::Str,
    ),
    field(
        "proxmox.tls.ca_file",
        "FELHOM_AGENT_PROXMOX_TLS_CA_FILE",
        Kind::Path,
    ),
    field(
        "proxmox.tls.insecure",
        "FELHOM_AGENT_PROXMOX_TLS_INSECURE",
        Kind::Bool,
    ),
    field("hub.mode", "FELHOM_AGENT_HUB_MODE", Kind::Str),
    field("hub.url", "FELHOM_AGENT_HUB_URL", Kind::Str),
    secret("hub.token", "FELHOM_AGENT_HUB_TOKEN"),
    field("hub.token_file", "FELHOM_AGENT_HUB_TOKEN_FILE", Kind::Path),
    field("hub.ca_file", "FELHOM_AGENT_HUB_CA_FILE", Kind::Path),
    field(
        "hub.tls.pin_sha256",
        "FELHOM_AGENT_HUB_TLS_PIN_SHA256",
        Kind::Str,
    ),
    field(
        "hub.test_min_poll_interval_seconds",
        "FELHOM_AGENT_HUB_TEST_MIN_POLL_INTERVAL_SECONDS",
        Kind::U64,
    ),
    field(
        "privhelper.socket_dir",
        "FELHOM_AGENT_PRIVHELPER_SOCKET_DIR",
        Kind::Path,
    ),
    field(
        "privhelper.audit_log",
        "FELHOM_AGENT_PRIVHELPER_AUDIT_LOG",
        Kind::Path,
    ),
    field(
        "privhelper.timeout_seconds",
        "FELHOM_AGENT_PRIVHELPER_TIMEOUT_SECONDS",
        Kind::U64,
    ),
    field(
        "sensors.hwmon_root",
        "FELHOM_AGENT_SENSORS_HWMON_ROOT",
        Kind::Path,
    ),
    field(
        "smart.interval_seconds",
        "FELHOM_AGENT_SMART_INTERVAL_SECONDS",
        Kind::U64,
    ),
    field("smart.devices", "FELHOM_AGENT_SMART_DEVICES", Kind::StrList),
    field(
        "cloudflared.metrics_url",
        "FELHOM_AGENT_CLOUDFLARED_METRICS_URL",
        Kind::Str,
    ),
    field(
        "cloudflared.timeout_seconds",
        "FELHOM_AGENT_CLOUDFLARED_TIMEOUT_SECONDS",
        Kind::U64,
    ),
    field(
        "reconcile.desired_file",
        "FELHOM_AGENT_RECONCILE_DESIRED_FILE",
        Kind::Path,
    ),
    field(
        "reconcile.desired_source",
        "FELHOM_AGENT_RECONCILE_DESIRED_SOURCE",
        Kind::Str,
    ),
    field(
        "reconcile.shutdown_timeout_seconds",
        "FELHOM_AGENT_RECONCILE_SHUTDOWN_TIMEOUT_SECONDS",
        Kind::U64,
    ),
    field("control.socket", "FELHOM_AGENT_CONTROL_SOCKET", Kind::Path),
    field(
        "authz.signers_file",
        "FELHOM_AGENT_AUTHZ_SIGNERS_FILE",
        Kind::Path,
    ),
    field(
        "restore_tests.enabled",
        "FELHOM_AGENT_RESTORE_TESTS_ENABLED",
        Kind::Bool,
    ),
    field(
        "restore_tests.scratch_vmids",
        "FELHOM_AGENT_RESTORE_TESTS_SCRATCH_VMIDS",
        Kind::Str,
    ),
    field(
        "restore_tests.storage",
        "FELHOM_AGENT_RESTORE_TESTS_STORAGE",
        Kind::Str,
    ),
    field(
        "restore_tests.interval_hours",
        "FELHOM_AGENT_RESTORE_TESTS_INTERVAL_HOURS",
        Kind::U64,
    ),
    field(
        "restore_tests.window",
        "FELHOM_AGENT_RESTORE_TESTS_WINDOW",
        Kind::Str,
    ),
    field(
        "restore_tests.boot_check_seconds",
        "FELHOM_AGENT_RESTORE_TESTS_BOOT_CHECK_SECONDS",
        Kind::U64,
    ),
    field(
        "restore_tests.stable_seconds",
        "FELHOM_AGENT_RESTORE_TESTS_STABLE_SECONDS",
        Kind::U64,
    ),
    field(
        "restore_tests.max_archive_bytes",
        "FELHOM_AGENT_RESTORE_TESTS_MAX_ARCHIVE_BYTES",
        Kind::U64,
    ),
    field(
        "restore_tests.min_free_fraction",
        "FELHOM_AGENT_RESTORE_TESTS_MIN_FREE_FRACTION",
        Kind::Fraction,
    ),
    field(
        "gate.backup_storage",
        "FELHOM_AGENT_GATE_BACKUP_STORAGE",
        Kind::Str,
    ),
    field(
        "gate.health_timeout_seconds",
        "FELHOM_AGENT_GATE_HEALTH_TIMEOUT_SECONDS",
        Kind::U64,
    ),
    field(
        "gate.undo_warn_fraction",
        "FELHOM_AGENT_GATE_UNDO_WARN_FRACTION",
        Kind::Fraction,
    ),
];

/// Name of the systemd credential holding the Proxmox token secret.
pub(crate) const CREDENTIAL_PROXMOX_TOKEN: &str = "proxmox-token";
/// Name of the systemd credential holding the hub token.
pub(crate) const CREDENTIAL_HUB_TOKEN: &str = "hub-token";
/// The variable systemd sets to the directory of the unit's credentials.
pub(crate) const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

pub(crate) fn lookup(path: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.path == path)
}

/// True when `prefix` names a JSON object in the shape (`proxmox`, `proxmox.tls`, …).
pub(crate) fn is_section(prefix: &str) -> bool {
    FIELDS.iter().any(|f| {
        f.path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variable_follows_the_naming_rule() {
        for f in FIELDS {
            let expected = format!("FELHOM_AGENT_{}", f.path.to_uppercase().replace('.', "_"));
            assert_eq!(f.env, expected, "field {}", f.path);
        }
    }

    #[test]
    fn paths_and_variables_are_unique() {
        for (i, a) in FIELDS.iter().enumerate() {
            for b in &FIELDS[i + 1..] {
                assert_ne!(a.path, b.path);
                assert_ne!(a.env, b.env);
            }
        }
    }

    #[test]
    fn sections_are_the_object_prefixes() {
        assert!(is_section("proxmox"));
        assert!(is_section("proxmox.tls"));
        assert!(!is_section("proxmox.url"));
        assert!(!is_section("prox"));
        assert!(!is_section("proxmox.tl"));
    }
}
