//! Archive format version 1 stays readable: objects written by the v1 code (commit efa805c) and
//! committed under `fixtures/v1/` are decoded by today's reader, sync and async, and must give
//! back exactly the plaintext they were made from.
//!
//! The plaintext is [`plaintext`] (deterministic, pinned by [`PLAINTEXT_SHA256`]); the key is
//! [`FIXTURE_KEY`] (bytes 0, 1, …, 31) under the id [`FIXTURE_KEY_ID`], a test-only constant.
//! The objects were written once by the ignored test [`generate_v1_fixtures`]:
//!
//! ```sh
//! cargo nextest run --workspace --run-ignored only -E 'package(pgpilot-common) & test(generate_v1_fixtures)'
//! ```
//!
//! Never regenerate them with a later format version: they are the record of what v1 wrote
//! (object ids are random, so a regeneration changes every byte). [`v1_fixtures_decode`] refuses
//! any fixture whose version byte is not 1.

use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::*;

/// Key id of the encrypted fixtures.
const FIXTURE_KEY_ID: &str = "fixture-key";
/// The fixtures' master key: bytes 0, 1, …, 31. Test-only, never a real key.
const FIXTURE_KEY: [u8; KEY_LEN] = {
    let mut k = [0u8; KEY_LEN];
    let mut i = 0;
    while i < KEY_LEN {
        k[i] = i as u8;
        i += 1;
    }
    k
};
/// Plaintext bytes per chunk of every fixture.
const FIXTURE_CHUNK_SIZE: usize = 16 << 10;
/// Length of [`plaintext`]: six full chunks and a partial seventh.
const PLAINTEXT_LEN: usize = 6 * FIXTURE_CHUNK_SIZE + 3_411;
/// SHA-256 of [`plaintext`], so a change to the generator cannot go unnoticed.
const PLAINTEXT_SHA256: &str = "130b9644058e1f1e838a4b8decb6a16afe8955e10757b027cf027b996bde19ce";

/// One committed object: its file under `fixtures/v1/`, how it was written.
struct Fixture {
    file: &'static str,
    codec: Codec,
    encrypted: bool,
    /// Empty plaintext instead of [`plaintext`].
    empty: bool,
}

const fn fixture(file: &'static str, codec: Codec, encrypted: bool, empty: bool) -> Fixture {
    Fixture {
        file,
        codec,
        encrypted,
        empty,
    }
}

const FIXTURES: [Fixture; 9] = [
    fixture("none.pgarc", Codec::None, false, false),
    fixture("zstd.pgarc", Codec::Zstd { level: 3 }, false, false),
    fixture("lz4.pgarc", Codec::Lz4, false, false),
    fixture("gzip.pgarc", Codec::Gzip { level: 6 }, false, false),
    fixture(
        "zstd-aes256gcm.pgarc",
        Codec::Zstd { level: 3 },
        true,
        false,
    ),
    fixture("lz4-aes256gcm.pgarc", Codec::Lz4, true, false),
    fixture("empty-none.pgarc", Codec::None, false, true),
    fixture("empty-gzip.pgarc", Codec::Gzip { level: 6 }, false, true),
    fixture(
        "empty-zstd-aes256gcm.pgarc",
        Codec::Zstd { level: 3 },
        true,
        true,
    ),
];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/archive/fixtures/v1")
}

/// Text-like lines with a seeded xorshift choosing words and numbers: compressible, but not
/// trivially, so every codec really works on it.
fn plaintext() -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliett", "kilo", "lima", "mike", "november", "oscar", "papa",
    ];
    let mut x = 0x5eed_f1c7_0123_4567_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(PLAINTEXT_LEN + 64);
    let mut line = 0u64;
    while out.len() < PLAINTEXT_LEN {
        let r = next();
        let w1 = WORDS[(r & 15) as usize];
        let w2 = WORDS[((r >> 4) & 15) as usize];
        out.extend_from_slice(format!("{line:06} {w1} {w2} {:02x}\n", (r >> 8) & 0xff).as_bytes());
        line += 1;
    }
    out.truncate(PLAINTEXT_LEN);
    out
}

fn plaintext_of(f: &Fixture) -> Vec<u8> {
    if f.empty { Vec::new() } else { plaintext() }
}

fn fixture_keys() -> KeyRing {
    KeyRing::new(vec![
        ArchiveKey::new(FIXTURE_KEY_ID, FIXTURE_KEY).expect("valid key id"),
    ])
    .expect("one key")
}

fn keys_for(f: &Fixture) -> KeyRing {
    if f.encrypted {
        fixture_keys()
    } else {
        KeyRing::empty()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Everything a v1 object's summary must say, in one place: when `ArchiveSummary` changes, only
/// this function needs to follow. v1's trailer digest is the plain SHA-256 of the content.
fn check_summary(f: &Fixture, plain: &[u8], stored_len: usize, s: &ArchiveSummary) {
    let what = f.file;
    assert_eq!(s.version, 1, "{what}: version");
    assert_eq!(s.plaintext_len, plain.len() as u64, "{what}: plaintext_len");
    assert_eq!(s.digest_kind, DigestKind::Sha256, "{what}: digest_kind");
    assert_eq!(s.digest, sha256(plain), "{what}: SHA-256 of the plaintext");
    assert_eq!(s.stored_len, stored_len as u64, "{what}: stored_len");
    assert_eq!(
        s.chunk_count,
        plain.len().div_ceil(FIXTURE_CHUNK_SIZE).max(1) as u64,
        "{what}: chunk_count"
    );
    assert_eq!(s.compression, f.codec.compression(), "{what}: compression");
    assert_eq!(
        s.key_id.as_deref(),
        f.encrypted.then_some(FIXTURE_KEY_ID),
        "{what}: key_id"
    );
}

/// Writes `fixtures/v1/` with the current code. Run it only with the v1 writer (see the module
/// documentation).
#[test]
#[ignore = "writes the committed v1 fixtures; run by hand, only with the v1 writer"]
fn generate_v1_fixtures() {
    assert_eq!(VERSION, 1, "the fixtures record what the v1 writer wrote");
    let plain = plaintext();
    assert_eq!(hex(&sha256(&plain)), PLAINTEXT_SHA256, "plaintext changed");
    let dir = fixture_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for f in &FIXTURES {
        let plain = plaintext_of(f);
        let opts = WriteOptions {
            codec: f.codec,
            chunk_size: FIXTURE_CHUNK_SIZE,
            concurrency: 1,
        };
        let mut stored = Vec::new();
        encode_sync(f.file, plain.as_slice(), &mut stored, &keys_for(f), &opts).unwrap();
        assert_eq!(
            stored[8], 1,
            "{}: the writer no longer writes version 1",
            f.file
        );
        std::fs::write(dir.join(f.file), &stored).unwrap();
    }
}

/// Every committed v1 fixture decodes, with `decode_sync` and with the async `decode`, to
/// exactly its plaintext, with a v1 header and a summary that matches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_fixtures_decode() {
    let plain = plaintext();
    assert_eq!(plain.len(), PLAINTEXT_LEN);
    assert_eq!(
        hex(&sha256(&plain)),
        PLAINTEXT_SHA256,
        "plaintext() changed: the fixtures were made from the old one"
    );
    for f in &FIXTURES {
        let what = f.file;
        let stored = std::fs::read(fixture_dir().join(f.file))
            .unwrap_or_else(|e| panic!("{what}: {e} (the committed v1 fixture)"));
        assert_eq!(&stored[..8], b"PGPLTARC", "{what}: magic");
        assert_eq!(stored[8], 1, "{what}: not a version 1 object");
        let plain = plaintext_of(f);
        let keys = keys_for(f);
        // As the agent reads: encryption required when keys are configured.
        let read = ReadOptions {
            require_encryption: f.encrypted,
            ..ReadOptions::default()
        };

        let mut back = Vec::new();
        let s = decode_sync(what, stored.as_slice(), &mut back, &keys, &read)
            .unwrap_or_else(|e| panic!("decode_sync {what}: {e}"));
        assert!(back == plain, "decode_sync {what}: plaintext differs");
        check_summary(f, &plain, stored.len(), &s);

        let mut back = Vec::new();
        let s = decode(what, stored.as_slice(), &mut back, &keys, &read)
            .await
            .unwrap_or_else(|e| panic!("decode {what}: {e}"));
        assert!(back == plain, "decode {what}: plaintext differs");
        check_summary(f, &plain, stored.len(), &s);

        // The streaming reader: its header says version 1; its chunks are the plaintext.
        let mut dec = StreamDecoder::open(what, stored.as_slice(), &keys, &read)
            .await
            .unwrap_or_else(|e| panic!("StreamDecoder {what}: {e}"));
        assert_eq!(dec.header().version, 1, "{what}: header.version");
        assert_eq!(
            dec.header().chunk_size as usize,
            FIXTURE_CHUNK_SIZE,
            "{what}"
        );
        let mut back = Vec::new();
        while let Some(chunk) = dec.next_chunk().await.unwrap() {
            back.extend_from_slice(&chunk);
        }
        assert!(back == plain, "StreamDecoder {what}: plaintext differs");
        check_summary(f, &plain, stored.len(), dec.summary().unwrap());

        let s = verify(what, stored.as_slice(), &keys, &read).await.unwrap();
        check_summary(f, &plain, stored.len(), &s);
    }
}

/// The encrypted v1 fixtures refuse another key under their id (wrong key) and a key ring
/// without their id (unknown key id), sync and async.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_fixtures_refuse_a_wrong_or_absent_key() {
    let wrong = KeyRing::new(vec![
        ArchiveKey::new(FIXTURE_KEY_ID, [0xa5; KEY_LEN]).unwrap(),
    ])
    .unwrap();
    let other_id = KeyRing::new(vec![ArchiveKey::new("other-key", FIXTURE_KEY).unwrap()]).unwrap();
    let read = ReadOptions::default();
    let mut encrypted = 0;
    for f in FIXTURES.iter().filter(|f| f.encrypted) {
        encrypted += 1;
        let what = f.file;
        let stored = std::fs::read(fixture_dir().join(f.file)).unwrap();

        let e = decode_sync(what, stored.as_slice(), std::io::sink(), &wrong, &read).unwrap_err();
        assert!(
            matches!(&e, ArchiveError::WrongKey { key_id, .. } if key_id == FIXTURE_KEY_ID),
            "decode_sync {what} with a wrong key: {e:?}"
        );
        let e = decode(
            what,
            stored.as_slice(),
            &mut tokio::io::sink(),
            &wrong,
            &read,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, ArchiveError::WrongKey { key_id, .. } if key_id == FIXTURE_KEY_ID),
            "decode {what} with a wrong key: {e:?}"
        );

        for absent in [KeyRing::empty(), other_id.clone()] {
            let e =
                decode_sync(what, stored.as_slice(), std::io::sink(), &absent, &read).unwrap_err();
            assert!(
                matches!(&e, ArchiveError::UnknownKeyId { key_id, .. } if key_id == FIXTURE_KEY_ID),
                "decode_sync {what} without its key: {e:?}"
            );
            let e = decode(
                what,
                stored.as_slice(),
                &mut tokio::io::sink(),
                &absent,
                &read,
            )
            .await
            .unwrap_err();
            assert!(
                matches!(&e, ArchiveError::UnknownKeyId { key_id, .. } if key_id == FIXTURE_KEY_ID),
                "decode {what} without its key: {e:?}"
            );
        }
    }
    assert_eq!(encrypted, 3);
}
