//! `sluicectl`: parse, run, and turn an error into one line and an exit code.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // clap prints usage errors itself and exits with 2.
    let cli = sluicectl::Cli::parse();
    match sluicectl::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The server's message may quote what a client sent.
            let line = err.to_string();
            eprintln!("error: {}", sluice_domain::text::escape_control(&line));
            ExitCode::from(err.exit_code())
        }
    }
}
