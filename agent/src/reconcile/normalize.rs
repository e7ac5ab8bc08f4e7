//! Normalization of the managed config fields, so Proxmox's round-trip rules never read as
//! drift (API notes §7).
//!
//! Owns: the list of managed fields ([`Field`]), how each is read from a desired value and
//! from a raw PVE config map (`serde_json::Map`, as the client returns it), each field's
//! default when the key is absent, and how a normalized value is written back as a PUT
//! parameter. Also the net0 comparison (parsed key=value maps, generated `hwaddr`/`type`
//! ignored unless set) and the description normalizer `selftest` shares.
//!
//! Rules per field:
//! - `description`: `\r\n` → `\n`, trailing newlines stripped (PVE appends one per comment
//!   line on read).
//! - `onboot`: 0/1, `"0"`/`"1"`, true/false (and yes/no/on/off) are one boolean; absent is
//!   false.
//! - `tags`: split on `;`, `,` and whitespace, lower-cased, sorted, de-duplicated; absent is
//!   the empty set; written joined by `;`.
//! - `memory`/`swap`: MiB integers; numbers or numeric strings; QEMU's `current=N` property
//!   form; absent is 512.
//! - `cores`: integer; absent is "not set" on LXC (all host cores) and 1 on QEMU.
//! - `cpulimit`: a decimal that PVE returns as a string (`"1.5"`); compared as a number,
//!   written in shortest form; absent is 0 (unlimited).
//! - `hostname` (LXC): compared verbatim; absent is "not set".
//! - `nesting` (LXC): the one flag inside `features`; absent is false. It is written by
//!   merging that flag into the guest's existing `features` string: every other flag
//!   (keyctl, fuse, mknod, mount, ...) is kept verbatim, since a token may not change them.
//!
//! Must never: report drift for a value PVE merely re-spelled, or produce a write that
//! changes any features flag other than nesting.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Why a value could not be normalized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    #[error("{field}: {reason} (got {got})")]
    BadValue {
        field: &'static str,
        reason: &'static str,
        got: String,
    },
    #[error("unknown config key {0:?}; managed keys are {keys}", keys = Field::ALL_KEYS)]
    UnknownField(String),
}

fn bad(field: Field, reason: &'static str, got: &Value) -> NormalizeError {
    let mut got = got.to_string();
    if got.len() > 80 {
        let mut cut = 80;
        while !got.is_char_boundary(cut) {
            cut -= 1;
        }
        got.truncate(cut);
        got.push('…');
    }
    NormalizeError::BadValue {
        field: field.key(),
        reason,
        got,
    }
}

/// LXC container or QEMU VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    Lxc,
    Qemu,
}

impl fmt::Display for GuestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestKind::Lxc => "lxc",
            GuestKind::Qemu => "qemu",
        })
    }
}

/// A managed config field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Field {
    Memory,
    Swap,
    Cores,
    Cpulimit,
    Onboot,
    Description,
    Tags,
    Hostname,
    Nesting,
}

impl Field {
    pub const ALL: [Field; 9] = [
        Field::Memory,
        Field::Swap,
        Field::Cores,
        Field::Cpulimit,
        Field::Onboot,
        Field::Description,
        Field::Tags,
        Field::Hostname,
        Field::Nesting,
    ];
    const ALL_KEYS: &'static str =
        "memory, swap, cores, cpulimit, onboot, description, tags, hostname, nesting";

    /// The key as Proxmox (and the desired-state file) names it.
    pub fn key(self) -> &'static str {
        match self {
            Field::Memory => "memory",
            Field::Swap => "swap",
            Field::Cores => "cores",
            Field::Cpulimit => "cpulimit",
            Field::Onboot => "onboot",
            Field::Description => "description",
            Field::Tags => "tags",
            Field::Hostname => "hostname",
            Field::Nesting => "nesting",
        }
    }

    pub fn from_key(key: &str) -> Result<Field, NormalizeError> {
        Field::ALL
            .into_iter()
            .find(|f| f.key() == key)
            .ok_or_else(|| NormalizeError::UnknownField(key.to_string()))
    }

    /// Whether the field exists for this kind of guest.
    pub fn applies_to(self, kind: GuestKind) -> bool {
        match self {
            Field::Swap | Field::Hostname | Field::Nesting => kind == GuestKind::Lxc,
            _ => true,
        }
    }

    /// Normalizes a desired value (strict: the right JSON type, or a numeric string).
    pub fn desired(self, v: &Value) -> Result<Norm, NormalizeError> {
        self.parse(v)
    }

    /// Normalizes this field of a raw PVE config; an absent key gives the schema default.
    pub fn actual(
        self,
        kind: GuestKind,
        config: &Map<String, Value>,
    ) -> Result<Norm, NormalizeError> {
        if self == Field::Nesting {
            return Ok(Norm::Bool(match config.get("features") {
                None => false,
                Some(Value::String(s)) => features_nesting(s),
                Some(other) => return Err(bad(self, "features is not a string", other)),
            }));
        }
        match config.get(self.key()) {
            None | Some(Value::Null) => Ok(self.default_for(kind)),
            Some(v) => self.parse(v),
        }
    }

    /// The value PVE assumes when the key is absent.
    pub fn default_for(self, kind: GuestKind) -> Norm {
        match self {
            Field::Memory | Field::Swap => Norm::Int(512),
            Field::Cores => match kind {
                GuestKind::Lxc => Norm::Unset,
                GuestKind::Qemu => Norm::Int(1),
            },
            Field::Cpulimit => Norm::Decimal("0".into()),
            Field::Onboot | Field::Nesting => Norm::Bool(false),
            Field::Description => Norm::Text(String::new()),
            Field::Tags => Norm::Tags(BTreeSet::new()),
            Field::Hostname => Norm::Unset,
        }
    }

    fn parse(self, v: &Value) -> Result<Norm, NormalizeError> {
        match self {
            Field::Memory | Field::Swap => parse_mib(self, v).map(Norm::Int),
            Field::Cores => parse_uint(self, v).map(Norm::Int),
            Field::Cpulimit => parse_decimal(self, v).map(Norm::Decimal),
            Field::Onboot | Field::Nesting => parse_bool(self, v).map(Norm::Bool),
            Field::Description => match v {
                Value::String(s) if s.len() > 8192 => {
                    Err(bad(self, "longer than PVE's 8 KiB limit", v))
                }
                Value::String(s) => Ok(Norm::Text(description(s))),
                other => Err(bad(self, "must be a string", other)),
            },
            Field::Tags => match v {
                Value::String(s) => tags(s).map(Norm::Tags).map_err(|r| bad(self, r, v)),
                Value::Array(items) => {
                    let mut joined = String::new();
                    for it in items {
                        let Value::String(s) = it else {
                            return Err(bad(self, "tags must be strings", v));
                        };
                        joined.push(';');
                        joined.push_str(s);
                    }
                    tags(&joined).map(Norm::Tags).map_err(|r| bad(self, r, v))
                }
                other => Err(bad(self, "must be a string or a list of strings", other)),
            },
            Field::Hostname => match v {
                Value::String(s) if valid_hostname(s) => Ok(Norm::Text(s.clone())),
                Value::String(_) => Err(bad(self, "not a valid DNS name", v)),
                other => Err(bad(self, "must be a string", other)),
            },
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// A normalized field value: equal values mean "no drift".
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// The key is absent and has no numeric default (LXC `cores`, `hostname`).
    Unset,
    Int(u64),
    /// Shortest decimal form (`"1.5"`, `"2"`).
    Decimal(String),
    Bool(bool),
    Text(String),
    Tags(BTreeSet<String>),
}

/// One parameter of a config write.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Param {
    /// `key=value` in the PUT body.
    Set(String, String),
    /// The key goes into the PUT's `delete` list (back to the default).
    Delete(String),
}

/// The PUT parameter that makes `field` equal `want`. `config` is the guest's current raw
/// config (needed for nesting, which merges into `features`). `None` when `want` cannot be
/// written (it is `Unset`, which the desired side never produces).
pub fn write_param(field: Field, want: &Norm, config: &Map<String, Value>) -> Option<Param> {
    let key = field.key().to_string();
    match (field, want) {
        (Field::Nesting, Norm::Bool(b)) => {
            let current = match config.get("features") {
                Some(Value::String(s)) => s.as_str(),
                _ => "",
            };
            let merged = features_with_nesting(current, *b);
            Some(if merged.is_empty() {
                Param::Delete("features".into())
            } else {
                Param::Set("features".into(), merged)
            })
        }
        (_, Norm::Unset) => None,
        (_, Norm::Int(n)) => Some(Param::Set(key, n.to_string())),
        (_, Norm::Decimal(d)) => Some(Param::Set(key, d.clone())),
        (_, Norm::Bool(b)) => Some(Param::Set(key, if *b { "1" } else { "0" }.into())),
        (Field::Description | Field::Tags, Norm::Text(t)) if t.is_empty() => {
            Some(Param::Delete(key))
        }
        (_, Norm::Text(t)) => Some(Param::Set(key, t.clone())),
        (_, Norm::Tags(t)) if t.is_empty() => Some(Param::Delete(key)),
        (_, Norm::Tags(t)) => Some(Param::Set(
            key,
            t.iter().cloned().collect::<Vec<_>>().join(";"),
        )),
    }
}

/// Description as compared: `\r` before a line end dropped (`\r\n` → `\n`), trailing
/// line ends removed (PVE appends `\n` to each comment line it reads back).
pub fn description(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\n' {
            while out.ends_with('\r') {
                out.pop();
            }
        }
        out.push(c);
    }
    let end = out.trim_end_matches(['\n', '\r']).len();
    out.truncate(end);
    out
}

/// Tags as PVE stores them: split on `;`, `,`, whitespace; lower-cased; sorted; unique.
pub fn tags(s: &str) -> Result<BTreeSet<String>, &'static str> {
    let mut out = BTreeSet::new();
    for t in s.split(|c: char| c == ';' || c == ',' || c.is_whitespace()) {
        if t.is_empty() {
            continue;
        }
        let t = t.to_ascii_lowercase();
        let mut chars = t.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "_-+.".contains(c)) {
            return Err("a tag must match [a-z0-9_][a-z0-9_+.-]*");
        }
        out.insert(t);
    }
    Ok(out)
}

fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn parse_uint(field: Field, v: &Value) -> Result<u64, NormalizeError> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| bad(field, "must be a non-negative integer", v)),
        Value::String(s) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| bad(field, "must be a non-negative integer", v)),
        _ => Err(bad(field, "must be a non-negative integer", v)),
    }
}

/// MiB: a number, a numeric string, or QEMU's `[current=]N[,…]` property string.
fn parse_mib(field: Field, v: &Value) -> Result<u64, NormalizeError> {
    if let Value::String(s) = v {
        for part in s.split(',') {
            let part = part.trim();
            let val = part.strip_prefix("current=").unwrap_or(part);
            if !part.contains('=') || part.starts_with("current=") {
                return val
                    .parse::<u64>()
                    .map_err(|_| bad(field, "must be MiB as an integer", v));
            }
        }
        return Err(bad(field, "must be MiB as an integer", v));
    }
    parse_uint(field, v)
}

fn parse_decimal(field: Field, v: &Value) -> Result<String, NormalizeError> {
    let x = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match x {
        Some(x) if x.is_finite() && x >= 0.0 => Ok(decimal(x)),
        _ => Err(bad(field, "must be a non-negative number", v)),
    }
}

/// Shortest form: 2.0 → "2", 1.50 → "1.5".
fn decimal(x: f64) -> String {
    // `{}` on f64 is the shortest representation that round-trips; 0.0 and -0.0 → "0".
    if x == 0.0 {
        "0".to_string()
    } else {
        format!("{x}")
    }
}

fn parse_bool(field: Field, v: &Value) -> Result<bool, NormalizeError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => match n.as_u64() {
            Some(0) => Ok(false),
            Some(1) => Ok(true),
            _ => Err(bad(field, "must be a boolean (0/1)", v)),
        },
        Value::String(s) => str_bool(s).ok_or_else(|| bad(field, "must be a boolean (0/1)", v)),
        _ => Err(bad(field, "must be a boolean (0/1)", v)),
    }
}

fn str_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Splits a property string `a=1,b=2` into (key, value) pairs in order; a bare item gets
/// the key `""`.
fn property_items(s: &str) -> Vec<(&str, &str)> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => ("", p.trim()),
        })
        .collect()
}

/// The nesting flag of a `features` string.
fn features_nesting(features: &str) -> bool {
    property_items(features)
        .into_iter()
        .rev()
        .find(|(k, _)| *k == "nesting")
        .and_then(|(_, v)| str_bool(v))
        .unwrap_or(false)
}

/// `features` with nesting set to `on` and every other item kept verbatim, in order.
/// Nesting off removes the item (absent means off).
pub fn features_with_nesting(features: &str, on: bool) -> String {
    let mut items: Vec<String> = features
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .filter(|p| p.split_once('=').map(|(k, _)| k.trim()) != Some("nesting"))
        .map(|p| p.to_string())
        .collect();
    if on {
        items.push("nesting=1".to_string());
    }
    items.join(",")
}

/// A network device string (`net0`) as a comparable map. `hwaddr` and `type` are dropped
/// unless `keep_generated` (PVE fills them in), booleans inside become 0/1, MACs are
/// compared case-insensitively.
pub fn net(s: &str, keep_generated: bool) -> BTreeMap<String, String> {
    property_items(s)
        .into_iter()
        .filter(|(k, _)| keep_generated || (*k != "hwaddr" && *k != "type"))
        .map(|(k, v)| {
            let v = match k {
                "firewall" | "link_down" => str_bool(v)
                    .map(|b| if b { "1" } else { "0" }.to_string())
                    .unwrap_or_else(|| v.to_string()),
                "hwaddr" | "macaddr" => v.to_ascii_uppercase(),
                _ => v.to_string(),
            };
            (k.to_string(), v)
        })
        .collect()
}

/// Whether a desired net string matches the actual one under PVE's re-printing: the keys
/// the desired side sets must match; `hwaddr`/`type` count only if the desired side sets
/// them.
pub fn net_matches(desired: &str, actual: &str) -> bool {
    let want = net(desired, true);
    let have = net(actual, true);
    want.iter().all(|(k, v)| have.get(k) == Some(v))
        && have
            .keys()
            .all(|k| want.contains_key(k) || k == "hwaddr" || k == "type")
}

#[cfg(test)]
mod tests;
