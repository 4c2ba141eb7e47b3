//! The file:// backend: a directory, typically a mounted PVC. object_store's LocalFileSystem
//! does not fsync, so this is our own: every object is written to a temporary name in its final
//! directory, fsynced, then renamed (or hard-linked, for create-only) into place, and the
//! directory fsynced. A crash therefore leaves either nothing or the complete object under the
//! final name; leftover temporary files carry [`TEMP_MARKER`] in their name and are never listed.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

/// Part of the name of every temporary file.
pub const TEMP_MARKER: &str = ".pgpilot-tmp-";

/// A file:// store rooted at a directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

/// An object being written under a temporary name.
pub struct LocalUpload {
    file: tokio::fs::File,
    /// The same open file, for the writeback hints given from a blocking thread.
    hint: std::sync::Arc<std::fs::File>,
    /// Bytes written so far, and how many of them writeback was already asked for.
    written: u64,
    hinted: u64,
    temp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    created_dirs: Vec<PathBuf>,
    finished: bool,
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        // Dropped without commit (the caller's future was cancelled): leave no temp file behind.
        if !self.finished {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Size and modification time of a stored file.
#[derive(Debug, Clone)]
pub struct LocalMeta {
    pub key: String,
    pub size: u64,
    pub modified: std::time::SystemTime,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> LocalStore {
        LocalStore { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of a key (already validated by the caller: relative, no `.`/`..`).
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Starts writing `key`: creates missing directories (fsyncing their parents) and a
    /// temporary file next to the target.
    pub async fn begin(&self, key: &str) -> io::Result<LocalUpload> {
        let target = self.path_of(key);
        let dir = target
            .parent()
            .expect("a key has a file name")
            .to_path_buf();
        let created_dirs = create_dirs_durably(&dir).await?;
        let file_name = target
            .file_name()
            .expect("a key has a file name")
            .to_string_lossy()
            .into_owned();
        let suffix: u64 = rand::random();
        let temp = dir.join(format!(".{file_name}{TEMP_MARKER}{suffix:016x}"));
        // Created synchronously (one open(2)): with an await between creating the file and
        // owning its cleanup, a cancelled upload could leave the temp file behind.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        let hint = std::sync::Arc::new(file.try_clone()?);
        let file = tokio::fs::File::from_std(file);
        Ok(LocalUpload {
            file,
            hint,
            written: 0,
            hinted: 0,
            temp,
            target,
            dir,
            created_dirs,
            finished: false,
        })
    }

    /// Opens a stored object for reading.
    pub async fn open(&self, key: &str) -> io::Result<tokio::fs::File> {
        tokio::fs::File::open(self.path_of(key)).await
    }

    /// Size and time of a stored object.
    pub async fn head(&self, key: &str) -> io::Result<LocalMeta> {
        let m = tokio::fs::metadata(self.path_of(key)).await?;
        if !m.is_file() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "not a file"));
        }
        Ok(LocalMeta {
            key: key.to_owned(),
            size: m.len(),
            modified: m.modified()?,
        })
    }

    /// Removes an object and fsyncs its directory. Removing a missing object is not an error.
    pub async fn delete(&self, key: &str) -> io::Result<()> {
        let path = self.path_of(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => sync_dir(path.parent().expect("a key has a parent")).await,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every object whose key starts with `prefix`, sorted by key; temporary files excluded.
    pub async fn list(&self, prefix: &str) -> io::Result<Vec<LocalMeta>> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            // Start from the deepest directory the prefix names, to avoid walking everything.
            let start_rel = match prefix.rfind('/') {
                Some(i) => &prefix[..i],
                None => "",
            };
            let mut stack = vec![root.join(start_rel)];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for entry in entries {
                    let entry = entry?;
                    let ty = entry.file_type()?;
                    let path = entry.path();
                    let Some(rel) = path
                        .strip_prefix(&root)
                        .ok()
                        .and_then(|p| p.to_str())
                        .map(str::to_owned)
                    else {
                        continue;
                    };
                    if ty.is_dir() {
                        stack.push(path);
                    } else if ty.is_file() && !rel.contains(TEMP_MARKER) && rel.starts_with(&prefix)
                    {
                        let m = entry.metadata()?;
                        out.push(LocalMeta {
                            key: rel,
                            size: m.len(),
                            modified: m.modified()?,
                        });
                    }
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// How many bytes of an object are written before the kernel is asked to start writing them.
const WRITEBACK_STEP: u64 = 1 << 20;

/// Starts writing `len` bytes of `file` at `from` to disk without waiting for it: on Linux,
/// `POSIX_FADV_DONTNEED` on dirty pages starts their writeback (and drops them from the page
/// cache once clean, which a stored object does not need).
fn start_writeback(file: &std::fs::File, from: u64, len: u64) {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else {
        return;
    };
    if let Err(e) = posix_fadvise(file, from, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED) {
        tracing::debug!(error = %e, "writeback hint refused");
    }
}

impl LocalUpload {
    /// Appends `bytes`. Every [`WRITEBACK_STEP`] written, the kernel is asked to start writing
    /// them to disk now, so the fsync of [`LocalUpload::commit`] finds little left to write
    /// (PostgreSQL's `pg_flush_data` does the same for its checkpoints).
    pub async fn write(&mut self, bytes: &Bytes) -> io::Result<()> {
        self.file.write_all(bytes).await?;
        self.written += bytes.len() as u64;
        if self.written - self.hinted >= WRITEBACK_STEP {
            // Wait for the write to reach the page cache, or the hint covers nothing.
            self.file.flush().await?;
            let (hint, from, len) = (self.hint.clone(), self.hinted, self.written - self.hinted);
            self.hinted = self.written;
            // Advice only: its outcome changes nothing but when the fsync returns.
            drop(tokio::task::spawn_blocking(move || {
                start_writeback(&hint, from, len);
            }));
        }
        Ok(())
    }

    /// Makes the object durable under its final name. With `create_only`, fails with
    /// `AlreadyExists` (and leaves the existing object alone) when the name is taken: `link(2)`
    /// never replaces its target, atomically.
    pub async fn commit(mut self, create_only: bool) -> io::Result<()> {
        let result = async {
            self.file.flush().await?;
            self.file.sync_all().await?;
            if create_only {
                tokio::fs::hard_link(&self.temp, &self.target).await?;
                tokio::fs::remove_file(&self.temp).await?;
            } else {
                tokio::fs::rename(&self.temp, &self.target).await?;
            }
            sync_dir(&self.dir).await?;
            for dir in &self.created_dirs {
                sync_dir(dir.parent().unwrap_or(dir)).await?;
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&self.temp).await;
        }
        self.finished = true;
        result
    }

    /// Gives up: removes the temporary file. Nothing appears under the final name.
    pub async fn abort(mut self) {
        let _ = tokio::fs::remove_file(&self.temp).await;
        self.finished = true;
    }
}

async fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(io::Error::other)?
}

/// `mkdir -p` that returns the directories it created, so their parents can be fsynced once the
/// object is in place (a new directory entry is only durable after its parent is synced).
async fn create_dirs_durably(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if tokio::fs::metadata(d).await.is_ok() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    let mut created = Vec::new();
    for d in missing.into_iter().rev() {
        match tokio::fs::create_dir(&d).await {
            Ok(()) => created.push(d),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}
