//! docs/restore-tests.md's `pveum` lines are exactly what a restore test needs, checked
//! against `felhom-pvesim`'s privilege checks (which follow PVE's), the way
//! `operator_acl.rs` checks the README's lines: the doc and the code cannot drift apart.
//!
//! The test reads the doc's shell blocks (loops expanded): the first appends to the
//! README's roles, the second is a token restricted to the scratch range, the tested
//! guests and the storages. With each grant, built for exactly that token, the agent's
//! restore test (`felhom_agent::restore`, with the production client and the real
//! reconcile queue) of an LXC (101) and a QEMU guest with the guest agent (103) must pass;
//! with any one documented privilege taken away, one of them must not. The doc's table
//! must name the same privileges as its `pveum` lines.

mod proxmox_client_support;
mod pveum_support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use felhom_agent::config::{ProxmoxConfig, RestoreTestsConfig, Secret, TlsVerify};
use felhom_agent::proxmox::{Client, WaitOptions};
use felhom_agent::reconcile::journal::Journal;
use felhom_agent::reconcile::{Gate, Queue, QueueConfig};
use felhom_agent::restore::{RestoreDeps, RestoreTests};
use felhom_protocol::Vmid;
use proxmox_client_support::Sim;
use pveum_support::{Acl, Block};
use serde_json::{Value, json};

const TOKEN: &str = "felhom@pve!agent";
const SECRET: &str = "5f0c3e6a-rest-test-0000-000000000001";

fn repo_file(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The README's grant (required and optional) with the doc's appends, and the doc's
/// restricted grant.
struct Grants {
    with_readme: Acl,
    /// The privileges the doc appends to the README's roles.
    appended: BTreeSet<String>,
    restricted: Acl,
}

fn grants() -> Grants {
    let readme_blocks = pveum_support::sh_blocks(&repo_file("README.md"), &[("NODE", "pve1")]);
    let mut readme = Block::default();
    for b in &readme_blocks {
        let b = pveum_support::block(b);
        readme.roles.extend(b.roles);
        for (r, p) in b.appended {
            readme.appended.entry(r).or_default().extend(p);
        }
        readme.acls.extend(b.acls);
    }
    let doc = pveum_support::sh_blocks(&repo_file("docs/restore-tests.md"), &[]);
    assert_eq!(
        doc.len(),
        2,
        "docs/restore-tests.md: expected two pveum blocks (the README's roles extended, and a restricted token): {doc:?}"
    );
    let extend = pveum_support::block(&doc[0]);
    let restricted = pveum_support::block(&doc[1]);
    assert!(
        extend.roles.is_empty() && extend.acls.is_empty() && !extend.appended.is_empty(),
        "the first block only appends to the README's roles: {extend:?}"
    );
    // The README's roles with everything appended (the README's optional grant and the
    // doc's), on the README's paths.
    let mut roles = readme.roles.clone();
    for (r, p) in readme.appended.iter().chain(extend.appended.iter()) {
        roles
            .get_mut(r)
            .unwrap_or_else(|| panic!("role modify {r}: the README adds no such role"))
            .extend(p.iter().cloned());
    }
    let with_readme = readme.acl(TOKEN, &roles);
    let appended = extend.appended.values().flatten().cloned().collect();
    assert!(!restricted.roles.is_empty(), "{restricted:?}");
    let restricted = restricted.acl(TOKEN, &restricted.roles);
    Grants {
        with_readme,
        appended,
        restricted,
    }
}

/// A restore test of 101 (LXC) and 103 (QEMU, guest agent on) with exactly `acl`:
/// `(vmid, "passed")` or what it was instead.
async fn run_with(acl: &Acl) -> Vec<(u32, String)> {
    let dir = tempfile::tempdir().unwrap();
    let acl_file = dir.path().join("acl.json");
    let entries: Vec<Value> = acl
        .iter()
        .map(|(path, p)| json!({"path": path, "privs": p, "propagate": true}))
        .collect();
    std::fs::write(
        &acl_file,
        json!({"tokens": [{"token_id": TOKEN, "secret": SECRET, "privsep": true, "acl": entries}]})
            .to_string(),
    )
    .unwrap();
    let sim = Sim::start(&[
        "--guests",
        "6",
        "--task-seconds",
        "0.05",
        "--acl",
        acl_file.to_str().unwrap(),
    ]);
    let proxmox = ProxmoxConfig {
        url: sim.url().to_string(),
        token_id: TOKEN.to_string(),
        token_secret: Secret::new(SECRET.to_string()),
        tls: TlsVerify::PinSha256(sim.pin()),
    };
    let journal = Arc::new(Journal::open(dir.path()).unwrap());
    let (_gate, gate_rx) = tokio::sync::watch::channel(Gate::Open);
    let tests = RestoreTests::new(RestoreDeps {
        client: Client::new(&proxmox, sim.node()).unwrap(),
        queue: Queue::start(QueueConfig::default()),
        journal,
        gate: gate_rx,
        // The doc's range.
        scratch: 9900..=9909,
        settings: RestoreTestsConfig {
            storage: Some("local-lvm".into()),
            stable_seconds: 0,
            boot_check_seconds: 30,
            ..Default::default()
        },
        task_wait: WaitOptions {
            timeout: Duration::from_secs(60),
            initial_interval: Duration::from_millis(20),
            max_interval: Duration::from_millis(200),
        },
        poll: Duration::from_millis(100),
    })
    .unwrap();
    let mut out = Vec::new();
    for v in [101u32, 103] {
        let what = match tests.run(Some(Vmid::new(u64::from(v)).unwrap())).await {
            Ok(r) => match r.result.as_deref() {
                Some("passed") => "passed".to_string(),
                other => format!("{other:?}: {}", r.reason.unwrap_or_default()),
            },
            Err(e) => format!("error: {e}"),
        };
        out.push((v, what));
    }
    out
}

fn all_passed(r: &[(u32, String)]) -> bool {
    r.iter().all(|(_, w)| w == "passed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_privileges_are_enough_for_a_restore_test() {
    let g = grants();
    eprintln!(
        "with the README: {:?}\nrestricted: {:?}",
        g.with_readme, g.restricted
    );
    let a = run_with(&g.with_readme).await;
    assert!(all_passed(&a), "README + docs/restore-tests.md: {a:?}");
    let b = run_with(&g.restricted).await;
    assert!(
        all_passed(&b),
        "the restricted token of docs/restore-tests.md: {b:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_documented_privilege_is_needed() {
    let g = grants();
    let mut cases: Vec<(String, Acl)> = g
        .appended
        .iter()
        .map(|p| {
            (
                format!("README + doc without {p}"),
                pveum_support::without(&g.with_readme, p),
            )
        })
        .collect();
    for p in pveum_support::all_privileges(&g.restricted) {
        cases.push((
            format!("restricted without {p}"),
            pveum_support::without(&g.restricted, &p),
        ));
    }
    assert!(cases.len() >= 8, "{cases:?}");
    for chunk in cases.chunks(4) {
        let runs: Vec<_> = chunk
            .iter()
            .map(|(what, acl)| {
                let acl = acl.clone();
                (
                    what.clone(),
                    tokio::spawn(async move { run_with(&acl).await }),
                )
            })
            .collect();
        for (what, h) in runs {
            let r = h.await.unwrap();
            eprintln!("{what}: {r:?}");
            assert!(
                !all_passed(&r),
                "{what}: both restore tests still pass: the doc grants a privilege the agent does not need"
            );
            // A missing privilege says nothing about the backup: never `failed`.
            assert!(
                r.iter().all(|(_, w)| !w.starts_with("Some(\"failed\")")),
                "{what}: a missing privilege was taken for a verdict on the backup: {r:?}"
            );
        }
    }
}

#[test]
fn the_table_names_the_privileges_of_the_pveum_lines() {
    let doc = repo_file("docs/restore-tests.md");
    let table: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    let g = grants();
    let restricted: BTreeSet<String> = pveum_support::all_privileges(&g.restricted)
        .into_iter()
        .collect();
    assert_eq!(
        table, restricted,
        "the table and the restricted token's roles"
    );
    assert!(
        g.appended.is_subset(&table),
        "{:?} not in the table",
        g.appended
    );
}

#[test]
fn loops_and_comments_are_read() {
    let text = "```sh\nfor id in $(seq 9900 9902); do\n  pveum acl modify /vms/$id --roles R\ndone\nfor s in a b; do   # two\n  pveum acl modify /storage/$s --roles S\ndone\n```\n";
    let b = pveum_support::sh_blocks(text, &[]);
    let paths: Vec<&str> = b[0].iter().map(|w| w[3].as_str()).collect();
    assert_eq!(
        paths,
        [
            "/vms/9900",
            "/vms/9901",
            "/vms/9902",
            "/storage/a",
            "/storage/b"
        ]
    );
}
