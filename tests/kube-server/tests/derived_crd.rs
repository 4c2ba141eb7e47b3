//! A custom resource declared the way `common` will declare ours — `#[derive(CustomResource)]`
//! with a status subresource, printer columns, optional fields and a list-map — installed from
//! its generated CRD and used through kube-rs. Runs against the test server, or against
//! `KUBECONFIG` like the scenario suite.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{CustomResource, CustomResourceExt};
use pgpilot_kube_testserver::{TestNamespace, test_client};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "derived.pgpilot.io",
    version = "v1alpha1",
    kind = "Gizmo",
    namespaced,
    status = "GizmoStatus",
    shortname = "gz",
    printcolumn = r#"{"name":"Instances","type":"integer","jsonPath":".spec.instances"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GizmoSpec {
    instances: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    parameters: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    shards: Vec<Shard>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Shard {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replicas: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GizmoStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    observed_generation: Option<i64>,
}

fn apply_body(spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "derived.pgpilot.io/v1alpha1", "kind": "Gizmo", "metadata": {"name": "g"}, "spec": spec})
}

#[tokio::test]
async fn derived_custom_resource_round_trip() -> anyhow::Result<()> {
    let (client, _server) = test_client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "gizmos.derived.pgpilot.io",
        &PatchParams::apply("pgpilot-tests").force(),
        &Patch::Apply(Gizmo::crd()),
    )
    .await?;
    let ns = TestNamespace::create(&client, "derived").await?;
    let api: Api<Gizmo> = Api::namespaced(client.clone(), ns.name());
    let mut served = false;
    for _ in 0..100 {
        if api.list(&ListParams::default()).await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(served, "gizmos never became served");

    // Two managers share the shards list-map by key.
    api.patch(
        "g",
        &PatchParams::apply("operator"),
        &Patch::Apply(apply_body(
            json!({"instances": 2, "shards": [{"name": "s0", "replicas": 2}]}),
        )),
    )
    .await?;
    let g = api
        .patch("g", &PatchParams::apply("admin"), &Patch::Apply(apply_body(json!({"instances": 2, "shards": [{"name": "s1"}], "parameters": {"work_mem": "64MB"}}))))
        .await?;
    let shards: Vec<&str> = g.spec.shards.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(shards, ["s0", "s1"]);
    assert_eq!(g.spec.parameters["work_mem"], "64MB");
    assert_eq!(g.metadata.generation, Some(2));

    // Status through the subresource, typed.
    let status = json!({"apiVersion": "derived.pgpilot.io/v1alpha1", "kind": "Gizmo",
        "status": GizmoStatus { phase: Some("Ready".into()), observed_generation: g.metadata.generation }});
    let g = api
        .patch_status(
            "g",
            &PatchParams::apply("operator").force(),
            &Patch::Apply(status),
        )
        .await?;
    assert_eq!(
        g.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Ready")
    );
    assert_eq!(g.spec.instances, 2);
    ns.cleanup().await
}

/// The operator's shape: a `Controller` on the custom resource that owns ConfigMaps it
/// server-side applies; deleting a child or changing the parent brings a reconcile that puts
/// the child back in line.
#[tokio::test]
async fn controller_owns_children() -> anyhow::Result<()> {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Resource;
    use kube::api::{DeleteParams, PostParams};
    use kube::runtime::controller::{Action, Controller};
    use kube::runtime::watcher;
    use std::sync::Arc;

    let (client, _server) = test_client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "gizmos.derived.pgpilot.io",
        &PatchParams::apply("pgpilot-tests").force(),
        &Patch::Apply(Gizmo::crd()),
    )
    .await?;
    let ns = TestNamespace::create(&client, "owns").await?;
    let gizmos: Api<Gizmo> = Api::namespaced(client.clone(), ns.name());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    for _ in 0..100 {
        if gizmos.list(&ListParams::default()).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    async fn reconcile(g: Arc<Gizmo>, cms: Arc<Api<ConfigMap>>) -> Result<Action, kube::Error> {
        let owner = g
            .controller_owner_ref(&())
            .expect("a namespaced object with a uid");
        let name = format!("{}-config", g.metadata.name.as_deref().unwrap_or_default());
        let child = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "ownerReferences": [owner]},
            "data": {"instances": g.spec.instances.to_string()}});
        cms.patch(
            &name,
            &PatchParams::apply("gizmo-operator").force(),
            &Patch::Apply(child),
        )
        .await?;
        Ok(Action::await_change())
    }
    let controller = Controller::new(gizmos.clone(), watcher::Config::default())
        .owns(cms.clone(), watcher::Config::default())
        .run(
            reconcile,
            |_, _, _| Action::requeue(Duration::from_secs(1)),
            Arc::new(cms.clone()),
        )
        .for_each(|_| async {});
    let task = tokio::spawn(controller);

    let g = Gizmo::new(
        "g",
        GizmoSpec {
            instances: 1,
            image: None,
            parameters: BTreeMap::new(),
            shards: vec![],
        },
    );
    gizmos.create(&PostParams::default(), &g).await?;
    let child_says = |want: &'static str| {
        let cms = cms.clone();
        async move {
            for _ in 0..100 {
                if let Some(c) = cms.get_opt("g-config").await?
                    && c.data
                        .as_ref()
                        .and_then(|d| d.get("instances"))
                        .map(String::as_str)
                        == Some(want)
                {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::bail!("g-config never said instances={want}")
        }
    };
    child_says("1").await?;
    gizmos
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"instances": 3}})),
        )
        .await?;
    child_says("3").await?;
    cms.delete("g-config", &DeleteParams::default()).await?;
    child_says("3").await?;
    task.abort();
    ns.cleanup().await
}
