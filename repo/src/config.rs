//! The `config` object: the only plaintext object of a repository. It holds the parameters needed
//! to unlock the master key and a MAC (under a key derived from the master key) over everything
//! else, so an altered chunk size or id is detected once the password has unlocked the key.

use serde::{Deserialize, Serialize};

use crate::crypto::{aad, derive_kek, Keys, MasterKey, SealKey};
use crate::format::{AAD_KEY_WRAP, CONFIG_FORMAT, CONFIG_PATH, REPO_VERSION};
use crate::{Error, Result};

/// Largest Argon2id memory cost accepted, in KiB (1 GiB).
pub const KDF_MAX_MEMORY_KIB: u32 = 1 << 20;
/// Smallest memory cost accepted (8 MiB; the tests use it, real repositories use 64 MiB).
pub const KDF_MIN_MEMORY_KIB: u32 = 8 * 1024;
pub const KDF_MAX_ITERATIONS: u32 = 64;
pub const KDF_MAX_PARALLELISM: u32 = 16;
/// Bound of memory x passes, in KiB: 8 GiB, a few seconds to a minute on any machine that has the
/// memory at all.
pub const KDF_MAX_COST_KIB: u64 = 8 << 20;
/// Salt length bounds in bytes.
pub const KDF_MIN_SALT: usize = 16;
pub const KDF_MAX_SALT: usize = 64;

/// Argon2id cost parameters and salt.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    pub algorithm: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub salt: String,
}

impl KdfParams {
    /// OWASP's first Argon2id recommendation is m=19 MiB t=2; we spend a little more since a
    /// repository is opened rarely and the master key guards every backup.
    pub fn recommended() -> Self {
        Self::with_memory(64 * 1024)
    }

    pub fn with_memory(memory_kib: u32) -> Self {
        let mut salt = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut salt);
        Self {
            algorithm: "argon2id".into(),
            memory_kib,
            iterations: 3,
            parallelism: 1,
            salt: hex::encode(salt),
        }
    }

    /// Checks the parameters against the bounds this build accepts, before any of them is used:
    /// `config` is plaintext and anyone with write access to the bucket can edit it, so a forged
    /// `memory_kib` or `iterations` must not make opening a repository take gigabytes of memory
    /// or hours. The bounds are far above the defaults (64 MiB, 3 passes).
    pub fn check_bounds(&self) -> std::result::Result<(), String> {
        if self.algorithm != "argon2id" {
            return Err(format!(
                "kdf.algorithm '{}' is not supported (only argon2id)",
                self.algorithm.chars().take(32).collect::<String>()
            ));
        }
        let p = self.parallelism;
        if !(1..=KDF_MAX_PARALLELISM).contains(&p) {
            return Err(format!(
                "kdf.parallelism {p} is outside 1..={KDF_MAX_PARALLELISM}"
            ));
        }
        let m = self.memory_kib;
        if m < KDF_MIN_MEMORY_KIB.max(8 * p) || m > KDF_MAX_MEMORY_KIB {
            return Err(format!(
                "kdf.memory_kib {m} is outside {}..={KDF_MAX_MEMORY_KIB} (1 GiB)",
                KDF_MIN_MEMORY_KIB.max(8 * p)
            ));
        }
        let t = self.iterations;
        if !(1..=KDF_MAX_ITERATIONS).contains(&t) {
            return Err(format!(
                "kdf.iterations {t} is outside 1..={KDF_MAX_ITERATIONS}"
            ));
        }
        if u64::from(m) * u64::from(t) > KDF_MAX_COST_KIB {
            return Err(format!(
                "kdf.memory_kib x kdf.iterations = {} exceeds {KDF_MAX_COST_KIB} (8 GiB of \
                 memory passes)",
                u64::from(m) * u64::from(t)
            ));
        }
        let salt_hex = self.salt.len();
        if !(KDF_MIN_SALT * 2..=KDF_MAX_SALT * 2).contains(&salt_hex) {
            return Err(format!(
                "kdf.salt has {salt_hex} hex digits, not {}..={}",
                KDF_MIN_SALT * 2,
                KDF_MAX_SALT * 2
            ));
        }
        Ok(())
    }

    pub(crate) fn salt_bytes(&self) -> Result<Vec<u8>> {
        hex::decode(&self.salt).map_err(|_| Error::malformed(CONFIG_PATH, "kdf.salt is not hex"))
    }
}

/// The repository configuration as stored (JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub chunk_size: u32,
    pub created: String,
    pub kdf: KdfParams,
    /// `nonce || AES-256-GCM(KEK, master key) || tag`, hex.
    pub wrapped_key: String,
    /// Keyed BLAKE3 (config MAC subkey) over the canonical parameters, hex.
    pub mac: String,
}

impl RepoConfig {
    /// Creates a new configuration and its master key.
    pub(crate) fn create(
        password: &[u8],
        chunk_size: u32,
        kdf: KdfParams,
        master: &MasterKey,
    ) -> Result<Self> {
        blockvault_chunker::check_chunk_size(chunk_size as u64)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
        let kek = derive_kek(password, &kdf)?;
        let wrapped = SealKey::new(&kek).seal(&aad(AAD_KEY_WRAP, &[]), master.as_ref());
        let created = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut cfg = Self {
            format: CONFIG_FORMAT.into(),
            version: REPO_VERSION,
            id: hex::encode(id),
            chunk_size,
            created,
            kdf,
            wrapped_key: hex::encode(wrapped),
            mac: String::new(),
        };
        cfg.mac = cfg.compute_mac(&Keys::derive(master));
        Ok(cfg)
    }

    pub(crate) fn parse(location: &str, bytes: &[u8]) -> Result<Self> {
        let value: serde_json::Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            // Our own format name inside unparsable bytes: a damaged config, not a foreign one.
            Err(e)
                if bytes
                    .windows(CONFIG_FORMAT.len())
                    .any(|w| w == CONFIG_FORMAT.as_bytes()) =>
            {
                return Err(Error::malformed(
                    CONFIG_PATH,
                    format!("damaged, perhaps truncated ({e}); restore it from a copy"),
                ))
            }
            Err(e) => {
                return Err(Error::Foreign {
                    location: location.into(),
                    detail: format!("'config' is not JSON ({e})"),
                })
            }
        };
        if value.get("format").and_then(|f| f.as_str()) != Some(CONFIG_FORMAT) {
            return Err(Error::Foreign {
                location: location.into(),
                detail: "'config' does not name the blockvault repository format".into(),
            });
        }
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if version != REPO_VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: REPO_VERSION,
            });
        }
        let cfg: Self = serde_json::from_value(value)
            .map_err(|e| Error::malformed(CONFIG_PATH, e.to_string()))?;
        // Before anything derives a key with them (the MAC that would reveal a forgery can only
        // be checked after the derivation).
        cfg.kdf.check_bounds().map_err(|detail| {
            Error::tampered(
                CONFIG_PATH,
                format!("{detail} (tampering, or parameters this build does not support)"),
            )
        })?;
        Ok(cfg)
    }

    /// Unwraps the master key with the password and checks the MAC over the parameters.
    pub(crate) fn unlock(&self, password: &[u8]) -> Result<(MasterKey, Keys)> {
        let kek = derive_kek(password, &self.kdf)?;
        let wrapped = hex::decode(&self.wrapped_key)
            .map_err(|_| Error::malformed(CONFIG_PATH, "wrapped_key is not hex"))?;
        let plain = SealKey::new(&kek)
            .open(&aad(AAD_KEY_WRAP, &[]), &wrapped)
            .ok_or_else(|| Error::WrongPassword {
                repo: self.id.clone(),
            })?;
        let master: MasterKey = zeroize::Zeroizing::new(
            plain
                .as_slice()
                .try_into()
                .map_err(|_| Error::tampered(CONFIG_PATH, "master key has the wrong length"))?,
        );
        let keys = Keys::derive(&master);
        if self.compute_mac(&keys) != self.mac {
            return Err(Error::tampered(
                CONFIG_PATH,
                "parameters do not match their MAC (id, chunk size or dates were altered)",
            ));
        }
        Ok((master, keys))
    }

    fn compute_mac(&self, keys: &Keys) -> String {
        let canonical = format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.format,
            self.version,
            self.id,
            self.chunk_size,
            self.created,
            self.kdf.algorithm,
            self.kdf.memory_kib,
            self.kdf.iterations,
            self.kdf.parallelism,
            self.kdf.salt,
        );
        let mut input = canonical.into_bytes();
        input.extend_from_slice(self.wrapped_key.as_bytes());
        hex::encode(blake3::keyed_hash(&keys.config_mac, &input).as_bytes())
    }

    /// Re-wraps the master key under a new password (a fresh salt too).
    pub(crate) fn rewrap(
        &self,
        master: &MasterKey,
        new_password: &[u8],
        kdf: KdfParams,
    ) -> Result<Self> {
        let kek = derive_kek(new_password, &kdf)?;
        let wrapped = SealKey::new(&kek).seal(&aad(AAD_KEY_WRAP, &[]), master.as_ref());
        let mut cfg = Self {
            kdf,
            wrapped_key: hex::encode(wrapped),
            mac: String::new(),
            ..self.clone()
        };
        cfg.mac = cfg.compute_mac(&Keys::derive(master));
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random_master_key;

    fn cheap() -> KdfParams {
        KdfParams::with_memory(8 * 1024)
    }

    #[test]
    fn unlock_with_right_password_only() {
        let m = random_master_key();
        let cfg = RepoConfig::create(b"pw", 1 << 20, cheap(), &m).unwrap();
        let bytes = serde_json::to_vec(&cfg).unwrap();
        let parsed = RepoConfig::parse("x", &bytes).unwrap();
        assert_eq!(*parsed.unlock(b"pw").unwrap().0, *m);
        assert!(matches!(
            parsed.unlock(b"nope"),
            Err(Error::WrongPassword { .. })
        ));
    }

    #[test]
    fn altered_parameters_are_tampering() {
        let m = random_master_key();
        let mut cfg = RepoConfig::create(b"pw", 1 << 20, cheap(), &m).unwrap();
        cfg.chunk_size = 1 << 16;
        assert!(matches!(cfg.unlock(b"pw"), Err(Error::Tampered { .. })));
    }

    #[test]
    fn rewrap_changes_password() {
        let m = random_master_key();
        let cfg = RepoConfig::create(b"old", 1 << 20, cheap(), &m).unwrap();
        let new = cfg.rewrap(&m, b"new", cheap()).unwrap();
        assert_eq!(*new.unlock(b"new").unwrap().0, *m);
        assert!(new.unlock(b"old").is_err());
        assert_eq!(new.id, cfg.id);
    }

    /// A config edited to demand absurd Argon2id costs is refused at parse time, before any key
    /// derivation could allocate or spin (the MAC that would catch the edit needs the key).
    #[test]
    fn forged_kdf_costs_are_refused_before_use() {
        let m = random_master_key();
        let cfg = RepoConfig::create(b"pw", 1 << 20, cheap(), &m).unwrap();
        let forge = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = serde_json::to_value(&cfg).unwrap();
            f(&mut v);
            RepoConfig::parse("x", &serde_json::to_vec(&v).unwrap())
        };
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["kdf"]["memory_kib"] = u32::MAX.into()),
                "memory_kib",
            ),
            (
                Box::new(|v| v["kdf"]["memory_kib"] = (2u32 << 20).into()),
                "memory_kib",
            ),
            (
                Box::new(|v| v["kdf"]["memory_kib"] = 8.into()),
                "memory_kib",
            ),
            (
                Box::new(|v| v["kdf"]["iterations"] = u32::MAX.into()),
                "iterations",
            ),
            (
                Box::new(|v| v["kdf"]["iterations"] = 0.into()),
                "iterations",
            ),
            (
                Box::new(|v| v["kdf"]["parallelism"] = 1000.into()),
                "parallelism",
            ),
            (
                Box::new(|v| v["kdf"]["algorithm"] = "scrypt".into()),
                "algorithm",
            ),
            (
                Box::new(|v| v["kdf"]["salt"] = "ab".repeat(1000).into()),
                "salt",
            ),
            (
                Box::new(|v| {
                    v["kdf"]["memory_kib"] = (1u32 << 20).into();
                    v["kdf"]["iterations"] = 64.into();
                }),
                "exceeds",
            ),
        ];
        for (edit, says) in cases {
            let t = std::time::Instant::now();
            match forge(&*edit) {
                Err(Error::Tampered { object, detail }) => {
                    assert_eq!(object, CONFIG_PATH);
                    assert!(
                        detail.contains(says) && detail.contains("tampering"),
                        "{detail}"
                    );
                }
                other => panic!("{says}: {other:?}"),
            }
            assert!(t.elapsed() < std::time::Duration::from_millis(100));
        }
        // The largest accepted single parameters still parse (and the defaults, of course).
        forge(&|v| {
            v["kdf"]["memory_kib"] = (1u32 << 20).into();
            v["kdf"]["iterations"] = 8.into();
        })
        .unwrap();
        RepoConfig::parse("x", &serde_json::to_vec(&cfg).unwrap()).unwrap();
        // Creating or re-wrapping with out-of-bounds parameters is refused too.
        let e = cfg
            .rewrap(&m, b"new", KdfParams::with_memory(4 << 20))
            .unwrap_err();
        assert!(e.to_string().contains("memory_kib"), "{e}");
    }

    #[test]
    fn foreign_and_future_configs_are_refused() {
        assert!(matches!(
            RepoConfig::parse("x", b"not json"),
            Err(Error::Foreign { .. })
        ));
        assert!(matches!(
            RepoConfig::parse("x", br#"{"format":"restic"}"#),
            Err(Error::Foreign { .. })
        ));
        assert!(matches!(
            RepoConfig::parse("x", br#"{"format":"blockvault-repository","version":9}"#),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));
    }
}
