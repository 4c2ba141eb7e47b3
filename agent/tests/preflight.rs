//! What the agent checks before it touches anything, and how it logs. (Every supported major
//! gets its smoke test in lifecycle.rs.)

use pgpilot_test_support::agent::{AgentFixture, AgentOptions};
use pgpilot_test_support::agent_bin;
use pgpilot_test_support::postgres::is_root;

fn bin() -> &'static std::path::Path {
    agent_bin!()
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
    let fx = AgentFixture::prepare(bin(), 15, &AgentOptions::toml("postgres_prot = 1\n")).unwrap();
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
    let opts = AgentOptions::default().env("PGPILOT_LOG_FORMAT", "json");
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
