//! One module per subcommand: each parses nothing (clap did), connects, calls the engine and
//! renders its result. They return an exit code; errors become readable messages here.

pub mod audit;
pub mod completion;
pub mod controller;
pub mod drain;
pub mod plan;
pub mod progress;
pub mod uncordon;
pub mod version;
