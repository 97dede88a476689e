//! The `request finished` line, the one log line each proxied request writes.
//!
//! In the text format (without ANSI styling: a log file, a pipe) its fields are written here,
//! in one pass into a reused buffer, with [`sluice_domain::logging::TextFields`], the same
//! writer the text format's field formatter uses, and handed to the formatter as one field,
//! [`WRITTEN_FIELDS`](sluice_domain::logging::WRITTEN_FIELDS), which it passes on as it is:
//! the line is the text that formatter writes for the fields one by one, byte for byte (tests
//! below check it). Fifteen fields recorded one by one, each through `tracing`'s value set and
//! the formatter's `dyn fmt::Write`, made the line cost about 7,100 instructions a request, a
//! sixth of all Sluice adds to a bare proxy; written in one pass into the event's message,
//! about 3,950, of which `fmt`'s machinery and the escape guard's second pass over the whole
//! message were several hundred, which the written field spares. The event keeps its target
//! and level, so `RUST_LOG` filters it as before. The JSON format, and the styled text of a
//! terminal, get the fields one by one as ever: machines read JSON's fields by name.

use std::cell::Cell;

use sluice_domain::logging::{TextFields, plain_text};
use sluice_proto::v1::ErrorKind;

use super::REQUEST_LOG_TARGET;

/// What the line says about a finished request.
pub(super) struct RequestLine<'a> {
    pub request_id: &'a str,
    pub client_key: &'a str,
    pub model: &'a str,
    /// Empty when no backend was chosen.
    pub backend: &'a str,
    pub status: u16,
    pub attempts: u32,
    pub stream: bool,
    pub latency_ms: u64,
    /// Left out of the line when nothing was sent.
    pub ttft_ms: Option<u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub cache_write_prompt_tokens: u64,
    pub cost_nanos: u64,
    /// The price tiers the cost was multiplied by (`fast+us`); left out when none.
    pub price_tier: Option<&'a str>,
    /// The calls of priced tools the cost includes (`web_search=3`); left out when none.
    pub tool_calls: Option<&'a str>,
    pub tokens_estimated: bool,
    pub error_kind: ErrorKind,
}

thread_local! {
    /// The last line written on this thread; its capacity is kept for the next.
    static LINE: Cell<String> = const { Cell::new(String::new()) };
}

impl RequestLine<'_> {
    /// Logs the line at `info`, target [`REQUEST_LOG_TARGET`].
    pub fn emit(&self) {
        if plain_text() {
            self.emit_text();
        } else {
            self.emit_fields();
        }
    }

    /// The fields as fields, for any format.
    fn emit_fields(&self) {
        tracing::info!(
            target: REQUEST_LOG_TARGET,
            request_id = %self.request_id,
            client_key = %self.client_key,
            model = %self.model,
            backend = self.backend,
            status = self.status,
            attempts = self.attempts,
            stream = self.stream,
            latency_ms = self.latency_ms,
            ttft_ms = self.ttft_ms,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            cached_prompt_tokens = self.cached_prompt_tokens,
            cache_write_prompt_tokens = self.cache_write_prompt_tokens,
            cost_nanos = self.cost_nanos,
            price_tier = self.price_tier,
            tool_calls = self.tool_calls,
            tokens_estimated = self.tokens_estimated,
            error_kind = self.error_kind.as_str_name(),
            "request finished"
        );
    }

    /// The fields written by [`Self::text`], for the unstyled text format. The text is
    /// written only if the event is enabled (the macro evaluates its fields after its checks).
    fn emit_text(&self) {
        // Gone only while the thread exits.
        let mut line = LINE.try_with(Cell::take).unwrap_or_default();
        tracing::info!(
            target: REQUEST_LOG_TARGET,
            sluice_written_fields = {
                line = self.text(std::mem::take(&mut line));
                line.as_str()
            }
        );
        let _ = LINE.try_with(|kept| kept.set(line));
    }

    /// `buffer` holding what the text format writes for [`Self::emit_fields`]'s event after
    /// its target. (The `String` itself, not a reference to it, is the writer: its writes
    /// are then inlined.)
    fn text(&self, mut buffer: String) -> String {
        buffer.clear();
        // The message, which has nothing to escape.
        buffer.push_str("request finished");
        let mut fields = TextFields::after(buffer);
        fields.display("request_id", self.request_id);
        fields.display("client_key", self.client_key);
        fields.display("model", self.model);
        fields.str("backend", self.backend);
        fields.u64("status", self.status.into());
        fields.u64("attempts", self.attempts.into());
        fields.bool("stream", self.stream);
        fields.u64("latency_ms", self.latency_ms);
        // `tracing` leaves out a field whose `Option` is `None`.
        if let Some(ttft_ms) = self.ttft_ms {
            fields.u64("ttft_ms", ttft_ms);
        }
        fields.u64("prompt_tokens", self.prompt_tokens);
        fields.u64("completion_tokens", self.completion_tokens);
        fields.u64("cached_prompt_tokens", self.cached_prompt_tokens);
        fields.u64("cache_write_prompt_tokens", self.cache_write_prompt_tokens);
        fields.u64("cost_nanos", self.cost_nanos);
        if let Some(tier) = self.price_tier {
            fields.str("price_tier", tier);
        }
        if let Some(calls) = self.tool_calls {
            fields.str("tool_calls", calls);
        }
        fields.bool("tokens_estimated", self.tokens_estimated);
        let mut line = fields.into_writer();
        // An error kind's name has nothing `Debug` escapes (a test below checks every one):
        // it is written between quotes, as `str` would after looking at each byte.
        line.push_str(" error_kind=\"");
        line.push_str(self.error_kind.as_str_name());
        line.push('"');
        line
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use std::sync::{Arc, Mutex};

    use proptest::prelude::*;
    use sluice_domain::logging::{EscapedFields, TextFormat};

    /// What a subscriber wrote.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    /// The two lines `emit_fields` and `emit_text` write in the servers' text format, without
    /// their timestamps.
    fn both_ways(line: &RequestLine<'_>) -> (String, String) {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let lines = lines.clone();
                move || lines.clone()
            })
            .with_ansi(false)
            .fmt_fields(EscapedFields)
            .event_format(TextFormat::default())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            line.emit_fields();
            let fields = lines.take();
            line.emit_text();
            (untimed(&fields), untimed(&lines.take()))
        })
    }

    /// One line without its timestamp (the first word), which differs by the time.
    fn untimed(text: &str) -> String {
        assert_eq!(text.lines().count(), 1, "{text}");
        let line = text.strip_suffix('\n').unwrap();
        line.split_once(' ').unwrap().1.to_owned()
    }

    fn line<'a>(request_id: &'a str, model: &'a str, backend: &'a str) -> RequestLine<'a> {
        RequestLine {
            request_id,
            client_key: "ck_1",
            model,
            backend,
            status: 200,
            attempts: 1,
            stream: true,
            latency_ms: 12,
            ttft_ms: Some(3),
            prompt_tokens: 10,
            completion_tokens: 20,
            cached_prompt_tokens: 0,
            cache_write_prompt_tokens: 0,
            cost_nanos: 1_500,
            price_tier: None,
            tool_calls: None,
            tokens_estimated: false,
            error_kind: ErrorKind::Unspecified,
        }
    }

    #[test]
    fn the_text_line_is_what_the_formatter_writes_for_the_fields() {
        let forged = "r\n2001-01-01T00:00:00.000000Z  INFO sluice::request: request finished \
                      request_id=forged status=200\u{1b}[31m";
        let mut cases = vec![
            line("req-1", "gpt-4o", "b1"),
            line(forged, "m \"quoted\" back\\slash\t\r", ""),
            line(
                "r",
                "x\u{202e}y\u{200b}z ünï ✓ \u{ad}\u{7f}\u{9b}",
                "b\"\n\\\u{1b}",
            ),
            line("", "", "é"),
        ];
        cases[1].ttft_ms = None;
        cases[1].stream = false;
        cases[1].tokens_estimated = true;
        cases[1].error_kind = ErrorKind::ClientCancelled;
        cases[2].status = 499;
        cases[2].attempts = u32::MAX;
        cases[2].latency_ms = u64::MAX;
        cases[2].ttft_ms = Some(0);
        cases[2].cost_nanos = u64::MAX;
        cases[2].price_tier = Some("fast+us");
        cases[2].tool_calls = Some("web_search=3+file_search=1");
        cases[3].price_tier = Some("\"\n\u{1b}");
        cases[3].tool_calls = Some("\"\n\u{1b}");
        for case in &cases {
            let (fields, text) = both_ways(case);
            assert_eq!(text, fields);
            assert!(
                text.starts_with(" INFO sluice::request: request finished request_id="),
                "{text}"
            );
        }
        let (forged_line, _) = both_ways(&cases[1]);
        assert!(
            forged_line.contains("request_id=r\\n2001-01-01T00"),
            "{forged_line}"
        );
        assert!(!forged_line.contains("ttft_ms"), "{forged_line}");
        assert!(forged_line.contains(" backend=\"\" "), "{forged_line}");
        assert!(!forged_line.contains('\u{1b}'), "{forged_line}");
        assert!(!forged_line.contains("price_tier"), "{forged_line}");
        assert!(!forged_line.contains("tool_calls"), "{forged_line}");
        let (tiered, _) = both_ways(&cases[2]);
        assert!(
            tiered.contains(
                " cost_nanos=18446744073709551615 price_tier=\"fast+us\" \
                 tool_calls=\"web_search=3+file_search=1\" "
            ),
            "{tiered}"
        );
    }

    #[test]
    fn every_error_kinds_name_is_written_between_quotes_by_debug() {
        let mut kinds = 0;
        for value in 0..1_000 {
            if let Ok(kind) = ErrorKind::try_from(value) {
                let name = kind.as_str_name();
                assert_eq!(format!("{name:?}"), format!("\"{name}\""));
                let mut case = line("r", "m", "b");
                case.error_kind = kind;
                let (fields, text) = both_ways(&case);
                assert_eq!(text, fields);
                assert!(text.ends_with(&format!(" error_kind=\"{name}\"")), "{text}");
                kinds += 1;
            }
        }
        assert!(kinds >= 10, "{kinds}");
    }

    proptest! {
        #[test]
        fn any_fields_give_the_formatters_line(
            request_id in any::<String>(),
            client_key in ".{0,8}",
            model in any::<String>(),
            backend in any::<String>(),
            status in any::<u16>(),
            ttft_ms in any::<Option<u64>>(),
            tokens in any::<(u64, u64, u64, u64, u64)>(),
            flags in any::<(bool, bool)>(),
            price_tier in any::<Option<String>>(),
            tool_calls in any::<Option<String>>(),
        ) {
            let mut line = line(&request_id, &model, &backend);
            line.client_key = &client_key;
            line.status = status;
            line.ttft_ms = ttft_ms;
            (
                line.prompt_tokens,
                line.completion_tokens,
                line.cached_prompt_tokens,
                line.cache_write_prompt_tokens,
                line.cost_nanos,
            ) = tokens;
            (line.stream, line.tokens_estimated) = flags;
            line.price_tier = price_tier.as_deref();
            line.tool_calls = tool_calls.as_deref();
            let (fields, text) = both_ways(&line);
            prop_assert_eq!(text, fields);
        }
    }

    /// Outside the unstyled text format (here JSON, as `--log-format json` installs it), the
    /// line keeps its fields, which readers of JSON logs parse by name.
    #[test]
    fn the_json_line_keeps_its_fields() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let lines = lines.clone();
                move || lines.clone()
            })
            .json()
            .finish();
        let mut hostile = line("req\n\"1\"", "gpt-4o", "");
        hostile.ttft_ms = None;
        tracing::subscriber::with_default(subscriber, || hostile.emit());
        let text = lines.take();
        assert_eq!(text.lines().count(), 1, "{text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["target"], REQUEST_LOG_TARGET);
        assert_eq!(json["level"], "INFO");
        let fields = &json["fields"];
        assert_eq!(fields["message"], "request finished");
        assert_eq!(fields["request_id"], "req\n\"1\"");
        assert_eq!(fields["client_key"], "ck_1");
        assert_eq!(fields["model"], "gpt-4o");
        assert_eq!(fields["backend"], "");
        assert_eq!(fields["status"], 200);
        assert_eq!(fields["attempts"], 1);
        assert_eq!(fields["stream"], true);
        assert_eq!(fields["latency_ms"], 12);
        assert!(fields.get("ttft_ms").is_none(), "{text}");
        assert_eq!(fields["prompt_tokens"], 10);
        assert_eq!(fields["completion_tokens"], 20);
        assert_eq!(fields["cached_prompt_tokens"], 0);
        assert_eq!(fields["cost_nanos"], 1_500);
        assert_eq!(fields["tokens_estimated"], false);
        assert_eq!(fields["error_kind"], "ERROR_KIND_UNSPECIFIED");
    }
}
