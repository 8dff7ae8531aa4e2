//! Payload writes that bypass the page cache, on a thread of their own: the VHDX writer's, and
//! the qcow2 writer's in `blockvault-restore`.
//!
//! Adjacent payload writes are gathered in an aligned buffer and written with `O_DIRECT`. The
//! write runs on a second thread while the caller fills the next buffer: written in place, each
//! 4 MiB write held up the export until the disk had it, and making the buffer larger made the
//! export slower (docs/BENCHMARKS.md, "Exports are bound by the disk"). Writes go out in the order
//! they were gathered. Where the file system refuses a direct write, that write and every later
//! one go through the page cache instead.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Bytes gathered for one direct write.
pub const STAGE: usize = 4 << 20;
/// What `O_DIRECT` needs aligned: file offsets, lengths and buffer addresses.
pub const DIRECT_ALIGN: usize = 4096;
/// Buffers: one being filled, the rest written or waiting to be.
const BUFFERS: usize = 3;

/// An aligned buffer and the bytes gathered in it.
struct Buffer {
    bytes: Vec<u8>,
    /// Where the aligned part of `bytes` starts.
    start: usize,
    /// File offset of the gathered bytes, and how many there are.
    at: u64,
    len: usize,
}

impl Buffer {
    fn new() -> Option<Self> {
        let bytes = vec![0u8; STAGE + DIRECT_ALIGN];
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN);
        (start < DIRECT_ALIGN).then_some(Self {
            bytes,
            start,
            at: 0,
            len: 0,
        })
    }

    fn gathered(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }
}

/// A write that failed: where (`None` when the writing itself could not go on), and why.
#[derive(Debug)]
pub struct Failed {
    pub at: Option<u64>,
    pub error: io::Error,
}

impl From<Failed> for io::Error {
    /// The error of the write that found it, which names its own offset.
    fn from(f: Failed) -> Self {
        match f.at {
            Some(at) => io::Error::new(
                f.error.kind(),
                format!("direct write at file offset {at}: {}", f.error),
            ),
            None => f.error,
        }
    }
}

/// Gathers aligned payload bytes and writes them on the writing thread.
pub struct StagedWrites {
    filling: Buffer,
    free: Vec<Buffer>,
    jobs: Option<SyncSender<Buffer>>,
    done: Receiver<(Buffer, io::Result<()>)>,
    in_flight: usize,
    thread: Option<JoinHandle<()>>,
    failed: Option<Failed>,
}

impl StagedWrites {
    /// Starts the writing thread for `direct` (opened with `O_DIRECT`); `buffered` is a plain
    /// handle on the same file for writes the file system refuses to take directly. `None` when
    /// no aligned buffer can be had or the thread cannot start.
    pub fn start(direct: File, buffered: File) -> Option<Self> {
        let filling = Buffer::new()?;
        let (jobs, inbox) = sync_channel::<Buffer>(BUFFERS);
        let (report, done) = sync_channel(BUFFERS);
        let thread = std::thread::Builder::new()
            .name("vhdx-writes".into())
            .spawn(move || {
                let mut refused = false;
                for buf in inbox {
                    let bytes = buf.gathered();
                    let mut result = if refused {
                        buffered.write_all_at(bytes, buf.at)
                    } else {
                        direct.write_all_at(bytes, buf.at)
                    };
                    if matches!(&result, Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()))
                    {
                        // The file system takes the flag at open but not the write.
                        refused = true;
                        result = buffered.write_all_at(bytes, buf.at);
                    }
                    if report.send((buf, result)).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Self {
            filling,
            free: Vec::new(),
            jobs: Some(jobs),
            done,
            in_flight: 0,
            thread: Some(thread),
            failed: None,
        })
    }

    /// Staged writes for the file at `path`, which `file` has open for writing: a second handle
    /// opened with `O_DIRECT`. `None` where the file system does not take the flag.
    pub fn open(path: &std::path::Path, file: &File) -> Option<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .ok()?;
        Self::start(direct, file.try_clone().ok()?)
    }

    /// Adds `data` (aligned in offset and length) at file offset `at`; sends full buffers, and a
    /// buffer `data` does not continue, to the writing thread.
    pub fn add(&mut self, mut data: &[u8], mut at: u64) -> Result<(), Failed> {
        if self.filling.len > 0 && self.filling.at + self.filling.len as u64 != at {
            self.send()?;
        }
        while !data.is_empty() {
            let b = &mut self.filling;
            if b.len == 0 {
                b.at = at;
            }
            let n = data.len().min(STAGE - b.len);
            let from = b.start + b.len;
            b.bytes[from..from + n].copy_from_slice(&data[..n]);
            b.len += n;
            (data, at) = (&data[n..], at + n as u64);
            if b.len == STAGE {
                self.send()?;
            }
        }
        Ok(())
    }

    /// Sends what is gathered to the writing thread, first waiting for a buffer to come back
    /// when every other one is still being written.
    fn send(&mut self) -> Result<(), Failed> {
        if self.filling.len == 0 {
            return self.check();
        }
        let next = match self.free.pop() {
            Some(b) => b,
            None if self.in_flight + 1 < BUFFERS => Buffer::new().ok_or_else(no_buffer)?,
            None => self.wait_one()?,
        };
        let full = std::mem::replace(&mut self.filling, next);
        let Some(jobs) = &self.jobs else {
            return Err(stopped());
        };
        jobs.send(full).map_err(|_| stopped())?;
        self.in_flight += 1;
        self.check()
    }

    /// Waits for one write to end and gives its buffer back, emptied.
    fn wait_one(&mut self) -> Result<Buffer, Failed> {
        let (mut buf, result) = self.done.recv().map_err(|_| stopped())?;
        self.in_flight -= 1;
        if let Err(error) = result {
            self.failed.get_or_insert(Failed {
                at: Some(buf.at),
                error,
            });
        }
        buf.len = 0;
        Ok(buf)
    }

    fn check(&mut self) -> Result<(), Failed> {
        match self.failed.take() {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// Writes out everything gathered and waits until every write has ended: after this, a
    /// write through another handle cannot be overtaken by one of these.
    pub fn drain(&mut self) -> Result<(), Failed> {
        self.send()?;
        while self.in_flight > 0 {
            let b = self.wait_one()?;
            self.free.push(b);
        }
        self.check()
    }
}

impl Drop for StagedWrites {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has written what it holds.
        self.jobs = None;
        while self.in_flight > 0 && self.done.recv().is_ok() {
            self.in_flight -= 1;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn stopped() -> Failed {
    Failed {
        at: None,
        error: io::Error::other("the payload writing thread stopped"),
    }
}

fn no_buffer() -> Failed {
    Failed {
        at: None,
        error: io::Error::other("no aligned buffer for direct writes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;

    /// A file of `len` bytes in a temporary directory, and staged writes to it.
    fn staged(len: u64) -> (tempfile::TempDir, std::path::PathBuf, StagedWrites) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        File::create(&path).unwrap().set_len(len).unwrap();
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.write(true);
            if direct {
                o.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
            }
            o.open(&path).unwrap()
        };
        let w = StagedWrites::start(open(true), open(false)).unwrap();
        (dir, path, w)
    }

    #[test]
    fn gathered_writes_land_in_order_across_buffers() {
        let (_dir, path, mut w) = staged(64 << 20);
        let piece = |i: usize| vec![(i % 251) as u8 + 1; 256 << 10];
        // 40 adjacent pieces (10 MiB, more than every buffer together), then a jump, then a
        // rewrite of the first piece that must land after the first write of it.
        for i in 0..40 {
            w.add(&piece(i), (i as u64) * (256 << 10)).unwrap();
        }
        w.add(&piece(100), 32 << 20).unwrap();
        w.add(&piece(7), 0).unwrap();
        w.drain().unwrap();
        drop(w);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[..256 << 10], &piece(7)[..]);
        for i in 1..40 {
            let at = i * (256 << 10);
            assert_eq!(&back[at..at + (256 << 10)], &piece(i)[..], "piece {i}");
        }
        assert_eq!(&back[32 << 20..(32 << 20) + (256 << 10)], &piece(100)[..]);
        assert!(back[10 << 20..32 << 20].iter().all(|b| *b == 0));
    }

    #[test]
    fn a_refused_direct_write_goes_through_the_page_cache() {
        let (_dir, path, mut w) = staged(1 << 20);
        // An offset O_DIRECT refuses (EINVAL): that write, and the aligned one after it, land
        // through the plain handle.
        w.add(&[5u8; 4096], 100).unwrap();
        w.drain().unwrap();
        w.add(&[6u8; 4096], 8192).unwrap();
        w.drain().unwrap();
        drop(w);
        let back = std::fs::read(&path).unwrap();
        assert!(back[100..4196].iter().all(|b| *b == 5));
        assert!(back[8192..12288].iter().all(|b| *b == 6));
        assert!(back[..100].iter().chain(&back[4196..8192]).all(|b| *b == 0));
    }

    #[test]
    fn a_failed_write_is_reported_with_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        File::create(&path).unwrap();
        // Read-only handles: every write fails, directly and through the page cache.
        let ro = || File::open(&path).unwrap();
        let mut w = StagedWrites::start(ro(), ro()).unwrap();
        w.add(&vec![1u8; 8192], 1 << 20).unwrap();
        let f = w.drain().expect_err("the write cannot succeed");
        assert_eq!(f.at, Some(1 << 20));
    }
}
