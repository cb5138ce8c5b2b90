//! Command implementations behind the `forge` binary's subcommands (the binary only parses).

mod admin;
pub mod dataset;
pub mod jobs;
pub mod routes;
pub mod traces;

use std::io::Write;

/// Writes `text` and a newline to stdout. A reader that has gone (`forge … | head`) ends the
/// output quietly, as it does for other command-line tools, rather than with a panic or an
/// error exit; any other failure is returned.
pub fn print_line(text: impl std::fmt::Display) -> std::io::Result<()> {
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => written,
    }
}
