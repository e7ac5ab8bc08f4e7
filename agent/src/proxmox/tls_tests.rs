//! The client against a real TLS server on loopback (rcgen certificates, tokio-rustls,
//! hand-written HTTP/1.1 so the status line's reason phrase is exactly what old PVE sends).
//! Covers pin / CA file / insecure / wrong pin, connection reuse, the Authorization header,
//! UPID encoding, form bodies, reason-phrase errors, decode errors and wait_task.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use felhom_protocol::Vmid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::*;
use crate::config::{ProxmoxConfig, Secret, TlsVerify};
use crate::proxmox::GuestPermit;
use crate::tls::TlsProblem;

const TOKEN_ID: &str = "felhom@pve!agent";
const TOKEN_SECRET: &str = "5f0c2c33-1c8e-4a4e-8d51-token-secret";

struct Pki {
    ca_pem: String,
    leaf_der: CertificateDer<'static>,
    leaf_key: Vec<u8>,
}

fn pki() -> Pki {
    pki_with("Test PVE Root CA", |_| {})
}

/// A CA named `ca_name` and a leaf for 127.0.0.1 and localhost, changed by `tweak`.
fn pki_with(ca_name: &str, tweak: impl FnOnce(&mut rcgen::CertificateParams)) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    tweak(&mut leaf_params);
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        leaf_der: leaf.der().clone(),
        leaf_key: leaf_key.serialize_der(),
    }
}

/// A self-signed CA certificate used as the server's own, as `openssl req -x509` makes.
fn ca_as_server() -> Pki {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pve1");
    let cert = params.self_signed(&key).unwrap();
    Pki {
        ca_pem: cert.pem(),
        leaf_der: cert.der().clone(),
        leaf_key: key.serialize_der(),
    }
}

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    /// Path and query exactly as sent.
    target: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Reply {
    status: u16,
    reason: String,
    body: String,
    delay: Duration,
}

fn ok(data: &str) -> Reply {
    Reply {
        status: 200,
        reason: "OK".into(),
        body: format!("{{\"data\":{data}}}"),
        delay: Duration::ZERO,
    }
}

fn status(status: u16, reason: &str, body: &str) -> Reply {
    Reply {
        status,
        reason: reason.into(),
        body: body.into(),
        delay: Duration::ZERO,
    }
}

type Handler = dyn Fn(&Recorded) -> Reply + Send + Sync;

struct Server {
    port: u16,
    pki: Pki,
    requests: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
}

impl Server {
    async fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Server {
        Server::start_with(pki(), handler).await
    }

    /// A server presenting `pki`'s leaf certificate.
    async fn start_with(
        pki: Pki,
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Server {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.leaf_key.clone()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![pki.leaf_der.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        {
            let requests = requests.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let acceptor = acceptor.clone();
                    let handler = handler.clone();
                    let requests = requests.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        serve(tls, handler, requests).await;
                    });
                }
            });
        }
        Server {
            port,
            pki,
            requests,
            connections,
        }
    }

    fn config(&self, tls: TlsVerify) -> ProxmoxConfig {
        ProxmoxConfig {
            url: format!("https://127.0.0.1:{}", self.port),
            token_id: TOKEN_ID.to_string(),
            token_secret: Secret::new(TOKEN_SECRET),
            tls,
        }
    }

    fn pin(&self) -> TlsVerify {
        TlsVerify::PinSha256(fingerprint(self.pki.leaf_der.as_ref()))
    }

    fn client(&self) -> Client {
        Client::new(&self.config(self.pin()), "pve1").unwrap()
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve<S>(stream: S, handler: Arc<Handler>, requests: Arc<Mutex<Vec<Recorded>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut stream = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.trim_end().splitn(3, ' ');
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if stream.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        let rec = Recorded {
            method,
            target,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        requests.lock().unwrap().push(rec.clone());
        let reply = handler(&rec);
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        let head = format!(
            "HTTP/1.1 {} {}\r\nServer: pve-api-daemon/3.0\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\n\r\n",
            reply.status,
            reply.reason,
            reply.body.len()
        );
        let inner = stream.get_mut();
        if inner.write_all(head.as_bytes()).await.is_err()
            || inner.write_all(reply.body.as_bytes()).await.is_err()
            || inner.flush().await.is_err()
        {
            return;
        }
    }
}

const VERSION: &str = r#"{"release":"8.0","repoid":"bbf3993334bfa916","version":"8.0.3"}"#;

fn version_only(r: &Recorded) -> Reply {
    if r.target == "/api2/json/version" {
        ok(VERSION)
    } else {
        status(501, "Method not implemented", r#"{"data":null}"#)
    }
}

#[tokio::test]
async fn pin_verifies_and_connections_are_reused() {
    let server = Server::start(version_only).await;
    let client = server.client();
    for _ in 0..5 {
        let v = client.version().await.unwrap();
        assert_eq!(v.version, "8.0.3");
    }
    // A clone shares the pool.
    client.clone().version().await.unwrap();
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 6);
    assert_eq!(
        reqs[0].header("authorization"),
        Some(format!("PVEAPIToken={TOKEN_ID}={TOKEN_SECRET}").as_str())
    );
    // The Debug form of the client names the token id but not the secret.
    let dbg = format!("{client:?}");
    assert!(
        dbg.contains(TOKEN_ID) && !dbg.contains(TOKEN_SECRET),
        "{dbg}"
    );
}

#[tokio::test]
async fn wrong_pin_names_expected_and_seen() {
    let server = Server::start(version_only).await;
    let wrong = [0x11u8; 32];
    let client = Client::new(&server.config(TlsVerify::PinSha256(wrong)), "pve1").unwrap();
    let e = client.version().await.unwrap_err();
    let ProxmoxError::PinMismatch { expected, seen, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(expected, &crate::config::format_fingerprint(&wrong));
    assert_eq!(
        seen,
        &crate::config::format_fingerprint(&fingerprint(server.pki.leaf_der.as_ref()))
    );
    let msg = e.to_string();
    assert!(
        msg.contains(expected.as_str()) && msg.contains(seen.as_str()),
        "{msg}"
    );
    assert!(!msg.contains(TOKEN_SECRET));
    assert!(msg.contains("proxmox.tls.pin_sha256"), "{msg}");
    assert!(e.is_config_problem());
    // Nothing reached the HTTP layer.
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn ca_file_verifies_and_a_foreign_ca_is_refused() {
    let server = Server::start(version_only).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("pve-root-ca.pem");
    std::fs::write(&ca, &server.pki.ca_pem).unwrap();
    let client = Client::new(&server.config(TlsVerify::CaFile(ca)), "pve1").unwrap();
    assert_eq!(client.version().await.unwrap().release, "8.0");

    let other = pki();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.ca_pem).unwrap();
    let client = Client::new(&server.config(TlsVerify::CaFile(other_ca)), "pve1").unwrap();
    let e = client.version().await.unwrap_err();
    // Both test CAs share a name, so webpki finds "an issuer" and the signature fails.
    assert_eq!(problem(&e), TlsProblem::BadSignature, "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("regenerated"), "{msg}");
    assert!(msg.contains("proxmox.tls.ca_file"), "{msg}");
    assert!(e.is_config_problem() && !e.is_unreachable());

    // A CA file that is missing, not PEM, or empty is a setup error, before any
    // connection, naming the file, the key and the fix.
    let missing = dir.path().join("missing.pem");
    let junk = dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate").unwrap();
    for (file, cause) in [
        (&missing, "cannot read the CA file"),
        (&junk, "is not valid PEM"),
        (&empty, "holds no certificate"),
    ] {
        let e = Client::new(&server.config(TlsVerify::CaFile(file.clone())), "pve1").unwrap_err();
        assert!(matches!(e, ProxmoxError::Setup(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(cause), "{msg}");
        assert!(msg.contains(&file.display().to_string()), "{msg}");
        assert!(
            msg.contains("proxmox.tls.ca_file") && msg.contains("fix:"),
            "{msg}"
        );
    }
}

/// The TLS problem of a Proxmox error; panics on any other error.
fn problem(e: &ProxmoxError) -> TlsProblem {
    match e {
        ProxmoxError::Tls { failure, .. } => failure.problem.clone(),
        ProxmoxError::PinMismatch { expected, seen, .. } => TlsProblem::PinMismatch {
            expected: expected.clone(),
            seen: seen.clone(),
        },
        other => panic!("not a TLS failure: {other:?}"),
    }
}

/// Connects with a CA file holding `pki`'s CA to a server presenting its leaf.
async fn refused_with_ca_file(pki: Pki) -> ProxmoxError {
    let ca_pem = pki.ca_pem.clone();
    let server = Server::start_with(pki, version_only).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let e = Client::new(&server.config(TlsVerify::CaFile(ca)), "pve1")
        .unwrap()
        .version()
        .await
        .unwrap_err();
    assert!(
        server.requests().is_empty(),
        "nothing may reach the HTTP layer"
    );
    assert!(e.is_config_problem() && !e.is_unreachable(), "{e:?}");
    let msg = e.to_string();
    assert!(!msg.contains(TOKEN_SECRET), "{msg}");
    assert!(!msg.contains("OtherError"), "{msg}");
    e
}

#[tokio::test]
async fn a_ca_certificate_used_as_the_server_certificate_is_explained_and_pinnable() {
    // What `openssl req -x509` makes: one self-signed certificate with CA:TRUE.
    let e = refused_with_ca_file(ca_as_server()).await;
    assert_eq!(problem(&e), TlsProblem::CaUsedAsEndEntity, "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("presented a CA certificate"), "{msg}");
    assert!(
        msg.contains("leaf") && msg.contains("signed by that CA"),
        "{msg}"
    );
    assert!(msg.contains("proxmox.tls.pin_sha256"), "{msg}");

    // The fix works: the same server, pinned.
    let server = Server::start_with(ca_as_server(), version_only).await;
    let client = Client::new(&server.config(server.pin()), "pve1").unwrap();
    assert_eq!(client.version().await.unwrap().version, "8.0.3");
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_is_explained() {
    let server = Server::start(version_only).await;
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.pem");
    std::fs::write(&other, pki_with("Another Root CA", |_| {}).ca_pem).unwrap();
    let e = Client::new(&server.config(TlsVerify::CaFile(other)), "pve1")
        .unwrap()
        .version()
        .await
        .unwrap_err();
    assert_eq!(problem(&e), TlsProblem::UnknownIssuer, "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("not signed by a CA the agent trusts"), "{msg}");
    assert!(
        msg.contains("proxmox.tls.ca_file") && msg.contains("pvenode cert info"),
        "{msg}"
    );
}

#[tokio::test]
async fn an_expired_or_not_yet_valid_certificate_is_explained() {
    let now = time::OffsetDateTime::now_utc();
    let e = refused_with_ca_file(pki_with("Test PVE Root CA", |p| {
        p.not_before = now - time::Duration::days(30);
        p.not_after = now - time::Duration::days(2);
    }))
    .await;
    assert!(
        matches!(problem(&e), TlsProblem::Expired { not_after: Some(_) }),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("has expired (valid until"), "{msg}");
    assert!(msg.contains("pvecm updatecerts"), "{msg}");

    let e = refused_with_ca_file(pki_with("Test PVE Root CA", |p| {
        p.not_before = now + time::Duration::days(2);
        p.not_after = now + time::Duration::days(30);
    }))
    .await;
    assert!(
        matches!(
            problem(&e),
            TlsProblem::NotYetValid {
                not_before: Some(_)
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("clock"), "{e}");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_explained() {
    let e = refused_with_ca_file(pki_with("Test PVE Root CA", |p| {
        p.subject_alt_names = vec![rcgen::SanType::DnsName("pve1.example".try_into().unwrap())];
    }))
    .await;
    let TlsProblem::NameMismatch {
        expected,
        presented,
    } = problem(&e)
    else {
        panic!("{e:?}")
    };
    assert_eq!(expected, "127.0.0.1");
    assert_eq!(presented, ["pve1.example"]);
    let msg = e.to_string();
    assert!(msg.contains("not issued for \"127.0.0.1\""), "{msg}");
    assert!(
        msg.contains("pve1.example") && msg.contains("proxmox.url"),
        "{msg}"
    );
    assert!(msg.contains("IP address"), "{msg}");
}

#[tokio::test]
async fn a_certificate_not_for_servers_is_explained() {
    let e = refused_with_ca_file(pki_with("Test PVE Root CA", |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    }))
    .await;
    assert_eq!(problem(&e), TlsProblem::NotForServers, "{e:?}");
    assert!(e.to_string().contains("serverAuth"), "{e}");
}

/// A TCP server on loopback that reads the client's first bytes, writes `answer` and
/// closes: a TLS peer that refuses the ClientHello, or a port that is not TLS at all.
async fn raw_server(answer: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 512];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp.write_all(answer).await;
            let _ = tcp.shutdown().await;
        }
    });
    port
}

#[tokio::test]
async fn a_refused_handshake_and_a_port_without_tls_are_explained() {
    // A fatal handshake_failure alert, what OpenSSL sends when no cipher is shared.
    let port = raw_server(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]).await;
    let mut cfg = Server::start(version_only)
        .await
        .config(TlsVerify::Insecure);
    cfg.url = format!("https://127.0.0.1:{port}");
    let e = Client::new(&cfg, "pve1")
        .unwrap()
        .version()
        .await
        .unwrap_err();
    assert!(matches!(problem(&e), TlsProblem::Handshake { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("HandshakeFailure") && msg.contains("TLS 1.2"),
        "{msg}"
    );
    assert!(!e.is_unreachable(), "{e:?}");

    // A protocol_version alert: the server wants a TLS version we do not speak.
    let port = raw_server(&[0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46]).await;
    cfg.url = format!("https://127.0.0.1:{port}");
    let e = Client::new(&cfg, "pve1")
        .unwrap()
        .version()
        .await
        .unwrap_err();
    assert!(matches!(problem(&e), TlsProblem::Handshake { .. }), "{e:?}");
    assert!(e.to_string().contains("ProtocolVersion"), "{e}");

    // Plain HTTP on the port.
    let port = raw_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
    cfg.url = format!("https://127.0.0.1:{port}");
    let e = Client::new(&cfg, "pve1")
        .unwrap()
        .version()
        .await
        .unwrap_err();
    assert!(matches!(problem(&e), TlsProblem::NotTls { .. }), "{e:?}");
    assert!(e.to_string().contains("plain HTTP"), "{e}");
}

#[tokio::test]
async fn insecure_accepts_any_certificate() {
    let server = Server::start(version_only).await;
    let client = Client::new(&server.config(TlsVerify::Insecure), "pve1").unwrap();
    assert_eq!(client.version().await.unwrap().version, "8.0.3");
}

#[tokio::test]
async fn errors_from_the_reason_phrase_of_old_pve() {
    let server = Server::start(|r: &Recorded| match r.target.as_str() {
        "/api2/json/nodes/pve1/status" => status(
            403,
            "Permission check failed (/nodes/pve1, Sys.Audit)",
            r#"{"data":null}"#,
        ),
        "/api2/json/nodes/pve1/lxc/101/status/start" => {
            status(500, "CT 101 already running", r#"{"data":null}"#)
        }
        "/api2/json/nodes" => status(401, "invalid token value!", ""),
        "/api2/json/nodes/pve1/storage" => ok(r#"{"not":"a list"}"#),
        _ => status(501, "Method not implemented", r#"{"data":null}"#),
    })
    .await;
    let client = server.client();

    let e = client.node_status().await.unwrap_err();
    let ProxmoxError::PermissionDenied { denied, endpoint } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(endpoint, "GET /nodes/pve1/status");
    assert_eq!(denied.path.as_deref(), Some("/nodes/pve1"));
    assert_eq!(denied.privileges, vec!["Sys.Audit"]);
    assert!(
        e.to_string().contains("grant Sys.Audit on /nodes/pve1"),
        "{e}"
    );

    let permit = GuestPermit::for_test(Vmid::new(101).unwrap());
    let e = client.start(&permit, GuestKind::Lxc).await.unwrap_err();
    assert!(
        matches!(&e, ProxmoxError::Api { status: 500, message, .. } if message == "CT 101 already running"),
        "{e:?}"
    );

    let e = client.nodes().await.unwrap_err();
    assert!(
        matches!(&e, ProxmoxError::Unauthorized { reason, .. } if reason == "invalid token value!"),
        "{e:?}"
    );
    assert!(!e.to_string().contains(TOKEN_SECRET));

    let e = client.storages().await.unwrap_err();
    let ProxmoxError::Decode { endpoint, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(endpoint, "GET /nodes/pve1/storage");
}

#[tokio::test]
async fn mutations_encode_paths_and_forms() {
    let server = Server::start(|r: &Recorded| {
        let upid = |t: &str| {
            format!("\"UPID:pve1:0003F2A1:01B3C4D5:66A1B2C3:{t}:101:felhom@pve!agent:\"")
        };
        match (r.method.as_str(), r.target.as_str()) {
            ("PUT", "/api2/json/nodes/pve1/lxc/101/config") => ok("null"),
            ("POST", "/api2/json/nodes/pve1/qemu/101/config") => ok(&upid("qmconfig")),
            ("POST", "/api2/json/nodes/pve1/vzdump") if r.body.contains("storage=nowhere") => {
                ok("\"OK\"")
            }
            ("POST", "/api2/json/nodes/pve1/vzdump") => ok(&upid("vzdump")),
            ("POST", "/api2/json/nodes/pve1/lxc/101/snapshot/s1/rollback") => {
                ok(&upid("vzrollback"))
            }
            ("DELETE", t) if t.starts_with("/api2/json/nodes/pve1/lxc/101/snapshot/s1") => {
                ok(&upid("vzdelsnapshot"))
            }
            ("POST", "/api2/json/nodes/pve1/lxc/101/status/shutdown") => ok(&upid("vzshutdown")),
            ("POST", "/api2/json/nodes/pve1/lxc") => ok(&upid("vzrestore")),
            (_, t) if t.starts_with("/api2/json/nodes/pve1/tasks/") => ok(
                r#"{"upid":"x","node":"pve1","pid":1,"pstart":1,"starttime":1,"type":"vzdump","id":"101","user":"felhom@pve","tokenid":"agent","status":"stopped","exitstatus":"OK"}"#,
            ),
            _ => status(501, "Method not implemented", r#"{"data":null}"#),
        }
    })
    .await;
    let client = server.client();
    let permit = GuestPermit::for_test(Vmid::new(101).unwrap());

    let change = ConfigChange::new()
        .set("onboot", true)
        .set("memory", 1024)
        .set("description", "a b&c")
        .delete("tags");
    assert_eq!(
        client
            .set_config(&permit, GuestKind::Lxc, &change)
            .await
            .unwrap(),
        SetConfigOutcome::Applied
    );
    let SetConfigOutcome::Task(u) = client
        .set_config(&permit, GuestKind::Qemu, &change)
        .await
        .unwrap()
    else {
        panic!("QEMU config is a task")
    };
    assert_eq!(u.task_type(), "qmconfig");

    let opts = VzdumpOptions {
        storage: Some("local".into()),
        mode: Some(VzdumpMode::Snapshot),
        compress: Some(VzdumpCompress::Zstd),
        ..Default::default()
    };
    assert!(matches!(
        client.vzdump(&permit, &opts).await.unwrap(),
        VzdumpOutcome::Task(u) if u.task_type() == "vzdump"
    ));
    let nothing = VzdumpOptions {
        storage: Some("nowhere".into()),
        ..Default::default()
    };
    assert_eq!(
        client.vzdump(&permit, &nothing).await.unwrap(),
        VzdumpOutcome::NothingToDo
    );

    let s1 = SnapshotName::new("s1").unwrap();
    client
        .snapshot_rollback(&permit, GuestKind::Lxc, &s1, true)
        .await
        .unwrap();
    client
        .snapshot_delete(&permit, GuestKind::Lxc, &s1, true)
        .await
        .unwrap();
    client
        .shutdown(&permit, GuestKind::Lxc, Duration::from_secs(30), true)
        .await
        .unwrap();
    let restore = RestoreOptions {
        archive: "local:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst".into(),
        storage: Some("local-lvm".into()),
        force: true,
        ..Default::default()
    };
    let u = client.lxc_restore(&permit, &restore).await.unwrap();
    assert_eq!(u.task_type(), "vzrestore");
    client.task_status(&u).await.unwrap();

    let reqs = server.requests();
    // Exact target, or a prefix when it ends in '/' or '?'.
    let find = |m: &str, target: &str| {
        reqs.iter()
            .find(|r| {
                r.method == m
                    && (r.target == target
                        || ((target.ends_with('/') || target.ends_with('?'))
                            && r.target.starts_with(target)))
            })
            .unwrap_or_else(|| panic!("no {m} {target}"))
            .clone()
    };
    let put = find("PUT", "/api2/json/nodes/pve1/lxc/101/config");
    assert_eq!(
        put.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert!(put.body.contains("onboot=1"), "{}", put.body);
    assert!(put.body.contains("memory=1024"), "{}", put.body);
    assert!(put.body.contains("description=a+b%26c"), "{}", put.body);
    assert!(put.body.contains("delete=tags"), "{}", put.body);
    let dump = find("POST", "/api2/json/nodes/pve1/vzdump");
    assert!(dump.body.contains("vmid=101"), "{}", dump.body);
    assert!(dump.body.contains("compress=zstd"), "{}", dump.body);
    let rb = find("POST", "/api2/json/nodes/pve1/lxc/101/snapshot/s1/rollback");
    assert_eq!(rb.body, "start=1");
    // DELETE carries its parameters in the query (PVE refuses a body there).
    let del = find("DELETE", "/api2/json/nodes/pve1/lxc/101/snapshot/s1?");
    assert_eq!(
        del.target,
        "/api2/json/nodes/pve1/lxc/101/snapshot/s1?force=1"
    );
    assert!(del.body.is_empty());
    let sd = find("POST", "/api2/json/nodes/pve1/lxc/101/status/shutdown");
    assert_eq!(sd.body, "timeout=30&forceStop=1");
    let rs = find("POST", "/api2/json/nodes/pve1/lxc");
    assert!(
        rs.body.contains("restore=1")
            && rs.body.contains("force=1")
            && rs
                .body
                .contains("ostemplate=local%3Abackup%2Fvzdump-lxc-101"),
        "{}",
        rs.body
    );
    // The UPID is percent-encoded in the path.
    let ts = find("GET", "/api2/json/nodes/pve1/tasks/");
    assert!(
        ts.target.contains("UPID%3Apve1%3A0003F2A1%3A01B3C4D5%3A66A1B2C3%3Avzrestore%3A101%3Afelhom%40pve%21agent%3A/status"),
        "{}",
        ts.target
    );
}

#[tokio::test]
async fn wait_task_polls_until_stopped_and_judges_the_exit() {
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let server = Server::start(move |r: &Recorded| {
        let running = r#"{"upid":"x","node":"pve1","pid":1,"pstart":1,"starttime":1,"type":"vzstart","id":"101","user":"felhom@pve","status":"running"}"#;
        let stopped = |exit: &str| {
            format!(
                r#"{{"upid":"x","node":"pve1","pid":1,"pstart":1,"starttime":1,"type":"vzstart","id":"101","user":"felhom@pve","status":"stopped","exitstatus":"{exit}"}}"#
            )
        };
        if r.target.contains("vzstart") {
            let n = p.fetch_add(1, Ordering::SeqCst);
            if n < 3 { ok(running) } else { ok(&stopped("WARNINGS: 2")) }
        } else if r.target.contains("vzdump") {
            ok(&stopped("Permission check failed (/vms/101, VM.Backup)"))
        } else if r.target.contains("vzstop") {
            ok(running)
        } else {
            status(400, "Parameter verification failed.", r#"{"data":null,"errors":{"upid":"no such task"}}"#)
        }
    })
    .await;
    let client = server.client();
    let fast = WaitOptions {
        timeout: Duration::from_secs(10),
        initial_interval: Duration::from_millis(10),
        max_interval: Duration::from_millis(20),
    };
    let upid = |t: &str| -> Upid {
        format!("UPID:pve1:0003F2A1:01B3C4D5:66A1B2C3:{t}:101:felhom@pve!agent:")
            .parse()
            .unwrap()
    };
    let done = client.wait_task(&upid("vzstart"), fast).await.unwrap();
    assert_eq!(done.warnings, Some(2));
    assert_eq!(polls.load(Ordering::SeqCst), 4);

    let e = client.wait_task(&upid("vzdump"), fast).await.unwrap_err();
    let ProxmoxError::TaskFailed { permission, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(permission.as_ref().unwrap().privileges, vec!["VM.Backup"]);
    let msg = e.to_string();
    assert!(msg.contains("task vzdump on guest 101 failed"), "{msg}");
    assert!(msg.contains("grant VM.Backup on /vms/101"), "{msg}");

    let e = client
        .wait_task(
            &upid("vzstop"),
            WaitOptions {
                timeout: Duration::from_millis(100),
                ..fast
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ProxmoxError::TaskTimeout { .. }), "{e:?}");

    let e = client.wait_task(&upid("vzcreate"), fast).await.unwrap_err();
    assert!(
        matches!(&e, ProxmoxError::Api { status: 400, errors, .. } if errors["upid"] == "no such task"),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_slow_answer_is_a_timeout_and_a_closed_port_is_unreachable() {
    let server = Server::start(|_r: &Recorded| Reply {
        delay: Duration::from_secs(5),
        ..ok(VERSION)
    })
    .await;
    let client = Client::with_timeout(
        &server.config(server.pin()),
        "pve1",
        Duration::from_millis(200),
    )
    .unwrap();
    let e = client.version().await.unwrap_err();
    assert!(matches!(e, ProxmoxError::Timeout { .. }), "{e:?}");
    assert!(e.is_unreachable());

    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = server.config(TlsVerify::Insecure);
    cfg.url = format!("https://127.0.0.1:{port}");
    let e = Client::new(&cfg, "pve1")
        .unwrap()
        .version()
        .await
        .unwrap_err();
    assert!(matches!(e, ProxmoxError::Transport { .. }), "{e:?}");
    assert!(e.is_unreachable());
    let msg = e.to_string();
    assert!(
        msg.contains("connection refused") && msg.contains("pveproxy"),
        "{msg}"
    );
    assert!(!msg.contains("TLS"), "{msg}");
}
