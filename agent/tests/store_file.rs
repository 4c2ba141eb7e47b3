//! The store suite against the file:// backend (a directory standing in for a PVC), plus the
//! durability details only a local directory can show: no temp files left behind.

mod store_shared;

use pgpilot_agent::store::StoreConfig;
use pgpilot_test_support::store::files_under;
use store_shared as suite;

fn setup() -> (tempfile::TempDir, StoreConfig) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig::new(format!("file://{}", dir.path().join("backups").display()));
    (dir, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_file_round_trips() {
    let (dir, cfg) = setup();
    suite::round_trips(&cfg, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_file_tamper_cases() {
    let (dir, cfg) = setup();
    suite::tamper_cases(&cfg, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_file_interrupted_upload_leaves_nothing() {
    let (dir, cfg) = setup();
    suite::interrupted_uploads(&cfg).await;
    let left = files_under(&dir.path().join("backups"));
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_file_create_only() {
    let (dir, cfg) = setup();
    suite::create_only(&cfg, dir.path()).await;
    let temps: Vec<_> = files_under(dir.path())
        .into_iter()
        .filter(|f| f.contains(".pgpilot-tmp-"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_file_list_head_delete() {
    let (_dir, cfg) = setup();
    suite::list_head_delete(&cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_file_cancelled_upload_leaves_no_temp_file() {
    use tokio::io::AsyncWriteExt;
    let (dir, cfg) = setup();
    let store = pgpilot_agent::store::Store::open(&cfg).unwrap();
    // A reader that stays open: the put cannot finish, and is cancelled by dropping its future
    // once its temporary file exists.
    let (reader, mut writer) = tokio::io::duplex(1 << 16);
    writer.write_all(&[7u8; 1000]).await.unwrap();
    let root = dir.path().join("backups");
    let temp_exists = async {
        while !files_under(&root)
            .iter()
            .any(|f| f.contains(".pgpilot-tmp-"))
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        r = store.put("cancel/x", reader, pgpilot_agent::store::PutMode::Overwrite) => {
            panic!("the put cannot finish while its reader stays open: {r:?}")
        }
        () = temp_exists => {}
    }
    drop(writer);
    assert_eq!(store.head("cancel/x").await.unwrap(), None);
    let left = files_under(&root);
    assert!(left.is_empty(), "{left:?}");
}
