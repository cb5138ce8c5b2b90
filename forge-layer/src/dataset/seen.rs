//! A fixed-size Bloom filter of line hashes: duplicate detection in flat memory.

/// 2^27 bits (16 MiB): at a million distinct lines, fewer than one in 50,000 is mistaken for a
/// duplicate; the memory does not grow with the number of lines.
const BITS: usize = 1 << 27;

/// Remembers which line hashes were seen.
#[derive(Debug)]
pub struct Seen {
    bits: Vec<u64>,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            bits: vec![0; BITS / 64],
        }
    }
}

impl Seen {
    /// Marks `hash` seen; returns whether it (probably) was seen before.
    pub fn insert(&mut self, hash: &[u8; 32]) -> bool {
        let mut present = true;
        // Three independent probes from disjoint 8-byte slices of a SHA-256.
        for chunk in hash.chunks_exact(8).take(3) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let bit = (u64::from_le_bytes(word) as usize) % BITS;
            let (slot, mask) = (bit / 64, 1u64 << (bit % 64));
            if let Some(w) = self.bits.get_mut(slot) {
                present &= *w & mask != 0;
                *w |= mask;
            }
        }
        present
    }
}
