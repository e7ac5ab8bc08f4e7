//! Operator key files: Ed25519 private keys as PKCS#8 PEM.
//!
//! Owns: generating a key from the OS CSPRNG, writing it 0600 in the exact form
//! `openssl genpkey -algorithm ed25519` writes (PKCS#8 v1, `PRIVATE KEY`, no public key),
//! and reading that form and the v2 form (with the public key, which must match).
//! Must never: overwrite an existing key file, write a key readable by others, or put key
//! bytes in an error message.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};
use ring::rand::{SecureRandom, SystemRandom};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an Ed25519 PKCS#8 PEM private key ({reason})")]
    Format { path: PathBuf, reason: String },
    #[error("the operating system's random number generator failed")]
    Random,
    #[error("could not encode the key as PKCS#8 PEM")]
    Encode,
}

/// Fills `buf` from the OS CSPRNG.
pub fn random(buf: &mut [u8]) -> Result<(), KeyFileError> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| KeyFileError::Random)
}

/// A new key from 32 random bytes.
pub fn generate() -> Result<SigningKey, KeyFileError> {
    let mut seed = [0u8; 32];
    random(&mut seed)?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    Ok(key)
}

/// PKCS#8 v1 PEM of the key (what openssl writes).
pub fn to_pem(key: &SigningKey) -> Result<String, KeyFileError> {
    let bytes = KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    };
    bytes
        .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map(|s| s.to_string())
        .map_err(|_| KeyFileError::Encode)
}

/// Writes a new key file, mode 0600; refuses to replace an existing file.
pub fn write_new(path: &Path, key: &SigningKey) -> Result<(), KeyFileError> {
    let pem = to_pem(key)?;
    let io = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(pem.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

/// Reads a PKCS#8 PEM Ed25519 private key (v1 as openssl writes it, or v2 with a matching
/// public key).
pub fn read(path: &Path) -> Result<SigningKey, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyFileError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
