//! Tables of results and the `BENCHMARKS.md` document (Markdown, which also reads well on a
//! terminal).

use std::fmt::Write as _;
use std::time::Duration;

use super::hist::{Latencies, added_ms, ms};
use super::load::{ClosedLoopResult, OpenLoopResult};
use super::machine::Machine;
use super::stream::StreamResult;

/// A Markdown table.
#[derive(Clone, Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table with padded columns.
    pub fn markdown(&self) -> String {
        let columns = self.headers.len();
        let cell = |row: &[String], i: usize| row.get(i).cloned().unwrap_or_default();
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| cell(r, i).chars().count())
                    .chain([self.headers[i].chars().count(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let line = |cells: Vec<String>| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            format!("| {} |\n", padded.join(" | "))
        };
        let mut out = line(self.headers.clone());
        out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
        for row in &self.rows {
            out.push_str(&line((0..columns).map(|i| cell(row, i)).collect()));
        }
        out
    }
}

/// A target from the issue and what this run measured against it.
#[derive(Clone, Debug)]
pub struct Check {
    pub what: String,
    pub target: String,
    pub measured: String,
    /// `None` when the figure could not be measured.
    pub pass: Option<bool>,
}

impl Check {
    pub fn new(what: &str, target: &str, measured: String, pass: Option<bool>) -> Self {
        Self {
            what: what.to_owned(),
            target: target.to_owned(),
            measured,
            pass,
        }
    }

    pub fn verdict(&self) -> &'static str {
        match self.pass {
            Some(true) => "pass",
            Some(false) => "MISS",
            None => "not measured",
        }
    }
}

/// The checks as a table.
pub fn checks_table(checks: &[Check]) -> Table {
    let mut t = Table::new(&["figure", "target", "measured", "result"]);
    for c in checks {
        t.row(vec![
            c.what.clone(),
            c.target.clone(),
            c.measured.clone(),
            c.verdict().to_owned(),
        ]);
    }
    t
}

/// One titled part of the report: Markdown text (tables included).
#[derive(Clone, Debug)]
pub struct Section {
    pub title: String,
    pub body: String,
}

/// Milliseconds with microsecond precision, e.g. `0.142`.
pub fn fmt_ms(d: Duration) -> String {
    format!("{:.3}", ms(d))
}

/// A signed difference in milliseconds, e.g. `+0.045`.
pub fn fmt_added(delta_ms: f64) -> String {
    format!("{delta_ms:+.3}")
}

/// Mebibytes with one decimal.
pub fn fmt_mib(mib: f64) -> String {
    format!("{mib:.1} MiB")
}

/// Open-loop latency: for each rate, a row per side and, with two sides, the added latency
/// (second − first) per percentile. Sides are `(label, result)`.
pub fn latency_table(runs: &[(f64, Vec<(String, OpenLoopResult)>)]) -> Table {
    let mut t = Table::new(&[
        "rate (req/s)",
        "path",
        "ok / sent",
        "errors",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "generator lag p99 ms",
    ]);
    for (rate, sides) in runs {
        for (label, r) in sides {
            t.row(vec![
                format!("{rate:.0}"),
                label.clone(),
                format!("{} / {}", r.ok, r.sent),
                r.errors.to_string(),
                fmt_ms(r.latency.p50()),
                fmt_ms(r.latency.p99()),
                fmt_ms(r.latency.p999()),
                fmt_ms(r.latency.max()),
                fmt_ms(r.lag.p99()),
            ]);
        }
        if let [(base, b), (label, v)] = sides.as_slice() {
            t.row(vec![
                format!("{rate:.0}"),
                format!("**added** ({label} − {base})"),
                String::new(),
                String::new(),
                fmt_added(added_ms(v.latency.p50(), b.latency.p50())),
                fmt_added(added_ms(v.latency.p99(), b.latency.p99())),
                fmt_added(added_ms(v.latency.p999(), b.latency.p999())),
                String::new(),
                String::new(),
            ]);
            if let Some(paired) = paired_added(b, v) {
                t.row(vec![
                    format!("{rate:.0}"),
                    format!("added, median of {} paired slices", paired.pairs),
                    String::new(),
                    String::new(),
                    fmt_added(paired.p50),
                    fmt_added(paired.p99),
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
            }
        }
    }
    t
}

/// Added latency estimated slice by slice: the median over adjacent slice pairs of
/// `via − base` (per percentile), which cancels load changes that hit one slice only.
#[derive(Clone, Copy, Debug)]
pub struct PairedAdded {
    pub pairs: usize,
    pub p50: f64,
    pub p99: f64,
}

/// [`PairedAdded`] of two open-loop results with the same slices; `None` with fewer than 3.
pub fn paired_added(base: &OpenLoopResult, via: &OpenLoopResult) -> Option<PairedAdded> {
    let pairs: Vec<_> = base.slices.iter().zip(&via.slices).collect();
    if pairs.len() < 3 || base.slices.len() != via.slices.len() {
        return None;
    }
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        if n % 2 == 1 {
            xs[n / 2]
        } else {
            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
        }
    };
    Some(PairedAdded {
        pairs: pairs.len(),
        p50: median(pairs.iter().map(|(b, v)| added_ms(v.p50, b.p50)).collect()),
        p99: median(pairs.iter().map(|(b, v)| added_ms(v.p99, b.p99)).collect()),
    })
}

/// Closed-loop throughput per side and, with two sides, the ratio second / first.
pub fn throughput_table(sides: &[(String, ClosedLoopResult)]) -> Table {
    let mut t = Table::new(&[
        "path",
        "connections",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p99 ms",
    ]);
    for (label, r) in sides {
        t.row(vec![
            label.clone(),
            r.connections.to_string(),
            r.ok.to_string(),
            r.errors.to_string(),
            format!("{:.0}", r.throughput()),
            fmt_ms(r.latency.p50()),
            fmt_ms(r.latency.p99()),
        ]);
    }
    if let [(base, b), (label, v)] = sides {
        t.row(vec![
            format!("**ratio** ({label} / {base})"),
            String::new(),
            String::new(),
            String::new(),
            format!("{:.2}", throughput_ratio(v, b)),
            String::new(),
            String::new(),
        ]);
    }
    t
}

/// `via / direct` throughput.
pub fn throughput_ratio(via: &ClosedLoopResult, direct: &ClosedLoopResult) -> f64 {
    let d = direct.throughput();
    if d == 0.0 { 0.0 } else { via.throughput() / d }
}

/// Streams per side and, with two sides, the added TTFT and gap per percentile.
pub fn stream_table(sides: &[(String, StreamResult)]) -> Table {
    let mut t = Table::new(&[
        "path",
        "streams ok / run",
        "events received / expected",
        "events lost",
        "peak open",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "gap p50 ms",
        "gap p99 ms",
        "gap max ms",
    ]);
    for (label, r) in sides {
        let expected = r
            .expected_events
            .map(|e| (e * r.streams as u64).to_string())
            .unwrap_or_else(|| "?".into());
        t.row(vec![
            label.clone(),
            format!("{} / {}", r.completed, r.streams),
            format!("{} / {expected}", r.events),
            if r.expected_events.is_some() {
                r.events_lost.to_string()
            } else {
                format!("{} streams without their last event", r.failed())
            },
            r.peak_concurrency.to_string(),
            fmt_ms(r.ttft.p50()),
            fmt_ms(r.ttft.p99()),
            fmt_ms(r.gaps.p50()),
            fmt_ms(r.gaps.p99()),
            fmt_ms(r.gaps.max()),
        ]);
    }
    if let [(base, b), (label, v)] = sides {
        t.row(vec![
            format!("**added** ({label} − {base})"),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            fmt_added(added_ms(v.ttft.p50(), b.ttft.p50())),
            fmt_added(added_ms(v.ttft.p99(), b.ttft.p99())),
            fmt_added(added_ms(v.gaps.p50(), b.gaps.p50())),
            fmt_added(added_ms(v.gaps.p99(), b.gaps.p99())),
            String::new(),
        ]);
    }
    t
}

/// p50 / p99 / max of a distribution in a table row.
pub fn percentile_cells(l: &Latencies) -> Vec<String> {
    vec![fmt_ms(l.p50()), fmt_ms(l.p99()), fmt_ms(l.max())]
}

/// Everything `BENCHMARKS.md` holds.
#[derive(Clone, Debug)]
pub struct Report {
    pub machine: Machine,
    pub command: String,
    pub date: String,
    pub took: Duration,
    pub checks: Vec<Check>,
    pub sections: Vec<Section>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        out.push_str("# Sluice benchmarks\n\n");
        out.push_str(
            "Written by `sluice-bench all` (run `./e2e/bench.sh`); do not edit by hand. Every \
             figure comes from one run on the machine below, and every Sluice figure is compared \
             with the mock provider called directly in the same run (same schedule, interleaved), \
             so read the *added* rows and ratios rather than absolute times. All traffic stays on \
             127.0.0.1; load generator, mock provider, control plane and data planes share the \
             same cores.\n\n",
        );
        let _ = writeln!(out, "| | |\n|---|---|");
        let _ = writeln!(out, "| date | {} |", self.date);
        let _ = writeln!(out, "| command | `{}` |", self.command);
        let _ = writeln!(out, "| run time | {:.0} s |", self.took.as_secs_f64());
        let _ = writeln!(out, "| CPU | {} × {} |", m.cores, m.cpu_model);
        let _ = writeln!(out, "| memory | {} |", m.memory);
        let _ = writeln!(out, "| kernel | {} |", m.kernel);
        let _ = writeln!(out, "| rustc | {} |", m.rustc);
        let _ = writeln!(out, "| commit | {} |", m.commit);
        out.push('\n');
        out.push_str("## Targets\n\n");
        out.push_str(&checks_table(&self.checks).markdown());
        out.push('\n');
        out.push_str(OTHER_GATEWAYS);
        for s in &self.sections {
            let _ = write!(out, "\n## {}\n\n{}", s.title, s.body);
        }
        out
    }
}

/// How to run the same load against another gateway.
const OTHER_GATEWAYS: &str = "\
## Running the same load against another gateway

`sluice-bench load` drives any OpenAI-compatible base URL (plain `http://`, loopback unless you
pass `--allow-remote`) and prints the same tables. Put the gateway you want to compare (LiteLLM,
one-api, …) in front of the mock provider, and give the mock as the baseline so the table shows
what the gateway adds:

```sh
cargo build --release --bins
target/release/sluice-mock --listen 127.0.0.1:9090 --chunk-count 20 --chunk-interval 50ms &
# configure the other gateway with an OpenAI backend at http://127.0.0.1:9090/v1, model `bench-model`
target/release/sluice-bench load --url http://127.0.0.1:4000/v1 --key sk-... --model bench-model \\
    --baseline-url http://127.0.0.1:9090/v1 --rate 250,500,1000 --duration 15s
target/release/sluice-bench load --url http://127.0.0.1:4000/v1 --key sk-... --model bench-model \\
    --baseline-url http://127.0.0.1:9090/v1 --saturate --connections 64 --duration 10s
target/release/sluice-bench load --url http://127.0.0.1:4000/v1 --key sk-... --model bench-model \\
    --baseline-url http://127.0.0.1:9090/v1 --stream --streams 1000 --expected-events 24
```

`--key` can also come from `SLUICE_BENCH_KEY`; `--baseline-key` from `SLUICE_BENCH_BASELINE_KEY`.
Without `--baseline-url` the table shows the gateway alone. Run everything on one otherwise idle
machine, and compare the *added* rows: absolute figures depend on the machine.
";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn tables_are_aligned_markdown() {
        let mut t = Table::new(&["a", "long header"]);
        t.row(vec!["wide cell".into(), "x".into()]);
        t.row(vec!["y".into()]);
        let md = t.markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "| a         | long header |");
        assert_eq!(lines[1], "| --------- | ----------- |");
        assert_eq!(lines[3], "| y         |             |");
        assert!(
            lines
                .iter()
                .all(|l| l.chars().count() == lines[0].chars().count())
        );
    }

    fn with_slices(p50s_us: &[u64]) -> OpenLoopResult {
        OpenLoopResult {
            sent: 0,
            ok: 0,
            errors: 0,
            first_error: None,
            latency: Latencies::new().unwrap(),
            service: Latencies::new().unwrap(),
            lag: Latencies::new().unwrap(),
            scheduled: Duration::ZERO,
            slices: p50s_us
                .iter()
                .map(|us| crate::bench::load::SliceSummary {
                    p50: Duration::from_micros(*us),
                    p99: Duration::from_micros(*us * 10),
                })
                .collect(),
        }
    }

    #[test]
    fn paired_slices_ignore_a_burst_that_hit_one_side() {
        let base = with_slices(&[100, 100, 900, 100, 100]);
        let via = with_slices(&[300, 300, 300, 300, 300]);
        let p = paired_added(&base, &via).unwrap();
        assert_eq!(p.pairs, 5);
        assert!((p.p50 - 0.2).abs() < 1e-9, "{p:?}");
        assert!((p.p99 - 2.0).abs() < 1e-9, "{p:?}");
        assert!(paired_added(&with_slices(&[1, 2]), &with_slices(&[1, 2])).is_none());
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_ms(Duration::from_micros(1234)), "1.234");
        assert_eq!(fmt_added(0.0456), "+0.046");
        assert_eq!(fmt_added(-0.01), "-0.010");
        assert_eq!(
            Check::new("x", "≤ 1", "2".into(), Some(false)).verdict(),
            "MISS"
        );
    }
}
