//! One eviction or deletion of one pod, and what its answer means.
//!
//! Answers that are normal progress of a drain are values ([`EvictOutcome`], [`DeleteOutcome`]);
//! only answers that say the request itself is wrong or not allowed (403, 400, transport
//! failures) are errors. The status-code mapping follows the Eviction API
//! (`pkg/registry/core/pod/storage/eviction.go`), as Karpenter's termination controller does:
//!
//! | answer | meaning | outcome |
//! |---|---|---|
//! | 201 | the pod is terminating with the requested grace | `Evicted` |
//! | 404 | the pod no longer exists | `Gone` |
//! | 409 | the UID precondition failed: the name now belongs to a successor | `Gone` |
//! | 429 with a `DisruptionBudget` cause | a PodDisruptionBudget said no | `PdbBlocked` |
//! | 429 otherwise | the apiserver is throttling (API Priority and Fairness) | `Throttled` |
//! | 500 "more than one PodDisruptionBudget" | the Eviction API never evicts such a pod | `MultiplePdbs` |
//!
//! The request is built here rather than with `kube::Api::evict`: kube 5 sends the delete
//! options under the key `delete_options`, which the apiserver ignores ("unknown field"), so the
//! UID precondition and the grace period would silently not apply.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::Eviction;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{DeleteOptions, ObjectMeta, Preconditions};
use kube::api::{Api, DeleteParams, PostParams};
use kube::core::Status;
use serde::Serialize;

/// What an eviction request achieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum EvictOutcome {
    /// Accepted: the pod is terminating.
    Evicted,
    /// The pod (with this UID) no longer exists.
    Gone,
    /// A PodDisruptionBudget refused. `pdb` is its name when the apiserver said which.
    PdbBlocked {
        pdb: Option<String>,
        message: String,
    },
    /// The pod is covered by several PDBs; the Eviction API refuses such pods whatever the
    /// budgets say. Retrying helps only once a PDB changes.
    MultiplePdbs { message: String },
    /// The apiserver is shedding load; retry after `retry_after` or a backoff.
    Throttled {
        retry_after: Option<Duration>,
        message: String,
    },
}

/// What a deletion request achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum DeleteOutcome {
    /// Accepted: the pod is terminating.
    Deleted,
    /// The pod (with this UID) no longer exists.
    Gone,
}

/// The eviction body: policy/v1 Eviction with the grace period and a UID precondition, so a
/// same-named successor (a StatefulSet pod recreated meanwhile) is never evicted by mistake.
pub fn eviction_body(
    namespace: &str,
    name: &str,
    uid: Option<&str>,
    grace_seconds: Option<i64>,
) -> Eviction {
    Eviction {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        delete_options: Some(DeleteOptions {
            grace_period_seconds: grace_seconds,
            preconditions: uid.map(|uid| Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteOptions::default()
        }),
    }
}

/// Asks the Eviction API to evict one pod.
pub async fn evict(
    api: &Api<Pod>,
    namespace: &str,
    name: &str,
    uid: Option<&str>,
    grace_seconds: Option<i64>,
) -> Result<EvictOutcome, kube::Error> {
    let body = eviction_body(namespace, name, uid, grace_seconds);
    let answer = api
        .create_subresource::<Eviction, serde_json::Value>(
            "eviction",
            name,
            &PostParams::default(),
            &body,
        )
        .await;
    classify_eviction(answer.map(|_| ()))
}

/// Maps an eviction answer to an outcome; errors stay errors only when they are not one of the
/// answers a drain expects (see the module table).
pub fn classify_eviction(answer: Result<(), kube::Error>) -> Result<EvictOutcome, kube::Error> {
    let status = match answer {
        Ok(()) => return Ok(EvictOutcome::Evicted),
        Err(kube::Error::Api(status)) => status,
        Err(other) => return Err(other),
    };
    match status.code {
        404 | 409 => Ok(EvictOutcome::Gone),
        429 => {
            let budget_cause = status
                .details
                .iter()
                .flat_map(|d| d.causes.iter())
                .find(|c| {
                    c.reason == "DisruptionBudget" || c.message.contains("disruption budget")
                });
            if budget_cause.is_some() || status.message.contains("disruption budget") {
                let pdb = budget_cause.and_then(|c| pdb_name_from_cause(&c.message));
                let message = match budget_cause {
                    Some(cause) if !cause.message.is_empty() => cause.message.clone(),
                    _ => status.message.clone(),
                };
                Ok(EvictOutcome::PdbBlocked { pdb, message })
            } else {
                let retry_after = status
                    .details
                    .as_ref()
                    .map(|d| d.retry_after_seconds)
                    .filter(|s| *s > 0)
                    .map(|s| Duration::from_secs(u64::from(s)));
                Ok(EvictOutcome::Throttled {
                    retry_after,
                    message: status.message.clone(),
                })
            }
        }
        500 if is_multiple_pdbs(&status) => Ok(EvictOutcome::MultiplePdbs {
            message: status.message.clone(),
        }),
        _ => Err(kube::Error::Api(status)),
    }
}

/// "This pod has more than one PodDisruptionBudget, which the eviction subresource does not
/// support." (an internal error, 500, in every Kubernetes release since 1.5).
fn is_multiple_pdbs(status: &Status) -> bool {
    status.message.contains("more than one PodDisruptionBudget")
}

/// The PDB name in the Eviction API's causes: "The disruption budget web needs 2 healthy pods
/// and has 2 currently" or "The disruption budget web is still being processed by the server.".
fn pdb_name_from_cause(message: &str) -> Option<String> {
    let rest = message.strip_prefix("The disruption budget ")?;
    let name = rest.split_whitespace().next()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// Deletes one pod with a grace period and a UID precondition, bypassing PDBs.
pub async fn delete(
    api: &Api<Pod>,
    name: &str,
    uid: Option<&str>,
    grace_seconds: i64,
) -> Result<DeleteOutcome, kube::Error> {
    let params = DeleteParams {
        // Never 0: that is a force deletion, which removes the pod from the API before its
        // containers have stopped.
        grace_period_seconds: Some(u32::try_from(grace_seconds.max(1)).unwrap_or(u32::MAX)),
        preconditions: uid.map(|uid| kube::api::Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(DeleteOutcome::Deleted),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
            Ok(DeleteOutcome::Gone)
        }
        Err(other) => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::response::{StatusCause, StatusDetails};

    fn api_error(code: u16, message: &str, causes: Vec<StatusCause>) -> kube::Error {
        kube::Error::Api(Box::new(Status {
            status: None,
            code,
            message: message.to_string(),
            metadata: None,
            reason: String::new(),
            details: Some(StatusDetails {
                name: String::new(),
                group: String::new(),
                kind: String::new(),
                uid: String::new(),
                causes,
                retry_after_seconds: 0,
            }),
        }))
    }

    fn cause(reason: &str, message: &str) -> StatusCause {
        StatusCause {
            reason: reason.to_string(),
            message: message.to_string(),
            field: String::new(),
        }
    }

    #[test]
    fn the_body_uses_the_api_field_names() {
        let body = eviction_body("shop", "web-1", Some("u-1"), Some(7));
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["apiVersion"], "policy/v1");
        assert_eq!(json["kind"], "Eviction");
        assert_eq!(json["deleteOptions"]["gracePeriodSeconds"], 7);
        assert_eq!(json["deleteOptions"]["preconditions"]["uid"], "u-1");
        assert_eq!(json["metadata"]["namespace"], "shop");
    }

    #[test]
    fn status_codes_map_to_outcomes() {
        assert_eq!(classify_eviction(Ok(())).unwrap(), EvictOutcome::Evicted);
        for code in [404, 409] {
            assert_eq!(
                classify_eviction(Err(api_error(code, "x", vec![]))).unwrap(),
                EvictOutcome::Gone
            );
        }
        let blocked = classify_eviction(Err(api_error(
            429,
            "Cannot evict pod as it would violate the pod's disruption budget.",
            vec![cause(
                "DisruptionBudget",
                "The disruption budget web needs 2 healthy pods and has 2 currently",
            )],
        )))
        .unwrap();
        assert_eq!(
            blocked,
            EvictOutcome::PdbBlocked {
                pdb: Some("web".into()),
                message: "The disruption budget web needs 2 healthy pods and has 2 currently"
                    .into()
            }
        );
        let throttled =
            classify_eviction(Err(api_error(429, "Too many requests", vec![]))).unwrap();
        assert!(matches!(throttled, EvictOutcome::Throttled { .. }));
        let multiple = classify_eviction(Err(api_error(
            500,
            "Internal error occurred: This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            vec![],
        )))
        .unwrap();
        assert!(matches!(multiple, EvictOutcome::MultiplePdbs { .. }));
        for code in [400, 401, 403, 500, 503] {
            assert!(classify_eviction(Err(api_error(code, "boom", vec![]))).is_err());
        }
    }

    #[test]
    fn pdb_names_come_from_causes() {
        assert_eq!(
            pdb_name_from_cause("The disruption budget db is still being processed by the server."),
            Some("db".into())
        );
        assert_eq!(pdb_name_from_cause("something else"), None);
    }
}
