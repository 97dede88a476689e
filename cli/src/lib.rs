//! `sluicectl`, the admin CLI of Sluice: manages backends, client keys,
//! cooldowns and settings, and reads usage, over the control plane's gRPC API.
//!
//! `main` parses the command line and calls [`run`]; every failure is an
//! [`Error`] whose `Display` is the one line printed after `error: `.

pub mod args;
mod commands;
mod connection;
mod error;
mod render;
mod time;

pub use args::Cli;
pub use error::Error;

/// Runs one command line: build the request, call the control plane, print
/// the response in the chosen format.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let connection = connection::Connection::new(&cli.global)?;
    let out = render::Output::new(cli.global.output);
    commands::run(cli.command, &connection, &out).await
}
