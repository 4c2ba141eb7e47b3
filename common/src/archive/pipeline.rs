//! Streaming encode and decode of whole objects.
//!
//! The async pipeline reads plaintext one chunk at a time, hands each chunk to a blocking worker
//! (compress + encrypt, or decrypt + decompress) with at most `2 × concurrency` chunks in flight
//! (so a worker that finishes finds the next chunk waiting), and emits the records in order. A
//! local file of fixed length (a WAL segment) is instead read by `concurrency` long-lived
//! workers, each reading and sealing every `concurrency`-th chunk at its offset.
//! Each worker also hashes its chunk (format version 2), so the digests use every core; the
//! object digest over the chunk digests is 32 bytes per chunk for the ordering thread. Reading a
//! version 1 object, whose trailer holds one SHA-256 of the whole plaintext (inherently
//! sequential), hashes on its own blocking thread fed through a bounded channel.
//! Memory is bounded by about `(2 × concurrency + 2) × chunk size` whatever the object size.
//!
//! The sync functions do the same on the calling thread; the benchmark uses them to measure the
//! per-core speed.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::codec::{Codec, Compression};
use super::crypto::KeyRing;
use super::error::ArchiveError;
use super::format::{
    DEFAULT_CHUNK_SIZE, DigestKind, FIXED_HEADER_LEN, Header, ObjectContext, ObjectDigest,
    RECORD_DATA, RECORD_FINAL_DATA, RECORD_HEAD_LEN, RECORD_TRAILER, Trailer, parse_record_head,
    read_full,
};

/// An object as the pipeline sees it: the name errors show (a URL, say) and the store key bound
/// into a version 2 object, which must be the same when it is read. A plain `&str` is both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectRef<'a> {
    pub name: &'a str,
    pub key: &'a str,
}

impl<'a> ObjectRef<'a> {
    pub fn new(name: &'a str, key: &'a str) -> ObjectRef<'a> {
        ObjectRef { name, key }
    }
}

impl<'a> From<&'a str> for ObjectRef<'a> {
    fn from(name: &'a str) -> ObjectRef<'a> {
        ObjectRef { name, key: name }
    }
}

impl<'a> From<&'a String> for ObjectRef<'a> {
    fn from(name: &'a String) -> ObjectRef<'a> {
        ObjectRef::from(name.as_str())
    }
}

/// How to write objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    pub codec: Codec,
    /// Plaintext bytes per chunk.
    pub chunk_size: usize,
    /// Chunks compressed/encrypted at the same time.
    pub concurrency: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            codec: Codec::Zstd { level: 3 },
            chunk_size: DEFAULT_CHUNK_SIZE,
            concurrency: default_concurrency(),
        }
    }
}

/// How to read objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOptions {
    /// Refuse objects that are not encrypted (set when keys are configured, so an attacker who
    /// can write to the store cannot substitute an unencrypted object).
    pub require_encryption: bool,
    /// Chunks decrypted/decompressed at the same time.
    pub concurrency: usize,
    /// Recompute every chunk's SHA-256 of an encrypted version 2 object too (`verify`). Off on
    /// the hot path, where each chunk's GCM tag, the codec's checksum and the authenticated
    /// trailer prove it. Unencrypted objects and version 1 objects are always re-hashed.
    pub recompute_digests: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            require_encryption: false,
            concurrency: default_concurrency(),
            recompute_digests: false,
        }
    }
}

/// The number of CPUs, at least 1.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What was written or read: identity, sizes and the digest of the plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSummary {
    /// Format version of the object.
    pub version: u8,
    pub object_id: [u8; 16],
    pub compression: Compression,
    /// The key id, when encrypted.
    pub key_id: Option<String>,
    pub plaintext_len: u64,
    /// Bytes of the object in the store.
    pub stored_len: u64,
    pub chunk_count: u64,
    /// What [`digest`](Self::digest) is: the SHA-256 of the plaintext (version 1) or of its
    /// chunks' digests (version 2).
    pub digest_kind: DigestKind,
    pub digest: [u8; 32],
}

impl ArchiveSummary {
    fn new(ctx: &ObjectContext, trailer: &Trailer, stored_len: u64) -> ArchiveSummary {
        ArchiveSummary {
            version: ctx.header().version,
            object_id: ctx.header().object_id,
            compression: ctx.header().compression,
            key_id: ctx.key_id().map(str::to_owned),
            plaintext_len: trailer.plaintext_len,
            stored_len,
            chunk_count: trailer.chunk_count,
            digest_kind: ctx.digest_kind(),
            digest: trailer.digest,
        }
    }

    /// The digest, as lower-case hex.
    pub fn digest_hex(&self) -> String {
        super::format::hex(&self.digest)
    }
}

/// SHA-256 on its own blocking thread.
struct HashWorker {
    tx: Option<mpsc::Sender<Bytes>>,
    handle: JoinHandle<[u8; 32]>,
}

impl HashWorker {
    fn start(depth: usize) -> HashWorker {
        let (tx, mut rx) = mpsc::channel::<Bytes>(depth.max(1));
        let handle = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
            }
            hasher.finalize().into()
        });
        HashWorker {
            tx: Some(tx),
            handle,
        }
    }

    async fn update(&mut self, chunk: Bytes) {
        if let Some(tx) = &self.tx {
            // The receiver lives until `finish`, so sending cannot fail.
            let _ = tx.send(chunk).await;
        }
    }

    async fn finish(mut self) -> [u8; 32] {
        self.tx = None;
        self.handle.await.expect("SHA-256 worker does not panic")
    }
}

fn join_error(name: &str, e: tokio::task::JoinError) -> ArchiveError {
    ArchiveError::Io {
        object: name.to_owned(),
        source: io::Error::other(format!("chunk worker failed: {e}")),
    }
}

fn io_error(name: &str, e: io::Error) -> ArchiveError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ArchiveError::Truncated {
            object: name.to_owned(),
            detail: "the object ends before its trailer".into(),
        }
    } else {
        ArchiveError::Io {
            object: name.to_owned(),
            source: e,
        }
    }
}

/// Where an encoder reads its plaintext from, one chunk at a time.
///
/// Every [`AsyncRead`] is one (its bytes are copied into the chunk buffer as they arrive); a
/// [`FileChunks`] reads a local file straight into each chunk's buffer on a blocking thread,
/// which saves the extra copy `tokio::fs::File` makes through its own buffer.
pub trait ChunkRead: Send {
    /// The next `size` bytes, fewer only at the end of the input (empty once it is over).
    fn read_chunk(&mut self, size: usize) -> impl Future<Output = io::Result<Bytes>> + Send;

    /// A local file of known length that the chunk workers read themselves, each its own chunk
    /// at its offset, instead of the encoder reading one chunk after another: asked once, when
    /// the encoder is made. `None` (the default) for streams.
    fn positional(&mut self) -> Option<PositionalFile> {
        None
    }
}

/// A file the encoder's workers read by offset ([`ChunkRead::positional`]). Its length is taken
/// when it is opened; a file that ends earlier while it is read is an error, not a shorter
/// object, and bytes appended later are not part of the object.
#[derive(Clone)]
pub struct PositionalFile {
    file: Arc<std::fs::File>,
    len: u64,
}

impl PositionalFile {
    /// `size` bytes at `offset` into `buf`, which ends up `size` long (the buffer is reused
    /// chunk after chunk, so only its growth is zeroed).
    fn read_into(&self, buf: &mut Vec<u8>, offset: u64, size: usize) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        buf.resize(size, 0);
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the file ended before its {} bytes: it changed while it was read",
                        self.len
                    ),
                )
            } else {
                e
            }
        })
    }
}

impl<R: AsyncRead + Unpin + Send> ChunkRead for R {
    async fn read_chunk(&mut self, size: usize) -> io::Result<Bytes> {
        let mut buf = BytesMut::with_capacity(size);
        while buf.len() < size {
            let n = (&mut *self)
                .take((size - buf.len()) as u64)
                .read_buf(&mut buf)
                .await?;
            if n == 0 {
                break;
            }
        }
        Ok(buf.freeze())
    }
}

/// A local file read chunk by chunk with blocking reads on Tokio's blocking pool, each straight
/// into the buffer that becomes the chunk (one copy, from the page cache). Optionally adds the
/// bytes read to a shared counter as it goes (progress of a base backup).
pub struct FileChunks<'a> {
    file: Option<std::fs::File>,
    counter: Option<&'a std::sync::atomic::AtomicU64>,
    counted: u64,
    /// Set by [`FileChunks::fixed`].
    fixed_len: Option<u64>,
}

impl<'a> FileChunks<'a> {
    pub fn new(file: std::fs::File) -> FileChunks<'static> {
        FileChunks {
            file: Some(file),
            counter: None,
            counted: 0,
            fixed_len: None,
        }
    }

    /// A file that does not change while it is encoded (a WAL segment Postgres marked ready):
    /// its length now is the object's, and the encoder's workers read their chunks themselves,
    /// all at once ([`ChunkRead::positional`]).
    pub fn fixed(file: std::fs::File) -> io::Result<FileChunks<'static>> {
        let len = file.metadata()?.len();
        Ok(FileChunks {
            fixed_len: Some(len),
            ..FileChunks::new(file)
        })
    }

    /// Also adds every byte read to `counter`.
    pub fn counting(file: std::fs::File, counter: &'a std::sync::atomic::AtomicU64) -> Self {
        FileChunks {
            file: Some(file),
            counter: Some(counter),
            counted: 0,
            fixed_len: None,
        }
    }

    /// Bytes read so far.
    pub fn counted(&self) -> u64 {
        self.counted
    }
}

impl ChunkRead for FileChunks<'_> {
    fn positional(&mut self) -> Option<PositionalFile> {
        let len = self.fixed_len?;
        let file = self.file.take()?;
        Some(PositionalFile {
            file: Arc::new(file),
            len,
        })
    }

    async fn read_chunk(&mut self, size: usize) -> io::Result<Bytes> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("an earlier read of this file failed"))?;
        let (file, read) = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::with_capacity(size);
            // `Take` stops at `size` without a further read(2); `read_to_end` fills the
            // reserved capacity in place and retries short reads and EINTR.
            let read = (&file).take(size as u64).read_to_end(&mut buf).map(|_| buf);
            (file, read)
        })
        .await
        .map_err(io::Error::other)?;
        let buf = read?;
        self.file = Some(file);
        self.counted += buf.len() as u64;
        if let Some(c) = self.counter {
            c.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Bytes::from(buf))
    }
}

/// So a caller can keep the reader (and ask it [`FileChunks::counted`] afterwards).
impl ChunkRead for &mut FileChunks<'_> {
    fn read_chunk(&mut self, size: usize) -> impl Future<Output = io::Result<Bytes>> + Send {
        (**self).read_chunk(size)
    }

    fn positional(&mut self) -> Option<PositionalFile> {
        (**self).positional()
    }
}

/// A chunk's record on the wire and the SHA-256 of its plaintext.
type SealedChunk = (Bytes, [u8; 32]);
/// A chunk's plaintext and the digest stored with it (version 2).
type OpenedChunk = (Bytes, Option<[u8; 32]>);

/// Encodes a plaintext stream into archive records, pulled one at a time with
/// [`StreamEncoder::next_frame`].
///
/// A stream is read one chunk at a time and each chunk sealed on a blocking worker of its own,
/// `2 × concurrency` in flight. A [`ChunkRead::positional`] source (a WAL segment) instead gets
/// `concurrency` workers that each read and seal every `concurrency`-th chunk in turn: they
/// stay busy from the first chunk to the last instead of waking for each chunk, which on a
/// 2-core machine left a core idle while a newly woken worker waited to be scheduled.
pub struct StreamEncoder<R> {
    ctx: Arc<ObjectContext>,
    reader: R,
    concurrency: usize,
    header_sent: bool,
    eof: bool,
    pending: Option<Bytes>,
    next_index: u64,
    in_flight: VecDeque<JoinHandle<Result<SealedChunk, ArchiveError>>>,
    /// The workers of a positional source, started with the encoder.
    striped: Option<Striped>,
    object_digest: Option<ObjectDigest>,
    plaintext_len: u64,
    stored_len: u64,
    summary: Option<ArchiveSummary>,
}

/// The workers sealing a positional source: worker `w` seals chunks `w`, `w + n`, `w + 2n`, …
/// and hands them over in order on its own bounded channel, so chunk `i` comes from channel
/// `i % n`.
struct Striped {
    sealed: Vec<mpsc::Receiver<Result<SealedChunk, ArchiveError>>>,
    chunk_count: u64,
}

/// Sealed chunks a striped worker may hold ready before it waits for the writer.
const STRIPED_AHEAD: usize = 2;

impl Striped {
    fn start(ctx: &Arc<ObjectContext>, file: PositionalFile, workers: usize) -> Striped {
        let size = ctx.chunk_size() as u64;
        // One empty chunk for an empty file, as a stream gives.
        let chunk_count = file.len.div_ceil(size).max(1);
        let workers = (workers as u64).min(chunk_count);
        let sealed = (0..workers)
            .map(|w| {
                let (tx, rx) = mpsc::channel(STRIPED_AHEAD);
                let ctx = ctx.clone();
                let file = file.clone();
                // Detached: once the encoder is dropped, the next send fails and it stops.
                drop(tokio::task::spawn_blocking(move || {
                    let mut buf = Vec::with_capacity(size as usize);
                    for index in (w..chunk_count).step_by(workers as usize) {
                        let offset = index * size;
                        let len = (file.len - offset).min(size) as usize;
                        let sealed = file
                            .read_into(&mut buf, offset, len)
                            .map_err(|source| ArchiveError::Io {
                                object: ctx.name().to_owned(),
                                source,
                            })
                            .and_then(|()| ctx.seal_chunk(index, index + 1 == chunk_count, &buf))
                            .map(|(frame, digest)| (frame.into_bytes(), digest));
                        let failed = sealed.is_err();
                        if tx.blocking_send(sealed).is_err() || failed {
                            return;
                        }
                    }
                }));
                rx
            })
            .collect();
        Striped {
            sealed,
            chunk_count,
        }
    }
}

impl<R: ChunkRead> StreamEncoder<R> {
    /// Starts a new object (its name is used in errors, its key bound into it), encrypted when
    /// `keys` has a writer. Must be called inside a Tokio runtime (the chunk workers are
    /// blocking tasks).
    pub fn new<'a>(
        object: impl Into<ObjectRef<'a>>,
        mut reader: R,
        keys: &KeyRing,
        opts: &WriteOptions,
    ) -> Result<Self, ArchiveError> {
        let object = object.into();
        let ctx = Arc::new(ObjectContext::for_writing(
            object.name,
            object.key,
            opts.codec,
            keys,
            opts.chunk_size,
        )?);
        let concurrency = opts.concurrency.max(1);
        // A positional source's length is known now: its workers start at once.
        let positional = reader.positional();
        let plaintext_len = positional.as_ref().map_or(0, |file| file.len);
        let striped = positional.map(|file| Striped::start(&ctx, file, concurrency));
        Ok(StreamEncoder {
            ctx,
            reader,
            concurrency,
            header_sent: false,
            eof: false,
            pending: None,
            next_index: 0,
            in_flight: VecDeque::with_capacity(concurrency),
            striped,
            object_digest: Some(ObjectDigest::default()),
            plaintext_len,
            stored_len: 0,
            summary: None,
        })
    }

    /// The object's header (available before anything is written).
    pub fn header(&self) -> &Header {
        self.ctx.header()
    }

    async fn read_chunk(&mut self) -> Result<Bytes, ArchiveError> {
        let size = self.ctx.chunk_size();
        self.reader
            .read_chunk(size)
            .await
            .map_err(|e| ArchiveError::Io {
                object: self.ctx.name().to_owned(),
                source: e,
            })
    }

    fn dispatch(&mut self, chunk: Bytes, last: bool) {
        let ctx = self.ctx.clone();
        let index = self.next_index;
        self.next_index += 1;
        self.in_flight
            .push_back(tokio::task::spawn_blocking(move || {
                ctx.seal_chunk(index, last, &chunk)
                    .map(|(f, digest)| (f.into_bytes(), digest))
            }));
    }

    /// The next sealed chunk, in order, or `None` after the last one.
    async fn next_sealed(&mut self) -> Result<Option<SealedChunk>, ArchiveError> {
        if let Some(striped) = &mut self.striped {
            if self.next_index == striped.chunk_count {
                return Ok(None);
            }
            let worker = (self.next_index % striped.sealed.len() as u64) as usize;
            let sealed =
                striped.sealed[worker]
                    .recv()
                    .await
                    .ok_or_else(|| ArchiveError::Io {
                        object: self.ctx.name().to_owned(),
                        source: io::Error::other(format!(
                            "the worker sealing chunk {} stopped without it",
                            self.next_index
                        )),
                    })??;
            self.next_index += 1;
            return Ok(Some(sealed));
        }
        while !self.eof && self.in_flight.len() < 2 * self.concurrency {
            let chunk = self.read_chunk().await?;
            let at_eof = chunk.len() < self.ctx.chunk_size();
            self.plaintext_len += chunk.len() as u64;
            // A full chunk may or may not be the last one: hold it until the next read says.
            match self.pending.take() {
                Some(prev) if chunk.is_empty() => self.dispatch(prev, true),
                Some(prev) => {
                    self.dispatch(prev, false);
                    if at_eof {
                        self.dispatch(chunk, true);
                    } else {
                        self.pending = Some(chunk);
                    }
                }
                None if at_eof => self.dispatch(chunk, true),
                None => self.pending = Some(chunk),
            }
            self.eof = at_eof;
        }
        match self.in_flight.pop_front() {
            Some(handle) => Ok(Some(
                handle.await.map_err(|e| join_error(self.ctx.name(), e))??,
            )),
            None => Ok(None),
        }
    }

    /// The next record to store (header first, trailer last), or `None` when done.
    pub async fn next_frame(&mut self) -> Result<Option<Bytes>, ArchiveError> {
        if !self.header_sent {
            self.header_sent = true;
            let h = self.ctx.header_bytes().clone();
            self.stored_len += h.len() as u64;
            return Ok(Some(h));
        }
        if let Some((frame, digest)) = self.next_sealed().await? {
            if let Some(d) = self.object_digest.as_mut() {
                d.add_chunk(&digest);
            }
            self.stored_len += frame.len() as u64;
            return Ok(Some(frame));
        }
        if let Some(digest) = self.object_digest.take() {
            let trailer = Trailer {
                plaintext_len: self.plaintext_len,
                chunk_count: self.next_index,
                digest: digest.finish(self.plaintext_len),
            };
            let frame = self.ctx.seal_trailer(&trailer).into_bytes();
            self.stored_len += frame.len() as u64;
            self.summary = Some(ArchiveSummary::new(&self.ctx, &trailer, self.stored_len));
            return Ok(Some(frame));
        }
        Ok(None)
    }

    /// The summary, once [`next_frame`](Self::next_frame) has returned `None`.
    pub fn summary(&self) -> Option<&ArchiveSummary> {
        self.summary.as_ref()
    }
}

/// The file decode workers write their chunks into, each at its own offset: positional writes,
/// so the chunks of one object reach the file from every core at once.
///
/// Created with `direct`, whole blocks go through a second descriptor opened with
/// `O_DIRECT`: the data is not copied into the page cache, and a restore of gigabytes neither
/// pays for fresh page-cache pages nor leaves them dirty for writeback. What is not a whole
/// aligned block (the tail of a file) goes through the ordinary descriptor. If the file system
/// refuses a direct write (`EINVAL`), that write and every later one is buffered instead. Either
/// way the caller still owes an `fdatasync`: a direct write does not make the file's metadata
/// durable.
pub struct ChunkFile {
    file: std::fs::File,
    direct: Option<std::fs::File>,
    direct_ok: std::sync::atomic::AtomicBool,
}

thread_local! {
    /// Aligned scratch for direct writes of chunks that do not start at an aligned address.
    static DIRECT_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl ChunkFile {
    /// Creates (or truncates) `path`. With `direct`, also opens it with `O_DIRECT` where the file
    /// system allows it (not on tmpfs, for one); otherwise every write is buffered.
    pub fn create(path: &std::path::Path, direct: bool) -> io::Result<ChunkFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::File::create(path)?;
        if !direct {
            return Ok(ChunkFile::new(file));
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(direct) => Ok(ChunkFile::with_direct(file, direct)),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(ChunkFile::new(file)),
            Err(e) => Err(e),
        }
    }

    /// Writes through `file` only.
    fn new(file: std::fs::File) -> ChunkFile {
        ChunkFile {
            file,
            direct: None,
            direct_ok: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Writes whole aligned blocks through `direct`, the same file opened with `O_DIRECT`.
    fn with_direct(file: std::fs::File, direct: std::fs::File) -> ChunkFile {
        ChunkFile {
            file,
            direct: Some(direct),
            direct_ok: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// The ordinary descriptor (for the caller's fsync).
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Whether whole blocks go past the page cache: a direct descriptor, and no direct write
    /// refused so far.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some() && self.direct_ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        const ALIGN: usize = super::codec::DIRECT_IO_ALIGN;
        let whole = data.len() / ALIGN * ALIGN;
        if let Some(direct) = &self.direct
            && whole > 0
            && offset.is_multiple_of(ALIGN as u64)
            && self.direct_ok.load(Ordering::Relaxed)
        {
            let written = if data.as_ptr().align_offset(ALIGN) == 0 {
                direct.write_all_at(&data[..whole], offset)
            } else {
                DIRECT_SCRATCH.with(|cell| {
                    let mut scratch = cell.borrow_mut();
                    scratch.resize(whole + ALIGN, 0);
                    let start = scratch.as_ptr().align_offset(ALIGN);
                    let block = &mut scratch[start..start + whole];
                    block.copy_from_slice(&data[..whole]);
                    direct.write_all_at(block, offset)
                })
            };
            match written {
                Ok(()) => {
                    return match &data[whole..] {
                        [] => Ok(()),
                        tail => self.file.write_all_at(tail, offset + whole as u64),
                    };
                }
                // Not possible on this file system or with this alignment: buffer from now on.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    self.direct_ok.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(data, offset)
    }
}

/// Decodes an archive stream into verified plaintext chunks, pulled one at a time with
/// [`StreamDecoder::next_chunk`]. Each chunk is authenticated (or CRC-checked) before it is
/// returned; the whole object (length, SHA-256, completeness) only once `next_chunk` returned
/// `Ok(None)`, so a caller must not treat what it wrote as valid before that.
pub struct StreamDecoder<R> {
    ctx: Arc<ObjectContext>,
    reader: R,
    concurrency: usize,
    next_index: u64,
    saw_final: bool,
    trailer_payload: Option<Vec<u8>>,
    in_flight: VecDeque<JoinHandle<Result<OpenedChunk, ArchiveError>>>,
    recompute: bool,
    /// Version 1: SHA-256 of the whole plaintext on its own thread.
    hasher: Option<HashWorker>,
    /// Version 2: the object digest over the chunk digests.
    object_digest: Option<ObjectDigest>,
    /// When set, each chunk worker also writes its verified chunk at its offset in this file.
    sink: Option<Arc<ChunkFile>>,
    plaintext_len: u64,
    stored_len: u64,
    summary: Option<ArchiveSummary>,
}

impl<R: AsyncRead + Unpin> StreamDecoder<R> {
    /// Makes every chunk worker write its chunk into `file` at the chunk's offset (positional
    /// writes, so the chunks of one object reach the page cache on every core at once instead of
    /// through one sequential writer). [`next_chunk`](Self::next_chunk) still returns the chunks
    /// in order. The content is only known good once `next_chunk` returned `None`: write into a
    /// temporary file and give it its name after that.
    pub fn write_at(mut self, file: Arc<ChunkFile>) -> Self {
        self.sink = Some(file);
        self
    }

    /// Reads and checks the header, and finds the key. The chunk and hash workers are Tokio
    /// blocking tasks.
    pub async fn open<'a>(
        object: impl Into<ObjectRef<'a>>,
        mut reader: R,
        keys: &KeyRing,
        opts: &ReadOptions,
    ) -> Result<Self, ArchiveError> {
        let object = object.into();
        let name = object.name;
        let mut fixed = [0u8; FIXED_HEADER_LEN];
        reader
            .read_exact(&mut fixed)
            .await
            .map_err(|e| io_error(name, e))?;
        let rest = Header::rest_len(name, &fixed)?;
        let mut header = vec![0u8; FIXED_HEADER_LEN + rest];
        header[..FIXED_HEADER_LEN].copy_from_slice(&fixed);
        reader
            .read_exact(&mut header[FIXED_HEADER_LEN..])
            .await
            .map_err(|e| io_error(name, e))?;
        let stored_len = header.len() as u64;
        let ctx = Arc::new(ObjectContext::for_reading(
            name,
            object.key,
            Bytes::from(header),
            keys,
            opts.require_encryption,
        )?);
        let concurrency = opts.concurrency.max(1);
        let chunked = ctx.chunked();
        Ok(StreamDecoder {
            ctx,
            reader,
            concurrency,
            next_index: 0,
            saw_final: false,
            trailer_payload: None,
            in_flight: VecDeque::with_capacity(concurrency),
            recompute: opts.recompute_digests,
            hasher: (!chunked).then(|| HashWorker::start(concurrency + 1)),
            object_digest: chunked.then(ObjectDigest::default),
            sink: None,
            plaintext_len: 0,
            stored_len,
            summary: None,
        })
    }

    pub fn header(&self) -> &Header {
        self.ctx.header()
    }

    async fn read_record(&mut self) -> Result<(u8, Vec<u8>), ArchiveError> {
        let name = self.ctx.name();
        let mut head = [0u8; RECORD_HEAD_LEN];
        self.reader
            .read_exact(&mut head)
            .await
            .map_err(|e| io_error(name, e))?;
        let (kind, len) = parse_record_head(&self.ctx, &head)?;
        let mut payload = vec![0u8; len];
        self.reader
            .read_exact(&mut payload)
            .await
            .map_err(|e| io_error(name, e))?;
        self.stored_len += (RECORD_HEAD_LEN + len) as u64;
        Ok((kind, payload))
    }

    /// The next verified plaintext chunk, or `None` once the trailer checked out.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ArchiveError> {
        while self.trailer_payload.is_none() && self.in_flight.len() < 2 * self.concurrency {
            let (kind, payload) = self.read_record().await?;
            match kind {
                RECORD_DATA | RECORD_FINAL_DATA => {
                    if self.saw_final {
                        return Err(ArchiveError::Malformed {
                            object: self.ctx.name().to_owned(),
                            detail: format!("chunk {} after the final chunk", self.next_index),
                        });
                    }
                    self.saw_final = kind == RECORD_FINAL_DATA;
                    let ctx = self.ctx.clone();
                    let index = self.next_index;
                    self.next_index += 1;
                    let sink = self.sink.clone();
                    let recompute = self.recompute;
                    self.in_flight
                        .push_back(tokio::task::spawn_blocking(move || {
                            let (plain, digest) =
                                ctx.open_chunk(index, kind, payload, recompute)?;
                            if let Some(file) = sink {
                                // Every chunk but the last holds exactly the chunk size
                                // (`open_chunk` checks it), so this is its plaintext offset.
                                let offset = index * ctx.chunk_size() as u64;
                                file.write_at(&plain, offset)
                                    .map_err(|e| ArchiveError::Io {
                                        object: ctx.name().to_owned(),
                                        source: e,
                                    })?;
                            }
                            Ok((plain, digest))
                        }));
                }
                _ => {
                    debug_assert_eq!(kind, RECORD_TRAILER);
                    self.trailer_payload = Some(payload);
                }
            }
        }
        if let Some(handle) = self.in_flight.pop_front() {
            let (plain, digest) = handle.await.map_err(|e| join_error(self.ctx.name(), e))??;
            self.plaintext_len += plain.len() as u64;
            if let Some(h) = self.hasher.as_mut() {
                h.update(plain.clone()).await;
            }
            if let (Some(d), Some(digest)) = (self.object_digest.as_mut(), digest) {
                d.add_chunk(&digest);
            }
            return Ok(Some(plain));
        }
        if let Some(payload) = self.trailer_payload.take() {
            let trailer = self.ctx.open_trailer(self.next_index, payload)?;
            let mut extra = [0u8; 1];
            let n = self
                .reader
                .read(&mut extra)
                .await
                .map_err(|e| io_error(self.ctx.name(), e))?;
            if n != 0 {
                return Err(ArchiveError::Malformed {
                    object: self.ctx.name().to_owned(),
                    detail: "data after the trailer".into(),
                });
            }
            let digest = match (self.hasher.take(), self.object_digest.take()) {
                (Some(hasher), _) => hasher.finish().await,
                (None, Some(d)) => d.finish(self.plaintext_len),
                (None, None) => unreachable!("one digest is kept until the trailer"),
            };
            let seen = Trailer {
                plaintext_len: self.plaintext_len,
                chunk_count: self.next_index,
                digest,
            };
            self.ctx.check_trailer(&trailer, &seen, self.saw_final)?;
            self.summary = Some(ArchiveSummary::new(&self.ctx, &trailer, self.stored_len));
        }
        Ok(None)
    }

    /// The summary, once [`next_chunk`](Self::next_chunk) has returned `None`.
    pub fn summary(&self) -> Option<&ArchiveSummary> {
        self.summary.as_ref()
    }
}

/// Encodes `reader` into `writer` (flushed, not shut down).
pub async fn encode<'a, R, W>(
    object: impl Into<ObjectRef<'a>>,
    reader: R,
    writer: &mut W,
    keys: &KeyRing,
    opts: &WriteOptions,
) -> Result<ArchiveSummary, ArchiveError>
where
    R: ChunkRead,
    W: AsyncWrite + Unpin,
{
    let object = object.into();
    let name = object.name;
    let mut enc = StreamEncoder::new(object, reader, keys, opts)?;
    let io = |e| ArchiveError::Io {
        object: name.to_owned(),
        source: e,
    };
    while let Some(frame) = enc.next_frame().await? {
        writer.write_all(&frame).await.map_err(io)?;
    }
    writer.flush().await.map_err(io)?;
    Ok(enc.summary.expect("summary set after the last frame"))
}

/// Decodes `reader` into `writer` (flushed, not shut down). What reaches `writer` is only known
/// good when this returns `Ok`.
pub async fn decode<'a, R, W>(
    object: impl Into<ObjectRef<'a>>,
    reader: R,
    writer: &mut W,
    keys: &KeyRing,
    opts: &ReadOptions,
) -> Result<ArchiveSummary, ArchiveError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let object = object.into();
    let name = object.name;
    let mut dec = StreamDecoder::open(object, reader, keys, opts).await?;
    let io = |e| ArchiveError::Io {
        object: name.to_owned(),
        source: e,
    };
    while let Some(chunk) = dec.next_chunk().await? {
        writer.write_all(&chunk).await.map_err(io)?;
    }
    writer.flush().await.map_err(io)?;
    Ok(dec.summary.expect("summary set after the last chunk"))
}

/// Checks a whole object without keeping its content, recomputing every digest whatever
/// `opts.recompute_digests` says.
pub async fn verify<'a, R: AsyncRead + Unpin>(
    object: impl Into<ObjectRef<'a>>,
    reader: R,
    keys: &KeyRing,
    opts: &ReadOptions,
) -> Result<ArchiveSummary, ArchiveError> {
    let opts = ReadOptions {
        recompute_digests: true,
        ..*opts
    };
    decode(object, reader, &mut tokio::io::sink(), keys, &opts).await
}

/// Single-threaded [`encode`] on blocking I/O.
pub fn encode_sync<'a>(
    object: impl Into<ObjectRef<'a>>,
    mut reader: impl Read,
    mut writer: impl Write,
    keys: &KeyRing,
    opts: &WriteOptions,
) -> Result<ArchiveSummary, ArchiveError> {
    let object = object.into();
    let name = object.name;
    let ctx = ObjectContext::for_writing(name, object.key, opts.codec, keys, opts.chunk_size)?;
    let io = |e| ArchiveError::Io {
        object: name.to_owned(),
        source: e,
    };
    let size = ctx.chunk_size();
    writer.write_all(ctx.header_bytes()).map_err(io)?;
    let mut stored = ctx.header_bytes().len() as u64;
    let mut object_digest = ObjectDigest::default();
    let (mut cur, mut next) = (vec![0u8; size], vec![0u8; size]);
    let mut cur_len = read_full(&mut reader, &mut cur).map_err(io)?;
    let (mut index, mut total) = (0u64, 0u64);
    loop {
        let next_len = if cur_len == size {
            read_full(&mut reader, &mut next).map_err(io)?
        } else {
            0
        };
        let last = next_len == 0;
        total += cur_len as u64;
        let (frame, digest) = ctx.seal_chunk(index, last, &cur[..cur_len])?;
        object_digest.add_chunk(&digest);
        writer
            .write_all(&frame.head)
            .and_then(|()| writer.write_all(&frame.payload))
            .map_err(io)?;
        stored += frame.len() as u64;
        index += 1;
        if last {
            break;
        }
        std::mem::swap(&mut cur, &mut next);
        cur_len = next_len;
    }
    let trailer = Trailer {
        plaintext_len: total,
        chunk_count: index,
        digest: object_digest.finish(total),
    };
    let frame = ctx.seal_trailer(&trailer);
    writer
        .write_all(&frame.head)
        .and_then(|()| writer.write_all(&frame.payload))
        .map_err(io)?;
    writer.flush().map_err(io)?;
    stored += frame.len() as u64;
    Ok(ArchiveSummary::new(&ctx, &trailer, stored))
}

/// Single-threaded [`decode`] on blocking I/O.
pub fn decode_sync<'a>(
    object: impl Into<ObjectRef<'a>>,
    mut reader: impl Read,
    mut writer: impl Write,
    keys: &KeyRing,
    opts: &ReadOptions,
) -> Result<ArchiveSummary, ArchiveError> {
    let object = object.into();
    let name = object.name;
    let io = |e: io::Error| io_error(name, e);
    let mut fixed = [0u8; FIXED_HEADER_LEN];
    reader.read_exact(&mut fixed).map_err(io)?;
    let mut header = fixed.to_vec();
    header.resize(FIXED_HEADER_LEN + Header::rest_len(name, &fixed)?, 0);
    reader
        .read_exact(&mut header[FIXED_HEADER_LEN..])
        .map_err(io)?;
    let mut stored = header.len() as u64;
    let ctx = ObjectContext::for_reading(
        name,
        object.key,
        Bytes::from(header),
        keys,
        opts.require_encryption,
    )?;
    let mut hasher = Sha256::new();
    let mut object_digest = ObjectDigest::default();
    let (mut index, mut total, mut saw_final) = (0u64, 0u64, false);
    loop {
        let mut head = [0u8; RECORD_HEAD_LEN];
        reader.read_exact(&mut head).map_err(io)?;
        let (kind, len) = parse_record_head(&ctx, &head)?;
        let mut payload = vec![0u8; len];
        reader.read_exact(&mut payload).map_err(io)?;
        stored += (RECORD_HEAD_LEN + len) as u64;
        if kind == RECORD_TRAILER {
            let trailer = ctx.open_trailer(index, payload)?;
            if read_full(&mut reader, &mut [0u8; 1]).map_err(io)? != 0 {
                return Err(ArchiveError::Malformed {
                    object: name.to_owned(),
                    detail: "data after the trailer".into(),
                });
            }
            let seen = Trailer {
                plaintext_len: total,
                chunk_count: index,
                digest: if ctx.chunked() {
                    object_digest.finish(total)
                } else {
                    hasher.finalize().into()
                },
            };
            ctx.check_trailer(&trailer, &seen, saw_final)?;
            writer.flush().map_err(io)?;
            return Ok(ArchiveSummary::new(&ctx, &trailer, stored));
        }
        if saw_final {
            return Err(ArchiveError::Malformed {
                object: name.to_owned(),
                detail: format!("chunk {index} after the final chunk"),
            });
        }
        saw_final = kind == RECORD_FINAL_DATA;
        let (plain, digest) = ctx.open_chunk(index, kind, payload, opts.recompute_digests)?;
        match digest {
            Some(d) => object_digest.add_chunk(&d),
            None => hasher.update(&plain),
        }
        total += plain.len() as u64;
        writer.write_all(&plain).map_err(io)?;
        index += 1;
    }
}
