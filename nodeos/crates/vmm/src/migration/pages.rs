//! Guest memory through its memfd: page reads and writes with `pread`/
//! `pwrite` (one kernel copy, no per-byte loop), and the holes of pages the
//! guest never touched, which the first pass sends as zero ranges without
//! reading them.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMem;

pub const PAGE: u64 = 4096;

/// One RAM region: guest address, length, offset in the memfd.
#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    len: u64,
    offset: u64,
}

/// Guest memory's file and where each region lies in it.
#[derive(Debug)]
pub struct MemoryFile {
    file: File,
    regions: Vec<Region>,
}

impl MemoryFile {
    /// The memfd behind `mem` (every region of guest memory is backed by it).
    pub fn new(mem: &GuestMem) -> std::io::Result<Self> {
        let mut file = None;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let fo =
                r.file_offset().ok_or_else(|| std::io::Error::other("guest memory region without a file"))?;
            if file.is_none() {
                file = Some(fo.file().try_clone()?);
            }
            regions.push(Region { gpa: r.start_addr().raw_value(), len: r.len(), offset: fo.start() });
        }
        let file = file.ok_or_else(|| std::io::Error::other("guest memory has no regions"))?;
        Ok(Self { file, regions })
    }

    /// Guest memory, bytes.
    pub fn len(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file offset of the page at `gpa`, if it is a whole page of RAM.
    pub fn offset_of(&self, gpa: u64) -> Option<u64> {
        if !gpa.is_multiple_of(PAGE) {
            return None;
        }
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(PAGE).is_some_and(|end| end <= r.gpa + r.len))
            .map(|r| r.offset + (gpa - r.gpa))
    }

    pub fn read_page(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let off = self.offset_of(gpa).ok_or_else(|| std::io::Error::other(format!("{gpa:#x} is not RAM")))?;
        self.file.read_exact_at(&mut buf[..PAGE as usize], off)
    }

    pub fn write_page(&self, gpa: u64, page: &[u8]) -> std::io::Result<()> {
        let off = self.offset_of(gpa).ok_or_else(|| std::io::Error::other(format!("{gpa:#x} is not RAM")))?;
        self.file.write_all_at(&page[..PAGE as usize], off)
    }

    /// Every RAM page as (guest address, holds data): pages in holes of the
    /// file were never written and read as zero.
    pub fn pages_with_data(&self) -> Vec<(u64, bool)> {
        let mut out = Vec::with_capacity((self.len() / PAGE) as usize);
        for r in &self.regions {
            let data = self.data_ranges(r.offset, r.len);
            // Both ascending: walk them together.
            let mut next = 0;
            for i in 0..r.len / PAGE {
                let off = r.offset + i * PAGE;
                while next < data.len() && data[next].1 <= off {
                    next += 1;
                }
                let has = data.get(next).is_some_and(|(s, _)| off >= *s);
                out.push((r.gpa + i * PAGE, has));
            }
        }
        out
    }

    /// Data ranges (start, end) of the file within `offset..offset+len`
    /// (`SEEK_DATA`/`SEEK_HOLE`); on any error, the whole range.
    fn data_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        use std::os::fd::AsRawFd;
        let end = offset + len;
        let fd = self.file.as_raw_fd();
        let mut ranges = Vec::new();
        let mut pos = offset;
        while pos < end {
            // SAFETY: lseek on a descriptor this struct owns; no memory is touched.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    break; // No data after pos.
                }
                return vec![(offset, end)];
            }
            let data = data as u64;
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            if hole < 0 {
                return vec![(offset, end)];
            }
            let hole = (hole as u64).min(end);
            ranges.push((data - data % PAGE, hole));
            pos = hole;
        }
        ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn pages_map_to_the_file_and_holes_are_found() {
        let (mem, _file) = crate::memory::create(16).unwrap();
        mem.write_obj(0xabu8, GuestAddress(0x5010)).unwrap();
        let f = MemoryFile::new(&mem).unwrap();
        assert_eq!(f.len(), 16 << 20);
        let with_data: Vec<u64> = f.pages_with_data().into_iter().filter(|p| p.1).map(|p| p.0).collect();
        assert!(with_data.contains(&0x5000), "{with_data:x?}");
        assert!(with_data.len() < 64, "the untouched rest is a hole: {}", with_data.len());
        let mut page = vec![0u8; 4096];
        f.read_page(0x5000, &mut page).unwrap();
        assert_eq!(page[0x10], 0xab);
        page[0] = 9;
        f.write_page(0x7000, &page).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x7000)).unwrap(), 9);
        assert!(f.offset_of(0x7001).is_none());
        assert!(f.offset_of(16 << 20).is_none());
        assert!(f.read_page(1 << 40, &mut page).is_err());
    }
}
