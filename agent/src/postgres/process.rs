//! The postmaster as a child of the agent (not a detached `pg_ctl` daemon): spawning it,
//! capturing its log lines into the agent's log stream, signalling and reaping it.
//!
//! Orphans: the postmaster gets `PR_SET_PDEATHSIG = SIGQUIT`, so even a `kill -9` of the agent
//! makes Postgres shut down at once (immediate mode; crash recovery on the next start). At
//! start the agent also stops any postmaster left on its data dir (see
//! [`stop_leftover_postmaster`]).

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgpilot_common::api::ShutdownMode;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use super::bins::PgBinaries;
use super::{OsUser, run_as};

/// The last lines Postgres printed, to explain a failed start or recovery in the agent's own
/// words ("recovery ended before configured recovery target was reached").
#[derive(Debug, Clone, Default)]
pub struct LogTail(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl LogTail {
    const KEEP: usize = 30;

    fn push(&self, line: &str) {
        let mut q = self.0.lock().expect("log tail lock");
        if q.len() == Self::KEEP {
            q.pop_front();
        }
        q.push_back(line.to_string());
    }

    pub fn clear(&self) {
        self.0.lock().expect("log tail lock").clear();
    }

    /// What a backend answers a client that connects while the server starts, recovers or
    /// stops: logged as FATAL, but never the reason the server stopped.
    const CONNECTION_REFUSALS: [&'static str; 6] = [
        "the database system is starting up",
        "the database system is in recovery mode",
        "the database system is shutting down",
        "the database system is not yet accepting connections",
        "the database system is not accepting connections",
        "terminating connection due to administrator command",
    ];

    /// The most telling recent line: the last PANIC or FATAL (not a refused connection, which
    /// the agent's own probes cause while Postgres stops), else the last ERROR.
    pub fn worst(&self) -> Option<String> {
        let q = self.0.lock().expect("log tail lock");
        let find = |tag: &str| {
            q.iter()
                .rev()
                .find(|l| {
                    l.contains(tag) && !Self::CONNECTION_REFUSALS.iter().any(|r| l.contains(r))
                })
                .cloned()
        };
        find("PANIC:")
            .or_else(|| find("FATAL:"))
            .or_else(|| find("ERROR:"))
            .map(|l| {
                // Drop the timestamp and pid prefix; keep "FATAL:  ..." onwards.
                let at = ["PANIC:", "FATAL:", "ERROR:"]
                    .iter()
                    .filter_map(|t| l.find(t))
                    .min()
                    .unwrap_or(0);
                l[at..].split_whitespace().collect::<Vec<_>>().join(" ")
            })
    }
}

/// A running postmaster owned by the agent.
#[derive(Debug)]
pub struct Postmaster {
    child: Child,
    pid: u32,
}

impl Postmaster {
    /// Starts `postgres -D <data_dir>` as a child, in its own process group (a Ctrl-C on the
    /// agent's terminal reaches the agent, which then shuts Postgres down in order).
    pub fn spawn(
        bins: &PgBinaries,
        data_dir: &Path,
        user: Option<&OsUser>,
        tail: &LogTail,
    ) -> std::io::Result<Postmaster> {
        let mut cmd = Command::new(bins.path("postgres"));
        cmd.arg("-D").arg(data_dir);
        // Postgres gets a clean environment: object-store credentials and other secrets the
        // agent may hold in its environment stay out of it.
        cmd.env_clear();
        for var in ["PATH", "TZ", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        run_as(&mut cmd, user);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.process_group(0);
        cmd.kill_on_drop(false);
        set_parent_death_signal(&mut cmd);
        let mut child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("postmaster exited before its pid was read"))?;
        tail.clear();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_log(out, pid, tail.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_log(err, pid, tail.clone()));
        }
        tracing::info!(postmaster_pid = pid, data_dir = %data_dir.display(), "postmaster started");
        Ok(Postmaster { child, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the postmaster to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Sends the signal for `mode` to the postmaster.
    pub fn signal_shutdown(&self, mode: ShutdownMode) {
        signal(self.pid, shutdown_signal(mode));
    }

    /// SIGHUP: re-read configuration files.
    pub fn reload(&self) {
        signal(self.pid, Signal::SIGHUP);
    }

    /// Shuts down with `mode`, escalating to immediate after `grace`, and reaps the process.
    pub async fn shutdown(
        &mut self,
        mode: ShutdownMode,
        grace: Duration,
    ) -> std::io::Result<ExitStatus> {
        self.signal_shutdown(mode);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(
                    postmaster_pid = self.pid,
                    ?mode,
                    "shutdown took longer than {grace:?}; switching to immediate"
                );
                self.signal_shutdown(ShutdownMode::Immediate);
                match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        signal(self.pid, Signal::SIGKILL);
                        self.child.wait().await
                    }
                }
            }
        }
    }
}

fn shutdown_signal(mode: ShutdownMode) -> Signal {
    match mode {
        ShutdownMode::Smart => Signal::SIGTERM,
        ShutdownMode::Fast => Signal::SIGINT,
        ShutdownMode::Immediate => Signal::SIGQUIT,
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Err(e) = kill(Pid::from_raw(pid as i32), sig) {
        tracing::debug!(postmaster_pid = pid, ?sig, "signal not delivered: {e}");
    }
}

// The one unsafe block of the agent: `pre_exec` runs between fork and exec. The closure only
// calls prctl(2) and getppid(2), both async-signal-safe, and allocates nothing.
#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    let parent = std::process::id() as i32;
    // SAFETY: see above; no allocation, no locks, only async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGQUIT).map_err(std::io::Error::from)?;
            // The agent may have died between fork and prctl: then nobody would stop us.
            if nix::unistd::getppid().as_raw() != parent {
                return Err(std::io::Error::other(
                    "agent exited while starting postgres",
                ));
            }
            Ok(())
        });
    }
}

/// Re-emits each line Postgres prints as an agent log event with `source = "postgres"`, at a
/// level derived from Postgres' own severity.
async fn forward_log(stream: impl AsyncRead + Unpin, pid: u32, tail: LogTail) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tail.push(&line);
        match severity(&line) {
            Severity::Error => {
                tracing::error!(target: "postgres", source = "postgres", postmaster_pid = pid, "{line}")
            }
            Severity::Warn => {
                tracing::warn!(target: "postgres", source = "postgres", postmaster_pid = pid, "{line}")
            }
            Severity::Info => {
                tracing::info!(target: "postgres", source = "postgres", postmaster_pid = pid, "{line}")
            }
            Severity::Debug => {
                tracing::debug!(target: "postgres", source = "postgres", postmaster_pid = pid, "{line}")
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Severity {
    Error,
    Warn,
    Info,
    Debug,
}

fn severity(line: &str) -> Severity {
    for (tag, sev) in [
        ("PANIC:", Severity::Error),
        ("FATAL:", Severity::Error),
        ("ERROR:", Severity::Error),
        ("WARNING:", Severity::Warn),
        ("DEBUG", Severity::Debug),
    ] {
        if line.contains(tag) {
            return sev;
        }
    }
    Severity::Info
}

/// Reads the postmaster pid from `postmaster.pid`, if the file exists and names a live process.
pub fn live_postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    // Signal 0 checks existence; EPERM also means it exists (owned by another user).
    match kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let is_postgres = String::from_utf8_lossy(&cmdline).contains("postgres");
            is_postgres.then_some(pid as u32)
        }
        Err(_) => None,
    }
}

/// A postmaster left running on our data dir (its agent was killed before it could stop it)
/// would block our start; stop it the way an administrator would (fast, then immediate).
pub async fn stop_leftover_postmaster(data_dir: &Path) -> anyhow::Result<()> {
    let Some(pid) = live_postmaster_pid(data_dir) else {
        return Ok(());
    };
    tracing::warn!(
        postmaster_pid = pid,
        "a postmaster from an earlier run still runs on this data dir; stopping it (fast)"
    );
    signal(pid, Signal::SIGINT);
    for i in 0..600 {
        if live_postmaster_pid(data_dir) != Some(pid) {
            return Ok(());
        }
        if i == 300 {
            tracing::warn!(
                postmaster_pid = pid,
                "left-over postmaster still running after 30 s; immediate shutdown"
            );
            signal(pid, Signal::SIGQUIT);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "a postmaster (pid {pid}) from an earlier run still runs on {} and did not stop",
        data_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_line_is_the_startup_failure_not_a_refused_connection() {
        // What Postgres logged when recovery ended before its target, while the agent's
        // readiness probes kept connecting (seen in CI: the last FATAL was a refusal).
        let tail = LogTail::default();
        for line in [
            "2026-11-30 13:28:25.158 UTC [1901] postgres@postgres FATAL:  the database system is starting up",
            "2026-11-30 13:28:25.390 UTC [1898] LOG:  redo done at 0/3021148",
            "2026-11-30 13:28:25.390 UTC [1898] FATAL:  recovery ended before configured recovery target was reached",
            "2026-11-30 13:28:25.392 UTC [1891] LOG:  startup process (PID 1898) exited with exit code 1",
            "2026-11-30 13:28:25.400 UTC [1934] postgres@postgres FATAL:  the database system is in recovery mode",
            "2026-11-30 13:28:25.416 UTC [1891] LOG:  database system is shut down",
        ] {
            tail.push(line);
        }
        assert_eq!(
            tail.worst().as_deref(),
            Some("FATAL: recovery ended before configured recovery target was reached")
        );
        // Only refusals and an ERROR: the ERROR explains more than a refusal.
        let tail = LogTail::default();
        tail.push("2026-11-30 13:28:25.000 UTC [7] ERROR:  could not open file \"x\"");
        tail.push("2026-11-30 13:28:25.100 UTC [8] postgres@postgres FATAL:  the database system is shutting down");
        assert_eq!(
            tail.worst().as_deref(),
            Some("ERROR: could not open file \"x\"")
        );
    }

    #[test]
    fn maps_postgres_severities() {
        assert_eq!(
            severity("2026-11-23 10:00:00.000 UTC [12] FATAL:  role \"x\" does not exist"),
            Severity::Error
        );
        assert_eq!(
            severity("2026-11-23 10:00:00.000 UTC [12] WARNING:  oops"),
            Severity::Warn
        );
        assert_eq!(
            severity("2026-11-23 10:00:00.000 UTC [12] LOG:  database system is ready"),
            Severity::Info
        );
    }
}
