#![forbid(unsafe_code)]
//! nodedrain: a Kubernetes node drain assistant and spot interruption handler.
//!
//! Decisions (planning, parsing, deadline math) are pure functions in their modules; I/O with the
//! Kubernetes API and AWS lives at the edges (`drain::execute`, `node`, `interruption::sqs`).

pub mod admin;
pub mod audit;
pub mod cli;
pub mod commands;
pub mod config;
pub mod controller;
pub mod drain;
pub mod handoff;
pub mod interruption;
pub mod kube_client;
pub mod lb;
pub mod metrics;
pub mod names;
pub mod node;
pub mod notify;
pub mod render;
pub mod resolve;
pub mod telemetry;

use std::process::ExitCode;

/// Runs one parsed command line; the binary's only entry into the library.
pub fn run(cli: cli::Cli) -> ExitCode {
    use cli::Command;
    // Neither needs a runtime, a cluster or logging.
    match cli.command {
        Command::Completion(args) => return commands::completion::run(args),
        Command::Version(args) => return commands::version::run(args),
        _ => {}
    }
    // The controller logs for machines; the CLI commands print for people and log only warnings.
    let (level, json) = match &cli.command {
        Command::Controller(args) => (
            "info",
            match args.log.log_format {
                config::LogFormat::Json => Some(true),
                config::LogFormat::Text => Some(false),
                config::LogFormat::Auto => None,
            },
        ),
        _ => ("warn", None),
    };
    telemetry::init(level, json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nodedrain: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Controller(args) => commands::controller::run(*args).await,
            Command::Drain(args) => commands::drain::run(args).await,
            Command::Plan(args) => commands::plan::run(args).await,
            Command::Uncordon(args) => commands::uncordon::run(args).await,
            Command::Audit(args) => commands::audit::run(args).await,
            Command::Completion(_) | Command::Version(_) => ExitCode::SUCCESS,
        }
    })
}
