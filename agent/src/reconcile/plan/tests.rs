use std::collections::BTreeSet;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::reconcile::desired::DesiredGuest;
use crate::reconcile::testmodel::pve_write;

fn vmid(n: u32) -> Vmid {
    Vmid::new(u64::from(n)).unwrap()
}

/// Applies a plan the way PVE would (config writes through the round-trip model).
fn apply(actual: &mut [ActualGuest], plan: &Plan) {
    for a in &plan.actions {
        let g = actual.iter_mut().find(|g| g.vmid == a.vmid).unwrap();
        match &a.op {
            Op::Start => g.status = "running".into(),
            Op::Stop => g.status = "stopped".into(),
            Op::SetConfig { params, .. } => pve_write(g.kind, &mut g.config, params),
        }
    }
}

fn arb_field_value(kind: GuestKind) -> impl Strategy<Value = (Field, Value)> {
    let fields: Vec<Field> = Field::ALL
        .into_iter()
        .filter(|f| f.applies_to(kind))
        .collect();
    prop::sample::select(fields).prop_flat_map(|f| {
        let v: BoxedStrategy<Value> = match f {
            Field::Memory | Field::Swap | Field::Cores => prop_oneof![
                (1u64..5).prop_map(|n| json!(n * 512)),
                (1u64..5).prop_map(|n| json!((n * 512).to_string())),
            ]
            .boxed(),
            Field::Cpulimit => prop_oneof![
                (0u32..8).prop_map(|n| json!(f64::from(n) / 2.0)),
                (0u32..8).prop_map(|n| json!(format!("{}", f64::from(n) / 2.0))),
            ]
            .boxed(),
            Field::Onboot | Field::Nesting => prop_oneof![
                any::<bool>().prop_map(|b| json!(b)),
                (0u8..2).prop_map(|n| json!(n))
            ]
            .boxed(),
            Field::Description => {
                prop::sample::select(vec!["", "web", "web\n", "a\nb", "a\r\nb\n"])
                    .prop_map(|s| json!(s))
                    .boxed()
            }
            Field::Tags => prop::sample::select(vec!["", "prod", "prod;web", "Web,prod", "b a a"])
                .prop_map(|s| json!(s))
                .boxed(),
            Field::Hostname => prop::sample::select(vec!["web01", "db", "x.example"])
                .prop_map(|s| json!(s))
                .boxed(),
        };
        v.prop_map(move |v| (f, v))
    })
}

/// A raw config the way PVE may show it (absent keys, strings for numbers, features with
/// other flags).
fn arb_actual_config(kind: GuestKind) -> impl Strategy<Value = Map<String, Value>> {
    (
        proptest::collection::vec(arb_field_value(kind), 0..6),
        prop::sample::select(vec!["", "keyctl=1", "fuse=1,mknod=1", "keyctl=1,nesting=1"]),
    )
        .prop_map(move |(fields, features)| {
            let mut m = Map::new();
            m.insert("digest".into(), json!("1"));
            if kind == GuestKind::Lxc && !features.is_empty() {
                m.insert("features".into(), json!(features));
            }
            for (f, v) in fields {
                let n = f.desired(&v).unwrap();
                if let Some(p) = write_param(f, &n, &m) {
                    pve_write(kind, &mut m, &[p]);
                }
            }
            m
        })
}

#[derive(Debug, Clone)]
struct Case {
    desired: DesiredState,
    actual: Vec<ActualGuest>,
}

fn arb_case() -> impl Strategy<Value = Case> {
    proptest::collection::vec(
        (
            any::<bool>(), // qemu
            prop::sample::select(vec!["running", "stopped", "running", "stopped", "paused"]),
            prop::sample::select(vec![0u8, 0, 0, 0, 1, 2, 3]), // 1 ha, 2 template, 3 locked
            0u8..4, // 0 both sides, 1 desired only, 2 actual only
            prop::option::of(prop::sample::select(vec![Power::Running, Power::Stopped])),
            any::<bool>(), // wrong-kind field (problem) on qemu
        ),
        0..12,
    )
    .prop_flat_map(|specs| {
        let per_guest: Vec<_> = specs
            .into_iter()
            .enumerate()
            .map(|(i, (qemu, status, flag, sides, power, wrong))| {
                let kind = if qemu {
                    GuestKind::Qemu
                } else {
                    GuestKind::Lxc
                };
                (
                    Just((i, kind, status, flag, sides, power, wrong)),
                    arb_actual_config(kind),
                    proptest::collection::vec(arb_field_value(kind), 0..6),
                )
            })
            .collect();
        per_guest
    })
    .prop_map(|guests| {
        let mut desired = DesiredState {
            generation: 1,
            guests: Vec::new(),
        };
        let mut actual = Vec::new();
        for ((i, kind, status, flag, sides, power, wrong), config, want) in guests {
            let v = vmid(100 + i as u32);
            if sides != 2 {
                let mut cfg: BTreeMap<Field, Norm> = want
                    .into_iter()
                    .map(|(f, val)| (f, f.desired(&val).unwrap()))
                    .collect();
                if wrong && kind == GuestKind::Qemu {
                    cfg.insert(Field::Hostname, Norm::Text("h".into()));
                }
                desired.guests.push(DesiredGuest {
                    vmid: v,
                    power,
                    config: cfg,
                });
            }
            if sides != 1 {
                actual.push(ActualGuest {
                    vmid: v,
                    kind,
                    status: status.to_string(),
                    template: flag == 2,
                    lock: (flag == 3).then(|| "backup".to_string()),
                    ha_managed: flag == 1,
                    config,
                });
            }
        }
        Case { desired, actual }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Applying the plan and planning again yields nothing.
    #[test]
    fn apply_then_plan_is_empty(case in arb_case()) {
        let mut actual = case.actual.clone();
        let first = plan(&case.desired, &actual);
        apply(&mut actual, &first);
        let second = plan(&case.desired, &actual);
        prop_assert!(second.actions.is_empty(), "second plan: {:?}", second.actions);
        prop_assert_eq!(&second.skipped, &first.skipped);
        prop_assert_eq!(&second.only_actual, &first.only_actual);
        prop_assert_eq!(&second.only_desired, &first.only_desired);
    }

    /// A converged state (the desired values in PVE's spelling) plans to nothing.
    #[test]
    fn converged_state_plans_nothing(case in arb_case()) {
        let mut actual = case.actual.clone();
        apply(&mut actual, &plan(&case.desired, &case.actual));
        let again = plan(&case.desired, &actual);
        prop_assert!(again.is_converged());
        let third = plan(&case.desired, &actual);
        prop_assert_eq!(again, third);
    }

    /// SetConfig carries exactly the fields that differ after normalization, and no
    /// action touches a guest that is skipped or on one side only.
    #[test]
    fn set_config_only_carries_changed_fields(case in arb_case()) {
        let p = plan(&case.desired, &case.actual);
        let skipped: BTreeSet<Vmid> = p.skipped.iter().map(|s| s.vmid).collect();
        for a in &p.actions {
            prop_assert!(!skipped.contains(&a.vmid));
            prop_assert!(!p.only_actual.contains(&a.vmid));
            prop_assert!(!p.only_desired.contains(&a.vmid));
            let have = case.actual.iter().find(|g| g.vmid == a.vmid).unwrap();
            let want = case.desired.guests.iter().find(|g| g.vmid == a.vmid).unwrap();
            match &a.op {
                Op::SetConfig { fields, params } => {
                    prop_assert!(!fields.is_empty());
                    prop_assert_eq!(fields.len(), params.len());
                    for f in fields {
                        prop_assert_ne!(&f.actual(have.kind, &have.config).unwrap(), &want.config[f]);
                    }
                    for (f, n) in &want.config {
                        if !fields.contains(f) {
                            prop_assert_eq!(&f.actual(have.kind, &have.config).unwrap(), n);
                        }
                    }
                    // Never a features flag other than nesting.
                    for param in params {
                        if let Param::Set(k, v) = param && k == "features" {
                            let others = |s: &str| -> BTreeSet<String> {
                                s.split(',').filter(|x| !x.is_empty() && !x.starts_with("nesting=")).map(str::to_string).collect()
                            };
                            let old = have.config.get("features").and_then(Value::as_str).unwrap_or("");
                            prop_assert_eq!(others(old), others(v));
                        }
                    }
                }
                Op::Start => prop_assert_ne!(&have.status, "running"),
                Op::Stop => prop_assert_eq!(&have.status, "running"),
            }
            prop_assert_eq!(&a.basis, &have.basis());
        }
    }
}

fn lxc(v: u32, status: &str, config: Value) -> ActualGuest {
    let Value::Object(config) = config else {
        panic!("config must be an object")
    };
    ActualGuest {
        vmid: vmid(v),
        kind: GuestKind::Lxc,
        status: status.into(),
        template: false,
        lock: None,
        ha_managed: false,
        config,
    }
}

#[test]
fn order_per_guest_config_before_start_stop_before_config() {
    let desired = DesiredState::from_json(
        br#"{"generation": 7, "guests": [
            {"vmid": 101, "power": "running", "config": {"memory": 1024}},
            {"vmid": 102, "power": "stopped", "config": {"memory": 1024}}
        ]}"#,
    )
    .unwrap();
    let actual = vec![
        lxc(101, "stopped", json!({"memory": 512, "digest": "a"})),
        lxc(102, "running", json!({"memory": 512, "digest": "b"})),
        lxc(103, "running", json!({})),
    ];
    let p = plan(&desired, &actual);
    let ops: Vec<(u32, &str)> = p
        .actions
        .iter()
        .map(|a| (a.vmid.get(), a.op.name()))
        .collect();
    assert_eq!(
        ops,
        vec![
            (101, "set-config"),
            (101, "start"),
            (102, "stop"),
            (102, "set-config")
        ]
    );
    assert_eq!(p.generation, 7);
    assert_eq!(p.only_actual, vec![vmid(103)]);
    assert_eq!(p.actions[0].to_string(), "set-config lxc 101 (memory)");
}

#[test]
fn ha_template_locked_are_skipped_with_reasons() {
    let desired = DesiredState::from_json(
        br#"{"generation": 1, "guests": [
            {"vmid": 101, "power": "running"}, {"vmid": 102, "power": "running"},
            {"vmid": 103, "power": "running"}, {"vmid": 104, "power": "running"}
        ]}"#,
    )
    .unwrap();
    let mut a = vec![
        lxc(101, "stopped", json!({})),
        lxc(102, "stopped", json!({})),
        lxc(103, "stopped", json!({})),
    ];
    a[0].ha_managed = true;
    a[1].template = true;
    a[2].lock = Some("backup".into());
    let p = plan(&desired, &a);
    assert!(p.actions.is_empty());
    assert_eq!(
        p.skipped,
        vec![
            Skipped {
                vmid: vmid(101),
                reason: SkipReason::HaManaged
            },
            Skipped {
                vmid: vmid(102),
                reason: SkipReason::Template
            },
            Skipped {
                vmid: vmid(103),
                reason: SkipReason::Locked("backup".into())
            },
        ]
    );
    assert_eq!(p.only_desired, vec![vmid(104)]);
}

#[test]
fn wrong_kind_field_is_a_problem_not_a_write() {
    let desired = DesiredState::from_json(
        br#"{"generation": 1, "guests": [{"vmid": 101, "power": "running", "config": {"hostname": "x", "memory": 1024}}]}"#,
    )
    .unwrap();
    let mut g = lxc(101, "stopped", json!({"memory": 512}));
    g.kind = GuestKind::Qemu;
    let p = plan(&desired, &[g]);
    assert_eq!(p.problems.len(), 1);
    assert!(p.problems[0].message.contains("hostname"));
    assert_eq!(p.actions.len(), 1, "power is still managed");
    assert_eq!(p.actions[0].op, Op::Start);
}
