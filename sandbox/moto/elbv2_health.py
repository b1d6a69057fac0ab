"""ELBv2 target health as AWS reports it, in place of moto 5.2.5's instant answers.

moto reports a registered target `healthy` at once and a deregistered one `unused` at once, so a
drain that waits for its load balancer to stop routing to a target would never wait. This module
replaces the target bookkeeping of moto's target groups with a model of what DescribeTargetHealth
shows on AWS (docs/sandbox.md, "ELBv2 target health", lists each rule and the AWS documentation
it follows):

- a registered target is `initial` (Elb.RegistrationInProgress) until the group's health check
  has passed HealthyThresholdCount times, HealthCheckIntervalSeconds apart, counted from when the
  group is in use by a load balancer; then `healthy`;
- a target of a group that no load balancer uses is `unused` (Target.NotInUse);
- DeregisterTargets makes a target `draining` (Target.DeregistrationInProgress) for the group's
  `deregistration_delay.timeout_seconds` (default 300, 0-3600); then it is gone from the group:
  no longer listed, and `unused` (Target.NotRegistered) when asked for by id;
- an instance target whose EC2 instance is terminated, however it was terminated, drains the same
  way from the moment of termination; a stopped one stays registered as `unused`
  (Target.InvalidState);
- targets are keyed by id and port, as on AWS, so one instance can be a target on several ports.

Time is the wall clock, read when a request is answered: nothing runs in the background.

Imported by sandbox/moto/server.py before moto serves a request.
"""

import threading
import time

import moto.ec2.models.instances as ec2_instances
import moto.elbv2.models as elbv2_models
from moto.elbv2.exceptions import (
    InvalidConfigurationRequest,
    TargetGroupNotFoundError,
    TargetNotRunning,
    ValidationError,
)

DELAY = "deregistration_delay.timeout_seconds"
# AWS's default when the attribute was never set, and its allowed range (TargetGroupAttribute).
DEFAULT_DELAY_SECONDS = 300
MAX_DELAY_SECONDS = 3600

# moto's request handlers run on several threads; the model's small read-modify-write steps
# (start draining, drop expired targets) must not interleave.
_lock = threading.RLock()

# Attribute names on moto's objects, prefixed so they never collide with moto's own.
_TARGETS = "_nodedrain_targets"
_IN_USE_SINCE = "_nodedrain_in_use_since"
_TERMINATED_AT = "_nodedrain_terminated_at"


def _now():
    return time.time()


def _port(target_group, target):
    # A target without a port is on the group's port (RegisterTargets, DeregisterTargets).
    port = target.get("Port")
    if port is None or port == "":
        port = target_group.port
    try:
        return int(port)
    except (TypeError, ValueError):
        return port  # lambda targets have none


def _targets(target_group):
    """The group's targets, (id, port) -> record, in registration order."""
    targets = getattr(target_group, _TARGETS, None)
    if targets is None:
        targets = {}
        setattr(target_group, _TARGETS, targets)
    return targets


def _delay_seconds(target_group):
    try:
        return int(target_group.attributes.get(DELAY, DEFAULT_DELAY_SECONDS))
    except (TypeError, ValueError):
        return DEFAULT_DELAY_SECONDS


def _instance(target_group, target_id):
    if not str(target_id).startswith("i-"):
        return None
    try:
        return target_group.ec2_backend.get_instance_by_id(target_id)
    except Exception:  # moto raises for unknown ids in some versions; no instance is the answer
        return None


def _in_use_since(target_group, now):
    """When the group started to receive traffic from a load balancer, or None."""
    if not target_group.load_balancer_arns:
        return None
    since = getattr(target_group, _IN_USE_SINCE, None)
    if since is None:
        # Attached by a path the wrappers below do not see: health checks start now.
        since = now
        setattr(target_group, _IN_USE_SINCE, since)
    return since


def _start_draining(target_group, record, at):
    # The delay in force when deregistration starts holds for this target (see docs/sandbox.md).
    record["draining_since"] = at
    record["drain_until"] = at + _delay_seconds(target_group)


def _settle(target_group, now):
    """Applies what happened since the last request: terminated instances start draining,
    targets whose delay has passed leave the group."""
    targets = _targets(target_group)
    for key, record in list(targets.items()):
        if record["draining_since"] is None:
            instance = _instance(target_group, record["Id"])
            if instance is not None and instance.state in ("shutting-down", "terminated"):
                _start_draining(target_group, record, getattr(instance, _TERMINATED_AT, now))
        if record["draining_since"] is not None and record["drain_until"] <= now:
            del targets[key]


def _status(target_group, target_id, port, state, reason=None, description=None):
    return elbv2_models.FakeHealthStatus(
        target_id, port, target_group.health_check_port, state, reason, description
    )


def _health(target_group, record, now):
    target_id, port = record["Id"], record["Port"]
    if record["draining_since"] is not None:
        return _status(target_group, target_id, port, "draining",
                       "Target.DeregistrationInProgress", "Target deregistration is in progress")
    if not target_group.health_check_enabled:
        return _status(target_group, target_id, port, "unavailable",
                       "Target.HealthCheckDisabled", "Health checks are disabled")
    in_use_since = _in_use_since(target_group, now)
    if in_use_since is None:
        return _status(target_group, target_id, port, "unused", "Target.NotInUse",
                       "Target group is not configured to receive traffic from the load balancer")
    instance = _instance(target_group, target_id)
    if instance is not None and instance.state in ("stopping", "stopped"):
        return _status(target_group, target_id, port, "unused", "Target.InvalidState",
                       "Target is in the stopped state")
    checks_from = max(record["registered_at"], in_use_since)
    if now < checks_from + _healthy_after_seconds(target_group):
        return _status(target_group, target_id, port, "initial", "Elb.RegistrationInProgress",
                       "Target registration is in progress")
    return _status(target_group, target_id, port, "healthy")


def _healthy_after_seconds(target_group):
    """HealthyThresholdCount consecutive passing checks, HealthCheckIntervalSeconds apart."""
    try:
        interval = int(target_group.health_check_interval_seconds)
        threshold = int(target_group.healthy_threshold_count)
    except (TypeError, ValueError):
        interval, threshold = 30, 5  # AWS's defaults for instance and IP target groups
    return interval * threshold


# --- FakeTargetGroup: registration and health --------------------------------------------------


def _register(self, targets):
    now = _now()
    with _lock:
        _settle(self, now)
        registry = _targets(self)
        for target in targets:
            # moto's check, kept: only a running instance can be registered.
            instance = _instance(self, target["Id"])
            if instance is not None and instance.state != "running":
                raise TargetNotRunning(instance_id=target["Id"])
            port = _port(self, target)
            key = (target["Id"], port)
            record = registry.get(key)
            if record is not None and record["draining_since"] is None:
                # Registering a registered target changes nothing (the Auto Scaling group
                # re-registers all its instances whenever it changes).
                continue
            # New, or draining: registration (and its health checks) starts over.
            registry.pop(key, None)
            registry[key] = {
                "Id": target["Id"],
                "Port": port,
                "registered_at": now,
                "draining_since": None,
                "drain_until": None,
            }


def _deregister(self, targets):
    now = _now()
    with _lock:
        _settle(self, now)
        registry = _targets(self)
        for target in targets:
            record = registry.get((target["Id"], _port(self, target)))
            # A target that is not registered, or already draining, is left alone: AWS answers
            # success for a target that does not exist (DeregisterTargets), and a second
            # deregistration does not restart the delay.
            if record is not None and record["draining_since"] is None:
                _start_draining(self, record, now)
        _settle(self, now)  # a delay of 0 removes the target at once


def _deregister_terminated_instances(self, instance_ids):
    # Called by moto's TerminateInstances handler; _settle also catches instances terminated
    # through other paths (Auto Scaling, spot fleets), so this only makes it immediate.
    with _lock:
        _settle(self, _now())


def _health_for(self, target, ec2_backend=None):
    """One target's health (kept for moto's callers; DescribeTargetHealth uses _describe)."""
    now = _now()
    with _lock:
        _settle(self, now)
        statuses = _describe_targets(self, [target], now)
    return statuses[0]


def _describe_targets(target_group, targets, now):
    registry = _targets(target_group)
    if not targets:
        return [_health(target_group, record, now) for record in registry.values()]
    statuses = []
    for target in targets:
        if target.get("Port") in (None, ""):
            # Asked by id alone: every registration of that id, whatever its port.
            records = [r for r in registry.values() if r["Id"] == target["Id"]]
        else:
            record = registry.get((target["Id"], _port(target_group, target)))
            records = [record] if record is not None else []
        if records:
            statuses += [_health(target_group, record, now) for record in records]
        else:
            statuses.append(_status(target_group, target["Id"], _port(target_group, target),
                                    "unused", "Target.NotRegistered",
                                    "Target is not registered to the target group"))
    return statuses


# --- ELBv2Backend: the API calls ----------------------------------------------------------------


def _describe_target_health(self, target_group_arn, targets, *args, **kwargs):
    target_group = self.target_groups.get(target_group_arn)
    if target_group is None:
        raise TargetGroupNotFoundError()
    now = _now()
    with _lock:
        _settle(target_group, now)
        return _describe_targets(target_group, targets or [], now)


_modify_target_group_attributes = elbv2_models.ELBv2Backend.modify_target_group_attributes


def _modify_attributes(self, target_group_arn, attributes):
    # moto checks the delay against range(0, 3600), which refuses 3600, and turns a value that is
    # not a number into a server error. AWS accepts 0-3600 inclusive.
    attributes = dict(attributes)
    delay = attributes.pop(DELAY, None)
    target_group = self.target_groups.get(target_group_arn)
    if target_group is None:
        raise TargetGroupNotFoundError()
    if delay is not None:
        try:
            seconds = int(str(delay))
        except ValueError:
            seconds = -1
        if not 0 <= seconds <= MAX_DELAY_SECONDS:
            raise ValidationError(
                f"'{DELAY}' value '{delay}' must be between '0-{MAX_DELAY_SECONDS}' inclusive"
            )
        if target_group.target_type == "lambda":
            raise InvalidConfigurationRequest(
                f"A target group with target type 'lambda' does not support the attribute {DELAY}"
            )
    _modify_target_group_attributes(self, target_group_arn, attributes)
    if delay is not None:
        target_group.attributes[DELAY] = str(seconds)


def _stamping_use(original):
    """Wraps a call that can attach target groups to a load balancer (a listener or rule that
    forwards to them): the groups' health checks start when they come into use."""

    def wrapper(self, *args, **kwargs):
        with _lock:
            unused = {arn for arn, g in self.target_groups.items() if not g.load_balancer_arns}
            result = original(self, *args, **kwargs)
            now = _now()
            for arn in unused:
                group = self.target_groups.get(arn)
                if group is not None and group.load_balancer_arns:
                    setattr(group, _IN_USE_SINCE, now)
            return result

    return wrapper


# --- EC2: when an instance was terminated --------------------------------------------------------

_terminate = ec2_instances.Instance.terminate


def _terminate_and_stamp(self, *args, **kwargs):
    if getattr(self, _TERMINATED_AT, None) is None:
        setattr(self, _TERMINATED_AT, _now())
    return _terminate(self, *args, **kwargs)


def install():
    group = elbv2_models.FakeTargetGroup
    group.register = _register
    group.deregister = _deregister
    group.deregister_terminated_instances = _deregister_terminated_instances
    group.health_for = _health_for
    backend = elbv2_models.ELBv2Backend
    backend.describe_target_health = _describe_target_health
    backend.modify_target_group_attributes = _modify_attributes
    backend.create_listener = _stamping_use(backend.create_listener)
    backend.create_rule = _stamping_use(backend.create_rule)
    ec2_instances.Instance.terminate = _terminate_and_stamp
