//! Load-balancer awareness: which ELBv2 targets a pod serves through, and whether a pod may stop
//! yet given what the load balancer reports about them.
//!
//! An NLB or ALB keeps sending new connections to a target until the target is `draining` (or
//! gone from its group); a pod that gets SIGTERM earlier drops requests. So a pod that serves
//! through a target is held until each of its targets is `draining` or gone, its group's
//! deregistration delay has passed since deregistration began, or its latest start under the
//! deadline has come, whichever is first. The last two are reported (`LoadBalancerWaitCut`).
//!
//! `targets` and `wait` decide (pure); `discover` is the I/O edge (TargetGroupBindings, configured
//! groups, `DescribeTargetHealth`, `DeregisterTargets`); `config` holds the `--lb-*` settings. The
//! drain machine holds evictions on `wait`'s decision.

pub mod config;
pub mod discover;
pub mod targets;
pub mod wait;
