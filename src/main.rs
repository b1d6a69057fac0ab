use clap::Parser;

fn main() -> std::process::ExitCode {
    nodedrain::run(nodedrain::cli::Cli::parse())
}
