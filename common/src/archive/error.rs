//! Errors of the archive format. Every variant names the object it was reading or writing, so a
//! failed restore says which object to look at, and says what failed (which part, which key).

use std::fmt;

/// Which part of an archive object a failure was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The fixed header (magic, version, codec, cipher, ids).
    Header,
    /// The data chunk with this index (0-based).
    Chunk(u64),
    /// The trailer (plaintext length, chunk count, SHA-256).
    Trailer,
    /// The object as a whole (length or SHA-256 of all the plaintext).
    Whole,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Header => f.write_str("header"),
            Part::Chunk(i) => write!(f, "chunk {i}"),
            Part::Trailer => f.write_str("trailer"),
            Part::Whole => f.write_str("whole object"),
        }
    }
}

/// Why reading or writing an archive object failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The object does not exist in the store.
    #[error("{object}: not found")]
    NotFound { object: String },

    /// A checksum (header CRC, chunk CRC, plaintext length or SHA-256) does not match: the object
    /// was corrupted or tampered with.
    #[error("{object}: checksum mismatch in {part}: {detail}")]
    ChecksumMismatch {
        object: String,
        part: Part,
        detail: String,
    },

    /// AES-GCM authentication failed for a part although the key is the right one: the object was
    /// tampered with (byte changed, chunks reordered or taken from another object).
    #[error("{object}: authentication failed in {part} (tampered or corrupted; key id {key_id:?})")]
    AuthenticationFailed {
        object: String,
        part: Part,
        key_id: String,
    },

    /// The object was written with a different key than the one configured under its key id.
    #[error(
        "{object}: wrong key: the key configured as {key_id:?} is not the one that wrote this object"
    )]
    WrongKey { object: String, key_id: String },

    /// The object names a key id that is not in the key ring.
    #[error(
        "{object}: encrypted with key id {key_id:?}, which is not configured (configured: {configured})"
    )]
    UnknownKeyId {
        object: String,
        key_id: String,
        configured: String,
    },

    /// The object ends before its trailer.
    #[error("{object}: truncated: {detail}")]
    Truncated { object: String, detail: String },

    /// The object was written by a newer (or unknown) format version.
    #[error("{object}: unsupported archive format version {version} (this build reads version 1)")]
    UnsupportedVersion { object: String, version: u8 },

    /// The object is not encrypted but the reader requires encryption (downgrade protection).
    #[error(
        "{object}: object is not encrypted, but encryption is required when keys are configured"
    )]
    NotEncrypted { object: String },

    /// The bytes are not a well-formed archive (bad magic, unknown codec, oversized frame, data
    /// after the trailer, a chunk that does not decompress).
    #[error("{object}: malformed archive: {detail}")]
    Malformed { object: String, detail: String },

    /// Writing needs encryption but no key is available, or a key is unusable.
    #[error("key error: {0}")]
    Key(String),

    /// An I/O error on the reader or writer side.
    #[error("{object}: I/O error: {source}")]
    Io {
        object: String,
        #[source]
        source: std::io::Error,
    },

    /// A compression library failed while writing.
    #[error("{object}: compression failed: {detail}")]
    Compression { object: String, detail: String },
}

impl ArchiveError {
    /// The object this error is about, when it is about one.
    pub fn object(&self) -> Option<&str> {
        match self {
            ArchiveError::NotFound { object }
            | ArchiveError::ChecksumMismatch { object, .. }
            | ArchiveError::AuthenticationFailed { object, .. }
            | ArchiveError::WrongKey { object, .. }
            | ArchiveError::UnknownKeyId { object, .. }
            | ArchiveError::Truncated { object, .. }
            | ArchiveError::UnsupportedVersion { object, .. }
            | ArchiveError::NotEncrypted { object }
            | ArchiveError::Malformed { object, .. }
            | ArchiveError::Io { object, .. }
            | ArchiveError::Compression { object, .. } => Some(object),
            ArchiveError::Key(_) => None,
        }
    }

    /// True when retrying the same operation could succeed (only I/O errors can be transient;
    /// a bad object stays bad).
    pub fn is_io(&self) -> bool {
        matches!(self, ArchiveError::Io { .. })
    }
}
