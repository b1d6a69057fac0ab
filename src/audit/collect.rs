//! The audit's only I/O: list each kind once, in one namespace or all, never writing.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::api::{Api, ListParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use super::{AuditScope, Inventory};

/// Page size for lists: large clusters are listed in pages rather than one huge response.
const PAGE: u32 = 500;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A list the audit cannot do without failed (RBAC, connection, a missing API).
    #[error("cannot list {kind} in {scope}: {source}")]
    List {
        kind: &'static str,
        scope: String,
        #[source]
        source: kube::Error,
    },
}

async fn list_all<K>(api: Api<K>) -> Result<Vec<K>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut items = Vec::new();
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = api.list(&params).await?;
        items.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(items),
        }
    }
}

async fn namespaced<K>(client: &Client, scope: &AuditScope) -> Result<Vec<K>, AuditError>
where
    K: Resource<Scope = NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Debug,
    <K as Resource>::DynamicType: Default,
{
    let api = match &scope.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    list_all(api).await.map_err(|source| AuditError::List {
        kind: <K as k8s_openapi::Resource>::KIND,
        scope: match &scope.namespace {
            Some(ns) => format!("namespace {ns}"),
            None => "all namespaces".to_string(),
        },
        source,
    })
}

/// Cluster-wide kinds are optional: a namespace-scoped user may not read them, and the report
/// says what that costs instead of failing.
async fn cluster<K>(
    client: &Client,
    what_is_lost: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<K>, AuditError>
where
    K: Resource<Scope = k8s_openapi::ClusterResourceScope>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Debug,
    <K as Resource>::DynamicType: Default,
{
    match list_all(Api::<K>::all(client.clone())).await {
        Ok(items) => Ok(items),
        Err(kube::Error::Api(status)) if status.code == 403 => {
            notes.push(format!(
                "cannot list {}s (forbidden): {what_is_lost}",
                <K as k8s_openapi::Resource>::KIND
            ));
            Ok(Vec::new())
        }
        Err(source) => Err(AuditError::List {
            kind: <K as k8s_openapi::Resource>::KIND,
            scope: "the cluster".to_string(),
            source,
        }),
    }
}

/// Lists everything the audit reads, each kind once, concurrently.
pub async fn collect(client: &Client, scope: &AuditScope) -> Result<Inventory, AuditError> {
    let lists = futures::try_join!(
        namespaced::<Deployment>(client, scope),
        namespaced::<StatefulSet>(client, scope),
        namespaced::<ReplicaSet>(client, scope),
        namespaced::<DaemonSet>(client, scope),
        namespaced::<Job>(client, scope),
        namespaced::<Pod>(client, scope),
        namespaced::<PodDisruptionBudget>(client, scope),
        namespaced::<Service>(client, scope),
    )?;
    let (deployments, stateful_sets, replica_sets, daemon_sets, jobs, pods, pdbs, services) = lists;
    let mut notes = Vec::new();
    let nodes = cluster::<Node>(
        client,
        "spot-capable workloads cannot be recognised, so no no-pdb-on-spot findings",
        &mut notes,
    )
    .await?;
    let priority_classes = cluster::<PriorityClass>(
        client,
        "pod templates' priorities are unknown, so critical workloads are not marked",
        &mut notes,
    )
    .await?;
    Ok(Inventory {
        scope: scope.clone(),
        deployments,
        stateful_sets,
        replica_sets,
        daemon_sets,
        jobs,
        pods,
        pdbs,
        services,
        priority_classes,
        nodes,
        load_balancers: Default::default(),
        notes,
    })
}
