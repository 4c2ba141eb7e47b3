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

/// [`random_segment`] that starts with the long page header of WAL segment `name` (16 MiB
/// segments) of database system `system_identifier`, as the agent's fetcher requires of a
/// restored segment (pgpilot_common::wal::check_segment).
pub fn random_segment_named(name: &str, system_identifier: u64) -> Vec<u8> {
    let mut data = random_segment();
    let seg = pgpilot_common::wal::WalFile::parse(name, SEGMENT_SIZE)
        .and_then(|f| f.segment())
        .expect("a segment name");
    data[..40].fill(0);
    data[2..4].copy_from_slice(&0x0002u16.to_ne_bytes()); // XLP_LONG_HEADER
    data[4..8].copy_from_slice(&seg.timeline.to_ne_bytes());
    data[8..16].copy_from_slice(&seg.start_lsn(SEGMENT_SIZE).0.to_ne_bytes());
    data[24..32].copy_from_slice(&system_identifier.to_ne_bytes());
    data[32..36].copy_from_slice(&(SEGMENT_SIZE as u32).to_ne_bytes());
    data[36..40].copy_from_slice(&8192u32.to_ne_bytes());
    data
}

/// Rows 1..=n of the restore tests' table `t (id, payload)` as they are written (payload
/// `row-<id>`): their count and the md5 of `id:payload` in id order, computed by `sql`'s server.
pub async fn expected_rows(sql: &tokio_postgres::Client, n: i64) -> (i64, String) {
    let row = sql
        .query_one(
            "SELECT count(*), coalesce(md5(string_agg(g::text || ':row-' || g, ',' ORDER BY g)), '') FROM generate_series(1, $1::bigint) g",
            &[&n],
        )
        .await
        .expect("computing the expected rows");
    (row.get(0), row.get(1))
}

/// What table `t` holds, in the form of [`expected_rows`].
pub async fn table_rows(sql: &tokio_postgres::Client) -> (i64, String) {
    let row = sql
        .query_one("SELECT count(*), coalesce(md5(string_agg(id::text || ':' || payload, ',' ORDER BY id)), '') FROM t", &[])
        .await
        .expect("reading table t");
    (row.get(0), row.get(1))
}
