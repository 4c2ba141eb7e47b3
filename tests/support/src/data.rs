//! Generated test data: deterministic pseudo-random bytes and fake WAL segments.

use crate::wal::SEGMENT_SIZE;

/// Deterministic pseudo-random bytes (xorshift): incompressible, the same for the same seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A 16 MiB segment of random bytes, different on every call (seeded from the clock).
pub fn random_segment() -> Vec<u8> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    random_bytes(SEGMENT_SIZE as usize, seed)
}
