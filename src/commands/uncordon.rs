//! `nodedrain uncordon`.

use std::process::ExitCode;

pub async fn run(_args: crate::cli::UncordonArgs) -> ExitCode {
    eprintln!("nodedrain: `uncordon` is not implemented yet");
    ExitCode::from(2)
}
