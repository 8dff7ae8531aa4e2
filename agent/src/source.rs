//! Disk sources for the backup pipeline: a VHDX file through the agent's reader, or anything else
//! as a raw image. The format is recognised by content (the `vhdxfile` signature), never by the
//! file name, because Hyper-V hosts name checkpoint files `.avhdx` and users rename images.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use blockvault_chunker::RangeSet;
use blockvault_engine::{DiskSource, RawFile};
use blockvault_repo::SourceInfo;

use crate::vhdx::{Error, VhdxDisk, VhdxOpenOptions};

/// The first eight bytes of every VHDX file (MS-VHDX 2.2.1).
const VHDX_SIGNATURE: &[u8; 8] = b"vhdxfile";

/// A VHDX disk (with its parent chain) as a backup source.
pub struct VhdxSource {
    disk: VhdxDisk,
    path: String,
}

impl VhdxSource {
    pub fn open(path: &Path, opts: &VhdxOpenOptions) -> Result<Self, Error> {
        Ok(Self {
            disk: VhdxDisk::open(path, opts)?,
            path: path.display().to_string(),
        })
    }

    pub fn disk(&self) -> &VhdxDisk {
        &self.disk
    }
}

impl DiskSource for VhdxSource {
    fn size(&self) -> u64 {
        self.disk.virtual_size()
    }

    fn allocated(&self) -> io::Result<RangeSet> {
        Ok(RangeSet::from_ranges(self.disk.allocated_ranges()))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // The reader's error names the file, the structure and its offset; keep that text.
        self.disk.read_at(offset, buf).map_err(io::Error::other)
    }

    fn disk_id(&self) -> Option<String> {
        Some(self.disk.disk_id().to_string())
    }

    fn describe(&self) -> SourceInfo {
        SourceInfo {
            format: "vhdx".into(),
            path: self.path.clone(),
            logical_sector_size: Some(self.disk.logical_sector_size()),
        }
    }
}

/// The format `open_disk` recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Vhdx,
    Raw,
}

/// Whether `path` starts with the VHDX file identifier.
pub fn detect_format(path: &Path) -> Result<DiskFormat, Error> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|e| Error::io(&name, "file", 0, e))?;
    let mut sig = [0u8; 8];
    let mut got = 0;
    // A short file (or a block device returning short reads) is simply not a VHDX.
    while got < sig.len() {
        match f.read(&mut sig[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(&name, "file identifier", 0, e)),
        }
    }
    Ok(if got == sig.len() && &sig == VHDX_SIGNATURE {
        DiskFormat::Vhdx
    } else {
        DiskFormat::Raw
    })
}

/// Opens a disk image as a backup source: VHDX when the file carries the VHDX signature, a raw
/// image otherwise.
pub fn open_disk(path: &Path, opts: &VhdxOpenOptions) -> Result<Arc<dyn DiskSource>, Error> {
    match detect_format(path)? {
        DiskFormat::Vhdx => Ok(Arc::new(VhdxSource::open(path, opts)?)),
        DiskFormat::Raw => {
            let raw = RawFile::open(path)
                .map_err(|e| Error::io(&path.display().to_string(), "file", 0, e))?;
            Ok(Arc::new(raw))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhdx::VhdxWriter;

    #[test]
    fn detects_vhdx_and_falls_back_to_raw() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("d.vhdx");
        let mut w = VhdxWriter::create(&v, 8 << 20, 1 << 20, 512).unwrap();
        w.write_at(3 << 20, &[7u8; 4096]).unwrap();
        w.finish().unwrap();
        let src = open_disk(&v, &VhdxOpenOptions::default()).unwrap();
        assert_eq!(src.describe().format, "vhdx");
        assert_eq!(src.describe().logical_sector_size, Some(512));
        assert_eq!(src.size(), 8 << 20);
        assert!(src.allocated().unwrap().contains(3 << 20));
        assert!(!src.allocated().unwrap().contains(0));
        let mut b = [0u8; 4];
        src.read_at(3 << 20, &mut b).unwrap();
        assert_eq!(b, [7; 4]);

        let r = dir.path().join("d.raw");
        std::fs::write(&r, b"vhdxfil").unwrap();
        let src = open_disk(&r, &VhdxOpenOptions::default()).unwrap();
        assert_eq!(src.describe().format, "raw");
        assert_eq!(src.size(), 7);
    }

    #[test]
    fn damaged_vhdx_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("bad.vhdx");
        let mut image = b"vhdxfile".to_vec();
        image.resize(70 * 1024, 0);
        std::fs::write(&v, image).unwrap();
        let e = open_disk(&v, &VhdxOpenOptions::default())
            .err()
            .expect("a VHDX without headers must be refused")
            .to_string();
        assert!(e.contains("bad.vhdx"), "{e}");
    }
}
