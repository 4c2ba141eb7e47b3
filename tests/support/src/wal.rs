//! Real WAL segments for tests and benchmarks: generated once by a throwaway PostgreSQL 15
//! running pgbench, then cached (under target/) for every later test run. Segments from a real
//! workload matter because their compressibility is what the archive's codecs see in production.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

/// Size of a WAL segment (PostgreSQL's default).
pub const SEGMENT_SIZE: u64 = 16 << 20;

/// `n` (at most 8) real 16 MiB WAL segments cached in target/test-data/wal.
pub fn segments(n: usize) -> anyhow::Result<Vec<PathBuf>> {
    segments_in(
        &crate::tools::workspace_root().join("target/test-data/wal"),
        n,
    )
}

/// `n` (at most 8) real WAL segments cached in `dir`, generating them if needed. Safe to call
/// from concurrent test processes (a file lock serialises generation).
pub fn segments_in(dir: &Path, n: usize) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::ensure!(n <= 8, "at most 8 cached segments");
    std::fs::create_dir_all(dir)?;
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("lock {}: {e}", dir.display()))?;
    let mut cached = list(dir)?;
    if cached.len() < n {
        generate(dir).context("generating real WAL segments with PostgreSQL 15 and pgbench")?;
        cached = list(dir)?;
    }
    anyhow::ensure!(
        cached.len() >= n,
        "only {} WAL segments could be generated",
        cached.len()
    );
    Ok(cached.into_iter().take(n).collect())
}

fn list(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
                && p.metadata().is_ok_and(|m| m.len() == SEGMENT_SIZE)
        })
        .collect();
    out.sort();
    Ok(out)
}

fn as_pg_user(bin: &Path) -> Command {
    if crate::postgres::is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn generate(dest: &Path) -> anyhow::Result<()> {
    let bin = crate::postgres::bin_dir(15)?;
    let tmp = crate::postgres::temp_dir()?;
    let data = tmp.path().join("data");
    let sock = tmp.path().to_path_buf();
    if crate::postgres::is_root() {
        let uid = nix::unistd::User::from_name("postgres")?.context("no postgres OS user")?;
        nix::unistd::chown(tmp.path(), Some(uid.uid), Some(uid.gid))?;
    }
    run(as_pg_user(&bin.join("initdb"))
        .args(["-D"])
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]))?;
    let port = crate::net::free_port().to_string();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses='' -c fsync=off -c max_wal_size=1GB -c wal_keep_size=1GB",
        sock.display()
    );
    run(as_pg_user(&bin.join("pg_ctl"))
        .args(["start", "-w", "-D"])
        .arg(&data)
        .arg("-l")
        .arg(tmp.path().join("log"))
        .args(["-o", &opts]))?;
    let result = (|| -> anyhow::Result<()> {
        let conn = |c: &mut Command| {
            c.arg("-h").arg(&sock).args(["-p", &port, "-U", "postgres"]);
        };
        let mut c = as_pg_user(&bin.join("pgbench"));
        conn(&mut c);
        run(c.args(["-i", "-s", "3", "-q", "postgres"]))?;
        let mut c = as_pg_user(&bin.join("pgbench"));
        conn(&mut c);
        run(c.args(["-c", "4", "-t", "4000", "-n", "postgres"]))?;
        let mut c = as_pg_user(&bin.join("psql"));
        conn(&mut c);
        let current = run(c.args([
            "-Atq",
            "-c",
            "CHECKPOINT",
            "-c",
            "SELECT pg_walfile_name(pg_switch_wal())",
            "-d",
            "postgres",
        ]))?;
        let current = current.lines().last().unwrap_or_default().trim().to_owned();
        anyhow::ensure!(current.len() == 24, "unexpected WAL file name {current:?}");
        // Every segment up to and including the one pg_switch_wal closed is complete. Keep the
        // newest ones: pgbench's OLTP traffic rather than the bulk load.
        let mut complete: Vec<PathBuf> = list(&data.join("pg_wal"))?
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n <= current.as_str())
            })
            .collect();
        let keep = complete.len().saturating_sub(8);
        for src in complete.drain(keep..) {
            let name = src.file_name().expect("file name");
            let tmp_dest = dest.join(format!(".{}.tmp", name.to_string_lossy()));
            std::fs::copy(&src, &tmp_dest)?;
            std::fs::rename(&tmp_dest, dest.join(name))?;
        }
        Ok(())
    })();
    let _ = run(as_pg_user(&bin.join("pg_ctl"))
        .args(["stop", "-m", "immediate", "-D"])
        .arg(&data));
    result
}
