//! Keys and authenticated encryption. AES-256-GCM with a fresh random 96-bit nonce per object; every
//! object binds its kind and name as associated data.

use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::config::KdfParams;
use crate::format::{
    KDF_CONTEXT_CONFIG_MAC, KDF_CONTEXT_DATA, KDF_CONTEXT_ID, KDF_CONTEXT_META, NONCE_LEN,
};
use crate::{ChunkHasher, Error, Result};

/// The random 256-bit secret from which every other key is derived.
pub(crate) type MasterKey = Zeroizing<[u8; 32]>;

pub(crate) fn random_master_key() -> MasterKey {
    let mut k = Zeroizing::new([0u8; 32]);
    rand::thread_rng().fill_bytes(k.as_mut());
    k
}

/// Derives the key-encryption key from the password with Argon2id.
pub(crate) fn derive_kek(password: &[u8], kdf: &KdfParams) -> Result<Zeroizing<[u8; 32]>> {
    // Every derivation is bounded, whatever the parameters' origin (config, command line).
    kdf.check_bounds()
        .map_err(|e| Error::Invalid(format!("Argon2id parameters: {e}")))?;
    let params = argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32))
        .map_err(|e| Error::Invalid(format!("Argon2id parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(password, &kdf.salt_bytes()?, out.as_mut())
        .map_err(|e| Error::Invalid(format!("Argon2id: {e}")))?;
    Ok(out)
}

/// An AES-256-GCM key with the nonce handling every object uses: `nonce || ciphertext || tag`.
#[derive(Clone)]
pub(crate) struct SealKey(Aes256Gcm);

impl SealKey {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        Self(Aes256Gcm::new(key.into()))
    }

    /// Encrypts `plaintext`, appending `nonce || ciphertext || tag` to `out`.
    pub(crate) fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .0
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("AES-GCM encryption cannot fail for in-memory buffers under 64 GiB");
        out.reserve(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
    }

    pub(crate) fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_into(aad, plaintext, &mut out);
        out
    }

    /// Decrypts `nonce || ciphertext || tag`; `None` when authentication fails.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.0
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .ok()
    }

    /// Decrypts `nonce || ciphertext || tag` where it lies, without allocating; returns the
    /// plaintext (a part of `sealed`), or `None` when authentication fails (then `sealed` holds
    /// garbage).
    pub(crate) fn open_in_place<'a>(&self, aad: &[u8], sealed: &'a mut [u8]) -> Option<&'a [u8]> {
        if sealed.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
        let (ct, tag) = rest.split_at_mut(rest.len() - 16);
        self.0
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                aad,
                ct,
                aes_gcm::Tag::from_slice(tag),
            )
            .ok()?;
        Some(ct)
    }
}

/// The subkeys of one repository.
#[derive(Clone)]
pub(crate) struct Keys {
    pub(crate) hasher: ChunkHasher,
    pub(crate) data: SealKey,
    pub(crate) meta: SealKey,
    pub(crate) config_mac: Zeroizing<[u8; 32]>,
}

impl Keys {
    pub(crate) fn derive(master: &MasterKey) -> Self {
        let sub = |ctx: &str| Zeroizing::new(blake3::derive_key(ctx, master.as_ref()));
        Self {
            hasher: ChunkHasher::new(*sub(KDF_CONTEXT_ID)),
            data: SealKey::new(&sub(KDF_CONTEXT_DATA)),
            meta: SealKey::new(&sub(KDF_CONTEXT_META)),
            config_mac: sub(KDF_CONTEXT_CONFIG_MAC),
        }
    }
}

/// Builds associated data from a label and the object's name parts.
pub(crate) fn aad(label: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(label.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    v.extend_from_slice(label);
    for p in parts {
        v.push(0);
        v.extend_from_slice(p);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let k = SealKey::new(&[9; 32]);
        let s = k.seal(b"a", b"secret");
        assert_eq!(k.open(b"a", &s).unwrap(), b"secret");
        assert!(
            k.open(b"b", &s).is_none(),
            "other associated data must fail"
        );
        let mut t = s.clone();
        t[14] ^= 1;
        assert!(k.open(b"a", &t).is_none(), "flipped bit must fail");
        assert!(k.open(b"a", &s[..10]).is_none());
        assert_ne!(k.seal(b"a", b"secret"), s, "nonces are fresh");
    }
}
