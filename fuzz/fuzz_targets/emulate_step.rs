//! The instruction stepper (`arch::emulate::step`) on arbitrary instruction
//! bytes and registers, as KVM reports them after an emulation failure the
//! guest provoked. Asserts: no panic; a refused instruction changes no
//! register and the error carries the bytes and RIP; an accepted one moves
//! RIP forward by 1 to 15 bytes that lie within the bytes given, and changes
//! only what that instruction may change (nothing for fwait, RFLAGS.AC for
//! clac/stac, one general register and the arithmetic flags for popcnt, with
//! a result no larger than the operand width).
#![no_main]

use husk_vmm_core::arch::emulate::{step, Regs, Stepped, MAX_INSN_LEN};
use libfuzzer_sys::fuzz_target;

const AC: u64 = 1 << 18;
const ZF: u64 = 1 << 6;
const ARITH: u64 = 1 | 1 << 2 | 1 << 4 | ZF | 1 << 7 | 1 << 11;

fuzz_target!(|data: &[u8]| {
    // 18 words of registers (16 general, RIP, RFLAGS), then the bytes.
    if data.len() < 18 * 8 {
        return;
    }
    let (state, bytes) = data.split_at(18 * 8);
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&state[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    let mut regs = Regs::default();
    for (i, g) in regs.gpr.iter_mut().enumerate() {
        *g = word(i);
    }
    regs.rip = word(16);
    regs.rflags = word(17);
    let before = regs;
    match step(bytes, &mut regs) {
        Err(e) => {
            assert_eq!(regs, before, "a refused instruction changed registers");
            assert_eq!(e.bytes, bytes);
            assert_eq!(e.rip, before.rip);
        }
        Ok(stepped) => {
            let len = regs.rip.wrapping_sub(before.rip);
            assert!(
                (1..=MAX_INSN_LEN as u64).contains(&len) && len <= bytes.len() as u64,
                "RIP moved by {len} for {} bytes",
                bytes.len()
            );
            let changed: Vec<usize> = (0..16).filter(|&i| regs.gpr[i] != before.gpr[i]).collect();
            let flags = regs.rflags ^ before.rflags;
            match stepped {
                Stepped::Fwait => {
                    assert!(changed.is_empty() && flags == 0, "fwait changed state");
                }
                Stepped::Clac | Stepped::Stac => {
                    assert!(
                        changed.is_empty() && flags & !AC == 0,
                        "{stepped:?} changed more than AC"
                    );
                    let want = if stepped == Stepped::Stac { AC } else { 0 };
                    assert_eq!(regs.rflags & AC, want);
                }
                Stepped::Popcnt => {
                    assert!(changed.len() <= 1, "popcnt changed {changed:?}");
                    assert_eq!(flags & !ARITH, 0, "popcnt changed non-arithmetic flags");
                    assert_eq!(
                        regs.rflags & (ARITH & !ZF),
                        0,
                        "popcnt clears CF, PF, AF, SF, OF"
                    );
                    if let Some(&r) = changed.first() {
                        // The destination holds the count: in all of it (32-
                        // and 64-bit forms) or in its low 16 bits, the rest
                        // unchanged (16-bit form).
                        let v = regs.gpr[r];
                        let low16 = (v ^ before.gpr[r]) >> 16 == 0;
                        assert!(
                            v <= 64 || (low16 && v & 0xffff <= 16),
                            "popcnt result {v:#x}"
                        );
                        let count = if v <= 64 { v } else { v & 0xffff };
                        assert_eq!(
                            regs.rflags & ZF != 0,
                            count == 0,
                            "ZF is set exactly for a zero count"
                        );
                    }
                }
            }
        }
    }
});
