//! A real `pgpilot-agent run` process owning a real PostgreSQL, on free 127.0.0.1 ports in a
//! temp dir, and what tests do with one: its API client, a SQL session, its CLI, pgbench, a
//! base backup. Dropping the fixture stops the agent (SIGTERM, then SIGKILL) and kills any
//! postmaster left on its data dir, then removes the dir.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgpilot_common::api::{BackupProgress, BackupRequest, BackupState, ErrorBody, StatusResponse};
use pgpilot_common::client::{AgentClient, ClientError};
use pgpilot_common::layout::Layout;
use pgpilot_common::state::AgentState;

use crate::net::free_ports;
use crate::{postgres, store};

/// How long a test waits for anything the agent does (start, backup, restore, archiving)
/// before it fails with the agent's log: generous, because CI shares 2 cores among many tests.
pub const LONG: Duration = Duration::from_secs(180);

/// The `pgpilot-agent` binary Cargo built for the calling integration test (`CARGO_BIN_EXE_*`
/// exists only there, so this is a macro expanded in the caller), as a `&'static Path`.
#[macro_export]
macro_rules! agent_bin {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_pgpilot-agent"))
    };
}

/// What a test may change before the agent starts.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Extra TOML appended to the generated config file (e.g. a `[postgres.parameters]` table).
    pub extra_toml: String,
    /// Extra environment variables for the agent process.
    pub env: Vec<(String, String)>,
    /// `[cluster] name` (the object-store layout); the agent's default when `None`.
    pub cluster: Option<String>,
    /// `[cluster] shard`; the agent's default when `None`.
    pub shard: Option<String>,
}

impl AgentOptions {
    /// Options with `extra_toml` appended to the config (a `[backup]` table, parameters…).
    pub fn toml(extra_toml: impl Into<String>) -> AgentOptions {
        AgentOptions {
            extra_toml: extra_toml.into(),
            ..AgentOptions::default()
        }
    }

    /// Adds an environment variable for the agent process.
    pub fn env(mut self, key: &str, value: &str) -> AgentOptions {
        self.env.push((key.into(), value.into()));
        self
    }
}

pub struct AgentFixture {
    pub dir: tempfile::TempDir,
    pub major: u32,
    pub bin: PathBuf,
    pub pg_port: u16,
    pub api: SocketAddr,
    pub loopback: SocketAddr,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub token: String,
    env: Vec<(String, String)>,
    cluster: Option<String>,
    shard: Option<String>,
    child: Option<Child>,
}

impl AgentFixture {
    /// Starts an agent on PostgreSQL `major` and waits until Postgres runs.
    pub async fn start(bin: &Path, major: u32) -> anyhow::Result<AgentFixture> {
        Self::start_with(bin, major, AgentOptions::default()).await
    }

    pub async fn start_with(
        bin: &Path,
        major: u32,
        opts: AgentOptions,
    ) -> anyhow::Result<AgentFixture> {
        let mut fx = Self::prepare(bin, major, &opts)?;
        fx.spawn()?;
        fx.wait_running(Duration::from_secs(60)).await?;
        Ok(fx)
    }

    /// [`AgentFixture::start_with`] with `extra_toml` (e.g. a `[backup]` section) and nothing
    /// else changed.
    pub async fn start_with_toml(
        bin: &Path,
        major: u32,
        extra_toml: &str,
    ) -> anyhow::Result<AgentFixture> {
        Self::start_with(bin, major, AgentOptions::toml(extra_toml)).await
    }

    /// Writes the config and token but does not start the agent.
    pub fn prepare(bin: &Path, major: u32, opts: &AgentOptions) -> anyhow::Result<AgentFixture> {
        let bin_dir = postgres::bin_dir(major)?;
        let dir = postgres::temp_dir()?;
        let [pg_port, api_port, loopback_port] = free_ports();
        let api = SocketAddr::from(([127, 0, 0, 1], api_port));
        let loopback = SocketAddr::from(([127, 0, 0, 1], loopback_port));
        let token = format!("test-token-{}", std::process::id());
        crate::write_secret(&dir.path().join("token"), format!("{token}\n"))?;
        let config_path = dir.path().join("pgpilot.toml");
        let fx = AgentFixture {
            major,
            bin: bin.to_path_buf(),
            pg_port,
            api,
            loopback,
            log_path: dir.path().join("agent.log"),
            config_path,
            token,
            env: opts.env.clone(),
            cluster: opts.cluster.clone(),
            shard: opts.shard.clone(),
            child: None,
            dir,
        };
        fx.write_config(&opts.extra_toml, &bin_dir)?;
        Ok(fx)
    }

    /// Rewrites the config file with `extra_toml` (for reload tests).
    pub fn rewrite_config(&self, extra_toml: &str) -> anyhow::Result<()> {
        self.write_config(extra_toml, &postgres::bin_dir(self.major)?)
    }

    fn write_config(&self, extra_toml: &str, bin_dir: &Path) -> anyhow::Result<()> {
        let mut text = String::new();
        writeln!(text, "data_dir = \"pg\"")?;
        writeln!(text, "postgres_port = {}", self.pg_port)?;
        writeln!(text, "pg_bin_dir = \"{}\"", bin_dir.display())?;
        writeln!(text, "api_listen = \"{}\"", self.api)?;
        writeln!(text, "api_loopback_listen = \"{}\"", self.loopback)?;
        writeln!(text, "api_token_file = \"token\"")?;
        text.push_str(extra_toml);
        // Last, so that top-level keys in `extra_toml` stay top-level.
        if self.cluster.is_some() || self.shard.is_some() {
            let (cluster, shard) = self.cluster_and_shard();
            write!(
                text,
                "\n[cluster]\nname = \"{cluster}\"\nshard = \"{shard}\"\n"
            )?;
        }
        std::fs::write(&self.config_path, text)?;
        Ok(())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("pg")
    }

    /// Where this agent's objects go in its store: `<cluster>/<shard>/…`.
    pub fn layout(&self) -> Layout {
        let (cluster, shard) = self.cluster_and_shard();
        store::layout(cluster, shard)
    }

    fn cluster_and_shard(&self) -> (&str, &str) {
        (
            self.cluster.as_deref().unwrap_or(store::DEFAULT_CLUSTER),
            self.shard.as_deref().unwrap_or(store::DEFAULT_SHARD),
        )
    }

    /// The file the agent writes for `wal-push`, `wal-fetch`, `verify` and `retention`: the
    /// store settings and the loopback API address (`<state dir>/run/archive-runtime.json`).
    pub fn runtime_file(&self) -> PathBuf {
        self.dir.path().join("run/archive-runtime.json")
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// The superuser password the agent generated at bootstrap.
    pub fn superuser_password(&self) -> anyhow::Result<String> {
        let path = self.dir.path().join("superuser-password");
        Ok(std::fs::read_to_string(path)?.trim().to_string())
    }

    /// The agent command line for this fixture (config file only; no secret on it).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run").arg("--config").arg(&self.config_path);
        cmd.env_remove("PGPILOT_LOG_FORMAT");
        cmd.env("PGPILOT_LOG", "info");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts the agent process, logging to `log_path`.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        self.spawn_with_args(&[])
    }

    /// Starts the agent process with extra `run` flags.
    pub fn spawn_with_args(&mut self, args: &[&str]) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    pub fn agent_pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Client on the loopback listener, with the token.
    pub fn client(&self) -> AgentClient {
        AgentClient::new(
            format!("http://{}", self.loopback),
            Some(self.token.clone()),
        )
    }

    /// Client on the external listener, without a token.
    pub fn anonymous_client(&self) -> AgentClient {
        AgentClient::new(format!("http://{}", self.api), None)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    /// Waits until the agent reports a state matching `pred`; fails with the agent's log.
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&StatusResponse) -> bool,
    ) -> anyhow::Result<StatusResponse> {
        let client = self.client();
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                anyhow::bail!(
                    "agent exited ({status}) while waiting for {what}\n--- agent log ---\n{}",
                    self.logs()
                );
            }
            if let Ok(s) = client.status().await {
                if pred(&s) {
                    return Ok(s);
                }
                last = Some(s.state);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "timed out waiting for {what} (last state {last:?})\n--- agent log ---\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_running(&mut self, timeout: Duration) -> anyhow::Result<StatusResponse> {
        self.wait_for("Running", timeout, |s| {
            matches!(s.state, AgentState::Running { .. }) && s.timeline.is_some()
        })
        .await
    }

    /// A SQL session as the superuser over TCP, with the password the agent generated.
    pub async fn sql(&self) -> anyhow::Result<tokio_postgres::Client> {
        let password = self.superuser_password()?;
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(self.pg_port)
            .user("postgres")
            .password(password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Sends `sig` to the agent process.
    pub fn signal_agent(&self, sig: Signal) -> anyhow::Result<()> {
        let pid = self
            .agent_pid()
            .ok_or_else(|| anyhow::anyhow!("agent not started"))?;
        kill(Pid::from_raw(pid), sig)?;
        Ok(())
    }

    /// The agent's exit status if it has exited, without waiting.
    pub fn wait_exit_now(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait()?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// Stops the agent if it still runs (SIGTERM, then waits up to `timeout`); `Ok(None)` when
    /// it was not running.
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        if self.agent_pid().is_none() {
            return Ok(None);
        }
        let _ = self.signal_agent(Signal::SIGTERM);
        self.wait_exit(timeout).map(Some)
    }

    /// Waits for the agent process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("agent not started"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "agent did not exit within {timeout:?}\n--- agent log ---\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl AgentFixture {
    /// Switches Postgres to a new WAL segment and waits until it reports the previous one
    /// archived (`pg_stat_archiver`); returns that segment's name.
    pub async fn switch_wal_and_wait_archived(&self, timeout: Duration) -> anyhow::Result<String> {
        let sql = self.sql().await?;
        sql.batch_execute("CREATE TABLE IF NOT EXISTS pgpilot_test_tick (t timestamptz); INSERT INTO pgpilot_test_tick VALUES (now())")
            .await?;
        let last: String = sql
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await?
            .get(0);
        let deadline = Instant::now() + timeout;
        loop {
            let archived: Option<String> = sql
                .query_one("SELECT last_archived_wal FROM pg_stat_archiver", &[])
                .await?
                .get(0);
            // Compare positions (after the timeline): a restore moves to a higher timeline.
            if archived
                .as_deref()
                .is_some_and(|a| a.len() == 24 && a[8..] >= last[8..])
            {
                return Ok(last);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{last} not archived within {timeout:?} (last archived {archived:?})\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl AgentFixture {
    /// Prometheus metrics from `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(self.url("/metrics")).await?.text().await?)
    }

    /// The HTTP status of `GET path` on the external listener, without a token (probes).
    pub async fn get_status(&self, path: &str) -> anyhow::Result<u16> {
        Ok(reqwest::get(self.url(path)).await?.status().as_u16())
    }

    /// Runs the agent's CLI against this agent as an administrator would, with the API URL,
    /// token file and runtime file in the environment.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<CliOutput> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("PGPILOT_API_URL", format!("http://{}", self.loopback))
            .env("PGPILOT_API_TOKEN_FILE", self.token_file())
            .env("PGPILOT_ARCHIVE_RUNTIME", self.runtime_file())
            .env("PGPILOT_LOG", "warn");
        CliOutput::of(&mut cmd)
    }

    /// Runs `wal-push` or `wal-fetch` as Postgres' archive_command and restore_command do: in
    /// the data dir, with `--runtime` and nothing else to find the agent or the store, through
    /// the `pgpilot-wal` front Cargo builds next to the agent binary (as the agent renders
    /// them).
    pub fn wal_command(&self, subcommand: &str, args: &[&str]) -> anyhow::Result<CliOutput> {
        let front = self.bin.with_file_name("pgpilot-wal");
        anyhow::ensure!(
            front.is_file(),
            "{} is missing: build the agent package's binaries (cargo build -p pgpilot-agent)",
            front.display()
        );
        let mut cmd = Command::new(front);
        cmd.arg(&self.bin);
        self.wal_args(&mut cmd, subcommand, args)
    }

    /// The same with the agent binary's own `wal-push` / `wal-fetch` (no front), as Postgres
    /// runs them where `pgpilot-wal` is not installed.
    pub fn agent_wal_command(&self, subcommand: &str, args: &[&str]) -> anyhow::Result<CliOutput> {
        let mut cmd = Command::new(&self.bin);
        self.wal_args(&mut cmd, subcommand, args)
    }

    fn wal_args(
        &self,
        cmd: &mut Command,
        subcommand: &str,
        args: &[&str],
    ) -> anyhow::Result<CliOutput> {
        cmd.arg(subcommand)
            .arg("--runtime")
            .arg(self.runtime_file())
            .args(args)
            .current_dir(self.data_dir());
        CliOutput::of(cmd)
    }

    /// A PostgreSQL client tool (`pgbench`, `psql`, …) connected to this agent's Postgres as the
    /// superuser through libpq's environment; the caller adds arguments and runs it.
    pub fn client_tool(&self, tool: &str) -> anyhow::Result<Command> {
        let mut cmd = Command::new(postgres::client_tool(tool)?);
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.pg_port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .env("PGPASSWORD", self.superuser_password()?);
        Ok(cmd)
    }

    /// `pgbench` with `args` against this agent's Postgres, output discarded but for stderr
    /// (piped, for the caller's error message).
    pub fn pgbench(&self, args: &[&str]) -> anyhow::Result<Child> {
        Ok(self
            .client_tool("pgbench")?
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    /// Waits until base backup `id` is no longer running; returns its last progress.
    pub async fn wait_backup(&self, id: &str) -> anyhow::Result<BackupProgress> {
        let client = self.client();
        let deadline = Instant::now() + LONG;
        loop {
            let p = client.backup(id).await?;
            if p.state != BackupState::Running {
                return Ok(p);
            }
            if Instant::now() > deadline {
                anyhow::bail!("backup {id} still running: {p:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Takes a base backup through the API and waits for it; fails unless it completed.
    pub async fn take_backup(&self) -> anyhow::Result<String> {
        let started = self
            .client()
            .start_backup(&BackupRequest::default())
            .await?;
        let done = self.wait_backup(&started.id).await?;
        anyhow::ensure!(
            done.state == BackupState::Completed,
            "backup {} ended {:?}: {:?}\n{}",
            started.id,
            done.state,
            done.reason,
            self.logs()
        );
        Ok(started.id)
    }

    /// Sends SIGTERM to the agent without waiting (a cluster stops all its agents at once).
    pub(crate) fn begin_stop(&self) {
        if let Some(pid) = self.agent_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
}

/// The HTTP status and error body of a failed API call; panics on any other error.
pub fn api_error(err: ClientError) -> (u16, ErrorBody) {
    match err {
        ClientError::Api { status, body, .. } => (status, body),
        other => panic!("expected an API error, got {other}"),
    }
}

/// What a CLI run printed.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    fn of(cmd: &mut Command) -> anyhow::Result<CliOutput> {
        let out = cmd.stdin(Stdio::null()).output()?;
        Ok(CliOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// stdout then stderr, for assertions on what the user sees.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Generates tests from `async fn name(major: u32)` functions, one module per PostgreSQL major:
///
/// - `per_major!(a, b)`: the full suites, on [`crate::postgres::FULL_MAJORS`] (`pg15::a`,
///   `pg18::a`, …);
/// - `per_major!(every: smoke)`: on every supported major, [`crate::postgres::ALL_MAJORS`]
///   (`every_major::pg14::smoke` … `every_major::pg18::smoke`).
///
/// The module lists here and the constants must name the same majors (macro_rules cannot build
/// a module name from a constant).
#[macro_export]
macro_rules! per_major {
    (every: $($name:ident),* $(,)?) => {
        mod every_major {
            use super::*;
            $crate::__major_module!(pg14, 14, $($name),*);
            $crate::__major_module!(pg15, 15, $($name),*);
            $crate::__major_module!(pg16, 16, $($name),*);
            $crate::__major_module!(pg17, 17, $($name),*);
            $crate::__major_module!(pg18, 18, $($name),*);
        }
    };
    ($($name:ident),* $(,)?) => {
        $crate::__major_module!(pg15, 15, $($name),*);
        $crate::__major_module!(pg18, 18, $($name),*);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __major_module {
    ($module:ident, $major:literal, $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($major).await
                }
            )*
        }
    };
}

impl Drop for AgentFixture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever happened to the agent, never leave a postmaster behind.
        if let Some(pid) = postgres::live_postmaster(&self.data_dir()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ({}) ---\n{}",
                self.log_path.display(),
                self.logs()
            );
        }
    }
}
