//! The archive format: how every object pgpilot stores (WAL segments, history files, base
//! backup files) is framed, compressed, encrypted and checksummed. Versions 1 (read) and 2
//! (written) are described byte by byte in docs/archive-format.md.
//!
//! An object is a header (magic, version, codec, cipher, key id, random object id), then the
//! plaintext in chunks (each compressed on its own, then sealed with AES-256-GCM or, without
//! encryption, a CRC32) with the SHA-256 of its plaintext, then a trailer with the plaintext
//! length and the object digest over the chunk digests. Every record is bound to the header, the
//! object's store key, its index and whether it is the last one, so truncation, reordering,
//! chunks from another object, objects under another name and header edits are all detected.
//!
//! Entry points: [`encode`]/[`decode`]/[`verify`] (async, parallel, bounded memory), the pull
//! APIs [`StreamEncoder`]/[`StreamDecoder`] for callers that upload or write as they go, and
//! [`encode_sync`]/[`decode_sync`] (one thread).

pub mod codec;
pub mod crypto;
pub mod error;
pub mod format;
pub mod pipeline;

pub use codec::{Codec, Compression, DEFAULT_ZSTD_LEVEL};
pub use crypto::{ArchiveKey, KEY_LEN, KeyRing, KeySource};
pub use error::{ArchiveError, Part};
pub use format::{
    DEFAULT_CHUNK_SIZE, DigestKind, Header, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, VERSION, VERSION_1, hex,
};
pub use pipeline::{
    ArchiveSummary, ChunkFile, ChunkRead, FileChunks, ObjectRef, PositionalFile, ReadOptions,
    StreamDecoder, StreamEncoder, WriteOptions, decode, decode_sync, default_concurrency, encode,
    encode_sync, verify,
};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod v1_fixtures;
