//! The store test suite, run against every backend by agent/tests/store_{file,s3,azure,gcs}.rs:
//! round trips for every codec × encryption on random data and real WAL segments, every tamper
//! case, interrupted uploads, create-only semantics, listing.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use pgpilot_agent::store::{PutMode, PutOutcome, Store, StoreConfig, StoreError};
use pgpilot_common::archive::{ArchiveError, Compression, Part};
pub use pgpilot_test_support::data::random_bytes;
use tokio::io::{AsyncRead, ReadBuf};

pub const CHUNK: usize = 1 << 20;

/// Writes a 32-byte hex key file and returns its `id=path` spec.
pub fn key_file(dir: &Path, id: &str, seed: u8) -> String {
    let path = dir.join(format!("key-{id}-{seed}"));
    let hex: String = (0..32u8)
        .map(|i| format!("{:02x}", i.wrapping_mul(31).wrapping_add(seed)))
        .collect();
    pgpilot_test_support::write_secret(&path, format!("{hex}\n")).unwrap();
    format!("{id}={}", path.display())
}

/// A copy of `base` with this codec and these keys, and small thresholds so that multipart
/// uploads are exercised by objects of a few MiB.
pub fn variant(base: &StoreConfig, compression: Compression, keys: &[String]) -> StoreConfig {
    StoreConfig {
        compression,
        encryption_key_files: keys.to_vec(),
        chunk_size: CHUNK,
        multipart_threshold: 6 << 20,
        part_size: 5 << 20,
        codec_threads: Some(2),
        upload_concurrency: 2,
        ..base.clone()
    }
}

const CODECS: [Compression; 4] = [
    Compression::None,
    Compression::Zstd,
    Compression::Lz4,
    Compression::Gzip,
];

async fn round_trip(store: &Store, key: &str, data: &[u8]) {
    let put = store
        .put(key, data, PutMode::Overwrite)
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
    assert_eq!(put.plaintext_len, data.len() as u64);
    let info = store
        .head(key)
        .await
        .unwrap()
        .expect("object exists after put");
    assert_eq!(info.size, put.stored_len, "{key}: stored size");
    let mut back = Vec::new();
    let got = store
        .get(key, &mut back)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"));
    assert!(back == data, "{key}: content differs after round trip");
    assert_eq!(got.digest, put.digest);
    assert_eq!(store.verify(key).await.unwrap().object_id, put.object_id);
}

/// Every codec × encryption on/off, on random data (including an empty object and one large
/// enough for a multipart upload) and on real WAL segments.
pub async fn round_trips(base: &StoreConfig, key_dir: &Path) {
    let wal = pgpilot_test_support::wal::segments(2).expect("real WAL segments");
    let keys = vec![key_file(key_dir, "k1", 1)];
    for encrypted in [false, true] {
        for (ci, compression) in CODECS.into_iter().enumerate() {
            let cfg = variant(base, compression, if encrypted { &keys } else { &[] });
            let store = Store::open(&cfg).unwrap();
            let tag = format!("{compression}-{}", if encrypted { "enc" } else { "plain" });
            round_trip(&store, &format!("rt/{tag}/empty"), &[]).await;
            round_trip(&store, &format!("rt/{tag}/small"), b"hello, archive").await;
            round_trip(
                &store,
                &format!("rt/{tag}/random"),
                &random_bytes(3 * CHUNK + 17, ci as u64),
            )
            .await;
            // One WAL segment per combination (alternating) keeps the suite quick; each codec
            // still sees a real segment with and without encryption.
            let segment = std::fs::read(&wal[ci % wal.len()]).unwrap();
            round_trip(
                &store,
                &format!("rt/{tag}/000000010000000000000001"),
                &segment,
            )
            .await;
            // put_file / get_to_file, the paths wal-push and wal-fetch use.
            let key = format!("rt/{tag}/file");
            let source = key_dir.join(format!("source-{tag}"));
            std::fs::write(&source, random_bytes(2 * CHUNK + 9, 40 + ci as u64)).unwrap();
            let outcome = store
                .put_file(&key, &source, PutMode::CreateOnly)
                .await
                .unwrap();
            assert!(matches!(outcome, PutOutcome::Stored(_)));
            let target = key_dir.join(format!("fetched-{tag}"));
            store.get_to_file(&key, &target).await.unwrap();
            assert!(std::fs::read(&target).unwrap() == std::fs::read(&source).unwrap());
        }
    }
    // Large enough to go through multipart (stored > 6 MiB threshold, parts of 5 MiB).
    let cfg = variant(base, Compression::Lz4, &keys);
    let store = Store::open(&cfg).unwrap();
    round_trip(&store, "rt/multipart", &random_bytes(13 * CHUNK + 5, 99)).await;
    // Three multipart uploads at once share the store's 2 parts in flight (one each, waiting
    // for its part before sending the next): each object comes back whole.
    let datas: Vec<Vec<u8>> = (0..3)
        .map(|i| random_bytes(17 * CHUNK + i, 70 + i as u64))
        .collect();
    let keys: Vec<String> = (0..3).map(|i| format!("rt/multipart-{i}")).collect();
    futures::future::join_all(
        keys.iter()
            .zip(&datas)
            .map(|(key, data)| round_trip(&store, key, data)),
    )
    .await;
}

fn records(stored: &[u8]) -> Vec<(usize, usize)> {
    let mut pos = 49 + stored[48] as usize + 4;
    let mut out = Vec::new();
    while pos < stored.len() {
        let len = u32::from_le_bytes(stored[pos + 1..pos + 5].try_into().unwrap()) as usize;
        out.push((pos, len + 5));
        pos += len + 5;
    }
    out
}

fn archive_err(r: Result<pgpilot_common::archive::ArchiveSummary, StoreError>) -> ArchiveError {
    match r {
        Err(StoreError::Archive(e)) => e,
        other => panic!("expected an archive error, got {other:?}"),
    }
}

fn is_integrity(e: &ArchiveError, encrypted: bool, at: Part) -> bool {
    if encrypted {
        matches!(e, ArchiveError::AuthenticationFailed { part, .. } if *part == at)
    } else {
        matches!(e, ArchiveError::ChecksumMismatch { part, .. } if *part == at)
    }
}

/// Stores `tampered` under `key` and checks that reading it fails as `expect` says, naming the
/// object.
async fn refused(
    store: &Store,
    key: &str,
    label: &str,
    tampered: Vec<u8>,
    expect: impl Fn(&ArchiveError) -> bool,
) {
    store.put_raw(key, Bytes::from(tampered)).await.unwrap();
    let err = archive_err(store.verify(key).await);
    assert!(expect(&err), "{label}: unexpected error {err}");
    let object = store.object_name(key);
    assert!(
        err.to_string().contains(&object),
        "{label}: error does not name {object}: {err}"
    );
    let mut sink = Vec::new();
    assert!(
        store.get(key, &mut sink).await.is_err(),
        "{label}: get must fail too"
    );
}

/// Each tamper case refused with the right error, for encrypted and unencrypted objects.
pub async fn tamper_cases(base: &StoreConfig, key_dir: &Path) {
    let keys = vec![key_file(key_dir, "k1", 1)];
    for encrypted in [false, true] {
        let cfg = variant(base, Compression::Zstd, if encrypted { &keys } else { &[] });
        let store = Store::open(&cfg).unwrap();
        let data = random_bytes(4 * CHUNK + 100, 7);
        let key = format!("tamper/{encrypted}/obj");
        store
            .put(&key, data.as_slice(), PutMode::Overwrite)
            .await
            .unwrap();
        let original = store.get_raw(&key).await.unwrap();
        let recs = records(&original);
        assert_eq!(recs.len(), 6);
        let integrity = |at: Part| move |e: &ArchiveError| is_integrity(e, encrypted, at);
        let mut t = original.to_vec();
        t[20] ^= 1;
        refused(&store, &key, "byte flipped in header", t, |e| {
            matches!(
                e,
                ArchiveError::ChecksumMismatch {
                    part: Part::Header,
                    ..
                }
            )
        })
        .await;
        let mut t = original.to_vec();
        t[recs[2].0 + 100] ^= 0x10;
        refused(
            &store,
            &key,
            "byte flipped in chunk",
            t,
            integrity(Part::Chunk(2)),
        )
        .await;
        let mut t = original.to_vec();
        t[recs[5].0 + 9] ^= 0x01;
        refused(
            &store,
            &key,
            "byte flipped in trailer",
            t,
            integrity(Part::Trailer),
        )
        .await;
        let truncated = |e: &ArchiveError| matches!(e, ArchiveError::Truncated { .. });
        refused(
            &store,
            &key,
            "truncated",
            original[..original.len() - 10].to_vec(),
            truncated,
        )
        .await;
        refused(
            &store,
            &key,
            "truncated at a record boundary",
            original[..recs[5].0].to_vec(),
            truncated,
        )
        .await;
        let mut t = original[..recs[1].0].to_vec();
        t.extend_from_slice(&original[recs[2].0..recs[3].0]);
        t.extend_from_slice(&original[recs[1].0..recs[2].0]);
        t.extend_from_slice(&original[recs[3].0..]);
        refused(&store, &key, "swapped chunks", t, integrity(Part::Chunk(1))).await;
        // A chunk from another object with the same content, written by the same store.
        store
            .put("tamper/other", data.as_slice(), PutMode::Overwrite)
            .await
            .unwrap();
        let other = store.get_raw("tamper/other").await.unwrap();
        let orecs = records(&other);
        let mut t = original[..recs[3].0].to_vec();
        t.extend_from_slice(&other[orecs[3].0..orecs[3].0 + orecs[3].1]);
        t.extend_from_slice(&original[recs[4].0..]);
        refused(
            &store,
            &key,
            "chunk from another object",
            t,
            integrity(Part::Chunk(3)),
        )
        .await;

        // Archive format 2: the last 32 bytes of a chunk's body are the SHA-256 of its content,
        // just before the CRC (4 bytes) or the GCM tag (16). One of them edited.
        let tail = if encrypted { 16 } else { 4 };
        let mut t = original.to_vec();
        t[recs[2].0 + 5 + recs[2].1 - tail - 7] ^= 0x01;
        refused(
            &store,
            &key,
            "chunk digest edited",
            t,
            integrity(Part::Chunk(2)),
        )
        .await;
        // Another object of exactly the same size, copied over this one's name: every record
        // is bound to the store key it was written under.
        let mut twin = data.clone();
        twin[0] ^= 0xff;
        let twin_key = format!("tamper/{encrypted}/twin");
        store
            .put(&twin_key, twin.as_slice(), PutMode::Overwrite)
            .await
            .unwrap();
        let twin_raw = store.get_raw(&twin_key).await.unwrap();
        assert_eq!(twin_raw.len(), original.len(), "same size");
        refused(
            &store,
            &key,
            "an object of the same size from another name",
            twin_raw.to_vec(),
            integrity(Part::Chunk(0)),
        )
        .await;

        // The untouched object still reads.
        store.put_raw(&key, original.clone()).await.unwrap();
        store.verify(&key).await.unwrap();

        if encrypted {
            // Same key id, different key: wrong key. Another id only: unknown key id.
            let wrong = Store::open(&variant(
                base,
                Compression::Zstd,
                &[key_file(key_dir, "k1", 2)],
            ))
            .unwrap();
            assert!(
                matches!(archive_err(wrong.verify(&key).await), ArchiveError::WrongKey { key_id, .. } if key_id == "k1")
            );
            let missing = Store::open(&variant(
                base,
                Compression::Zstd,
                &[key_file(key_dir, "k9", 9)],
            ))
            .unwrap();
            assert!(
                matches!(archive_err(missing.verify(&key).await), ArchiveError::UnknownKeyId { key_id, .. } if key_id == "k1")
            );
            // Rotation: a new writing key, the old one still configured, reads old objects.
            let rotated = Store::open(&variant(
                base,
                Compression::Zstd,
                &[key_file(key_dir, "k2", 3), keys[0].clone()],
            ))
            .unwrap();
            assert_eq!(
                rotated.verify(&key).await.unwrap().key_id.as_deref(),
                Some("k1")
            );
            let new = rotated
                .put_bytes(
                    "tamper/rotated",
                    Bytes::from_static(b"new"),
                    PutMode::Overwrite,
                )
                .await
                .unwrap();
            assert_eq!(new.key_id.as_deref(), Some("k2"));
        } else {
            // With keys configured, an unencrypted object is refused (downgrade protection).
            let strict = Store::open(&variant(base, Compression::Zstd, &keys)).unwrap();
            assert!(matches!(
                archive_err(strict.verify(&key).await),
                ArchiveError::NotEncrypted { .. }
            ));
        }
    }
    let store = Store::open(&variant(base, Compression::Zstd, &[])).unwrap();
    assert!(matches!(
        store.verify("tamper/missing").await,
        Err(StoreError::NotFound { .. })
    ));
    // A future format version.
    store
        .put_bytes("tamper/v3", Bytes::from_static(b"x"), PutMode::Overwrite)
        .await
        .unwrap();
    let mut raw = store.get_raw("tamper/v3").await.unwrap().to_vec();
    raw[8] = 3;
    store.put_raw("tamper/v3", Bytes::from(raw)).await.unwrap();
    assert!(matches!(
        archive_err(store.verify("tamper/v3").await),
        ArchiveError::UnsupportedVersion { version: 3, .. }
    ));
}

/// A reader that yields `ok` bytes then fails, like a source file on a dying disk.
pub struct FailingReader {
    data: Vec<u8>,
    pos: usize,
}

impl FailingReader {
    pub fn new(ok: usize) -> FailingReader {
        FailingReader {
            data: random_bytes(ok, 5),
            pos: 0,
        }
    }
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos >= self.data.len() {
            return Poll::Ready(Err(std::io::Error::other("source failed mid-stream")));
        }
        let n = buf
            .remaining()
            .min(self.data.len() - self.pos)
            .min(256 << 10);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// An upload that fails part way leaves nothing under its name: small (single PUT) and large
/// (multipart) objects, new and replacing an existing object.
pub async fn interrupted_uploads(base: &StoreConfig) {
    let store = Store::open(&variant(base, Compression::None, &[])).unwrap();
    for (label, ok) in [("small", 2 * CHUNK + 3), ("multipart", 15 * CHUNK)] {
        let key = format!("interrupted/{label}");
        let err = store
            .put(&key, FailingReader::new(ok), PutMode::Overwrite)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("source failed"), "{err}");
        assert_eq!(
            store.head(&key).await.unwrap(),
            None,
            "{label}: nothing under the final name"
        );
        assert!(
            store.list("interrupted/").await.unwrap().is_empty(),
            "{label}: nothing listed"
        );
        // Replacing an existing object: the old one stays intact.
        store
            .put_bytes(&key, Bytes::from_static(b"old"), PutMode::Overwrite)
            .await
            .unwrap();
        store
            .put(&key, FailingReader::new(ok), PutMode::Overwrite)
            .await
            .unwrap_err();
        assert_eq!(store.get_bytes(&key).await.unwrap().0.as_ref(), b"old");
        store.delete(&key).await.unwrap();
        assert_eq!(store.head(&key).await.unwrap(), None);
    }
}

/// Create-only puts: a second put of the same key is refused and leaves the first content; a
/// retried WAL push of identical content succeeds; different content is a conflict.
/// A WAL push: the create-only put of a local segment file.
async fn push_segment(store: &Store, key: &str, seg: &Path) -> Result<PutOutcome, StoreError> {
    store.put_file(key, seg, PutMode::CreateOnly).await
}

pub async fn create_only(base: &StoreConfig, dir: &Path) {
    let store = Store::open(&variant(base, Compression::Lz4, &[key_file(dir, "k1", 1)])).unwrap();
    store
        .put_bytes(
            "create/a",
            Bytes::from_static(b"first"),
            PutMode::CreateOnly,
        )
        .await
        .unwrap();
    let err = store
        .put_bytes(
            "create/a",
            Bytes::from_static(b"second"),
            PutMode::CreateOnly,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::AlreadyExists { ref object } if object.ends_with("create/a")),
        "{err}"
    );
    assert_eq!(
        store.get_bytes("create/a").await.unwrap().0.as_ref(),
        b"first"
    );
    // Overwrite still replaces.
    store
        .put_bytes("create/a", Bytes::from_static(b"third"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(
        store.get_bytes("create/a").await.unwrap().0.as_ref(),
        b"third"
    );

    let seg: PathBuf = dir.join("000000010000000000000007");
    std::fs::write(&seg, random_bytes(CHUNK + 5, 3)).unwrap();
    let first = push_segment(&store, "create/wal/000000010000000000000007", &seg)
        .await
        .unwrap();
    assert!(matches!(first, PutOutcome::Stored(_)));
    let again = push_segment(&store, "create/wal/000000010000000000000007", &seg)
        .await
        .unwrap();
    assert!(
        matches!(again, PutOutcome::AlreadyStored(ref s) if s.digest == first.summary().digest)
    );
    // Different content: refused, and the archived segment is still the first one.
    std::fs::write(&seg, random_bytes(CHUNK + 5, 4)).unwrap();
    assert_conflict_keeps(
        &store,
        &store,
        "create/wal/000000010000000000000007",
        &seg,
        &random_bytes(CHUNK + 5, 3),
    )
    .await;

    // A segment stored before encryption was turned on (uploaded ahead by an agent without
    // keys, then pushed again by one with keys): the same content is replaced by an encrypted
    // copy, so archiving goes on and a restore (which refuses unencrypted objects) can read it;
    // different content is still a conflict, and the stored object is left alone.
    let plain = Store::open(&variant(base, Compression::Zstd, &[])).unwrap();
    std::fs::write(&seg, random_bytes(3 * CHUNK + 1, 5)).unwrap();
    push_segment(&plain, "create/wal/000000010000000000000008", &seg)
        .await
        .unwrap();
    assert!(matches!(
        store.verify("create/wal/000000010000000000000008").await,
        Err(StoreError::Archive(_))
    ));
    let again = push_segment(&store, "create/wal/000000010000000000000008", &seg)
        .await
        .unwrap();
    assert!(matches!(again, PutOutcome::Stored(_)), "{again:?}");
    let (bytes, summary) = store
        .get_bytes("create/wal/000000010000000000000008")
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), random_bytes(3 * CHUNK + 1, 5).as_slice());
    assert_eq!(summary.key_id.as_deref(), Some("k1"), "re-stored encrypted");

    push_segment(&plain, "create/wal/000000010000000000000009", &seg)
        .await
        .unwrap();
    std::fs::write(&seg, random_bytes(3 * CHUNK + 1, 6)).unwrap();
    assert_conflict_keeps(
        &store,
        &plain,
        "create/wal/000000010000000000000009",
        &seg,
        &random_bytes(3 * CHUNK + 1, 5),
    )
    .await;
}

/// Pushing `seg` under `key` through `store` is refused as a conflict, and `reader` still reads
/// `kept` there.
async fn assert_conflict_keeps(store: &Store, reader: &Store, key: &str, seg: &Path, kept: &[u8]) {
    let err = push_segment(store, key, seg).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    let (bytes, _) = reader.get_bytes(key).await.unwrap();
    assert_eq!(bytes.as_ref(), kept);
}

/// Listing by prefix, head, delete.
pub async fn list_head_delete(base: &StoreConfig) {
    let store = Store::open(&variant(base, Compression::Zstd, &[])).unwrap();
    for key in [
        "c/0/wal/000000010000000000000002",
        "c/0/wal/000000010000000000000001",
        "c/0/wal/00000002.history",
        "c/0/backups/b1/manifest.json",
        "c/1/wal/000000010000000000000001",
    ] {
        store
            .put_bytes(
                key,
                Bytes::from(key.as_bytes().to_vec()),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
    }
    let keys =
        |v: Vec<pgpilot_agent::store::ObjectInfo>| v.into_iter().map(|o| o.key).collect::<Vec<_>>();
    assert_eq!(
        keys(store.list("c/0/wal/").await.unwrap()),
        [
            "c/0/wal/000000010000000000000001",
            "c/0/wal/000000010000000000000002",
            "c/0/wal/00000002.history"
        ]
    );
    assert_eq!(
        keys(store.list("c/0/wal/0000000100").await.unwrap()).len(),
        2
    );
    assert_eq!(keys(store.list("c/").await.unwrap()).len(), 5);
    store
        .delete("c/0/wal/000000010000000000000001")
        .await
        .unwrap();
    store
        .delete("c/0/wal/000000010000000000000001")
        .await
        .unwrap();
    assert_eq!(
        store
            .head("c/0/wal/000000010000000000000001")
            .await
            .unwrap(),
        None
    );
    assert_eq!(keys(store.list("c/0/wal/").await.unwrap()).len(), 2);
    for bad in ["../", "/etc/", "c/../../"] {
        assert!(
            matches!(store.list(bad).await, Err(StoreError::InvalidKey { .. })),
            "{bad}"
        );
    }
    assert!(matches!(
        store
            .put_bytes("../x", Bytes::new(), PutMode::Overwrite)
            .await,
        Err(StoreError::InvalidKey { .. })
    ));
}
