//! `nodedrain drain`.

use std::process::ExitCode;

pub async fn run(_args: crate::cli::DrainArgs) -> ExitCode {
    eprintln!("nodedrain: `drain` is not implemented yet");
    ExitCode::from(2)
}
