//! Command implementations behind the `forge` binary's subcommands (the binary only parses).

pub mod routes;
pub mod traces;
