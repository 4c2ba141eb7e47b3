//! The SQL of replication, on the agent's monitoring connection.

use pgpilot_common::api::{ReplicaView, SlotView};
use tokio_postgres::Client;

/// A managed slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
    pub active: bool,
    pub retained_bytes: Option<u64>,
}

/// Creates the physical slot `name` reserving WAL from now, unless it exists. Returns whether
/// it was created.
pub async fn ensure_slot(client: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT pg_create_physical_replication_slot($1, true) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&name],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// The slots the agent manages (`pgpilot_*`), with the WAL each retains.
pub async fn slots(client: &Client) -> Result<Vec<Slot>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT slot_name::text, active, \
                    CASE WHEN restart_lsn IS NULL THEN NULL ELSE pg_wal_lsn_diff( \
                        CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                             ELSE pg_current_wal_lsn() END, restart_lsn)::bigint END \
             FROM pg_replication_slots \
             WHERE slot_type = 'physical' AND slot_name LIKE 'pgpilot\\_%' ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Slot {
            name: r.get(0),
            active: r.get(1),
            retained_bytes: r.get::<_, Option<i64>>(2).map(|b| b.max(0) as u64),
        })
        .collect())
}

/// Drops a slot; `false` when it is gone already or in use again.
pub async fn drop_slot(client: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active",
            &[&name],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// Client connections by state, and `max_connections`.
pub async fn connections(
    client: &Client,
) -> Result<(Vec<(String, i64)>, i64), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT coalesce(state, 'unknown'), count(*) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' GROUP BY 1",
            &[],
        )
        .await?;
    let max: i64 = client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'max_connections'",
            &[],
        )
        .await?
        .get(0);
    Ok((rows.iter().map(|r| (r.get(0), r.get(1))).collect(), max))
}

/// The primary's view of its replicas (`pg_stat_replication`).
pub async fn replicas(client: &Client) -> Result<Vec<ReplicaView>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT application_name, state, client_addr::text, sent_lsn::text, flush_lsn::text, \
                    replay_lsn::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint \
             FROM pg_stat_replication WHERE application_name <> '' ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ReplicaView {
            name: r.get(0),
            state: r.get::<_, Option<String>>(1).unwrap_or_default(),
            client_addr: r.get(2),
            sent_lsn: r.get(3),
            flush_lsn: r.get(4),
            replay_lsn: r.get(5),
            lag_bytes: r.get::<_, Option<i64>>(6).map(|b| b.max(0) as u64),
            api_url: None,
        })
        .collect())
}

/// A replica's own view of its streaming.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiverStatus {
    pub streaming: bool,
    pub receive_lsn: Option<String>,
    pub replay_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    /// The timeline of the WAL the receiver last got, while a WAL receiver runs.
    pub received_tli: Option<u32>,
}

pub async fn receiver(client: &Client) -> Result<ReceiverStatus, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false), \
                    pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
                    pg_wal_lsn_diff(greatest((SELECT latest_end_lsn FROM pg_stat_wal_receiver), \
                                             pg_last_wal_receive_lsn()), \
                                    pg_last_wal_replay_lsn())::bigint, \
                    CASE WHEN pg_last_wal_receive_lsn() IS NULL \
                              OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0::float8 \
                         ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END, \
                    (SELECT received_tli FROM pg_stat_wal_receiver)::int8",
            &[],
        )
        .await?;
    Ok(ReceiverStatus {
        streaming: row.get(0),
        receive_lsn: row.get(1),
        replay_lsn: row.get(2),
        lag_bytes: row.get::<_, Option<i64>>(3).map(|b| b.max(0) as u64),
        lag_seconds: row.get::<_, Option<f64>>(4).map(|s| s.max(0.0)),
        received_tli: row
            .get::<_, Option<i64>>(5)
            .and_then(|t| u32::try_from(t).ok()),
    })
}

/// The database system identifier (the same on a primary and every replica cloned from it).
pub async fn system_identifier(client: &Client) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Promotes this standby and waits (up to `wait_secs`) until it accepts writes.
pub async fn promote(client: &Client, wait_secs: i32) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT pg_promote(true, $1)", &[&wait_secs])
        .await?;
    Ok(row.get(0))
}

impl From<&Slot> for SlotView {
    fn from(s: &Slot) -> SlotView {
        SlotView {
            name: s.name.clone(),
            active: s.active,
            retained_bytes: s.retained_bytes,
        }
    }
}

/// Sets (`Some`, a `synchronous_standby_names` value) or resets (`None`) the synchronous
/// standby with `ALTER SYSTEM`, then reloads. Two statements: ALTER SYSTEM refuses to run
/// inside the transaction a multi-statement query opens. Works on a standby too.
pub async fn set_synchronous_standby(client: &Client, value: Option<&str>) -> Result<(), String> {
    let alter = match value {
        Some(v) => format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{}'",
            v.replace('\'', "''")
        ),
        None => "ALTER SYSTEM RESET synchronous_standby_names".to_string(),
    };
    for sql in [alter.as_str(), "SELECT pg_reload_conf()"] {
        client.batch_execute(sql).await.map_err(|e| {
            e.as_db_error()
                .map_or(e.to_string(), |d| d.message().to_string())
        })?;
    }
    Ok(())
}
