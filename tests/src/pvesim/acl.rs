//! API tokens and their privileges, with PVE's ACL path semantics.
//!
//! Owns: the token table (`--acl FILE` plus the full-privilege token), the privilege and
//! built-in role names, and the effective privileges of a token on an ACL path.
//! Must never: treat any token as `root@pam` (a token's auth id is `user@realm!name`),
//! or show a secret in Debug output.
//!
//! Semantics (pve-access-control `roles()`): walking from `/` down to the path, an ACL
//! entry at a level replaces what was inherited, if it propagates or sits on the final
//! path. The token's owning user is assumed to hold Administrator on `/`, so a
//! privilege-separated token has exactly its own ACL. `NoAccess` empties the set.

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;

/// Every privilege name PVE knows (9.x, plus `VM.Monitor` from 8.x).
pub const PRIVILEGES: &[&str] = &[
    "VM.Allocate",
    "VM.Audit",
    "VM.Backup",
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.Console",
    "VM.GuestAgent.Audit",
    "VM.GuestAgent.FileRead",
    "VM.GuestAgent.FileSystemMgmt",
    "VM.GuestAgent.FileWrite",
    "VM.GuestAgent.Unrestricted",
    "VM.Migrate",
    "VM.Monitor",
    "VM.PowerMgmt",
    "VM.Replicate",
    "VM.Snapshot",
    "VM.Snapshot.Rollback",
    "Sys.AccessNetwork",
    "Sys.Audit",
    "Sys.Console",
    "Sys.Incoming",
    "Sys.Modify",
    "Sys.PowerMgmt",
    "Sys.Syslog",
    "Datastore.Allocate",
    "Datastore.AllocateSpace",
    "Datastore.AllocateTemplate",
    "Datastore.Audit",
    "SDN.Allocate",
    "SDN.Audit",
    "SDN.Use",
    "Realm.Allocate",
    "Realm.AllocateUser",
    "User.Modify",
    "Group.Allocate",
    "Pool.Allocate",
    "Pool.Audit",
    "Mapping.Audit",
    "Mapping.Modify",
    "Mapping.Use",
    "Permissions.Modify",
];

/// A set of privileges (bit i = `PRIVILEGES[i]`).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct PrivSet(u64);

impl PrivSet {
    pub const EMPTY: PrivSet = PrivSet(0);

    pub fn all() -> PrivSet {
        PrivSet((1u64 << PRIVILEGES.len()) - 1)
    }

    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<PrivSet, AclError> {
        let mut set = PrivSet::EMPTY;
        for n in names {
            let i = PRIVILEGES
                .iter()
                .position(|p| *p == n)
                .ok_or_else(|| AclError::UnknownPrivilege { name: n.to_owned() })?;
            set.0 |= 1 << i;
        }
        Ok(set)
    }

    pub fn contains(self, name: &str) -> bool {
        PRIVILEGES
            .iter()
            .position(|p| *p == name)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }

    pub fn union(self, other: PrivSet) -> PrivSet {
        PrivSet(self.0 | other.0)
    }

    pub fn names(self) -> Vec<&'static str> {
        PRIVILEGES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, p)| *p)
            .collect()
    }
}

impl fmt::Debug for PrivSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}

/// The privileges of a built-in role (pve-access-control `create_roles`).
pub fn role_privs(role: &str) -> Option<PrivSet> {
    let names: &[&str] = match role {
        "Administrator" => return Some(PrivSet::all()),
        "NoAccess" => &[],
        "PVEAuditor" => &[
            "VM.Audit",
            "VM.GuestAgent.Audit",
            "Sys.Audit",
            "Datastore.Audit",
            "SDN.Audit",
            "Pool.Audit",
            "Mapping.Audit",
        ],
        "PVEVMAdmin" => &[
            "VM.Config.Disk",
            "VM.Config.CPU",
            "VM.Config.Memory",
            "VM.Config.Network",
            "VM.Config.HWType",
            "VM.Config.Options",
            "VM.Allocate",
            "VM.Clone",
            "VM.GuestAgent.Unrestricted",
            "VM.Migrate",
            "VM.Replicate",
            "VM.Snapshot",
            "VM.Snapshot.Rollback",
            "VM.Config.CDROM",
            "VM.Config.Cloudinit",
            "VM.Console",
            "VM.Backup",
            "VM.GuestAgent.FileRead",
            "VM.GuestAgent.FileSystemMgmt",
            "VM.GuestAgent.FileWrite",
            "VM.PowerMgmt",
            "VM.Audit",
            "VM.GuestAgent.Audit",
        ],
        "PVEVMUser" => &[
            "VM.Config.CDROM",
            "VM.Config.Cloudinit",
            "VM.Console",
            "VM.Backup",
            "VM.GuestAgent.FileRead",
            "VM.GuestAgent.FileSystemMgmt",
            "VM.GuestAgent.FileWrite",
            "VM.PowerMgmt",
            "VM.Audit",
            "VM.GuestAgent.Audit",
        ],
        "PVEDatastoreAdmin" => &[
            "Datastore.Allocate",
            "Datastore.AllocateTemplate",
            "Datastore.AllocateSpace",
            "Datastore.Audit",
        ],
        "PVEDatastoreUser" => &["Datastore.AllocateSpace", "Datastore.Audit"],
        "PVESysAdmin" => &["Sys.Console", "Sys.Syslog", "Sys.Audit"],
        "PVETemplateUser" => &["VM.Clone", "VM.Audit"],
        "PVEPoolUser" => &["Pool.Audit"],
        "PVEPoolAdmin" => &["Pool.Allocate", "Pool.Audit"],
        "PVEAdmin" => {
            let mut all = PrivSet::all();
            for p in [
                "Sys.PowerMgmt",
                "Sys.Modify",
                "Sys.Incoming",
                "Sys.AccessNetwork",
                "Realm.Allocate",
                "Permissions.Modify",
                "Mapping.Modify",
                "VM.Monitor",
            ] {
                if let Some(i) = PRIVILEGES.iter().position(|x| *x == p) {
                    all.0 &= !(1 << i);
                }
            }
            return Some(all);
        }
        _ => return None,
    };
    PrivSet::from_names(names.iter().copied()).ok()
}

/// Errors loading the ACL file.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("unknown privilege {name:?}")]
    UnknownPrivilege { name: String },
    #[error("unknown role {name:?}")]
    UnknownRole { name: String },
    #[error("token id {id:?} is not of the form user@realm!name")]
    BadTokenId { id: String },
    #[error("ACL path {path:?} must start with '/'")]
    BadPath { path: String },
    #[error("token {id:?} is defined twice")]
    Duplicate { id: String },
    #[error("token {id:?}: the secret must be non-empty and free of '=' and whitespace")]
    BadSecret { id: String },
    #[error("reading ACL file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing ACL file {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One ACL entry of a token.
#[derive(Debug, Clone)]
pub struct AclEntry {
    pub path: String,
    pub privs: PrivSet,
    pub propagate: bool,
}

/// What a token may do.
#[derive(Debug, Clone)]
pub enum TokenPrivs {
    /// `privsep=0` on a user with Administrator on `/`.
    Full,
    /// Privilege-separated: only these entries.
    Acl(Vec<AclEntry>),
}

impl TokenPrivs {
    /// The effective privileges on `path` (e.g. `/vms/101`).
    pub fn privs_at(&self, path: &str) -> PrivSet {
        let entries = match self {
            TokenPrivs::Full => return PrivSet::all(),
            TokenPrivs::Acl(entries) => entries,
        };
        let mut levels: Vec<String> = vec!["/".to_owned()];
        let mut acc = String::new();
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            acc.push('/');
            acc.push_str(comp);
            levels.push(acc.clone());
        }
        let mut current = PrivSet::EMPTY;
        let last = levels.len() - 1;
        for (i, level) in levels.iter().enumerate() {
            let mut found = false;
            let mut new = PrivSet::EMPTY;
            for e in entries.iter().filter(|e| e.path == *level) {
                if i == last || e.propagate {
                    found = true;
                    new = new.union(e.privs);
                }
            }
            if found {
                current = new;
            }
        }
        current
    }
}

/// A token: its id, secret and privileges.
#[derive(Clone)]
pub struct Token {
    pub id: String,
    secret: String,
    pub privs: TokenPrivs,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("privs", &self.privs)
            .finish()
    }
}

impl Token {
    pub fn new(id: String, secret: String, privs: TokenPrivs) -> Token {
        Token { id, secret, privs }
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Constant-time-ish comparison of a presented secret.
    pub fn secret_matches(&self, presented: &str) -> bool {
        let a = self.secret.as_bytes();
        let b = presented.as_bytes();
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Splits `user@realm!name` into `(user@realm, name)`, PVE's token-id rule.
pub fn split_token_id(id: &str) -> Option<(&str, &str)> {
    let (user, name) = id.split_once('!')?;
    let (uname, realm) = user.rsplit_once('@')?;
    let name_ok = |s: &str, first_alpha: bool| {
        !s.is_empty()
            && s.len() <= 64
            && (!first_alpha || s.chars().next().is_some_and(|c| c.is_ascii_alphabetic()))
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    };
    let user_ok = !uname.is_empty()
        && uname.len() <= 60
        && !uname
            .chars()
            .any(|c| c.is_whitespace() || c == ':' || c == '/' || c == '!' || c == '@');
    if user_ok && name_ok(realm, true) && name_ok(name, true) {
        Some((user, name))
    } else {
        None
    }
}

/// All tokens the node knows, by id.
#[derive(Debug, Clone, Default)]
pub struct TokenTable {
    tokens: HashMap<String, Token>,
}

impl TokenTable {
    pub fn insert(&mut self, token: Token) -> Result<(), AclError> {
        if split_token_id(&token.id).is_none() {
            return Err(AclError::BadTokenId { id: token.id });
        }
        if token.secret.is_empty() || token.secret.contains(['=', ' ', '\t', '\n', ';']) {
            return Err(AclError::BadSecret { id: token.id });
        }
        if self.tokens.contains_key(&token.id) {
            return Err(AclError::Duplicate { id: token.id });
        }
        self.tokens.insert(token.id.clone(), token);
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&Token> {
        self.tokens.get(id)
    }

    /// Whether any token belongs to `user@realm` (the user exists).
    pub fn user_exists(&self, user: &str) -> bool {
        user == "root@pam"
            || self
                .tokens
                .keys()
                .any(|id| split_token_id(id).is_some_and(|(u, _)| u == user))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AclFile {
    tokens: Vec<AclFileToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AclFileToken {
    token_id: String,
    secret: String,
    #[serde(default = "default_true")]
    privsep: bool,
    #[serde(default)]
    acl: Vec<AclFileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AclFileEntry {
    path: String,
    #[serde(default)]
    privs: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default = "default_true")]
    propagate: bool,
}

fn default_true() -> bool {
    true
}

/// Parses the `--acl FILE` format (see docs/testbed.md) into tokens.
pub fn parse_acl_file(path: &str, text: &str) -> Result<Vec<Token>, AclError> {
    let file: AclFile = serde_json::from_str(text).map_err(|source| AclError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for t in file.tokens {
        let privs = if !t.privsep {
            TokenPrivs::Full
        } else {
            let mut entries = Vec::new();
            for e in t.acl {
                if !e.path.starts_with('/') {
                    return Err(AclError::BadPath { path: e.path });
                }
                let mut set = PrivSet::from_names(e.privs.iter().map(String::as_str))?;
                for r in &e.roles {
                    set = set.union(
                        role_privs(r).ok_or_else(|| AclError::UnknownRole { name: r.clone() })?,
                    );
                }
                let path = if e.path.len() > 1 {
                    e.path.trim_end_matches('/').to_owned()
                } else {
                    e.path
                };
                entries.push(AclEntry {
                    path,
                    privs: set,
                    propagate: e.propagate,
                });
            }
            TokenPrivs::Acl(entries)
        };
        out.push(Token::new(t.token_id, t.secret, privs));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(&str, &[&str], bool)]) -> TokenPrivs {
        TokenPrivs::Acl(
            entries
                .iter()
                .map(|(p, privs, prop)| AclEntry {
                    path: (*p).to_owned(),
                    privs: PrivSet::from_names(privs.iter().copied()).unwrap(),
                    propagate: *prop,
                })
                .collect(),
        )
    }

    #[test]
    fn deeper_entries_replace_inherited_ones() {
        let t = acl(&[
            ("/", &["Sys.Audit", "VM.Audit"], true),
            ("/vms/101", &["VM.PowerMgmt"], true),
        ]);
        assert!(t.privs_at("/vms/102").contains("VM.Audit"));
        assert!(t.privs_at("/nodes/pve1").contains("Sys.Audit"));
        let p101 = t.privs_at("/vms/101");
        assert!(p101.contains("VM.PowerMgmt"));
        assert!(!p101.contains("VM.Audit"), "replaced, not merged: {p101:?}");
    }

    #[test]
    fn non_propagating_entries_apply_only_on_their_path() {
        let t = acl(&[("/vms", &["VM.Audit"], false)]);
        assert!(t.privs_at("/vms").contains("VM.Audit"));
        assert!(!t.privs_at("/vms/101").contains("VM.Audit"));
    }

    #[test]
    fn roles_and_no_access() {
        assert!(role_privs("PVEVMAdmin").unwrap().contains("VM.Allocate"));
        assert!(!role_privs("PVEVMUser").unwrap().contains("VM.Allocate"));
        assert!(!role_privs("PVEAdmin").unwrap().contains("Sys.Modify"));
        assert!(role_privs("PVEAdmin").unwrap().contains("Sys.Audit"));
        assert_eq!(role_privs("NoAccess"), Some(PrivSet::EMPTY));
        assert!(role_privs("Nope").is_none());
    }

    #[test]
    fn token_ids() {
        assert_eq!(
            split_token_id("root@pam!felhom"),
            Some(("root@pam", "felhom"))
        );
        assert_eq!(split_token_id("a.b@pve!x-1"), Some(("a.b@pve", "x-1")));
        assert_eq!(split_token_id("root@pam"), None);
        assert_eq!(split_token_id("root!x"), None);
        assert_eq!(split_token_id("root@pam!1x"), None);
    }

    #[test]
    fn acl_file_parses_and_rejects_unknown_privileges() {
        let ok = r#"{"tokens":[{"token_id":"felhom@pve!agent","secret":"s3","acl":[
            {"path":"/vms/101","privs":["VM.Audit"],"roles":["PVEDatastoreUser"]}]}]}"#;
        let tokens = parse_acl_file("f", ok).unwrap();
        assert_eq!(tokens.len(), 1);
        let p = tokens[0].privs.privs_at("/vms/101");
        assert!(p.contains("VM.Audit") && p.contains("Datastore.Audit"));
        let bad = r#"{"tokens":[{"token_id":"x@pve!a","secret":"s","acl":[{"path":"/","privs":["VM.Fly"]}]}]}"#;
        assert!(matches!(
            parse_acl_file("f", bad),
            Err(AclError::UnknownPrivilege { .. })
        ));
        let t = Token::new("a@pve!b".into(), "hunter2".into(), TokenPrivs::Full);
        assert!(!format!("{t:?}").contains("hunter2"));
        assert!(t.secret_matches("hunter2") && !t.secret_matches("hunter3"));
    }
}
