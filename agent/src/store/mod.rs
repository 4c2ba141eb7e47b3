//! The backup store: where WAL segments, history files and base backups go. One [`Store`] over
//! four backends — s3://, gs://, az:// through object_store, file:// through our own fsyncing
//! [`local`] backend — that reads and writes every object in the archive format of
//! `pgpilot_common::archive` (compressed, optionally encrypted, checksummed), streaming with
//! bounded memory.
//!
//! Writes are atomic: a single PUT below `multipart_threshold`, a multipart upload (visible only
//! once completed, aborted on error) above it, temp file + fsync + rename on file://. So an
//! interrupted upload never leaves anything under the final name. Create-only puts use the
//! backend's conditional write (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`, Azure
//! `If-None-Match: *`, `link(2)` on file://); see docs/storage.md for the fallbacks.
//!
//! Restartable operations (from a file, into a file, verify, head, list, delete) are retried on
//! transient failures ([`retry`]); streaming ones from a caller's reader or into a caller's writer
//! cannot be restarted and rely on object_store's per-request retries.

pub mod config;
pub mod error;
pub mod local;
mod remote;
pub mod retry;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, WriteMultipart,
};
use pgpilot_common::archive::{
    self, ArchiveError, ArchiveSummary, ChunkRead, FileChunks, KeyRing, StreamEncoder,
};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio_util::sync::CancellationToken;

pub use config::{ArchiveSettings, ConfigError, RetrySettings, StoreConfig, StoreLocation};
pub use error::StoreError;
pub use remote::{AZURITE_ACCOUNT, AZURITE_KEY};
pub use retry::RetryPolicy;

use local::LocalStore;

/// Whether a download is fsynced before it counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file and its directory.
    Durable,
    /// Leave syncing to the caller.
    Deferred,
}

/// Whether a download goes through the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caching {
    /// Buffered writes: the file is read again soon (a WAL segment for `restore_command`).
    Cached,
    /// Whole blocks written with `O_DIRECT` where the file system allows it: gigabytes written
    /// once (a restore) cost no page-cache copy and leave no dirty pages behind.
    Direct,
}

/// What a put does when the key exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace it.
    Overwrite,
    /// Fail with [`StoreError::AlreadyExists`] and leave it alone.
    CreateOnly,
}

/// The result of [`Store::put_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was written.
    Stored(ArchiveSummary),
    /// Create-only, and an object with the same content (verified) was already there: a retried
    /// WAL push, for instance.
    AlreadyStored(ArchiveSummary),
}

impl PutOutcome {
    pub fn summary(&self) -> &ArchiveSummary {
        match self {
            PutOutcome::Stored(s) | PutOutcome::AlreadyStored(s) => s,
        }
    }
}

/// A stored object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key, relative to the store's prefix.
    pub key: String,
    /// Stored (compressed, encrypted) size.
    pub size: u64,
    pub last_modified: SystemTime,
}

enum Backend {
    Local(LocalStore),
    Remote(Arc<dyn ObjectStore>),
}

struct Inner {
    url: String,
    location: StoreLocation,
    prefix: String,
    backend: Backend,
    settings: ArchiveSettings,
    upload_concurrency: usize,
    multipart_threshold: usize,
    part_size: usize,
    /// Multipart uploads under way through this store (all clones): they share
    /// `upload_concurrency` parts in flight, so memory does not grow with their number.
    multipart_uploads: std::sync::atomic::AtomicUsize,
    retry: RetryPolicy,
}

/// One multipart upload counted in [`Inner::multipart_uploads`] while it lives.
struct MultipartUpload<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> MultipartUpload<'a> {
    fn enter(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        MultipartUpload(count)
    }

    /// The parts this upload may have in flight: its share of `total`, at least one.
    fn share(&self, total: usize) -> usize {
        let uploads = self.0.load(std::sync::atomic::Ordering::Relaxed).max(1);
        (total / uploads).max(1)
    }
}

impl Drop for MultipartUpload<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A backup store. Cheap to clone; safe to use from many tasks at once.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Once cancelled, operations stop retrying ([`Store::with_cancel`]).
    cancel: Option<CancellationToken>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.inner.url)
            .field("codec", &self.inner.settings.write.codec)
            .field("key_ids", &self.inner.settings.keys.ids())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.inner.url)
    }
}

type BoxReader = Box<dyn AsyncRead + Send + Unpin>;

impl Store {
    /// Validates the config, loads keys and credentials, and builds the client. Does not touch
    /// the network or the directory.
    pub fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let (location, settings) = cfg.validate()?;
        let (backend, prefix) = match &location {
            StoreLocation::File { root } => {
                let root = std::path::absolute(root).map_err(|e| ConfigError::Invalid {
                    field: "store",
                    problem: format!("{}: {e}", root.display()),
                })?;
                (Backend::Local(LocalStore::new(root)), String::new())
            }
            StoreLocation::S3 { prefix, .. }
            | StoreLocation::Gcs { prefix, .. }
            | StoreLocation::Azure { prefix, .. } => (
                Backend::Remote(remote::build(&location, cfg)?),
                prefix.clone(),
            ),
        };
        Ok(Store {
            inner: Arc::new(Inner {
                url: cfg.store.trim_end_matches('/').to_owned(),
                location,
                prefix,
                backend,
                settings,
                upload_concurrency: cfg.upload_concurrency,
                multipart_threshold: cfg.multipart_threshold,
                part_size: cfg.part_size,
                multipart_uploads: Default::default(),
                retry: cfg.retry.into(),
            }),
            cancel: None,
        })
    }

    /// This store, with retries that stop once `cancel` is cancelled (the agent is stopping):
    /// the attempt in progress finishes, no other starts, a backoff wait is cut short.
    pub fn with_cancel(&self, cancel: CancellationToken) -> Store {
        Store {
            inner: self.inner.clone(),
            cancel: Some(cancel),
        }
    }

    /// Runs a restartable operation under the store's retry policy and cancellation (for callers
    /// that build their own, like a backup's file upload).
    pub async fn retried<T, F, Fut>(&self, what: &str, op: F) -> Result<T, StoreError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.inner.retry.run(what, self.cancel.as_ref(), op).await
    }

    /// The store URL as configured.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    pub fn location(&self) -> &StoreLocation {
        &self.inner.location
    }

    /// How many objects callers should upload at once.
    pub fn upload_concurrency(&self) -> usize {
        self.inner.upload_concurrency
    }

    /// The key ring (ids only show in Debug).
    pub fn keys(&self) -> &KeyRing {
        &self.inner.settings.keys
    }

    /// `<store url>/<key>`: how errors and logs name an object.
    pub fn object_name(&self, key: &str) -> String {
        format!("{}/{key}", self.inner.url)
    }

    fn full_key(&self, key: &str) -> Result<String, StoreError> {
        validate_key(key)?;
        Ok(if self.inner.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.inner.prefix)
        })
    }

    fn path(&self, key: &str) -> Result<object_store::path::Path, StoreError> {
        let full = self.full_key(key)?;
        object_store::path::Path::parse(&full).map_err(|_| StoreError::InvalidKey {
            key: key.to_owned(),
            problem: "not a valid object path",
        })
    }

    // ----- writing -----

    /// Encodes `reader` (compress, encrypt, checksum) and stores it under `key`. Not retried as a
    /// whole (the reader cannot be rewound); see [`Store::put_file`].
    pub async fn put<R: ChunkRead>(
        &self,
        key: &str,
        reader: R,
        mode: PutMode,
    ) -> Result<ArchiveSummary, StoreError> {
        let object = self.object_name(key);
        let enc = StreamEncoder::new(
            archive::ObjectRef::new(&object, key),
            reader,
            &self.inner.settings.keys,
            &self.inner.settings.write,
        )
        .map_err(StoreError::from_archive)?;
        match self.upload(key, &object, enc, mode).await {
            // A server may answer a create-only PUT of an existing key (412) before reading the
            // body and close the connection: the client then sees a broken pipe, not the
            // refusal, and so would every retry. An object under the key now means the same
            // refusal a readable answer (or the next attempt) would have given; a caller that
            // must know whose content it is reads it back (see `put_file`).
            Err(e) if mode == PutMode::CreateOnly && e.is_transient() => {
                match self.head(key).await {
                    Ok(Some(_)) => Err(StoreError::AlreadyExists { object }),
                    _ => Err(e),
                }
            }
            other => other,
        }
    }

    /// Stores the content of a local file, retrying transient failures. With
    /// [`PutMode::CreateOnly`], an existing object is read back and verified: same content gives
    /// [`PutOutcome::AlreadyStored`], different content [`StoreError::Conflict`]. This is what a
    /// WAL push needs (a retried push succeeds; two clusters in one archive fail loudly).
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        mode: PutMode,
    ) -> Result<PutOutcome, StoreError> {
        match self.put_file_retried(key, path, mode).await {
            Ok(summary) => Ok(PutOutcome::Stored(summary)),
            Err(StoreError::AlreadyExists { object }) if mode == PutMode::CreateOnly => {
                // The local file's digest of the kind the stored object has (the stored one may
                // be of format 1, or of another chunk size).
                let local = async |s: &ArchiveSummary| digest_file(path, s.digest_kind).await;
                match self.verify(key).await {
                    Ok(stored) => {
                        let (len, digest) = local(&stored).await?;
                        if stored.digest == digest && stored.plaintext_len == len {
                            Ok(PutOutcome::AlreadyStored(stored))
                        } else {
                            Err(conflict(&object, &stored, &digest))
                        }
                    }
                    // Stored before encryption was configured (e.g. uploaded ahead, then the
                    // agent restarted with keys): the reader now refuses it, so a restore could
                    // not use it. When its content is this file's, replace it with an encrypted
                    // copy (atomically: rename on file://, one PUT elsewhere); otherwise it is
                    // a conflict like any other.
                    Err(StoreError::Archive(ArchiveError::NotEncrypted { .. })) => {
                        let stored = self.verify_accepting_unencrypted(key).await?;
                        let (len, digest) = local(&stored).await?;
                        if stored.digest != digest || stored.plaintext_len != len {
                            return Err(conflict(&object, &stored, &digest));
                        }
                        tracing::warn!(
                            object,
                            "stored without encryption before keys were configured; replacing it with an encrypted copy of the same content"
                        );
                        let summary = self.put_file_retried(key, path, PutMode::Overwrite).await?;
                        Ok(PutOutcome::Stored(summary))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The content of a local file that does not change while it is stored (a WAL segment),
    /// its chunks read by the codec workers themselves, retrying transient failures (each
    /// attempt reopens the file).
    async fn put_file_retried(
        &self,
        key: &str,
        path: &Path,
        mode: PutMode,
    ) -> Result<ArchiveSummary, StoreError> {
        self.retried("put", |_| async move {
            let file = std::fs::File::open(path)
                .and_then(FileChunks::fixed)
                .map_err(|e| local_io(path, e))?;
            self.put(key, file, mode).await
        })
        .await
    }

    /// Stores bytes (a manifest, a history file), retrying transient failures.
    pub async fn put_bytes(
        &self,
        key: &str,
        data: Bytes,
        mode: PutMode,
    ) -> Result<ArchiveSummary, StoreError> {
        self.retried("put", |_| self.put(key, data.as_ref(), mode))
            .await
    }

    async fn upload<R: ChunkRead>(
        &self,
        key: &str,
        object: &str,
        mut enc: StreamEncoder<R>,
        mode: PutMode,
    ) -> Result<ArchiveSummary, StoreError> {
        match &self.inner.backend {
            Backend::Local(local) => {
                let full = self.full_key(key)?;
                let mut upload = local
                    .begin(&full)
                    .await
                    .map_err(|e| StoreError::from_local_io(object, "create", e))?;
                while let Some(frame) = enc.next_frame().await.map_err(StoreError::from_archive)? {
                    upload
                        .write(&frame)
                        .await
                        .map_err(|e| StoreError::from_local_io(object, "write", e))?;
                }
                upload
                    .commit(mode == PutMode::CreateOnly)
                    .await
                    .map_err(|e| StoreError::from_local_io(object, "commit", e))?;
            }
            Backend::Remote(store) => {
                let path = self.path(key)?;
                let os_err = |op, e| StoreError::from_object_store(object, op, e);
                let mut buffered = Vec::new();
                let mut size = 0usize;
                let mut complete = false;
                while size < self.inner.multipart_threshold {
                    match enc.next_frame().await.map_err(StoreError::from_archive)? {
                        Some(frame) => {
                            size += frame.len();
                            buffered.push(frame);
                        }
                        None => {
                            complete = true;
                            break;
                        }
                    }
                }
                if complete {
                    let opts = PutOptions {
                        mode: match mode {
                            PutMode::Overwrite => object_store::PutMode::Overwrite,
                            PutMode::CreateOnly => object_store::PutMode::Create,
                        },
                        ..PutOptions::default()
                    };
                    store
                        .put_opts(&path, PutPayload::from_iter(buffered), opts)
                        .await
                        .map_err(|e| os_err("put", e))?;
                } else {
                    if mode == PutMode::CreateOnly {
                        // Multipart uploads cannot be conditional on every backend: check first.
                        // Not atomic; documented in docs/storage.md.
                        match store.head(&path).await {
                            Ok(_) => {
                                return Err(StoreError::AlreadyExists {
                                    object: object.to_owned(),
                                });
                            }
                            Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(os_err("head", e)),
                        }
                    }
                    let upload = store
                        .put_multipart_opts(&path, PutMultipartOptions::default())
                        .await
                        .map_err(|e| os_err("multipart start", e))?;
                    let part_size = self.inner.part_size;
                    let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);
                    // The multipart uploads under way share `upload_concurrency` parts in
                    // flight: 4 backup files of incompressible data to S3 once held 4 × 5
                    // parts of 8 MiB (235 MiB of RSS, docs/benchmarks.md, P3).
                    let counted = MultipartUpload::enter(&self.inner.multipart_uploads);
                    // Bytes in the part being filled: `put` sends a part each time it fills.
                    let mut filling = 0usize;
                    for frame in buffered {
                        filling = (filling + frame.len()) % part_size;
                        writer.put(frame);
                    }
                    let streamed: Result<(), StoreError> = async {
                        loop {
                            let Some(frame) =
                                enc.next_frame().await.map_err(StoreError::from_archive)?
                            else {
                                return Ok(());
                            };
                            // Room for the parts this frame completes, within the share.
                            let completes = (filling + frame.len()) / part_size;
                            if completes > 0 {
                                let share = counted.share(self.inner.upload_concurrency);
                                writer
                                    .wait_for_capacity(share.saturating_sub(completes))
                                    .await
                                    .map_err(|e| os_err("multipart part", e))?;
                            }
                            filling = (filling + frame.len()) % part_size;
                            writer.put(frame);
                        }
                    }
                    .await;
                    match streamed {
                        Ok(()) => {
                            writer
                                .finish()
                                .await
                                .map_err(|e| os_err("multipart complete", e))?;
                        }
                        Err(e) => {
                            if let Err(abort) = writer.abort().await {
                                tracing::warn!(object, error = %abort, "could not abort multipart upload");
                            }
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(enc.summary().cloned().expect("encoder finished"))
    }

    // ----- reading -----

    async fn open_reader(&self, key: &str) -> Result<BoxReader, StoreError> {
        let object = self.object_name(key);
        match &self.inner.backend {
            Backend::Local(local) => {
                let file = local
                    .open(&self.full_key(key)?)
                    .await
                    .map_err(|e| StoreError::from_local_io(&object, "open", e))?;
                Ok(Box::new(BufReader::with_capacity(1 << 20, file)))
            }
            Backend::Remote(store) => {
                let result = store
                    .get(&self.path(key)?)
                    .await
                    .map_err(|e| StoreError::from_object_store(&object, "get", e))?;
                let stream = result.into_stream().map_err(std::io::Error::other);
                Ok(Box::new(tokio_util::io::StreamReader::new(stream)))
            }
        }
    }

    /// Reads, verifies and decodes `key` into `writer`. Everything is checked (every chunk, the
    /// length, the SHA-256) but the writer sees chunks as they are verified: only an `Ok` means
    /// the whole content is good. Not retried (the writer cannot be rewound).
    pub async fn get<W: AsyncWrite + Unpin>(
        &self,
        key: &str,
        writer: &mut W,
    ) -> Result<ArchiveSummary, StoreError> {
        let reader = self.open_reader(key).await?;
        let object = self.object_name(key);
        archive::decode(
            archive::ObjectRef::new(&object, key),
            reader,
            writer,
            &self.inner.settings.keys,
            &self.inner.settings.read,
        )
        .await
        .map_err(StoreError::from_archive)
    }

    /// Like [`Store::get`] into a local file, with every chunk written at its offset by the
    /// worker that verified it. Only an `Ok` means the whole content is good.
    async fn get_at(
        &self,
        key: &str,
        file: Arc<archive::ChunkFile>,
    ) -> Result<ArchiveSummary, StoreError> {
        let reader = self.open_reader(key).await?;
        let object = self.object_name(key);
        let mut dec = archive::StreamDecoder::open(
            archive::ObjectRef::new(&object, key),
            reader,
            &self.inner.settings.keys,
            &self.inner.settings.read,
        )
        .await
        .map_err(StoreError::from_archive)?
        .write_at(file);
        while dec
            .next_chunk()
            .await
            .map_err(StoreError::from_archive)?
            .is_some()
        {}
        Ok(dec
            .summary()
            .cloned()
            .expect("summary set after the last chunk"))
    }

    /// Downloads `key` into `target`: a temp file next to it, fsynced, renamed into place only
    /// once fully verified. Retries transient failures. An existing `target` is replaced.
    pub async fn get_to_file(
        &self,
        key: &str,
        target: &Path,
    ) -> Result<ArchiveSummary, StoreError> {
        self.get_to_file_with(key, target, Durability::Durable, Caching::Cached)
            .await
    }

    /// [`Store::get_to_file`] with a choice of durability and of page-cache use.
    /// [`Durability::Deferred`] skips the file and directory fsyncs (the file is still verified
    /// before it gets its name), for callers that sync many files at once afterwards (a restore)
    /// or can fetch again after a crash (the WAL prefetch spool). [`Caching::Direct`] writes past
    /// the page cache (a restore).
    pub async fn get_to_file_with(
        &self,
        key: &str,
        target: &Path,
        durability: Durability,
        caching: Caching,
    ) -> Result<ArchiveSummary, StoreError> {
        let durable = durability == Durability::Durable;
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = dir.join(format!(
            ".{name}{}{:016x}",
            local::TEMP_MARKER,
            rand::random::<u64>()
        ));
        let result = self
            .retried("get", |_| {
                let temp = temp.clone();
                async move {
                    // Chunks are written by the decode workers at their offsets, in parallel.
                    let file = archive::ChunkFile::create(&temp, caching == Caching::Direct)
                        .map_err(|e| local_io(&temp, e))?;
                    let file = Arc::new(file);
                    let summary = self.get_at(key, file.clone()).await?;
                    if durable {
                        tokio::task::spawn_blocking(move || file.file().sync_all())
                            .await
                            .map_err(std::io::Error::other)
                            .and_then(|r| r)
                            .map_err(|e| local_io(&temp, e))?;
                    }
                    Ok(summary)
                }
            })
            .await;
        let summary = match result {
            Ok(s) => s,
            Err(e) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(e);
            }
        };
        if let Err(e) = tokio::fs::rename(&temp, target).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(local_io(target, e));
        }
        if !durable {
            return Ok(summary);
        }
        let dir_for_sync = dir.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir_for_sync)?.sync_all())
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|e| local_io(&dir, e))?;
        Ok(summary)
    }

    /// Reads a small object whole (a manifest). Retries transient failures.
    pub async fn get_bytes(&self, key: &str) -> Result<(Bytes, ArchiveSummary), StoreError> {
        self.retried("get", |_| async move {
            let mut out = Vec::new();
            let summary = self.get(key, &mut out).await?;
            Ok((Bytes::from(out), summary))
        })
        .await
    }

    /// [`Store::verify`] that also accepts an object without encryption when keys are
    /// configured (every other check still applies).
    async fn verify_accepting_unencrypted(&self, key: &str) -> Result<ArchiveSummary, StoreError> {
        let opts = archive::ReadOptions {
            require_encryption: false,
            ..self.inner.settings.read
        };
        self.verify_with(key, &opts).await
    }

    /// Reads and checks `key` completely without keeping its content. Retries transient failures.
    pub async fn verify(&self, key: &str) -> Result<ArchiveSummary, StoreError> {
        self.verify_with(key, &self.inner.settings.read).await
    }

    /// [`Store::verify`] that also keeps the first `n` plaintext bytes (a WAL segment's page
    /// header), in the same single read of the object.
    pub async fn verify_head(
        &self,
        key: &str,
        n: usize,
    ) -> Result<(ArchiveSummary, Vec<u8>), StoreError> {
        self.retried("verify", |_| async move {
            let mut head = HeadSink {
                keep: n,
                head: Vec::with_capacity(n),
            };
            let summary = self.get(key, &mut head).await?;
            Ok((summary, head.head))
        })
        .await
    }

    async fn verify_with(
        &self,
        key: &str,
        opts: &archive::ReadOptions,
    ) -> Result<ArchiveSummary, StoreError> {
        self.retried("verify", |_| async move {
            let reader = self.open_reader(key).await?;
            archive::verify(
                archive::ObjectRef::new(&self.object_name(key), key),
                reader,
                &self.inner.settings.keys,
                opts,
            )
            .await
            .map_err(StoreError::from_archive)
        })
        .await
    }

    // ----- metadata -----

    /// Size and time of `key`, or `None` when it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let object = self.object_name(key);
        let r = self
            .retried("head", |_| async {
                match &self.inner.backend {
                    Backend::Local(local) => local
                        .head(&self.full_key(key)?)
                        .await
                        .map(|m| ObjectInfo {
                            key: key.to_owned(),
                            size: m.size,
                            last_modified: m.modified,
                        })
                        .map_err(|e| StoreError::from_local_io(&object, "head", e)),
                    Backend::Remote(store) => store
                        .head(&self.path(key)?)
                        .await
                        .map(|m| ObjectInfo {
                            key: key.to_owned(),
                            size: m.size,
                            last_modified: m.last_modified.into(),
                        })
                        .map_err(|e| StoreError::from_object_store(&object, "head", e)),
                }
            })
            .await;
        match r {
            Ok(info) => Ok(Some(info)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every object whose key starts with `prefix` (e.g. `"c/0/wal/"`), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        if prefix.starts_with('/')
            || prefix.split('/').any(|s| s == "." || s == "..")
            || prefix.contains(['\\', '\0'])
        {
            return Err(StoreError::InvalidKey {
                key: prefix.to_owned(),
                problem: "a list prefix must be relative, without . or ..",
            });
        }
        let object = self.object_name(prefix);
        self.retried("list", |_| async {
            match &self.inner.backend {
                Backend::Local(local) => Ok(local
                    .list(prefix)
                    .await
                    .map_err(|e| StoreError::from_local_io(&object, "list", e))?
                    .into_iter()
                    .map(|m| ObjectInfo {
                        key: m.key,
                        size: m.size,
                        last_modified: m.modified,
                    })
                    .collect()),
                Backend::Remote(store) => {
                    // List the directory part of the prefix, then filter on the rest.
                    let dir = match prefix.rfind('/') {
                        Some(i) => &prefix[..i],
                        None => "",
                    };
                    let full_dir = match (self.inner.prefix.is_empty(), dir.is_empty()) {
                        (true, _) => dir.to_owned(),
                        (false, true) => self.inner.prefix.clone(),
                        (false, false) => format!("{}/{dir}", self.inner.prefix),
                    };
                    let list_path = (!full_dir.is_empty())
                        .then(|| object_store::path::Path::from(full_dir.as_str()));
                    let metas: Vec<_> = store
                        .list(list_path.as_ref())
                        .try_collect()
                        .await
                        .map_err(|e| StoreError::from_object_store(&object, "list", e))?;
                    let strip = if self.inner.prefix.is_empty() {
                        0
                    } else {
                        self.inner.prefix.len() + 1
                    };
                    let mut out: Vec<ObjectInfo> = metas
                        .into_iter()
                        .filter_map(|m| {
                            let key = m.location.as_ref().get(strip..)?.to_owned();
                            key.starts_with(prefix).then(|| ObjectInfo {
                                key,
                                size: m.size,
                                last_modified: m.last_modified.into(),
                            })
                        })
                        .collect();
                    out.sort_by(|a, b| a.key.cmp(&b.key));
                    Ok(out)
                }
            }
        })
        .await
    }

    /// Deletes `key`. Deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let object = self.object_name(key);
        let r = self
            .retried("delete", |_| async {
                match &self.inner.backend {
                    Backend::Local(local) => local
                        .delete(&self.full_key(key)?)
                        .await
                        .map_err(|e| StoreError::from_local_io(&object, "delete", e)),
                    Backend::Remote(store) => store
                        .delete(&self.path(key)?)
                        .await
                        .map_err(|e| StoreError::from_object_store(&object, "delete", e)),
                }
            })
            .await;
        match r {
            Err(StoreError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    // ----- raw access (tools, tests) -----

    /// The stored bytes of `key`, not decoded. For inspection tools and tamper tests.
    pub async fn get_raw(&self, key: &str) -> Result<Bytes, StoreError> {
        let mut reader = self.open_reader(key).await?;
        let mut out = Vec::new();
        tokio::io::copy(&mut reader, &mut out)
            .await
            .map_err(|e| StoreError::from_local_io(&self.object_name(key), "read", e))?;
        Ok(Bytes::from(out))
    }

    /// Stores bytes under `key` as they are, without encoding. For tools and tamper tests.
    pub async fn put_raw(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let object = self.object_name(key);
        match &self.inner.backend {
            Backend::Local(local) => {
                let mut upload = local
                    .begin(&self.full_key(key)?)
                    .await
                    .map_err(|e| StoreError::from_local_io(&object, "create", e))?;
                upload
                    .write(&data)
                    .await
                    .map_err(|e| StoreError::from_local_io(&object, "write", e))?;
                upload
                    .commit(false)
                    .await
                    .map_err(|e| StoreError::from_local_io(&object, "commit", e))
            }
            Backend::Remote(store) => {
                store
                    .put(&self.path(key)?, data.into())
                    .await
                    .map_err(|e| StoreError::from_object_store(&object, "put", e))?;
                Ok(())
            }
        }
    }
}

fn local_io(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::LocalIo {
        path: path.display().to_string(),
        source: e,
    }
}

fn conflict(object: &str, stored: &ArchiveSummary, local: &[u8; 32]) -> StoreError {
    StoreError::Conflict {
        object: object.to_owned(),
        stored: stored.digest_hex(),
        local: archive::hex(local),
    }
}

/// Length and digest of a local file, of the given kind.
pub async fn digest_file(
    path: &Path,
    kind: archive::DigestKind,
) -> Result<(u64, [u8; 32]), StoreError> {
    let p: PathBuf = path.to_path_buf();
    tokio::task::spawn_blocking(move || kind.of_reader(std::fs::File::open(&p)?))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|e| local_io(path, e))
}

/// Keys are relative paths of plain segments: no leading or trailing `/`, no empty, `.` or `..`
/// segment, no backslash or NUL, no temp-file marker.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad = |problem| {
        Err(StoreError::InvalidKey {
            key: key.to_owned(),
            problem,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return bad("empty, . or .. segment (or leading/trailing /)");
    }
    if key.contains(['\\', '\0']) {
        return bad("backslash or NUL");
    }
    if key.contains(local::TEMP_MARKER) {
        return bad("contains the temporary-file marker");
    }
    Ok(())
}

/// An [`AsyncWrite`] that keeps the first `keep` bytes written and drops the rest.
struct HeadSink {
    keep: usize,
    head: Vec<u8>,
}

impl AsyncWrite for HeadSink {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let room = self.keep.saturating_sub(self.head.len()).min(buf.len());
        self.head.extend_from_slice(&buf[..room]);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
