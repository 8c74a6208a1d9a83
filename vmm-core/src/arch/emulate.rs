//! Stepping over instructions the host's emulator cannot execute.
//!
//! On hosts that run guest kernel code through KVM's instruction emulator
//! (PVM), a few instructions end in `KVM_EXIT_INTERNAL_ERROR` (emulation
//! failure) with RIP still pointing at them and the instruction bytes in the
//! exit. The handful a Linux guest may still execute after husk's CPUID
//! policy are done here: `fwait` (a no-op without pending x87 exceptions),
//! `clac`/`stac` (flip RFLAGS.AC) and register-form `popcnt`. Anything else is
//! reported as an error naming the bytes and RIP; the VM stops.

use std::fmt;

/// General registers in x86 encoding order (rax, rcx, rdx, rbx, rsp, rbp,
/// rsi, rdi, r8-r15), plus RIP and RFLAGS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Regs {
    /// rax..r15 in encoding order.
    pub gpr: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// Flags.
    pub rflags: u64,
}

const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_AC: u64 = 1 << 18;

/// The longest x86 instruction, prefixes included.
pub const MAX_INSN_LEN: usize = 15;

/// What was stepped over (for logs and counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stepped {
    /// `fwait`.
    Fwait,
    /// `clac`.
    Clac,
    /// `stac`.
    Stac,
    /// `popcnt` (register form).
    Popcnt,
}

/// An instruction this module does not handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The instruction bytes as reported by KVM.
    pub bytes: Vec<u8>,
    /// Guest RIP.
    pub rip: u64,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the host cannot emulate the guest instruction at RIP {:#x} (bytes:",
            self.rip
        )?;
        for b in &self.bytes {
            write!(f, " {b:02x}")?;
        }
        if self.bytes.is_empty() {
            write!(f, " unknown")?;
        }
        write!(f, ")")
    }
}

// Operand-size truncation is what the instruction does.
#[allow(clippy::cast_possible_truncation)]
/// Executes the instruction in `bytes` (at `regs.rip`) on `regs`, or says
/// why it cannot. On success RIP points past the instruction.
pub fn step(bytes: &[u8], regs: &mut Regs) -> Result<Stepped, Unsupported> {
    let unsupported = || Unsupported {
        bytes: bytes.to_vec(),
        rip: regs.rip,
    };
    let mut i = 0;
    let mut opsize16 = false;
    let mut rep = false;
    let mut rex = 0u8;
    // Legacy prefixes, then at most one REX right before the opcode.
    while let Some(&b) = bytes.get(i) {
        match b {
            0x66 => opsize16 = true,
            0xf3 => rep = true,
            0xf2 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x67 => {}
            _ => break,
        }
        i += 1;
    }
    if let Some(&b) = bytes.get(i) {
        if (0x40..=0x4f).contains(&b) {
            rex = b;
            i += 1;
        }
    }
    // Worked on a copy: a refused instruction leaves the registers alone.
    let mut new = *regs;
    let op = &bytes[i.min(bytes.len())..];
    let stepped = match op {
        [0x9b, ..] if !rep => {
            i += 1;
            Stepped::Fwait
        }
        [0x0f, 0x01, 0xca, ..] => {
            new.rflags &= !RFLAGS_AC;
            i += 3;
            Stepped::Clac
        }
        [0x0f, 0x01, 0xcb, ..] => {
            new.rflags |= RFLAGS_AC;
            i += 3;
            Stepped::Stac
        }
        [0x0f, 0xb8, modrm, ..] if rep && modrm >> 6 == 3 => {
            let reg = usize::from(((modrm >> 3) & 7) | ((rex & 0x4) << 1));
            let rm = usize::from((modrm & 7) | ((rex & 0x1) << 3));
            let wide = rex & 0x8 != 0;
            // REX.W wins over the 0x66 operand-size prefix.
            let opsize16 = opsize16 && !wide;
            let src = new.gpr[rm];
            let (count, zero) = if wide {
                (u64::from(src.count_ones()), src == 0)
            } else if opsize16 {
                (u64::from((src as u16).count_ones()), src as u16 == 0)
            } else {
                (u64::from((src as u32).count_ones()), src as u32 == 0)
            };
            new.gpr[reg] = if opsize16 {
                (new.gpr[reg] & !0xffff) | count
            } else {
                count
            };
            new.rflags &= !(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF);
            if zero {
                new.rflags |= RFLAGS_ZF;
            }
            i += 3;
            Stepped::Popcnt
        }
        _ => return Err(unsupported()),
    };
    if i > MAX_INSN_LEN {
        // Too many prefixes: the CPU raises #GP rather than execute it.
        return Err(unsupported());
    }
    new.rip = new.rip.wrapping_add(i as u64);
    *regs = new;
    Ok(stepped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> Regs {
        Regs {
            rip: 0x1000,
            rflags: 0x2,
            ..Default::default()
        }
    }

    #[test]
    fn fwait_is_skipped() {
        let mut r = regs();
        assert_eq!(step(&[0x9b, 0x90], &mut r), Ok(Stepped::Fwait));
        assert_eq!(r.rip, 0x1001);
    }

    #[test]
    fn clac_and_stac_flip_ac() {
        let mut r = regs();
        assert_eq!(step(&[0x0f, 0x01, 0xcb], &mut r), Ok(Stepped::Stac));
        assert_ne!(r.rflags & RFLAGS_AC, 0);
        assert_eq!(step(&[0x0f, 0x01, 0xca], &mut r), Ok(Stepped::Clac));
        assert_eq!(r.rflags & RFLAGS_AC, 0);
        assert_eq!(r.rip, 0x1006);
    }

    #[test]
    fn popcnt_64_and_32_bit() {
        let mut r = regs();
        r.gpr[1] = 0xffff_0000_0000_000f; // rcx
                                          // popcnt rax, rcx: f3 48 0f b8 c1
        assert_eq!(
            step(&[0xf3, 0x48, 0x0f, 0xb8, 0xc1], &mut r),
            Ok(Stepped::Popcnt)
        );
        assert_eq!(r.gpr[0], 20);
        assert_eq!(r.rip, 0x1005);
        // popcnt r9d, r10d: f3 45 0f b8 ca
        r.gpr[10] = 0xffff_ffff_0000_0001;
        r.gpr[9] = u64::MAX;
        assert_eq!(
            step(&[0xf3, 0x45, 0x0f, 0xb8, 0xca], &mut r),
            Ok(Stepped::Popcnt)
        );
        assert_eq!(r.gpr[9], 1);
        // popcnt of zero sets ZF.
        r.gpr[2] = 0;
        assert_eq!(step(&[0xf3, 0x0f, 0xb8, 0xc2], &mut r), Ok(Stepped::Popcnt));
        assert_eq!(r.gpr[0], 0);
        assert_ne!(r.rflags & RFLAGS_ZF, 0);
    }

    #[test]
    fn unknown_instructions_are_named() {
        let mut r = regs();
        let err = step(&[0x48, 0x0f, 0xae, 0x2f], &mut r).expect_err("xrstor");
        assert_eq!(r.rip, 0x1000);
        assert_eq!(
            err.to_string(),
            "the host cannot emulate the guest instruction at RIP 0x1000 (bytes: 48 0f ae 2f)"
        );
        // popcnt with a memory operand is not handled.
        assert!(step(&[0xf3, 0x0f, 0xb8, 0x07], &mut r).is_err());
        assert!(step(&[], &mut r).is_err());
    }

    #[test]
    fn rex_w_wins_over_the_operand_size_prefix() {
        // Found by the emulate_step fuzz target: 66 f3 48 0f b8 c1 is a
        // 64-bit popcnt rax, rcx, not a 16-bit one.
        let mut r = regs();
        r.gpr[0] = 0x6666_6666_6666_6666;
        r.gpr[1] = u64::MAX;
        assert_eq!(
            step(&[0x66, 0xf3, 0x48, 0x0f, 0xb8, 0xc1], &mut r),
            Ok(Stepped::Popcnt)
        );
        assert_eq!(r.gpr[0], 64);
    }

    #[test]
    fn instructions_longer_than_15_bytes_are_refused() {
        let mut r = regs();
        let mut bytes = vec![0x66; 14];
        bytes.push(0x9b);
        assert_eq!(step(&bytes, &mut r), Ok(Stepped::Fwait));
        assert_eq!(r.rip, 0x1000 + 15);
        bytes.insert(0, 0x3e);
        let before = r;
        assert!(step(&bytes, &mut r).is_err(), "16 bytes");
        assert_eq!(r, before, "a refused instruction changes nothing");
    }
}
