//! The Helm chart (`charts/nodedrain`): lint, rendering with defaults and with every option, the
//! values schema's refusals, the README's table of values, the rendered settings against the
//! controller's own validation, and an install into the sandbox (RBAC on) compared with what
//! `helm template` said. tests/chart_rbac.rs proves the chart's permissions.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use support::Sandbox;
use support::chart::{
    chart_dir, container, differences, env, fails, helm, kinds, kubectl, ok, parse_manifests,
    render, scratch_dir, the, try_render, value_args,
};

const QUEUE: &str = "https://sqs.us-east-1.amazonaws.com/123456789012/nodedrain-interruptions";

/// A value for every option the chart has, none of them its default.
const EVERY_OPTION: &str = r#"
queue:
  url: https://sqs.eu-west-1.amazonaws.com/123456789012/nodedrain-events
  receivers: 8
  visibilityTimeout: 2m
  malformedMessages: dead-letter
  dedupeWindow: 0
aws:
  region: eu-west-1
  endpointUrl: https://aws-emulator.internal.example:4566
interruptions:
  rebalance: drain-and-handover
  rebalanceUncordonAfter: 30m
  nodeNotFound: retry
  asgDrainTimeout: 1h30m
  deadlineMargin: 15s
  managedTag: kubernetes.io/cluster/prod=owned
  nodeSelector: "karpenter.sh/capacity-type=spot,team notin (batch)"
  outOfServiceTaint: true
karpenter:
  handoff: false
loadBalancers:
  wait: false
  targetGroups:
    - arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/edge/0123456789abcdef
    - arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/api-tcp/fedcba9876543210
  targetGroupTag: kubernetes.io/cluster/prod=owned
policy:
  rules:
    - namespaces: [kube-system]
      selector: k8s-app=kube-dns
      order: 100
    - namespaces: [batch]
      strategy: wait
      gracePeriod: 60
  existingConfigMap: ""
notifications:
  secretName: nodedrain-webhook
  secretKey: slack-url
  format: json
  template: '{"msg": {{ text|tojson }}, "nodes": {{ nodes|tojson }}}'
  proxy: http://proxy.internal.example:3128
  events: [deadline-override, failed]
  coalesceWindow: 30s
  maxPerMinute: 4
  timeout: 5
kubernetesApi:
  qps: 250.5
  cordonQps: 400
leaderElection:
  enabled: true
  leaseName: nodedrain-prod
  leaseDuration: 30s
  renewDeadline: 20s
  retryPeriod: 4
log:
  format: text
  level: info,nodedrain::interruption=debug
admin:
  port: 9090
  bindAddress: "::"
replicaCount: 3
image:
  repository: registry.example/platform/nodedrain
  tag: 0.2.0-rc.1
  digest: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
  pullPolicy: Always
imagePullSecrets:
  - name: regcred
nameOverride: drainer
fullnameOverride: ""
serviceAccount:
  create: true
  name: drainer-sa
  annotations:
    eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/nodedrain
rbac:
  create: true
priorityClassName: platform-critical
resources:
  requests: {cpu: 100m, memory: 128Mi}
  limits: {cpu: "2", memory: 512Mi}
podSecurityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile: {type: RuntimeDefault}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  privileged: false
  capabilities: {drop: [ALL]}
  seccompProfile: {type: RuntimeDefault}
tolerations:
  - {key: dedicated, operator: Equal, value: system, effect: NoSchedule}
topologySpreadConstraints:
  - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule}
  - maxSkew: 2
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector: {matchLabels: {custom: selector}}
nodeSelector:
  node-role.example/system: "true"
affinity:
  nodeAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms:
        - matchExpressions:
            - {key: karpenter.sh/capacity-type, operator: In, values: [on-demand]}
podAnnotations:
  example.com/owner: platform
podLabels:
  team: platform
terminationGracePeriodSeconds: 45
updateStrategy:
  type: RollingUpdate
  rollingUpdate: {maxSurge: 0, maxUnavailable: 1}
revisionHistoryLimit: 2
livenessProbe: {initialDelaySeconds: 1, periodSeconds: 20, timeoutSeconds: 2, failureThreshold: 5}
readinessProbe: {initialDelaySeconds: 1, periodSeconds: 7, timeoutSeconds: 2, failureThreshold: 2, successThreshold: 1}
podDisruptionBudget:
  enabled: true
  maxUnavailable: 50%
  unhealthyPodEvictionPolicy: IfHealthyBudget
service:
  enabled: true
  port: 9091
  annotations: {prometheus.io/scrape: "true"}
serviceMonitor:
  enabled: true
  interval: 15s
  scrapeTimeout: 5s
  labels: {release: kube-prometheus-stack}
extraEnv:
  - {name: AWS_STS_REGIONAL_ENDPOINTS, value: regional}
commonLabels:
  example.com/cost-center: platform
"#;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

fn every_option_file() -> std::path::PathBuf {
    write(
        &scratch_dir("chart-every-option"),
        "values.yaml",
        EVERY_OPTION,
    )
}

fn values_yaml() -> Value {
    let text = std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml");
    serde_saphyr::from_str(&text).expect("values.yaml parses")
}

/// Every `NODEDRAIN_*` variable the controller reads, from its clap definitions (the settings
/// shared with the CLI, such as the load-balancer ones, live in their module's config.rs).
fn controller_env_vars() -> BTreeSet<String> {
    let source = ["src/config.rs", "src/lb/config.rs"]
        .iter()
        .map(|file| {
            std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file))
                .unwrap_or_else(|e| panic!("{file}: {e}"))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let vars: BTreeSet<String> = source
        .split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|name| name.starts_with("NODEDRAIN_"))
        .map(str::to_string)
        .collect();
    assert!(vars.len() >= 20, "parsed too few variables: {vars:?}");
    vars
}

#[test]
fn helm_lint_passes_strict_with_defaults_and_with_every_option() {
    let chart = chart_dir().display().to_string();
    let every = every_option_file();
    for values in [None, Some(every.as_path())] {
        let mut args = vec!["lint".to_string(), chart.clone(), "--strict".to_string()];
        args.extend(value_args(values, &[("queue.url", QUEUE)]));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ok("helm lint", helm(&args));
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

#[test]
fn defaults_render_a_least_privilege_ha_controller() {
    let objects = render("nodedrain", "nodedrain", None, &[("queue.url", QUEUE)]);
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ]
    );
    // Release "nodedrain": every object is called just that (the IRSA trust policy in
    // docs/install.md names the ServiceAccount nodedrain).
    for object in &objects {
        let name = object["metadata"]["name"].as_str().unwrap();
        assert!(name == "nodedrain" || name == "nodedrain-policy", "{name}");
    }

    let deployment = the(&objects, "Deployment");
    assert_eq!(deployment["metadata"]["namespace"], "nodedrain");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "nodedrain");
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    let c = container(&objects);
    assert_eq!(c["image"], "ghcr.io/nodedrain/nodedrain:0.1.0");
    assert_eq!(c["args"], json!(["controller"]));
    assert_eq!(
        c["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
               "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]},
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "admin"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "admin"})
    );
    assert_eq!(
        c["ports"],
        json!([{"name": "admin", "containerPort": 8080, "protocol": "TCP"}])
    );
    assert_eq!(
        c["resources"],
        json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}})
    );
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .contains(&json!({"key": "nodedrain.io/interruption", "operator": "Exists", "effect": "NoSchedule"})),
        "{}",
        pod["tolerations"]
    );
    let selector = json!({"matchLabels": {"app.kubernetes.io/name": "nodedrain",
        "app.kubernetes.io/instance": "nodedrain", "app.kubernetes.io/component": "controller"}});
    assert_eq!(deployment["spec"]["selector"], selector);
    let spread = pod["topologySpreadConstraints"].as_array().unwrap();
    assert_eq!(spread[0]["topologyKey"], "topology.kubernetes.io/zone");
    assert_eq!(spread[1]["topologyKey"], "kubernetes.io/hostname");
    for constraint in spread {
        assert_eq!(constraint["labelSelector"], selector);
        assert_eq!(constraint["whenUnsatisfiable"], "ScheduleAnyway");
    }
    assert_eq!(
        pod["volumes"],
        json!([{"name": "policy", "configMap": {"name": "nodedrain-policy"}}])
    );

    let env = env(&objects);
    let expected = [
        ("NODEDRAIN_QUEUE_URL", QUEUE),
        ("NODEDRAIN_RECEIVERS", "4"),
        ("NODEDRAIN_VISIBILITY_TIMEOUT", "60s"),
        ("NODEDRAIN_MALFORMED_MESSAGES", "delete"),
        ("NODEDRAIN_DEDUPE_WINDOW", "15m"),
        ("NODEDRAIN_REBALANCE", "cordon-only"),
        ("NODEDRAIN_REBALANCE_UNCORDON_AFTER", "1h"),
        ("NODEDRAIN_NODE_NOT_FOUND", "delete"),
        ("NODEDRAIN_ASG_DRAIN_TIMEOUT", "10m"),
        ("NODEDRAIN_DEADLINE_MARGIN", "10s"),
        ("NODEDRAIN_OUT_OF_SERVICE_TAINT", "false"),
        ("NODEDRAIN_KARPENTER_HANDOFF", "true"),
        // Waiting on load balancers is on; no group configured, so no list and no tag.
        ("NODEDRAIN_LB_WAIT", "true"),
        ("NODEDRAIN_POLICY", "/etc/nodedrain/policy/policy.yaml"),
        ("NODEDRAIN_QPS", "100"),
        ("NODEDRAIN_CORDON_QPS", "250"),
        ("NODEDRAIN_LEADER_ELECT", "true"),
        ("NODEDRAIN_LEASE_NAME", "nodedrain"),
        ("NODEDRAIN_LEASE_NAMESPACE", "nodedrain"),
        ("NODEDRAIN_LEASE_DURATION", "15s"),
        ("NODEDRAIN_LEASE_RENEW_DEADLINE", "10s"),
        ("NODEDRAIN_LEASE_RETRY_PERIOD", "2s"),
        (
            "NODEDRAIN_POD_NAME",
            r#"{"fieldRef":{"fieldPath":"metadata.name"}}"#,
        ),
        ("NODEDRAIN_ADMIN_ADDR", "0.0.0.0:8080"),
        ("NODEDRAIN_LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
    ];
    let expected: BTreeMap<String, String> = expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(env, expected);

    // Exactly the rules the code needs; the NodeClaim rule because karpenter.handoff defaults
    // to true, like the controller's --karpenter-handoff.
    let rules = &the(&objects, "ClusterRole")["rules"];
    assert_eq!(
        *rules,
        json!([
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "delete"]},
            {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
            {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": ["list", "watch"]},
            {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list"]},
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
            {"apiGroups": ["elbv2.k8s.aws"], "resources": ["targetgroupbindings"], "verbs": ["list"]},
            {"apiGroups": ["karpenter.sh"], "resources": ["nodeclaims"], "verbs": ["list", "delete"]},
        ])
    );
    let binding = the(&objects, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], "nodedrain");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "nodedrain", "namespace": "nodedrain"}])
    );
    let role = the(&objects, "Role");
    assert_eq!(role["metadata"]["namespace"], "nodedrain");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
             "resourceNames": ["nodedrain"], "verbs": ["get", "update"]},
        ])
    );
    assert_eq!(
        the(&objects, "RoleBinding")["subjects"],
        binding["subjects"]
    );

    let pdb = the(&objects, "PodDisruptionBudget");
    assert_eq!(
        pdb["spec"],
        json!({"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow", "selector": selector})
    );
    let service = the(&objects, "Service");
    assert_eq!(service["spec"]["selector"], selector["matchLabels"]);
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "metrics", "port": 8080, "targetPort": "admin", "protocol": "TCP"}])
    );
    assert_eq!(
        the(&objects, "ConfigMap")["data"]["policy.yaml"],
        "rules: []\n"
    );
    assert!(
        the(&objects, "ServiceAccount")["metadata"]
            .get("annotations")
            .is_none()
    );
}

#[test]
fn every_option_renders_where_it_belongs() {
    let values = every_option_file();
    let objects = render("prod", "platform", Some(&values), &[]);
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    );
    for object in &objects {
        let labels = &object["metadata"]["labels"];
        assert_eq!(labels["example.com/cost-center"], "platform", "{object}");
        assert_eq!(labels["app.kubernetes.io/name"], "drainer");
        assert_eq!(labels["app.kubernetes.io/version"], "0.2.0-rc.1");
    }
    let deployment = the(&objects, "Deployment");
    assert_eq!(deployment["metadata"]["name"], "prod-drainer");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(deployment["spec"]["revisionHistoryLimit"], 2);
    assert_eq!(
        deployment["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}})
    );
    let template = &deployment["spec"]["template"];
    assert_eq!(template["metadata"]["labels"]["team"], "platform");
    assert_eq!(
        template["metadata"]["annotations"]["example.com/owner"],
        "platform"
    );
    assert!(template["metadata"]["annotations"]["checksum/policy"].is_string());
    let pod = &template["spec"];
    assert_eq!(pod["serviceAccountName"], "drainer-sa");
    assert_eq!(pod["priorityClassName"], "platform-critical");
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "regcred"}]));
    assert_eq!(pod["terminationGracePeriodSeconds"], 45);
    assert_eq!(pod["securityContext"]["fsGroup"], 10001);
    // Helm merges maps with the defaults: the Linux selector stays unless set to null.
    assert_eq!(
        pod["nodeSelector"],
        json!({"kubernetes.io/os": "linux", "node-role.example/system": "true"})
    );
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0]["values"],
        json!(["on-demand"])
    );
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}])
    );
    let spread = pod["topologySpreadConstraints"].as_array().unwrap();
    assert_eq!(spread[0]["whenUnsatisfiable"], "DoNotSchedule");
    assert_eq!(
        spread[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        "prod"
    );
    assert_eq!(
        spread[1]["labelSelector"],
        json!({"matchLabels": {"custom": "selector"}})
    );

    let c = container(&objects);
    assert_eq!(
        c["image"],
        "registry.example/platform/nodedrain@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(
        c["resources"]["limits"],
        json!({"cpu": "2", "memory": "512Mi"})
    );
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    assert_eq!(c["livenessProbe"]["failureThreshold"], 5);
    assert_eq!(c["readinessProbe"]["periodSeconds"], 7);

    let env = env(&objects);
    for (name, value) in [
        (
            "NODEDRAIN_QUEUE_URL",
            "https://sqs.eu-west-1.amazonaws.com/123456789012/nodedrain-events",
        ),
        ("NODEDRAIN_RECEIVERS", "8"),
        ("NODEDRAIN_VISIBILITY_TIMEOUT", "2m"),
        ("NODEDRAIN_MALFORMED_MESSAGES", "dead-letter"),
        ("NODEDRAIN_DEDUPE_WINDOW", "0"),
        ("NODEDRAIN_AWS_REGION", "eu-west-1"),
        (
            "NODEDRAIN_AWS_ENDPOINT_URL",
            "https://aws-emulator.internal.example:4566",
        ),
        ("NODEDRAIN_REBALANCE", "drain-and-handover"),
        ("NODEDRAIN_REBALANCE_UNCORDON_AFTER", "30m"),
        ("NODEDRAIN_NODE_NOT_FOUND", "retry"),
        ("NODEDRAIN_ASG_DRAIN_TIMEOUT", "1h30m"),
        ("NODEDRAIN_DEADLINE_MARGIN", "15s"),
        ("NODEDRAIN_MANAGED_TAG", "kubernetes.io/cluster/prod=owned"),
        (
            "NODEDRAIN_NODE_SELECTOR",
            "karpenter.sh/capacity-type=spot,team notin (batch)",
        ),
        ("NODEDRAIN_OUT_OF_SERVICE_TAINT", "true"),
        ("NODEDRAIN_KARPENTER_HANDOFF", "false"),
        ("NODEDRAIN_LB_WAIT", "false"),
        (
            "NODEDRAIN_LB_TARGET_GROUPS",
            "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/edge/0123456789abcdef,\
             arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/api-tcp/fedcba9876543210",
        ),
        (
            "NODEDRAIN_LB_TARGET_GROUP_TAG",
            "kubernetes.io/cluster/prod=owned",
        ),
        ("NODEDRAIN_QPS", "250.5"),
        ("NODEDRAIN_CORDON_QPS", "400"),
        ("NODEDRAIN_LEASE_NAME", "nodedrain-prod"),
        ("NODEDRAIN_LEASE_NAMESPACE", "platform"),
        ("NODEDRAIN_LEASE_DURATION", "30s"),
        ("NODEDRAIN_LEASE_RENEW_DEADLINE", "20s"),
        ("NODEDRAIN_LEASE_RETRY_PERIOD", "4"),
        ("NODEDRAIN_ADMIN_ADDR", "[::]:9090"),
        ("NODEDRAIN_LOG_FORMAT", "text"),
        ("RUST_LOG", "info,nodedrain::interruption=debug"),
        ("AWS_STS_REGIONAL_ENDPOINTS", "regional"),
        (
            "NODEDRAIN_NOTIFY_URL",
            r#"{"secretKeyRef":{"key":"slack-url","name":"nodedrain-webhook"}}"#,
        ),
        ("NODEDRAIN_NOTIFY_FORMAT", "json"),
        (
            "NODEDRAIN_NOTIFY_TEMPLATE",
            "/etc/nodedrain/notify/template.j2",
        ),
        (
            "NODEDRAIN_NOTIFY_PROXY",
            "http://proxy.internal.example:3128",
        ),
        ("NODEDRAIN_NOTIFY_EVENTS", "deadline-override,failed"),
        ("NODEDRAIN_NOTIFY_COALESCE_WINDOW", "30s"),
        ("NODEDRAIN_NOTIFY_MAX_PER_MINUTE", "4"),
        ("NODEDRAIN_NOTIFY_TIMEOUT", "5"),
    ] {
        assert_eq!(env.get(name).map(String::as_str), Some(value), "{name}");
    }
    // A value for every controller setting: every variable the controller reads is set.
    for var in controller_env_vars() {
        assert!(env.contains_key(&var), "the chart does not set {var}");
    }

    // Handoff off: no NodeClaim rule. The TargetGroupBinding rule does not depend on
    // loadBalancers.wait.
    let rules = the(&objects, "ClusterRole")["rules"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(rules.len(), 8);
    assert!(
        rules
            .iter()
            .any(|r| r["resources"] == json!(["targetgroupbindings"]))
    );
    assert!(
        !rules
            .iter()
            .any(|r| r["apiGroups"] == json!(["karpenter.sh"]))
    );
    assert_eq!(
        the(&objects, "Role")["rules"][1]["resourceNames"],
        json!(["nodedrain-prod"])
    );

    let sa = the(&objects, "ServiceAccount");
    assert_eq!(sa["metadata"]["name"], "drainer-sa");
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/nodedrain"
    );
    let policy: Value = serde_saphyr::from_str(
        config_map(&objects, "prod-drainer-policy")["data"]["policy.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        policy,
        json!({"rules": [
            {"namespaces": ["kube-system"], "selector": "k8s-app=kube-dns", "order": 100},
            {"namespaces": ["batch"], "strategy": "wait", "gracePeriod": 60},
        ]})
    );
    // The notification template, mounted where NODEDRAIN_NOTIFY_TEMPLATE points, and rolled
    // out on change like the policy.
    assert_eq!(
        config_map(&objects, "prod-drainer-notify-template")["data"]["template.j2"],
        r#"{"msg": {{ text|tojson }}, "nodes": {{ nodes|tojson }}}"#
    );
    assert!(template["metadata"]["annotations"]["checksum/notify-template"].is_string());
    assert_eq!(
        pod["volumes"][1],
        json!({"name": "notify-template", "configMap": {"name": "prod-drainer-notify-template"}})
    );
    assert_eq!(
        c["volumeMounts"][1],
        json!({"name": "notify-template", "mountPath": "/etc/nodedrain/notify", "readOnly": true})
    );
    let pdb = the(&objects, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], "50%");
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "IfHealthyBudget");
    let service = the(&objects, "Service");
    assert_eq!(service["spec"]["ports"][0]["port"], 9091);
    assert_eq!(
        service["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    let monitor = the(&objects, "ServiceMonitor");
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    assert_eq!(
        monitor["spec"]["endpoints"],
        json!([{"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}])
    );
    assert_eq!(
        monitor["spec"]["namespaceSelector"],
        json!({"matchNames": ["platform"]})
    );
}

#[test]
fn optional_objects_can_be_turned_off_or_brought_along() {
    let objects = render(
        "nodedrain",
        "nodedrain",
        None,
        &[
            ("queue.url", QUEUE),
            ("rbac.create", "false"),
            ("serviceAccount.create", "false"),
            ("serviceAccount.name", "existing-sa"),
            ("podDisruptionBudget.enabled", "false"),
            ("service.enabled", "false"),
            ("policy.existingConfigMap", "my-policy"),
            ("leaderElection.enabled", "false"),
            ("replicaCount", "1"),
        ],
    );
    assert_eq!(kinds(&objects), ["Deployment"]);
    let pod = &the(&objects, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "existing-sa");
    assert_eq!(pod["volumes"][0]["configMap"]["name"], "my-policy");
    assert_eq!(env(&objects)["NODEDRAIN_LEADER_ELECT"], "false");
}

/// Runs the real binary with exactly the environment the chart gives the container (the policy
/// ConfigMap written to a file) and a kubeconfig that does not exist: it must get past the
/// validation of every setting and the policy, and stop only where it needs the cluster.
fn controller_accepts(objects: &[Value], dir: &Path) {
    let config_maps: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap")
        .collect();
    let policy = write(
        dir,
        "policy.yaml",
        config_maps
            .iter()
            .find_map(|c| c["data"]["policy.yaml"].as_str())
            .unwrap(),
    );
    let template = config_maps
        .iter()
        .find_map(|c| c["data"]["template.j2"].as_str())
        .map(|t| write(dir, "template.j2", t));
    let mut command = Command::new(env!("CARGO_BIN_EXE_nodedrain"));
    command.env_clear().args(
        container(objects)["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap()),
    );
    for (name, value) in env(objects) {
        let value = match name.as_str() {
            "NODEDRAIN_POD_NAME" => "nodedrain-7d9c8b6f5-x2x4k".to_string(),
            "NODEDRAIN_POLICY" => policy.display().to_string(),
            // The Secret's value, as the kubelet would put it there.
            "NODEDRAIN_NOTIFY_URL" => "https://hooks.slack.com/services/T0/B0/x".to_string(),
            "NODEDRAIN_NOTIFY_TEMPLATE" => template
                .as_ref()
                .expect("the template's ConfigMap")
                .display()
                .to_string(),
            _ => value,
        };
        command.env(name, value);
    }
    command.env("KUBECONFIG", dir.join("no-such-kubeconfig"));
    let output = command.output().expect("run nodedrain");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "expected a runtime failure (no cluster), not a configuration error:\n{stderr}"
    );
    assert!(stderr.contains("no-such-kubeconfig"), "{stderr}");
}

#[test]
fn the_controller_accepts_the_settings_the_chart_renders() {
    let dir = scratch_dir("chart-env");
    controller_accepts(
        &render("nodedrain", "nodedrain", None, &[("queue.url", QUEUE)]),
        &dir,
    );
    let every = every_option_file();
    controller_accepts(&render("prod", "platform", Some(&every), &[]), &dir);
}

/// `--set` pairs, and the texts helm's refusal must contain.
type Refusal = (Vec<(&'static str, &'static str)>, Vec<&'static str>);

#[test]
fn the_schema_rejects_bad_values_with_readable_messages() {
    let cases: Vec<Refusal> = vec![
        // Missing queue URL.
        (
            vec![],
            vec![
                "at '/queue/url'",
                "the URL of the SQS queue, https://sqs.<region>.amazonaws.com/<12-digit account id>/<queue name>",
            ],
        ),
        // The ARN instead of the URL.
        (
            vec![("queue.url", "arn:aws:sqs:us-east-1:123456789012:nodedrain")],
            vec![
                "'arn:aws:sqs:us-east-1:123456789012:nodedrain'",
                "not to the ARN or the name of the queue",
            ],
        ),
        (
            vec![("aws.region", "US-East-1")],
            vec!["at '/aws/region'", "an AWS region name such as us-east-1"],
        ),
        // A target group's name where its ARN belongs.
        (
            vec![("loadBalancers.targetGroups", "{edge}")],
            vec![
                "at '/loadBalancers/targetGroups/0'",
                "a target group ARN, arn:aws:elasticloadbalancing:<region>:<12-digit account id>:targetgroup/<name>/<id>, not its name",
            ],
        ),
        (
            vec![("loadBalancers.targetGroupTag", "=owned")],
            vec![
                "at '/loadBalancers/targetGroupTag'",
                "an AWS tag as key or key=value",
            ],
        ),
        (
            vec![("loadBalancers.wait", "sometimes")],
            vec!["at '/loadBalancers/wait'"],
        ),
        (
            vec![("notifications.format", "teams")],
            vec!["at '/notifications/format': value must be one of 'slack', 'json'"],
        ),
        (
            vec![("notifications.maxPerMinute", "0")],
            vec!["at '/notifications/maxPerMinute'"],
        ),
        (
            vec![("interruptions.rebalance", "always")],
            vec![
                "at '/interruptions/rebalance': value must be one of 'cordon-only', 'drain', 'drain-and-handover'",
            ],
        ),
        // A negative duration, and one that is zero where zero cannot work.
        (
            vec![("interruptions.deadlineMargin", "-10s")],
            vec![
                "at '/interruptions/deadlineMargin'",
                "a duration such as 250ms, 90s, 5m or 1h30m",
            ],
        ),
        (
            vec![("leaderElection.retryPeriod", "0s")],
            vec!["at '/leaderElection/retryPeriod'", "a duration above zero"],
        ),
        (
            vec![("queue.visibilityTimeout", "1 minute")],
            vec!["at '/queue/visibilityTimeout'", "a duration above zero"],
        ),
        (
            vec![("replicaCount", "0")],
            vec!["at '/replicaCount'", "at least 1"],
        ),
        (
            vec![("leaderElection.enabled", "false")],
            vec![
                "at '/replicaCount'",
                "1 when leaderElection.enabled is false: replicas without an elected leader would all drain the same nodes",
            ],
        ),
        (
            vec![("log.format", "yaml")],
            vec!["at '/log/format': value must be one of 'json', 'text', 'auto'"],
        ),
        (
            vec![("image.tag", "v1 beta")],
            vec!["at '/image/tag'", "an image tag (up to 128 letters, digits"],
        ),
        (
            vec![("image.pullPolicy", "always")],
            vec!["at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"],
        ),
        (
            vec![("queue.receivers", "100")],
            vec!["at '/queue/receivers'", "from 1 to 64"],
        ),
        (
            vec![("kubernetesApi.qps", "0")],
            vec!["at '/kubernetesApi/qps'", "above 0"],
        ),
        (
            vec![("policy.rules[0].strategy", "evicted")],
            vec![
                "at '/policy/rules/0/strategy': value must be one of 'evict', 'surge', 'wait', 'delete', 'skip'",
            ],
        ),
        (
            vec![
                ("serviceMonitor.enabled", "true"),
                ("service.enabled", "false"),
            ],
            vec![
                "at '/service/enabled'",
                "the ServiceMonitor scrapes the Service",
            ],
        ),
        // A typo is an error, not a silently ignored value.
        (
            vec![("queue.URL", QUEUE)],
            vec!["at '/queue': additional properties 'URL' not allowed"],
        ),
    ];
    for (set, needles) in cases {
        // Every case but the first has a good queue URL unless it sets its own.
        let mut all = set.clone();
        let first = needles[0].contains("at '/queue/url'") && set.is_empty();
        if !first && !set.iter().any(|(k, _)| *k == "queue.url") {
            all.push(("queue.url", QUEUE));
        }
        let error = try_render("nodedrain", "nodedrain", None, &all)
            .expect_err(&format!("{set:?} must be rejected"));
        assert!(
            error.contains("values don't meet the specifications of the schema"),
            "{set:?}: {error}"
        );
        for needle in needles {
            assert!(
                error.contains(needle),
                "{set:?}: {needle:?} not in\n{error}"
            );
        }
    }
}

/// Leaf values of values.yaml, by dotted path. Lists and empty maps are leaves.
/// The ConfigMap called `name`.
fn config_map<'a>(objects: &'a [Value], name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no ConfigMap {name}: {:?}", kinds(objects)))
}

fn leaves(value: &Value, path: &str, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                leaves(v, &p, out);
            }
        }
        other => {
            out.insert(path.to_string(), other.clone());
        }
    }
}

fn at<'a>(value: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(value, |v, k| v.get(k))
}

#[test]
fn the_readme_documents_every_value_with_its_default() {
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).expect("README.md");
    let values = values_yaml();
    let mut rows: BTreeMap<String, Value> = BTreeMap::new();
    let tables = readme
        .split("## Values")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a ## Values section");
    for line in tables.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        assert!(cells.len() >= 3, "malformed row: {line}");
        let key = cells[0].trim_matches('`').to_string();
        let default_text = cells[1]
            .strip_prefix('`')
            .and_then(|c| c.strip_suffix('`'))
            .unwrap_or_else(|| panic!("{key}: the default must be in backticks: {line}"));
        let default: Value = serde_saphyr::from_str(default_text)
            .unwrap_or_else(|e| panic!("{key}: default {default_text:?} is not YAML: {e}"));
        assert!(!cells[2].is_empty(), "{key}: no meaning given");
        assert!(
            rows.insert(key.clone(), default).is_none(),
            "{key} is listed twice"
        );
    }
    // Every row is a value, with the default values.yaml has.
    for (key, default) in &rows {
        let actual = at(&values, key)
            .unwrap_or_else(|| panic!("README lists {key}, which values.yaml does not have"));
        assert_eq!(actual, default, "README's default for {key}");
    }
    // Every value is documented, itself or by a row for the map that holds it.
    let mut all = BTreeMap::new();
    leaves(&values, "", &mut all);
    for key in all.keys() {
        let documented = rows
            .keys()
            .any(|row| key == row || key.starts_with(&format!("{row}.")));
        assert!(
            documented,
            "values.yaml has {key}, which README.md does not document"
        );
    }
}

#[tokio::test]
async fn install_creates_exactly_what_the_template_renders() {
    let sandbox = Sandbox::connect().await;
    let scope = sandbox.scope("chart-install").await;
    let namespace = scope.id.clone();
    let release = format!("ndi-{}", namespace.trim_start_matches("chart-install-"));
    let dir = scratch_dir("chart-install");
    // Pods are created but never scheduled: there is no image registry, and nodes of other
    // tests must not get them.
    let values = write(
        &dir,
        "values.yaml",
        &format!(
            "queue:\n  url: {QUEUE}\nnodeSelector:\n  sandbox.nodedrain.io/nowhere: \"true\"\n\
             serviceAccount:\n  annotations:\n    eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/nodedrain\n\
             policy:\n  rules:\n    - namespaces: [kube-system]\n      strategy: wait\n"
        ),
    );
    let rendered = render(&release, &namespace, Some(&values), &[]);
    let chart = chart_dir().display().to_string();
    let values_arg = values.display().to_string();
    let install = [
        "install",
        release.as_str(),
        chart.as_str(),
        "--namespace",
        namespace.as_str(),
        "--values",
        values_arg.as_str(),
        "--wait=false",
    ];
    let notes = ok("helm install", helm(&install));
    assert!(notes.contains("STATUS: deployed"), "{notes}");
    assert!(
        notes.contains(&format!("get lease {release}-nodedrain")),
        "NOTES name the Lease: {notes}"
    );

    let result = async {
        // What helm recorded is what it rendered.
        let manifest = ok(
            "helm get manifest",
            helm(&["get", "manifest", &release, "--namespace", &namespace]),
        );
        let recorded = parse_manifests(&manifest);
        assert_eq!(recorded, rendered);

        // And what the apiserver holds contains every rendered field.
        let file = write(&dir, "rendered.yaml", &manifest);
        let live: Value = serde_json::from_str(&ok(
            "kubectl get -f",
            kubectl(&["get", "-f", &file.display().to_string(), "-o", "json"]),
        ))
        .expect("kubectl json");
        let live = live["items"].as_array().expect("items").clone();
        assert_eq!(live.len(), rendered.len());
        let mut problems = Vec::new();
        for (expected, actual) in rendered.iter().zip(&live) {
            let what = format!("{}/{}", expected["kind"], expected["metadata"]["name"]);
            for key in ["metadata", "spec", "data", "rules", "roleRef", "subjects"] {
                if let Some(e) = expected.get(key) {
                    differences(e, &actual[key], &format!("{what} .{key}"), &mut problems);
                }
            }
        }
        assert!(
            problems.is_empty(),
            "live objects differ:\n{}",
            problems.join("\n")
        );

        // The ReplicaSet could create the pods: admission accepted the pod spec (priority
        // class, security context) in this namespace.
        let pods: Api<Pod> = Api::namespaced(scope.client.clone(), &namespace);
        let selector = format!("app.kubernetes.io/instance={release}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .expect("list pods");
            if list.items.len() == 2 {
                for pod in &list.items {
                    let spec = pod.spec.as_ref().unwrap();
                    assert_eq!(
                        spec.priority_class_name.as_deref(),
                        Some("system-cluster-critical")
                    );
                    assert_eq!(spec.priority, Some(2_000_000_000));
                    assert_eq!(
                        spec.service_account_name.as_deref(),
                        Some(format!("{release}-nodedrain").as_str())
                    );
                }
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the Deployment's pods were not created: {:?}",
                kubectl(&["-n", &namespace, "get", "events", "-o", "wide"])
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    // Clean up whatever happened.
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(result)).await;
    let _ = helm(&["uninstall", &release, "--namespace", &namespace, "--wait"]);
    scope.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn helm_refuses_to_install_without_a_queue_url() {
    let chart = chart_dir().display().to_string();
    let error = fails(
        "helm install --dry-run",
        helm(&["install", "nodedrain", &chart, "--dry-run=client"]),
    );
    assert!(error.contains("at '/queue/url'"), "{error}");
}

/// The benchmark runs the controller under these limits (support::cgroup): they must be read
/// the way the kubelet reads them, from the values a default install uses.
#[test]
fn the_charts_limits_read_as_the_kubelet_reads_them() {
    use support::cgroup::{ChartLimits, cpu_cores, memory_bytes};
    assert_eq!(memory_bytes("256Mi").unwrap(), 256 << 20);
    assert_eq!(memory_bytes("1G").unwrap(), 1_000_000_000);
    assert_eq!(memory_bytes("134217728").unwrap(), 134_217_728);
    assert!(memory_bytes("lots").is_err());
    assert_eq!(cpu_cores("500m").unwrap(), 0.5);
    assert_eq!(cpu_cores("1").unwrap(), 1.0);
    let limits =
        ChartLimits::from_yaml("resources:\n  limits:\n    cpu: 250m\n    memory: 128Mi\n")
            .unwrap();
    assert_eq!(limits.memory_bytes, 128 << 20);
    assert_eq!(limits.cpu_cores, 0.25);
    assert!(ChartLimits::from_yaml("resources: {}\n").is_err());
    // A default install has limits, or the benchmark would prove nothing.
    let shipped = ChartLimits::from_values().unwrap();
    assert!(shipped.memory_bytes > 0 && shipped.cpu_cores > 0.0);
}

/// A program started through the cgroup's command runs inside it, with its own arguments: the
/// benchmarks' controller is started this way, and a wrong shift once exec'd its first argument.
#[test]
fn a_program_in_the_charts_cgroup_gets_its_arguments_and_the_cgroup() {
    use support::cgroup::{Cgroup, ChartLimits};
    let name = format!("nodedrain-chart-test-{}", std::process::id());
    let cgroup = Cgroup::create(&name, ChartLimits::from_values().unwrap()).unwrap();
    let out = cgroup
        .command("/bin/sh")
        .args([
            "-c",
            "echo \"$0 $1\"; cat /proc/self/cgroup",
            "first",
            "second",
        ])
        .output()
        .expect("run sh in the cgroup");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().next(), Some("first second"), "{text}");
    let memory = text
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == "memory"))
        })
        .unwrap_or_default();
    assert!(memory.ends_with(&format!("/{name}")), "{text}");
}
