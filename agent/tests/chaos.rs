//! Reliability trials (`make chaos`, docs/chaos.md): randomized faults against real PostgreSQL
//! and real stores, an independent checker after every run, counts in the report. Each trial is
//! ignored by `make test` and run by `scripts/chaos.sh` (`make chaos`; `make chaos-quick` is the
//! short mode CI runs). The bugs they found have their regression tests in the suites they
//! belong to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgpilot_common::api::{BackupPhase, BackupRequest, BackupState, RestorePhase};
use pgpilot_common::layout::Layout;
use pgpilot_common::state::{AgentState, Role};
use pgpilot_common::wal::{DEFAULT_SEGMENT_SIZE, WalFile};
use pgpilot_test_support::agent::{AgentFixture, AgentOptions, LONG};
use pgpilot_test_support::agent_bin;
use pgpilot_test_support::chaos::Trial;
use pgpilot_test_support::postgres::live_postmaster;
use pgpilot_test_support::store::BackupStore;
use rand::Rng;

const CLUSTER: &str = "chaos";
const SHARD: &str = "0";

fn layout() -> Layout {
    Layout::new(CLUSTER, SHARD).unwrap()
}

/// An agent of cluster `chaos` archiving into `store`, with `extra` TOML after the store's.
async fn agent(store: &BackupStore, extra: &str) -> AgentFixture {
    AgentFixture::start_with(
        agent_bin!(),
        15,
        options(CLUSTER, format!("{}{extra}", store.toml())),
    )
    .await
    .unwrap()
}

/// Options of an agent of cluster `cluster` (shard `0`) with `toml` as its extra config.
fn options(cluster: &str, toml: String) -> AgentOptions {
    AgentOptions {
        cluster: Some(cluster.into()),
        shard: Some(SHARD.into()),
        ..AgentOptions::toml(toml)
    }
}

/// A 32-byte key file for `encryption_key_files`.
fn key_file(dir: &Path, name: &str, byte: &str) -> PathBuf {
    let path = dir.join(name);
    pgpilot_test_support::write_secret(&path, byte.repeat(32)).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// Checkers, shared by the trials. Each returns what it found wrong, naming it.

/// The segments missing between the first and the last archived segment of each timeline.
fn gaps(names: &BTreeSet<String>) -> Vec<String> {
    let mut by_tli: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for n in names {
        if let Some(WalFile::Segment(s)) = WalFile::parse(n, DEFAULT_SEGMENT_SIZE) {
            by_tli.entry(s.timeline).or_default().insert(s.segno);
        }
    }
    let mut missing = Vec::new();
    for (tli, segs) in by_tli {
        let (Some(first), Some(last)) = (segs.first(), segs.last()) else {
            continue;
        };
        for segno in *first..=*last {
            if !segs.contains(&segno) {
                missing.push(
                    pgpilot_common::wal::Segment {
                        timeline: tli,
                        segno,
                    }
                    .name(DEFAULT_SEGMENT_SIZE),
                );
            }
        }
    }
    missing
}

/// The WAL file names in the archive of `layout`.
async fn archived_wal(store: &BackupStore, layout: &Layout) -> BTreeSet<String> {
    store
        .keys_under(&layout.wal_prefix())
        .await
        .into_iter()
        .filter_map(|k| layout.wal_name(&k).map(str::to_string))
        .collect()
}

/// How many of `ids` table `acked` holds.
async fn present(sql: &tokio_postgres::Client, ids: &[i64]) -> Result<i64, String> {
    let ids = ids.to_vec();
    sql.query_one("SELECT count(*) FROM acked WHERE id = ANY($1)", &[&ids])
        .await
        .map(|r| r.get(0))
        .map_err(|e| format!("counting acknowledged rows: {e}"))
}

/// Every acknowledged id is in `sql`'s table `acked`; names how many are missing.
async fn all_acked_present(
    sql: &tokio_postgres::Client,
    acked: &BTreeSet<i64>,
    where_: &str,
) -> Result<(), String> {
    let ids: Vec<i64> = acked.iter().copied().collect();
    let n = present(sql, &ids).await?;
    if n == ids.len() as i64 {
        Ok(())
    } else {
        Err(format!(
            "{where_}: {} of {} acknowledged commits are missing",
            ids.len() as i64 - n,
            ids.len()
        ))
    }
}

/// A new instance (cluster `copy_name`) bootstrapped from the newest backup of `source`'s
/// archive and its WAL to the end; `Ok(copy)` once it runs as a primary, `Err` naming why not.
async fn restore_copy(
    source: &AgentFixture,
    store_toml: &str,
    copy_name: &str,
) -> Result<AgentFixture, String> {
    let mut copy = prepare_copy(source, store_toml, copy_name)?;
    copy.spawn().map_err(|e| e.to_string())?;
    wait_restored(&mut copy).await?;
    Ok(copy)
}

/// The copy [`restore_copy`] starts, prepared but not started (its data dir may be mounted
/// first).
fn prepare_copy(
    source: &AgentFixture,
    store_toml: &str,
    copy_name: &str,
) -> Result<AgentFixture, String> {
    let opts = options(
        copy_name,
        format!("{store_toml}\n[bootstrap]\ncluster = \"{CLUSTER}\"\nshard = \"{SHARD}\"\n"),
    );
    let copy = AgentFixture::prepare(agent_bin!(), 15, &opts).map_err(|e| e.to_string())?;
    // The cluster's superuser password (shared like a Kubernetes Secret).
    std::fs::copy(
        source.dir.path().join("superuser-password"),
        copy.dir.path().join("superuser-password"),
    )
    .map_err(|e| e.to_string())?;
    Ok(copy)
}

/// Waits until a started copy runs as a primary with its restore completed; `Err` with the
/// reason (and its log's error lines) when it failed or exited.
async fn wait_restored(copy: &mut AgentFixture) -> Result<(), String> {
    let deadline = Instant::now() + LONG;
    loop {
        if let Ok(Some(status)) = copy.wait_exit_now() {
            return Err(format!(
                "the restored copy exited ({status}): {}",
                tail(&copy.logs())
            ));
        }
        if let Ok(st) = copy.client().status().await {
            let phase = st.restore.as_ref().map(|r| r.phase);
            if phase == Some(RestorePhase::Failed) || matches!(st.state, AgentState::Failed { .. })
            {
                return Err(format!(
                    "the restore failed: {:?} {:?}: {}",
                    st.state,
                    st.restore.and_then(|r| r.error),
                    tail(&copy.logs())
                ));
            }
            if st.state
                == (AgentState::Running {
                    role: Role::Primary,
                })
                && phase == Some(RestorePhase::Completed)
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("restore not finished: {}", tail(&copy.logs())));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Run `problems` as a checker's verdict: none is a pass.
fn verdict(problems: Vec<String>) -> Result<(), String> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// `CREATE TABLE acked`, where the trials' writers record acknowledged commits.
async fn create_acked(fx: &AgentFixture) {
    fx.sql()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY, pad text)")
        .await
        .unwrap();
}

/// The error lines of a log (or its last lines), for a failure message.
fn tail(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("FATAL") || l.contains("error"))
        .collect();
    let lines: Vec<&str> = if errors.is_empty() {
        log.lines().collect()
    } else {
        errors
    };
    lines[lines.len().saturating_sub(10)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Load.

/// A client inserting ids into `acked` one autocommit statement at a time, recording each id
/// the server acknowledged, and switching WAL every 250 ms so archiving runs all the time.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    async fn start(fx: &AgentFixture, first_id: i64) -> Writer {
        let sql = fx.sql().await.expect("writer session");
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let mut id = first_id;
            let mut switched = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                let insert = sql.execute("INSERT INTO acked VALUES ($1)", &params);
                match tokio::time::timeout(Duration::from_secs(10), insert).await {
                    Ok(Ok(_)) => a.lock().unwrap().push(id),
                    _ => break,
                }
                id += 1;
                if switched.elapsed() > Duration::from_millis(250) {
                    if sql.simple_query("SELECT pg_switch_wal()").await.is_err() {
                        break;
                    }
                    switched = Instant::now();
                }
            }
        });
        Writer { stop, acked, task }
    }

    /// Stops the writer; returns the ids the server acknowledged.
    async fn finish(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        std::mem::take(&mut *self.acked.lock().unwrap())
    }
}

// ---------------------------------------------------------------------------------------------
// R1: crashes during archiving and base backups.

#[derive(Debug, Clone, Copy)]
enum Crash {
    Agent,
    Postgres,
    Both,
}

/// kill -9 of the agent, of Postgres, or both, at a random moment under pgbench and a writer
/// that switches WAL four times a second, half of the runs during a base backup. After each:
/// the archive has no gap, every acknowledged commit is in the live database, every backup
/// listed complete verifies, and a new instance restored from the archive to its end holds
/// every acknowledged commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos: make chaos"]
async fn r1_crash_during_archiving_and_backup() {
    let mut t = Trial::new(
        "R1 crash during archiving and backup",
        "no WAL gap; acknowledged commits survive the crash; every complete backup verifies; a restore to latest holds every acknowledged commit",
        50,
        3,
    );
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), "k1", "a7");
    let store = BackupStore::file().unwrap().with_keys(&format!(
        "encryption_key_files = [\"k1={}\"]",
        key.display()
    ));
    let mut fx = agent(&store, "").await;
    create_acked(&fx).await;
    let init = fx
        .pgbench(&["-i", "-s", "2", "-q"])
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert!(init.status.success());
    fx.take_backup().await.unwrap();

    // The gap checker catches a planted hole.
    let mut planted = archived_wal(&store, &layout()).await;
    fx.switch_wal_and_wait_archived(LONG).await.unwrap();
    planted.extend(archived_wal(&store, &layout()).await);
    let middle = planted.iter().nth(1).cloned().unwrap();
    planted.remove(&middle);
    t.self_test("no WAL gap", gaps(&planted) == vec![middle]);

    let mut acked_all: BTreeSet<i64> = BTreeSet::new();
    let mut verified: BTreeSet<String> = BTreeSet::new();
    let restore_every = if pgpilot_test_support::chaos::quick() {
        t.runs()
    } else {
        5
    };
    // The restore checker catches a planted unacknowledged id (checked on the first restore).
    let mut plant_missing = true;
    for run in 1..=t.runs() {
        let crash = match t.rng().random_range(0..3) {
            0 => Crash::Agent,
            1 => Crash::Postgres,
            _ => Crash::Both,
        };
        let in_backup = t.rng().random_bool(0.5);
        let delay = Duration::from_millis(t.rng().random_range(200..2500));
        let writer = Writer::start(&fx, run as i64 * 10_000_000).await;
        let mut pgbench = fx.pgbench(&["-c", "2", "-T", "120", "-n"]).unwrap();
        let backup = if in_backup {
            match fx.client().start_backup(&BackupRequest::default()).await {
                Ok(b) => Some(b.id),
                Err(e) => {
                    t.count("backup start refused");
                    eprintln!("backup not started: {e}");
                    None
                }
            }
        } else {
            None
        };
        if let Some(id) = &backup {
            // Crash when the backup reaches a phase picked at random (manifest write included).
            let phases = [
                BackupPhase::Starting,
                BackupPhase::Copying,
                BackupPhase::Stopping,
                BackupPhase::Finishing,
            ];
            let target = phases[t.rng().random_range(0..phases.len())];
            let deadline = Instant::now() + Duration::from_secs(20);
            let reached = loop {
                match fx.client().backup(id).await {
                    Ok(p) if p.phase == target || p.state != BackupState::Running => {
                        break p.phase;
                    }
                    Err(_) => break target,
                    _ if Instant::now() > deadline => break target,
                    _ => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            };
            t.count(format!("backup {reached:?} at crash").to_lowercase());
        } else {
            tokio::time::sleep(delay).await;
        }
        if let Ok(st) = fx.client().status().await
            && st.archive.is_some_and(|a| a.in_flight > 0)
        {
            t.count("wal-push in flight at crash");
        }
        let postmaster = live_postmaster(&fx.data_dir());
        let restarts = fx
            .client()
            .status()
            .await
            .map(|s| s.crash_restarts)
            .unwrap_or(0);
        t.count(format!("kill -9 {crash:?}").to_lowercase());
        if matches!(crash, Crash::Postgres | Crash::Both)
            && let Some(pid) = postmaster
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if matches!(crash, Crash::Agent | Crash::Both) {
            fx.signal_agent(Signal::SIGKILL).unwrap();
            fx.wait_exit(LONG).unwrap();
        }
        let acked = writer.finish().await;
        let _ = pgbench.kill();
        let _ = pgbench.wait();
        if matches!(crash, Crash::Agent | Crash::Both) {
            fx.spawn().unwrap();
        }
        let result = async {
            // After a crash of Postgres alone, the agent has seen it (one more crash restart).
            let agent_survived = matches!(crash, Crash::Postgres);
            fx.wait_for("Running(Primary) after the crash", LONG, |s| {
                s.state
                    == AgentState::Running {
                        role: Role::Primary,
                    }
                    && (!agent_survived || s.crash_restarts > restarts)
            })
            .await
            .map_err(|e| e.to_string())?;
            acked_all.extend(&acked);
            let sql = fx.sql().await.map_err(|e| e.to_string())?;
            all_acked_present(&sql, &acked_all, "after crash recovery").await?;
            fx.switch_wal_and_wait_archived(LONG)
                .await
                .map_err(|e| format!("archiving did not catch up: {e}"))?;
            let missing = gaps(&archived_wal(&store, &layout()).await);
            if !missing.is_empty() {
                return Err(format!("the archive misses {missing:?}"));
            }
            let list = fx.client().backups().await.map_err(|e| e.to_string())?;
            for b in list.backups {
                if b.state == BackupState::Completed && !verified.contains(&b.id) {
                    let out = fx.cli(&["verify", &b.id]).map_err(|e| e.to_string())?;
                    if !out.success() {
                        return Err(format!(
                            "backup {} is listed complete but does not verify: {}",
                            b.id,
                            out.text()
                        ));
                    }
                    verified.insert(b.id);
                }
            }
            if run % restore_every == 0 || run == t.runs() {
                let copy = restore_copy(&fx, &store.toml(), &format!("copy{run}")).await?;
                let csql = copy.sql().await.map_err(|e| e.to_string())?;
                if plant_missing {
                    plant_missing = false;
                    let mut planted = acked_all.clone();
                    planted.insert(-1);
                    let caught = all_acked_present(&csql, &planted, "planted").await.is_err();
                    t.self_test("restore holds every acknowledged commit", caught);
                }
                all_acked_present(&csql, &acked_all, "in the restored copy").await?;
                t.count("restores to latest checked");
            }
            Ok(())
        }
        .await;
        if let Some(b) = backup
            && verified.contains(&b)
        {
            t.count("backups crashed into that still completed and verified");
        }
        t.check(run, result);
    }
    t.count(format!("acknowledged commits checked: {}", acked_all.len()));
    t.finish();
}

// ---------------------------------------------------------------------------------------------
// R2: damaged archives.

/// Offsets of each record of an archive object (start of its head, its whole length) after
/// the header; the header's own length first.
fn records(stored: &[u8]) -> (usize, Vec<(usize, usize)>) {
    use pgpilot_common::archive::format::{FIXED_HEADER_LEN, RECORD_HEAD_LEN};
    let header = FIXED_HEADER_LEN + stored[FIXED_HEADER_LEN - 1] as usize + 4;
    let mut pos = header;
    let mut out = Vec::new();
    while pos + RECORD_HEAD_LEN <= stored.len() {
        let len = u32::from_le_bytes(stored[pos + 1..pos + 5].try_into().unwrap()) as usize;
        out.push((pos, RECORD_HEAD_LEN + len));
        pos += RECORD_HEAD_LEN + len;
    }
    (header, out)
}

/// One kind of damage to one object.
#[derive(Debug, Clone)]
enum Damage {
    /// A bit flipped at this offset (the label says in which part).
    Flip(&'static str, usize),
    Truncate(usize),
    /// Records i and j swapped.
    Reorder(usize, usize),
    /// Record i written twice.
    Duplicate(usize),
    /// The object replaced by another object's content.
    SwapWith(PathBuf),
    Missing,
}

impl Damage {
    fn label(&self) -> String {
        match self {
            Damage::Flip(part, _) => format!("bit flipped in {part}"),
            Damage::Truncate(_) => "truncated at a frame boundary".into(),
            Damage::Reorder(..) => "chunks reordered".into(),
            Damage::Duplicate(_) => "chunk duplicated".into(),
            Damage::SwapWith(_) => "swapped with another object".into(),
            Damage::Missing => "missing".into(),
        }
    }

    /// Applies the damage to the object file at `path` (the file store's object).
    fn apply(&self, path: &Path, original: &[u8]) {
        let (_, recs) = records(original);
        let bytes = match self {
            Damage::Flip(_, at) => {
                let mut b = original.to_vec();
                b[*at] ^= 0x10;
                b
            }
            Damage::Truncate(at) => original[..*at].to_vec(),
            Damage::Reorder(i, j) => {
                let (a, b) = (recs[*i], recs[*j]);
                let mut out = original[..a.0].to_vec();
                out.extend_from_slice(&original[b.0..b.0 + b.1]);
                out.extend_from_slice(&original[a.0 + a.1..b.0]);
                out.extend_from_slice(&original[a.0..a.0 + a.1]);
                out.extend_from_slice(&original[b.0 + b.1..]);
                out
            }
            Damage::Duplicate(i) => {
                let r = recs[*i];
                let mut out = original[..r.0 + r.1].to_vec();
                out.extend_from_slice(&original[r.0..]);
                out
            }
            Damage::SwapWith(other) => std::fs::read(other).unwrap(),
            Damage::Missing => {
                std::fs::remove_file(path).unwrap();
                return;
            }
        };
        std::fs::write(path, bytes).unwrap();
    }
}

/// Every kind of damage to `original`, at positions the RNG picks; `other` is an object to
/// swap in.
fn damages(t: &mut Trial, original: &[u8], other: &Path, encrypted: bool) -> Vec<Damage> {
    use pgpilot_common::archive::crypto::TAG_LEN;
    use pgpilot_common::archive::format::RECORD_HEAD_LEN;
    let (header, recs) = records(original);
    let data = &recs[..recs.len() - 1];
    let trailer = recs[recs.len() - 1];
    let mut out = vec![
        Damage::Flip("the header", t.rng().random_range(8..header)),
        {
            let (pos, len) = data[t.rng().random_range(0..data.len())];
            Damage::Flip(
                "a chunk",
                pos + RECORD_HEAD_LEN + t.rng().random_range(0..len - RECORD_HEAD_LEN - TAG_LEN),
            )
        },
        {
            let (pos, len) = data[t.rng().random_range(0..data.len())];
            let part = if encrypted {
                "a chunk's tag"
            } else {
                "a chunk's last bytes"
            };
            Damage::Flip(part, pos + len - 1 - t.rng().random_range(0..TAG_LEN))
        },
        Damage::Flip(
            "the trailer",
            trailer.0 + RECORD_HEAD_LEN + t.rng().random_range(0..trailer.1 - RECORD_HEAD_LEN),
        ),
        Damage::Flip("a record's length", trailer.0 + 1),
    ];
    // Truncated at every frame boundary: inside the header, after it, before every record.
    out.push(Damage::Truncate(t.rng().random_range(1..header)));
    out.extend(recs.iter().map(|(pos, _)| Damage::Truncate(*pos)));
    if data.len() >= 2 {
        out.push(Damage::Reorder(0, 1));
    }
    out.push(Damage::Duplicate(0));
    out.push(Damage::SwapWith(other.to_path_buf()));
    out.push(Damage::Missing);
    out
}

/// Every kind of damage to a WAL segment restore needs, to a backup's data file, to its
/// manifest, and the wrong or a missing key: wal-fetch, verify and a restore each refuse,
/// naming the object, and no restore completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos: make chaos"]
async fn r2_damaged_archives_are_refused() {
    let mut t = Trial::new(
        "R2 damaged archives",
        "wal-fetch, verify and a restore refuse every damaged WAL segment, backup file and manifest, naming it; wrong and missing keys are refused; 0 restores complete",
        1,
        1,
    );
    t.set_runs(0);
    let mut run = 0;
    // Encrypted and compressed (GCM tags catch the damage), then plain and uncompressed
    // (checksums catch it; every WAL object has the same size, so a swap is a same-size swap).
    damaged_archives(&mut t, &mut run, true, "zstd").await;
    damaged_archives(&mut t, &mut run, false, "none").await;
    t.finish();
}

/// R2 on one archive: `encrypted` or not, with `compression`.
async fn damaged_archives(t: &mut Trial, run: &mut usize, encrypted: bool, compression: &str) {
    let kind = format!(
        "{compression}, {}",
        if encrypted {
            "AES-256-GCM"
        } else {
            "unencrypted"
        }
    );
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), "k1", "5c");
    let key_toml = format!("encryption_key_files = [\"k1={}\"]", key.display());
    let store = BackupStore::file_with_compression(compression).unwrap();
    let store = if encrypted {
        store.with_keys(&key_toml)
    } else {
        store
    };
    let fx = agent(&store, "").await;
    let sql = fx.sql().await.unwrap();
    // Enough rows for a data file of several chunks.
    sql.batch_execute(
        "CREATE TABLE acked (id bigint PRIMARY KEY, pad text); \
         INSERT INTO acked SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 60000) g",
    )
    .await
    .unwrap();
    let backup = fx.take_backup().await.unwrap();
    // WAL after the backup: rows only a replay of every segment brings back.
    for i in 0..3_i64 {
        sql.execute(
            "INSERT INTO acked SELECT g, 'after' FROM generate_series($1::bigint, $1::bigint + 999) g",
            &[&(100_000 + i * 1000)],
        )
        .await
        .unwrap();
        fx.switch_wal_and_wait_archived(LONG).await.unwrap();
    }
    let ids: BTreeSet<i64> = (1..=60000).chain(100_000..103_000).collect();
    // Control: undamaged, a restore holds every row.
    let copy = restore_copy(&fx, &store.toml(), "control").await.unwrap();
    all_acked_present(&copy.sql().await.unwrap(), &ids, "control restore")
        .await
        .unwrap();
    drop(copy);

    let list = fx.client().backups().await.unwrap();
    let info = list.backups.iter().find(|b| b.id == backup).unwrap();
    let wal_end = info.wal_end.clone().unwrap();
    let wal = archived_wal(&store, &layout()).await;
    let segments: Vec<&String> = wal.iter().filter(|n| n.len() == 24).collect();
    // The first segment after the backup's end: only restore and wal-fetch need it.
    let after = segments
        .iter()
        .position(|n| **n > wal_end)
        .expect("WAL after the backup");
    let targets: Vec<(String, String, String)> = {
        let root = store.root();
        let mut files: Vec<(u64, String)> = store
            .keys_under(&layout().backup_prefix(&backup))
            .await
            .into_iter()
            .filter(|k| !k.ends_with(&layout().manifest_key(&backup)))
            .map(|k| (std::fs::metadata(root.join(&k)).unwrap().len(), k))
            .collect();
        files.sort();
        let biggest = files.last().unwrap().1.clone();
        let second = files[files.len() - 2].1.clone();
        vec![
            (
                format!("WAL segment {} (restore)", segments[after]),
                layout().wal_key(segments[after]),
                layout().wal_key(segments[after + 1]),
            ),
            (
                format!(
                    "WAL segment {} (backup, restore)",
                    info.wal_start.clone().unwrap()
                ),
                layout().wal_key(info.wal_start.as_ref().unwrap()),
                layout().wal_key(segments[after]),
            ),
            ("a backup data file".into(), biggest, second.clone()),
            (
                "the backup manifest".into(),
                layout().manifest_key(&backup),
                second,
            ),
        ]
    };
    // Every case, listed first so that the report counts them.
    let mut cases = Vec::new();
    for (what, key, other) in targets {
        let original = std::fs::read(store.root().join(&key)).unwrap();
        for damage in damages(t, &original, &store.root().join(&other), encrypted) {
            cases.push((what.clone(), key.clone(), damage));
        }
    }
    t.set_runs(t.runs() + cases.len() + if encrypted { 2 } else { 0 });
    for (what, key, damage) in cases {
        let path = store.root().join(&key);
        let original = std::fs::read(&path).unwrap();
        let short = key
            .rsplit('/')
            .next()
            .unwrap()
            .trim_end_matches(pgpilot_common::layout::EXT)
            .to_string();
        let is_wal = key.starts_with(&layout().wal_prefix());
        let verify_needs = !what.ends_with("(restore)");
        {
            *run += 1;
            let run = *run;
            damage.apply(&path, &original);
            t.count(format!("archive: {kind}"));
            t.count(format!("damaged: {what}"));
            t.count(format!("damage: {}", damage.label()));
            let result = async {
                let mut problems = Vec::new();
                if is_wal {
                    let dest = fx.dir.path().join("fetched");
                    let out = fx
                        .wal_command("wal-fetch", &[&short, dest.to_str().unwrap()])
                        .unwrap();
                    let _ = std::fs::remove_file(&dest);
                    let missing = matches!(damage, Damage::Missing);
                    if out.success() || (!missing && !out.text().contains(&short)) {
                        problems.push(format!("wal-fetch: {}", out.text()));
                    }
                }
                if verify_needs {
                    let out = fx.cli(&["verify", &backup]).unwrap();
                    if out.success() || !out.text().contains(&short) {
                        problems.push(format!("verify: {}", out.text()));
                    }
                }
                let name = format!("copy{run}");
                match restore_copy(&fx, &store.toml(), &name).await {
                    Ok(copy) => {
                        let sql = copy.sql().await.unwrap();
                        let n = present(&sql, &ids.iter().copied().collect::<Vec<_>>())
                            .await
                            .unwrap_or(-1);
                        problems.push(format!("a restore completed ({n} of {} rows)", ids.len()));
                    }
                    // Without its manifest there is no backup to restore: the refusal says so.
                    Err(e)
                        if matches!(damage, Damage::Missing)
                            && key.ends_with(&layout().manifest_key(&backup))
                            && e.contains("no complete backup") => {}
                    Err(e) => {
                        if !e.contains(&short) {
                            problems
                                .push(format!("the restore's refusal does not name {short}: {e}"));
                        }
                    }
                }
                verdict(problems).map_err(|e| format!("{what}, {}: {e}", damage.label()))
            }
            .await;
            std::fs::write(&path, &original).unwrap();
            t.check(run, result);
        }
    }
    if !encrypted {
        return;
    }
    // The wrong key, and a key file that is not there.
    let wrong = key_file(keys.path(), "wrong", "77");
    for (label, path) in [
        ("wrong key", wrong),
        ("key file missing", keys.path().join("absent")),
    ] {
        *run += 1;
        let run = *run;
        t.count(label);
        let toml = store.toml().replace(
            &key_toml,
            &format!("encryption_key_files = [\"k1={}\"]", path.display()),
        );
        let result = match restore_copy(&fx, &toml, &format!("copy{run}")).await {
            Ok(_) => Err(format!("{label}: a restore completed")),
            Err(e) if e.contains(&path.display().to_string()) || e.contains("manifest") => Ok(()),
            Err(e) => Err(format!(
                "{label}: the refusal names neither the key nor the object: {e}"
            )),
        };
        t.check(run, result);
    }
}

// ---------------------------------------------------------------------------------------------
// R4: two clusters archiving into one prefix.

/// SHA-256 of every object file under `dir`.
fn object_digests(dir: &Path) -> BTreeMap<String, String> {
    use sha2::{Digest, Sha256};
    pgpilot_test_support::store::files_under(dir)
        .into_iter()
        .map(|f| {
            let digest = Sha256::digest(std::fs::read(&f).unwrap_or_default());
            (f, format!("{digest:x}"))
        })
        .collect()
}

/// A second cluster (its own initdb) configured with the same store, cluster and shard as a
/// running one, writing more WAL than the first has: everything it pushes is refused, nothing
/// of the first cluster's archive changes, it says so loudly (log line, metric), and the first
/// cluster keeps archiving and restoring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos: make chaos"]
async fn r4_two_writers_into_one_archive() {
    let mut t = Trial::new(
        "R4 two writers",
        "a second cluster's WAL and backups are refused with a log line and a metric; no object of the first changes; the first keeps archiving and restores every row",
        3,
        1,
    );
    let store = BackupStore::file().unwrap();
    let a = agent(&store, "").await;
    create_acked(&a).await;
    let sql = a.sql().await.unwrap();
    a.take_backup().await.unwrap();
    let mut acked: BTreeSet<i64> = BTreeSet::new();
    let prefix = store.root().join(CLUSTER);
    for run in 1..=t.runs() {
        let first = run as i64 * 1000;
        sql.execute(
            "INSERT INTO acked SELECT generate_series($1::bigint, $1::bigint + 99)",
            &[&first],
        )
        .await
        .unwrap();
        acked.extend(first..first + 100);
        a.switch_wal_and_wait_archived(LONG).await.unwrap();
        let before = object_digests(&prefix);
        let a_segments = archived_wal(&store, &layout()).await.len();
        let b = agent(&store, "").await;
        let result = async {
            let bsql = b.sql().await.map_err(|e| e.to_string())?;
            // More WAL than the first cluster has, so some of its names are new to the archive.
            for _ in 0..a_segments + 2 {
                let _ = bsql
                    .batch_execute("CREATE TABLE IF NOT EXISTS x (i int); INSERT INTO x VALUES (1); SELECT pg_switch_wal()")
                    .await;
            }
            let backup = b.client().start_backup(&BackupRequest::default()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            let mut problems = Vec::new();
            let failed: i64 = bsql
                .query_one("SELECT failed_count FROM pg_stat_archiver", &[])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if failed == 0 {
                problems.push("the second cluster's archive_command never failed".to_string());
            }
            let metrics = b.metrics().await.map_err(|e| e.to_string())?;
            if metrics.contains("pgpilot_wal_archive_conflicts_total 0") {
                problems.push("pgpilot_wal_archive_conflicts_total stayed 0".into());
            }
            if !b.logs().contains("another cluster") {
                problems.push("no log line names another cluster".into());
            }
            if let Ok(started) = backup {
                let p = b.wait_backup(&started.id).await.map_err(|e| e.to_string())?;
                if p.state == BackupState::Completed {
                    problems.push(format!(
                        "the second cluster's backup {} completed into the first's archive",
                        p.id
                    ));
                }
                t.count(format!("second cluster's backup {:?}", p.state).to_lowercase());
            } else {
                t.count("second cluster's backup refused at the start");
            }
            let after = object_digests(&prefix);
            let changed: Vec<&String> = before
                .iter()
                .filter(|(k, v)| after.get(*k) != Some(*v))
                .map(|(k, _)| k)
                .collect();
            if !changed.is_empty() {
                problems.push(format!("objects of the first cluster changed: {changed:?}"));
            }
            let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
            let new_wal: Vec<&&String> = added.iter().filter(|k| k.contains("/wal/")).collect();
            if !new_wal.is_empty() {
                problems.push(format!("the second cluster added WAL: {new_wal:?}"));
            }
            drop(b);
            // The first cluster goes on: archives, no gap, restores every row.
            a.switch_wal_and_wait_archived(LONG)
                .await
                .map_err(|e| format!("the first cluster stopped archiving: {e}"))?;
            let missing = gaps(&archived_wal(&store, &layout()).await);
            if !missing.is_empty() {
                problems.push(format!("the archive misses {missing:?}"));
            }
            let copy = restore_copy(&a, &store.toml(), &format!("copy{run}")).await?;
            all_acked_present(&copy.sql().await.map_err(|e| e.to_string())?, &acked, "restored copy").await?;
            verdict(problems)
        }
        .await;
        t.check(run, result);
    }
    t.finish();
}

// ---------------------------------------------------------------------------------------------
// R3: store outages and a slow, resetting store.

/// A TCP proxy in front of a store that, while `faulty`, delays every read by 20–300 ms and
/// resets about one connection in eight after a random number of bytes.
struct FaultProxy {
    port: u16,
    faulty: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    async fn start(upstream: u16, seed: u64) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let faulty = Arc::new(AtomicBool::new(false));
        let f = faulty.clone();
        let task = tokio::spawn(async move {
            let mut n = seed;
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let (conn_seed, f) = (n, f.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    proxy_conn(client, server, f, conn_seed).await;
                });
            }
        });
        FaultProxy { port, faulty, task }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_conn(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    faulty: Arc<AtomicBool>,
    seed: u64,
) {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let reset_after: Option<usize> = rng
        .random_bool(0.125)
        .then(|| rng.random_range(0..256 * 1024));
    let delay = Duration::from_millis(rng.random_range(20..300));
    let copied = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Either direction ending (EOF, error, or the planned reset) closes both: the connection
    // drops mid-request or mid-response.
    tokio::select! {
        _ = pump(cr, sw, faulty.clone(), copied.clone(), delay, reset_after) => {}
        _ = pump(sr, cw, faulty, copied, delay, reset_after) => {}
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    faulty: Arc<AtomicBool>,
    copied: Arc<std::sync::atomic::AtomicUsize>,
    delay: Duration,
    reset_after: Option<usize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if faulty.load(Ordering::Relaxed) {
            tokio::time::sleep(delay).await;
            let total = copied.fetch_add(n, Ordering::Relaxed) + n;
            if reset_after.is_some_and(|at| total > at) {
                return;
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// How many WAL files wait in pg_wal/archive_status as `.ready` (Postgres keeps them).
fn ready_files(fx: &AgentFixture) -> usize {
    std::fs::read_dir(fx.data_dir().join("pg_wal/archive_status"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".ready"))
                .count()
        })
        .unwrap_or(0)
}

/// One metric's value in a Prometheus text page (first series with that name).
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Under a writer: the S3 store down (s3s-fs stopped) for 60 s (10 s quick), then slow and
/// resetting connections through a proxy for 60 s (15 s quick); then a file store made
/// read-only for as long. During the outage
/// archive_command fails, Postgres keeps the WAL as `.ready`, the failure metric and the
/// archive age move; afterwards archiving catches up with no gap and a restore holds every
/// acknowledged commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos: make chaos"]
async fn r3_store_outages() {
    let quick = pgpilot_test_support::chaos::quick();
    let mut t = Trial::new(
        "R3 store outages",
        "during an outage archive_command fails, the WAL stays .ready, failure metrics move; afterwards no gap and a restore holds every acknowledged commit",
        2,
        1,
    );
    let mut store = BackupStore::s3().unwrap();
    let endpoint = store.s3_server().endpoint.clone();
    let s3_port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = FaultProxy::start(s3_port, t.rng().random()).await;
    // The agent reaches the store through the proxy; checks and restores go direct.
    let through_proxy = store.toml().replace(
        &format!("127.0.0.1:{s3_port}"),
        &format!("127.0.0.1:{}", proxy.port),
    );
    let fx = AgentFixture::start_with(agent_bin!(), 15, options(CLUSTER, through_proxy))
        .await
        .unwrap();
    create_acked(&fx).await;
    fx.take_backup().await.unwrap();
    let mut acked_all = BTreeSet::new();
    let (outage, slow) = if quick { (10, 15) } else { (60, 60) };
    for run in 1..=t.runs() {
        let result = async {
            let before = ArchiveFailures::read(&fx).await?;
            let writer = Writer::start(&fx, run as i64 * 10_000_000).await;
            store.s3_server().stop();
            t.count(format!("S3 store down {outage} s"));
            tokio::time::sleep(Duration::from_secs(outage)).await;
            let mut problems = before.moved(&fx, &mut t).await?;
            store.s3_server().restart().map_err(|e| e.to_string())?;
            proxy.faulty.store(true, Ordering::Relaxed);
            t.count(format!("S3 store slow and resetting {slow} s"));
            tokio::time::sleep(Duration::from_secs(slow)).await;
            proxy.faulty.store(false, Ordering::Relaxed);
            acked_all.extend(writer.finish().await);
            problems.extend(caught_up(&fx, &store, &acked_all, &format!("copy{run}")).await?);
            verdict(problems)
        }
        .await;
        t.check(run, result);
    }
    drop(fx);

    // The file store made unwritable (a read-only mount: root writes through file modes).
    let runs = t.runs();
    let store = BackupStore::file().unwrap();
    let Some(disk) = SmallDisk::mount(store.root(), "1g") else {
        t.count("file store outage skipped: mounting a tmpfs needs root with CAP_SYS_ADMIN");
        t.finish();
        return;
    };
    t.set_runs(runs + 1);
    let fx = agent(&store, "").await;
    create_acked(&fx).await;
    fx.take_backup().await.unwrap();
    let mut acked_file = BTreeSet::new();
    let result = async {
        let before = ArchiveFailures::read(&fx).await?;
        let writer = Writer::start(&fx, 1).await;
        disk.remount("ro");
        t.count(format!("file store read-only {outage} s"));
        tokio::time::sleep(Duration::from_secs(outage)).await;
        let mut problems = before.moved(&fx, &mut t).await?;
        disk.remount("rw");
        acked_file.extend(writer.finish().await);
        problems.extend(caught_up(&fx, &store, &acked_file, "copy-file").await?);
        verdict(problems)
    }
    .await;
    t.check(runs + 1, result);
    t.count(format!(
        "acknowledged commits checked: {}",
        acked_all.len() + acked_file.len()
    ));
    drop(fx);
    drop(disk);
    t.finish();
}

/// Archiving's failure counters before an outage: Postgres' own and the agent's metric.
struct ArchiveFailures {
    postgres: i64,
    metric: f64,
}

impl ArchiveFailures {
    async fn read(fx: &AgentFixture) -> Result<ArchiveFailures, String> {
        let sql = fx.sql().await.map_err(|e| e.to_string())?;
        let postgres = sql
            .query_one("SELECT failed_count FROM pg_stat_archiver", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        let page = fx.metrics().await.map_err(|e| e.to_string())?;
        Ok(ArchiveFailures {
            postgres,
            metric: metric(&page, "pgpilot_wal_archive_failures_total"),
        })
    }

    /// At an outage's end: archive_command failed, Postgres kept the WAL as `.ready`, and the
    /// failure metric moved. What did not happen, as problems.
    async fn moved(&self, fx: &AgentFixture, t: &mut Trial) -> Result<Vec<String>, String> {
        let now = ArchiveFailures::read(fx).await?;
        let mut problems = Vec::new();
        if now.postgres <= self.postgres {
            problems.push("archive_command never failed during the outage".to_string());
        }
        let ready = ready_files(fx);
        if ready == 0 {
            problems.push("no WAL kept as .ready during the outage".into());
        }
        t.count(format!(
            "WAL files kept .ready at the outage's end: {}",
            if ready > 8 { "> 8" } else { "1-8" }
        ));
        if now.metric <= self.metric {
            problems.push("pgpilot_wal_archive_failures_total did not move".into());
        }
        Ok(problems)
    }
}

/// After an outage: archiving catches up, the archive has no gap, and a copy restored from it
/// holds every acknowledged commit. The gap as a problem; the rest as errors.
async fn caught_up(
    fx: &AgentFixture,
    store: &BackupStore,
    acked: &BTreeSet<i64>,
    copy_name: &str,
) -> Result<Vec<String>, String> {
    fx.switch_wal_and_wait_archived(LONG)
        .await
        .map_err(|e| format!("archiving did not catch up: {e}"))?;
    let mut problems = Vec::new();
    let missing = gaps(&archived_wal(store, &layout()).await);
    if !missing.is_empty() {
        problems.push(format!("the archive misses {missing:?}"));
    }
    let copy = restore_copy(fx, &store.toml(), copy_name).await?;
    all_acked_present(
        &copy.sql().await.map_err(|e| e.to_string())?,
        acked,
        "restored copy",
    )
    .await?;
    Ok(problems)
}

// ---------------------------------------------------------------------------------------------
// R5: API and CLI fuzzing.

/// The OpenAPI document's operations: (method, path, whether it needs the token).
fn operations() -> Vec<(String, String, bool)> {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            pgpilot_test_support::tools::workspace_root().join("docs/openapi.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let secured = op
                .get("security")
                .and_then(|s| s.as_array())
                .is_some_and(|s| !s.is_empty());
            out.push((method.to_uppercase(), path.clone(), secured));
        }
    }
    out
}

/// schemathesis (PyPI, 4.32.5) drives every operation of docs/openapi.json against a running
/// agent with an archive: no 5xx but the probes' documented 503, answers conform to the
/// document, malformed bodies are refused. Then every protected route answers 401 without a
/// token and with a wrong one, every POST route 413 to a 3 MiB body, and the CLI's argument
/// parsing never panics on random argument lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos: make chaos"]
async fn r5_api_and_cli_fuzzing() {
    let quick = pgpilot_test_support::chaos::quick();
    let mut t = Trial::new(
        "R5 API and CLI fuzzing",
        "schemathesis: no 5xx, answers conform to the OpenAPI document, malformed bodies refused; 401 on every protected route without or with a wrong token; 413 on large bodies; no CLI panic",
        1,
        1,
    );
    let ops = operations();
    let posts = ops.iter().filter(|(m, _, _)| m == "POST").count();
    let protected = ops.iter().filter(|(_, _, s)| *s).count();
    let cli_cases = if quick { 300 } else { 3000 };
    t.set_runs(3 + 2 * protected + posts + 1);
    let store = BackupStore::file().unwrap();
    let fx = agent(&store, "").await;
    let base = format!("http://{}", fx.api);
    let mut run = 0;

    // 1. Authentication on every protected route, and the body limit on every POST route.
    let http = reqwest::Client::new();
    let loopback = format!("http://{}", fx.loopback);
    for (method, path, secured) in &ops {
        let url = format!("{loopback}{}", path.replace("{id}", "20261205T000000Z"));
        let m: reqwest::Method = method.parse().unwrap();
        if *secured {
            // On the pod-IP listener too, where the WAL routes are not served at all.
            let loopback_only =
                path.starts_with("/v1/wal/push") || path.starts_with("/v1/wal/fetch");
            let external = format!("{base}{}", path.replace("{id}", "20261205T000000Z"));
            for (label, token) in [("no token", None), ("a wrong token", Some("wrong-token"))] {
                run += 1;
                let mut problems = Vec::new();
                for (listener, url, want) in [
                    ("loopback", &url, 401),
                    ("pod IP", &external, if loopback_only { 404 } else { 401 }),
                ] {
                    let mut req = http.request(m.clone(), url).json(&serde_json::json!({}));
                    if let Some(tok) = token {
                        req = req.bearer_auth(tok);
                    }
                    let status = req.send().await.map(|r| r.status().as_u16());
                    if status.as_ref().ok() != Some(&want) {
                        problems.push(format!("{listener}: {status:?}, not {want}"));
                    }
                }
                t.count(format!("401 checks ({label}, both listeners)"));
                t.check(
                    run,
                    verdict(problems).map_err(|e| format!("{method} {path} with {label}: {e}")),
                );
            }
        }
        if method == "POST" {
            run += 1;
            let status = pgpilot_test_support::net::status_of_declared_body(
                fx.loopback,
                path,
                &fx.token,
                3 << 20,
            )
            .await;
            t.count("413 checks");
            t.check(
                run,
                match status {
                    Ok(413) => Ok(()),
                    other => Err(format!(
                        "{method} {path} with a 3 MiB body: {other:?}, not 413"
                    )),
                },
            );
        }
    }

    // 2. schemathesis: every operation but the drain (a drained agent exits, as its pod goes),
    // then the drain alone.
    let schemathesis = pgpilot_test_support::tools::tool("chaos-venv/bin/schemathesis").unwrap();
    // The probes answer 503 by design (documented): there, every check but "no 5xx".
    let probes = "^/(primary|replica|readyz|startupz)$";
    let all_checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection";
    let probe_checks =
        "status_code_conformance,content_type_conformance,response_schema_conformance";
    let passes: [(&[&str], &str); 3] = [
        (
            &[
                "--exclude-path",
                "/v1/drain",
                "--exclude-path-regex",
                probes,
            ],
            all_checks,
        ),
        (&["--include-path-regex", probes], probe_checks),
        (&["--include-path", "/v1/drain"], all_checks),
    ];
    for (filter, checks) in passes {
        run += 1;
        let seed = t.rng().random_range(0..u32::MAX).to_string();
        let examples = if quick { "10" } else { "60" };
        let token_header = format!("Authorization: Bearer {}", fx.token);
        let schema = pgpilot_test_support::tools::workspace_root().join("docs/openapi.json");
        let out = std::process::Command::new(&schemathesis)
            .args([
                "run",
                schema.to_str().unwrap(),
                "--url",
                &loopback,
                "--header",
                &token_header,
            ])
            .args(["--checks", checks, "--request-timeout", "60"])
            .args([
                "--max-examples",
                examples,
                "--seed",
                &seed,
                "--workers",
                "1",
            ])
            .args([
                "--phases",
                "examples,coverage,fuzzing",
                "--continue-on-failure",
            ])
            .args(["--suppress-health-check", "all", "--no-color"])
            .args(filter)
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{text}");
        if let Some(line) = text.lines().find(|l| l.contains("test cases")) {
            t.count(format!("schemathesis: {}", line.trim()));
        }
        t.check(
            run,
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "schemathesis found failures (seed {seed}):\n{}",
                    tail_lines(&text, 60)
                ))
            },
        );
    }

    // 3. The CLI's argument parsing: random lists of subcommands, flags and junk never panic.
    run += 1;
    // Not `run` (it would start an agent on the default ports) nor `install` (it writes a
    // binary where it is told).
    let words = [
        "status",
        "stop",
        "start",
        "restart",
        "reload",
        "restore",
        "switchover",
        "promote",
        "demote",
        "follow",
        "reinitialize",
        "drain",
        "install",
        "openapi",
        "wal-push",
        "backup",
        "backups",
        "verify",
        "retention",
        "wal-fetch",
        "help",
        "--help",
        "--json",
        "--wait",
        "--timeout",
        "--target-time",
        "--target-lsn",
        "--target-xid",
        "--target-name",
        "--immediate",
        "--latest",
        "--force",
        "--api-url",
        "--token-file",
        "--runtime",
        "--config",
        "--data-dir",
        "--candidate",
        "--inclusive",
        "--timeline",
        "--keep",
        "-",
        "--",
        "=",
        "0",
        "-1",
        "18446744073709551616",
        "0/0",
        "FFFFFFFF/FFFFFFFF",
        "2026-13-45T25:61:61Z",
        "not a time",
        "http://",
        "http://127.0.0.1:1",
        "/nonexistent",
        "\u{0}",
        "ä",
        "%s%n",
        "000000010000000000000001",
        "../../etc/passwd",
    ];
    let scratch = tempfile::tempdir().unwrap();
    let mut panics = Vec::new();
    // Every third list goes to pgpilot-wal, the archive_command front, behind the agent binary
    // it would hand over to (its own parser; docs/archiving.md).
    let front = agent_bin!().with_file_name("pgpilot-wal");
    for case in 0..cli_cases {
        let n = t.rng().random_range(0..6);
        let mut args: Vec<&str> = (0..n)
            .map(|_| words[t.rng().random_range(0..words.len())])
            .filter(|w| !w.contains('\u{0}'))
            .collect();
        let program = if case % 3 == 2 {
            args.insert(0, agent_bin!().to_str().unwrap());
            t.count("pgpilot-wal argument lists run");
            front.as_path()
        } else {
            agent_bin!()
        };
        // Never let a fuzzed command reach the running agent or a real data dir.
        let err_path = scratch.path().join("stderr");
        let mut child = std::process::Command::new(program)
            .args(&args)
            .current_dir(scratch.path())
            .env("PGPILOT_API_URL", "http://127.0.0.1:9")
            .env_remove("PGPILOT_API_TOKEN_FILE")
            .env("PGPILOT_DATA_DIR", scratch.path().join("pg"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap();
        t.count("CLI argument lists run");
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        match status {
            None => panics.push(format!("{args:?}: still running after 15 s")),
            Some(st) if st.code() == Some(101) || stderr.contains("panicked") => {
                panics.push(format!("{args:?}: {}", tail_lines(&stderr, 5)));
            }
            Some(_) => {}
        }
    }
    t.check(
        run,
        if panics.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the CLI panicked on {} argument lists: {panics:?}",
                panics.len()
            ))
        },
    );
    t.finish();
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Disk full.

/// A tmpfs of `size` mounted at `dir` (created), unmounted on drop; `None` where mounting is
/// not allowed (not root, or no CAP_SYS_ADMIN).
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk {
            dir: dir.to_path_buf(),
        })
    }

    fn resize(&self, size: &str) {
        self.remount(&format!("size={size}"));
    }

    /// `mount -o remount,<options>` (a size, `ro`, `rw`).
    fn remount(&self, options: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {} {options}", self.dir.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// The data dir on a 160 MiB file system that a writer fills: Postgres stops on the full disk
/// as it does (the log says "No space left on device"), the archive stays intact (every object
/// verifies, no gap), and once space returns Postgres is back with every acknowledged commit
/// and archiving goes on. A restore onto a file system too small for the backup fails with the
/// same clear reason and touches nothing in the archive; with space back it restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos: make chaos"]
async fn disk_full_while_writing_and_restoring() {
    let mut t = Trial::new(
        "Disk full",
        "the full disk is named in the failed statement and the agent's log; every archived object verifies, no gap; after space returns every acknowledged commit is there and archiving goes on; a restore onto a full disk fails clearly and changes no object, and restores once space returns",
        3,
        1,
    );
    let store = BackupStore::file().unwrap();
    let opts = options(
        CLUSTER,
        format!(
            "{}[postgres.parameters]\nmax_wal_size = '64MB'\nmin_wal_size = '32MB'\n",
            store.toml()
        ),
    );
    let mut fx = AgentFixture::prepare(agent_bin!(), 15, &opts).unwrap();
    let Some(disk) = SmallDisk::mount(&fx.data_dir(), "160m") else {
        t.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN");
        return;
    };
    fx.spawn().unwrap();
    fx.wait_running(LONG).await.unwrap();
    create_acked(&fx).await;
    fx.take_backup().await.unwrap();
    let mut acked: BTreeSet<i64> = BTreeSet::new();
    // The runs that fill the disk, then one restore onto a full disk.
    let fills = t.runs();
    t.set_runs(fills + 1);
    for run in 1..=fills {
        let result = async {
            // Fill the disk: rows of incompressible text until Postgres refuses or stops.
            let sql = fx.sql().await.map_err(|e| e.to_string())?;
            let mut id = run as i64 * 10_000_000;
            let full_at = loop {
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                let insert = sql.execute(
                    "INSERT INTO acked SELECT g, string_agg(md5(random()::text), '') FROM generate_series($1::bigint, $1::bigint + 99) g, generate_series(1, 60) GROUP BY g",
                    &params,
                );
                match tokio::time::timeout(Duration::from_secs(30), insert).await {
                    Ok(Ok(_)) => {
                        acked.extend(id..id + 100);
                        id += 100;
                    }
                    Ok(Err(e)) => {
                        break e
                            .as_db_error()
                            .map(|d| format!("{}: {}", d.severity(), d.message()))
                            .unwrap_or_else(|| e.to_string());
                    }
                    Err(_) => break "an insert hung for 30 s".to_string(),
                }
            };
            t.count(format!(
                "writes stopped by: {}",
                if full_at.contains("could not extend") {
                    "could not extend a table file"
                } else if full_at.contains("space") {
                    "No space left on device"
                } else {
                    "connection lost"
                }
            ));
            let mut problems = Vec::new();
            // Postgres' own behaviour: the statement fails naming the file it could not extend
            // (or the server stops on a WAL write), and its log line reaches the agent's log.
            let says_full = |t: &str| {
                t.contains("No space left on device") || t.contains("could not extend file")
            };
            if !says_full(&full_at) {
                problems.push(format!("the writer's error does not say the disk is full: {full_at}"));
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while !says_full(&fx.logs()) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if !says_full(&fx.logs()) {
                problems.push("the agent's log never says the disk is full".into());
            }
            // The archive is intact.
            let objects = store.open();
            for name in archived_wal(&store, &layout()).await {
                if let Err(e) = objects.verify(&layout().wal_key(&name)).await {
                    problems.push(format!("archived {name} does not verify: {e}"));
                }
            }
            let missing = gaps(&archived_wal(&store, &layout()).await);
            if !missing.is_empty() {
                problems.push(format!("the archive misses {missing:?}"));
            }
            // Space returns: Postgres comes back with every acknowledged commit, archives on.
            disk.resize(&format!("{}m", 160 + 200 * run));
            fx.wait_for("Running(Primary) once space returned", LONG, |s| {
                s.state == AgentState::Running { role: Role::Primary }
            })
            .await
            .map_err(|e| e.to_string())?;
            let sql = fx.sql().await.map_err(|e| e.to_string())?;
            all_acked_present(&sql, &acked, "after space returned").await?;
            fx.switch_wal_and_wait_archived(LONG)
                .await
                .map_err(|e| format!("archiving did not resume: {e}"))?;
            verdict(problems)
        }
        .await;
        t.check(run, result);
    }
    // A restore onto a disk too small for the backup.
    fx.take_backup().await.unwrap();
    let before = object_digests(&store.root().join(CLUSTER));
    let mut copy = prepare_copy(&fx, &store.toml(), "small").unwrap();
    let small = SmallDisk::mount(&copy.data_dir(), "48m").unwrap();
    copy.spawn().unwrap();
    let outcome = match wait_restored(&mut copy).await {
        Ok(()) => "the restore completed".to_string(),
        Err(e) => e,
    };
    let logs_say = outcome.contains("No space left on device");
    t.count("restores onto a full disk");
    let changed = before != object_digests(&store.root().join(CLUSTER));
    // Space returns (a bigger volume): the same instance, its data dir emptied, restores.
    let retried = async {
        // A bootstrap that failed ends the agent's process; one still running is stopped.
        copy.stop(LONG).map_err(|e| e.to_string())?;
        for entry in std::fs::read_dir(copy.data_dir()).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
        small.resize("1g");
        copy.spawn().map_err(|e| e.to_string())?;
        wait_restored(&mut copy).await?;
        let sql = copy.sql().await.map_err(|e| e.to_string())?;
        all_acked_present(&sql, &acked, "restored once space returned").await
    }
    .await;
    // The agent stops, then its data dir's file system goes, then the fixture removes its dir:
    // a mount point cannot be removed, and the whole dir (its binaries too) would be left.
    let _ = copy.stop(LONG);
    drop(small);
    drop(copy);
    t.check(
        fills + 1,
        match (logs_say && !changed, retried) {
            (true, Ok(())) => Ok(()),
            (ok, retried) => Err(format!(
                "restore onto a full disk: {outcome}; archive changed: {changed}; clear error and unchanged: {ok}; once space returned: {retried:?}"
            )),
        },
    );
    t.finish();
}
