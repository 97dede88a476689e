//! `backend add|list|get|update|remove|enable|disable`.

use std::io::BufRead;

use sluice_proto::v1 as pb;
use sluice_proto::wkt::FieldMask;

use crate::args::{
    ApiKeyArgs, AudioPriceArg, BackendAddArgs, BackendCommand, BackendUpdateArgs, CallPriceArg,
    LongContextArg, ResponsesApi, TierArg,
};
use crate::connection::Connection;
use crate::error::Error;
use crate::render::{self, Output};

pub async fn run(
    command: BackendCommand,
    connection: &Connection,
    out: &Output,
) -> Result<(), Error> {
    // Requests are built before connecting so that input errors (a missing
    // key variable, nothing to update) come first.
    match command {
        BackendCommand::Add(args) => {
            let request = create_request(args)?;
            let mut admin = connection.admin().await?;
            let response = connection
                .call(admin.create_backend(request))
                .await
                .map_err(|err| err.of_change(READ_BACK))?;
            out.print(&response, |r| render::backend(r.backend.as_ref()))
        }
        BackendCommand::List => {
            let mut admin = connection.admin().await?;
            let response = connection
                .call(admin.list_backends(pb::ListBackendsRequest {}))
                .await?;
            out.print(&response, render::backends)
        }
        BackendCommand::Get { backend } => {
            let mut admin = connection.admin().await?;
            let response = connection
                .call(admin.get_backend(pb::GetBackendRequest { id: backend }))
                .await?;
            out.print(&response, |r| render::backend(r.backend.as_ref()))
        }
        BackendCommand::Update(args) => {
            let kept_from_stored = keeps_from_stored(&args);
            let request = update_request(args)?;
            match kept_from_stored {
                Some(kept) => update_on_stored(request, &kept, connection, out).await,
                None => update(request, connection, out).await,
            }
        }
        BackendCommand::Enable { backend } => {
            update(set_enabled(backend, true), connection, out).await
        }
        BackendCommand::Disable { backend } => {
            update(set_enabled(backend, false), connection, out).await
        }
        BackendCommand::Remove { backend } => {
            let mut admin = connection.admin().await?;
            let request = pb::DeleteBackendRequest {
                id: backend.clone(),
            };
            let response = connection
                .call(admin.delete_backend(request))
                .await
                .map_err(|err| err.of_change(READ_BACK))?;
            out.print(&response, |_| format!("Removed backend {backend:?}."))
        }
    }
}

async fn update(
    request: pb::UpdateBackendRequest,
    connection: &Connection,
    out: &Output,
) -> Result<(), Error> {
    let mut admin = connection.admin().await?;
    let response = connection
        .call(admin.update_backend(request))
        .await
        .map_err(|err| err.of_change(READ_BACK))?;
    out.print(&response, |r| render::backend(r.backend.as_ref()))
}

/// How to tell whether a change of a backend that timed out was made.
const READ_BACK: &str = "read it back with `sluicectl backend get`";

/// How many times an update that takes fields from the stored routes reads them again when
/// another change came between its read and its write.
const UPDATE_ATTEMPTS: u32 = 3;

/// An update whose routes take fields from the stored ones ([`keep_stored_route_fields`]):
/// read, filled in, and written only if the backend is still as read (its etag); if another
/// admin changed it in between, read again, so that what they changed (a price) is not
/// written back over with what was read a moment earlier.
async fn update_on_stored(
    request: pb::UpdateBackendRequest,
    kept: &Kept,
    connection: &Connection,
    out: &Output,
) -> Result<(), Error> {
    let mut admin = connection.admin().await?;
    for _ in 0..UPDATE_ATTEMPTS {
        let mut request = request.clone();
        let Some(backend) = request.backend.as_mut() else {
            return update(request, connection, out).await;
        };
        let stored = connection
            .call(admin.get_backend(pb::GetBackendRequest {
                id: backend.id.clone(),
            }))
            .await?
            .backend
            .unwrap_or_default();
        let unpriced = keep_stored_route_fields(&mut backend.models, kept, &stored.models);
        // What this update clears of the stored routes the operator asked for (a field it
        // names `none`, a neutral tier): the fields kept above are not. A field newer than
        // this sluicectl is unknown to it, unset here, and so refused by the control plane
        // rather than cleared (`sluice_domain::route`).
        let clears = !sluice_domain::route::clearing(&stored.models, &backend.models).is_empty();
        backend.etag = stored.etag;
        request.clear_route_fields = clears;
        if let Some(response) = connection
            .unless_changed(admin.update_backend(request))
            .await
            .map_err(|err| err.of_change(READ_BACK))?
        {
            for name in unpriced {
                // Said on stderr: the answer on stdout stays the API's (`-o json`).
                eprintln!(
                    "sluicectl: note: {name} is new on this backend and was given no prices: \
                     its requests cost 0 (give them: --model {name}:UPSTREAM:IN:OUT)"
                );
            }
            return out.print(&response, |r| render::backend(r.backend.as_ref()));
        }
    }
    Err(Error::Server(format!(
        "the backend changed while this update was being made, {UPDATE_ATTEMPTS} times; \
         run it again"
    )))
}

fn create_request(args: BackendAddArgs) -> Result<pb::CreateBackendRequest, Error> {
    let api_key = read_api_key(&args.api_key)?.unwrap_or_default();
    let backend = pb::Backend {
        name: args.name,
        base_url: args.base_url,
        pool: pb::Pool::from(args.pool).into(),
        priority: args.priority,
        weight: args.weight,
        models: with_prices_by_answer(
            with_max_tokens(args.models, args.default_max_tokens, args.max_output_tokens),
            args.tiers,
            args.call_prices,
            args.long_contexts,
            args.audio_prices,
        )?,
        rpm_limit: args.rpm,
        tpm_limit: args.tpm_limit,
        enabled: !args.disabled,
        responses_api: args.responses_api,
        api_format: pb::ApiFormat::from(args.api_format).into(),
        anthropic_version: args.anthropic_version.unwrap_or_default(),
        key_header: args
            .key_header
            .map_or(pb::KeyHeader::Unspecified, pb::KeyHeader::from)
            .into(),
        ..Default::default()
    };
    Ok(pb::CreateBackendRequest {
        backend: Some(backend),
        api_key,
    })
}

/// The routes with `default_max_tokens` and `max_output_tokens` set, each when given.
fn with_max_tokens(
    mut models: Vec<pb::ModelRoute>,
    max_tokens: Option<u32>,
    max_output_tokens: Option<u32>,
) -> Vec<pb::ModelRoute> {
    for model in &mut models {
        if let Some(n) = max_tokens {
            model.default_max_tokens = n;
        }
        if let Some(n) = max_output_tokens {
            model.max_output_tokens = n;
        }
    }
    models
}

/// The routes with the price tiers `tiers` and the tools' prices `calls` give each, in the
/// order given, and the long-context bands `long` gives; any for a model no route has is a
/// mistake.
fn with_prices_by_answer(
    mut models: Vec<pb::ModelRoute>,
    tiers: Vec<TierArg>,
    calls: Vec<CallPriceArg>,
    long: Vec<LongContextArg>,
    audio: Vec<AudioPriceArg>,
) -> Result<Vec<pb::ModelRoute>, Error> {
    fn route<'a>(
        models: &'a mut [pb::ModelRoute],
        model: &str,
        flag: &str,
    ) -> Result<&'a mut pb::ModelRoute, Error> {
        models
            .iter_mut()
            .find(|route| route.name == model)
            .ok_or_else(|| Error::Usage(format!("{flag} {model}: no --model {model} is given")))
    }
    for TierArg { model, tier } in tiers {
        route(&mut models, &model, "--tier")?
            .tier_multipliers
            .push(tier);
    }
    for CallPriceArg { model, price } in calls {
        route(&mut models, &model, "--call-price")?
            .call_prices
            .push(price);
    }
    for LongContextArg { model, band } in long {
        route(&mut models, &model, "--long-context")?.long_context = band;
    }
    for AudioPriceArg {
        model,
        input,
        output,
    } in audio
    {
        let route = route(&mut models, &model, "--audio-price")?;
        route.audio_input_price_per_mtok = input;
        route.audio_output_price_per_mtok = output;
    }
    Ok(models)
}

/// What an update's routes take from the stored routes of the same names: for each route,
/// whether its upstream name does (none was given: `--model NAME` re-lists a route, it does
/// not point it at NAME), whether its prices do (none were given), whether its long-context band does (no
/// `--long-context` names it), and whether `default_max_tokens` does (no
/// `--default-max-tokens`); their price tiers and tools' prices always do, those `--tier` and
/// `--call-price` name set over them; and whether its audio prices do (no `--audio-price`
/// names it).
/// `None` when there are no routes.
fn keeps_from_stored(args: &BackendUpdateArgs) -> Option<Kept> {
    let upstream = args.models.iter().map(|m| !m.upstream_given).collect();
    let prices: Vec<bool> = args.models.iter().map(|m| !m.priced).collect();
    let long = args
        .models
        .iter()
        .map(|m| !args.long_contexts.iter().any(|l| l.model == m.route.name))
        .collect();
    let audio = args
        .models
        .iter()
        .map(|m| !args.audio_prices.iter().any(|a| a.model == m.route.name))
        .collect();
    let max_tokens = args.default_max_tokens.is_none();
    let max_output = args.max_output_tokens.is_none();
    (!args.models.is_empty()).then_some(Kept {
        upstream,
        prices,
        long,
        audio,
        max_tokens,
        max_output,
    })
}

#[derive(Debug)]
struct Kept {
    upstream: Vec<bool>,
    prices: Vec<bool>,
    long: Vec<bool>,
    audio: Vec<bool>,
    max_tokens: bool,
    max_output: bool,
}

/// Fills what `kept` says from `stored`, route by public name: `--model gpt-4o` on an update
/// re-lists a route, it does not point it at an upstream model of its public name (a route
/// `sonnet:claude-sonnet-4-5` would then ask the provider for `sonnet`) nor make it free (a price of 0 is spent by no budget) nor drop
/// its price tiers or tools' prices (a `--tier` or `--call-price` sets its own over them), its
/// long-context band or its
/// `default_max_tokens`. A name the backend does not have yet keeps 0: the names of those
/// given without prices are returned, for the operator to be told they cost nothing.
fn keep_stored_route_fields(
    routes: &mut [pb::ModelRoute],
    kept: &Kept,
    stored: &[pb::ModelRoute],
) -> Vec<String> {
    let mut unpriced = Vec::new();
    let keeps = kept
        .upstream
        .iter()
        .zip(&kept.prices)
        .zip(&kept.long)
        .zip(&kept.audio);
    for (route, (((keep_upstream, keep_prices), keep_long), keep_audio)) in
        routes.iter_mut().zip(keeps)
    {
        let Some(old) = stored.iter().find(|old| old.name == route.name) else {
            if *keep_prices {
                unpriced.push(route.name.clone());
            }
            continue;
        };
        if *keep_upstream {
            route.upstream_name.clone_from(&old.upstream_name);
        }
        if *keep_prices {
            route.input_price_per_mtok = old.input_price_per_mtok;
            route.output_price_per_mtok = old.output_price_per_mtok;
            route.cached_input_price_per_mtok = old.cached_input_price_per_mtok;
            route.cache_write_price_per_mtok = old.cache_write_price_per_mtok;
        }
        set_over(
            &mut route.tier_multipliers,
            &old.tier_multipliers,
            |a, b| a.tier == b.tier,
        );
        set_over(&mut route.call_prices, &old.call_prices, |a, b| {
            a.tool == b.tool
        });
        if *keep_long {
            route.long_context = old.long_context;
        }
        if *keep_audio {
            route.audio_input_price_per_mtok = old.audio_input_price_per_mtok;
            route.audio_output_price_per_mtok = old.audio_output_price_per_mtok;
        }
        if kept.max_tokens {
            route.default_max_tokens = old.default_max_tokens;
        }
        if kept.max_output {
            route.max_output_tokens = old.max_output_tokens;
        }
    }
    unpriced
}

/// `given` becomes `stored` with each of `given` set over the stored one of its name (`same`),
/// or added.
fn set_over<T: Clone>(given: &mut Vec<T>, stored: &[T], same: impl Fn(&T, &T) -> bool) {
    for item in std::mem::replace(given, stored.to_vec()) {
        match given.iter_mut().find(|old| same(old, &item)) {
            Some(old) => *old = item,
            None => given.push(item),
        }
    }
}

/// A request whose mask names exactly the flags given.
fn update_request(args: BackendUpdateArgs) -> Result<pb::UpdateBackendRequest, Error> {
    let mut backend = pb::Backend {
        id: args.backend,
        ..Default::default()
    };
    let mut paths = Vec::new();
    let mut set = |path: &str| paths.push(path.to_owned());
    if let Some(name) = args.name {
        backend.name = name;
        set("name");
    }
    if let Some(base_url) = args.base_url {
        backend.base_url = base_url;
        set("base_url");
    }
    if let Some(pool) = args.pool {
        backend.pool = pb::Pool::from(pool).into();
        set("pool");
    }
    if let Some(priority) = args.priority {
        backend.priority = priority;
        set("priority");
    }
    if let Some(weight) = args.weight {
        backend.weight = weight;
        set("weight");
    }
    if let Some(rpm) = args.rpm {
        backend.rpm_limit = rpm;
        set("rpm_limit");
    }
    if let Some(tpm) = args.tpm_limit {
        backend.tpm_limit = tpm;
        set("tpm_limit");
    }
    if args.enabled || args.disabled {
        backend.enabled = args.enabled;
        set("enabled");
    }
    if !args.models.is_empty() {
        let routes = args.models.into_iter().map(|m| m.route).collect();
        backend.models = with_prices_by_answer(
            with_max_tokens(routes, args.default_max_tokens, args.max_output_tokens),
            args.tiers,
            args.call_prices,
            args.long_contexts,
            args.audio_prices,
        )?;
        set("models");
    }
    if let Some(ResponsesApi(on)) = args.responses_api {
        // Named in the mask and left unset: back to its API's default.
        backend.responses_api = on;
        set("responses_api");
    }
    if let Some(format) = args.api_format {
        backend.api_format = pb::ApiFormat::from(format).into();
        set("api_format");
    }
    if let Some(version) = args.anthropic_version {
        backend.anthropic_version = version;
        set("anthropic_version");
    }
    if let Some(header) = args.key_header {
        backend.key_header = pb::KeyHeader::from(header).into();
        set("key_header");
    }
    let api_key = read_api_key(&args.api_key)?;
    if paths.is_empty() && api_key.is_none() && !args.clear_api_key {
        return Err(Error::Usage(
            "nothing to update: give at least one of --name, --base-url, --pool, --priority, \
             --weight, --rpm, --tpm-limit, --enabled, --disabled, --model, --api-format, \
             --anthropic-version, --key-header, --api-key-env, --api-key-stdin, \
             --clear-api-key"
                .to_owned(),
        ));
    }
    Ok(pb::UpdateBackendRequest {
        backend: Some(backend),
        update_mask: Some(FieldMask { paths }),
        api_key: api_key.unwrap_or_default(),
        clear_route_fields: false,
        clear_api_key: args.clear_api_key,
    })
}

fn set_enabled(backend: String, enabled: bool) -> pb::UpdateBackendRequest {
    pb::UpdateBackendRequest {
        backend: Some(pb::Backend {
            id: backend,
            enabled,
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["enabled".to_owned()],
        }),
        api_key: String::new(),
        clear_route_fields: false,
        clear_api_key: false,
    }
}

/// Whether `text` can be the name of an environment variable as shells write them:
/// `[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes.
fn is_variable_name(text: &str) -> bool {
    let mut bytes = text.bytes();
    text.len() <= 128
        && bytes
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
}

/// The provider key from `--api-key-env` or `--api-key-stdin`; `None` when
/// neither was given. An empty key is an error: it is always a mistake.
fn read_api_key(args: &ApiKeyArgs) -> Result<Option<String>, Error> {
    let key = if let Some(var) = &args.api_key_env {
        if !is_variable_name(var) {
            // Not quoted: what is given here by mistake is most often the key itself, and
            // this line goes to terminals and CI logs.
            return Err(Error::Usage(
                "--api-key-env takes the NAME of an environment variable holding the key \
                 (e.g. OPENAI_API_KEY), and what was given is not a variable name; if it was \
                 the key, it is now in your shell history: rotate it"
                    .to_owned(),
            ));
        }
        match std::env::var(var) {
            Ok(value) => value,
            Err(std::env::VarError::NotPresent) => {
                return Err(Error::Input(format!(
                    "environment variable {var} (from --api-key-env) is not set"
                )));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(Error::Input(format!(
                    "environment variable {var} (from --api-key-env) is not valid UTF-8"
                )));
            }
        }
    } else if args.api_key_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|err| Error::Input(format!("cannot read the API key from stdin: {err}")))?;
        line
    } else {
        return Ok(None);
    };
    let key = key.trim();
    if key.is_empty() {
        let source = match &args.api_key_env {
            Some(var) => format!("environment variable {var}"),
            None => "standard input".to_owned(),
        };
        return Err(Error::Input(format!("the API key from {source} is empty")));
    }
    Ok(Some(key.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use clap::Parser;

    use super::*;
    use crate::args::Cli;

    fn update_args(argv: &[&str]) -> BackendUpdateArgs {
        let cli =
            Cli::try_parse_from(["sluicectl", "backend", "update"].iter().chain(argv)).unwrap();
        match cli.command {
            crate::args::Command::Backend(BackendCommand::Update(args)) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn update_masks_exactly_the_flags_given() {
        let request =
            update_request(update_args(&["b1", "--priority", "-3", "--rpm", "0"])).unwrap();
        assert_eq!(
            request.update_mask.unwrap().paths,
            vec!["priority".to_owned(), "rpm_limit".to_owned()]
        );
        let backend = request.backend.unwrap();
        assert_eq!(backend.id, "b1");
        assert_eq!(backend.priority, -3);
        assert!(request.api_key.is_empty());
    }

    #[test]
    fn responses_api_goes_back_to_its_apis_default() {
        for (value, sent) in [
            ("true", Some(true)),
            ("false", Some(false)),
            ("default", None),
        ] {
            let request = update_request(update_args(&["b1", "--responses-api", value])).unwrap();
            assert_eq!(request.update_mask.unwrap().paths, ["responses_api"]);
            assert_eq!(request.backend.unwrap().responses_api, sent, "{value}");
        }
        assert!(
            Cli::try_parse_from([
                "sluicectl",
                "backend",
                "update",
                "b1",
                "--responses-api",
                "yes"
            ])
            .is_err()
        );
    }

    #[test]
    fn update_with_models_replaces_the_list() {
        let request = update_request(update_args(&[
            "b1",
            "--model",
            "a",
            "--model",
            "b:c:1:2",
            "--disabled",
        ]))
        .unwrap();
        assert_eq!(
            request.update_mask.unwrap().paths,
            vec!["enabled".to_owned(), "models".to_owned()]
        );
        let backend = request.backend.unwrap();
        assert!(!backend.enabled);
        assert_eq!(backend.models.len(), 2);
        assert_eq!(backend.models[1].upstream_name, "c");
    }

    #[test]
    fn a_models_audio_prices_are_those_given_else_its_stored_ones() {
        let args = update_args(&[
            "b1",
            "--model",
            "a::1:2",
            "--model",
            "b",
            "--model",
            "c",
            "--audio-price",
            "b:40/",
            "--audio-price",
            "c:none",
        ]);
        let kept = keeps_from_stored(&args).unwrap();
        let mut request = update_request(args).unwrap();
        let routes = &mut request.backend.as_mut().unwrap().models;
        let stored = |name: &str| pb::ModelRoute {
            name: name.into(),
            audio_input_price_per_mtok: Some(32.0),
            audio_output_price_per_mtok: Some(64.0),
            ..Default::default()
        };
        let unpriced =
            keep_stored_route_fields(routes, &kept, &[stored("a"), stored("b"), stored("c")]);
        assert!(unpriced.is_empty(), "{unpriced:?}");
        let audio: Vec<_> = routes
            .iter()
            .map(|r| (r.audio_input_price_per_mtok, r.audio_output_price_per_mtok))
            .collect();
        // Re-listed with new text prices, `a` keeps its audio's; `b` and `c` get theirs.
        assert_eq!(
            audio,
            [(Some(32.0), Some(64.0)), (Some(40.0), None), (None, None)]
        );
        let error = update_request(update_args(&[
            "b1",
            "--model",
            "a",
            "--audio-price",
            "z:1/2",
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("--audio-price z"), "{error}");
    }

    /// A route new on the backend, given without prices, is named for the operator to be
    /// told it costs nothing; one given prices, or re-listed, is not.
    #[test]
    fn a_new_model_given_without_prices_is_named_as_free() {
        let args = update_args(&["b1", "--model", "a", "--model", "b", "--model", "c::1:2"]);
        let kept = keeps_from_stored(&args).unwrap();
        let mut request = update_request(args).unwrap();
        let routes = &mut request.backend.as_mut().unwrap().models;
        let stored = pb::ModelRoute {
            name: "a".into(),
            input_price_per_mtok: 3.0,
            ..Default::default()
        };
        let unpriced = keep_stored_route_fields(routes, &kept, &[stored]);
        assert_eq!(unpriced, ["b"]);
        assert_eq!(routes[0].input_price_per_mtok, 3.0);
    }

    /// `--max-output-tokens` caps each route given; an update re-listing routes without it
    /// keeps each route's stored cap.
    #[test]
    fn a_models_output_cap_is_the_one_given_else_its_stored_one() {
        let stored = |name: &str| pb::ModelRoute {
            name: name.into(),
            max_output_tokens: 16_384,
            ..Default::default()
        };
        for (flags, cap) in [
            (&[][..], 16_384),
            (&["--max-output-tokens", "8192"][..], 8192),
        ] {
            let mut argv = vec!["b1", "--model", "a", "--model", "b"];
            argv.extend_from_slice(flags);
            let args = update_args(&argv);
            let kept = keeps_from_stored(&args).unwrap();
            let mut request = update_request(args).unwrap();
            let routes = &mut request.backend.as_mut().unwrap().models;
            keep_stored_route_fields(routes, &kept, &[stored("a"), stored("b")]);
            let caps: Vec<u32> = routes.iter().map(|r| r.max_output_tokens).collect();
            assert_eq!(caps, [cap, cap], "{flags:?}");
        }
    }

    #[test]
    fn a_models_tiers_and_long_context_band_are_those_given_else_its_stored_ones() {
        let tier = |tier: &str, multiplier| pb::TierMultiplier {
            tier: tier.into(),
            multiplier,
        };
        let call = |tool: &str, price| pb::CallPrice {
            tool: tool.into(),
            price_per_thousand_calls: price,
        };
        let args = update_args(&[
            "b1",
            "--model",
            "a",
            "--model",
            "b::1:2",
            "--tier",
            "b:flex=0.5",
            "--tier",
            "b:priority=2",
            "--tier",
            "a:fast=1",
            "--call-price",
            "a:web_search=0",
            "--call-price",
            "b:file_search=2.5",
            "--long-context",
            "b:none",
        ]);
        let kept = keeps_from_stored(&args).unwrap();
        let mut request = update_request(args).unwrap();
        let routes = &mut request.backend.as_mut().unwrap().models;
        let stored = |name: &str| pb::ModelRoute {
            name: name.into(),
            input_price_per_mtok: 3.0,
            tier_multipliers: vec![tier("fast", 6.0)],
            call_prices: vec![call("web_search", 10.0)],
            long_context: Some(pb::LongContextPrices {
                above_prompt_tokens: 200_000,
                input_multiplier: 2.0,
                output_multiplier: 1.5,
            }),
            ..Default::default()
        };
        keep_stored_route_fields(routes, &kept, &[stored("a"), stored("b")]);
        assert_eq!(routes[0].long_context, stored("a").long_context);
        assert_eq!(routes[1].long_context, None);
        // `fast=1` set over the stored `fast=6`: the control plane drops a tier at 1.
        assert_eq!(routes[0].tier_multipliers, [tier("fast", 1.0)]);
        assert_eq!(routes[0].input_price_per_mtok, 3.0);
        // Set over the stored ones: `fast` kept, `flex` and `priority` added.
        assert_eq!(
            routes[1].tier_multipliers,
            [tier("fast", 6.0), tier("flex", 0.5), tier("priority", 2.0)]
        );
        assert_eq!(routes[1].input_price_per_mtok, 1.0);
        // Tools' prices likewise: `web_search=0` set over the stored one (the control plane
        // drops a tool at 0), `file_search` added.
        assert_eq!(routes[0].call_prices, [call("web_search", 0.0)]);
        assert_eq!(
            routes[1].call_prices,
            [call("web_search", 10.0), call("file_search", 2.5)]
        );
        // A tier for a model not given is a mistake, not a tier dropped.
        let err = update_request(update_args(&["b1", "--model", "a", "--tier", "b:flex=0.5"]))
            .unwrap_err();
        assert!(
            matches!(&err, Error::Usage(m) if m.contains("no --model b")),
            "{err:?}"
        );
    }

    #[test]
    fn the_key_header_is_set_by_its_flag_and_back_to_the_default() {
        let cli = Cli::try_parse_from([
            "sluicectl",
            "backend",
            "add",
            "--name",
            "azure",
            "--base-url",
            "https://r.openai.azure.com/openai/deployments/gpt-4o?api-version=2024-10-21",
            "--key-header",
            "api-key",
            "--model",
            "gpt-4o",
        ])
        .unwrap();
        let crate::args::Command::Backend(BackendCommand::Add(args)) = cli.command else {
            panic!("not backend add");
        };
        let backend = create_request(args).unwrap().backend.unwrap();
        assert_eq!(backend.key_header, pb::KeyHeader::ApiKey as i32);

        let request = update_request(update_args(&["azure", "--key-header", "default"])).unwrap();
        assert_eq!(
            request.update_mask.unwrap().paths,
            vec!["key_header".to_owned()]
        );
        assert_eq!(
            request.backend.unwrap().key_header,
            pb::KeyHeader::Unspecified as i32
        );
        let request = update_request(update_args(&["azure", "--key-header", "x-api-key"])).unwrap();
        assert_eq!(
            request.backend.unwrap().key_header,
            pb::KeyHeader::XApiKey as i32
        );
    }

    #[test]
    fn an_anthropic_backend_is_added_and_switched_by_flags() {
        let cli = Cli::try_parse_from([
            "sluicectl",
            "backend",
            "add",
            "--name",
            "claude",
            "--base-url",
            "https://api.anthropic.com/v1",
            "--api-format",
            "anthropic",
            "--anthropic-version",
            "2023-06-01",
            "--default-max-tokens",
            "2048",
            "--max-output-tokens",
            "64000",
            "--model",
            "sonnet:claude-sonnet-4-5",
        ])
        .unwrap();
        let crate::args::Command::Backend(BackendCommand::Add(args)) = cli.command else {
            panic!("not backend add");
        };
        let backend = create_request(args).unwrap().backend.unwrap();
        assert_eq!(backend.api_format, pb::ApiFormat::Anthropic as i32);
        assert_eq!(backend.anthropic_version, "2023-06-01");
        assert_eq!(backend.models[0].default_max_tokens, 2048);
        assert_eq!(backend.models[0].max_output_tokens, 64_000);

        let request = update_request(update_args(&["claude", "--api-format", "openai"])).unwrap();
        assert_eq!(
            request.update_mask.unwrap().paths,
            vec!["api_format".to_owned()]
        );
        assert_eq!(
            request.backend.unwrap().api_format,
            pb::ApiFormat::Openai as i32
        );
    }

    #[test]
    fn update_without_flags_is_a_usage_error() {
        let err = update_request(update_args(&["b1"])).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn missing_key_variable_is_an_input_error() {
        let args = ApiKeyArgs {
            api_key_env: Some("SLUICECTL_TEST_SURELY_UNSET_VARIABLE".into()),
            api_key_stdin: false,
        };
        let err = read_api_key(&args).unwrap_err();
        assert!(err.to_string().contains("is not set"), "{err}");
        assert_eq!(err.exit_code(), 1);
    }
}
