fn main() -> std::process::ExitCode {
    nodedrain::run(nodedrain::commands::completion::parse_invocation())
}
