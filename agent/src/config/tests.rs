//! Loader tests: env mapping, precedence, unsetting, booleans, TLS modes, secrets, unknown
//! keys, redaction.

use std::path::{Path, PathBuf};

use super::*;

const SECRET: &str = "0b5b3b2e-5bd1-4c6f-9d3a-very-secret-value";
const PIN: &str = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn base_json(extra_tls: &str) -> String {
    format!(
        r#"{{"node": "pve1", "proxmox": {{"url": "https://127.0.0.1:8006", "token_id": "felhom@pve!agent", "token_secret": "{SECRET}", "tls": {{{extra_tls}}}}}}}"#
    )
}

fn env(pairs: &[(&str, &str)]) -> EnvMap {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load(body: &str, e: &[(&str, &str)]) -> Result<LoadedConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "agent.json", body);
    Config::load_with_env(Some(&p), &env(e))
}

#[test]
fn the_documented_shape_loads_with_defaults() {
    let body = format!(
        r#"{{"node": "pve1", "state_dir": "/var/lib/felhom-agent", "proxmox": {{"url": "https://127.0.0.1:8006", "token_id": "felhom@pve!agent", "token_secret": "{SECRET}", "tls": {{"pin_sha256": "{PIN}", "ca_file": null, "insecure": false}}}}}}"#
    );
    let l = load(&body, &[]).unwrap();
    let c = &l.config;
    assert_eq!(c.node, "pve1");
    assert_eq!(c.proxmox.url, "https://127.0.0.1:8006");
    assert_eq!(c.proxmox.token_secret.expose(), SECRET);
    let TlsVerify::PinSha256(pin) = c.proxmox.tls else {
        panic!("expected a pin")
    };
    assert_eq!(format_fingerprint(&pin), PIN);
    assert!(matches!(c.hub.mode, HubMode::Disabled));
    assert_eq!(c.privhelper.timeout, Duration::from_secs(30));
    assert_eq!(
        c.privhelper.socket_dir,
        PathBuf::from("/run/felhom-privhelper")
    );
    assert_eq!(c.smart.interval_seconds, 1800);
    assert_eq!(c.smart.devices, None);
    assert_eq!(c.cloudflared.metrics_url, "http://127.0.0.1:20241");
    assert_eq!(c.cloudflared.timeout, Duration::from_secs(2));
    assert_eq!(c.reconcile.shutdown_timeout_seconds, 120);
    assert_eq!(c.control.socket, PathBuf::from("/run/felhom/agent.sock"));
    assert_eq!(c.sensors.hwmon_root, PathBuf::from("/sys/class/hwmon"));
    assert!(l.warnings.iter().all(|w| !w.contains("insecure")));
    assert_eq!(
        l.provenance
            .get("privhelper.timeout_seconds")
            .unwrap()
            .source,
        Source::Default
    );
    assert!(matches!(
        l.provenance.get("node").unwrap().source,
        Source::File { .. }
    ));
}

#[test]
fn env_overrides_file_and_names_itself() {
    let body = base_json(&format!(r#""pin_sha256": "{PIN}""#));
    let l = load(
        &body,
        &[
            ("FELHOM_AGENT_NODE", "pve2"),
            ("FELHOM_AGENT_PRIVHELPER_TIMEOUT_SECONDS", "7"),
            ("FELHOM_AGENT_SMART_DEVICES", "sda, nvme0n1,,"),
            (
                "FELHOM_AGENT_RECONCILE_DESIRED_FILE",
                "/etc/felhom/desired.json",
            ),
        ],
    )
    .unwrap();
    assert_eq!(l.config.node, "pve2");
    assert_eq!(l.config.privhelper.timeout, Duration::from_secs(7));
    assert_eq!(
        l.config.smart.devices,
        Some(vec!["sda".to_string(), "nvme0n1".to_string()])
    );
    assert_eq!(
        l.config.reconcile.desired_file,
        Some(PathBuf::from("/etc/felhom/desired.json"))
    );
    assert_eq!(
        l.provenance.get("node").unwrap().source,
        Source::Env {
            var: "FELHOM_AGENT_NODE".into()
        }
    );
}

#[test]
fn an_empty_variable_unsets_the_file_value() {
    // The file pins; the environment switches to a CA file by unsetting the pin.
    let body = base_json(&format!(r#""pin_sha256": "{PIN}""#));
    let l = load(
        &body,
        &[
            ("FELHOM_AGENT_PROXMOX_TLS_PIN_SHA256", ""),
            (
                "FELHOM_AGENT_PROXMOX_TLS_CA_FILE",
                "/etc/pve/pve-root-ca.pem",
            ),
        ],
    )
    .unwrap();
    assert_eq!(
        l.config.proxmox.tls,
        TlsVerify::CaFile(PathBuf::from("/etc/pve/pve-root-ca.pem"))
    );
    let pin = l.provenance.get("proxmox.tls.pin_sha256").unwrap();
    assert_eq!(pin.value, None);
    assert_eq!(
        pin.source,
        Source::UnsetByEnv {
            var: "FELHOM_AGENT_PROXMOX_TLS_PIN_SHA256".into()
        }
    );
    // Unsetting a field with a default brings the default back.
    let body = r#"{"node":"pve1","privhelper":{"timeout_seconds":9},"proxmox":{"url":"https://h:8006","token_id":"a@pve!b","token_secret":"s","tls":{"insecure":true}}}"#;
    let l = load(body, &[("FELHOM_AGENT_PRIVHELPER_TIMEOUT_SECONDS", "")]).unwrap();
    assert_eq!(l.config.privhelper.timeout, Duration::from_secs(30));
}

#[test]
fn booleans_accept_true_false_1_0_and_nothing_else() {
    let body = base_json("");
    for (v, insecure) in [("true", true), ("1", true), ("TRUE", true)] {
        let l = load(&body, &[("FELHOM_AGENT_PROXMOX_TLS_INSECURE", v)]).unwrap();
        assert_eq!(l.config.proxmox.tls == TlsVerify::Insecure, insecure, "{v}");
        assert!(l.warnings.iter().any(|w| w.contains("NOT verified")));
    }
    for v in ["false", "0"] {
        // insecure=false and nothing else set: no way to verify → error naming the choices.
        let err = load(&body, &[("FELHOM_AGENT_PROXMOX_TLS_INSECURE", v)]).unwrap_err();
        assert!(matches!(err, ConfigError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("proxmox.tls.pin_sha256"));
    }
    let err = load(&body, &[("FELHOM_AGENT_PROXMOX_TLS_INSECURE", "yes")]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("proxmox.tls.insecure"), "{msg}");
    assert!(msg.contains("FELHOM_AGENT_PROXMOX_TLS_INSECURE"), "{msg}");
}

#[test]
fn two_tls_modes_are_an_error_naming_both() {
    let body = base_json(&format!(
        r#""pin_sha256": "{PIN}", "ca_file": "/etc/pve/pve-root-ca.pem""#
    ));
    let msg = load(&body, &[]).unwrap_err().to_string();
    assert!(msg.contains("proxmox.tls.pin_sha256"), "{msg}");
    assert!(msg.contains("proxmox.tls.ca_file"), "{msg}");

    let body = base_json(&format!(r#""pin_sha256": "{PIN}""#));
    let msg = load(&body, &[("FELHOM_AGENT_PROXMOX_TLS_INSECURE", "1")])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("proxmox.tls.pin_sha256"), "{msg}");
    assert!(msg.contains("proxmox.tls.insecure"), "{msg}");
    assert!(msg.contains("FELHOM_AGENT_PROXMOX_TLS_INSECURE"), "{msg}");
}

#[test]
fn pins_take_any_case_with_or_without_colons() {
    let plain = PIN.replace(':', "").to_lowercase();
    let l = load(&base_json(&format!(r#""pin_sha256": "{plain}""#)), &[]).unwrap();
    let TlsVerify::PinSha256(p) = l.config.proxmox.tls else {
        panic!()
    };
    assert_eq!(format_fingerprint(&p), PIN);
    let msg = load(&base_json(r#""pin_sha256": "AB:CD""#), &[])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("proxmox.tls.pin_sha256"), "{msg}");
}

#[test]
fn secret_file_and_credential_directory() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write(dir.path(), "token", &format!("{SECRET}\n"));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let body = format!(
        r#"{{"node":"pve1","proxmox":{{"url":"https://h:8006","token_id":"a@pve!b","token_secret_file":"{}","tls":{{"insecure":true}}}}}}"#,
        secret_file.display()
    );
    let p = write(dir.path(), "agent.json", &body);
    let l = Config::load_with_env(Some(&p), &EnvMap::new()).unwrap();
    assert_eq!(l.config.proxmox.token_secret.expose(), SECRET);
    assert_eq!(
        l.provenance.get("proxmox.token_secret").unwrap().source,
        Source::SecretFile {
            path: secret_file.clone()
        }
    );
    assert!(
        l.warnings
            .iter()
            .any(|w| w.contains("readable by every user") && w.contains("token"))
    );

    // A systemd credential, with no secret in the file.
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    write(&creds, "proxmox-token", SECRET);
    write(&creds, "hub-token", "hub-secret-xyz");
    let body = r#"{"node":"pve1","hub":{"url":"https://hub.example"},"proxmox":{"url":"https://h:8006","token_id":"a@pve!b","tls":{"insecure":true}}}"#;
    let p = write(dir.path(), "agent2.json", body);
    let e = env(&[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())]);
    let l = Config::load_with_env(Some(&p), &e).unwrap();
    assert_eq!(l.config.proxmox.token_secret.expose(), SECRET);
    let HubMode::Enabled { token, url, .. } = &l.config.hub.mode else {
        panic!("hub should be enabled by its url")
    };
    assert_eq!(token.expose(), "hub-secret-xyz");
    assert_eq!(url, "https://hub.example");
    assert_eq!(
        l.provenance.get("hub.token").unwrap().source,
        Source::Credential {
            path: creds.join("hub-token")
        }
    );

    // The credential plus an inline secret: error naming both places.
    let body = base_json(r#""insecure": true"#);
    let p = write(dir.path(), "agent3.json", &body);
    let msg = Config::load_with_env(Some(&p), &e).unwrap_err().to_string();
    assert!(msg.contains("proxmox.token_secret"), "{msg}");
    assert!(msg.contains("credential proxmox-token"), "{msg}");
    assert!(!msg.contains(SECRET));

    // A missing secret file is named.
    let msg = load(
        &base_json(r#""insecure": true"#),
        &[
            ("FELHOM_AGENT_PROXMOX_TOKEN_SECRET", ""),
            (
                "FELHOM_AGENT_PROXMOX_TOKEN_SECRET_FILE",
                "/nonexistent/token",
            ),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("/nonexistent/token"), "{msg}");
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let body = r#"{"node":"pve1","proxmox":{"url":"https://h","token_id":"a@pve!b","token_secret":"s","tls":{"insecure":true,"pin_sha265":"x"}}}"#;
    let err = load(body, &[]).unwrap_err();
    assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "proxmox.tls.pin_sha265"));
    let err = load(r#"{"nod":"pve1"}"#, &[]).unwrap_err();
    assert!(err.to_string().contains("`nod`"), "{err}");
}

#[test]
fn invalid_values_name_the_field() {
    let cases = [
        (
            r#""privhelper":{"timeout_seconds":"30"}"#,
            "privhelper.timeout_seconds",
        ),
        (
            r#""privhelper":{"timeout_seconds":0}"#,
            "privhelper.timeout_seconds",
        ),
        (r#""state_dir":"relative/dir""#, "state_dir"),
        (r#""smart":{"devices":["../sda"]}"#, "smart.devices"),
        (r#""hub":{"mode":"on"}"#, "hub.mode"),
        (
            r#""hub":{"url":"http://hub.example","token":"t"}"#,
            "hub.url",
        ),
        (r#""hub":{"mode":"enabled"}"#, "hub.url"),
        (r#""hub":{"url":"https://hub.example"}"#, "hub.token"),
        (
            r#""cloudflared":{"metrics_url":"ftp://x"}"#,
            "cloudflared.metrics_url",
        ),
        (r#""control":[]"#, "control"),
    ];
    for (extra, field) in cases {
        let body = format!(
            r#"{{"node":"pve1",{extra},"proxmox":{{"url":"https://h:8006","token_id":"a@pve!b","token_secret":"s","tls":{{"insecure":true}}}}}}"#
        );
        let msg = load(&body, &[]).unwrap_err().to_string();
        assert!(msg.contains(field), "{extra}: {msg}");
    }
    for (var, val, field) in [
        ("FELHOM_AGENT_NODE", "pve 1", "node"),
        ("FELHOM_AGENT_PROXMOX_URL", "http://h:8006", "proxmox.url"),
        (
            "FELHOM_AGENT_PROXMOX_URL",
            "https://u:p@h:8006",
            "proxmox.url",
        ),
        (
            "FELHOM_AGENT_PROXMOX_TOKEN_ID",
            "felhom@pve",
            "proxmox.token_id",
        ),
        (
            "FELHOM_AGENT_SMART_INTERVAL_SECONDS",
            "-5",
            "smart.interval_seconds",
        ),
    ] {
        let msg = load(&base_json(r#""insecure": true"#), &[(var, val)])
            .unwrap_err()
            .to_string();
        assert!(msg.contains(field), "{var}: {msg}");
        assert!(msg.contains(var), "{var}: {msg}");
    }
    let msg = load(r#"{"node": "pve1""#, &[]).unwrap_err().to_string();
    assert!(msg.contains("not valid"), "{msg}");
}

#[test]
fn test_poll_interval_is_flagged() {
    let body = format!(
        r#"{{"node":"pve1","hub":{{"test_min_poll_interval_seconds":1,"mode":"disabled"}},"proxmox":{{"url":"https://h:8006","token_id":"a@pve!b","token_secret":"{SECRET}","tls":{{"pin_sha256":"{PIN}"}}}}}}"#
    );
    let l = load(&body, &[]).unwrap();
    assert_eq!(l.config.hub.test_min_poll_interval_seconds, Some(1));
    assert!(
        l.warnings
            .iter()
            .any(|w| w.contains("test_min_poll_interval_seconds")
                && w.contains("not for production"))
    );
}

#[test]
fn secrets_are_redacted_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"{{"node":"pve1","hub":{{"url":"https://hub.example","token":"hub-{SECRET}"}},"proxmox":{{"url":"https://h:8006","token_id":"a@pve!b","token_secret":"{SECRET}","tls":{{"pin_sha256":"{PIN}"}}}}}}"#
    );
    let p = write(dir.path(), "agent.json", &body);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let l = Config::load_with_env(Some(&p), &EnvMap::new()).unwrap();
    let all = format!(
        "{l:?}\n{:#?}\n{}\n{}",
        l.config,
        serde_json::to_string(&l.provenance).unwrap(),
        l.warnings.join("\n")
    );
    assert!(!all.contains(SECRET), "{all}");
    assert_eq!(
        l.provenance
            .get("proxmox.token_secret")
            .unwrap()
            .value
            .as_deref(),
        Some("<redacted>")
    );
    assert!(
        l.warnings
            .iter()
            .any(|w| w.contains("readable by every user"))
    );

    // Errors about a secret never quote it.
    let bad = format!("{SECRET} with space");
    let msg = load(
        &base_json(r#""insecure": true"#),
        &[("FELHOM_AGENT_PROXMOX_TOKEN_SECRET", &bad)],
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("proxmox.token_secret"), "{msg}");
    assert!(!msg.contains(SECRET), "{msg}");
}

#[test]
fn missing_file_is_named() {
    let err = Config::load_with_env(Some(Path::new("/nonexistent/agent.json")), &EnvMap::new())
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/agent.json"));
}

#[test]
fn host_sections_load_without_proxmox_or_hub_and_still_check_what_they_read() {
    let dir = tempfile::tempdir().unwrap();
    // No proxmox or hub section at all, as on a host whose secrets are systemd
    // credentials the operator's shell does not have.
    let p = write(
        dir.path(),
        "agent.json",
        r#"{"node":"pve1","state_dir":"/srv/felhom","privhelper":{"socket_dir":"/run/x","timeout_seconds":7},"sensors":{"hwmon_root":"/tmp/hw"},"control":{"socket":"/run/x/agent.sock"}}"#,
    );
    let h = load::load_host(
        Some(&p),
        &env(&[("FELHOM_AGENT_PRIVHELPER_TIMEOUT_SECONDS", "9")]),
    )
    .unwrap();
    assert_eq!(h.state_dir, PathBuf::from("/srv/felhom"));
    assert_eq!(h.privhelper.socket_dir, PathBuf::from("/run/x"));
    assert_eq!(h.privhelper.timeout, std::time::Duration::from_secs(9));
    assert_eq!(h.sensors.hwmon_root, PathBuf::from("/tmp/hw"));
    assert_eq!(h.control.socket, PathBuf::from("/run/x/agent.sock"));
    // The full load of the same file still needs the Proxmox section.
    let full = Config::load_with_env(Some(&p), &env(&[])).unwrap_err();
    assert!(full.to_string().contains("proxmox.url"), "{full}");

    // Typos and bad values in the file are still errors naming the field.
    let p = write(
        dir.path(),
        "typo.json",
        r#"{"node":"pve1","privhelper":{"socket_dri":"/x"}}"#,
    );
    let e = load::load_host(Some(&p), &env(&[])).unwrap_err();
    assert!(e.to_string().contains("privhelper.socket_dri"), "{e}");
    let p = write(
        dir.path(),
        "bad.json",
        r#"{"node":"pve1","privhelper":{"timeout_seconds":0}}"#,
    );
    let e = load::load_host(Some(&p), &env(&[])).unwrap_err();
    assert!(e.to_string().contains("privhelper.timeout_seconds"), "{e}");
}

fn hub_json(hub_tls: &str) -> String {
    format!(
        r#"{{"node":"pve1","hub":{{"url":"https://hub.example","token":"hub-tok"{hub_tls}}},"proxmox":{{"url":"https://h:8006","token_id":"a@pve!b","token_secret":"{SECRET}","tls":{{"insecure":true}}}}}}"#
    )
}

#[test]
fn the_hub_can_be_pinned_like_proxmox() {
    // No pin, no CA file: the system roots.
    let l = load(&hub_json(""), &[]).unwrap();
    assert!(matches!(
        l.config.hub.mode,
        HubMode::Enabled {
            tls: HubTls::SystemRoots,
            ..
        }
    ));

    // A pin in the file, in any case, colons optional; shown and sourced by config check.
    let body = hub_json(&format!(
        r#","tls":{{"pin_sha256":"{}"}}"#,
        PIN.to_lowercase()
    ));
    let l = load(&body, &[]).unwrap();
    let HubMode::Enabled {
        tls: HubTls::PinSha256(pin),
        ..
    } = l.config.hub.mode
    else {
        panic!("{:?}", l.config.hub.mode)
    };
    assert_eq!(format_fingerprint(&pin), PIN);
    let shown = l.provenance.get("hub.tls.pin_sha256").unwrap();
    assert_eq!(shown.value.as_deref(), Some(PIN));
    assert!(
        matches!(shown.source, Source::File { .. }),
        "{:?}",
        shown.source
    );

    // From the environment, replacing a CA file given in the file.
    let body = hub_json(r#","ca_file":"/etc/felhom/hub-ca.pem""#);
    let l = load(
        &body,
        &[
            ("FELHOM_AGENT_HUB_TLS_PIN_SHA256", PIN),
            ("FELHOM_AGENT_HUB_CA_FILE", ""),
        ],
    )
    .unwrap();
    assert!(matches!(
        l.config.hub.mode,
        HubMode::Enabled {
            tls: HubTls::PinSha256(_),
            ..
        }
    ));
    assert_eq!(
        l.provenance.get("hub.tls.pin_sha256").unwrap().source,
        Source::Env {
            var: "FELHOM_AGENT_HUB_TLS_PIN_SHA256".into()
        }
    );
    assert_eq!(l.provenance.get("hub.ca_file").unwrap().value, None);

    // A pin and a CA file at once: an error naming both.
    let msg = load(&body, &[("FELHOM_AGENT_HUB_TLS_PIN_SHA256", PIN)])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("hub.tls.pin_sha256") && msg.contains("hub.ca_file"),
        "{msg}"
    );

    // A pin that is not 32 bytes of hex.
    let msg = load(&hub_json(r#","tls":{"pin_sha256":"AB:CD"}"#), &[])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("hub.tls.pin_sha256"), "{msg}");

    // An unknown key beside it is still refused.
    let err = load(&hub_json(r#","tls":{"pin_sha265":"x"}"#), &[]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, .. } if key == "hub.tls.pin_sha265"),
        "{err}"
    );
}

#[test]
fn agent_id_and_signers_file() {
    let with = |extra: &str| {
        let mut body = base_json(r#""insecure": true"#);
        body.insert_str(1, extra);
        body
    };
    let l = load(&with(""), &[]).unwrap();
    assert_eq!(l.config.agent_id, None);
    assert_eq!(
        l.config.authz.signers_file,
        PathBuf::from("/etc/felhom/signers.json")
    );
    assert_eq!(
        l.provenance.get("authz.signers_file").unwrap().source,
        Source::Default
    );

    let id = "00112233445566778899aabbccddeeff";
    let l = load(
        &with(&format!(
            r#""agent_id": "{id}", "authz": {{"signers_file": "/srv/signers.json"}}, "#
        )),
        &[],
    )
    .unwrap();
    assert_eq!(l.config.agent_id.as_ref().unwrap().as_str(), id);
    assert_eq!(
        l.config.authz.signers_file,
        PathBuf::from("/srv/signers.json")
    );
    assert_eq!(
        l.provenance.get("agent_id").unwrap().value.as_deref(),
        Some(id)
    );

    // The environment too, validated the same way.
    let l = load(&with(""), &[("FELHOM_AGENT_AGENT_ID", id)]).unwrap();
    assert_eq!(l.config.agent_id.unwrap().as_str(), id);

    for bad in [
        "00112233445566778899AABBCCDDEEFF",
        "0011223344556677",
        "00112233445566778899aabbccddeeff00",
        "g0112233445566778899aabbccddeeff",
    ] {
        let e = load(&with(&format!(r#""agent_id": "{bad}", "#)), &[]).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { field, .. } if field == "agent_id"),
            "{bad}: {e}"
        );
    }
    let e = load(&with(r#""authz": {"signers_file": "signers.json"}, "#), &[]).unwrap_err();
    assert!(e.to_string().contains("authz.signers_file"), "{e}");
}

#[test]
fn desired_source_defaults_to_file_and_hub_needs_the_hub_and_no_file() {
    // Default: the file source, with or without a file.
    let l = load(&hub_json(""), &[]).unwrap();
    assert_eq!(l.config.reconcile.desired_source, DesiredSource::File);
    assert_eq!(
        l.provenance
            .get("reconcile.desired_source")
            .unwrap()
            .value
            .as_deref(),
        Some("file")
    );
    // The hub source with the hub enabled.
    let l = load(
        &hub_json(""),
        &[("FELHOM_AGENT_RECONCILE_DESIRED_SOURCE", "hub")],
    )
    .unwrap();
    assert_eq!(l.config.reconcile.desired_source, DesiredSource::Hub);
    assert_eq!(l.config.reconcile.desired_file, None);

    // The hub source with a desired file: a conflict that says which to remove.
    let e = load(
        &hub_json(""),
        &[
            ("FELHOM_AGENT_RECONCILE_DESIRED_SOURCE", "hub"),
            (
                "FELHOM_AGENT_RECONCILE_DESIRED_FILE",
                "/etc/felhom/desired.json",
            ),
        ],
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::Conflict { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("reconcile.desired_source") && msg.contains("remove reconcile.desired_file"),
        "{msg}"
    );

    // The hub source without the hub.
    let body = base_json(r#""insecure": true"#).replacen(
        r#""node": "pve1","#,
        r#""node": "pve1", "reconcile": {"desired_source": "hub"},"#,
        1,
    );
    let e = load(&body, &[]).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Invalid { field, .. } if field == "reconcile.desired_source"),
        "{e}"
    );
    assert!(e.to_string().contains("needs the hub enabled"), "{e}");

    // Anything else names the field and the choices.
    let e = load(
        &hub_json(""),
        &[("FELHOM_AGENT_RECONCILE_DESIRED_SOURCE", "both")],
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("reconcile.desired_source") && msg.contains("\"file\", \"hub\""),
        "{msg}"
    );
}

#[test]
fn scratch_vmids_are_a_bounded_range_of_valid_vmids() {
    let var = "FELHOM_AGENT_RESTORE_TESTS_SCRATCH_VMIDS";
    let ok = base_json(r#""insecure": true"#);
    let l = load(&ok, &[(var, "9900-9909")]).unwrap();
    assert_eq!(l.config.scratch_vmids, Some(9900..=9909));
    for bad in ["9909-9900", "99", "100-2000", "9900-x", "50-60"] {
        let e = load(&ok, &[(var, bad)]).unwrap_err();
        assert!(
            e.to_string().contains("restore_tests.scratch_vmids"),
            "{bad}: {e}"
        );
    }
    assert_eq!(load(&ok, &[]).unwrap().config.scratch_vmids, None);
}

#[test]
fn restore_tests_default_off_and_enabled_needs_range_and_storage() {
    let ok = base_json(r#""insecure": true"#);
    let c = load(&ok, &[]).unwrap().config;
    assert_eq!(c.restore_tests, super::RestoreTestsConfig::default());
    assert!(!c.restore_tests.enabled);
    assert_eq!(c.restore_tests.interval_hours, 24);
    assert_eq!(c.restore_tests.boot_check_seconds, 120);
    assert_eq!(c.restore_tests.stable_seconds, 10);
    assert_eq!(c.restore_tests.min_free_fraction, 0.2);

    let on = ("FELHOM_AGENT_RESTORE_TESTS_ENABLED", "true");
    let range = ("FELHOM_AGENT_RESTORE_TESTS_SCRATCH_VMIDS", "9900-9909");
    let storage = ("FELHOM_AGENT_RESTORE_TESTS_STORAGE", "local-lvm");
    let e = load(&ok, &[on, storage]).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Missing { field, .. } if field == "restore_tests.scratch_vmids"),
        "{e}"
    );
    let e = load(&ok, &[on, range]).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Missing { field, .. } if field == "restore_tests.storage"),
        "{e}"
    );
    let c = load(&ok, &[on, range, storage]).unwrap().config;
    assert!(c.restore_tests.enabled);
    assert_eq!(c.restore_tests.storage.as_deref(), Some("local-lvm"));
}

#[test]
fn restore_tests_fields_load_from_the_file_and_are_checked() {
    let body = format!(
        r#"{{"node": "pve1", "proxmox": {{"url": "https://127.0.0.1:8006", "token_id": "felhom@pve!agent", "token_secret": "{SECRET}", "tls": {{"insecure": true}}}}, "restore_tests": {{"enabled": true, "scratch_vmids": "9900-9901", "storage": "local-lvm", "interval_hours": 6, "window": "23:30-02:00", "boot_check_seconds": 60, "stable_seconds": 0, "max_archive_bytes": 1000, "min_free_fraction": 0.5}}}}"#
    );
    let l = load(&body, &[]).unwrap();
    let r = &l.config.restore_tests;
    assert_eq!(r.interval_hours, 6);
    assert_eq!(r.boot_check_seconds, 60);
    assert_eq!(r.stable_seconds, 0);
    assert_eq!(r.max_archive_bytes, Some(1000));
    assert_eq!(r.min_free_fraction, 0.5);
    let w = r.window.unwrap();
    assert_eq!(w.to_string(), "23:30-02:00");
    assert!(w.contains(23 * 60 + 30) && w.contains(60) && !w.contains(120));
    assert!(!w.contains(12 * 60));
    let shown = l
        .provenance
        .fields
        .iter()
        .find(|f| f.field == "restore_tests.window")
        .and_then(|f| f.value.clone());
    assert_eq!(shown.as_deref(), Some("23:30-02:00"));

    let ok = base_json(r#""insecure": true"#);
    for (var, bad) in [
        ("FELHOM_AGENT_RESTORE_TESTS_WINDOW", "1:00-05:00"),
        ("FELHOM_AGENT_RESTORE_TESTS_WINDOW", "01:00-01:00"),
        ("FELHOM_AGENT_RESTORE_TESTS_WINDOW", "24:00-05:00"),
        ("FELHOM_AGENT_RESTORE_TESTS_WINDOW", "0100"),
        ("FELHOM_AGENT_RESTORE_TESTS_MIN_FREE_FRACTION", "1.5"),
        ("FELHOM_AGENT_RESTORE_TESTS_MIN_FREE_FRACTION", "x"),
        ("FELHOM_AGENT_RESTORE_TESTS_INTERVAL_HOURS", "0"),
        ("FELHOM_AGENT_RESTORE_TESTS_BOOT_CHECK_SECONDS", "0"),
        ("FELHOM_AGENT_RESTORE_TESTS_MAX_ARCHIVE_BYTES", "0"),
        ("FELHOM_AGENT_RESTORE_TESTS_STORAGE", "local lvm"),
    ] {
        let e = load(&ok, &[(var, bad)]).unwrap_err();
        let field = var
            .trim_start_matches("FELHOM_AGENT_")
            .to_lowercase()
            .replacen("restore_tests_", "restore_tests.", 1);
        assert!(e.to_string().contains(&field), "{var}={bad}: {e}");
    }
    let body = format!(
        r#"{{"node": "pve1", "proxmox": {{"url": "https://127.0.0.1:8006", "token_id": "felhom@pve!agent", "token_secret": "{SECRET}", "tls": {{"insecure": true}}}}, "restore_tests": {{"min_free_fraction": "0.2"}}}}"#
    );
    let e = load(&body, &[]).unwrap_err();
    assert!(e.to_string().contains("a number from 0 to 1"), "{e}");
}

#[test]
fn gate_fields_load_with_defaults_and_are_checked() {
    let ok = base_json(r#""insecure": true"#);
    let g = load(&ok, &[]).unwrap().config.gate;
    assert_eq!(g, crate::config::GateConfig::default());
    assert_eq!(g.backup_storage, None, "no default: the operator chooses");
    assert_eq!(g.health_timeout_seconds, 120);
    assert_eq!(g.undo_warn_fraction, 0.2);

    let body = format!(
        r#"{{"node": "pve1", "proxmox": {{"url": "https://127.0.0.1:8006", "token_id": "felhom@pve!agent", "token_secret": "{SECRET}", "tls": {{"insecure": true}}}}, "gate": {{"backup_storage": "backup-nfs", "health_timeout_seconds": 30, "undo_warn_fraction": 0.5}}}}"#
    );
    let g = load(&body, &[]).unwrap().config.gate;
    assert_eq!(g.backup_storage.as_deref(), Some("backup-nfs"));
    assert_eq!(g.health_timeout_seconds, 30);
    assert_eq!(g.undo_warn_fraction, 0.5);

    for (var, bad) in [
        ("FELHOM_AGENT_GATE_BACKUP_STORAGE", "backup nfs"),
        ("FELHOM_AGENT_GATE_BACKUP_STORAGE", "1backup"),
        ("FELHOM_AGENT_GATE_HEALTH_TIMEOUT_SECONDS", "0"),
        ("FELHOM_AGENT_GATE_UNDO_WARN_FRACTION", "1.5"),
    ] {
        let e = load(&ok, &[(var, bad)]).unwrap_err();
        let field = var
            .trim_start_matches("FELHOM_AGENT_")
            .to_lowercase()
            .replacen("gate_", "gate.", 1);
        assert!(e.to_string().contains(&field), "{var}={bad}: {e}");
    }
}
