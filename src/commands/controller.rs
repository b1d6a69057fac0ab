//! `nodedrain controller`.

use std::process::ExitCode;

pub async fn run(_args: crate::config::ControllerArgs) -> ExitCode {
    eprintln!("nodedrain: `controller` is not implemented yet");
    ExitCode::from(2)
}
