//! How the mapped model file lies in this process's memory: how much of it is resident, and
//! how much of that is mapped in 2 MiB pages (`confab bench` reports both).
//!
//! Why: decoding streams every weight once per token, and on a 2-core VM here two threads read
//! a mapped file at 22–25 GB/s in 4 KiB pages and 29–36 GB/s in 2 MiB ones (a plain read
//! loop, 2026-12-07). Which one a run gets depends on how the page cache took the file in
//! (on Linux 6.18 with ext4, a file read whole landed in 2 MiB pages; one just written, or
//! faulted in piecemeal by a first run, mostly in 4 KiB ones), not on confab's code, so two
//! decode figures of a memory-bound CPU compare only beside this.

use serde::Serialize;
use std::path::Path;

/// The model file's mappings in this process, summed (from `/proc/self/smaps`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MappedPages {
    /// Resident bytes of the file's mappings, MiB.
    pub resident_mib: f64,
    /// The share of those resident bytes mapped in 2 MiB pages (0 to 1).
    pub huge_page_share: f64,
}

/// The mappings of `path` in this process, or `None` where there is no `/proc/self/smaps`
/// (not Linux) or the file is not mapped.
pub fn mapped_pages(path: &Path) -> Option<MappedPages> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let path = std::fs::canonicalize(path).ok()?;
    parse(&smaps, path.to_str()?)
}

/// Sums the entries of `smaps` (the `/proc/PID/smaps` format) whose path is `path`.
fn parse(smaps: &str, path: &str) -> Option<MappedPages> {
    let (mut rss_kib, mut pmd_kib, mut found) = (0u64, 0u64, false);
    let mut inside = false;
    for line in smaps.lines() {
        // An entry starts with its address range: "start-end perms offset dev inode path".
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = entry_path(line) == Some(path);
            found |= inside;
            continue;
        }
        if !inside {
            continue;
        }
        let kib = fields
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match first {
            "Rss:" => rss_kib += kib,
            "FilePmdMapped:" => pmd_kib += kib,
            _ => {}
        }
    }
    found.then(|| MappedPages {
        resident_mib: rss_kib as f64 / 1024.0,
        huge_page_share: if rss_kib == 0 {
            0.0
        } else {
            pmd_kib as f64 / rss_kib as f64
        },
    })
}

/// The path of an entry's first line: everything after its fifth field (it may contain
/// spaces; anonymous mappings have none).
fn entry_path(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..5 {
        rest = rest.trim_start();
        rest = &rest[rest.find(char::is_whitespace)?..];
    }
    Some(rest.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7efd11200000-7efd47e1e000 r--s 00000000 fe:00 2164973                    /models/a b.gguf
Size:             897144 kB
Rss:              875384 kB
FilePmdMapped:    786432 kB
VmFlags: rd sh mr mw me ms hg
7efd47e1e000-7efd48000000 r--p 00000000 fe:00 2164974                    /models/other.gguf
Size:               1024 kB
Rss:                1024 kB
FilePmdMapped:      1024 kB
VmFlags: rd mr mw me
7efd48000000-7efd48200000 r--s 00000000 fe:00 2164973                    /models/a b.gguf
Size:               2048 kB
Rss:                2048 kB
FilePmdMapped:         0 kB
VmFlags: rd sh mr mw me ms hg
";

    #[test]
    fn sums_the_files_entries_only() {
        let p = parse(SMAPS, "/models/a b.gguf").unwrap();
        assert_eq!(p.resident_mib, (875384 + 2048) as f64 / 1024.0);
        assert_eq!(p.huge_page_share, 786432.0 / (875384 + 2048) as f64);
        let other = parse(SMAPS, "/models/other.gguf").unwrap();
        assert_eq!(other.resident_mib, 1.0);
        assert_eq!(other.huge_page_share, 1.0);
        assert_eq!(parse(SMAPS, "/models/none.gguf"), None);
    }

    /// The real `/proc/self/smaps`: a mapped file shows up resident once read, and not at
    /// all once unmapped.
    #[test]
    fn a_mapped_file_shows_up_resident() {
        if !Path::new("/proc/self/smaps").exists() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.bin");
        std::fs::write(&path, vec![7u8; 4 << 20]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the file is this test's own and is not modified while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let sum: u64 = map.iter().step_by(4096).map(|&b| b as u64).sum();
        assert_eq!(sum, 7 * 1024);
        let pages = mapped_pages(&path).expect("the file is mapped");
        assert!(pages.resident_mib > 0.0, "{pages:?}");
        assert!(pages.resident_mib <= 4.0, "{pages:?}");
        assert!((0.0..=1.0).contains(&pages.huge_page_share), "{pages:?}");
        drop(map);
        assert_eq!(mapped_pages(&path), None, "unmapped");
    }
}
