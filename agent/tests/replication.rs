//! Replication and planned switchover against real PostgreSQL (15 and the newest), several
//! agents on one machine sharing a file:// store: replicas clone their primary and stream
//! through their own slots; a replica's Postgres killed with -9 comes back streaming; a
//! switchover under a write loop that records every committed id loses none of them, the old
//! primary follows the new one and the archive has no gap across the timeline change; then
//! the shard switches back. A candidate killed midway leaves the old primary serving writes
//! with nothing lost. Bad requests get clear 4xx and change nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgpilot_common::api::{
    DrainRequest, DrainStatus, FollowRequest, StatusResponse, SwitchoverRequest,
};
use pgpilot_common::state::{AgentState, DrainState, Role};
use pgpilot_test_support::agent::{LONG, api_error};
use pgpilot_test_support::agent_bin;
use pgpilot_test_support::cluster::ClusterFixture;
use pgpilot_test_support::postgres::{bin_dir, live_postmaster};
use pgpilot_test_support::store::BackupStore;

const SHARD: &str = "0";

/// A primary `n1` and replicas `n2`, `n3` cloned from it, all running.
async fn shard(major: u32, env: &[(&str, &str)], primary_toml: &str) -> ClusterFixture {
    let mut c = ClusterFixture::new(agent_bin!(), major, BackupStore::file().unwrap());
    // The npm server packages of some majors have no pg_basebackup: those instances clone from
    // the store's newest backup instead (both ways are tested: 15 streams, 18 restores).
    let from_backup = !bin_dir(major).unwrap().join("pg_basebackup").exists();
    let clone = if from_backup {
        "clone_from = \"backup\"\n"
    } else {
        ""
    };
    c.add_instance("n1", None, SHARD, &format!("{primary_toml}{clone}"), env)
        .unwrap();
    c.start_all().await.unwrap();
    let db = c.sql(0).await.unwrap();
    db.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    if from_backup {
        c.agent(0).take_backup().await.unwrap();
    }
    c.add_instance("n2", Some(0), SHARD, clone, env).unwrap();
    c.add_instance("n3", Some(0), SHARD, clone, env).unwrap();
    c.start_all().await.unwrap();
    for i in 1..3 {
        let s = c.client(i).status().await.unwrap();
        assert_eq!(
            s.state,
            AgentState::Running {
                role: Role::Replica
            },
            "{}",
            c.logs(i)
        );
        let op = s.operation.expect("the clone is the last operation");
        assert_eq!(op.kind.to_string(), "clone");
        assert!(
            op.progress.bytes_done > 0 && op.progress.bytes_done == op.progress.bytes_total,
            "{op:?}"
        );
    }
    c
}

/// Waits until `cond` holds for agent `i`'s status.
async fn wait_status(
    c: &mut ClusterFixture,
    i: usize,
    what: &str,
    cond: impl Fn(&StatusResponse) -> bool,
) -> StatusResponse {
    c.agent_mut(i).wait_for(what, LONG, cond).await.unwrap()
}

fn streaming(s: &StatusResponse) -> bool {
    s.state
        == (AgentState::Running {
            role: Role::Replica,
        })
        && s.replication.as_ref().is_some_and(|r| r.streaming)
}

fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// The call was refused with `code` and a message that says `words`.
fn check<T: std::fmt::Debug>(
    r: Result<T, pgpilot_common::client::ClientError>,
    code: u16,
    words: &str,
) {
    let (status, body) = api_error(r.unwrap_err());
    assert_eq!(status, code, "{body:?}");
    assert!(
        body.message.contains(words),
        "{body:?} should say {words:?}"
    );
}

/// Agent `i` counts `n` switchovers that ended with `outcome`.
async fn assert_switchovers(c: &ClusterFixture, i: usize, outcome: &str, n: u32) {
    let metrics = c.agent(i).metrics().await.unwrap();
    let line = format!("pgpilot_switchovers_total{{outcome=\"{outcome}\"}} {n}");
    assert!(metrics.contains(&line), "{metrics}");
}

/// Waits until the primary `i` sees both replicas streaming.
async fn two_streaming(c: &mut ClusterFixture, i: usize) {
    wait_status(c, i, "two streaming replicas", |s| {
        s.replication
            .as_ref()
            .is_some_and(|r| r.replicas.iter().filter(|v| v.state == "streaming").count() == 2)
    })
    .await;
}

/// Waits until every replica has replayed what primary `p` has flushed now.
async fn caught_up(c: &mut ClusterFixture, p: usize) {
    let target = lsn(&c.client(p).status().await.unwrap().flushed_lsn.unwrap());
    for i in 0..c.len() {
        if i == p {
            continue;
        }
        wait_status(c, i, "replay caught up", |s| {
            s.replication
                .as_ref()
                .and_then(|r| r.replay_lsn.as_deref())
                .is_some_and(|r| lsn(r) >= target)
        })
        .await;
    }
}

/// Inserts ids `from..=to` into `t` on agent `i`'s Postgres.
async fn insert(c: &ClusterFixture, i: usize, from: i64, to: i64) {
    c.sql(i)
        .await
        .unwrap()
        .execute(
            "INSERT INTO t SELECT generate_series($1::bigint, $2)",
            &[&from, &to],
        )
        .await
        .unwrap();
}

/// A base backup taken on a replica (Postgres' standby backup, pg_control copied last, the
/// primary asked to close its WAL segment): its backup_label says so, and a new instance
/// restored from it to the end of the backup has exactly the rows committed before it, not
/// those committed after.
async fn a_replica_takes_a_base_backup_that_restores_exactly(major: u32) {
    let mut c = shard(major, &[], "").await;
    insert(&c, 0, 1, 1000).await;
    caught_up(&mut c, 0).await;
    let id = c.agent(1).take_backup().await.unwrap();
    let layout = pgpilot_test_support::store::layout(c.name(), SHARD);
    let store = c.store().open();
    let (label, _) = store
        .get_bytes(&layout.backup_file_key(&id, "backup_label"))
        .await
        .unwrap();
    let label = String::from_utf8_lossy(&label).into_owned();
    assert!(label.contains("BACKUP FROM: standby"), "{label}");
    insert(&c, 0, 1001, 2000).await;

    let opts = pgpilot_test_support::agent::AgentOptions {
        extra_toml: c.store().toml(),
        cluster: Some(c.name().into()),
        shard: Some(SHARD.into()),
        ..Default::default()
    };
    // With its own superuser password: the agent lets itself in during the restore and sets
    // its password on the restored catalog once promoted.
    let mut copy =
        pgpilot_test_support::agent::AgentFixture::prepare(agent_bin!(), major, &opts).unwrap();
    copy.spawn_with_args(&["--bootstrap-from-backup", "--immediate", "--backup", &id])
        .unwrap();
    copy.wait_for("restored from the replica's backup", LONG, |s| {
        s.state
            == AgentState::Running {
                role: Role::Primary,
            }
    })
    .await
    .unwrap();
    let rows: BTreeSet<i64> = copy
        .sql()
        .await
        .unwrap()
        .query("SELECT id FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, (1..=1000).collect::<BTreeSet<i64>>());
}

/// Ids on agent `i`'s Postgres.
async fn ids(c: &ClusterFixture, i: usize) -> BTreeSet<i64> {
    let db = c.sql(i).await.unwrap();
    db.query("SELECT id FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A client that writes ids 1, 2, 3… as fast as it can, finding the primary through the agents'
/// `/primary` and reconnecting after any error; it returns every id whose commit was
/// acknowledged.
fn write_loop(c: &ClusterFixture, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<i64>> {
    let nodes: Vec<(String, u16)> = c
        .agents()
        .iter()
        .map(|a| (a.url("/primary"), a.pg_port))
        .collect();
    let password = c.agent(0).superuser_password().unwrap();
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut committed = Vec::new();
        let mut next = 1i64;
        while !stop.load(Ordering::Relaxed) {
            let mut port = None;
            for (url, pg) in &nodes {
                if let Ok(r) = http.get(url).timeout(Duration::from_secs(1)).send().await
                    && r.status() == 200
                {
                    port = Some(*pg);
                }
            }
            let Some(port) = port else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let mut cfg = tokio_postgres::Config::new();
            cfg.host("127.0.0.1")
                .port(port)
                .user("postgres")
                .password(&password)
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(1));
            let Ok((db, conn)) = cfg.connect(tokio_postgres::NoTls).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                match db.execute("INSERT INTO t VALUES ($1)", &[&next]).await {
                    Ok(_) => committed.push(next),
                    // Unknown outcome or refused: this id is never reused, never counted.
                    Err(_) => {
                        next += 1;
                        break;
                    }
                }
                next += 1;
            }
        }
        committed
    })
}

async fn switchover(c: &mut ClusterFixture, from: usize, to: usize, names: [&str; 3]) {
    let r = c
        .client(from)
        .switchover(&SwitchoverRequest {
            candidate: Some(names[to].into()),
        })
        .await
        .unwrap_or_else(|e| panic!("switchover {from}->{to}: {e}\n{}", c.logs(from)));
    assert_eq!(r.new_primary, names[to]);
    assert_eq!(r.old_primary, names[from]);
    assert!(r.not_followed.is_empty(), "{r:?}");
    assert_eq!(r.followers.len(), 2, "{r:?}");
    wait_status(c, to, "new primary", |s| {
        s.state
            == AgentState::Running {
                role: Role::Primary,
            }
    })
    .await;
    let want = format!("http://{}", c.agent(to).api);
    for i in 0..3 {
        if i != to {
            wait_status(c, i, "streaming from the new primary", |s| {
                streaming(s)
                    && s.replication.as_ref().and_then(|r| r.upstream.as_deref()) == Some(&want)
            })
            .await;
        }
    }
}

/// A switchover from `from` to `to` while [`write_loop`] writes (from `settle_ms` before to
/// `settle_ms` after); returns the acknowledged ids.
async fn switchover_under_writes(
    c: &mut ClusterFixture,
    from: usize,
    to: usize,
    names: [&str; 3],
    settle_ms: u64,
) -> Vec<i64> {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_loop(c, stop.clone());
    tokio::time::sleep(Duration::from_millis(settle_ms)).await;
    switchover(c, from, to, names).await;
    tokio::time::sleep(Duration::from_millis(settle_ms)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap()
}

async fn streams_switches_over_and_back_without_losing_a_commit(major: u32) {
    let mut c = shard(major, &[], "").await;
    let names = ["n1", "n2", "n3"];
    // The primary's view: both replicas stream through their own active slots.
    let s = wait_status(&mut c, 0, "two streaming replicas", |s| {
        s.replication.as_ref().is_some_and(|r| {
            r.replicas.iter().filter(|v| v.state == "streaming").count() == 2
                && r.slots.iter().filter(|s| s.active).count() == 2
        })
    })
    .await;
    let r = s.replication.unwrap();
    let slots: Vec<_> = r.slots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(slots, ["pgpilot_n2", "pgpilot_n3"]);
    assert!(r.replicas.iter().all(|v| v.api_url.is_some()), "{r:?}");
    assert_eq!(c.agent(0).get_status("/primary").await.unwrap(), 200);
    assert_eq!(c.agent(1).get_status("/primary").await.unwrap(), 503);
    // The probe answers from the replica's own view of its stream and lag, looked at every
    // 2 s: 503 until it knows its lag, then 200 (as a load balancer sees it, polling).
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let code = c
            .agent(1)
            .get_status("/replica?lag=16777216")
            .await
            .unwrap();
        if code == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/replica?lag= still answers {code}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // /readyz answers from the same view, refreshed every 2 s: it may still say 503 once.
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let code = c.agent(1).get_status("/readyz").await.unwrap();
        if code == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz still answers {code}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // pgbench on the primary; the replicas replay all of it.
    let mut init = c
        .agent(0)
        .pgbench(&["-i", "-s", "2", "-q", "postgres"])
        .unwrap();
    assert!(init.wait().unwrap().success());
    let mut bench = c
        .agent(0)
        .pgbench(&["-c", "2", "-T", "4", "postgres"])
        .unwrap();
    assert!(bench.wait().unwrap().success());
    caught_up(&mut c, 0).await;
    let sum = "SELECT sum(abalance)::bigint FROM pgbench_accounts";
    let want: i64 = c
        .sql(0)
        .await
        .unwrap()
        .query_one(sum, &[])
        .await
        .unwrap()
        .get(0);
    for (i, name) in names.iter().enumerate().skip(1) {
        let got: i64 = c
            .sql(i)
            .await
            .unwrap()
            .query_one(sum, &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "replica {} replayed pgbench", name);
    }
    let metrics = c.agent(1).metrics().await.unwrap();
    assert!(
        metrics.contains("pgpilot_replication_streaming 1"),
        "{metrics}"
    );

    // kill -9 of a replica's Postgres: the agent restarts it and it streams again.
    let pid = live_postmaster(&c.agent(2).data_dir()).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    wait_status(&mut c, 2, "crash seen", |s| s.crash_restarts == 1).await;
    wait_status(&mut c, 2, "streaming again", streaming).await;

    // A backup before the switchover: its WAL chain must run on across the timeline change.
    let backup = c.agent(0).take_backup().await.unwrap();

    // Switchover under a write loop that records every acknowledged commit.
    let committed = switchover_under_writes(&mut c, 0, 1, names, 500).await;
    assert!(
        committed.len() > 10,
        "the writer wrote {} rows",
        committed.len()
    );
    caught_up(&mut c, 1).await;
    for (i, name) in names.iter().enumerate() {
        let have = ids(&c, i).await;
        let lost: Vec<_> = committed.iter().filter(|id| !have.contains(id)).collect();
        assert!(
            lost.is_empty(),
            "{} lost acknowledged commits {lost:?}",
            name
        );
    }
    let s = c.client(1).status().await.unwrap();
    assert_eq!(s.timeline, Some(2));
    // The new primary archives the new timeline: the chain from the backup reaches it.
    c.agent(1).switch_wal_and_wait_archived(LONG).await.unwrap();
    let out = c
        .agent(1)
        .cli(&[
            "verify",
            "--runtime",
            c.agent(1).runtime_file().to_str().unwrap(),
            &backup,
        ])
        .unwrap();
    assert!(out.success(), "{}", out.text());
    assert!(out.text().contains("through 00000002"), "{}", out.text());
    let list = c.client(1).backups().await.unwrap();
    let w = list.window.unwrap();
    assert_eq!(w.first_gap, None, "{w:?}");
    assert!(w.latest_segment.unwrap().starts_with("00000002"));

    // And back, under writes again.
    let committed = switchover_under_writes(&mut c, 1, 0, names, 300).await;
    caught_up(&mut c, 0).await;
    for (i, name) in names.iter().enumerate() {
        let have = ids(&c, i).await;
        assert!(
            committed.iter().all(|id| have.contains(id)),
            "{} lost commits",
            name
        );
    }
    assert_eq!(c.client(0).status().await.unwrap().timeline, Some(3));
    // Replicas that only ever followed were re-pointed by a reload: nothing to rewind.
    for i in 0..3 {
        assert!(!c.logs(i).contains("rewinding"), "{}", c.logs(i));
    }
    assert_switchovers(&c, 1, "succeeded", 1).await;
}

async fn refusals_change_nothing(major: u32) {
    let mut c = shard(major, &[], "max_lag_bytes = 65536\n").await;
    two_streaming(&mut c, 0).await;
    let to = |n: &str| SwitchoverRequest {
        candidate: Some(n.into()),
    };
    check(
        c.client(0).switchover(&to("nobody")).await,
        404,
        "unknown candidate nobody",
    );
    check(
        c.client(0).switchover(&to("n1")).await,
        400,
        "this primary itself",
    );
    check(c.client(1).switchover(&to("n3")).await, 409, "replica");
    // follow to self, follow on a primary, promote a primary, demote a replica
    let n2 = FollowRequest {
        primary: format!("http://{}", c.agent(1).api),
    };
    check(c.client(1).follow(&n2).await, 400, "does not follow itself");
    check(c.client(0).follow(&n2).await, 409, "demote it first");
    check(c.client(0).promote().await, 409, "already the primary");
    check(c.client(1).demote().await, 409, "replica");
    assert_eq!(
        c.agent(1).get_status("/replica?lag=lots").await.unwrap(),
        400
    );
    assert_eq!(c.agent(1).get_status("/replica?max=1").await.unwrap(), 400);
    // A candidate that lags: n3 stops replaying while the primary writes.
    let n3 = c.sql(2).await.unwrap();
    n3.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    insert(&c, 0, 1, 20000).await;
    wait_status(&mut c, 0, "n3 lagging", |s| {
        s.replication.as_ref().is_some_and(|r| {
            r.replicas
                .iter()
                .any(|v| v.name == "n3" && v.lag_bytes.is_some_and(|l| l > 65536))
        })
    })
    .await;
    check(c.client(0).switchover(&to("n3")).await, 412, "n3 lags");
    n3.batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    // Nothing changed.
    assert_eq!(c.agent(0).get_status("/primary").await.unwrap(), 200);
    for i in 1..3 {
        wait_status(&mut c, i, "still streaming", streaming).await;
    }
}

/// The candidate dies between the stop of writes and its promotion: the old primary is the
/// primary again and every acknowledged commit is there.
async fn a_candidate_killed_midway_leaves_the_old_primary_serving(major: u32) {
    let env = [("PGPILOT_TEST_SWITCHOVER_PAUSE_MS", "2000")];
    let mut c = shard(major, &env, "").await;
    two_streaming(&mut c, 0).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_loop(&c, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = c.client(0);
    let call = tokio::spawn(async move {
        client
            .switchover(&SwitchoverRequest {
                candidate: Some("n2".into()),
            })
            .await
    });
    // Writes are stopped and the switchover waits: the candidate dies now.
    wait_status(&mut c, 0, "switchover paused", |s| {
        s.operation
            .as_ref()
            .is_some_and(|o| o.kind.to_string() == "switchover" && o.step == "stopping writes")
            && s.state == AgentState::Stopped
    })
    .await;
    // A second switchover meanwhile is refused at once.
    let (code, body) = api_error(
        c.client(0)
            .switchover(&SwitchoverRequest::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 409, "{body:?}");
    assert!(body.message.contains("already in progress"), "{body:?}");
    let pm = live_postmaster(&c.agent(1).data_dir()).unwrap();
    c.agent(1).signal_agent(Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(pm), Signal::SIGKILL).unwrap();
    let err = call.await.unwrap().unwrap_err();
    let (code, body) = api_error(err);
    assert_eq!(code, 500, "{body:?}");
    assert!(body.message.contains("failed at step confirm"), "{body:?}");
    assert!(
        body.message.contains("started again as the primary"),
        "{body:?}"
    );
    wait_status(&mut c, 0, "primary again", |s| {
        s.state
            == AgentState::Running {
                role: Role::Primary,
            }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let committed = writer.await.unwrap();
    let have = ids(&c, 0).await;
    assert!(
        committed.iter().all(|id| have.contains(id)),
        "lost commits on n1"
    );
    // Writes resumed after the failed switchover.
    let before = committed.len();
    assert!(before > 0);
    let s = c.client(0).status().await.unwrap();
    assert_eq!(s.timeline, Some(1), "no promotion happened anywhere");
    assert_switchovers(&c, 0, "failed", 1).await;
}

/// A stopped replica's slot keeps the WAL it needs, and it catches up on return; stopped past
/// `slot_grace_secs`, its slot is dropped (metric, registration gone), and on return it
/// registers again and catches up from the archive through restore_command.
async fn a_gone_replica_is_kept_for_the_grace_then_let_go(major: u32) {
    let mut c = shard(major, &[], "slot_grace_secs = 15\n").await;
    let slot_of = |s: &StatusResponse, name: &str| {
        s.replication
            .as_ref()
            .and_then(|r| r.slots.iter().find(|x| x.name == name).cloned())
    };
    // Stopped for a while, within the grace: the slot holds the WAL written meanwhile.
    c.agent(2).signal_agent(Signal::SIGTERM).unwrap();
    c.agent_mut(2).wait_exit(LONG).unwrap();
    insert(&c, 0, 1, 20000).await;
    wait_status(&mut c, 0, "inactive slot retaining WAL", |s| {
        slot_of(s, "pgpilot_n3")
            .is_some_and(|x| !x.active && x.retained_bytes.unwrap_or(0) > 1_000_000)
    })
    .await;
    c.agent_mut(2).spawn().unwrap();
    wait_status(&mut c, 2, "streaming after the restart", streaming).await;
    caught_up(&mut c, 0).await;
    assert_eq!(ids(&c, 2).await.len(), 20000);
    // Stopped past the grace: the slot goes, with a metric.
    c.agent(2).signal_agent(Signal::SIGTERM).unwrap();
    c.agent_mut(2).wait_exit(LONG).unwrap();
    wait_status(&mut c, 0, "slot dropped", |s| {
        s.replication
            .as_ref()
            .is_some_and(|r| !r.slots.iter().any(|x| x.name == "pgpilot_n3"))
    })
    .await;
    // The status can see the slot gone a moment before the counter moves.
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = c.agent(0).metrics().await.unwrap();
        if metrics.contains("pgpilot_replication_slots_dropped_total 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metrics.contains("pgpilot_replication_slots_dropped_total 1"),
        "{metrics}"
    );
    assert!(
        c.logs(0).contains("dropped replication slot"),
        "{}",
        c.logs(0)
    );
    // The WAL it missed is only in the archive now.
    insert(&c, 0, 20001, 40000).await;
    c.agent(0).switch_wal_and_wait_archived(LONG).await.unwrap();
    c.sql(0)
        .await
        .unwrap()
        .batch_execute("CHECKPOINT")
        .await
        .unwrap();
    c.agent_mut(2).spawn().unwrap();
    wait_status(&mut c, 2, "streaming after re-registering", streaming).await;
    wait_status(&mut c, 0, "slot recreated and active", |s| {
        slot_of(s, "pgpilot_n3").is_some_and(|x| x.active)
    })
    .await;
    caught_up(&mut c, 0).await;
    assert_eq!(ids(&c, 2).await.len(), 40000);
}

/// Two writers by operator error: n2 is promoted while n1 still takes writes. n1, demoted and
/// told to follow n2, has diverged: it is rewound (pg_rewind) where the binary exists, and
/// otherwise the follow is refused with a pointer to reinitialize, which clones n2 again. Either
/// way n1 ends as a replica of n2 with exactly n2's rows, and never as a second primary.
async fn a_diverged_former_primary_is_rewound_or_reinitialized(major: u32) {
    let mut c = shard(major, &[], "").await;
    insert(&c, 0, 1, 100).await;
    caught_up(&mut c, 0).await;
    let r = c.client(1).promote().await.unwrap();
    assert_eq!(
        r.state,
        AgentState::Running {
            role: Role::Primary
        }
    );
    assert_eq!(r.timeline, Some(2));
    // Both write: n1's rows after the fork exist nowhere else.
    insert(&c, 0, 101, 5000).await;
    insert(&c, 1, 10001, 10100).await;
    let r = c.client(0).demote().await.unwrap();
    assert!(r.checkpoint_lsn.is_some());
    wait_status(&mut c, 0, "standby", |s| {
        s.state
            == AgentState::Running {
                role: Role::Replica,
            }
    })
    .await;
    assert_eq!(c.agent(0).get_status("/primary").await.unwrap(), 503);
    let n2_url = format!("http://{}", c.agent(1).api);
    let follow = FollowRequest {
        primary: n2_url.clone(),
    };
    let rewind = bin_dir(major).unwrap().join("pg_rewind").exists();
    match c.client(0).follow(&follow).await {
        Ok(_) => assert!(rewind, "followed without the rewind it needs"),
        Err(e) => {
            assert!(!rewind, "{e}\n{}", c.logs(0));
            let (code, body) = api_error(e);
            assert_eq!(code, 422, "{body:?}");
            assert!(
                body.message.contains("past") && body.message.contains("reinitialize"),
                "{body:?}"
            );
            // Refused: still a standby, not a writer.
            assert_eq!(c.agent(0).get_status("/primary").await.unwrap(), 503);
            // Through the CLI, which follows the clone's progress.
            let out = c
                .agent(0)
                .cli(&["reinitialize", "--primary", &n2_url])
                .unwrap();
            assert!(out.success(), "{}\n{}", out.text(), c.logs(0));
            assert!(
                out.stdout.contains(&format!("following {n2_url}")),
                "{}",
                out.text()
            );
        }
    }
    wait_status(&mut c, 0, "streaming from n2", |s| {
        streaming(s) && s.replication.as_ref().and_then(|r| r.upstream.as_deref()) == Some(&n2_url)
    })
    .await;
    caught_up(&mut c, 1).await;
    let (on1, on2) = (ids(&c, 0).await, ids(&c, 1).await);
    assert_eq!(on1, on2, "n1 holds exactly n2's rows");
    assert!(!on1.contains(&101) && on1.contains(&10001));
}

/// Waits until agent `i`'s drain reaches `state` (or fails: then the test fails with its
/// message) and returns it.
async fn drain_reaches(
    c: &ClusterFixture,
    i: usize,
    want: impl Fn(&DrainStatus) -> bool,
) -> DrainStatus {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let st = c.client(i).drain_status().await.unwrap();
        if want(&st) {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "drain of agent {i} stuck at {st:?}\n{}",
            c.logs(i)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Files of the store whose name starts with `prefix`.
fn stored(c: &ClusterFixture, prefix: &str) -> Vec<String> {
    fn walk(dir: &std::path::Path, prefix: &str, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, prefix, out);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str())
                && n.starts_with(prefix)
            {
                out.push(n.to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(c.store().root(), prefix, &mut out);
    out
}

/// The preStop path on a primary: `pgpilot-agent drain --wait` under a write loop. The best
/// replica takes over, the drained instance stops with every acknowledged commit on the new
/// primary, and the WAL chain from a backup taken before runs on across the handover.
async fn draining_the_primary_hands_over_and_loses_nothing(major: u32) {
    let mut c = shard(major, &[], "").await;
    two_streaming(&mut c, 0).await;
    let backup = c.agent(0).take_backup().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_loop(&c, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = c
        .agent(0)
        .cli(&["drain", "--wait", "--timeout", "120"])
        .unwrap();
    assert!(out.success(), "{}\n{}", out.text(), c.logs(0));
    assert!(out.stdout.contains("drained:"), "{}", out.text());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let committed = writer.await.unwrap();
    assert!(committed.len() > 10, "the writer wrote {}", committed.len());

    let st = c.client(0).drain_status().await.unwrap();
    assert_eq!(st.state, DrainState::Drained, "{st:?}");
    assert_eq!(st.requested_by.as_deref(), Some("api"));
    let new = st.new_primary.clone().expect("a replica took over");
    let p = if new == "n2" { 1 } else { 2 };
    assert!(st.message.contains(&format!("{new} took over")), "{st:?}");
    assert_eq!(
        c.client(0).status().await.unwrap().state,
        AgentState::Stopped
    );
    let out = c.agent(0).cli(&["status"]).unwrap();
    assert!(
        out.stdout
            .contains("drain:     Drained (finished): drained:"),
        "{}",
        out.text()
    );
    wait_status(&mut c, p, "the new primary", |s| {
        s.state
            == AgentState::Running {
                role: Role::Primary,
            }
    })
    .await;
    let have = ids(&c, p).await;
    let lost: Vec<_> = committed.iter().filter(|id| !have.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged commits lost: {lost:?}");
    // The other replica follows the new primary.
    let other = 3 - p;
    let want = format!("http://{}", c.agent(p).api);
    wait_status(&mut c, other, "streaming from the new primary", |s| {
        streaming(s) && s.replication.as_ref().and_then(|r| r.upstream.as_deref()) == Some(&want)
    })
    .await;
    // Nothing of the old primary's WAL is missing from the archive: the chain from the backup
    // runs through the handover onto the new timeline.
    c.agent(p).switch_wal_and_wait_archived(LONG).await.unwrap();
    let out = c
        .agent(p)
        .cli(&[
            "verify",
            "--runtime",
            c.agent(p).runtime_file().to_str().unwrap(),
            &backup,
        ])
        .unwrap();
    assert!(out.success(), "{}", out.text());
    assert!(out.text().contains("through 00000002"), "{}", out.text());
    // Drained: a second drain joins it (200), nothing else is taken.
    let again = c.client(0).drain(&DrainRequest::default()).await.unwrap();
    assert_eq!(again.state, DrainState::Drained);
    check(c.client(0).cancel_drain().await, 409, "has finished");
    check(c.client(0).start().await, 409, "drained");
    let m = c.agent(0).metrics().await.unwrap();
    for line in [
        "pgpilot_drain_state{state=\"Drained\"} 1",
        "pgpilot_drains_total{outcome=\"finished\"} 1",
    ] {
        assert!(m.contains(line), "{line}\n{m}");
    }
}

/// A replica drains (and is then no switchover candidate); a primary without a healthy replica
/// waits, can be cancelled, fails at its timeout still serving, and with `force` stops after
/// archiving its last segment as `.partial`. Bad bodies get 400.
async fn drains_that_cannot_hand_over_wait_fail_or_force(major: u32) {
    let mut c = shard(major, &[], "").await;
    two_streaming(&mut c, 0).await;
    let raw = reqwest::Client::new()
        .post(c.agent(0).url("/v1/drain"))
        .bearer_auth(c.agent(0).token.clone())
        .body(r#"{"forse": true}"#)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    assert!(raw.text().await.unwrap().contains("forse"));
    let zero = DrainRequest {
        force: false,
        timeout_secs: Some(0),
    };
    check(c.client(0).drain(&zero).await, 400, "timeout_secs");
    check(
        c.client(1).cancel_drain().await,
        409,
        "no drain is in progress",
    );

    // A replica: stops, and is no candidate any more.
    let st = c.client(2).drain(&DrainRequest::default()).await.unwrap();
    assert_eq!(st.state, DrainState::Draining);
    drain_reaches(&c, 2, |s| s.state == DrainState::Drained).await;
    assert_eq!(
        c.client(2).status().await.unwrap().state,
        AgentState::Stopped
    );
    check(c.client(2).promote().await, 409, "drained");
    let to_n3 = SwitchoverRequest {
        candidate: Some("n3".into()),
    };
    // n3's Postgres is gone from pg_stat_replication once it stopped.
    check(c.client(0).switchover(&to_n3).await, 412, "n3");

    // No healthy replica left: n2's Postgres stops.
    c.client(1)
        .stop(&pgpilot_common::api::ShutdownRequest::default())
        .await
        .unwrap();
    let long = DrainRequest {
        force: false,
        timeout_secs: Some(60),
    };
    c.client(0).drain(&long).await.unwrap();
    let st = drain_reaches(&c, 0, |s| s.message.contains("waiting for a replica")).await;
    assert_eq!(st.state, DrainState::Draining);
    check(
        c.client(0)
            .start_backup(&pgpilot_common::api::BackupRequest::default())
            .await,
        409,
        "draining",
    );
    let st = c.client(0).cancel_drain().await.unwrap();
    assert_eq!(
        (st.state, st.step.as_deref()),
        (DrainState::Running, Some("cancelled"))
    );
    insert(&c, 0, 1, 10).await;

    // Times out: fails with why, still the primary.
    let short = DrainRequest {
        force: false,
        timeout_secs: Some(2),
    };
    c.client(0).drain(&short).await.unwrap();
    let st = drain_reaches(&c, 0, |s| s.step.as_deref() == Some("failed")).await;
    assert_eq!(st.state, DrainState::Running);
    let err = st.error.unwrap();
    assert!(
        err.contains("no replica took over within 2 s") && err.contains("stays the primary"),
        "{err}"
    );
    insert(&c, 0, 11, 20).await;

    // Force: the only writer stops after archiving its last segment as .partial.
    let forced = DrainRequest {
        force: true,
        timeout_secs: Some(2),
    };
    c.client(0).drain(&forced).await.unwrap();
    let st = drain_reaches(&c, 0, |s| s.state != DrainState::Draining).await;
    assert_eq!(st.state, DrainState::Drained, "{st:?}\n{}", c.logs(0));
    let partial = st.last_archived.clone().unwrap();
    assert!(partial.ends_with(".partial"), "{st:?}");
    assert!(st.message.contains("with force"), "{st:?}");
    assert!(
        !stored(&c, &partial).is_empty(),
        "{partial} is not in the store"
    );
    assert_eq!(
        c.client(0).status().await.unwrap().state,
        AgentState::Stopped
    );
    let m = c.agent(0).metrics().await.unwrap();
    for line in [
        "pgpilot_drains_total{outcome=\"cancelled\"} 1",
        "pgpilot_drains_total{outcome=\"failed\"} 1",
        "pgpilot_drains_total{outcome=\"finished\"} 1",
    ] {
        assert!(m.contains(line), "{line}\n{m}");
    }
}

pgpilot_test_support::per_major!(
    a_replica_takes_a_base_backup_that_restores_exactly,
    draining_the_primary_hands_over_and_loses_nothing,
    drains_that_cannot_hand_over_wait_fail_or_force,
    a_diverged_former_primary_is_rewound_or_reinitialized,
    a_gone_replica_is_kept_for_the_grace_then_let_go,
    streams_switches_over_and_back_without_losing_a_commit,
    refusals_change_nothing,
    a_candidate_killed_midway_leaves_the_old_primary_serving,
);
