//! The host's trust in operator keys: `signers.json`, validated.
//!
//! Owns: [`Trust`] (distinct Ed25519 public keys with their names, the two thresholds, the
//! validity limits), every configuration error as a [`TrustError`], and the signers file's
//! owner/mode rule ([`check_owner_mode`], [`check_file_metadata`]).
//! Must never: fall back silently (a bad file is an error, never "fewer keys"), count one
//! public key twice because it is listed under two names, or read the file itself (the
//! caller reads it and hands the bytes and the metadata in).

use std::os::unix::fs::MetadataExt;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::envelope::decode_base64;

/// A signers file above this size is refused.
pub const MAX_SIGNERS_FILE_BYTES: usize = 64 * 1024;
/// At most this many keys: every signature may be tried against every key, so this
/// bounds the work one envelope can cause.
pub const MAX_KEYS: usize = 64;
/// `max_validity_seconds` when the file does not say.
pub const DEFAULT_MAX_VALIDITY_SECONDS: u64 = 86_400;
/// `clock_skew_seconds` when the file does not say.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 120;
/// The longest validity window a host may accept: a week. The replay store must keep an
/// `op_id` this long, so it stays bounded.
pub const MAX_MAX_VALIDITY_SECONDS: u64 = 7 * 86_400;
/// The largest clock skew a host may allow.
pub const MAX_CLOCK_SKEW_SECONDS: u64 = 3_600;

/// An operation's class, and what a payload's `grant` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    Reversible,
    Irreversible,
}

impl Grant {
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::Reversible => "reversible",
            Grant::Irreversible => "irreversible",
        }
    }
}

/// A configuration error in `signers.json`.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("signers file is {0} bytes, the limit is {MAX_SIGNERS_FILE_BYTES}")]
    TooLarge(usize),
    #[error("signers file is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0} keys are listed, at most {MAX_KEYS} are accepted")]
    TooManyKeys(usize),
    #[error("key name {0:?} is invalid: 1..=64 characters of A-Z a-z 0-9 . _ @ + -")]
    InvalidName(String),
    #[error("key name {0:?} is listed twice")]
    DuplicateName(String),
    #[error("key {name:?}: ed25519 is not base64")]
    KeyNotBase64 { name: String },
    #[error("key {name:?}: ed25519 is {len} bytes, an Ed25519 public key is 32")]
    KeyLength { name: String, len: usize },
    #[error("key {name:?}: not a valid Ed25519 public key (not a curve point)")]
    KeyInvalid { name: String },
    #[error("key {name:?}: a small-order (weak) Ed25519 public key is never trusted")]
    KeyWeak { name: String },
    #[error("threshold.{class} is 0: at least one signature must be required")]
    ThresholdZero { class: &'static str },
    #[error("threshold.{class} is {threshold} but only {distinct} distinct keys are listed")]
    ThresholdAboveKeys {
        class: &'static str,
        threshold: u32,
        distinct: usize,
    },
    #[error("threshold.irreversible ({irreversible}) is below threshold.reversible ({reversible})")]
    IrreversibleBelowReversible { reversible: u32, irreversible: u32 },
    #[error("max_validity_seconds must be 1..={MAX_MAX_VALIDITY_SECONDS}, not {0}")]
    MaxValidity(u64),
    #[error("clock_skew_seconds must be 0..={MAX_CLOCK_SKEW_SECONDS}, not {0}")]
    ClockSkew(u64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    ed25519: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThreshold {
    reversible: u32,
    irreversible: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    keys: Vec<RawKey>,
    threshold: RawThreshold,
    #[serde(default = "default_max_validity")]
    max_validity_seconds: u64,
    #[serde(default = "default_skew")]
    clock_skew_seconds: u64,
}

fn default_max_validity() -> u64 {
    DEFAULT_MAX_VALIDITY_SECONDS
}
fn default_skew() -> u64 {
    DEFAULT_CLOCK_SKEW_SECONDS
}

/// One distinct trusted public key and every name it is listed under (file order).
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub key: VerifyingKey,
    pub names: Vec<String>,
}

/// The validated `signers.json`.
#[derive(Debug, Clone)]
pub struct Trust {
    keys: Vec<TrustedKey>,
    reversible: u32,
    irreversible: u32,
    max_validity_seconds: u64,
    clock_skew_seconds: u64,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'@' | b'+' | b'-'))
}

impl Trust {
    /// Parses and validates the contents of `signers.json`.
    pub fn from_json(bytes: &[u8]) -> Result<Trust, TrustError> {
        if bytes.len() > MAX_SIGNERS_FILE_BYTES {
            return Err(TrustError::TooLarge(bytes.len()));
        }
        let raw: RawTrust = serde_json::from_slice(bytes)?;
        if raw.keys.len() > MAX_KEYS {
            return Err(TrustError::TooManyKeys(raw.keys.len()));
        }
        let mut keys: Vec<TrustedKey> = Vec::new();
        let mut seen_names: Vec<&str> = Vec::new();
        for k in &raw.keys {
            if !valid_name(&k.name) {
                return Err(TrustError::InvalidName(k.name.clone()));
            }
            if seen_names.contains(&k.name.as_str()) {
                return Err(TrustError::DuplicateName(k.name.clone()));
            }
            seen_names.push(&k.name);
            let name = || k.name.clone();
            let bytes = decode_base64(&k.ed25519)
                .ok_or_else(|| TrustError::KeyNotBase64 { name: name() })?;
            let arr: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| TrustError::KeyLength {
                    name: name(),
                    len: bytes.len(),
                })?;
            let key = VerifyingKey::from_bytes(&arr)
                .map_err(|_| TrustError::KeyInvalid { name: name() })?;
            if key.is_weak() {
                return Err(TrustError::KeyWeak { name: name() });
            }
            // The same key under a second name is one key: it counts once.
            match keys.iter_mut().find(|t| t.key.as_bytes() == key.as_bytes()) {
                Some(t) => t.names.push(name()),
                None => keys.push(TrustedKey {
                    key,
                    names: vec![name()],
                }),
            }
        }
        let (rev, irr) = (raw.threshold.reversible, raw.threshold.irreversible);
        for (class, t) in [("reversible", rev), ("irreversible", irr)] {
            if t == 0 {
                return Err(TrustError::ThresholdZero { class });
            }
            if t as usize > keys.len() {
                return Err(TrustError::ThresholdAboveKeys {
                    class,
                    threshold: t,
                    distinct: keys.len(),
                });
            }
        }
        if irr < rev {
            return Err(TrustError::IrreversibleBelowReversible {
                reversible: rev,
                irreversible: irr,
            });
        }
        if raw.max_validity_seconds == 0 || raw.max_validity_seconds > MAX_MAX_VALIDITY_SECONDS {
            return Err(TrustError::MaxValidity(raw.max_validity_seconds));
        }
        if raw.clock_skew_seconds > MAX_CLOCK_SKEW_SECONDS {
            return Err(TrustError::ClockSkew(raw.clock_skew_seconds));
        }
        Ok(Trust {
            keys,
            reversible: rev,
            irreversible: irr,
            max_validity_seconds: raw.max_validity_seconds,
            clock_skew_seconds: raw.clock_skew_seconds,
        })
    }

    /// The distinct trusted keys.
    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// How many distinct keys must sign for this grant.
    pub fn threshold(&self, grant: Grant) -> u32 {
        match grant {
            Grant::Reversible => self.reversible,
            Grant::Irreversible => self.irreversible,
        }
    }

    pub fn max_validity_seconds(&self) -> u64 {
        self.max_validity_seconds
    }

    pub fn clock_skew_seconds(&self) -> u64 {
        self.clock_skew_seconds
    }

    /// Every name, for status output.
    pub fn names(&self) -> Vec<&str> {
        self.keys
            .iter()
            .flat_map(|k| k.names.iter().map(String::as_str))
            .collect()
    }
}

/// Why the signers file's owner or mode is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileCheckError {
    #[error("is not a regular file")]
    NotRegular,
    #[error("is owned by uid {0}, not by root")]
    NotRootOwned(u32),
    #[error("is writable by its group or by others (mode {0:04o})")]
    WritableByOthers(u32),
    #[error("the agent runs as uid 0, which owns the file: the agent could rewrite its own trust")]
    AgentOwnsFile,
}

/// The signers file rule: a regular file owned by root, not writable by group or others,
/// and not owned by the agent's uid (an agent running as root could rewrite it).
pub fn check_owner_mode(
    is_regular: bool,
    uid: u32,
    mode: u32,
    agent_uid: u32,
) -> Result<(), FileCheckError> {
    if !is_regular {
        return Err(FileCheckError::NotRegular);
    }
    if uid != 0 {
        return Err(FileCheckError::NotRootOwned(uid));
    }
    if mode & 0o022 != 0 {
        return Err(FileCheckError::WritableByOthers(mode & 0o7777));
    }
    if agent_uid == uid {
        return Err(FileCheckError::AgentOwnsFile);
    }
    Ok(())
}

/// [`check_owner_mode`] on metadata from `symlink_metadata` of an opened file (a symlink
/// is not a regular file and is refused).
pub fn check_file_metadata(meta: &std::fs::Metadata, agent_uid: u32) -> Result<(), FileCheckError> {
    check_owner_mode(
        meta.file_type().is_file(),
        meta.uid(),
        meta.mode(),
        agent_uid,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 8032 TEST 1 and TEST 2 public keys, base64.
    const K1: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
    const K2: &str = "PUAXw+hDiVqStwqnTRt+vJyYLM8uxJaMwM1V8Sr0Zgw=";

    fn file(keys: &[(&str, &str)], rev: u32, irr: u32) -> String {
        let keys: Vec<String> = keys
            .iter()
            .map(|(n, k)| format!(r#"{{"name":"{n}","ed25519":"{k}"}}"#))
            .collect();
        format!(
            r#"{{"keys":[{}],"threshold":{{"reversible":{rev},"irreversible":{irr}}},"max_validity_seconds":3600,"clock_skew_seconds":60}}"#,
            keys.join(",")
        )
    }

    #[test]
    fn a_good_file_parses() {
        let t = Trust::from_json(file(&[("alice", K1), ("bob", K2)], 1, 2).as_bytes()).unwrap();
        assert_eq!(t.keys().len(), 2);
        assert_eq!(t.threshold(Grant::Reversible), 1);
        assert_eq!(t.threshold(Grant::Irreversible), 2);
        assert_eq!(t.max_validity_seconds(), 3600);
        assert_eq!(t.clock_skew_seconds(), 60);
        assert_eq!(t.names(), ["alice", "bob"]);
    }

    #[test]
    fn defaults_for_the_limits() {
        let t = Trust::from_json(
            format!(r#"{{"keys":[{{"name":"a","ed25519":"{K1}"}}],"threshold":{{"reversible":1,"irreversible":1}}}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(t.max_validity_seconds(), DEFAULT_MAX_VALIDITY_SECONDS);
        assert_eq!(t.clock_skew_seconds(), DEFAULT_CLOCK_SKEW_SECONDS);
    }

    #[test]
    fn one_key_under_two_names_counts_once() {
        let t = Trust::from_json(file(&[("alice", K1), ("alice2", K1)], 1, 1).as_bytes()).unwrap();
        assert_eq!(t.keys().len(), 1);
        assert_eq!(t.keys()[0].names, ["alice", "alice2"]);
        let err =
            Trust::from_json(file(&[("alice", K1), ("alice2", K1)], 1, 2).as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                TrustError::ThresholdAboveKeys {
                    class: "irreversible",
                    threshold: 2,
                    distinct: 1
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn every_configuration_error_is_typed() {
        let short = "AAEC"; // 3 bytes
        type Case = (String, fn(&TrustError) -> bool);
        let cases: Vec<Case> = vec![
            (file(&[("a", short)], 1, 1), |e| {
                matches!(e, TrustError::KeyLength { len: 3, .. })
            }),
            (file(&[("a", "%%%")], 1, 1), |e| {
                matches!(e, TrustError::KeyNotBase64 { .. })
            }),
            (
                file(&[("a", K1), ("a", K2)], 1, 1),
                |e| matches!(e, TrustError::DuplicateName(n) if n == "a"),
            ),
            (file(&[("a b", K1)], 1, 1), |e| {
                matches!(e, TrustError::InvalidName(_))
            }),
            (file(&[("", K1)], 1, 1), |e| {
                matches!(e, TrustError::InvalidName(_))
            }),
            (file(&[("a", K1)], 0, 1), |e| {
                matches!(
                    e,
                    TrustError::ThresholdZero {
                        class: "reversible"
                    }
                )
            }),
            (file(&[("a", K1), ("b", K2)], 1, 0), |e| {
                matches!(
                    e,
                    TrustError::ThresholdZero {
                        class: "irreversible"
                    }
                )
            }),
            (file(&[("a", K1)], 2, 2), |e| {
                matches!(
                    e,
                    TrustError::ThresholdAboveKeys {
                        class: "reversible",
                        ..
                    }
                )
            }),
            (file(&[], 1, 1), |e| {
                matches!(e, TrustError::ThresholdAboveKeys { distinct: 0, .. })
            }),
            (file(&[("a", K1), ("b", K2)], 2, 1), |e| {
                matches!(
                    e,
                    TrustError::IrreversibleBelowReversible {
                        reversible: 2,
                        irreversible: 1
                    }
                )
            }),
            // The identity point: small order.
            (
                file(
                    &[("a", "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")],
                    1,
                    1,
                ),
                |e| matches!(e, TrustError::KeyWeak { .. }),
            ),
            (file(&[("a", K1)], 1, 1).replace("3600", "0"), |e| {
                matches!(e, TrustError::MaxValidity(0))
            }),
            (file(&[("a", K1)], 1, 1).replace("3600", "604801"), |e| {
                matches!(e, TrustError::MaxValidity(604_801))
            }),
            (file(&[("a", K1)], 1, 1).replace(":60}", ":3601}"), |e| {
                matches!(e, TrustError::ClockSkew(3601))
            }),
            (
                file(&[("a", K1)], 1, 1).replace("\"keys\"", "\"extra\":1,\"keys\""),
                |e| matches!(e, TrustError::Json(_)),
            ),
            (
                file(&[("a", K1)], 1, 1).replace("\"name\"", "\"comment\":\"x\",\"name\""),
                |e| matches!(e, TrustError::Json(_)),
            ),
            (
                file(&[("a", K1)], 1, 1).replace("\"reversible\":1", "\"reversible\":-1"),
                |e| matches!(e, TrustError::Json(_)),
            ),
        ];
        for (json, ok) in cases {
            let err = Trust::from_json(json.as_bytes()).unwrap_err();
            assert!(ok(&err), "{json}: {err}");
        }
        let many: Vec<(String, &str)> = (0..=MAX_KEYS).map(|i| (format!("k{i}"), K1)).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(n, k)| (n.as_str(), *k)).collect();
        assert!(matches!(
            Trust::from_json(file(&many, 1, 1).as_bytes()).unwrap_err(),
            TrustError::TooManyKeys(65)
        ));
        assert!(matches!(
            Trust::from_json(&vec![b' '; MAX_SIGNERS_FILE_BYTES + 1]).unwrap_err(),
            TrustError::TooLarge(_)
        ));
    }

    #[test]
    fn owner_and_mode_rule() {
        const AGENT: u32 = 998;
        assert_eq!(check_owner_mode(true, 0, 0o100644, AGENT), Ok(()));
        assert_eq!(check_owner_mode(true, 0, 0o100600, AGENT), Ok(()));
        assert_eq!(check_owner_mode(true, 0, 0o100640, AGENT), Ok(()));
        assert_eq!(
            check_owner_mode(true, AGENT, 0o100644, AGENT),
            Err(FileCheckError::NotRootOwned(AGENT))
        );
        assert_eq!(
            check_owner_mode(true, 0, 0o100664, AGENT),
            Err(FileCheckError::WritableByOthers(0o664))
        );
        assert_eq!(
            check_owner_mode(true, 0, 0o100646, AGENT),
            Err(FileCheckError::WritableByOthers(0o646))
        );
        assert_eq!(
            check_owner_mode(false, 0, 0o040755, AGENT),
            Err(FileCheckError::NotRegular)
        );
        assert_eq!(
            check_owner_mode(true, 0, 0o100644, 0),
            Err(FileCheckError::AgentOwnsFile)
        );
    }

    #[test]
    fn metadata_of_a_real_file() {
        let dir = std::env::temp_dir().join(format!("felhom-authz-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("signers.json");
        std::fs::write(&p, b"{}").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let err = check_file_metadata(&meta, 12345).unwrap_err();
        // Group/other-writable, or (when tests do not run as root) not root-owned.
        assert!(
            matches!(
                err,
                FileCheckError::WritableByOthers(0o666) | FileCheckError::NotRootOwned(_)
            ),
            "{err}"
        );
        let link = dir.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(
            check_file_metadata(&std::fs::symlink_metadata(&link).unwrap(), 12345),
            Err(FileCheckError::NotRegular)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
