//! What Postgres' archive_command and restore_command need, shared by the agent's own
//! `wal-push`/`wal-fetch` and the small `pgpilot-wal` binary the agent renders in front of them
//! (docs/archiving.md, "The archive commands"): the part of the agent's runtime file that finds
//! the loopback API, the exit status that stops a restore, and the final move of a fetched file.
//! Plain `std` and serde: the front binary links this and little else, because Postgres starts
//! it once per WAL file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The fields of the agent's runtime file (`<state_dir>/run/archive-runtime.json`, written by
/// the agent's `ArchiveRuntime`) that reach the loopback API; every other field is ignored.
#[derive(Clone, Deserialize)]
pub struct RuntimeLoopback {
    /// `http://127.0.0.1:<port>`.
    pub api_url: String,
    pub token: String,
    pub archive: RuntimeBound,
}

/// `[archive] command_timeout_secs`, as the runtime file carries it.
#[derive(Clone, Deserialize)]
pub struct RuntimeBound {
    pub command_timeout_secs: u64,
}

impl std::fmt::Debug for RuntimeLoopback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeLoopback")
            .field("api_url", &self.api_url)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl RuntimeLoopback {
    /// Reads the runtime file at `path`; the error names the file and what is wrong, never
    /// the token.
    pub fn read(path: &Path) -> Result<RuntimeLoopback, String> {
        let text = std::fs::read(path).map_err(|e| {
            format!(
                "cannot read the agent's runtime file {}: {e}",
                path.display()
            )
        })?;
        serde_json::from_slice(&text)
            .map_err(|e| format!("runtime file {} is not valid: {e}", path.display()))
    }

    /// How long one archive_command or restore_command may take.
    pub fn bound(&self) -> Duration {
        command_bound(self.archive.command_timeout_secs)
    }
}

/// `[archive] command_timeout_secs` as the bound of one archive_command or restore_command
/// (at least a second).
pub fn command_bound(command_timeout_secs: u64) -> Duration {
    Duration::from_secs(command_timeout_secs.max(1))
}

/// The error of a command `what` (`wal-push <%p>`, `wal-fetch <%f>`) that ran past `bound`.
pub fn gave_up(what: &str, bound: Duration) -> String {
    format!(
        "{what}: gave up after {bound:?} ([archive] command_timeout_secs); Postgres will call again"
    )
}

/// The hidden flag of `pgpilot-agent wal-push` and `wal-fetch` that skips the call to the
/// agent and works on the store directly: what `pgpilot-wal` runs when the agent cannot be
/// reached, so an unreachable agent is not asked a second time.
pub const DIRECT_FLAG: &str = "--direct";

/// The exit status of a restore_command when a file the archive holds cannot be restored
/// (damaged, wrong key, store unreachable) during archive recovery. Postgres ends recovery at
/// the first file restore_command does not deliver with an ordinary failure, so a damaged
/// segment in the middle of the archive would end a restore early, promote, and report success
/// without the commits after it. An exit status above 125 makes Postgres stop recovery with
/// FATAL instead ("could not restore file … from archive"; see RestoreArchivedFile in
/// PostgreSQL), and the agent fails the restore, naming the file.
pub const FETCH_FATAL_EXIT: u8 = 200;

/// Whether the data dir `dir` is in archive recovery (a restore: `recovery.signal` without
/// `standby.signal`). A standby instead falls back to streaming from its primary when
/// restore_command fails, so there a failed fetch stays an ordinary failure.
pub fn in_archive_recovery(dir: &Path) -> bool {
    dir.join("recovery.signal").exists() && !dir.join("standby.signal").exists()
}

/// Moves a fetched, verified file from the agent's spool to `dest` (`%p`): a rename, or across
/// file systems a copy that is fsynced before it is renamed into place.
pub fn move_into_place(src: &Path, dest: &Path) -> std::io::Result<()> {
    match std::fs::rename(src, dest) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            let tmp: PathBuf = dest.with_extension("pgpilot-tmp");
            std::fs::copy(src, &tmp)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, dest)?;
            let _ = std::fs::remove_file(src);
            Ok(())
        }
        Err(e) => Err(e),
    }
}
