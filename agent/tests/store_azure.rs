//! The store suite against Azurite (Azure Blob emulator): path-style URLs with the development
//! account, create-only uploads refused with 409.

mod store_shared;

use pgpilot_agent::store::StoreConfig;
use pgpilot_test_support::azurite::Azurite;
use store_shared as suite;

async fn setup() -> (Azurite, tempfile::TempDir, StoreConfig) {
    let server = Azurite::start().expect("azurite");
    server.create_container("backups").await.unwrap();
    let cfg = StoreConfig {
        endpoint: Some(server.endpoint.clone()),
        azure_use_emulator: true,
        ..StoreConfig::new("az://backups/clusters/test")
    };
    (server, tempfile::tempdir().unwrap(), cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_azure_round_trips() {
    let (_server, dir, cfg) = setup().await;
    suite::round_trips(&cfg, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_azure_tamper_cases() {
    let (_server, dir, cfg) = setup().await;
    suite::tamper_cases(&cfg, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_azure_interrupted_upload_leaves_nothing() {
    let (_server, _dir, cfg) = setup().await;
    suite::interrupted_uploads(&cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_azure_create_only() {
    let (_server, dir, cfg) = setup().await;
    suite::create_only(&cfg, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_azure_list_head_delete() {
    let (_server, _dir, cfg) = setup().await;
    suite::list_head_delete(&cfg).await;
}
