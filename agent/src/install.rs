//! Copies of the agent's binaries where another user can execute them. archive_command and
//! restore_command run the `pgpilot-wal` front and the agent binary as the Postgres user; when
//! the agent runs as root from a directory that user cannot enter (a clone under `/root`, a
//! `mktemp -d` dir), the agent installs copies under its state dir and renders the commands
//! with those paths. The Kubernetes init container makes the same move (copy the binaries into
//! a shared volume) with the same function, [`install_copy`].
//!
//! A copy is named by the SHA-256 of its content (`pgpilot-agent-<16 hex>`,
//! `pgpilot-wal-<16 hex>`), so agents of different versions sharing a directory, and
//! upgrades, never overwrite a binary another agent's Postgres may be running; it is written to
//! a temp file, fsynced, made 0755 and renamed into place, so a name only ever holds a complete
//! binary.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use crate::config::ArchiveExes;
use crate::postgres::OsUser;
use crate::postgres::bootstrap::blocking_dir;

/// Where, under the state dir, the agent installs a copy of itself for the Postgres user.
pub const COPY_DIR: &str = "bin";

/// The agent binary's name.
pub const AGENT: &str = "pgpilot-agent";

/// archive_command's small front (agent/src/bin/pgpilot-wal.rs), shipped next to the agent
/// binary: one loopback call per WAL file, handing over to the agent binary when the agent
/// cannot be reached.
pub const WAL_FRONT: &str = "pgpilot-wal";

/// The `pgpilot-wal` next to the agent binary `exe` (resolved, so a symlink installed by
/// [`install_named`] names the content-named copy it points at).
pub fn front_next_to(exe: &Path) -> Option<PathBuf> {
    fs::canonicalize(exe.with_file_name(WAL_FRONT))
        .ok()
        .filter(|p| p.is_file())
}

/// Why no binary the Postgres user can execute could be found or made.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot locate the agent binary: {0}")]
    CurrentExe(io::Error),
    /// Neither the binary nor a copy under the state dir is reachable by the Postgres user.
    #[error(
        "archive_command runs the agent binary as user {user:?}, which cannot execute {exe} ({why}), \
         and a copy under {dir} would not be reachable either ({copy_why}). Choose a state dir \
         (--state-dir) or a data dir that user can reach, install the agent binary where it can \
         (e.g. /usr/local/bin), or run the agent as that user"
    )]
    Unreachable {
        user: String,
        exe: String,
        why: String,
        dir: String,
        copy_why: String,
    },
    #[error(
        "archive_command runs the agent binary as user {user:?}, which cannot execute {exe} ({why}); \
         installing a copy in {dir} failed: {source}. Make {dir} writable by the agent, or install \
         the agent binary where that user can reach it (e.g. /usr/local/bin)"
    )]
    Copy {
        user: String,
        exe: String,
        why: String,
        dir: String,
        #[source]
        source: io::Error,
    },
}

/// The binaries that archive_command and restore_command should run: this agent binary and
/// the `pgpilot-wal` next to it when Postgres runs as the agent's own user or can execute them
/// where they are; otherwise copies installed under `<state_dir>/bin` (logged once).
pub fn exes_for_postgres(
    state_dir: &Path,
    owner: Option<&OsUser>,
) -> Result<ArchiveExes, InstallError> {
    let exe = std::env::current_exe().map_err(InstallError::CurrentExe)?;
    let front = front_next_to(&exe);
    let Some(owner) = owner else {
        return Ok(ArchiveExes { agent: exe, front });
    };
    let blocked = |path: &Path| {
        blocking_dir(path, owner).map(|(dir, mode)| format!("{} has mode {mode:o}", dir.display()))
    };
    let Some(why) = blocked(&exe).or_else(|| front.as_deref().and_then(blocked)) else {
        return Ok(ArchiveExes { agent: exe, front });
    };
    let dir = state_dir.join(COPY_DIR);
    // The copy's own directory is made 0755 by the agent; its ancestors decide.
    if let Some(copy_why) = blocked(&dir) {
        return Err(InstallError::Unreachable {
            user: owner.name.clone(),
            exe: exe.display().to_string(),
            why,
            dir: dir.display().to_string(),
            copy_why,
        });
    }
    let copy_of = |src: &Path, stem: &str| {
        install_copy(src, &dir, stem).map_err(|source| InstallError::Copy {
            user: owner.name.clone(),
            exe: src.display().to_string(),
            why: why.clone(),
            dir: dir.display().to_string(),
            source,
        })
    };
    let copies = ArchiveExes {
        agent: copy_of(&exe, AGENT)?,
        front: front
            .as_deref()
            .map(|f| copy_of(f, WAL_FRONT))
            .transpose()?,
    };
    tracing::info!(
        user = %owner.name,
        exe = %exe.display(),
        copy = %copies.agent.display(),
        front = ?copies.front.as_ref().map(|p| p.display().to_string()),
        "the Postgres user cannot execute the agent binary where it is; archive_command and restore_command run copies"
    );
    Ok(copies)
}

/// Installs this binary into `dir` as `pgpilot-agent`, and the `pgpilot-wal` next to it as
/// `pgpilot-wal`: each a content-named copy (see [`install_copy`]) and a symlink to it,
/// replaced atomically. Returns the agent's link.
pub fn install_named(dir: &Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let exe = std::env::current_exe().context("cannot locate the agent binary")?;
    install_binaries(&exe, dir)
}

/// [`install_named`] for the agent binary `exe`.
fn install_binaries(exe: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    if let Some(front) = front_next_to(exe) {
        install_linked(&front, dir, WAL_FRONT)?;
    }
    install_linked(exe, dir, AGENT)
}

/// A content-named copy of `src` in `dir` and the symlink `dir/<stem>` to it.
fn install_linked(src: &Path, dir: &Path, stem: &str) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let copy =
        install_copy(src, dir, stem).with_context(|| format!("cannot copy {}", src.display()))?;
    let link = dir.join(stem);
    let tmp = dir.join(format!(".{stem}.link"));
    let _ = fs::remove_file(&tmp);
    let target = copy.file_name().map(PathBuf::from).unwrap_or(copy.clone());
    std::os::unix::fs::symlink(&target, &tmp)
        .and_then(|()| fs::rename(&tmp, &link))
        .with_context(|| format!("cannot link {}", link.display()))?;
    Ok(link)
}

/// Installs a copy of the binary `src` in `dest_dir` (created 0755 when missing) as
/// `<stem>-<first 16 hex digits of its SHA-256>`, mode 0755, and returns its path. An
/// existing copy of that name and size is reused; otherwise the copy is written to a temp file,
/// fsynced, and renamed into place (then the directory is fsynced), so concurrent installs of
/// the same binary are harmless and a name never holds a partial file.
///
/// When `src` is already mode 0755 and on the same file system, the "copy" is a hard link to
/// it (made under a temp name and renamed into place the same way): no bytes are written, where
/// a copy would write the whole binary for every agent (hundreds of MB for a debug build) and
/// fsync it. Binaries are replaced by rename (package managers, `install`, cargo), which leaves
/// the linked file as it was; one rewritten in place is refused while a process runs it, and
/// otherwise changes the link's content too, which the next install notices by its new name.
pub fn install_copy(src: &Path, dest_dir: &Path, stem: &str) -> io::Result<PathBuf> {
    let with_path =
        |p: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    let (len, digest) = sha256_file(src).map_err(|e| with_path(src, e))?;
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("{stem}-{hex}");
    let dest = dest_dir.join(&name);
    if let Ok(meta) = fs::metadata(&dest)
        && meta.is_file()
        && meta.len() == len
        && meta.permissions().mode() & 0o7777 == 0o755
    {
        return Ok(dest);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dest_dir)
        .map_err(|e| with_path(dest_dir, e))?;
    let temp = dest_dir.join(format!(
        ".{name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let linkable = fs::metadata(src).is_ok_and(|m| m.permissions().mode() & 0o7777 == 0o755);
    let written = (|| {
        if !(linkable && fs::hard_link(src, &temp).is_ok()) {
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o700)
                .open(&temp)?;
            io::copy(&mut fs::File::open(src)?, &mut out)?;
            out.flush()?;
            // Explicitly, whatever the umask.
            out.set_permissions(fs::Permissions::from_mode(0o755))?;
            out.sync_all()?;
        }
        fs::rename(&temp, &dest)?;
        fs::File::open(dest_dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(with_path(&dest, e));
    }
    Ok(dest)
}

fn sha256_file(path: &Path) -> io::Result<(u64, [u8; 32])> {
    let mut hasher = Sha256::new();
    let len = io::copy(&mut fs::File::open(path)?, &mut hasher)?;
    Ok((len, hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_named_by_content_atomic_0755_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("agent");
        fs::write(&src, b"#!/bin/sh\necho one\n").unwrap();
        let dest_dir = dir.path().join("state/bin");
        let a = install_copy(&src, &dest_dir, AGENT).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&src).unwrap());
        assert_eq!(
            fs::metadata(&a).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            fs::metadata(&dest_dir).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("pgpilot-agent-") && name.len() == 14 + 16,
            "{name}"
        );
        // Same content: the same path, reused.
        assert_eq!(install_copy(&src, &dest_dir, AGENT).unwrap(), a);
        // An upgrade: another name, the old copy untouched (a running Postgres may use it).
        fs::write(&src, b"#!/bin/sh\necho two\n").unwrap();
        let b = install_copy(&src, &dest_dir, AGENT).unwrap();
        assert_ne!(a, b);
        assert_eq!(fs::read(&a).unwrap(), b"#!/bin/sh\necho one\n");
        // No temp file left behind.
        let names: Vec<_> = fs::read_dir(&dest_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// A 0755 binary on the same file system is linked, not copied; any other mode is copied,
    /// and the source's mode is left alone.
    #[test]
    fn an_executable_binary_is_linked_and_a_private_one_copied() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let dest_dir = dir.path().join("state/bin");
        let public = dir.path().join("public");
        fs::write(&public, b"#!/bin/sh\necho public\n").unwrap();
        fs::set_permissions(&public, fs::Permissions::from_mode(0o755)).unwrap();
        let linked = install_copy(&public, &dest_dir, AGENT).unwrap();
        assert_eq!(
            fs::metadata(&linked).unwrap().ino(),
            fs::metadata(&public).unwrap().ino()
        );
        assert_eq!(fs::read(&linked).unwrap(), b"#!/bin/sh\necho public\n");
        assert_eq!(install_copy(&public, &dest_dir, AGENT).unwrap(), linked);

        let private = dir.path().join("private");
        fs::write(&private, b"#!/bin/sh\necho private\n").unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
        let copied = install_copy(&private, &dest_dir, WAL_FRONT).unwrap();
        assert_ne!(
            fs::metadata(&copied).unwrap().ino(),
            fs::metadata(&private).unwrap().ino()
        );
        assert_eq!(
            fs::metadata(&copied).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            fs::metadata(&private).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        // No temp file left behind by either way.
        assert_eq!(fs::read_dir(&dest_dir).unwrap().count(), 2);
    }

    /// The init container's `install`: the agent and the front next to it, each a content-named
    /// copy behind a link; the agent run from its link finds the front's copy next to it.
    #[test]
    fn install_copies_the_front_along_and_the_agent_finds_it_there() {
        let dir = tempfile::tempdir().unwrap();
        let build = dir.path().join("build");
        fs::create_dir(&build).unwrap();
        fs::write(build.join(AGENT), b"agent").unwrap();
        fs::write(build.join(WAL_FRONT), b"front").unwrap();
        let shared = dir.path().join("shared");
        let link = install_binaries(&build.join(AGENT), &shared).unwrap();
        assert_eq!(link, shared.join(AGENT));
        assert_eq!(fs::read(&link).unwrap(), b"agent");
        assert_eq!(fs::read(shared.join(WAL_FRONT)).unwrap(), b"front");
        // What the agent sees as its own path when run through the link.
        let running = fs::canonicalize(&link).unwrap();
        assert!(
            running
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("pgpilot-agent-")
        );
        let front = front_next_to(&running).unwrap();
        assert!(
            front
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("pgpilot-wal-"),
            "{front:?}"
        );
        assert_eq!(fs::read(&front).unwrap(), b"front");

        // A build without the front: the agent alone, and archive_command runs the agent.
        fs::remove_file(build.join(WAL_FRONT)).unwrap();
        let alone = dir.path().join("alone");
        install_binaries(&build.join(AGENT), &alone).unwrap();
        assert!(!alone.join(WAL_FRONT).exists());
        assert_eq!(
            front_next_to(&fs::canonicalize(alone.join(AGENT)).unwrap()),
            None
        );
    }
}
