//! Planned switchover: who the candidate is (a pure function, tested for every refusal), and
//! the calls to peers. The sequence itself runs in the executor (`core/reparent.rs`), which
//! owns the postmaster.

use std::time::Duration;

use pgpilot_common::api::ReplicaView;
use pgpilot_common::client::AgentClient;

use super::lsn;
use super::slots::Registry;
use crate::error::AgentError;

/// How long a peer call of a switchover may take (promote waits for the promotion itself).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// The replica chosen to become primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub api_url: String,
}

/// Chooses the candidate: the one named (which must be a registered replica, streaming, within
/// `max_lag` bytes), or else the streaming replica with the highest flushed LSN among those
/// within the bound.
pub fn choose(
    requested: Option<&str>,
    self_name: &str,
    replicas: &[ReplicaView],
    registry: &Registry,
    max_lag: u64,
) -> Result<Candidate, AgentError> {
    let known = || {
        let names: Vec<&str> = registry.replicas.keys().map(String::as_str).collect();
        if names.is_empty() {
            "no replica has registered with this primary".to_string()
        } else {
            format!("registered replicas: {}", names.join(", "))
        }
    };
    let healthy = |r: &ReplicaView| -> Result<(), String> {
        if r.state != "streaming" {
            return Err(format!("{} is not streaming (state {})", r.name, r.state));
        }
        match r.lag_bytes {
            Some(lag) if lag <= max_lag => Ok(()),
            Some(lag) => Err(format!(
                "{} lags {lag} bytes behind the primary (the bound is {max_lag}, [replication] max_lag_bytes)",
                r.name
            )),
            None => Err(format!("{} has not reported a replay position yet", r.name)),
        }
    };
    if let Some(name) = requested {
        if name == self_name {
            return Err(AgentError::BadRequest(format!(
                "candidate {name} is this primary itself; name one of its replicas ({})",
                known()
            )));
        }
        let Some(api_url) = registry.replicas.get(name) else {
            return Err(AgentError::NotFound(format!(
                "unknown candidate {name}: {}",
                known()
            )));
        };
        let Some(view) = replicas.iter().find(|r| r.name == name) else {
            return Err(AgentError::PreconditionFailed(format!(
                "candidate {name} is not connected to this primary (not in pg_stat_replication)"
            )));
        };
        healthy(view).map_err(|why| AgentError::PreconditionFailed(format!("candidate {why}")))?;
        return Ok(Candidate {
            name: name.to_string(),
            api_url: api_url.clone(),
        });
    }
    let mut why_not = Vec::new();
    let best = replicas
        .iter()
        .filter(
            |r| match (registry.replicas.contains_key(&r.name), healthy(r)) {
                (false, _) => {
                    why_not.push(format!("{} never registered with this agent", r.name));
                    false
                }
                (true, Err(why)) => {
                    why_not.push(why);
                    false
                }
                (true, Ok(())) => true,
            },
        )
        .max_by_key(|r| r.flush_lsn.as_deref().and_then(lsn).unwrap_or(0));
    match best {
        Some(r) => Ok(Candidate {
            name: r.name.clone(),
            api_url: registry.replicas[&r.name].clone(),
        }),
        None => Err(AgentError::PreconditionFailed(if why_not.is_empty() {
            format!("no replica streams from this primary ({})", known())
        } else {
            format!("no healthy streaming replica: {}", why_not.join("; "))
        })),
    }
}

/// A client for a peer agent, with the shard's shared API token and, with `[tls]`, the peers'
/// CA and this agent's certificate (read afresh, so a rotation is picked up).
pub fn peer(ctx: &crate::context::Context, url: &str) -> AgentClient {
    let token = Some(ctx.api_token.current().expose().to_string());
    let tls = ctx.cfg.tls.as_ref().and_then(|t| match t.peer_client() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(peer = url, "TLS to peers: {e}");
            None
        }
    });
    AgentClient::with_tls(url, token, tls)
}

/// Runs a peer call with [`PEER_TIMEOUT`], turning both failures into words.
pub async fn call<T>(
    what: &str,
    fut: impl Future<Output = Result<T, pgpilot_common::client::ClientError>>,
) -> Result<T, String> {
    match tokio::time::timeout(PEER_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {PEER_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, state: &str, flush: &str, lag: u64) -> ReplicaView {
        ReplicaView {
            name: name.into(),
            state: state.into(),
            client_addr: None,
            sent_lsn: Some(flush.into()),
            flush_lsn: Some(flush.into()),
            replay_lsn: Some(flush.into()),
            lag_bytes: Some(lag),
            api_url: None,
        }
    }

    fn registry(names: &[&str]) -> Registry {
        let mut r = Registry::default();
        for n in names {
            r.replicas.insert(n.to_string(), format!("http://{n}"));
        }
        r
    }

    #[test]
    fn best_is_the_streaming_replica_with_the_highest_lsn() {
        let reg = registry(&["a", "b", "c"]);
        let v = [
            view("a", "streaming", "0/300", 0),
            view("b", "streaming", "0/500", 0),
            view("c", "catchup", "0/900", 0),
        ];
        assert_eq!(choose(None, "p", &v, &reg, 100).unwrap().name, "b");
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let reg = registry(&["a", "b"]);
        let v = [
            view("a", "streaming", "0/300", 10_000),
            view("b", "catchup", "0/100", 0),
        ];
        let err = |r: Result<Candidate, AgentError>| r.unwrap_err();
        let e = err(choose(Some("zz"), "p", &v, &reg, 100));
        assert!(
            matches!(&e, AgentError::NotFound(m) if m.contains("unknown candidate zz") && m.contains("a, b")),
            "{e}"
        );
        let e = err(choose(Some("p"), "p", &v, &reg, 100));
        assert!(
            matches!(&e, AgentError::BadRequest(m) if m.contains("this primary itself")),
            "{e}"
        );
        let e = err(choose(Some("a"), "p", &v, &reg, 100));
        assert!(
            matches!(&e, AgentError::PreconditionFailed(m) if m.contains("lags 10000 bytes")),
            "{e}"
        );
        let e = err(choose(Some("b"), "p", &v, &reg, 100));
        assert!(
            matches!(&e, AgentError::PreconditionFailed(m) if m.contains("not streaming (state catchup)")),
            "{e}"
        );
        let e = err(choose(None, "p", &v, &reg, 100));
        assert!(
            matches!(&e, AgentError::PreconditionFailed(m) if m.contains("no healthy streaming replica")),
            "{e}"
        );
        let e = err(choose(None, "p", &[], &Registry::default(), 100));
        assert!(
            matches!(&e, AgentError::PreconditionFailed(m) if m.contains("no replica has registered")),
            "{e}"
        );
        let e = err(choose(Some("b"), "p", &[], &reg, 100));
        assert!(
            matches!(&e, AgentError::PreconditionFailed(m) if m.contains("not connected")),
            "{e}"
        );
    }
}
