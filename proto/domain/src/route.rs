//! What an update of a backend's routes would clear: the rule the control plane applies to an
//! update that lists them and `sluicectl` applies to the one it sends, defined once.
//!
//! An update naming `models` replaces the routes whole. A client that does not know a newer
//! field of `ModelRoute` (an older `sluicectl`, a client generated from older protos with a
//! runtime that keeps no unknown fields, one that builds its routes anew) sends it unset, and
//! would clear what the route stored there: audio charged at the text price, a long-context
//! band lost. The control plane refuses such an update unless it says it means it
//! (`UpdateBackendRequest.clear_route_fields`), which only a client that knows the field can.

use sluice_proto::v1 as pb;

/// The `ModelRoute` fields every client that can write routes has always sent: a route
/// without them is not a route. The others are [`cleared_fields`]'s to check.
pub const ALWAYS_SENT: [&str; 4] = [
    "name",
    "upstream_name",
    "input_price_per_mtok",
    "output_price_per_mtok",
];

/// The fields of `stored` (a route as stored) that `new` (the same route, by name, as an
/// update lists it) sets back to their default: unset, 0, or an empty list. Each field of
/// `ModelRoute` is here or in [`ALWAYS_SENT`] (a control-plane test reads the protos' own
/// descriptor to keep it so).
pub fn cleared_fields(stored: &pb::ModelRoute, new: &pb::ModelRoute) -> Vec<&'static str> {
    [
        (
            stored.cached_input_price_per_mtok.is_some()
                && new.cached_input_price_per_mtok.is_none(),
            "cached_input_price_per_mtok",
        ),
        (
            stored.default_max_tokens != 0 && new.default_max_tokens == 0,
            "default_max_tokens",
        ),
        (
            stored.cache_write_price_per_mtok.is_some() && new.cache_write_price_per_mtok.is_none(),
            "cache_write_price_per_mtok",
        ),
        (
            !stored.tier_multipliers.is_empty() && new.tier_multipliers.is_empty(),
            "tier_multipliers",
        ),
        (
            stored.long_context.is_some() && new.long_context.is_none(),
            "long_context",
        ),
        (
            !stored.call_prices.is_empty() && new.call_prices.is_empty(),
            "call_prices",
        ),
        (
            stored.audio_input_price_per_mtok.is_some() && new.audio_input_price_per_mtok.is_none(),
            "audio_input_price_per_mtok",
        ),
        (
            stored.audio_output_price_per_mtok.is_some()
                && new.audio_output_price_per_mtok.is_none(),
            "audio_output_price_per_mtok",
        ),
        (
            stored.max_output_tokens != 0 && new.max_output_tokens == 0,
            "max_output_tokens",
        ),
    ]
    .into_iter()
    .filter_map(|(cleared, name)| cleared.then_some(name))
    .collect()
}

/// Every field [`cleared_fields`] checks, for the test that all of `ModelRoute` is covered.
pub const CHECKED: [&str; 9] = [
    "cached_input_price_per_mtok",
    "default_max_tokens",
    "cache_write_price_per_mtok",
    "tier_multipliers",
    "long_context",
    "call_prices",
    "audio_input_price_per_mtok",
    "audio_output_price_per_mtok",
    "max_output_tokens",
];

/// The routes of `new` that clear a field their namesake in `stored` holds, each with its
/// place in `new`, its name and the fields cleared.
pub fn clearing<'a>(
    stored: &[pb::ModelRoute],
    new: &'a [pb::ModelRoute],
) -> Vec<(usize, &'a str, Vec<&'static str>)> {
    new.iter()
        .enumerate()
        .filter_map(|(i, route)| {
            let old = stored.iter().find(|old| old.name == route.name)?;
            let cleared = cleared_fields(old, route);
            (!cleared.is_empty()).then_some((i, route.name.as_str(), cleared))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each checked field, set in the stored route and unset in the new one, is named; a
    /// route that keeps it, changes it, or is new names nothing.
    #[test]
    fn each_field_set_back_to_its_default_is_named() {
        let full = pb::ModelRoute {
            name: "m".into(),
            upstream_name: "up".into(),
            input_price_per_mtok: 1.0,
            output_price_per_mtok: 2.0,
            cached_input_price_per_mtok: Some(0.1),
            default_max_tokens: 100,
            cache_write_price_per_mtok: Some(1.25),
            tier_multipliers: vec![pb::TierMultiplier {
                tier: "priority".into(),
                multiplier: 2.0,
            }],
            long_context: Some(pb::LongContextPrices {
                above_prompt_tokens: 200_000,
                input_multiplier: 2.0,
                output_multiplier: 1.5,
            }),
            call_prices: vec![pb::CallPrice {
                tool: "web_search".into(),
                price_per_thousand_calls: 10.0,
            }],
            audio_input_price_per_mtok: Some(32.0),
            audio_output_price_per_mtok: Some(64.0),
            max_output_tokens: 16_384,
        };
        let bare = pb::ModelRoute {
            name: "m".into(),
            upstream_name: "up".into(),
            input_price_per_mtok: 1.0,
            output_price_per_mtok: 2.0,
            ..Default::default()
        };
        assert_eq!(cleared_fields(&full, &bare), CHECKED);
        assert!(cleared_fields(&full, &full).is_empty());
        assert!(cleared_fields(&bare, &full).is_empty());
        let changed = pb::ModelRoute {
            audio_input_price_per_mtok: Some(0.0),
            ..full.clone()
        };
        assert!(cleared_fields(&full, &changed).is_empty());
        let other = pb::ModelRoute {
            name: "other".into(),
            ..bare.clone()
        };
        assert_eq!(
            clearing(std::slice::from_ref(&full), &[other, bare]),
            vec![(1, "m", CHECKED.to_vec())]
        );
    }
}
