//! Agent core against real PostgreSQL: bootstrap, start/stop, crash restart, reload,
//! authentication, state conflicts, malformed bodies, the data-dir lock and shutdown without
//! orphans, each on the full-suite majors (`postgres::FULL_MAJORS`: 15 and the newest); and a
//! smoke test (bootstrap, a write, a backup, stop) on every supported major.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgpilot_common::api::{ErrorBody, ShutdownMode, ShutdownRequest};
use pgpilot_common::state::{AgentState, Role};
use pgpilot_test_support::agent::{AgentFixture, AgentOptions, LONG, api_error};
use pgpilot_test_support::agent_bin;
use pgpilot_test_support::postgres::{live_postmaster, pid_alive};
use pgpilot_test_support::store::BackupStore;

fn bin() -> &'static std::path::Path {
    agent_bin!()
}

pgpilot_test_support::per_major!(
    bootstraps_an_empty_data_dir,
    stop_and_start_keep_the_data,
    restarts_postgres_after_kill_9,
    reload_applies_a_changed_parameter,
    state_changing_routes_need_the_token,
    requests_that_do_not_fit_the_state_get_409,
    malformed_bodies_get_400_and_change_nothing,
    second_agent_on_the_same_data_dir_is_refused,
    sigterm_stops_postgres_and_leaves_no_orphan,
    kill_9_of_the_agent_leaves_no_orphan,
);

pgpilot_test_support::per_major!(every: smoke);

/// Every supported major bootstraps, runs, takes a write, a WAL switch archived and a base
/// backup (the backup functions differ by major), and stops cleanly.
async fn smoke(major: u32) {
    let backups = BackupStore::file().unwrap();
    let mut fx = AgentFixture::start_with(bin(), major, AgentOptions::toml(backups.toml()))
        .await
        .unwrap();
    let status = fx.client().status().await.unwrap();
    assert_eq!(
        status.state,
        AgentState::Running {
            role: Role::Primary
        }
    );
    assert_eq!(status.postgres_major, major);
    let sql = fx.sql().await.unwrap();
    let checksums: String = sql
        .query_one("SHOW data_checksums", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checksums, "on");
    sql.batch_execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i")
        .await
        .unwrap();
    let segment = fx.switch_wal_and_wait_archived(LONG).await.unwrap();
    let key = fx.layout().wal_key(&segment);
    assert!(
        backups.open().head(&key).await.unwrap().is_some(),
        "{key} not in the store"
    );
    fx.take_backup().await.unwrap();
    drop(sql);
    fx.signal_agent(Signal::SIGTERM).unwrap();
    assert!(fx.wait_exit(LONG).unwrap().success());
    assert!(!fx.data_dir().join("postmaster.pid").exists());
}

async fn bootstraps_an_empty_data_dir(major: u32) {
    let fx = AgentFixture::start(bin(), major).await.unwrap();
    let status = fx.client().status().await.unwrap();
    assert_eq!(
        status.state,
        AgentState::Running {
            role: Role::Primary
        }
    );
    assert_eq!(status.role, Some(Role::Primary));
    assert_eq!(status.postgres_major, major);
    assert!(
        status
            .postgres_version
            .as_deref()
            .unwrap()
            .starts_with(&major.to_string()),
        "{status:?}"
    );
    assert_eq!(status.timeline, Some(1));
    assert!(status.current_lsn.as_deref().unwrap().contains('/'));
    assert!(status.flushed_lsn.is_some());
    assert_eq!(
        status.postmaster_pid.map(|p| p as i32),
        live_postmaster(&fx.data_dir())
    );
    assert_eq!(status.data_dir, fx.data_dir().display().to_string());

    let sql = fx.sql().await.unwrap();
    for (name, want) in [
        ("data_checksums", "on".to_string()),
        ("server_encoding", "UTF8".into()),
        ("port", fx.pg_port.to_string()),
    ] {
        let got: String = sql
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "{name}");
    }
    let repl = sql
        .query_one(
            "SELECT rolreplication, rolcanlogin FROM pg_roles WHERE rolname = 'replicator'",
            &[],
        )
        .await
        .unwrap();
    assert!(repl.get::<_, bool>(0) && repl.get::<_, bool>(1));
    // Passwords are required everywhere: no trust lines, and a wrong password is refused.
    let hba = std::fs::read_to_string(fx.data_dir().join("pg_hba.conf")).unwrap();
    assert!(
        !hba.contains("trust") && hba.contains("scram-sha-256"),
        "{hba}"
    );
    let wrong = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres password=wrong dbname=postgres",
            fx.pg_port
        ),
        tokio_postgres::NoTls,
    )
    .await;
    assert!(wrong.is_err());
    // The replication role logs in with its generated password, and pg_hba.conf lets it
    // open replication connections from loopback.
    let repl_pw = std::fs::read_to_string(fx.dir.path().join("replication-password")).unwrap();
    let (c, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=replicator password={} dbname=postgres",
            fx.pg_port,
            repl_pw.trim()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let me: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(me, "replicator");
    assert!(
        hba.contains("host    replication  replicator       127.0.0.1/32"),
        "{hba}"
    );
    // Probes.
    for (path, code) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/startupz", 200),
        ("/primary", 200),
        ("/replica", 503),
    ] {
        assert_eq!(fx.get_status(path).await.unwrap(), code, "{path}");
    }
}

async fn stop_and_start_keep_the_data(major: u32) {
    let mut fx = AgentFixture::start(bin(), major).await.unwrap();
    let sql = fx.sql().await.unwrap();
    sql.batch_execute("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    let pid = live_postmaster(&fx.data_dir()).unwrap();

    let stopped = fx.client().stop(&ShutdownRequest::default()).await.unwrap();
    assert_eq!(stopped.state, AgentState::Stopped);
    assert!(!pid_alive(pid), "postmaster {pid} still alive after stop");
    assert!(
        !fx.data_dir().join("postmaster.pid").exists(),
        "clean shutdown removes postmaster.pid"
    );
    assert!(fx.sql().await.is_err());
    let status = fx.client().status().await.unwrap();
    assert_eq!(status.state, AgentState::Stopped);
    assert_eq!(status.postmaster_pid, None);
    assert_eq!(fx.get_status("/readyz").await.unwrap(), 503);
    assert_eq!(fx.get_status("/healthz").await.unwrap(), 200);

    let started = fx.client().start().await.unwrap();
    assert_eq!(
        started.state,
        AgentState::Running {
            role: Role::Primary
        }
    );
    let count: i64 = fx
        .sql()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1000);

    let restarted = fx
        .client()
        .restart(&ShutdownRequest {
            mode: ShutdownMode::Fast,
            cancel_backup: false,
        })
        .await
        .unwrap();
    assert_eq!(
        restarted.state,
        AgentState::Running {
            role: Role::Primary
        }
    );
    assert_ne!(restarted.postmaster_pid, started.postmaster_pid);
    let status = fx.wait_running(LONG).await.unwrap();
    assert_eq!(status.requested_restarts, 1);
    assert_eq!(status.crash_restarts, 0);

    // A smart restart with no client session left: the agent's own session does not hold it
    // up (it did, until the grace ran out and the shutdown went immediate; docs/chaos.md).
    drop(sql);
    fx.client()
        .restart(&ShutdownRequest {
            mode: ShutdownMode::Smart,
            cancel_backup: false,
        })
        .await
        .unwrap();
    let logs = fx.logs();
    assert!(!logs.contains("switching to immediate"), "{logs}");
    assert!(!logs.contains("automatic recovery in progress"), "{logs}");
    assert_eq!(fx.wait_running(LONG).await.unwrap().requested_restarts, 2);
}

async fn restarts_postgres_after_kill_9(major: u32) {
    let mut fx = AgentFixture::start(bin(), major).await.unwrap();
    let sql = fx.sql().await.unwrap();
    sql.batch_execute("CREATE TABLE t AS SELECT 42 AS answer")
        .await
        .unwrap();
    let pid = live_postmaster(&fx.data_dir()).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();

    let status = fx
        .wait_for("Running after a crash", LONG, |s| {
            s.crash_restarts == 1
                && matches!(s.state, AgentState::Running { .. })
                && s.timeline.is_some()
        })
        .await
        .unwrap();
    assert_ne!(status.postmaster_pid, Some(pid as u32));
    assert!(
        status.last_failure.is_none(),
        "a successful start clears the failure: {status:?}"
    );
    let answer: i32 = fx
        .sql()
        .await
        .unwrap()
        .query_one("SELECT answer FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(answer, 42);
    let metrics = fx.metrics().await.unwrap();
    assert!(
        metrics.contains("pgpilot_postgres_crash_restarts_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pgpilot_postgres_up 1"));
    assert!(fx.logs().contains("postmaster exited unexpectedly"));
}

async fn reload_applies_a_changed_parameter(major: u32) {
    let opts = AgentOptions {
        extra_toml: "[postgres.parameters]\nwork_mem = \"4MB\"\n".into(),
        ..Default::default()
    };
    let fx = AgentFixture::start_with(bin(), major, opts).await.unwrap();
    async fn work_mem(fx: &AgentFixture) -> String {
        fx.sql()
            .await
            .unwrap()
            .query_one("SHOW work_mem", &[])
            .await
            .unwrap()
            .get(0)
    }
    assert_eq!(work_mem(&fx).await, "4MB");

    fx.rewrite_config("[postgres.parameters]\nwork_mem = \"16MB\"\nshared_buffers = \"64MB\"\n")
        .unwrap();
    let reloaded = fx.client().reload().await.unwrap();
    assert!(
        reloaded.changed.contains(&"work_mem".to_string()),
        "{reloaded:?}"
    );
    assert!(
        reloaded.changed.contains(&"shared_buffers".to_string()),
        "{reloaded:?}"
    );
    assert_eq!(reloaded.pending_restart, vec!["shared_buffers".to_string()]);
    assert_eq!(work_mem(&fx).await, "16MB");

    // A broken config file is refused with its error, and nothing changes.
    fx.rewrite_config("[postgres.parameters]\nport = 1\n")
        .unwrap();
    let (status, body) = api_error(fx.client().reload().await.unwrap_err());
    assert_eq!(status, 500);
    assert!(
        body.message.contains("port is managed by pgpilot-agent"),
        "{body:?}"
    );
    assert_eq!(work_mem(&fx).await, "16MB");
}

async fn state_changing_routes_need_the_token(major: u32) {
    let fx = AgentFixture::start(bin(), major).await.unwrap();
    let http = reqwest::Client::new();
    for path in ["/v1/restart", "/v1/stop", "/v1/start", "/v1/reload"] {
        let none = http.post(fx.url(path)).send().await.unwrap();
        assert_eq!(none.status().as_u16(), 401, "{path} without a token");
        assert_eq!(none.headers()["www-authenticate"], "Bearer");
        let body: ErrorBody = none.json().await.unwrap();
        assert_eq!(body.error, "unauthorized");
        let wrong = http
            .post(fx.url(path))
            .bearer_auth("not-the-token")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status().as_u16(), 401, "{path} with a wrong token");
        let prefix = http
            .post(fx.url(path))
            .bearer_auth(&fx.token[..fx.token.len() - 1])
            .send()
            .await
            .unwrap();
        assert_eq!(prefix.status().as_u16(), 401, "{path} with a token prefix");
    }
    // Nothing was done.
    let status = fx.client().status().await.unwrap();
    assert_eq!(status.requested_restarts, 0);
    assert_eq!(
        status.state,
        AgentState::Running {
            role: Role::Primary
        }
    );
    // Open routes stay open, on both listeners; the token never shows in them.
    for url in [
        fx.url("/v1/status"),
        format!("http://{}/v1/status", fx.loopback),
        fx.url("/metrics"),
    ] {
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{url}");
        assert!(!resp.text().await.unwrap().contains(&fx.token));
    }
    assert!(fx.anonymous_client().status().await.is_ok());
    let metrics = http
        .get(fx.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"pgpilot_api_requests_total{code="401",method="POST",route="/v1/restart"} 3"#
        ),
        "{metrics}"
    );
    assert!(!fx.logs().contains(&fx.token), "the token reached the log");
}

async fn requests_that_do_not_fit_the_state_get_409(major: u32) {
    let fx = AgentFixture::start(bin(), major).await.unwrap();
    let (status, body) = api_error(fx.client().start().await.unwrap_err());
    assert_eq!(status, 409);
    assert_eq!(body.error, "conflict");
    assert_eq!(
        body.state,
        Some(AgentState::Running {
            role: Role::Primary
        })
    );

    fx.client().stop(&ShutdownRequest::default()).await.unwrap();
    let refused = [
        fx.client().reload().await.map(|_| ()),
        fx.client()
            .restart(&ShutdownRequest::default())
            .await
            .map(|_| ()),
        fx.client()
            .stop(&ShutdownRequest::default())
            .await
            .map(|_| ()),
    ];
    for result in refused {
        let (status, body) = api_error(result.unwrap_err());
        assert_eq!(status, 409, "{body:?}");
        assert_eq!(body.state, Some(AgentState::Stopped), "{body:?}");
        assert!(body.message.contains("Stopped"), "{body:?}");
    }
    assert_eq!(
        fx.client().status().await.unwrap().state,
        AgentState::Stopped
    );
}

async fn malformed_bodies_get_400_and_change_nothing(major: u32) {
    let fx = AgentFixture::start(bin(), major).await.unwrap();
    let http = reqwest::Client::new();
    let before = fx.client().status().await.unwrap();
    for (body, expect) in [
        (r#"{"mode": "#, "EOF while parsing"),
        (r#"{"mode": "slow"}"#, "unknown variant `slow`"),
        (r#"{"mood": "fast"}"#, "unknown field `mood`"),
        (r#""fast""#, "invalid type: string"),
    ] {
        for path in ["/v1/restart", "/v1/stop"] {
            let resp = http
                .post(fx.url(path))
                .bearer_auth(&fx.token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 400, "{path} {body}");
            let err: ErrorBody = resp.json().await.unwrap();
            assert_eq!(err.error, "bad_request");
            assert!(
                err.message.contains("invalid JSON body") && err.message.contains(expect),
                "{body}: {err:?}"
            );
        }
    }
    // A body over the limit: 413 before it is read, on a route that reads a body or not.
    for path in ["/v1/restart", "/v1/demote"] {
        let status =
            pgpilot_test_support::net::status_of_declared_body(fx.api, path, &fx.token, 1 << 20)
                .await
                .unwrap();
        assert_eq!(status, 413, "{path}");
    }
    let after = fx.client().status().await.unwrap();
    assert_eq!(after.postmaster_pid, before.postmaster_pid);
    assert_eq!(after.requested_restarts, 0);
    assert_eq!(after.state, before.state, "nothing was demoted");
    // Unknown routes and methods get the same JSON body.
    let resp = http.get(fx.url("/v1/nope")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(resp.json::<ErrorBody>().await.unwrap().error, "not_found");
    let resp = http
        .get(fx.url("/v1/restart"))
        .bearer_auth(&fx.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(
        resp.json::<ErrorBody>().await.unwrap().error,
        "method_not_allowed"
    );
}

async fn second_agent_on_the_same_data_dir_is_refused(major: u32) {
    let fx = AgentFixture::start(bin(), major).await.unwrap();
    // Same config file (same data dir), other ports so only the lock can refuse it.
    let port = || pgpilot_test_support::net::free_port().to_string();
    let out = fx
        .command()
        .args(["--postgres-port", &port()])
        .args(["--api-listen", &format!("127.0.0.1:{}", port())])
        .args(["--api-loopback-listen", &format!("127.0.0.1:{}", port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another pgpilot-agent") && stderr.contains("already runs on data dir"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&fx.agent_pid().unwrap().to_string()),
        "names the running agent's pid: {stderr}"
    );
    // The first agent and its Postgres are untouched.
    let status = fx.client().status().await.unwrap();
    assert_eq!(
        status.state,
        AgentState::Running {
            role: Role::Primary
        }
    );
    assert_eq!(status.crash_restarts, 0);
}

async fn sigterm_stops_postgres_and_leaves_no_orphan(major: u32) {
    let mut fx = AgentFixture::start(bin(), major).await.unwrap();
    let pid = live_postmaster(&fx.data_dir()).unwrap();
    fx.signal_agent(Signal::SIGTERM).unwrap();
    let status = fx.wait_exit(LONG).unwrap();
    assert!(status.success(), "agent exit status {status}");
    assert!(!pid_alive(pid), "postmaster {pid} outlived the agent");
    assert!(
        !fx.data_dir().join("postmaster.pid").exists(),
        "shutdown was not clean"
    );
    let logs = fx.logs();
    assert!(
        logs.contains("SIGTERM") && logs.contains("Postgres stopped"),
        "{logs}"
    );
    // Postgres' own lines are in the agent's log, marked as such.
    assert!(logs.contains("source=\"postgres\""), "{logs}");
}

async fn kill_9_of_the_agent_leaves_no_orphan(major: u32) {
    let mut fx = AgentFixture::start(bin(), major).await.unwrap();
    let pid = live_postmaster(&fx.data_dir()).unwrap();
    fx.signal_agent(Signal::SIGKILL).unwrap();
    fx.wait_exit(LONG).unwrap();
    // PR_SET_PDEATHSIG makes the postmaster shut down (immediate) when the agent dies.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pid_alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !pid_alive(pid),
        "postmaster {pid} orphaned after kill -9 of the agent"
    );
    // A new agent on the same data dir starts and recovers.
    fx.spawn().unwrap();
    let status = fx.wait_running(LONG).await.unwrap();
    assert_eq!(
        status.state,
        AgentState::Running {
            role: Role::Primary
        }
    );
}
