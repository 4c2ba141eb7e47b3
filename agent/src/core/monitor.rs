//! One long-lived monitoring connection to the local Postgres, shared by the executor's ticks
//! (role, replay position) and `/v1/status`. It is opened on first use and reopened after it
//! breaks (a restart, a crash); it is never one new connection per tick.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::config::Config;
use crate::postgres::sql;
use crate::secrets::Secret;

pub struct Monitor {
    cfg: Config,
    password: Secret,
    client: Mutex<Option<Arc<Client>>>,
}

/// Why the monitor could not answer.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot connect to Postgres: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("query failed: {0}")]
    Query(#[source] tokio_postgres::Error),
}

impl MonitorError {
    /// Postgres answers but refuses the superuser password: waiting will not help.
    pub fn is_wrong_password(&self) -> bool {
        match self {
            MonitorError::Connect(e) => {
                e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
            }
            MonitorError::Query(_) => false,
        }
    }
}

/// What one look at Postgres shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub in_recovery: bool,
    pub replayed_lsn: Option<String>,
}

impl Monitor {
    pub fn new(cfg: &Config, password: &Secret) -> Monitor {
        Monitor {
            cfg: cfg.clone(),
            password: password.clone(),
            client: Mutex::new(None),
        }
    }

    /// The connection, opened if it is not open (or broke).
    pub async fn client(&self) -> Result<Arc<Client>, MonitorError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        *guard = None;
        let c = Arc::new(
            sql::connect(&self.cfg, self.password.expose(), Duration::from_secs(2))
                .await
                .map_err(MonitorError::Connect)?,
        );
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection (Postgres stopped): the next use opens a new one.
    pub async fn reset(&self) {
        *self.client.lock().await = None;
    }

    /// Role and replay position, in one round trip.
    pub async fn observe(&self) -> Result<Observation, MonitorError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text",
                &[],
            )
            .await
            .map_err(MonitorError::Query)?;
        Ok(Observation {
            in_recovery: row.get(0),
            replayed_lsn: row.get(1),
        })
    }

    /// What `/v1/status` reports of Postgres.
    pub async fn status(&self) -> Result<sql::PgStatus, MonitorError> {
        let client = self.client().await?;
        sql::status(&client).await.map_err(MonitorError::Query)
    }
}
