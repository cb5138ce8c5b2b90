//! Command implementations behind the `forge` binary's subcommands (the binary only parses).

mod admin;
pub mod dataset;
pub mod jobs;
pub mod routes;
pub mod traces;
