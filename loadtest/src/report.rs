//! The result of a run: a summary table on stdout, a JSON file, and an SVG
//! plot (timeline and latency percentiles).

use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use crate::coord::{Outcome, Sample};
use crate::fleet::{Histogram, Stats};
use crate::ledger::Short;
use crate::plot::{Line, Panel, XScale};

/// One headline figure.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub key: String,
    pub label: String,
    pub value: f64,
    pub unit: String,
}

/// A latency histogram, summarised (microseconds).
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub name: String,
    pub samples: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// (quantile, microseconds) from 0 up to the maximum, placed at 1 - 1/N.
    pub spectrum: Vec<(f64, u64)>,
}

impl Latency {
    fn of(name: &str, h: &Histogram) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let qs = [
            0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999,
        ];
        // Quantiles finer than one sample say nothing; the maximum sits at
        // 1 - 1/N, where a percentile plot puts it.
        let top = 1.0 - 1.0 / h.len().max(2) as f64;
        let mut spectrum: Vec<(f64, u64)> = qs
            .iter()
            .filter(|&&q| q < top)
            .map(|&q| (q, h.value_at_quantile(q)))
            .collect();
        spectrum.push((top, h.max()));
        Some(Latency {
            name: name.to_owned(),
            samples: h.len(),
            min_us: h.min(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            spectrum,
        })
    }
}

/// Everything a run reports.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub scenario: String,
    pub title: String,
    pub started_unix_ms: u64,
    pub duration_s: f64,
    pub params: serde_json::Value,
    pub figures: Vec<Figure>,
    pub latency: Vec<Latency>,
    pub stats: Stats,
    pub timeline: Vec<Sample>,
    pub failures: Vec<String>,
    /// The soak's samples, books and verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soak: Option<serde_json::Value>,
    /// Sessions that missed pushes every session should have had (the
    /// reconnect storm lists them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub short_sessions: Vec<Short>,
    /// Panels a scenario adds to the plot (after the timeline's).
    #[serde(skip)]
    pub panels: Vec<Panel>,
}

impl RunReport {
    /// A report from a finished fleet; figures are added by the scenario.
    pub fn new(
        scenario: &str,
        title: String,
        params: serde_json::Value,
        started_unix_ms: u64,
        out: &Outcome,
    ) -> Self {
        let mut latency = Vec::new();
        for (name, h) in [
            ("login", &out.login),
            ("resume", &out.resume),
            ("push", &out.push),
            ("push_slow", &out.push_slow),
            ("uplink", &out.uplink),
        ] {
            latency.extend(Latency::of(name, h));
        }
        let duration_s = out.timeline.last().map(|s| s.t).unwrap_or(0.0);
        RunReport {
            scenario: scenario.to_owned(),
            title,
            started_unix_ms,
            duration_s,
            params,
            figures: Vec::new(),
            latency,
            stats: out.stats.clone(),
            timeline: out.timeline.clone(),
            failures: out.failures.clone(),
            soak: None,
            short_sessions: Vec::new(),
            panels: Vec::new(),
        }
    }

    /// Adds a headline figure.
    pub fn figure(&mut self, key: &str, label: &str, value: f64, unit: &str) {
        self.figures.push(Figure {
            key: key.to_owned(),
            label: label.to_owned(),
            value,
            unit: unit.to_owned(),
        });
    }

    /// Prints the summary table, then writes the JSON and SVG files asked for.
    ///
    /// # Errors
    /// When a file cannot be written.
    pub fn emit(&self, json: Option<&Path>, plot: Option<&Path>) -> anyhow::Result<()> {
        print!("{}", self.table());
        if let Some(p) = json {
            std::fs::write(p, serde_json::to_vec_pretty(self)?)
                .with_context(|| format!("writing {}", p.display()))?;
            println!("JSON result: {}", p.display());
        }
        if let Some(p) = plot {
            std::fs::write(p, self.svg()).with_context(|| format!("writing {}", p.display()))?;
            println!("plot: {}", p.display());
        }
        Ok(())
    }

    /// The human summary.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "\n== {}: {} ==", self.scenario, self.title);
        let w = self
            .figures
            .iter()
            .map(|f| f.label.len())
            .max()
            .unwrap_or(0);
        for f in &self.figures {
            let _ = writeln!(s, "  {:<w$}  {:>14} {}", f.label, human(f.value), f.unit);
        }
        let st = &self.stats;
        let _ = writeln!(
            s,
            "  devices: {} logins, {} refused, {} connect errors, {} drops; pushes: {} unique, {} gaps, {} duplicates",
            st.logins, st.refused, st.connect_errors, st.drops, st.pushes + st.slow_pushes, st.seq_gaps, st.seq_dups
        );
        if !st.codes.is_empty() {
            let codes: Vec<String> = st
                .codes
                .iter()
                .map(|(c, n)| format!("{} ({c}) x{n}", code_name(*c)))
                .collect();
            let _ = writeln!(s, "  codes seen: {}", codes.join(", "));
        }
        if !self.latency.is_empty() {
            let _ = writeln!(
                s,
                "  {:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "latency", "samples", "p50", "p90", "p99", "p99.9", "max"
            );
            for l in &self.latency {
                let _ = writeln!(
                    s,
                    "  {:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                    l.name,
                    l.samples,
                    ms(l.p50_us),
                    ms(l.p90_us),
                    ms(l.p99_us),
                    ms(l.p999_us),
                    ms(l.max_us)
                );
            }
        }
        for e in st.errors.iter().chain(&self.failures) {
            let _ = writeln!(s, "  error: {e}");
        }
        for x in &self.short_sessions {
            let missing: Vec<String> = x
                .missing
                .iter()
                .map(|&(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            let _ = writeln!(
                s,
                "  short: session {} received {} (last seq {}), missing {}",
                x.session,
                x.received,
                x.last,
                missing.join(", ")
            );
        }
        s
    }

    /// The plot: rates, devices online and (when sampled) gateway memory
    /// over time, and the latency percentile spectrum.
    pub fn svg(&self) -> String {
        let rate = |f: fn(&Sample) -> u64| rate_steps(&self.timeline, |s| s.t, f);
        let mut rates = Vec::new();
        for (label, f) in [
            (
                "pushes received /s",
                (|s: &Sample| s.pushes) as fn(&Sample) -> u64,
            ),
            ("logins /s", |s: &Sample| s.logins),
            ("resumes /s", |s: &Sample| s.resumes),
            ("churns /s", |s: &Sample| s.churns),
            ("uplinks acked /s", |s: &Sample| s.uplinks_acked),
        ] {
            let points = rate(f);
            if points.iter().any(|p| p.1 > 0.0) {
                rates.push(Line {
                    label: label.to_owned(),
                    points,
                });
            }
        }
        let online = vec![Line {
            label: "devices online".to_owned(),
            points: self
                .timeline
                .iter()
                .map(|s| (s.t, s.online as f64))
                .collect(),
        }];
        let rss = vec![Line {
            label: "gateway RSS".to_owned(),
            points: self
                .timeline
                .iter()
                .filter_map(|s| Some((s.t, s.gateway_rss? as f64 / 1_048_576.0)))
                .collect(),
        }];
        let latency = self
            .latency
            .iter()
            .map(|l| Line {
                label: format!("{} ({} samples)", l.name, l.samples),
                points: l
                    .spectrum
                    .iter()
                    .map(|&(q, us)| (q, us.max(1) as f64 / 1000.0))
                    .collect(),
            })
            .collect();
        let panels = [
            Panel {
                title: "Rates".into(),
                x_label: "seconds".into(),
                y_label: "per second".into(),
                x_scale: XScale::Linear,
                y_log: false,
                lines: rates,
            },
            Panel {
                title: "Devices online".into(),
                x_label: "seconds".into(),
                y_label: "devices".into(),
                x_scale: XScale::Linear,
                y_log: false,
                lines: online,
            },
            Panel {
                title: "Latency by percentile".into(),
                x_label: "percentile".into(),
                y_label: "milliseconds".into(),
                x_scale: XScale::Percentile,
                y_log: true,
                lines: latency,
            },
        ];
        let mut panels = panels.to_vec();
        let at = panels.len() - 1;
        panels.splice(at..at, self.panels.iter().cloned());
        if rss[0].points.iter().any(|p| p.1 > 0.0) {
            panels.insert(
                2,
                Panel {
                    title: "Gateway resident memory".into(),
                    x_label: "seconds".into(),
                    y_label: "MiB".into(),
                    x_scale: XScale::Linear,
                    y_log: false,
                    lines: rss,
                },
            );
        }
        crate::plot::render_svg(
            &format!("tether-loadtest {}: {}", self.scenario, self.title),
            &panels,
        )
    }
}

/// Samples closer together than this are taken as one window when rates
/// are drawn: the workers report every 200 ms, so a shorter window (the
/// sample at the end of a phase, just after a second's) would measure when
/// reports arrived, not the rate.
const MIN_RATE_WINDOW_S: f64 = 0.25;

/// The rate of counter `f` over samples taken at `t` seconds, as steps: for
/// each window, its mean rate at its start and at its end. A window ends at
/// the first sample at least [`MIN_RATE_WINDOW_S`] after its start, or at
/// the last sample: a run shorter than that is one window, its mean rate
/// over the whole run.
pub fn rate_steps<T>(
    timeline: &[T],
    t: impl Fn(&T) -> f64,
    f: impl Fn(&T) -> u64,
) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    let Some(mut from) = timeline.first() else {
        return points;
    };
    for (i, s) in timeline.iter().enumerate().skip(1) {
        let dt = t(s) - t(from);
        let last = i + 1 == timeline.len();
        if (dt < MIN_RATE_WINDOW_S && !last) || dt <= 0.0 {
            continue;
        }
        let r = f(s).saturating_sub(f(from)) as f64 / dt;
        points.push((t(from), r));
        points.push((t(s), r));
        from = s;
    }
    points
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// 1234567.8 as "1,234,568"; small values keep two decimals.
pub fn human(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v.abs() < 100.0 && v.fract() != 0.0 {
        return format!("{v:.2}");
    }
    let n = v.round() as i128;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// The protocol's name for a close or error code.
pub fn code_name(c: i32) -> String {
    tether::wire::pb::Code::try_from(c)
        .map(|c| c.as_str_name().to_owned())
        .unwrap_or_else(|_| "UNKNOWN".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_groups_thousands() {
        assert_eq!(human(1_234_567.4), "1,234,567");
        assert_eq!(human(999.0), "999");
        assert_eq!(human(1000.0), "1,000");
        assert_eq!(human(-4200.0), "-4,200");
        assert_eq!(human(0.25), "0.25");
        assert_eq!(human(f64::NAN), "-");
    }

    fn at(t: f64, online: u64, pushes: u64) -> Sample {
        Sample {
            t,
            online,
            pushes,
            ..Sample::default()
        }
    }

    #[test]
    fn a_run_shorter_than_a_rate_window_is_one_window_at_its_mean_rate() {
        // A 0.14 s broadcast: the first second's sample, then the end of
        // the login phase and the end of the run.
        let timeline = [at(0.0, 0, 0), at(0.1, 2000, 0), at(0.14, 2000, 2000)];
        let r = rate_steps(&timeline, |s| s.t, |s| s.pushes);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].0, 0.0);
        assert_eq!(r[1].0, 0.14);
        assert!((r[0].1 - 2000.0 / 0.14).abs() < 1e-6, "{r:?}");
        assert_eq!(r[0].1, r[1].1);
        assert!(rate_steps(&timeline[..1], |s| s.t, |s| s.pushes).is_empty());
    }

    #[test]
    fn a_sample_just_after_another_joins_the_next_window() {
        let timeline = [
            at(0.0, 0, 0),
            at(1.0, 10, 1000),
            at(1.01, 10, 1100),
            at(2.0, 10, 2000),
        ];
        let r = rate_steps(&timeline, |s| s.t, |s| s.pushes);
        assert_eq!(
            r,
            vec![(0.0, 1000.0), (1.0, 1000.0), (1.0, 1000.0), (2.0, 1000.0)]
        );
    }

    #[test]
    fn code_names_come_from_the_protocol() {
        assert_eq!(code_name(3002), "CODE_SLOW_CONSUMER");
        assert_eq!(code_name(12345), "UNKNOWN");
    }
}
