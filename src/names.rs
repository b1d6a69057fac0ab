//! Every annotation, label, taint and event reason nodedrain reads or writes, in one place.
//!
//! Each constant says who reads it, so a rename cannot silently break a contract with users,
//! Karpenter, the cluster autoscaler or cloud load balancers.

/// Pod annotation (usually set on the pod template): how the pod leaves a draining node.
/// Read by the drain planner. Values: `evict` (default), `surge`, `wait`, `delete`, `skip`.
pub const ANNOTATION_STRATEGY: &str = "nodedrain.io/strategy";

/// Pod annotation: integer drain order, lower first; ties broken by the built-in tiers.
/// Read by the drain planner.
pub const ANNOTATION_ORDER: &str = "nodedrain.io/order";

/// Pod annotation: grace period in seconds requested at eviction or deletion; still clamped by
/// the deadline. Read by the drain planner.
pub const ANNOTATION_GRACE_PERIOD: &str = "nodedrain.io/grace-period";

/// Pod annotation: `"true"` means the workload's owner accepts that data in the pod's emptyDir
/// volumes is lost when the pod leaves a draining node (a per-pod `--delete-emptydir-data`).
/// Read by `nodedrain audit` (no `emptydir-without-data-loss-opt-in` finding); any value other
/// than `"true"` or `"false"` is reported as invalid.
pub const ANNOTATION_ALLOW_LOCAL_DATA_LOSS: &str = "nodedrain.io/allow-local-data-loss";

/// Prefix of every pod annotation nodedrain reads; `nodedrain audit` reports unknown keys with
/// it (usually typos, which would otherwise be ignored silently).
pub const ANNOTATION_PREFIX: &str = "nodedrain.io/";

/// Karpenter's opt-out annotation. nodedrain treats it as `wait` on voluntary drains.
pub const ANNOTATION_KARPENTER_DO_NOT_DISRUPT: &str = "karpenter.sh/do-not-disrupt";

/// Cluster autoscaler's opt-out annotation (`"false"` means do not evict). Treated as `wait` on
/// voluntary drains.
pub const ANNOTATION_CA_SAFE_TO_EVICT: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";

/// Pod annotation set by the kubelet on static (mirror) pods; such pods cannot be evicted.
pub const ANNOTATION_MIRROR_POD: &str = "kubernetes.io/config.mirror";

/// Node annotation holding the durable drain record (JSON). Written before an SQS message is
/// deleted; read by a new leader to resume drains and by `nodedrain uncordon` to clean up.
pub const ANNOTATION_DRAIN_RECORD: &str = "nodedrain.io/drain";

/// Node taint key added while a node is being drained; the value is the interruption kind.
/// Read by the scheduler (effect NoSchedule) and by operators.
pub const TAINT_INTERRUPTION: &str = "nodedrain.io/interruption";

/// Kubernetes' non-graceful node shutdown taint (GA in 1.28): on a node that is not Ready it lets
/// the pod garbage collector force-delete the node's terminating pods and the attach-detach
/// controller detach their volumes at once, instead of after its 6-minute timeout. Set only once
/// EC2 says the instance is gone (`--out-of-service-taint`).
pub const TAINT_OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";
/// The value Kubernetes' documentation and node-termination-handler use with
/// [`TAINT_OUT_OF_SERVICE`]; the controllers read only the key and the effect.
pub const TAINT_OUT_OF_SERVICE_VALUE: &str = "nodeshutdown";

/// Well-known node label that cloud load balancer controllers read to take a node out of
/// external load balancers before its pods stop.
pub const LABEL_EXCLUDE_FROM_LB: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Karpenter node label naming the NodePool; its presence means Karpenter owns the capacity.
pub const LABEL_KARPENTER_NODEPOOL: &str = "karpenter.sh/nodepool";

/// Karpenter node label with the capacity type (`spot`, `on-demand`, `reserved`). Read by
/// `nodedrain audit` to find spot-capable nodes.
pub const LABEL_KARPENTER_CAPACITY_TYPE: &str = "karpenter.sh/capacity-type";

/// EKS managed node group label with the capacity type (`SPOT`, `ON_DEMAND`). Read by
/// `nodedrain audit` to find spot-capable nodes.
pub const LABEL_EKS_CAPACITY_TYPE: &str = "eks.amazonaws.com/capacityType";

/// Community convention (kops, eksctl, self-managed groups) for the node's lifecycle (`spot`,
/// `normal`). Read by `nodedrain audit` to find spot-capable nodes.
pub const LABEL_NODE_LIFECYCLE: &str = "node.kubernetes.io/lifecycle";

/// Namespace label of the AWS Load Balancer Controller: with the value
/// [`LABEL_ELBV2_POD_READINESS_GATE_INJECT_ENABLED`], its webhook gives new pods of IP-target
/// TargetGroupBindings a readiness gate that holds them unready until their target is healthy.
/// Read by `nodedrain audit` (`readiness-gate-not-injected`).
pub const LABEL_ELBV2_POD_READINESS_GATE_INJECT: &str = "elbv2.k8s.aws/pod-readiness-gate-inject";
/// The value of [`LABEL_ELBV2_POD_READINESS_GATE_INJECT`] that turns injection on.
pub const LABEL_ELBV2_POD_READINESS_GATE_INJECT_ENABLED: &str = "enabled";

/// Deployment pod-template annotation nodedrain writes to start a surge rollout; the same key
/// `kubectl rollout restart` uses, so operators recognise it.
pub const ANNOTATION_RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

/// The field manager name for server-side apply and patches, visible in `managedFields`.
pub const FIELD_MANAGER: &str = "nodedrain";

/// Kubernetes Event reasons. Read by operators (`kubectl get events`) and alerting.
pub mod reasons {
    /// Node cordoned and tainted because of an interruption or a CLI drain.
    pub const DRAIN_STARTED: &str = "DrainStarted";
    /// All pods that had to leave have left.
    pub const DRAIN_SUCCEEDED: &str = "DrainSucceeded";
    /// The drain ended without emptying the node; the message says what blocked.
    pub const DRAIN_FAILED: &str = "DrainFailed";
    /// A pod was deleted past a PodDisruptionBudget because the node's deadline arrived.
    pub const DEADLINE_OVERRIDE: &str = "DeadlineOverride";
    /// A pod annotation had a value nodedrain cannot use; the default was applied.
    pub const INVALID_ANNOTATION: &str = "InvalidAnnotation";
    /// Eviction is refused by a PodDisruptionBudget; nodedrain keeps retrying.
    pub const EVICTION_BLOCKED: &str = "EvictionBlocked";
    /// A leader carried on a drain that an earlier leader (or run) started: the node's record
    /// already said so, so no second `DrainStarted` is published.
    pub const DRAIN_RESUMED: &str = "DrainResumed";
    /// An eviction the apiserver had approved (the pod is in its PDB's `disruptedPods`) never
    /// deleted the pod; nodedrain deleted it with the same grace so the budget is not held.
    pub const EVICTION_COMPLETED: &str = "EvictionCompleted";
    /// EC2 reported the node's instance gone and nodedrain tainted the node
    /// `node.kubernetes.io/out-of-service`, so its pods and volumes are released.
    pub const OUT_OF_SERVICE: &str = "OutOfService";
    /// The instance still ran when nodedrain stopped waiting for it to go: the node was not
    /// marked out of service.
    pub const OUT_OF_SERVICE_SKIPPED: &str = "OutOfServiceSkipped";
    /// A pod was stopped while a load balancer still routed new connections to it: the deadline
    /// came, or the target group's deregistration delay passed.
    pub const LOAD_BALANCER_WAIT_CUT: &str = "LoadBalancerWaitCut";
}
