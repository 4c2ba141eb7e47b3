//! A real `pgpilot-agent run` process owning a real PostgreSQL, on free 127.0.0.1 ports in a
//! temp dir. Dropping the fixture stops the agent (SIGTERM, then SIGKILL) and kills any
//! postmaster left on its data dir, then removes the dir.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgpilot_common::api::{BackupRequest, BackupState, StatusResponse};
use pgpilot_common::client::AgentClient;
use pgpilot_common::state::AgentState;

use crate::net::free_port;
use crate::postgres;

/// What a test may change before the agent starts.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Extra TOML appended to the generated config file (e.g. a `[postgres.parameters]` table).
    pub extra_toml: String,
    /// Extra environment variables for the agent process.
    pub env: Vec<(String, String)>,
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
        let opts = AgentOptions {
            extra_toml: extra_toml.to_string(),
            ..Default::default()
        };
        Self::start_with(bin, major, opts).await
    }

    /// Writes the config and token but does not start the agent.
    pub fn prepare(bin: &Path, major: u32, opts: &AgentOptions) -> anyhow::Result<AgentFixture> {
        let bin_dir = postgres::bin_dir(major)?;
        let dir = postgres::temp_dir()?;
        let pg_port = free_port();
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let loopback: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let token = format!("test-token-{}", std::process::id());
        std::fs::write(dir.path().join("token"), format!("{token}\n"))?;
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
        std::fs::write(&self.config_path, text)?;
        Ok(())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("pg")
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
        let password = std::fs::read_to_string(self.dir.path().join("superuser-password"))?;
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(self.pg_port)
            .user("postgres")
            .password(password.trim())
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
    /// Takes a base backup through the API and waits for it to end; its id when it completed,
    /// an error with its reason and the agent's log otherwise.
    pub async fn take_backup(&self, timeout: Duration) -> anyhow::Result<String> {
        let client = self.client();
        let started = client.start_backup(&BackupRequest::default()).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let b = client.backup(&started.id).await?;
            match b.state {
                BackupState::Completed => return Ok(b.id),
                BackupState::Running if Instant::now() < deadline => {}
                state => anyhow::bail!(
                    "backup {} {state:?} after {:?}: {:?}\n--- agent log ---\n{}",
                    b.id,
                    timeout,
                    b.reason,
                    self.logs()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

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

/// A `[backup]` section for a file:// store in `dir`, with quick retries so outages show fast.
pub fn file_backup_toml(dir: &Path) -> String {
    format!(
        "[backup]\nstore = \"file://{}\"\ncompression = \"zstd\"\n[backup.retry]\nmax_attempts = 2\ninitial_backoff_ms = 50\n",
        dir.display()
    )
}

/// Generates one test per PostgreSQL major of [`crate::postgres::TEST_MAJORS`] from `async fn
/// name(major: u32)` functions: `pg15::name`, `pg17::name`.
#[macro_export]
macro_rules! per_major {
    ($($name:ident),* $(,)?) => {
        mod pg15 { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(15).await } )* }
        mod pg17 { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(17).await } )* }
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
