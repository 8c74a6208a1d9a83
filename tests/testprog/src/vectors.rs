//! `vector-check`: does the guest kernel keep each process's vector
//! registers across context switches, for every register class user space
//! is told it may use?
//!
//! Why: on a KVM PVM host guest user code runs natively, and CPUID and
//! XGETBV there are not intercepted. A guest kernel that switches only the
//! x87/SSE state (it cannot use XSAVE on such a host) while XCR0 still
//! enables AVX and AVX-512 lets those registers leak from one process into
//! another; glibc's string functions use them, so data got corrupted. The
//! check loads a pattern, yields the CPU to a second instance that loads a
//! different one, and reads its own back.
//!
//! Usability is decided the way glibc decides it: CPUID says the CPU has
//! the feature and XGETBV says the OS enabled its state components.

use std::arch::{asm, x86_64::__cpuid_count};

/// Which register classes user space may use here.
#[derive(Debug, Clone, Copy)]
struct Usable {
    xcr0: Option<u64>,
    avx: bool,
    avx512: bool,
}

fn usable() -> Usable {
    let l1 = __cpuid_count(1, 0);
    let l7 = __cpuid_count(7, 0);
    let osxsave = l1.ecx & (1 << 27) != 0;
    let xcr0 = if osxsave {
        // SAFETY: OSXSAVE set means the OS enabled XGETBV.
        Some(unsafe { std::arch::x86_64::_xgetbv(0) })
    } else {
        None
    };
    let x = xcr0.unwrap_or(0);
    Usable {
        xcr0,
        avx: l1.ecx & (1 << 28) != 0 && x & 0x6 == 0x6,
        avx512: l7.ebx & (1 << 16) != 0 && x & 0xe6 == 0xe6,
    }
}

fn pattern(seed: u64, round: u64, lane: u64) -> u64 {
    (seed << 48) ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (lane << 8) ^ 0x5a5a
}

/// Loads `input` into xmm0, yields, stores xmm0 back.
fn sse_round(input: &[u64; 2]) -> [u64; 2] {
    let mut out = [0u64; 2];
    // SAFETY: reads 16 bytes from `input`, writes 16 to `out`; xmm0 and the
    // registers sched_yield clobbers are declared.
    unsafe {
        asm!(
            "movdqu xmm0, [{i}]",
            "mov eax, {nr}",
            "syscall",
            "movdqu [{o}], xmm0",
            i = in(reg) input.as_ptr(),
            o = in(reg) out.as_mut_ptr(),
            nr = const libc::SYS_sched_yield,
            out("rax") _, out("rcx") _, out("r11") _, out("xmm0") _,
        );
    }
    out
}

/// Loads `input` into ymm1, yields, stores ymm1 back.
#[target_feature(enable = "avx")]
unsafe fn avx_round(input: &[u64; 4]) -> [u64; 4] {
    let mut out = [0u64; 4];
    // SAFETY: reads 32 bytes from `input`, writes 32 to `out`; the caller
    // checked that AVX is usable.
    unsafe {
        asm!(
            "vmovdqu ymm1, [{i}]",
            "mov eax, {nr}",
            "syscall",
            "vmovdqu [{o}], ymm1",
            i = in(reg) input.as_ptr(),
            o = in(reg) out.as_mut_ptr(),
            nr = const libc::SYS_sched_yield,
            out("rax") _, out("rcx") _, out("r11") _, out("ymm1") _,
        );
    }
    out
}

/// Loads `input` into zmm17 (a register only AVX-512 has) and a mask into
/// k1, yields, stores both back.
#[target_feature(enable = "avx512f")]
unsafe fn avx512_round(input: &[u64; 8], mask: u16) -> ([u64; 8], u16) {
    let mut out = [0u64; 8];
    let mut k: u32;
    // SAFETY: reads 64 bytes from `input`, writes 64 to `out`; the caller
    // checked that AVX-512 is usable.
    unsafe {
        asm!(
            "vmovdqu64 zmm17, [{i}]",
            "kmovw k1, {m:e}",
            "mov eax, {nr}",
            "syscall",
            "vmovdqu64 [{o}], zmm17",
            "kmovw {k:e}, k1",
            i = in(reg) input.as_ptr(),
            o = in(reg) out.as_mut_ptr(),
            m = in(reg) u32::from(mask),
            k = out(reg) k,
            nr = const libc::SYS_sched_yield,
            out("rax") _, out("rcx") _, out("r11") _, out("zmm17") _, out("k1") _,
        );
    }
    (out, (k & 0xffff) as u16)
}

/// Runs rounds for `secs` seconds, and on until at least `min_rounds`
/// rounds, with patterns from `seed`; prints what is usable and how many
/// rounds lost their registers. Exits 0 only if none did.
pub fn main(secs: u64, seed: u64, min_rounds: u64) -> i32 {
    let u = usable();
    let start = std::time::Instant::now();
    let (mut rounds, mut bad) = (0u64, 0u64);
    let mut report = |class: &str, round: u64, want: &[u64], got: &[u64]| {
        bad += 1;
        if bad <= 5 {
            println!("round {round}: {class} lost: want {want:x?} got {got:x?}");
        }
    };
    while start.elapsed().as_secs() < secs || rounds < min_rounds {
        rounds += 1;
        let p = |lane| pattern(seed, rounds, lane);
        let sse = [p(0), p(1)];
        let got = sse_round(&sse);
        if got != sse {
            report("sse", rounds, &sse, &got);
        }
        if u.avx {
            let want = [p(2), p(3), p(4), p(5)];
            // SAFETY: AVX is usable (CPUID and XCR0 say so).
            let got = unsafe { avx_round(&want) };
            if got != want {
                report("avx", rounds, &want, &got);
            }
        }
        if u.avx512 {
            let want = [p(6), p(7), p(8), p(9), p(10), p(11), p(12), p(13)];
            let mask = (p(14) & 0xffff) as u16;
            // SAFETY: AVX-512 is usable (CPUID and XCR0 say so).
            let (got, k) = unsafe { avx512_round(&want, mask) };
            if got != want || k != mask {
                report("avx512", rounds, &want, &got);
            }
        }
    }
    let xcr0 = u.xcr0.map_or("none".to_string(), |x| format!("{x:#x}"));
    println!(
        "vector-check: xcr0 {xcr0} avx {} avx512 {}: {rounds} rounds, {bad} lost",
        u.avx, u.avx512
    );
    i32::from(bad > 0)
}

/// Sums `buf` with AVX-512: one accumulator in zmm20 for the whole buffer,
/// kept across a `sched_yield` after every 64 vectors, so another process
/// runs while it holds a partial sum.
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(buf: &[u64]) -> u64 {
    let mut out = [0u64; 8];
    let count = buf.len() / 8;
    // SAFETY: reads `count` 64-byte vectors from `buf` (whole vectors only),
    // writes 64 bytes to `out`; the caller checked that AVX-512 is usable.
    unsafe {
        asm!(
            "vpxorq zmm20, zmm20, zmm20",
            "2:",
            "vpaddq zmm20, zmm20, [{p}]",
            "add {p}, 64",
            "dec {n}",
            "test {n}, 63",
            "jnz 3f",
            "mov eax, {nr}",
            "syscall",
            "3:",
            "test {n}, {n}",
            "jnz 2b",
            "vmovdqu64 [{o}], zmm20",
            p = inout(reg) buf.as_ptr() => _,
            n = inout(reg) count => _,
            o = in(reg) out.as_mut_ptr(),
            nr = const libc::SYS_sched_yield,
            out("rax") _, out("rcx") _, out("r11") _, out("zmm20") _,
        );
    }
    out.iter().fold(0, |a, &x| a.wrapping_add(x))
}

/// [`sum_avx512`] with AVX2 (ymm14, 32-byte vectors).
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(buf: &[u64]) -> u64 {
    let mut out = [0u64; 4];
    let count = buf.len() / 4;
    // SAFETY: as in `sum_avx512`, with 32-byte vectors; the caller checked
    // that AVX2 is usable.
    unsafe {
        asm!(
            "vpxor ymm14, ymm14, ymm14",
            "2:",
            "vpaddq ymm14, ymm14, [{p}]",
            "add {p}, 32",
            "dec {n}",
            "test {n}, 63",
            "jnz 3f",
            "mov eax, {nr}",
            "syscall",
            "3:",
            "test {n}, {n}",
            "jnz 2b",
            "vmovdqu [{o}], ymm14",
            p = inout(reg) buf.as_ptr() => _,
            n = inout(reg) count => _,
            o = in(reg) out.as_mut_ptr(),
            nr = const libc::SYS_sched_yield,
            out("rax") _, out("rcx") _, out("r11") _, out("ymm14") _,
        );
    }
    out.iter().fold(0, |a, &x| a.wrapping_add(x))
}

/// `avx-sum SECONDS SEED`: checksums 64 KiB buffers with AVX-512 (or AVX2)
/// accumulators held across yields, as a vectorised program computes, and
/// compares each sum with a scalar one, for SECONDS seconds. Prints how
/// many buffers it summed and how many sums were wrong; exits 0 only if
/// none was.
pub fn sum_main(secs: u64, seed: u64) -> i32 {
    let u = usable();
    let avx2 = u.avx && __cpuid_count(7, 0).ebx & (1 << 5) != 0;
    if !u.avx512 && !avx2 {
        println!("avx-sum: neither AVX-512 nor AVX2 is usable here");
        return 2;
    }
    let mut buf = vec![0u64; 8192];
    let start = std::time::Instant::now();
    let (mut buffers, mut wrong) = (0u64, 0u64);
    while start.elapsed().as_secs() < secs {
        buffers += 1;
        for (i, x) in buf.iter_mut().enumerate() {
            *x = pattern(seed, buffers, i as u64);
        }
        let want = buf.iter().fold(0u64, |a, &x| a.wrapping_add(x));
        // SAFETY: the feature used was checked above (CPUID and XCR0).
        let got = unsafe {
            if u.avx512 {
                sum_avx512(&buf)
            } else {
                sum_avx2(&buf)
            }
        };
        if got != want {
            wrong += 1;
            if wrong <= 5 {
                println!("buffer {buffers}: sum {got:#x}, want {want:#x}");
            }
        }
    }
    println!(
        "avx-sum: avx512 {}: {buffers} buffers, {wrong} wrong",
        u.avx512
    );
    i32::from(wrong > 0)
}
