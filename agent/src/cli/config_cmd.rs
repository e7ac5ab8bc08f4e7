//! `felhom-agent config check`: load the configuration exactly as the daemon would, build
//! the Proxmox client (reads the CA file, checks the token is header-safe; no request is
//! made), and print every effective value with where it came from. Secrets show as
//! `<redacted>`.
//!
//! Also shows this host's `agent_id` (and where it comes from) and whether signed
//! operations are on (`ops: enabled (…)` or `ops: disabled: <exactly why>`); a corrupt
//! `state_dir/agent-id` or a malformed signers file is a configuration error.
//!
//! Exit: 0 valid (warnings, e.g. `insecure` TLS or the test-only poll interval, are printed
//! but do not fail the check); 2 invalid, with the offending field named.
//!
//! `--json` output:
//! ```json
//! {
//!   "ok": true,
//!   "config_file": "/etc/felhom/agent.json",
//!   "fields": [
//!     {"field": "node", "env": "FELHOM_AGENT_NODE", "value": "pve1",
//!      "source": {"kind": "file", "path": "/etc/felhom/agent.json"}},
//!     {"field": "proxmox.token_secret", "env": "FELHOM_AGENT_PROXMOX_TOKEN_SECRET",
//!      "value": "<redacted>", "source": {"kind": "credential", "path": "/run/credentials/felhom-agent.service/proxmox-token"}},
//!     {"field": "privhelper.timeout_seconds", "env": "FELHOM_AGENT_PRIVHELPER_TIMEOUT_SECONDS",
//!      "value": "30", "source": {"kind": "default"}}
//!   ],
//!   "warnings": ["hub.test_min_poll_interval_seconds = 1 is for the test bed only, not for production"],
//!   "identity": {"agent_id": "3f0c…", "agent_id_source": "file"},
//!   "ops": {"enabled": false, "state": "disabled", "signers_file": "/etc/felhom/signers.json",
//!           "reason": "no /etc/felhom/signers.json"}
//! }
//! ```
//! `source.kind` is one of `default`, `unset`, `file` (+`path`), `env` (+`var`),
//! `unset_by_env` (+`var`), `secret_file` (+`path`), `credential` (+`path`). `value` is
//! `null` when the field is unset. On an invalid config: `{"ok": false, "exit": 2,
//! "error": "…"}`.

use serde::Serialize;

use crate::config::{FieldOrigin, LoadedConfig};
use crate::proxmox::Client;

use super::{Cli, CliError};

#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    config_file: String,
    fields: &'a [FieldOrigin],
    warnings: &'a [String],
    /// The effective id: `{"agent_id", "agent_id_source"}` (`null` before the first start).
    identity: serde_json::Value,
    /// The signed-operations state (`enabled`, `state`, `reason` or the signers).
    ops: serde_json::Value,
}

pub fn check(cli: &Cli) -> Result<(), CliError> {
    let loaded = super::load_config_full(cli)?;
    // Building the client reads the CA file and validates the header; no network.
    Client::from_config(&loaded.config)?;
    // A corrupt agent-id file or a malformed signers file fails the check (exit 2).
    super::ops_cmd::check_identity_and_trust(&loaded.config)?;
    let (identity, ops) = super::ops_cmd::identity_and_ops(&loaded.config);
    if cli.json {
        super::print_json(&Report {
            ok: true,
            config_file: loaded.provenance.config_file.display().to_string(),
            fields: &loaded.provenance.fields,
            warnings: &loaded.warnings,
            identity,
            ops,
        });
    } else {
        print!(
            "{}",
            render(
                &loaded,
                &super::ops_cmd::render_identity_and_ops(&identity, &ops)
            )
        );
    }
    Ok(())
}

fn render(loaded: &LoadedConfig, identity_and_ops: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "config file: {}",
        loaded.provenance.config_file.display()
    );
    let width = loaded
        .provenance
        .fields
        .iter()
        .map(|f| f.field.len())
        .max()
        .unwrap_or(0);
    for f in &loaded.provenance.fields {
        let value = f.value.as_deref().unwrap_or("(unset)");
        let _ = writeln!(out, "{:width$}  {value}    [{}]", f.field, f.source);
    }
    out.push_str(identity_and_ops);
    for w in &loaded.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let _ = writeln!(out, "configuration is valid");
    out
}
