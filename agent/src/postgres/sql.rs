//! SQL the agent runs against its own Postgres, over the Unix socket as the superuser. SQL
//! text lives in `sql/*.sql` files where it is more than a line.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::config::Config;

/// Connects to the local Postgres over its Unix socket.
pub async fn connect(
    cfg: &Config,
    password: &str,
    timeout: Duration,
) -> Result<Client, tokio_postgres::Error> {
    let mut pg = tokio_postgres::Config::new();
    pg.host_path(cfg.socket_dir())
        .port(cfg.postgres_port)
        .user(&cfg.superuser)
        .password(password)
        .dbname("postgres")
        .application_name("pgpilot-agent")
        .connect_timeout(timeout);
    let (client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("agent SQL connection ended: {e}");
        }
    });
    Ok(client)
}

/// What `/v1/status` reads from Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgStatus {
    pub in_recovery: bool,
    pub server_version: String,
    pub current_lsn: Option<String>,
    pub flushed_lsn: Option<String>,
    pub timeline: Option<u32>,
}

pub async fn status(client: &Client) -> Result<PgStatus, tokio_postgres::Error> {
    let row = client
        .query_one(include_str!("sql/status.sql"), &[])
        .await?;
    Ok(PgStatus {
        in_recovery: row.get("in_recovery"),
        server_version: row.get("server_version"),
        current_lsn: row.get("current_lsn"),
        flushed_lsn: row.get("flushed_lsn"),
        timeline: row.get::<_, Option<i32>>("timeline").map(|t| t as u32),
    })
}

/// Creates the replication role, or brings its password and attributes in line. The password
/// travels as a SCRAM verifier computed here, so the plaintext never reaches the server (nor
/// its statement log).
pub async fn ensure_replication_role(
    client: &Client,
    role: &str,
    password: &str,
) -> Result<(), tokio_postgres::Error> {
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await?
        .is_some();
    // Role names are validated identifiers (config); the verifier has no quote characters.
    let verb = if exists { "ALTER" } else { "CREATE" };
    client
        .batch_execute(&format!(
            "{verb} ROLE {role} WITH LOGIN REPLICATION PASSWORD '{verifier}'"
        ))
        .await
}

/// Sets `role`'s password (a SCRAM verifier: the password itself never reaches Postgres' logs).
pub async fn set_password(
    client: &Client,
    role: &str,
    password: &str,
) -> Result<(), tokio_postgres::Error> {
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    // Role names are validated identifiers (config); the verifier has no quote characters.
    client
        .batch_execute(&format!("ALTER ROLE {role} PASSWORD '{verifier}'"))
        .await
}

/// Parameters Postgres says need a restart to take effect.
pub async fn pending_restart(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
