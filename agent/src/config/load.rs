//! The loader: file → JSON tree (unknown keys rejected) → environment overrides → typed
//! [`Config`] with validation that names the field, plus the provenance of every value.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::fields::{self, FIELDS, Field, Kind};
use super::{
    AuthzConfig, CloudflaredConfig, Config, ConfigError, ControlConfig, DesiredSource, GateConfig,
    HostConfig, HubConfig, HubMode, HubTls, PrivhelperConfig, ProxmoxConfig, ReconcileConfig,
    RestoreTestsConfig, RestoreWindow, Secret, SensorsConfig, SmartConfig, TlsVerify,
};

/// Biggest config file we read; a daemon's config is a few hundred bytes.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// Biggest secret file we read.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// The environment as the loader sees it: variable → value. Only `FELHOM_AGENT_*` names
/// of known fields and `CREDENTIALS_DIRECTORY` are ever looked up.
pub type EnvMap = BTreeMap<String, String>;

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// The built-in default.
    Default,
    /// Not set anywhere and no default (an optional field).
    Unset,
    /// The config file.
    File { path: PathBuf },
    /// An environment variable.
    Env { var: String },
    /// Unset on purpose by an empty environment variable.
    UnsetByEnv { var: String },
    /// Read from a secret file (`*_file` field).
    SecretFile { path: PathBuf },
    /// Read from a systemd credential (`$CREDENTIALS_DIRECTORY/<name>`).
    Credential { path: PathBuf },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Unset => f.write_str("unset"),
            Source::File { path } => write!(f, "file {}", path.display()),
            Source::Env { var } => write!(f, "env {var}"),
            Source::UnsetByEnv { var } => write!(f, "unset by env {var}"),
            Source::SecretFile { path } => write!(f, "secret file {}", path.display()),
            Source::Credential { path } => write!(f, "credential {}", path.display()),
        }
    }
}

/// One field of the effective configuration, as `config check` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FieldOrigin {
    /// Dotted JSON path (`proxmox.tls.pin_sha256`).
    pub field: &'static str,
    /// The environment variable that overrides it.
    pub env: &'static str,
    /// The effective value as text; `<redacted>` for secrets; `None` when unset.
    pub value: Option<String>,
    pub source: Source,
}

/// Where every value of a [`LoadedConfig`] came from.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub config_file: PathBuf,
    pub fields: Vec<FieldOrigin>,
}

impl Provenance {
    pub fn get(&self, field: &str) -> Option<&FieldOrigin> {
        self.fields.iter().find(|f| f.field == field)
    }
}

/// The result of [`Config::load`]: the typed config, where each value came from, and
/// warnings the operator should see (insecure TLS, test-only settings, a world-readable
/// file that holds a secret).
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    pub provenance: Provenance,
    pub warnings: Vec<String>,
}

/// A raw value before typing. It may hold a secret, so its `Debug` shows only the kind.
#[derive(Clone, PartialEq)]
enum Raw {
    Str(String),
    U64(u64),
    Bool(bool),
    List(Vec<String>),
    Fraction(f64),
}

impl fmt::Debug for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Raw::Str(_) => "Raw::Str(..)",
            Raw::U64(_) => "Raw::U64(..)",
            Raw::Bool(_) => "Raw::Bool(..)",
            Raw::List(_) => "Raw::List(..)",
            Raw::Fraction(_) => "Raw::Fraction(..)",
        })
    }
}

#[derive(Debug, Clone)]
struct Resolved {
    value: Option<Raw>,
    source: Source,
}

/// Every field resolved from env and file, before typing.
struct Layer {
    file: PathBuf,
    values: BTreeMap<&'static str, Resolved>,
}

impl Layer {
    fn get(&self, path: &str) -> &Resolved {
        // Every path asked for is in FIELDS, and `resolve` inserts every field of FIELDS.
        static UNSET: Resolved = Resolved {
            value: None,
            source: Source::Unset,
        };
        self.values.get(path).unwrap_or(&UNSET)
    }

    fn origin(&self, path: &str) -> String {
        self.get(path).source.to_string()
    }

    fn invalid(&self, path: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            field: path.to_string(),
            origin: self.origin(path),
            reason: reason.into(),
        }
    }

    fn str(&self, path: &str) -> Option<&str> {
        match &self.get(path).value {
            Some(Raw::Str(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    fn path(&self, path: &str) -> Result<Option<PathBuf>, ConfigError> {
        match self.str(path) {
            None => Ok(None),
            Some(s) => {
                let p = PathBuf::from(s);
                if !p.is_absolute() {
                    return Err(self.invalid(path, format!("{s:?} is not an absolute path")));
                }
                Ok(Some(p))
            }
        }
    }

    fn path_or(&self, path: &str, default: PathBuf) -> Result<PathBuf, ConfigError> {
        Ok(self.path(path)?.unwrap_or(default))
    }

    fn u64(&self, path: &str) -> Option<u64> {
        match &self.get(path).value {
            Some(Raw::U64(n)) => Some(*n),
            _ => None,
        }
    }

    fn positive_or(&self, path: &str, default: u64) -> Result<u64, ConfigError> {
        match self.u64(path) {
            None => Ok(default),
            Some(0) => Err(self.invalid(path, "must be greater than 0")),
            Some(n) => Ok(n),
        }
    }

    fn bool(&self, path: &str) -> Option<bool> {
        match &self.get(path).value {
            Some(Raw::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    fn fraction(&self, path: &str) -> Option<f64> {
        match &self.get(path).value {
            Some(Raw::Fraction(x)) => Some(*x),
            _ => None,
        }
    }

    fn list(&self, path: &str) -> Option<&[String]> {
        match &self.get(path).value {
            Some(Raw::List(l)) => Some(l.as_slice()),
            _ => None,
        }
    }
}

/// Loads the configuration from `path` (default [`super::DEFAULT_CONFIG_PATH`]) with the
/// given environment. [`Config::load`] calls this with the process environment.
pub(super) fn load(path: Option<&Path>, env: &EnvMap) -> Result<LoadedConfig, ConfigError> {
    let (layer, world_readable) = read_layer(path, env)?;
    build(&layer, env, world_readable)
}

/// Reads and resolves every field from the file and `env`; also says whether the file is
/// readable by every user.
fn read_layer(path: Option<&Path>, env: &EnvMap) -> Result<(Layer, bool), ConfigError> {
    let file = path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(super::DEFAULT_CONFIG_PATH));
    let (text, world_readable) = read_config_file(&file)?;
    let tree: Value = serde_json::from_str(&text).map_err(|e| ConfigError::Syntax {
        path: file.clone(),
        detail: e.to_string(),
    })?;
    let mut file_values = BTreeMap::new();
    match &tree {
        Value::Object(_) => walk(&tree, "", &file, &mut file_values)?,
        _ => {
            return Err(ConfigError::Syntax {
                path: file.clone(),
                detail: "the top level must be a JSON object".to_string(),
            });
        }
    }
    Ok((resolve(file, file_values, env)?, world_readable))
}

/// The sections a host-local command needs ([`HostConfig`]), from the same file and
/// environment as [`load`], without building (or requiring) the Proxmox and hub sections
/// and their secrets.
pub(super) fn load_host(path: Option<&Path>, env: &EnvMap) -> Result<HostConfig, ConfigError> {
    let layer = read_layer(path, env)?.0;
    build_host(&layer)
}

fn read_config_file(path: &Path) -> Result<(String, bool), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let read_err = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = fs::File::open(path).map_err(read_err)?;
    let meta = f.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(ConfigError::Syntax {
            path: path.to_path_buf(),
            detail: "not a regular file".to_string(),
        });
    }
    let mut text = String::new();
    let mut limited = f.take(MAX_CONFIG_BYTES + 1);
    limited.read_to_string(&mut text).map_err(read_err)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::Syntax {
            path: path.to_path_buf(),
            detail: format!("larger than {MAX_CONFIG_BYTES} bytes"),
        });
    }
    Ok((text, meta.permissions().mode() & 0o004 != 0))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Walks the file's JSON object, typing every known field and rejecting unknown keys.
fn walk(
    v: &Value,
    prefix: &str,
    file: &Path,
    out: &mut BTreeMap<&'static str, Raw>,
) -> Result<(), ConfigError> {
    let Value::Object(map) = v else {
        return Ok(());
    };
    for (key, value) in map {
        let full = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if let Some(field) = fields::lookup(&full) {
            if let Some(raw) = file_value(field, value, file)? {
                out.insert(field.path, raw);
            }
        } else if fields::is_section(&full) {
            match value {
                Value::Object(_) => walk(value, &full, file, out)?,
                Value::Null => {}
                other => {
                    return Err(ConfigError::Invalid {
                        field: full,
                        origin: Source::File {
                            path: file.to_path_buf(),
                        }
                        .to_string(),
                        reason: format!("expected an object, found {}", type_name(other)),
                    });
                }
            }
        } else {
            return Err(ConfigError::UnknownKey {
                key: full,
                path: file.to_path_buf(),
            });
        }
    }
    Ok(())
}

fn file_value(field: &Field, v: &Value, file: &Path) -> Result<Option<Raw>, ConfigError> {
    let wrong = |expected: &str| ConfigError::Invalid {
        field: field.path.to_string(),
        origin: Source::File {
            path: file.to_path_buf(),
        }
        .to_string(),
        reason: format!("expected {expected}, found {}", type_name(v)),
    };
    if v.is_null() {
        return Ok(None);
    }
    let raw = match field.kind {
        Kind::Str | Kind::Path => match v {
            Value::String(s) if s.is_empty() => return Ok(None),
            Value::String(s) => Raw::Str(s.clone()),
            _ => return Err(wrong("a string")),
        },
        Kind::U64 => match v.as_u64() {
            Some(n) => Raw::U64(n),
            None => return Err(wrong("a whole number ≥ 0")),
        },
        Kind::Bool => match v {
            Value::Bool(b) => Raw::Bool(*b),
            _ => return Err(wrong("true or false")),
        },
        Kind::StrList => match v {
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        _ => return Err(wrong("an array of strings")),
                    }
                }
                Raw::List(out)
            }
            _ => return Err(wrong("an array of strings")),
        },
        Kind::Fraction => match v.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => Raw::Fraction(x),
            _ => return Err(wrong("a number from 0 to 1")),
        },
    };
    Ok(Some(raw))
}

fn env_value(field: &Field, value: &str) -> Result<Raw, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        field: field.path.to_string(),
        origin: Source::Env {
            var: field.env.to_string(),
        }
        .to_string(),
        reason,
    };
    Ok(match field.kind {
        Kind::Str | Kind::Path => Raw::Str(value.to_string()),
        Kind::U64 => {
            if !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(format!("{value:?} is not a whole number")));
            }
            Raw::U64(
                value
                    .parse()
                    .map_err(|e| invalid(format!("{value:?}: {e}")))?,
            )
        }
        Kind::Bool => match value.to_ascii_lowercase().as_str() {
            "true" | "1" => Raw::Bool(true),
            "false" | "0" => Raw::Bool(false),
            _ => {
                return Err(invalid(format!(
                    "{value:?} is not a boolean (use true, false, 1 or 0)"
                )));
            }
        },
        Kind::StrList => Raw::List(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        ),
        Kind::Fraction => match value.trim().parse::<f64>() {
            Ok(x) if (0.0..=1.0).contains(&x) => Raw::Fraction(x),
            _ => return Err(invalid(format!("{value:?} is not a number from 0 to 1"))),
        },
    })
}

/// Environment over file over default, field by field.
fn resolve(
    file: PathBuf,
    mut from_file: BTreeMap<&'static str, Raw>,
    env: &EnvMap,
) -> Result<Layer, ConfigError> {
    let mut values = BTreeMap::new();
    for field in FIELDS {
        let resolved = match env.get(field.env) {
            Some(v) if v.is_empty() => Resolved {
                value: None,
                source: Source::UnsetByEnv {
                    var: field.env.to_string(),
                },
            },
            Some(v) => Resolved {
                value: Some(env_value(field, v)?),
                source: Source::Env {
                    var: field.env.to_string(),
                },
            },
            None => match from_file.remove(field.path) {
                Some(raw) => Resolved {
                    value: Some(raw),
                    source: Source::File { path: file.clone() },
                },
                None => Resolved {
                    value: None,
                    source: Source::Unset,
                },
            },
        };
        values.insert(field.path, resolved);
    }
    Ok(Layer { file, values })
}

fn world_readable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

/// Reads a secret file: size-capped, one trailing line break removed.
fn read_secret_file(field: &str, path: &Path) -> Result<Secret, ConfigError> {
    let err = |source| ConfigError::SecretFile {
        field: field.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let f = fs::File::open(path).map_err(err)?;
    let mut buf = String::new();
    f.take(MAX_SECRET_BYTES)
        .read_to_string(&mut buf)
        .map_err(err)?;
    let trimmed = buf.strip_suffix('\n').unwrap_or(&buf);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    Ok(Secret::new(trimmed))
}

/// A secret may come from the field itself (file or env), from `<field>_file`, or from a
/// systemd credential; exactly one of them.
fn resolve_secret(
    layer: &Layer,
    env: &EnvMap,
    field: &'static str,
    file_field: &'static str,
    credential: &'static str,
) -> Result<Option<(Secret, Source)>, ConfigError> {
    let mut found: Vec<(String, Secret, Source)> = Vec::new();
    if let Some(s) = layer.str(field) {
        found.push((
            format!("{field} ({})", layer.origin(field)),
            Secret::new(s),
            layer.get(field).source.clone(),
        ));
    }
    if let Some(p) = layer.path(file_field)? {
        let secret = read_secret_file(field, &p)?;
        found.push((
            format!("{file_field} ({})", layer.origin(file_field)),
            secret,
            Source::SecretFile { path: p },
        ));
    }
    if let Some(dir) = env
        .get(fields::CREDENTIALS_DIRECTORY)
        .filter(|d| !d.is_empty())
    {
        let p = Path::new(dir).join(credential);
        if p.exists() {
            let secret = read_secret_file(field, &p)?;
            found.push((
                format!("credential {credential} ({})", p.display()),
                secret,
                Source::Credential { path: p },
            ));
        }
    }
    if found.len() > 1 {
        return Err(ConfigError::Conflict {
            first: found[0].0.clone(),
            second: found[1].0.clone(),
            hint: format!("give {field} in exactly one place"),
        });
    }
    let Some((_, secret, source)) = found.pop() else {
        return Ok(None);
    };
    if secret.is_empty() {
        return Err(ConfigError::Invalid {
            field: field.to_string(),
            origin: source.to_string(),
            reason: "is empty".to_string(),
        });
    }
    if !secret.expose().bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::Invalid {
            field: field.to_string(),
            origin: source.to_string(),
            reason: "contains whitespace or characters that are not printable ASCII".to_string(),
        });
    }
    Ok(Some((secret, source)))
}

/// `https://host[:port]` with nothing else; returned without a trailing slash.
fn https_base_url(layer: &Layer, field: &str, s: &str) -> Result<String, ConfigError> {
    let url = reqwest::Url::parse(s).map_err(|e| layer.invalid(field, format!("{s:?}: {e}")))?;
    check_base_url(layer, field, &url, &["https"])?;
    Ok(s.trim_end_matches('/').to_string())
}

fn check_base_url(
    layer: &Layer,
    field: &str,
    url: &reqwest::Url,
    schemes: &[&str],
) -> Result<(), ConfigError> {
    if !schemes.contains(&url.scheme()) {
        return Err(layer.invalid(
            field,
            format!(
                "scheme must be {}, not {}",
                schemes.join(" or "),
                url.scheme()
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(layer.invalid(field, "has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(layer.invalid(field, "must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(layer.invalid(field, "must not have a query or fragment"));
    }
    Ok(())
}

/// A PVE node name: `[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?`.
pub(crate) fn valid_node_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// `user@realm!tokenname`, the form PVE prints for an API token.
fn valid_token_id(s: &str) -> bool {
    let Some((userid, name)) = s.rsplit_once('!') else {
        return false;
    };
    let Some((user, realm)) = userid.rsplit_once('@') else {
        return false;
    };
    let user_ok = !user.is_empty()
        && user
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, ':' | '/' | '='));
    let realm_ok = realm.len() >= 2
        && realm
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
        && realm.as_bytes()[0].is_ascii_alphabetic();
    let name_ok = !name.is_empty()
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'));
    user_ok && realm_ok && name_ok
}

/// Parses a SHA-256 fingerprint: 64 hex digits, colons optional, any case.
pub(crate) fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    let hex_digits: String = s.chars().filter(|c| *c != ':').collect();
    if hex_digits.len() != 64 {
        return Err(format!(
            "expected 32 bytes of hex (64 digits, colons optional), found {} digits",
            hex_digits.len()
        ));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(&hex_digits, &mut out).map_err(|e| format!("{s:?} is not hex: {e}"))?;
    Ok(out)
}

/// Formats a fingerprint the way `pvenode cert info` prints it.
pub fn format_fingerprint(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn build_tls(layer: &Layer) -> Result<TlsVerify, ConfigError> {
    const PIN: &str = "proxmox.tls.pin_sha256";
    const CA: &str = "proxmox.tls.ca_file";
    const INSECURE: &str = "proxmox.tls.insecure";
    let mut set: Vec<&str> = Vec::new();
    if layer.str(PIN).is_some() {
        set.push(PIN);
    }
    if layer.str(CA).is_some() {
        set.push(CA);
    }
    if layer.bool(INSECURE) == Some(true) {
        set.push(INSECURE);
    }
    match set.as_slice() {
        [] => Err(ConfigError::Missing {
            field: "proxmox.tls".to_string(),
            hint: format!(
                "set exactly one of {PIN} (the node certificate's SHA-256, as `pvenode cert info` prints it), {CA} (e.g. /etc/pve/pve-root-ca.pem) or {INSECURE}: true"
            ),
        }),
        [only] => match *only {
            PIN => {
                let s = layer.str(PIN).unwrap_or_default();
                parse_pin(s)
                    .map(TlsVerify::PinSha256)
                    .map_err(|reason| layer.invalid(PIN, reason))
            }
            CA => Ok(TlsVerify::CaFile(layer.path(CA)?.unwrap_or_default())),
            _ => Ok(TlsVerify::Insecure),
        },
        [first, second, ..] => Err(ConfigError::Conflict {
            first: format!("{first} ({})", layer.origin(first)),
            second: format!("{second} ({})", layer.origin(second)),
            hint: "set exactly one way to verify the Proxmox certificate".to_string(),
        }),
    }
}

/// `hub.ca_file` or `hub.tls.pin_sha256` (not both), else the system roots.
fn build_hub_tls(layer: &Layer) -> Result<HubTls, ConfigError> {
    const PIN: &str = "hub.tls.pin_sha256";
    const CA: &str = "hub.ca_file";
    match (layer.str(PIN), layer.path(CA)?) {
        (Some(_), Some(_)) => Err(ConfigError::Conflict {
            first: format!("{PIN} ({})", layer.origin(PIN)),
            second: format!("{CA} ({})", layer.origin(CA)),
            hint: "a pin is the hub's identity on its own; set one of them".to_string(),
        }),
        (Some(pin), None) => parse_pin(pin)
            .map(HubTls::PinSha256)
            .map_err(|reason| layer.invalid(PIN, reason)),
        (None, Some(ca)) => Ok(HubTls::CaFile(ca)),
        (None, None) => Ok(HubTls::SystemRoots),
    }
}

fn required_str<'a>(layer: &'a Layer, path: &str, hint: &str) -> Result<&'a str, ConfigError> {
    layer.str(path).ok_or_else(|| ConfigError::Missing {
        field: path.to_string(),
        hint: hint.to_string(),
    })
}

fn build_hub(layer: &Layer, env: &EnvMap) -> Result<(HubConfig, Option<Source>), ConfigError> {
    let url = layer.str("hub.url");
    let enabled = match layer.str("hub.mode") {
        None => url.is_some(),
        Some("enabled") => true,
        Some("disabled") => false,
        Some(other) => {
            return Err(layer.invalid(
                "hub.mode",
                format!("{other:?} is not one of \"enabled\", \"disabled\""),
            ));
        }
    };
    let test_min_poll_interval_seconds = layer.u64("hub.test_min_poll_interval_seconds");
    if !enabled {
        return Ok((
            HubConfig {
                mode: HubMode::Disabled,
                test_min_poll_interval_seconds,
            },
            None,
        ));
    }
    let url = url.ok_or_else(|| ConfigError::Missing {
        field: "hub.url".to_string(),
        hint: "the hub is enabled; give its https URL or set hub.mode to \"disabled\"".to_string(),
    })?;
    let url = https_base_url(layer, "hub.url", url)?;
    let (token, source) = resolve_secret(
        layer,
        env,
        "hub.token",
        "hub.token_file",
        fields::CREDENTIAL_HUB_TOKEN,
    )?
    .ok_or_else(|| ConfigError::Missing {
        field: "hub.token".to_string(),
        hint: format!(
            "the hub is enabled; give hub.token, hub.token_file or the systemd credential {}",
            fields::CREDENTIAL_HUB_TOKEN
        ),
    })?;
    Ok((
        HubConfig {
            mode: HubMode::Enabled {
                url,
                token,
                tls: build_hub_tls(layer)?,
            },
            test_min_poll_interval_seconds,
        },
        Some(source),
    ))
}

/// `restore_tests.scratch_vmids`: `"A-B"`, two valid vmids, `A <= B`, at most 1000 guests.
fn build_scratch_vmids(
    layer: &Layer,
) -> Result<Option<std::ops::RangeInclusive<u32>>, ConfigError> {
    const FIELD: &str = "restore_tests.scratch_vmids";
    let Some(text) = layer.str(FIELD) else {
        return Ok(None);
    };
    let bad = |why: &str| {
        layer.invalid(
            FIELD,
            format!("{text:?}: {why} (expected \"A-B\", e.g. \"9900-9909\")"),
        )
    };
    let (a, b) = text.split_once('-').ok_or_else(|| bad("no '-'"))?;
    let vmid = |s: &str| {
        s.trim()
            .parse::<felhom_protocol::Vmid>()
            .map(|v| v.get())
            .map_err(|e| bad(&e.to_string()))
    };
    let (a, b) = (vmid(a)?, vmid(b)?);
    if a > b {
        return Err(bad("the first vmid is above the second"));
    }
    if b - a >= 1000 {
        return Err(bad("more than 1000 vmids"));
    }
    Ok(Some(a..=b))
}

/// `restore_tests.window`: `"HH:MM-HH:MM"` local time; the end may be before the start
/// (a window over midnight); equal ends are refused (an empty or ambiguous window).
fn build_window(layer: &Layer) -> Result<Option<RestoreWindow>, ConfigError> {
    const FIELD: &str = "restore_tests.window";
    let Some(text) = layer.str(FIELD) else {
        return Ok(None);
    };
    let bad = |why: &str| {
        layer.invalid(
            FIELD,
            format!("{text:?}: {why} (expected \"HH:MM-HH:MM\", e.g. \"01:00-05:00\")"),
        )
    };
    let minute = |s: &str| -> Result<u16, ConfigError> {
        let (h, m) = s.trim().split_once(':').ok_or_else(|| bad("no ':'"))?;
        let digits = |x: &str| x.len() == 2 && x.bytes().all(|b| b.is_ascii_digit());
        if !digits(h) || !digits(m) {
            return Err(bad("hours and minutes are two digits each"));
        }
        let (h, m): (u16, u16) = (h.parse().unwrap_or(99), m.parse().unwrap_or(99));
        if h > 23 || m > 59 {
            return Err(bad("not a time of day"));
        }
        Ok(h * 60 + m)
    };
    let (a, b) = text.split_once('-').ok_or_else(|| bad("no '-'"))?;
    let (start, end) = (minute(a)?, minute(b)?);
    if start == end {
        return Err(bad("the window is empty"));
    }
    Ok(Some(RestoreWindow {
        start_minute: start,
        end_minute: end,
    }))
}

/// A storage id as PVE accepts it: a letter, then letters, digits, `-`, `_`, `.`.
fn storage_id(layer: &Layer, field: &str) -> Result<Option<String>, ConfigError> {
    let Some(s) = layer.str(field) else {
        return Ok(None);
    };
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphabetic()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !ok {
        return Err(layer.invalid(
            field,
            format!("{s:?} is not a storage id (a letter, then letters, digits, '-', '_', '.')"),
        ));
    }
    Ok(Some(s.to_string()))
}

/// The `gate` section.
fn build_gate(layer: &Layer) -> Result<GateConfig, ConfigError> {
    let d = GateConfig::default();
    Ok(GateConfig {
        backup_storage: storage_id(layer, "gate.backup_storage")?,
        health_timeout_seconds: layer
            .positive_or("gate.health_timeout_seconds", d.health_timeout_seconds)?,
        undo_warn_fraction: layer
            .fraction("gate.undo_warn_fraction")
            .unwrap_or(d.undo_warn_fraction),
    })
}

/// The `restore_tests` section. `enabled` needs `scratch_vmids` and `storage`.
fn build_restore_tests(layer: &Layer) -> Result<RestoreTestsConfig, ConfigError> {
    let d = RestoreTestsConfig::default();
    let enabled = layer.bool("restore_tests.enabled").unwrap_or(false);
    let storage = storage_id(layer, "restore_tests.storage")?;
    let scratch = layer.str("restore_tests.scratch_vmids").is_some();
    if enabled && (!scratch || storage.is_none()) {
        let field = if scratch {
            "restore_tests.storage"
        } else {
            "restore_tests.scratch_vmids"
        };
        return Err(ConfigError::Missing {
            field: field.to_string(),
            hint: "restore_tests.enabled is true: give the scratch vmid range (e.g. \"9900-9909\") and the target storage of the scratch guests".to_string(),
        });
    }
    let max_archive_bytes = match layer.u64("restore_tests.max_archive_bytes") {
        Some(0) => {
            return Err(layer.invalid("restore_tests.max_archive_bytes", "must be greater than 0"));
        }
        other => other,
    };
    Ok(RestoreTestsConfig {
        enabled,
        storage,
        interval_hours: layer.positive_or("restore_tests.interval_hours", d.interval_hours)?,
        window: build_window(layer)?,
        boot_check_seconds: layer
            .positive_or("restore_tests.boot_check_seconds", d.boot_check_seconds)?,
        stable_seconds: layer
            .u64("restore_tests.stable_seconds")
            .unwrap_or(d.stable_seconds),
        max_archive_bytes,
        min_free_fraction: layer
            .fraction("restore_tests.min_free_fraction")
            .unwrap_or(d.min_free_fraction),
    })
}

/// `reconcile.desired_source`: `file` (default) or `hub`. The hub source needs the hub
/// enabled and excludes `reconcile.desired_file`: two sources at once would leave it open
/// which one reconcile follows.
fn build_desired_source(
    layer: &Layer,
    hub: &HubConfig,
    has_file: bool,
) -> Result<DesiredSource, ConfigError> {
    const FIELD: &str = "reconcile.desired_source";
    match layer.str(FIELD) {
        None | Some("file") => Ok(DesiredSource::File),
        Some("hub") => {
            if matches!(hub.mode, HubMode::Disabled) {
                return Err(layer.invalid(
                    FIELD,
                    "\"hub\" needs the hub enabled (set hub.url, or hub.mode to \"enabled\")",
                ));
            }
            if has_file {
                return Err(ConfigError::Conflict {
                    first: FIELD.to_string(),
                    second: "reconcile.desired_file".to_string(),
                    hint: "the desired state comes from the hub; remove reconcile.desired_file (or set reconcile.desired_source to \"file\")".to_string(),
                });
            }
            Ok(DesiredSource::Hub)
        }
        Some(other) => {
            Err(layer.invalid(FIELD, format!("{other:?} is not one of \"file\", \"hub\"")))
        }
    }
}

/// The host-local sections: what `privileged …` and `sensors` need.
fn build_host(layer: &Layer) -> Result<HostConfig, ConfigError> {
    let state_dir = layer.path_or("state_dir", PathBuf::from(super::DEFAULT_STATE_DIR))?;
    let pd = PrivhelperConfig::default();
    let privhelper = PrivhelperConfig {
        socket_dir: layer.path_or("privhelper.socket_dir", pd.socket_dir)?,
        audit_log: layer.path_or("privhelper.audit_log", pd.audit_log)?,
        timeout: Duration::from_secs(
            layer.positive_or("privhelper.timeout_seconds", pd.timeout.as_secs())?,
        ),
    };
    let sensors = SensorsConfig {
        hwmon_root: layer.path_or("sensors.hwmon_root", SensorsConfig::default().hwmon_root)?,
    };
    let control = ControlConfig {
        socket: layer.path_or("control.socket", ControlConfig::default().socket)?,
    };

    Ok(HostConfig {
        state_dir,
        privhelper,
        sensors,
        control,
    })
}

fn build(layer: &Layer, env: &EnvMap, world_readable: bool) -> Result<LoadedConfig, ConfigError> {
    let node = required_str(
        layer,
        "node",
        "the Proxmox node name, as `hostname` prints it",
    )?;
    if !valid_node_name(node) {
        return Err(layer.invalid(
            "node",
            format!("{node:?} is not a node name (letters, digits and '-')"),
        ));
    }

    let url = required_str(layer, "proxmox.url", "e.g. https://127.0.0.1:8006")?;
    let url = https_base_url(layer, "proxmox.url", url)?;
    let token_id = required_str(layer, "proxmox.token_id", "e.g. felhom@pve!agent")?;
    if !valid_token_id(token_id) {
        return Err(layer.invalid(
            "proxmox.token_id",
            format!("{token_id:?} is not an API token id of the form user@realm!tokenname"),
        ));
    }
    let (token_secret, token_source) = resolve_secret(
        layer,
        env,
        "proxmox.token_secret",
        "proxmox.token_secret_file",
        fields::CREDENTIAL_PROXMOX_TOKEN,
    )?
    .ok_or_else(|| ConfigError::Missing {
        field: "proxmox.token_secret".to_string(),
        hint: format!(
            "give proxmox.token_secret, proxmox.token_secret_file or the systemd credential {}",
            fields::CREDENTIAL_PROXMOX_TOKEN
        ),
    })?;
    let tls = build_tls(layer)?;
    let (hub, hub_token_source) = build_hub(layer, env)?;

    let devices = match layer.list("smart.devices") {
        None => None,
        Some(list) => {
            for d in list {
                let ok = !d.is_empty()
                    && d.len() <= 32
                    && d.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
                if !ok {
                    return Err(layer.invalid(
                        "smart.devices",
                        format!("{d:?} is not a disk name like sda or nvme0n1"),
                    ));
                }
            }
            Some(list.to_vec())
        }
    };
    let smart = SmartConfig {
        interval_seconds: layer.positive_or(
            "smart.interval_seconds",
            SmartConfig::default().interval_seconds,
        )?,
        devices,
    };
    let cd = CloudflaredConfig::default();
    let metrics_url = match layer.str("cloudflared.metrics_url") {
        None => cd.metrics_url,
        Some(s) => {
            let u = reqwest::Url::parse(s)
                .map_err(|e| layer.invalid("cloudflared.metrics_url", format!("{s:?}: {e}")))?;
            check_base_url(layer, "cloudflared.metrics_url", &u, &["http", "https"])?;
            s.trim_end_matches('/').to_string()
        }
    };
    let cloudflared = CloudflaredConfig {
        metrics_url,
        timeout: Duration::from_secs(
            layer.positive_or("cloudflared.timeout_seconds", cd.timeout.as_secs())?,
        ),
    };
    let agent_id = match layer.str("agent_id") {
        None => None,
        Some(s) => Some(
            felhom_authz::AgentId::new(s)
                .map_err(|reason| layer.invalid("agent_id", format!("{s:?}: {reason}")))?,
        ),
    };
    let authz = AuthzConfig {
        signers_file: layer.path_or("authz.signers_file", AuthzConfig::default().signers_file)?,
    };
    let scratch_vmids = build_scratch_vmids(layer)?;
    let restore_tests = build_restore_tests(layer)?;
    let gate = build_gate(layer)?;
    let desired_file = layer.path("reconcile.desired_file")?;
    let desired_source = build_desired_source(layer, &hub, desired_file.is_some())?;
    let reconcile = ReconcileConfig {
        desired_source,
        desired_file,
        shutdown_timeout_seconds: layer.positive_or(
            "reconcile.shutdown_timeout_seconds",
            ReconcileConfig::default().shutdown_timeout_seconds,
        )?,
    };
    let HostConfig {
        state_dir,
        privhelper,
        sensors,
        control,
    } = build_host(layer)?;

    let config = Config {
        node: node.to_string(),
        agent_id,
        state_dir,
        proxmox: ProxmoxConfig {
            url,
            token_id: token_id.to_string(),
            token_secret,
            tls,
        },
        hub,
        privhelper,
        sensors,
        smart,
        cloudflared,
        reconcile,
        control,
        authz,
        scratch_vmids,
        restore_tests,
        gate,
    };

    let mut warnings = Vec::new();
    if config.proxmox.tls == TlsVerify::Insecure {
        warnings.push(
            "proxmox.tls.insecure is true: the Proxmox certificate is NOT verified; set pin_sha256 or ca_file"
                .to_string(),
        );
    }
    if let Some(n) = config.hub.test_min_poll_interval_seconds {
        warnings.push(format!(
            "hub.test_min_poll_interval_seconds = {n} is for the test bed only, not for production"
        ));
    }
    let inline_file_secrets: Vec<&str> = ["proxmox.token_secret", "hub.token"]
        .into_iter()
        .filter(|f| matches!(layer.get(f).source, Source::File { .. }) && layer.str(f).is_some())
        .collect();
    if world_readable && !inline_file_secrets.is_empty() {
        warnings.push(format!(
            "{} is readable by every user and holds {}; chmod 600 it or move the secret to a secret file or systemd credential",
            layer.file.display(),
            inline_file_secrets.join(" and ")
        ));
    }

    for source in [Some(&token_source), hub_token_source.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Source::SecretFile { path } = source
            && world_readable_file(path)
        {
            warnings.push(format!(
                "secret file {} is readable by every user; chmod 600 it",
                path.display()
            ));
        }
    }

    let provenance = provenance(layer, &config, token_source, hub_token_source);
    Ok(LoadedConfig {
        config,
        provenance,
        warnings,
    })
}

/// The effective value of every field, as text, with where it came from.
fn provenance(
    layer: &Layer,
    config: &Config,
    token_source: Source,
    hub_token_source: Option<Source>,
) -> Provenance {
    let mut fields = Vec::with_capacity(FIELDS.len());
    for f in FIELDS {
        let resolved = layer.get(f.path);
        let (value, source) = match f.path {
            "proxmox.token_secret" => (Some("<redacted>".to_string()), token_source.clone()),
            "hub.token" => match &hub_token_source {
                Some(s) => (Some("<redacted>".to_string()), s.clone()),
                None => (None, resolved.source.clone()),
            },
            _ if f.secret => (None, resolved.source.clone()),
            // The secret files show the path they were given; the secret stays hidden.
            "proxmox.token_secret_file" | "hub.token_file" => (
                layer.str(f.path).map(str::to_string),
                resolved.source.clone(),
            ),
            _ => match effective(config, f.path) {
                Some(v) => {
                    let source = if resolved.value.is_some() {
                        resolved.source.clone()
                    } else if matches!(resolved.source, Source::UnsetByEnv { .. }) {
                        // Unset by env, so the default took over.
                        resolved.source.clone()
                    } else {
                        Source::Default
                    };
                    (Some(v), source)
                }
                None => (None, resolved.source.clone()),
            },
        };
        fields.push(FieldOrigin {
            field: f.path,
            env: f.env,
            value,
            source,
        });
    }
    Provenance {
        config_file: layer.file.clone(),
        fields,
    }
}

/// The effective value of a non-secret field, rendered as text.
fn effective(c: &Config, path: &str) -> Option<String> {
    let p = |p: &Path| Some(p.display().to_string());
    match path {
        "node" => Some(c.node.clone()),
        "agent_id" => c.agent_id.as_ref().map(|a| a.to_string()),
        "state_dir" => p(&c.state_dir),
        "proxmox.url" => Some(c.proxmox.url.clone()),
        "proxmox.token_id" => Some(c.proxmox.token_id.clone()),
        "proxmox.tls.pin_sha256" => match &c.proxmox.tls {
            TlsVerify::PinSha256(b) => Some(format_fingerprint(b)),
            _ => None,
        },
        "proxmox.tls.ca_file" => match &c.proxmox.tls {
            TlsVerify::CaFile(f) => p(f),
            _ => None,
        },
        "proxmox.tls.insecure" => Some((c.proxmox.tls == TlsVerify::Insecure).to_string()),
        "hub.mode" => Some(
            match c.hub.mode {
                HubMode::Disabled => "disabled",
                HubMode::Enabled { .. } => "enabled",
            }
            .to_string(),
        ),
        "hub.url" => match &c.hub.mode {
            HubMode::Enabled { url, .. } => Some(url.clone()),
            HubMode::Disabled => None,
        },
        "hub.ca_file" => match &c.hub.mode {
            HubMode::Enabled {
                tls: HubTls::CaFile(f),
                ..
            } => p(f),
            _ => None,
        },
        "hub.tls.pin_sha256" => match &c.hub.mode {
            HubMode::Enabled {
                tls: HubTls::PinSha256(b),
                ..
            } => Some(format_fingerprint(b)),
            _ => None,
        },
        "hub.test_min_poll_interval_seconds" => {
            c.hub.test_min_poll_interval_seconds.map(|n| n.to_string())
        }
        "privhelper.socket_dir" => p(&c.privhelper.socket_dir),
        "privhelper.audit_log" => p(&c.privhelper.audit_log),
        "privhelper.timeout_seconds" => Some(c.privhelper.timeout.as_secs().to_string()),
        "sensors.hwmon_root" => p(&c.sensors.hwmon_root),
        "smart.interval_seconds" => Some(c.smart.interval_seconds.to_string()),
        "smart.devices" => c.smart.devices.as_ref().map(|d| d.join(",")),
        "cloudflared.metrics_url" => Some(c.cloudflared.metrics_url.clone()),
        "cloudflared.timeout_seconds" => Some(c.cloudflared.timeout.as_secs().to_string()),
        "reconcile.desired_source" => Some(c.reconcile.desired_source.as_str().to_string()),
        "reconcile.desired_file" => c.reconcile.desired_file.as_deref().and_then(p),
        "reconcile.shutdown_timeout_seconds" => {
            Some(c.reconcile.shutdown_timeout_seconds.to_string())
        }
        "control.socket" => p(&c.control.socket),
        "authz.signers_file" => p(&c.authz.signers_file),
        "restore_tests.scratch_vmids" => c
            .scratch_vmids
            .as_ref()
            .map(|r| format!("{}-{}", r.start(), r.end())),
        "restore_tests.enabled" => Some(c.restore_tests.enabled.to_string()),
        "restore_tests.storage" => c.restore_tests.storage.clone(),
        "restore_tests.interval_hours" => Some(c.restore_tests.interval_hours.to_string()),
        "restore_tests.window" => c.restore_tests.window.map(|w| w.to_string()),
        "restore_tests.boot_check_seconds" => Some(c.restore_tests.boot_check_seconds.to_string()),
        "restore_tests.stable_seconds" => Some(c.restore_tests.stable_seconds.to_string()),
        "restore_tests.max_archive_bytes" => {
            c.restore_tests.max_archive_bytes.map(|n| n.to_string())
        }
        "restore_tests.min_free_fraction" => Some(c.restore_tests.min_free_fraction.to_string()),
        "gate.backup_storage" => c.gate.backup_storage.clone(),
        "gate.health_timeout_seconds" => Some(c.gate.health_timeout_seconds.to_string()),
        "gate.undo_warn_fraction" => Some(c.gate.undo_warn_fraction.to_string()),
        _ => None,
    }
}
