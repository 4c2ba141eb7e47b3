//! `pgpilot-agent wal-push %p` and `wal-fetch %f %p`: what Postgres runs as archive_command and
//! restore_command. Each asks the running agent over the loopback API and falls back to doing
//! the work itself when the agent cannot be reached, so archiving never depends on the daemon
//! being up. Exit status is what Postgres acts on: 0 only after success. Each process ends
//! within `[archive] command_timeout_secs`, whatever the store does.

use std::path::Path;

use pgpilot_common::api::{WalFetchRequest, WalPushRequest};
use pgpilot_common::archive_command::{command_bound, gave_up, move_into_place};
use pgpilot_common::client::{AgentClient, ClientError};
use pgpilot_common::layout::Layout;

use super::fetch::{FetchError, fetch_direct};
use super::push::push_direct;
use super::runtime::ArchiveRuntime;
use crate::store::Store;

fn open(rt: &ArchiveRuntime) -> anyhow::Result<(Store, Layout)> {
    let store = Store::open(&rt.store)?;
    let layout = Layout::new(&rt.cluster, &rt.shard).map_err(anyhow::Error::msg)?;
    Ok((store, layout))
}

/// Runs one archive_command or restore_command within the runtime file's
/// `command_timeout_secs`: past it, an error (exit 1; Postgres keeps the file and calls again).
async fn bounded<T>(
    rt: &ArchiveRuntime,
    what: &str,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let bound = command_bound(rt.archive.command_timeout_secs);
    match tokio::time::timeout(bound, fut).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(gave_up(what, bound))),
    }
}

/// How `wal-push` and `wal-fetch` reach the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Ask the agent; work on the store directly when it cannot be reached.
    Agent,
    /// Work on the store directly: `pgpilot-wal` already found the agent unreachable.
    Direct,
}

impl Route {
    /// The route of `wal-push` / `wal-fetch` given their hidden `--direct` flag.
    pub fn from_direct_flag(direct: bool) -> Route {
        if direct { Route::Direct } else { Route::Agent }
    }
}

/// Archives `path` (`%p`). Ok only once the file is stored and verified.
pub async fn wal_push(runtime: &Path, path: &str, route: Route) -> anyhow::Result<()> {
    let rt = ArchiveRuntime::read(runtime)?;
    bounded(&rt, &format!("wal-push {path}"), push(&rt, path, route)).await
}

async fn push(rt: &ArchiveRuntime, path: &str, route: Route) -> anyhow::Result<()> {
    if route == Route::Agent {
        let client = AgentClient::new(&rt.api_url, Some(rt.token.clone()));
        match client
            .wal_push(&WalPushRequest {
                path: path.to_string(),
            })
            .await
        {
            Ok(_) => return Ok(()),
            Err(ClientError::Transport { cause, .. }) => {
                eprintln!("wal-push: agent unreachable ({cause}); uploading {path} directly");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let name = Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow::anyhow!("{path:?} has no file name"))?;
    let (store, layout) = open(rt)?;
    push_direct(store, layout, &rt.data_dir, name, rt.archive.verify).await?;
    Ok(())
}

/// Outcome of a fetch, for the exit status.
pub enum Fetched {
    Done,
    /// Not in the archive: exit non-zero without noise (Postgres expects it at the end).
    Missing,
}

pub use pgpilot_common::archive_command::{FETCH_FATAL_EXIT, in_archive_recovery};

/// Restores WAL file `name` (`%f`) into `dest` (`%p`).
pub async fn wal_fetch(
    runtime: &Path,
    name: &str,
    dest: &Path,
    route: Route,
) -> anyhow::Result<Fetched> {
    let rt = ArchiveRuntime::read(runtime)?;
    bounded(
        &rt,
        &format!("wal-fetch {name}"),
        fetch(&rt, name, dest, route),
    )
    .await
}

async fn fetch(
    rt: &ArchiveRuntime,
    name: &str,
    dest: &Path,
    route: Route,
) -> anyhow::Result<Fetched> {
    if route == Route::Agent {
        let client = AgentClient::new(&rt.api_url, Some(rt.token.clone()));
        match client
            .wal_fetch(&WalFetchRequest {
                name: name.to_string(),
            })
            .await
        {
            Ok(r) => {
                move_into_place(Path::new(&r.spool_path), dest).map_err(|e| {
                    anyhow::anyhow!("moving {} to {}: {e}", r.spool_path, dest.display())
                })?;
                return Ok(Fetched::Done);
            }
            Err(ClientError::Api { status: 404, .. }) => return Ok(Fetched::Missing),
            Err(ClientError::Transport { cause, .. }) => {
                eprintln!("wal-fetch: agent unreachable ({cause}); fetching {name} directly");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (store, layout) = match &rt.fetch_from {
        Some(src) => (
            Store::open(&src.store)?,
            Layout::new(&src.cluster, &src.shard).map_err(anyhow::Error::msg)?,
        ),
        None => open(rt)?,
    };
    match fetch_direct(&store, &layout, name, dest).await {
        Ok(()) => Ok(Fetched::Done),
        Err(FetchError::NotFound(_)) => Ok(Fetched::Missing),
        Err(e) => Err(e.into()),
    }
}
