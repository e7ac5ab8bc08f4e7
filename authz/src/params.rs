//! The typed params of the gated kinds of issue 13 that need more than a plain struct:
//! `set_config`'s config map and `restore`'s backup volume id.
//!
//! Owns: [`ConfigKey`] (the keys a signed `set_config` may touch: the agent's managed keys
//! plus `protection`), [`ConfigValue`] (each key's value, typed and range-checked as
//! Proxmox VE's API schema has it), [`SetConfigParams`] (1..=10 keys, `null` deletes a
//! key, duplicate keys refused) and [`BackupVolid`] (a vzdump or PBS backup volume id that
//! knows its guest type).
//! Must never: accept a key, a value or a volume id it cannot fully check (an unknown key
//! is refused, not ignored), or talk to Proxmox: whether a key, a snapshot or an archive
//! exists on the node is the agent's check.

use std::collections::BTreeMap;
use std::fmt;

use felhom_protocol::{Hostname, StorageId, Vmid};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::payload::GuestType;

/// At most this many keys in one `set_config`.
pub const MAX_CONFIG_KEYS: usize = 10;
/// PVE's limit on a guest description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 8 * 1024;
/// At most this many bytes of tags.
pub const MAX_TAGS_BYTES: usize = 1024;
/// QEMU's `memory` maximum (4 TiB in MiB); used for LXC `memory` and `swap` too.
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;

/// Why a gated kind's params do not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("unknown config key {0:?}; the keys are {keys}", keys = ConfigKey::ALL_KEYS)]
    UnknownKey(String),
    #[error("config key {0} is given twice")]
    DuplicateKey(String),
    #[error("config must name 1..={MAX_CONFIG_KEYS} keys, it names {0}")]
    KeyCount(usize),
    #[error("config {key}: {why}")]
    BadValue { key: ConfigKey, why: String },
    #[error("config {key} applies to lxc guests only")]
    LxcOnly { key: ConfigKey },
    #[error("archive {volid:?}: {why}")]
    Volid { volid: String, why: &'static str },
}

/// A config key a signed `set_config` may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigKey {
    Memory,
    Swap,
    Cores,
    Cpulimit,
    Onboot,
    Description,
    Tags,
    Hostname,
    Nesting,
    Protection,
}

impl ConfigKey {
    pub const ALL: [ConfigKey; 10] = [
        ConfigKey::Memory,
        ConfigKey::Swap,
        ConfigKey::Cores,
        ConfigKey::Cpulimit,
        ConfigKey::Onboot,
        ConfigKey::Description,
        ConfigKey::Tags,
        ConfigKey::Hostname,
        ConfigKey::Nesting,
        ConfigKey::Protection,
    ];
    const ALL_KEYS: &'static str =
        "memory, swap, cores, cpulimit, onboot, description, tags, hostname, nesting, protection";

    /// The PVE config key (`nesting` is the flag inside `features`; the agent merges it).
    pub fn as_str(self) -> &'static str {
        match self {
            ConfigKey::Memory => "memory",
            ConfigKey::Swap => "swap",
            ConfigKey::Cores => "cores",
            ConfigKey::Cpulimit => "cpulimit",
            ConfigKey::Onboot => "onboot",
            ConfigKey::Description => "description",
            ConfigKey::Tags => "tags",
            ConfigKey::Hostname => "hostname",
            ConfigKey::Nesting => "nesting",
            ConfigKey::Protection => "protection",
        }
    }

    pub fn parse(s: &str) -> Option<ConfigKey> {
        ConfigKey::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// `swap`, `hostname` and `nesting` exist on containers only.
    pub fn lxc_only(self) -> bool {
        matches!(
            self,
            ConfigKey::Swap | ConfigKey::Hostname | ConfigKey::Nesting
        )
    }

    /// Checks and types one value for this key.
    pub fn value(self, v: &Value) -> Result<ConfigValue, ParamError> {
        let bad = |why: &str| ParamError::BadValue {
            key: self,
            why: why.to_string(),
        };
        let int = |lo: u64, hi: u64| -> Result<ConfigValue, ParamError> {
            match v.as_u64() {
                Some(n) if (lo..=hi).contains(&n) => Ok(ConfigValue::Int(n)),
                _ => Err(bad(&format!("must be an integer in {lo}..={hi}"))),
            }
        };
        match self {
            ConfigKey::Memory => int(16, MAX_MEMORY_MIB),
            ConfigKey::Swap => int(0, MAX_MEMORY_MIB),
            ConfigKey::Cores => int(1, 8192),
            ConfigKey::Cpulimit => match v.as_f64() {
                Some(x) if v.is_number() && (0.0..=8192.0).contains(&x) => {
                    Ok(ConfigValue::Decimal(if x == 0.0 {
                        "0".into()
                    } else {
                        format!("{x}")
                    }))
                }
                _ => Err(bad("must be a number in 0..=8192")),
            },
            ConfigKey::Onboot | ConfigKey::Nesting | ConfigKey::Protection => match v {
                Value::Bool(b) => Ok(ConfigValue::Bool(*b)),
                Value::Number(n) if n.as_u64() == Some(0) => Ok(ConfigValue::Bool(false)),
                Value::Number(n) if n.as_u64() == Some(1) => Ok(ConfigValue::Bool(true)),
                _ => Err(bad("must be true, false, 0 or 1")),
            },
            ConfigKey::Description => match v {
                Value::String(s) if s.len() > MAX_DESCRIPTION_BYTES => {
                    Err(bad("longer than PVE's 8 KiB limit"))
                }
                Value::String(s) if s.chars().any(|c| c.is_control() && c != '\n') => {
                    Err(bad("contains a control character other than a newline"))
                }
                Value::String(s) => Ok(ConfigValue::Text(s.clone())),
                _ => Err(bad("must be a string")),
            },
            ConfigKey::Tags => match v {
                Value::String(s) if s.len() > MAX_TAGS_BYTES => Err(bad("longer than 1024 bytes")),
                Value::String(s) if valid_tags(s) => Ok(ConfigValue::Text(s.clone())),
                Value::String(_) => Err(bad(
                    "tags are separated by ';', ',' or spaces and each matches [a-zA-Z0-9_][a-zA-Z0-9_+.-]*",
                )),
                _ => Err(bad("must be a string")),
            },
            ConfigKey::Hostname => match v {
                Value::String(s) => Hostname::new(s.as_str())
                    .map(|h| ConfigValue::Text(h.as_str().to_string()))
                    .map_err(|e| bad(&e.to_string())),
                _ => Err(bad("must be a string")),
            },
        }
    }
}

impl fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn valid_tags(s: &str) -> bool {
    s.split([';', ',', ' ']).filter(|t| !t.is_empty()).all(|t| {
        let b = t.as_bytes();
        (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'+' | b'.' | b'-'))
    })
}

/// One checked config value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigValue {
    /// `memory`, `swap` (MiB), `cores`.
    Int(u64),
    /// `cpulimit`, in its shortest decimal form (`"1.5"`, `"2"`).
    Decimal(String),
    /// `onboot`, `nesting`, `protection`.
    Bool(bool),
    /// `description`, `tags`, `hostname`, verbatim.
    Text(String),
}

impl ConfigValue {
    /// The value as a PVE form parameter (`1`/`0` for booleans).
    pub fn pve_param(&self) -> String {
        match self {
            ConfigValue::Int(n) => n.to_string(),
            ConfigValue::Decimal(d) => d.clone(),
            ConfigValue::Bool(b) => if *b { "1" } else { "0" }.to_string(),
            ConfigValue::Text(t) => t.clone(),
        }
    }

    /// The value as JSON (numbers, booleans, strings).
    pub fn to_json(&self) -> Value {
        match self {
            ConfigValue::Int(n) => Value::from(*n),
            ConfigValue::Decimal(d) => d
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(d.clone())),
            ConfigValue::Bool(b) => Value::Bool(*b),
            ConfigValue::Text(t) => Value::String(t.clone()),
        }
    }
}

/// `set_config`'s params: `{"config": {KEY: VALUE|null}}`, 1..=10 keys, `null` deletes the
/// key (PVE `delete=`). Built only by deserializing (or [`SetConfigParams::new`]), so every
/// value fits its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetConfigParams {
    config: BTreeMap<ConfigKey, Option<ConfigValue>>,
}

impl SetConfigParams {
    /// Checks a config object's entries (in order; a key twice is refused).
    pub fn new<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a Value)>,
    ) -> Result<SetConfigParams, ParamError> {
        let mut config = BTreeMap::new();
        for (k, v) in entries {
            let key = ConfigKey::parse(k)
                .ok_or_else(|| ParamError::UnknownKey(k.chars().take(64).collect()))?;
            let value = match v {
                Value::Null => None,
                v => Some(key.value(v)?),
            };
            if config.insert(key, value).is_some() {
                return Err(ParamError::DuplicateKey(key.as_str().into()));
            }
        }
        if config.is_empty() || config.len() > MAX_CONFIG_KEYS {
            return Err(ParamError::KeyCount(config.len()));
        }
        Ok(SetConfigParams { config })
    }

    /// The keys and their new values (`None`: delete the key).
    pub fn config(&self) -> &BTreeMap<ConfigKey, Option<ConfigValue>> {
        &self.config
    }

    /// Whether it sets `protection` to false or deletes it: that makes the operation
    /// irreversible (a protected guest may then be destroyed).
    pub fn clears_protection(&self) -> bool {
        matches!(
            self.config.get(&ConfigKey::Protection),
            Some(None | Some(ConfigValue::Bool(false)))
        )
    }

    /// The keys that exist only on containers are refused for a VM.
    pub fn check_target(&self, t: GuestType) -> Result<(), ParamError> {
        if t == GuestType::Qemu {
            if let Some(key) = self.config.keys().find(|k| k.lxc_only()) {
                return Err(ParamError::LxcOnly { key: *key });
            }
            // QEMU's cpulimit maximum is 128 (LXC's 8192).
            if let Some(Some(ConfigValue::Decimal(d))) = self.config.get(&ConfigKey::Cpulimit)
                && d.parse::<f64>().is_ok_and(|x| x > 128.0)
            {
                return Err(ParamError::BadValue {
                    key: ConfigKey::Cpulimit,
                    why: "must be in 0..=128 on a VM".into(),
                });
            }
        }
        Ok(())
    }

    /// `{KEY: VALUE|null}` as JSON (`null`: delete).
    pub fn to_json_map(&self) -> BTreeMap<String, Value> {
        self.config
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.as_ref().map(ConfigValue::to_json).unwrap_or(Value::Null),
                )
            })
            .collect()
    }
}

impl Serialize for SetConfigParams {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out {
            config: BTreeMap<String, Value>,
        }
        Out {
            config: self.to_json_map(),
        }
        .serialize(s)
    }
}

/// A JSON object's entries in order, duplicates kept (serde_json's maps would keep only
/// the last of two equal keys, silently).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entries, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of config keys")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for SetConfigParams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SetConfigParams, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            config: Entries,
        }
        let raw = Raw::deserialize(d)?;
        SetConfigParams::new(raw.config.0.iter().map(|(k, v)| (k.as_str(), v)))
            .map_err(de::Error::custom)
    }
}

/// Where a backup archive lives: a vzdump file on a storage or a Proxmox Backup Server
/// snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupFormat {
    Vzdump,
    Pbs,
}

/// A backup volume id, checked: `STORAGE:backup/vzdump-(lxc|qemu)-VMID-YYYY_MM_DD-HH_MM_SS.EXT`
/// (EXT `tar`, `tar.gz`, `tar.zst`, `tar.lzo` for lxc; `vma`, `vma.gz`, `vma.zst`, `vma.lzo`
/// for qemu) or `STORAGE:backup/(ct|vm)/VMID/YYYY-MM-DDTHH:MM:SSZ` (PBS). It knows the guest
/// type and the vmid the backup was made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupVolid {
    text: String,
    storage: StorageId,
    guest_type: GuestType,
    vmid: Vmid,
    format: BackupFormat,
}

fn two_digits_in(s: &str, lo: u32, hi: u32) -> bool {
    s.len() == 2
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.parse::<u32>().is_ok_and(|n| (lo..=hi).contains(&n))
}

/// `YYYY?MM?DD?HH?MM?SS` with the given separators (date, date-time, time).
fn valid_stamp(s: &str, date_sep: char, mid: char, time_sep: char) -> bool {
    let b = s.as_bytes();
    b.len() == 19
        && s.is_char_boundary(4)
        && b[..4].iter().all(|c| c.is_ascii_digit())
        && b[4] as char == date_sep
        && b[7] as char == date_sep
        && b[10] as char == mid
        && b[13] as char == time_sep
        && b[16] as char == time_sep
        && s.is_ascii()
        && two_digits_in(&s[5..7], 1, 12)
        && two_digits_in(&s[8..10], 1, 31)
        && two_digits_in(&s[11..13], 0, 23)
        && two_digits_in(&s[14..16], 0, 59)
        && two_digits_in(&s[17..19], 0, 59)
}

fn parse_vmid(s: &str) -> Option<Vmid> {
    if s.is_empty() || s.len() > 9 || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().and_then(|n| Vmid::new(n).ok())
}

impl BackupVolid {
    pub fn new(s: impl Into<String>) -> Result<BackupVolid, ParamError> {
        let text: String = s.into();
        let err = |why: &'static str| ParamError::Volid {
            volid: text.chars().take(96).collect(),
            why,
        };
        let (storage, path) = text
            .split_once(':')
            .ok_or_else(|| err("not STORAGE:backup/…"))?;
        let storage = StorageId::new(storage).map_err(|_| err("not a valid storage id"))?;
        let path = path
            .strip_prefix("backup/")
            .ok_or_else(|| err("not STORAGE:backup/…"))?;
        let (guest_type, vmid, format) = if let Some(file) = path.strip_prefix("vzdump-") {
            let (ty, rest) = if let Some(r) = file.strip_prefix("lxc-") {
                (GuestType::Lxc, r)
            } else if let Some(r) = file.strip_prefix("qemu-") {
                (GuestType::Qemu, r)
            } else {
                return Err(err("a vzdump archive is vzdump-lxc-… or vzdump-qemu-…"));
            };
            let (vmid, rest) = rest.split_once('-').ok_or_else(|| err("no vmid"))?;
            let vmid = parse_vmid(vmid).ok_or_else(|| err("not a valid vmid"))?;
            if rest.len() < 20 || !rest.is_char_boundary(19) {
                return Err(err("no YYYY_MM_DD-HH_MM_SS time"));
            }
            let (stamp, ext) = rest.split_at(19);
            if !valid_stamp(stamp, '_', '-', '_') {
                return Err(err("no YYYY_MM_DD-HH_MM_SS time"));
            }
            let exts: &[&str] = match ty {
                GuestType::Lxc => &[".tar", ".tar.gz", ".tar.zst", ".tar.lzo"],
                GuestType::Qemu => &[".vma", ".vma.gz", ".vma.zst", ".vma.lzo"],
            };
            if !exts.contains(&ext) {
                return Err(err(
                    "not a vzdump archive extension for its guest type (tar… for lxc, vma… for qemu)",
                ));
            }
            (ty, vmid, BackupFormat::Vzdump)
        } else {
            let (ty, rest) = if let Some(r) = path.strip_prefix("ct/") {
                (GuestType::Lxc, r)
            } else if let Some(r) = path.strip_prefix("vm/") {
                (GuestType::Qemu, r)
            } else {
                return Err(err(
                    "neither a vzdump archive nor a PBS backup (backup/ct/… or backup/vm/…)",
                ));
            };
            let (vmid, stamp) = rest.split_once('/').ok_or_else(|| err("no vmid"))?;
            let vmid = parse_vmid(vmid).ok_or_else(|| err("not a valid vmid"))?;
            let Some(stamp) = stamp.strip_suffix('Z') else {
                return Err(err("a PBS backup time is YYYY-MM-DDTHH:MM:SSZ"));
            };
            if !valid_stamp(stamp, '-', 'T', ':') {
                return Err(err("a PBS backup time is YYYY-MM-DDTHH:MM:SSZ"));
            }
            (ty, vmid, BackupFormat::Pbs)
        };
        Ok(BackupVolid {
            text,
            storage,
            guest_type,
            vmid,
            format,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The storage the archive is on.
    pub fn storage(&self) -> &StorageId {
        &self.storage
    }

    /// The type of the guest the backup was made of.
    pub fn guest_type(&self) -> GuestType {
        self.guest_type
    }

    /// The vmid the backup was made of (a restore may target another one).
    pub fn vmid(&self) -> Vmid {
        self.vmid
    }

    pub fn format(&self) -> BackupFormat {
        self.format
    }
}

impl TryFrom<String> for BackupVolid {
    type Error = ParamError;
    fn try_from(s: String) -> Result<Self, ParamError> {
        BackupVolid::new(s)
    }
}

impl From<BackupVolid> for String {
    fn from(v: BackupVolid) -> String {
        v.text
    }
}

impl fmt::Display for BackupVolid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn set(v: Value) -> Result<SetConfigParams, String> {
        serde_json::from_value::<SetConfigParams>(v).map_err(|e| e.to_string())
    }

    #[test]
    fn every_key_takes_its_typed_value_and_null_deletes() {
        let p = set(json!({"config": {
            "memory": 2048, "swap": 0, "cores": 4, "cpulimit": 1.5, "onboot": 1,
            "description": "web\nfront", "tags": "prod;web", "hostname": "web1.lan",
            "nesting": true, "protection": null}}))
        .unwrap();
        let c = p.config();
        assert_eq!(c.len(), 10);
        assert_eq!(c[&ConfigKey::Memory], Some(ConfigValue::Int(2048)));
        assert_eq!(
            c[&ConfigKey::Cpulimit],
            Some(ConfigValue::Decimal("1.5".into()))
        );
        assert_eq!(c[&ConfigKey::Onboot], Some(ConfigValue::Bool(true)));
        assert_eq!(c[&ConfigKey::Protection], None);
        assert_eq!(c[&ConfigKey::Onboot].as_ref().unwrap().pve_param(), "1");
        assert!(p.clears_protection());
        // its JSON form reads back as itself
        let back = set(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(p.to_json_map()["protection"], Value::Null);
        assert_eq!(p.to_json_map()["cpulimit"], json!(1.5));
        assert_eq!(
            set(json!({"config": {"cpulimit": 2}})).unwrap().config()[&ConfigKey::Cpulimit],
            Some(ConfigValue::Decimal("2".into()))
        );
    }

    #[test]
    fn protection_is_cleared_only_by_false_zero_or_null() {
        for (v, clears) in [
            (json!(false), true),
            (json!(0), true),
            (Value::Null, true),
            (json!(true), false),
            (json!(1), false),
        ] {
            let p = set(json!({"config": {"protection": v}})).unwrap();
            assert_eq!(p.clears_protection(), clears, "{v}");
        }
        assert!(
            !set(json!({"config": {"memory": 512}}))
                .unwrap()
                .clears_protection()
        );
    }

    #[test]
    fn bad_config_shapes_are_refused_with_what_is_wrong() {
        for (v, want) in [
            (json!({"config": {}}), "1..=10 keys"),
            (
                json!({"config": {"memory": 1024}, "force": true}),
                "unknown field",
            ),
            (json!({}), "missing field"),
            (json!({"config": []}), "JSON object"),
            (
                json!({"config": {"rootfs": "local:8"}}),
                "unknown config key",
            ),
            (json!({"config": {"memory": 15}}), "16..=4194304"),
            (json!({"config": {"memory": 4_194_305}}), "16..=4194304"),
            (json!({"config": {"memory": "1024"}}), "integer"),
            (json!({"config": {"memory": 1024.5}}), "integer"),
            (json!({"config": {"cores": 0}}), "1..=8192"),
            (json!({"config": {"cpulimit": -1}}), "0..=8192"),
            (json!({"config": {"cpulimit": "1.5"}}), "0..=8192"),
            (json!({"config": {"onboot": 2}}), "true, false, 0 or 1"),
            (
                json!({"config": {"protection": "0"}}),
                "true, false, 0 or 1",
            ),
            (
                json!({"config": {"description": "x".repeat(8193)}}),
                "8 KiB",
            ),
            (
                json!({"config": {"description": "a\u{1b}[2J"}}),
                "control character",
            ),
            (json!({"config": {"tags": "-bad"}}), "tags are separated"),
            (json!({"config": {"tags": "a/b"}}), "tags are separated"),
            (json!({"config": {"hostname": "-web"}}), "hostname"),
            (json!({"config": {"hostname": 5}}), "must be a string"),
        ] {
            let err = set(v.clone()).unwrap_err();
            assert!(err.contains(want), "{v}: {err}");
        }
        let eleven: serde_json::Map<String, Value> =
            (0..11).map(|i| (format!("k{i}"), json!(1))).collect();
        // eleven keys: the first unknown one is named before the count
        assert!(
            set(json!({"config": eleven}))
                .unwrap_err()
                .contains("unknown config key")
        );
    }

    #[test]
    fn a_key_given_twice_is_refused() {
        let err = serde_json::from_str::<SetConfigParams>(
            r#"{"config":{"protection":1,"memory":512,"protection":0}}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("protection is given twice"),
            "{err}"
        );
    }

    #[test]
    fn container_only_keys_and_the_vm_cpulimit_range() {
        for key in ["swap", "hostname", "nesting"] {
            let v = match key {
                "swap" => json!(512),
                "hostname" => json!("web1"),
                _ => json!(true),
            };
            let p = set(json!({"config": {key: v}})).unwrap();
            p.check_target(GuestType::Lxc).unwrap();
            assert_eq!(
                p.check_target(GuestType::Qemu).unwrap_err().to_string(),
                format!("config {key} applies to lxc guests only")
            );
        }
        let p = set(json!({"config": {"cpulimit": 200}})).unwrap();
        p.check_target(GuestType::Lxc).unwrap();
        assert!(p.check_target(GuestType::Qemu).is_err());
        set(json!({"config": {"cpulimit": 128}}))
            .unwrap()
            .check_target(GuestType::Qemu)
            .unwrap();
    }

    #[test]
    fn backup_volids_know_their_guest_type() {
        for (s, ty, vmid, fmt) in [
            (
                "local:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst",
                GuestType::Lxc,
                101,
                BackupFormat::Vzdump,
            ),
            (
                "nas:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar",
                GuestType::Lxc,
                101,
                BackupFormat::Vzdump,
            ),
            (
                "nas:backup/vzdump-qemu-9001-2024_12_01-23_59_59.vma.gz",
                GuestType::Qemu,
                9001,
                BackupFormat::Vzdump,
            ),
            (
                "local:backup/vzdump-qemu-100-2025_02_28-00_00_00.vma",
                GuestType::Qemu,
                100,
                BackupFormat::Vzdump,
            ),
            (
                "pbs-1:backup/ct/101/2025-01-31T02:00:05Z",
                GuestType::Lxc,
                101,
                BackupFormat::Pbs,
            ),
            (
                "pbs:backup/vm/202/2025-12-31T23:59:59Z",
                GuestType::Qemu,
                202,
                BackupFormat::Pbs,
            ),
        ] {
            let v = BackupVolid::new(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(
                (v.guest_type(), v.vmid().get(), v.format(), v.as_str()),
                (ty, vmid, fmt, s)
            );
            assert_eq!(v.storage().as_str(), s.split(':').next().unwrap());
            let back: BackupVolid = serde_json::from_value(json!(s)).unwrap();
            assert_eq!(back, v);
        }
    }

    #[test]
    fn malformed_backup_volids_are_refused() {
        for s in [
            "",
            "backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst",
            "local:vztmpl/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst",
            "lo/cal:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst",
            "local:backup/vzdump-lxc-101-2025_01_31-02_00_05.vma.zst",
            "local:backup/vzdump-qemu-101-2025_01_31-02_00_05.tar.zst",
            "local:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.xz",
            "local:backup/vzdump-lxc-101-2025_13_31-02_00_05.tar",
            "local:backup/vzdump-lxc-101-2025_01_31-24_00_05.tar",
            "local:backup/vzdump-lxc-99-2025_01_31-02_00_05.tar",
            "local:backup/vzdump-lxc-0101-2025_01_31-02_00_05.tar",
            "local:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar/../x",
            "local:backup/vzdump-docker-101-2025_01_31-02_00_05.tar",
            "local:backup/vzdump-lxc-101-2025_01_31-02_00_05",
            "local:backup/vzdump-lxc-101-2025_01_31-02_00_0é.tar",
            "pbs:backup/ct/101/2025-01-31T02:00:05",
            "pbs:backup/ct/101/2025-01-31 02:00:05Z",
            "pbs:backup/ct/101/2025-01-31T02:00:05+01:00",
            "pbs:backup/host/101/2025-01-31T02:00:05Z",
            "pbs:backup/vm/abc/2025-01-31T02:00:05Z",
        ] {
            assert!(
                matches!(BackupVolid::new(s), Err(ParamError::Volid { .. })),
                "{s:?} accepted"
            );
        }
    }
}
