//! The data `husk-testprog rand` writes, shared with the tests on the host
//! so they can check every byte that came out of a container.

/// The byte stream `husk-testprog rand` writes: xorshift64* from `seed`,
/// 8 little-endian bytes per step.
pub fn stream(seed: u64) -> impl Iterator<Item = [u8; 8]> {
    let mut x = seed | 1;
    std::iter::repeat_with(move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    })
}

/// The first `len` bytes of [`stream`] for `seed`.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = stream(seed).take(len.div_ceil(8)).flatten().collect();
    v.truncate(len);
    v
}

/// FNV-1a (64 bit), fed in pieces: a checksum the tests and
/// `husk-testprog hold` / `sum` agree on.
#[derive(Debug, Clone, Copy)]
pub struct Checksum(u64);

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    /// The checksum of nothing.
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The checksum so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// [`Checksum`] of `data`.
pub fn checksum(data: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(data);
    c.value()
}
