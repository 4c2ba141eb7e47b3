//! The store suite against the GCS fake (tests/support/src/gcs.rs): object_store's GCS client
//! over HTTP, generation preconditions for create-only puts, XML multipart uploads, and listing
//! across pages.

mod store_shared;

use pgpilot_agent::store::StoreConfig;
use pgpilot_test_support::gcs::FakeGcs;
use store_shared as suite;

fn setup(page_size: usize) -> (FakeGcs, tempfile::TempDir, StoreConfig) {
    let server = FakeGcs::start_with_page_size(page_size).expect("fake gcs");
    server.create_bucket("backups");
    let cfg = StoreConfig {
        gcs_service_account_file: Some(server.service_account_file().unwrap()),
        endpoint: Some(server.endpoint.clone()),
        ..StoreConfig::new("gs://backups/clusters/test")
    };
    (server, tempfile::tempdir().unwrap(), cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_gcs_round_trips() {
    let (server, dir, cfg) = setup(1000);
    suite::round_trips(&cfg, dir.path()).await;
    // The multipart object really went through the XML multipart API.
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("POST") && r.contains("uploads"))
    );
    assert_eq!(server.pending_uploads(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_gcs_tamper_cases() {
    let (_server, dir, cfg) = setup(1000);
    suite::tamper_cases(&cfg, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_gcs_interrupted_upload_leaves_nothing() {
    let (server, _dir, cfg) = setup(1000);
    suite::interrupted_uploads(&cfg).await;
    assert_eq!(
        server.pending_uploads(),
        0,
        "the failed multipart upload was aborted"
    );
    assert!(server.object_names("backups").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_gcs_create_only() {
    let (server, dir, cfg) = setup(1000);
    suite::create_only(&cfg, dir.path()).await;
    // Create-only puts were sent as generation preconditions.
    assert!(server.requests().iter().any(|r| r.starts_with("PUT")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_gcs_list_across_pages() {
    // Pages of two entries: every listing in the suite spans several pages.
    let (server, _dir, cfg) = setup(2);
    suite::list_head_delete(&cfg).await;
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains("continuation-token")),
        "pagination was exercised"
    );
}
