//! The monitor's resident memory. A monitor is a fork of the whole berthd
//! executable; creating a container runs code a monitor never runs again,
//! and the kernel maps file pages around every fault, so its RSS ends up
//! counting megabytes of berthd's (and libc's) code it will not touch.
//! Unmapping those pages once the container is set up leaves only the ones
//! the poll loop faults back in: RSS per container falls to what it uses.

use std::ffi::c_void;
use std::ptr::NonNull;

use nix::sys::mman::{MmapAdvise, madvise};

/// Drops this process's mappings of read-only file pages: code, constants,
/// unwind tables. Only private mappings without write permission and
/// without a single page of their own (no copy-on-write copy, as relocated
/// data has) qualify: their pages never differ from the file, so the next
/// access reads them back from the page cache.
pub fn release_code_pages() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let mut candidate: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some(range) = mapping_header(line) {
            candidate = range;
        } else if let Some(anon) = line.strip_prefix("Anonymous:") {
            let own_pages = anon.trim().trim_end_matches("kB").trim() != "0";
            if let (Some((start, end)), false) = (candidate.take(), own_pages) {
                drop_pages(start, end);
            }
        }
    }
}

/// The range of a smaps mapping header that is a read-only private file
/// mapping; Some(None) for any other header, None for other lines.
fn mapping_header(line: &str) -> Option<Option<(usize, usize)>> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let (start, end) = range.split_once('-')?;
    let (Ok(start), Ok(end)) = (
        usize::from_str_radix(start, 16),
        usize::from_str_radix(end, 16),
    ) else {
        return None;
    };
    let perms = fields.next().unwrap_or("");
    // offset, dev, inode, then the path: a file's starts with '/'.
    let path = fields.nth(3).unwrap_or("");
    let read_only = perms == "r-xp" || perms == "r--p";
    Some((read_only && path.starts_with('/')).then_some((start, end)))
}

fn drop_pages(start: usize, end: usize) {
    let Some(addr) = NonNull::new(start as *mut c_void) else {
        return;
    };
    // SAFETY: the range is a whole mapping of this process, private, never
    // writable, holding no page of its own (checked by the caller), so
    // dropping its pages loses nothing: they fault back in from the file.
    let _ = unsafe { madvise(addr, end - start, MmapAdvise::MADV_DONTNEED) };
}
