//! Speed of the archive pipelines (compress → encrypt → hash on write, the reverse on read) per
//! codec × encryption, on real 16 MiB WAL segments from a pgbench run, per core (the
//! single-threaded encoder/decoder) and on a 1 GiB stream through the parallel async pipeline
//! using every core. `benches/codec-reference.sh` runs this and prints the figures beside the C
//! tools' speeds on the same data. Also measures the AES-256-GCM and SHA-256 stages alone, to
//! compare with `openssl speed` (that is how the hardware AES and SHA paths are checked).

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use pgpilot_common::archive::{
    ArchiveKey, Codec, FileChunks, KeyRing, ReadOptions, WriteOptions, decode, decode_sync, encode,
    encode_sync,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

const CHUNK: usize = 1 << 20;
const STREAM_LEN: u64 = 1 << 30;
const CODECS: [(&str, Codec); 4] = [
    ("none", Codec::None),
    ("zstd-1", Codec::Zstd { level: 1 }),
    ("lz4", Codec::Lz4),
    ("gzip-6", Codec::Gzip { level: 6 }),
];

fn workspace_target() -> PathBuf {
    pgpilot_test_support::tools::workspace_root().join("target")
}

/// Four real WAL segments, generated once by PostgreSQL 15 + pgbench and cached.
fn segments() -> Vec<Vec<u8>> {
    let dir = workspace_target().join("bench-data/wal");
    let paths = pgpilot_test_support::wal::segments_in(&dir, 4)
        .expect("real WAL segments (PostgreSQL 15 + pgbench)");
    paths
        .iter()
        .map(|p| std::fs::read(p).expect("read segment"))
        .collect()
}

fn keys(encrypted: bool) -> KeyRing {
    if encrypted {
        KeyRing::new(vec![ArchiveKey::new("bench", [7; 32]).expect("key")]).expect("ring")
    } else {
        KeyRing::empty()
    }
}

fn label(name: &str, encrypted: bool) -> String {
    format!("{name}_{}", if encrypted { "aes" } else { "plain" })
}

fn write_opts(codec: Codec, concurrency: usize) -> WriteOptions {
    WriteOptions {
        codec,
        chunk_size: CHUNK,
        concurrency,
    }
}

/// Per core: the single-threaded encoder and decoder over four 16 MiB segments.
fn per_core(c: &mut Criterion) {
    let segs = segments();
    let total: u64 = segs.iter().map(|s| s.len() as u64).sum();
    let mut ratios = serde_json::Map::new();
    for (name, codec) in CODECS {
        for encrypted in [false, true] {
            let keys = keys(encrypted);
            let opts = write_opts(codec, 1);
            let encoded: Vec<Vec<u8>> = segs
                .iter()
                .map(|s| {
                    let mut out = Vec::new();
                    encode_sync("bench", s.as_slice(), &mut out, &keys, &opts).expect("encode");
                    out
                })
                .collect();
            let stored: u64 = encoded.iter().map(|e| e.len() as u64).sum();
            if !encrypted {
                ratios.insert(
                    name.to_owned(),
                    serde_json::json!(stored as f64 / total as f64),
                );
            }
            let mut g = c.benchmark_group("segment-write");
            g.throughput(Throughput::Bytes(total))
                .sample_size(10)
                .warm_up_time(Duration::from_secs(1));
            g.measurement_time(Duration::from_secs(3));
            g.bench_function(label(name, encrypted), |b| {
                b.iter(|| {
                    for s in &segs {
                        encode_sync("bench", s.as_slice(), io::sink(), &keys, &opts)
                            .expect("encode");
                    }
                })
            });
            g.finish();
            let mut g = c.benchmark_group("segment-read");
            g.throughput(Throughput::Bytes(total))
                .sample_size(10)
                .warm_up_time(Duration::from_secs(1));
            g.measurement_time(Duration::from_secs(3));
            g.bench_function(label(name, encrypted), |b| {
                b.iter(|| {
                    for e in &encoded {
                        decode_sync(
                            "bench",
                            e.as_slice(),
                            io::sink(),
                            &keys,
                            &ReadOptions::default(),
                        )
                        .expect("decode");
                    }
                })
            });
            g.finish();
        }
    }
    let out = workspace_target().join("bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(
        out.join("codec-ratios.json"),
        serde_json::to_vec_pretty(&ratios).expect("json"),
    )
    .expect("write ratios");
}

/// The stages alone, on one segment: SHA-256, and AES-256-GCM sealing 1 MiB records, each with
/// the crate the archive format uses (`sha2`, `ring`) and the alternative (`ring`, `aes-gcm`).
fn stages(c: &mut Criterion) {
    let segs = segments();
    let seg = &segs[0];
    let mut g = c.benchmark_group("stage");
    g.throughput(Throughput::Bytes(seg.len() as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(2));
    g.bench_function("sha256", |b| b.iter(|| Sha256::digest(seg)));
    g.bench_function("sha256-ring", |b| {
        b.iter(|| ring::digest::digest(&ring::digest::SHA256, seg))
    });
    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[9u8; 32]).expect("key"),
    );
    let mut buf = seg.clone();
    g.bench_function("aes-256-gcm", |b| {
        b.iter(|| {
            for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
                let _tag = ring_key
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(nonce),
                        ring::aead::Aad::from(b"aad"),
                        chunk,
                    )
                    .expect("seal");
            }
        })
    });
    let cipher = Aes256Gcm::new(&[9u8; 32].into());
    g.bench_function("aes-256-gcm-crate", |b| {
        b.iter(|| {
            for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
                cipher
                    .encrypt_in_place_detached(&Nonce::from(nonce), b"aad", chunk)
                    .expect("seal");
            }
        })
    });
    g.finish();
}

/// Cycles through the segments until `remaining` bytes were produced: a long WAL-like stream
/// without holding it in memory.
struct CycleReader {
    segs: Arc<Vec<Vec<u8>>>,
    seg: usize,
    pos: usize,
    remaining: u64,
}

impl AsyncRead for CycleReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.remaining == 0 {
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        let seg = &this.segs[this.seg];
        let n = buf
            .remaining()
            .min(seg.len() - this.pos)
            .min(this.remaining as usize);
        buf.put_slice(&seg[this.pos..this.pos + n]);
        this.pos += n;
        this.remaining -= n as u64;
        if this.pos == seg.len() {
            this.pos = 0;
            this.seg = (this.seg + 1) % this.segs.len();
        }
        Poll::Ready(Ok(()))
    }
}

/// A 1 GiB stream through the async pipeline with every core.
fn stream(c: &mut Criterion) {
    let segs = Arc::new(segments());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = runtime(cores);
    let dir = workspace_target().join("bench-data");
    for (name, codec) in CODECS {
        if matches!(codec, Codec::Gzip { .. }) {
            continue; // ~10 s per GiB per core: too slow to sample, and the per-segment figures cover it
        }
        let keys = keys(true);
        let opts = write_opts(codec, cores);
        let reader = || CycleReader {
            segs: segs.clone(),
            seg: 0,
            pos: 0,
            remaining: STREAM_LEN,
        };
        let mut g = c.benchmark_group(format!("stream-{cores}cores"));
        g.throughput(Throughput::Bytes(STREAM_LEN))
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat);
        g.warm_up_time(Duration::from_millis(1))
            .measurement_time(Duration::from_secs(20));
        g.bench_function(format!("write_{}", label(name, true)), |b| {
            b.iter(|| {
                rt.block_on(encode(
                    "bench",
                    reader(),
                    &mut tokio::io::sink(),
                    &keys,
                    &opts,
                ))
                .expect("encode")
            })
        });
        // The archive of the stream, on disk (page cache) for the read benchmark.
        let file = dir.join(format!("stream-{name}.pgpa"));
        rt.block_on(async {
            let mut f = tokio::fs::File::create(&file).await.expect("create");
            encode("bench", reader(), &mut f, &keys, &opts)
                .await
                .expect("encode to file");
        });
        let read_opts = ReadOptions {
            require_encryption: true,
            concurrency: cores,
            recompute_digests: false,
        };
        g.bench_function(format!("read_{}", label(name, true)), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let f = tokio::io::BufReader::with_capacity(
                        1 << 20,
                        tokio::fs::File::open(&file).await.expect("open"),
                    );
                    decode("bench", f, &mut tokio::io::sink(), &keys, &read_opts)
                        .await
                        .expect("decode")
                })
            })
        });
        g.finish();
        let _ = std::fs::remove_file(&file);
    }
}

/// A multi-threaded runtime with one worker per core.
fn runtime(cores: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()
        .expect("runtime")
}

/// One 16 MiB segment from a file (page cache) through the async pipeline with every core, as
/// `wal-push` encodes it: the codec part of P1's latency (the rest is process start, the API
/// round trip and the store's fsync).
fn segment_latency(c: &mut Criterion) {
    let segs = segments();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = runtime(cores);
    let file = workspace_target()
        .join("bench-data")
        .join("segment-latency.wal");
    std::fs::write(&file, &segs[0]).expect("write segment");
    let mut g = c.benchmark_group(format!("segment-{cores}cores"));
    g.throughput(Throughput::Bytes(segs[0].len() as u64))
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for encrypted in [false, true] {
        let keys = keys(encrypted);
        let opts = write_opts(Codec::Zstd { level: 1 }, cores);
        g.bench_function(
            format!("write_from_memory_{}", label("zstd1", encrypted)),
            |b| {
                b.iter(|| {
                    rt.block_on(encode(
                        "bench",
                        &segs[0][..],
                        &mut tokio::io::sink(),
                        &keys,
                        &opts,
                    ))
                    .expect("encode")
                })
            },
        );
        g.bench_function(format!("write_{}", label("zstd1", encrypted)), |b| {
            b.iter(|| {
                let f = FileChunks::new(std::fs::File::open(&file).expect("open"));
                rt.block_on(encode("bench", f, &mut tokio::io::sink(), &keys, &opts))
                    .expect("encode")
            })
        });
    }
    g.finish();
    let _ = std::fs::remove_file(&file);
}

criterion_group!(benches, stages, segment_latency, per_core, stream);
criterion_main!(benches);
