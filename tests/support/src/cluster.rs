//! Several agents on one machine sharing one backup store: what the replication, switchover and
//! drain tests build on. Each agent is an [`AgentFixture`] (its own temp dir, data dir and free
//! ports); they all get the store's `[backup]` table and the same cluster name, and each its own
//! extra TOML, environment and shard. Dropping the fixture stops every agent (SIGTERM to all at
//! once, then each is reaped as [`AgentFixture`] does), also when the test panics, and only
//! then removes the store.

use std::path::{Path, PathBuf};

use pgpilot_common::client::AgentClient;

use crate::agent::{AgentFixture, AgentOptions, LONG};
use crate::store::{BackupStore, DEFAULT_SHARD};

/// The cluster name every agent of a [`ClusterFixture`] uses unless told otherwise.
pub const CLUSTER_NAME: &str = "test";

pub struct ClusterFixture {
    // Declared (so dropped) before the store: agents stop before their store goes away.
    agents: Vec<AgentFixture>,
    store: BackupStore,
    bin: PathBuf,
    major: u32,
    name: String,
}

impl ClusterFixture {
    /// A cluster with no agent yet; [`ClusterFixture::add`] prepares them.
    pub fn new(bin: &Path, major: u32, store: BackupStore) -> ClusterFixture {
        ClusterFixture {
            agents: Vec::new(),
            store,
            bin: bin.to_path_buf(),
            major,
            name: CLUSTER_NAME.into(),
        }
    }

    /// Starts `n` agents, shards `0` … `n-1`, all archiving into `store`, and waits until every
    /// one runs.
    pub async fn start(
        bin: &Path,
        major: u32,
        store: BackupStore,
        n: usize,
    ) -> anyhow::Result<ClusterFixture> {
        let mut cluster = ClusterFixture::new(bin, major, store);
        for shard in 0..n {
            cluster.add(AgentOptions {
                shard: Some(shard.to_string()),
                ..AgentOptions::default()
            })?;
        }
        cluster.start_all().await?;
        Ok(cluster)
    }

    /// Prepares one more agent (config written, not started) and returns its index. Its config
    /// gets the shared store's `[backup]` table first, then `opts.extra_toml` (which must open
    /// its own tables), then `[cluster]` with this cluster's name and `opts.shard` (the agent's
    /// default shard if none).
    pub fn add(&mut self, opts: AgentOptions) -> anyhow::Result<usize> {
        let opts = AgentOptions {
            extra_toml: format!("{}{}", self.store.toml(), opts.extra_toml),
            cluster: Some(opts.cluster.unwrap_or_else(|| self.name.clone())),
            shard: Some(opts.shard.unwrap_or_else(|| DEFAULT_SHARD.into())),
            ..opts
        };
        let fx = AgentFixture::prepare(&self.bin, self.major, &opts)?;
        self.agents.push(fx);
        Ok(self.agents.len() - 1)
    }

    /// Prepares an instance of a shard: `[replication] name = name`, following agent
    /// `primary`'s API when given (it then clones that primary on start). A follower gets the
    /// primary's superuser and replication passwords (a shard shares them, as its agents share
    /// the API token), so the primary must have started once.
    pub fn add_instance(
        &mut self,
        name: &str,
        primary: Option<usize>,
        shard: &str,
        extra_toml: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<usize> {
        let mut toml = format!("[replication]\nname = \"{name}\"\n");
        if let Some(p) = primary {
            toml += &format!("primary = \"http://{}\"\n", self.agents[p].api);
        }
        toml += extra_toml;
        let mut opts = AgentOptions {
            extra_toml: toml,
            shard: Some(shard.into()),
            ..AgentOptions::default()
        };
        for (k, v) in env {
            opts = opts.env(k, v);
        }
        let i = self.add(opts)?;
        if let Some(p) = primary {
            for secret in ["superuser-password", "replication-password"] {
                std::fs::copy(
                    self.agents[p].dir.path().join(secret),
                    self.agents[i].dir.path().join(secret),
                )?;
            }
        }
        Ok(i)
    }

    /// Starts every agent not started yet, at once, and waits until all run.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for fx in self.agents.iter_mut().filter(|a| a.agent_pid().is_none()) {
            fx.spawn()?;
        }
        futures::future::try_join_all(self.agents.iter_mut().map(|fx| fx.wait_running(LONG)))
            .await?;
        Ok(())
    }

    /// Starts agent `i` (prepared by [`ClusterFixture::add`]) and waits until it runs.
    pub async fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let fx = &mut self.agents[i];
        fx.spawn()?;
        fx.wait_running(LONG).await?;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    pub fn agents(&self) -> &[AgentFixture] {
        &self.agents
    }

    pub fn agent(&self, i: usize) -> &AgentFixture {
        &self.agents[i]
    }

    pub fn agent_mut(&mut self, i: usize) -> &mut AgentFixture {
        &mut self.agents[i]
    }

    /// Agent `i`'s API client (loopback listener, with its token).
    pub fn client(&self, i: usize) -> AgentClient {
        self.agents[i].client()
    }

    /// A superuser SQL session on agent `i`'s Postgres.
    pub async fn sql(&self, i: usize) -> anyhow::Result<tokio_postgres::Client> {
        self.agents[i].sql().await
    }

    /// Agent `i`'s log so far (the agent's own lines and its Postgres').
    pub fn logs(&self, i: usize) -> String {
        self.agents[i].logs()
    }

    /// The store every agent archives into.
    pub fn store(&self) -> &BackupStore {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut BackupStore {
        &mut self.store
    }

    /// The cluster name in the store layout (`<name>/<shard>/…`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn major(&self) -> u32 {
        self.major
    }
}

impl Drop for ClusterFixture {
    fn drop(&mut self) {
        // All agents get SIGTERM at once, so their shutdowns overlap; each AgentFixture's drop
        // then waits for its own (and SIGKILLs what is left, and any postmaster).
        for fx in &self.agents {
            fx.begin_stop();
        }
        self.agents.clear();
    }
}
