//! Real PostgreSQL binaries for tests: 15 from Debian, other majors from npm (installed by
//! scripts/install-test-deps.sh), and temp dirs the `postgres` OS user can use when tests run
//! as root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Majors the full suites run on (`per_major!(…)`): Debian's 15, the only one with client
/// tools here, and the newest supported.
pub const FULL_MAJORS: [u32; 2] = [15, NEWEST];

/// Every supported major, all installed by scripts/install-test-deps.sh; each gets the smoke
/// test (`per_major!(every: …)`).
pub const ALL_MAJORS: [u32; 5] = [14, 15, 16, 17, 18];

/// The newest supported major.
pub const NEWEST: u32 = 18;

/// Server binaries of `major`, or an error saying how to install them.
pub fn bin_dir(major: u32) -> anyhow::Result<PathBuf> {
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if debian.join("postgres").is_file() {
        return Ok(debian);
    }
    let npm = crate::tools::tools_dir().join(format!("npm/node_modules/pg{major}/native/bin"));
    if npm.join("postgres").is_file() {
        return Ok(npm);
    }
    anyhow::bail!(
        "PostgreSQL {major} server binaries not found in {} or {}: run scripts/install-test-deps.sh (make test does)",
        debian.display(),
        npm.display()
    )
}

/// A client tool (`pgbench`, `psql`, `pg_waldump`…) from the newest Debian PostgreSQL
/// installed (15 in CI; the npm majors ship server binaries only).
pub fn client_tool(name: &str) -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let path = e.path().join("bin").join(name);
            path.is_file().then_some((major, path))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, path)) => Ok(path),
        None => anyhow::bail!(
            "{name} not found under /usr/lib/postgresql/*/bin: run scripts/install-test-deps.sh (make test does)"
        ),
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A temp dir that the `postgres` user can enter (tempfile creates them 0700).
pub fn temp_dir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("pgpilot-test-").tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Pid of the postmaster recorded in `data_dir/postmaster.pid`, if that process is alive.
pub fn live_postmaster(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    pid_alive(pid).then_some(pid)
}

/// Whether a process exists (and is not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; Z is a zombie, already dead.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}
