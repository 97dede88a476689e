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

/// clap's rendering of a usage error as one line: its message (clap spreads a list of missing
/// arguments over several lines) and its tips, without the usage block, control characters
/// escaped (the message quotes what was typed), pointing at `--help`.
pub fn usage_error_line(rendered: &str) -> String {
    let mut message = Vec::new();
    let mut tips = Vec::new();
    let mut in_message = true;
    for line in rendered.lines().map(str::trim) {
        if line.is_empty() {
            in_message = false;
        } else if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        } else if let Some(tip) = line.strip_prefix("tip:") {
            tips.push(tip.trim());
        } else if in_message {
            message.push(line.strip_prefix("error:").unwrap_or(line).trim());
        }
    }
    let mut line = message.join(" ");
    for tip in tips {
        line.push_str("; ");
        line.push_str(tip);
    }
    line.push_str(" (see --help)");
    sluice_domain::text::escape_control(&line).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use clap::Parser;

    use super::*;

    fn usage_error(argv: &[&str]) -> String {
        let err = Cli::try_parse_from(argv).unwrap_err();
        usage_error_line(&err.render().to_string())
    }

    #[test]
    fn a_usage_error_is_one_line_that_names_what_is_wrong() {
        let missing = usage_error(&["sluicectl", "key", "create"]);
        assert_eq!(
            missing,
            "the following required arguments were not provided: --name <NAME> (see --help)"
        );
        let typo = usage_error(&["sluicectl", "key", "create", "--nam", "a"]);
        assert!(
            typo.starts_with("unexpected argument '--nam' found"),
            "{typo}"
        );
        assert!(typo.contains("'--name'"), "the tip kept: {typo}");
        let bad = usage_error(&["sluicectl", "--timeout", "abc\u{1b}[31m", "key", "list"]);
        assert!(bad.contains("--timeout"), "{bad}");
        assert!(!bad.contains('\u{1b}'), "{bad}");
        for line in [missing, typo, bad] {
            assert!(!line.contains('\n'), "{line}");
        }
    }
}
