//! Serving clients that negotiated no block sizes from a device with stricter ones.
//!
//! The protocol's defaults (`doc/proto.md`, "Block size constraints") are a minimum block of 1
//! byte and payloads up to 32 MiB; a client that did not ask for `NBD_INFO_BLOCK_SIZE` with
//! `NBD_OPT_GO` (or used `NBD_OPT_EXPORT_NAME`) may rely on them, typically sending 512-byte
//! requests. A writable restore mount keeps 4 KiB blocks, so the server adapts such requests:
//! reads and block status are widened to whole blocks and cut back, writes and zeroes that
//! cover part of a block become read-modify-write cycles, trims shrink to the whole blocks they
//! cover (a trim is only a hint), and payloads over the device maximum are split.
//!
//! A read-modify-write cycle must not interleave with another change of the same block, from
//! this connection or another: it holds the export's `write_order` lock exclusively, while every
//! other change to a device with a minimum block above 1 holds it shared.

use bytes::{Bytes, BytesMut};

use crate::device::{BlockDevice, BlockSizes, Extent, ReadSegment};
use crate::error::DeviceError;

/// Geometry of a device that needs adapted requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Adapter {
    /// Device minimum block (a power of two).
    min: u64,
    /// Largest READ/WRITE payload the device takes, a multiple of `min`.
    max: u64,
    /// Export size; the last block may be short.
    size: u64,
}

impl Adapter {
    pub(crate) fn new(sizes: BlockSizes, size: u64) -> Adapter {
        let min = u64::from(sizes.minimum.max(1));
        let max = (u64::from(sizes.maximum) / min * min).max(min);
        Adapter { min, max, size }
    }

    fn down(&self, x: u64) -> u64 {
        x - x % self.min
    }

    /// Rounds up to a block boundary, or to the export end if that comes first.
    fn up(&self, x: u64) -> u64 {
        x.div_ceil(self.min).saturating_mul(self.min).min(self.size)
    }

    /// Whether `offset..offset+len` starts and ends on block boundaries (or at the export end).
    pub(crate) fn aligned(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        offset.is_multiple_of(self.min) && (end.is_multiple_of(self.min) || end == self.size)
    }

    /// Whether a WRITE or WRITE_ZEROES of this range needs a read-modify-write cycle.
    pub(crate) fn needs_rmw(&self, offset: u64, len: u64) -> bool {
        len > 0 && !self.aligned(offset, len)
    }

    pub(crate) async fn read(
        &self,
        dev: &dyn BlockDevice,
        offset: u64,
        len: u32,
    ) -> Result<Vec<ReadSegment>, DeviceError> {
        let len64 = u64::from(len);
        if self.aligned(offset, len64) && len64 <= self.max {
            return dev.read(offset, len).await;
        }
        let start = self.down(offset);
        let end = self.up(offset + len64);
        let mut segments = Vec::new();
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(self.max);
            let got = dev.read(pos, n as u32).await?;
            let total: u64 = got.iter().map(ReadSegment::len).sum();
            if total != n {
                return Err(DeviceError::io(format!(
                    "device returned {total} bytes for a read of {n}"
                )));
            }
            segments.extend(got);
            pos += n;
        }
        Ok(slice_segments(segments, offset - start, len64))
    }

    /// Writes `data` at `offset`. An unaligned range must be called with the export's write
    /// order held exclusively.
    pub(crate) async fn write(
        &self,
        dev: &dyn BlockDevice,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), DeviceError> {
        let len = data.len() as u64;
        if self.aligned(offset, len) {
            return self.write_pieces(dev, offset, data, fua).await;
        }
        let end_req = offset + len;
        let start = self.down(offset);
        let end = self.up(end_req);
        let mut buf = BytesMut::zeroed((end - start) as usize);
        let head_read = offset > start;
        if head_read {
            let n = self.min.min(end - start);
            self.read_into(dev, start, &mut buf[..n as usize]).await?;
        }
        let tail_start = self.down(end_req);
        if end_req < end && !(head_read && tail_start == start) {
            let from = (tail_start - start) as usize;
            self.read_into(dev, tail_start, &mut buf[from..]).await?;
        }
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(&data);
        self.write_pieces(dev, start, buf.freeze(), fua).await
    }

    /// Zeroes a range: whole blocks through the device, partial ones by read-modify-write. An
    /// unaligned range must be called with the export's write order held exclusively.
    pub(crate) async fn write_zeroes(
        &self,
        dev: &dyn BlockDevice,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), DeviceError> {
        let end = offset + u64::from(len);
        if self.aligned(offset, u64::from(len)) {
            return dev.write_zeroes(offset, len, fua, may_trim).await;
        }
        let inner_start = self.up(offset);
        let inner_end = if end == self.size {
            end
        } else {
            self.down(end)
        };
        if inner_start >= inner_end {
            let zeroes = Bytes::from(vec![0u8; len as usize]);
            return self.write(dev, offset, zeroes, fua).await;
        }
        dev.write_zeroes(inner_start, (inner_end - inner_start) as u32, fua, may_trim)
            .await?;
        for (from, to) in [(offset, inner_start), (inner_end, end)] {
            if from < to {
                let zeroes = Bytes::from(vec![0u8; (to - from) as usize]);
                self.write(dev, from, zeroes, fua).await?;
            }
        }
        Ok(())
    }

    /// Trims the whole blocks inside the range; partial blocks keep their data, which a trim
    /// allows (afterwards the contents of a trimmed range are unspecified).
    pub(crate) async fn trim(
        &self,
        dev: &dyn BlockDevice,
        offset: u64,
        len: u32,
    ) -> Result<(), DeviceError> {
        let end = offset + u64::from(len);
        let inner_start = self.up(offset);
        let inner_end = if end == self.size {
            end
        } else {
            self.down(end)
        };
        if inner_start >= inner_end {
            return Ok(());
        }
        dev.trim(inner_start, (inner_end - inner_start) as u32)
            .await
    }

    pub(crate) async fn block_status(
        &self,
        dev: &dyn BlockDevice,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Extent>, DeviceError> {
        let start = self.down(offset);
        let mut skip = offset - start;
        if skip == 0 {
            return dev.block_status(offset, len).await;
        }
        let query = (u64::from(len) + skip).min(u64::from(u32::MAX)) as u32;
        let mut out = Vec::new();
        for mut e in dev.block_status(start, query).await? {
            let n = u64::from(e.length);
            if n <= skip {
                skip -= n;
                continue;
            }
            e.length = (n - skip) as u32;
            skip = 0;
            out.push(e);
        }
        if out.is_empty() {
            // The device described less than the widened start; "data" is always a safe answer.
            let rest = (self.up(offset + 1) - offset).min(u64::from(len));
            out.push(Extent::data(rest as u32));
        }
        Ok(out)
    }

    pub(crate) async fn cache(
        &self,
        dev: &dyn BlockDevice,
        offset: u64,
        len: u32,
    ) -> Result<(), DeviceError> {
        let start = self.down(offset);
        let end = self.up(offset + u64::from(len));
        let limit = u64::from(u32::MAX) / self.min * self.min;
        dev.cache(start, (end - start).min(limit) as u32).await
    }

    async fn write_pieces(
        &self,
        dev: &dyn BlockDevice,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), DeviceError> {
        let mut pos = 0usize;
        while pos < data.len() {
            let n = (data.len() - pos).min(self.max as usize);
            dev.write(offset + pos as u64, data.slice(pos..pos + n), fua)
                .await?;
            pos += n;
        }
        Ok(())
    }

    async fn read_into(
        &self,
        dev: &dyn BlockDevice,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), DeviceError> {
        let segments = dev.read(offset, dst.len() as u32).await?;
        let mut pos = 0usize;
        for seg in segments {
            match seg {
                ReadSegment::Data(b) => {
                    let n = b.len().min(dst.len() - pos);
                    dst[pos..pos + n].copy_from_slice(&b[..n]);
                    pos += b.len();
                }
                ReadSegment::Zero(n) => {
                    let n = (n as usize).min(dst.len() - pos);
                    dst[pos..pos + n].fill(0);
                    pos += n;
                }
            }
            if pos >= dst.len() {
                break;
            }
        }
        if pos != dst.len() {
            return Err(DeviceError::io(format!(
                "device returned {pos} bytes for a read of {}",
                dst.len()
            )));
        }
        Ok(())
    }
}

/// The `take` bytes after the first `skip` bytes of `segments`.
fn slice_segments(segments: Vec<ReadSegment>, mut skip: u64, take: u64) -> Vec<ReadSegment> {
    let mut out = Vec::new();
    let mut left = take;
    for seg in segments {
        if left == 0 {
            break;
        }
        let n = seg.len();
        if n <= skip {
            skip -= n;
            continue;
        }
        let from = skip;
        let k = (n - from).min(left);
        skip = 0;
        left -= k;
        out.push(match seg {
            ReadSegment::Data(b) => ReadSegment::Data(b.slice(from as usize..(from + k) as usize)),
            ReadSegment::Zero(_) => ReadSegment::Zero(k as u32),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryDevice;

    /// A memory device that fails any request breaking its 4 KiB constraints, so a test sees
    /// every request the adapter passes through.
    struct Strict(MemoryDevice);

    impl Strict {
        fn check(&self, offset: u64, len: u64, payload: bool) -> Result<(), DeviceError> {
            let size = self.0.size();
            let end = offset + len;
            if !offset.is_multiple_of(4096) || (!end.is_multiple_of(4096) && end != size) {
                return Err(DeviceError::invalid(format!("misaligned {offset}+{len}")));
            }
            if payload && len > 16384 {
                return Err(DeviceError::invalid(format!("too long {len}")));
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl BlockDevice for Strict {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn supports_trim(&self) -> bool {
            true
        }
        async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError> {
            self.check(offset, u64::from(len), true)?;
            self.0.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
            self.check(offset, data.len() as u64, true)?;
            self.0.write(offset, data, fua).await
        }
        async fn write_zeroes(
            &self,
            offset: u64,
            len: u32,
            fua: bool,
            may_trim: bool,
        ) -> Result<(), DeviceError> {
            self.check(offset, u64::from(len), false)?;
            self.0.write_zeroes(offset, len, fua, may_trim).await
        }
        async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
            self.check(offset, u64::from(len), false)?;
            self.0.trim(offset, len).await
        }
        async fn flush(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
            if !offset.is_multiple_of(4096) {
                return Err(DeviceError::invalid("misaligned status"));
            }
            self.0.block_status(offset, len).await
        }
    }

    fn flatten(segs: &[ReadSegment]) -> Vec<u8> {
        let mut v = Vec::new();
        for s in segs {
            match s {
                ReadSegment::Data(b) => v.extend_from_slice(b),
                ReadSegment::Zero(n) => v.resize(v.len() + *n as usize, 0),
            }
        }
        v
    }

    /// Random unaligned writes, zeroes, trims and reads against an oracle buffer; the size is
    /// not a multiple of the block so the short last block is exercised too.
    #[tokio::test]
    async fn unaligned_requests_match_an_oracle() {
        use rand::{Rng, SeedableRng};
        let size = 64 * 1024 + 1536;
        let dev = Strict(MemoryDevice::new(size));
        let a = Adapter::new(
            BlockSizes {
                minimum: 4096,
                preferred: 4096,
                maximum: 16384,
            },
            size,
        );
        let mut oracle = vec![0u8; size as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..2000 {
            let offset = rng.gen_range(0..size);
            let len = rng.gen_range(0..=(size - offset).min(40000));
            match rng.gen_range(0..4) {
                0 | 1 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    a.write(&dev, offset, Bytes::from(data.clone()), false)
                        .await
                        .unwrap();
                    oracle[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                }
                2 => {
                    a.write_zeroes(&dev, offset, len as u32, false, true)
                        .await
                        .unwrap();
                    oracle[offset as usize..(offset + len) as usize].fill(0);
                }
                _ => {
                    a.trim(&dev, offset, len as u32).await.unwrap();
                    // Whole blocks inside the range may now read as zeroes.
                    let got = flatten(&a.read(&dev, 0, size as u32).await.unwrap());
                    let (s, e) = (offset as usize, (offset + len) as usize);
                    oracle[s..e].copy_from_slice(&got[s..e]);
                }
            }
            let r_off = rng.gen_range(0..size);
            let r_len = rng.gen_range(0..=(size - r_off).min(40000));
            let got = a.read(&dev, r_off, r_len as u32).await.unwrap();
            assert_eq!(
                flatten(&got),
                &oracle[r_off as usize..(r_off + r_len) as usize],
                "round {round}: read {r_off}+{r_len}"
            );
        }
        let all = flatten(&a.read(&dev, 0, size as u32).await.unwrap());
        assert_eq!(all, oracle);
        let st = a.block_status(&dev, 4096 + 512, 8192).await.unwrap();
        let total: u64 = st.iter().map(|e| u64::from(e.length)).sum();
        assert!(total > 0 && total <= 8192 + 4096, "{st:?}");
    }
}
