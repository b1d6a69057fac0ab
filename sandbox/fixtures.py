#!/usr/bin/env python3
"""Fixtures for the sandbox: AWS resources in moto, KWOK nodes backed by moto instances, and a
realistic mix of workloads.

Runs with the moto virtualenv's python (boto3 comes with moto) and the sandbox's environment
(sandbox/sandbox fixtures ...). Kubernetes objects are applied with the sandbox's kubectl.

  aws-setup --queue NAME            SQS queue (+ dead-letter queue), VPC and subnets in 3 AZs
  nodes --count N [--prefix P]      N instances in moto (spot and on-demand, some in an Auto
                                    Scaling group, some Karpenter-managed) and one KWOK node each
  workloads [--namespace NS]        the standard workload mix (see WORKLOADS below)
"""

import argparse
import json
import os
import subprocess
import sys

import boto3

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
    args = parser.parse_args()
    {"aws-setup": cmd_aws_setup, "nodes": cmd_nodes, "workloads": cmd_workloads}[args.command](args)


if __name__ == "__main__":
    main()
