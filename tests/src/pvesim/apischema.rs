//! PVE's published API schema (the api-viewer's `apidoc.js`) and the check every request
//! passes before a handler sees it: path template, method, and each parameter's type,
//! format, pattern, length, range and enumeration, with PVE's `check_prop` texts.
//!
//! Background: a hand-written subset of the schema only refuses what its author thought
//! of, so a client request that PVE answers with `400 Parameter verification failed.` went
//! through. The schema is not kept in this repository: the PyPI package `fakepve` ships it
//! as data (`fakepve/data/pve-api.json.gz` in its wheel). On first use it is fetched with
//! pip into `<target dir>/pve-schema/`, the data file is read out of the wheel, checked
//! against the SHA-256 recorded here, and cached there as plain JSON for later runs.
//!
//! Owns: fetching, verifying and caching that file; matching a request to its template;
//! the generic parameter check (`[n]` names, property strings given as objects, Perl
//! patterns translated to `regex`). Must never: write outside its cache directory, use
//! anything of fakepve but that data file, or refuse on a pattern or format it cannot
//! evaluate (those are accepted and counted, see [`ApiSchema::unchecked`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use super::error::ApiError;
use super::schema::{self, Fmt, Params};

/// The fakepve release whose schema data is used.
pub const FAKEPVE_VERSION: &str = "0.5.0";
const DATA_MEMBER: &str = "fakepve/data/pve-api.json.gz";
const META_MEMBER: &str = "fakepve/data/pve-api.meta.json";
/// SHA-256 of `pve-api.json.gz` in fakepve 0.5.0 as first fetched. The meta file's own
/// `sha256` is that of the upstream `apidoc.js`, not of this file, so it cannot check it.
const DATA_GZ_SHA256: &str = "4e4fc9b5b0146627542a3988081b4ec3c785b3008b3a1499dd8c3c185be9a9db";
/// SHA-256 of the same data inflated (what the cache holds).
const DATA_JSON_SHA256: &str = "8d3d7781d3d1ea5944d879981213f178b708b05eb8a5a3592199477f7a38b455";
/// Overrides the cache directory (default: `pve-schema/` in the cargo target directory).
pub const DIR_ENV: &str = "FELHOM_PVE_SCHEMA_DIR";

const NOT_IN_SCHEMA: &str =
    "property is not defined in schema and the schema does not allow additional properties";
const MISSING: &str = "property is missing and it is not optional";

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "PVE's API schema is not cached in {dir} and fetching it failed ({detail}); \
         fetch it with: {command}"
    )]
    Fetch {
        dir: String,
        command: String,
        detail: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a fakepve {FAKEPVE_VERSION} wheel with {DATA_MEMBER}: {detail}")]
    Wheel { path: String, detail: String },
    #[error(
        "{path}: SHA-256 {got}, expected {expected} (a different fakepve build; delete it to refetch)"
    )]
    Integrity {
        path: String,
        expected: &'static str,
        got: String,
    },
    #[error("{path}: {detail}")]
    Content { path: String, detail: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SchemaError + '_ {
    move |source| SchemaError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What `pve-api.meta.json` says about the data.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Meta {
    pub source: String,
    pub fetched: String,
    pub sha256: String,
    pub paths: usize,
    pub methods: usize,
}

#[derive(Debug)]
enum Seg {
    Lit(String),
    Param(String),
}

#[derive(Debug)]
struct Template {
    path: String,
    segs: Vec<Seg>,
    /// Method name → its `parameters` schema (`Value::Null` when it declares none).
    methods: BTreeMap<String, Value>,
    /// Method name → its `returns` schema.
    returns: BTreeMap<String, Value>,
}

/// Patterns and formats met in the schema that this check cannot evaluate, and how often
/// a request's value was accepted without them.
#[derive(Debug, Default)]
pub struct Unchecked {
    pub patterns: BTreeSet<String>,
    pub formats: BTreeSet<String>,
    pattern_uses: AtomicU64,
    format_uses: AtomicU64,
}

impl Unchecked {
    pub fn pattern_uses(&self) -> u64 {
        self.pattern_uses.load(Ordering::Relaxed)
    }
    pub fn format_uses(&self) -> u64 {
        self.format_uses.load(Ordering::Relaxed)
    }
}

/// The loaded schema.
#[derive(Debug)]
pub struct ApiSchema {
    templates: Vec<Template>,
    patterns: HashMap<String, regex::Regex>,
    meta: Meta,
    unchecked: Unchecked,
}

/// A request matched to a template.
#[derive(Debug)]
pub struct Matched<'a> {
    pub template: &'a str,
    parameters: &'a Value,
    /// The template's `{name}` segments with the request's (decoded) values.
    pub uri: Vec<(String, String)>,
}

static GLOBAL: OnceLock<Result<ApiSchema, SchemaError>> = OnceLock::new();

/// The schema of this process: loaded (and on first use fetched) once.
pub fn global() -> Result<&'static ApiSchema, &'static SchemaError> {
    GLOBAL
        .get_or_init(|| ApiSchema::load(&cache_dir()))
        .as_ref()
}

/// `pve-schema/` in the cargo target directory this executable runs from (the first
/// ancestor with cargo's `CACHEDIR.TAG`), or [`DIR_ENV`].
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            if dir.join("CACHEDIR.TAG").is_file() {
                return dir.join("pve-schema");
            }
        }
    }
    crate::build::workspace_root()
        .join("target")
        .join("pve-schema")
}

/// The command that fetches the wheel into `dir` (named in every fetch failure).
pub fn fetch_command(dir: &Path) -> String {
    format!(
        "python3 -m pip download --no-deps fakepve=={FAKEPVE_VERSION} -d {}",
        dir.display()
    )
}

fn wheel_name() -> String {
    format!("fakepve-{FAKEPVE_VERSION}-py3-none-any.whl")
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
}

/// Runs pip into a private subdirectory and moves the wheel into `dir` (a rename, so
/// test processes fetching at the same time never see half a file).
fn fetch_wheel(dir: &Path) -> Result<PathBuf, SchemaError> {
    let command = fetch_command(dir);
    let fail = |detail: String| SchemaError::Fetch {
        dir: dir.display().to_string(),
        command: command.clone(),
        detail,
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dir)
        .map_err(io_err(dir))?;
    let spec = format!("fakepve=={FAKEPVE_VERSION}");
    let args = ["download", "--no-deps", spec.as_str(), "-d"];
    let mut out = Command::new("pip3").args(args).arg(tmp.path()).output();
    if matches!(&out, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
        out = Command::new("python3")
            .args(["-m", "pip"])
            .args(args)
            .arg(tmp.path())
            .output();
    }
    let out = out.map_err(|e| fail(format!("neither pip3 nor python3 -m pip ran: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(fail(format!("pip {}: {last}", out.status)));
    }
    let got = tmp.path().join(wheel_name());
    if !got.is_file() {
        return Err(fail(format!("pip left no {}", wheel_name())));
    }
    let dest = dir.join(wheel_name());
    std::fs::rename(&got, &dest).map_err(io_err(&dest))?;
    Ok(dest)
}

/// Reads the data and meta members out of the wheel.
fn read_wheel(wheel: &Path) -> Result<(Vec<u8>, Vec<u8>), SchemaError> {
    let bad = |detail: String| SchemaError::Wheel {
        path: wheel.display().to_string(),
        detail,
    };
    let f = std::fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(e.to_string()))?;
    let mut member = |name: &str, limit: u64| -> Result<Vec<u8>, SchemaError> {
        let m = zip.by_name(name).map_err(|e| bad(format!("{name}: {e}")))?;
        let mut buf = Vec::new();
        m.take(limit)
            .read_to_end(&mut buf)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        Ok(buf)
    };
    let gz = member(DATA_MEMBER, 16 << 20)?;
    let meta = member(META_MEMBER, 1 << 16)?;
    let got = sha256_hex(&gz);
    if got != DATA_GZ_SHA256 {
        return Err(SchemaError::Integrity {
            path: format!("{}!{DATA_MEMBER}", wheel.display()),
            expected: DATA_GZ_SHA256,
            got,
        });
    }
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .take(64 << 20)
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("{DATA_MEMBER}: {e}")))?;
    Ok((json, meta))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SchemaError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(io_err(path))?;
    // Readable by the other users a test bed may run pvesim as (the data is public).
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| SchemaError::Io {
        path: path.display().to_string(),
        source: e.error,
    })?;
    Ok(())
}

impl ApiSchema {
    /// Loads the cached JSON from `dir`; fetches and extracts the wheel first if needed.
    pub fn load(dir: &Path) -> Result<ApiSchema, SchemaError> {
        let json_path = dir.join(format!("pve-api-{FAKEPVE_VERSION}.json"));
        let meta_path = dir.join(format!("pve-api-{FAKEPVE_VERSION}.meta.json"));
        let cached = std::fs::read(&json_path)
            .ok()
            .zip(std::fs::read(&meta_path).ok());
        let (json, meta) = match cached {
            Some(c) => c,
            None => {
                let wheel = dir.join(wheel_name());
                let wheel = if wheel.is_file() {
                    wheel
                } else {
                    fetch_wheel(dir)?
                };
                let (json, meta) = read_wheel(&wheel)?;
                write_atomic(&meta_path, &meta)?;
                write_atomic(&json_path, &json)?;
                (json, meta)
            }
        };
        let got = sha256_hex(&json);
        if got != DATA_JSON_SHA256 {
            return Err(SchemaError::Integrity {
                path: json_path.display().to_string(),
                expected: DATA_JSON_SHA256,
                got,
            });
        }
        let meta: Meta = serde_json::from_slice(&meta).map_err(|e| SchemaError::Content {
            path: meta_path.display().to_string(),
            detail: e.to_string(),
        })?;
        let doc: Value = serde_json::from_slice(&json).map_err(|e| SchemaError::Content {
            path: json_path.display().to_string(),
            detail: e.to_string(),
        })?;
        ApiSchema::from_doc(&doc, meta).map_err(|detail| SchemaError::Content {
            path: json_path.display().to_string(),
            detail,
        })
    }

    fn from_doc(doc: &Value, meta: Meta) -> Result<ApiSchema, String> {
        let paths = doc
            .get("paths")
            .and_then(Value::as_object)
            .ok_or("no `paths` object")?;
        let mut templates = Vec::new();
        for (path, methods) in paths {
            let methods = methods
                .as_object()
                .ok_or_else(|| format!("{path}: methods are not an object"))?;
            let segs = path
                .split('/')
                .filter(|s| !s.is_empty())
                .map(
                    |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(name) => Seg::Param(name.to_owned()),
                        None => Seg::Lit(s.to_owned()),
                    },
                )
                .collect();
            templates.push(Template {
                path: path.clone(),
                segs,
                methods: methods
                    .iter()
                    .map(|(m, spec)| {
                        let p = spec.get("parameters").cloned().unwrap_or(Value::Null);
                        (m.clone(), p)
                    })
                    .collect(),
                returns: methods
                    .iter()
                    .map(|(m, spec)| {
                        let r = spec.get("returns").cloned().unwrap_or(Value::Null);
                        (m.clone(), r)
                    })
                    .collect(),
            });
        }
        let mut s = ApiSchema {
            templates,
            patterns: HashMap::new(),
            meta,
            unchecked: Unchecked::default(),
        };
        let mut found_patterns = BTreeSet::new();
        let mut found_formats = BTreeSet::new();
        for t in &s.templates {
            for p in t.methods.values() {
                collect(p, &mut found_patterns, &mut found_formats);
            }
        }
        for p in found_patterns {
            match translate_pattern(&p).and_then(|r| regex::Regex::new(&r).ok()) {
                Some(re) => {
                    s.patterns.insert(p, re);
                }
                None => {
                    s.unchecked.patterns.insert(p);
                }
            }
        }
        s.unchecked.formats = found_formats
            .into_iter()
            .filter(|f| !format_known(f))
            .collect();
        Ok(s)
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }
    /// Number of path templates.
    pub fn path_count(&self) -> usize {
        self.templates.len()
    }
    /// Number of (template, method) pairs.
    pub fn method_count(&self) -> usize {
        self.templates.iter().map(|t| t.methods.len()).sum()
    }
    pub fn unchecked(&self) -> &Unchecked {
        &self.unchecked
    }

    /// The `parameters` schema of `method` on `template` (as written in the schema).
    pub fn parameters(&self, template: &str, method: &str) -> Option<&Value> {
        self.templates
            .iter()
            .find(|t| t.path == template)
            .and_then(|t| t.methods.get(method))
    }

    /// The `returns` schema of `method` on `template`.
    pub fn returns(&self, template: &str, method: &str) -> Option<&Value> {
        self.templates
            .iter()
            .find(|t| t.path == template)
            .and_then(|t| t.returns.get(method))
    }

    /// Matches `segs` (decoded path segments below `/api2/json`) and `method` to a
    /// template; at each segment a literal wins over a `{param}`, as PVE's router does.
    pub fn find(&self, method: &str, segs: &[&str]) -> Option<Matched<'_>> {
        let mut best: Option<(&Template, Vec<bool>)> = None;
        for t in &self.templates {
            if t.segs.len() != segs.len() {
                continue;
            }
            let mut shape = Vec::with_capacity(segs.len());
            let fits = t.segs.iter().zip(segs).all(|(ts, s)| match ts {
                Seg::Lit(l) => {
                    shape.push(false);
                    l == s
                }
                Seg::Param(_) => {
                    shape.push(true);
                    !s.is_empty()
                }
            });
            if fits && best.as_ref().is_none_or(|(_, b)| shape < *b) {
                best = Some((t, shape));
            }
        }
        let (t, _) = best?;
        let parameters = t.methods.get(method)?;
        let uri = t
            .segs
            .iter()
            .zip(segs)
            .filter_map(|(ts, s)| match ts {
                Seg::Param(name) => Some((name.clone(), (*s).to_owned())),
                Seg::Lit(_) => None,
            })
            .collect();
        Some(Matched {
            template: &t.path,
            parameters,
            uri,
        })
    }

    /// Checks `params` (query and body merged, the URI's parameters included) against the
    /// matched method's parameters, collecting every error as PVE's `check_object` does.
    pub fn validate(&self, m: &Matched<'_>, params: &Params) -> Result<(), ApiError> {
        let mut errors = BTreeMap::new();
        self.check_object(m.parameters, params, "", &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::params(errors))
        }
    }

    /// Checks one value against a property schema; the error is PVE's `errors.<path>`.
    pub fn check_value(&self, sub: &Value, v: &str, path: &str) -> Result<(), String> {
        self.check_prop(sub, v, path)
    }

    /// `check_object` over string values: properties, `[n]` names, missing required ones,
    /// `requires`, and additional properties when the schema forbids them.
    fn check_object(
        &self,
        obj: &Value,
        values: &BTreeMap<String, String>,
        path: &str,
        errors: &mut BTreeMap<String, String>,
    ) {
        let props = obj.get("properties").and_then(Value::as_object);
        let join = |k: &str| {
            if path.is_empty() {
                k.to_owned()
            } else {
                format!("{path}.{k}")
            }
        };
        let additional = obj.get("additionalProperties");
        let forbid_more = additional.is_some_and(|a| a == 0 || a == false);
        if let Some(props) = props {
            for (name, sub) in props {
                if name.ends_with("[n]") || values.contains_key(name) {
                    continue;
                }
                if !flag(sub, "optional") && sub.get("alias").is_none() {
                    errors.insert(join(name), MISSING.to_owned());
                }
            }
        }
        for (k, v) in values {
            let sub = props.and_then(|p| lookup(p, k));
            let Some(sub) = sub else {
                if forbid_more {
                    errors.insert(join(k), NOT_IN_SCHEMA.to_owned());
                }
                continue;
            };
            if let Err(e) = self.check_prop(sub, v, &join(k)) {
                errors.insert(join(k), e);
            }
            if let Some(req) = sub.get("requires").and_then(Value::as_str)
                && !values.contains_key(req)
            {
                errors.insert(
                    join(req),
                    format!("missing property - '{}' requires this property", join(k)),
                );
            }
        }
    }

    /// `check_prop` for one defined value: type, format, pattern, lengths, range,
    /// enumeration, in PVE's order; the error is the text for `errors.<path>`.
    fn check_prop(&self, sub: &Value, v: &str, path: &str) -> Result<(), String> {
        match sub.get("type").and_then(Value::as_str) {
            Some("boolean") if v != "0" && v != "1" => {
                return Err(format!("type check ('boolean') failed - got '{v}'"));
            }
            Some("integer") if !schema::is_integer(v) => {
                return Err(format!("type check ('integer') failed - got '{v}'"));
            }
            Some("number") if !schema::is_number(v) => {
                return Err(format!("type check ('number') failed - got '{v}'"));
            }
            Some("array") => {
                // A JSON body may carry a real array; a form carries one item per key.
                if let Some(items) = sub.get("items")
                    && let Ok(Value::Array(list)) = serde_json::from_str::<Value>(v)
                {
                    for item in list {
                        let s = match item {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        self.check_prop(items, &s, path)?;
                    }
                    return Ok(());
                }
                if let Some(items) = sub.get("items") {
                    return self.check_prop(items, v, path);
                }
                return Ok(());
            }
            _ => {}
        }
        match sub.get("format") {
            Some(Value::String(f)) => {
                if let Err(e) = self.check_named_format(f, v, path) {
                    return Err(format!("invalid format - {e}"));
                }
            }
            Some(fmt @ Value::Object(_)) => {
                if let Err(e) = self.parse_property_string(fmt, v, path) {
                    return Err(format!("invalid format - {e}"));
                }
            }
            _ => {}
        }
        if let Some(p) = sub.get("pattern").and_then(Value::as_str) {
            match self.patterns.get(p) {
                Some(re) if !re.is_match(v) => {
                    return Err("value does not match the regex pattern".to_owned());
                }
                Some(_) => {}
                None => {
                    self.unchecked.pattern_uses.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let len = v.chars().count();
        if let Some(max) = sub.get("maxLength").and_then(Value::as_u64)
            && len as u64 > max
        {
            return Err(format!("value may only be {max} characters long"));
        }
        if let Some(min) = sub.get("minLength").and_then(Value::as_u64)
            && (len as u64) < min
        {
            return Err(format!("value must be at least {min} characters long"));
        }
        if schema::is_number(v) {
            let n: f64 = v.parse().unwrap_or(f64::NAN);
            if let Some(max) = sub.get("maximum").and_then(Value::as_f64)
                && n > max
            {
                return Err(format!(
                    "value must have a maximum value of {}",
                    perl_num(&sub["maximum"])
                ));
            }
            if let Some(min) = sub.get("minimum").and_then(Value::as_f64)
                && n < min
            {
                return Err(format!(
                    "value must have a minimum value of {}",
                    perl_num(&sub["minimum"])
                ));
            }
        }
        if let Some(values) = sub.get("enum").and_then(Value::as_array)
            && !values.iter().any(|e| e.as_str() == Some(v))
        {
            let list: Vec<String> = values
                .iter()
                .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
                .collect();
            return Err(format!(
                "value '{v}' does not have a value in the enumeration '{}'",
                list.join(", ")
            ));
        }
        Ok(())
    }

    /// A named format; `-list` and `-opt` variants of any of them. The error is `$@`.
    fn check_named_format(&self, name: &str, v: &str, path: &str) -> Result<(), String> {
        if let Some(keys) = named_property_string(name) {
            return self.parse_property_string(&keys, v, path);
        }
        if let Some(f) = named_format(name) {
            return schema::check_format(f, v, path);
        }
        if let Some(base) = name.strip_suffix("-list")
            && let Some(f) = named_format(base)
        {
            for item in schema::split_list(v) {
                schema::check_format(f, &item, path)?;
            }
            return Ok(());
        }
        if let Some(base) = name.strip_suffix("-opt")
            && let Some(f) = named_format(base)
        {
            return if v.is_empty() {
                Ok(())
            } else {
                schema::check_format(f, v, path)
            };
        }
        self.unchecked.format_uses.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `parse_property_string` with a format given as an object of keys: `default_key`,
    /// `alias`/`keyAlias`, booleans through `parse_boolean`, then `check_object` of the
    /// result with additional keys forbidden. The error is `$@` (`format error\n…`).
    fn parse_property_string(&self, fmt: &Value, data: &str, path: &str) -> Result<(), String> {
        let Some(keys) = fmt.as_object() else {
            return Ok(());
        };
        let default_key = keys
            .iter()
            .find(|(_, s)| flag(s, "default_key"))
            .map(|(k, _)| k.as_str());
        let mut res: BTreeMap<String, String> = BTreeMap::new();
        for part in data.split(',') {
            if part.trim().is_empty() {
                continue;
            }
            if let Some((k, v)) = part
                .split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            {
                if res.contains_key(k) {
                    return Err(format!(
                        "duplicate key in comma-separated list property: {k}\n"
                    ));
                }
                let mut key = k.to_owned();
                let mut sub = keys.get(k);
                if let Some(alias) = sub.and_then(|s| s.get("alias")).and_then(Value::as_str) {
                    if let Some(ka) = sub.and_then(|s| s.get("keyAlias")).and_then(Value::as_str) {
                        if res.contains_key(ka) {
                            return Err(format!("key alias '{ka}' is already defined\n"));
                        }
                        res.insert(ka.to_owned(), k.to_owned());
                    }
                    key = alias.to_owned();
                    sub = keys.get(alias);
                }
                let Some(sub) = sub else {
                    return Err(format!(
                        "invalid key in comma-separated list property: {key}\n"
                    ));
                };
                let v = if sub.get("type").and_then(Value::as_str) == Some("boolean") {
                    parse_boolean(v).unwrap_or(v)
                } else {
                    v
                };
                res.insert(key, v.to_owned());
            } else if !part.contains('=') {
                let Some(dk) = default_key else {
                    return Err(
                        "value without key, but schema does not define a default key\n".to_owned(),
                    );
                };
                if res.contains_key(dk) {
                    return Err(format!(
                        "duplicate key in comma-separated list property: {dk}\n"
                    ));
                }
                res.insert(dk.to_owned(), part.to_owned());
            } else {
                return Err("missing key in comma-separated list property\n".to_owned());
            }
        }
        let obj = serde_json::json!({"properties": fmt, "additionalProperties": 0});
        let mut errors = BTreeMap::new();
        self.check_object(&obj, &res, path, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            let mut msg = "format error\n".to_owned();
            for (k, e) in errors {
                msg.push_str(&format!("{k}: {e}\n"));
            }
            Err(msg)
        }
    }
}

/// The schema entry for parameter `k`: its own, or `name[n]` for `name<digits>`.
fn lookup<'a>(props: &'a serde_json::Map<String, Value>, k: &str) -> Option<&'a Value> {
    if let Some(s) = props.get(k) {
        return Some(s);
    }
    let stem = k.trim_end_matches(|c: char| c.is_ascii_digit());
    if stem.len() == k.len() || stem.is_empty() {
        return None;
    }
    props.get(&format!("{stem}[n]"))
}

/// A schema flag (`optional`, `default_key`): `1` or `true`.
fn flag(s: &Value, key: &str) -> bool {
    match s.get(key) {
        Some(Value::Number(n)) => n.as_i64() != Some(0),
        Some(Value::Bool(b)) => *b,
        Some(Value::String(v)) => v != "0" && !v.is_empty(),
        _ => false,
    }
}

/// PVE's `parse_boolean` in property strings.
fn parse_boolean(v: &str) -> Option<&'static str> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some("1"),
        "0" | "false" | "no" | "off" => Some("0"),
        _ => None,
    }
}

/// A schema number as Perl prints it (`100`, `0.5`).
fn perl_num(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if v.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => v.to_string(),
    }
}

/// The named formats this check evaluates (with PVE's texts, in [`schema::check_format`]).
fn named_format(name: &str) -> Option<Fmt> {
    Some(match name {
        "pve-vmid" => Fmt::Vmid,
        "pve-configid" => Fmt::ConfigId,
        "dns-name" => Fmt::DnsName,
        "pve-tag-list" => Fmt::TagList,
        "pve-volume-id" => Fmt::VolumeId,
        "pve-storage-id" => Fmt::StorageId,
        "pve-node" => Fmt::Node,
        "ipv4" => Fmt::Ipv4,
        "ipv6" => Fmt::Ipv6,
        "ip" => Fmt::Ip,
        "pve-ipv4-config" => Fmt::Ipv4Config,
        "pve-ipv6-config" => Fmt::Ipv6Config,
        "mac-addr" => Fmt::Mac,
        "pve-storage-content" => Fmt::StorageContent,
        _ => return None,
    })
}

/// Named formats that are property strings (the schema names them without their keys).
fn named_property_string(name: &str) -> Option<Value> {
    let opt = |format: &str| serde_json::json!({"type": "string", "optional": 1, "format": format});
    match name {
        // qemu-server's `ipconfig[n]` (cloud-init): PVE::QemuServer::Cloudinit.
        "pve-qm-ipconfig" => Some(serde_json::json!({
            "ip": opt("pve-ipv4-config"),
            "gw": opt("ipv4"),
            "ip6": opt("pve-ipv6-config"),
            "gw6": opt("ipv6"),
        })),
        _ => None,
    }
}

fn format_known(name: &str) -> bool {
    named_format(name).is_some()
        || named_property_string(name).is_some()
        || [name.strip_suffix("-list"), name.strip_suffix("-opt")]
            .into_iter()
            .flatten()
            .any(|b| named_format(b).is_some())
}

/// Every `pattern` and named `format` below `v`.
fn collect(v: &Value, patterns: &mut BTreeSet<String>, formats: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("pattern", Value::String(p)) => {
                        patterns.insert(p.clone());
                    }
                    ("format", Value::String(f)) => {
                        formats.insert(f.clone());
                    }
                    _ => collect(x, patterns, formats),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect(x, patterns, formats)),
        _ => {}
    }
}

/// Translates a Perl pattern (as `qr//` stringifies it: `(?^:...)`, `(?^i:...)`) to the
/// `regex` crate's syntax, anchored as PVE applies it (`m/^$pattern$/`). `None` for what
/// has no equivalent there (look-around, back-references, possessive forms).
pub fn translate_pattern(p: &str) -> Option<String> {
    let mut out = String::with_capacity(p.len() + 8);
    let b: Vec<char> = p.chars().collect();
    let mut i = 0;
    let mut in_class = false;
    while i < b.len() {
        let c = b[i];
        match c {
            '\\' => {
                let n = *b.get(i + 1)?;
                match n {
                    '0' if !b.get(i + 2).is_some_and(char::is_ascii_digit) => out.push_str("\\x00"),
                    '1'..='9' if !in_class => return None,
                    'z' | 'Z' | 'G' | 'K' => return None,
                    _ => {
                        out.push('\\');
                        out.push(n);
                    }
                }
                i += 2;
                continue;
            }
            '[' if !in_class => {
                in_class = true;
                out.push('[');
                // A leading `]` or `^]` is literal in both dialects.
                if b.get(i + 1) == Some(&'^') {
                    out.push('^');
                    i += 1;
                }
                if b.get(i + 1) == Some(&']') {
                    out.push_str("\\]");
                    i += 1;
                }
            }
            ']' if in_class => {
                in_class = false;
                out.push(']');
            }
            '[' if in_class => out.push_str("\\["),
            '(' if !in_class && b.get(i + 1) == Some(&'?') => {
                // (?^flags:  (?flags:  (?:  or look-around, which has no translation.
                let rest: String = b[i + 2..].iter().collect();
                if let Some(r) = rest.strip_prefix('^') {
                    let flags: String = r.chars().take_while(char::is_ascii_alphabetic).collect();
                    if r[flags.len()..].starts_with(':') {
                        let keep: String = flags.chars().filter(|f| "imsx".contains(*f)).collect();
                        out.push_str(&format!("(?{keep}:"));
                        i += 3 + flags.len() + 1;
                        continue;
                    }
                    return None;
                }
                if rest.starts_with(':') {
                    out.push_str("(?:");
                    i += 3;
                    continue;
                }
                let flags: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
                if !flags.is_empty()
                    && flags.chars().all(|f| "imsx".contains(f))
                    && rest[flags.len()..].starts_with(':')
                {
                    out.push_str(&format!("(?{flags}:"));
                    i += 2 + flags.len() + 1;
                    continue;
                }
                return None;
            }
            '{' if !in_class && b.get(i + 1) == Some(&',') => {
                // Perl's `{,n}` is `{0,n}`.
                out.push_str("{0");
            }
            '+' if !in_class && i > 0 && matches!(b[i - 1], '+' | '*' | '?' | '}') => {
                return None;
            }
            _ => out.push(c),
        }
        i += 1;
    }
    if in_class {
        return None;
    }
    Some(format!("^(?:{out})$"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perl_patterns_translate() {
        assert_eq!(
            translate_pattern("(?^:[a-zA-Z0-9_; ]+)").as_deref(),
            Some("^(?:(?:[a-zA-Z0-9_; ]+))$")
        );
        assert_eq!(
            translate_pattern("(?^i:[a-z]{,8})").as_deref(),
            Some("^(?:(?i:[a-z]{0,8}))$")
        );
        assert_eq!(
            translate_pattern("\\w+=[^\\x00]*(?:\\0\\w+)*").as_deref(),
            Some("^(?:\\w+=[^\\x00]*(?:\\x00\\w+)*)$")
        );
        assert_eq!(translate_pattern("a(?!\\n)"), None);
        assert_eq!(translate_pattern("(a)\\1"), None);
        let re = regex::Regex::new(&translate_pattern("[-_.\\w\\d]+").unwrap()).unwrap();
        assert!(re.is_match("eth0") && !re.is_match("eth 0") && !re.is_match(""));
    }

    /// If a route pvesim serves had no template, its requests would skip the check.
    #[test]
    fn every_route_pvesim_serves_is_in_the_schema() {
        let api = global().unwrap_or_else(|e| panic!("{e}"));
        let upid = "UPID:pve1:00001234:00005678:65B8E0A0:vzdump:101:root@pam:";
        let mut routes = vec![
            ("GET", "/version".to_owned()),
            ("GET", "/nodes".to_owned()),
            ("GET", "/nodes/pve1/version".to_owned()),
            ("GET", "/nodes/pve1/status".to_owned()),
            ("POST", "/nodes/pve1/lxc".to_owned()),
            ("POST", "/nodes/pve1/qemu/103/config".to_owned()),
            ("GET", "/nodes/pve1/storage".to_owned()),
            ("GET", "/nodes/pve1/storage/local/content".to_owned()),
            ("POST", "/nodes/pve1/vzdump".to_owned()),
            ("GET", "/nodes/pve1/tasks".to_owned()),
            ("GET", format!("/nodes/pve1/tasks/{upid}/status")),
            ("GET", format!("/nodes/pve1/tasks/{upid}/log")),
            ("DELETE", format!("/nodes/pve1/tasks/{upid}")),
        ];
        for k in ["lxc", "qemu"] {
            let g = format!("/nodes/pve1/{k}/101");
            routes.extend([
                ("GET", format!("/nodes/pve1/{k}")),
                ("GET", g.clone()),
                ("GET", format!("{g}/config")),
                ("PUT", format!("{g}/config")),
                ("GET", format!("{g}/pending")),
                ("GET", format!("{g}/status/current")),
                ("POST", format!("{g}/status/start")),
                ("POST", format!("{g}/status/stop")),
                ("POST", format!("{g}/status/shutdown")),
                ("GET", format!("{g}/snapshot")),
                ("POST", format!("{g}/snapshot")),
                ("DELETE", format!("{g}/snapshot/nightly")),
                ("POST", format!("{g}/snapshot/nightly/rollback")),
                ("GET", format!("{g}/snapshot/nightly/config")),
                ("PUT", format!("{g}/snapshot/nightly/config")),
            ]);
        }
        for (m, p) in routes {
            let segs: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
            let found = api.find(m, &segs);
            assert!(found.is_some(), "{m} {p}");
        }
        let m = api
            .find("GET", &["nodes", "pve1", "storage", "local", "content"])
            .unwrap();
        assert_eq!(m.template, "/nodes/{node}/storage/{storage}/content");
        assert_eq!(
            m.uri,
            vec![
                ("node".to_owned(), "pve1".to_owned()),
                ("storage".to_owned(), "local".to_owned())
            ]
        );
        assert!(api.find("PATCH", &["nodes", "pve1", "status"]).is_none());
    }

    #[test]
    fn indexed_names_and_numbers() {
        let props = serde_json::json!({"net[n]": {"type": "string"}, "name": {}});
        let props = props.as_object().unwrap();
        assert!(lookup(props, "net0").is_some() && lookup(props, "net31").is_some());
        assert!(lookup(props, "net").is_none() && lookup(props, "netx").is_none());
        assert!(lookup(props, "name").is_some() && lookup(props, "name1").is_none());
        assert_eq!(perl_num(&serde_json::json!(100)), "100");
        assert_eq!(perl_num(&serde_json::json!(100.0)), "100");
        assert_eq!(perl_num(&serde_json::json!(0.5)), "0.5");
    }
}
