//! Sealing the pool CA's private key before it goes into the database:
//! AES-256-GCM under a key read from a file (`--store-key-file`, 64 hex
//! digits), a fresh random nonce per seal. Whoever reads the database
//! without that file learns the CA certificate, not its key.

use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// Bound to what is sealed: a sealed CA key opens as nothing else.
const AAD: &[u8] = b"berth pool CA key v1";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read the store key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: expected 64 hex digits (32 bytes, e.g. `openssl rand -hex 32`)")]
    BadKey(PathBuf),
    #[error("no random nonce could be drawn")]
    Random,
    #[error(
        "the sealed CA key in the database does not open with this store key file (another pool's key, or a changed file?)"
    )]
    Open,
}

/// The key that seals and opens.
pub struct SealKey(LessSafeKey);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

fn hex_byte(s: &[u8]) -> Option<u8> {
    let d = |c: u8| (c as char).to_digit(16);
    u8::try_from(d(s[0])? * 16 + d(s[1])?).ok()
}

impl SealKey {
    /// Reads the key from `path` (64 hex digits, surrounding space ignored).
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let text = std::fs::read_to_string(path).map_err(|source| SealError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_hex(text.trim()).ok_or_else(|| SealError::BadKey(path.to_owned()))
    }

    pub fn from_hex(hex: &str) -> Option<Self> {
        let b = hex.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let bytes: Vec<u8> = b.chunks(2).map(hex_byte).collect::<Option<_>>()?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).ok()?;
        Some(Self(LessSafeKey::new(key)))
    }

    /// nonce || ciphertext || tag.
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut buf = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                &mut buf,
            )
            .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut buf = rest.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(AAD), &mut buf)
            .map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_opens_with_its_key_only() {
        let k = SealKey::from_hex(&"ab".repeat(32)).unwrap();
        let other = SealKey::from_hex(&"cd".repeat(32)).unwrap();
        let sealed = k.seal(b"-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"BEGIN"));
        assert_eq!(k.open(&sealed).unwrap(), b"-----BEGIN PRIVATE KEY-----");
        assert!(matches!(other.open(&sealed), Err(SealError::Open)));
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(k.open(&tampered), Err(SealError::Open)));
        // Two seals of the same key differ (fresh nonce).
        assert_ne!(k.seal(b"x").unwrap(), k.seal(b"x").unwrap());
    }

    #[test]
    fn key_files_must_hold_64_hex_digits() {
        assert!(SealKey::from_hex(&"ab".repeat(31)).is_none());
        assert!(SealKey::from_hex(&"zz".repeat(32)).is_none());
        assert!(SealKey::from_hex(&"AB".repeat(32)).is_some());
    }
}
