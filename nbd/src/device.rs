//! The seam between the NBD server and whatever holds the data.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::DeviceError;
use crate::proto;

/// Size constraints of a device, advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockSizes {
    /// Smallest addressable unit: requests must be aligned to it. A power of two, at most 64 KiB.
    pub minimum: u32,
    /// Size at which aligned I/O is efficient (the repository chunk size for a backup export).
    /// A power of two, at least `max(minimum, 512)`.
    pub preferred: u32,
    /// Largest READ or WRITE payload. At least `preferred`; the server never accepts more than
    /// 32 MiB whatever the device says.
    pub maximum: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: proto::MAX_WRITE_PAYLOAD,
        }
    }
}

impl BlockSizes {
    /// Checks the protocol's rules; returns why the sizes are unusable.
    pub fn validate(&self) -> Result<(), String> {
        if !self.minimum.is_power_of_two() || self.minimum > 65536 {
            return Err(format!(
                "minimum block size {} must be a power of two no larger than 65536",
                self.minimum
            ));
        }
        if !self.preferred.is_power_of_two() || self.preferred < self.minimum.max(512) {
            return Err(format!(
                "preferred block size {} must be a power of two of at least max(minimum, 512)",
                self.preferred
            ));
        }
        if self.maximum < self.preferred {
            return Err(format!(
                "maximum payload {} is smaller than the preferred block size {}",
                self.maximum, self.preferred
            ));
        }
        Ok(())
    }

    /// The sizes as advertised: the maximum is capped at what the server will buffer.
    pub(crate) fn effective(self) -> BlockSizes {
        BlockSizes {
            maximum: self.maximum.min(proto::MAX_WRITE_PAYLOAD),
            ..self
        }
    }
}

/// One piece of a read result. A read returns pieces covering exactly the requested length in
/// order, so known-zero ranges travel as `NBD_REPLY_TYPE_OFFSET_HOLE` instead of zero bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadSegment {
    Data(Bytes),
    Zero(u32),
}

impl ReadSegment {
    pub fn len(&self) -> u64 {
        match self {
            ReadSegment::Data(b) => b.len() as u64,
            ReadSegment::Zero(n) => u64::from(*n),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `base:allocation` state of an extent: a combination of [`Extent::HOLE`] and [`Extent::ZERO`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    pub length: u32,
    pub flags: u32,
}

impl Extent {
    /// Not allocated in the backing store.
    pub const HOLE: u32 = proto::STATE_HOLE;
    /// Reads as zeroes.
    pub const ZERO: u32 = proto::STATE_ZERO;

    /// Allocated data of unknown content (the always-safe answer).
    pub fn data(length: u32) -> Self {
        Extent { length, flags: 0 }
    }

    /// Unallocated, reads as zeroes.
    pub fn hole(length: u32) -> Self {
        Extent {
            length,
            flags: Self::HOLE | Self::ZERO,
        }
    }

    /// Allocated and known to read as zeroes.
    pub fn zero(length: u32) -> Self {
        Extent {
            length,
            flags: Self::ZERO,
        }
    }
}

/// A block device served over NBD. Offsets and lengths passed in are always within
/// `0..size()` and respect `block_sizes()`; the server checks before calling.
///
/// Durability contract: when `flush` returns, every write, zero and trim that returned before
/// `flush` was called is on stable storage; with `fua == true` the same holds for that one
/// operation when it returns.
#[async_trait::async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;

    fn read_only(&self) -> bool;

    /// True only when every connection sees the same data at all times (one shared overlay, or
    /// read-only), which lets clients spread one workload over several connections.
    fn can_multi_conn(&self) -> bool {
        self.read_only()
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    /// Whether `trim` does something useful; the server advertises `NBD_FLAG_SEND_TRIM` by it.
    fn supports_trim(&self) -> bool {
        false
    }

    /// Whether `write_zeroes` is always much cheaper than writing zero bytes. When false, a
    /// client's `NBD_CMD_FLAG_FAST_ZERO` request fails at once with `NBD_ENOTSUP`, as the protocol
    /// asks, and the client falls back to writing.
    fn supports_fast_zero(&self) -> bool {
        false
    }

    /// Returns segments covering exactly `len` bytes from `offset`, in order.
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError>;

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError>;

    /// Makes the range read as zeroes. `may_trim == false` means the client asked for the space
    /// to stay allocated (`NBD_CMD_FLAG_NO_HOLE`).
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), DeviceError>;

    /// A hint that the range is no longer needed; contents afterwards are unspecified.
    async fn trim(&self, _offset: u64, _len: u32) -> Result<(), DeviceError> {
        Err(DeviceError::not_supported("trim is not supported"))
    }

    async fn flush(&self) -> Result<(), DeviceError>;

    /// `base:allocation` status from `offset`: consecutive extents, at least one. They may cover
    /// less than `len` (the client asks again) or more (the server clips).
    async fn block_status(&self, _offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        Ok(vec![Extent::data(len)])
    }

    /// A hint that the client will soon read the range (e.g. prefetch remote chunks).
    async fn cache(&self, _offset: u64, _len: u32) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// A named device offered to clients.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Orders read-modify-write cycles against every other change to the device: a cycle holds
    /// it exclusively, plain writes hold it shared (see `unaligned`). Shared by all connections
    /// (and by clones of the export), because multi-conn clients write through several.
    pub(crate) write_order: Arc<tokio::sync::RwLock<()>>,
}

impl Export {
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            device,
            write_order: Arc::new(tokio::sync::RwLock::new(())),
        }
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        for (what, s) in [("name", &self.name), ("description", &self.description)] {
            if s.len() > proto::MAX_STRING_LEN {
                return Err(format!(
                    "{what} is longer than {} bytes",
                    proto::MAX_STRING_LEN
                ));
            }
            if s.contains('\0') {
                return Err(format!("{what} contains a NUL character"));
            }
        }
        self.device.block_sizes().validate()
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.device.size())
            .field("read_only", &self.device.read_only())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_rules() {
        assert!(BlockSizes::default().validate().is_ok());
        let bad_min = BlockSizes {
            minimum: 3,
            ..BlockSizes::default()
        };
        assert!(bad_min.validate().is_err());
        let bad_pref = BlockSizes {
            minimum: 1,
            preferred: 256,
            maximum: 4096,
        };
        assert!(bad_pref.validate().is_err());
        let bad_max = BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 1024,
        };
        assert!(bad_max.validate().is_err());
        let huge = BlockSizes {
            maximum: u32::MAX,
            ..BlockSizes::default()
        };
        assert_eq!(huge.effective().maximum, proto::MAX_WRITE_PAYLOAD);
    }
}
