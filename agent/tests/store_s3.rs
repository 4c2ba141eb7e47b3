//! The store suite against a real S3 server (s3s-fs: SigV4 signatures checked, conditional puts
//! enforced), with credentials read from files and path-style requests.

mod store_shared;

use pgpilot_agent::store::{Store, StoreConfig, StoreError};
use pgpilot_test_support::s3::S3Server;
use pgpilot_test_support::store::files_under;
use store_shared as suite;

fn setup() -> (S3Server, tempfile::TempDir, StoreConfig) {
    let server = S3Server::start().expect("s3s-fs");
    server.create_bucket("backups").unwrap();
    let (ak, sk) = server.credential_files().unwrap();
    let cfg = StoreConfig {
        endpoint: Some(server.endpoint.clone()),
        path_style: Some(true),
        region: Some("us-east-1".into()),
        access_key_id_file: Some(ak),
        secret_access_key_file: Some(sk),
        ..StoreConfig::new("s3://backups/clusters/test")
    };
    (server, tempfile::tempdir().unwrap(), cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_s3_round_trips() {
    let (_server, dir, cfg) = setup();
    suite::round_trips(&cfg, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_s3_tamper_cases() {
    let (_server, dir, cfg) = setup();
    suite::tamper_cases(&cfg, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_s3_interrupted_upload_leaves_nothing() {
    let (server, _dir, cfg) = setup();
    suite::interrupted_uploads(&cfg).await;
    // Nothing under the bucket's prefix either (s3s-fs keeps objects as files).
    let left: Vec<_> = files_under(&server.data_dir().join("backups/clusters"))
        .into_iter()
        .filter(|f| !f.contains(".upload"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_s3_create_only() {
    let (_server, dir, cfg) = setup();
    suite::create_only(&cfg, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_s3_list_head_delete() {
    let (_server, _dir, cfg) = setup();
    suite::list_head_delete(&cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_s3_wrong_credentials_fail_permanently_and_name_the_object() {
    let (server, dir, mut cfg) = setup();
    let bad = dir.path().join("bad-secret");
    pgpilot_test_support::write_secret(&bad, "not-the-secret").unwrap();
    cfg.secret_access_key_file = Some(bad);
    cfg.retry.max_attempts = 3;
    let store = Store::open(&cfg).unwrap();
    let err = store
        .put_bytes(
            "x/y",
            bytes::Bytes::from_static(b"z"),
            pgpilot_agent::store::PutMode::Overwrite,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Backend {
                transient: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("s3://backups/clusters/test/x/y"),
        "{err}"
    );
    assert!(
        !err.to_string().contains("not-the-secret")
            && !format!("{err:?}").contains("not-the-secret")
    );
    assert!(!format!("{store:?}").contains(&server.secret_key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_s3_outage_is_transient_then_recovers() {
    let (mut server, _dir, mut cfg) = setup();
    cfg.retry = pgpilot_agent::store::RetrySettings {
        max_attempts: 3,
        initial_backoff_ms: 10,
        max_backoff_ms: 50,
    };
    let store = Store::open(&cfg).unwrap();
    let mode = pgpilot_agent::store::PutMode::Overwrite;
    store
        .put_bytes("outage/x", bytes::Bytes::from_static(b"kept"), mode)
        .await
        .unwrap();
    server.stop();
    // Connection refused: transient (so retried by the policy, unit-tested in store::retry), and
    // reported with the object named once the attempts run out.
    let err = store.verify("outage/x").await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("outage/x"), "{err}");
    let err = store
        .put_bytes("outage/y", bytes::Bytes::from_static(b"y"), mode)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    server.restart().unwrap();
    // The failed put left nothing; the earlier object is intact.
    assert_eq!(store.head("outage/y").await.unwrap(), None);
    assert_eq!(
        store.get_bytes("outage/x").await.unwrap().0.as_ref(),
        b"kept"
    );
}
