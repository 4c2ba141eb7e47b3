//! Byte layout of archive format version 1 (see docs/archive-format.md): the header, the record
//! framing of chunks and trailer, and sealing/opening one record. Everything here works on one
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
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Length of the header up to and including the key id length byte.
pub const FIXED_HEADER_LEN: usize = 49;
/// Length of a record's type and length fields.
pub const RECORD_HEAD_LEN: usize = 5;
/// Length of the trailer body (plaintext length, chunk count, SHA-256).
pub const TRAILER_BODY_LEN: usize = 48;
/// Default plaintext bytes per chunk.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// Smallest allowed chunk size.
pub const MIN_CHUNK_SIZE: usize = 4 << 10;
/// Largest allowed chunk size.
pub const MAX_CHUNK_SIZE: usize = 16 << 20;

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
        if fixed[8] != VERSION {
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
    pub sha256: [u8; 32],
}

impl Trailer {
    fn to_bytes(&self) -> [u8; TRAILER_BODY_LEN] {
        let mut b = [0u8; TRAILER_BODY_LEN];
        b[..8].copy_from_slice(&self.plaintext_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.chunk_count.to_le_bytes());
        b[16..].copy_from_slice(&self.sha256);
        b
    }

    fn from_bytes(b: &[u8; TRAILER_BODY_LEN]) -> Trailer {
        Trailer {
            plaintext_len: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            chunk_count: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            sha256: b[16..].try_into().expect("32 bytes"),
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
            header,
            header_bytes,
            codec,
            cipher,
        })
    }

    /// An existing object whose header bytes were read: checks the header, finds the key and
    /// checks it is the right one.
    pub fn for_reading(
        name: &str,
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

    /// The key id when encrypted.
    pub fn key_id(&self) -> Option<&str> {
        self.cipher.as_ref().map(|_| self.header.key_id.as_str())
    }

    /// Upper bound of a record payload for this object's chunk size.
    pub fn max_payload_len(&self) -> usize {
        zstd::zstd_safe::compress_bound(self.chunk_size()) + self.chunk_size() / 64 + 1024 + TAG_LEN
    }

    fn malformed(&self, detail: String) -> ArchiveError {
        ArchiveError::Malformed {
            object: self.name.to_string(),
            detail,
        }
    }

    fn aad(&self, index: u64, kind: u8) -> Vec<u8> {
        let mut aad = Vec::with_capacity(self.header_bytes.len() + 9);
        aad.extend_from_slice(&self.header_bytes);
        aad.extend_from_slice(&index.to_le_bytes());
        aad.push(kind);
        aad
    }

    fn record_crc(&self, index: u64, kind: u8, body: &[u8]) -> u32 {
        crc32(&[&self.header.object_id, &index.to_le_bytes(), &[kind], body])
    }

    /// Compresses, then encrypts (or checksums) chunk `index`.
    pub fn seal_chunk(&self, index: u64, last: bool, plain: &[u8]) -> Result<Frame, ArchiveError> {
        let kind = if last { RECORD_FINAL_DATA } else { RECORD_DATA };
        let body = self
            .codec
            .compress(plain)
            .map_err(|e| ArchiveError::Compression {
                object: self.name.to_string(),
                detail: e.to_string(),
            })?;
        Ok(Frame::new(kind, self.protect(index, kind, body)))
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
    pub fn open_chunk(
        &self,
        index: u64,
        kind: u8,
        payload: Vec<u8>,
    ) -> Result<Bytes, ArchiveError> {
        let body = self.unprotect(index, kind, Part::Chunk(index), payload)?;
        let plain = codec::decompress(self.header.compression, body, self.chunk_size())
            .map_err(|e| self.malformed(format!("chunk {index} does not decompress: {e}")))?;
        if kind == RECORD_DATA && plain.len() != self.chunk_size() {
            return Err(self.malformed(format!(
                "chunk {index} holds {} bytes, not the chunk size",
                plain.len()
            )));
        }
        Ok(plain)
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
        if trailer.sha256 != seen.sha256 {
            return Err(mismatch(format!(
                "SHA-256 of the content is {}, trailer says {}",
                hex(&seen.sha256),
                hex(&trailer.sha256)
            )));
        }
        Ok(())
    }
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
