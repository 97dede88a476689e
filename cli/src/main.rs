//! `sluicectl`: parse, run, and turn an error into one line and an exit code.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match sluicectl::Cli::try_parse() {
        Ok(cli) => cli,
        // Help and the version are printed as clap writes them (as is the help of a command
        // given without its subcommand); any other usage error is one line, exit code 2.
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            err.exit()
        }
        Err(err) => {
            eprintln!(
                "error: {}",
                sluicectl::usage_error_line(&err.render().to_string())
            );
            return ExitCode::from(2);
        }
    };
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
