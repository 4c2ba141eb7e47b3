//! Typed HTTP client for the agent's API, used by the agent's own CLI and by the operator.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    BackupList, BackupProgress, BackupRequest, DrainRequest, DrainStatus, ErrorBody, FollowRequest,
    LifecycleResponse, RegisterReplicaRequest, RegisterReplicaResponse, ReinitializeRequest,
    ReloadResponse, ReparentResponse, RestoreAccepted, RestoreRequest, ShutdownRequest,
    StatusResponse, SwitchoverRequest, SwitchoverResponse, WalFetchRequest, WalFetchResponse,
    WalPushRequest, WalPushResponse, WalSwitchResponse,
};

/// What a call to the agent can end in, besides success.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent answered with an error body.
    #[error("agent at {url} answered {status}: {}", body.message)]
    Api {
        url: String,
        status: u16,
        body: ErrorBody,
    },
    /// The agent could not be reached or its answer could not be read.
    #[error("cannot reach the agent at {url}: {cause}")]
    Transport { url: String, cause: reqwest::Error },
}

impl ClientError {
    /// HTTP status of an API error, if the agent answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::Transport { .. } => None,
        }
    }
}

/// A client for one agent. The bearer token is kept out of `Debug`.
#[derive(Clone)]
pub struct AgentClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl AgentClient {
    /// `base` is the agent's API URL, e.g. `http://127.0.0.1:8009`. `token` is needed for
    /// routes that change state.
    pub fn new(base: impl Into<String>, token: Option<String>) -> Self {
        Self::with_tls(base, token, None)
    }

    /// As [`AgentClient::new`], over HTTPS with `tls` (see [`crate::tls::client_config`]) when
    /// given; `base` then starts with `https://`.
    pub fn with_tls(
        base: impl Into<String>,
        token: Option<String>,
        tls: Option<rustls::ClientConfig>,
    ) -> Self {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Lifecycle calls wait for Postgres to stop and start again.
            .timeout(Duration::from_secs(300));
        if let Some(tls) = tls {
            builder = builder.use_preconfigured_tls(tls);
        }
        let http = builder
            .build()
            .expect("reqwest client with static settings");
        Self {
            base: base.into().trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.call(Method::GET, "/v1/status", None::<&()>).await
    }

    pub async fn restart(&self, req: &ShutdownRequest) -> Result<LifecycleResponse, ClientError> {
        self.call(Method::POST, "/v1/restart", Some(req)).await
    }

    pub async fn stop(&self, req: &ShutdownRequest) -> Result<LifecycleResponse, ClientError> {
        self.call(Method::POST, "/v1/stop", Some(req)).await
    }

    pub async fn start(&self) -> Result<LifecycleResponse, ClientError> {
        self.call(Method::POST, "/v1/start", None::<&()>).await
    }

    pub async fn reload(&self) -> Result<ReloadResponse, ClientError> {
        self.call(Method::POST, "/v1/reload", None::<&()>).await
    }

    pub async fn restore(&self, req: &RestoreRequest) -> Result<RestoreAccepted, ClientError> {
        self.call(Method::POST, "/v1/restore", Some(req)).await
    }

    pub async fn wal_push(&self, req: &WalPushRequest) -> Result<WalPushResponse, ClientError> {
        self.call(Method::POST, "/v1/wal/push", Some(req)).await
    }

    pub async fn wal_fetch(&self, req: &WalFetchRequest) -> Result<WalFetchResponse, ClientError> {
        self.call(Method::POST, "/v1/wal/fetch", Some(req)).await
    }

    /// Closes the primary's current WAL segment so it is archived (`POST /v1/wal/switch`); a
    /// replica taking a base backup asks its primary for it.
    pub async fn switch_wal(&self) -> Result<WalSwitchResponse, ClientError> {
        self.call(Method::POST, "/v1/wal/switch", None::<&()>).await
    }

    /// Starts a base backup (`POST /v1/backups`); answers at once with its id.
    pub async fn start_backup(&self, req: &BackupRequest) -> Result<BackupProgress, ClientError> {
        self.call(Method::POST, "/v1/backups", Some(req)).await
    }

    /// One backup and its progress (`GET /v1/backups/{id}`).
    pub async fn backup(&self, id: &str) -> Result<BackupProgress, ClientError> {
        self.call(Method::GET, &format!("/v1/backups/{id}"), None::<&()>)
            .await
    }

    /// The store's backups and the recoverability window (`GET /v1/backups`).
    pub async fn backups(&self) -> Result<BackupList, ClientError> {
        self.call(Method::GET, "/v1/backups", None::<&()>).await
    }

    /// Registers a replica with this primary, which creates its slot (`POST /v1/replicas`).
    pub async fn register_replica(
        &self,
        req: &RegisterReplicaRequest,
    ) -> Result<RegisterReplicaResponse, ClientError> {
        self.call(Method::POST, "/v1/replicas", Some(req)).await
    }

    /// A planned switchover (`POST /v1/switchover` on the primary); answers when it is done.
    pub async fn switchover(
        &self,
        req: &SwitchoverRequest,
    ) -> Result<SwitchoverResponse, ClientError> {
        self.call(Method::POST, "/v1/switchover", Some(req)).await
    }

    pub async fn promote(&self) -> Result<ReparentResponse, ClientError> {
        self.call(Method::POST, "/v1/promote", None::<&()>).await
    }

    pub async fn demote(&self) -> Result<ReparentResponse, ClientError> {
        self.call(Method::POST, "/v1/demote", None::<&()>).await
    }

    pub async fn follow(&self, req: &FollowRequest) -> Result<ReparentResponse, ClientError> {
        self.call(Method::POST, "/v1/follow", Some(req)).await
    }

    /// Throws away this replica's data dir and clones its primary again.
    pub async fn reinitialize(
        &self,
        req: &ReinitializeRequest,
    ) -> Result<ReparentResponse, ClientError> {
        self.call(Method::POST, "/v1/reinitialize", Some(req)).await
    }

    /// Starts (or joins) the drain of this instance; answers at once with its status.
    pub async fn drain(&self, req: &DrainRequest) -> Result<DrainStatus, ClientError> {
        self.call(Method::POST, "/v1/drain", Some(req)).await
    }

    pub async fn drain_status(&self) -> Result<DrainStatus, ClientError> {
        self.call(Method::GET, "/v1/drain", None::<&()>).await
    }

    /// Cancels a drain that has not finished: the instance becomes a normal member again.
    pub async fn cancel_drain(&self) -> Result<DrainStatus, ClientError> {
        self.call(Method::DELETE, "/v1/drain", None::<&()>).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{}", self.base, path);
        let transport = |cause| ClientError::Transport {
            url: url.clone(),
            cause,
        };
        let mut req = self.http.request(method, &url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        if status.is_success() {
            return resp.json::<T>().await.map_err(transport);
        }
        let text = resp.text().await.map_err(transport)?;
        let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or_else(|_| ErrorBody {
            error: status_kind(status).to_string(),
            message: if text.is_empty() {
                status.to_string()
            } else {
                text
            },
            state: None,
        });
        Err(ClientError::Api {
            url,
            status: status.as_u16(),
            body,
        })
    }
}

fn status_kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        404 => "not_found",
        405 => "method_not_allowed",
        409 => "conflict",
        503 => "unavailable",
        _ => "internal",
    }
}

/// Checks an agent API URL (`http://host:port`, `https://…`) and returns it without a trailing
/// slash; the error says what is wrong with it.
/// The API tokens an agent's token file (or Secret key) holds: one per non-empty line, the
/// first the one to present, the others still accepted during a rotation (docs/security.md).
pub fn api_tokens(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

/// The token a client presents: the first of [`api_tokens`].
pub fn presented_token(text: &str) -> Option<&str> {
    api_tokens(text).into_iter().next()
}

pub fn check_agent_url(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "{url:?} must be an http:// or https:// agent API URL"
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// The host of a URL, without IPv6 brackets.
pub fn url_host(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    parsed
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).to_string())
}
