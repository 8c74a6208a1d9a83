//! Turns counted samples into what people read: folded stacks (the input of
//! flame graph tools), an SVG flame graph, and a table of the kernel
//! functions samples were taken in.

use std::{collections::HashMap, fmt::Write as _, io::Write as _, path::Path};

use super::{symbols::Symbols, Sample};

/// A symbolized profile.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    /// "frame;frame;...;frame COUNT" lines, outermost frame first, sorted.
    pub folded: Vec<String>,
    /// (function, samples in it), most first: the kernel's own time by
    /// function, then `[user]` as one line.
    pub top: Vec<(String, u64)>,
    /// All samples.
    pub samples: u64,
    /// Samples in the guest kernel.
    pub kernel: u64,
    /// Samples lost for want of room (too many distinct stacks).
    pub dropped: u64,
}

/// The name of a code address: its function, or the address itself.
fn frame(symbols: &Symbols, addr: u64) -> String {
    symbols
        .name(addr)
        .map_or_else(|| format!("{addr:#x}"), str::to_string)
}

/// Names and folds `counts`. Return addresses are looked up one byte back,
/// so that a call at the very end of a function names that function.
pub fn build(counts: &HashMap<Sample, u64>, dropped: u64, symbols: &Symbols) -> Report {
    let mut folded: HashMap<String, u64> = HashMap::new();
    let mut by_function: HashMap<String, u64> = HashMap::new();
    let mut report = Report {
        dropped,
        ..Report::default()
    };
    for (sample, &n) in counts {
        report.samples += n;
        let line = match sample {
            Sample::User(cr3) => {
                *by_function.entry("[user]".into()).or_default() += n;
                format!("[user cr3={cr3:#x}]")
            }
            Sample::Kernel(pcs) => {
                report.kernel += n;
                let names: Vec<String> = pcs
                    .iter()
                    .enumerate()
                    .map(|(i, &pc)| frame(symbols, if i == 0 { pc } else { pc.wrapping_sub(1) }))
                    .collect();
                if let Some(leaf) = names.first() {
                    *by_function.entry(leaf.clone()).or_default() += n;
                }
                let mut outer_first = names;
                outer_first.reverse();
                format!("[kernel];{}", outer_first.join(";"))
            }
        };
        *folded.entry(line).or_default() += n;
    }
    report.folded = folded
        .into_iter()
        .map(|(stack, n)| format!("{stack} {n}"))
        .collect();
    report.folded.sort();
    report.top = by_function.into_iter().collect();
    report
        .top
        .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    report
}

impl Report {
    /// The table of the `n` functions with the most samples.
    pub fn table(&self, n: usize) -> String {
        let mut out = format!(
            "{} samples, {} in the guest kernel, {} dropped\n{:>8} {:>6}  function\n",
            self.samples, self.kernel, self.dropped, "samples", "%"
        );
        for (name, count) in self.top.iter().take(n) {
            let pct = if self.samples == 0 {
                0.0
            } else {
                *count as f64 * 100.0 / self.samples as f64
            };
            let _ = writeln!(out, "{count:>8} {pct:>6.2}  {name}");
        }
        out
    }

    /// The flame graph as SVG.
    pub fn svg(&self, title: &str) -> std::io::Result<Vec<u8>> {
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = title.to_string();
        let mut svg = Vec::new();
        inferno::flamegraph::from_lines(
            &mut opts,
            self.folded.iter().map(String::as_str),
            &mut svg,
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(svg)
    }

    /// Writes `path` (folded stacks), `path.svg` and `path.top` (the
    /// table of the 40 busiest functions). With no samples there is no
    /// flame graph to draw: the SVG is skipped and the table says so.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let with = |ext: &str| {
            let mut p = path.as_os_str().to_owned();
            p.push(ext);
            std::path::PathBuf::from(p)
        };
        let mut folded = std::fs::File::create(path)?;
        for line in &self.folded {
            writeln!(folded, "{line}")?;
        }
        std::fs::File::create(with(".top"))?.write_all(self.table(40).as_bytes())?;
        if !self.folded.is_empty() {
            std::fs::File::create(with(".svg"))?.write_all(&self.svg("husk guest profile")?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
ffffffff81000000 T entry_SYSCALL_64
ffffffff81000100 T do_syscall_64
ffffffff81000200 T __x64_sys_getppid
ffffffff81000300 T _etext
";

    fn counts() -> HashMap<Sample, u64> {
        HashMap::from([
            // getppid called from do_syscall_64 called from the entry;
            // the second return address is the last byte of the caller.
            (
                Sample::Kernel(vec![
                    0xffff_ffff_8100_0210,
                    0xffff_ffff_8100_0150,
                    0xffff_ffff_8100_0100,
                ]),
                6,
            ),
            (Sample::Kernel(vec![0xffff_ffff_8100_0120]), 3),
            (Sample::Kernel(vec![0xffff_ffff_8200_0000]), 1),
            (Sample::User(0x1234_5000), 10),
        ])
    }

    #[test]
    fn samples_are_named_folded_and_ranked() {
        let r = build(&counts(), 2, &Symbols::parse(MAP));
        assert_eq!((r.samples, r.kernel, r.dropped), (20, 10, 2));
        assert_eq!(
            r.folded,
            [
                "[kernel];0xffffffff82000000 1",
                "[kernel];do_syscall_64 3",
                "[kernel];entry_SYSCALL_64;do_syscall_64;__x64_sys_getppid 6",
                "[user cr3=0x12345000] 10",
            ]
        );
        assert_eq!(r.top[0], ("[user]".to_string(), 10));
        assert_eq!(r.top[1], ("__x64_sys_getppid".to_string(), 6));
        assert_eq!(r.top[2], ("do_syscall_64".to_string(), 3));
        let table = r.table(2);
        assert!(table.starts_with("20 samples, 10 in the guest kernel, 2 dropped"));
        assert!(
            table.contains("       6  30.00  __x64_sys_getppid"),
            "{table}"
        );
        assert!(!table.contains("do_syscall_64"), "only the top 2: {table}");
    }

    #[test]
    fn the_flame_graph_is_an_svg_of_the_stacks() {
        let r = build(&counts(), 0, &Symbols::parse(MAP));
        let svg = String::from_utf8(r.svg("t").expect("svg")).expect("utf-8");
        assert!(svg.starts_with("<?xml"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("__x64_sys_getppid"));
        let dir = std::env::temp_dir().join(format!("husk-prof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("guest.folded");
        r.write(&path).expect("write");
        for f in ["guest.folded", "guest.folded.svg", "guest.folded.top"] {
            assert!(dir.join(f).metadata().expect(f).len() > 0, "{f}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
