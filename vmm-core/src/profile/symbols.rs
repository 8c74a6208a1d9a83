//! Guest kernel symbols from `System.map`, for naming sampled addresses.
//!
//! `System.map` is written by the kernel build beside `vmlinux` (the guest
//! image installs it there): one "ADDRESS TYPE NAME" line per symbol. Only
//! code symbols (types `t`, `T`, `w`, `W`) are kept; an address names the
//! closest code symbol at or below it, up to the end of kernel text
//! (`_etext`, or `_einittext` for the boot-time code after it).

/// The guest kernel's code symbols, sorted by address.
#[derive(Debug, Default)]
pub struct Symbols {
    /// (address, name), ascending.
    code: Vec<(u64, String)>,
    /// Where kernel code is: [first symbol, `_etext`) and
    /// [`_sinittext`, `_einittext`) (boot-time code).
    text: Vec<(u64, u64)>,
}

impl Symbols {
    /// Parses `System.map` text; lines that do not parse are skipped.
    pub fn parse(text: &str) -> Self {
        let mut code = Vec::new();
        let mut marks = std::collections::HashMap::new();
        for line in text.lines() {
            let mut it = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            if matches!(name, "_etext" | "_sinittext" | "_einittext") {
                marks.insert(name, addr);
            }
            if matches!(kind, "t" | "T" | "w" | "W") {
                code.push((addr, name.to_string()));
            }
        }
        // Of several names for one address the last listed is kept: the
        // section markers (`_text`, `_stext`) come before the function.
        code.reverse();
        code.sort_by_key(|(a, _)| *a);
        code.dedup_by_key(|(a, _)| *a);
        let first = code.first().map_or(0, |(a, _)| *a);
        let last = code.last().map_or(0, |(a, _)| a.saturating_add(4096));
        let mut text = vec![(first, marks.get("_etext").copied().unwrap_or(last))];
        if let (Some(&s), Some(&e)) = (marks.get("_sinittext"), marks.get("_einittext")) {
            text.push((s, e));
        }
        Self { code, text }
    }

    /// How many code symbols there are.
    pub fn len(&self) -> usize {
        self.code.len()
    }

    /// Whether there are none (no `System.map`, or an empty one).
    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }

    /// Whether `addr` is in kernel code.
    pub fn is_text(&self, addr: u64) -> bool {
        !self.code.is_empty() && self.text.iter().any(|&(s, e)| addr >= s && addr < e)
    }

    /// The function `addr` is in.
    pub fn name(&self, addr: u64) -> Option<&str> {
        if !self.is_text(addr) {
            return None;
        }
        let i = self.code.partition_point(|(a, _)| *a <= addr);
        self.code.get(i.checked_sub(1)?).map(|(_, n)| n.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
0000000000000000 A VDSO32_PRELINK
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81001000 t do_one_initcall
ffffffff81002000 T __x64_sys_getppid
ffffffff81002040 W weak_thing
ffffffff81003000 D some_data
ffffffff81004000 T _etext
ffffffff82000000 D init_task
ffffffff83000000 T _sinittext
ffffffff83000000 T start_kernel
ffffffff83001000 T _einittext
garbage line
";

    #[test]
    fn addresses_name_the_code_symbol_at_or_below_them() {
        let s = Symbols::parse(MAP);
        assert_eq!(s.name(0xffff_ffff_8100_2000), Some("__x64_sys_getppid"));
        assert_eq!(s.name(0xffff_ffff_8100_203f), Some("__x64_sys_getppid"));
        assert_eq!(s.name(0xffff_ffff_8100_2041), Some("weak_thing"));
        assert_eq!(s.name(0xffff_ffff_8100_0010), Some("startup_64"));
        // Data symbols are not functions: the code before them names it.
        assert_eq!(s.name(0xffff_ffff_8100_3010), Some("weak_thing"));
        // Outside kernel text: no name.
        assert_eq!(s.name(0xffff_ffff_8100_4000), None);
        assert_eq!(s.name(0xffff_ffff_8200_0000), None);
        // Boot-time code after _etext, up to _einittext.
        assert_eq!(s.name(0xffff_ffff_8300_0010), Some("start_kernel"));
        assert_eq!(s.name(0xffff_ffff_8300_1000), None);
        assert_eq!(s.name(0x40_1000), None);
        assert!(s.is_text(0xffff_ffff_8100_1234) && !s.is_text(0x1000));
        assert_eq!(
            s.len(),
            7,
            "_text/startup_64 and _sinittext/start_kernel share"
        );
        assert!(Symbols::parse("").is_empty());
    }
}
