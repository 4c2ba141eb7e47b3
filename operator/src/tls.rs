//! TLS between the operator and the agents (`spec.tls`, docs/security.md). In the default
//! mode the operator keeps, per cluster, a CA (Secret `<cluster>-ca`, never mounted in a pod)
//! and the agents' certificate (Secret `<cluster>-agent-tls`, mounted in every agent pod),
//! renews that certificate before it ends, and calls the agents with a short-lived client
//! certificate of its own, issued in memory from the CA. The agents re-read their files, so a
//! renewal needs no restart.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use pgpilot_common::crd::{PostgresCluster, TlsMode};
use pgpilot_common::tls::issue::{self, Issued, Validity};

use crate::controller::{Ctx, Error, create_once, event};
use crate::objects;

/// The name in the operator's client certificate, which the agents accept.
pub const OPERATOR_CLIENT_NAME: &str = "pgpilot-operator";
/// The CA's lifetime. Rotating the CA itself is not automated (docs/security.md).
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86400);
/// The operator's own client certificate: issued in memory, renewed at half its life.
const CLIENT_LIFETIME: Duration = Duration::from_secs(7 * 86400);
/// Renewal of the agents' certificate: when less than this is left, or a third of its life.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86400);

/// The DNS name the agents' certificate carries and every client verifies (agents are
/// dialled by pod IP): `<cluster>.<namespace>.agents.pgpilot.internal`.
pub fn server_name(cluster: &str, ns: &str) -> String {
    format!("{cluster}.{ns}.agents.pgpilot.internal")
}

/// The Secret mounted in the agents' pods (`tls.crt`, `tls.key`, `ca.crt`), `None` without TLS.
pub fn agent_secret(pc: &PostgresCluster) -> Option<String> {
    let tls = pc.spec.tls.as_ref();
    match pc.spec.tls_mode() {
        TlsMode::Disabled => None,
        TlsMode::Secret => tls.and_then(|t| t.secret_name.clone()),
        TlsMode::Operator => Some(format!("{}-agent-tls", pc.name_any())),
    }
}

fn ca_secret(cluster: &str) -> String {
    format!("{cluster}-ca")
}

fn text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Why the agents' certificate must be issued again, or `None` while it is good: it is
/// missing or unreadable, of another CA, without the expected name, or within its renewal
/// window (the last third of its life, at most [`RENEW_BEFORE`]).
pub fn renewal_reason(
    cert_pem: Option<&str>,
    key_present: bool,
    secret_ca: Option<&str>,
    ca_pem: &str,
    name: &str,
    now: SystemTime,
) -> Option<String> {
    renewal(cert_pem, key_present, secret_ca, ca_pem, name, now).err()
}

/// [`renewal_reason`], with when the renewal window opens (Unix seconds) while it is good.
fn renewal(
    cert_pem: Option<&str>,
    key_present: bool,
    secret_ca: Option<&str>,
    ca_pem: &str,
    name: &str,
    now: SystemTime,
) -> Result<i64, String> {
    let Some(cert_pem) = cert_pem.filter(|_| key_present) else {
        return Err("it does not exist yet".into());
    };
    if secret_ca != Some(ca_pem) {
        return Err("the CA changed".into());
    }
    let info = pgpilot_common::tls::certs(cert_pem.as_bytes(), "tls.crt")
        .and_then(|c| pgpilot_common::tls::cert_info(&c[0]))
        .map_err(|e| format!("it cannot be read ({e})"))?;
    if !info.names.iter().any(|n| n == name) {
        return Err(format!("it does not carry the name {name}"));
    }
    let life = (info.not_after - info.not_before).max(0);
    let before = (life / 3).min(RENEW_BEFORE.as_secs() as i64);
    let due = info.not_after - before;
    let now = secs(now);
    if now >= due {
        return Err(format!(
            "it ends in {} s (renewed in the last {} s of its life)",
            info.not_after - now,
            before
        ));
    }
    Ok(due)
}

/// A Secret of the cluster's, owned by it (deleted with it).
fn owned_secret(pc: &PostgresCluster, name: &str, type_: &str, data: &[(&str, &str)]) -> Secret {
    let data = data
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            labels: serde_json::from_value(objects::labels(&pc.name_any(), None)).ok(),
            owner_references: pc.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some(type_.into()),
        data: Some(data),
        ..Default::default()
    }
}

/// The CA a Secret `name` holds.
fn stored_ca(s: &Secret, name: &str) -> Result<Issued, Error> {
    match (text(s, "ca.crt"), text(s, "ca.key")) {
        (Some(cert_pem), Some(key_pem)) => Ok(Issued { cert_pem, key_pem }),
        _ => Err(Error::Other(format!(
            "Secret {name} lacks ca.crt or ca.key: delete it and the operator creates a new CA"
        ))),
    }
}

/// Creates the CA and the agents' certificate where missing and renews the certificate when
/// due (mode `operator`). Returns when to look again: before the renewal window opens.
pub async fn ensure(pc: &PostgresCluster, ns: &str, ctx: &Ctx) -> Result<Option<Duration>, Error> {
    if pc.spec.tls_mode() != TlsMode::Operator {
        return Ok(None);
    }
    let cluster = pc.name_any();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let ca = ca(pc, ns, ctx, &api).await?;
    let name = server_name(&cluster, ns);
    let secret_name = agent_secret(pc).expect("mode operator");
    let live = api.get_opt(&secret_name).await?;
    let due = renewal(
        live.as_ref().and_then(|s| text(s, "tls.crt")).as_deref(),
        live.as_ref().and_then(|s| text(s, "tls.key")).is_some(),
        live.as_ref().and_then(|s| text(s, "ca.crt")).as_deref(),
        &ca.cert_pem,
        &name,
        SystemTime::now(),
    );
    let reason = match due {
        // Good: look again when the window opens (the resync comes sooner anyway).
        Ok(due) => {
            let wait = (due - secs(SystemTime::now())).max(1) as u64;
            return Ok(Some(Duration::from_secs(wait)));
        }
        Err(reason) => reason,
    };
    let leaf = issue::leaf(
        &ca,
        &[name],
        Validity::starting_now(ctx.opts.agent_cert_lifetime),
    )
    .map_err(Error::Other)?;
    let data = [
        ("tls.crt", leaf.cert_pem.as_str()),
        ("tls.key", leaf.key_pem.as_str()),
        ("ca.crt", ca.cert_pem.as_str()),
    ];
    let note = format!("Secret {secret_name}: the agents' certificate issued, because {reason}");
    match live {
        None => {
            let s = owned_secret(pc, &secret_name, "kubernetes.io/tls", &data);
            create_once(&api, &s, ctx, pc, "CertificateIssued", &note).await?;
        }
        Some(mut s) => {
            // resourceVersion guards the replace: two operators never both renew.
            s.data = owned_secret(pc, &secret_name, "kubernetes.io/tls", &data).data;
            match api.replace(&secret_name, &PostParams::default(), &s).await {
                Ok(_) => {
                    ctx.metrics.writes.inc();
                    tracing::info!(cluster = %cluster, "{note}");
                    event(ctx, pc, EventType::Normal, "CertificateRenewed", &note).await;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(Some(Duration::from_secs(1)))
}

/// The cluster's CA, created when missing.
async fn ca(pc: &PostgresCluster, ns: &str, ctx: &Ctx, api: &Api<Secret>) -> Result<Issued, Error> {
    let cluster = pc.name_any();
    let name = ca_secret(&cluster);
    if let Some(s) = api.get_opt(&name).await? {
        return stored_ca(&s, &name);
    }
    let ca = issue::new_ca(
        &format!("pgpilot CA of {ns}/{cluster}"),
        Validity::starting_now(CA_LIFETIME),
    )
    .map_err(Error::Other)?;
    let data = [
        ("ca.crt", ca.cert_pem.as_str()),
        ("ca.key", ca.key_pem.as_str()),
    ];
    let s = owned_secret(pc, &name, "Opaque", &data);
    create_once(
        api,
        &s,
        ctx,
        pc,
        "Created",
        &format!("Secret {name}: the cluster's CA"),
    )
    .await?;
    // Another operator may have won the create: use what is stored.
    let s = api
        .get_opt(&name)
        .await?
        .ok_or_else(|| Error::Other(format!("Secret {name} vanished after its creation")))?;
    stored_ca(&s, &name)
}

/// The operator's client identities, per cluster (namespace, name), while their CA stays the
/// same.
#[derive(Default)]
pub struct Identities {
    by_cluster: Mutex<BTreeMap<(String, String), Identity>>,
}

/// A client certificate, the CA that issued it, and when to issue a new one.
struct Identity {
    ca_pem: String,
    issued: Issued,
    renew_at: SystemTime,
}

impl Identities {
    fn get(&self, key: &(String, String), ca: &Issued) -> Result<Issued, String> {
        let mut map = self.by_cluster.lock().expect("identities");
        let now = SystemTime::now();
        if let Some(id) = map.get(key)
            && id.ca_pem == ca.cert_pem
            && now < id.renew_at
        {
            return Ok(id.issued.clone());
        }
        let id = issue::leaf(
            ca,
            &[OPERATOR_CLIENT_NAME.to_string()],
            Validity::starting_now(CLIENT_LIFETIME),
        )?;
        map.insert(
            key.clone(),
            Identity {
                ca_pem: ca.cert_pem.clone(),
                issued: id.clone(),
                renew_at: now + CLIENT_LIFETIME / 2,
            },
        );
        Ok(id)
    }
}

/// The TLS to call this cluster's agents with, `None` without TLS. Mode `operator`: the CA and
/// the operator's client certificate; mode `secret`: the Secret's `ca.crt`, no certificate
/// (the token authenticates).
pub async fn client(
    pc: &PostgresCluster,
    ns: &str,
    ctx: &Ctx,
) -> Result<Option<rustls::ClientConfig>, Error> {
    let cluster = pc.name_any();
    let name = server_name(&cluster, ns);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let config = match pc.spec.tls_mode() {
        TlsMode::Disabled => return Ok(None),
        TlsMode::Secret => {
            let secret = agent_secret(pc).expect("mode secret has a name");
            let ca = api
                .get_opt(&secret)
                .await?
                .and_then(|s| text(&s, "ca.crt"))
                .ok_or_else(|| Error::Other(format!("Secret {secret} has no ca.crt")))?;
            pgpilot_common::tls::client_config(ca.as_bytes(), &name, None)
        }
        TlsMode::Operator => {
            let ca = ca(pc, ns, ctx, &api).await?;
            let id = ctx
                .identities
                .get(&(ns.to_string(), cluster), &ca)
                .map_err(Error::Other)?;
            pgpilot_common::tls::client_config(
                ca.cert_pem.as_bytes(),
                &name,
                Some((id.cert_pem.as_bytes(), id.key_pem.as_bytes())),
            )
        }
    };
    config.map(Some).map_err(Error::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_certificate_is_renewed_when_missing_foreign_misnamed_or_late() {
        let day = Duration::from_secs(86400);
        let v = Validity::starting_now(90 * day);
        let ca = issue::new_ca("ca", v).unwrap();
        let other = issue::new_ca("other", v).unwrap();
        let name = server_name("orders", "db");
        let cert = issue::leaf(&ca, std::slice::from_ref(&name), v).unwrap();
        let now = SystemTime::now();
        let reason = |cert: Option<&str>, secret_ca: &str, at: SystemTime| {
            renewal_reason(cert, true, Some(secret_ca), &ca.cert_pem, &name, at)
        };
        assert_eq!(reason(Some(&cert.cert_pem), &ca.cert_pem, now), None);
        assert_eq!(
            reason(None, &ca.cert_pem, now).as_deref(),
            Some("it does not exist yet")
        );
        assert_eq!(
            reason(Some(&cert.cert_pem), &other.cert_pem, now).as_deref(),
            Some("the CA changed")
        );
        let misnamed = issue::leaf(&ca, &["x.example".into()], v).unwrap();
        assert!(
            reason(Some(&misnamed.cert_pem), &ca.cert_pem, now)
                .unwrap()
                .contains("does not carry the name orders.db.agents.pgpilot.internal")
        );
        // 90 days (plus the hour of skew): renewed from 30 days before the end, not before.
        assert_eq!(
            reason(Some(&cert.cert_pem), &ca.cert_pem, now + 59 * day),
            None
        );
        assert!(
            reason(Some(&cert.cert_pem), &ca.cert_pem, now + 61 * day)
                .unwrap()
                .starts_with("it ends in")
        );
        // A short life: its last third.
        let short = issue::leaf(
            &ca,
            std::slice::from_ref(&name),
            Validity {
                not_before: now,
                not_after: now + Duration::from_secs(90),
            },
        )
        .unwrap();
        assert_eq!(
            reason(
                Some(&short.cert_pem),
                &ca.cert_pem,
                now + Duration::from_secs(50)
            ),
            None
        );
        assert!(
            reason(
                Some(&short.cert_pem),
                &ca.cert_pem,
                now + Duration::from_secs(61)
            )
            .is_some()
        );
        assert!(
            renewal_reason(
                Some(&cert.cert_pem),
                false,
                Some(&ca.cert_pem),
                &ca.cert_pem,
                &name,
                now
            )
            .is_some()
        );
    }
}
