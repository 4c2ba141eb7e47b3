//! The executor owns every long operation (real PostgreSQL 15, file:// store):
//! - a base backup in flight refuses a stop, a restart and a forced restore with 409 naming it,
//!   and still completes; `cancel_backup` cancels it explicitly (it ends as failed, with no
//!   manifest) and the stop goes through;
//! - during a restore's replay the agent is `Recovering`: `/replica` and `/primary` answer 503
//!   (it is not a streaming replica), and `operation` shows the restore replaying; after
//!   promotion it is `Running(Primary)`; a second restore and a drain meanwhile get 409.

use std::time::{Duration, Instant};

use pgpilot_agent::archive::backup::FILE_DELAY_ENV;
use pgpilot_agent::http::routes::wal::FETCH_DELAY_ENV;
use pgpilot_common::api::{
    BackupRequest, BackupState, ErrorBody, RestoreRequest, RestoreTarget, ShutdownMode,
    ShutdownRequest,
};
use pgpilot_common::state::{AgentState, OperationKind, Outcome, Role};
use pgpilot_test_support::agent::{AgentFixture, AgentOptions, LONG, api_error};
use pgpilot_test_support::agent_bin;
use pgpilot_test_support::store::BackupStore;

/// An agent on PostgreSQL 15 with a file:// store and one test environment variable.
async fn agent_with_store(var: &str, value: &str) -> (AgentFixture, BackupStore) {
    let store = BackupStore::file().unwrap();
    let fx = AgentFixture::start_with(
        agent_bin!(),
        15,
        AgentOptions::toml(store.toml()).env(var, value),
    )
    .await
    .unwrap();
    (fx, store)
}

fn stop(cancel_backup: bool) -> ShutdownRequest {
    ShutdownRequest {
        mode: ShutdownMode::Fast,
        cancel_backup,
    }
}

fn restore_latest(cancel_backup: bool) -> RestoreRequest {
    RestoreRequest {
        target: RestoreTarget::Latest,
        backup_id: None,
        inclusive: None,
        timeline: None,
        force: true,
        cancel_backup,
    }
}

/// Starts a backup and waits until it is uploading files.
async fn backup_uploading(fx: &AgentFixture) -> String {
    let client = fx.client();
    let id = client
        .start_backup(&BackupRequest::default())
        .await
        .unwrap()
        .id;
    let deadline = Instant::now() + LONG;
    loop {
        let p = client.backup(&id).await.unwrap();
        assert_eq!(p.state, BackupState::Running, "{p:?}\n{}", fx.logs());
        if p.files_done >= 5 {
            return id;
        }
        assert!(Instant::now() < deadline, "backup {id} not uploading");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_backup_end(fx: &AgentFixture, id: &str) -> BackupState {
    fx.wait_backup(id).await.unwrap().state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_in_flight_is_never_killed_silently() {
    // ~1000 files, a few at a time: a backup takes seconds.
    let (fx, _store) = agent_with_store(FILE_DELAY_ENV, "20").await;
    let client = fx.client();
    let id = backup_uploading(&fx).await;

    // The operation is visible in /v1/status, in the common shape.
    let op = client.status().await.unwrap().operation.expect("operation");
    assert_eq!(
        (op.kind, op.id.as_str(), op.outcome),
        (OperationKind::Backup, id.as_str(), Outcome::Running)
    );
    assert!(
        op.progress.files_done >= 5 && op.progress.files_total > 0,
        "{op:?}"
    );

    // Stop, restart and a forced restore would end the backup: refused, naming it.
    for (what, err) in [
        ("stop", client.stop(&stop(false)).await.unwrap_err()),
        ("restart", client.restart(&stop(false)).await.unwrap_err()),
        (
            "restore",
            client.restore(&restore_latest(false)).await.unwrap_err(),
        ),
    ] {
        let (code, body) = api_error(err);
        assert_eq!(code, 409, "{what}: {body:?}");
        assert!(body.message.contains(&id), "{what}: {body:?}");
        assert_eq!(
            body.state,
            Some(AgentState::Running {
                role: Role::Primary
            }),
            "{what}"
        );
    }
    // ... and the backup still completes, Postgres untouched.
    assert_eq!(wait_backup_end(&fx, &id).await, BackupState::Completed);
    let st = client.status().await.unwrap();
    assert_eq!(st.role, Some(Role::Primary));
    let op = st.operation.expect("last operation");
    assert_eq!(
        (op.id.as_str(), op.outcome),
        (id.as_str(), Outcome::Succeeded)
    );

    // With cancel_backup the stop cancels the backup explicitly.
    let second = backup_uploading(&fx).await;
    let stopped = client.stop(&stop(true)).await.unwrap();
    assert_eq!(stopped.state, AgentState::Stopped);
    let p = client.backup(&second).await.unwrap();
    assert_eq!(p.state, BackupState::Failed, "{p:?}");
    assert!(
        p.reason.as_deref().unwrap_or("").contains("cancelled"),
        "{p:?}"
    );
    let listed = client.backups().await.unwrap();
    let b = listed
        .backups
        .iter()
        .find(|b| b.id == second)
        .expect("listed");
    assert_ne!(b.state, BackupState::Completed, "{b:?}");
    assert!(
        fx.logs().contains("cancelling the base backup"),
        "{}",
        fx.logs()
    );
    client.start().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_replay_is_recovering_not_a_replica() {
    // Each WAL fetch waits: the replay of a few segments takes seconds.
    let (mut fx, _store) = agent_with_store(FETCH_DELAY_ENV, "700").await;
    let client = fx.client();
    let id = fx.take_backup().await.unwrap();
    let sql = fx.sql().await.unwrap();
    sql.batch_execute("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    for _ in 0..3 {
        fx.switch_wal_and_wait_archived(LONG).await.unwrap();
    }
    drop(sql);

    let accepted = client.restore(&restore_latest(false)).await.unwrap();
    assert_eq!(accepted.backup_id, id);
    let st = fx
        .wait_for("Recovering", LONG, |s| s.state == AgentState::Recovering)
        .await
        .unwrap();
    assert_eq!(st.role, None);
    let op = st.operation.expect("operation");
    assert_eq!(
        (op.kind, op.step.as_str(), op.outcome),
        (OperationKind::Restore, "replaying", Outcome::Running)
    );
    let http = reqwest::Client::new();
    for path in ["/replica", "/primary"] {
        let r = http.get(fx.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 503, "{path} during a restore's replay");
        let body: ErrorBody = r.json().await.unwrap();
        assert_eq!(body.state, Some(AgentState::Recovering), "{path}");
    }
    // A second restore while this one replays is refused, naming it.
    let (code, body) = api_error(client.restore(&restore_latest(false)).await.unwrap_err());
    assert_eq!(code, 409);
    assert!(body.message.contains(&id), "{body:?}");
    // So is a drain (docs/drain.md): nothing to hand over or stop mid-restore.
    let drain = pgpilot_common::api::DrainRequest::default();
    let (code, body) = api_error(client.drain(&drain).await.unwrap_err());
    assert_eq!(code, 409, "{body:?}");
    assert!(
        body.message.contains(&id) && body.message.contains("drain once it is done"),
        "{body:?}"
    );
    assert_eq!(
        client.drain_status().await.unwrap().state,
        pgpilot_common::state::DrainState::Running
    );

    fx.wait_for("Running(Primary) after the restore", LONG, |s| {
        s.state
            == AgentState::Running {
                role: Role::Primary,
            }
    })
    .await
    .unwrap();
    let r = http.get(fx.url("/primary")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let st = client.status().await.unwrap();
    let op = st.operation.expect("last operation");
    assert_eq!(
        (op.kind, op.outcome),
        (OperationKind::Restore, Outcome::Succeeded)
    );
    let count: i64 = fx
        .sql()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1000, "every archived row is back");
}
