//! The runtime helper server's code, mapped once for every fork after it.
//!
//! Each container operation forks at least once from the helper server
//! (the helper), and libcontainer forks again from the helper (its
//! intermediate and init processes). `fork` copies the page tables of a
//! mapping only if the mapping has anonymous pages: for the agent binary's
//! code and read-only data, which have none, the kernel leaves the child's
//! page tables empty and every page the child runs is mapped again by a
//! page fault (sixteen at a time). Where guest kernel code is emulated,
//! those faults were a fifth of a container's create step.
//!
//! So the server, once at start (before the template snapshot is taken),
//! maps every page of its own read-only file mappings
//! (`MADV_POPULATE_READ`) and gives each such mapping one anonymous page:
//! it writes one byte back, unchanged, through `/proc/self/mem`, which
//! copies that page as a debugger's breakpoint would, without ever making
//! the mapping writable. From then on `fork` copies those page tables, so
//! each child starts with the code it runs already mapped. The cost is one
//! private page per mapping (three here), in the server alone.
//!
//! Nothing depends on this for correctness: if any step fails the server
//! runs as before, and says so.

use std::{
    fs::OpenOptions,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

/// One line of `/proc/PID/maps` that this module cares about.
#[derive(Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// Whether the mapping is writable.
    pub writable: bool,
    /// Whether the mapping is private (copy on write).
    pub private: bool,
    /// The mapped file, if any.
    pub path: Option<PathBuf>,
}

/// Parses one `/proc/PID/maps` line; `None` for anything else.
pub fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.split_ascii_whitespace();
    let range = fields.next()?;
    let perms = fields.next()?.as_bytes();
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    if end <= start || perms.len() != 4 {
        return None;
    }
    // offset, device, inode, then the path (which may hold spaces).
    let path = fields.nth(3).map(|first| {
        let rest: Vec<&str> = std::iter::once(first).chain(fields).collect();
        PathBuf::from(rest.join(" "))
    });
    Some(Mapping {
        start,
        end,
        writable: perms[1] == b'w',
        private: perms[3] == b'p',
        path,
    })
}

/// The read-only private mappings of `exe` in a maps listing.
pub fn code_mappings(maps: &str, exe: &Path) -> Vec<Mapping> {
    maps.lines()
        .filter_map(parse_line)
        .filter(|m| !m.writable && m.private && m.path.as_deref() == Some(exe))
        .collect()
}

/// Makes this process's read-only mappings of its own executable resident
/// and copied by `fork` (see the module documentation); how many there
/// were.
///
/// Call it only while the process is single-threaded or knows no other
/// thread runs the page being rewritten: the byte written is the byte that
/// is there, but the page is replaced under any concurrent reader.
pub fn prepare() -> std::io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mappings = code_mappings(&maps, &exe);
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")?;
    for m in &mappings {
        let start = m.start as *mut libc::c_void;
        let len = m.end - m.start;
        // SAFETY: madvise only reads the kernel's view of this range, which
        // /proc/self/maps just listed as mapped; MADV_POPULATE_READ maps
        // pages and never changes their contents.
        if unsafe { libc::madvise(start, len, libc::MADV_POPULATE_READ) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let offset = m.start as u64;
        let mut byte = [0u8; 1];
        mem.read_exact_at(&mut byte, offset)?;
        mem.write_all_at(&byte, offset)?;
    }
    Ok(mappings.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_are_parsed() {
        let m = parse_line("00400000-00a52000 r-xp 00000000 00:02 12  /init with space")
            .expect("parsed");
        assert_eq!(
            m,
            Mapping {
                start: 0x40_0000,
                end: 0xa5_2000,
                writable: false,
                private: true,
                path: Some(PathBuf::from("/init with space")),
            }
        );
        let anon = parse_line("7ffd1000-7ffd2000 rw-p 00000000 00:00 0").expect("anon");
        assert!(anon.writable && anon.path.is_none());
        assert_eq!(parse_line("garbage"), None);
        assert_eq!(parse_line("2000-1000 r--p 0 00:00 0"), None);
    }

    #[test]
    fn only_read_only_private_mappings_of_the_executable_are_chosen() {
        let maps = "\
00400000-00401000 r--p 00000000 00:02 12 /init
00401000-00a52000 r-xp 00001000 00:02 12 /init
00c00000-00c10000 rw-p 00800000 00:02 12 /init
00d00000-00d10000 r--s 00000000 00:02 12 /init
7f000000-7f001000 r--p 00000000 00:02 13 /lib/other.so
";
        let chosen = code_mappings(maps, Path::new("/init"));
        let starts: Vec<usize> = chosen.iter().map(|m| m.start).collect();
        assert_eq!(starts, [0x40_0000, 0x40_1000]);
    }

    /// After `prepare`, each read-only mapping of the test binary is fully
    /// resident and holds an anonymous page: what makes `fork` copy its
    /// page tables. Runs in a child process so the test harness's own
    /// threads never see a page replaced.
    #[test]
    fn prepared_mappings_are_resident_with_an_anonymous_page() {
        let exe = std::env::current_exe().expect("exe");
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "codemap::tests::prepare_in_child",
                "--ignored",
                "--nocapture",
            ])
            .env("HUSK_CODEMAP_CHILD", "1")
            .output()
            .expect("child");
        let out = String::from_utf8_lossy(&child.stdout).into_owned();
        child.stdout.clear();
        assert!(
            child.status.success(),
            "child failed: {out}{}",
            String::from_utf8_lossy(&child.stderr)
        );
        assert!(out.contains("codemap ok"), "{out}");
    }

    #[test]
    #[ignore = "run by prepared_mappings_are_resident_with_an_anonymous_page"]
    fn prepare_in_child() {
        if std::env::var_os("HUSK_CODEMAP_CHILD").is_none() {
            return;
        }
        let done = prepare().expect("prepare");
        assert!(done >= 1, "{done} mappings");
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut checked = 0;
        let mut current: Option<Mapping> = None;
        let (mut rss, mut anon) = (None, None);
        let mut check = |m: &Option<Mapping>, rss: Option<usize>, anon: Option<usize>| {
            if let Some(m) = m
                .as_ref()
                .filter(|m| !m.writable && m.private && m.path.as_deref() == Some(exe.as_path()))
            {
                let size_kb = (m.end - m.start) / 1024;
                assert_eq!(rss, Some(size_kb), "{m:?} not fully resident");
                assert!(anon.unwrap_or(0) >= 4, "{m:?} has no anonymous page");
                checked += 1;
            }
        };
        for line in smaps.lines() {
            if let Some(m) = parse_line(line) {
                check(&current, rss, anon);
                current = Some(m);
                rss = None;
                anon = None;
                continue;
            }
            let kb = |prefix: &str| {
                line.strip_prefix(prefix)
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            };
            if let Some(v) = kb("Rss:") {
                rss = Some(v);
            } else if let Some(v) = kb("Anonymous:") {
                anon = Some(v);
            }
        }
        check(&current, rss, anon);
        assert_eq!(checked, done);
        println!("codemap ok");
    }
}
