//! Parameter validation the way PVE's JSONSchema does it, with its error texts, and the
//! property strings (`net0`, `features`, `startup`) with PVE's parse and print rules.
//!
//! Owns: types, formats, property-string parsing/printing and the 400 `errors` map.
//! Must never: accept what PVE refuses at the top level (booleans are exactly `0`/`1`).

use std::collections::BTreeMap;

use super::error::ApiError;

/// A parameter or property type.
#[derive(Debug, Clone, Copy)]
pub enum Ty {
    Bool,
    Int {
        min: Option<i64>,
        max: Option<i64>,
    },
    Num {
        min: Option<f64>,
        max: Option<f64>,
    },
    Str {
        fmt: Fmt,
        max_len: Option<usize>,
    },
    Enum(&'static [&'static str]),
    /// `pve-vmid`: integer, then the `pve-vmid` format, then 100..=999999999.
    Vmid,
}

impl Ty {
    pub const fn str() -> Ty {
        Ty::Str {
            fmt: Fmt::None,
            max_len: None,
        }
    }
    pub const fn fmt(fmt: Fmt) -> Ty {
        Ty::Str { fmt, max_len: None }
    }
    pub const fn int(min: i64, max: i64) -> Ty {
        Ty::Int {
            min: Some(min),
            max: Some(max),
        }
    }
    pub const fn int_min(min: i64) -> Ty {
        Ty::Int {
            min: Some(min),
            max: None,
        }
    }
    pub const VMID: Ty = Ty::Vmid;
}

/// A named format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fmt {
    None,
    Vmid,
    VmidList,
    ConfigId,
    ConfigIdList,
    DnsName,
    DnsNameList,
    TagList,
    LxcNet,
    QemuNet,
    Features,
    Startup,
    VolumeId,
    StorageId,
    Node,
    Ipv4,
    Ipv4Config,
    Ipv6,
    Ipv6Config,
    Mac,
    Trunks,
    Bridge,
    IfaceName,
    IpList,
    StorageContentList,
    StorageContent,
    Ip,
    UpidLike,
}

/// One named parameter.
#[derive(Debug, Clone, Copy)]
pub struct Prop {
    pub name: &'static str,
    pub ty: Ty,
    pub optional: bool,
}

pub const fn req(name: &'static str, ty: Ty) -> Prop {
    Prop {
        name,
        ty,
        optional: false,
    }
}
pub const fn opt(name: &'static str, ty: Ty) -> Prop {
    Prop {
        name,
        ty,
        optional: true,
    }
}

/// The parameters a request sent (query and form merged), in arrival order.
pub type Params = BTreeMap<String, String>;

/// Validates `params` against `props`, plus keys `additional` accepts (e.g. `net\d+`).
/// Collects every error, as `check_object` does, and returns them as one 400.
pub fn validate(
    props: &[Prop],
    additional: &dyn Fn(&str) -> Option<Ty>,
    params: &Params,
) -> Result<(), ApiError> {
    let mut errors = BTreeMap::new();
    for p in props {
        match params.get(p.name) {
            Some(v) => {
                if let Err(e) = check_value(&p.ty, v, p.name) {
                    errors.insert(p.name.to_owned(), e);
                }
            }
            None if !p.optional => {
                errors.insert(
                    p.name.to_owned(),
                    "property is missing and it is not optional".to_owned(),
                );
            }
            None => {}
        }
    }
    for (k, v) in params {
        if props.iter().any(|p| p.name == k) {
            continue;
        }
        match additional(k) {
            Some(ty) => {
                if let Err(e) = check_value(&ty, v, k) {
                    errors.insert(k.clone(), e);
                }
            }
            None => {
                errors.insert(
                    k.clone(),
                    "property is not defined in schema and the schema does not allow additional properties"
                        .to_owned(),
                );
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::params(errors))
    }
}

/// PVE's `is_integer`.
pub fn is_integer(v: &str) -> bool {
    let d = v.strip_prefix(['+', '-']).unwrap_or(v);
    !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
}

/// PVE's `is_number`.
pub fn is_number(v: &str) -> bool {
    let s = v.strip_prefix(['+', '-']).unwrap_or(v);
    let (mant, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mant_ok = match mant.split_once('.') {
        Some((a, b)) => {
            (!a.is_empty() || !b.is_empty())
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => !mant.is_empty() && mant.bytes().all(|c| c.is_ascii_digit()),
    };
    let exp_ok = exp.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit())
    });
    mant_ok && exp_ok
}

/// Checks one value; the error is the text PVE puts into `errors.<name>`.
pub fn check_value(ty: &Ty, v: &str, path: &str) -> Result<(), String> {
    match ty {
        Ty::Bool => {
            if v == "0" || v == "1" {
                Ok(())
            } else {
                Err(format!("type check ('boolean') failed - got '{v}'"))
            }
        }
        Ty::Int { min, max } => {
            if !is_integer(v) {
                return Err(format!("type check ('integer') failed - got '{v}'"));
            }
            let n: i128 = v.parse().unwrap_or(i128::MAX);
            if let Some(max) = max
                && n > *max as i128
            {
                return Err(format!("value must have a maximum value of {max}"));
            }
            if let Some(min) = min
                && n < *min as i128
            {
                return Err(format!("value must have a minimum value of {min}"));
            }
            Ok(())
        }
        Ty::Num { min, max } => {
            if !is_number(v) {
                return Err(format!("type check ('number') failed - got '{v}'"));
            }
            let n: f64 = v.parse().unwrap_or(f64::NAN);
            if let Some(max) = max
                && n > *max
            {
                return Err(format!("value must have a maximum value of {max}"));
            }
            if let Some(min) = min
                && n < *min
            {
                return Err(format!("value must have a minimum value of {min}"));
            }
            Ok(())
        }
        Ty::Vmid => {
            if !is_integer(v) {
                return Err(format!("type check ('integer') failed - got '{v}'"));
            }
            if !is_vmid(v) {
                return Err("invalid format - value does not look like a valid VM ID\n".to_owned());
            }
            Ok(())
        }
        Ty::Enum(values) => {
            if values.contains(&v) {
                Ok(())
            } else {
                Err(format!(
                    "value '{v}' does not have a value in the enumeration '{}'",
                    values.join(", ")
                ))
            }
        }
        Ty::Str { fmt, max_len } => {
            if *fmt != Fmt::None
                && let Err(e) = check_format(*fmt, v, path)
            {
                return Err(format!("invalid format - {e}"));
            }
            if let Some(max) = max_len
                && v.chars().count() > *max
            {
                return Err(format!("value may only be {max} characters long"));
            }
            Ok(())
        }
    }
}

/// PVE's `split_list`: `\0`, or `,`/`;`/whitespace separated.
pub fn split_list(s: &str) -> Vec<String> {
    if s.contains('\0') {
        return s.split('\0').map(str::to_owned).collect();
    }
    s.split([',', ';', ' ', '\t', '\n', '\r'])
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

fn dns_label_ok(l: &str) -> bool {
    let b = l.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

pub fn is_dns_name(s: &str) -> bool {
    s.split('.').all(dns_label_ok)
}

pub fn is_config_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
}

pub fn is_vmid(s: &str) -> bool {
    let b = s.as_bytes();
    (3..=9).contains(&b.len()) && b[0] != b'0' && b.iter().all(u8::is_ascii_digit)
}

pub fn is_ipv4(s: &str) -> bool {
    s.parse::<std::net::Ipv4Addr>().is_ok()
}

fn is_ipv6(s: &str) -> bool {
    s.parse::<std::net::Ipv6Addr>().is_ok()
}

fn is_cidr(s: &str, v4: bool) -> bool {
    match s.split_once('/') {
        Some((ip, mask)) => {
            let max = if v4 { 32 } else { 128 };
            (if v4 { is_ipv4(ip) } else { is_ipv6(ip) })
                && mask.parse::<u8>().is_ok_and(|m| m <= max)
                && !mask.starts_with('+')
        }
        None => false,
    }
}

/// A unicast MAC, the `mac-addr` pattern.
pub fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

pub fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'+' | b'.'))
}

/// A volume id `storage:name`.
pub fn parse_volume_id(s: &str) -> Option<(&str, &str)> {
    let (sid, name) = s.split_once(':')?;
    (is_config_id(sid) && !name.is_empty()).then_some((sid, name))
}

/// Returns the `$@` text of a failed format check (ending in `\n` like PVE's `die`).
pub(crate) fn check_format(fmt: Fmt, v: &str, path: &str) -> Result<(), String> {
    let ok = |c: bool, msg: &str| if c { Ok(()) } else { Err(format!("{msg}\n")) };
    match fmt {
        Fmt::None => Ok(()),
        Fmt::Vmid => ok(is_vmid(v), "value does not look like a valid VM ID"),
        Fmt::VmidList => {
            for id in split_list(v) {
                ok(is_vmid(&id), "value does not look like a valid VM ID")?;
            }
            Ok(())
        }
        Fmt::ConfigId => ok(is_config_id(v), &format!("invalid configuration ID '{v}'")),
        Fmt::ConfigIdList => {
            for id in split_list(v) {
                ok(
                    is_config_id(&id),
                    &format!("invalid configuration ID '{id}'"),
                )?;
            }
            Ok(())
        }
        Fmt::DnsName => ok(is_dns_name(v), "value does not look like a valid DNS name"),
        Fmt::DnsNameList => {
            for n in split_list(v) {
                ok(is_dns_name(&n), "value does not look like a valid DNS name")?;
            }
            Ok(())
        }
        Fmt::TagList => {
            for t in split_list(v) {
                ok(is_tag(&t), "invalid characters in tag")?;
            }
            Ok(())
        }
        Fmt::LxcNet => parse_propstr(&LXC_NET, v, path).map(|_| ()),
        Fmt::QemuNet => parse_propstr(&QEMU_NET, v, path).map(|_| ()),
        Fmt::Features => parse_propstr(&FEATURES, v, path).map(|_| ()),
        Fmt::Startup => parse_propstr(&STARTUP, v, path).map(|_| ()),
        Fmt::VolumeId => ok(
            parse_volume_id(v).is_some(),
            &format!("unable to parse volume ID '{v}'"),
        ),
        Fmt::StorageId => ok(
            is_config_id(v),
            &format!("storage ID '{v}' contains illegal characters"),
        ),
        Fmt::Node => ok(
            is_dns_name(v) && !v.contains('.'),
            "value does not look like a valid node name",
        ),
        Fmt::Ipv4 => ok(is_ipv4(v), "value does not look like a valid IPv4 address"),
        Fmt::Ipv6 => ok(is_ipv6(v), "value does not look like a valid IPv6 address"),
        Fmt::Ipv4Config => ok(
            v == "dhcp" || v == "manual" || is_cidr(v, true),
            "value does not look like a valid ipv4 network configuration",
        ),
        Fmt::Ipv6Config => ok(
            matches!(v, "dhcp" | "manual" | "auto") || is_cidr(v, false),
            "value does not look like a valid ipv6 network configuration",
        ),
        Fmt::Mac => ok(is_mac(v), "value does not look like a valid MAC address"),
        Fmt::Trunks => ok(
            !v.is_empty()
                && v.split(';').all(|p| {
                    let (a, b) = p.split_once('-').unwrap_or((p, "0"));
                    !a.is_empty()
                        && a.bytes().all(|c| c.is_ascii_digit())
                        && b.bytes().all(|c| c.is_ascii_digit())
                }),
            "value does not match the regex pattern",
        ),
        Fmt::Bridge | Fmt::IfaceName => ok(
            !v.is_empty()
                && v.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')),
            "value does not match the regex pattern",
        ),
        Fmt::IpList => {
            for ip in split_list(v) {
                ok(
                    is_ipv4(&ip) || is_ipv6(&ip),
                    &format!("value '{ip}' does not look like a valid IP address"),
                )?;
            }
            Ok(())
        }
        Fmt::StorageContentList => {
            const C: &[&str] = &[
                "images", "rootdir", "vztmpl", "iso", "backup", "snippets", "import",
            ];
            for c in split_list(v) {
                ok(
                    C.contains(&c.as_str()),
                    &format!("invalid content type '{c}'"),
                )?;
            }
            Ok(())
        }
        Fmt::StorageContent => {
            const C: &[&str] = &[
                "images", "rootdir", "vztmpl", "iso", "backup", "snippets", "import",
            ];
            ok(C.contains(&v), &format!("invalid content type '{v}'"))
        }
        Fmt::Ip => ok(
            is_ipv4(v) || is_ipv6(v),
            "value does not look like a valid IP address",
        ),
        Fmt::UpidLike => Ok(()),
    }
}

/// A property-string format: keys with types, optional default key, and for QEMU's
/// net the model names that alias `<model>=<macaddr>`.
#[derive(Debug)]
pub struct PropFmt {
    pub keys: &'static [Prop],
    pub default_key: Option<&'static str>,
    pub alias_models: &'static [&'static str],
}

pub const NIC_MODELS: &[&str] = &[
    "e1000",
    "e1000-82540em",
    "e1000-82544gc",
    "e1000-82545em",
    "e1000e",
    "i82551",
    "i82557b",
    "i82559er",
    "ne2k_isa",
    "ne2k_pci",
    "pcnet",
    "rtl8139",
    "virtio",
    "vmxnet3",
];

pub static LXC_NET: PropFmt = PropFmt {
    keys: &[
        opt("type", Ty::Enum(&["veth"])),
        req("name", Ty::fmt(Fmt::IfaceName)),
        opt("bridge", Ty::fmt(Fmt::Bridge)),
        opt("hwaddr", Ty::fmt(Fmt::Mac)),
        opt("mtu", Ty::int(64, 65535)),
        opt("ip", Ty::fmt(Fmt::Ipv4Config)),
        opt("gw", Ty::fmt(Fmt::Ipv4)),
        opt("ip6", Ty::fmt(Fmt::Ipv6Config)),
        opt("gw6", Ty::fmt(Fmt::Ipv6)),
        opt("firewall", Ty::Bool),
        opt("tag", Ty::int(1, 4094)),
        opt("trunks", Ty::fmt(Fmt::Trunks)),
        opt(
            "rate",
            Ty::Num {
                min: None,
                max: None,
            },
        ),
        opt("link_down", Ty::Bool),
        opt("host-managed", Ty::Bool),
    ],
    default_key: None,
    alias_models: &[],
};

pub static QEMU_NET: PropFmt = PropFmt {
    keys: &[
        opt("macaddr", Ty::fmt(Fmt::Mac)),
        req("model", Ty::Enum(NIC_MODELS)),
        opt("bridge", Ty::fmt(Fmt::Bridge)),
        opt("queues", Ty::int(0, 64)),
        opt(
            "rate",
            Ty::Num {
                min: Some(0.0),
                max: None,
            },
        ),
        opt("tag", Ty::int(1, 4094)),
        opt("trunks", Ty::fmt(Fmt::Trunks)),
        opt("firewall", Ty::Bool),
        opt("link_down", Ty::Bool),
        opt("mtu", Ty::int(1, 65520)),
    ],
    default_key: Some("model"),
    alias_models: NIC_MODELS,
};

pub static FEATURES: PropFmt = PropFmt {
    keys: &[
        opt("mount", Ty::str()),
        opt("nesting", Ty::Bool),
        opt("keyctl", Ty::Bool),
        opt("fuse", Ty::Bool),
        opt("mknod", Ty::Bool),
        opt("force_rw_sys", Ty::Bool),
    ],
    default_key: None,
    alias_models: &[],
};

pub static STARTUP: PropFmt = PropFmt {
    keys: &[
        opt("order", Ty::int_min(0)),
        opt("up", Ty::int_min(0)),
        opt("down", Ty::int_min(0)),
    ],
    default_key: None,
    alias_models: &[],
};

/// PVE's `parse_boolean` inside property strings.
fn parse_boolean(v: &str) -> Option<&'static str> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some("1"),
        "0" | "false" | "no" | "off" => Some("0"),
        _ => None,
    }
}

/// Parses a property string; booleans become `0`/`1`. The error is the `$@` text.
pub fn parse_propstr(
    fmt: &PropFmt,
    data: &str,
    path: &str,
) -> Result<BTreeMap<String, String>, String> {
    let find = |k: &str| fmt.keys.iter().find(|p| p.name == k);
    let mut res: BTreeMap<String, String> = BTreeMap::new();
    let mut default_used = false;
    for part in data.split(',') {
        if part.trim().is_empty() {
            continue;
        }
        if let Some((k, v)) = part
            .split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        {
            if fmt.alias_models.contains(&k) {
                if res.contains_key("model") {
                    return Err("key alias 'model' is already defined\n".to_owned());
                }
                if res.contains_key("macaddr") {
                    return Err("key 'macaddr' is already defined (via alias)\n".to_owned());
                }
                res.insert("model".to_owned(), k.to_owned());
                res.insert("macaddr".to_owned(), v.to_owned());
                continue;
            }
            if res.contains_key(k) {
                return Err(format!(
                    "duplicate key in comma-separated list property: {k}\n"
                ));
            }
            let Some(prop) = find(k) else {
                return Err(format!(
                    "invalid key in comma-separated list property: {k}\n"
                ));
            };
            let v = match prop.ty {
                Ty::Bool => parse_boolean(v)
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_owned()),
                _ => v.to_owned(),
            };
            res.insert(k.to_owned(), v);
        } else if !part.contains('=') {
            let Some(dk) = fmt.default_key else {
                return Err(
                    "value without key, but schema does not define a default key\n".to_owned(),
                );
            };
            if default_used || res.contains_key(dk) {
                return Err(format!(
                    "duplicate key in comma-separated list property: {dk}\n"
                ));
            }
            default_used = true;
            res.insert(dk.to_owned(), part.to_owned());
        } else {
            return Err("missing key in comma-separated list property\n".to_owned());
        }
    }
    let mut errors = String::new();
    for p in fmt.keys {
        match res.get(p.name) {
            Some(v) => {
                if let Err(e) = check_value(&p.ty, v, &format!("{path}.{}", p.name)) {
                    errors.push_str(&format!("{path}.{}: {e}\n", p.name));
                }
            }
            None if !p.optional => {
                errors.push_str(&format!(
                    "{path}.{}: property is missing and it is not optional\n",
                    p.name
                ));
            }
            None => {}
        }
    }
    if errors.is_empty() {
        Ok(res)
    } else {
        Err(format!("format error\n{errors}"))
    }
}

/// PVE's `print_property_string`: default key (combined with its alias value), then
/// required keys sorted, then the rest sorted.
pub fn print_propstr(fmt: &PropFmt, data: &BTreeMap<String, String>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut done: Vec<&str> = Vec::new();
    if let Some(dk) = fmt.default_key
        && let Some(v) = data.get(dk)
    {
        if !fmt.alias_models.is_empty()
            && let Some(mac) = data.get("macaddr")
        {
            out.push(format!("{v}={mac}"));
            done.push("macaddr");
        } else {
            out.push(v.clone());
        }
        done.push(dk);
    }
    for (k, v) in data {
        let required = fmt.keys.iter().any(|p| p.name == k && !p.optional);
        if required && !done.contains(&k.as_str()) {
            out.push(format!("{k}={v}"));
            done.push(k);
        }
    }
    for (k, v) in data {
        if !done.contains(&k.as_str()) {
            out.push(format!("{k}={v}"));
        }
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_level_booleans_are_exactly_0_or_1() {
        assert!(check_value(&Ty::Bool, "1", "x").is_ok());
        assert_eq!(
            check_value(&Ty::Bool, "true", "x").unwrap_err(),
            "type check ('boolean') failed - got 'true'"
        );
    }

    #[test]
    fn integers_numbers_enums() {
        assert_eq!(
            check_value(&Ty::int(1, 10), "abc", "x").unwrap_err(),
            "type check ('integer') failed - got 'abc'"
        );
        assert_eq!(
            check_value(&Ty::VMID, "99", "vmid").unwrap_err(),
            "invalid format - value does not look like a valid VM ID\n"
        );
        assert_eq!(
            check_value(&Ty::VMID, "x", "vmid").unwrap_err(),
            "type check ('integer') failed - got 'x'"
        );
        assert!(is_number("1.5") && is_number(".5") && is_number("1e3") && !is_number("1.2.3"));
        assert!(
            check_value(&Ty::Enum(&["a", "b"]), "c", "x")
                .unwrap_err()
                .contains("enumeration 'a, b'")
        );
    }

    #[test]
    fn unknown_and_missing_properties() {
        let mut p = Params::new();
        p.insert("bogus".into(), "1".into());
        let err = validate(&[req("vmid", Ty::VMID)], &|_| None, &p).unwrap_err();
        let errors = err.errors.unwrap();
        assert_eq!(errors["vmid"], "property is missing and it is not optional");
        assert!(errors["bogus"].starts_with("property is not defined in schema"));
    }

    #[test]
    fn lxc_net_parse_and_canonical_print() {
        let m = parse_propstr(
            &LXC_NET,
            "bridge=vmbr0,name=eth0,firewall=true,ip=dhcp",
            "net0",
        )
        .unwrap();
        assert_eq!(m["firewall"], "1");
        assert_eq!(
            print_propstr(&LXC_NET, &m),
            "name=eth0,bridge=vmbr0,firewall=1,ip=dhcp"
        );
        let e = parse_propstr(&LXC_NET, "bridge=vmbr0", "net0").unwrap_err();
        assert_eq!(
            e,
            "format error\nnet0.name: property is missing and it is not optional\n"
        );
        let e = parse_propstr(&LXC_NET, "name=eth0,gw=1.2.3", "net0").unwrap_err();
        assert_eq!(
            e,
            "format error\nnet0.gw: invalid format - value does not look like a valid IPv4 address\n\n"
        );
        assert!(
            parse_propstr(&LXC_NET, "name=eth0,colour=red", "net0")
                .unwrap_err()
                .starts_with("invalid key")
        );
    }

    #[test]
    fn qemu_net_model_alias() {
        let m = parse_propstr(
            &QEMU_NET,
            "bridge=vmbr0,virtio=BC:24:11:00:00:01,firewall=1",
            "net0",
        )
        .unwrap();
        assert_eq!(m["model"], "virtio");
        assert_eq!(
            print_propstr(&QEMU_NET, &m),
            "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1"
        );
        let m = parse_propstr(&QEMU_NET, "e1000,bridge=vmbr1", "net0").unwrap();
        assert_eq!(print_propstr(&QEMU_NET, &m), "e1000,bridge=vmbr1");
    }

    #[test]
    fn lists_and_formats() {
        assert_eq!(split_list("a, b;c  d"), vec!["a", "b", "c", "d"]);
        assert!(is_mac("BC:24:11:AA:00:01") && !is_mac("01:24:11:AA:00:01"));
        assert!(is_tag("prod") && is_tag("a.b+c") && !is_tag("-x") && !is_tag("a b"));
        assert!(is_config_id("pre-upgrade") && !is_config_id("1abc") && !is_config_id("a"));
        assert_eq!(
            check_value(&Ty::fmt(Fmt::Vmid), "12", "vmid").unwrap_err(),
            "invalid format - value does not look like a valid VM ID\n"
        );
    }
}
