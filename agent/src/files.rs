//! Every file and directory the agent owns in the data dir and the state dir, named in one
//! place. Modules that write or read them (configuration rendering, restore, WAL fetch, base
//! backups, which must skip them) take the names from here instead of from each other.

use std::path::{Path, PathBuf};

/// The agent-rendered include file of `postgresql.conf` (`<data_dir>/pgpilot.conf`).
pub const INCLUDE_FILE: &str = "pgpilot.conf";
/// The client authentication file the agent renders (`<data_dir>/pg_hba.conf`).
pub const HBA_FILE: &str = "pg_hba.conf";
/// The include file holding a restore's recovery target; removed after promotion.
pub const RECOVERY_CONF: &str = "pgpilot-recovery.conf";
/// Postgres' signal file for a targeted recovery.
pub const RECOVERY_SIGNAL: &str = "recovery.signal";
/// Postgres' signal file for a standby.
pub const STANDBY_SIGNAL: &str = "standby.signal";
/// The WAL prefetch spool inside the data dir (never part of a base backup).
pub const SPOOL_DIR: &str = "pgpilot_spool";

/// Postgres' Unix socket directory, `<state_dir>/run` (outside the data dir, so a restore can
/// replace the data dir wholesale).
pub fn socket_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("run")
}

/// The runtime file `wal-push` and `wal-fetch` read (agent address, token path, store).
pub fn archive_runtime(state_dir: &Path) -> PathBuf {
    socket_dir(state_dir).join("archive-runtime.json")
}

/// The lock file that keeps a second agent off a data dir.
pub fn lock_file(state_dir: &Path, data_dir: &Path) -> PathBuf {
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    state_dir.join(format!(
        ".{}.pgpilot-agent.lock",
        name.unwrap_or_else(|| "data".into())
    ))
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content: temp
/// file, fsync, rename, fsync of the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_durably_as(path, bytes, None)
}

/// [`write_durably`] of a file that exists, keeping its owner and mode: an agent running as
/// root must not hand Postgres back a root-owned file of its data directory.
pub fn rewrite_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    write_durably_as(path, bytes, Some(&meta))
}

fn write_durably_as(
    path: &Path,
    bytes: &[u8],
    like: Option<&std::fs::Metadata>,
) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let tmp = path.with_extension("pgpilot-tmp");
    let f = std::fs::File::create(&tmp)?;
    if let Some(meta) = like {
        std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()))?;
        f.set_permissions(meta.permissions())?;
    }
    commit(f, &tmp, path, bytes)
}

/// Writes `bytes` into the temp file `f` (at `tmp`), syncs it, renames it onto `path` and syncs
/// the directory: after it returns, `path` holds `bytes` across a crash.
fn commit(mut f: std::fs::File, tmp: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes a file only its owner may read (0600 from its creation, never wider), owned by
/// `owner` when Postgres runs as another user, through a temp file, fsync and rename: password
/// files, Postgres' copy of the TLS key.
pub fn write_private(
    path: &Path,
    bytes: &[u8],
    owner: Option<&crate::postgres::OsUser>,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("pgpilot-tmp");
    let _ = std::fs::remove_file(&tmp);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    if let Some(owner) = owner {
        owner.chown(&tmp)?;
    }
    commit(f, &tmp, path, bytes)
}

/// Quotes a path for a shell command line Postgres runs (`archive_command`).
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::sh_quote;

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(sh_quote("/a b/c"), "'/a b/c'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
