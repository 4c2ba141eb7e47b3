//! Helpers for tests that must also run unchanged against a real cluster: a unique namespace
//! per test, deleted afterwards, so tests never see each other's objects. Cleanup is explicit
//! (an async delete cannot run in `Drop`, and would deadlock an in-process server's runtime),
//! so a test that fails midway leaves its namespace behind on a real cluster, labelled
//! `pgpilot.io/test=true`.

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};

pub struct TestNamespace {
    client: kube::Client,
    name: String,
}

impl TestNamespace {
    /// Creates `pgpilot-test-<prefix>-<random>`.
    pub async fn create(client: &kube::Client, prefix: &str) -> anyhow::Result<Self> {
        let suffix: String = (0..6)
            .map(|_| (b"abcdefghijklmnopqrstuvwxyz0123456789")[rand::random_range(0..36)] as char)
            .collect();
        let name = format!("pgpilot-test-{prefix}-{suffix}");
        // Labelled, so namespaces a failed test left on a real cluster are easy to find:
        // `kubectl delete ns -l pgpilot.io/test=true`.
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("pgpilot.io/test".to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(Self {
            client: client.clone(),
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the namespace (and with it everything the test made).
    pub async fn cleanup(self) -> anyhow::Result<()> {
        match Api::<Namespace>::all(self.client)
            .delete(&self.name, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting namespace {}", self.name)),
        }
    }
}
