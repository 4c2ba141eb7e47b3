//! Byte layout of the archive format, versions 1 and 2 (see docs/archive-format.md): the header,
//! the record framing of chunks and trailer, and sealing/opening one record. Version 2 (written
//! since issue 24) adds the SHA-256 of each chunk's plaintext inside the sealed chunk, an object
//! digest over those chunk digests in the trailer, and binds the object's store key into every
//! record; version 1 objects are still read. Everything here works on one
//! record at a time, so the stream pipeline (`pipeline.rs`) can seal or open chunks on several
//! threads while keeping memory bounded.

use std::sync::Arc;

use bytes::Bytes;
use flate2::Crc;

use super::codec::{self, Codec, Compression};
use super::crypto::{KeyRing, ObjectCipher, TAG_LEN, validate_key_id};
use super::error::{ArchiveError, Part};

/// First eight bytes of every archive object.
pub const MAGIC: [u8; 8] = *b"PGPLTARC";
/// The format version this code writes.
pub const VERSION: u8 = 2;
/// The first format version: one SHA-256 of the whole plaintext in the trailer, no store key
/// bound. Still read, never written.
pub const VERSION_1: u8 = 1;
/// Length of a chunk digest (SHA-256), appended to each chunk's body in version 2.
pub const CHUNK_DIGEST_LEN: usize = 32;
/// Length of the header up to and including the key id length byte.
pub const FIXED_HEADER_LEN: usize = 49;
/// Length of a record's type and length fields.
pub const RECORD_HEAD_LEN: usize = 5;
/// Length of the trailer body (plaintext length, chunk count, digest).
pub const TRAILER_BODY_LEN: usize = 48;
/// Default plaintext bytes per chunk.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// Smallest allowed chunk size.
pub const MIN_CHUNK_SIZE: usize = 4 << 10;
/// Largest allowed chunk size.
pub const MAX_CHUNK_SIZE: usize = 16 << 20;

/// Longest store key a version 2 object binds (its length is stored as u16; keys are paths).
pub const MAX_BOUND_KEY_LEN: usize = 4096;

/// Cipher byte: no encryption.
pub const CIPHER_NONE: u8 = 0;
/// Cipher byte: AES-256-GCM per record with an HKDF-derived object key.
pub const CIPHER_AES256GCM: u8 = 1;

/// Record type byte: a data chunk that is not the last one.
pub const RECORD_DATA: u8 = 1;
/// Record type byte: the last data chunk (possibly empty for an empty object).
pub const RECORD_FINAL_DATA: u8 = 2;
/// Record type byte: the trailer.
pub const RECORD_TRAILER: u8 = 3;

/// The decoded header of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub compression: Compression,
    pub cipher: u8,
    pub chunk_size: u32,
    pub object_id: [u8; 16],
    pub key_check: [u8; 16],
    /// Empty when the object is not encrypted.
    pub key_id: String,
}

impl Header {
    /// The exact header bytes, CRC included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED_HEADER_LEN + self.key_id.len() + 4);
        b.extend_from_slice(&MAGIC);
        b.push(self.version);
        b.push(codec::compression_id(self.compression));
        b.push(self.cipher);
        b.push(0); // flags, reserved
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&self.object_id);
        b.extend_from_slice(&self.key_check);
        b.push(self.key_id.len() as u8);
        b.extend_from_slice(self.key_id.as_bytes());
        let crc = crc32(&[&b]);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses the fixed part (the first [`FIXED_HEADER_LEN`] bytes), returning how many more
    /// bytes (key id and CRC) make up the header.
    pub fn rest_len(object: &str, fixed: &[u8; FIXED_HEADER_LEN]) -> Result<usize, ArchiveError> {
        if fixed[..8] != MAGIC {
            return Err(ArchiveError::Malformed {
                object: object.to_owned(),
                detail: "not a pgpilot archive (bad magic)".into(),
            });
        }
        if fixed[8] != VERSION && fixed[8] != VERSION_1 {
            return Err(ArchiveError::UnsupportedVersion {
                object: object.to_owned(),
                version: fixed[8],
            });
        }
        Ok(fixed[48] as usize + 4)
    }

    /// Parses and checks a whole header (fixed part plus rest).
    pub fn parse(object: &str, bytes: &[u8]) -> Result<Header, ArchiveError> {
        let malformed = |detail: String| ArchiveError::Malformed {
            object: object.to_owned(),
            detail,
        };
        let fixed: &[u8; FIXED_HEADER_LEN] = bytes
            .get(..FIXED_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| ArchiveError::Truncated {
                object: object.to_owned(),
                detail: "inside the header".into(),
            })?;
        let rest = Header::rest_len(object, fixed)?;
        if bytes.len() != FIXED_HEADER_LEN + rest {
            return Err(ArchiveError::Truncated {
                object: object.to_owned(),
                detail: "inside the header".into(),
            });
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        if crc32(&[body]) != stored {
            return Err(ArchiveError::ChecksumMismatch {
                object: object.to_owned(),
                part: Part::Header,
                detail: "header CRC32 does not match".into(),
            });
        }
        let compression = codec::compression_from_id(bytes[9])
            .ok_or_else(|| malformed(format!("unknown codec {}", bytes[9])))?;
        let cipher = bytes[10];
        if cipher != CIPHER_NONE && cipher != CIPHER_AES256GCM {
            return Err(malformed(format!("unknown cipher {cipher}")));
        }
        if bytes[11] != 0 {
            return Err(malformed(format!("unknown header flags {:#x}", bytes[11])));
        }
        let chunk_size = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&(chunk_size as usize)) {
            return Err(malformed(format!("chunk size {chunk_size} out of range")));
        }
        let key_id = std::str::from_utf8(&bytes[FIXED_HEADER_LEN..bytes.len() - 4])
            .map_err(|_| malformed("key id is not UTF-8".into()))?
            .to_owned();
        if (cipher == CIPHER_NONE) != key_id.is_empty() {
            return Err(malformed(
                "key id present without cipher or missing with cipher".into(),
            ));
        }
        Ok(Header {
            version: bytes[8],
            compression,
            cipher,
            chunk_size,
            object_id: bytes[16..32].try_into().expect("16 bytes"),
            key_check: bytes[32..48].try_into().expect("16 bytes"),
            key_id,
        })
    }
}

/// What the trailer records, and what a successful read or write reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    pub plaintext_len: u64,
    pub chunk_count: u64,
    /// Version 1: SHA-256 of the whole plaintext. Version 2: the object digest
    /// ([`ObjectDigest`]).
    pub digest: [u8; 32],
}

/// Which digest an object's trailer (and a manifest entry) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestKind {
    /// Format version 1: SHA-256 of the whole plaintext.
    Sha256,
    /// Format version 2: SHA-256 over the SHA-256 of each chunk of `chunk_size` plaintext bytes,
    /// in order, then the plaintext length (u64, little-endian).
    ChunkedSha256 { chunk_size: u32 },
}

impl DigestKind {
    /// The name a manifest records: `sha256` or `sha256-chunks`.
    pub fn name(&self) -> &'static str {
        match self {
            DigestKind::Sha256 => "sha256",
            DigestKind::ChunkedSha256 { .. } => "sha256-chunks",
        }
    }

    /// The digest of `reader`'s content of this kind, with its length (a local file compared
    /// with a stored object).
    pub fn of_reader(&self, mut reader: impl std::io::Read) -> std::io::Result<(u64, [u8; 32])> {
        use sha2::{Digest, Sha256};
        match *self {
            DigestKind::Sha256 => {
                let mut h = Sha256::new();
                let len = std::io::copy(&mut reader, &mut h)?;
                Ok((len, h.finalize().into()))
            }
            DigestKind::ChunkedSha256 { chunk_size } => {
                let mut object = ObjectDigest::default();
                let mut buf = vec![0u8; chunk_size as usize];
                let mut len = 0u64;
                loop {
                    let n = read_full(&mut reader, &mut buf)?;
                    // An empty object still has one (empty) final chunk; otherwise a short read
                    // is the last chunk and an empty one after full chunks is no chunk.
                    if n > 0 || len == 0 {
                        object.add_chunk(&Sha256::digest(&buf[..n]).into());
                    }
                    len += n as u64;
                    if n < buf.len() {
                        return Ok((len, object.finish(len)));
                    }
                }
            }
        }
    }
}

pub(crate) fn read_full(reader: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The version 2 object digest, fed the chunk digests in order (32 bytes per chunk: cheap
/// enough for the thread that orders the chunks).
#[derive(Default, Clone)]
pub struct ObjectDigest(sha2::Sha256);

impl ObjectDigest {
    pub fn add_chunk(&mut self, chunk_digest: &[u8; 32]) {
        sha2::Digest::update(&mut self.0, chunk_digest);
    }

    pub fn finish(mut self, plaintext_len: u64) -> [u8; 32] {
        sha2::Digest::update(&mut self.0, plaintext_len.to_le_bytes());
        sha2::Digest::finalize(self.0).into()
    }
}

impl Trailer {
    fn to_bytes(&self) -> [u8; TRAILER_BODY_LEN] {
        let mut b = [0u8; TRAILER_BODY_LEN];
        b[..8].copy_from_slice(&self.plaintext_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.chunk_count.to_le_bytes());
        b[16..].copy_from_slice(&self.digest);
        b
    }

    fn from_bytes(b: &[u8; TRAILER_BODY_LEN]) -> Trailer {
        Trailer {
            plaintext_len: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            chunk_count: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            digest: b[16..].try_into().expect("32 bytes"),
        }
    }
}

/// One framed record: its 5-byte head (type, payload length) and payload.
#[derive(Debug, Clone)]
pub struct Frame {
    pub head: [u8; RECORD_HEAD_LEN],
    pub payload: Vec<u8>,
}

impl Frame {
    fn new(kind: u8, payload: Vec<u8>) -> Frame {
        let mut head = [0u8; RECORD_HEAD_LEN];
        head[0] = kind;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Frame { head, payload }
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        RECORD_HEAD_LEN + self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The record as one buffer (head then payload).
    pub fn into_bytes(self) -> Bytes {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.payload);
        Bytes::from(v)
    }
}

/// Parses a record head, checking the type and bounding the payload length.
pub fn parse_record_head(
    ctx: &ObjectContext,
    head: &[u8; RECORD_HEAD_LEN],
) -> Result<(u8, usize), ArchiveError> {
    let kind = head[0];
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
    if !matches!(kind, RECORD_DATA | RECORD_FINAL_DATA | RECORD_TRAILER) {
        return Err(ctx.malformed(format!("unknown record type {kind}")));
    }
    if len > ctx.max_payload_len() {
        return Err(ctx.malformed(format!(
            "record of {len} bytes exceeds the limit for this chunk size"
        )));
    }
    Ok((kind, len))
}

/// Everything needed to seal or open the records of one object. Shared between worker threads.
pub struct ObjectContext {
    name: Arc<str>,
    /// What every record binds of the store key, computed once: its length (u16) and bytes
    /// in version 2, nothing in version 1.
    bound: Bytes,
    header: Header,
    header_bytes: Bytes,
    codec: Codec,
    cipher: Option<ObjectCipher>,
}

impl std::fmt::Debug for ObjectContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectContext")
            .field("name", &self.name)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl ObjectContext {
    /// A new object: random object id, encrypted with the ring's writing key if there is one.
    pub fn for_writing(
        name: &str,
        key: &str,
        codec: Codec,
        keys: &KeyRing,
        chunk_size: usize,
    ) -> Result<ObjectContext, ArchiveError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(ArchiveError::Malformed {
                object: name.to_owned(),
                detail: format!(
                    "chunk size {chunk_size} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
                ),
            });
        }
        let bound = bound_key(VERSION, name, key)?;
        let object_id: [u8; 16] = rand::random();
        let (cipher, key_id, key_check, cipher_byte) = match keys.writer() {
            Some(key) => {
                validate_key_id(key.id())?;
                let c = ObjectCipher::derive(key, &object_id);
                let check = *c.key_check();
                (Some(c), key.id().to_owned(), check, CIPHER_AES256GCM)
            }
            None => (None, String::new(), [0u8; 16], CIPHER_NONE),
        };
        let header = Header {
            version: VERSION,
            compression: codec.compression(),
            cipher: cipher_byte,
            chunk_size: chunk_size as u32,
            object_id,
            key_check,
            key_id,
        };
        let header_bytes = Bytes::from(header.to_bytes());
        Ok(ObjectContext {
            name: name.into(),
            bound,
            header,
            header_bytes,
            codec,
            cipher,
        })
    }

    /// An existing object whose header bytes were read: checks the header, finds the key and
    /// checks it is the right one. `key` is the store key the object is read under: a version
    /// 2 object written under another key is refused (its first record does not verify).
    pub fn for_reading(
        name: &str,
        key: &str,
        header_bytes: Bytes,
        keys: &KeyRing,
        require_encryption: bool,
    ) -> Result<ObjectContext, ArchiveError> {
        let header = Header::parse(name, &header_bytes)?;
        let cipher = if header.cipher == CIPHER_AES256GCM {
            let key = keys
                .get(&header.key_id)
                .ok_or_else(|| ArchiveError::UnknownKeyId {
                    object: name.to_owned(),
                    key_id: header.key_id.clone(),
                    configured: if keys.is_empty() {
                        "none".into()
                    } else {
                        keys.ids().join(", ")
                    },
                })?;
            let c = ObjectCipher::derive(key, &header.object_id);
            if c.key_check() != &header.key_check {
                return Err(ArchiveError::WrongKey {
                    object: name.to_owned(),
                    key_id: header.key_id.clone(),
                });
            }
            Some(c)
        } else {
            if require_encryption {
                return Err(ArchiveError::NotEncrypted {
                    object: name.to_owned(),
                });
            }
            None
        };
        // Only the algorithm matters for reading; the level is the writer's business.
        let codec = Codec::from_compression(header.compression, None);
        Ok(ObjectContext {
            name: name.into(),
            bound: bound_key(header.version, name, key)?,
            header,
            header_bytes,
            codec,
            cipher,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The exact header bytes to write first.
    pub fn header_bytes(&self) -> &Bytes {
        &self.header_bytes
    }

    pub fn chunk_size(&self) -> usize {
        self.header.chunk_size as usize
    }

    /// Version 2 or later: chunk digests, an object digest, the store key bound.
    pub fn chunked(&self) -> bool {
        self.header.version != VERSION_1
    }

    /// Which digest the trailer holds.
    pub fn digest_kind(&self) -> DigestKind {
        if self.chunked() {
            DigestKind::ChunkedSha256 {
                chunk_size: self.header.chunk_size,
            }
        } else {
            DigestKind::Sha256
        }
    }

    /// Whether the object is encrypted.
    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// The key id when encrypted.
    pub fn key_id(&self) -> Option<&str> {
        self.cipher.as_ref().map(|_| self.header.key_id.as_str())
    }

    /// Upper bound of a record payload for this object's chunk size.
    pub fn max_payload_len(&self) -> usize {
        zstd::zstd_safe::compress_bound(self.chunk_size())
            + self.chunk_size() / 64
            + 1024
            + CHUNK_DIGEST_LEN
            + TAG_LEN
    }

    fn malformed(&self, detail: String) -> ArchiveError {
        ArchiveError::Malformed {
            object: self.name.to_string(),
            detail,
        }
    }

    fn aad(&self, index: u64, kind: u8) -> Vec<u8> {
        let mut aad = Vec::with_capacity(self.header_bytes.len() + self.bound.len() + 9);
        aad.extend_from_slice(&self.header_bytes);
        aad.extend_from_slice(&self.bound);
        aad.extend_from_slice(&index.to_le_bytes());
        aad.push(kind);
        aad
    }

    fn record_crc(&self, index: u64, kind: u8, body: &[u8]) -> u32 {
        crc32(&[
            &self.header.object_id,
            &self.bound,
            &index.to_le_bytes(),
            &[kind],
            body,
        ])
    }

    /// Hashes (version 2), compresses, then encrypts (or checksums) chunk `index`. Returns the
    /// record and the chunk's SHA-256, which the caller feeds to the [`ObjectDigest`].
    pub fn seal_chunk(
        &self,
        index: u64,
        last: bool,
        plain: &[u8],
    ) -> Result<(Frame, [u8; 32]), ArchiveError> {
        use sha2::{Digest, Sha256};
        let kind = if last { RECORD_FINAL_DATA } else { RECORD_DATA };
        let digest: [u8; 32] = Sha256::digest(plain).into();
        let mut body = self
            .codec
            .compress(plain)
            .map_err(|e| ArchiveError::Compression {
                object: self.name.to_string(),
                detail: e.to_string(),
            })?;
        body.extend_from_slice(&digest);
        Ok((Frame::new(kind, self.protect(index, kind, body)), digest))
    }

    /// The trailer record, sealed like a chunk at index `trailer.chunk_count`.
    pub fn seal_trailer(&self, trailer: &Trailer) -> Frame {
        let body = trailer.to_bytes().to_vec();
        Frame::new(
            RECORD_TRAILER,
            self.protect(trailer.chunk_count, RECORD_TRAILER, body),
        )
    }

    fn protect(&self, index: u64, kind: u8, mut body: Vec<u8>) -> Vec<u8> {
        match &self.cipher {
            Some(c) => c.seal(index, &self.aad(index, kind), &mut body),
            None => {
                let crc = self.record_crc(index, kind, &body);
                body.extend_from_slice(&crc.to_le_bytes());
            }
        }
        body
    }

    fn unprotect(
        &self,
        index: u64,
        kind: u8,
        part: Part,
        mut payload: Vec<u8>,
    ) -> Result<Vec<u8>, ArchiveError> {
        match &self.cipher {
            Some(c) => {
                c.open(index, &self.aad(index, kind), &mut payload)
                    .map_err(|()| ArchiveError::AuthenticationFailed {
                        object: self.name.to_string(),
                        part,
                        key_id: self.header.key_id.clone(),
                    })?;
            }
            None => {
                let mismatch = || ArchiveError::ChecksumMismatch {
                    object: self.name.to_string(),
                    part,
                    detail:
                        "record CRC32 does not match (corrupted, reordered or from another object)"
                            .into(),
                };
                if payload.len() < 4 {
                    return Err(mismatch());
                }
                let split = payload.len() - 4;
                let stored = u32::from_le_bytes(payload[split..].try_into().expect("4 bytes"));
                payload.truncate(split);
                if self.record_crc(index, kind, &payload) != stored {
                    return Err(mismatch());
                }
            }
        }
        Ok(payload)
    }

    /// Checks and decrypts chunk `index`, then decompresses it. Checks its plaintext length: a
    /// chunk that is not the last one is exactly `chunk_size` long.
    ///
    /// Version 2 also returns the chunk digest stored with it. The codec's own content checksum
    /// must be present and is checked by the decompressor. The digest is recomputed and
    /// compared when `recompute` is set or the object is not encrypted; an encrypted chunk is
    /// already authenticated by its tag, so the hot path (restore, WAL fetch) skips the SHA-256.
    pub fn open_chunk(
        &self,
        index: u64,
        kind: u8,
        payload: Vec<u8>,
        recompute: bool,
    ) -> Result<(Bytes, Option<[u8; 32]>), ArchiveError> {
        let mut body = self.unprotect(index, kind, Part::Chunk(index), payload)?;
        let stored = if self.chunked() {
            if body.len() < CHUNK_DIGEST_LEN {
                return Err(self.malformed(format!("chunk {index} has no digest")));
            }
            let split = body.len() - CHUNK_DIGEST_LEN;
            let digest: [u8; 32] = body[split..].try_into().expect("32 bytes");
            body.truncate(split);
            if !codec::has_content_checksum(self.header.compression, &body) {
                return Err(self.malformed(format!(
                    "chunk {index} was compressed without the codec's content checksum"
                )));
            }
            Some(digest)
        } else {
            None
        };
        let plain = codec::decompress(self.header.compression, body, self.chunk_size())
            .map_err(|e| self.malformed(format!("chunk {index} does not decompress: {e}")))?;
        if kind == RECORD_DATA && plain.len() != self.chunk_size() {
            return Err(self.malformed(format!(
                "chunk {index} holds {} bytes, not the chunk size",
                plain.len()
            )));
        }
        if let Some(stored) = stored
            && (recompute || self.cipher.is_none())
        {
            use sha2::{Digest, Sha256};
            let actual: [u8; 32] = Sha256::digest(&plain).into();
            if actual != stored {
                return Err(ArchiveError::ChecksumMismatch {
                    object: self.name.to_string(),
                    part: Part::Chunk(index),
                    detail: format!(
                        "SHA-256 of the chunk's content is {}, the chunk says {}",
                        hex(&actual),
                        hex(&stored)
                    ),
                });
            }
        }
        Ok((plain, stored))
    }

    /// Checks and decrypts the trailer, expected after `chunk_count` chunks.
    pub fn open_trailer(
        &self,
        chunk_count: u64,
        payload: Vec<u8>,
    ) -> Result<Trailer, ArchiveError> {
        let body = self.unprotect(chunk_count, RECORD_TRAILER, Part::Trailer, payload)?;
        let body: &[u8; TRAILER_BODY_LEN] = body
            .as_slice()
            .try_into()
            .map_err(|_| self.malformed(format!("trailer of {} bytes", body.len())))?;
        Ok(Trailer::from_bytes(body))
    }

    /// Compares a trailer with what was read.
    pub fn check_trailer(
        &self,
        trailer: &Trailer,
        seen: &Trailer,
        saw_final: bool,
    ) -> Result<(), ArchiveError> {
        let mismatch = |detail: String| ArchiveError::ChecksumMismatch {
            object: self.name.to_string(),
            part: Part::Whole,
            detail,
        };
        if !saw_final {
            return Err(self.malformed("trailer without a final chunk".into()));
        }
        if trailer.chunk_count != seen.chunk_count {
            return Err(mismatch(format!(
                "trailer says {} chunks, read {}",
                trailer.chunk_count, seen.chunk_count
            )));
        }
        if trailer.plaintext_len != seen.plaintext_len {
            return Err(mismatch(format!(
                "trailer says {} bytes, read {}",
                trailer.plaintext_len, seen.plaintext_len
            )));
        }
        if trailer.digest != seen.digest {
            let what = if self.chunked() {
                "digest of the chunk digests"
            } else {
                "SHA-256 of the content"
            };
            return Err(mismatch(format!(
                "{what} is {}, trailer says {}",
                hex(&seen.digest),
                hex(&trailer.digest)
            )));
        }
        Ok(())
    }
}

/// What a record of a `version` object binds of its store key (see [`ObjectContext`]): nothing
/// in version 1; from version 2 its length as a u16 and its bytes, so a longer key is refused.
fn bound_key(version: u8, name: &str, key: &str) -> Result<Bytes, ArchiveError> {
    if version == VERSION_1 {
        return Ok(Bytes::new());
    }
    if key.len() > MAX_BOUND_KEY_LEN {
        return Err(ArchiveError::Malformed {
            object: name.to_owned(),
            detail: format!(
                "store key of {} bytes is longer than {MAX_BOUND_KEY_LEN}",
                key.len()
            ),
        });
    }
    let mut b = Vec::with_capacity(2 + key.len());
    b.extend_from_slice(&(key.len() as u16).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    Ok(Bytes::from(b))
}

fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = Crc::new();
    for p in parts {
        crc.update(p);
    }
    crc.sum()
}

/// Lower-case hex of bytes (for checksums in messages and manifests).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
