use std::fmt;
use std::str::FromStr;

use rand::RngCore;

use crate::Error;

macro_rules! random_id {
    ($name:ident, $what:literal) => {
        #[doc = concat!("Random 128-bit name of a ", $what, ".")]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            pub fn random() -> Self {
                let mut b = [0u8; 16];
                rand::thread_rng().fill_bytes(&mut b);
                Self(b)
            }

            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                let mut b = [0u8; 16];
                hex::decode_to_slice(s, &mut b).map_err(|_| {
                    Error::Invalid(format!(concat!("'{}' is not a ", $what, " id"), s))
                })?;
                Ok(Self(b))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

random_id!(PackId, "pack");
random_id!(SegmentId, "index segment");

/// Name of a restore point: 64 random bits, shown as 16 hex digits. Users may type any unique prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PointId(pub [u8; 8]);

impl PointId {
    pub fn random() -> Self {
        let mut b = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut b);
        Self(b)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PointId({})", self.to_hex())
    }
}

impl FromStr for PointId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut b = [0u8; 8];
        hex::decode_to_slice(s, &mut b)
            .map_err(|_| Error::Invalid(format!("'{s}' is not a restore point id")))?;
        Ok(Self(b))
    }
}

impl serde::Serialize for PointId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for PointId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
