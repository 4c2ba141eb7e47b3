//! `pgpilot-wal`, the archive_command front, on its own: what it hands to the agent binary
//! when the agent cannot be reached, how it gives up on a hung agent, and what it refuses.
//! With a real agent, Postgres and stores it is covered by archive_wal.rs (every call there
//! goes through it) and by every test whose Postgres archives or restores.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const FRONT: &str = env!("CARGO_BIN_EXE_pgpilot-wal");
const AGENT: &str = env!("CARGO_BIN_EXE_pgpilot-agent");
const SEGMENT: &str = "000000010000000000000003";

/// A data dir, a runtime file naming `api_url` (bound of one second), and a stand-in for the
/// agent binary that records its arguments and exits 7.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(api_url: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(
            dir.path().join("runtime.json"),
            format!(
                r#"{{"api_url":"{api_url}","token":"s3cret-token","data_dir":"/nowhere","store":{{}},
                    "archive":{{"command_timeout_secs":1,"verify":"size"}}}}"#
            ),
        )
        .unwrap();
        let fake = dir.path().join("fake-agent");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\nexit 7\n",
                dir.path().join("handed-over").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        Setup { dir }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn runtime(&self) -> PathBuf {
        self.dir.path().join("runtime.json")
    }

    /// Runs the front in the data dir, with `agent` as the binary to hand over to.
    fn run(&self, agent: &Path, sub: &str, operands: &[&str]) -> Output {
        Command::new(FRONT)
            .arg(agent)
            .arg(sub)
            .arg("--runtime")
            .arg(self.runtime())
            .args(operands)
            .current_dir(self.data())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn fake(&self) -> PathBuf {
        self.dir.path().join("fake-agent")
    }

    /// The arguments the stand-in agent was run with, one per line.
    fn handed_over(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("handed-over")).ok()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn an_unreachable_agent_hands_the_same_command_to_the_agent_binary_directly() {
    let s = Setup::new(&format!("http://127.0.0.1:{}", closed_port()));
    let path = format!("pg_wal/{SEGMENT}");
    let out = s.run(&s.fake(), "wal-push", &[&path]);
    // The agent binary's exit status is the command's: it replaced the front.
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("agent unreachable"),
        "{}",
        stderr(&out)
    );
    let rt = s.runtime().display().to_string();
    assert_eq!(
        s.handed_over().unwrap(),
        format!("wal-push\n--direct\n--runtime\n{rt}\n{path}\n")
    );

    let out = s.run(&s.fake(), "wal-fetch", &[SEGMENT, "pg_wal/RECOVERYXLOG"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(
        s.handed_over().unwrap(),
        format!("wal-fetch\n--direct\n--runtime\n{rt}\n{SEGMENT}\npg_wal/RECOVERYXLOG\n")
    );
    // The real agent binary accepts what the front hands it (here it fails on the runtime
    // file's empty store settings, which is the direct path running, not a usage error).
    let out = s.run(Path::new(AGENT), "wal-push", &[&path]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("Usage"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("s3cret-token"), "{}", stderr(&out));
}

#[test]
fn an_api_url_the_front_does_not_speak_goes_to_the_agent_binary_unchanged() {
    let s = Setup::new("https://127.0.0.1:1");
    let out = s.run(&s.fake(), "wal-push", &["pg_wal/x"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let rt = s.runtime().display().to_string();
    assert_eq!(
        s.handed_over().unwrap(),
        format!("wal-push\n--runtime\n{rt}\npg_wal/x\n")
    );
}

#[test]
fn a_hung_agent_is_given_up_on_after_the_command_timeout() {
    // Accepts connections (the kernel's backlog) and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = Setup::new(&format!("http://{}", listener.local_addr().unwrap()));
    let out = s.run(&s.fake(), "wal-push", &[&format!("pg_wal/{SEGMENT}")]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("wal-push pg_wal/{SEGMENT}: gave up after 1s")),
        "{}",
        stderr(&out)
    );
    // Not handed over: the agent may still be working on it.
    assert_eq!(s.handed_over(), None);

    // restore_command in archive recovery: stop recovery (exit 200) rather than end it early.
    std::fs::write(s.data().join("recovery.signal"), "").unwrap();
    let out = s.run(&s.fake(), "wal-fetch", &[SEGMENT, "pg_wal/RECOVERYXLOG"]);
    assert_eq!(out.status.code(), Some(200), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stopping recovery here rather than ending it early"),
        "{}",
        stderr(&out)
    );
    // A standby streams from its primary instead: an ordinary failure.
    std::fs::write(s.data().join("standby.signal"), "").unwrap();
    let out = s.run(&s.fake(), "wal-fetch", &[SEGMENT, "pg_wal/RECOVERYXLOG"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // What the agent was sent: the token as a bearer, the file as JSON.
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut request = vec![0; 4096];
    let n = conn.read(&mut request).unwrap();
    let request = String::from_utf8_lossy(&request[..n]);
    assert!(
        request.starts_with("POST /v1/wal/push HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request.contains("authorization: Bearer s3cret-token\r\n"),
        "{request}"
    );
    assert!(
        request.ends_with(&format!(r#"{{"path":"pg_wal/{SEGMENT}"}}"#)),
        "{request}"
    );
}

#[test]
fn bad_command_lines_and_runtime_files_are_refused_naming_what_is_wrong() {
    let s = Setup::new("http://127.0.0.1:1");
    let out = Command::new(FRONT)
        .arg(AGENT)
        .arg("wal-push")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("expected --runtime <file>"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("usage: pgpilot-wal"),
        "{}",
        stderr(&out)
    );

    std::fs::write(s.runtime(), "{not json").unwrap();
    let out = s.run(&s.fake(), "wal-push", &["pg_wal/x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("runtime file") && err.contains("is not valid"),
        "{err}"
    );
    std::fs::remove_file(s.runtime()).unwrap();
    let out = s.run(&s.fake(), "wal-push", &["pg_wal/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read the agent's runtime file"),
        "{}",
        stderr(&out)
    );
    assert_eq!(s.handed_over(), None);

    let out = Command::new(FRONT).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pgpilot-wal "));
}
