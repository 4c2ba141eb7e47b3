//! WAL archiving against real PostgreSQL and real stores (file:// and s3s-fs): every segment
//! reaches the archive under load, nothing is lost when the agent is killed or the store goes
//! away for a while, retries of identical content succeed and different content is refused,
//! and wal-fetch restores what was archived.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pgpilot_agent::store::Store;
use pgpilot_common::api::{ErrorBody, WalFetchRequest, WalPushRequest};
use pgpilot_common::client::ClientError;
use pgpilot_common::wal::{DEFAULT_SEGMENT_SIZE, WalFile};
use pgpilot_test_support::agent::{AgentFixture, AgentOptions, LONG};
use pgpilot_test_support::agent_bin;
use pgpilot_test_support::data::{random_segment, random_segment_named};
use pgpilot_test_support::s3::S3Server;
use pgpilot_test_support::store::{BackupStore, default_layout as layout, open as open_store};

/// An agent on `major` archiving into `store`.
async fn agent(major: u32, store: &BackupStore) -> AgentFixture {
    AgentFixture::start_with(agent_bin!(), major, AgentOptions::toml(store.toml()))
        .await
        .unwrap()
}

async fn one(sql: &tokio_postgres::Client, q: &str) -> String {
    sql.query_one(q, &[]).await.unwrap().get(0)
}

async fn switch_and_wait_archived(fx: &AgentFixture) -> String {
    fx.switch_wal_and_wait_archived(LONG).await.unwrap()
}

/// Asserts every segment of timeline 1 from the first through `last` is in the archive and
/// reads back intact (every chunk, length and SHA-256 checked).
async fn assert_chain_complete(store: &Store, last: &str) {
    let names: std::collections::BTreeSet<String> = store
        .list(&layout().wal_prefix())
        .await
        .unwrap()
        .into_iter()
        .filter_map(|o| layout().wal_name(&o.key).map(str::to_string))
        .collect();
    let last_seg = WalFile::parse(last, DEFAULT_SEGMENT_SIZE)
        .unwrap()
        .segment()
        .unwrap();
    let mut seg = WalFile::parse("000000010000000000000001", DEFAULT_SEGMENT_SIZE)
        .unwrap()
        .segment()
        .unwrap();
    let mut count = 0;
    while seg <= last_seg {
        let name = seg.name(DEFAULT_SEGMENT_SIZE);
        assert!(
            names.contains(&name),
            "{name} is missing from the archive (have {names:?})"
        );
        let summary = store.verify(&layout().wal_key(&name)).await.unwrap();
        assert_eq!(summary.plaintext_len, DEFAULT_SEGMENT_SIZE, "{name}");
        seg = seg.next();
        count += 1;
    }
    assert!(count >= 2, "expected some WAL, got {count} segments");
}

pgpilot_test_support::per_major!(every_segment_reaches_a_file_archive_under_pgbench);

async fn every_segment_reaches_a_file_archive_under_pgbench(major: u32) {
    archive_under_pgbench(major, &BackupStore::file().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_segment_reaches_an_s3_archive_under_pgbench() {
    archive_under_pgbench(15, &BackupStore::s3().unwrap()).await;
}

/// `pgbench -i -s scale`, then `secs` seconds of 4 clients; both must succeed.
fn pgbench_init_and_run(fx: &AgentFixture, scale: &str, secs: &str) {
    for args in [
        &["-i", "-s", scale, "-q"][..],
        &["-c", "4", "-j", "2", "-T", secs, "-n"][..],
    ] {
        let out = fx.pgbench(args).unwrap().wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// pgbench init and a short run; then every segment from the first to the current one is in
/// the archive and reads back intact, and no archive_command call failed.
async fn archive_under_pgbench(major: u32, store: &BackupStore) {
    let fx = agent(major, store).await;
    // Postgres runs the small front Cargo built next to the agent (or its copy for the
    // Postgres user), which names the agent binary to hand over to.
    let command = one(&fx.sql().await.unwrap(), "SHOW archive_command").await;
    let words: Vec<&str> = command.split(' ').collect();
    let file_name = |w: &str| {
        let w = w.trim_matches('\'');
        w.rsplit('/').next().unwrap_or(w).to_string()
    };
    assert!(
        file_name(words[0]).starts_with("pgpilot-wal")
            && file_name(words[1]).starts_with("pgpilot-agent")
            && words[2..4] == ["wal-push", "--runtime"]
            && command.ends_with(" %p"),
        "{command}"
    );
    pgbench_init_and_run(&fx, "10", "4");
    let last = switch_and_wait_archived(&fx).await;
    assert_chain_complete(&store.open(), &last).await;

    let archive = fx
        .client()
        .status()
        .await
        .unwrap()
        .archive
        .expect("archive status");
    assert_eq!(archive.failures, 0, "{archive:?}");
    assert!(archive.last_archived.is_some());
    let metrics = fx.metrics().await.unwrap();
    assert!(
        metrics.contains("pgpilot_wal_archive_conflicts_total 0"),
        "{metrics}"
    );
    // Postgres never recorded a failure: every archive_command call succeeded.
    let sql = fx.sql().await.unwrap();
    let failed: i64 = sql
        .query_one("SELECT failed_count FROM pg_stat_archiver", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_while_archiving_loses_nothing() {
    let backups = BackupStore::file().unwrap();
    let mut fx = agent(15, &backups).await;
    let mut load = fx.pgbench(&["-i", "-s", "30", "-q"]).unwrap();
    // Let WAL pile up and uploads start, then kill the agent (its postmaster follows it).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = fx.client().status().await.unwrap();
        if st
            .archive
            .as_ref()
            .is_some_and(|a| a.last_archived.is_some())
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fx.signal_agent(Signal::SIGKILL).unwrap();
    fx.wait_exit(LONG).unwrap();
    let _ = load.wait();
    tokio::time::sleep(Duration::from_secs(1)).await;

    fx.spawn().unwrap();
    fx.wait_running(LONG).await.unwrap();
    let last = switch_and_wait_archived(&fx).await;
    assert_chain_complete(&backups.open(), &last).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_keeps_the_wal_and_archiving_catches_up() {
    let mut backups = BackupStore::s3().unwrap();
    let mut fx = agent(15, &backups).await;
    switch_and_wait_archived(&fx).await;

    backups.s3_server().stop();
    let sql = fx.sql().await.unwrap();
    let pending = write_and_switch(&sql, 3).await;
    // archive_command fails; Postgres keeps the segments and their .ready markers.
    let deadline = Instant::now() + LONG;
    loop {
        let failed: i64 = sql
            .query_one("SELECT failed_count FROM pg_stat_archiver", &[])
            .await
            .unwrap()
            .get(0);
        if failed > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "archive_command never failed during the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_kept_for_archiving(&fx, &pending);
    // The agent's view: failures recorded, and (after its next scan of archive_status, every
    // 2 s) the backlog counted.
    let status = fx
        .wait_for("the backlog in status", LONG, |s| {
            s.archive.as_ref().is_some_and(|a| a.ready >= pending.len())
        })
        .await
        .unwrap()
        .archive
        .unwrap();
    assert!(
        status.failures > 0 && status.last_failure.is_some(),
        "{status:?}"
    );

    backups.s3_server().restart().unwrap();
    let last = switch_and_wait_archived(&fx).await;
    assert!(last > *pending.last().unwrap());
    assert_chain_complete(&backups.open(), &last).await;
}

/// `n` times: some rows, then a WAL switch; the names of the segments switched away from.
async fn write_and_switch(sql: &tokio_postgres::Client, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        sql.batch_execute(
            "CREATE TABLE IF NOT EXISTS t (x int); INSERT INTO t SELECT generate_series(1, 10000)",
        )
        .await
        .unwrap();
        names.push(one(sql, "SELECT pg_walfile_name(pg_switch_wal())").await);
    }
    names
}

/// Postgres still holds each of `names` in pg_wal, marked ready: nothing was lost, and it will
/// be archived when the store and the agent are back.
fn assert_kept_for_archiving(fx: &AgentFixture, names: &[String]) {
    for name in names {
        assert!(
            fx.data_dir().join("pg_wal").join(name).exists(),
            "{name} was removed while not archived"
        );
        assert!(
            fx.data_dir()
                .join("pg_wal/archive_status")
                .join(format!("{name}.ready"))
                .exists(),
            "{name} lost its .ready marker"
        );
    }
}

/// A WAL file name Postgres itself will never produce or recycle (timeline 0x99, far ahead).
fn fake_segment(n: u8) -> String {
    format!("0000009900000FFF000000F{n:X}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_repush_succeeds_and_different_content_is_refused() {
    let backups = BackupStore::file().unwrap();
    let mut fx = agent(15, &backups).await;
    let name = fake_segment(0);
    let rel = format!("pg_wal/{name}");
    let original = random_segment();
    std::fs::write(fx.data_dir().join(&rel), &original).unwrap();

    let first = fx
        .client()
        .wal_push(&WalPushRequest { path: rel.clone() })
        .await
        .unwrap();
    assert!(!first.already_stored);
    assert_eq!(first.size, DEFAULT_SEGMENT_SIZE);
    let again = fx
        .client()
        .wal_push(&WalPushRequest { path: rel.clone() })
        .await
        .unwrap();
    assert!(again.already_stored, "{again:?}");
    assert_eq!(again.digest, first.digest);
    // archive_command's own path: exit 0 for the identical retry.
    let out = fx.wal_command("wal-push", &[&rel]).unwrap();
    assert!(out.success(), "{}", out.stderr);

    // Different content under the same name: refused loudly, and the archive keeps the original.
    let mut changed = original.clone();
    changed[4096] ^= 0xFF;
    std::fs::write(fx.data_dir().join(&rel), &changed).unwrap();
    let err = fx
        .client()
        .wal_push(&WalPushRequest { path: rel.clone() })
        .await
        .unwrap_err();
    let ClientError::Api { status, body, .. } = err else {
        panic!("{err}")
    };
    assert_eq!(status, 409);
    assert!(
        body.message.contains("different content") && body.message.contains(&first.digest),
        "{body:?}"
    );
    let out = fx.wal_command("wal-push", &[&rel]).unwrap();
    assert!(!out.success(), "a conflicting push must fail");
    assert!(
        out.stderr.contains("answered 409") && out.stderr.contains(&first.digest),
        "{}",
        out.stderr
    );
    assert!(
        fx.logs().contains(&first.digest),
        "the log names the stored checksum"
    );
    let metrics = fx.metrics().await.unwrap();
    assert!(
        metrics.contains("pgpilot_wal_archive_conflicts_total 2"),
        "{metrics}"
    );
    let store = backups.open();
    let (bytes, _) = store.get_bytes(&layout().wal_key(&name)).await.unwrap();
    assert!(
        bytes[..] == original[..],
        "the archived copy was overwritten"
    );

    // Not a WAL file: 400 naming it, nothing read.
    let err = fx
        .client()
        .wal_push(&WalPushRequest {
            path: "base/1/1259".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));

    // The agent is down: wal-push uploads directly, with the same safety.
    std::fs::write(fx.data_dir().join(&rel), &original).unwrap();
    let name2 = fake_segment(1);
    let rel2 = format!("pg_wal/{name2}");
    std::fs::write(fx.data_dir().join(&rel2), random_segment()).unwrap();
    fx.signal_agent(Signal::SIGTERM).unwrap();
    fx.wait_exit(LONG).unwrap();
    for path in [&rel, &rel2] {
        let out = fx.wal_command("wal-push", &[path]).unwrap();
        assert!(out.success(), "{path}: {}", out.stderr);
        assert!(out.stderr.contains("agent unreachable"), "{}", out.stderr);
    }
    // The agent binary's own wal-push (no front) takes the same path.
    let out = fx.agent_wal_command("wal-push", &[&rel]).unwrap();
    assert!(out.success(), "{}", out.stderr);
    assert!(out.stderr.contains("agent unreachable"), "{}", out.stderr);
    std::fs::write(fx.data_dir().join(&rel), &changed).unwrap();
    for out in [
        fx.wal_command("wal-push", &[&rel]).unwrap(),
        fx.agent_wal_command("wal-push", &[&rel]).unwrap(),
    ] {
        assert!(!out.success());
        assert!(out.stderr.contains("different content"), "{}", out.stderr);
    }
    store.verify(&layout().wal_key(&name2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_fetch_restores_archived_files_and_prefetches_the_next() {
    let backups = BackupStore::file().unwrap();
    let mut fx = agent(15, &backups).await;
    // Three consecutive segments of a fake timeline, archived through the API.
    let mut contents = Vec::new();
    for n in 0..3u8 {
        let rel = format!("pg_wal/{}", fake_segment(0xD + n));
        let sysid =
            pgpilot_agent::archive::identity::local_system_identifier(&fx.data_dir()).unwrap();
        let data = random_segment_named(&fake_segment(0xD + n), sysid);
        std::fs::write(fx.data_dir().join(&rel), &data).unwrap();
        fx.client()
            .wal_push(&WalPushRequest { path: rel.clone() })
            .await
            .unwrap();
        std::fs::remove_file(fx.data_dir().join(&rel)).unwrap();
        contents.push(data);
    }
    let first = fx
        .client()
        .wal_fetch(&WalFetchRequest {
            name: fake_segment(0xD),
        })
        .await
        .unwrap();
    assert!(!first.prefetched);
    std::fs::remove_file(&first.spool_path).unwrap();
    // The next ones were fetched ahead while the first was handed over.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fx
        .data_dir()
        .join("pgpilot_spool")
        .join(fake_segment(0xE))
        .exists()
    {
        assert!(Instant::now() < deadline, "no prefetch");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = fx
        .client()
        .wal_fetch(&WalFetchRequest {
            name: fake_segment(0xE),
        })
        .await
        .unwrap();
    assert!(second.prefetched, "{second:?}");
    assert_eq!(std::fs::read(&second.spool_path).unwrap(), contents[1]);

    // restore_command's own path: the file lands at %p, byte for byte.
    let dest = fx.dir.path().join("RECOVERYXLOG");
    let out = fx
        .wal_command("wal-fetch", &[&fake_segment(0xF), dest.to_str().unwrap()])
        .unwrap();
    assert!(out.success(), "{}", out.stderr);
    assert_eq!(std::fs::read(&dest).unwrap(), contents[2]);
    // A file the archive does not hold: exit 1, quietly (Postgres asks past the end on purpose).
    for out in [
        fx.wal_command(
            "wal-fetch",
            &["000000990000100000000000", dest.to_str().unwrap()],
        )
        .unwrap(),
        fx.agent_wal_command(
            "wal-fetch",
            &["000000990000100000000000", dest.to_str().unwrap()],
        )
        .unwrap(),
    ] {
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stderr.is_empty(), "{}", out.stderr);
    }
    // Not WAL file names, refused by name: a path, and 24 bytes with a character across byte 8
    // (the API fuzzer's input that once panicked a worker), on a connection still open.
    let wide = format!("0000\u{10000}\u{102b7}{}", "0".repeat(12));
    for name in ["../../etc/passwd", &wide, "0000000\u{80}000000000000000"] {
        let err = fx
            .client()
            .wal_fetch(&WalFetchRequest { name: name.into() })
            .await
            .unwrap_err();
        let ClientError::Api { status, body, .. } = err else {
            panic!("{name:?}: {err}")
        };
        assert_eq!(status, 400, "{name:?}");
        let body: ErrorBody = body;
        assert!(body.message.contains("is not a WAL file name"), "{body:?}");
    }
    let metrics = fx.metrics().await.unwrap();
    assert!(
        metrics.contains("pgpilot_wal_prefetch_hits_total"),
        "{metrics}"
    );

    // With the agent down, wal-fetch reads the store itself.
    fx.signal_agent(Signal::SIGTERM).unwrap();
    fx.wait_exit(LONG).unwrap();
    std::fs::remove_file(&dest).unwrap();
    let out = fx
        .wal_command("wal-fetch", &[&fake_segment(0xD), dest.to_str().unwrap()])
        .unwrap();
    assert!(out.success(), "{}", out.stderr);
    assert!(out.stderr.contains("agent unreachable"), "{}", out.stderr);
    assert_eq!(std::fs::read(&dest).unwrap(), contents[0]);
    std::fs::remove_file(&dest).unwrap();
    let out = fx
        .agent_wal_command("wal-fetch", &[&fake_segment(0xE), dest.to_str().unwrap()])
        .unwrap();
    assert!(out.success(), "{}", out.stderr);
    assert_eq!(std::fs::read(&dest).unwrap(), contents[1]);
    // Past the end of the archive, on the direct path too: exit 1, quietly.
    let out = fx
        .wal_command(
            "wal-fetch",
            &["000000990000100000000000", dest.to_str().unwrap()],
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        !out.stderr.lines().any(|l| l.starts_with("error")),
        "{}",
        out.stderr
    );
}

// ----- shutdown: no background store operation outlives the agent (issue 26) -----

/// How long a SIGTERM'd agent may take to be gone: well within Kubernetes' default
/// `terminationGracePeriodSeconds` (30 s). A bound on waiting, not a speed assertion.
const EXIT_BOUND: Duration = Duration::from_secs(10);

/// A file:// store with an encryption key and the default retry policy (5 attempts, backoff up
/// to 10 s), as a user would configure it: the quick retries of `file_backup` would hide a
/// retry loop that outlives shutdown.
fn encrypted_file_backup(store: &Path, key: &Path) -> String {
    pgpilot_test_support::write_secret(key, "5a".repeat(32)).unwrap();
    format!(
        "[backup]\nstore = \"file://{}\"\ncompression = \"zstd\"\nencryption_key_files = [\"k1={}\"]\n",
        store.display(),
        key.display()
    )
}

/// Every WAL object in the store with the SHA-256 of its stored bytes.
async fn stored_wal(store: &Store) -> std::collections::BTreeMap<String, [u8; 32]> {
    use sha2::Digest;
    let mut out = std::collections::BTreeMap::new();
    for o in store.list(&layout().wal_prefix()).await.unwrap() {
        let raw = store.get_raw(&o.key).await.unwrap();
        out.insert(o.key, sha2::Sha256::digest(&raw).into());
    }
    out
}

/// SIGTERM, then the time until the process is gone; fails when it outlives `EXIT_BOUND`.
fn sigterm_and_time_exit(fx: &mut AgentFixture) -> Duration {
    let sent = Instant::now();
    fx.signal_agent(Signal::SIGTERM).unwrap();
    let status = fx.wait_exit(EXIT_BOUND).unwrap();
    let took = sent.elapsed();
    eprintln!("agent gone {took:?} after SIGTERM ({status})");
    if std::env::var_os("SHOW_LOGS").is_some() {
        eprintln!("{}", fx.logs());
    }
    assert!(status.success(), "{status}\n{}", fx.logs());
    took
}

/// The scenario: WAL archived under load, a base backup, one archived segment
/// corrupted in the store; wal-fetch of it is refused naming the object and nothing of it stays
/// in the prefetch spool; then SIGTERM: the agent is gone within the bound and every archived
/// object is still there, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_fetching_a_corrupt_segment_exits_promptly() {
    let store_dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let toml = encrypted_file_backup(store_dir.path(), &keys.path().join("k1"));
    let mut fx = AgentFixture::start_with_toml(agent_bin!(), 15, &toml)
        .await
        .unwrap();
    pgbench_init_and_run(&fx, "5", "3");
    let last = switch_and_wait_archived(&fx).await;
    fx.take_backup().await.unwrap();
    let store = open_store(&toml).unwrap();
    assert_chain_complete(&store, &last).await;

    // Flip one byte in the middle of an early segment (its successors are archived too, so
    // fetching it starts prefetches of objects that exist).
    let victim = "000000010000000000000002";
    let key = layout().wal_key(victim);
    let mut raw = store.get_raw(&key).await.unwrap().to_vec();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x01;
    store.put_raw(&key, raw.into()).await.unwrap();
    let before = stored_wal(&store).await;

    let out = fx
        .wal_command("wal-fetch", &[victim, "RECOVERYXLOG"])
        .unwrap();
    let stderr = &out.stderr;
    assert!(!out.status.success(), "a corrupt segment was served");
    assert!(
        stderr.contains(&key),
        "the refusal names the object: {stderr}"
    );
    assert!(!fx.data_dir().join("RECOVERYXLOG").exists());
    let spool = fx.data_dir().join("pgpilot_spool");
    let leftovers: Vec<String> = std::fs::read_dir(&spool)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(victim))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "the spool kept {leftovers:?}");
    // The corrupt object and the prefetches past the end of the archive (not found) are
    // permanent answers, never retried with backoff.
    assert!(
        !fx.logs().contains("transient store failure"),
        "{}",
        fx.logs()
    );

    sigterm_and_time_exit(&mut fx);
    assert_eq!(
        stored_wal(&store).await,
        before,
        "archived objects changed or vanished"
    );
}

/// SIGTERM while look-ahead uploads run against an S3 server that went away (each upload
/// retrying with backoff): the agent abandons them and is gone within the bound; what was
/// archived before stays archived, and what was not stays in pg_wal, marked ready, for the
/// next start (Postgres deletes a segment only after archive_command succeeded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_uploads_to_a_stopped_s3_server_exits_promptly() {
    let mut s3 = S3Server::start().unwrap();
    s3.create_bucket("archive").unwrap();
    let (ak, sk) = s3.credential_files().unwrap();
    // The default retry policy (no [backup.retry]): its backoff is what must not hold shutdown.
    let toml = format!(
        "[backup]\nstore = \"s3://archive/pg\"\nendpoint = \"{}\"\npath_style = true\nregion = \"us-east-1\"\n\
         access_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n",
        s3.endpoint,
        ak.display(),
        sk.display()
    );
    let mut fx = AgentFixture::start_with_toml(agent_bin!(), 15, &toml)
        .await
        .unwrap();
    let archived = switch_and_wait_archived(&fx).await;
    let store = open_store(&toml).unwrap();
    let before = stored_wal(&store).await;

    s3.stop();
    let sql = fx.sql().await.unwrap();
    let pending = write_and_switch(&sql, 4).await;
    drop(sql);
    // Uploads are in flight (and retrying) against the dead endpoint.
    fx.wait_for("uploads in flight", LONG, |s| {
        s.archive.as_ref().is_some_and(|a| a.in_flight > 0)
    })
    .await
    .unwrap();

    sigterm_and_time_exit(&mut fx);
    assert_kept_for_archiving(&fx, &pending);
    s3.restart().unwrap();
    let after = stored_wal(&store).await;
    for (key, sha) in &before {
        assert_eq!(after.get(key), Some(sha), "{key} changed or vanished");
    }
    assert!(before.contains_key(&layout().wal_key(&archived)));
}

/// Two clusters configured with the same store, cluster name and shard (a copied config, a data
/// dir initialised again): the archive belongs to the first one's database system, so every
/// push and backup of the second is refused before anything is written, loudly (log line,
/// conflicts metric), and the first keeps archiving. Without this, the second's segments past
/// the first's position landed in its archive and the first's own push of those names failed
/// for good (found by the R4 trial, docs/chaos.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_cluster_on_the_same_archive_is_refused() {
    let backups = BackupStore::file().unwrap();
    let first = agent(15, &backups).await;
    switch_and_wait_archived(&first).await;
    let owner = std::fs::read(backups.root().join(layout().identity_key())).unwrap();
    assert!(!owner.is_empty(), "the archive records its owner");
    let keys_before = backups.keys_under(&layout().wal_prefix()).await;

    let second = agent(15, &backups).await;
    let sql = second.sql().await.unwrap();
    for _ in 0..keys_before.len() + 2 {
        sql.batch_execute("CREATE TABLE IF NOT EXISTS x (i int); INSERT INTO x VALUES (1); SELECT pg_switch_wal()")
            .await
            .unwrap();
    }
    let started = second
        .client()
        .start_backup(&pgpilot_common::api::BackupRequest::default())
        .await
        .unwrap();
    let done = second.wait_backup(&started.id).await.unwrap();
    assert_eq!(
        done.state,
        pgpilot_common::api::BackupState::Failed,
        "{done:?}"
    );
    assert!(
        done.reason
            .as_deref()
            .unwrap_or("")
            .contains("another cluster"),
        "{done:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !second.logs().contains("another cluster") {
        assert!(Instant::now() < deadline, "{}", second.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = second.metrics().await.unwrap();
    assert!(
        !metrics.contains("pgpilot_wal_archive_conflicts_total 0"),
        "{metrics}"
    );
    // Nothing of the second's WAL is in the archive; the first goes on.
    let keys_after = backups.keys_under(&layout().wal_prefix()).await;
    assert_eq!(keys_after, keys_before);
    drop(second);
    let last = switch_and_wait_archived(&first).await;
    assert_chain_complete(&backups.open(), &last).await;
}
