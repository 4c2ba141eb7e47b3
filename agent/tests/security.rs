//! The agent's API credentials against a real agent and PostgreSQL 15 (issue 23, docs/security.md):
//! the token rotates through its file without a restart, with `wal-push` following it; wrong
//! tokens are counted by reason and limited per peer on the pod-IP listener; planted secrets
//! never leak.

use std::time::Duration;

use pgpilot_common::api::ErrorBody;
use pgpilot_test_support::agent::{AgentFixture, AgentOptions, LONG};
use pgpilot_test_support::agent_bin;
use pgpilot_test_support::store::BackupStore;

const NEW: &str = "0123456789abcdef-the-rotated-token";

/// The status of `POST path` with `token` on `base` (an `http://host:port`).
async fn post(http: &reqwest::Client, base: &str, path: &str, token: &str) -> reqwest::Response {
    http.post(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// Polls until `POST /v1/reload` with `token` answers `code` (the agent re-reads its token
/// file every 2 s).
async fn until_answers(fx: &AgentFixture, token: &str, code: u16) {
    let http = reqwest::Client::new();
    let base = format!("http://{}", fx.loopback);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = post(&http, &base, "/v1/reload", token)
            .await
            .status()
            .as_u16();
        if got == code {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the token file change was not picked up: still {got}, not {code}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn runtime_token(fx: &AgentFixture) -> String {
    let rt: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.runtime_file()).unwrap()).unwrap();
    rt["token"].as_str().unwrap().to_string()
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

#[tokio::test]
async fn the_api_token_rotates_without_a_restart_and_wrong_tokens_are_limited() {
    let store = BackupStore::file().unwrap();
    let fx = AgentFixture::start_with(agent_bin!(), 15, AgentOptions::toml(store.toml()))
        .await
        .unwrap();
    let old = fx.token.clone();
    let http = reqwest::Client::new();
    let external = format!("http://{}", fx.api);

    // 1. The window: the new token above the old, both accepted; the new one is presented
    //    (wal-push's runtime file, the CLI).
    std::fs::write(fx.token_file(), format!("{NEW}\n{old}\n")).unwrap();
    until_answers(&fx, NEW, 200).await;
    assert_eq!(
        post(&http, &external, "/v1/reload", &old).await.status(),
        200
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while runtime_token(&fx) != NEW {
        assert!(
            std::time::Instant::now() < deadline,
            "runtime file not rotated"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = fx.cli(&["reload"]).unwrap();
    assert!(out.success(), "the CLI presents the first token: {out:?}");

    // 2. The window closes: the old token is refused, archiving goes on with the new one.
    std::fs::write(fx.token_file(), format!("{NEW}\n")).unwrap();
    until_answers(&fx, &old, 401).await;
    assert_eq!(
        post(&http, &external, "/v1/reload", NEW).await.status(),
        200
    );
    fx.switch_wal_and_wait_archived(LONG)
        .await
        .expect("wal-push with the rotated token");
    // A file emptied mid-rotation changes nothing: the accepted token stays.
    std::fs::write(fx.token_file(), "\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        post(&http, &external, "/v1/reload", NEW).await.status(),
        200
    );
    std::fs::write(fx.token_file(), format!("{NEW}\n")).unwrap();

    // 3. Wrong tokens from one peer on the pod-IP listener: 401 up to the limit, then 429 for
    //    everything from it, the right token too, with Retry-After. Loopback is not limited.
    for i in 0..30 {
        let r = post(&http, &external, "/v1/reload", &format!("guess-{i}")).await;
        assert_eq!(r.status(), 401, "guess {i}");
    }
    let limited = post(&http, &external, "/v1/reload", "guess-31").await;
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: ErrorBody = limited.json().await.unwrap();
    assert_eq!(body.error, "too_many_requests");
    assert!(
        body.message
            .contains("too many wrong API tokens from 127.0.0.1"),
        "{body:?}"
    );
    assert_eq!(
        post(&http, &external, "/v1/reload", NEW).await.status(),
        429
    );
    let loopback = format!("http://{}", fx.loopback);
    assert_eq!(
        post(&http, &loopback, "/v1/reload", NEW).await.status(),
        200
    );
    assert_eq!(
        post(&http, &loopback, "/v1/reload", "guess-loopback")
            .await
            .status(),
        401
    );
    // Open routes stay open for the limited peer.
    assert_eq!(fx.get_status("/v1/status").await.unwrap(), 200);
    let none = http
        .post(format!("{loopback}/v1/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    let malformed = http
        .post(format!("{loopback}/v1/reload"))
        .header("authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 401);

    // 4. Counted by reason, and never a token in the log.
    let m = fx.metrics().await.unwrap();
    assert_eq!(metric(&m, "pgpilot_api_token_reloads_total"), 2.0, "{m}");
    let failures = |reason: &str| {
        metric(
            &m,
            &format!("pgpilot_api_auth_failures_total{{reason=\"{reason}\"}}"),
        )
    };
    // The old token after the window (once or more while polling), 30 guesses, one on loopback.
    assert!(failures("wrong_token") >= 32.0, "{m}");
    assert_eq!(failures("rate_limited"), 2.0, "{m}");
    assert_eq!(failures("no_credential"), 1.0, "{m}");
    assert_eq!(failures("malformed"), 1.0, "{m}");
    let logs = fx.logs();
    assert!(logs.contains("API tokens reloaded"), "{logs}");
    assert!(logs.contains("cannot reload the API tokens"), "{logs}");
    for secret in [old.as_str(), NEW] {
        assert!(!logs.contains(secret), "a token reached the log");
    }
}

/// Known secret values planted everywhere the agent takes one: the API token, the two Postgres
/// passwords, the S3 secret key and the archive's encryption key. Then every path that prints
/// something: a backup and WAL archiving, the open routes on both listeners, error answers of
/// every kind, the CLI's commands and its failures, a reload and a restart. None of the values
/// may show in the agent's log, an HTTP body, a CLI's output, a process's command line, or a
/// file the agent rendered; the files that hold them are 0600.
#[tokio::test]
async fn planted_secrets_never_reach_logs_outputs_command_lines_or_rendered_files() {
    use std::os::unix::fs::PermissionsExt;
    let keys = tempfile::tempdir().unwrap();
    let key_hex = format!("{:0>64}", "5ec2e7a11ce0b5e55ed");
    let key_path = keys.path().join("archive.key");
    pgpilot_test_support::write_secret(&key_path, &key_hex).unwrap();
    let store = BackupStore::s3().unwrap().with_keys(&format!(
        "encryption_key_files = [\"k1={}\"]",
        key_path.display()
    ));
    let toml = store.toml();
    let s3_secret = {
        let line = toml
            .lines()
            .find(|l| l.starts_with("secret_access_key_file"))
            .expect("the S3 secret key file");
        let path = line.split('"').nth(1).unwrap();
        std::fs::read_to_string(path).unwrap().trim().to_string()
    };
    let token = "planted-api-token-7c1f09d3e2b4a5968778";
    let mut fx = AgentFixture::prepare(agent_bin!(), 15, &AgentOptions::toml(toml)).unwrap();
    std::fs::write(fx.token_file(), format!("{token}\n")).unwrap();
    fx.token = token.to_string();
    fx.spawn().unwrap();
    fx.wait_running(LONG).await.unwrap();
    let superuser = fx.superuser_password().unwrap();
    let replication = std::fs::read_to_string(fx.dir.path().join("replication-password"))
        .unwrap()
        .trim()
        .to_string();
    let secrets = [
        ("API token", token.to_string()),
        ("superuser password", superuser),
        ("replication password", replication),
        ("S3 secret key", s3_secret),
        ("encryption key", key_hex.clone()),
    ];
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut record = |what: String, text: String| seen.push((what, text));

    // Work that logs: archiving, a backup, a reload, a restart.
    fx.switch_wal_and_wait_archived(LONG).await.unwrap();
    let id = fx.take_backup().await.unwrap();
    let http = reqwest::Client::new();
    for (path, body) in [("/v1/reload", ""), ("/v1/restart", "{}")] {
        let r = post_body(&http, &format!("http://{}", fx.loopback), path, token, body).await;
        record(format!("POST {path}"), r);
    }
    fx.wait_running(LONG).await.unwrap();

    // Open routes on both listeners, and an unknown backup's 404.
    for base in [
        format!("http://{}", fx.api),
        format!("http://{}", fx.loopback),
    ] {
        for path in [
            "/v1/status".to_string(),
            "/metrics".into(),
            "/v1/backups".into(),
            format!("/v1/backups/{id}"),
            "/v1/drain".into(),
            "/readyz".into(),
            "/v1/backups/no-such-backup".into(),
        ] {
            let text = http
                .get(format!("{base}{path}"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            record(format!("GET {base}{path}"), text);
        }
    }
    // Error answers: a wrong token, a malformed body, an impossible restore, a missing segment
    // (and an unknown backup, above).
    let loopback = format!("http://{}", fx.loopback);
    for (path, tok, body) in [
        ("/v1/reload", "a-wrong-token", ""),
        ("/v1/restore", token, "{\"target\": "),
        (
            "/v1/restore",
            token,
            "{\"target\": {\"time\": \"1999-01-01T00:00:00Z\"}}",
        ),
        (
            "/v1/wal/fetch",
            token,
            "{\"name\": \"0000000100000009000000FF\", \"dest\": \"/tmp/nowhere\"}",
        ),
    ] {
        let r = post_body(&http, &loopback, path, tok, body).await;
        record(format!("POST {path} {body}"), r);
    }

    // The CLI: commands that work and commands that fail.
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["backups"],
        vec!["backups", "--json"],
        vec!["verify"],
        vec!["reload"],
        vec!["restore", "--target-time", "1999-01-01T00:00:00Z"],
        vec!["wal-fetch", "0000000100000009000000FF", "/tmp/nowhere"],
        vec!["backup", "--wait=false", "--label", "leak-test"],
    ] {
        let out = fx.cli(&args).unwrap();
        record(
            format!("pgpilot-agent {}", args.join(" ")),
            format!("{}{}", out.stdout, out.stderr),
        );
    }
    let wrong = fx.dir.path().join("wrong-token");
    pgpilot_test_support::write_secret(&wrong, "not-it\n").unwrap();
    let out = std::process::Command::new(agent_bin!())
        .args(["reload"])
        .env("PGPILOT_API_URL", &loopback)
        .env("PGPILOT_API_TOKEN_FILE", &wrong)
        .output()
        .unwrap();
    record(
        "the CLI with a wrong token".into(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    );

    // Command lines of the agent and every process of its Postgres.
    let mut processes = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let data_dir = fx.data_dir().display().to_string();
        if line.contains(&data_dir) || line.contains(&fx.config_path.display().to_string()) {
            processes += 1;
            record(format!("the command line of {line}"), line.clone());
        }
    }
    assert!(processes >= 2, "the agent and its postmaster at least");

    // Files the agent rendered; the ones that hold secrets are 0600.
    for name in [
        "postgresql.conf",
        "pgpilot.conf",
        "postgresql.auto.conf",
        "pg_hba.conf",
    ] {
        let path = fx.data_dir().join(name);
        if let Ok(text) = std::fs::read_to_string(&path) {
            record(path.display().to_string(), text);
        }
    }
    for path in [
        fx.dir.path().join("superuser-password"),
        fx.dir.path().join("replication-password"),
        fx.runtime_file(),
    ] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    record("the agent's log".into(), fx.logs());

    let leaks = |seen: &[(String, String)]| {
        let mut found = Vec::new();
        for (what, text) in seen {
            for (name, value) in &secrets {
                if text.contains(value.as_str()) {
                    found.push(format!("the {name} in {what}"));
                }
            }
        }
        found
    };
    // The checker finds what is there: the files that hold the secrets.
    let planted: Vec<(String, String)> = [fx.token_file(), fx.runtime_file()]
        .iter()
        .map(|p| (p.display().to_string(), std::fs::read_to_string(p).unwrap()))
        .collect();
    assert_eq!(leaks(&planted).len(), 2, "{:?}", leaks(&planted));
    let found = leaks(&seen);
    assert!(found.is_empty(), "secrets leaked: {found:#?}");
    assert!(seen.len() >= 30, "checked {} outputs", seen.len());
}

async fn post_body(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    token: &str,
    body: &str,
) -> String {
    let mut req = http.post(format!("{base}{path}")).bearer_auth(token);
    if !body.is_empty() {
        req = req
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let resp = req.send().await.unwrap();
    format!("{} {}", resp.status(), resp.text().await.unwrap())
}

/// A key file or the token file that every user can read: the agent refuses to start, naming
/// the file, its mode and the fix; nothing is started.
#[tokio::test]
async fn world_readable_secret_files_are_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("archive.key");
    std::fs::write(&key, "5a".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = BackupStore::file().unwrap().with_keys(&format!(
        "encryption_key_files = [\"k1={}\"]",
        key.display()
    ));
    let mut fx =
        AgentFixture::prepare(agent_bin!(), 15, &AgentOptions::toml(store.toml())).unwrap();
    fx.spawn().unwrap();
    let status = fx.wait_exit(LONG).unwrap();
    assert!(!status.success());
    let logs = fx.logs();
    assert!(
        logs.contains(&format!(
            "encryption key file {} is readable by every user (mode 0644)",
            key.display()
        )),
        "{logs}"
    );
    assert!(
        !fx.data_dir().join("PG_VERSION").exists(),
        "nothing was started"
    );

    // The key fixed, the token file opened to everyone: refused the same way.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(fx.token_file(), std::fs::Permissions::from_mode(0o604)).unwrap();
    fx.spawn().unwrap();
    assert!(!fx.wait_exit(LONG).unwrap().success());
    let logs = fx.logs();
    assert!(
        logs.contains(&format!(
            "API token file {} is readable by every user (mode 0604)",
            fx.token_file().display()
        )),
        "{logs}"
    );
}

/// A physical replication session as `replicator` (startup parameter `replication=true`,
/// SCRAM-SHA-256), its TCP connection made from `source`, a loopback address of the test's
/// choosing (libpq and tokio-postgres cannot choose theirs, nor start a replication session):
/// `Ok` once the server is ready for queries, else the server's error message.
async fn replication_from(fx: &AgentFixture, source: &str) -> Result<(), String> {
    use bytes::BytesMut;
    use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
    use postgres_protocol::message::{backend, frontend};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let password = std::fs::read_to_string(fx.dir.path().join("replication-password")).unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket
        .connect(format!("127.0.0.1:{}", fx.pg_port).parse().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = BytesMut::new();
    frontend::startup_message(
        [
            ("user", "replicator"),
            ("database", "replication"),
            ("replication", "true"),
        ],
        &mut out,
    )
    .unwrap();
    stream.write_all(&out).await.unwrap();
    let mut input = BytesMut::new();
    let mut scram: Option<ScramSha256> = None;
    loop {
        let (message, raw) = loop {
            let raw = input.clone();
            if let Some(m) = backend::Message::parse(&mut input).map_err(|e| e.to_string())? {
                break (m, raw);
            }
            if stream
                .read_buf(&mut input)
                .await
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("the server closed the connection".into());
            }
        };
        out.clear();
        match message {
            backend::Message::AuthenticationSasl(_) => {
                let s = ScramSha256::new(password.trim().as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out).unwrap();
                scram = Some(s);
            }
            backend::Message::AuthenticationSaslContinue(body) => {
                let s = scram.as_mut().expect("SASL began");
                s.update(body.data()).map_err(|e| e.to_string())?;
                frontend::sasl_response(s.message(), &mut out).unwrap();
            }
            backend::Message::AuthenticationSaslFinal(body) => {
                let s = scram.as_mut().expect("SASL began");
                s.finish(body.data()).map_err(|e| e.to_string())?;
            }
            backend::Message::ReadyForQuery(_) => return Ok(()),
            // Its fields (severity, code, message …) as text.
            backend::Message::ErrorResponse(_) => {
                return Err(String::from_utf8_lossy(&raw).replace('\0', " "));
            }
            _ => {}
        }
        if !out.is_empty() {
            stream.write_all(&out).await.unwrap();
        }
    }
}

/// pg_hba.conf takes replication only from loopback and the addresses of the replicas that
/// registered (`POST /v1/replicas`), though `allow_networks` admits every loopback address for
/// ordinary sessions; a replica's address is in force when its registration answers.
#[tokio::test]
async fn replication_is_taken_only_from_registered_replicas() {
    let toml = "\n[postgres]\nallow_networks = [\"127.0.0.0/8\"]\n";
    let fx = AgentFixture::start_with(agent_bin!(), 15, AgentOptions::toml(toml))
        .await
        .unwrap();
    assert_eq!(replication_from(&fx, "127.0.0.1").await, Ok(()));
    let before = replication_from(&fx, "127.0.0.77").await;
    assert!(
        before.as_ref().is_err_and(|e| e
            .contains("no pg_hba.conf entry for replication connection from host \"127.0.0.77\"")),
        "{before:?}"
    );
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{}/v1/replicas", fx.loopback))
        .bearer_auth(&fx.token)
        .json(&serde_json::json!({"name": "replica-77", "api_url": "http://127.0.0.77:8008"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(replication_from(&fx, "127.0.0.77").await, Ok(()));
    let other = replication_from(&fx, "127.0.0.78").await;
    assert!(
        other
            .as_ref()
            .is_err_and(|e| e.contains("no pg_hba.conf entry for replication connection")),
        "{other:?}"
    );
}

mod tls {
    use super::*;
    use pgpilot_common::tls::issue::{Issued, Validity, leaf, new_ca};
    use std::path::{Path, PathBuf};

    const SERVER: &str = "orders-0.agents.pgpilot.test";
    const OPERATOR: &str = "pgpilot-operator";
    const DAY: Duration = Duration::from_secs(86400);

    /// Writes `content` through a rename, as the kubelet swaps a Secret volume's files.
    fn swap(path: &Path, content: &str) {
        let tmp = path.with_extension("tmp");
        pgpilot_test_support::write_secret(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn client(ca: &Issued, server_name: &str, identity: Option<&Issued>) -> reqwest::Client {
        let tls = pgpilot_common::tls::client_config(
            ca.cert_pem.as_bytes(),
            server_name,
            identity.map(|i| (i.cert_pem.as_bytes(), i.key_pem.as_bytes())),
        )
        .unwrap();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .unwrap()
    }

    /// `POST /v1/reload` over HTTPS: the status, or the connection error's text.
    async fn reload(
        http: &reqwest::Client,
        base: &str,
        token: Option<&str>,
    ) -> Result<u16, String> {
        let mut req = http.post(format!("{base}/v1/reload"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Ok(r) => Ok(r.status().as_u16()),
            Err(e) => Err(format!("{e:?}")),
        }
    }

    /// The error body of a refused `POST /v1/reload`.
    async fn refusal(http: &reqwest::Client, base: &str) -> ErrorBody {
        let r = http.post(format!("{base}/v1/reload")).send().await.unwrap();
        r.json().await.unwrap()
    }

    /// `/metrics` over HTTPS.
    async fn metrics_text(http: &reqwest::Client, base: &str) -> String {
        let r = http.get(format!("{base}/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    /// A session with the agent's Postgres over TCP: over TLS verified against `ca` under
    /// `name`, or plain. The error's text when refused.
    async fn pg(fx: &AgentFixture, tls: Option<(&Issued, &str)>) -> Result<bool, String> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(fx.pg_port)
            .user("postgres")
            .password(fx.superuser_password().unwrap())
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        let config = tls
            .map(|(ca, name)| {
                pgpilot_common::tls::client_config(ca.cert_pem.as_bytes(), name, None)
            })
            .transpose()?;
        let client = pgpilot_common::tls::postgres::connect(&cfg, config)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get(0))
    }

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    /// The pod-IP listener with `[tls]` and certificates only (`accept_token = false`): no
    /// certificate, an untrusted one, an expired one, one of another name and the operator's;
    /// the server's certificate verified under its DNS name while dialled by IP; the
    /// certificate and the CA rotated on disk and picked up without a restart; a world-readable
    /// key refused at start.
    #[tokio::test]
    async fn client_certificates_are_checked_and_rotated_without_a_restart() {
        let v = Validity::starting_now(DAY);
        let ca = new_ca("pgpilot test CA", v).unwrap();
        let other_ca = new_ca("someone else's CA", v).unwrap();
        let server = leaf(&ca, &[SERVER.into()], v).unwrap();
        let operator = leaf(&ca, &[OPERATOR.into()], v).unwrap();
        let stranger = leaf(&ca, &["someone-else".into()], v).unwrap();
        let untrusted = leaf(&other_ca, &[OPERATOR.into()], v).unwrap();
        let past = Validity {
            not_before: std::time::SystemTime::now() - 10 * DAY,
            not_after: std::time::SystemTime::now() - DAY,
        };
        let expired = leaf(&ca, &[OPERATOR.into()], past).unwrap();

        let files = Files {
            dir: tempfile::tempdir().unwrap(),
        };
        swap(&files.path("tls.crt"), &server.cert_pem);
        swap(&files.path("tls.key"), &server.key_pem);
        swap(&files.path("ca.crt"), &ca.cert_pem);
        let toml = format!(
            "\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\nclient_names = [\"{OPERATOR}\"]\naccept_token = false\n",
            files.path("tls.crt").display(),
            files.path("tls.key").display(),
            files.path("ca.crt").display(),
        );
        let mut fx = AgentFixture::start_with(agent_bin!(), 15, AgentOptions::toml(toml.clone()))
            .await
            .unwrap();
        let base = format!("https://{}", fx.api);
        let token = Some(fx.token.as_str());

        // Plain HTTP on the pod-IP listener gets no answer.
        let plain = reqwest::Client::new()
            .get(format!("http://{}/healthz", fx.api))
            .send()
            .await;
        assert!(plain.is_err(), "plain HTTP answered: {plain:?}");

        // No certificate: the open routes answer (probes, Prometheus); a state-changing route
        // wants the operator's certificate, and the token does not replace it here.
        let anonymous = client(&ca, SERVER, None);
        let health = anonymous
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        assert_eq!(reload(&anonymous, &base, token).await, Ok(401));
        let body = refusal(&anonymous, &base).await;
        assert!(
            body.message
                .contains("requires a client certificate named pgpilot-operator"),
            "{body:?}"
        );
        // The loopback listener stays plain HTTP with the token (wal-push, the CLI).
        assert_eq!(
            post(
                &reqwest::Client::new(),
                &format!("http://{}", fx.loopback),
                "/v1/reload",
                &fx.token
            )
            .await
            .status(),
            200
        );

        // Postgres serves the same certificate and takes TCP connections over TLS only.
        assert_eq!(pg(&fx, Some((&ca, SERVER))).await, Ok(true));
        let plain = pg(&fx, None).await;
        assert!(
            plain.as_ref().is_err_and(|e| e.contains("no encryption")),
            "{plain:?}"
        );
        let wrong = pg(&fx, Some((&ca, "elsewhere.pgpilot.test"))).await;
        assert!(
            wrong.as_ref().is_err_and(|e| e.contains("NotValidForName")),
            "{wrong:?}"
        );

        // The server's certificate: verified under its DNS name, though dialled by IP.
        let wrong_name = reload(
            &client(&ca, "elsewhere.pgpilot.test", Some(&operator)),
            &base,
            None,
        )
        .await;
        assert!(
            wrong_name
                .as_ref()
                .is_err_and(|e| e.contains("NotValidForName")),
            "{wrong_name:?}"
        );

        // Untrusted and expired client certificates fail the handshake, counted.
        let bad = reload(&client(&ca, SERVER, Some(&untrusted)), &base, None).await;
        assert!(
            bad.is_err(),
            "an untrusted certificate was accepted: {bad:?}"
        );
        let bad = reload(&client(&ca, SERVER, Some(&expired)), &base, None).await;
        assert!(bad.is_err(), "an expired certificate was accepted: {bad:?}");
        let metrics = metrics_text(&anonymous, &base).await;
        assert_eq!(
            metric(
                &metrics,
                "pgpilot_api_auth_failures_total{reason=\"bad_certificate\"}"
            ),
            2.0
        );
        // Trusted, but of another name: refused, saying why.
        let body = refusal(&client(&ca, SERVER, Some(&stranger)), &base).await;
        assert!(
            body.message
                .contains("names (someone-else) are not among those accepted (pgpilot-operator)"),
            "{body:?}"
        );
        // The operator's certificate authenticates without a token.
        assert_eq!(
            reload(&client(&ca, SERVER, Some(&operator)), &base, None).await,
            Ok(200)
        );
        let expiry = |m: &str| metric(m, "pgpilot_tls_certificate_expiry_timestamp_seconds") as i64;
        let not_after = |i: &Issued| {
            let chain = pgpilot_common::tls::certs(i.cert_pem.as_bytes(), "cert").unwrap();
            pgpilot_common::tls::cert_info(&chain[0]).unwrap().not_after
        };
        assert_eq!(expiry(&metrics), not_after(&server));

        // 2. Rotation on disk, no restart: a new server certificate under a new name, then a
        //    new CA. Each is in use within a few reload periods.
        let v2 = Validity::starting_now(2 * DAY);
        let renamed = "orders-0.renamed.pgpilot.test";
        let server2 = leaf(&ca, &[renamed.into()], v2).unwrap();
        swap(&files.path("tls.key"), &server2.key_pem);
        swap(&files.path("tls.crt"), &server2.cert_pem);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while reload(&client(&ca, renamed, Some(&operator)), &base, None).await != Ok(200) {
            assert!(
                std::time::Instant::now() < deadline,
                "the new certificate was not picked up"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // (A new client: a pooled connection keeps the certificate of its handshake.)
        let metrics = client(&ca, SERVER, None)
            .get(format!("{base}/metrics"))
            .send()
            .await;
        assert!(metrics.is_err(), "the old name still verifies");
        let metrics = metrics_text(&client(&ca, renamed, None), &base).await;
        assert_eq!(expiry(&metrics), not_after(&server2));
        // Postgres too, reloaded by the agent: new sessions get the new certificate.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while pg(&fx, Some((&ca, renamed))).await != Ok(true) {
            assert!(
                std::time::Instant::now() < deadline,
                "Postgres did not take the new certificate"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(pg(&fx, Some((&ca, SERVER))).await.is_err());
        assert!(metric(&metrics, "pgpilot_tls_reloads_total") >= 1.0);

        // The CA rotated to one that signs a new operator certificate: the old one is refused.
        let ca2 = new_ca("pgpilot test CA 2", v2).unwrap();
        let operator2 = leaf(&ca2, &[OPERATOR.into()], v2).unwrap();
        swap(&files.path("ca.crt"), &ca2.cert_pem);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while reload(&client(&ca, renamed, Some(&operator2)), &base, None).await != Ok(200) {
            assert!(
                std::time::Instant::now() < deadline,
                "the new CA was not picked up"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let old = reload(&client(&ca, renamed, Some(&operator)), &base, None).await;
        assert!(
            old.is_err(),
            "a certificate of the old CA is still accepted: {old:?}"
        );
        let logs = fx.logs();
        assert!(logs.contains("TLS certificate reloaded"), "{logs}");
        for secret in [&server.key_pem, &server2.key_pem, &ca.key_pem] {
            let body = secret.lines().nth(1).unwrap();
            assert!(!logs.contains(body), "a private key reached the log");
        }

        // 3. A world-readable key file: refused at start, naming it.
        fx.signal_agent(nix::sys::signal::Signal::SIGTERM).unwrap();
        assert!(fx.wait_exit(LONG).unwrap().success());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            files.path("tls.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        fx.spawn().unwrap();
        assert!(!fx.wait_exit(LONG).unwrap().success());
        let logs = fx.logs();
        assert!(
            logs.contains(&format!(
                "the TLS key file {} is readable by every user (mode 0644)",
                files.path("tls.key").display()
            )),
            "{logs}"
        );
    }
}
