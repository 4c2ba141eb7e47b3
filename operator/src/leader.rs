//! Leader election for the operator's replicas: one Lease (`pgpilot-operator` in the operator's
//! namespace); only its holder runs the controller. The holder renews it every `renew`; a
//! replica counts it as expired `duration` after it last *changed*, by its own clock (as
//! client-go does), and then takes it with a resourceVersion-guarded replace, so of two racers
//! one gets 409. A holder that cannot renew within `deadline` (shorter than `duration`) stops
//! acting and returns, and the process exits: crash-only, Kubernetes restarts it as a
//! follower. Two replicas never both act.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

/// How the election runs.
#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
    pub deadline: Duration,
}

impl Election {
    pub fn new(namespace: &str, identity: &str) -> Election {
        Election {
            namespace: namespace.into(),
            name: "pgpilot-operator".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(2),
            deadline: Duration::from_secs(10),
        }
    }
}

/// Waits until this replica holds the Lease, then runs `lead` (given a token that is cancelled
/// when leadership is lost) while renewing it. Returns once leadership is lost (an error
/// saying why) or `shutdown` is cancelled (the Lease is released for a quick hand-over).
pub async fn run<F, Fut>(
    client: kube::Client,
    e: Election,
    shutdown: CancellationToken,
    lead: F,
) -> Result<(), String>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let api: Api<Lease> = Api::namespaced(client, &e.namespace);
    let mut seen: Option<(String, Instant)> = None;
    // 1. Follow until the Lease is ours.
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match try_take(&api, &e, &mut seen).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(why) => tracing::warn!(lease = %e.name, "leader election: {why}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(e.renew) => {}
        }
    }
    tracing::info!(lease = %e.name, identity = %e.identity, "leader election: leading");
    // 2. Lead while renewing.
    // The work is polled here, not spawned: whatever ends this future (leadership lost, the
    // task aborted) ends the work with it.
    let lost = CancellationToken::new();
    let work = lead(lost.clone());
    tokio::pin!(work);
    let mut renewed = Instant::now();
    let outcome = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = &mut work => break Err("the controller stopped".to_string()),
            _ = tokio::time::sleep(e.renew) => {}
        }
        match renew(&api, &e).await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => break Err(format!("the Lease {} is held by someone else now", e.name)),
            Err(why) => {
                tracing::warn!(lease = %e.name, "leader election: cannot renew: {why}");
                if renewed.elapsed() >= e.deadline {
                    break Err(format!(
                        "the Lease {} could not be renewed for {:?}",
                        e.name, e.deadline
                    ));
                }
            }
        }
    };
    lost.cancel();
    if outcome.is_ok() {
        let _ = release(&api, &e).await;
    }
    outcome
}

fn holder(l: &Lease) -> Option<&str> {
    l.spec
        .as_ref()?
        .holder_identity
        .as_deref()
        .filter(|h| !h.is_empty())
}

fn spec(e: &Election, transitions: i32) -> LeaseSpec {
    let now = MicroTime(jiff::Timestamp::now());
    LeaseSpec {
        holder_identity: Some(e.identity.clone()),
        lease_duration_seconds: Some(e.duration.as_secs() as i32),
        acquire_time: Some(now.clone()),
        renew_time: Some(now),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

/// Takes the Lease when it is absent, ours, free, or expired by this replica's clock.
async fn try_take(
    api: &Api<Lease>,
    e: &Election,
    seen: &mut Option<(String, Instant)>,
) -> Result<bool, String> {
    let current = api.get_opt(&e.name).await.map_err(|x| x.to_string())?;
    let Some(mut lease) = current else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(e.name.clone()),
                ..Default::default()
            },
            spec: Some(spec(e, 0)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(x) => Err(x.to_string()),
        };
    };
    let rv = lease.metadata.resource_version.clone().unwrap_or_default();
    if seen.as_ref().is_none_or(|(v, _)| *v != rv) {
        *seen = Some((rv, Instant::now()));
    }
    let expired = seen
        .as_ref()
        .is_some_and(|(_, at)| at.elapsed() >= e.duration);
    let free = match holder(&lease) {
        None => true,
        Some(h) => h == e.identity || expired,
    };
    if !free {
        return Ok(false);
    }
    let transitions = lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0)
        + i32::from(holder(&lease) != Some(e.identity.as_str()));
    lease.spec = Some(spec(e, transitions));
    match api.replace(&e.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(x) => Err(x.to_string()),
    }
}

/// Renews the Lease if this replica still holds it; `Ok(false)` when someone else does.
async fn renew(api: &Api<Lease>, e: &Election) -> Result<bool, String> {
    let mut lease = api.get(&e.name).await.map_err(|x| x.to_string())?;
    if holder(&lease) != Some(e.identity.as_str()) {
        return Ok(false);
    }
    if let Some(s) = lease.spec.as_mut() {
        s.renew_time = Some(MicroTime(jiff::Timestamp::now()));
    }
    match api.replace(&e.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(x) => Err(x.to_string()),
    }
}

/// Gives the Lease up on a clean shutdown, so another replica takes over at once.
async fn release(api: &Api<Lease>, e: &Election) -> Result<(), String> {
    let mut lease = api.get(&e.name).await.map_err(|x| x.to_string())?;
    if holder(&lease) != Some(e.identity.as_str()) {
        return Ok(());
    }
    if let Some(s) = lease.spec.as_mut() {
        s.holder_identity = None;
    }
    api.replace(&e.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
        .map_err(|x| x.to_string())
}
