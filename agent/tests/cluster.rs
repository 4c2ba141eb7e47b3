//! The multi-agent fixture the replication tests build on: three agents on one machine, each
//! with its own ports, data dir and Postgres, all archiving into one S3 store, each under its
//! own shard's prefix; and a test that panics with a cluster up leaves no process or dir behind.

use std::collections::BTreeSet;

use pgpilot_common::state::{AgentState, Role};
use pgpilot_test_support::agent::LONG;
use pgpilot_test_support::agent_bin;
use pgpilot_test_support::cluster::ClusterFixture;
use pgpilot_test_support::postgres::{live_postmaster, pid_alive};
use pgpilot_test_support::store::BackupStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_share_one_store_each_in_its_own_shard() {
    let store = BackupStore::s3().unwrap();
    let cluster = ClusterFixture::start(agent_bin!(), 15, store, 3)
        .await
        .unwrap();
    assert_eq!(cluster.len(), 3);

    // Each is its own running primary on its own ports and data dir.
    let mut ports = BTreeSet::new();
    let mut data_dirs = BTreeSet::new();
    for (i, fx) in cluster.agents().iter().enumerate() {
        let status = cluster.client(i).status().await.unwrap();
        assert_eq!(
            status.state,
            AgentState::Running {
                role: Role::Primary
            },
            "agent {i}"
        );
        assert_eq!(status.data_dir, fx.data_dir().display().to_string());
        for port in [fx.pg_port, fx.api.port(), fx.loopback.port()] {
            assert!(ports.insert(port), "port {port} used twice");
        }
        assert!(data_dirs.insert(fx.data_dir()));
        cluster
            .sql(i)
            .await
            .unwrap()
            .batch_execute(&format!("CREATE TABLE shard_{i} AS SELECT {i} AS shard"))
            .await
            .unwrap();
    }
    // Their databases are separate: agent 1 has its table and not agent 0's.
    let tables: Vec<String> = cluster
        .sql(1)
        .await
        .unwrap()
        .query(
            "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'shard_%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, ["shard_1"]);

    // Each archives a segment under `<cluster>/<shard>/wal/`, and nothing lands elsewhere.
    let mut archived = Vec::new();
    for fx in cluster.agents() {
        archived.push(fx.switch_wal_and_wait_archived(LONG).await.unwrap());
    }
    let keys = cluster.store().keys_under("").await;
    for (i, fx) in cluster.agents().iter().enumerate() {
        let layout = fx.layout();
        assert!(
            layout.wal_prefix() == format!("{}/{i}/wal/", cluster.name()),
            "{layout:?}"
        );
        let key = layout.wal_key(&archived[i]);
        assert!(keys.contains(&key), "agent {i}: {key} not in {keys:?}");
        assert!(
            !cluster.logs(i).is_empty(),
            "agent {i} has a log at {}",
            fx.log_path.display()
        );
    }
    // Each shard is its own database system: its archive records its own owner.
    for i in 0..3 {
        let owner = cluster.agent(i).layout().identity_key();
        assert!(keys.contains(&owner), "shard {i}: {owner} not in {keys:?}");
    }
    let outside: Vec<&String> = keys
        .iter()
        .filter(|k| !(0..3).any(|i| k.starts_with(&format!("{}/{i}/", cluster.name()))))
        .collect();
    assert!(
        outside.is_empty(),
        "objects outside the shard prefixes: {outside:?}"
    );
}

/// A test that panics with a cluster up leaves nothing behind: every agent and postmaster is
/// gone and every temp dir removed once the panic has unwound through the fixture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_test_leaves_no_agent_or_postmaster_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let test = tokio::spawn(async move {
        let cluster = ClusterFixture::start(agent_bin!(), 15, BackupStore::file().unwrap(), 2)
            .await
            .unwrap();
        for fx in cluster.agents() {
            let postmaster = live_postmaster(&fx.data_dir()).expect("a running postmaster");
            tx.send((
                fx.agent_pid().unwrap(),
                postmaster,
                fx.dir.path().to_path_buf(),
            ))
            .unwrap();
        }
        panic!("a failing assertion with the cluster up");
    });
    assert!(test.await.unwrap_err().is_panic());
    let left: Vec<_> = rx.try_iter().collect();
    assert_eq!(left.len(), 2);
    for (agent, postmaster, dir) in left {
        assert!(!pid_alive(agent), "agent {agent} still running");
        assert!(
            !pid_alive(postmaster),
            "postmaster {postmaster} still running"
        );
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
