//! The byte pattern of stream checks: cheap, deterministic, not compressible
//! by accident, and the same on both ends for a given seed.

/// Fills `buf` with the pattern continuing from `state`; returns the new
/// state. Start with `state = seed | 1`.
pub fn fill(buf: &mut [u8], mut state: u64) -> u64 {
    for chunk in buf.chunks_mut(8) {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_across_chunkings() {
        let mut a = vec![0u8; 64];
        fill(&mut a, 7);
        let mut b = vec![0u8; 64];
        let s = fill(&mut b[..32], 7);
        fill(&mut b[32..], s);
        assert_eq!(a, b);
        let mut c = vec![0u8; 64];
        fill(&mut c, 9);
        assert_ne!(a, c);
    }
}
