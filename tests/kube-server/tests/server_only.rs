//! Behaviour of the test server itself that a real cluster cannot be made to show on demand:
//! 410 Gone after compaction (and kube-runtime's recovery from it), bookmarks, dry runs,
//! deletion propagation, namespace termination, CRD schema handling, the StatefulSet
//! controller toggle, and the kubelet-facing pieces (binding, graceful pod deletion, eviction
//! with budgets, EndpointSlices) played by the test. These always run against a fresh
//! in-process server.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams,
    PostParams, PropagationPolicy, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use pgpilot_kube_testserver::{KubeTestServer, ServerOptions, StoreOptions};
use serde_json::json;

type R<T = ()> = anyhow::Result<T>;

fn cm(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn owned_by(mut o: ConfigMap, owner: &ConfigMap) -> ConfigMap {
    o.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: owner.metadata.name.clone().unwrap(),
        uid: owner.metadata.uid.clone().unwrap(),
        ..Default::default()
    }]);
    o
}

#[tokio::test]
async fn too_old_resource_version_is_gone_and_watcher_relists() -> R {
    let server = KubeTestServer::start().await?;
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let first = api.create(&PostParams::default(), &cm("a")).await?;
    let old_rv = first.metadata.resource_version.clone().unwrap();
    api.create(&PostParams::default(), &cm("b")).await?;

    // Within the history, a watch replays what happened after the resourceVersion.
    let mut replay = api.watch(&WatchParams::default(), &old_rv).await?.boxed();
    match replay.try_next().await? {
        Some(WatchEvent::Added(o)) => assert_eq!(o.metadata.name.as_deref(), Some("b")),
        other => panic!("expected ADDED b, got {other:?}"),
    }

    server.compact_history();
    let mut gone = api.watch(&WatchParams::default(), &old_rv).await?.boxed();
    match gone.try_next().await? {
        Some(WatchEvent::Error(s)) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }

    // A kube-runtime watcher whose connection drops after compaction re-lists and carries on.
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    let mut inits = 0;
    while inits < 1 {
        if let Some(watcher::Event::InitDone) = events.try_next().await? {
            inits += 1;
        }
    }
    api.create(&PostParams::default(), &cm("c")).await?;
    server.compact_history();
    server.close_watches();
    api.create(&PostParams::default(), &cm("d")).await?;
    let mut saw_relist = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.next()).await? {
            Some(Ok(watcher::Event::Init)) => saw_relist = true,
            Some(Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o)))
                if o.metadata.name.as_deref() == Some("d") =>
            {
                break;
            }
            Some(_) => {}
            None => panic!("watcher ended"),
        }
    }
    assert!(saw_relist, "the watcher re-listed after 410");
    Ok(())
}

#[tokio::test]
async fn bookmarks_and_selector_transitions() -> R {
    let server = KubeTestServer::start_with(ServerOptions {
        bookmark_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .await?;
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut stream = api
        .watch(
            &WatchParams {
                bookmarks: true,
                ..WatchParams::default().labels("pick=yes")
            },
            "0",
        )
        .await?
        .boxed();
    match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await?? {
        Some(WatchEvent::Bookmark(b)) => assert!(!b.metadata.resource_version.is_empty()),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    // An object entering the selection is ADDED, leaving it is DELETED.
    api.create(&PostParams::default(), &cm("x")).await?;
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"pick": "yes"}}})),
    )
    .await?;
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"pick": "no"}}})),
    )
    .await?;
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await?? {
            Some(WatchEvent::Added(_)) => kinds.push("ADDED"),
            Some(WatchEvent::Deleted(_)) => kinds.push("DELETED"),
            Some(WatchEvent::Modified(_)) => kinds.push("MODIFIED"),
            Some(WatchEvent::Bookmark(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(kinds, ["ADDED", "DELETED"]);
    Ok(())
}

#[tokio::test]
async fn dry_run_and_generate_name() -> R {
    let server = KubeTestServer::start().await?;
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let out = api.create(&dry, &cm("ghost")).await?;
    assert!(out.metadata.uid.is_some());
    assert!(
        api.get_opt("ghost").await?.is_none(),
        "dry run persists nothing"
    );

    let mut g = cm("");
    g.metadata.name = None;
    g.metadata.generate_name = Some("gen-".into());
    let made = api.create(&PostParams::default(), &g).await?;
    let name = made.metadata.name.unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    Ok(())
}

#[tokio::test]
async fn deletion_propagation_policies() -> R {
    let server = KubeTestServer::start().await?;
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");

    // Orphan: the dependent stays, without the owner reference.
    let owner = api.create(&PostParams::default(), &cm("o1")).await?;
    api.create(&PostParams::default(), &owned_by(cm("d1"), &owner))
        .await?;
    api.delete(
        "o1",
        &DeleteParams {
            propagation_policy: Some(PropagationPolicy::Orphan),
            ..Default::default()
        },
    )
    .await?;
    let d1 = api.get("d1").await?;
    assert!(d1.metadata.owner_references.unwrap_or_default().is_empty());
    assert!(api.get_opt("o1").await?.is_none());

    // Foreground: the owner waits (deletionTimestamp set) until its dependents are gone.
    let owner = api.create(&PostParams::default(), &cm("o2")).await?;
    let mut dep = owned_by(cm("d2"), &owner);
    dep.metadata.finalizers = Some(vec!["test/hold".into()]);
    api.create(&PostParams::default(), &dep).await?;
    api.delete("o2", &DeleteParams::foreground()).await?;
    let o2 = api.get("o2").await?;
    assert!(o2.metadata.deletion_timestamp.is_some());
    assert!(
        o2.metadata
            .finalizers
            .unwrap()
            .contains(&"foregroundDeletion".to_string())
    );
    assert!(api.get("d2").await?.metadata.deletion_timestamp.is_some());
    api.patch(
        "d2",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    assert!(api.get_opt("d2").await?.is_none());
    assert!(
        api.get_opt("o2").await?.is_none(),
        "owner goes once dependents are gone"
    );

    // Preconditions.
    let c = api.create(&PostParams::default(), &cm("pre")).await?;
    let wrong = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("nope".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    assert!(api.delete("pre", &wrong).await.is_err());
    let right = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: c.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    api.delete("pre", &right).await?;
    Ok(())
}

#[tokio::test]
async fn namespace_termination() -> R {
    let server = KubeTestServer::start().await?;
    let client = server.client();
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &Namespace {
            metadata: ObjectMeta {
                name: Some("t".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "t");
    let mut held = cm("held");
    held.metadata.finalizers = Some(vec!["test/hold".into()]);
    api.create(&PostParams::default(), &held).await?;
    api.create(&PostParams::default(), &cm("free")).await?;
    nss.delete("t", &DeleteParams::default()).await?;

    let t = nss.get("t").await?;
    assert_eq!(t.status.unwrap().phase.as_deref(), Some("Terminating"));
    assert!(api.get_opt("free").await?.is_none());
    let err = api
        .create(&PostParams::default(), &cm("late"))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 403));
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    assert!(
        nss.get_opt("t").await?.is_none(),
        "namespace removed once empty"
    );

    let err = Api::<ConfigMap>::namespaced(client, "missing")
        .create(&PostParams::default(), &cm("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 404));
    Ok(())
}

fn gadget_crd() -> serde_json::Value {
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "gadgets.example.com"},
        "spec": {"group": "example.com", "scope": "Cluster", "names": {"plural": "gadgets", "kind": "Gadget"},
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "required": ["size"], "properties": {
                    "size": {"type": "integer"}, "mode": {"type": "string", "default": "auto"}}}}}}}]}})
}

#[tokio::test]
async fn crd_schema_pruning_defaulting_validation_and_removal() -> R {
    let server = KubeTestServer::start().await?;
    let client = server.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(gadget_crd())?;
    let created = crds.create(&PostParams::default(), &crd).await?;
    let conds = created.status.unwrap().conditions.unwrap();
    assert!(
        conds
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );

    let ar = ApiResource {
        group: "example.com".into(),
        version: "v1".into(),
        api_version: "example.com/v1".into(),
        kind: "Gadget".into(),
        plural: "gadgets".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let g: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}, "spec": {"size": 1, "bogus": true}}),
    )?;
    let out = api.create(&PostParams::default(), &g).await?;
    assert_eq!(out.data["spec"], json!({"size": 1, "mode": "auto"}));
    let bad: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "h"}, "spec": {"size": "x"}}),
    )?;
    match api.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (422, "Invalid")),
        other => panic!("expected 422, got {other:?}"),
    }

    // Deleting the CRD stops serving the type and removes its objects.
    crds.delete("gadgets.example.com", &DeleteParams::default())
        .await?;
    assert!(api.list(&ListParams::default()).await.is_err());
    crds.create(&PostParams::default(), &crd).await?;
    assert!(api.list(&ListParams::default()).await?.items.is_empty());
    Ok(())
}

#[tokio::test]
async fn statefulset_controller_toggle() -> R {
    let server = KubeTestServer::start_with(ServerOptions {
        store: StoreOptions {
            statefulset_controller: true,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let client = server.client();
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let s: StatefulSet = serde_json::from_value(
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
        "spec": {"replicas": 3, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}}, "updateStrategy": {"type": "OnDelete"},
            "podManagementPolicy": "Parallel",
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "pg", "image": "postgres:16"}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}}),
    )?;
    sts.create(&PostParams::default(), &s).await?;
    let names =
        |l: Vec<Pod>| -> Vec<String> { l.into_iter().filter_map(|p| p.metadata.name).collect() };
    let listed = pods.list(&ListParams::default().labels("app=db")).await?;
    assert_eq!(names(listed.items), ["db-0", "db-1", "db-2"]);
    let pvcs = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await?;
    assert_eq!(pvcs.items.len(), 3);
    let status = sts.get_status("db").await?.status.unwrap();
    assert_eq!(status.replicas, 3);

    // OnDelete: a new template reaches a pod only when that pod is deleted.
    sts.patch("db", &PatchParams::default(), &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "pg", "image": "postgres:17"}]}}}}))).await?;
    let image = |p: &Pod| {
        p.spec.as_ref().unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    };
    assert_eq!(image(&pods.get("db-1").await?), "postgres:16");
    pods.delete("db-1", &DeleteParams::default()).await?;
    assert_eq!(image(&pods.get("db-1").await?), "postgres:17");
    assert_eq!(image(&pods.get("db-0").await?), "postgres:16");

    // Scale down (through the scale subresource) removes the highest ordinals; deleting the
    // set collects its pods.
    let scale = sts.get_scale("db").await?;
    assert_eq!(scale.spec.as_ref().and_then(|s| s.replicas), Some(3));
    assert_eq!(
        scale.status.as_ref().and_then(|s| s.selector.as_deref()),
        Some("app=db")
    );
    sts.patch_scale(
        "db",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await?;
    assert_eq!(
        names(pods.list(&ListParams::default()).await?.items),
        ["db-0"]
    );
    sts.delete("db", &DeleteParams::default()).await?;
    assert!(pods.list(&ListParams::default()).await?.items.is_empty());
    Ok(())
}

#[tokio::test]
async fn deployment_controller_rolls_pods() -> R {
    let server = KubeTestServer::start_with(ServerOptions {
        store: StoreOptions {
            deployment_controller: true,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let client = server.client();
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "op"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "op"}},
            "template": {"metadata": {"labels": {"app": "op"}}, "spec": {"containers": [{"name": "op", "image": "op:1"}]}}}}),
    )?;
    deploys.create(&PostParams::default(), &d).await?;
    let listed = pods
        .list(&ListParams::default().labels("app=op"))
        .await?
        .items;
    assert_eq!(listed.len(), 2);
    let first_hash = listed[0].labels()["pod-template-hash"].clone();
    for p in &listed {
        assert!(
            p.name_any().starts_with(&format!("op-{first_hash}-")),
            "{}",
            p.name_any()
        );
        let owner = &p.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("Deployment", "op")
        );
    }
    let status = deploys.get_status("op").await?.status.unwrap();
    assert_eq!(
        (status.replicas, status.updated_replicas),
        (Some(2), Some(2))
    );
    assert_eq!(
        status.ready_replicas,
        Some(0),
        "no kubelet: nothing is ready"
    );

    // A new template: new pods are made, the old ones stay while none of the new is ready
    // (rolling update keeps the ready count)...
    let patch =
        json!({"spec": {"template": {"spec": {"containers": [{"name": "op", "image": "op:2"}]}}}});
    deploys
        .patch("op", &PatchParams::default(), &Patch::Strategic(patch))
        .await?;
    let image = |p: &Pod| {
        p.spec.as_ref().unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    };
    let now = pods.list(&ListParams::default()).await?.items;
    // ...but these old pods were not ready either, so they go at once.
    assert_eq!(
        now.len(),
        2,
        "{:?}",
        now.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    assert!(now.iter().all(|p| image(p) == "op:2"));
    let status = deploys.get_status("op").await?.status.unwrap();
    assert_eq!(status.observed_generation, Some(2));

    // Scaling through the scale subresource; a changed selector is refused; deleting the
    // Deployment collects its pods.
    deploys
        .patch_scale(
            "op",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await?;
    assert_eq!(pods.list(&ListParams::default()).await?.items.len(), 1);
    let err = deploys
        .patch(
            "op",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"selector": {"matchLabels": {"app": "other"}}}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.selector"), "{err}");
    deploys.delete("op", &DeleteParams::default()).await?;
    assert!(pods.list(&ListParams::default()).await?.items.is_empty());
    Ok(())
}

#[tokio::test]
async fn metadata_only_requests() -> R {
    use kube::core::PartialObjectMeta;
    let server = KubeTestServer::start().await?;
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut c = cm("m");
    c.data = Some([("big".to_string(), "x".repeat(100))].into());
    c.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
    api.create(&PostParams::default(), &c).await?;
    let meta: PartialObjectMeta<ConfigMap> = api.get_metadata("m").await?;
    assert_eq!(meta.metadata.labels.unwrap()["a"], "b");
    let list = api.list_metadata(&ListParams::default()).await?;
    assert_eq!(list.items.len(), 1);
    let patched = api
        .patch_metadata(
            "m",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "c"}}})),
        )
        .await?;
    assert_eq!(patched.metadata.labels.unwrap()["a"], "c");
    let mut w = watcher(
        Api::<PartialObjectMeta<ConfigMap>>::namespaced(server.client(), "default"),
        watcher::Config::default(),
    )
    .boxed();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), w.try_next()).await?? {
            Some(watcher::Event::InitApply(o)) => {
                assert_eq!(o.metadata.name.as_deref(), Some("m"));
                break;
            }
            Some(_) => {}
            None => panic!("ended"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn pagination_across_prefix_namespaces_and_patch_preconditions() -> R {
    let server = KubeTestServer::start().await?;
    let client = server.client();
    let nss: Api<Namespace> = Api::all(client.clone());
    for ns in ["a", "a-b"] {
        nss.create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
        for n in ["x", "y"] {
            Api::<ConfigMap>::namespaced(client.clone(), ns)
                .create(&PostParams::default(), &cm(n))
                .await?;
        }
    }
    let all: Api<ConfigMap> = Api::all(client.clone());
    let mut seen = Vec::new();
    let mut lp = ListParams::default().limit(1);
    loop {
        let page = all.list(&lp).await?;
        seen.extend(page.items.iter().map(|c| {
            format!(
                "{}/{}",
                c.metadata.namespace.clone().unwrap(),
                c.metadata.name.clone().unwrap()
            )
        }));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    assert_eq!(seen, ["a/x", "a/y", "a-b/x", "a-b/y"]);

    // JSON patch `test` on the live resourceVersion passes; a merge patch carrying a stale one conflicts.
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "a");
    let live = api.get("x").await?;
    let rv = live.metadata.resource_version.clone().unwrap();
    let jp: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/labels", "value": {"k": "v"}}]))?;
    api.patch("x", &PatchParams::default(), &Patch::Json::<()>(jp))
        .await?;
    let err = api
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": rv, "labels": {"k": "w"}}})),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409));
    Ok(())
}

#[tokio::test]
async fn statefulset_ordered_ready_and_rolling_update() -> R {
    let server = KubeTestServer::start_with(ServerOptions {
        store: StoreOptions {
            statefulset_controller: true,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let client = server.client();
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let s: StatefulSet = serde_json::from_value(
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "pg"},
        "spec": {"replicas": 2, "serviceName": "pg", "selector": {"matchLabels": {"app": "pg"}},
            "template": {"metadata": {"labels": {"app": "pg"}}, "spec": {"containers": [{"name": "pg", "image": "postgres:16"}]}}}}),
    )?;
    sts.create(&PostParams::default(), &s).await?;
    let names =
        |l: Vec<Pod>| -> Vec<String> { l.into_iter().filter_map(|p| p.metadata.name).collect() };

    // OrderedReady: pg-1 waits for pg-0 to be ready.
    assert_eq!(
        names(pods.list(&ListParams::default()).await?.items),
        ["pg-0"]
    );
    server.set_pod_ready("default", "pg-0", true).await?;
    assert_eq!(
        names(pods.list(&ListParams::default()).await?.items),
        ["pg-0", "pg-1"]
    );
    server.set_pod_ready("default", "pg-1", true).await?;
    let st = sts.get_status("pg").await?.status.unwrap();
    assert_eq!((st.replicas, st.ready_replicas), (2, Some(2)));
    let first_rev = st.update_revision.clone().unwrap();
    assert_eq!(st.current_revision.as_deref(), Some(first_rev.as_str()));

    // RollingUpdate: the highest ordinal goes first, and the next waits for it to be ready.
    sts.patch("pg", &PatchParams::default(), &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "pg", "image": "postgres:17"}]}}}}))).await?;
    let image = |p: &Pod| {
        p.spec.as_ref().unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    };
    assert_eq!(image(&pods.get("pg-1").await?), "postgres:17");
    assert_eq!(image(&pods.get("pg-0").await?), "postgres:16");
    let st = sts.get_status("pg").await?.status.unwrap();
    assert_eq!(st.updated_replicas, Some(1));
    assert_eq!(st.current_revision.as_deref(), Some(first_rev.as_str()));
    server.set_pod_ready("default", "pg-1", true).await?;
    assert_eq!(image(&pods.get("pg-0").await?), "postgres:17");
    server.set_pod_ready("default", "pg-0", true).await?;
    let st = sts.get_status("pg").await?.status.unwrap();
    assert_eq!(st.updated_replicas, Some(2));
    assert_eq!(st.current_revision, st.update_revision);
    assert_ne!(st.current_revision.as_deref(), Some(first_rev.as_str()));
    Ok(())
}

/// What a kubelet relies on, played by the test: binding, graceful deletion of a bound pod,
/// eviction against a PodDisruptionBudget (percentages round up), PDB status and EndpointSlices.
#[tokio::test]
async fn binding_graceful_deletion_eviction_and_endpoint_slices() -> R {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let server = KubeTestServer::start_with(ServerOptions {
        store: StoreOptions {
            endpointslice_controller: true,
            disruption_controller: true,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    // No retries on 429, so a refused eviction is seen at once.
    let mut config = kube::Config::new(server.url().parse()?);
    config.default_retry = false;
    let client = kube::Client::try_from(config)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "db"},
        "spec": {"selector": {"app": "db"}, "ports": [{"port": 5432}]}}))?;
    Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &svc)
        .await?;
    for i in 0..3 {
        let p: Pod = serde_json::from_value(
            json!({"metadata": {"name": format!("db-{i}"), "labels": {"app": "db"}},
            "spec": {"terminationGracePeriodSeconds": 20, "containers": [{"name": "pg", "image": "postgres:16"}]}}),
        )?;
        pods.create(&PostParams::default(), &p).await?;
        let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": format!("db-{i}")},
            "target": {"apiVersion": "v1", "kind": "Node", "name": "node-a"}});
        let _: serde_json::Value = pods
            .create_subresource(
                "binding",
                &format!("db-{i}"),
                &PostParams::default(),
                &binding,
            )
            .await?;
        let ip = format!("127.0.9.{}", i + 2);
        pods.patch_status(
            &format!("db-{i}"),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
            "phase": "Running", "podIP": ip,
            "conditions": [{"type": "Ready", "status": if i < 2 { "True" } else { "False" }}]}})),
        )
        .await?;
    }
    // Bound once only.
    let again = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "db-0"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-b"}});
    let err = pods
        .create_subresource::<_, serde_json::Value>(
            "binding",
            "db-0",
            &PostParams::default(),
            &again,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409),
        "{err:?}"
    );
    assert_eq!(
        pods.get("db-0")
            .await?
            .spec
            .and_then(|s| s.node_name)
            .as_deref(),
        Some("node-a")
    );

    let slice = Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .get("db")
        .await?;
    let ready: Vec<(String, bool)> = slice
        .endpoints
        .iter()
        .flatten()
        .map(|e| {
            (
                e.addresses[0].clone(),
                e.conditions.as_ref().and_then(|c| c.ready) == Some(true),
            )
        })
        .collect();
    assert_eq!(
        ready,
        [
            ("127.0.9.2".to_string(), true),
            ("127.0.9.3".to_string(), true),
            ("127.0.9.4".to_string(), false)
        ]
    );
    assert_eq!(slice.ports.unwrap_or_default()[0].port, Some(5432));

    // 67% of 3 rounds up to 3 healthy wanted, 2 are: no Ready pod may go; the unready one may
    // not either (the budget is not met).
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({"metadata": {"name": "db"},
        "spec": {"minAvailable": "67%", "selector": {"matchLabels": {"app": "db"}}}}))?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    pdbs.create(&PostParams::default(), &pdb).await?;
    for name in ["db-0", "db-2"] {
        let err = pods.evict(name, &Default::default()).await.unwrap_err();
        assert!(
            matches!(err, kube::Error::Api(ref e) if e.code == 429 && e.reason == "TooManyRequests"),
            "{err:?}"
        );
    }
    let st = pdbs.get_status("db").await?.status.expect("status");
    assert_eq!(
        (
            st.expected_pods,
            st.current_healthy,
            st.desired_healthy,
            st.disruptions_allowed
        ),
        (Some(3), Some(2), Some(3), Some(0))
    );
    pdbs.patch(
        "db",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"minAvailable": 1}})),
    )
    .await?;
    pods.evict("db-0", &Default::default()).await?;

    // Evicted gracefully: the bound pod stays, marked, until its kubelet deletes it with grace 0.
    let evicted = pods.get("db-0").await?;
    assert_eq!(evicted.metadata.deletion_grace_period_seconds, Some(20));
    pods.patch_status(
        "db-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await?;
    assert!(
        pods.get_opt("db-0").await?.is_some(),
        "a status update does not remove it"
    );
    let slice = Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .get("db")
        .await?;
    let terminating = slice
        .endpoints
        .iter()
        .flatten()
        .find(|e| e.addresses[0] == "127.0.9.2");
    assert_eq!(
        terminating
            .and_then(|e| e.conditions.as_ref())
            .map(|c| (c.ready, c.terminating)),
        Some((Some(false), Some(true)))
    );
    pods.delete(
        "db-0",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    assert!(pods.get_opt("db-0").await?.is_none());
    // An unbound pod still goes at once.
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "loose"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))?;
    pods.create(&PostParams::default(), &p).await?;
    pods.delete("loose", &DeleteParams::default()).await?;
    assert!(pods.get_opt("loose").await?.is_none());
    Ok(())
}
