//! Keys and authenticated encryption. AES-256-GCM with a fresh random 96-bit nonce per object; every
//! object binds its kind and name as associated data.

use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use zeroize::Zeroizing;

use crate::config::KdfParams;
use crate::format::{
    KDF_CONTEXT_CONFIG_MAC, KDF_CONTEXT_DATA, KDF_CONTEXT_ID, KDF_CONTEXT_META, NONCE_LEN, TAG_LEN,
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
///
/// ring's implementation, whose GHASH and AES run interleaved in wide vector registers, decrypts
/// at several times the speed of the `aes-gcm` crate on the same core (docs/BENCHMARKS.md,
/// "Verify at the decoder's speed"); the bytes are the same, which a test checks against
/// `aes-gcm`.
#[derive(Clone)]
pub(crate) struct SealKey(LessSafeKey);

impl SealKey {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        let key = UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key suits AES-256-GCM");
        Self(LessSafeKey::new(key))
    }

    /// Encrypts `plaintext`, appending `nonce || ciphertext || tag` to `out`.
    pub(crate) fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        out.reserve(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .0
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[start..],
            )
            .expect("AES-GCM encryption cannot fail for in-memory buffers under 64 GiB");
        out.extend_from_slice(tag.as_ref());
    }

    pub(crate) fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_into(aad, plaintext, &mut out);
        out
    }

    /// Decrypts `nonce || ciphertext || tag`; `None` when authentication fails.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let mut copy = sealed.to_vec();
        let len = self.open_in_place(aad, &mut copy)?.len();
        copy.drain(..NONCE_LEN);
        copy.truncate(len);
        Some(copy)
    }

    /// Decrypts `nonce || ciphertext || tag` where it lies, without allocating; returns the
    /// plaintext (a part of `sealed`), or `None` when authentication fails (then `sealed` holds
    /// garbage).
    pub(crate) fn open_in_place<'a>(&self, aad: &[u8], sealed: &'a mut [u8]) -> Option<&'a [u8]> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self.0.open_in_place(nonce, Aad::from(aad), rest).ok()?;
        Some(plain)
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

    /// The objects are AES-256-GCM as any other implementation writes it: the `aes-gcm` crate
    /// opens what this module seals, and this module opens what `aes-gcm` seals, so repositories
    /// written before or by another program stay readable.
    #[test]
    fn same_bytes_as_another_aes_gcm() {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let key = [0x5a; 32];
        let ours = SealKey::new(&key);
        let other = aes_gcm::Aes256Gcm::new((&key).into());
        let mut plain = vec![0u8; 100_003];
        rand::thread_rng().fill_bytes(&mut plain);
        for msg in [&plain[..], b"", b"x"] {
            let sealed = ours.seal(b"label\0name", msg);
            let (nonce, ct) = sealed.split_at(NONCE_LEN);
            let opened = other
                .decrypt(
                    nonce.into(),
                    Payload {
                        msg: ct,
                        aad: b"label\0name",
                    },
                )
                .expect("aes-gcm opens what ring sealed");
            assert_eq!(opened, msg);

            let nonce = [7u8; NONCE_LEN];
            let ct = other
                .encrypt((&nonce).into(), Payload { msg, aad: b"aad" })
                .unwrap();
            let mut theirs = nonce.to_vec();
            theirs.extend_from_slice(&ct);
            assert_eq!(ours.open(b"aad", &theirs).unwrap(), msg);
            assert!(ours.open(b"other", &theirs).is_none());
        }
    }
}
