//! `nodedrain plan`.

use std::process::ExitCode;

pub async fn run(_args: crate::cli::PlanArgs) -> ExitCode {
    eprintln!("nodedrain: `plan` is not implemented yet");
    ExitCode::from(2)
}
