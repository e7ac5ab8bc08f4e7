use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::reconcile::testmodel::pve_write;

fn cfg(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("test config must be an object"),
    }
}

fn fixture_config(name: &str) -> Map<String, Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/pve")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("fixture present");
    let v: Value = serde_json::from_str(&text).expect("fixture is JSON");
    cfg(v["data"].clone())
}

#[test]
fn description_trailing_newline_and_crlf() {
    assert_eq!(description("hello\n"), "hello");
    assert_eq!(description("a\n\nb\n"), "a\n\nb");
    assert_eq!(description("a\r\nb\r\n"), "a\nb");
    assert_eq!(description(""), "");
    assert_eq!(description("\n\n"), "");
    let a = Field::Description
        .actual(GuestKind::Lxc, &cfg(json!({"description": "web\n"})))
        .unwrap();
    let d = Field::Description.desired(&json!("web")).unwrap();
    assert_eq!(a, d);
}

#[test]
fn booleans_in_every_spelling_and_absent_is_default() {
    for v in [json!(1), json!("1"), json!(true), json!("yes"), json!("on")] {
        assert_eq!(Field::Onboot.desired(&v).unwrap(), Norm::Bool(true), "{v}");
    }
    for v in [json!(0), json!("0"), json!(false), json!("off")] {
        assert_eq!(Field::Onboot.desired(&v).unwrap(), Norm::Bool(false), "{v}");
    }
    assert!(Field::Onboot.desired(&json!(2)).is_err());
    assert!(Field::Onboot.desired(&json!("maybe")).is_err());
    assert_eq!(
        Field::Onboot.actual(GuestKind::Lxc, &Map::new()).unwrap(),
        Norm::Bool(false)
    );
}

#[test]
fn tags_split_sorted_lowercased_unique() {
    let a = Field::Tags
        .actual(GuestKind::Lxc, &cfg(json!({"tags": "prod;web"})))
        .unwrap();
    for d in [
        json!("Web,prod"),
        json!("web prod web"),
        json!(["prod", "WEB"]),
    ] {
        assert_eq!(Field::Tags.desired(&d).unwrap(), a, "{d}");
    }
    assert_eq!(
        Field::Tags.actual(GuestKind::Qemu, &Map::new()).unwrap(),
        Norm::Tags(BTreeSet::new())
    );
    assert!(Field::Tags.desired(&json!("-bad")).is_err());
    assert!(Field::Tags.desired(&json!("ok;b@d")).is_err());
}

#[test]
fn numbers_strings_and_units() {
    assert_eq!(
        Field::Memory.desired(&json!("2048")).unwrap(),
        Norm::Int(2048)
    );
    assert_eq!(
        Field::Memory
            .actual(GuestKind::Qemu, &cfg(json!({"memory": "current=2048"})))
            .unwrap(),
        Norm::Int(2048)
    );
    assert_eq!(
        Field::Memory.actual(GuestKind::Lxc, &Map::new()).unwrap(),
        Norm::Int(512)
    );
    assert!(Field::Memory.desired(&json!("2G")).is_err());
    assert!(Field::Memory.desired(&json!(-1)).is_err());
    assert_eq!(
        Field::Cpulimit.desired(&json!(2)).unwrap(),
        Field::Cpulimit
            .actual(GuestKind::Lxc, &cfg(json!({"cpulimit": "2"})))
            .unwrap()
    );
    assert_eq!(
        Field::Cpulimit.desired(&json!("1.50")).unwrap(),
        Norm::Decimal("1.5".into())
    );
    assert_eq!(
        Field::Cpulimit.actual(GuestKind::Lxc, &Map::new()).unwrap(),
        Field::Cpulimit.desired(&json!(0)).unwrap()
    );
    assert!(Field::Cpulimit.desired(&json!("NaN")).is_err());
    assert_eq!(
        Field::Cores.actual(GuestKind::Lxc, &Map::new()).unwrap(),
        Norm::Unset
    );
    assert_eq!(
        Field::Cores.actual(GuestKind::Qemu, &Map::new()).unwrap(),
        Norm::Int(1)
    );
}

#[test]
fn nesting_merges_into_features_and_keeps_other_flags() {
    let c = cfg(json!({"features": "keyctl=1,nesting=1"}));
    assert_eq!(
        Field::Nesting.actual(GuestKind::Lxc, &c).unwrap(),
        Norm::Bool(true)
    );
    assert_eq!(
        write_param(Field::Nesting, &Norm::Bool(false), &c),
        Some(Param::Set("features".into(), "keyctl=1".into()))
    );
    let c = cfg(json!({"features": "fuse=1,keyctl=true,mknod=1"}));
    assert_eq!(
        write_param(Field::Nesting, &Norm::Bool(true), &c),
        Some(Param::Set(
            "features".into(),
            "fuse=1,keyctl=true,mknod=1,nesting=1".into()
        ))
    );
    let c = cfg(json!({"features": "nesting=1"}));
    assert_eq!(
        write_param(Field::Nesting, &Norm::Bool(false), &c),
        Some(Param::Delete("features".into()))
    );
    assert_eq!(
        write_param(Field::Nesting, &Norm::Bool(true), &Map::new()),
        Some(Param::Set("features".into(), "nesting=1".into()))
    );
    // spellings PVE keeps verbatim
    let c = cfg(json!({"features": "nesting=yes,keyctl=1"}));
    assert_eq!(
        Field::Nesting.actual(GuestKind::Lxc, &c).unwrap(),
        Norm::Bool(true)
    );
}

#[test]
fn net0_canonical_order_and_generated_keys() {
    let actual = "name=eth0,bridge=vmbr0,firewall=1,hwaddr=BC:24:11:5A:3C:7E,ip=dhcp,type=veth";
    assert!(net_matches(
        "bridge=vmbr0,name=eth0,ip=dhcp,firewall=true",
        actual
    ));
    assert!(net_matches(
        "name=eth0,bridge=vmbr0,firewall=1,ip=dhcp,hwaddr=bc:24:11:5a:3c:7e",
        actual
    ));
    assert!(!net_matches(
        "name=eth0,bridge=vmbr1,ip=dhcp,firewall=1",
        actual
    ));
    assert!(
        !net_matches("name=eth0,bridge=vmbr0,ip=dhcp", actual),
        "firewall differs"
    );
    assert!(!net_matches(
        "name=eth0,bridge=vmbr0,firewall=1,ip=dhcp,hwaddr=BC:24:11:00:00:01",
        actual
    ));
}

#[test]
fn unknown_fields_and_hostnames_are_rejected_with_the_name() {
    let e = Field::from_key("rootfs").unwrap_err();
    assert!(e.to_string().contains("rootfs"));
    assert!(Field::Hostname.desired(&json!("web01.example")).is_ok());
    assert!(Field::Hostname.desired(&json!("bad host")).is_err());
    assert!(Field::Hostname.desired(&json!("-x")).is_err());
    let long = "x".repeat(9000);
    assert!(Field::Description.desired(&json!(long)).is_err());
}

/// The managed values of the real configs, written through the PVE model and read back,
/// normalize to themselves: zero drift.
#[test]
fn fixture_configs_round_trip_without_drift() {
    for name in [
        "pve7-lxc-config.json",
        "synthesized/pve8-lxc-config-typical.json",
    ] {
        let original = fixture_config(name);
        for field in Field::ALL {
            let want = field.actual(GuestKind::Lxc, &original).unwrap();
            let Some(param) = write_param(field, &want, &original) else {
                continue; // Unset: nothing to write
            };
            let mut after = original.clone();
            pve_write(GuestKind::Lxc, &mut after, &[param]);
            assert_eq!(
                field.actual(GuestKind::Lxc, &after).unwrap(),
                want,
                "{name}: {field}"
            );
            // Nesting writes never touch other flags.
            if field == Field::Nesting {
                let flags = |m: &Map<String, Value>| -> BTreeSet<String> {
                    m.get("features")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .split(',')
                        .filter(|p| !p.starts_with("nesting="))
                        .map(str::to_string)
                        .collect()
                };
                assert_eq!(flags(&original), flags(&after), "{name}");
            }
        }
    }
}

fn arb_value(field: Field) -> BoxedStrategy<Value> {
    match field {
        Field::Memory | Field::Swap | Field::Cores => prop_oneof![
            (0u64..100_000).prop_map(Value::from),
            (0u64..100_000).prop_map(|n| Value::from(n.to_string())),
        ]
        .boxed(),
        Field::Cpulimit => prop_oneof![
            (0u32..1_000).prop_map(|n| Value::from(f64::from(n) / 10.0)),
            (0u32..1_000).prop_map(|n| Value::from(format!("{}", f64::from(n) / 4.0))),
        ]
        .boxed(),
        Field::Onboot | Field::Nesting => prop_oneof![
            any::<bool>().prop_map(Value::from),
            (0u64..2).prop_map(Value::from),
            prop::sample::select(vec!["yes", "no", "on", "off", "1", "0"]).prop_map(Value::from),
        ]
        .boxed(),
        Field::Description => "[a-zA-Z0-9 \n\r%:é]{0,40}".prop_map(Value::from).boxed(),
        Field::Tags => "([A-Za-z0-9_][A-Za-z0-9_.+-]{0,5}[;, ]{1,2}){0,5}"
            .prop_map(Value::from)
            .boxed(),
        Field::Hostname => "[a-z][a-z0-9-]{0,10}[a-z0-9](\\.[a-z]{1,5}){0,2}"
            .prop_map(Value::from)
            .boxed(),
    }
}

fn arb_field_value() -> impl Strategy<Value = (Field, Value)> {
    prop::sample::select(Field::ALL.to_vec())
        .prop_flat_map(|f| arb_value(f).prop_map(move |v| (f, v)))
}

proptest! {
    /// Normalizing a normalized value (written as PVE stores it) changes nothing, and the
    /// round trip through PVE's storage rules reads back equal.
    #[test]
    fn normalization_is_idempotent_and_round_trips((field, v) in arb_field_value(), qemu in any::<bool>()) {
        let kind = if qemu && field.applies_to(GuestKind::Qemu) { GuestKind::Qemu } else { GuestKind::Lxc };
        let n = field.desired(&v).unwrap();
        let mut c = Map::new();
        if let Some(p) = write_param(field, &n, &c) {
            pve_write(kind, &mut c, &[p]);
        }
        let back = field.actual(kind, &c).unwrap();
        prop_assert_eq!(&back, &n);
        // idempotent: normalizing the written form again is a fixed point
        if let Some(Param::Set(_, s)) = write_param(field, &back, &c)
            && field != Field::Nesting
        {
            prop_assert_eq!(field.desired(&Value::from(s)).unwrap(), back);
        }
    }

    #[test]
    fn description_normalizer_is_idempotent(s in "[a-z\r\n]{0,30}") {
        prop_assert_eq!(description(&description(&s)), description(&s));
    }
}
