//! Watch streams: newline-delimited JSON `WatchEvent`s over a chunked response. A watch starts
//! from a resourceVersion (replaying the history after it, or 410 Expired if that is gone) or
//! from "now" with synthetic ADDED events for the current state; with `sendInitialEvents` it
//! ends the initial state with the `k8s.io/initial-events-end` bookmark (streaming lists), and
//! with `allowWatchBookmarks` it sends periodic BOOKMARKs. Selector-filtered watches turn
//! objects entering or leaving the selection into ADDED and DELETED, like the watch cache.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::resources::ResourceType;
use crate::store::{Change, EventType, Selection, Store};

pub struct WatchRequest {
    pub rt: Arc<ResourceType>,
    pub version: String,
    pub selection: Selection,
    pub from: Option<u64>,
    pub bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout: Duration,
    pub bookmark_interval: Duration,
    /// Send `PartialObjectMetadata` objects (kube-rs' `metadata_watcher`).
    pub metadata_only: bool,
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

impl WatchRequest {
    fn with_version(&self, obj: &Value) -> Value {
        let mut o = obj.clone();
        o["apiVersion"] = json!(self.rt.api_version(&self.version));
        if self.metadata_only {
            crate::handlers::partial(&o)
        } else {
            o
        }
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let (kind, api_version) = if self.metadata_only {
            (
                "PartialObjectMetadata".to_string(),
                "meta.k8s.io/v1".to_string(),
            )
        } else {
            (self.rt.kind.clone(), self.rt.api_version(&self.version))
        };
        line(
            "BOOKMARK",
            &json!({"kind": kind, "apiVersion": api_version, "metadata": meta}),
        )
    }

    /// The event a change becomes for this watch, if any.
    fn translate(&self, c: &Change) -> Option<Bytes> {
        if c.group != self.rt.group || c.plural != self.rt.plural {
            return None;
        }
        let now = self.selection.matches(&c.object);
        let before = c.old.as_ref().is_some_and(|o| self.selection.matches(o));
        let kind = match c.kind {
            EventType::Added if now => "ADDED",
            EventType::Modified if now && before => "MODIFIED",
            EventType::Modified if now => "ADDED",
            EventType::Modified if before => "DELETED",
            EventType::Deleted if now || before => "DELETED",
            _ => return None,
        };
        Some(line(kind, &self.with_version(&c.object)))
    }

    pub fn respond(self, store: Arc<Store>) -> Response {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move { self.run(store, tx).await });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::TRANSFER_ENCODING, "chunked")
            .body(Body::from_stream(stream))
            .expect("static response parts")
    }

    async fn run(self, store: Arc<Store>, tx: mpsc::Sender<Bytes>) {
        let from = if self.send_initial_events {
            None
        } else {
            self.from
        };
        // Subscribed first, so a close during the initial events is not missed.
        let mut epoch = store.watch_epoch();
        epoch.mark_unchanged();
        let crate::store::WatchStart {
            initial,
            rv: start_rv,
            mut feed,
        } = match store.watch(&self.rt, &self.selection, from) {
            Ok(x) => x,
            Err(e) => {
                // Like kube-apiserver: a 200 response whose only event is an ERROR with the Status.
                let _ = tx.send(line("ERROR", &e.status())).await;
                return;
            }
        };
        let mut seen = self.from.unwrap_or(0).max(start_rv);
        for c in &initial {
            if let Some(b) = self.translate(c)
                && tx.send(b).await.is_err()
            {
                return;
            }
        }
        if self.send_initial_events && tx.send(self.bookmark(start_rv, true)).await.is_err() {
            return;
        }
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(self.bookmark_interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                change = feed.recv() => match change {
                    Ok(c) => {
                        if c.rv <= seen {
                            continue;
                        }
                        seen = c.rv;
                        if let Some(b) = self.translate(&c)
                            && tx.send(b).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher that fell behind ends; the client resumes from its last
                    // resourceVersion out of the history, as after any dropped connection.
                    Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if self.bookmarks => {
                    if tx.send(self.bookmark(seen, false)).await.is_err() {
                        return;
                    }
                }
                () = &mut deadline => return,
                () = tx.closed() => return,
                _ = epoch.changed() => return,
            }
        }
    }
}
