//! Turns counted samples into what people read: folded stacks (the input of
//! flame graph tools), an SVG flame graph, and a table of the kernel
//! functions: the samples taken in each one (self) and the samples with it
//! anywhere on the stack (total, the function and what it called).

use std::{collections::HashMap, fmt::Write as _, io::Write as _, path::Path};

use super::{symbols::Symbols, Sample};

/// A symbolized profile.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    /// "frame;frame;...;frame COUNT" lines, outermost frame first, sorted.
    pub folded: Vec<String>,
    /// Every function sampled, busiest (by self) first, with `[user]` as
    /// one line.
    pub top: Vec<Row>,
    /// All samples.
    pub samples: u64,
    /// Samples in the guest kernel.
    pub kernel: u64,
    /// Samples lost for want of room (too many distinct stacks).
    pub dropped: u64,
}

/// One function's share of a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The function, `[user]`, or an address no symbol covers.
    pub name: String,
    /// Samples taken in the function itself.
    pub own: u64,
    /// Samples with the function anywhere on the stack (itself and its
    /// callees); a recursive function counts once per sample.
    pub total: u64,
}

/// `path` with `suffix` appended to its file name (`p` + `.svg`).
pub(super) fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    std::path::PathBuf::from(p)
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
    let mut rows: HashMap<String, (u64, u64)> = HashMap::new();
    let mut report = Report {
        dropped,
        ..Report::default()
    };
    for (sample, &n) in counts {
        report.samples += n;
        let line = match sample {
            Sample::User(cr3) => {
                let row = rows.entry("[user]".into()).or_default();
                row.0 += n;
                row.1 += n;
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
                    rows.entry(leaf.clone()).or_default().0 += n;
                }
                let mut seen: Vec<&str> = Vec::with_capacity(names.len());
                for name in &names {
                    if !seen.contains(&name.as_str()) {
                        seen.push(name);
                        rows.entry(name.clone()).or_default().1 += n;
                    }
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
    report.top = rows
        .into_iter()
        .map(|(name, (own, total))| Row { name, own, total })
        .collect();
    report.top.sort_by(|a, b| {
        b.own
            .cmp(&a.own)
            .then_with(|| b.total.cmp(&a.total))
            .then_with(|| a.name.cmp(&b.name))
    });
    report
}

impl Report {
    /// Two tables: the `n` functions with the most samples of their own
    /// (where the time is spent), then the `n` with the most samples on
    /// their stack (which paths spend it). Percentages are of all samples.
    pub fn table(&self, n: usize) -> String {
        let pct = |count: u64| {
            if self.samples == 0 {
                0.0
            } else {
                count as f64 * 100.0 / self.samples as f64
            }
        };
        let mut out = format!(
            "{} samples, {} in the guest kernel, {} dropped\n\nbusiest functions (self)\n{:>8} {:>6} {:>8} {:>6}  function\n",
            self.samples, self.kernel, self.dropped, "self", "%", "total", "%"
        );
        let line = |out: &mut String, r: &Row| {
            let _ = writeln!(
                out,
                "{:>8} {:>6.2} {:>8} {:>6.2}  {}",
                r.own,
                pct(r.own),
                r.total,
                pct(r.total),
                r.name
            );
        };
        for r in self.top.iter().take(n) {
            line(&mut out, r);
        }
        let _ = write!(
            out,
            "\nbusiest paths (total: the function and its callees)\n{:>8} {:>6} {:>8} {:>6}  function\n",
            "self", "%", "total", "%"
        );
        let mut by_total: Vec<&Row> = self.top.iter().collect();
        by_total.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.name.cmp(&b.name)));
        for r in by_total.into_iter().take(n) {
            line(&mut out, r);
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
        let with = |ext: &str| with_suffix(path, ext);
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
        let row = |name: &str, own, total| Row {
            name: name.to_string(),
            own,
            total,
        };
        assert_eq!(
            r.top,
            [
                row("[user]", 10, 10),
                row("__x64_sys_getppid", 6, 6),
                row("do_syscall_64", 3, 9),
                row("0xffffffff82000000", 1, 1),
                row("entry_SYSCALL_64", 0, 6),
            ]
        );
        let table = r.table(2);
        assert!(table.starts_with("20 samples, 10 in the guest kernel, 2 dropped"));
        let (own, paths) = table.split_once("busiest paths").expect("two parts");
        assert!(
            own.contains("       6  30.00        6  30.00  __x64_sys_getppid"),
            "{table}"
        );
        assert!(!own.contains("do_syscall_64"), "only the top 2: {table}");
        assert!(
            paths.contains("       3  15.00        9  45.00  do_syscall_64"),
            "{table}"
        );
        assert!(!paths.contains("getppid"), "only the top 2: {table}");
    }

    #[test]
    fn recursion_counts_once_on_the_stack() {
        let counts = HashMap::from([(
            Sample::Kernel(vec![
                0xffff_ffff_8100_0110,
                0xffff_ffff_8100_0110,
                0xffff_ffff_8100_0010,
            ]),
            4,
        )]);
        let r = build(&counts, 0, &Symbols::parse(MAP));
        let d = r
            .top
            .iter()
            .find(|r| r.name == "do_syscall_64")
            .expect("row");
        assert_eq!((d.own, d.total), (4, 4));
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
