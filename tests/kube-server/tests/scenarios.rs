//! The scenario suite of issue 7: kube-rs and kubectl against the test API server — or, when
//! `KUBECONFIG` is set, unchanged against that real cluster. Each test works in its own
//! namespace and deletes it at the end.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams,
    PostParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use pgpilot_kube_testserver::{KubeTestServer, TestNamespace, kubectl_args, test_client};
use serde_json::{Value, json};

type R<T = ()> = anyhow::Result<T>;

fn api_err(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn cm(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

// --- The test CRD: a namespaced Widget with a list-map (`spec.ports`, keyed by name), a set
// (`spec.tags`), a status subresource and printer columns.
const GROUP: &str = "test.pgpilot.io";

fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("widgets.{GROUP}")},
        "spec": {"group": GROUP, "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList", "shortNames": ["wdg"]},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.size", "statusReplicasPath": ".status.replicas"}},
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"}],
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {
                        "size": {"type": "integer"},
                        "mode": {"type": "string"},
                        "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                        "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                            "items": {"type": "object", "required": ["name"], "properties": {
                                "name": {"type": "string"}, "port": {"type": "integer"}}}}}},
                    "status": {"type": "object", "properties": {
                        "phase": {"type": "string"}, "observedGeneration": {"type": "integer"}, "replicas": {"type": "integer"}}}}}}}]}
    })
}

fn widget_resource() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: "v1".into(),
        api_version: format!("{GROUP}/v1"),
        kind: "Widget".into(),
        plural: "widgets".into(),
    }
}

/// Installs the Widget CRD (idempotent, so parallel tests and real clusters are fine) and waits
/// until the resource is served.
async fn widgets(client: &kube::Client, ns: &str) -> R<Api<DynamicObject>> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        &format!("widgets.{GROUP}"),
        &PatchParams::apply("pgpilot-tests").force(),
        &Patch::Apply(widget_crd()),
    )
    .await?;
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &widget_resource());
    for _ in 0..100 {
        if api.list(&ListParams::default()).await.is_ok() {
            return Ok(api);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("widgets.{GROUP} never became served")
}

fn widget(name: &str, spec: Value) -> Value {
    json!({"apiVersion": format!("{GROUP}/v1"), "kind": "Widget", "metadata": {"name": name}, "spec": spec})
}

async fn eventually<F, Fut>(what: &str, mut check: F) -> R
where
    F: FnMut() -> Fut,
    Fut: Future<Output = R<bool>>,
{
    for _ in 0..100 {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out waiting for {what}")
}

#[tokio::test]
async fn watcher_sees_create_update_delete_in_order() -> R {
    let (client, server) = test_client().await?;
    let ns = TestNamespace::create(&client, "watch").await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    api.create(&PostParams::default(), &cm("before", &[("a", "1")]))
        .await?;

    // Streaming lists (sendInitialEvents) need the WatchList feature on a real cluster, so
    // they are checked against the test server only.
    let modes: &[bool] = if server.is_some() {
        &[false, true]
    } else {
        &[false]
    };
    for &streaming in modes {
        let cfg = if streaming {
            watcher::Config::default().streaming_lists()
        } else {
            watcher::Config::default()
        };
        let cfg = cfg.labels("scenario=watch");
        let name = if streaming { "streamed" } else { "listed" };
        let mut events = watcher(api.clone(), cfg).boxed();
        // The initial list (empty: nothing has the label yet) ends with InitDone.
        assert!(matches!(
            events.try_next().await?,
            Some(watcher::Event::Init)
        ));
        assert!(matches!(
            events.try_next().await?,
            Some(watcher::Event::InitDone)
        ));

        let mut obj = cm(name, &[("v", "1")]);
        obj.metadata.labels = Some([("scenario".to_string(), "watch".to_string())].into());
        api.create(&PostParams::default(), &obj).await?;
        let mut current = api.get(name).await?;
        current.data = Some([("v".to_string(), "2".to_string())].into());
        api.replace(name, &PostParams::default(), &current).await?;
        api.delete(name, &DeleteParams::default()).await?;

        let mut seen = Vec::new();
        while seen.len() < 3 {
            match tokio::time::timeout(Duration::from_secs(10), events.try_next()).await?? {
                Some(watcher::Event::Apply(o)) => {
                    seen.push(format!("apply v={}", o.data.unwrap_or_default()["v"]))
                }
                Some(watcher::Event::Delete(o)) => {
                    seen.push(format!("delete {}", o.metadata.name.unwrap_or_default()))
                }
                Some(other) => panic!("unexpected event {other:?}"),
                None => panic!("watch ended"),
            }
        }
        assert_eq!(
            seen,
            ["apply v=1", "apply v=2", &format!("delete {name}")],
            "streaming={streaming}"
        );
    }

    // A reflector-backed store follows the same stream.
    let (reader, writer) = kube::runtime::reflector::store::<ConfigMap>();
    let stream = kube::runtime::reflector(writer, watcher(api.clone(), watcher::Config::default()))
        .applied_objects();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    reader.wait_until_ready().await?;
    assert!(
        reader
            .state()
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some("before"))
    );
    task.abort();
    ns.cleanup().await
}

#[tokio::test]
async fn controller_reconciles_unmodified() -> R {
    use kube::runtime::controller::{Action, Controller};
    use std::sync::Arc;
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "ctrl").await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    api.create(&PostParams::default(), &cm("one", &[])).await?;
    api.create(&PostParams::default(), &cm("two", &[])).await?;

    // Reconcile stamps an annotation; the controller must see both objects.
    let ctx = Arc::new(api.clone());
    let controller = Controller::new(api.clone(), watcher::Config::default())
        .run(
            |obj: Arc<ConfigMap>, api: Arc<Api<ConfigMap>>| async move {
                let name = obj.metadata.name.clone().unwrap_or_default();
                let patch = json!({"metadata": {"annotations": {"reconciled": "yes"}}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
                Ok::<_, kube::Error>(Action::await_change())
            },
            |_, _, _| Action::requeue(Duration::from_secs(1)),
            ctx,
        )
        .for_each(|_| async {});
    let task = tokio::spawn(controller);
    eventually("both reconciled", || async {
        let l = api.list(&ListParams::default()).await?;
        Ok(l.items.iter().all(|c| {
            c.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("reconciled"))
        }))
    })
    .await?;
    task.abort();
    ns.cleanup().await
}

#[tokio::test]
async fn optimistic_concurrency_conflict() -> R {
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "occ").await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let created = api
        .create(&PostParams::default(), &cm("c", &[("k", "1")]))
        .await?;
    let again = api_err(
        api.create(&PostParams::default(), &cm("c", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));

    let mut first = created.clone();
    first.data = Some([("k".to_string(), "2".to_string())].into());
    let updated = api.replace("c", &PostParams::default(), &first).await?;
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );

    // The same stale resourceVersion again is refused.
    let mut stale = created.clone();
    stale.data = Some([("k".to_string(), "3".to_string())].into());
    let err = api_err(
        api.replace("c", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert!(
        err.message.contains("the object has been modified"),
        "{}",
        err.message
    );
    assert_eq!(api.get("c").await?.data.unwrap()["k"], "2");

    let missing = api_err(api.get("nope").await.unwrap_err());
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    ns.cleanup().await
}

#[tokio::test]
async fn server_side_apply_two_managers_conflict_and_force() -> R {
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "ssa").await?;
    let api = widgets(&client, ns.name()).await?;
    let first = api
        .patch(
            "w",
            &PatchParams::apply("alice"),
            &Patch::Apply(widget("w", json!({"size": 1, "mode": "a"}))),
        )
        .await?;
    // Re-applying the same configuration is a no-op: no new resourceVersion, no watch event.
    let again = api
        .patch(
            "w",
            &PatchParams::apply("alice"),
            &Patch::Apply(widget("w", json!({"size": 1, "mode": "a"}))),
        )
        .await?;
    assert_eq!(
        first.metadata.resource_version,
        again.metadata.resource_version
    );
    // Bob applying the same value shares ownership; a different value conflicts.
    api.patch(
        "w",
        &PatchParams::apply("bob"),
        &Patch::Apply(widget("w", json!({"size": 1}))),
    )
    .await?;
    let err = api_err(
        api.patch(
            "w",
            &PatchParams::apply("bob"),
            &Patch::Apply(widget("w", json!({"size": 2}))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert!(
        err.message.contains("conflict with \"alice\"") && err.message.contains(".spec.size"),
        "{}",
        err.message
    );

    let forced = api
        .patch(
            "w",
            &PatchParams::apply("bob").force(),
            &Patch::Apply(widget("w", json!({"size": 2}))),
        )
        .await?;
    assert_eq!(forced.data["spec"]["size"], 2);
    let owners = |o: &DynamicObject, manager: &str| -> String {
        o.metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|m| m.manager.as_deref() == Some(manager))
            .map(|m| serde_json::to_string(&m.fields_v1).unwrap())
            .collect()
    };
    assert!(owners(&forced, "bob").contains("f:size"));
    assert!(
        !owners(&forced, "alice").contains("f:size"),
        "alice lost .spec.size: {}",
        owners(&forced, "alice")
    );
    assert!(owners(&forced, "alice").contains("f:mode"));

    // An Update by another manager (a plain merge patch) takes ownership too, so alice conflicts.
    api.patch(
        "w",
        &PatchParams {
            field_manager: Some("editor".into()),
            ..Default::default()
        },
        &Patch::Merge(json!({"spec": {"mode": "b"}})),
    )
    .await?;
    let err = api_err(
        api.patch(
            "w",
            &PatchParams::apply("alice"),
            &Patch::Apply(widget("w", json!({"mode": "a"}))),
        )
        .await
        .unwrap_err(),
    );
    assert!(
        err.message.contains("conflict with \"editor\""),
        "{}",
        err.message
    );
    ns.cleanup().await
}

#[tokio::test]
async fn list_map_merge_by_key() -> R {
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "listmap").await?;
    let api = widgets(&client, ns.name()).await?;
    let pp = |m: &str| PatchParams::apply(m);
    api.patch(
        "w",
        &pp("alice"),
        &Patch::Apply(widget(
            "w",
            json!({"ports": [{"name": "pg", "port": 5432}], "tags": ["a"]}),
        )),
    )
    .await?;
    let both = api
        .patch(
            "w",
            &pp("bob"),
            &Patch::Apply(widget(
                "w",
                json!({"ports": [{"name": "http", "port": 8008}], "tags": ["b"]}),
            )),
        )
        .await?;
    assert_eq!(
        both.data["spec"]["ports"],
        json!([{"name": "pg", "port": 5432}, {"name": "http", "port": 8008}])
    );
    assert_eq!(both.data["spec"]["tags"], json!(["a", "b"]));

    // Alice changes her item by key and drops her tag: bob's item and tag stay.
    let out = api
        .patch(
            "w",
            &pp("alice"),
            &Patch::Apply(widget(
                "w",
                json!({"ports": [{"name": "pg", "port": 5433}]}),
            )),
        )
        .await?;
    assert_eq!(
        out.data["spec"]["ports"],
        json!([{"name": "pg", "port": 5433}, {"name": "http", "port": 8008}])
    );
    assert_eq!(out.data["spec"]["tags"], json!(["b"]));

    // Alice stops applying her port: it goes; bob's stays.
    let out = api
        .patch(
            "w",
            &pp("alice"),
            &Patch::Apply(widget("w", json!({"size": 1}))),
        )
        .await?;
    assert_eq!(
        out.data["spec"]["ports"],
        json!([{"name": "http", "port": 8008}])
    );
    ns.cleanup().await
}

#[tokio::test]
async fn status_subresource_isolated_from_spec() -> R {
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "status").await?;
    let api = widgets(&client, ns.name()).await?;
    let mut obj: DynamicObject = serde_json::from_value(widget("w", json!({"size": 1})))?;
    obj.data["status"] = json!({"phase": "Ignored"});
    let created = api.create(&PostParams::default(), &obj).await?;
    assert!(
        created.data.get("status").is_none(),
        "status is dropped on create"
    );
    assert_eq!(created.metadata.generation, Some(1));

    // Status writes go through /status and do not bump generation.
    let s = api.patch_status("w", &PatchParams::apply("ctl"), &Patch::Apply(json!({"apiVersion": format!("{GROUP}/v1"), "kind": "Widget", "status": {"phase": "Ready"}}))).await?;
    assert_eq!(s.data["status"]["phase"], "Ready");
    assert_eq!(s.metadata.generation, Some(1));
    let s = api
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 9}, "status": {"observedGeneration": 1}})),
        )
        .await?;
    assert_eq!(s.data["spec"]["size"], 1, "spec ignored on /status");
    assert_eq!(s.data["status"]["observedGeneration"], 1);

    // Main-resource writes ignore status; spec changes bump generation, metadata ones do not.
    let m = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Hacked"}, "metadata": {"labels": {"x": "y"}}}),
            ),
        )
        .await?;
    assert_eq!(m.data["status"]["phase"], "Ready");
    assert_eq!(m.metadata.generation, Some(1));
    let m = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}})),
        )
        .await?;
    assert_eq!(m.metadata.generation, Some(2));
    assert_eq!(m.data["status"]["phase"], "Ready");
    ns.cleanup().await
}

#[tokio::test]
async fn finalizer_holds_deletion_and_owners_cascade() -> R {
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "fin").await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let mut obj = cm("held", &[]);
    obj.metadata.finalizers = Some(vec!["pgpilot.io/test".into()]);
    api.create(&PostParams::default(), &obj).await?;
    api.delete("held", &DeleteParams::default()).await?;
    let held = api.get("held").await?;
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "deletion waits for the finalizer"
    );
    let patch = json!({"metadata": {"finalizers": null}});
    api.patch("held", &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    let gone = api_err(api.get("held").await.unwrap_err());
    assert_eq!(gone.code, 404);

    // ownerReferences: deleting the owner deletes the dependent (garbage collector).
    let owner = api
        .create(&PostParams::default(), &cm("owner", &[]))
        .await?;
    let mut child = cm("child", &[]);
    child.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "owner".into(),
            uid: owner.metadata.uid.clone().unwrap(),
            ..Default::default()
        },
    ]);
    api.create(&PostParams::default(), &child).await?;
    api.delete("owner", &DeleteParams::default()).await?;
    eventually("child collected", || async {
        Ok(api.get_opt("child").await?.is_none())
    })
    .await?;
    ns.cleanup().await
}

/// kube-runtime's `finalizer` helper (JSON patches with `test` ops) drives an object through
/// apply and cleanup, as a reconciler built on it would.
#[tokio::test]
async fn kube_runtime_finalizer_helper() -> R {
    use kube::runtime::finalizer::{Event as Fin, finalizer};
    use std::sync::Arc;
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "finhelper").await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    api.create(&PostParams::default(), &cm("f", &[])).await?;
    let step = |api: Api<ConfigMap>| async move {
        let obj = Arc::new(api.get("f").await?);
        let outcome = finalizer(&api, "pgpilot.io/cleanup", obj, |ev| async move {
            Ok::<_, kube::Error>(match ev {
                Fin::Apply(_) => kube::runtime::controller::Action::await_change(),
                Fin::Cleanup(_) => kube::runtime::controller::Action::await_change(),
            })
        })
        .await;
        anyhow::Ok(outcome.map_err(|e| anyhow::anyhow!("{e}"))?)
    };
    // First pass adds the finalizer (and requeues), the second applies.
    step(api.clone()).await?;
    assert_eq!(
        api.get("f").await?.metadata.finalizers.unwrap(),
        ["pgpilot.io/cleanup"]
    );
    step(api.clone()).await?;
    api.delete("f", &DeleteParams::default()).await?;
    assert!(api.get("f").await?.metadata.deletion_timestamp.is_some());
    // Cleanup removes the finalizer, and with it the object.
    step(api.clone()).await?;
    eventually("object gone", || async {
        Ok(api.get_opt("f").await?.is_none())
    })
    .await?;
    ns.cleanup().await
}

/// kube-rs discovery, legacy and aggregated, finds the built-in types and an installed CRD.
#[tokio::test]
async fn discovery_legacy_and_aggregated() -> R {
    use kube::discovery::{Discovery, Scope};
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "disco").await?;
    widgets(&client, ns.name()).await?;
    for aggregated in [false, true] {
        let d = Discovery::new(client.clone());
        let d = if aggregated {
            d.run_aggregated().await?
        } else {
            d.run().await?
        };
        let find = |group: &str, kind: &str| {
            d.groups()
                .filter(|g| g.name() == group)
                .flat_map(|g| g.recommended_resources())
                .find(|(ar, _)| ar.kind == kind)
        };
        let (sts, caps) = find("apps", "StatefulSet").expect("statefulsets discovered");
        assert_eq!(
            (sts.plural.as_str(), caps.scope.clone()),
            ("statefulsets", Scope::Namespaced)
        );
        assert!(
            caps.subresources
                .iter()
                .any(|(sr, _)| sr.plural.ends_with("status")),
            "{:?}",
            caps.subresources
        );
        assert!(find("coordination.k8s.io", "Lease").is_some());
        assert!(find("", "Namespace").is_some_and(|(_, c)| c.scope == Scope::Cluster));
        assert!(find(GROUP, "Widget").is_some(), "aggregated={aggregated}");
    }
    ns.cleanup().await
}

/// A Secret written with `stringData` reads back base64 `data`, as the agent's token Secret will.
#[tokio::test]
async fn secret_string_data_reads_back_as_data() -> R {
    use k8s_openapi::api::core::v1::Secret;
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "secret").await?;
    let api: Api<Secret> = Api::namespaced(client.clone(), ns.name());
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("token".into()),
            ..Default::default()
        },
        string_data: Some([("token".to_string(), "hunter2".to_string())].into()),
        ..Default::default()
    };
    api.create(&PostParams::default(), &secret).await?;
    let got = api.get("token").await?;
    assert_eq!(got.data.unwrap()["token"].0, b"hunter2");
    assert!(got.string_data.is_none());
    assert_eq!(got.type_.as_deref(), Some("Opaque"));
    ns.cleanup().await
}

/// Leader election as kube-rs users implement it on a Lease: create to acquire, a
/// resourceVersion-guarded replace to renew, and to take over once the holder's lease expired.
#[tokio::test]
async fn lease_acquire_renew_takeover() -> R {
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "lease").await?;
    let api: Api<Lease> = Api::namespaced(client.clone(), ns.name());
    let now = || MicroTime(jiff::Timestamp::now());
    let lease = |holder: &str, transitions: i32| Lease {
        metadata: ObjectMeta {
            name: Some("leader".into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(1),
            acquire_time: Some(now()),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }),
    };
    let a = api.create(&PostParams::default(), &lease("a", 0)).await?;
    let err = api_err(
        api.create(&PostParams::default(), &lease("b", 0))
            .await
            .unwrap_err(),
    );
    assert!(err.is_already_exists());

    // A renews with the resourceVersion it read.
    let mut renew = a.clone();
    renew.spec.as_mut().unwrap().renew_time = Some(now());
    let a2 = api
        .replace("leader", &PostParams::default(), &renew)
        .await?;

    // B read the lease before the renewal; its guarded takeover fails.
    let mut takeover = a.clone();
    takeover.spec = lease("b", 1).spec;
    let err = api_err(
        api.replace("leader", &PostParams::default(), &takeover)
            .await
            .unwrap_err(),
    );
    assert!(err.is_conflict());

    // After the lease expires B re-reads and takes over; A's next renewal then fails.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let seen = api.get("leader").await?;
    let spec = seen.spec.clone().unwrap();
    let expired = spec.renew_time.unwrap().0.as_millisecond()
        + i64::from(spec.lease_duration_seconds.unwrap()) * 1000
        < jiff::Timestamp::now().as_millisecond();
    assert!(expired);
    let mut takeover = seen.clone();
    takeover.spec = lease("b", spec.lease_transitions.unwrap() + 1).spec;
    let b = api
        .replace("leader", &PostParams::default(), &takeover)
        .await?;
    assert_eq!(
        b.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some("b")
    );
    assert_eq!(b.spec.as_ref().unwrap().lease_transitions, Some(1));
    let mut late = a2.clone();
    late.spec.as_mut().unwrap().renew_time = Some(now());
    assert!(
        api_err(
            api.replace("leader", &PostParams::default(), &late)
                .await
                .unwrap_err()
        )
        .is_conflict()
    );
    ns.cleanup().await
}

#[tokio::test]
async fn selectors_and_pagination() -> R {
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "list").await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    for i in 0..5 {
        let mut o = cm(&format!("c{i}"), &[]);
        o.metadata.labels = Some(
            [(
                "parity".to_string(),
                if i % 2 == 0 { "even" } else { "odd" }.to_string(),
            )]
            .into(),
        );
        api.create(&PostParams::default(), &o).await?;
    }
    let even = api
        .list(&ListParams::default().labels("parity=even"))
        .await?;
    assert_eq!(even.items.len(), 3);
    let some = api
        .list(&ListParams::default().labels("parity in (odd),parity!=even"))
        .await?;
    assert_eq!(some.items.len(), 2);
    let one = api
        .list(&ListParams::default().fields("metadata.name=c3"))
        .await?;
    assert_eq!(one.items.len(), 1);

    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(2);
    loop {
        let page = api.list(&lp).await?;
        names.extend(
            page.items
                .iter()
                .filter_map(|c| c.metadata.name.clone())
                .filter(|n| n.starts_with('c')),
        );
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);
    ns.cleanup().await
}

#[tokio::test]
async fn patch_flavours_on_builtin_types() -> R {
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "patch").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let pod: Pod = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "pg", "image": "postgres:17", "env": [{"name": "A", "value": "1"}]},
                                {"name": "side", "image": "busybox"}]}}),
    )?;
    pods.create(&PostParams::default(), &pod).await?;

    // Strategic merge: containers merge by name (a JSON merge patch would replace the list).
    // A running pod only lets images change, so that is what the patch changes.
    let smp = json!({"spec": {"containers": [{"name": "side", "image": "busybox:1.36"}]}});
    let p = pods
        .patch("p", &PatchParams::default(), &Patch::Strategic(smp))
        .await?;
    let spec = p.spec.unwrap();
    let images: Vec<_> = spec
        .containers
        .iter()
        .map(|c| (c.name.as_str(), c.image.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(images, [("pg", "postgres:17"), ("side", "busybox:1.36")]);
    assert_eq!(spec.containers[0].env.as_ref().map(Vec::len), Some(1));

    let p = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"role": "primary"}}})),
        )
        .await?;
    assert_eq!(p.metadata.labels.unwrap()["role"], "primary");
    let jp: json_patch::Patch = serde_json::from_value(
        json!([{"op": "replace", "path": "/metadata/labels/role", "value": "replica"}]),
    )?;
    let p = pods
        .patch("p", &PatchParams::default(), &Patch::Json::<()>(jp))
        .await?;
    assert_eq!(p.metadata.labels.unwrap()["role"], "replica");
    let jp: json_patch::Patch = serde_json::from_value(
        json!([{"op": "test", "path": "/metadata/labels/role", "value": "primary"}]),
    )?;
    assert!(
        pods.patch("p", &PatchParams::default(), &Patch::Json::<()>(jp))
            .await
            .is_err(),
        "a failed JSON patch test op is refused"
    );

    // Strategic merge is for built-in types only: custom resources answer 415.
    let w = widgets(&client, ns.name()).await?;
    w.patch(
        "w",
        &PatchParams::apply("t"),
        &Patch::Apply(widget("w", json!({"size": 1}))),
    )
    .await?;
    let err = api_err(
        w.patch(
            "w",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"size": 2}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 415);

    // A StatefulSet's pod template merges the same way.
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns.name());
    let s: StatefulSet = serde_json::from_value(
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
        "spec": {"replicas": 0, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "pg", "image": "postgres:16",
                "ports": [{"containerPort": 5432}], "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                "env": [{"name": "A", "value": "1"}]}],
                "volumes": [{"name": "data", "emptyDir": {}}]}}}}),
    )?;
    let created = sts.create(&PostParams::default(), &s).await?;
    let smp = json!({"spec": {"template": {"spec": {"containers": [{"name": "pg", "image": "postgres:17", "ports": [{"containerPort": 8008}],
        "env": [{"name": "B", "value": "2"}]}],
        "volumes": [{"name": "run", "emptyDir": {}}]}}}});
    let s = sts
        .patch("db", &PatchParams::default(), &Patch::Strategic(smp))
        .await?;
    let tspec = s.spec.template.spec.as_ref().unwrap();
    assert_eq!(tspec.containers[0].image.as_deref(), Some("postgres:17"));
    let ports: Vec<i32> = tspec.containers[0]
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    assert_eq!(ports, [5432, 8008]);
    let env: Vec<&str> = tspec.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(env, ["A", "B"], "env merged by name");
    assert_eq!(tspec.volumes.as_ref().unwrap().len(), 2);
    assert_eq!(
        s.metadata.generation,
        Some(created.metadata.generation.unwrap() + 1)
    );
    ns.cleanup().await
}

/// kubectl against the same server (or cluster). kubectl must be installed: a missing binary
/// fails the test with instructions rather than skipping it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_and_apply() -> R {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let version = std::process::Command::new(&kubectl)
        .args(["version", "--client"])
        .output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "kubectl not found ({kubectl}); this test needs it. Install it with scripts/install-test-deps.sh \
         (Debian's `kubernetes-client` package), or point KUBECTL=/path/to/kubectl at one"
    );
    let (client, server) = test_client().await?;
    let target = kubectl_args(server.as_ref());
    let ns = TestNamespace::create(&client, "kubectl").await?;
    let dir = tempfile::tempdir()?;
    let run = |args: &[&str], stdin: Option<&str>| -> R<String> {
        let mut cmd = std::process::Command::new(&kubectl);
        cmd.args(&target).arg("-n").arg(ns.name()).args(args);
        let out = match stdin {
            Some(text) => {
                let f = dir.path().join("manifest.yaml");
                std::fs::write(&f, text)?;
                cmd.arg("-f").arg(&f).output()?
            }
            None => cmd.output()?,
        };
        anyhow::ensure!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let manifest = |v: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  labels:\n    app: pgpilot\ndata:\n  level: \"{v}\"\n"
        )
    };

    let out = tokio::task::block_in_place(|| run(&["apply"], Some(&manifest("1"))))?;
    assert!(out.contains("configmap/settings created"), "{out}");
    let out = tokio::task::block_in_place(|| run(&["apply"], Some(&manifest("2"))))?;
    assert!(out.contains("configmap/settings configured"), "{out}");
    let out =
        tokio::task::block_in_place(|| run(&["get", "configmap", "settings", "-o", "json"], None))?;
    let got: Value = serde_json::from_str(&out)?;
    assert_eq!(got["data"]["level"], "2");
    let out =
        tokio::task::block_in_place(|| run(&["get", "configmaps", "-l", "app=pgpilot"], None))?;
    assert!(out.contains("NAME") && out.contains("settings"), "{out}");

    // Moving to server-side apply: kubectl's own field manager takes over the client-side
    // applied fields without conflicts; any other manager conflicts on them.
    let err = tokio::task::block_in_place(|| {
        run(
            &["apply", "--server-side", "--field-manager=ops"],
            Some(&manifest("3")),
        )
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("conflict with \"kubectl-client-side-apply\""),
        "{err}"
    );
    let out =
        tokio::task::block_in_place(|| run(&["apply", "--server-side"], Some(&manifest("3"))))?;
    assert!(out.contains("serverside-applied"), "{out}");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns.name())
        .get("settings")
        .await?;
    assert_eq!(cm.data.unwrap()["level"], "3");
    let managers: Vec<_> = cm
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.contains(&"kubectl".to_string()), "{managers:?}");
    // ...and a later client-side apply still works from the annotation kept in step.
    let out = tokio::task::block_in_place(|| run(&["apply"], Some(&manifest("4"))))?;
    assert!(out.contains("configured"), "{out}");

    // Custom resources and their printer columns.
    let w = widgets(&client, ns.name()).await?;
    w.patch(
        "w",
        &PatchParams::apply("t"),
        &Patch::Apply(widget("w", json!({"size": 3}))),
    )
    .await?;
    let out = tokio::task::block_in_place(|| run(&["get", "widgets"], None))?;
    assert!(out.contains("SIZE") && out.contains('3'), "{out}");
    let crd =
        format!("apiVersion: {GROUP}/v1\nkind: Widget\nmetadata:\n  name: w2\nspec:\n  size: 4\n");
    let out = tokio::task::block_in_place(|| run(&["apply"], Some(&crd)))?;
    assert!(out.contains("widget.test.pgpilot.io/w2 created"), "{out}");

    // kubectl ≥1.25 asks for strict field validation: an unknown field is refused, not pruned.
    // Older kubectl (Debian's 1.20) does not ask, and the field is pruned.
    let bogus = format!(
        "apiVersion: {GROUP}/v1\nkind: Widget\nmetadata:\n  name: w3\nspec:\n  size: 1\n  bogus: true\n"
    );
    let version_text = version
        .as_ref()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let minor = version_text
        .split("Minor:\"")
        .nth(1)
        .or_else(|| version_text.split("v1.").nth(1))
        .and_then(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(99);
    let result = tokio::task::block_in_place(|| run(&["apply"], Some(&bogus)));
    if minor >= 25 {
        let err = result.unwrap_err();
        assert!(
            err.to_string().contains("unknown field \"spec.bogus\""),
            "{err}"
        );
    } else {
        result?;
        assert!(
            w.get("w3").await?.data["spec"].get("bogus").is_none(),
            "pruned"
        );
    }

    // kubectl scale goes through the scale subresource the CRD declares.
    let out = tokio::task::block_in_place(|| run(&["scale", "widget", "w", "--replicas=5"], None))?;
    assert!(out.contains("scaled"), "{out}");
    assert_eq!(w.get("w").await?.data["spec"]["size"], 5);

    // Imperative creates, which kubectl sends as protobuf.
    let out = tokio::task::block_in_place(|| {
        run(
            &[
                "create",
                "secret",
                "generic",
                "token",
                "--from-literal=token=hunter2",
            ],
            None,
        )
    })?;
    assert!(out.contains("secret/token created"), "{out}");
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns.name())
        .get("token")
        .await?;
    assert_eq!(secret.data.unwrap()["token"].0, b"hunter2");
    let out = tokio::task::block_in_place(|| {
        run(
            &["create", "configmap", "plain", "--from-literal=a=1"],
            None,
        )
    })?;
    assert!(out.contains("configmap/plain created"), "{out}");

    // kubectl delete waits until the object is gone.
    let out = tokio::task::block_in_place(|| run(&["delete", "configmap", "settings"], None))?;
    assert!(out.contains("configmap \"settings\" deleted"), "{out}");
    let out = tokio::task::block_in_place(|| run(&["get", "configmaps", "-o", "name"], None))?;
    assert!(!out.contains("settings"), "{out}");
    ns.cleanup().await
}

/// Events as an operator publishes them with kube-runtime's Recorder (events.k8s.io/v1,
/// created once, then patched as a series).
#[tokio::test]
async fn events_from_the_recorder() -> R {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let (client, _server) = test_client().await?;
    let ns = TestNamespace::create(&client, "events").await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let obj = api
        .create(&PostParams::default(), &cm("subject", &[]))
        .await?;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "pgpilot-test".into(),
            instance: None,
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "Tested".into(),
        note: Some("hello".into()),
        action: "Test".into(),
        secondary: None,
    };
    recorder.publish(&ev, &obj.object_ref(&())).await?;
    recorder.publish(&ev, &obj.object_ref(&())).await?;
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), ns.name());
    let list = events.list(&ListParams::default()).await?;
    assert_eq!(
        list.items.len(),
        1,
        "the repeat is a series on the same Event"
    );
    let e = &list.items[0];
    assert_eq!(e.reason.as_deref(), Some("Tested"));
    assert_eq!(
        e.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("subject")
    );
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(2));
    ns.cleanup().await
}

/// The server keeps no state between servers: a second one starts empty but for the default
/// namespaces (a guard for tests that assume isolation).
#[tokio::test]
async fn servers_are_isolated() -> R {
    if std::env::var_os("KUBECONFIG").is_some() {
        return Ok(());
    }
    let a = KubeTestServer::start().await?;
    let b = KubeTestServer::start().await?;
    let api = |s: &KubeTestServer| Api::<ConfigMap>::namespaced(s.client(), "default");
    api(&a)
        .create(&PostParams::default(), &cm("only-a", &[]))
        .await?;
    assert!(api(&b).get_opt("only-a").await?.is_none());
    assert_ne!(a.url(), b.url());
    Ok(())
}
