//! [`ProxmoxError`]: everything a PVE call can end with, each variant naming the endpoint
//! (method and path, never the host's credentials) and what to do about it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::upid::Upid;

/// A failed permission check, parsed from PVE's text so the message can say what to grant.
///
/// PVE's forms: `Permission check failed (/vms/101, VM.PowerMgmt)`, alternatives joined by
/// `|` (`(/vms/101, VM.Config.Disk|VM.Config.CPU)`), a trailing reason
/// (`(/, Sys.Modify for modifying tag 'x')`), a custom reason only
/// (`(changing feature flags … only allowed for root@pam)`), or the bare text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionDenied {
    /// ACL path, e.g. `/vms/101`.
    pub path: Option<String>,
    /// The privileges checked; more than one means any one of them suffices.
    pub privileges: Vec<String>,
    /// A reason PVE gave instead of (or after) the privilege.
    pub reason: Option<String>,
    /// PVE's text, trimmed.
    pub raw: String,
}

fn is_privilege(s: &str) -> bool {
    // `VM.PowerMgmt`, `Sys.Audit`, `Datastore.AllocateSpace`, `VM.Config.CPU`, `SDN.Use`.
    let mut parts = s.split('.');
    let first = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    !first.is_empty()
        && first.as_bytes()[0].is_ascii_uppercase()
        && first.bytes().all(|b| b.is_ascii_alphanumeric())
        && !rest.is_empty()
        && rest
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

impl PermissionDenied {
    /// Parses PVE's permission text; `None` when the text is not a permission failure.
    pub fn parse(text: &str) -> Option<PermissionDenied> {
        let raw = text.trim().to_string();
        let rest = raw.strip_prefix("Permission check failed")?;
        let mut out = PermissionDenied {
            path: None,
            privileges: Vec::new(),
            reason: None,
            raw: raw.clone(),
        };
        let rest = rest.trim();
        let Some(inner) = rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')) else {
            if !rest.is_empty() {
                out.reason = Some(rest.to_string());
            }
            return Some(out);
        };
        let inner = inner.trim();
        let (path, privs_and_reason) = match inner.split_once(", ") {
            Some((p, r)) if p.starts_with('/') && !p.contains(char::is_whitespace) => {
                (Some(p.to_string()), r.trim())
            }
            _ => (None, inner),
        };
        let (privs, reason) = match privs_and_reason.split_once(char::is_whitespace) {
            Some((p, r)) => (p, Some(r.trim())),
            None => (privs_and_reason, None),
        };
        let list: Vec<&str> = privs.split('|').collect();
        if list.iter().all(|p| is_privilege(p)) {
            out.path = path;
            out.privileges = list.into_iter().map(str::to_string).collect();
            out.reason = reason.filter(|r| !r.is_empty()).map(str::to_string);
        } else {
            // Not a privilege list: PVE's custom reason, kept whole.
            out.path = path;
            out.reason = Some(if out.path.is_some() {
                privs_and_reason.to_string()
            } else {
                inner.to_string()
            });
        }
        Some(out)
    }
}

impl fmt::Display for PermissionDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.privileges.as_slice(), &self.path) {
            ([], _) => {
                write!(f, "{}", self.raw)?;
            }
            ([one], path) => {
                write!(f, "missing privilege {one}")?;
                if let Some(p) = path {
                    write!(f, " on {p}")?;
                }
                if let Some(r) = &self.reason {
                    write!(f, " ({r})")?;
                }
                write!(f, "; grant {one}")?;
                if let Some(p) = path {
                    write!(f, " on {p}")?;
                }
                write!(f, " to the API token (PVE said: {})", self.raw)?;
            }
            (many, path) => {
                write!(f, "missing privilege: needs one of {}", many.join(", "))?;
                if let Some(p) = path {
                    write!(f, " on {p}")?;
                }
                if let Some(r) = &self.reason {
                    write!(f, " ({r})")?;
                }
                write!(f, "; grant one of them")?;
                if let Some(p) = path {
                    write!(f, " on {p}")?;
                }
                write!(f, " to the API token (PVE said: {})", self.raw)?;
            }
        }
        Ok(())
    }
}

/// Errors of the Proxmox client. No variant carries the token or the Authorization header.
#[derive(Debug, thiserror::Error)]
pub enum ProxmoxError {
    /// The client could not be set up (bad URL, unreadable CA file, …).
    #[error("Proxmox client setup: {0}")]
    Setup(String),
    /// The connection failed (refused, reset, DNS, …).
    #[error("cannot reach Proxmox for {endpoint}: {detail}")]
    Transport { endpoint: String, detail: String },
    /// The server's certificate does not match the configured pin.
    #[error(
        "TLS certificate pin mismatch for {endpoint}: expected {expected}, the server presented {seen}; if the node certificate was renewed on purpose, update proxmox.tls.pin_sha256 (`pvenode cert info` prints it)"
    )]
    PinMismatch {
        endpoint: String,
        expected: String,
        seen: String,
    },
    /// Another TLS failure (CA used as the server certificate, unknown CA, expired, name
    /// mismatch, handshake), explained with its fix.
    #[error("TLS with Proxmox failed for {endpoint}: {failure}")]
    Tls {
        endpoint: String,
        failure: crate::tls::TlsFailure,
    },
    /// 401: the token is wrong, expired or unknown.
    #[error(
        "Proxmox rejected the API token for {endpoint} (401 {reason}); check proxmox.token_id and the token secret"
    )]
    Unauthorized { endpoint: String, reason: String },
    /// 403: a permission check failed.
    #[error("permission denied for {endpoint}: {denied}")]
    PermissionDenied {
        endpoint: String,
        denied: Box<PermissionDenied>,
    },
    /// Any other HTTP error, with PVE's message and per-parameter errors.
    #[error("Proxmox answered {status} to {endpoint}: {message}{}", fmt_param_errors(.errors))]
    Api {
        endpoint: String,
        status: u16,
        message: String,
        errors: BTreeMap<String, String>,
    },
    /// A config write carried the `digest` it was based on and PVE refused it because the
    /// config changed since (someone else wrote it): nothing was changed. Read the guest
    /// again and decide afresh; sending the same write again can only be refused again.
    #[error(
        "{endpoint} refused: the guest config changed since it was read ({message}); nothing was written"
    )]
    ConfigChanged { endpoint: String, message: String },
    /// The answer did not have the expected shape.
    #[error("unexpected answer from {endpoint}: {detail}")]
    Decode { endpoint: String, detail: String },
    /// The request did not complete in time.
    #[error("{endpoint} timed out")]
    Timeout { endpoint: String },
    /// A task ended with an error.
    /// The task type and guest are the UPID's (`upid.task_type()`, `upid.id()`).
    #[error("task {} on guest {} failed: {exitstatus}{}", upid.task_type(), fmt_guest(upid), fmt_task_perm(.permission))]
    TaskFailed {
        upid: Upid,
        exitstatus: String,
        /// Set when the failure is a permission check (e.g. `VM.Backup` inside vzdump).
        permission: Option<Box<PermissionDenied>>,
    },
    /// `wait_task` gave up before the task stopped.
    #[error("task {upid} still running after {waited:?}")]
    TaskTimeout { upid: Upid, waited: Duration },
    /// The caller asked for something PVE would refuse; nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A guest config value has an unexpected type.
    #[error("guest config key `{key}` has an unexpected value: {detail}")]
    BadConfigValue { key: String, detail: String },
}

fn fmt_param_errors(errors: &BTreeMap<String, String>) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.trim_end().replace('\n', "; ")))
        .collect();
    format!(" ({})", parts.join("; "))
}

fn fmt_guest(upid: &Upid) -> &str {
    if upid.id().is_empty() {
        "(none)"
    } else {
        upid.id()
    }
}

fn fmt_task_perm(p: &Option<Box<PermissionDenied>>) -> String {
    match p {
        Some(p) if !p.privileges.is_empty() => format!(" — {p}"),
        _ => String::new(),
    }
}

impl ProxmoxError {
    /// The dependency could not be reached (network, timeout, PVE's proxy pseudo-codes):
    /// the CLI's exit 3. A certificate that fails verification is not in this class:
    /// retrying does not fix it (see [`ProxmoxError::is_config_problem`]).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ProxmoxError::Transport { .. } | ProxmoxError::Timeout { .. }
        ) || matches!(self, ProxmoxError::Api { status, .. } if *status == 595 || *status == 596)
    }

    /// Worth retrying later (while polling a task).
    pub fn is_transient(&self) -> bool {
        self.is_unreachable()
            || matches!(self, ProxmoxError::Api { status, .. } if *status == 502 || *status == 503)
    }

    /// The setup is wrong (token, privileges, pin, CA): the CLI's exit 2.
    pub fn is_config_problem(&self) -> bool {
        matches!(
            self,
            ProxmoxError::Setup(_)
                | ProxmoxError::PinMismatch { .. }
                | ProxmoxError::Tls { .. }
                | ProxmoxError::Unauthorized { .. }
                | ProxmoxError::PermissionDenied { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_privilege() {
        let p =
            PermissionDenied::parse("Permission check failed (/vms/101, VM.PowerMgmt)\n").unwrap();
        assert_eq!(p.path.as_deref(), Some("/vms/101"));
        assert_eq!(p.privileges, vec!["VM.PowerMgmt"]);
        assert_eq!(p.reason, None);
        let msg = p.to_string();
        assert!(msg.contains("grant VM.PowerMgmt on /vms/101"), "{msg}");
    }

    #[test]
    fn alternatives() {
        let p = PermissionDenied::parse(
            "Permission check failed (/vms/101, VM.Config.Disk|VM.Config.CPU|VM.Config.Memory|VM.Config.Network|VM.Config.Options)",
        )
        .unwrap();
        assert_eq!(p.path.as_deref(), Some("/vms/101"));
        assert_eq!(
            p.privileges,
            vec![
                "VM.Config.Disk",
                "VM.Config.CPU",
                "VM.Config.Memory",
                "VM.Config.Network",
                "VM.Config.Options"
            ]
        );
        let msg = p.to_string();
        assert!(
            msg.contains("one of VM.Config.Disk, VM.Config.CPU"),
            "{msg}"
        );
        assert!(msg.contains("on /vms/101"), "{msg}");
    }

    #[test]
    fn privilege_with_trailing_reason() {
        let p = PermissionDenied::parse(
            "Permission check failed (/, Sys.Modify for modifying tag 'prod')",
        )
        .unwrap();
        assert_eq!(p.path.as_deref(), Some("/"));
        assert_eq!(p.privileges, vec!["Sys.Modify"]);
        assert_eq!(p.reason.as_deref(), Some("for modifying tag 'prod'"));
    }

    #[test]
    fn custom_reason() {
        let p = PermissionDenied::parse(
            "Permission check failed (changing feature flags (except nesting) is only allowed for root@pam)\n",
        )
        .unwrap();
        assert_eq!(p.path, None);
        assert!(p.privileges.is_empty());
        assert_eq!(
            p.reason.as_deref(),
            Some("changing feature flags (except nesting) is only allowed for root@pam")
        );
        assert!(p.to_string().contains("only allowed for root@pam"));
    }

    #[test]
    fn bare() {
        let p = PermissionDenied::parse("Permission check failed").unwrap();
        assert_eq!(p.path, None);
        assert!(p.privileges.is_empty());
        assert_eq!(p.reason, None);
        assert_eq!(p.to_string(), "Permission check failed");
        assert!(PermissionDenied::parse("CT 101 already running").is_none());
    }

    #[test]
    fn param_errors_are_listed() {
        let mut errors = BTreeMap::new();
        errors.insert(
            "ipconfig0".to_string(),
            "invalid format - format error\nipconfig0.gw: bad\n\n".to_string(),
        );
        let e = ProxmoxError::Api {
            endpoint: "POST /nodes/pve/qemu".into(),
            status: 400,
            message: "Parameter verification failed.".into(),
            errors,
        };
        assert_eq!(
            e.to_string(),
            "Proxmox answered 400 to POST /nodes/pve/qemu: Parameter verification failed. (ipconfig0: invalid format - format error; ipconfig0.gw: bad)"
        );
    }
}
