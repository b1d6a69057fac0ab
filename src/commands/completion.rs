//! `nodedrain completion SHELL`, and how the binary names itself: `nodedrain`, or `kubectl
//! nodedrain` when kubectl runs it as the plugin `kubectl-nodedrain`.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches};
use clap_complete::Shell;

use crate::cli::Cli;

/// The executable name kubectl looks for on PATH to run `kubectl nodedrain ...`.
pub const KUBECTL_PLUGIN: &str = "kubectl-nodedrain";

#[derive(Debug, Clone, Args)]
pub struct CompletionArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The name to show in usage and help: `kubectl nodedrain` when invoked through the plugin
/// name (kubectl runs the executable it found, so argv[0] ends in `kubectl-nodedrain`).
pub fn display_name(argv0: Option<&OsString>) -> &'static str {
    let invoked = argv0
        .and_then(|a| std::path::Path::new(a).file_stem().map(|s| s.to_owned()))
        .unwrap_or_default();
    if invoked == KUBECTL_PLUGIN {
        "kubectl nodedrain"
    } else {
        "nodedrain"
    }
}

/// Parses the process's arguments as [`Cli::parse`] does, naming the program as it was
/// invoked; exits with clap's message on an error or for `--help`.
pub fn parse_invocation() -> Cli {
    let args: Vec<OsString> = std::env::args_os().collect();
    parse_from(args)
}

/// [`parse_invocation`] over given arguments (argv[0] first).
pub fn parse_from(args: Vec<OsString>) -> Cli {
    let command = Cli::command().bin_name(display_name(args.first()));
    let matches = command.get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

pub fn run(args: CompletionArgs) -> ExitCode {
    let mut command = Cli::command();
    // Completes the `nodedrain` executable. kubectl completes plugins through a separate
    // `kubectl_complete-nodedrain` executable, which nodedrain does not ship.
    // Into a buffer first: clap_complete panics on a write error, and `| head` closes the pipe.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "nodedrain", &mut script);
    write_stdout(&script, "completion")
}

/// Writes to stdout; a reader that went away (`| head`) is no error.
pub(crate) fn write_stdout(bytes: &[u8], command: &str) -> ExitCode {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodedrain {command}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_name_is_recognised_wherever_it_lives() {
        let name = |s: &str| display_name(Some(&OsString::from(s)));
        assert_eq!(
            name("/usr/local/bin/kubectl-nodedrain"),
            "kubectl nodedrain"
        );
        assert_eq!(name("kubectl-nodedrain"), "kubectl nodedrain");
        assert_eq!(name("/usr/local/bin/nodedrain"), "nodedrain");
        assert_eq!(name("kubectl-nodedrain-old"), "nodedrain");
        assert_eq!(display_name(None), "nodedrain");
    }

    #[test]
    fn completions_name_every_subcommand_and_flag() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "nodedrain", &mut out);
            let script = String::from_utf8(out).unwrap();
            for word in [
                "drain",
                "plan",
                "uncordon",
                "audit",
                "controller",
                "pod-selector",
                "notify-url",
            ] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
        }
    }
}
