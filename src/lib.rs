#![forbid(unsafe_code)]
//! nodedrain: a Kubernetes node drain assistant and spot interruption handler.
//!
//! Decisions (planning, parsing, deadline math) are pure functions in their modules; I/O with the
//! Kubernetes API and AWS lives at the edges (`drain::execute`, `node`, `interruption::sqs`).

pub mod cli;
pub mod commands;
pub mod drain;
pub mod interruption;
pub mod kube_client;
pub mod names;

use std::process::ExitCode;

/// Runs one parsed command line; the binary's only entry into the library.
pub fn run(cli: cli::Cli) -> ExitCode {
    let name = format!("{:?}", cli.command);
    let name = name
        .split(['(', ' '])
        .next()
        .unwrap_or_default()
        .to_lowercase();
    eprintln!("nodedrain: `{name}` is not implemented yet");
    ExitCode::from(2)
}
