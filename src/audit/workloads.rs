//! From listed objects to workloads: each controller with its pod template and its live pods.
//!
//! ReplicaSets fold into the object that controls them (a Deployment, or another controller
//! such as an Argo Rollout), Jobs into their CronJob, and a pod without a controller is its own
//! workload. A pod whose controller was not listed (created since, or a kind the audit does not
//! list) becomes a workload of that controller's kind with the pod itself as template.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::Inventory;
use crate::drain::policy;

/// (namespace, kind, name): the sort order of the report.
pub(crate) type WorkloadKey = (String, String, String);

/// One workload, with what the checks need.
#[derive(Debug, Clone)]
pub(crate) struct Workload<'a> {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// Desired replicas for kinds with a scale (Deployment, StatefulSet, ReplicaSet and
    /// controllers of ReplicaSets); DaemonSet: desired scheduled pods; Job: parallelism; a pod: 1.
    pub replicas: i32,
    /// Whether `replicas` is a scale the owner sets (single-replica findings apply).
    pub has_scale: bool,
    /// A pod as the controller creates it: the template's labels, annotations and spec, the
    /// workload's namespace and name, a controller reference of the workload's kind, and the
    /// priority its PriorityClass gives. The policy functions read it like a real pod.
    pub template: Pod,
    /// Pods that exist and run (or will): neither finished nor mirror pods.
    pub live: Vec<&'a Pod>,
    /// The controller's own metadata annotations (empty for a bare pod).
    pub own_annotations: BTreeMap<String, String>,
    /// Job settings that matter to a drain: `backoffLimit` and whether a pod failure policy
    /// exists (which can ignore evictions).
    pub job: Option<JobFacts>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JobFacts {
    /// The API default is 6.
    pub backoff_limit: i32,
    pub has_pod_failure_policy: bool,
    /// The (newest) Job has a Complete or Failed condition: nothing of it runs now.
    pub finished: bool,
}

impl Workload<'_> {
    /// The pods whose labels the PDB and Service checks look at: the live ones, or the template
    /// when none runs (scaled to zero, finished, not yet scheduled).
    pub fn pods(&self) -> Vec<&Pod> {
        if self.live.is_empty() {
            vec![&self.template]
        } else {
            self.live.clone()
        }
    }
}

fn meta_str(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

fn controller(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
}

/// Priority a pod gets at admission: its class's value, else the global default class's.
fn priority_of(inventory: &Inventory, class: Option<&str>) -> Option<i32> {
    let classes = &inventory.priority_classes;
    match class {
        Some(name) => classes
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .and_then(|c| c.value),
        None => classes
            .iter()
            .find(|c| c.global_default == Some(true))
            .and_then(|c| c.value),
    }
}

fn template_pod(
    inventory: &Inventory,
    namespace: &str,
    kind: &str,
    name: &str,
    template: &PodTemplateSpec,
) -> Pod {
    let meta = template.metadata.clone().unwrap_or_default();
    let mut spec = template.spec.clone().unwrap_or_default();
    if spec.priority.is_none() {
        spec.priority = priority_of(inventory, spec.priority_class_name.as_deref());
    }
    Pod {
        metadata: ObjectMeta {
            namespace: Some(namespace.to_string()),
            name: Some(name.to_string()),
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: String::new(),
                kind: kind.to_string(),
                name: name.to_string(),
                uid: String::new(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

struct Builder<'a> {
    inventory: &'a Inventory,
    workloads: BTreeMap<WorkloadKey, Workload<'a>>,
}

impl<'a> Builder<'a> {
    fn add(
        &mut self,
        meta: &ObjectMeta,
        kind: &str,
        replicas: i32,
        has_scale: bool,
        template: &PodTemplateSpec,
        job: Option<JobFacts>,
    ) {
        let namespace = meta_str(&meta.namespace);
        let name = meta_str(&meta.name);
        let template = template_pod(self.inventory, &namespace, kind, &name, template);
        self.workloads.insert(
            (namespace.clone(), kind.to_string(), name.clone()),
            Workload {
                kind: kind.to_string(),
                namespace,
                name,
                replicas,
                has_scale,
                template,
                live: Vec::new(),
                own_annotations: meta.annotations.clone().unwrap_or_default(),
                job,
            },
        );
    }
}

/// Groups the inventory into workloads, keyed (and so sorted) by namespace, kind and name.
pub(crate) fn group(inventory: &Inventory) -> BTreeMap<WorkloadKey, Workload<'_>> {
    let mut b = Builder {
        inventory,
        workloads: BTreeMap::new(),
    };
    for d in &inventory.deployments {
        let spec = d.spec.clone().unwrap_or_default();
        let replicas = spec.replicas.unwrap_or(1);
        b.add(
            &d.metadata,
            "Deployment",
            replicas,
            true,
            &spec.template,
            None,
        );
    }
    for s in &inventory.stateful_sets {
        let spec = s.spec.clone().unwrap_or_default();
        let replicas = spec.replicas.unwrap_or(1);
        b.add(
            &s.metadata,
            "StatefulSet",
            replicas,
            true,
            &spec.template,
            None,
        );
    }
    for d in &inventory.daemon_sets {
        let spec = d.spec.clone().unwrap_or_default();
        let scheduled = d
            .status
            .as_ref()
            .map(|s| s.desired_number_scheduled)
            .unwrap_or(0);
        b.add(
            &d.metadata,
            "DaemonSet",
            scheduled,
            false,
            &spec.template,
            None,
        );
    }

    // ReplicaSets: standalone ones are workloads; those of an unlisted controller (e.g. an Argo
    // Rollout) make that controller a workload, with the replicas of all its ReplicaSets and the
    // template of its largest one. A Deployment's are already represented by the Deployment.
    let mut rs_owner: BTreeMap<(String, String), (String, String)> = BTreeMap::new();
    let mut rs_sorted: Vec<_> = inventory.replica_sets.iter().collect();
    rs_sorted.sort_by_key(|rs| {
        std::cmp::Reverse(rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1))
    });
    for rs in rs_sorted {
        let namespace = meta_str(&rs.metadata.namespace);
        let name = meta_str(&rs.metadata.name);
        let spec = rs.spec.clone().unwrap_or_default();
        let replicas = spec.replicas.unwrap_or(1);
        let template = spec.template.unwrap_or_default();
        match controller(&rs.metadata) {
            None => b.add(&rs.metadata, "ReplicaSet", replicas, true, &template, None),
            Some(owner) => {
                rs_owner.insert(
                    (namespace.clone(), name),
                    (owner.kind.clone(), owner.name.clone()),
                );
                let key = (namespace.clone(), owner.kind.clone(), owner.name.clone());
                if let Some(existing) = b.workloads.get_mut(&key) {
                    if owner.kind != "Deployment" {
                        existing.replicas += replicas;
                    }
                } else if owner.kind != "Deployment" && replicas > 0 {
                    let meta = ObjectMeta {
                        namespace: Some(namespace),
                        name: Some(owner.name.clone()),
                        ..Default::default()
                    };
                    b.add(&meta, &owner.kind, replicas, true, &template, None);
                }
            }
        }
    }

    // Jobs: a CronJob's Jobs fold into the CronJob, represented by its newest Job.
    let mut job_owner: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut jobs: Vec<_> = inventory.jobs.iter().collect();
    jobs.sort_by(|a, b| {
        b.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .cmp(&a.metadata.creation_timestamp.as_ref().map(|t| t.0))
    });
    for job in jobs {
        let namespace = meta_str(&job.metadata.namespace);
        let spec = job.spec.clone().unwrap_or_default();
        let facts = JobFacts {
            backoff_limit: spec.backoff_limit.unwrap_or(6),
            has_pod_failure_policy: spec.pod_failure_policy.is_some(),
            finished: job
                .status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .any(|c| matches!(c.type_.as_str(), "Complete" | "Failed") && c.status == "True"),
        };
        let parallelism = spec.parallelism.unwrap_or(1);
        match controller(&job.metadata).filter(|o| o.kind == "CronJob") {
            Some(cron) => {
                job_owner.insert(
                    (namespace.clone(), meta_str(&job.metadata.name)),
                    cron.name.clone(),
                );
                let key = (namespace.clone(), "CronJob".to_string(), cron.name.clone());
                if !b.workloads.contains_key(&key) {
                    let meta = ObjectMeta {
                        namespace: Some(namespace),
                        name: Some(cron.name.clone()),
                        ..Default::default()
                    };
                    b.add(
                        &meta,
                        "CronJob",
                        parallelism,
                        false,
                        &spec.template,
                        Some(facts),
                    );
                }
            }
            None => b.add(
                &job.metadata,
                "Job",
                parallelism,
                false,
                &spec.template,
                Some(facts),
            ),
        }
    }

    for pod in &inventory.pods {
        if policy::is_mirror_pod(pod) || policy::is_finished(pod) {
            continue;
        }
        let namespace = meta_str(&pod.metadata.namespace);
        let (kind, name) = match policy::controller_of(pod) {
            None => ("Pod".to_string(), meta_str(&pod.metadata.name)),
            Some(c) if c.kind == "ReplicaSet" => rs_owner
                .get(&(namespace.clone(), c.name.clone()))
                .cloned()
                .unwrap_or_else(|| (c.kind.clone(), c.name.clone())),
            Some(c) if c.kind == "Job" => match job_owner.get(&(namespace.clone(), c.name.clone()))
            {
                Some(cron) => ("CronJob".to_string(), cron.clone()),
                None => (c.kind.clone(), c.name.clone()),
            },
            Some(c) => (c.kind.clone(), c.name.clone()),
        };
        let key = (namespace.clone(), kind.clone(), name.clone());
        let workload = b.workloads.entry(key).or_insert_with(|| {
            // Not listed: the pod is the best template there is. A bare pod's "template" is the
            // pod itself, with its real owner references (none that is a controller).
            let mut template = pod.clone();
            template.status = None;
            if kind != "Pod" {
                template.metadata.owner_references = Some(vec![OwnerReference {
                    api_version: String::new(),
                    kind: kind.clone(),
                    name: name.clone(),
                    uid: String::new(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]);
            }
            Workload {
                kind: kind.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                replicas: 0,
                has_scale: false,
                template,
                live: Vec::new(),
                own_annotations: BTreeMap::new(),
                job: None,
            }
        });
        workload.live.push(pod);
        if !workload.has_scale && !matches!(workload.kind.as_str(), "DaemonSet" | "Job" | "CronJob")
        {
            // Bare pods and unlisted controllers: what runs is all we know.
            workload.replicas = workload.live.len() as i32;
        }
    }
    b.workloads
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).unwrap()
    }

    fn pod(name: &str, owner: Option<(&str, &str)>, phase: &str) -> Pod {
        let owners = owner.map(|(kind, n)| {
            json!([{"apiVersion": "v1", "kind": kind, "name": n, "uid": "u", "controller": true}])
        });
        from(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": {"app": name},
                         "ownerReferences": owners},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": phase},
        }))
    }

    #[test]
    fn replica_sets_and_jobs_fold_into_their_controllers() {
        let template = json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c"}]},
        });
        let owned = |api: &str, kind: &str, name: &str| {
            let mut owner = json!({"apiVersion": api, "kind": kind, "name": name, "uid": "u"});
            owner["controller"] = json!(true);
            json!([owner])
        };
        let inventory = Inventory {
            deployments: vec![from(json!({
                "metadata": {"name": "web", "namespace": "ns"},
                "spec": {"replicas": 2, "selector": {}, "template": template},
            }))],
            replica_sets: vec![
                from(json!({
                    "metadata": {"name": "web-1", "namespace": "ns",
                                 "ownerReferences": owned("apps/v1", "Deployment", "web")},
                    "spec": {"replicas": 2, "selector": {}, "template": template},
                })),
                from(json!({
                    "metadata": {"name": "roll-1", "namespace": "ns",
                        "ownerReferences": owned("argoproj.io/v1alpha1", "Rollout", "roll")},
                    "spec": {"replicas": 3, "selector": {}, "template": template},
                })),
                from(json!({
                    "metadata": {"name": "loose", "namespace": "ns"},
                    "spec": {"selector": {}, "template": template},
                })),
            ],
            jobs: vec![
                from(json!({
                    "metadata": {"name": "nightly-1", "namespace": "ns",
                                 "ownerReferences": owned("batch/v1", "CronJob", "nightly")},
                    "spec": {"backoffLimit": 0, "template": template},
                })),
                from(json!({
                    "metadata": {"name": "once", "namespace": "ns"},
                    "spec": {"template": template},
                })),
            ],
            pods: vec![
                pod("web-1-a", Some(("ReplicaSet", "web-1")), "Running"),
                pod("roll-1-a", Some(("ReplicaSet", "roll-1")), "Running"),
                pod("nightly-1-a", Some(("Job", "nightly-1")), "Running"),
                pod("once-a", Some(("Job", "once")), "Succeeded"),
                pod("shell", None, "Running"),
                pod("old-shell", None, "Succeeded"),
                pod("orphan", Some(("ReplicaSet", "gone")), "Pending"),
                pod("op-0", Some(("EtcdCluster", "etcd")), "Running"),
            ],
            ..Default::default()
        };
        let workloads = group(&inventory);
        let summary: Vec<(String, String, i32, usize)> = workloads
            .values()
            .map(|w| (w.kind.clone(), w.name.clone(), w.replicas, w.live.len()))
            .collect();
        assert_eq!(
            summary,
            [
                ("CronJob".into(), "nightly".into(), 1, 1),
                ("Deployment".into(), "web".into(), 2, 1),
                ("EtcdCluster".into(), "etcd".into(), 1, 1),
                ("Job".into(), "once".into(), 1, 0),
                ("Pod".into(), "shell".into(), 1, 1),
                ("ReplicaSet".into(), "gone".into(), 1, 1),
                ("ReplicaSet".into(), "loose".into(), 1, 0),
                ("Rollout".into(), "roll".into(), 3, 1),
            ]
        );
        let cron = &workloads[&("ns".into(), "CronJob".into(), "nightly".into())];
        assert_eq!(cron.job.unwrap().backoff_limit, 0);
        let web = &workloads[&("ns".into(), "Deployment".into(), "web".into())];
        assert_eq!(
            policy::controller_of(&web.template).unwrap().kind,
            "Deployment"
        );
        assert!(!policy::is_bare_pod(&web.template));
        let shell = &workloads[&("ns".into(), "Pod".into(), "shell".into())];
        assert!(policy::is_bare_pod(&shell.template));
    }

    #[test]
    fn templates_get_their_priority_class_value() {
        let inventory = Inventory {
            priority_classes: vec![
                from(json!({"metadata": {"name": "system-cluster-critical"}, "value": 2000000000})),
                from(json!({"metadata": {"name": "low"}, "value": -5, "globalDefault": true})),
            ],
            deployments: vec![
                from(
                    json!({"metadata": {"name": "dns", "namespace": "ns"}, "spec": {
                        "selector": {},
                        "template": {"spec": {
                            "priorityClassName": "system-cluster-critical", "containers": []}},
                    }}),
                ),
                from(
                    json!({"metadata": {"name": "plain", "namespace": "ns"}, "spec": {
                        "selector": {}, "template": {"spec": {"containers": []}},
                    }}),
                ),
            ],
            ..Default::default()
        };
        let workloads = group(&inventory);
        let priority = |name: &str| {
            workloads[&("ns".into(), "Deployment".into(), name.into())]
                .template
                .spec
                .as_ref()
                .unwrap()
                .priority
        };
        assert_eq!(priority("dns"), Some(2_000_000_000));
        assert_eq!(priority("plain"), Some(-5));
    }
}
