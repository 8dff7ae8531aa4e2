//! `restore mount`: a restore-point disk (engine `MountedDisk`) served as an NBD block device.

use std::sync::Arc;

use blockvault_engine::{MountedDisk, Segment, OVERLAY_BLOCK};
use blockvault_nbd::{BlockDevice, BlockSizes, DeviceError, Extent, ReadSegment};
use bytes::Bytes;

/// Largest extent a single block-status reply entry may describe.
const MAX_EXTENT: u64 = 1 << 31;

/// Adapter between the engine's mounted disk and the NBD server.
pub struct MountDevice {
    disk: Arc<MountedDisk>,
}

impl MountDevice {
    pub fn new(disk: Arc<MountedDisk>) -> Self {
        Self { disk }
    }

    pub fn disk(&self) -> &Arc<MountedDisk> {
        &self.disk
    }
}

/// The NBD error a failed request is answered with: a full overlay or local file is ENOSPC, so
/// a hypervisor can pause the guest (qemu's `werror=enospc`) instead of failing its I/O.
fn to_device(e: blockvault_engine::Error) -> DeviceError {
    use blockvault_engine::Error as E;
    match e {
        E::Invalid(m) => DeviceError::invalid(m),
        E::Output { ref source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) =>
        {
            DeviceError::no_space(e.to_string())
        }
        other => DeviceError::io(other.to_string()),
    }
}

#[async_trait::async_trait]
impl BlockDevice for MountDevice {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_only(&self) -> bool {
        !self.disk.writable()
    }

    /// Every connection of the export shares this one overlay, so all see the same data.
    fn can_multi_conn(&self) -> bool {
        true
    }

    fn block_sizes(&self) -> BlockSizes {
        let chunk = self.disk.reader().layout().chunk_size();
        BlockSizes {
            // The overlay keeps whole 4 KiB blocks. Clients that ask for block sizes
            // read-modify-write smaller writes themselves; for clients that do not, the NBD
            // server adapts their requests (protocol defaults), so the disk only sees whole blocks.
            minimum: if self.disk.writable() {
                OVERLAY_BLOCK as u32
            } else {
                1
            },
            preferred: chunk,
            maximum: 32 << 20,
        }
    }

    fn supports_trim(&self) -> bool {
        self.disk.writable()
    }

    fn supports_fast_zero(&self) -> bool {
        self.disk.writable()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError> {
        let segs = self
            .disk
            .read_at(offset, u64::from(len))
            .await
            .map_err(to_device)?;
        Ok(segs
            .into_iter()
            .map(|s| match s {
                Segment::Data(b) => ReadSegment::Data(b),
                // A segment never exceeds the request length, which is a u32.
                Segment::Zero(n) => ReadSegment::Zero(n as u32),
            })
            .collect())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        if !self.disk.writable() {
            return Err(DeviceError::perm("the mount is read-only"));
        }
        self.disk.write(offset, data).await.map_err(to_device)?;
        if fua {
            self.disk.flush().await.map_err(to_device)?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), DeviceError> {
        if !self.disk.writable() {
            return Err(DeviceError::perm("the mount is read-only"));
        }
        self.disk
            .write_zeroes(offset, u64::from(len), may_trim)
            .await
            .map_err(to_device)?;
        if fua {
            self.disk.flush().await.map_err(to_device)?;
        }
        Ok(())
    }

    /// Trimmed blocks read as zeroes afterwards (allowed: their content is unspecified).
    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        if !self.disk.writable() {
            return Err(DeviceError::perm("the mount is read-only"));
        }
        self.disk
            .write_zeroes(offset, u64::from(len), true)
            .await
            .map_err(to_device)
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.disk.flush().await.map_err(to_device)
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        let runs = self
            .disk
            .block_status(offset, u64::from(len))
            .map_err(to_device)?;
        let mut out = Vec::with_capacity(runs.len());
        for r in runs {
            let hole = if r.hole { Extent::HOLE } else { 0 };
            let flags = hole | if r.zero { Extent::ZERO } else { 0 };
            out.push(Extent {
                length: r.length.min(MAX_EXTENT) as u32,
                flags,
            });
            if r.length > MAX_EXTENT {
                break;
            }
        }
        Ok(out)
    }

    /// Prefetches the range into the chunk cache.
    async fn cache(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.disk
            .cache(offset, u64::from(len))
            .await
            .map_err(to_device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockvault_nbd::DeviceErrorKind;

    #[test]
    fn a_full_overlay_is_enospc_and_a_failed_task_is_eio() {
        let full = blockvault_engine::Error::Output {
            path: "ov/sys.data".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        assert_eq!(to_device(full).kind(), DeviceErrorKind::NoSpace);
        let other = blockvault_engine::Error::Output {
            path: "ov/sys.data".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert_eq!(to_device(other).kind(), DeviceErrorKind::Io);
        let task = blockvault_engine::Error::Task("panicked".into());
        assert_eq!(to_device(task).kind(), DeviceErrorKind::Io);
        let bad = blockvault_engine::Error::Invalid("past the end".into());
        assert_eq!(to_device(bad).kind(), DeviceErrorKind::Invalid);
    }
}
