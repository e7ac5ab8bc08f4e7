//! `felhom-sign`: the operators' signing tool for felhom signed operations.
//!
//! Background: the agent runs only operations signed by operator keys it trusts
//! (`/etc/felhom/signers.json`); the hub merely relays them. Signing keys live with the
//! operators, never on a host or on the hub; this tool runs on an operator's machine.
//!
//! Design: thin commands over `felhom-authz`, which owns PAE, the envelope and the payload
//! rules; every envelope this tool prints has been verified with `felhom-authz` against
//! the signing key before it is printed, so a mistyped param fails here, not on a host.
//!
//! Must never: print or log private key bytes; overwrite a key file; sign a payload it
//! could not verify itself.

#![forbid(unsafe_code)]

mod keyfile;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use ed25519_dalek::{Signature, Signer, SigningKey};
use felhom_authz::{
    AgentId, Context, DESIRED_PAYLOAD_TYPE, Envelope, OP_PAYLOAD_TYPE, PayloadType, SignatureEntry,
    Trust, decode_base64, encode_base64, pae, payload_sha256, verify_desired, verify_envelope,
    verify_op,
};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::keyfile::KeyFileError;

#[derive(Parser, Debug)]
#[command(
    name = "felhom-sign",
    version,
    about = "Sign felhom operations and desired states (DSSE v1, Ed25519)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Make a new key: writes NAME.pem (PKCS#8 PEM, 0600) and prints its signers.json line.
    Keygen {
        name: String,
        /// Where to write the private key (default: ./NAME.pem); never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Sign an operation and print the envelope.
    Op(Box<OpArgs>),
    /// Add this key's signature to an envelope (m of n) and print it.
    Cosign {
        #[command(flatten)]
        key: KeyArgs,
        /// The envelope file, or - for stdin.
        file: PathBuf,
    },
    /// Show an envelope's payload and signatures; with --signers, verify them.
    Inspect {
        /// A signers.json to verify the signatures against (exit 1 when refused).
        #[arg(long)]
        signers: Option<PathBuf>,
        /// The envelope file, or - for stdin.
        file: PathBuf,
    },
    /// Sign a desired state (FILE.json holds `guests`, as the desired file does).
    Desired {
        #[command(flatten)]
        key: KeyArgs,
        #[arg(long)]
        agent_id: String,
        #[arg(long)]
        node: String,
        #[arg(long)]
        generation: u64,
        file: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct OpArgs {
    #[command(flatten)]
    key: KeyArgs,
    #[arg(long)]
    agent_id: String,
    #[arg(long)]
    node: String,
    /// start, stop, reboot, snapshot, backup, create_container, usb_mount, usb_unmount;
    /// gated: set_config, rollback, restore, undo; irreversible (sign with --grant
    /// irreversible, then cosign up to the irreversible threshold): delete_snapshot,
    /// destroy, release_undo, and a set_config that clears protection.
    #[arg(long)]
    op: String,
    /// The guest (guest operations only).
    #[arg(long)]
    vmid: Option<u32>,
    /// lxc or qemu.
    #[arg(long = "type", default_value = "lxc")]
    guest_type: String,
    /// How long it stays valid from now (or from --not-before): 90, 90s, 15m, 1h, 1d.
    #[arg(long, default_value = "1h")]
    valid: String,
    /// Unix seconds (default: now).
    #[arg(long)]
    not_before: Option<u64>,
    /// One param: k=v; v is read as JSON when it parses (30, true, "123"), else as a string.
    #[arg(long = "param")]
    params: Vec<String>,
    /// All params as one JSON object (e.g. a create_container spec); --param adds to it.
    #[arg(long)]
    params_json: Option<String>,
    /// Run only if the guest's config digest is this (40 hex).
    #[arg(long)]
    expect_digest: Option<String>,
    /// reversible (default) or irreversible.
    #[arg(long, default_value = "reversible")]
    grant: String,
    /// For the audit trail (at most 200 characters).
    #[arg(long, default_value = "")]
    reason: String,
    /// 32 lower-case hex (default: random).
    #[arg(long)]
    op_id: Option<String>,
}

#[derive(clap::Args, Debug)]
struct KeyArgs {
    /// The private key (PKCS#8 PEM, from keygen or `openssl genpkey -algorithm ed25519`).
    #[arg(long)]
    key: PathBuf,
    /// The keyid hint (default: the key file's name without .pem).
    #[arg(long)]
    keyid: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum SignError {
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("the envelope does not verify: {0}")]
    SelfCheck(felhom_authz::Refusal),
    #[error("{0}")]
    Envelope(felhom_authz::Refusal),
}

fn usage(msg: impl Into<String>) -> SignError {
    SignError::Usage(msg.into())
}

/// The operation payload in the field order of the contract (docs/signed-ops.md).
#[derive(Serialize)]
struct OpBody<'a> {
    v: u32,
    op_id: &'a str,
    agent_id: &'a str,
    node: &'a str,
    not_before: u64,
    not_after: u64,
    op: &'a str,
    target: Option<Value>,
    params: Value,
    expect: Option<Value>,
    grant: &'a str,
    reason: &'a str,
}

#[derive(Serialize)]
struct DesiredBody<'a> {
    v: u32,
    agent_id: &'a str,
    node: &'a str,
    generation: u64,
    guests: &'a [Value],
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `90`, `90s`, `15m`, `1h`, `2d` as seconds.
fn parse_duration(s: &str) -> Result<u64, SignError> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| usage(format!("--valid {s:?}: expected e.g. 90, 90s, 15m, 1h, 1d")))?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(usage(format!("--valid {s:?}: unit must be s, m, h or d"))),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| usage(format!("--valid {s:?} is out of range")))
}

fn keyid_of(args: &KeyArgs) -> String {
    args.keyid.clone().unwrap_or_else(|| {
        args.key
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    })
}

fn read_input(path: &Path) -> Result<Vec<u8>, SignError> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| SignError::Read(path.to_path_buf(), e))?;
        Ok(buf)
    } else {
        std::fs::read(path).map_err(|e| SignError::Read(path.to_path_buf(), e))
    }
}

fn signers_line(name: &str, key: &SigningKey) -> String {
    serde_json::json!({"name": name, "ed25519": encode_base64(key.verifying_key().as_bytes())})
        .to_string()
}

/// A trust that holds only this key, with the widest limits a host accepts: used to
/// verify every envelope before it is printed.
fn self_trust(name: &str, key: &SigningKey) -> Result<Trust, SignError> {
    let doc = format!(
        r#"{{"keys":[{}],"threshold":{{"reversible":1,"irreversible":1}},"max_validity_seconds":{},"clock_skew_seconds":0}}"#,
        signers_line(name, key),
        felhom_authz::trust::MAX_MAX_VALIDITY_SECONDS
    );
    Trust::from_json(doc.as_bytes()).map_err(|e| usage(format!("this key cannot be trusted: {e}")))
}

fn sign_entry(key: &SigningKey, keyid: String, ty: &str, body: &[u8]) -> SignatureEntry {
    let sig: Signature = key.sign(&pae(ty, body));
    SignatureEntry {
        keyid,
        sig: encode_base64(&sig.to_bytes()),
    }
}

fn param_value(v: &str) -> Value {
    serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()))
}

fn run(cli: Cli) -> Result<(), SignError> {
    match cli.cmd {
        Cmd::Keygen { name, out } => {
            if name.is_empty()
                || name.len() > 64
                || !name.bytes().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'@' | b'+' | b'-')
                })
            {
                return Err(usage(
                    "NAME must be 1..=64 characters of A-Z a-z 0-9 . _ @ + -",
                ));
            }
            let path = out.unwrap_or_else(|| PathBuf::from(format!("{name}.pem")));
            let key = keyfile::generate()?;
            keyfile::write_new(&path, &key)?;
            eprintln!(
                "wrote {} (mode 0600); add this line to signers.json:",
                path.display()
            );
            println!("{}", signers_line(&name, &key));
            Ok(())
        }
        Cmd::Op(args) => {
            let OpArgs {
                key,
                agent_id,
                node,
                op,
                vmid,
                guest_type,
                valid,
                not_before,
                params,
                params_json,
                expect_digest,
                grant,
                reason,
                op_id,
            } = *args;
            let signing = keyfile::read(&key.key)?;
            let keyid = keyid_of(&key);
            let valid = parse_duration(&valid)?;
            let nb = not_before.unwrap_or_else(now);
            let na = nb
                .checked_add(valid)
                .ok_or_else(|| usage("--not-before + --valid overflows"))?;
            let op_id = match op_id {
                Some(id) => id,
                None => {
                    let mut b = [0u8; 16];
                    keyfile::random(&mut b)?;
                    hex::encode(b)
                }
            };
            let mut p = match params_json {
                Some(s) => match serde_json::from_str::<Value>(&s) {
                    Ok(Value::Object(m)) => m,
                    _ => return Err(usage("--params-json must be a JSON object")),
                },
                None => Map::new(),
            };
            for kv in &params {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| usage(format!("--param {kv:?}: expected k=v")))?;
                p.insert(k.to_string(), param_value(v));
            }
            let target = vmid.map(|v| serde_json::json!({"type": guest_type, "vmid": v}));
            let expect = expect_digest.map(|d| serde_json::json!({"config_digest": d}));
            let body = OpBody {
                v: 1,
                op_id: &op_id,
                agent_id: &agent_id,
                node: &node,
                not_before: nb,
                not_after: na,
                op: &op,
                target,
                params: Value::Object(p),
                expect,
                grant: &grant,
                reason: &reason,
            };
            let body = serde_json::to_vec(&body).map_err(|e| usage(e.to_string()))?;
            let env = Envelope {
                payload_type: OP_PAYLOAD_TYPE.to_string(),
                payload: encode_base64(&body),
                signatures: vec![sign_entry(&signing, keyid.clone(), OP_PAYLOAD_TYPE, &body)],
            };
            let json = env.to_json();
            let ctx = Context {
                agent_id: AgentId::new(agent_id.clone()).map_err(usage)?,
                node: node.clone(),
                now: nb,
                scratch_vmids: None,
            };
            verify_op(
                json.as_bytes(),
                &self_trust(&keyid_or(&keyid), &signing)?,
                &ctx,
            )
            .map_err(SignError::SelfCheck)?;
            println!("{json}");
            Ok(())
        }
        Cmd::Cosign { key, file } => {
            let signing = keyfile::read(&key.key)?;
            let raw = read_input(&file)?;
            let mut env = Envelope::parse(&raw).map_err(SignError::Envelope)?;
            let body = env.body().map_err(SignError::Envelope)?;
            let msg = pae(&env.payload_type, &body);
            let vk = signing.verifying_key();
            let already = env.signatures.iter().any(|s| {
                decode_base64(&s.sig)
                    .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
                    .is_some_and(|b| vk.verify_strict(&msg, &Signature::from_bytes(&b)).is_ok())
            });
            if already {
                return Err(usage(
                    "this key has already signed the envelope (a second signature would not count)",
                ));
            }
            let ty = env.payload_type.clone();
            env.signatures
                .push(sign_entry(&signing, keyid_of(&key), &ty, &body));
            println!("{}", env.to_json());
            Ok(())
        }
        Cmd::Inspect { signers, file } => {
            let raw = read_input(&file)?;
            let env = Envelope::parse(&raw).map_err(SignError::Envelope)?;
            let body = env.body().map_err(SignError::Envelope)?;
            // Escaped: an envelope from elsewhere must not drive the terminal.
            println!("payloadType: {}", env.payload_type.escape_debug());
            println!("payload_sha256: {}", hex::encode(payload_sha256(&body)));
            println!("payload:");
            match serde_json::from_slice::<Value>(&body) {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
                Err(_) => println!("{}", String::from_utf8_lossy(&body).escape_debug()),
            }
            println!("signatures:");
            for s in &env.signatures {
                println!("  keyid {:?}", s.keyid);
            }
            if let Some(path) = signers {
                let bytes = std::fs::read(&path).map_err(|e| SignError::Read(path.clone(), e))?;
                let trust = Trust::from_json(&bytes)
                    .map_err(|e| usage(format!("{}: {e}", path.display())))?;
                let ty = match env.payload_type.as_str() {
                    DESIRED_PAYLOAD_TYPE => PayloadType::Desired,
                    _ => PayloadType::Op,
                };
                let v = verify_envelope(&raw, ty, &trust).map_err(SignError::Envelope)?;
                println!("verified by: {}", v.signers().join(", "));
            }
            Ok(())
        }
        Cmd::Desired {
            key,
            agent_id,
            node,
            generation,
            file,
        } => {
            let signing = keyfile::read(&key.key)?;
            let keyid = keyid_of(&key);
            let raw = read_input(&file)?;
            let doc: Value = serde_json::from_slice(&raw)
                .map_err(|e| usage(format!("{}: {e}", file.display())))?;
            let Some(obj) = doc.as_object() else {
                return Err(usage(format!("{}: expected a JSON object", file.display())));
            };
            if let Some(k) = obj
                .keys()
                .find(|k| !matches!(k.as_str(), "guests" | "generation"))
            {
                return Err(usage(format!("{}: unknown field {k:?}", file.display())));
            }
            let guests = match obj.get("guests") {
                Some(Value::Array(g)) => g.clone(),
                None => Vec::new(),
                Some(_) => return Err(usage("guests must be a list")),
            };
            let body = DesiredBody {
                v: 1,
                agent_id: &agent_id,
                node: &node,
                generation,
                guests: &guests,
            };
            let body = serde_json::to_vec(&body).map_err(|e| usage(e.to_string()))?;
            let env = Envelope {
                payload_type: DESIRED_PAYLOAD_TYPE.to_string(),
                payload: encode_base64(&body),
                signatures: vec![sign_entry(
                    &signing,
                    keyid.clone(),
                    DESIRED_PAYLOAD_TYPE,
                    &body,
                )],
            };
            let json = env.to_json();
            let ctx = Context {
                agent_id: AgentId::new(agent_id.clone()).map_err(usage)?,
                node: node.clone(),
                now: now(),
                scratch_vmids: None,
            };
            verify_desired(
                json.as_bytes(),
                &self_trust(&keyid_or(&keyid), &signing)?,
                &ctx,
            )
            .map_err(SignError::SelfCheck)?;
            println!("{json}");
            Ok(())
        }
    }
}

/// A keyid usable as a signers.json name for the self-check (any hint is allowed on the
/// wire; the self-check trust needs a valid name).
fn keyid_or(keyid: &str) -> String {
    let ok = !keyid.is_empty()
        && keyid.len() <= 64
        && keyid
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'@' | b'+' | b'-'));
    if ok {
        keyid.to_string()
    } else {
        "self".to_string()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("felhom-sign: {e}");
            ExitCode::from(1)
        }
    }
}
