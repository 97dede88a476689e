//! Tool calls a provider bills by the call, on top of a request's tokens.
//!
//! Some tools run at the provider, inside one request, and each of their calls has a price of
//! its own: Anthropic's web search ($10 per 1,000 searches), OpenAI's web search and file
//! search in the Responses API ($10 and $2.50 per 1,000 calls). The answer says how many there
//! were: an Anthropic message's `usage.server_tool_use` counts them (`web_search_requests`,
//! `web_fetch_requests`: the tool `web_search`, `web_fetch`), and a Responses object lists
//! each call among its `output` items (`web_search_call`, `file_search_call`: the tool
//! `web_search`, `file_search`; any `<tool>_call` item names its tool so, but a web search's
//! page opened or searched, an `open_page` or `find_in_page` action, is no search).
//!
//! A route lists the tools it prices ([`CallPrices`]); the answers of a route that lists none,
//! nearly all of them, are not read for calls at all. Those of a route that does are read
//! where their usage is (a whole answer, the stream event that carries its figures: Anthropic's
//! `message_delta`, whose counts are the message's so far, and the Responses API's
//! `response.completed`), by serde, at those fixed places only: a client's metadata or tool
//! definitions echoed in the answer are never counted. Read twice (a stream's events), a
//! tool's count is the largest read, never a sum. A stream's calls are also counted as they
//! pass ([`CallPrices::count_event`]), so a client that leaves before the last usage is
//! charged the calls it was shown. Once the answer's final figures gave a tool's count (a
//! whole answer, `message_delta`'s `<tool>_requests`, a Responses stream's final response:
//! [`Given`]), that count is the tool's: a search that failed (Anthropic's `max_uses_exceeded`,
//! `too_many_requests`, …) streams its `server_tool_use` block but is not billed. For a tool
//! they gave none of (a stream cut before them, a backend that does not count it), the
//! request's count is the larger of the two.
//!
//! One name is no tool: [`REQUEST`], the request itself. Some models bill a fee for each
//! request on top of its tokens, which no answer counts: OpenAI's search models in Chat
//! Completions search the web for every request, Perplexity's Sonar models add a request
//! fee. A route that prices `request` charges it once for each request its backend answered
//! (the provider processed it: it reported or was estimated tokens, or may have billed it
//! without saying: [`CallPrices::count_request`]), never one it refused; an answer's
//! `request_requests` or `request_call` is not read for it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use sluice_proto::limits::MAX_CALL_PRICES;

/// The name a route prices the request itself by, once for each request answered.
pub const REQUEST: &str = "request";

/// How many calls of each of a route's [`CallPrices`] an answer reported, by their order.
pub type Counted = [u32; MAX_CALL_PRICES];

/// Which of a route's [`CallPrices`] an answer's final figures gave a count of, by their order
/// (a tool's count there is what its calls were billed).
pub type Given = [bool; MAX_CALL_PRICES];

/// A priced tool: its name and what a call costs, in nano-units.
type Priced = crate::tiers::Named<u64>;

/// A route's priced tools: each the name an answer counts its calls by and what a call costs,
/// in nano-units. Cloned with the route into each request's accounting: `None`, the routes
/// without any, costs nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallPrices(Option<Arc<[Priced]>>);

impl CallPrices {
    /// The first [`MAX_CALL_PRICES`] of `prices`, each a tool and its price per 1,000 calls
    /// (a tool named twice taken once, as the control plane refuses both); a price that is not
    /// a finite number from 0 counts as 0.
    pub fn new<'a>(prices: impl IntoIterator<Item = (&'a str, f64)>) -> Self {
        // Per 1,000 calls in currency units is per call in millionths: 1e9 / 1e3.
        Self(crate::tiers::named_once(
            prices,
            MAX_CALL_PRICES,
            |per_thousand| match per_thousand.is_finite() && per_thousand >= 0.0 {
                true => (per_thousand * 1e6).round() as u64,
                false => 0,
            },
        ))
    }

    /// Whether the route prices any tool's calls (only then are its answers read for them).
    pub fn any(&self) -> bool {
        self.0.is_some()
    }

    /// Adds to `counted` the calls of this route's tools that `text` (a whole answer, or a
    /// stream's event) reports: each tool's count becomes the larger of the two. Which tools
    /// it gave the final count of is returned: those its top-level `usage` counts (a whole
    /// message, `message_delta`), and every one for a Responses object's `output` (a whole
    /// one, or the final response of a stream: the relay reads no other), which lists each
    /// call; not `message_start`'s, whose counts are the message's so far.
    pub fn count_in(&self, text: &[u8], counted: &mut Counted) -> Given {
        let mut given = Given::default();
        let Some(prices) = &self.0 else {
            return given;
        };
        let Ok(answer) = serde_json::from_slice::<Answer<'_>>(text) else {
            return given;
        };
        let usages = [(&answer.usage, true)]
            .into_iter()
            .chain(answer.response.iter().map(|i| (&i.usage, true)))
            .chain(answer.message.iter().map(|i| (&i.usage, false)));
        for (usage, last) in usages {
            if let Some(usage) = usage {
                let counts = usage.count(prices, counted);
                for (given, counted) in given.iter_mut().zip(counts) {
                    *given |= last && counted;
                }
            }
        }
        for items in [&answer.output]
            .into_iter()
            .chain(answer.response.iter().map(|i| &i.output))
            .flatten()
        {
            count_items(items, prices, counted);
            for (given, (tool, _)) in given.iter_mut().zip(prices.iter()) {
                *given |= **tool != *REQUEST;
            }
        }
        given
    }

    /// [`Self::count_in`] for the text of a `usage` value alone (an answer refused for memory
    /// keeps no more of it): Anthropic's counts its server tools' calls there.
    pub fn count_in_usage(&self, usage: &[u8], counted: &mut Counted) -> Given {
        let Some(prices) = &self.0 else {
            return Given::default();
        };
        match serde_json::from_slice::<Usage<'_>>(usage) {
            Ok(usage) => usage.count(prices, counted),
            Err(_) => Given::default(),
        }
    }

    /// Adds to `seen` the call a stream's event `kind` shows, if it is one: an Anthropic
    /// `content_block_start` of a `server_tool_use` block (its `name` the tool), a Responses
    /// `response.output_item.done` of a `<tool>_call` item. The answer's own counts come
    /// with its last usage; these are what a stream its client left before then had made.
    pub fn count_event(&self, kind: Option<&str>, data: &[u8], seen: &mut Counted) {
        let Some(prices) = &self.0 else {
            return;
        };
        let at = match kind {
            Some("content_block_start") => serde_json::from_slice::<BlockStart<'_>>(data)
                .ok()
                .and_then(|start| start.content_block)
                .filter(|block| block.kind.as_deref() == Some("server_tool_use"))
                .and_then(|block| priced(prices, block.name.as_deref()?)),
            Some("response.output_item.done") => serde_json::from_slice::<ItemDone<'_>>(data)
                .ok()
                .and_then(|done| priced(prices, done.item?.billed_tool()?)),
            _ => None,
        };
        if let Some(i) = at {
            seen[i] = seen[i].saturating_add(1);
        }
    }

    /// Counts the request itself as one call of [`REQUEST`], if the route prices it: the
    /// request was answered, and so billed its fee.
    pub fn count_request(&self, counted: &mut Counted) {
        if let Some((i, _)) = self.request_fee() {
            counted[i] = 1;
        }
    }

    /// What the route charges for each request it answers ([`REQUEST`]), in nano-units: what
    /// a budget reserves besides the prompt. 0 for a route without one (at once for the routes
    /// that price no calls at all).
    pub fn request_fee_nanos(&self) -> u64 {
        self.request_fee().map_or(0, |(_, fee)| fee)
    }

    /// [`REQUEST`]'s position among the route's priced tools, and its price.
    fn request_fee(&self) -> Option<(usize, u64)> {
        let prices = self.0.as_deref()?;
        let at = prices.iter().position(|(tool, _)| **tool == *REQUEST)?;
        Some((at, prices[at].1))
    }

    /// What the calls in `counted` cost, in nano-units.
    pub fn cost_nanos(&self, counted: &Counted) -> u64 {
        self.billed(counted).fold(0, |cost, (_, calls, per_call)| {
            cost.saturating_add(u64::from(calls).saturating_mul(per_call))
        })
    }

    /// The calls in `counted` by tool (`web_search=3+file_search=1`); `None` for none.
    pub fn names(&self, counted: &Counted) -> Option<String> {
        let mut joined: Option<String> = None;
        for (tool, calls, _) in self.billed(counted) {
            let line = joined.get_or_insert_with(String::new);
            if !line.is_empty() {
                line.push('+');
            }
            line.push_str(tool);
            line.push('=');
            line.push_str(&calls.to_string());
        }
        joined
    }

    fn billed<'s>(&'s self, counted: &'s Counted) -> impl Iterator<Item = (&'s str, u32, u64)> {
        self.0
            .as_deref()
            .unwrap_or_default()
            .iter()
            .zip(counted)
            .filter(|(_, calls)| **calls > 0)
            .map(|((tool, per_call), calls)| (&**tool, *calls, *per_call))
    }
}

/// The members of an answer or event that count tool calls; every other member is skipped.
#[derive(Deserialize)]
struct Answer<'a> {
    /// Anthropic's message and `message_delta` event.
    #[serde(borrow, default)]
    usage: Option<Usage<'a>>,
    /// A Responses object's items.
    #[serde(borrow, default)]
    output: Option<Vec<Item<'a>>>,
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
    usage: Option<Usage<'a>>,
    #[serde(borrow, default)]
    output: Option<Vec<Item<'a>>>,
}

/// Anthropic's `usage.server_tool_use`: `<tool>_requests` counts (an OpenAI `usage` has none).
#[derive(Deserialize)]
struct Usage<'a> {
    #[serde(borrow, default)]
    server_tool_use: Option<BTreeMap<Cow<'a, str>, Count>>,
}

/// A member of `server_tool_use`: a count, or something newer that is not one (skipped).
#[derive(Deserialize)]
#[serde(untagged)]
enum Count {
    Calls(u64),
    Other(serde::de::IgnoredAny),
}

/// A Responses output item, by its `type` (and a web search's `action`) alone.
#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Action<'a>>,
}

/// What a `web_search_call` did: `search`, or `open_page` and `find_in_page`, which are not
/// billed as searches.
#[derive(Deserialize)]
struct Action<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

impl Item<'_> {
    /// The tool this item is a billed call of: `X` for an `X_call` item, but for a web search's
    /// page opened or searched (a `web_search_call` whose action is not `search`).
    fn billed_tool(&self) -> Option<&str> {
        let tool = self.kind.as_deref()?.strip_suffix("_call")?;
        let action = self.action.as_ref().and_then(|a| a.kind.as_deref());
        match (tool, action) {
            ("web_search", Some(action)) if action != "search" => None,
            _ => Some(tool),
        }
    }
}

/// An Anthropic stream's `content_block_start` event, for its block's `type` and `name`.
#[derive(Deserialize)]
struct BlockStart<'a> {
    #[serde(borrow, default)]
    content_block: Option<Block<'a>>,
}

#[derive(Deserialize)]
struct Block<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
}

/// A Responses stream's `response.output_item.done` event, for its item.
#[derive(Deserialize)]
struct ItemDone<'a> {
    #[serde(borrow, default)]
    item: Option<Item<'a>>,
}

/// The position of `tool` among a route's priced tools; never [`REQUEST`]'s, which no answer
/// counts.
fn priced(prices: &[Priced], tool: &str) -> Option<usize> {
    match tool {
        REQUEST => None,
        _ => prices.iter().position(|(priced, _)| **priced == *tool),
    }
}

impl Usage<'_> {
    /// Raises each priced tool's count in `counted` to its `<tool>_requests` here; which
    /// tools were counted here is returned.
    fn count(&self, prices: &[Priced], counted: &mut Counted) -> Given {
        let mut given = Given::default();
        for (name, count) in self.server_tool_use.iter().flatten() {
            let (Some(tool), Count::Calls(count)) = (name.strip_suffix("_requests"), count) else {
                continue;
            };
            if let Some(i) = priced(prices, tool) {
                counted[i] = counted[i].max(u32::try_from(*count).unwrap_or(u32::MAX));
                given[i] = true;
            }
        }
        given
    }
}

/// Raises each priced tool's count in `counted` to its `<tool>_call` items among `items`, one
/// answer's output.
fn count_items(items: &[Item<'_>], prices: &[Priced], counted: &mut Counted) {
    let mut calls: Counted = [0; MAX_CALL_PRICES];
    for tool in items.iter().filter_map(Item::billed_tool) {
        if let Some(i) = priced(prices, tool) {
            calls[i] = calls[i].saturating_add(1);
        }
    }
    for (counted, calls) in counted.iter_mut().zip(calls) {
        *counted = (*counted).max(calls);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices() -> CallPrices {
        CallPrices::new([
            ("web_search", 10.0),
            ("file_search", 2.5),
            ("web_fetch", 0.0),
        ])
    }

    fn read(prices: &CallPrices, texts: &[&str]) -> Option<String> {
        let mut counted = [0; MAX_CALL_PRICES];
        for text in texts {
            prices.count_in(text.as_bytes(), &mut counted);
        }
        prices.names(&counted)
    }

    #[test]
    fn each_api_s_calls_are_read_where_it_counts_them() {
        let prices = prices();
        // An Anthropic message, and its stream's `message_start` and `message_delta`s, whose
        // counts are the message's so far.
        assert_eq!(
            read(&prices, &[r#"{"type":"message","usage":{"input_tokens":9,"server_tool_use":{"web_search_requests":3,"web_fetch_requests":1}}}"#]).as_deref(),
            Some("web_search=3+web_fetch=1")
        );
        assert_eq!(
            read(
                &prices,
                &[
                    r#"{"type":"message_start","message":{"usage":{"input_tokens":9,"server_tool_use":{"web_search_requests":0}}}}"#,
                    r#"{"type":"message_delta","usage":{"output_tokens":5,"server_tool_use":{"web_search_requests":2}}}"#,
                    r#"{"type":"message_delta","usage":{"output_tokens":9,"server_tool_use":{"web_search_requests":2}}}"#,
                ]
            )
            .as_deref(),
            Some("web_search=2")
        );
        // A Responses object, and its `response.completed` event: one call an item.
        let output = r#"[{"type":"web_search_call","id":"ws_1","status":"completed"},{"type":"message","content":[]},{"type":"web_search_call"},{"type":"file_search_call","queries":["web_search_call"]},{"type":"function_call","name":"web_search"}]"#;
        assert_eq!(
            read(
                &prices,
                &[&format!(r#"{{"object":"response","output":{output}}}"#)]
            )
            .as_deref(),
            Some("web_search=2+file_search=1")
        );
        assert_eq!(
            read(
                &prices,
                &[&format!(
                    r#"{{"type":"response.completed","response":{{"output":{output},"usage":{{"input_tokens":1}}}}}}"#
                )]
            )
            .as_deref(),
            Some("web_search=2+file_search=1")
        );
    }

    #[test]
    fn calls_a_route_does_not_price_or_a_client_shaped_are_not_counted() {
        let prices = prices();
        for text in [
            // Tools the route does not price, and a client's own function calls.
            r#"{"usage":{"server_tool_use":{"code_execution_requests":4}}}"#,
            r#"{"output":[{"type":"function_call"},{"type":"image_generation_call"}]}"#,
            // Tool definitions and metadata a Responses object echoes; a chat answer.
            r#"{"object":"response","tools":[{"type":"web_search"}],"metadata":{"output":"x"},"output":[]}"#,
            r#"{"choices":[{"message":{"content":"web_search_call"}}],"usage":{"prompt_tokens":1}}"#,
            // A count that is not one; text that is not JSON.
            r#"{"usage":{"server_tool_use":{"web_search_requests":-1}}}"#,
            r#"{"usage":{"server_tool_use":{"web_search_requests":3}"#,
            "",
        ] {
            assert_eq!(read(&prices, &[text]), None, "{text}");
        }
        // A member of `server_tool_use` that is not a count leaves the others read.
        assert_eq!(
            read(
                &prices,
                &[r#"{"usage":{"server_tool_use":{"new_tool":{"x":1},"web_search_requests":1}}}"#]
            )
            .as_deref(),
            Some("web_search=1")
        );
        assert_eq!(
            read(
                &CallPrices::default(),
                &[r#"{"usage":{"server_tool_use":{"web_search_requests":3}}}"#]
            ),
            None
        );
        // A `usage` value alone (an answer refused for memory keeps no more): its counts.
        let mut counted = [0; MAX_CALL_PRICES];
        prices.count_in_usage(
            br#"{"input_tokens":1,"server_tool_use":{"web_search_requests":4}}"#,
            &mut counted,
        );
        assert_eq!(prices.names(&counted).as_deref(), Some("web_search=4"));
    }

    /// The counts an answer's final figures give are told from those of a stream's start and
    /// of an answer that does not count a tool: only the first are what was billed.
    #[test]
    fn the_final_figures_say_which_tools_they_counted() {
        let prices = prices(); // web_search, file_search, web_fetch
        let given = |text: &str| prices.count_in(text.as_bytes(), &mut [0; MAX_CALL_PRICES]);
        let mut only_search = Given::default();
        only_search[0] = true;
        // A whole message, or `message_delta`: the tools its usage counts, 0 included.
        assert_eq!(
            given(
                r#"{"type":"message_delta","usage":{"output_tokens":3,"server_tool_use":{"web_search_requests":0}}}"#
            ),
            only_search
        );
        // `message_start`'s are the message's so far.
        assert_eq!(
            given(
                r#"{"type":"message_start","message":{"usage":{"server_tool_use":{"web_search_requests":0}}}}"#
            ),
            Given::default()
        );
        // A usage that counts no tool (another Anthropic-compatible server's), or no usage.
        assert_eq!(given(r#"{"usage":{"output_tokens":3}}"#), Given::default());
        assert_eq!(given(r#"{"choices":[]}"#), Given::default());
        // A Responses object's output lists every call.
        let all = [true; 3];
        for text in [
            r#"{"object":"response","output":[]}"#,
            r#"{"type":"response.completed","response":{"output":[{"type":"web_search_call"}]}}"#,
        ] {
            assert_eq!(given(text)[..3], all, "{text}");
        }
        let mut counted = [0; MAX_CALL_PRICES];
        assert_eq!(
            prices.count_in_usage(
                br#"{"server_tool_use":{"web_fetch_requests":2}}"#,
                &mut counted
            )[..3],
            [false, false, true]
        );
    }

    #[test]
    fn a_web_searchs_pages_opened_or_searched_are_not_searches() {
        let prices = prices();
        let text = r#"{"object":"response","output":[{"type":"web_search_call","action":{"type":"search","query":"q"}},{"type":"web_search_call","action":{"type":"open_page","url":"u"}},{"type":"web_search_call","action":{"type":"find_in_page","pattern":"p"}},{"type":"web_search_call"}]}"#;
        assert_eq!(read(&prices, &[text]).as_deref(), Some("web_search=2"));
    }

    #[test]
    fn a_streams_events_count_the_calls_its_client_saw() {
        let prices = prices();
        let mut seen = [0; MAX_CALL_PRICES];
        let events = [
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"server_tool_use","id":"s1","name":"web_search","input":{}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":1,"content_block":{"type":"web_search_tool_result","tool_use_id":"s1","content":[]}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":2,"content_block":{"type":"server_tool_use","id":"s2","name":"web_search","input":{}}}"#,
            ),
            // A client's own tool named like a server tool is its own call.
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":3,"content_block":{"type":"tool_use","id":"t","name":"web_search","input":{}}}"#,
            ),
            (
                "response.output_item.done",
                r#"{"type":"response.output_item.done","output_index":0,"item":{"type":"file_search_call","id":"fs"}}"#,
            ),
            (
                "response.output_item.done",
                r#"{"type":"response.output_item.done","output_index":1,"item":{"type":"web_search_call","action":{"type":"open_page"}}}"#,
            ),
            // Added is not done: counted once, when done.
            (
                "response.output_item.added",
                r#"{"type":"response.output_item.added","output_index":2,"item":{"type":"file_search_call","id":"fs2"}}"#,
            ),
        ];
        for (kind, data) in events {
            prices.count_event(Some(kind), data.as_bytes(), &mut seen);
        }
        assert_eq!(
            prices.names(&seen).as_deref(),
            Some("web_search=2+file_search=1")
        );
        CallPrices::default().count_event(Some(events[0].0), events[0].1.as_bytes(), &mut seen);
        assert_eq!(seen[0], 2);
    }

    #[test]
    fn calls_cost_their_price_per_thousand_each() {
        let prices = prices();
        let mut counted = [0; MAX_CALL_PRICES];
        prices.count_in(
            br#"{"usage":{"server_tool_use":{"web_search_requests":3,"web_fetch_requests":2}},"output":[{"type":"file_search_call"}]}"#,
            &mut counted,
        );
        // $10 and $2.50 per 1,000: a cent and a quarter cent a call, in nano-units; fetches
        // are priced at 0 (counted, free).
        assert_eq!(prices.cost_nanos(&counted), 3 * 10_000_000 + 2_500_000);
        assert_eq!(
            prices.names(&counted).as_deref(),
            Some("web_search=3+file_search=1+web_fetch=2")
        );
        assert_eq!(CallPrices::default().cost_nanos(&counted), 0);
    }

    #[test]
    fn the_request_itself_is_counted_once_and_never_read_from_an_answer() {
        let prices = CallPrices::new([("web_search", 10.0), (REQUEST, 25.0)]);
        let mut counted = [0; MAX_CALL_PRICES];
        // An answer that claims requests counts none of them.
        prices.count_in(
            br#"{"usage":{"server_tool_use":{"request_requests":7,"web_search_requests":1}},"output":[{"type":"request_call"}]}"#,
            &mut counted,
        );
        prices.count_event(
            Some("response.output_item.done"),
            br#"{"item":{"type":"request_call"}}"#,
            &mut counted,
        );
        assert_eq!(prices.names(&counted).as_deref(), Some("web_search=1"));
        prices.count_request(&mut counted);
        prices.count_request(&mut counted);
        assert_eq!(
            prices.names(&counted).as_deref(),
            Some("web_search=1+request=1")
        );
        // $25 per 1,000 requests: 2.5 cents a request.
        assert_eq!(prices.request_fee_nanos(), 25_000_000);
        assert_eq!(prices.cost_nanos(&counted), 10_000_000 + 25_000_000);
        let plain = CallPrices::new([("web_search", 10.0)]);
        let mut counted = [0; MAX_CALL_PRICES];
        plain.count_request(&mut counted);
        assert_eq!(
            (plain.request_fee_nanos(), counted),
            (0, [0; MAX_CALL_PRICES])
        );
        assert_eq!(CallPrices::default().request_fee_nanos(), 0);
    }

    #[test]
    fn a_route_s_priced_tools_are_bounded_and_named_once() {
        let many = (0..20).map(|i| format!("t{i}")).collect::<Vec<_>>();
        let prices = CallPrices::new(many.iter().map(|t| (t.as_str(), 1.0)));
        assert_eq!(prices.0.as_deref().map(<[_]>::len), Some(MAX_CALL_PRICES));
        let twice = CallPrices::new([
            ("web_search", 10.0),
            ("web_search", 25.0),
            ("odd", f64::NAN),
        ]);
        let mut counted = [0; MAX_CALL_PRICES];
        twice.count_in(
            br#"{"output":[{"type":"web_search_call"},{"type":"odd_call"}]}"#,
            &mut counted,
        );
        assert_eq!(twice.cost_nanos(&counted), 10_000_000);
        assert!(!CallPrices::new([]).any());
    }
}
