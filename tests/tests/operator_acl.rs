//! The README's `pveum` commands are the agent's real privilege needs, checked against
//! `felhom-pvesim`'s privilege checks (which follow PVE's Perl sources), so the operator
//! docs and the code cannot drift apart.
//!
//! The test reads the `pveum role add|modify`, `pveum user token add` and
//! `pveum acl modify` lines from README.md's shell blocks, builds the simulator's ACL
//! file from exactly those grants for exactly that token, and runs the agent as the
//! operator would: `selftest`, `selftest --task --vmid 101`, the daemon (`run`) until its
//! first report reaches `felhom-hubsim`, and a reconcile cycle (the engine with the
//! production client) that changes every managed key and a guest's power state.
//!
//! - With the required grant (`role add`): everything succeeds; the report has no
//!   Proxmox, guest or storage error; backups are not visible (documented).
//! - With the optional grant too (`role modify --append`): backups appear in the report.
//! - Each privilege removed in turn: what fails names it (selftest exit 2, the task
//!   selftest, the reconcile action's error, the report's error), or, where PVE filters
//!   instead of refusing (`VM.Audit`, `Datastore.Audit`, the backup pair), what it guards
//!   disappears. A privilege the README grants without a known use fails the test.

mod hub_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use felhom_agent::config::{Config, EnvMap};
use felhom_agent::proxmox::Client;
use felhom_agent::reconcile::{Engine, Gate};
use felhom_testbed::harness::PveSim;
use hub_support::{AgentHome, HubSim, agent_command};
use serde_json::{Value, json};

/// Privileges per ACL path.
type Acl = BTreeMap<String, BTreeSet<String>>;

#[derive(Debug)]
struct Grant {
    token_id: String,
    required: Acl,
    optional: Acl,
}

/// Splits one shell command line into words (single and double quotes; stops at an
/// unquoted `|` or `>`).
fn words(line: &str) -> Vec<String> {
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
            (None, '|' | '>') => break,
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

/// The grant the README's shell blocks give, with `$NODE` as `node`.
fn readme_grant(node: &str) -> Grant {
    let readme = std::fs::read_to_string(hub_support::repo_root().join("README.md")).unwrap();
    let mut in_sh = false;
    let mut roles: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut appended: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut token: Option<(String, String)> = None;
    let mut acls: Vec<(String, String, String, String)> = Vec::new();
    for line in readme.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = t == "```sh";
            continue;
        }
        if !in_sh || !t.starts_with("pveum ") {
            continue;
        }
        let w = words(t);
        let w: Vec<String> = w.into_iter().map(|x| x.replace("$NODE", node)).collect();
        match w.get(1..3).map(|s| (s[0].as_str(), s[1].as_str())) {
            Some(("role", "add")) => {
                let p = flag(&w, "--privs").expect("role add --privs");
                roles.insert(w[3].clone(), privs(p));
            }
            Some(("role", "modify")) => {
                assert_eq!(flag(&w, "--append"), Some("1"), "{t}: use --append 1");
                let p = flag(&w, "--privs").expect("role modify --privs");
                appended.entry(w[3].clone()).or_default().extend(privs(p));
            }
            Some(("user", "token")) if w.get(3).map(String::as_str) == Some("add") => {
                assert_eq!(
                    flag(&w, "--privsep"),
                    Some("1"),
                    "{t}: the token must be privilege-separated"
                );
                token = Some((w[4].clone(), w[5].clone()));
            }
            Some(("acl", "modify")) => acls.push((
                w[3].clone(),
                flag(&w, "--users").unwrap_or("").to_string(),
                flag(&w, "--tokens").unwrap_or("").to_string(),
                flag(&w, "--roles").expect("acl modify --roles").to_string(),
            )),
            _ => {}
        }
    }
    let (user, name) = token.expect("README: pveum user token add");
    let token_id = format!("{user}!{name}");
    let mut required = Acl::new();
    let mut optional = Acl::new();
    assert!(!acls.is_empty(), "README: no pveum acl modify");
    for (path, users, tokens, role_names) in acls {
        assert_eq!(
            tokens, token_id,
            "acl modify {path}: grant the agent's token"
        );
        // privsep: the token has the intersection of its own and its user's privileges.
        assert_eq!(users, user, "acl modify {path}: grant the token's user too");
        for r in role_names.split(',') {
            let base = roles
                .get(r)
                .unwrap_or_else(|| panic!("acl modify {path}: role {r} is never added"));
            required
                .entry(path.clone())
                .or_default()
                .extend(base.clone());
            if let Some(extra) = appended.get(r) {
                optional
                    .entry(path.clone())
                    .or_default()
                    .extend(extra.clone());
            }
        }
    }
    for r in appended.keys() {
        assert!(roles.contains_key(r), "role modify {r}: never added");
    }
    Grant {
        token_id,
        required,
        optional,
    }
}

fn union(a: &Acl, b: &Acl) -> Acl {
    let mut out = a.clone();
    for (p, s) in b {
        out.entry(p.clone()).or_default().extend(s.iter().cloned());
    }
    out
}

fn without(acl: &Acl, privilege: &str) -> Acl {
    acl.iter()
        .map(|(p, s)| {
            (
                p.clone(),
                s.iter().filter(|x| *x != privilege).cloned().collect(),
            )
        })
        .collect()
}

/// What the agent saw with one grant.
#[derive(Debug)]
struct Outcome {
    selftest_exit: Option<i32>,
    selftest: String,
    task_exit: Option<i32>,
    task: String,
    report: Value,
    /// The reconcile engine's failing actions and cycle error, one per line.
    engine_errors: String,
    /// Every desired change is visible in the simulator.
    converged: bool,
}

impl Outcome {
    fn selftest_json(&self) -> Value {
        serde_json::from_str(&self.selftest).unwrap_or(Value::Null)
    }

    fn report_errors(&self) -> Vec<Value> {
        self.report["errors"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

const SECRET: &str = "5f0c3e6a-acl0-test-0000-000000000001";

fn desired() -> Value {
    json!({"generation": 1, "guests": [
        {"vmid": 101, "config": {"memory": 1024, "swap": 256, "cores": 2, "cpulimit": "1.5",
            "onboot": false, "description": "acl check", "tags": "acl;felhom",
            "hostname": "acl-check", "nesting": true}},
        {"vmid": 102, "power": "running"},
        {"vmid": 103, "config": {"memory": 2048, "cores": 2, "onboot": false,
            "description": "acl check", "tags": "acl"}}
    ]})
}

async fn converged(sim: &PveSim) -> bool {
    let (Ok(a), Ok(b), Ok(c)) = (
        sim.guest(101).await,
        sim.guest(102).await,
        sim.guest(103).await,
    ) else {
        return false;
    };
    let ca = &a["config"];
    let num = |v: &Value| {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    };
    num(&ca["memory"]) == Some(1024)
        && num(&ca["cores"]) == Some(2)
        && num(&ca["onboot"]) == Some(0)
        && ca["hostname"] == "acl-check"
        && ca["features"]
            .as_str()
            .is_some_and(|f| f.contains("nesting=1"))
        && b["status"] == "running"
        && num(&c["config"]["memory"]) == Some(2048)
        && num(&c["config"]["cores"]) == Some(2)
}

/// Runs the operator's checks, the daemon and a reconcile cycle with exactly `acl`.
async fn run_with(grant: &Grant, acl: &Acl) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let acl_file = dir.path().join("acl.json");
    let entries: Vec<Value> = acl
        .iter()
        .map(|(path, p)| json!({"path": path, "privs": p, "propagate": true}))
        .collect();
    std::fs::write(
        &acl_file,
        json!({"tokens": [{"token_id": grant.token_id, "secret": SECRET, "privsep": true, "acl": entries}]})
            .to_string(),
    )
    .unwrap();
    let sim = PveSim::spawn(
        env!("CARGO_BIN_EXE_felhom-pvesim"),
        &[
            "--guests",
            "6",
            "--task-seconds",
            "0.05",
            "--acl",
            acl_file.to_str().unwrap(),
        ],
    )
    .expect("felhom-pvesim");
    let hub = HubSim::start();
    let home = AgentHome::new(
        &hub,
        sim.url(),
        json!({"token_id": grant.token_id, "token_secret": SECRET,
               "tls": {"pin_sha256": sim.pin_sha256()}}),
    );
    home.set("node", json!(sim.node()));

    let (selftest_exit, selftest, _) = agent_command(&home, &["selftest", "--json"]);
    let (task_exit, task, task_err) =
        agent_command(&home, &["selftest", "--task", "--vmid", "101", "--json"]);

    // The daemon, until its first report has reached the hub.
    let report = {
        let _agent = home.start();
        let reports = hub
            .wait_reports(Duration::from_secs(30), |r| {
                r.iter().any(|x| x["outcome"] == "accepted")
            })
            .await;
        reports
            .into_iter()
            .find(|x| x["outcome"] == "accepted")
            .map(|x| x["report"].clone())
            .unwrap()
    };

    // A reconcile cycle with the production client and this token.
    let desired_file = dir.path().join("desired.json");
    std::fs::write(&desired_file, desired().to_string()).unwrap();
    let state = dir.path().join("engine-state");
    std::fs::create_dir(&state).unwrap();
    let mut cfg = Config::load_with_env(Some(&home.config), &EnvMap::new())
        .expect("config")
        .config;
    cfg.state_dir = state;
    cfg.reconcile.desired_file = Some(desired_file);
    let client = Client::from_config(&cfg).expect("client");
    let (_gate_tx, gate_rx) = tokio::sync::watch::channel(Gate::Open);
    let engine = Engine::spawn_from_config(&cfg, Arc::new(client), gate_rx).expect("engine");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (engine_errors, is_converged) = loop {
        let st = engine.status();
        let idle = st.queue.queued == 0 && st.queue.running == 0;
        let ok = converged(&sim).await;
        let mut errors: Vec<String> = st
            .failing
            .iter()
            .map(|f| format!("{} {}: {}", f.vmid, f.action, f.last_error))
            .collect();
        errors.extend(st.last_cycle_error.clone());
        if !st.only_desired.is_empty() {
            errors.push(format!("desired guests not visible: {:?}", st.only_desired));
        }
        if st.cycles >= 1 && idle && (ok || !errors.is_empty()) {
            break (errors.join("\n"), ok);
        }
        if Instant::now() > deadline {
            break (
                format!("{}\n(timed out; status {:?})", errors.join("\n"), st),
                ok,
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    engine.shutdown(Duration::from_secs(2)).await;

    Outcome {
        selftest_exit,
        selftest,
        task_exit,
        task: format!("{task}{task_err}"),
        report,
        engine_errors,
        converged: is_converged,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The errors of the report that concern Proxmox reads (not sensors, SMART, cloudflared).
fn proxmox_errors(o: &Outcome) -> Vec<Value> {
    o.report_errors()
        .into_iter()
        .filter(|e| {
            matches!(
                e["component"].as_str(),
                Some("proxmox" | "guest" | "storage" | "backups" | "reconcile")
            )
        })
        .collect()
}

fn assert_all_good(o: &Outcome, what: &str) {
    assert_eq!(o.selftest_exit, Some(0), "{what}: selftest: {}", o.selftest);
    let st = o.selftest_json();
    assert_eq!(st["ok"], true, "{what}: {}", o.selftest);
    assert_eq!(st["guests"].as_array().map(Vec::len), Some(6), "{what}");
    assert_eq!(st["storages"].as_array().map(Vec::len), Some(3), "{what}");
    assert_eq!(o.task_exit, Some(0), "{what}: task selftest: {}", o.task);
    assert!(
        proxmox_errors(o).is_empty(),
        "{what}: report errors {:?}",
        o.report_errors()
    );
    assert!(o.report["host"].is_object(), "{what}: host is null");
    assert_eq!(o.report["guests"].as_array().map(Vec::len), Some(6));
    assert_eq!(o.report["storage"].as_array().map(Vec::len), Some(3));
    assert!(
        o.converged && o.engine_errors.is_empty(),
        "{what}: reconcile did not converge: {}",
        o.engine_errors
    );
}

#[test]
fn the_documented_grant_is_enough_and_backups_need_the_optional_one() {
    let rt = rt();
    let grant = readme_grant("pve1");
    eprintln!("README grant: {grant:?}");
    std::thread::scope(|s| {
        let required = s.spawn(|| rt.block_on(run_with(&grant, &grant.required)));
        let full =
            s.spawn(|| rt.block_on(run_with(&grant, &union(&grant.required, &grant.optional))));
        let required = required.join().unwrap();
        assert_all_good(&required, "required grant");
        assert_eq!(
            required.report["backups"].as_array().map(Vec::len),
            Some(0),
            "backups are visible without the optional grant: the README is wrong"
        );
        let full = full.join().unwrap();
        assert_all_good(&full, "required + optional grant");
        let backups = full.report["backups"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            backups.len() >= 3,
            "the optional grant should show the seeded backups: {backups:?}"
        );
    });
}

/// What removing one privilege must do.
fn check_removed(privilege: &str, o: &Outcome) {
    let named = |text: &str| text.contains(privilege);
    match privilege {
        "Sys.Audit" => {
            assert_eq!(o.selftest_exit, Some(2), "{}", o.selftest);
            assert!(
                named(&o.selftest),
                "selftest does not name it: {}",
                o.selftest
            );
            assert!(
                o.report_errors()
                    .iter()
                    .any(|e| e["message"].as_str().is_some_and(named)),
                "the report's errors do not name it: {:?}",
                o.report_errors()
            );
        }
        "VM.Audit" => {
            // PVE filters the guest list instead of refusing: the guests vanish.
            assert_eq!(o.selftest_exit, Some(0), "{}", o.selftest);
            assert_eq!(
                o.selftest_json()["guests"].as_array().map(Vec::len),
                Some(0)
            );
            assert_eq!(o.report["guests"].as_array().map(Vec::len), Some(0));
            assert!(!o.converged);
            assert!(
                o.engine_errors.contains("desired guests not visible"),
                "{}",
                o.engine_errors
            );
        }
        "Datastore.Audit" => {
            // Filtered as well: the storages vanish.
            assert_eq!(
                o.selftest_json()["storages"].as_array().map(Vec::len),
                Some(0),
                "{}",
                o.selftest
            );
            assert_eq!(o.report["storage"].as_array().map(Vec::len), Some(0));
        }
        "VM.Snapshot" => {
            assert_eq!(o.task_exit, Some(2), "{}", o.task);
            assert!(named(&o.task), "task selftest does not name it: {}", o.task);
        }
        "VM.PowerMgmt" | "VM.Config.Memory" | "VM.Config.CPU" | "VM.Config.Options"
        | "VM.Config.Network" | "VM.Allocate" => {
            assert!(!o.converged, "converged without {privilege}");
            assert!(
                named(&o.engine_errors),
                "reconcile errors do not name {privilege}: {}",
                o.engine_errors
            );
        }
        "VM.Backup" | "Datastore.AllocateSpace" => {
            assert_eq!(
                o.report["backups"].as_array().map(Vec::len),
                Some(0),
                "backups visible without {privilege}"
            );
        }
        other => panic!(
            "README grants {other}, but no use of it is known: remove it from the README or add what it is for here"
        ),
    }
}

fn removal_runs(grant: &Grant, base: &Acl, privileges: &[String]) {
    let rt = rt();
    std::thread::scope(|s| {
        let runs: Vec<_> = privileges
            .iter()
            .map(|p| {
                let acl = without(base, p);
                let rt = &rt;
                (p, s.spawn(move || rt.block_on(run_with(grant, &acl))))
            })
            .collect();
        for (p, h) in runs {
            let o = h.join().unwrap();
            eprintln!(
                "without {p}: selftest exit {:?}, task exit {:?}, engine: {}",
                o.selftest_exit,
                o.task_exit,
                o.engine_errors.lines().next().unwrap_or("-")
            );
            check_removed(p, &o);
        }
    });
}

fn all_privileges(acl: &Acl) -> Vec<String> {
    let set: BTreeSet<String> = acl.values().flatten().cloned().collect();
    set.into_iter().collect()
}

#[test]
fn each_required_privilege_removed_fails_naming_it_or_hides_what_it_guards() {
    let grant = readme_grant("pve1");
    let privileges = all_privileges(&grant.required);
    assert!(privileges.len() >= 8, "{privileges:?}");
    // In two halves, so no more than six simulators and agents run at once.
    let (a, b) = privileges.split_at(privileges.len() / 2);
    removal_runs(&grant, &grant.required, a);
    removal_runs(&grant, &grant.required, b);
}

#[test]
fn each_optional_privilege_removed_hides_the_backups() {
    let grant = readme_grant("pve1");
    let full = union(&grant.required, &grant.optional);
    let optional = all_privileges(&grant.optional);
    assert!(
        !optional.is_empty(),
        "README: no optional grant for backups"
    );
    removal_runs(&grant, &full, &optional);
}

#[test]
fn the_readme_parser_reads_quotes_and_pipelines() {
    assert_eq!(
        words(r#"pveum acl modify /vms --tokens 'a@pve!b' --roles R"#),
        [
            "pveum", "acl", "modify", "/vms", "--tokens", "a@pve!b", "--roles", "R"
        ]
    );
    assert_eq!(
        words(r#"pveum role add X --privs "A B" | perl -e 'x' > f"#),
        ["pveum", "role", "add", "X", "--privs", "A B"]
    );
}
