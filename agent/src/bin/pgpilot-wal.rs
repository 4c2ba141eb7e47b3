//! `pgpilot-wal`: what Postgres runs as archive_command and restore_command, once per WAL file.
//!
//! The agent renders
//!
//! ```text
//! archive_command = '<pgpilot-wal> <pgpilot-agent> wal-push --runtime <file> %p'
//! restore_command = '<pgpilot-wal> <pgpilot-agent> wal-fetch --runtime <file> %f %p'
//! ```
//!
//! This binary makes the one call to the running agent's loopback API and exits with the
//! status Postgres acts on, exactly as `pgpilot-agent wal-push` / `wal-fetch` do. It exists to
//! be cheap to start: Postgres starts it for every 16 MiB segment, and the agent's own binary
//! (~47 MB, ~56,000 relocations) takes ~1 ms more CPU and ~1.5 ms more wall time to start and
//! exit; through this one a push is 1.8–1.9 ms shorter (docs/benchmarks.md, "P1"). So it links
//! only tokio's current-thread runtime, hyper's HTTP/1 client and the API types, never the
//! agent's library.
//!
//! Whatever it cannot do through the agent it hands to the agent binary by `exec`:
//! - the agent cannot be reached: `<pgpilot-agent> wal-push --direct …`, which works on the
//!   store itself (the agent's direct path), without asking the unreachable agent again;
//! - a runtime file whose API URL is not plain `http://` loopback: the same command line
//!   without `--direct`.

#![forbid(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper_util::rt::TokioIo;
use pgpilot_common::api::{ErrorBody, WalFetchRequest, WalFetchResponse, WalPushRequest};
use pgpilot_common::archive_command::{
    DIRECT_FLAG, FETCH_FATAL_EXIT, RuntimeLoopback, gave_up, in_archive_recovery, move_into_place,
};

const USAGE: &str = "usage: pgpilot-wal <pgpilot-agent> wal-push --runtime <file> <%p>
       pgpilot-wal <pgpilot-agent> wal-fetch --runtime <file> <%f> <%p>
pgpilot-agent renders these as archive_command and restore_command; run `pgpilot-agent wal-push --help`.";

/// One archive_command or restore_command.
#[derive(Debug, PartialEq)]
enum Op {
    /// `wal-push %p`.
    Push { path: String },
    /// `wal-fetch %f %p`.
    Fetch { name: String, dest: PathBuf },
}

#[derive(Debug, PartialEq)]
struct Invocation {
    /// The agent binary to hand the work to when the agent cannot be reached.
    agent: PathBuf,
    runtime: PathBuf,
    op: Op,
}

impl Invocation {
    fn subcommand(&self) -> &'static str {
        match self.op {
            Op::Push { .. } => "wal-push",
            Op::Fetch { .. } => "wal-fetch",
        }
    }

    /// `%p`, or `%f %p`.
    fn operands(&self) -> Vec<&OsStr> {
        match &self.op {
            Op::Push { path } => vec![OsStr::new(path)],
            Op::Fetch { name, dest } => vec![OsStr::new(name), dest.as_os_str()],
        }
    }

    /// What the error message calls this command, as the agent does.
    fn what(&self) -> String {
        match &self.op {
            Op::Push { path } => format!("wal-push {path}"),
            Op::Fetch { name, .. } => format!("wal-fetch {name}"),
        }
    }
}

/// Parses the arguments after the program name: `<agent> wal-push --runtime <file> <%p>` or
/// `<agent> wal-fetch --runtime <file> <%f> <%p>`.
fn parse(args: &[OsString]) -> Result<Invocation, String> {
    let utf8 = |what: &str, s: &OsString| {
        s.to_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{what} {s:?} is not UTF-8"))
    };
    let [agent, sub, rest @ ..] = args else {
        return Err("expected the agent binary and a subcommand".into());
    };
    let (runtime, operands) = match rest {
        [flag, runtime, operands @ ..] if flag == "--runtime" => (runtime, operands),
        _ => return Err("expected --runtime <file> after the subcommand".into()),
    };
    let op = match (sub.to_str(), operands) {
        (Some("wal-push"), [path]) => Op::Push {
            path: utf8("%p", path)?,
        },
        (Some("wal-fetch"), [name, dest]) => Op::Fetch {
            name: utf8("%f", name)?,
            dest: PathBuf::from(dest),
        },
        (Some("wal-push"), _) => return Err("wal-push takes one operand, %p".into()),
        (Some("wal-fetch"), _) => return Err("wal-fetch takes two operands, %f and %p".into()),
        _ => return Err(format!("unknown subcommand {sub:?}")),
    };
    Ok(Invocation {
        agent: PathBuf::from(agent),
        runtime: PathBuf::from(runtime),
        op,
    })
}

/// How one call ended.
#[derive(Debug)]
enum Outcome {
    Done,
    /// restore_command: the archive does not hold the file.
    Missing,
    /// The agent could not be reached, or its answer could not be read: the agent binary
    /// does the work directly.
    Unreachable(String),
    /// The runtime file's API URL is not one this binary speaks: the agent binary does it all.
    NotLoopback,
    Failed(String),
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if matches!(
        args.first().and_then(|a| a.to_str()),
        Some("--version" | "-V")
    ) {
        println!("pgpilot-wal {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let inv = match parse(&args) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("pgpilot-wal: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let outcome = match RuntimeLoopback::read(&inv.runtime) {
        Ok(rt) => run(&inv, &rt),
        Err(e) => Outcome::Failed(e),
    };
    match outcome {
        Outcome::Done => ExitCode::SUCCESS,
        // Postgres asks for files past the end of the archive on purpose; say nothing.
        Outcome::Missing => ExitCode::from(1),
        Outcome::Unreachable(cause) => {
            match &inv.op {
                Op::Push { path } => {
                    eprintln!("wal-push: agent unreachable ({cause}); uploading {path} directly")
                }
                Op::Fetch { name, .. } => {
                    eprintln!("wal-fetch: agent unreachable ({cause}); fetching {name} directly")
                }
            }
            hand_over(&inv, true)
        }
        Outcome::NotLoopback => hand_over(&inv, false),
        Outcome::Failed(e) => failed(&inv, &e),
    }
}

/// The exit of a command that failed with `e`. Postgres runs restore_command in the data dir:
/// during a restore, stop recovery with FATAL rather than let it end early at this file (see
/// FETCH_FATAL_EXIT).
fn failed(inv: &Invocation, e: &str) -> ExitCode {
    match &inv.op {
        Op::Fetch { name, .. } if in_archive_recovery(Path::new(".")) => {
            eprintln!(
                "error: {e}; stopping recovery here rather than ending it early at {name} (exit {FETCH_FATAL_EXIT})"
            );
            ExitCode::from(FETCH_FATAL_EXIT)
        }
        _ => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Replaces this process with the agent binary running the same command (`direct`: on the
/// store, without asking the agent). Returns only when that cannot start.
fn hand_over(inv: &Invocation, direct: bool) -> ExitCode {
    let mut cmd = std::process::Command::new(&inv.agent);
    cmd.arg(inv.subcommand());
    if direct {
        cmd.arg(DIRECT_FLAG);
    }
    cmd.arg("--runtime").arg(&inv.runtime).args(inv.operands());
    let e = cmd.exec();
    failed(
        inv,
        &format!("{}: cannot run {}: {e}", inv.what(), inv.agent.display()),
    )
}

/// The call to the agent, within `[archive] command_timeout_secs`.
fn run(inv: &Invocation, rt: &RuntimeLoopback) -> Outcome {
    let Some(authority) = rt
        .api_url
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
    else {
        return Outcome::NotLoopback;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("cannot start the async runtime: {e}")),
    };
    let bound = rt.bound();
    let url = &rt.api_url;
    runtime.block_on(async {
        let call = async {
            match &inv.op {
                Op::Push { path } => {
                    let body = WalPushRequest { path: path.clone() };
                    match post(authority, &rt.token, "/v1/wal/push", &body).await {
                        Ok((status, _)) if (200..300).contains(&status) => Outcome::Done,
                        Ok((status, body)) => Outcome::Failed(api_error(url, status, &body)),
                        Err(cause) => Outcome::Unreachable(cause),
                    }
                }
                Op::Fetch { name, dest } => {
                    let body = WalFetchRequest { name: name.clone() };
                    match post(authority, &rt.token, "/v1/wal/fetch", &body).await {
                        Ok((status, body)) if (200..300).contains(&status) => {
                            match serde_json::from_slice::<WalFetchResponse>(&body) {
                                Ok(r) => match move_into_place(Path::new(&r.spool_path), dest) {
                                    Ok(()) => Outcome::Done,
                                    Err(e) => Outcome::Failed(format!(
                                        "moving {} to {}: {e}",
                                        r.spool_path,
                                        dest.display()
                                    )),
                                },
                                Err(e) => Outcome::Unreachable(format!(
                                    "cannot read the agent's answer at {url}: {e}"
                                )),
                            }
                        }
                        Ok((404, _)) => Outcome::Missing,
                        Ok((status, body)) => Outcome::Failed(api_error(url, status, &body)),
                        Err(cause) => Outcome::Unreachable(cause),
                    }
                }
            }
        };
        match tokio::time::timeout(bound, call).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Failed(gave_up(&inv.what(), bound)),
        }
    })
}

/// `POST path` with a JSON body on one HTTP/1.1 connection to `authority`; the status and
/// body of the answer, or why there is none (the transport's error, for the fallback).
async fn post(
    authority: &str,
    token: &str,
    path: &str,
    body: &impl serde::Serialize,
) -> Result<(u16, Bytes), String> {
    let url = format!("http://{authority}{path}");
    let cannot = |e: &dyn std::fmt::Display| format!("cannot reach the agent at {url}: {e}");
    let body = serde_json::to_vec(body).map_err(|e| cannot(&e))?;
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| cannot(&e))?;
    stream.set_nodelay(true).map_err(|e| cannot(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| cannot(&e))?;
    // Drives the connection; it ends when the answer is read and the sender dropped.
    let conn = tokio::spawn(conn);
    let mut bearer = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| cannot(&"the runtime file's token is not a valid header value"))?;
    bearer.set_sensitive(true);
    let request = hyper::Request::post(path)
        .header(HOST, authority)
        .header(AUTHORIZATION, bearer)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| cannot(&e))?;
    let response = sender.send_request(request).await.map_err(|e| cannot(&e))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| cannot(&e))?
        .to_bytes();
    drop(sender);
    conn.abort();
    Ok((status, body))
}

/// The agent's refusal as `pgpilot-agent wal-push` words it: `agent at <url> answered <status>:
/// <message>`.
fn api_error(url: &str, status: u16, body: &[u8]) -> String {
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => b.message,
        Err(_) if body.is_empty() => format!("HTTP {status}"),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    format!("agent at {url} answered {status}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_the_rendered_command_lines() {
        assert_eq!(
            parse(&args(&[
                "/b/pgpilot-agent",
                "wal-push",
                "--runtime",
                "/s/run/archive-runtime.json",
                "pg_wal/000000010000000000000001",
            ])),
            Ok(Invocation {
                agent: "/b/pgpilot-agent".into(),
                runtime: "/s/run/archive-runtime.json".into(),
                op: Op::Push {
                    path: "pg_wal/000000010000000000000001".into()
                },
            })
        );
        assert_eq!(
            parse(&args(&[
                "a",
                "wal-fetch",
                "--runtime",
                "r",
                "000000010000000000000001",
                "pg_wal/RECOVERYXLOG",
            ])),
            Ok(Invocation {
                agent: "a".into(),
                runtime: "r".into(),
                op: Op::Fetch {
                    name: "000000010000000000000001".into(),
                    dest: "pg_wal/RECOVERYXLOG".into()
                },
            })
        );
    }

    #[test]
    fn refuses_other_command_lines_saying_what_is_wrong() {
        for (list, says) in [
            (&[][..], "the agent binary and a subcommand"),
            (&["a"][..], "the agent binary and a subcommand"),
            (&["a", "wal-push", "p"][..], "--runtime <file>"),
            (&["a", "wal-push", "--runtime"][..], "--runtime <file>"),
            (&["a", "wal-push", "--runtime", "r"][..], "one operand, %p"),
            (
                &["a", "wal-push", "--runtime", "r", "p", "q"][..],
                "one operand",
            ),
            (&["a", "wal-fetch", "--runtime", "r", "f"][..], "%f and %p"),
            (
                &["a", "backup", "--runtime", "r", "x"][..],
                "unknown subcommand \"backup\"",
            ),
        ] {
            let err = parse(&args(list)).unwrap_err();
            assert!(err.contains(says), "{list:?}: {err}");
        }
    }

    #[test]
    fn the_agents_refusal_is_worded_as_the_agent_client_words_it() {
        let body = br#"{"error":"conflict","message":"different content"}"#;
        assert_eq!(
            api_error("http://127.0.0.1:1", 409, body),
            "agent at http://127.0.0.1:1 answered 409: different content"
        );
        assert_eq!(
            api_error("u", 502, b""),
            "agent at u answered 502: HTTP 502"
        );
        assert_eq!(
            api_error("u", 500, b"boom"),
            "agent at u answered 500: boom"
        );
    }
}
