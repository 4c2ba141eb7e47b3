//! The agent's read-only context: what it was configured and started with. Built once by
//! [`crate::run`], shared by the executor and the HTTP routes behind an `Arc`, never changed.
//! The agent's state is not here: the executor owns it and publishes it through
//! [`crate::core::Handle`].

use std::sync::Arc;
use std::time::Instant;

use crate::archive::backup::BackupRuns;
use crate::archive::fetch::WalFetcher;
use crate::archive::push::WalArchiver;
use crate::config::Config;
use crate::core::monitor::Monitor;
use crate::metrics::Metrics;
use crate::postgres::OsUser;
use crate::postgres::bins::PgBinaries;
use crate::postgres::process::LogTail;
use crate::secrets::{Secret, Tokens};

pub struct Context {
    pub cfg: Config,
    pub bins: PgBinaries,
    /// The OS user Postgres runs as when the agent runs as root.
    pub owner: Option<OsUser>,
    pub superuser_password: Secret,
    pub replication_password: Secret,
    /// The API tokens accepted (the first is presented to peers); reloaded from their file.
    pub api_token: Tokens,
    pub metrics: Metrics,
    /// WAL archiving, when a backup store is configured.
    pub archiver: Option<Arc<WalArchiver>>,
    /// WAL fetching for recovery, when a backup store is configured.
    pub fetcher: Option<Arc<WalFetcher>>,
    /// Progress records of this agent's base backups (written only by the backup tasks the
    /// executor starts; read by the API).
    pub backups: BackupRuns,
    /// Postgres' last log lines (for failure reasons).
    pub pg_log: LogTail,
    /// The one long-lived monitoring connection to Postgres.
    pub monitor: Monitor,
    pub started_at: Instant,
    /// Who the shard's primary is (standalone: the state dir's record; Kubernetes: the Lease).
    pub leadership: Arc<dyn crate::replication::Leadership>,
    /// Kubernetes mode: the Lease, this pod's labels and annotations, Events.
    pub kube: Option<Arc<crate::replication::lease::KubeLeadership>>,
}

impl Context {
    /// Replaces the standalone leadership (Kubernetes mode: the Lease).
    pub fn with_leadership(mut self, leadership: Arc<dyn crate::replication::Leadership>) -> Self {
        self.leadership = leadership;
        self
    }

    /// Kubernetes mode: the Lease leads, and the pod carries the drain handshake.
    pub fn with_kube(self, kube: Arc<crate::replication::lease::KubeLeadership>) -> Self {
        let mut ctx = self.with_leadership(kube.clone());
        ctx.kube = Some(kube);
        ctx
    }

    /// This instance is its shard's primary, as [`Context::leadership`] records it.
    pub fn is_leader(&self) -> bool {
        self.leadership.leader().as_deref() == Some(self.cfg.replication.advertise_url.as_str())
    }

    /// Everything the agent needs besides its state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        bins: PgBinaries,
        owner: Option<OsUser>,
        superuser_password: Secret,
        replication_password: Secret,
        api_token: Tokens,
        metrics: Metrics,
        archiver: Option<Arc<WalArchiver>>,
        fetcher: Option<Arc<WalFetcher>>,
    ) -> Context {
        let monitor = Monitor::new(&cfg, &superuser_password);
        let leadership = Arc::new(crate::replication::StaticLeadership::load(&cfg));
        Context {
            leadership,
            kube: None,
            cfg,
            bins,
            owner,
            superuser_password,
            replication_password,
            api_token,
            metrics,
            archiver,
            fetcher,
            backups: BackupRuns::default(),
            pg_log: LogTail::default(),
            monitor,
            started_at: Instant::now(),
        }
    }
}
