//! The typed object layer: every object the repository stores has a kind, and each kind knows its
//! name in the store, how its body is encoded and sealed, and the associated data that binds the
//! body to that name. Nothing else in the crate builds object paths by hand; listings are parsed
//! back into typed names in one place, so a stray object is recognised and reported, never
//! misread.
//!
//! | kind      | name                          | body                                          |
//! |-----------|-------------------------------|-----------------------------------------------|
//! | config    | `config`                      | JSON, key wrapped under the password, MAC     |
//! | pack      | `packs/<2 hex>/<32 hex>`      | blobs + sealed table of contents (`pack.rs`)  |
//! | segment   | `index/<32 hex>`              | sealed binary (`segment.rs`)                  |
//! | point     | `points/<16 hex>`             | sealed zstd JSON (`manifest.rs`)              |
//! | lease     | `leases/<32 hex>`             | sealed zstd JSON (`lease.rs`)                 |
//! | claim     | `claims/<20 digits>`          | sealed zstd JSON (`plan.rs`)                  |
//! | plan      | `plans/<20 digits>`           | sealed zstd JSON (`plan.rs`)                  |
//! | protected | `protected/<16 hex>`          | sealed zstd JSON (`catalog.rs`)               |

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::crypto::{aad, Keys};
use crate::format::{
    AAD_CLAIM, AAD_LEASE, AAD_MANIFEST, AAD_PLAN, AAD_PROTECTED, AAD_SEGMENT, CLAIMS_DIR,
    CONFIG_PATH, INDEX_DIR, LEASES_DIR, PACKS_DIR, PLANS_DIR, POINTS_DIR, PROTECTED_DIR,
};
use crate::{Error, PackId, PointId, Result, SegmentId};

/// A maintenance epoch: prune run n claims epoch n and publishes plan n. Epochs only grow.
pub type Epoch = u64;

/// What an object is, independent of its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectKind {
    Config,
    Pack,
    Segment,
    Point,
    Lease,
    Claim,
    Plan,
    Protected,
}

impl ObjectKind {
    /// The folder holding every object of this kind (the config is a single object).
    pub fn dir(self) -> &'static str {
        match self {
            ObjectKind::Config => CONFIG_PATH,
            ObjectKind::Pack => PACKS_DIR,
            ObjectKind::Segment => INDEX_DIR,
            ObjectKind::Point => POINTS_DIR,
            ObjectKind::Lease => LEASES_DIR,
            ObjectKind::Claim => CLAIMS_DIR,
            ObjectKind::Plan => PLANS_DIR,
            ObjectKind::Protected => PROTECTED_DIR,
        }
    }

    /// Shown in errors and warnings.
    pub fn noun(self) -> &'static str {
        match self {
            ObjectKind::Config => "configuration",
            ObjectKind::Pack => "pack",
            ObjectKind::Segment => "index segment",
            ObjectKind::Point => "restore point manifest",
            ObjectKind::Lease => "lease",
            ObjectKind::Claim => "prune claim",
            ObjectKind::Plan => "maintenance plan",
            ObjectKind::Protected => "protection mark",
        }
    }
}

/// Random 128-bit name of a lease.
pub type LeaseId = SegmentId;

/// The name of one stored object.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectName {
    Config,
    Pack(PackId),
    Segment(SegmentId),
    Point(PointId),
    Lease(LeaseId),
    Claim(Epoch),
    Plan(Epoch),
    Protected(PointId),
}

impl fmt::Debug for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path())
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectName::Config => f.write_str("the configuration"),
            ObjectName::Pack(id) => write!(f, "pack {id}"),
            ObjectName::Segment(id) => write!(f, "index segment {id}"),
            ObjectName::Point(id) => write!(f, "restore point {id} manifest"),
            ObjectName::Lease(id) => write!(f, "lease {id}"),
            ObjectName::Claim(e) => write!(f, "prune claim {e}"),
            ObjectName::Plan(e) => write!(f, "maintenance plan {e}"),
            ObjectName::Protected(id) => write!(f, "protection mark of point {id}"),
        }
    }
}

/// Epochs are written as 20 decimal digits so names sort in epoch order.
fn epoch_leaf(e: Epoch) -> String {
    format!("{e:020}")
}

fn parse_epoch(leaf: &str) -> Option<Epoch> {
    if leaf.len() == 20 && leaf.bytes().all(|b| b.is_ascii_digit()) {
        leaf.parse().ok()
    } else {
        None
    }
}

impl ObjectName {
    pub fn kind(&self) -> ObjectKind {
        match self {
            ObjectName::Config => ObjectKind::Config,
            ObjectName::Pack(_) => ObjectKind::Pack,
            ObjectName::Segment(_) => ObjectKind::Segment,
            ObjectName::Point(_) => ObjectKind::Point,
            ObjectName::Lease(_) => ObjectKind::Lease,
            ObjectName::Claim(_) => ObjectKind::Claim,
            ObjectName::Plan(_) => ObjectKind::Plan,
            ObjectName::Protected(_) => ObjectKind::Protected,
        }
    }

    /// The object's path relative to the repository root.
    pub fn path(&self) -> String {
        let dir = self.kind().dir();
        match self {
            ObjectName::Config => CONFIG_PATH.to_string(),
            ObjectName::Pack(id) => {
                let h = id.to_hex();
                format!("{dir}/{}/{h}", &h[..2])
            }
            ObjectName::Segment(id) | ObjectName::Lease(id) => format!("{dir}/{id}"),
            ObjectName::Point(id) | ObjectName::Protected(id) => format!("{dir}/{id}"),
            ObjectName::Claim(e) | ObjectName::Plan(e) => format!("{dir}/{}", epoch_leaf(*e)),
        }
    }

    /// Parses a path as listed from the store into a name of `kind`; `None` for anything that is
    /// not exactly such a name (a stray file, a temporary upload, a malformed id).
    pub fn parse(kind: ObjectKind, path: &str) -> Option<Self> {
        if kind == ObjectKind::Config {
            return (path == CONFIG_PATH).then_some(ObjectName::Config);
        }
        let rest = path.strip_prefix(kind.dir())?.strip_prefix('/')?;
        match kind {
            ObjectKind::Pack => {
                let (fan, leaf) = rest.split_once('/')?;
                let id: PackId = leaf.parse().ok()?;
                (fan.len() == 2 && leaf.starts_with(fan)).then_some(ObjectName::Pack(id))
            }
            ObjectKind::Segment => strict_hex(rest, 32)?.parse().ok().map(ObjectName::Segment),
            ObjectKind::Lease => strict_hex(rest, 32)?.parse().ok().map(ObjectName::Lease),
            ObjectKind::Point => strict_hex(rest, 16)?.parse().ok().map(ObjectName::Point),
            ObjectKind::Protected => strict_hex(rest, 16)?
                .parse()
                .ok()
                .map(ObjectName::Protected),
            ObjectKind::Claim => parse_epoch(rest).map(ObjectName::Claim),
            ObjectKind::Plan => parse_epoch(rest).map(ObjectName::Plan),
            ObjectKind::Config => None,
        }
    }

    /// Associated data binding a sealed body to this name, so no sealed object can be served
    /// under another's name. `None` for objects that are not sealed as one piece (the config is
    /// MAC'd, a pack seals each blob and its table separately).
    pub(crate) fn aad(&self) -> Option<Vec<u8>> {
        Some(match self {
            ObjectName::Config | ObjectName::Pack(_) => return None,
            // Byte-compatible with the layouts written before the typed layer existed.
            ObjectName::Segment(id) => aad(AAD_SEGMENT, &[&id.0]),
            ObjectName::Point(id) => aad(AAD_MANIFEST, &[id.to_hex().as_bytes()]),
            ObjectName::Lease(id) => aad(AAD_LEASE, &[id.to_hex().as_bytes()]),
            ObjectName::Claim(e) => aad(AAD_CLAIM, &[epoch_leaf(*e).as_bytes()]),
            ObjectName::Plan(e) => aad(AAD_PLAN, &[epoch_leaf(*e).as_bytes()]),
            ObjectName::Protected(id) => aad(AAD_PROTECTED, &[id.to_hex().as_bytes()]),
        })
    }

    /// Seals a serde value as this object's body: JSON, zstd, AES-256-GCM under the metadata key
    /// with this name as associated data.
    pub(crate) fn seal_json<T: Serialize>(&self, keys: &Keys, value: &T) -> Vec<u8> {
        let aad = self.aad().expect("seal_json is only used for sealed kinds");
        let json = serde_json::to_vec(value).expect("object bodies serialise");
        let z = zstd::bulk::compress(&json, 3).expect("zstd on memory buffers");
        keys.meta.seal(&aad, &z)
    }

    /// Opens a body written by [`ObjectName::seal_json`].
    pub(crate) fn open_json<T: DeserializeOwned>(&self, keys: &Keys, sealed: &[u8]) -> Result<T> {
        let aad = self.aad().expect("open_json is only used for sealed kinds");
        let z = keys
            .meta
            .open(&aad, sealed)
            .ok_or_else(|| Error::tampered(self.to_string(), "authentication failed"))?;
        let json = zstd::bulk::decompress(&z, 256 << 20)
            .map_err(|e| Error::malformed(self.to_string(), format!("zstd: {e}")))?;
        serde_json::from_slice(&json).map_err(|e| Error::malformed(self.to_string(), e.to_string()))
    }
}

/// The exact-length lowercase-or-uppercase hex leaf, or `None`.
fn strict_hex(leaf: &str, len: usize) -> Option<&str> {
    (leaf.len() == len && leaf.bytes().all(|b| b.is_ascii_hexdigit())).then_some(leaf)
}

/// A listed object of a known kind, with its store-assigned modification time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub name: ObjectName,
    pub size: u64,
    /// Unix milliseconds as the object store recorded them.
    pub modified_ms: i64,
    /// The store's entity tag, when it gives one.
    pub e_tag: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_path() {
        let names = [
            ObjectName::Config,
            ObjectName::Pack(PackId::random()),
            ObjectName::Segment(SegmentId::random()),
            ObjectName::Point(PointId::random()),
            ObjectName::Lease(LeaseId::random()),
            ObjectName::Claim(7),
            ObjectName::Plan(u64::MAX),
            ObjectName::Protected(PointId::random()),
        ];
        for n in names {
            assert_eq!(ObjectName::parse(n.kind(), &n.path()), Some(n), "{n:?}");
        }
    }

    #[test]
    fn strays_are_not_names() {
        let p = PackId::random().to_hex();
        assert!(ObjectName::parse(ObjectKind::Pack, &format!("packs/zz/{p}")).is_none());
        assert!(ObjectName::parse(ObjectKind::Pack, &format!("packs/{p}")).is_none());
        assert!(ObjectName::parse(ObjectKind::Point, "points/abc").is_none());
        assert!(ObjectName::parse(ObjectKind::Point, "points/0123456789abcdef.tmp").is_none());
        assert!(ObjectName::parse(ObjectKind::Plan, "plans/1").is_none());
        assert!(ObjectName::parse(ObjectKind::Plan, "claims/00000000000000000001").is_none());
        assert!(ObjectName::parse(ObjectKind::Segment, "index/x").is_none());
    }

    #[test]
    fn epochs_sort_by_name() {
        let a = ObjectName::Plan(9).path();
        let b = ObjectName::Plan(10).path();
        assert!(a < b);
    }

    #[test]
    fn sealed_bodies_are_bound_to_their_name() {
        let keys = Keys::derive(&crate::crypto::random_master_key());
        let a = ObjectName::Plan(3);
        let sealed = a.seal_json(&keys, &vec![1u32, 2, 3]);
        assert_eq!(
            a.open_json::<Vec<u32>>(&keys, &sealed).unwrap(),
            vec![1, 2, 3]
        );
        assert!(ObjectName::Plan(4)
            .open_json::<Vec<u32>>(&keys, &sealed)
            .is_err());
        assert!(ObjectName::Claim(3)
            .open_json::<Vec<u32>>(&keys, &sealed)
            .is_err());
    }
}
