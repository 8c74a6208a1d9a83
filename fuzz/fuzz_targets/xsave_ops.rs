//! XSAVE/XRSTOR as husk-vmm executes them for a guest kernel on hosts whose
//! emulator lacks them (`arch::xsave`): arbitrary instruction bytes,
//! registers, feature masks, vCPU state and save areas, all of which the
//! guest controls. Asserts: no panic; an instruction the decoder takes is
//! 2 to 15 bytes within those given, decodes the same from exactly its own
//! bytes, and its address is computed for any registers; XSAVE writes only
//! the requested components' bytes and the header's XSTATE_BV, which keeps
//! the bits outside the request; XRSTOR either faults leaving the vCPU state
//! unchanged, or loads state whose XSTATE_BV differs from before only in
//! requested components, and leaves every unrequested byte alone.
#![no_main]

use husk_vmm_core::arch::xsave::{decode, restore, save, Layout, Mode, HEADER, MIN_AREA};
use libfuzzer_sys::fuzz_target;

/// An AVX-512 host's layout (the offsets are the CPU's, not the guest's).
fn layout() -> Layout {
    Layout::new([(2, 576, 256), (5, 1088, 64), (6, 1152, 512), (7, 1664, 1024)])
}

const XCR0: u64 = 0xe7;
const AREA: usize = 4096;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fuzz_target!(|data: &[u8]| {
    // 16 bytes of instruction, 16 registers, RIP, FS and GS bases, the
    // EDX:EAX mask, then the vCPU state and the save area.
    if data.len() < 16 + 20 * 8 {
        return;
    }
    let (insn_bytes, rest) = data.split_at(16);
    let (words, rest) = rest.split_at(20 * 8);
    let w = |i: usize| u64_at(words, i * 8);
    let gpr: [u64; 16] = std::array::from_fn(w);
    for mode in [Mode::Long, Mode::Protected32] {
        if let Some(i) = decode(insn_bytes, mode) {
            assert!((2..=15).contains(&i.len), "length {}", i.len);
            assert_eq!(decode(&insn_bytes[..i.len], mode), Some(i), "decoded from its own bytes");
            let a = i.operand.address(&gpr, w(16).wrapping_add(i.len as u64), w(17), w(18));
            if mode == Mode::Protected32 {
                assert!(!i.operand.rip_relative && i.operand.addr32, "{i:?}");
                let _ = a;
            }
        }
    }
    let l = layout();
    let rfbm = w(19) & XCR0;
    let mut cpu = vec![0u8; AREA];
    let mut area = vec![0u8; AREA];
    let (a, b) = rest.split_at(rest.len() / 2);
    for (dst, src) in [(&mut cpu, a), (&mut area, b)] {
        let n = src.len().min(AREA);
        dst[..n].copy_from_slice(&src[..n]);
    }
    assert!(l.extent(rfbm) >= MIN_AREA && l.extent(rfbm) <= AREA);

    // XSAVE.
    let mut saved = area.clone();
    let written = save(&cpu, &mut saved, rfbm, &l);
    let mut touched = vec![false; AREA];
    for r in &written {
        touched[r.clone()].iter_mut().for_each(|t| *t = true);
    }
    for i in 0..AREA {
        if saved[i] != area[i] {
            assert!(touched[i], "XSAVE wrote byte {i} outside its ranges");
        }
    }
    let bv = u64_at(&saved, HEADER);
    assert_eq!(bv & !rfbm, u64_at(&area, HEADER) & !rfbm, "XSTATE_BV outside the request");
    assert_eq!(bv & rfbm, u64_at(&cpu, HEADER) & rfbm, "XSTATE_BV of the request");

    // XRSTOR.
    let before = cpu.clone();
    match restore(&mut cpu, &area, rfbm, XCR0, &l) {
        Err(_) => assert_eq!(cpu, before, "a faulting XRSTOR changed the state"),
        Ok(()) => {
            let new_bv = u64_at(&cpu, HEADER);
            assert_eq!(new_bv & !rfbm, u64_at(&before, HEADER) & !rfbm);
            // Bytes of components outside the request are unchanged.
            for c in [2usize, 5, 6, 7] {
                if rfbm & (1 << c) == 0 {
                    let r = match c {
                        2 => 576..832,
                        5 => 1088..1152,
                        6 => 1152..1664,
                        _ => 1664..2688,
                    };
                    assert_eq!(cpu[r.clone()], before[r], "component {c} not requested");
                }
            }
            if rfbm & 0x6 == 0 {
                assert_eq!(cpu[24..28], before[24..28], "MXCSR not requested");
            }
            assert_eq!(cpu[2688..], before[2688..], "beyond the components");
        }
    }
});
