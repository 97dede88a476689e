//! One function per noun: build the request from the arguments, call the
//! control plane, print the response.

mod backend;
mod cooldown;
mod dataplane;
mod key;
mod settings;
mod stats;

use crate::args::Command;
use crate::connection::Connection;
use crate::error::Error;
use crate::render::Output;

/// Runs one parsed command.
pub async fn run(command: Command, connection: &Connection, out: &Output) -> Result<(), Error> {
    match command {
        Command::Backend(command) => backend::run(command, connection, out).await,
        Command::Key(command) => key::run(command, connection, out).await,
        Command::Cooldown(command) => cooldown::run(command, connection, out).await,
        Command::Dataplane(command) => dataplane::run(command, connection, out).await,
        Command::Settings(command) => settings::run(command, connection, out).await,
        Command::Stats(command) => stats::run(command, connection, out).await,
    }
}
