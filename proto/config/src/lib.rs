//! The configuration-file loader both Sluice servers share: a crate of its own so that
//! neither server depends on the other, and the proto crate holds generated code only.
//!
//! A server's options come from, in order of precedence: the command line, environment
//! variables, a TOML file named by `--config` (or `SLUICE_CONFIG`), then built-in defaults.
//! The file's keys are the long option names, in `snake_case` or `kebab-case`
//! (`grpc_listen = "0.0.0.0:50051"`); values go through the same parsers as the command
//! line, so they are checked the same way. An unknown key is an error that names it. A
//! file key whose environment variable is set is not applied, and [`Parsed::overridden`]
//! names it, for the server to log once its logging is up.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command, FromArgMatches};

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// clap's own error (also `--help` and `--version`, which it prints and exits for).
    #[error(transparent)]
    Clap(#[from] clap::Error),
}

impl ConfigError {
    /// Prints the error (or the help text) and exits: 0 for `--help`/`--version`, else 2.
    pub fn exit(self) -> ! {
        match self {
            ConfigError::Clap(e) => e.exit(),
            other => {
                eprintln!("error: {other}");
                std::process::exit(2)
            }
        }
    }
}

/// A key of the configuration file that was not applied because its environment variable is
/// set. The variable wins, as documented, but silently that surprises: a `data_dir` in the
/// file lost to a `SLUICE_DATA_DIR` a container image sets put the database where nobody
/// looked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overridden {
    /// The configuration file.
    pub file: PathBuf,
    /// The key as the file spells it.
    pub key: String,
    /// The environment variable whose value was used instead.
    pub variable: String,
}

impl std::fmt::Display for Overridden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: `{}` is ignored: the environment variable {} is set and wins",
            self.file.display(),
            self.key,
            self.variable
        )
    }
}

impl Overridden {
    /// Logs it as a warning, once the server's logging is set up (the file is read before).
    pub fn warn(&self) {
        tracing::warn!(
            file = %self.file.display(),
            key = %self.key,
            variable = %self.variable,
            "a key of the configuration file is ignored: its environment variable is set and wins"
        );
    }
}

/// The parsed options, and what of the file the environment overrode.
#[derive(Debug)]
pub struct Parsed<T> {
    pub options: T,
    /// File keys not applied because their environment variable is set (a key the command
    /// line sets is not listed: that is plain to see). The caller logs them: parsing comes
    /// before logging is set up.
    pub overridden: Vec<Overridden>,
}

/// Parses `T` from `args` (the first is the program name), the environment, and the TOML
/// file named by the argument with id `config_arg`, if given.
pub fn parse_from<T, I, S>(
    command: Command,
    config_arg: &str,
    args: I,
) -> Result<Parsed<T>, ConfigError>
where
    T: FromArgMatches,
    I: IntoIterator<Item = S>,
    S: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let matches = command.clone().try_get_matches_from(&args)?;
    let Some(path) = matches.get_one::<PathBuf>(config_arg).cloned() else {
        return Ok(Parsed {
            options: T::from_arg_matches(&matches)?,
            overridden: Vec::new(),
        });
    };
    let (extra, overridden) = file_args(&command, &matches, &path, config_arg)?;
    // Inserted right after the program name: before any subcommand, and only for
    // options that neither the command line nor the environment set.
    let mut merged = Vec::with_capacity(args.len() + extra.len());
    merged.extend(args.first().cloned());
    merged.extend(extra);
    merged.extend(args.into_iter().skip(1));
    let matches = command.try_get_matches_from(merged)?;
    Ok(Parsed {
        options: T::from_arg_matches(&matches)?,
        overridden,
    })
}

/// The command-line arguments that stand for the file's settings, and the file keys the
/// environment overrides.
fn file_args(
    command: &Command,
    matches: &ArgMatches,
    path: &Path,
    config_arg: &str,
) -> Result<(Vec<OsString>, Vec<Overridden>), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| invalid(e.message().to_owned()))?;
    let mut out = Vec::new();
    let mut overridden = Vec::new();
    for (key, value) in table {
        let id = key.replace('-', "_");
        let arg = command
            .get_arguments()
            .find(|a| a.get_id().as_str() == id && a.get_long().is_some())
            .filter(|_| id != config_arg && id != "help" && id != "version")
            .ok_or_else(|| invalid(format!("unknown key `{key}`")))?;
        match matches.value_source(&id) {
            Some(ValueSource::CommandLine) => continue,
            Some(ValueSource::EnvVariable) => {
                overridden.push(Overridden {
                    file: path.to_owned(),
                    variable: arg
                        .get_env()
                        .map(|v| v.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    key,
                });
                continue;
            }
            _ => {}
        }
        let flag = format!("--{}", arg.get_long().unwrap_or_default());
        match (arg.get_action(), &value) {
            (ArgAction::SetTrue, toml::Value::Boolean(true)) => out.push(flag.into()),
            (ArgAction::SetTrue, toml::Value::Boolean(false)) => {}
            (ArgAction::SetTrue, _) => {
                return Err(invalid(format!("`{key}` must be true or false")));
            }
            (_, toml::Value::Array(items)) => {
                for item in items {
                    out.push(flag.clone().into());
                    out.push(scalar(&key, item).map_err(invalid)?.into());
                }
            }
            (_, value) => {
                out.push(flag.into());
                out.push(scalar(&key, value).map_err(invalid)?.into());
            }
        }
    }
    Ok((out, overridden))
}

fn scalar(key: &str, value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err(format!("`{key}` must be a string, number or boolean")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Opts {
        #[arg(long, env = "SLUICE_TEST_CONFIG_FILE")]
        config: Option<PathBuf>,
        #[arg(long, env = "SLUICE_TEST_LISTEN", default_value = "127.0.0.1:1")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 10)]
        max_body_bytes: usize,
        #[arg(long)]
        verbose: bool,
        #[arg(long)]
        model: Vec<String>,
    }

    fn parse(args: &[&str]) -> Result<Opts, ConfigError> {
        let parsed = parse_from(
            Opts::command(),
            "config",
            std::iter::once("t").chain(args.iter().copied()),
        )?;
        assert!(parsed.overridden.is_empty(), "{:?}", parsed.overridden);
        Ok(parsed.options)
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn the_file_fills_what_the_command_line_leaves_and_defaults_the_rest() {
        let f = file(
            "listen = \"127.0.0.1:7\"\nmax-body-bytes = 99\nverbose = true\nmodel = [\"a\", \"b\"]\n",
        );
        let path = f.path().to_str().unwrap();
        let o = parse(&["--config", path]).unwrap();
        assert_eq!(o.listen.port(), 7);
        assert_eq!(o.max_body_bytes, 99);
        assert!(o.verbose);
        assert_eq!(o.model, ["a", "b"]);
        let o = parse(&["--config", path, "--listen", "127.0.0.1:8"]).unwrap();
        assert_eq!(o.listen.port(), 8, "the command line wins");
        assert_eq!(o.max_body_bytes, 99);
        let o = parse(&[]).unwrap();
        assert_eq!((o.listen.port(), o.max_body_bytes), (1, 10));
    }

    #[test]
    fn bad_files_are_errors_that_name_the_file_and_the_key() {
        let f = file("listen = \"127.0.0.1:7\"\nlisten_port = 3\n");
        let err = parse(&["--config", f.path().to_str().unwrap()]).unwrap_err();
        assert!(
            err.to_string().contains("unknown key `listen_port`"),
            "{err}"
        );
        assert!(err.to_string().contains(&f.path().display().to_string()));
        let f = file("max_body_bytes = \"lots\"\n");
        let err = parse(&["--config", f.path().to_str().unwrap()]).unwrap_err();
        assert!(matches!(err, ConfigError::Clap(_)), "{err}");
        let f = file("listen = [\n");
        assert!(parse(&["--config", f.path().to_str().unwrap()]).is_err());
        let err = parse(&["--config", "/no/such/file.toml"]).unwrap_err();
        assert!(err.to_string().starts_with("/no/such/file.toml: "), "{err}");
    }
}
