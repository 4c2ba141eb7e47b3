//! Base backups against real PostgreSQL (15 and the newest) and real stores (file://, and s3s-fs on
//! 15): a backup under write load completes with a manifest that lists every file, its
//! backup_label agrees with the manifest and every WAL segment it needs is archived; verify
//! passes and then fails, naming the object, once a stored file is tampered with; kill -9 of
//! the agent midway leaves an incomplete backup that is never listed as complete and the next
//! backup works; concurrent requests get 409, unknown ids 404; retention deletes exactly the
//! old backups and the WAL before the oldest kept backup's first segment.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pgpilot_agent::archive::backup::{FILE_DELAY_ENV, skipped};
use pgpilot_agent::store::Store;
use pgpilot_common::api::{BackupRequest, BackupState};
use pgpilot_common::manifest::{BackupLabel, BackupManifest};
use pgpilot_common::wal::{Segment, WalFile};
use pgpilot_test_support::agent::{AgentFixture, AgentOptions, LONG, api_error};
use pgpilot_test_support::agent_bin;
use pgpilot_test_support::store::{BackupStore, default_layout as layout};

pgpilot_test_support::per_major!(
    backup_under_write_load_completes_and_verifies,
    kill_9_during_a_backup_leaves_it_incomplete,
    retention_deletes_old_backups_and_only_their_wal,
);

/// An agent on `major` archiving into `store`.
async fn agent(major: u32, store: &BackupStore, opts: AgentOptions) -> AgentFixture {
    let opts = AgentOptions {
        extra_toml: store.toml(),
        ..opts
    };
    AgentFixture::start_with(agent_bin!(), major, opts)
        .await
        .unwrap()
}

async fn manifest(store: &Store, id: &str) -> BackupManifest {
    let (bytes, _) = store.get_bytes(&layout().manifest_key(id)).await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Write load while a backup runs: pgbench on 15, plain INSERTs on the other majors (a second
/// kind of load). Stops when `stop` is set.
async fn start_load(
    fx: &AgentFixture,
    major: u32,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    if major == 15 {
        let out = fx
            .pgbench(&["-i", "-s", "5", "-q"])
            .unwrap()
            .wait_with_output()
            .unwrap();
        assert!(
            out.status.success(),
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut child = fx.pgbench(&["-c", "2", "-T", "600", "-n"]).unwrap();
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        })
    } else {
        let sql = fx.sql().await.unwrap();
        tokio::spawn(async move {
            sql.batch_execute(
                "CREATE TABLE IF NOT EXISTS load (id bigint, pad text); \
                 INSERT INTO load SELECT g, repeat('x', 200) FROM generate_series(1, 200000) g",
            )
            .await
            .unwrap();
            while !stop.load(Ordering::Relaxed) {
                sql.batch_execute(
                    "INSERT INTO load SELECT g, md5(g::text) FROM generate_series(1, 20000) g; \
                     UPDATE load SET pad = md5(pad) WHERE id % 50 = 0",
                )
                .await
                .unwrap();
            }
        })
    }
}

/// Files of the data dir (relative paths) that a backup must contain.
fn data_files(data_dir: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if skipped(&r) {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                if ![
                    "pg_wal",
                    "pg_replslot",
                    "pg_dynshmem",
                    "pg_notify",
                    "pg_serial",
                    "pg_snapshots",
                    "pg_stat_tmp",
                    "pg_subtrans",
                ]
                .contains(&r.as_str())
                {
                    walk(&e.path(), &r, out);
                }
            } else if ft.is_file() {
                out.insert(r);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(data_dir, "", &mut out);
    out
}

async fn backup_under_write_load_completes_and_verifies(major: u32) {
    let backups = BackupStore::file().unwrap();
    let fx = agent(major, &backups, AgentOptions::default()).await;
    let store = backups.open();
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&fx, major, stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = data_files(&fx.data_dir());

    let client = fx.client();
    let started = client
        .start_backup(&BackupRequest {
            label: Some("under load".into()),
        })
        .await
        .unwrap();
    assert_eq!(started.state, BackupState::Running);
    let done = fx.wait_backup(&started.id).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(
        done.state,
        BackupState::Completed,
        "{done:?}\n{}",
        fx.logs()
    );
    assert_eq!(done.files_done, done.files_total);
    let id = started.id;

    // The manifest lists every file that existed before and still exists, with sizes that
    // match the stored objects; static files match the data dir exactly.
    let m = manifest(&store, &id).await;
    assert_eq!(m.id, id);
    assert_eq!(m.label, "under load");
    assert_eq!(m.postgres_major, major);
    assert_eq!(m.timeline, 1);
    assert_eq!(m.wal_segment_size, 16 << 20);
    let listed: BTreeSet<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    let now = data_files(&fx.data_dir());
    for f in before.intersection(&now) {
        assert!(listed.contains(f.as_str()), "{f} missing from the manifest");
    }
    for f in [
        "backup_label",
        "PG_VERSION",
        "global/pg_control",
        "pg_hba.conf",
    ] {
        assert!(listed.contains(f), "{f} missing from the manifest");
    }
    for f in ["postmaster.pid", "postmaster.opts"] {
        assert!(!listed.contains(f), "{f} must not be backed up");
    }
    assert!(!listed.iter().any(|f| f.starts_with("pg_wal/")));
    for d in [
        "pg_wal",
        "pg_wal/archive_status",
        "pg_replslot",
        "pg_stat_tmp",
    ] {
        assert!(
            m.directories.iter().any(|x| x.path == d),
            "directory {d} missing"
        );
    }
    for f in ["PG_VERSION", "pg_hba.conf", "postgresql.conf"] {
        let entry = m.files.iter().find(|x| x.path == f).unwrap();
        let len = std::fs::metadata(fx.data_dir().join(f)).unwrap().len();
        assert_eq!(entry.size, len, "{f}");
    }
    assert_eq!(m.total_size, m.files.iter().map(|f| f.size).sum::<u64>());
    let stored: u64 = store
        .list(&layout().backup_prefix(&id))
        .await
        .unwrap()
        .iter()
        .filter(|o| o.key.contains("/data/"))
        .map(|o| o.size)
        .sum();
    assert_eq!(m.total_stored_size, stored);

    // backup_label agrees with the manifest, and every segment of the range is archived.
    let (label, _) = store
        .get_bytes(&layout().backup_file_key(&id, "backup_label"))
        .await
        .unwrap();
    let label = BackupLabel::parse(std::str::from_utf8(&label).unwrap()).unwrap();
    assert_eq!(label.start_lsn.to_string(), m.start_lsn);
    assert_eq!(label.start_file, m.wal_start);
    let seg = m.wal_segment_size;
    let first = WalFile::parse(&m.wal_start, seg)
        .unwrap()
        .segment()
        .unwrap();
    let last = WalFile::parse(&m.wal_end, seg).unwrap().segment().unwrap();
    assert!(first <= last);
    let mut s: Segment = first;
    while s <= last {
        assert!(
            store
                .head(&layout().wal_key(&s.name(seg)))
                .await
                .unwrap()
                .is_some(),
            "{} not archived",
            s.name(seg)
        );
        s = s.next();
    }

    // Listing, status and metrics know it.
    let list = client.backups().await.unwrap();
    let b = list.backups.iter().find(|b| b.id == id).unwrap();
    assert_eq!(b.state, BackupState::Completed);
    assert_eq!(b.stop_lsn.as_deref(), Some(m.stop_lsn.as_str()));
    let w = list.window.unwrap();
    assert_eq!(w.earliest_backup, id);
    assert!(w.consistent, "{w:?}");
    let status = client.status().await.unwrap();
    assert_eq!(status.last_backup.map(|l| l.id), Some(id.clone()));
    let metrics = fx.metrics().await.unwrap();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("pgpilot_backup_last_success_timestamp_seconds ")
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    assert!(metrics.contains("pgpilot_backup_duration_seconds_count 1"));

    // verify passes; the table lists the backup.
    let out = fx.cli(&["verify", &id]).unwrap();
    assert!(out.success(), "{}", out.text());
    assert!(out.text().contains("OK: "), "{}", out.text());
    let out = fx.cli(&["backups"]).unwrap();
    assert!(out.success(), "{}", out.text());
    assert!(out.text().contains(&id) && out.text().contains("completed"));

    // Flip one byte of a stored file: verify fails and names the object.
    let victim = m.files.iter().max_by_key(|f| f.stored_size).unwrap();
    let key = layout().backup_file_key(&id, &victim.path);
    let path = backups.root().join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let out = fx.cli(&["verify", &id]).unwrap();
    assert!(!out.success(), "{}", out.text());
    assert!(out.text().contains(&key), "{}", out.text());
    assert!(out.text().contains("FAIL"), "{}", out.text());
}

async fn kill_9_during_a_backup_leaves_it_incomplete(major: u32) {
    let backups = BackupStore::file().unwrap();
    // ~1000 files, 4 at a time: a backup takes several seconds.
    let opts = AgentOptions::default().env(FILE_DELAY_ENV, "40");
    let mut fx = agent(major, &backups, opts).await;
    let store = backups.open();
    let client = fx.client();

    // Unknown and malformed ids.
    let (code, body) = api_error(client.backup("20000101T000000Z").await.unwrap_err());
    assert_eq!(code, 404);
    assert!(body.message.contains("20000101T000000Z"), "{body:?}");
    let (code, _) = api_error(client.backup("no such id").await.unwrap_err());
    assert_eq!(code, 400);
    // Starting needs the token; reading does not.
    let (code, _) = api_error(
        fx.anonymous_client()
            .start_backup(&BackupRequest::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 401);
    assert!(fx.anonymous_client().backups().await.is_ok());

    let started = client
        .start_backup(&BackupRequest::default())
        .await
        .unwrap();
    let id = started.id.clone();
    let (code, body) = api_error(
        client
            .start_backup(&BackupRequest::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 409);
    assert!(body.message.contains(&id), "{body:?}");
    assert!(body.state.is_some());

    // Kill the agent once files are being uploaded.
    let deadline = Instant::now() + LONG;
    loop {
        let p = client.backup(&id).await.unwrap();
        assert_eq!(p.state, BackupState::Running, "{p:?}");
        if p.files_done >= 20 {
            assert!(p.bytes_done > 0 && p.files_total > p.files_done, "{p:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{p:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fx.signal_agent(Signal::SIGKILL).unwrap();
    fx.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(
        store
            .head(&layout().manifest_key(&id))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        !store
            .list(&layout().backup_prefix(&id))
            .await
            .unwrap()
            .is_empty(),
        "the killed backup should have left objects"
    );

    fx.spawn().unwrap();
    fx.wait_running(LONG).await.unwrap();
    let client = fx.client();
    let list = client.backups().await.unwrap();
    let b = list.backups.iter().find(|b| b.id == id).unwrap();
    assert_eq!(b.state, BackupState::Incomplete, "{b:?}");
    assert!(list.window.is_none(), "{:?}", list.window);
    assert_eq!(
        client.backup(&id).await.unwrap().state,
        BackupState::Incomplete
    );
    let out = fx.cli(&["verify", &id]).unwrap();
    assert!(!out.success(), "{}", out.text());
    assert!(out.text().contains("no usable manifest"), "{}", out.text());

    // Not a running primary: 409 naming the state, nothing started.
    client
        .stop(&pgpilot_common::api::ShutdownRequest::default())
        .await
        .unwrap();
    let (code, body) = api_error(
        client
            .start_backup(&BackupRequest::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 409);
    assert_eq!(body.state, Some(pgpilot_common::state::AgentState::Stopped));
    client.start().await.unwrap();

    // The next backup works, and it is the one the window starts from.
    let next = fx.take_backup().await.unwrap();
    assert_ne!(next, id);
    let list = client.backups().await.unwrap();
    assert_eq!(list.window.unwrap().earliest_backup, next);
    let states: Vec<(String, BackupState)> = list
        .backups
        .iter()
        .map(|b| (b.id.clone(), b.state))
        .collect();
    assert_eq!(
        states,
        [
            (id, BackupState::Incomplete),
            (next, BackupState::Completed)
        ]
    );

    // A tablespace: refused clearly, the run shows as failed with the reason, and no manifest.
    let ts = fx.dir.path().join("tablespace");
    std::fs::create_dir(&ts).unwrap();
    if let Some(pg) = nix::unistd::User::from_name("postgres").unwrap()
        && nix::unistd::geteuid().is_root()
    {
        nix::unistd::chown(&ts, Some(pg.uid), Some(pg.gid)).unwrap();
    }
    let sql = fx.sql().await.unwrap();
    sql.batch_execute(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        ts.display()
    ))
    .await
    .unwrap();
    let started = client
        .start_backup(&BackupRequest::default())
        .await
        .unwrap();
    let failed = fx.wait_backup(&started.id).await.unwrap();
    assert_eq!(failed.state, BackupState::Failed, "{failed:?}");
    let reason = failed.reason.unwrap();
    assert!(
        reason.contains("tablespaces") && reason.contains("pg_tblspc"),
        "{reason}"
    );
    let list = client.backups().await.unwrap();
    let b = list.backups.iter().find(|b| b.id == started.id).unwrap();
    assert_eq!(b.state, BackupState::Failed);
    assert!(
        store
            .head(&layout().manifest_key(&started.id))
            .await
            .unwrap()
            .is_none()
    );
    sql.batch_execute("DROP TABLESPACE extra").await.unwrap();
    let metrics = fx.metrics().await.unwrap();
    assert!(
        metrics.contains("pgpilot_backup_failures_total 1"),
        "{metrics}"
    );
}

/// Writes a little and switches segments, so backups have distinct WAL ranges.
async fn advance_wal(fx: &AgentFixture) {
    let sql = fx.sql().await.unwrap();
    sql.batch_execute(
        "CREATE TABLE IF NOT EXISTS tick (t timestamptz); INSERT INTO tick VALUES (now()); \
         SELECT pg_switch_wal()",
    )
    .await
    .unwrap();
}

async fn retention_deletes_old_backups_and_only_their_wal(major: u32) {
    let backups = BackupStore::file().unwrap();
    let fx = agent(major, &backups, AgentOptions::default()).await;
    let store = backups.open();
    let l = layout();

    // An incomplete leftover older than everything, three backups (the last through the CLI,
    // with its progress bar), a history file that must survive.
    store
        .put_bytes(
            &l.backup_file_key("20000101T000000Z", "PG_VERSION"),
            "15\n".into(),
            pgpilot_agent::store::PutMode::CreateOnly,
        )
        .await
        .unwrap();
    store
        .put_bytes(
            &l.wal_key("00000005.history"),
            "1\t0/3000000\tno recovery target specified\n".into(),
            pgpilot_agent::store::PutMode::CreateOnly,
        )
        .await
        .unwrap();
    advance_wal(&fx).await;
    let b1 = fx.take_backup().await.unwrap();
    advance_wal(&fx).await;
    advance_wal(&fx).await;
    let b2 = fx.take_backup().await.unwrap();
    advance_wal(&fx).await;
    advance_wal(&fx).await;
    let out = fx.cli(&["backup", "--label", "from the CLI"]).unwrap();
    assert!(out.success(), "{}", out.text());
    let b3 = out
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("backup ")?.strip_suffix(" started"))
        .unwrap()
        .to_string();
    assert!(
        out.text().contains(&format!("backup {b3}: completed")),
        "{}",
        out.text()
    );
    advance_wal(&fx).await;

    let m3 = manifest(&store, &b3).await;
    let seg = m3.wal_segment_size;
    let cutoff = WalFile::parse(&m3.wal_start, seg)
        .unwrap()
        .segment()
        .unwrap();
    let wal_before: Vec<String> = store
        .list(&l.wal_prefix())
        .await
        .unwrap()
        .into_iter()
        .filter_map(|o| l.wal_name(&o.key).map(str::to_string))
        .collect();
    let doomed_wal: BTreeSet<String> = wal_before
        .iter()
        .filter(|n| {
            WalFile::parse(n, seg)
                .and_then(|f| match f {
                    WalFile::History { .. } => None,
                    f => f.segment(),
                })
                .is_some_and(|s| s.segno < cutoff.segno)
        })
        .cloned()
        .collect();
    assert!(!doomed_wal.is_empty());
    let all_objects = |store: Store| async move {
        store
            .list("local/0/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect::<BTreeSet<String>>()
    };
    let before = all_objects(store.clone()).await;

    // A policy that would keep nothing deletes nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = fx.cli(&["retention", "--keep-within", "1s"]).unwrap();
    assert!(!out.success(), "{}", out.text());
    assert!(
        out.text().contains("no complete backup would remain"),
        "{}",
        out.text()
    );
    // (WAL keeps being archived meanwhile: compare what was there.)
    assert!(before.is_subset(&all_objects(store.clone()).await));

    // Dry run: lists the right things, deletes nothing.
    let out = fx
        .cli(&["retention", "--keep-last", "1", "--dry-run"])
        .unwrap();
    assert!(out.success(), "{}", out.text());
    let t = out.text();
    for id in [&b1, &b2, &"20000101T000000Z".to_string()] {
        assert!(t.contains(&format!("would delete backup {id}")), "{t}");
    }
    assert!(!t.contains(&format!("would delete backup {b3}")), "{t}");
    for n in &doomed_wal {
        assert!(t.contains(&format!("  {n}\n")), "{n} not listed\n{t}");
    }
    assert!(!t.contains("00000005.history"));
    assert!(!t.contains(&format!("  {}\n", m3.wal_start)));
    assert!(before.is_subset(&all_objects(store.clone()).await));

    // The real run deletes exactly those.
    let out = fx.cli(&["retention", "--keep-last", "1"]).unwrap();
    assert!(out.success(), "{}", out.text());
    let after = all_objects(store.clone()).await;
    let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
    let expected: BTreeSet<String> = before
        .iter()
        .filter(|k| {
            [&b1, &b2, &"20000101T000000Z".to_string()]
                .iter()
                .any(|id| k.starts_with(&l.backup_prefix(id)))
                || l.wal_name(k).is_some_and(|n| doomed_wal.contains(n))
        })
        .cloned()
        .collect();
    assert_eq!(gone, expected);
    assert!(after.contains(&l.wal_key("00000005.history")));
    let list = fx.client().backups().await.unwrap();
    let ids: Vec<&str> = list.backups.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, [b3.as_str()]);
    let w = list.window.unwrap();
    assert!(w.consistent && w.first_gap.is_none(), "{w:?}");
    let out = fx.cli(&["verify"]).unwrap();
    assert!(out.success(), "{}", out.text());
    assert!(out.text().contains(&b3));

    // A needed WAL segment goes missing: verify names it, the window says not restorable.
    store.delete(&l.wal_key(&m3.wal_end)).await.unwrap();
    let out = fx.cli(&["verify", &b3]).unwrap();
    assert!(!out.success(), "{}", out.text());
    assert!(
        out.text()
            .contains(&format!("WAL segment {} is missing", m3.wal_end)),
        "{}",
        out.text()
    );
    let w = fx.client().backups().await.unwrap().window.unwrap();
    assert!(!w.consistent, "{w:?}");
}

/// `[backup.retention] keep_last = 2`: after each successful backup the agent deletes the
/// backups beyond the newest two and the WAL only they needed, counted in its metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_in_the_config_runs_after_each_backup() {
    let backups = BackupStore::file().unwrap();
    let opts = AgentOptions {
        extra_toml: backups.toml_with("") + "[backup.retention]\nkeep_last = 2\n",
        ..AgentOptions::default()
    };
    let fx = AgentFixture::start_with(agent_bin!(), 15, opts)
        .await
        .unwrap();
    let store = backups.open();
    let l = layout();
    let mut ids = Vec::new();
    for _ in 0..3 {
        advance_wal(&fx).await;
        ids.push(fx.take_backup().await.unwrap());
        advance_wal(&fx).await;
    }
    let listed: Vec<String> = fx
        .client()
        .backups()
        .await
        .unwrap()
        .backups
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(
        listed,
        ids[1..],
        "the oldest of three goes, the newest two stay"
    );
    let left = store.list(&l.backup_prefix(&ids[0])).await.unwrap();
    assert!(left.is_empty(), "objects of {} left: {left:?}", ids[0]);
    // WAL before the oldest kept backup's first segment is gone; its own WAL is there.
    let m = manifest(&store, &ids[1]).await;
    let first = WalFile::parse(&m.wal_start, m.wal_segment_size)
        .unwrap()
        .segment()
        .unwrap();
    for o in store.list(&l.wal_prefix()).await.unwrap() {
        let name = l.wal_name(&o.key).unwrap();
        if let Some(s) = WalFile::parse(name, m.wal_segment_size).and_then(|f| f.segment()) {
            assert!(s.segno >= first.segno, "{name} survived retention");
        }
    }
    assert!(
        store
            .head(&l.wal_key(&m.wal_start))
            .await
            .unwrap()
            .is_some()
    );
    let out = fx.cli(&["verify"]).unwrap();
    assert!(out.success(), "{}", out.text());
    let metrics = fx.metrics().await.unwrap();
    assert!(
        metrics.contains("pgpilot_retention_deleted_backups_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pgpilot_retention_failures_total 0"),
        "{metrics}"
    );
}

/// The same backup through an S3 server (s3s-fs): multipart for the large files, create-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_to_s3s_fs_completes_and_verifies() {
    let backups = BackupStore::s3()
        .unwrap()
        .with_keys("multipart_threshold = 5242880\npart_size = 5242880");
    let fx = agent(15, &backups, AgentOptions::default()).await;
    let sql = fx.sql().await.unwrap();
    // One 20 MB table file: larger than the multipart threshold even compressed.
    sql.batch_execute(
        "CREATE TABLE big AS SELECT g, md5(g::text) || md5((g * 7)::text) AS pad \
         FROM generate_series(1, 200000) g",
    )
    .await
    .unwrap();
    let id = fx.take_backup().await.unwrap();
    let m = manifest(&backups.open(), &id).await;
    assert!(
        m.files.iter().any(|f| f.stored_size > 5 << 20),
        "no multipart-sized file"
    );
    let out = fx.cli(&["verify", &id]).unwrap();
    assert!(out.success(), "{}", out.text());
}
