//! The executor's replication steps: cloning a replica, registering with the primary, the
//! standby files, promote, demote, follow, the planned switchover, and the periodic
//! housekeeping (slots, re-registration, lag metrics). They are executor methods because they
//! start and stop the postmaster the executor owns.

use std::time::{Duration, Instant};

use pgpilot_common::api::{
    FollowRequest, RegisterReplicaRequest, RegisterReplicaResponse, ReparentResponse,
    StatusResponse, SwitchoverRequest, SwitchoverResponse,
};
use pgpilot_common::state::{AgentState, OperationKind, Role};
use tokio_util::sync::CancellationToken;

use super::{Executor, OpTask};
use crate::config::CloneFrom;
use crate::core::{OpRecord, Request};
use crate::error::AgentError;
use crate::replication::clone;
use crate::replication::live::LiveOp;
use crate::replication::slots::{Registry, SlotKeeper};
use crate::replication::sql::{self as rsql, ReceiverStatus};
use crate::replication::switchover::{self, Candidate, call, peer};
use crate::replication::{self, StandbyConf, Upstream};

/// A replica not streaming for this long registers with its primary again (its slot may
/// have been dropped, or the primary moved).
const REREGISTER_AFTER: Duration = Duration::from_secs(10);
/// How long a switchover waits for the candidate to confirm the old primary's last WAL.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// What the executor keeps about replication between events.
#[derive(Default)]
pub(in crate::core) struct ReplicationState {
    /// How this replica reaches its primary (the last registration).
    pub upstream: Option<Upstream>,
    /// On a primary: the replicas that registered.
    pub registry: Registry,
    pub slots: SlotKeeper,
    /// On a replica: its WAL receiver as last seen.
    pub receiver: Option<ReceiverStatus>,
    not_streaming_since: Option<Instant>,
    last_warning: Option<(String, Instant)>,
}

impl Executor {
    /// At start: the password file of the replication connections, the registry of replicas,
    /// the last registration (if it is with the current leader).
    pub(super) fn prepare_replication(&mut self) -> Result<(), String> {
        let ctx = self.ctx.clone();
        let cfg = &ctx.cfg;
        replication::write_pgpass(
            &replication::pgpass_path(cfg),
            &[
                (&cfg.replication_user, ctx.replication_password.expose()),
                (&cfg.superuser, ctx.superuser_password.expose()),
            ],
            ctx.owner.as_ref(),
        )
        .map_err(|e| {
            format!(
                "cannot write {}: {e}",
                replication::pgpass_path(cfg).display()
            )
        })?;
        self.repl.registry = Registry::load(cfg);
        let leader = ctx.leadership.leader();
        self.repl.upstream =
            replication::load_upstream(cfg).filter(|u| Some(&u.url) == leader.as_ref());
        Ok(())
    }

    /// The standby settings rendered into pgpilot.conf: while this instance follows a
    /// primary, and also on the leader when its data dir is still a standby (`standby.signal`:
    /// only promote makes it a primary, never a restart). `None` on a primary.
    pub(super) fn standby_conf(&self) -> Option<StandbyConf> {
        if self.ctx.is_leader() {
            let signal = self.ctx.cfg.data_dir.join(crate::files::STANDBY_SIGNAL);
            return signal.exists().then_some(StandbyConf {
                conninfo: None,
                slot: None,
            });
        }
        let up = self.repl.upstream.as_ref();
        Some(StandbyConf {
            conninfo: up.map(|u| replication::primary_conninfo(&self.ctx.cfg, u)),
            slot: up.map(|u| u.slot.clone()),
        })
    }

    /// Before a start: `standby.signal` exists when this instance follows a primary. On the
    /// leader a leftover one is kept (and said): see [`Executor::standby_conf`].
    pub(super) fn ensure_standby_signal(&self) -> std::io::Result<()> {
        let cfg = &self.ctx.cfg;
        let signal = cfg.data_dir.join(crate::files::STANDBY_SIGNAL);
        if self.ctx.is_leader() {
            if signal.exists() {
                tracing::warn!(
                    "{} is a standby (standby.signal) although this instance is recorded as the primary: \
                     it starts as a standby; promote it with POST /v1/promote",
                    cfg.data_dir.display()
                );
            }
        } else if !signal.exists() {
            std::fs::write(&signal, "")?;
            if let Some(o) = &self.ctx.owner {
                o.chown(&signal)?;
            }
        }
        Ok(())
    }

    /// Registers with the primary at `url`: it creates this replica's slot and says where its
    /// Postgres listens. `url` being this instance itself is bad input; anything else that
    /// goes wrong is a failure to reach or use the primary.
    async fn register(&self, url: &str) -> Result<Upstream, AgentError> {
        let cfg = &self.ctx.cfg;
        let client = peer(&self.ctx, url);
        let req = RegisterReplicaRequest {
            name: cfg.replication.name.clone(),
            api_url: cfg.replication.advertise_url.clone(),
        };
        let what = format!("registering with the primary at {url}");
        let resp = call(&what, client.register_replica(&req))
            .await
            .map_err(AgentError::Failed)?;
        if resp.primary == cfg.replication.name {
            return Err(AgentError::BadRequest(format!(
                "{url} is this instance itself ({}): an instance does not follow itself",
                resp.primary
            )));
        }
        let up = Upstream {
            url: url.to_string(),
            name: resp.primary,
            host: resp.postgres_host,
            port: resp.postgres_port,
            slot: resp.slot,
            system_identifier: resp.system_identifier,
            timeline: resp.timeline,
            history: resp.history,
        };
        if let Err(e) = replication::save_upstream(cfg, &up) {
            tracing::warn!("cannot record the registration: {e}");
        }
        Ok(up)
    }

    /// An empty data dir and another instance leads: register with it and copy it. `false`
    /// when the agent was asked to shut down meanwhile.
    pub(super) async fn clone_bootstrap(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<bool, String> {
        self.set_state(AgentState::Bootstrapping {
            method: pgpilot_common::state::BootstrapMethod::Clone,
        });
        let Some(leader) = self.ctx.leadership.leader() else {
            return Err("no primary is known to clone from: set [replication] primary".into());
        };
        let op = LiveOp::new(OperationKind::Clone, &leader, "registering");
        self.op = Some(OpTask::Live { op: op.clone() });
        self.publish();
        let upstream = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                r = self.register(&leader) => match r {
                    Ok(u) => break u,
                    Err(e) => {
                        tracing::warn!("{e}; retrying in 2 s");
                        op.lock().error = Some(e.to_string());
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(false),
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        }
                    }
                }
            }
        };
        op.lock().error = None;
        op.set_step("copying");
        self.repl.upstream = Some(upstream.clone());
        self.publish();
        let ctx = self.ctx.clone();
        let result = match ctx.cfg.replication.clone_from {
            CloneFrom::Primary => tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                r = clone::clone_from_primary(&ctx, &upstream, &op) => r,
            },
            CloneFrom::Backup => tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                r = clone::clone_from_backup(&ctx, &op) => r,
            },
        };
        self.op = None;
        self.last_op = Some(OpRecord::Live(op.clone()));
        match result {
            Ok(()) => {
                op.finish(Ok(()));
                tracing::info!(primary = %upstream.url, "clone complete; starting as a replica");
                Ok(true)
            }
            Err(e) => {
                let reason = format!("cloning the primary at {} failed: {e}", upstream.url);
                tracing::error!("{reason}");
                op.finish(Err(reason.clone()));
                self.set_state(AgentState::Failed {
                    reason: reason.clone(),
                });
                Err(reason)
            }
        }
    }

    /// A request whose body is wrong whatever the state: following this agent's own URL, or
    /// something that is not an agent URL.
    pub(super) fn input_error(&self, req: &Request) -> Option<AgentError> {
        let Request::Follow { req, .. } = req else {
            return None;
        };
        if req.primary.trim_end_matches('/') == self.ctx.cfg.replication.advertise_url {
            return Some(AgentError::BadRequest(format!(
                "{} is this agent's own URL: an instance does not follow itself",
                req.primary
            )));
        }
        pgpilot_common::client::check_agent_url(&req.primary)
            .err()
            .map(|e| AgentError::BadRequest(format!("primary: {e}")))
    }

    pub(super) async fn serve_register(
        &mut self,
        req: RegisterReplicaRequest,
    ) -> Result<RegisterReplicaResponse, AgentError> {
        let ctx = self.ctx.clone();
        let cfg = &ctx.cfg;
        if !crate::config::is_instance_name(&req.name) {
            return Err(AgentError::BadRequest(format!(
                "replica name {:?} must be 1-50 characters of a-z, 0-9, '_' and '-'",
                req.name
            )));
        }
        if req.name == cfg.replication.name {
            return Err(AgentError::BadRequest(format!(
                "{} is this primary's own name: give each instance its own [replication] name",
                req.name
            )));
        }
        if let Err(e) = pgpilot_common::client::check_agent_url(&req.api_url) {
            return Err(AgentError::BadRequest(format!("api_url: {e}")));
        }
        let fail = |e: &dyn std::fmt::Display| {
            AgentError::Failed(format!("registering replica {}: {e}", req.name))
        };
        let client = ctx.monitor.client().await.map_err(|e| fail(&e))?;
        let slot = replication::slot_name(&req.name);
        if rsql::ensure_slot(&client, &slot)
            .await
            .map_err(|e| fail(&e))?
        {
            tracing::info!(replica = %req.name, %slot, "replication slot created");
        }
        self.repl.slots.forget(&slot);
        let system_identifier = rsql::system_identifier(&client)
            .await
            .map_err(|e| fail(&e))?;
        let timeline = ctx.monitor.status().await.ok().and_then(|s| s.timeline);
        if self.repl.registry.replicas.get(&req.name) != Some(&req.api_url) {
            self.repl
                .registry
                .replicas
                .insert(req.name.clone(), req.api_url.clone());
            self.repl.registry.save(cfg).map_err(|e| fail(&e))?;
            tracing::info!(replica = %req.name, api_url = %req.api_url, "replica registered");
            // pg_hba.conf takes replication from the registered replicas' addresses: this one's
            // is in it, and loaded, before the replica clones or streams.
            self.render_conf().map_err(|e| fail(&e))?;
            if let Some(pm) = &self.pm {
                pm.reload();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(RegisterReplicaResponse {
            primary: cfg.replication.name.clone(),
            slot,
            postgres_host: cfg.replication.advertise_host.clone(),
            postgres_port: cfg.postgres_port,
            system_identifier,
            timeline: timeline.unwrap_or(0),
            history: replication::read_history(&cfg.data_dir, timeline.unwrap_or(0)),
        })
    }

    fn reparent_response(&self, checkpoint_lsn: Option<String>) -> ReparentResponse {
        ReparentResponse {
            state: self.state.clone(),
            upstream: self.repl.upstream.as_ref().map(|u| u.url.clone()),
            checkpoint_lsn,
            timeline: None,
        }
    }

    /// Promotes this replica: `pg_promote`, then the record says this instance leads.
    pub(super) async fn promote(&mut self) -> Result<ReparentResponse, AgentError> {
        let ctx = self.ctx.clone();
        let client = ctx
            .monitor
            .client()
            .await
            .map_err(|e| AgentError::Failed(format!("promote: {e}")))?;
        ctx.leadership
            .may_promote()
            .await
            .map_err(AgentError::Refused)?;
        // A synchronous standby inherited from the old primary (a clone copies
        // postgresql.auto.conf) would hold this primary's first commits for a standby that may
        // never connect: the new primary's agent chooses its own once it runs.
        if let Err(e) = rsql::set_synchronous_standby(&client, None).await {
            tracing::warn!("promote: cannot reset synchronous_standby_names: {e}");
        }
        tracing::info!("promoting");
        let promoted = rsql::promote(&client, 60)
            .await
            .map_err(|e| AgentError::Failed(format!("pg_promote failed: {e}")))?;
        if !promoted {
            return Err(AgentError::Failed(
                "Postgres did not finish promoting within 60 s; it may still complete: look at /v1/status".into(),
            ));
        }
        ctx.leadership
            .set_leader(Some(&ctx.cfg.replication.advertise_url))
            .await
            .map_err(|e| {
                AgentError::Failed(format!(
                    "promoted, but the leader record was not written: {e}"
                ))
            })?;
        self.repl.upstream = None;
        let _ = std::fs::remove_file(replication::upstream_path(&ctx.cfg));
        if let Err(e) = self.render_conf() {
            tracing::error!("promoted, but cannot render configuration: {e}");
        }
        self.on_tick().await;
        let mut resp = self.reparent_response(None);
        resp.timeline = ctx.monitor.status().await.ok().and_then(|s| s.timeline);
        Ok(resp)
    }

    /// Stops writes (fast shutdown: the final checkpoint streams to connected standbys) and
    /// starts again as a standby that follows no one until told (`POST /v1/follow`).
    pub(super) async fn demote(&mut self) -> Result<ReparentResponse, AgentError> {
        let ctx = self.ctx.clone();
        self.stop_postgres(pgpilot_common::api::ShutdownMode::Fast)
            .await?;
        self.set_state(AgentState::Stopped);
        let cd = replication::controldata(&ctx.cfg.data_dir).map_err(AgentError::Failed)?;
        ctx.leadership
            .set_leader(None)
            .await
            .map_err(|e| AgentError::Failed(format!("cannot record the demotion: {e}")))?;
        self.repl.upstream = None;
        tracing::info!(checkpoint = %cd.checkpoint_lsn, "demoted: starting as a standby");
        self.spawn_postgres();
        let mut resp = self.reparent_response(Some(cd.checkpoint_lsn));
        resp.timeline = Some(cd.timeline);
        Ok(resp)
    }

    /// Registers with another primary and streams from it: the new `primary_conninfo` is
    /// applied by a reload (Postgres 13+), without a restart.
    pub(super) async fn follow(
        &mut self,
        req: FollowRequest,
    ) -> Result<ReparentResponse, AgentError> {
        let ctx = self.ctx.clone();
        let url = req.primary.trim_end_matches('/').to_string();
        let up = self.register(&url).await?;
        let own = self.own_system_identifier().await;
        if let Some(own) = own
            && own != up.system_identifier
        {
            return Err(AgentError::Refused(format!(
                "{url} runs another database cluster (system identifier {}, this one {own}): \
                 a replica follows only a primary of its own cluster; reinitialize it to clone that one",
                up.system_identifier
            )));
        }
        if let Some(why) = self.diverged_from(&up).await {
            self.rewind(&up, &why).await?;
        }
        ctx.leadership
            .set_leader(Some(&url))
            .await
            .map_err(|e| AgentError::Failed(format!("cannot record the new primary: {e}")))?;
        self.repl.upstream = Some(up);
        let changed = self
            .render_conf()
            .map_err(|e| AgentError::Failed(format!("cannot render configuration: {e}")))?;
        match &self.pm {
            // A standby that followed nobody recovers on its current timeline only, a setting
            // a reload cannot change: restart it onto the new primary's timeline.
            Some(_) if changed.iter().any(|k| k == "recovery_target_timeline") => {
                tracing::info!(primary = %url, "restarting the standby to follow the primary's timeline");
                self.stop_postgres(pgpilot_common::api::ShutdownMode::Fast)
                    .await?;
                self.set_state(AgentState::Stopped);
                self.spawn_postgres();
            }
            Some(pm) => pm.reload(),
            // Stopped by a rewind (or before): start as a standby of the new primary.
            None if self.state == AgentState::Stopped => self.spawn_postgres(),
            None => {}
        }
        tracing::info!(primary = %url, "following");
        Ok(self.reparent_response(None))
    }

    /// Whether this instance's own WAL, as it ended when it last stopped being a primary, went
    /// past the point where `up`'s history left that timeline. An instance that has streamed
    /// from a primary since has no such record: it cannot have diverged.
    async fn diverged_from(&self, up: &Upstream) -> Option<String> {
        let Some(end) = replication::load_primary_end(&self.ctx.cfg) else {
            return self.replica_diverged_from(up).await;
        };
        let at = replication::lsn(&end.lsn)?;
        let why = replication::divergence(end.timeline, at, up.timeline, &up.history);
        match (why, end.clean) {
            (Some(why), _) => Some(why),
            // Died as a primary on a timeline the new primary left: its WAL may go past the
            // last checkpoint, so it cannot be known not to have diverged.
            (None, false) if end.timeline != up.timeline => Some(format!(
                "this instance stopped as a primary on timeline {} without a clean shutdown \
                 (last checkpoint {}), so its WAL may go past the fork",
                end.timeline, end.lsn
            )),
            (None, _) => None,
        }
    }

    /// A replica that received WAL past the point where `up` switched off the timeline they
    /// shared: after a failover to a replica that had received less (one this replica's agent
    /// could not reach in time, or a record that arrived a moment later), Postgres refuses to
    /// follow with "new timeline forked off current database system timeline before current
    /// recovery point". pg_rewind on a replica that turns out not to need it is harmless.
    async fn replica_diverged_from(&self, up: &Upstream) -> Option<String> {
        if !self.state.accepts_connections() {
            return None;
        }
        let client = self.ctx.monitor.client().await.ok()?;
        let r = rsql::receiver(&client).await.ok()?;
        let end =
            replication::failover::wal_position(r.receive_lsn.as_deref(), r.replay_lsn.as_deref())?;
        replica_past_fork(r.received_tli, end, up)
    }

    /// Records where this instance's WAL ended, after Postgres stopped or died as a primary.
    pub(super) fn note_primary_end(&self, clean: bool) {
        let cfg = &self.ctx.cfg;
        match replication::controldata(&cfg.data_dir) {
            Ok(cd) => {
                let end = replication::PrimaryEnd {
                    clean: clean && cd.shut_down_as_primary(),
                    timeline: cd.timeline,
                    lsn: cd.checkpoint_lsn,
                };
                if let Err(e) = replication::save_primary_end(cfg, &end) {
                    tracing::warn!("cannot record where this primary's WAL ended: {e}");
                }
            }
            Err(e) => tracing::warn!("cannot record where this primary's WAL ended: {e}"),
        }
    }

    /// Rewinds this instance onto `up`'s timeline with `pg_rewind` (Postgres stopped cleanly
    /// first). When that is impossible the follow is refused and the instance stays a standby
    /// that follows nobody: never a second writer.
    async fn rewind(&mut self, up: &Upstream, why: &str) -> Result<(), AgentError> {
        let ctx = self.ctx.clone();
        let cfg = &ctx.cfg;
        let tool = ctx.bins.path("pg_rewind");
        let reinit = format!(
            "POST /v1/reinitialize {{\"primary\": \"{}\"}} (CLI `reinitialize --primary {}`) {}",
            up.url,
            up.url,
            replication::REINITIALIZE_HINT
        );
        if !tool.exists() {
            return Err(AgentError::Refused(format!(
                "{why}: it must be rewound, and {} does not exist; {reinit}",
                tool.display()
            )));
        }
        tracing::warn!(primary = %up.url, "{why}: rewinding with pg_rewind");
        if self.pm.is_some() {
            self.stop_postgres(pgpilot_common::api::ShutdownMode::Fast)
                .await?;
        }
        self.set_state(AgentState::Stopped);
        let cd = replication::controldata(&cfg.data_dir).map_err(AgentError::Failed)?;
        if !matches!(cd.state, 1 | 2) {
            return Err(AgentError::Refused(format!(
                "{why}: it must be rewound, but it was not shut down cleanly (pg_control state {}), which pg_rewind needs; {reinit}",
                cd.state
            )));
        }
        self.source_checkpointed(up).await.map_err(|e| {
            AgentError::Failed(format!(
                "cannot make {} write its new timeline {} to its control file before pg_rewind: {e}; \
                 the instance stays stopped; try again, or {reinit}",
                up.url, up.timeline
            ))
        })?;
        let q = crate::postgres::tls::conninfo_quote;
        let source = format!(
            "{} port={} user={} dbname=postgres passfile={} connect_timeout=5",
            crate::postgres::tls::peer_conninfo(cfg, &up.host),
            up.port,
            q(&cfg.superuser),
            q(&replication::pgpass_path(cfg).display().to_string())
        );
        let mut cmd = tokio::process::Command::new(&tool);
        cmd.arg("--target-pgdata")
            .arg(&cfg.data_dir)
            .arg("--source-server")
            .arg(&source);
        // WAL the target recycled since the fork comes back through its restore_command,
        // which exists only with a backup store; without one pg_rewind reads pg_wal alone.
        if cfg.backup.is_some() {
            cmd.arg("--restore-target-wal");
        }
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        crate::postgres::run_as(&mut cmd, ctx.owner.as_ref());
        let out = cmd
            .output()
            .await
            .map_err(|e| AgentError::Failed(format!("cannot run {}: {e}", tool.display())))?;
        let text = String::from_utf8_lossy(&out.stderr)
            .trim()
            .replace('\n', "; ");
        if !out.status.success() {
            return Err(AgentError::Failed(format!(
                "pg_rewind from {} failed ({}): {text}; the instance stays stopped; {reinit}",
                up.url, out.status
            )));
        }
        tracing::info!(primary = %up.url, "pg_rewind: {text}");
        Ok(())
    }

    /// A just-promoted primary writes its new timeline to pg_control only at its first
    /// checkpoint, and pg_rewind reads the source's timeline from there: until then it sees
    /// both on the old timeline and answers "no rewind required", leaving the diverged WAL in
    /// place (the standby then fails with "requested timeline is not a child"). Like Patroni,
    /// ask the source for a CHECKPOINT when its control file lags its history.
    async fn source_checkpointed(&self, up: &Upstream) -> Result<(), String> {
        let cfg = &self.ctx.cfg;
        let mut pg = tokio_postgres::Config::new();
        for (k, v) in crate::postgres::tls::peer_params(cfg, &up.host) {
            match k {
                "host" => pg.host(&v),
                "hostaddr" => pg.hostaddr(v.parse().map_err(|e| format!("{v}: {e}"))?),
                // The connector below verifies the chain and the name, whatever the mode says.
                "sslmode" => pg.ssl_mode(tokio_postgres::config::SslMode::Require),
                _ => &mut pg,
            };
        }
        pg.port(up.port)
            .user(&cfg.superuser)
            .password(self.ctx.superuser_password.expose())
            .dbname("postgres")
            .application_name("pgpilot-agent")
            .connect_timeout(Duration::from_secs(5));
        let tls = crate::postgres::tls::peer_connector(cfg)?;
        let client = pgpilot_common::tls::postgres::connect(&pg, tls)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let control_timeline = || async {
            client
                .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
                .await
                .map(|r| r.get::<_, i32>(0) as u32)
                .map_err(|e| format!("read pg_control_checkpoint(): {e}"))
        };
        if control_timeline().await? >= up.timeline {
            return Ok(());
        }
        tracing::info!(primary = %up.url, timeline = up.timeline, "asking the new primary for a checkpoint before pg_rewind");
        client
            .batch_execute("CHECKPOINT")
            .await
            .map_err(|e| format!("CHECKPOINT: {e}"))?;
        match control_timeline().await? {
            t if t >= up.timeline => Ok(()),
            t => Err(format!(
                "its control file still says timeline {t} after CHECKPOINT"
            )),
        }
    }

    /// Throws the data dir away and clones the primary again (a replica that cannot follow).
    pub(super) async fn reinitialize(
        &mut self,
        req: pgpilot_common::api::ReinitializeRequest,
    ) -> Result<ReparentResponse, AgentError> {
        let ctx = self.ctx.clone();
        if let Some(url) = &req.primary {
            let url = pgpilot_common::client::check_agent_url(url)
                .map_err(|e| AgentError::BadRequest(format!("primary: {e}")))?;
            if url == ctx.cfg.replication.advertise_url {
                return Err(AgentError::BadRequest(format!(
                    "{url} is this agent's own URL: an instance does not clone itself"
                )));
            }
            ctx.leadership
                .set_leader(Some(&url))
                .await
                .map_err(|e| AgentError::Failed(format!("cannot record the primary: {e}")))?;
            self.repl.upstream = None;
        }
        if ctx.is_leader() || ctx.leadership.leader().is_none() {
            return Err(AgentError::conflict(
                &self.state,
                "no other primary is recorded to clone from: name one ({\"primary\": URL})",
            ));
        }
        if self.pm.is_some() {
            self.stop_postgres(pgpilot_common::api::ShutdownMode::Fast)
                .await?;
        }
        self.set_state(AgentState::Stopped);
        self.retry_at = None;
        let dir = ctx.cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || crate::restore::empty_data_dir(&dir))
            .await
            .map_err(|e| AgentError::Failed(e.to_string()))?
            .map_err(|e| AgentError::Failed(format!("emptying the data dir: {e}")))?;
        tracing::warn!(data_dir = %ctx.cfg.data_dir.display(), "reinitializing: the data dir was emptied; cloning the primary");
        let shutdown = self.shutdown.clone();
        match self.clone_bootstrap(&shutdown).await {
            Ok(true) => {
                self.spawn_postgres();
                Ok(self.reparent_response(None))
            }
            Ok(false) => Err(AgentError::Failed(
                "the agent is shutting down; the clone was abandoned".into(),
            )),
            Err(reason) => Err(AgentError::Failed(reason)),
        }
    }

    async fn own_system_identifier(&self) -> Option<String> {
        if self.state.accepts_connections()
            && let Ok(client) = self.ctx.monitor.client().await
        {
            return rsql::system_identifier(&client).await.ok();
        }
        None
    }

    /// The planned switchover, on the primary (shared/DESIGN.md, "Replication and
    /// reparenting"). Refusals (unknown or unhealthy candidate) change nothing. A failure
    /// before the candidate is promoted starts this instance again as the primary.
    pub(super) async fn switchover(
        &mut self,
        req: SwitchoverRequest,
    ) -> Result<SwitchoverResponse, AgentError> {
        let started = Instant::now();
        let ctx = self.ctx.clone();
        let cfg = &ctx.cfg;
        let client = ctx
            .monitor
            .client()
            .await
            .map_err(|e| AgentError::Failed(format!("switchover: {e}")))?;
        let views = rsql::replicas(&client).await.map_err(|e| {
            AgentError::Failed(format!("switchover: reading pg_stat_replication: {e}"))
        })?;
        // A draining replica is never a candidate: the best of the others, or a refusal.
        let mut views = views;
        let mut draining = Vec::new();
        let (cand, st) = loop {
            let cand = switchover::choose(
                req.candidate.as_deref(),
                &cfg.replication.name,
                &views,
                &self.repl.registry,
                cfg.replication.max_lag_bytes,
            )
            .map_err(|e| match (e, draining.is_empty()) {
                (AgentError::PreconditionFailed(m), false) => AgentError::PreconditionFailed(
                    format!("{m}; draining, so not candidates: {}", draining.join(", ")),
                ),
                (e, _) => e,
            })?;
            // A replica whose pod came back at a new address: where it answers now.
            let mut cand = cand;
            if let Some(url) = ctx.leadership.peer_url(&cand.name) {
                cand.api_url = url;
            }
            let cand_client = peer(&ctx, &cand.api_url);
            let st = call(
                &format!("candidate {} at {}", cand.name, cand.api_url),
                cand_client.status(),
            )
            .await
            .map_err(AgentError::PreconditionFailed)?;
            if st.drain.state == pgpilot_common::state::DrainState::Running {
                break (cand, st);
            }
            if req.candidate.is_some() {
                return Err(AgentError::PreconditionFailed(format!(
                    "candidate {} is draining ({}): it does not take leadership",
                    cand.name, st.drain.state
                )));
            }
            views.retain(|v| v.name != cand.name);
            draining.push(cand.name);
        };
        let streaming = st.replication.as_ref().is_some_and(|r| r.streaming);
        if st.state.role() != Some(Role::Replica) || !streaming {
            return Err(AgentError::PreconditionFailed(format!(
                "candidate {} is {}{}: a switchover needs a streaming replica",
                cand.name,
                st.state,
                if streaming { "" } else { ", not streaming" }
            )));
        }
        tracing::info!(candidate = %cand.name, "switchover: starting");
        let op = LiveOp::new(OperationKind::Switchover, &cand.name, "stopping writes");
        self.op = Some(OpTask::Live { op: op.clone() });
        self.publish();
        let result = self.switchover_steps(&cand, &op, started).await;
        self.op = None;
        self.last_op = Some(OpRecord::Live(op.clone()));
        op.finish(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        let outcome = if result.is_ok() {
            "succeeded"
        } else {
            "failed"
        };
        ctx.metrics
            .replication
            .switchovers
            .with_label_values(&[outcome])
            .inc();
        self.publish();
        result
    }

    async fn switchover_steps(
        &mut self,
        cand: &Candidate,
        op: &LiveOp,
        started: Instant,
    ) -> Result<SwitchoverResponse, AgentError> {
        let ctx = self.ctx.clone();
        let cfg = &ctx.cfg;
        let cand_client = peer(&ctx, &cand.api_url);
        // 1. Stop writes: a fast shutdown sends the final checkpoint to connected standbys.
        let pause = Instant::now();
        self.stop_postgres(pgpilot_common::api::ShutdownMode::Fast)
            .await?;
        self.set_state(AgentState::Stopped);
        let checkpoint = match replication::controldata(&cfg.data_dir) {
            Ok(cd) => cd.checkpoint_lsn,
            Err(e) => return self.roll_back(cand, "stop writes", &e).await,
        };
        let Some(needed) = replication::lsn(&checkpoint) else {
            let why = format!("cannot read the checkpoint position {checkpoint:?}");
            return self.roll_back(cand, "stop writes", &why).await;
        };
        if let Some(delay) = test_pause() {
            tokio::time::sleep(delay).await;
        }
        // 2. The candidate has received everything up to and including that checkpoint.
        op.set_step("confirming");
        self.publish();
        let deadline = Instant::now() + CONFIRM_TIMEOUT;
        let mut last;
        loop {
            match tokio::time::timeout(Duration::from_secs(2), cand_client.status()).await {
                Ok(Ok(st)) => {
                    let received = received_lsn(&st);
                    if received
                        .as_deref()
                        .and_then(replication::lsn)
                        .is_some_and(|r| r > needed)
                    {
                        break;
                    }
                    last = format!(
                        "it reports {} received",
                        received.unwrap_or_else(|| "nothing".into())
                    );
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "its agent did not answer within 2 s".into(),
            }
            if Instant::now() >= deadline {
                let why = format!(
                    "{} did not confirm the shutdown checkpoint {checkpoint} within {CONFIRM_TIMEOUT:?}: {last}",
                    cand.name
                );
                return self.roll_back(cand, "confirm", &why).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // 3. Hand leadership over (Kubernetes: the Lease names the candidate before it may
        //    promote), then promote the candidate.
        op.set_step("promoting");
        self.publish();
        if let Err(e) = ctx.leadership.set_leader(Some(&cand.api_url)).await {
            return self.roll_back(cand, "hand over", &e).await;
        }
        if let Err(e) = call(&format!("promoting {}", cand.name), cand_client.promote()).await {
            // It may have promoted and failed to answer: ask before deciding.
            let promoted = tokio::time::timeout(Duration::from_secs(3), cand_client.status())
                .await
                .ok()
                .and_then(Result::ok)
                .is_some_and(|st| st.state.role() == Some(Role::Primary));
            if !promoted {
                return self.roll_back(cand, "promote", &e).await;
            }
        }
        let write_pause = pause.elapsed();
        ctx.metrics
            .replication
            .switchover_write_pause
            .observe(write_pause.as_secs_f64());
        // 4. This instance follows the new primary (no rewind needed: it stopped cleanly and
        //    the candidate has all of its WAL).
        op.set_step("rejoining");
        self.publish();
        let mut upstream = None;
        for attempt in 1..=5 {
            match self.register(&cand.api_url).await {
                Ok(up) => {
                    upstream = Some(up);
                    break;
                }
                Err(e) if attempt == 5 => tracing::warn!(
                    "switchover: {e}; starting as a standby and retrying the registration"
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        self.repl.upstream = upstream;
        self.spawn_postgres();
        // 5. Re-point the other replicas.
        op.set_step("re-pointing replicas");
        self.publish();
        let mut followers = vec![cfg.replication.name.clone()];
        let mut not_followed = Vec::new();
        let others: Vec<(String, String)> = self
            .repl
            .registry
            .replicas
            .iter()
            .filter(|(n, _)| **n != cand.name && **n != cfg.replication.name)
            .map(|(n, u)| (n.clone(), u.clone()))
            .collect();
        let follow = FollowRequest {
            primary: cand.api_url.clone(),
        };
        for (name, url) in others {
            let c = peer(&ctx, &url);
            match call(&format!("re-pointing {name}"), c.follow(&follow)).await {
                Ok(_) => followers.push(name),
                Err(e) => {
                    tracing::warn!("switchover: {e}");
                    not_followed.push(format!("{name}: {e}"));
                }
            }
        }
        let timeline = tokio::time::timeout(Duration::from_secs(2), cand_client.status())
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|s| s.timeline);
        tracing::info!(new_primary = %cand.name, write_pause_ms = write_pause.as_millis() as u64, "switchover complete");
        Ok(SwitchoverResponse {
            old_primary: cfg.replication.name.clone(),
            new_primary: cand.name.clone(),
            new_primary_url: cand.api_url.clone(),
            checkpoint_lsn: checkpoint,
            timeline,
            followers,
            not_followed,
            write_pause_ms: write_pause.as_millis() as u64,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// The candidate was not promoted: this instance is the primary again.
    async fn roll_back(
        &mut self,
        cand: &Candidate,
        step: &str,
        why: &str,
    ) -> Result<SwitchoverResponse, AgentError> {
        let ctx = self.ctx.clone();
        let me = &ctx.cfg.replication.advertise_url;
        if ctx.leadership.leader().as_deref() != Some(me.as_str())
            && let Err(e) = ctx.leadership.reclaim(me, &cand.api_url).await
        {
            // The candidate may have promoted: never a second writer. Stay a standby.
            tracing::error!(candidate = %cand.name, step, "switchover failed: {why}; leadership cannot be taken back ({e}): staying a standby");
            self.repl.upstream = None;
            self.spawn_postgres();
            return Err(AgentError::Failed(format!(
                "switchover to {} failed at step {step}: {why}; leadership could not be taken back ({e}), \
                 so {} stays a standby following nobody: look at the candidate",
                cand.name, ctx.cfg.replication.name
            )));
        }
        tracing::error!(candidate = %cand.name, step, "switchover failed: {why}; starting again as the primary");
        self.spawn_postgres();
        Err(AgentError::Failed(format!(
            "switchover to {} failed at step {step}: {why}; {} was started again as the primary and nothing was lost",
            cand.name, self.ctx.cfg.replication.name
        )))
    }

    /// Every few seconds while Postgres runs: client connections; on a primary, slots (retained WAL, dropping those
    /// of replicas gone past the grace) and replica counts; on a replica, its WAL receiver, lag,
    /// leftover slots and registration with its primary.
    pub(super) async fn replication_housekeeping(&mut self) {
        let ctx = self.ctx.clone();
        let m = &ctx.metrics.replication;
        let role = self.state.role();
        m.is_primary.set(i64::from(role == Some(Role::Primary)));
        if role.is_none() {
            self.repl.receiver = None;
            return;
        }
        let Ok(client) = ctx.monitor.client().await else {
            return;
        };
        if let Ok((by_state, max)) = rsql::connections(&client).await {
            ctx.metrics.connections.reset();
            for (state, n) in by_state {
                ctx.metrics.connections.with_label_values(&[&state]).set(n);
            }
            ctx.metrics.max_connections.set(max);
        }
        let slots = rsql::slots(&client).await.unwrap_or_default();
        m.slot_retained_bytes.reset();
        for s in &slots {
            m.slot_retained_bytes
                .with_label_values(&[&s.name])
                .set(s.retained_bytes.unwrap_or(0) as i64);
        }
        let now = Instant::now();
        let grace = if role == Some(Role::Primary) {
            ctx.cfg.replication.slot_grace
        } else {
            // Nothing streams from a replica: its slots are leftovers of a life as primary.
            Duration::ZERO
        };
        for slot in self.repl.slots.expired(&slots, grace, now) {
            match rsql::drop_slot(&client, &slot).await {
                Ok(true) => {
                    tracing::warn!(%slot, "dropped replication slot: inactive for more than {grace:?} ([replication] slot_grace_secs), so its replica no longer holds WAL on this instance");
                    m.slots_dropped.inc();
                    self.repl.slots.forget(&slot);
                    let before = self.repl.registry.replicas.len();
                    self.repl
                        .registry
                        .replicas
                        .retain(|name, _| replication::slot_name(name) != slot);
                    if self.repl.registry.replicas.len() != before
                        && let Err(e) = self.repl.registry.save(&ctx.cfg)
                    {
                        tracing::warn!("cannot save the replica registry: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(%slot, "cannot drop replication slot: {e}"),
            }
        }
        match role {
            Some(Role::Primary) => {
                self.repl.receiver = None;
                m.streaming.set(0);
                m.lag_bytes.set(0);
                m.lag_seconds.set(0.0);
                let streaming = rsql::replicas(&client)
                    .await
                    .map(|v| v.iter().filter(|r| r.state == "streaming").count())
                    .unwrap_or(0);
                m.connected_replicas.set(streaming as i64);
            }
            _ => {
                m.connected_replicas.set(0);
                let recv = rsql::receiver(&client).await.ok();
                let streaming = recv.as_ref().is_some_and(|r| r.streaming);
                m.streaming.set(i64::from(streaming));
                if let Some(r) = &recv {
                    m.lag_bytes.set(r.lag_bytes.unwrap_or(0) as i64);
                    m.lag_seconds.set(r.lag_seconds.unwrap_or(0.0));
                }
                self.repl.receiver = recv;
                if streaming {
                    self.repl.not_streaming_since = None;
                    replication::clear_primary_end(&ctx.cfg);
                    // A replica that came back streaming on the settings in its data dir (a
                    // restarted pod, at a new address) has not told this primary where its
                    // agent answers now: a switchover to it would go to the old address.
                    if self.repl.upstream.is_none() {
                        self.reregister().await;
                    }
                } else {
                    let since = *self.repl.not_streaming_since.get_or_insert(now);
                    let stale = self
                        .repl
                        .upstream
                        .as_ref()
                        .map(|u| Some(&u.url) != ctx.leadership.leader().as_ref())
                        .unwrap_or(true);
                    if stale || now.duration_since(since) >= REREGISTER_AFTER {
                        self.repl.not_streaming_since = Some(now);
                        self.reregister().await;
                    }
                }
            }
        }
    }

    /// A replica registers with its primary again (when it does not stream, or has not
    /// registered since it started) and re-points.
    async fn reregister(&mut self) {
        if self.ctx.is_leader() {
            return;
        }
        let Some(leader) = self.ctx.leadership.leader() else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(3), self.register(&leader)).await {
            Ok(Ok(up)) => {
                if self.repl.upstream.as_ref() != Some(&up) {
                    self.repl.upstream = Some(up);
                    match self.render_conf() {
                        Ok(changed) if !changed.is_empty() => {
                            tracing::info!(primary = %leader, ?changed, "re-registered with the primary");
                            if let Some(pm) = &self.pm {
                                pm.reload();
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!("cannot render configuration: {e}"),
                    }
                }
            }
            Ok(Err(e)) => self.warn_now_and_then(e.to_string()),
            Err(_) => self.warn_now_and_then(format!(
                "registering with the primary at {leader}: no answer within 3 s"
            )),
        }
    }

    pub(super) fn warn_now_and_then(&mut self, msg: String) {
        let repeat = self
            .repl
            .last_warning
            .as_ref()
            .is_some_and(|(m, t)| *m == msg && t.elapsed() < Duration::from_secs(60));
        if !repeat {
            tracing::warn!("{msg}");
            self.repl.last_warning = Some((msg, Instant::now()));
        }
    }
}

fn received_lsn(st: &StatusResponse) -> Option<String> {
    st.replication.as_ref().and_then(|r| r.receive_lsn.clone())
}

/// Test hook: `PGPILOT_TEST_SWITCHOVER_PAUSE_MS` holds a switchover between the stop of writes
/// and the confirmation, so a test can kill the candidate midway.
fn test_pause() -> Option<Duration> {
    static PAUSE: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *PAUSE.get_or_init(|| {
        std::env::var("PGPILOT_TEST_SWITCHOVER_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    })
}

/// Whether a replica whose WAL ends at `end`, received on timeline `received_tli` (when its WAL
/// receiver runs), holds WAL past where `up`'s history left that timeline. A replica already
/// receiving `up`'s own timeline holds `up`'s WAL, not a fork: pg_rewind would find nothing
/// to undo (and fails looking for it). Without a receiver, the WAL is taken to be on the
/// timeline `up` left last, the one a replica of the old primary was on.
fn replica_past_fork(received_tli: Option<u32>, end: u64, up: &Upstream) -> Option<String> {
    let own = match received_tli {
        Some(tli) => tli,
        None => up.history.last()?.timeline,
    };
    let left = match replication::switch_leaving(own, up.timeline, &up.history) {
        Ok(left) => left?,
        Err(why) => return Some(why),
    };
    let switchpoint = replication::lsn(&left.switchpoint)?;
    (end > switchpoint).then(|| {
        format!(
            "this replica has WAL up to {} on timeline {}, past {} where the primary's timeline {} left it",
            replication::format_lsn(end),
            left.timeline,
            left.switchpoint,
            up.timeline,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgpilot_common::api::TimelineSwitch;

    fn up(timeline: u32, history: &[(u32, &str)]) -> Upstream {
        Upstream {
            url: "http://a:8008".into(),
            name: "a".into(),
            host: "a".into(),
            port: 5432,
            slot: "b".into(),
            system_identifier: "1".into(),
            timeline,
            history: history
                .iter()
                .map(|(t, lsn)| TimelineSwitch {
                    timeline: *t,
                    switchpoint: (*lsn).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_replica_past_the_fork_on_the_old_timeline_has_diverged() {
        let up = up(2, &[(1, "0/7000000")]);
        let past = replication::lsn("0/70000A0").unwrap();
        let why = replica_past_fork(Some(1), past, &up).expect("diverged");
        assert!(
            why.contains("0/70000A0") && why.contains("timeline 1"),
            "{why}"
        );
        // Without a receiver its WAL is taken to be on the timeline the primary left.
        assert!(replica_past_fork(None, past, &up).is_some());
        // Up to the switchpoint exactly, or short of it: it can follow.
        let at = replication::lsn("0/7000000").unwrap();
        assert_eq!(replica_past_fork(Some(1), at, &up), None);
        assert_eq!(replica_past_fork(None, at - 1, &up), None);
    }

    #[test]
    fn a_replica_already_receiving_the_new_timeline_has_not_diverged() {
        // The race behind an unneeded pg_rewind: the replica switched to the new primary's
        // timeline (through the archive or the stream) before the follow request came.
        let up = up(2, &[(1, "0/7000000")]);
        let past = replication::lsn("0/70000A0").unwrap();
        assert_eq!(replica_past_fork(Some(2), past, &up), None);
    }

    #[test]
    fn an_older_timeline_is_compared_with_where_the_history_left_it() {
        let up = up(3, &[(1, "0/5000000"), (2, "0/9000000")]);
        let on_1 = replication::lsn("0/6000000").unwrap();
        assert!(replica_past_fork(Some(1), on_1, &up).is_some());
        assert_eq!(replica_past_fork(Some(2), on_1, &up), None);
        let why = replica_past_fork(Some(4), on_1, &up).expect("an unknown timeline");
        assert!(why.contains("timeline 4"), "{why}");
    }
}
