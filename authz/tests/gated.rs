//! The gated kinds of issue 13 (`set_config`, `rollback`, `restore`, `delete_snapshot`,
//! `destroy`, `undo`, `release_undo`): every accepted shape parses to its typed params,
//! every refused one gets its exact reason, and the grant is checked against the class
//! the params make (a `set_config` that clears `protection` is irreversible).

mod common;

use common::*;
use felhom_authz::{
    Action, BackupFormat, ConfigKey, ConfigValue, Grant, GuestOp, GuestType, Kind, OpPayload,
    Reason, Trust, verify_op,
};
use serde_json::{Value, json};

const OTHER_OP: &str = "ffeeddccbbaa99887766554433221100";

/// A payload of `op` on lxc 101 with `params`, granted `grant`.
fn op(kind: &str, params: Value, grant: &str) -> Value {
    let mut p = stop_payload();
    p["op"] = json!(kind);
    p["params"] = params;
    p["grant"] = json!(grant);
    p
}

fn on_qemu(mut p: Value) -> Value {
    p["target"]["type"] = json!("qemu");
    p
}

fn one(p: &Value) -> Vec<u8> {
    op_env(p, &[("alice", &key(1))])
}

fn two(p: &Value) -> Vec<u8> {
    op_env(p, &[("alice", &key(1)), ("bob", &key(2))])
}

/// Reversible threshold 1, irreversible 2.
fn t12() -> Trust {
    trust(1, 2)
}

fn accepted(env: &[u8]) -> OpPayload {
    verify_op(env, &t12(), &ctx()).unwrap_or_else(|r| panic!("refused: {r}"))
}

fn guest_op(op: &OpPayload) -> &GuestOp {
    match &op.action {
        Action::Guest { op, .. } => op,
        other => panic!("{other:?}"),
    }
}

fn refused(env: &[u8]) -> felhom_authz::Refusal {
    match verify_op(env, &t12(), &ctx()) {
        Ok(op) => panic!("accepted: {op:?}"),
        Err(r) => r,
    }
}

#[test]
fn set_config_parses_typed_values_and_its_class_follows_protection() {
    let o = accepted(&one(&op(
        "set_config",
        json!({"config": {"memory": 2048, "cores": 2, "onboot": true, "nesting": 1,
                          "description": null, "tags": "web;prod", "protection": 1}}),
        "reversible",
    )));
    assert_eq!(o.kind, Kind::SetConfig);
    let GuestOp::SetConfig(p) = guest_op(&o) else {
        panic!()
    };
    assert_eq!(p.config().len(), 7);
    assert_eq!(p.config()[&ConfigKey::Memory], Some(ConfigValue::Int(2048)));
    assert_eq!(
        p.config()[&ConfigKey::Nesting],
        Some(ConfigValue::Bool(true))
    );
    assert_eq!(p.config()[&ConfigKey::Description], None);
    assert!(!p.clears_protection());
    assert_eq!(o.action.required_grant(), Grant::Reversible);

    // A VM takes the keys it has.
    let o = accepted(&one(&on_qemu(op(
        "set_config",
        json!({"config": {"memory": 4096, "cpulimit": 2.5}}),
        "reversible",
    ))));
    assert_eq!(guest_op(&o).class(), Grant::Reversible);

    // Clearing protection (false, 0 or null) needs the irreversible grant and its
    // threshold; with both it is accepted.
    for v in [json!(false), json!(0), Value::Null] {
        let p = op(
            "set_config",
            json!({"config": {"protection": v, "memory": 1024}}),
            "irreversible",
        );
        let o = accepted(&two(&p));
        assert_eq!(o.grant, Grant::Irreversible);
        assert_eq!(guest_op(&o).class(), Grant::Irreversible);
        assert_eq!(o.action.required_grant(), Grant::Irreversible);
        assert_eq!(refused(&one(&p)).reason, Reason::BelowThreshold, "{v}");
        // Granted reversible it is refused however many keys signed.
        let r = refused(&two(&op(
            "set_config",
            json!({"config": {"protection": v}}),
            "reversible",
        )));
        assert_eq!(r.reason, Reason::GrantMismatch, "{v}");
        assert!(r.message.contains("clears protection"), "{}", r.message);
    }
}

#[test]
fn set_config_refusals() {
    let cases: Vec<(&str, Value)> = vec![
        (
            "no keys",
            op("set_config", json!({"config": {}}), "reversible"),
        ),
        ("no config", op("set_config", json!({}), "reversible")),
        (
            "an unknown params field",
            op(
                "set_config",
                json!({"config": {"memory": 512}, "digest": "x"}),
                "reversible",
            ),
        ),
        (
            "an unmanaged key",
            op(
                "set_config",
                json!({"config": {"rootfs": "local-lvm:8"}}),
                "reversible",
            ),
        ),
        (
            "net0 is not a key",
            op(
                "set_config",
                json!({"config": {"net0": "name=eth0"}}),
                "reversible",
            ),
        ),
        (
            "memory below 16",
            op("set_config", json!({"config": {"memory": 8}}), "reversible"),
        ),
        (
            "memory as a string",
            op(
                "set_config",
                json!({"config": {"memory": "512"}}),
                "reversible",
            ),
        ),
        (
            "cores 0",
            op("set_config", json!({"config": {"cores": 0}}), "reversible"),
        ),
        (
            "onboot 2",
            op("set_config", json!({"config": {"onboot": 2}}), "reversible"),
        ),
        (
            "a bad hostname",
            op(
                "set_config",
                json!({"config": {"hostname": "web_1"}}),
                "reversible",
            ),
        ),
        (
            "a description over 8 KiB",
            op(
                "set_config",
                json!({"config": {"description": "x".repeat(8193)}}),
                "reversible",
            ),
        ),
        (
            "swap on a VM",
            on_qemu(op(
                "set_config",
                json!({"config": {"swap": 512}}),
                "reversible",
            )),
        ),
        (
            "hostname on a VM",
            on_qemu(op(
                "set_config",
                json!({"config": {"hostname": "vm1"}}),
                "reversible",
            )),
        ),
        (
            "nesting on a VM",
            on_qemu(op(
                "set_config",
                json!({"config": {"nesting": true}}),
                "reversible",
            )),
        ),
        (
            "cpulimit 200 on a VM",
            on_qemu(op(
                "set_config",
                json!({"config": {"cpulimit": 200}}),
                "reversible",
            )),
        ),
        // Params are checked before the class they make: a bad key beside a cleared
        // protection is invalid_params, not grant_mismatch.
        (
            "a bad key beside a cleared protection",
            op(
                "set_config",
                json!({"config": {"protection": 0, "memory": 1}}),
                "reversible",
            ),
        ),
    ];
    for (name, p) in &cases {
        let r = refused(&one(p));
        assert_eq!(r.reason, Reason::InvalidParams, "{name}: {r}");
    }
    // All ten keys at once is the most one set_config may name (an eleventh would be
    // unknown or a duplicate, both refused).
    let ten: serde_json::Map<String, Value> = [
        ("memory", json!(512)),
        ("swap", json!(0)),
        ("cores", json!(1)),
        ("cpulimit", json!(0)),
        ("onboot", json!(0)),
        ("description", json!("d")),
        ("tags", json!("t")),
        ("hostname", json!("h")),
        ("nesting", json!(0)),
        ("protection", json!(1)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    accepted(&one(&op(
        "set_config",
        json!({"config": ten}),
        "reversible",
    )));
    // A key given twice: the signed bytes hold both values, so neither is picked.
    let body = op(
        "set_config",
        json!({"config": {"protection": 1, "memory": 512}}),
        "reversible",
    )
    .to_string()
    .replace("\"memory\":512", "\"memory\":512,\"protection\":0");
    assert!(body.contains("\"protection\":0"), "{body}");
    let r = verify_op(
        &envelope_bytes(OP, body.as_bytes(), &[("alice", &key(1))]),
        &t12(),
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(r.reason, Reason::InvalidParams, "{r}");
    assert!(r.message.contains("given twice"), "{r}");
}

#[test]
fn rollback_restore_and_the_archive_type() {
    let o = accepted(&one(&op(
        "rollback",
        json!({"snapshot": "pre-upgrade"}),
        "reversible",
    )));
    assert_eq!(o.kind, Kind::Rollback);
    match guest_op(&o) {
        GuestOp::Rollback { snapshot, start } => {
            assert_eq!((snapshot.as_str(), *start), ("pre-upgrade", false));
        }
        other => panic!("{other:?}"),
    }
    let o = accepted(&one(&op(
        "rollback",
        json!({"snapshot": "daily", "start": true}),
        "reversible",
    )));
    assert!(matches!(
        guest_op(&o),
        GuestOp::Rollback { start: true, .. }
    ));

    let vz = "nas:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst";
    let o = accepted(&one(&op(
        "restore",
        json!({"archive": vz, "storage": "local-lvm"}),
        "reversible",
    )));
    match guest_op(&o) {
        GuestOp::Restore {
            archive,
            storage,
            force,
            start,
        } => {
            assert_eq!(archive.as_str(), vz);
            assert_eq!(archive.guest_type(), GuestType::Lxc);
            assert_eq!(archive.format(), BackupFormat::Vzdump);
            assert_eq!(storage.as_str(), "local-lvm");
            assert_eq!((*force, *start), (false, false));
        }
        other => panic!("{other:?}"),
    }
    // A PBS backup of another VM restored over this VM (the source vmid may differ).
    let pbs = "pbs:backup/vm/202/2025-01-31T02:00:05Z";
    let o = accepted(&one(&on_qemu(op(
        "restore",
        json!({"archive": pbs, "storage": "local-zfs", "force": true, "start": true}),
        "reversible",
    ))));
    match guest_op(&o) {
        GuestOp::Restore {
            archive,
            force: true,
            start: true,
            ..
        } => assert_eq!(
            (archive.vmid().get(), archive.format()),
            (202, BackupFormat::Pbs)
        ),
        other => panic!("{other:?}"),
    }

    let cases: Vec<(&str, Value)> = vec![
        (
            "rollback to current",
            op("rollback", json!({"snapshot": "current"}), "reversible"),
        ),
        (
            "rollback without a snapshot",
            op("rollback", json!({"start": true}), "reversible"),
        ),
        (
            "rollback start as a string",
            op(
                "rollback",
                json!({"snapshot": "a1", "start": "yes"}),
                "reversible",
            ),
        ),
        (
            "rollback with an unknown field",
            op(
                "rollback",
                json!({"snapshot": "a1", "force": true}),
                "reversible",
            ),
        ),
        (
            "a qemu archive onto an lxc target",
            op(
                "restore",
                json!({"archive": "nas:backup/vzdump-qemu-101-2025_01_31-02_00_05.vma.zst", "storage": "local-lvm"}),
                "reversible",
            ),
        ),
        (
            "an lxc PBS backup onto a qemu target",
            on_qemu(op(
                "restore",
                json!({"archive": "pbs:backup/ct/101/2025-01-31T02:00:05Z", "storage": "local-lvm"}),
                "reversible",
            )),
        ),
        (
            "an archive that is a template",
            op(
                "restore",
                json!({"archive": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "storage": "local-lvm"}),
                "reversible",
            ),
        ),
        (
            "an archive with a bad extension",
            op(
                "restore",
                json!({"archive": "nas:backup/vzdump-lxc-101-2025_01_31-02_00_05.zip", "storage": "local-lvm"}),
                "reversible",
            ),
        ),
        (
            "restore without storage",
            op("restore", json!({"archive": vz}), "reversible"),
        ),
        (
            "restore onto a storage with a slash",
            op(
                "restore",
                json!({"archive": vz, "storage": "../x"}),
                "reversible",
            ),
        ),
        (
            "restore with force as 1",
            op(
                "restore",
                json!({"archive": vz, "storage": "local", "force": 1}),
                "reversible",
            ),
        ),
        (
            "restore with an unknown field",
            op(
                "restore",
                json!({"archive": vz, "storage": "local", "unique": true}),
                "reversible",
            ),
        ),
        ("restore onto a scratch vmid", {
            let mut p = op(
                "restore",
                json!({"archive": vz, "storage": "local"}),
                "reversible",
            );
            p["target"]["vmid"] = json!(900_000_005);
            p
        }),
        ("restore without a target", {
            let mut p = op(
                "restore",
                json!({"archive": vz, "storage": "local"}),
                "reversible",
            );
            p["target"] = Value::Null;
            p
        }),
    ];
    for (name, p) in &cases {
        let r = refused(&one(p));
        assert_eq!(r.reason, Reason::InvalidParams, "{name}: {r}");
    }
    let r = refused(&one(&cases[4].1));
    assert!(
        r.message.contains("is a qemu backup, the target is lxc"),
        "{r}"
    );
}

#[test]
fn irreversible_kinds_need_the_grant_and_its_threshold() {
    let irreversible: [(&str, Value); 3] = [
        ("delete_snapshot", json!({"name": "old-1"})),
        ("destroy", json!({"purge": true})),
        ("release_undo", json!({"op_id": OTHER_OP})),
    ];
    for (kind, params) in &irreversible {
        // granted irreversible, two distinct keys: accepted
        let o = accepted(&two(&op(kind, params.clone(), "irreversible")));
        assert_eq!(o.kind.as_str(), *kind);
        assert_eq!(o.kind.class(), Grant::Irreversible);
        assert_eq!(o.signers, ["alice", "bob"]);
        // one key for the irreversible threshold of 2
        let r = refused(&one(&op(kind, params.clone(), "irreversible")));
        assert_eq!(r.reason, Reason::BelowThreshold, "{kind}: {r}");
        // granted reversible: grant_mismatch, with one key or two
        for env in [
            one(&op(kind, params.clone(), "reversible")),
            two(&op(kind, params.clone(), "reversible")),
        ] {
            let r = refused(&env);
            assert_eq!(r.reason, Reason::GrantMismatch, "{kind}: {r}");
            assert!(r.message.contains("irreversible"), "{r}");
        }
        // the grant is checked before the params: bad params granted reversible are
        // grant_mismatch, granted irreversible with the threshold invalid_params
        let bad = json!({"nope": 1});
        assert_eq!(
            refused(&one(&op(kind, bad.clone(), "reversible"))).reason,
            Reason::GrantMismatch
        );
        assert_eq!(
            refused(&two(&op(kind, bad, "irreversible"))).reason,
            Reason::InvalidParams
        );
    }
    let o = accepted(&two(&op("destroy", json!({}), "irreversible")));
    assert!(matches!(guest_op(&o), GuestOp::Destroy { purge: false }));
    let o = accepted(&two(&op(
        "delete_snapshot",
        json!({"name": "old-1"}),
        "irreversible",
    )));
    assert!(matches!(guest_op(&o), GuestOp::DeleteSnapshot { name } if name.as_str() == "old-1"));
    let o = accepted(&two(&op(
        "release_undo",
        json!({"op_id": OTHER_OP}),
        "irreversible",
    )));
    assert!(matches!(guest_op(&o), GuestOp::ReleaseUndo { op_id } if op_id.as_str() == OTHER_OP));

    for (name, p) in [
        (
            "delete_snapshot of current",
            op(
                "delete_snapshot",
                json!({"name": "current"}),
                "irreversible",
            ),
        ),
        (
            "delete_snapshot without a name",
            op("delete_snapshot", json!({}), "irreversible"),
        ),
        (
            "destroy with purge as 1",
            op("destroy", json!({"purge": 1}), "irreversible"),
        ),
        (
            "destroy with force",
            op(
                "destroy",
                json!({"purge": true, "force": true}),
                "irreversible",
            ),
        ),
        (
            "release_undo of an upper-case op_id",
            op(
                "release_undo",
                json!({"op_id": OTHER_OP.to_uppercase()}),
                "irreversible",
            ),
        ),
        (
            "release_undo without an op_id",
            op("release_undo", json!({}), "irreversible"),
        ),
        ("destroy of a host", {
            let mut p = op("destroy", json!({}), "irreversible");
            p["target"] = Value::Null;
            p
        }),
    ] {
        let r = refused(&two(&p));
        assert_eq!(r.reason, Reason::InvalidParams, "{name}: {r}");
    }
}

#[test]
fn undo_is_reversible_and_names_an_op_id() {
    let o = accepted(&one(&op("undo", json!({"op_id": OTHER_OP}), "reversible")));
    assert_eq!((o.kind, o.kind.class()), (Kind::Undo, Grant::Reversible));
    assert!(matches!(guest_op(&o), GuestOp::Undo { op_id } if op_id.as_str() == OTHER_OP));
    // A stronger grant is fine with its threshold.
    accepted(&two(&op(
        "undo",
        json!({"op_id": OTHER_OP}),
        "irreversible",
    )));
    for (name, params) in [
        ("no op_id", json!({})),
        ("a short op_id", json!({"op_id": "0011"})),
        ("an op_id as a number", json!({"op_id": 1})),
        (
            "an unknown field",
            json!({"op_id": OTHER_OP, "force": true}),
        ),
    ] {
        let r = refused(&one(&op("undo", params, "reversible")));
        assert_eq!(r.reason, Reason::InvalidParams, "{name}: {r}");
    }
}
