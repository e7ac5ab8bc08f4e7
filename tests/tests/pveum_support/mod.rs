//! Reads the `pveum` lines of a document's ```` ```sh ```` blocks as the grant they give:
//! the roles (`role add`, `role modify --append 1`) and the ACL entries (`acl modify`),
//! with `for VAR in …; do … done` loops (a word list or `$(seq A B)`) expanded, so a test
//! can run the simulator with exactly the privileges the operator docs tell people to give.
#![allow(dead_code)] // each test file uses a different part

use std::collections::{BTreeMap, BTreeSet};

/// Privileges per ACL path.
pub type Acl = BTreeMap<String, BTreeSet<String>>;

/// One `pveum acl modify` line.
#[derive(Debug, Clone)]
pub struct AclLine {
    pub path: String,
    pub users: String,
    pub tokens: String,
    pub roles: Vec<String>,
}

/// What one shell block grants.
#[derive(Debug, Default, Clone)]
pub struct Block {
    /// `role add NAME --privs …`.
    pub roles: BTreeMap<String, BTreeSet<String>>,
    /// `role modify NAME --append 1 --privs …`.
    pub appended: BTreeMap<String, BTreeSet<String>>,
    pub acls: Vec<AclLine>,
}

impl Block {
    /// The ACL of this block's `acl modify` lines for `token`, with each role's privileges
    /// taken from `roles` (this block's and any earlier ones).
    pub fn acl(&self, token: &str, roles: &BTreeMap<String, BTreeSet<String>>) -> Acl {
        let mut out = Acl::new();
        for a in &self.acls {
            assert_eq!(
                a.tokens, token,
                "acl modify {}: grant the agent's token",
                a.path
            );
            let user = token.split('!').next().unwrap();
            assert_eq!(
                a.users, user,
                "acl modify {}: grant the token's user too",
                a.path
            );
            for r in &a.roles {
                let p = roles
                    .get(r)
                    .unwrap_or_else(|| panic!("acl modify {}: role {r} is never added", a.path));
                out.entry(a.path.clone())
                    .or_default()
                    .extend(p.iter().cloned());
            }
        }
        out
    }
}

/// Splits one shell command line into words (single and double quotes; stops at an
/// unquoted `|`, `>` or `#`).
pub fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut started = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (None, '|' | '>' | '#') => break,
            (None, c) if c.is_whitespace() => {
                if started || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if started || !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn flag<'a>(w: &'a [String], name: &str) -> Option<&'a str> {
    w.iter()
        .position(|x| x == name)
        .and_then(|i| w.get(i + 1))
        .map(String::as_str)
}

fn privs(list: &str) -> BTreeSet<String> {
    list.split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The items of a `for` loop's list: words, or `$(seq A B)`.
fn loop_items(list: &[String]) -> Vec<String> {
    if list.first().map(String::as_str) == Some("$(seq") {
        let a: u64 = list[1].parse().expect("seq start");
        let b: u64 = list[2].trim_end_matches(')').parse().expect("seq end");
        return (a..=b).map(|n| n.to_string()).collect();
    }
    list.to_vec()
}

/// The commands of each ```` ```sh ```` block of `text`, loops expanded, `$NAME`s of
/// `vars` replaced, each split into words; only lines starting with `pveum` are kept.
pub fn sh_blocks(text: &str, vars: &[(&str, &str)]) -> Vec<Vec<Vec<String>>> {
    let mut blocks = Vec::new();
    let mut cur: Option<Vec<Vec<String>>> = None;
    // (variable, items, body)
    let mut in_loop: Option<(String, Vec<String>, Vec<String>)> = None;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            if let Some(b) = cur.take() {
                blocks.push(b);
            } else if t == "```sh" {
                cur = Some(Vec::new());
            }
            continue;
        }
        let Some(block) = cur.as_mut() else { continue };
        let w = words(t);
        if w.first().map(String::as_str) == Some("for") {
            assert_eq!(w.get(2).map(String::as_str), Some("in"), "{t}");
            let mut list: Vec<String> = w[3..].to_vec();
            assert_eq!(
                list.pop().as_deref(),
                Some("do"),
                "{t}: put `; do` on the for line"
            );
            let last = list.pop().expect("a for loop's list");
            let last = last.strip_suffix(';').expect("`;` before `do`").to_string();
            if !last.is_empty() {
                list.push(last);
            }
            in_loop = Some((w[1].clone(), loop_items(&list), Vec::new()));
            continue;
        }
        if w.first().map(String::as_str) == Some("done") {
            let (var, items, body) = in_loop.take().expect("done without for");
            for item in &items {
                for b in &body {
                    block.push(words(&b.replace(&format!("${var}"), item)));
                }
            }
            continue;
        }
        let mut t = t.to_string();
        for (k, v) in vars {
            t = t.replace(&format!("${k}"), v);
        }
        if let Some((_, _, body)) = in_loop.as_mut() {
            body.push(t);
        } else if t.starts_with("pveum ") {
            block.push(words(&t));
        }
    }
    blocks
        .into_iter()
        .map(|b| {
            b.into_iter()
                .filter(|w| w.first().map(String::as_str) == Some("pveum"))
                .collect::<Vec<_>>()
        })
        .filter(|b: &Vec<Vec<String>>| !b.is_empty())
        .collect()
}

/// The grant of one block's `pveum` commands.
pub fn block(commands: &[Vec<String>]) -> Block {
    let mut out = Block::default();
    for w in commands {
        match w.get(1..3).map(|s| (s[0].as_str(), s[1].as_str())) {
            Some(("role", "add")) => {
                let p = flag(w, "--privs").expect("role add --privs");
                out.roles.insert(w[3].clone(), privs(p));
            }
            Some(("role", "modify")) => {
                assert_eq!(flag(w, "--append"), Some("1"), "{w:?}: use --append 1");
                let p = flag(w, "--privs").expect("role modify --privs");
                out.appended
                    .entry(w[3].clone())
                    .or_default()
                    .extend(privs(p));
            }
            Some(("acl", "modify")) => out.acls.push(AclLine {
                path: w[3].clone(),
                users: flag(w, "--users").unwrap_or("").to_string(),
                tokens: flag(w, "--tokens").unwrap_or("").to_string(),
                roles: flag(w, "--roles")
                    .expect("acl modify --roles")
                    .split(',')
                    .map(str::to_string)
                    .collect(),
            }),
            _ => {}
        }
    }
    out
}

pub fn union(a: &Acl, b: &Acl) -> Acl {
    let mut out = a.clone();
    for (p, s) in b {
        out.entry(p.clone()).or_default().extend(s.iter().cloned());
    }
    out
}

/// `acl` with `privilege` taken away on every path.
pub fn without(acl: &Acl, privilege: &str) -> Acl {
    acl.iter()
        .map(|(p, s)| {
            (
                p.clone(),
                s.iter().filter(|x| *x != privilege).cloned().collect(),
            )
        })
        .collect()
}

pub fn all_privileges(acl: &Acl) -> Vec<String> {
    let set: BTreeSet<String> = acl.values().flatten().cloned().collect();
    set.into_iter().collect()
}
