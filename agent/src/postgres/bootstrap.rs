//! Bringing a data dir into existence with initdb, and preparing the directories Postgres
//! needs (owned by the Postgres OS user when the agent runs as root).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::bins::PgBinaries;
use super::{OsUser, run_as};
use crate::secrets::Secret;

/// What the data dir holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDirState {
    /// Absent or empty: bootstrap it.
    Empty,
    /// A cluster of this major version.
    Cluster { major: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "data dir {0} is not empty and holds no PostgreSQL cluster (no PG_VERSION); \
         point --data-dir at an empty or absent directory"
    )]
    NotACluster(PathBuf),
    #[error(
        "data dir {dir} holds a PostgreSQL {found} cluster but the binaries are PostgreSQL {bins}; pass --pg-bin-dir for {found}"
    )]
    VersionMismatch {
        dir: PathBuf,
        found: String,
        bins: u32,
    },
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{0}")]
    Unreachable(String),
    #[error("initdb failed ({status}): {output}")]
    Initdb { status: String, output: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BootstrapError + '_ {
    move |cause| BootstrapError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// Inspects the data dir.
pub fn inspect(data_dir: &Path, bins: &PgBinaries) -> Result<DataDirState, BootstrapError> {
    match std::fs::read_to_string(data_dir.join("PG_VERSION")) {
        Ok(v) => {
            let found = v.trim().to_string();
            if found.parse::<u32>().ok() != Some(bins.major) {
                return Err(BootstrapError::VersionMismatch {
                    dir: data_dir.to_path_buf(),
                    found,
                    bins: bins.major,
                });
            }
            Ok(DataDirState::Cluster { major: bins.major })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let empty = match std::fs::read_dir(data_dir) {
                Ok(mut entries) => entries.next().is_none(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => return Err(io(data_dir)(e)),
            };
            if empty {
                Ok(DataDirState::Empty)
            } else {
                Err(BootstrapError::NotACluster(data_dir.to_path_buf()))
            }
        }
        Err(e) => Err(io(data_dir)(e)),
    }
}

/// Creates `dir` (and parents) and, as root, gives it to the Postgres user with `mode`.
pub fn prepare_dir(dir: &Path, mode: u32, owner: Option<&OsUser>) -> Result<(), BootstrapError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io(dir))?;
    if let Some(owner) = owner {
        owner.chown(dir).map_err(io(dir))?;
    }
    Ok(())
}

/// When Postgres runs as another user, every ancestor of `path` must let that user through;
/// says which one does not (a clone under /root is the usual case).
pub fn check_reachable(path: &Path, owner: Option<&OsUser>) -> Result<(), BootstrapError> {
    let Some(owner) = owner else { return Ok(()) };
    match blocking_dir(path, owner) {
        None => Ok(()),
        Some((dir, mode)) => Err(BootstrapError::Unreachable(format!(
            "Postgres runs as user {:?}, which cannot reach {}: {} has mode {:o}. \
             Choose a data dir outside it, or run the agent as that user",
            owner.name,
            path.display(),
            dir.display(),
            mode
        ))),
    }
}

/// The first ancestor directory of `path` that `user` cannot enter, with its mode bits.
pub fn blocking_dir(path: &Path, user: &OsUser) -> Option<(PathBuf, u32)> {
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    for dir in ancestors {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = meta.mode();
        let ok = if meta.uid() == user.uid.as_raw() {
            mode & 0o100 != 0
        } else if meta.gid() == user.gid.as_raw() {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Some((dir.to_path_buf(), mode & 0o7777));
        }
    }
    None
}

/// Runs initdb: UTF-8, data checksums, SCRAM authentication, the superuser's password from its
/// secret (through a 0600 file removed afterwards, never the command line).
pub async fn initdb(
    bins: &PgBinaries,
    data_dir: &Path,
    superuser: &str,
    password: &Secret,
    scratch_dir: &Path,
    owner: Option<&OsUser>,
) -> Result<(), BootstrapError> {
    prepare_dir(data_dir, 0o700, owner)?;
    let pwfile = scratch_dir.join(".initdb-pwfile");
    crate::files::write_private(&pwfile, password.expose().as_bytes(), owner)
        .map_err(io(&pwfile))?;
    let mut cmd = Command::new(bins.path("initdb"));
    cmd.arg("-D")
        .arg(data_dir)
        .arg("--username")
        .arg(superuser)
        .arg(format!("--pwfile={}", pwfile.display()))
        .args([
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--data-checksums",
            "--auth=scram-sha-256",
        ]);
    run_as(&mut cmd, owner);
    cmd.stdin(std::process::Stdio::null());
    tracing::info!(data_dir = %data_dir.display(), "running initdb");
    let out = cmd.output().await;
    let _ = std::fs::remove_file(&pwfile);
    let out = out.map_err(io(&bins.path("initdb")))?;
    if !out.status.success() {
        let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if output.is_empty() {
            output = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        return Err(BootstrapError::Initdb {
            status: out.status.to_string(),
            output,
        });
    }
    Ok(())
}
