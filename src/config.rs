//! The controller's configuration: flags with environment fallbacks, validated at start.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub client: crate::cli::ClientArgs,
}
