//! Price tiers: what a route's prices are multiplied by when the answer says it was served at
//! a tier that costs more or less than the standard one.
//!
//! Providers sell one model at several prices and say in the answer which one a request ran
//! at: OpenAI's top-level `service_tier` (`priority`, at 1.7 to 2.5 times the standard price,
//! which a request for its renamed "fast" mode is answered with too; `ultrafast`; `flex` at
//! half), in a chat completion, in each chunk of its stream and in a Responses object;
//! Anthropic's `usage.speed` (`fast`: 2 to 6 times), `usage.inference_geo` (`us`: 1.1 times)
//! and `usage.service_tier`. The tier is the
//! provider's decision (a project's default tier, a flex request served at the standard tier
//! when capacity is short), so it is read from the answer, not from the request.
//!
//! A route lists the tiers it prices ([`Tiers`]); the answers of a route that lists none, nearly
//! all of them, are not read for tiers at all. Those of a route that does are read once their
//! usage is (a whole answer, the stream event that carries its figures), by serde, for the few
//! members that name a tier at fixed places: never a nested object a client shaped (a Responses
//! object's `metadata`, a JSON schema it echoes).

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;
use sluice_proto::limits::MAX_PRICE_TIERS;

/// The most tiers a route lists (the control plane refuses more): the tiers an answer reported
/// are a mask of one bit each.
const MAX_TIERS: usize = MAX_PRICE_TIERS;
const _: () = assert!(MAX_TIERS <= Reported::BITS as usize);

/// A route's price tiers: each the word an answer names it by and what it multiplies the
/// route's prices by. Cloned with the route into each request's accounting: `None`, the
/// routes without tiers, costs nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tiers(Option<Arc<[Tier]>>);

/// A tier's name and multiplier.
type Tier = Named<f64>;

/// Which of a route's [`Tiers`] an answer reported, one bit each by their order.
pub type Reported = u8;

impl Tiers {
    /// The first [`MAX_TIERS`] of `tiers`, a tier named twice taken once (the control plane
    /// refuses both); a multiplier that is not a finite number from 0 counts as 1.
    pub fn new<'a>(tiers: impl IntoIterator<Item = (&'a str, f64)>) -> Self {
        Self(named_once(tiers, MAX_TIERS, |multiplier| {
            match multiplier.is_finite() && multiplier >= 0.0 {
                true => multiplier,
                false => 1.0,
            }
        }))
    }

    /// Whether the route prices any tier (only then are its answers read for one).
    pub fn any(&self) -> bool {
        self.0.is_some()
    }

    /// The tiers of this route that `text` (a whole answer, or a stream's event) reports.
    pub fn reported_in(&self, text: &[u8]) -> Reported {
        if !self.any() {
            return 0;
        }
        let Ok(answer) = serde_json::from_slice::<Answer<'_>>(text) else {
            return 0;
        };
        self.mask_of(answer.names())
    }

    /// The tiers of this route that `usage`, the text of an answer's `usage` value alone,
    /// names (Anthropic's `speed`, `inference_geo` and `service_tier`).
    pub fn reported_in_usage(&self, usage: &[u8]) -> Reported {
        let Ok(usage) = serde_json::from_slice::<UsageTiers<'_>>(usage) else {
            return 0;
        };
        self.mask_of(usage.names())
    }

    /// The tier of this route named `name`, if it prices one.
    pub fn named(&self, name: &str) -> Reported {
        self.mask_of(std::iter::once(name))
    }

    fn mask_of<'a>(&self, names: impl Iterator<Item = &'a str>) -> Reported {
        let Some(tiers) = &self.0 else {
            return 0;
        };
        names
            .filter_map(|name| tiers.iter().position(|(tier, _)| **tier == *name))
            .fold(0, |mask, i| mask | 1 << i)
    }

    /// What the tiers in `reported` multiply the prices by, together (1 for none).
    pub fn multiplier(&self, reported: Reported) -> f64 {
        self.reported(reported).map(|(_, m)| m).product()
    }

    /// The names of the tiers in `reported`, joined by `+` (`fast+us`); `None` for none.
    pub fn names(&self, reported: Reported) -> Option<String> {
        let mut names = self.reported(reported).map(|(tier, _)| tier);
        let first = names.next()?;
        Some(names.fold(first.to_owned(), |joined, name| joined + "+" + name))
    }

    /// The most the tiers can multiply the prices by (at least 1): an answer may report any of
    /// them, and all at once.
    pub fn ceiling(&self) -> f64 {
        self.0
            .as_deref()
            .unwrap_or_default()
            .iter()
            .fold(1.0, |product, (_, m)| match *m > 1.0 {
                true => product * m,
                false => product,
            })
    }

    fn reported(&self, reported: Reported) -> impl Iterator<Item = (&str, f64)> {
        self.0
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter(move |(i, _)| reported & 1 << i != 0)
            .map(|(_, (tier, m))| (&**tier, *m))
    }
}

/// A name a route lists, and its value.
pub(crate) type Named<T> = (Box<str>, T);

/// A route's list of named values ([`Tiers`], [`crate::calls::CallPrices`]): the first `most`
/// of `items`, a name given twice taken once (the control plane refuses both), each value as
/// `value` makes it; `None` for none.
pub(crate) fn named_once<'a, T>(
    items: impl IntoIterator<Item = (&'a str, f64)>,
    most: usize,
    value: impl Fn(f64) -> T,
) -> Option<Arc<[Named<T>]>> {
    let mut list: Vec<Named<T>> = Vec::new();
    for (name, number) in items {
        if list.len() == most || list.iter().any(|(named, _)| **named == *name) {
            continue;
        }
        list.push((name.into(), value(number)));
    }
    (!list.is_empty()).then(|| list.into())
}

/// The members of an answer or event that name its tier; every other member is skipped.
#[derive(Deserialize)]
struct Answer<'a> {
    /// OpenAI's chat completion, chunk and Responses object.
    #[serde(borrow, default)]
    service_tier: Option<Cow<'a, str>>,
    /// Anthropic's message and `message_delta` event.
    #[serde(borrow, default)]
    usage: Option<UsageTiers<'a>>,
    /// A Responses event's response object (`response.completed`).
    #[serde(borrow, default)]
    response: Option<Inner<'a>>,
    /// Anthropic's `message_start` event's message.
    #[serde(borrow, default)]
    message: Option<Inner<'a>>,
}

#[derive(Deserialize)]
struct Inner<'a> {
    #[serde(borrow, default)]
    service_tier: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    usage: Option<UsageTiers<'a>>,
}

/// Anthropic's `usage` members that name a tier (an OpenAI `usage` has none: its figures are
/// skipped).
#[derive(Deserialize)]
struct UsageTiers<'a> {
    #[serde(borrow, default)]
    service_tier: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    speed: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    inference_geo: Option<Cow<'a, str>>,
}

impl Answer<'_> {
    fn names(&self) -> impl Iterator<Item = &str> {
        let inner = [&self.response, &self.message].into_iter().flatten();
        let usages = [&self.usage]
            .into_iter()
            .chain(inner.clone().map(|i| &i.usage))
            .flatten()
            .flat_map(UsageTiers::names);
        [&self.service_tier]
            .into_iter()
            .chain(inner.map(|i| &i.service_tier))
            .flatten()
            .map(|name| &**name)
            .chain(usages)
    }
}

impl UsageTiers<'_> {
    fn names(&self) -> impl Iterator<Item = &str> {
        [&self.service_tier, &self.speed, &self.inference_geo]
            .into_iter()
            .flatten()
            .map(|name| &**name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiers() -> Tiers {
        Tiers::new([("priority", 2.0), ("flex", 0.5), ("fast", 6.0), ("us", 1.1)])
    }

    #[test]
    fn each_api_s_tier_is_read_where_it_reports_it() {
        let tiers = tiers();
        let read = |text: &str| tiers.names(tiers.reported_in(text.as_bytes()));
        // A chat completion (`service_tier` after `usage`, as OpenAI writes it) and a chunk.
        assert_eq!(
            read(r#"{"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":0}},"service_tier":"priority"}"#).as_deref(),
            Some("priority")
        );
        assert_eq!(
            read(r#"{"id":"c","service_tier":"flex","choices":[],"usage":{"prompt_tokens":1}}"#)
                .as_deref(),
            Some("flex")
        );
        // A Responses object, and its `response.completed` event.
        assert_eq!(
            read(r#"{"object":"response","service_tier":"priority","usage":{"input_tokens":1}}"#)
                .as_deref(),
            Some("priority")
        );
        assert_eq!(
            read(r#"{"type":"response.completed","response":{"service_tier":"flex","usage":{"input_tokens":1}}}"#).as_deref(),
            Some("flex")
        );
        // An Anthropic message (fast mode in the US), its `message_start` and `message_delta`.
        assert_eq!(
            read(r#"{"type":"message","usage":{"input_tokens":1,"service_tier":"standard","speed":"fast","inference_geo":"us"}}"#).as_deref(),
            Some("fast+us")
        );
        assert_eq!(
            read(r#"{"type":"message_start","message":{"usage":{"input_tokens":1,"inference_geo":"us"}}}"#).as_deref(),
            Some("us")
        );
        assert_eq!(
            read(r#"{"type":"message_delta","usage":{"output_tokens":9,"speed":"fast"}}"#)
                .as_deref(),
            Some("fast")
        );
    }

    #[test]
    fn tiers_a_route_does_not_list_or_a_client_shaped_are_not_read() {
        let tiers = tiers();
        for text in [
            r#"{"service_tier":"default","usage":{"prompt_tokens":1}}"#,
            r#"{"usage":{"prompt_tokens":1,"speed":"standard","inference_geo":"global"}}"#,
            // A client's metadata, or a JSON schema, echoed in a Responses object.
            r#"{"object":"response","metadata":{"service_tier":"flex"},"text":{"format":{"schema":{"service_tier":"flex"}}},"service_tier":"default"}"#,
            // A chat answer's choices (the model's words are strings, a tool's arguments too).
            r#"{"choices":[{"message":{"content":"\"service_tier\":\"flex\"","service_tier":"flex"}}]}"#,
            // Not JSON, or a tier that is not a string: nothing read, the standard price.
            r#"{"service_tier":"flex""#,
            r#"{"service_tier":2}"#,
            "",
        ] {
            assert_eq!(tiers.reported_in(text.as_bytes()), 0, "{text}");
        }
        assert_eq!(
            Tiers::default().reported_in(br#"{"service_tier":"flex"}"#),
            0
        );
        // A `usage` value alone (an answer refused for memory keeps no more): its own tiers.
        let usage = br#"{"input_tokens":1,"speed":"fast","inference_geo":"us"}"#;
        assert_eq!(
            tiers.names(tiers.reported_in_usage(usage)).as_deref(),
            Some("fast+us")
        );
        assert_eq!(tiers.reported_in_usage(br#"{"prompt_tokens":1}"#), 0);
    }

    #[test]
    fn the_tiers_reported_multiply_the_prices_together() {
        let tiers = tiers();
        let fast_us = tiers.reported_in(br#"{"usage":{"speed":"fast","inference_geo":"us"}}"#);
        assert!((tiers.multiplier(fast_us) - 6.6).abs() < 1e-12);
        assert_eq!(tiers.multiplier(0), 1.0);
        // A tier named twice in one answer counts once.
        let twice = tiers.reported_in(br#"{"service_tier":"fast","usage":{"speed":"fast"}}"#);
        assert_eq!(tiers.multiplier(twice), 6.0);
        // The ceiling: every tier above 1 at once; 1 without any.
        assert!((tiers.ceiling() - 2.0 * 6.0 * 1.1).abs() < 1e-12);
        assert_eq!(Tiers::new([("flex", 0.5)]).ceiling(), 1.0);
        assert_eq!(Tiers::default().ceiling(), 1.0);
    }

    #[test]
    fn a_route_s_tiers_are_bounded_and_named_once() {
        let many = (0..20).map(|i| format!("t{i}")).collect::<Vec<_>>();
        let tiers = Tiers::new(many.iter().map(|t| (t.as_str(), 2.0)));
        assert_eq!(tiers.ceiling(), 2f64.powi(MAX_TIERS as i32));
        let twice = Tiers::new([("fast", 2.0), ("fast", 3.0), ("odd", f64::NAN)]);
        assert_eq!(
            twice.multiplier(twice.reported_in(br#"{"service_tier":"fast"}"#)),
            2.0
        );
        assert_eq!(
            twice.multiplier(twice.reported_in(br#"{"service_tier":"odd"}"#)),
            1.0
        );
        assert!(!Tiers::new([]).any());
    }
}
