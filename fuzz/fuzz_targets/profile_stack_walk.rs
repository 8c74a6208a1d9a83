//! The guest profiler's kernel stack walk (`profile::walk_kernel_stack`)
//! over guest memory the guest controls entirely (its stack, its RBP), and
//! the report built from what it returns. Asserts: no panic; the walk ends
//! (at most `MAX_DEPTH` frames) and starts at the sampled RIP; every frame
//! after it is a kernel address; the report counts the sample once.
#![no_main]

use std::collections::HashMap;

use husk_vmm_core::profile::{
    is_kernel_address, report, symbols::Symbols, walk_kernel_stack, GuestStack, Sample, MAX_DEPTH,
};
use libfuzzer_sys::fuzz_target;

/// A window of guest stack at `BASE`, one word per 8 bytes of input.
struct Window<'a> {
    words: &'a [u8],
}

const BASE: u64 = 0xffff_c900_0000_0000;

impl GuestStack for Window<'_> {
    fn read_u64(&mut self, gva: u64) -> Option<u64> {
        let off = usize::try_from(gva.checked_sub(BASE)?).ok()?;
        let bytes = self.words.get(off..off.checked_add(8)?)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let (regs, words) = data.split_at(16);
    let rip = u64::from_le_bytes(regs[..8].try_into().unwrap_or_default());
    let rbp = u64::from_le_bytes(regs[8..].try_into().unwrap_or_default());
    // Half the inputs aim RBP into the window, so chains get followed.
    let rbp = if rbp & 1 == 0 {
        BASE + (rbp >> 1) % (words.len() as u64 + 8)
    } else {
        rbp
    };
    let pcs = walk_kernel_stack(rip, rbp, &mut Window { words });
    assert!(!pcs.is_empty() && pcs.len() <= MAX_DEPTH);
    assert_eq!(pcs[0], rip);
    assert!(pcs[1..].iter().all(|&a| is_kernel_address(a)));
    let counts = HashMap::from([(Sample::Kernel(pcs), 1u64)]);
    let symbols = Symbols::parse(
        "ffffffff81000000 T _text\nffffffff81000100 T f\nffffffff81001000 T _etext\n",
    );
    let r = report::build(&counts, 0, &symbols);
    assert_eq!((r.samples, r.kernel, r.folded.len()), (1, 1, 1));
});
