//! The hub's answer to a report: [`ControlEnvelope`], the poll-interval clamp, and the
//! copy of the last envelope kept in `state_dir` so a restart starts from what the hub said
//! last (a `blocked: true` survives a restart).
//!
//! Decoding is lenient on purpose: unknown fields are ignored and missing or `null` fields
//! take their defaults, so the hub can grow the envelope without breaking older agents.
//! Must never: treat anything in the envelope as a command to run; it only steers timing
//! and is handed to the reconcile side.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use super::report::Timestamp;

/// Poll interval when the hub says nothing.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(300);
/// Production floor of the poll interval.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_secs(60);
/// Ceiling of the poll interval.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);

/// File name of the saved envelope inside `state_dir`.
pub const ENVELOPE_FILE: &str = "hub-envelope.json";

/// The hub's answer to a report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(
    title = "ControlEnvelope",
    description = "The hub's answer to a report. Unknown fields are ignored; missing or null fields take their defaults."
)]
pub struct ControlEnvelope {
    /// Seconds until the next report; clamped by the agent to [60, 3600]. Default 300.
    #[serde(default, deserialize_with = "lenient_interval")]
    pub poll_interval_seconds: Option<u64>,
    /// The hub asks the agent to make no changes (the reconcile side obeys). Default false.
    #[serde(default, deserialize_with = "null_as_default")]
    pub blocked: bool,
    /// Generation of the desired state the hub holds. Default 0.
    #[serde(default, deserialize_with = "null_as_default")]
    pub desired_generation: u64,
    /// The hub has signed operations waiting for this agent. Default false.
    #[serde(default, deserialize_with = "null_as_default")]
    pub has_signed_ops: bool,
}

impl ControlEnvelope {
    /// Decodes the hub's answer body: a JSON object; unknown fields ignored, missing or
    /// `null` ones defaulted, a known field of the wrong type rejected.
    pub fn decode(body: &[u8]) -> Result<ControlEnvelope, EnvelopeError> {
        let invalid = |reason: String| EnvelopeError::Invalid { reason };
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
        if !value.is_object() {
            return Err(invalid("not a JSON object".into()));
        }
        serde_json::from_value(value).map_err(|e| invalid(e.to_string()))
    }

    /// The interval until the next report: the hub's value (or the default) clamped to
    /// `[floor, MAX_POLL_INTERVAL]`. `floor` is [`MIN_POLL_INTERVAL`] unless the test bed
    /// lowered it (see [`poll_floor`]).
    pub fn poll_interval(&self, floor: Duration) -> Duration {
        clamp_interval(self.poll_interval_seconds, floor)
    }

    /// The parts the reconcile side acts on (what is logged when it changes).
    pub fn control(&self) -> Control {
        Control {
            blocked: self.blocked,
            desired_generation: self.desired_generation,
            has_signed_ops: self.has_signed_ops,
        }
    }
}

/// What the reconcile side is handed from each envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Control {
    pub blocked: bool,
    pub desired_generation: u64,
    pub has_signed_ops: bool,
}

/// The poll-interval floor: 60 s, or the test bed's `hub.test_min_poll_interval_seconds`
/// (at least 1 s) when set.
pub fn poll_floor(test_min_poll_interval_seconds: Option<u64>) -> Duration {
    match test_min_poll_interval_seconds {
        Some(s) => Duration::from_secs(s.clamp(1, MIN_POLL_INTERVAL.as_secs())),
        None => MIN_POLL_INTERVAL,
    }
}

/// `seconds` (or the default) clamped to `[floor, MAX_POLL_INTERVAL]`.
pub fn clamp_interval(seconds: Option<u64>, floor: Duration) -> Duration {
    let wanted = seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_POLL_INTERVAL);
    wanted.clamp(floor.min(MAX_POLL_INTERVAL), MAX_POLL_INTERVAL)
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Accepts any JSON number (negative → 0, fractions rounded up, huge → saturated) or null.
fn lenient_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let n = Option::<serde_json::Number>::deserialize(d)?;
    Ok(n.map(|n| {
        if let Some(u) = n.as_u64() {
            u
        } else if n.as_i64().is_some() {
            0 // negative
        } else {
            let f = n.as_f64().unwrap_or(0.0);
            if f.is_nan() || f <= 0.0 {
                0
            } else if f >= u64::MAX as f64 {
                u64::MAX
            } else {
                f.ceil() as u64
            }
        }
    }))
}

/// Errors decoding an envelope or keeping it in `state_dir`.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The hub's answer is not an envelope (not a JSON object, or a field of the wrong type).
    #[error("the hub's answer is not a control envelope: {reason}")]
    Invalid { reason: String },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a saved envelope: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The last envelope the hub sent, with when it arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedEnvelope {
    pub envelope: ControlEnvelope,
    pub received_at: Timestamp,
}

/// Keeps the last envelope in `state_dir/hub-envelope.json`, replaced atomically.
#[derive(Debug, Clone)]
pub struct EnvelopeStore {
    path: PathBuf,
}

impl EnvelopeStore {
    pub fn new(state_dir: &Path) -> Self {
        EnvelopeStore {
            path: state_dir.join(ENVELOPE_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved envelope; `Ok(None)` when none was ever saved.
    pub fn load(&self) -> Result<Option<SavedEnvelope>, EnvelopeError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(EnvelopeError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| EnvelopeError::Decode {
                path: self.path.clone(),
                source,
            })
    }

    pub fn save(&self, saved: &SavedEnvelope) -> Result<(), EnvelopeError> {
        let mut bytes = serde_json::to_vec_pretty(saved).map_err(|e| EnvelopeError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        write_atomic(&self.path, &bytes).map_err(|source| EnvelopeError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file: a
/// temporary file in the same directory, fsync, rename over, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{:016x}", fastrand::u64(..)));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ControlEnvelope {
        ControlEnvelope::decode(s.as_bytes()).expect("envelope parses")
    }

    #[test]
    fn missing_fields_default_and_unknown_are_ignored() {
        assert_eq!(parse("{}"), ControlEnvelope::default());
        let e = parse(
            r#"{"poll_interval_seconds":120,"blocked":true,"desired_generation":7,
                "has_signed_ops":true,"future_field":{"x":[1,2]},"another":"y"}"#,
        );
        assert_eq!(e.poll_interval_seconds, Some(120));
        assert!(e.blocked && e.has_signed_ops);
        assert_eq!(e.desired_generation, 7);
        let n = parse(
            r#"{"poll_interval_seconds":null,"blocked":null,"desired_generation":null,"has_signed_ops":null}"#,
        );
        assert_eq!(n, ControlEnvelope::default());
    }

    #[test]
    fn wrong_types_are_a_decode_error() {
        for body in [
            r#"{"blocked":"yes"}"#,
            r#"{"poll_interval_seconds":"60"}"#,
            r#"{"desired_generation":-1}"#,
            "[]",
            "[300, true]",
            "null",
            "<html>",
            "",
        ] {
            let err = ControlEnvelope::decode(body.as_bytes()).unwrap_err();
            assert!(
                matches!(err, EnvelopeError::Invalid { .. }),
                "{body}: {err}"
            );
        }
    }

    #[test]
    fn interval_is_clamped_to_floor_and_ceiling() {
        let floor = MIN_POLL_INTERVAL;
        let secs = |s: Option<u64>| clamp_interval(s, floor).as_secs();
        assert_eq!(secs(None), 300);
        assert_eq!(secs(Some(0)), 60);
        assert_eq!(secs(Some(59)), 60);
        assert_eq!(secs(Some(60)), 60);
        assert_eq!(secs(Some(900)), 900);
        assert_eq!(secs(Some(3600)), 3600);
        assert_eq!(secs(Some(3601)), 3600);
        assert_eq!(secs(Some(u64::MAX)), 3600);
        // numbers the hub might send in other shapes
        assert_eq!(
            parse(r#"{"poll_interval_seconds":-5}"#)
                .poll_interval(floor)
                .as_secs(),
            60
        );
        assert_eq!(
            parse(r#"{"poll_interval_seconds":90.2}"#)
                .poll_interval(floor)
                .as_secs(),
            91
        );
        assert_eq!(
            parse(r#"{"poll_interval_seconds":1e30}"#)
                .poll_interval(floor)
                .as_secs(),
            3600
        );
    }

    #[test]
    fn only_the_test_setting_lowers_the_floor() {
        assert_eq!(poll_floor(None), MIN_POLL_INTERVAL);
        assert_eq!(poll_floor(Some(2)), Duration::from_secs(2));
        assert_eq!(poll_floor(Some(0)), Duration::from_secs(1));
        // it can lower the floor, never raise it above production's
        assert_eq!(poll_floor(Some(600)), MIN_POLL_INTERVAL);
        assert_eq!(clamp_interval(Some(1), poll_floor(Some(2))).as_secs(), 2);
        assert_eq!(clamp_interval(Some(5), poll_floor(Some(2))).as_secs(), 5);
    }

    #[test]
    fn store_round_trips_and_survives_a_new_instance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EnvelopeStore::new(dir.path());
        assert_eq!(store.load().unwrap(), None);
        let saved = SavedEnvelope {
            envelope: ControlEnvelope {
                poll_interval_seconds: Some(120),
                blocked: true,
                desired_generation: 42,
                has_signed_ops: false,
            },
            received_at: Timestamp::from_unix(1_700_000_000).unwrap(),
        };
        store.save(&saved).unwrap();
        let again = EnvelopeStore::new(dir.path());
        assert_eq!(again.load().unwrap(), Some(saved));
        // no temporary file is left behind
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(ENVELOPE_FILE)]);
    }

    #[test]
    fn a_corrupt_store_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(ENVELOPE_FILE), b"{not json").unwrap();
        let err = EnvelopeStore::new(dir.path()).load().unwrap_err();
        assert!(matches!(err, EnvelopeError::Decode { .. }), "{err}");
    }
}
