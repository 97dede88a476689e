//! `settings get|set`.

use sluice_proto::v1 as pb;
use sluice_proto::wkt::FieldMask;

use crate::args::{SettingsCommand, SettingsSetArgs};
use crate::connection::Connection;
use crate::error::Error;
use crate::render::{self, Output};

pub async fn run(
    command: SettingsCommand,
    connection: &Connection,
    out: &Output,
) -> Result<(), Error> {
    match command {
        SettingsCommand::Get => {
            let mut admin = connection.admin().await?;
            let response = connection
                .call(admin.get_settings(pb::GetSettingsRequest {}))
                .await?;
            out.print(&response, |r| render::settings(r.settings.as_ref()))
        }
        SettingsCommand::Set(args) => {
            let request = update_request(args)?;
            let mut admin = connection.admin().await?;
            let response = connection
                .call(admin.update_settings(request))
                .await
                .map_err(|err| err.of_change("read them back with `sluicectl settings get`"))?;
            out.print(&response, |r| render::settings(r.settings.as_ref()))
        }
        SettingsCommand::RotateAffinityKey => {
            let mut admin = connection.admin().await?;
            let response = connection
                .call(admin.rotate_affinity_key(pb::RotateAffinityKeyRequest {}))
                .await
                .map_err(|err| {
                    err.of_change(
                        "look for `affinity key rotated` in its log (another rotation \
                         retires the key that signed until now)",
                    )
                })?;
            out.print(&response, |r| {
                format!(
                    "Affinity key {} signs new response ids from the next snapshot on; \
                     {} older key(s) retired.",
                    r.key_id, r.retired_keys
                )
            })
        }
    }
}

/// A request whose mask names exactly the flags given.
fn update_request(args: SettingsSetArgs) -> Result<pb::UpdateSettingsRequest, Error> {
    let mut settings = pb::Settings::default();
    let mut paths: Vec<String> = Vec::new();
    macro_rules! field {
        ($flag:ident, $convert:expr) => {
            if let Some(value) = args.$flag {
                settings.$flag = $convert(value);
                paths.push(stringify!($flag).to_owned());
            }
        };
    }
    let plain = |value| value;
    // Saturating: a duration past `i64::MAX` seconds wrapped to a negative one (prost's
    // conversion), which the control plane refused as "must be at least 1ms".
    let duration = |value: std::time::Duration| Some(sluice_domain::time::proto_duration(value));
    field!(max_attempts, plain);
    field!(connect_timeout, duration);
    field!(first_byte_timeout, duration);
    field!(answer_timeout, duration);
    field!(idle_stream_timeout, duration);
    field!(request_timeout, duration);
    field!(stream_timeout, duration);
    field!(cooldown_base, duration);
    field!(cooldown_cap, duration);
    field!(failure_threshold, plain);
    field!(retry_on_rate_limit, std::convert::identity);
    field!(retry_on_server_error, std::convert::identity);
    field!(retry_on_connect_error, std::convert::identity);
    field!(retry_on_timeout, std::convert::identity);
    field!(usage_retention_days, plain);
    field!(usage_daily_retention_days, plain);
    field!(expose_backend_header, std::convert::identity);
    field!(currency, std::convert::identity);
    if paths.is_empty() {
        return Err(Error::Usage(
            "nothing to set: give at least one flag (see `sluicectl settings set --help`)"
                .to_owned(),
        ));
    }
    Ok(pb::UpdateSettingsRequest {
        settings: Some(settings),
        update_mask: Some(FieldMask { paths }),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use clap::Parser;

    use super::*;
    use crate::args::Cli;

    fn set_args(argv: &[&str]) -> SettingsSetArgs {
        let cli = Cli::try_parse_from(["sluicectl", "settings", "set"].iter().chain(argv)).unwrap();
        match cli.command {
            crate::args::Command::Settings(SettingsCommand::Set(args)) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn mask_names_the_flags_given() {
        let request = update_request(set_args(&[
            "--max-attempts",
            "5",
            "--cooldown-cap",
            "2m",
            "--retry-on-rate-limit",
            "false",
        ]))
        .unwrap();
        assert_eq!(
            request.update_mask.unwrap().paths,
            ["max_attempts", "cooldown_cap", "retry_on_rate_limit"]
        );
        let settings = request.settings.unwrap();
        assert_eq!(settings.max_attempts, 5);
        assert_eq!(settings.cooldown_cap, Some(Duration::from_secs(120).into()));
        assert!(!settings.retry_on_rate_limit);
    }

    #[test]
    fn a_duration_too_long_for_the_wire_is_sent_as_the_longest_there_is() {
        let request =
            update_request(set_args(&["--connect-timeout", "18446744073709551615s"])).unwrap();
        let timeout = request.settings.unwrap().connect_timeout.unwrap();
        assert_eq!(timeout.seconds, i64::MAX);
    }

    #[test]
    fn nothing_to_set_is_a_usage_error() {
        assert_eq!(update_request(set_args(&[])).unwrap_err().exit_code(), 2);
    }
}
