//! What both servers share about logging: [`LogLimiter`], which keeps a line that an
//! outsider can trigger at will (a failed login, a refused connection) from flooding the log,
//! and, with the feature `logging`, [`EscapedFields`], the field formatter of their text logs,
//! and [`TextFields`], the text it writes, for a hot line that writes its fields itself.
//!
//! [`EscapedFields`] is tracing-subscriber's own formatter with every value passed through
//! [`crate::text::EscapeControl`]. tracing-subscriber writes `%` (Display) values as they
//! are, so a string from outside holding a newline would start a forged log line and an ANSI
//! escape would reach the terminal of whoever reads the log. The JSON format needs nothing of
//! this: JSON strings escape control characters.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lets a kind of log line through at most once per interval, counting the ones held back.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    /// When the last line went out, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last line)` when a line may go out now, else `None` (and
    /// this one is counted).
    pub fn permit(&self) -> Option<u64> {
        self.permit_at(Instant::now())
    }

    /// [`LogLimiter::permit`] at `now`.
    pub fn permit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, held) = &mut *state;
        match last {
            Some(at) if now.saturating_duration_since(*at) < self.interval => {
                *held += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(held))
            }
        }
    }
}

#[cfg(feature = "logging")]
pub use fields::{EscapedFields, EscapingVisitor, TextFields, TextFormat, WRITTEN_FIELDS};

#[cfg(feature = "logging")]
static PLAIN_TEXT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`install`] has made the global subscriber write unstyled text, where a message
/// that holds fields written with [`TextFields`] reads exactly as those fields would. False
/// until then, and for JSON or a terminal's styled text: log fields as fields there.
#[cfg(feature = "logging")]
pub fn plain_text() -> bool {
    PLAIN_TEXT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the process's global `tracing` subscriber, the same for both servers: the level
/// from `RUST_LOG` (default `info`), colour only when stderr is a terminal, and either
/// [`TextFormat`] with [`EscapedFields`] (control characters in what clients sent escaped) or
/// one JSON object per line (JSON strings escape them already). Lines go to `writer`.
#[cfg(feature = "logging")]
pub fn install<W>(json: bool, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    PLAIN_TEXT.store(!json && !ansi, std::sync::atomic::Ordering::Relaxed);
    if json {
        builder.json().init();
    } else {
        builder
            .fmt_fields(EscapedFields)
            .event_format(TextFormat::default())
            .init();
    }
}

#[cfg(feature = "logging")]
mod fields {
    use std::cell::RefCell;
    use std::fmt::{self, Write as _};
    use std::time::{SystemTime, UNIX_EPOCH};

    use tracing_core::field::Field;
    use tracing_core::{Event, Level, Subscriber};
    use tracing_subscriber::field::{MakeVisitor, Visit, VisitFmt, VisitOutput};
    use tracing_subscriber::fmt::FmtContext;
    use tracing_subscriber::fmt::format::{
        DefaultVisitor, Format, FormatEvent, FormatFields, Writer,
    };
    use tracing_subscriber::registry::LookupSpan;

    use crate::text::{EscapeControl, Escaped, prefix_len, printable_ascii};

    /// The name of a field whose value is fields already written by [`TextFields`] (escaped
    /// as the formatter would escape them): the unstyled text format passes the value on as
    /// it is, like a message, instead of escaping it again. Only text this process wrote with
    /// [`TextFields`] may go in it; the styled format and JSON treat it as any other string
    /// field (escaped or quoted), so outside the unstyled text format it must not be used.
    pub const WRITTEN_FIELDS: &str = "sluice_written_fields";

    /// `FormatFields` for the text format: `.fmt_fields(EscapedFields)` on the subscriber builder.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct EscapedFields;

    impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
        type Visitor = EscapingVisitor<'a>;

        fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
            if target.has_ansi_escapes() {
                EscapingVisitor::Styled(DefaultVisitor::new(target, true))
            } else {
                EscapingVisitor::Plain(Plain(TextFields::new(target)))
            }
        }
    }

    /// tracing-subscriber's default visitor behind the escaping. Without ANSI styling (a log
    /// file, a pipe: every production log) the same text is written directly, without the
    /// styling and formatting machinery each field otherwise goes through.
    pub enum EscapingVisitor<'a> {
        Styled(DefaultVisitor<'a>),
        Plain(Plain<'a>),
    }

    /// [`DefaultVisitor`]'s output without styles, written directly.
    pub struct Plain<'a>(TextFields<Writer<'a>>);

    /// Fields written as the text format writes them without styles (tracing-subscriber's
    /// default visitor's text, with [`EscapedFields`]' escaping): separated by spaces, the
    /// message bare, other fields as `name=value`; a `%` (`Display`) value escaped by
    /// [`EscapeControl`], a string quoted with `Debug`'s escapes, numbers and booleans as they
    /// are. [`EscapedFields`] writes every unstyled line with it; a line logged on every
    /// request can write its fields into its message with it, once, and read the same.
    pub struct TextFields<W> {
        writer: W,
        is_empty: bool,
        result: fmt::Result,
    }

    impl<W: fmt::Write> TextFields<W> {
        /// Fields to be written to `writer`, the first without a space before it.
        #[inline]
        pub fn new(writer: W) -> Self {
            Self {
                writer,
                is_empty: true,
                result: Ok(()),
            }
        }

        /// Fields to be written to `writer` after text already there (a message): the first
        /// gets its separating space.
        #[inline]
        pub fn after(writer: W) -> Self {
            Self {
                writer,
                is_empty: false,
                result: Ok(()),
            }
        }

        /// The writer, to write more or to take the text from (a `String`'s writes cannot
        /// fail; otherwise see [`Self::finish`]).
        #[inline]
        pub fn into_writer(self) -> W {
            self.writer
        }

        /// The first error a write met, if any.
        #[inline]
        pub fn finish(self) -> fmt::Result {
            self.result
        }

        /// A `name = %value` field of a string (the message: `name` "message").
        #[inline]
        pub fn display(&mut self, name: &str, value: &str) {
            if self.start(name) {
                self.result = EscapeControl(&mut self.writer).write_str(value);
            }
        }

        /// Fields another [`TextFields`] wrote (the value of a [`WRITTEN_FIELDS`] field),
        /// passed on as they are.
        #[inline]
        pub fn written(&mut self, fields: &str) {
            if self.result.is_ok() {
                self.pad();
                self.result = self.result.and_then(|()| self.writer.write_str(fields));
            }
        }

        /// A `name = ?value` field, or a `%` one of any type.
        pub fn debug(&mut self, name: &str, value: &dyn fmt::Debug) {
            if self.start(name) {
                // What `{:?}` of `Escaped(value)` writes; the message's escape guard has
                // nothing left to escape after it.
                self.result = write!(EscapeControl(&mut self.writer), "{value:?}");
            }
        }

        /// A `name = value` field of a string: quoted, with `Debug`'s escapes.
        #[inline]
        pub fn str(&mut self, name: &str, value: &str) {
            if self.start(name) {
                let plain = |b| printable_ascii(b) && b != b'"' && b != b'\\';
                self.result = if prefix_len(value.as_bytes(), plain) == value.len() {
                    // `Debug` of a string with nothing to escape.
                    self.writer
                        .write_char('"')
                        .and_then(|()| self.writer.write_str(value))
                        .and_then(|()| self.writer.write_char('"'))
                } else {
                    write!(self.writer, "{value:?}")
                };
            }
        }

        /// A `name = value` field of an unsigned number (they hold nothing to escape).
        #[inline]
        pub fn u64(&mut self, name: &str, value: u64) {
            if self.start(name) {
                self.unsigned(value);
            }
        }

        /// A `name = value` field of a signed number.
        pub fn i64(&mut self, name: &str, value: i64) {
            if self.start(name) {
                if value < 0 {
                    self.result = self.writer.write_char('-');
                }
                self.unsigned(value.unsigned_abs());
            }
        }

        /// A `name = value` field of a boolean.
        #[inline]
        pub fn bool(&mut self, name: &str, value: bool) {
            if self.start(name) {
                self.result = self.writer.write_str(if value { "true" } else { "false" });
            }
        }

        /// The separating space and `name=`; false for a field not to be written.
        // Always inlined: a caller's constant name then costs no comparisons.
        #[inline(always)]
        fn start(&mut self, name: &str) -> bool {
            // tracing-log's metadata fields, which the default visitor skips as well.
            if self.result.is_err() || name.starts_with("log.") {
                return false;
            }
            self.pad();
            if name != "message" {
                let name = name.strip_prefix("r#").unwrap_or(name);
                self.result = self
                    .writer
                    .write_str(name)
                    .and_then(|()| self.writer.write_char('='));
            }
            self.result.is_ok()
        }

        #[inline]
        fn pad(&mut self) {
            if self.is_empty {
                self.is_empty = false;
            } else {
                self.result = self.writer.write_char(' ');
            }
        }

        #[inline]
        fn unsigned(&mut self, value: u64) {
            // Without the formatting machinery (or a UTF-8 check of its digits).
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    impl Visit for EscapingVisitor<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            match self {
                Self::Styled(inner) => inner.record_debug(field, &Escaped(value)),
                Self::Plain(Plain(plain)) => plain.debug(field.name(), value),
            }
        }

        fn record_str(&mut self, field: &Field, value: &str) {
            match self {
                Self::Styled(inner) if field.name() == "message" => {
                    inner.record_debug(field, &Escaped(&format_args!("{value}")));
                }
                // Written quoted, with `Debug`'s escapes.
                Self::Styled(inner) => inner.record_str(field, value),
                Self::Plain(Plain(plain)) if field.name() == "message" => {
                    plain.display(field.name(), value);
                }
                Self::Plain(Plain(plain)) if field.name() == WRITTEN_FIELDS => plain.written(value),
                Self::Plain(Plain(plain)) => plain.str(field.name(), value),
            }
        }

        fn record_i64(&mut self, field: &Field, value: i64) {
            match self {
                Self::Styled(inner) => inner.record_i64(field, value),
                Self::Plain(Plain(plain)) => plain.i64(field.name(), value),
            }
        }

        fn record_u64(&mut self, field: &Field, value: u64) {
            match self {
                Self::Styled(inner) => inner.record_u64(field, value),
                Self::Plain(Plain(plain)) => plain.u64(field.name(), value),
            }
        }

        fn record_f64(&mut self, field: &Field, value: f64) {
            match self {
                Self::Styled(inner) => inner.record_f64(field, value),
                Self::Plain(Plain(plain)) => plain.debug(field.name(), &value),
            }
        }

        fn record_bool(&mut self, field: &Field, value: bool) {
            match self {
                Self::Styled(inner) => inner.record_bool(field, value),
                Self::Plain(Plain(plain)) => plain.bool(field.name(), value),
            }
        }
    }

    impl VisitOutput<fmt::Result> for EscapingVisitor<'_> {
        fn finish(self) -> fmt::Result {
            match self {
                Self::Styled(inner) => inner.finish(),
                Self::Plain(Plain(plain)) => plain.finish(),
            }
        }
    }

    impl VisitFmt for EscapingVisitor<'_> {
        fn writer(&mut self) -> &mut dyn fmt::Write {
            match self {
                Self::Styled(inner) => inner.writer(),
                Self::Plain(Plain(plain)) => &mut plain.writer,
            }
        }
    }

    /// The event format of both servers' text logs: tracing-subscriber's default (`Full`)
    /// format, byte for byte. Without ANSI styling and outside spans (every request line) it
    /// writes the line directly, with the timestamp's date and time of day formatted once a
    /// second per thread; otherwise it is the default format itself.
    #[derive(Debug, Default)]
    pub struct TextFormat {
        full: Format,
    }

    impl<S, N> FormatEvent<S, N> for TextFormat
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &Event<'_>,
        ) -> fmt::Result {
            let meta = event.metadata();
            // tracing-log's events name their real target and level in fields; spans are
            // written by the default format.
            if writer.has_ansi_escapes() || meta.target() == "log" || ctx.event_scope().is_some() {
                return self.full.format_event(ctx, writer, event);
            }
            write_timestamp(&mut writer, SystemTime::now())?;
            writer.write_str(match *meta.level() {
                Level::TRACE => "TRACE ",
                Level::DEBUG => "DEBUG ",
                Level::INFO => " INFO ",
                Level::WARN => " WARN ",
                Level::ERROR => "ERROR ",
            })?;
            writer.write_str(meta.target())?;
            writer.write_str(": ")?;
            ctx.format_fields(writer.by_ref(), event)?;
            writer.write_char('\n')
        }
    }

    thread_local! {
        /// The Unix second last formatted on this thread, and its whole timestamp as last
        /// written: `YYYY-MM-DDTHH:MM:SS.` and what follows it.
        static STAMP: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    /// The length of `YYYY-MM-DDTHH:MM:SS.`.
    const SECOND_LEN: usize = 20;

    /// The first second humantime does not format (year 10000): its `Display` fails there.
    const HUMANTIME_END: u64 = 253_402_300_800;

    /// `2026-01-02T03:04:05.123456Z ` as tracing-subscriber's default timer writes it, in one
    /// write (each write through the `dyn` writer is a call): the date and second formatted
    /// once a second per thread, the microseconds after them.
    fn write_timestamp(writer: &mut Writer<'_>, now: SystemTime) -> fmt::Result {
        let Some(since_epoch) = now
            .duration_since(UNIX_EPOCH)
            .ok()
            .filter(|since| since.as_secs() < HUMANTIME_END)
        else {
            // Before 1970 or after 9999 (a clock gone wrong): as the default timer writes it.
            return tracing_subscriber::fmt::time::FormatTime::format_time(
                &tracing_subscriber::fmt::time::SystemTime,
                writer,
            )
            .and_then(|()| writer.write_char(' '));
        };
        let second = since_epoch.as_secs();
        STAMP.with_borrow_mut(|(cached, text)| {
            if *cached == second {
                text.truncate(SECOND_LEN);
            } else {
                let full = humantime::format_rfc3339_seconds(
                    UNIX_EPOCH + std::time::Duration::from_secs(second),
                )
                .to_string();
                // `…:SS` without the `Z`.
                text.clear();
                text.push_str(full.trim_end_matches('Z'));
                text.push('.');
                *cached = second;
            }
            let mut digits = itoa::Buffer::new();
            let micros = digits.format(since_epoch.subsec_micros() + 1_000_000);
            // `1dddddd`: the leading 1 keeps the zeros.
            text.push_str(micros.get(1..).unwrap_or("000000"));
            text.push_str("Z ");
            writer.write_str(text)
        })
    }

    #[cfg(test)]
    mod tests {
        #![allow(clippy::unwrap_used, clippy::expect_used)]
        use super::*;
        use std::sync::{Arc, Mutex};

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

        #[test]
        fn a_client_string_stays_on_its_line_and_paints_nothing() {
            let lines = Lines::default();
            let subscriber = tracing_subscriber::fmt()
                .with_writer({
                    let lines = lines.clone();
                    move || lines.clone()
                })
                .with_ansi(false)
                .fmt_fields(EscapedFields)
                .finish();
            let model = "m\n2025-01-01T00:00:00Z  INFO request finished status=200\u{1b}[31m";
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!(model = %model, debug = ?model, plain = model, n = 3, "got {model}");
            });
            let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(!text.contains('\u{1b}'), "{text}");
            assert!(text.contains("model=m\\n2025"), "{text}");
            assert!(text.contains("n=3"), "{text}");
        }

        #[test]
        fn written_fields_pass_as_they_are_in_plain_text_and_escaped_with_styles() {
            let written = "request finished id=a\\n model=\"m\"";
            for ansi in [false, true] {
                let lines = Lines::default();
                let subscriber = tracing_subscriber::fmt()
                    .with_writer({
                        let lines = lines.clone();
                        move || lines.clone()
                    })
                    .with_ansi(ansi)
                    .fmt_fields(EscapedFields)
                    .finish();
                tracing::subscriber::with_default(subscriber, || {
                    tracing::info!(n = 1, sluice_written_fields = written);
                    if ansi {
                        tracing::info!(sluice_written_fields = "a\nb\u{1b}[31m");
                    }
                });
                let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
                if ansi {
                    // Styled, it is a string field like any other.
                    assert_eq!(text.lines().count(), 2, "{text}");
                    assert!(!text.contains(written), "{text}");
                    assert!(!text.contains("a\nb"), "{text}");
                } else {
                    assert!(text.ends_with(&format!(": n=1 {written}\n")), "{text}");
                }
            }
        }

        /// The visitor as it was before the direct path: the default one behind the escaping.
        struct StyledOnly;

        impl<'a> MakeVisitor<Writer<'a>> for StyledOnly {
            type Visitor = EscapingVisitor<'a>;

            fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
                EscapingVisitor::Styled(DefaultVisitor::new(target, true))
            }
        }

        /// Logs a variety of events through `subscriber` and returns what it wrote.
        fn log_all<S>(lines: &Lines, subscriber: S) -> String
        where
            S: Subscriber + Send + Sync + 'static,
        {
            let hostile =
                "m\n2025 \"quoted\" back\\slash \u{1b}[31m \u{200b} ünï ✓ \t\r\u{7f}\u{9b}";
            let owned = String::from("req-1");
            let missing: Option<u64> = None;
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!(
                    target: "sluice::request",
                    request_id = %owned,
                    client_key = %"ck_1",
                    model = %hostile,
                    backend = "b1",
                    plain = hostile,
                    debug = ?hostile,
                    status = 200u16,
                    attempts = 1u32,
                    stream = false,
                    latency_ms = 12u64,
                    ttft_ms = missing,
                    some = Some(7u64),
                    big = u64::MAX,
                    negative = i64::MIN,
                    zero = 0u64,
                    ratio = 0.25f64,
                    wide = u128::MAX,
                    r#type = "t",
                    error_kind = "ERROR_KIND_UNSPECIFIED",
                    "request finished"
                );
                tracing::warn!(backend = %"b\n1", failures = 3, "backend cooling down: {}", hostile);
                tracing::error!("plain message with \"quotes\"");
                tracing::debug!(empty = "", "");
                tracing::trace!(only = true);
                let err = std::io::Error::other("disk \"full\"\n");
                tracing::error!(error = &err as &(dyn std::error::Error + 'static), "failed");
            });
            String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
        }

        fn subscriber_with<F, E>(
            lines: &Lines,
            fields: F,
            events: E,
        ) -> impl Subscriber + Send + Sync
        where
            F: for<'w> FormatFields<'w> + Send + Sync + 'static,
            E: FormatEvent<tracing_subscriber::Registry, F> + Send + Sync + 'static,
        {
            tracing_subscriber::fmt()
                .with_writer({
                    let lines = lines.clone();
                    move || lines.clone()
                })
                .with_ansi(false)
                .with_max_level(Level::TRACE)
                .fmt_fields(fields)
                .event_format(events)
                .finish()
        }

        /// The lines without their timestamps (the first word), which differ by the time.
        fn untimed(text: &str) -> Vec<&str> {
            text.lines()
                .map(|line| line.split_once(' ').map_or(line, |(_, rest)| rest))
                .collect()
        }

        #[test]
        fn the_direct_text_format_writes_what_the_default_one_writes() {
            let reference = Lines::default();
            let expected = log_all(
                &reference,
                subscriber_with(&reference, StyledOnly, Format::default()),
            );
            let direct = Lines::default();
            let got = log_all(
                &direct,
                subscriber_with(&direct, EscapedFields, TextFormat::default()),
            );
            assert_eq!(untimed(&got), untimed(&expected));
            assert_eq!(got.lines().count(), 6, "{got}");
            for line in got.lines() {
                let (stamp, _) = line.split_once(' ').unwrap();
                // 2026-01-02T03:04:05.123456Z
                assert_eq!(stamp.len(), 27, "{line}");
                assert!(
                    stamp.ends_with('Z') && stamp.as_bytes()[19] == b'.',
                    "{line}"
                );
            }
        }

        #[test]
        fn timestamps_are_rfc3339_with_microseconds() {
            for micros in [0, 7, 123_456, 999_999, 1_764_646_586_000_001] {
                let at =
                    UNIX_EPOCH + std::time::Duration::from_micros(1_764_646_586_000_000 + micros);
                let mut text = String::new();
                write_timestamp(&mut Writer::new(&mut text), at).unwrap();
                assert_eq!(text, format!("{} ", humantime::format_rfc3339_micros(at)));
            }
        }

        #[test]
        fn a_clock_outside_humantime_s_years_still_gets_a_timestamp() {
            for at in [
                UNIX_EPOCH - std::time::Duration::from_secs(1),
                UNIX_EPOCH + std::time::Duration::from_secs(HUMANTIME_END),
            ] {
                let mut text = String::new();
                write_timestamp(&mut Writer::new(&mut text), at).unwrap();
                assert!(text.ends_with("Z "), "{text:?}");
            }
        }

        proptest::proptest! {
            /// Times up to the end of year 9999, a few at a time within seconds of each other,
            /// so that the thread's cached second is both reused and replaced.
            #[test]
            fn any_timestamp_is_written_as_humantime_writes_it(
                second in 0..HUMANTIME_END - 3,
                offsets in proptest::collection::vec(0u64..3_000_000, 1..8),
            ) {
                for offset in offsets {
                    let at = UNIX_EPOCH
                        + std::time::Duration::from_secs(second)
                        + std::time::Duration::from_micros(offset);
                    let mut text = String::new();
                    write_timestamp(&mut Writer::new(&mut text), at).unwrap();
                    proptest::prop_assert_eq!(
                        text,
                        format!("{} ", humantime::format_rfc3339_micros(at))
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.permit_at(t0), Some(0));
        for s in 1..10 {
            assert_eq!(limiter.permit_at(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(limiter.permit_at(t0 + Duration::from_secs(10)), Some(9));
        assert_eq!(limiter.permit_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(limiter.permit_at(t0 + Duration::from_secs(30)), Some(1));
    }
}
