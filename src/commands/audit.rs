//! `nodedrain audit`.

use std::process::ExitCode;

pub async fn run(_args: crate::cli::AuditArgs) -> ExitCode {
    eprintln!("nodedrain: `audit` is not implemented yet");
    ExitCode::from(2)
}
