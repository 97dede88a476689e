//! What can go wrong in one `sluicectl` run, each as one readable line.

use std::error::Error as StdError;
use std::io;

use tonic::{Code, Status};

/// An error of one run. `Display` is the line printed after `error: `.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection to the control plane (refused, DNS, TLS, timeout on connect).
    #[error("cannot reach control plane at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    /// Connected, but no answer in time.
    #[error("control plane at {endpoint} did not answer within {timeout}")]
    Timeout { endpoint: String, timeout: String },
    /// Connected, but a change got no answer in time: the control plane goes on with a write
    /// its caller left, so it may have been made. `check` says how to tell.
    #[error(
        "control plane at {endpoint} did not answer within {timeout}; the change may have \
         been made all the same: {check} before repeating it"
    )]
    ChangeTimeout {
        endpoint: String,
        timeout: String,
        check: String,
    },
    /// The control plane refused or failed the call.
    #[error("{0}")]
    Server(String),
    /// Local input that cannot be used: a missing variable, an unreadable file.
    #[error("{0}")]
    Input(String),
    /// A command line that clap accepted but that says nothing to do.
    #[error("{0}")]
    Usage(String),
    /// Standard output could not be written.
    #[error("cannot write output: {0}")]
    Output(String),
}

impl Error {
    /// 2 for usage errors (as clap's own), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }

    /// For a change: a timeout says the change may have been made, and `check` how to tell.
    pub(crate) fn of_change(self, check: &str) -> Self {
        match self {
            Error::Timeout { endpoint, timeout } => Error::ChangeTimeout {
                endpoint,
                timeout,
                check: check.to_owned(),
            },
            other => other,
        }
    }

    /// Turns a gRPC status into the line a user reads.
    pub(crate) fn from_status(status: &Status, endpoint: &str) -> Self {
        let message = one_line(status.message());
        let message = if message.is_empty() {
            status.code().description().to_owned()
        } else {
            message
        };
        // A status with a source was made on this side from a transport
        // failure (the server's answers carry none): the call never got through.
        if let Some(source) = status.source() {
            return Error::Unreachable {
                endpoint: endpoint.to_owned(),
                reason: describe_chain(source),
            };
        }
        match status.code() {
            Code::Unavailable => Error::Unreachable {
                endpoint: endpoint.to_owned(),
                reason: message,
            },
            Code::Unauthenticated => Error::Server(format!(
                "unauthenticated: {message} (check --token, --token-file or SLUICE_ADMIN_TOKEN)"
            )),
            Code::PermissionDenied => Error::Server(format!("permission denied: {message}")),
            Code::Unimplemented => Error::Server(format!(
                "{endpoint} does not serve this call (is it the control plane's gRPC address, \
                 and as new as sluicectl?): {message}"
            )),
            Code::NotFound
            | Code::AlreadyExists
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::OutOfRange => Error::Server(message),
            Code::DeadlineExceeded => Error::Server(format!("deadline exceeded: {message}")),
            Code::ResourceExhausted => Error::Server(format!("resource exhausted: {message}")),
            _ => Error::Server(format!("control plane error: {message}")),
        }
    }

    /// Turns a failed connection attempt into the line a user reads.
    pub(crate) fn unreachable(endpoint: &str, error: &(dyn StdError + 'static)) -> Self {
        Error::Unreachable {
            endpoint: endpoint.to_owned(),
            reason: describe_chain(error),
        }
    }
}

/// The most telling part of an error chain: the I/O error if there is one
/// ("connection refused"), otherwise the innermost message.
fn describe_chain(error: &(dyn StdError + 'static)) -> String {
    let mut innermost = error;
    let mut current = Some(error);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return describe_io(io);
        }
        innermost = err;
        current = err.source();
    }
    one_line(&innermost.to_string())
}

fn describe_io(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        io::ErrorKind::TimedOut => "connection timed out".to_owned(),
        _ => {
            let text = error.to_string();
            // "Network is unreachable (os error 101)" → "network is unreachable"
            let text = match text.find(" (os error") {
                Some(at) => text.get(..at).unwrap_or(&text).to_owned(),
                None => text,
            };
            lowercase_first(&one_line(&text))
        }
    }
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Collapses whitespace runs (newlines included) so the error stays one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A change that timed out may have been made (the control plane finishes a write its
    /// caller left): the line says so, and how to tell, where a read's says only the timeout.
    #[test]
    fn a_change_that_timed_out_says_it_may_have_been_made() {
        let timeout = || Error::Timeout {
            endpoint: "http://cp:50051".into(),
            timeout: "10s".into(),
        };
        assert_eq!(
            timeout()
                .of_change("see `sluicectl key get team-a`")
                .to_string(),
            "control plane at http://cp:50051 did not answer within 10s; the change may have \
             been made all the same: see `sluicectl key get team-a` before repeating it"
        );
        assert_eq!(
            timeout().to_string(),
            "control plane at http://cp:50051 did not answer within 10s"
        );
        let refused = Error::Server("backend \"x\" not found".into()).of_change("x");
        assert_eq!(refused.to_string(), "backend \"x\" not found");
    }

    #[test]
    fn not_found_prints_the_server_message() {
        let status = Status::not_found("backend \"x\" not found");
        let err = Error::from_status(&status, "http://127.0.0.1:1");
        assert_eq!(err.to_string(), "backend \"x\" not found");
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn multi_line_messages_become_one_line() {
        let status = Status::invalid_argument("bad\nthing\n  here");
        assert_eq!(
            Error::from_status(&status, "e").to_string(),
            "bad thing here"
        );
    }

    #[test]
    fn unauthenticated_says_so() {
        let status = Status::unauthenticated("invalid admin token");
        let line = Error::from_status(&status, "e").to_string();
        assert!(
            line.starts_with("unauthenticated: invalid admin token"),
            "{line}"
        );
    }

    #[test]
    fn io_errors_read_plainly() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            Error::unreachable("http://h:1", &refused).to_string(),
            "cannot reach control plane at http://h:1: connection refused"
        );
        let os = io::Error::from_raw_os_error(101);
        assert!(!describe_io(&os).contains("os error"));
    }
}
