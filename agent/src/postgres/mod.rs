//! Everything that touches PostgreSQL itself: finding its binaries, bootstrapping a data dir,
//! rendering the files the agent owns, running the postmaster as a child, and SQL.

pub mod bins;
pub mod bootstrap;
pub mod conf;
pub mod process;
pub mod sql;
pub mod tls;

use std::path::Path;

/// The OS user Postgres runs as when the agent runs as root (Postgres refuses to run as root).
/// `None` in [`crate::postgres`] APIs means "the agent's own user".
#[derive(Debug, Clone)]
pub struct OsUser {
    pub name: String,
    pub uid: nix::unistd::Uid,
    pub gid: nix::unistd::Gid,
}

impl OsUser {
    /// Resolves the user Postgres must run as: `name` when the agent is root, nobody otherwise.
    pub fn for_postgres(name: &str) -> anyhow::Result<Option<OsUser>> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let user = nix::unistd::User::from_name(name)?.ok_or_else(|| {
            anyhow::anyhow!(
                "the agent runs as root, so Postgres must run as an unprivileged user, but user \
                 {name:?} does not exist: create it or pass --postgres-user"
            )
        })?;
        if user.uid.is_root() {
            anyhow::bail!("--postgres-user {name:?} is root; Postgres refuses to run as root");
        }
        Ok(Some(OsUser {
            name: name.to_string(),
            uid: user.uid,
            gid: user.gid,
        }))
    }

    /// Gives `path` to this user (agent running as root creating files Postgres must own).
    pub fn chown(&self, path: &Path) -> std::io::Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid.as_raw()), Some(self.gid.as_raw()))
    }
}

/// Applies `uid`/`gid` to a command when Postgres must run as another user.
pub fn run_as(cmd: &mut tokio::process::Command, user: Option<&OsUser>) {
    if let Some(user) = user {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        // HOME of root is not readable by the postgres user; some tools look at it.
        cmd.env("HOME", "/tmp");
    }
}
