//! The load-balancer settings shared by `nodedrain controller`, `drain`, `plan` and `audit`.

use clap::{ArgAction, Args};

use crate::resolve::ManagedTag;

/// Which ELBv2 target groups a drain watches, and whether it waits for them.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Load balancers")]
pub struct LoadBalancerArgs {
    /// Hold each pod that serves through an ELBv2 target (an IP target of its own, or a host
    /// port of its node behind an instance target) until the load balancer stops sending it new
    /// connections: the target is `draining` or gone, its group's deregistration delay has
    /// passed, or the pod's latest start under the deadline has come. `false`: only label the
    /// node out of external load balancers, as kubectl and node-termination-handler do.
    #[arg(long = "lb-wait", env = "NODEDRAIN_LB_WAIT", action = ArgAction::Set, default_value_t = true)]
    pub wait: bool,
    /// Target groups managed outside Kubernetes (Terraform, Pulumi) whose targets nodedrain
    /// deregisters itself: ARNs, comma-separated. TargetGroupBindings are found without this.
    #[arg(
        long = "lb-target-groups",
        env = "NODEDRAIN_LB_TARGET_GROUPS",
        value_delimiter = ',',
        value_name = "ARN,..."
    )]
    pub target_groups: Vec<String>,
    /// Also every target group carrying this tag (`key` or `key=value`), looked up with
    /// DescribeTargetGroups and DescribeTags.
    #[arg(
        long = "lb-target-group-tag",
        env = "NODEDRAIN_LB_TARGET_GROUP_TAG",
        value_name = "KEY[=VALUE]",
        value_parser = ManagedTag::parse
    )]
    pub target_group_tag: Option<ManagedTag>,
}

impl Default for LoadBalancerArgs {
    fn default() -> Self {
        LoadBalancerArgs {
            wait: true,
            target_groups: Vec::new(),
            target_group_tag: None,
        }
    }
}

impl LoadBalancerArgs {
    /// The configured ARNs, trimmed, without empties and duplicates (a trailing comma in an
    /// environment variable is not a target group).
    pub fn target_group_arns(&self) -> Vec<String> {
        let mut arns: Vec<String> = self
            .target_groups
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        arns.sort();
        arns.dedup();
        arns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        lb: LoadBalancerArgs,
    }

    #[test]
    fn the_wait_is_on_by_default_and_groups_are_a_list() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert!(cli.lb.wait);
        assert!(cli.lb.target_group_arns().is_empty());
        let cli = Cli::try_parse_from([
            "x",
            "--lb-wait=false",
            "--lb-target-groups",
            "arn:b, arn:a,,arn:b",
            "--lb-target-group-tag",
            "team=edge",
        ])
        .unwrap();
        assert!(!cli.lb.wait);
        assert_eq!(cli.lb.target_group_arns(), vec!["arn:a", "arn:b"]);
        assert_eq!(
            cli.lb.target_group_tag,
            Some(ManagedTag {
                key: "team".into(),
                value: Some("edge".into())
            })
        );
        assert!(Cli::try_parse_from(["x", "--lb-target-group-tag", "=v"]).is_err());
    }
}
