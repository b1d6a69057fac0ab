#!/usr/bin/env python3
"""Fixtures for the sandbox: AWS resources in moto, KWOK nodes backed by moto instances, and a
realistic mix of workloads.

Runs with the moto virtualenv's python (boto3 comes with moto) and the sandbox's environment
(sandbox/sandbox fixtures ...). Kubernetes objects are applied with the sandbox's kubectl.

  aws-setup --queue NAME            SQS queue (+ dead-letter queue), VPC and subnets in 3 AZs
  nodes --count N [--prefix P]      N instances in moto (spot and on-demand, some in an Auto
                                    Scaling group, some Karpenter-managed) and one KWOK node each
  workloads [--namespace NS]        the standard workload mix (see WORKLOADS below)
  load-balancers [--namespace NS]   an NLB with instance targets on a host port (edge-proxy), an
                                    ALB target group in IP mode for `web` behind a
                                    TargetGroupBinding, and the TargetGroupBinding CRD
"""

import argparse
import json
import os
import subprocess
import sys

import boto3
from botocore.exceptions import ClientError

REGION = os.environ.get("AWS_REGION", "us-east-1")
ZONES = [f"{REGION}a", f"{REGION}b", f"{REGION}c"]
CLUSTER = "nodedrain"
ASG_NAME = "nodedrain-workers"
FIXTURE_LABEL = "sandbox.nodedrain.io/fixture"


def aws(service):
    # The endpoint comes from AWS_ENDPOINT_URL, exactly as for the Rust SDK: no test-only path.
    return boto3.client(service, region_name=REGION)


def kubectl(*args, stdin=None):
    binary = os.path.join(os.environ["NODEDRAIN_SANDBOX_BIN"], "kubectl")
    result = subprocess.run(
        [binary, *args], input=stdin, text=True, capture_output=True, check=False
    )
    if result.returncode != 0:
        sys.exit(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def apply(objects):
    # Server-side apply in chunks: thousands of nodes in one request body would be slow to diff.
    for start in range(0, len(objects), 500):
        chunk = {"apiVersion": "v1", "kind": "List", "items": objects[start : start + 500]}
        kubectl("apply", "--server-side", "--field-manager=sandbox-fixtures", "-f", "-",
                stdin=json.dumps(chunk))


def subnets_by_zone(ec2):
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:Name", "Values": [CLUSTER]}])["Vpcs"]
    if vpcs:
        vpc_id = vpcs[0]["VpcId"]
    else:
        vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        ec2.create_tags(Resources=[vpc_id], Tags=[{"Key": "Name", "Value": CLUSTER}])
    existing = {
        s["AvailabilityZone"]: s["SubnetId"]
        for s in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
    }
    for index, zone in enumerate(ZONES):
        if zone not in existing:
            subnet = ec2.create_subnet(
                VpcId=vpc_id, CidrBlock=f"10.0.{index * 64}.0/18", AvailabilityZone=zone
            )["Subnet"]
            existing[zone] = subnet["SubnetId"]
    return existing


def cmd_aws_setup(args):
    sqs = aws("sqs")
    dlq_url = sqs.create_queue(QueueName=f"{args.queue}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sqs.create_queue(
        QueueName=args.queue,
        Attributes={
            "VisibilityTimeout": "30",
            "MessageRetentionPeriod": "300",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
        },
    )
    ec2 = aws("ec2")
    subnets_by_zone(ec2)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    templates = ec2.describe_launch_templates()["LaunchTemplates"]
    if not any(t["LaunchTemplateName"] == ASG_NAME for t in templates):
        ec2.create_launch_template(
            LaunchTemplateName=ASG_NAME,
            LaunchTemplateData={"ImageId": image, "InstanceType": "m5.large"},
        )


def tags(kind, index, prefix):
    return [
        {"Key": "Name", "Value": f"{prefix}-{index}"},
        {"Key": f"kubernetes.io/cluster/{CLUSTER}", "Value": "owned"},
        {"Key": "sandbox.nodedrain.io/kind", "Value": kind},
    ]


def launch(ec2, subnets, image, count, prefix, start):
    """Launches count instances round-robin over the zones; every third one on demand."""
    launched = []
    for offset in range(count):
        index = start + offset
        zone = ZONES[index % len(ZONES)]
        on_demand = index % 3 == 2
        kind = "on-demand" if on_demand else "spot"
        request = dict(
            ImageId=image,
            MinCount=1,
            MaxCount=1,
            InstanceType="m5.xlarge" if on_demand else "m5.large",
            SubnetId=subnets[zone],
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags(kind, index, prefix)}],
        )
        if not on_demand:
            request["InstanceMarketOptions"] = {"MarketType": "spot"}
        launched += ec2.run_instances(**request)["Instances"]
    return launched


def node_object(instance, capacity_type, karpenter, in_asg, prefix):
    zone = instance["Placement"]["AvailabilityZone"]
    name = instance["PrivateDnsName"]
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "topology.kubernetes.io/zone": zone,
        "topology.kubernetes.io/region": REGION,
        "node.kubernetes.io/instance-type": instance["InstanceType"],
        "karpenter.sh/capacity-type": capacity_type,
        "type": "kwok",
        FIXTURE_LABEL: prefix,
    }
    if karpenter:
        labels["karpenter.sh/nodepool"] = "default"
    if in_asg:
        labels["sandbox.nodedrain.io/asg"] = ASG_NAME
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            # KWOK's controller manages the nodes that carry this annotation.
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"providerID": f"aws:///{zone}/{instance['InstanceId']}"},
        "status": {
            "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
            "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"},
        },
    }


def cmd_nodes(args):
    # Idempotent: a second `sandbox up` tops the fixture up to --count instead of adding more.
    existing = json.loads(kubectl("get", "nodes", "-l", f"{FIXTURE_LABEL}={args.prefix}",
                                  "-o", "json"))["items"]
    if len(existing) >= args.count:
        print(f"{len(existing)} fixture nodes already present")
        return
    args.count -= len(existing)
    ec2 = aws("ec2")
    autoscaling = aws("autoscaling")
    subnets = subnets_by_zone(ec2)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    nodes = []
    # About a sixth of the nodes come from an Auto Scaling group with a terminate lifecycle hook.
    asg_count = args.count // 6 if args.asg and not existing else 0
    if asg_count:
        existing = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[ASG_NAME])
        if not existing["AutoScalingGroups"]:
            autoscaling.create_auto_scaling_group(
                AutoScalingGroupName=ASG_NAME,
                LaunchTemplate={"LaunchTemplateName": ASG_NAME, "Version": "$Latest"},
                MinSize=0,
                MaxSize=max(asg_count, 1) * 4,
                DesiredCapacity=asg_count,
                VPCZoneIdentifier=",".join(subnets.values()),
                Tags=[{"Key": f"kubernetes.io/cluster/{CLUSTER}", "Value": "owned",
                       "PropagateAtLaunch": True}],
            )
            autoscaling.put_lifecycle_hook(
                LifecycleHookName="nodedrain-drain",
                AutoScalingGroupName=ASG_NAME,
                LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                HeartbeatTimeout=300,
                DefaultResult="CONTINUE",
            )
        group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[ASG_NAME])
        ids = [i["InstanceId"] for i in group["AutoScalingGroups"][0]["Instances"]]
        for reservation in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
            for instance in reservation["Instances"]:
                nodes.append(node_object(instance, "on-demand", False, True, args.prefix))
    for index, instance in enumerate(
        launch(ec2, subnets, image, args.count - len(nodes), args.prefix, len(nodes))
    ):
        spot = instance.get("InstanceLifecycle") == "spot"
        nodes.append(
            node_object(instance, "spot" if spot else "on-demand", spot and index % 2 == 0,
                        False, args.prefix)
        )
    apply(nodes)
    if args.wait:
        kubectl("wait", "--for=condition=Ready", "node", "-l", f"{FIXTURE_LABEL}={args.prefix}",
                "--timeout=120s")
    print(f"{len(nodes)} nodes ready ({asg_count} in Auto Scaling group {ASG_NAME})")


# The standard mix: every kind of workload a drain has to deal with. Replica counts follow the
# number of nodes so that replicated workloads spread over several nodes.
def workload_objects(namespace, nodes):
    spread = [{
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": None,
    }]

    def template(app, extra_annotations=None, grace=30, volumes=None, priority_class=None,
                 restart="Always", prestop=True):
        container = {
            "name": app,
            "image": f"registry.example/{app}:1.0",
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080},
                               "periodSeconds": 5, "failureThreshold": 3},
        }
        if prestop:
            container["lifecycle"] = {"preStop": {"sleep": {"seconds": 20}}}
        if volumes:
            container["volumeMounts"] = [{"name": v["name"], "mountPath": f"/{v['name']}"}
                                         for v in volumes]
        spec = {
            "containers": [container],
            "terminationGracePeriodSeconds": grace,
            "restartPolicy": restart,
        }
        constraints = json.loads(json.dumps(spread))
        constraints[0]["labelSelector"] = {"matchLabels": {"app": app}}
        spec["topologySpreadConstraints"] = constraints
        if volumes:
            spec["volumes"] = volumes
        if priority_class:
            spec["priorityClassName"] = priority_class
        return {
            "metadata": {"labels": {"app": app}, "annotations": extra_annotations or {}},
            "spec": spec,
        }

    def deployment(app, replicas, ns=namespace, **kwargs):
        return {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": app, "namespace": ns, "labels": {"app": app}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": app}},
                     "template": template(app, **kwargs)},
        }

    def pdb(name, app, ns=namespace, **budget):
        return {
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": app}}, **budget},
        }

    def service(app):
        return {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": app, "namespace": namespace},
            "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]},
        }

    replicas = max(3, nodes)
    bare = template("debug-shell", prestop=False)
    job_template = template("nightly-report", {"sandbox.nodedrain.io/complete-after": "90s"},
                            restart="Never", prestop=False)
    job_template["spec"].pop("topologySpreadConstraints")
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        # Replicated, PDB-covered, behind a Service: the well-behaved case.
        deployment("web", replicas),
        pdb("web", "web", maxUnavailable=1),
        service("web"),
        deployment("api", replicas),
        pdb("api", "api", minAvailable="50%"),
        service("api"),
        # One replica guarded by minAvailable: 1: eviction is refused forever; surge hands it over.
        deployment("checkout", 1, extra_annotations={"nodedrain.io/strategy": "surge"}),
        pdb("checkout", "checkout", minAvailable=1),
        service("checkout"),
        # The same shape without the annotation: what `nodedrain audit` is for.
        deployment("ledger", 1, prestop=False),
        pdb("ledger", "ledger", minAvailable=1),
        # A StatefulSet: replicas keep their identity, so they are evicted one at a time.
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "cache", "namespace": namespace},
         "spec": {"clusterIP": "None", "selector": {"app": "cache"},
                  "ports": [{"port": 6379}]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet",
         "metadata": {"name": "cache", "namespace": namespace},
         "spec": {"serviceName": "cache", "replicas": 2,
                  "selector": {"matchLabels": {"app": "cache"}},
                  "template": template("cache", grace=60)}},
        pdb("cache", "cache", maxUnavailable=1),
        # A node agent on every node; drains leave it alone by default.
        {"apiVersion": "apps/v1", "kind": "DaemonSet",
         "metadata": {"name": "node-agent", "namespace": namespace},
         "spec": {"selector": {"matchLabels": {"app": "node-agent"}},
                  "template": template("node-agent", prestop=False)}},
        # A batch Job that finishes after 90 s: `wait` lets it finish instead of restarting it.
        {"apiVersion": "batch/v1", "kind": "Job",
         "metadata": {"name": "nightly-report", "namespace": namespace},
         "spec": {"backoffLimit": 0, "template": job_template}},
        # A pod no controller will recreate.
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "debug-shell", "namespace": namespace,
                      "labels": {"app": "debug-shell"}},
         "spec": bare["spec"]},
        # Local scratch data lost on eviction.
        deployment("thumbnailer", 2, volumes=[{"name": "scratch", "emptyDir": {}}],
                   prestop=False),
        # A long grace period: longer than a spot warning allows.
        deployment("video-encoder", 2, grace=600, prestop=False),
        pdb("video-encoder", "video-encoder", maxUnavailable=0),
        # A critical infrastructure pod the applications depend on: drained last.
        deployment("dns-cache", 2, ns="kube-system", priority_class="system-cluster-critical",
                   prestop=False),
        pdb("dns-cache", "dns-cache", ns="kube-system", maxUnavailable=1),
    ]


def cmd_workloads(args):
    nodes = len(json.loads(kubectl("get", "nodes", "-o", "json"))["items"])
    objects = workload_objects(args.namespace, nodes)
    apply(objects[:1])
    apply(objects[1:])
    if args.wait:
        kubectl("wait", "--for=condition=Available", "deployment", "--all",
                "-n", args.namespace, "--timeout=120s")
        kubectl("wait", "--for=condition=Ready", "pod", "-l", "app=cache",
                "-n", args.namespace, "--timeout=120s")
    print(f"workload mix applied in namespace {args.namespace}")


# Load balancers (issue 16): the two ways traffic reaches pods through ELBv2 that a drain has to
# wait for. sandbox/moto/elbv2_health.py makes their targets' health behave as on AWS.
#
# - edge: an NLB managed outside Kubernetes (as with Terraform) whose target group holds the
#   instances of the nodes that run the edge-proxy reverse proxy on host port 30080. Draining such
#   a node must wait for its instance target, since the proxy pod is the backend.
# - web: an ALB target group in IP mode holding the `web` pods' IPs, bound to the `web` Service by
#   a TargetGroupBinding, as the AWS Load Balancer Controller does. The sandbox runs no controller:
#   the fixture registers the pods it finds, and nothing follows them when they move.
EDGE_PORT = 30080
EDGE_NAME = "nodedrain-edge"
WEB_NAME = "nodedrain-web"
CRD_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crds",
                        "targetgroupbindings.yaml")
# Health checks pass after interval x healthy threshold = 30 s (elbv2_health.py), so the targets
# are healthy soon after `sandbox up`; AWS's defaults (30 s x 5) would take 150 s.
HEALTH_CHECK = {"HealthCheckIntervalSeconds": 10, "HealthCheckTimeoutSeconds": 5,
                "HealthyThresholdCount": 3}
# The NLB drains in 30 s, within a spot warning; the ALB group keeps AWS's default of 300 s, longer
# than a spot warning leaves, which is what `nodedrain plan` and `audit` must point out.
EDGE_DEREGISTRATION_DELAY = "30"


def edge_proxy_objects(namespace, prefix, replicas):
    """A reverse proxy on a host port, one per node (the port allows no second one), only on the
    fixture's nodes (tests' and benchmarks' nodes carry their own taints and labels)."""
    app = "edge-proxy"
    container = {
        "name": app,
        "image": f"registry.example/{app}:1.0",
        "ports": [{"containerPort": 8080, "hostPort": EDGE_PORT}],
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 5},
        # The usual workaround this project replaces: sleep while the NLB stops sending.
        "lifecycle": {"preStop": {"sleep": {"seconds": 20}}},
    }
    return [{
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": app, "namespace": namespace, "labels": {"app": app}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {"labels": {"app": app}},
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 30,
                         "nodeSelector": {FIXTURE_LABEL: prefix}},
            },
        },
    }]


def target_group_binding(namespace, service, port, arn):
    return {
        "apiVersion": "elbv2.k8s.aws/v1beta1", "kind": "TargetGroupBinding",
        "metadata": {"name": service, "namespace": namespace,
                     "labels": {FIXTURE_LABEL: "load-balancers"}},
        "spec": {"serviceRef": {"name": service, "port": port}, "targetGroupARN": arn,
                 "targetType": "ip", "targetGroupProtocol": "HTTP"},
    }


def _not_found(error):
    return error.response["Error"]["Code"] in (
        "LoadBalancerNotFound", "TargetGroupNotFound", "LoadBalancerNotFoundException",
        "TargetGroupNotFoundException")


def ensure_target_group(elb, name, vpc_id, **kwargs):
    try:
        return elb.describe_target_groups(Names=[name])["TargetGroups"][0]["TargetGroupArn"]
    except ClientError as error:
        if not _not_found(error):
            raise
    return elb.create_target_group(
        Name=name, VpcId=vpc_id, **HEALTH_CHECK, **kwargs,
        Tags=[{"Key": f"kubernetes.io/cluster/{CLUSTER}", "Value": "owned"},
              {"Key": FIXTURE_LABEL, "Value": name}],
    )["TargetGroups"][0]["TargetGroupArn"]


def ensure_load_balancer(elb, name, kind, subnets, protocol, port, target_group_arn):
    """A load balancer whose listener forwards to the group: only then does the group receive
    traffic, and its targets leave `unused` for `initial`."""
    try:
        arn = elb.describe_load_balancers(Names=[name])["LoadBalancers"][0]["LoadBalancerArn"]
    except ClientError as error:
        if not _not_found(error):
            raise
        arn = elb.create_load_balancer(
            Name=name, Type=kind, Scheme="internal", Subnets=subnets,
            Tags=[{"Key": f"kubernetes.io/cluster/{CLUSTER}", "Value": "owned"}],
        )["LoadBalancers"][0]["LoadBalancerArn"]
    if not elb.describe_listeners(LoadBalancerArn=arn)["Listeners"]:
        elb.create_listener(LoadBalancerArn=arn, Protocol=protocol, Port=port,
                            DefaultActions=[{"Type": "forward",
                                             "TargetGroupArn": target_group_arn}])
    return arn


def sync_targets(elb, target_group_arn, wanted):
    """Makes the group's targets the (id, port) pairs in wanted: new ones are registered, ones no
    longer wanted deregistered (they drain), as the controller does for a TargetGroupBinding."""
    current = {
        (d["Target"]["Id"], d["Target"]["Port"])
        for d in elb.describe_target_health(TargetGroupArn=target_group_arn)[
            "TargetHealthDescriptions"]
        if d["TargetHealth"]["State"] != "draining"
    }
    wanted = set(wanted)
    if wanted - current:
        elb.register_targets(TargetGroupArn=target_group_arn,
                             Targets=[{"Id": i, "Port": p} for i, p in sorted(wanted - current)])
    if current - wanted:
        elb.deregister_targets(TargetGroupArn=target_group_arn,
                               Targets=[{"Id": i, "Port": p} for i, p in sorted(current - wanted)])


def setup_load_balancers(ec2, elb, edge_instances, web_ips):
    """The AWS side: both load balancers, their groups and targets. Idempotent; returns the
    groups' ARNs."""
    subnets = subnets_by_zone(ec2)
    vpc_id = ec2.describe_subnets(SubnetIds=list(subnets.values()))["Subnets"][0]["VpcId"]
    edge = ensure_target_group(
        elb, EDGE_NAME, vpc_id, Protocol="TCP", Port=EDGE_PORT, TargetType="instance",
        HealthCheckProtocol="TCP")
    elb.modify_target_group_attributes(
        TargetGroupArn=edge,
        Attributes=[{"Key": "deregistration_delay.timeout_seconds",
                     "Value": EDGE_DEREGISTRATION_DELAY}])
    ensure_load_balancer(elb, EDGE_NAME, "network", list(subnets.values()), "TCP", 80, edge)
    sync_targets(elb, edge, [(i, EDGE_PORT) for i in edge_instances])
    web = ensure_target_group(
        elb, WEB_NAME, vpc_id, Protocol="HTTP", Port=8080, TargetType="ip",
        HealthCheckProtocol="HTTP", HealthCheckPath="/ready")
    ensure_load_balancer(elb, WEB_NAME, "application", list(subnets.values()), "HTTP", 80, web)
    sync_targets(elb, web, [(ip, 8080) for ip in web_ips])
    return {"edge": edge, "web": web}


def serving_pods(namespace, app):
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", f"app={app}",
                              "-o", "json"))["items"]
    return [p for p in pods
            if not p["metadata"].get("deletionTimestamp") and p["status"].get("podIP")
            and p["spec"].get("nodeName")]


def cmd_load_balancers(args):
    # One proxy per node at most (the host port), so never more replicas than fixture nodes.
    nodes = json.loads(kubectl("get", "nodes", "-l", f"{FIXTURE_LABEL}={args.prefix}",
                               "-o", "json"))["items"]
    objects = edge_proxy_objects(args.namespace, args.prefix,
                                 max(1, min(args.edge_replicas, len(nodes))))
    kubectl("apply", "--server-side", "--field-manager=sandbox-fixtures", "-f", CRD_FILE)
    apply(objects)
    kubectl("wait", "--for=condition=Established",
            "crd/targetgroupbindings.elbv2.k8s.aws", "--timeout=60s")
    kubectl("wait", "--for=condition=Available", "deployment/edge-proxy",
            "-n", args.namespace, "--timeout=120s")
    # Instance targets: the nodes that run the proxy, by the instance id in their providerID
    # (aws:///<zone>/<instance-id>, as `nodes` writes it).
    nodes = {p["spec"]["nodeName"] for p in serving_pods(args.namespace, "edge-proxy")}
    edge_instances = []
    for name in sorted(nodes):
        node = json.loads(kubectl("get", "node", name, "-o", "json"))
        edge_instances.append(node["spec"]["providerID"].rsplit("/", 1)[-1])
    web_ips = sorted(p["status"]["podIP"] for p in serving_pods(args.namespace, "web"))
    arns = setup_load_balancers(aws("ec2"), aws("elbv2"), edge_instances, web_ips)
    apply([target_group_binding(args.namespace, "web", 80, arns["web"])])
    print(f"load balancers: {EDGE_NAME} (NLB, {len(edge_instances)} instance targets on port "
          f"{EDGE_PORT}), {WEB_NAME} (ALB, {len(web_ips)} IP targets of web, TargetGroupBinding "
          f"{args.namespace}/web)")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("aws-setup")
    setup.add_argument("--queue", default="nodedrain-interruptions")
    nodes = sub.add_parser("nodes")
    nodes.add_argument("--count", type=int, default=6)
    nodes.add_argument("--prefix", default="fixture")
    nodes.add_argument("--no-asg", dest="asg", action="store_false")
    nodes.add_argument("--no-wait", dest="wait", action="store_false")
    workloads = sub.add_parser("workloads")
    workloads.add_argument("--namespace", default="shop")
    workloads.add_argument("--no-wait", dest="wait", action="store_false")
    balancers = sub.add_parser("load-balancers")
    balancers.add_argument("--namespace", default="shop")
    balancers.add_argument("--prefix", default="fixture")
    balancers.add_argument("--edge-replicas", type=int, default=2)
    args = parser.parse_args()
    {"aws-setup": cmd_aws_setup, "nodes": cmd_nodes, "workloads": cmd_workloads,
     "load-balancers": cmd_load_balancers}[args.command](args)


if __name__ == "__main__":
    main()
