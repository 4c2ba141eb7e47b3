//! What the agent checks before it touches anything, how it logs, and the majors beyond the
//! two the lifecycle suite runs on.

use std::path::Path;
use std::time::Duration;

use pgpilot_common::state::{AgentState, Role};
use pgpilot_test_support::agent::{AgentFixture, AgentOptions};
use pgpilot_test_support::postgres::is_root;

const BIN: &str = env!("CARGO_BIN_EXE_pgpilot-agent");

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// Runs the prepared agent to completion and returns its stderr; it must fail.
fn run_expecting_failure(fx: &AgentFixture, extra: &[&str]) -> String {
    let out = fx.command().args(extra).output().unwrap();
    assert!(
        !out.status.success(),
        "agent started although it should not have"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !fx.data_dir().join("PG_VERSION").exists(),
        "nothing may be bootstrapped: {stderr}"
    );
    stderr
}

#[test]
fn refuses_a_postgres_port_in_use() {
    let fx = AgentFixture::prepare(bin(), 15, &AgentOptions::default()).unwrap();
    let _taken = std::net::TcpListener::bind(("127.0.0.1", fx.pg_port)).unwrap();
    let err = run_expecting_failure(&fx, &[]);
    assert!(
        err.contains(&format!("PostgreSQL port {} is already in use", fx.pg_port)),
        "{err}"
    );
    assert!(
        err.contains("--postgres-port"),
        "says what to change: {err}"
    );
}

#[test]
fn refuses_an_api_port_in_use() {
    let fx = AgentFixture::prepare(bin(), 15, &AgentOptions::default()).unwrap();
    let _taken = std::net::TcpListener::bind(fx.api).unwrap();
    let err = run_expecting_failure(&fx, &[]);
    assert!(
        err.contains(&format!("cannot listen on {}", fx.api)) && err.contains("--api-listen"),
        "{err}"
    );
}

#[test]
fn refuses_missing_binaries() {
    let fx = AgentFixture::prepare(bin(), 15, &AgentOptions::default()).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let err = run_expecting_failure(&fx, &["--pg-bin-dir", &empty.path().display().to_string()]);
    assert!(
        err.contains("postgres is missing")
            && err.contains("complete PostgreSQL server installation"),
        "{err}"
    );
}

#[test]
fn refuses_an_unreadable_token_file() {
    let fx = AgentFixture::prepare(bin(), 15, &AgentOptions::default()).unwrap();
    let err = run_expecting_failure(&fx, &["--api-token-file", "/nonexistent/pgpilot-token"]);
    assert!(
        err.contains("API token file /nonexistent/pgpilot-token cannot be read"),
        "{err}"
    );
}

#[test]
fn refuses_a_data_dir_that_is_not_a_cluster() {
    let fx = AgentFixture::prepare(bin(), 15, &AgentOptions::default()).unwrap();
    std::fs::create_dir_all(fx.data_dir()).unwrap();
    std::fs::write(fx.data_dir().join("precious.txt"), "user data").unwrap();
    let err = run_expecting_failure(&fx, &[]);
    assert!(
        err.contains("is not empty and holds no PostgreSQL cluster"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(fx.data_dir().join("precious.txt")).unwrap(),
        "user data"
    );
}

#[test]
fn refuses_an_invalid_config_file_naming_the_key() {
    let fx = AgentFixture::prepare(
        bin(),
        15,
        &AgentOptions {
            extra_toml: "postgres_prot = 1\n".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let err = run_expecting_failure(&fx, &[]);
    assert!(
        err.contains("is not valid") && err.contains("postgres_prot"),
        "{err}"
    );
}

#[test]
fn refuses_a_data_dir_postgres_cannot_reach() {
    let fx = AgentFixture::prepare(bin(), 15, &AgentOptions::default()).unwrap();
    let locked = fx.dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = locked.join("pg");
    let err = run_expecting_failure(&fx, &["--data-dir", &data.display().to_string()]);
    if is_root() {
        // As root the agent itself could write there, but the postgres user could not.
        assert!(
            err.contains("cannot reach") && err.contains(&locked.display().to_string()),
            "{err}"
        );
    } else {
        // Not root: make the parent unwritable for us.
        assert!(
            err.contains("not writable") || err.contains("Permission denied"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_postgres_lines_and_no_secrets() {
    let opts = AgentOptions {
        env: vec![("PGPILOT_LOG_FORMAT".into(), "json".into())],
        ..Default::default()
    };
    let fx = AgentFixture::start_with(bin(), 15, opts).await.unwrap();
    fx.client().reload().await.unwrap();
    let logs = fx.logs();
    let mut postgres_lines = 0;
    for line in logs.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        if v["source"] == "postgres" {
            postgres_lines += 1;
            assert_eq!(v["target"], "postgres", "{line}");
        }
    }
    assert!(
        postgres_lines > 0,
        "no Postgres line in the JSON log:\n{logs}"
    );
    assert!(logs.contains("database system is ready to accept connections"));
    for secret in ["superuser-password", "replication-password"] {
        let value = std::fs::read_to_string(fx.dir.path().join(secret)).unwrap();
        assert!(!logs.contains(value.trim()), "{secret} reached the log");
    }
    assert!(!logs.contains(&fx.token));
}

/// The lifecycle suite runs on 15 and 17; the other supported majors at least bootstrap, run
/// and stop cleanly (pg_backup_start and friends differ by major, so later suites matter more).
async fn smoke(major: u32) {
    let mut fx = AgentFixture::start(bin(), major).await.unwrap();
    let status = fx.client().status().await.unwrap();
    assert_eq!(
        status.state,
        AgentState::Running {
            role: Role::Primary
        }
    );
    assert_eq!(status.postgres_major, major);
    let checksums: String = fx
        .sql()
        .await
        .unwrap()
        .query_one("SHOW data_checksums", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checksums, "on");
    fx.signal_agent(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(fx.wait_exit(Duration::from_secs(60)).unwrap().success());
    assert!(!fx.data_dir().join("postmaster.pid").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_pg14() {
    smoke(14).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_pg16() {
    smoke(16).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_pg18() {
    smoke(18).await
}
