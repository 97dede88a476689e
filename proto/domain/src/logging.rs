//! What both servers share about logging: [`LogLimiter`], which keeps a line that an
//! outsider can trigger at will (a failed login, a refused connection) from flooding the log,
//! and, with the feature `logging`, [`EscapedFields`], the field formatter of their text logs.
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
pub use fields::{EscapedFields, EscapingVisitor};

#[cfg(feature = "logging")]
mod fields {
    use std::fmt;

    use tracing_core::field::Field;
    use tracing_subscriber::field::{MakeVisitor, Visit, VisitFmt, VisitOutput};
    use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

    use crate::text::Escaped;

    /// `FormatFields` for the text format: `.fmt_fields(EscapedFields)` on the subscriber builder.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct EscapedFields;

    impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
        type Visitor = EscapingVisitor<'a>;

        fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
            EscapingVisitor(DefaultVisitor::new(target, true))
        }
    }

    /// tracing-subscriber's default visitor behind the escaping.
    pub struct EscapingVisitor<'a>(DefaultVisitor<'a>);

    impl Visit for EscapingVisitor<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            self.0.record_debug(field, &Escaped(value));
        }

        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "message" {
                self.record_debug(field, &format_args!("{value}"));
            } else {
                // Written quoted, with `Debug`'s escapes.
                self.0.record_str(field, value);
            }
        }

        // Numbers and booleans hold nothing to escape.
        fn record_i64(&mut self, field: &Field, value: i64) {
            self.0.record_i64(field, value);
        }

        fn record_u64(&mut self, field: &Field, value: u64) {
            self.0.record_u64(field, value);
        }

        fn record_f64(&mut self, field: &Field, value: f64) {
            self.0.record_f64(field, value);
        }

        fn record_bool(&mut self, field: &Field, value: bool) {
            self.0.record_bool(field, value);
        }
    }

    impl VisitOutput<fmt::Result> for EscapingVisitor<'_> {
        fn finish(self) -> fmt::Result {
            self.0.finish()
        }
    }

    impl VisitFmt for EscapingVisitor<'_> {
        fn writer(&mut self) -> &mut dyn fmt::Write {
            self.0.writer()
        }
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
