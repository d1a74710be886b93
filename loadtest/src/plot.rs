//! SVG plots of a load-test run: a timeline panel and a latency percentile panel.
//!
//! The SVG is written by hand rather than with the `plotters` crate, because its text
//! rendering pulls in system font libraries. The output is a standalone document (no XML
//! header) that opens in browsers, rsvg and Inkscape.
//!
//! Input is treated as untrusted: non-finite values, negative values on log axes and
//! degenerate ranges are skipped or widened instead of panicking, and every piece of text
//! is XML-escaped, so the result is always a well-formed document.

use std::fmt::Write as _;

/// One named series of (x, y) points.
#[derive(Debug, Clone, Default)]
pub struct Line {
    /// Name shown in the panel's legend.
    pub label: String,
    /// Data points in data coordinates; non-finite points are skipped when plotting.
    pub points: Vec<(f64, f64)>,
}

/// How a panel's x axis is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XScale {
    /// Plain linear axis (e.g. seconds since start).
    Linear,
    /// Percentile axis: x values are quantiles in [0, 1) (e.g. 0.5, 0.99, 0.999); plotted at
    /// -log10(1 - q), so 90%, 99%, 99.9%, 99.99% are evenly spaced, as in HdrHistogram
    /// percentile-spectrum plots. Tick labels read "0%", "50%", "90%", "99%", "99.9%", ...
    /// up to the next level of nines at or above the largest quantile present. Quantiles are
    /// capped at 1 - 1e-6 (99.9999%); negative ones are skipped.
    Percentile,
}

/// One chart: title, axis labels, lines.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Title drawn above the chart.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label beside the y axis (drawn rotated).
    pub y_label: String,
    /// How the x axis is scaled.
    pub x_scale: XScale,
    /// Plot the y axis on a log10 scale (values <= 0 are skipped on log axes).
    pub y_log: bool,
    /// The series to draw, coloured from a fixed palette in order.
    pub lines: Vec<Line>,
}

/// Renders panels stacked vertically (each about 900x320 px plus margins) under a
/// document title, and returns the SVG document as a string.
#[must_use]
pub fn render_svg(title: &str, panels: &[Panel]) -> String {
    let height = document_height(panels.len());
    let mut svg = Svg::new(DOC_WIDTH, height);
    svg.text(
        DOC_WIDTH / 2.0,
        DOC_TITLE_BASELINE,
        TextStyle::title(20.0, "middle"),
        title,
    );
    if panels.is_empty() {
        svg.text(
            DOC_WIDTH / 2.0,
            DOC_TITLE_H + EMPTY_DOC_BODY_H / 2.0,
            TextStyle::plain(14.0, "middle"),
            "no data",
        );
    }
    for (index, panel) in panels.iter().enumerate() {
        let top = DOC_TITLE_H + index as f64 * PANEL_BLOCK_H;
        render_panel(&mut svg, panel, top);
    }
    svg.finish()
}

// ---------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------

/// Width of the plotting area of one panel, in pixels.
const PLOT_W: f64 = 900.0;
/// Height of the plotting area of one panel, in pixels.
const PLOT_H: f64 = 320.0;
/// Room left of the plot for y tick labels and the rotated y label.
const MARGIN_LEFT: f64 = 100.0;
/// Room right of the plot for the legend.
const MARGIN_RIGHT: f64 = 210.0;
/// Room above the plot for the panel title.
const PANEL_TITLE_H: f64 = 36.0;
/// Room below the plot for x tick labels and the x label.
const PANEL_BOTTOM_H: f64 = 56.0;
/// Vertical space between consecutive panels.
const PANEL_GAP: f64 = 12.0;
/// Total height taken by one panel.
const PANEL_BLOCK_H: f64 = PANEL_TITLE_H + PLOT_H + PANEL_BOTTOM_H + PANEL_GAP;
/// Room at the top of the document for its title.
const DOC_TITLE_H: f64 = 48.0;
/// Baseline of the document title.
const DOC_TITLE_BASELINE: f64 = 32.0;
/// Body height used when there are no panels, so the "no data" note has room.
const EMPTY_DOC_BODY_H: f64 = 60.0;
/// Total document width.
const DOC_WIDTH: f64 = MARGIN_LEFT + PLOT_W + MARGIN_RIGHT;

/// Height of one legend row.
const LEGEND_ROW_H: f64 = 18.0;
/// Longest legend label, in characters, before it is shortened with an ellipsis.
const LEGEND_LABEL_CHARS: usize = 26;
/// Longest title or axis label, in characters; longer text would run off the page.
const TITLE_CHARS: usize = 140;

/// Upper bound on the vertices emitted per polyline, so huge series stay small on disk.
const MAX_POLYLINE_POINTS: usize = 2000;

/// Data magnitudes are clamped to this so that spans, nice bounds and tick values stay
/// finite even for input near `f64::MAX`.
const VALUE_LIMIT: f64 = 1e300;
/// Linear spans below this are treated as zero; smaller steps would underflow.
const MIN_LINEAR_SPAN: f64 = 1e-290;
/// Largest quantile plotted on a percentile axis (six nines).
const MAX_QUANTILE: f64 = 1.0 - 1e-6;

/// Distinguishable line colours (Tableau 10 subset), cycled when there are more lines.
const PALETTE: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn document_height(panel_count: usize) -> f64 {
    if panel_count == 0 {
        DOC_TITLE_H + EMPTY_DOC_BODY_H
    } else {
        DOC_TITLE_H + panel_count as f64 * PANEL_BLOCK_H
    }
}

fn colour(index: usize) -> &'static str {
    PALETTE[index % PALETTE.len()]
}

/// The pixel rectangle a panel's data is drawn into.
#[derive(Debug, Clone, Copy)]
struct PlotArea {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
}

impl PlotArea {
    fn right(&self) -> f64 {
        self.left + self.width
    }

    fn bottom(&self) -> f64 {
        self.top + self.height
    }

    fn centre_x(&self) -> f64 {
        self.left + self.width / 2.0
    }

    fn centre_y(&self) -> f64 {
        self.top + self.height / 2.0
    }

    /// Pixel x of a transformed x value.
    fn px_x(&self, axis: &Axis, value: f64) -> f64 {
        self.left + axis.fraction(value) * self.width
    }

    /// Pixel y of a transformed y value (SVG y grows downwards).
    fn px_y(&self, axis: &Axis, value: f64) -> f64 {
        self.bottom() - axis.fraction(value) * self.height
    }
}

// ---------------------------------------------------------------------------------------
// Panels
// ---------------------------------------------------------------------------------------

fn render_panel(svg: &mut Svg, panel: &Panel, top: f64) {
    let area = PlotArea {
        left: MARGIN_LEFT,
        top: top + PANEL_TITLE_H,
        width: PLOT_W,
        height: PLOT_H,
    };
    svg.text(
        area.left,
        top + 24.0,
        TextStyle::title(15.0, "start"),
        &shorten(&panel.title, TITLE_CHARS),
    );

    let series: Vec<Vec<(f64, f64)>> = panel
        .lines
        .iter()
        .map(|line| transformed_points(line, panel.x_scale, panel.y_log))
        .collect();

    match Bounds::of(&series) {
        Some(bounds) => {
            let x_axis = match panel.x_scale {
                XScale::Linear => Axis::linear(bounds.x_min, bounds.x_max),
                XScale::Percentile => Axis::percentile(bounds.x_max),
            };
            let y_axis = if panel.y_log {
                Axis::log(bounds.y_min, bounds.y_max)
            } else {
                Axis::linear(bounds.y_min, bounds.y_max)
            };
            draw_grid(svg, &area, &x_axis, &y_axis);
            for (index, points) in series.iter().enumerate() {
                draw_series(svg, &area, &x_axis, &y_axis, points, colour(index));
            }
        }
        None => svg.text(
            area.centre_x(),
            area.centre_y(),
            TextStyle::plain(16.0, "middle"),
            "no data",
        ),
    }

    // The frame goes on top so lines touching the bounds do not hide it.
    svg.frame(&area);
    draw_axis_labels(svg, &area, panel);
    draw_legend(svg, &area, &panel.lines, &series);
}

fn draw_axis_labels(svg: &mut Svg, area: &PlotArea, panel: &Panel) {
    svg.text(
        area.centre_x(),
        area.bottom() + 44.0,
        TextStyle::plain(13.0, "middle"),
        &shorten(&panel.x_label, TITLE_CHARS),
    );
    svg.rotated_text(
        area.left - 72.0,
        area.centre_y(),
        TextStyle::plain(13.0, "middle"),
        &shorten(&panel.y_label, TITLE_CHARS),
    );
}

fn draw_grid(svg: &mut Svg, area: &PlotArea, x_axis: &Axis, y_axis: &Axis) {
    for tick in &x_axis.ticks {
        let x = area.px_x(x_axis, tick.pos);
        svg.grid_line(x, area.top, x, area.bottom());
        svg.text(
            x,
            area.bottom() + 17.0,
            TextStyle::plain(11.0, "middle"),
            &tick.label,
        );
    }
    for tick in &y_axis.ticks {
        let y = area.px_y(y_axis, tick.pos);
        svg.grid_line(area.left, y, area.right(), y);
        // +4 drops the baseline so the label sits centred on the gridline without
        // relying on dominant-baseline, which not every renderer supports.
        svg.text(
            area.left - 6.0,
            y + 4.0,
            TextStyle::plain(11.0, "end"),
            &tick.label,
        );
    }
}

fn draw_series(
    svg: &mut Svg,
    area: &PlotArea,
    x_axis: &Axis,
    y_axis: &Axis,
    points: &[(f64, f64)],
    colour: &str,
) {
    if points.is_empty() {
        return;
    }
    let pixels: Vec<(f64, f64)> = points
        .iter()
        .map(|&(x, y)| (area.px_x(x_axis, x), area.px_y(y_axis, y)))
        .collect();
    let pixels = downsample(pixels, MAX_POLYLINE_POINTS);
    svg.polyline(&pixels, colour);
    // A one-vertex polyline draws nothing, so mark a lone point explicitly.
    if let [(x, y)] = pixels.as_slice() {
        svg.dot(*x, *y, colour);
    }
}

fn draw_legend(svg: &mut Svg, area: &PlotArea, lines: &[Line], series: &[Vec<(f64, f64)>]) {
    let left = area.right() + 16.0;
    let rows = (area.height / LEGEND_ROW_H).floor().max(1.0) as usize;
    // When there are more lines than rows, the last row summarises the rest.
    let shown = if lines.len() > rows {
        rows - 1
    } else {
        lines.len()
    };
    for (index, line) in lines.iter().take(shown).enumerate() {
        let y = area.top + index as f64 * LEGEND_ROW_H;
        let mut label = shorten(&line.label, LEGEND_LABEL_CHARS);
        if series.get(index).is_none_or(|points| points.is_empty()) {
            label.push_str(" (no data)");
        }
        svg.swatch(left, y + 3.0, colour(index));
        svg.text(
            left + 18.0,
            y + 13.0,
            TextStyle::plain(12.0, "start"),
            &label,
        );
    }
    if shown < lines.len() {
        let y = area.top + shown as f64 * LEGEND_ROW_H;
        let more = format!("+{} more", lines.len() - shown);
        svg.text(
            left + 18.0,
            y + 13.0,
            TextStyle::plain(12.0, "start"),
            &more,
        );
    }
}

/// Shortens text to at most `max_chars` characters (counting chars, not bytes, so
/// multi-byte text is never split), marking the cut with an ellipsis.
fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let mut short: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    short.push('…');
    short
}

// ---------------------------------------------------------------------------------------
// Data transformation
// ---------------------------------------------------------------------------------------

/// Maps a line's points into axis space (log/percentile applied), dropping points that
/// cannot be plotted.
fn transformed_points(line: &Line, x_scale: XScale, y_log: bool) -> Vec<(f64, f64)> {
    line.points
        .iter()
        .filter_map(|&(x, y)| Some((transform_x(x_scale, x)?, transform_y(y_log, y)?)))
        .collect()
}

fn transform_x(scale: XScale, x: f64) -> Option<f64> {
    if !x.is_finite() {
        return None;
    }
    match scale {
        XScale::Linear => Some(clamp_magnitude(x)),
        XScale::Percentile => {
            // Negative quantiles are meaningless; skip rather than invent a position.
            if x < 0.0 {
                return None;
            }
            let q = x.min(MAX_QUANTILE);
            Some(-(1.0 - q).log10())
        }
    }
}

fn transform_y(log: bool, y: f64) -> Option<f64> {
    if !y.is_finite() {
        return None;
    }
    if log {
        // log10 of any positive finite f64 is finite (about -323.3..308.3).
        (y > 0.0).then(|| y.log10())
    } else {
        Some(clamp_magnitude(y))
    }
}

fn clamp_magnitude(v: f64) -> f64 {
    v.clamp(-VALUE_LIMIT, VALUE_LIMIT)
}

/// Extent of all plottable points of a panel, in axis space.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    x_min: f64,
    x_max: f64,
    y_min: f64,
    y_max: f64,
}

impl Bounds {
    /// Returns `None` when no series has a single plottable point.
    fn of(series: &[Vec<(f64, f64)>]) -> Option<Bounds> {
        let mut points = series.iter().flatten();
        let &(x0, y0) = points.next()?;
        let start = Bounds {
            x_min: x0,
            x_max: x0,
            y_min: y0,
            y_max: y0,
        };
        Some(points.fold(start, |b, &(x, y)| Bounds {
            x_min: b.x_min.min(x),
            x_max: b.x_max.max(x),
            y_min: b.y_min.min(y),
            y_max: b.y_max.max(y),
        }))
    }
}

// ---------------------------------------------------------------------------------------
// Axes and ticks
// ---------------------------------------------------------------------------------------

/// One tick: position in axis space and its label.
#[derive(Debug, Clone, PartialEq)]
struct Tick {
    pos: f64,
    label: String,
}

/// An axis range in axis space (already log/percentile transformed) plus its ticks.
/// Invariant: `lo < hi`, both finite.
#[derive(Debug, Clone)]
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<Tick>,
}

impl Axis {
    /// Position of `value` as a fraction of the axis length, 0 at `lo` and 1 at `hi`.
    fn fraction(&self, value: f64) -> f64 {
        let f = (value - self.lo) / (self.hi - self.lo);
        if f.is_finite() {
            f.clamp(0.0, 1.0)
        } else {
            // Unreachable given the invariant; centring beats emitting "NaN".
            0.5
        }
    }

    /// Linear axis covering `[min, max]`, extended to a multiple of a 1/2/5 x 10^k step.
    fn linear(min: f64, max: f64) -> Axis {
        let (min, max) = widen_linear(min, max);
        let Some(step) = choose_linear_step(min, max) else {
            return Axis::two_point(min, max);
        };
        let first = (min / step).floor();
        let last = (max / step).ceil();
        let (lo, hi) = (first * step, last * step);
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Axis::two_point(min, max);
        }
        // Count is bounded by choose_linear_step, so this loop is short.
        let count = (last - first) as i64;
        let ticks = (0..=count)
            .map(|i| {
                let value = (first + i as f64) * step;
                Tick {
                    pos: value,
                    label: format_linear(value, step),
                }
            })
            .collect();
        Axis { lo, hi, ticks }
    }

    /// Fallback when no nice step fits (should not happen for finite input): label the
    /// two ends only.
    fn two_point(min: f64, max: f64) -> Axis {
        let (lo, hi) = if min < max { (min, max) } else { (0.0, 1.0) };
        let step = hi - lo;
        let ticks = [lo, hi]
            .iter()
            .map(|&v| Tick {
                pos: v,
                label: format_linear(v, step),
            })
            .collect();
        Axis { lo, hi, ticks }
    }

    /// Log10 axis over `[min_log, max_log]` (exponents), extended to whole decades.
    fn log(min_log: f64, max_log: f64) -> Axis {
        let (min_log, max_log) = if max_log - min_log < 1e-9 {
            let mid = (min_log + max_log) / 2.0;
            (mid - 0.5, mid + 0.5)
        } else {
            (min_log, max_log)
        };
        // Exponents of positive finite f64 lie within about -324..309, so these casts
        // are exact.
        let low_decade = min_log.floor() as i64;
        let high_decade = (max_log.ceil() as i64).max(low_decade + 1);
        if high_decade - low_decade <= 2 {
            return Axis::log_one_two_five(low_decade, high_decade - low_decade);
        }
        let stride = decade_stride(low_decade, high_decade);
        let first = low_decade.div_euclid(stride) * stride;
        let last = -(-high_decade).div_euclid(stride) * stride;
        let ticks = (0..=(last - first) / stride)
            .map(|i| {
                let exponent = first + i * stride;
                Tick {
                    pos: exponent as f64,
                    label: format_power_of_ten(1, exponent),
                }
            })
            .collect();
        Axis {
            lo: first as f64,
            hi: last as f64,
            ticks,
        }
    }

    /// Narrow log axis (one or two decades): ticks at 1, 2, 5 x 10^k so there are
    /// still at least four of them.
    fn log_one_two_five(first: i64, decades: i64) -> Axis {
        let mut ticks = Vec::new();
        for exponent in first..first + decades {
            for mantissa in [1, 2, 5] {
                ticks.push(Tick {
                    pos: exponent as f64 + (mantissa as f64).log10(),
                    label: format_power_of_ten(mantissa, exponent),
                });
            }
        }
        let last = first + decades;
        ticks.push(Tick {
            pos: last as f64,
            label: format_power_of_ten(1, last),
        });
        Axis {
            lo: first as f64,
            hi: last as f64,
            ticks,
        }
    }

    /// Percentile axis in -log10(1 - q) space, from 0% up to the next "nines" level at
    /// or above the largest quantile present.
    fn percentile(max_t: f64) -> Axis {
        // The small tolerance keeps q = 0.999 (t = 2.9999999999999996) on 99.9%
        // instead of extending the axis to 99.99%.
        let nines = ((max_t - 1e-9).ceil() as i64).clamp(1, 6);
        let mut ticks = vec![
            Tick {
                pos: 0.0,
                label: "0%".to_string(),
            },
            Tick {
                pos: 2.0_f64.log10(),
                label: "50%".to_string(),
            },
        ];
        ticks.extend((1..=nines).map(|n| Tick {
            pos: n as f64,
            label: nines_label(n),
        }));
        Axis {
            lo: 0.0,
            hi: nines as f64,
            ticks,
        }
    }
}

/// Smallest decade stride from 1, 2, 5, 10, 20, 50, ... that spans
/// `[low_decade, high_decade]` in at most seven intervals (at most eight ticks).
fn decade_stride(low_decade: i64, high_decade: i64) -> i64 {
    let mut power = 1;
    loop {
        for mantissa in [1, 2, 5] {
            let stride = mantissa * power;
            let first = low_decade.div_euclid(stride);
            let last = -(-high_decade).div_euclid(stride);
            if last - first <= 7 {
                return stride;
            }
        }
        // Terminates: once the stride exceeds the span there are at most two intervals.
        power *= 10;
    }
}

/// Gives a degenerate (zero or vanishing) range a non-zero span around its centre.
fn widen_linear(min: f64, max: f64) -> (f64, f64) {
    let mid = min / 2.0 + max / 2.0;
    let span = max - min;
    if span > (mid.abs() * 1e-9).max(MIN_LINEAR_SPAN) {
        return (min, max);
    }
    let half = mid.abs() * 0.1;
    let half = if half > MIN_LINEAR_SPAN { half } else { 1.0 };
    (mid - half, mid + half)
}

/// Picks the 1/2/5 x 10^k step whose tick count over `[min, max]` is closest to six,
/// preferring counts within 4..=8.
fn choose_linear_step(min: f64, max: f64) -> Option<f64> {
    let span = max - min;
    if !(span.is_finite() && span > 0.0) {
        return None;
    }
    let base = span.log10().floor() as i32;
    let mut best: Option<(i64, f64)> = None;
    for exponent in (base - 2)..=(base + 1) {
        for mantissa in [1.0, 2.0, 5.0] {
            let step = mantissa * 10f64.powi(exponent);
            if !(step.is_finite() && step > 0.0) {
                continue;
            }
            let intervals = (max / step).ceil() - (min / step).floor();
            if !(intervals.is_finite() && intervals >= 1.0) {
                continue;
            }
            let ticks = intervals as i64 + 1;
            let distance = (ticks - 6).abs();
            let score = if (4..=8).contains(&ticks) {
                distance
            } else {
                100 + distance
            };
            if best.is_none_or(|(best_score, _)| score < best_score) {
                best = Some((score, step));
            }
        }
    }
    best.map(|(_, step)| step)
}

/// "90%", "99%", "99.9%", "99.99%", ... for n nines.
fn nines_label(n: i64) -> String {
    match n {
        ..=1 => "90%".to_string(),
        2 => "99%".to_string(),
        _ => format!("99.{}%", "9".repeat((n - 2) as usize)),
    }
}

// ---------------------------------------------------------------------------------------
// Number formatting
// ---------------------------------------------------------------------------------------

/// Formats `mantissa x 10^exponent` (a log-axis tick) compactly.
fn format_power_of_ten(mantissa: i64, exponent: i64) -> String {
    // Outside the fixed-point range, build the label from the integers: 10^k itself
    // underflows to 0 or overflows to infinity at the extremes of f64.
    if !(-3..15).contains(&exponent) {
        return format!("{mantissa}e{exponent}");
    }
    let magnitude = 10f64.powi(exponent as i32);
    format_linear(mantissa as f64 * magnitude, magnitude)
}

/// Formats a tick value that is a multiple of `step` compactly: "0", "250", "1.5k",
/// "2M", "0.25", "1e-5". The number of decimals follows from the step, so values never
/// show float noise like 0.30000000000000004 and neighbouring ticks stay distinct.
fn format_linear(value: f64, step: f64) -> String {
    if !value.is_finite() || !step.is_finite() {
        return String::new();
    }
    // Anything much smaller than the step is zero with rounding noise (and avoids "-0").
    if value.abs() <= step.abs() * 1e-6 {
        return "0".to_string();
    }
    let magnitude = value.abs();
    if !(1e-3..1e15).contains(&magnitude) {
        return format_scientific(value, step);
    }
    let (unit, suffix) = unit_for(magnitude);
    let decimals = decimals_for(step / unit);
    let text = format!("{:.*}", decimals, value / unit);
    format!("{}{}", trim_fraction(&text), suffix)
}

/// SI-style suffix for large magnitudes.
fn unit_for(magnitude: f64) -> (f64, &'static str) {
    if magnitude >= 1e12 {
        (1e12, "T")
    } else if magnitude >= 1e9 {
        (1e9, "G")
    } else if magnitude >= 1e6 {
        (1e6, "M")
    } else if magnitude >= 1e3 {
        (1e3, "k")
    } else {
        (1.0, "")
    }
}

/// Decimals needed to show multiples of `step` exactly (steps are 1/2/5 x 10^k).
fn decimals_for(step: f64) -> usize {
    if !(step.is_finite() && step > 0.0) {
        return 0;
    }
    let exponent = decimal_exponent(step);
    if exponent >= 0 {
        0
    } else {
        (-exponent).min(15) as usize
    }
}

/// `1.5e-5` style, with as many significant digits as the step resolves.
fn format_scientific(value: f64, step: f64) -> String {
    let digits = if step.is_finite() && step > 0.0 {
        (decimal_exponent(value) - decimal_exponent(step)).clamp(0, 15) as usize
    } else {
        0
    };
    let text = format!("{:.*e}", digits, value);
    match text.split_once('e') {
        Some((mantissa, exponent)) => format!("{}e{}", trim_fraction(mantissa), exponent),
        None => text,
    }
}

/// floor(log10(|v|)), nudged so exact powers of ten computed with rounding error
/// (0.0009999999999999998) still land in the right decade.
fn decimal_exponent(v: f64) -> i32 {
    (v.abs().log10() + 1e-9).floor() as i32
}

/// Drops trailing zeros (and a trailing '.') from a fixed-point number.
fn trim_fraction(text: &str) -> &str {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        text
    }
}

// ---------------------------------------------------------------------------------------
// Downsampling
// ---------------------------------------------------------------------------------------

/// Reduces a polyline (in pixel coordinates) to at most `max_points` vertices, always
/// keeping the first and last point.
///
/// Stage 1 keeps, for every run of consecutive points in the same pixel column, only the
/// lowest and highest point: this draws the same picture (a vertical stroke per column)
/// and bounds a left-to-right series to about two points per column. Stage 2 (for
/// series that wander back and forth in x) drops points rounding to the same pixel as
/// their predecessor, and stage 3 falls back to even striding as a hard cap.
fn downsample(points: Vec<(f64, f64)>, max_points: usize) -> Vec<(f64, f64)> {
    let max_points = max_points.max(2);
    if points.len() <= max_points {
        return points;
    }
    let points = column_extremes(&points);
    if points.len() <= max_points {
        return points;
    }
    let points = drop_repeated_pixels(&points);
    if points.len() <= max_points {
        return points;
    }
    stride(&points, max_points)
}

/// Pixel column a point falls in.
fn column(x: f64) -> i64 {
    x.floor() as i64
}

fn column_extremes(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let Some(last_index) = points.len().checked_sub(1) else {
        return Vec::new();
    };
    let mut keep: Vec<usize> = vec![0];
    let mut run_start = 0;
    while run_start < points.len() {
        let run_column = column(points[run_start].0);
        let mut run_end = run_start + 1;
        while run_end < points.len() && column(points[run_end].0) == run_column {
            run_end += 1;
        }
        let (low, high) = extreme_indices(points, run_start, run_end);
        keep.push(low.min(high));
        keep.push(low.max(high));
        run_start = run_end;
    }
    keep.push(last_index);
    // Indices were pushed in increasing order, so duplicates are adjacent.
    keep.dedup();
    keep.into_iter().map(|i| points[i]).collect()
}

/// Indices of the minimum and maximum y within `points[start..end]`.
fn extreme_indices(points: &[(f64, f64)], start: usize, end: usize) -> (usize, usize) {
    let mut low = start;
    let mut high = start;
    for i in start..end {
        if points[i].1 < points[low].1 {
            low = i;
        }
        if points[i].1 > points[high].1 {
            high = i;
        }
    }
    (low, high)
}

fn drop_repeated_pixels(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut kept: Vec<(f64, f64)> = Vec::with_capacity(points.len());
    for (i, &p) in points.iter().enumerate() {
        let is_last = i + 1 == points.len();
        let same_pixel = kept
            .last()
            .is_some_and(|q| q.0.round() == p.0.round() && q.1.round() == p.1.round());
        if !same_pixel || is_last {
            kept.push(p);
        }
    }
    kept
}

/// Evenly spaced selection of `max_points` points including both ends.
fn stride(points: &[(f64, f64)], max_points: usize) -> Vec<(f64, f64)> {
    if points.len() <= max_points || max_points < 2 {
        return points.to_vec();
    }
    let last = points.len() - 1;
    (0..max_points)
        .map(|i| points[i * last / (max_points - 1)])
        .collect()
}

// ---------------------------------------------------------------------------------------
// SVG writing
// ---------------------------------------------------------------------------------------

/// Font settings for one `<text>` element.
#[derive(Debug, Clone, Copy)]
struct TextStyle {
    size: f64,
    anchor: &'static str,
    bold: bool,
}

impl TextStyle {
    fn plain(size: f64, anchor: &'static str) -> TextStyle {
        TextStyle {
            size,
            anchor,
            bold: false,
        }
    }

    fn title(size: f64, anchor: &'static str) -> TextStyle {
        TextStyle {
            size,
            anchor,
            bold: true,
        }
    }
}

/// Accumulates SVG elements. Writing to a `String` cannot fail, so the `fmt::Result`s
/// are deliberately ignored.
struct Svg {
    buf: String,
}

impl Svg {
    fn new(width: f64, height: f64) -> Svg {
        let mut svg = Svg { buf: String::new() };
        let _ = writeln!(
            svg.buf,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="sans-serif">"#,
            w = width,
            h = height,
        );
        let _ = writeln!(
            svg.buf,
            r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
        );
        svg
    }

    fn finish(mut self) -> String {
        self.buf.push_str("</svg>\n");
        self.buf
    }

    fn text(&mut self, x: f64, y: f64, style: TextStyle, content: &str) {
        self.text_element(x, y, style, "", content);
    }

    /// Text rotated a quarter turn anticlockwise about its anchor (for the y label).
    fn rotated_text(&mut self, x: f64, y: f64, style: TextStyle, content: &str) {
        let transform = format!(r#" transform="rotate(-90 {x:.1} {y:.1})""#);
        self.text_element(x, y, style, &transform, content);
    }

    fn text_element(&mut self, x: f64, y: f64, style: TextStyle, extra: &str, content: &str) {
        let weight = if style.bold {
            r#" font-weight="bold""#
        } else {
            ""
        };
        let _ = writeln!(
            self.buf,
            r##"<text x="{x:.1}" y="{y:.1}" font-family="sans-serif" font-size="{size:.0}" text-anchor="{anchor}" fill="#222"{weight}{extra}>{content}</text>"##,
            size = style.size,
            anchor = style.anchor,
            content = escape_xml(content),
        );
    }

    fn grid_line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64) {
        let _ = writeln!(
            self.buf,
            r##"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="#e0e0e0" stroke-width="1"/>"##
        );
    }

    fn frame(&mut self, area: &PlotArea) {
        let _ = writeln!(
            self.buf,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#333" stroke-width="1"/>"##,
            area.left, area.top, area.width, area.height
        );
    }

    fn swatch(&mut self, x: f64, y: f64, colour: &str) {
        let _ = writeln!(
            self.buf,
            r#"<rect x="{x:.1}" y="{y:.1}" width="12" height="12" fill="{colour}"/>"#
        );
    }

    fn dot(&mut self, x: f64, y: f64, colour: &str) {
        let _ = writeln!(
            self.buf,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{colour}"/>"#
        );
    }

    fn polyline(&mut self, points: &[(f64, f64)], colour: &str) {
        let mut coords = String::with_capacity(points.len() * 12);
        for (i, (x, y)) in points.iter().enumerate() {
            if i > 0 {
                coords.push(' ');
            }
            let _ = write!(coords, "{x:.1},{y:.1}");
        }
        let _ = writeln!(
            self.buf,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" stroke-linejoin="round" points="{coords}"/>"#
        );
    }
}

/// Escapes text for use in XML content or attribute values. Characters XML 1.0 forbids
/// outright (most control characters) cannot be escaped, so they become U+FFFD; otherwise
/// a stray byte in a label would make strict parsers such as rsvg reject the file.
fn escape_xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if is_xml_char(c) => out.push(c),
            _ => out.push('\u{FFFD}'),
        }
    }
    out
}

/// The XML 1.0 `Char` production (surrogates cannot occur in a Rust `char`).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{FFFD}' | '\u{10000}'..)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(label: &str, points: Vec<(f64, f64)>) -> Line {
        Line {
            label: label.to_string(),
            points,
        }
    }

    fn panel(x_scale: XScale, y_log: bool, lines: Vec<Line>) -> Panel {
        Panel {
            title: "Panel".to_string(),
            x_label: "x".to_string(),
            y_label: "y".to_string(),
            x_scale,
            y_log,
            lines,
        }
    }

    /// Checks that tags nest properly, there is exactly one root `<svg>`, every `&`
    /// starts a known entity, and no forbidden characters appear.
    fn assert_well_formed(doc: &str) {
        assert!(doc.starts_with("<svg"), "document must start with <svg");
        assert!(
            doc.trim_end().ends_with("</svg>"),
            "document must end with </svg>"
        );
        let mut stack: Vec<String> = Vec::new();
        let mut roots = 0;
        let mut rest = doc;
        while let Some(start) = rest.find('<') {
            let after = &rest[start + 1..];
            let end = after.find('>').expect("unterminated tag");
            let tag = &after[..end];
            assert!(!tag.contains('<'), "raw < inside tag: {tag}");
            rest = &after[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().expect("closing tag without an open element");
                assert_eq!(open, name.trim(), "mismatched closing tag");
                continue;
            }
            let self_closing = tag.ends_with('/');
            let name = tag
                .trim_end_matches('/')
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            assert!(!name.is_empty(), "empty tag name");
            if stack.is_empty() {
                roots += 1;
                assert_eq!(name, "svg", "root element must be svg");
            }
            if !self_closing {
                stack.push(name);
            }
        }
        assert!(stack.is_empty(), "unclosed elements: {stack:?}");
        assert_eq!(roots, 1, "exactly one root element");
        for (i, _) in doc.match_indices('&') {
            let entity = &doc[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| entity.starts_with(e)),
                "bare & at {i}"
            );
        }
        assert!(doc.chars().all(is_xml_char), "forbidden XML character");
    }

    fn assert_no_bad_numbers(doc: &str) {
        for bad in ["NaN", "inf", "Inf"] {
            assert!(!doc.contains(bad), "document contains {bad}");
        }
    }

    fn polyline_points(doc: &str) -> Vec<Vec<(f64, f64)>> {
        doc.lines()
            .filter(|l| l.starts_with("<polyline"))
            .map(|l| {
                let start = l.find("points=\"").expect("points attribute") + 8;
                let end = start + l[start..].find('"').expect("closing quote");
                l[start..end]
                    .split(' ')
                    .map(|pair| {
                        let (x, y) = pair.split_once(',').expect("x,y pair");
                        (x.parse().expect("x"), y.parse().expect("y"))
                    })
                    .collect()
            })
            .collect()
    }

    fn tick_labels(axis: &Axis) -> Vec<&str> {
        axis.ticks.iter().map(|t| t.label.as_str()).collect()
    }

    #[test]
    fn document_shape_and_polyline_count() {
        let panels = vec![
            panel(
                XScale::Linear,
                false,
                vec![
                    line("a", vec![(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)]),
                    line("empty", vec![]),
                    line("b", vec![(0.0, 5.0), (2.0, 0.5)]),
                ],
            ),
            panel(
                XScale::Percentile,
                true,
                vec![line("p", vec![(0.5, 1.0), (0.99, 10.0), (0.999, 30.0)])],
            ),
        ];
        let doc = render_svg("run", &panels);
        assert_well_formed(&doc);
        assert_no_bad_numbers(&doc);
        assert_eq!(doc.matches("<polyline").count(), 3);
        assert!(doc.contains(r#"xmlns="http://www.w3.org/2000/svg""#));
        assert!(doc.contains(r#"fill="white""#));
        assert!(doc.contains(r#"font-family="sans-serif""#));
        assert!(doc.contains("viewBox=\"0 0 "));
        assert!(doc.contains("(no data)"), "empty line marked in legend");
        assert_eq!(doc.matches(r#"width="12" height="12""#).count(), 4);
    }

    #[test]
    fn text_is_escaped() {
        let hostile = "a<b&c";
        let mut p = panel(XScale::Linear, false, vec![line(hostile, vec![(0.0, 1.0)])]);
        p.title = hostile.to_string();
        p.x_label = "\"quoted\" 'x'".to_string();
        p.y_label = "ctl\u{1}char".to_string();
        let doc = render_svg(hostile, &[p]);
        assert_well_formed(&doc);
        assert!(doc.contains("a&lt;b&amp;c"));
        assert!(!doc.contains(hostile));
        assert!(doc.contains("&quot;quoted&quot; &apos;x&apos;"));
        assert!(!doc.contains('\u{1}'));
    }

    #[test]
    fn degenerate_inputs_give_valid_documents() {
        let nan = f64::NAN;
        let inf = f64::INFINITY;
        let cases: Vec<(&str, Vec<Panel>)> = vec![
            ("no panels", vec![]),
            ("no lines", vec![panel(XScale::Linear, false, vec![])]),
            (
                "empty line",
                vec![panel(XScale::Percentile, true, vec![line("e", vec![])])],
            ),
            (
                "all nan",
                vec![panel(
                    XScale::Linear,
                    false,
                    vec![line("n", vec![(nan, 1.0), (1.0, nan), (inf, -inf)])],
                )],
            ),
            (
                "single point",
                vec![panel(
                    XScale::Linear,
                    false,
                    vec![line("s", vec![(3.0, 7.0)])],
                )],
            ),
            (
                "equal values",
                vec![panel(
                    XScale::Linear,
                    false,
                    vec![line("eq", vec![(1.0, 0.0), (1.0, 0.0), (1.0, 0.0)])],
                )],
            ),
            (
                "equal values log",
                vec![panel(
                    XScale::Percentile,
                    true,
                    vec![line("eq", vec![(0.9, 5.0), (0.9, 5.0)])],
                )],
            ),
            (
                "negative on log",
                vec![panel(
                    XScale::Linear,
                    true,
                    vec![line("neg", vec![(0.0, -1.0), (1.0, 0.0), (2.0, -5.0)])],
                )],
            ),
            (
                "huge range",
                vec![
                    panel(
                        XScale::Linear,
                        false,
                        vec![line(
                            "h",
                            vec![(-f64::MAX, f64::MIN), (f64::MAX, f64::MAX), (0.0, 1e-300)],
                        )],
                    ),
                    panel(
                        XScale::Linear,
                        true,
                        vec![line("h", vec![(0.0, 5e-324), (1.0, f64::MAX)])],
                    ),
                ],
            ),
            (
                "subnormal span",
                vec![panel(
                    XScale::Linear,
                    false,
                    vec![line("t", vec![(0.0, 0.0), (5e-324, 5e-324)])],
                )],
            ),
            (
                "odd quantiles",
                vec![panel(
                    XScale::Percentile,
                    false,
                    vec![line(
                        "q",
                        vec![(-0.5, 1.0), (1.0, 2.0), (7.0, 3.0), (0.0, 4.0)],
                    )],
                )],
            ),
        ];
        for (name, panels) in cases {
            let doc = render_svg(name, &panels);
            assert_well_formed(&doc);
            assert_no_bad_numbers(&doc);
            let non_empty = panels
                .iter()
                .flat_map(|p| p.lines.iter().map(move |l| (p, l)))
                .filter(|(p, l)| !transformed_points(l, p.x_scale, p.y_log).is_empty())
                .count();
            assert_eq!(doc.matches("<polyline").count(), non_empty, "case {name}");
        }
    }

    #[test]
    fn panels_without_data_say_so() {
        let doc = render_svg(
            "t",
            &[panel(
                XScale::Linear,
                true,
                vec![line("neg", vec![(0.0, -1.0)])],
            )],
        );
        assert!(doc.contains(">no data</text>"));
        assert_eq!(doc.matches("<polyline").count(), 0);
        let doc = render_svg("t", &[]);
        assert!(doc.contains(">no data</text>"));
    }

    #[test]
    fn single_point_gets_a_marker() {
        let doc = render_svg(
            "t",
            &[panel(
                XScale::Linear,
                false,
                vec![line("s", vec![(1.0, 1.0)])],
            )],
        );
        assert_eq!(doc.matches("<polyline").count(), 1);
        assert_eq!(doc.matches("<circle").count(), 1);
    }

    #[test]
    fn percentile_axis_labels() {
        let points = vec![(0.5, 1.0), (0.9, 2.0), (0.99, 4.0), (0.999, 9.0)];
        let doc = render_svg(
            "t",
            &[panel(XScale::Percentile, false, vec![line("lat", points)])],
        );
        assert_well_formed(&doc);
        for label in [">50%<", ">90%<", ">99%<", ">99.9%<"] {
            assert!(doc.contains(label), "missing {label}");
        }
        assert!(
            !doc.contains(">99.99%<"),
            "axis must stop at the largest quantile"
        );

        let axis = Axis::percentile(transform_x(XScale::Percentile, 1.0).unwrap_or(0.0));
        assert_eq!(tick_labels(&axis).last(), Some(&"99.9999%"));
    }

    #[test]
    fn percentile_positions_are_log_spaced() {
        let t = |q| transform_x(XScale::Percentile, q).unwrap_or(f64::NAN);
        assert!((t(0.9) - 1.0).abs() < 1e-9);
        assert!((t(0.99) - 2.0).abs() < 1e-9);
        assert!((t(0.999) - 3.0).abs() < 1e-9);
        assert!((t(1.0) - 6.0).abs() < 1e-9, "q >= 1 clamps to six nines");
        assert_eq!(transform_x(XScale::Percentile, -0.1), None);
    }

    #[test]
    fn downsampling_bounds_large_lines() {
        let n = 100_000;
        let points: Vec<(f64, f64)> = (0..n)
            .map(|i| {
                let x = i as f64;
                (x, (x * 0.01).sin() * 100.0 + (i % 7) as f64)
            })
            .collect();
        let doc = render_svg(
            "big",
            &[panel(XScale::Linear, false, vec![line("big", points)])],
        );
        assert_well_formed(&doc);
        let lines = polyline_points(&doc);
        assert_eq!(lines.len(), 1);
        let drawn = &lines[0];
        assert!(drawn.len() <= 2100, "{} points", drawn.len());
        assert!(drawn.len() > 500, "kept too little: {}", drawn.len());
        // First and last points sit on the left and right edges of the plot.
        let first = drawn.first().copied().unwrap_or_default();
        let last = drawn.last().copied().unwrap_or_default();
        assert!((first.0 - MARGIN_LEFT).abs() < 0.05, "first {first:?}");
        assert!(
            (last.0 - (MARGIN_LEFT + PLOT_W)).abs() < PLOT_W * 0.1,
            "last {last:?}"
        );
    }

    #[test]
    fn downsampling_keeps_ends_and_extremes() {
        // Noisy data: neighbouring points rarely share a pixel, so only the per-column
        // min/max stage keeps the spikes; plain striding would very likely drop them.
        let mut points: Vec<(f64, f64)> = (0..100_000)
            .map(|i| (i as f64 * PLOT_W / 100_000.0, 100.0 + ((i * 7) % 50) as f64))
            .collect();
        points[54_321].1 = 0.0;
        points[54_322].1 = 500.0;
        let first = points[0];
        let last = points[points.len() - 1];
        let out = downsample(points, MAX_POLYLINE_POINTS);
        assert!(out.len() <= MAX_POLYLINE_POINTS, "{}", out.len());
        assert_eq!(out.first(), Some(&first));
        assert_eq!(out.last(), Some(&last));
        assert!(out.iter().any(|p| p.1 == 0.0), "low spike dropped");
        assert!(out.iter().any(|p| p.1 == 500.0), "high spike dropped");
    }

    #[test]
    fn downsampling_caps_back_and_forth_series() {
        // x alternates between far-apart columns, so column runs do not help.
        let points: Vec<(f64, f64)> = (0..50_000)
            .map(|i| (if i % 2 == 0 { 0.0 } else { 900.0 }, (i % 320) as f64))
            .collect();
        let first = points[0];
        let last = points[points.len() - 1];
        let out = downsample(points, MAX_POLYLINE_POINTS);
        assert!(out.len() <= MAX_POLYLINE_POINTS, "{}", out.len());
        assert_eq!(out.first(), Some(&first));
        assert_eq!(out.last(), Some(&last));
    }

    #[test]
    fn linear_ticks_are_nice() {
        let cases = [
            (0.0, 1000.0),
            (0.0, 0.3),
            (0.1, 0.7),
            (-3.0, 17.0),
            (12_345.0, 67_890.0),
            (0.0, 2.5e6),
            (1e-6, 3e-6),
            (-1e300, 1e300),
        ];
        for (min, max) in cases {
            let axis = Axis::linear(min, max);
            let n = axis.ticks.len();
            assert!((4..=8).contains(&n), "{min}..{max}: {n} ticks");
            assert!(axis.lo <= min && axis.hi >= max, "{min}..{max} not covered");
            let labels = tick_labels(&axis);
            for label in &labels {
                assert!(label.len() <= 12, "long label {label:?}");
                assert!(!label.contains("0000"), "float noise {label:?}");
                assert!(!label.contains("9999"), "float noise {label:?}");
            }
            let mut unique = labels.clone();
            unique.dedup();
            assert_eq!(unique.len(), labels.len(), "duplicate labels {labels:?}");
        }
        // A narrow window far from zero needs many digits, but labels must stay distinct.
        let axis = Axis::linear(1e9, 1e9 + 7.0);
        let labels = tick_labels(&axis);
        let mut unique = labels.clone();
        unique.dedup();
        assert_eq!(unique.len(), labels.len(), "duplicate labels {labels:?}");

        let axis = Axis::linear(0.0, 0.3);
        let labels = tick_labels(&axis);
        assert!(
            labels.contains(&"0.3") || labels.contains(&"0.25"),
            "{labels:?}"
        );
    }

    #[test]
    fn equal_values_get_a_span() {
        for v in [0.0, 5.0, -2.0, 1e-20, 1e20] {
            let axis = Axis::linear(v, v);
            assert!(axis.lo < v && v < axis.hi, "{v}: {}..{}", axis.lo, axis.hi);
            assert!(axis.ticks.len() >= 4);
        }
        let axis = Axis::log(2.0, 2.0);
        assert!(axis.lo < 2.0 && 2.0 < axis.hi);
    }

    #[test]
    fn log_ticks() {
        let axis = Axis::log(0.0, 6.0);
        assert_eq!(
            tick_labels(&axis),
            vec!["1", "10", "100", "1k", "10k", "100k", "1M"]
        );
        let axis = Axis::log(-0.3, 0.7);
        assert_eq!(
            tick_labels(&axis),
            vec!["0.1", "0.2", "0.5", "1", "2", "5", "10"]
        );
        let axis = Axis::log(-300.0, 300.0);
        assert!(axis.ticks.len() <= 8 && axis.ticks.len() >= 4);
        assert!(axis.lo <= -300.0 && axis.hi >= 300.0);
        // The whole f64 range: labels come from integers, never "0" or "inf".
        let axis = Axis::log(-323.3, 308.2);
        assert!(axis.ticks.len() >= 4 && axis.ticks.len() <= 8);
        assert!(axis.lo <= -323.3 && axis.hi >= 308.2);
        for tick in &axis.ticks {
            assert!(tick.label.contains('e') || tick.label == "1", "{tick:?}");
        }
        let axis = Axis::log(-7.2, -4.1);
        assert_eq!(
            tick_labels(&axis),
            vec!["1e-8", "1e-7", "1e-6", "1e-5", "1e-4"]
        );
    }

    #[test]
    fn number_formatting() {
        assert_eq!(format_linear(0.0, 250.0), "0");
        assert_eq!(format_linear(250.0, 250.0), "250");
        assert_eq!(format_linear(1500.0, 500.0), "1.5k");
        assert_eq!(format_linear(2e6, 1e6), "2M");
        assert_eq!(format_linear(0.1 * 3.0, 0.1), "0.3");
        assert_eq!(format_linear(0.25, 0.05), "0.25");
        assert_eq!(format_linear(1e-5, 1e-5), "1e-5");
        assert_eq!(format_linear(1.5e-5, 5e-6), "1.5e-5");
        assert_eq!(format_linear(3e18, 1e18), "3e18");
        assert_eq!(format_linear(-2000.0, 1000.0), "-2k");
        assert_eq!(format_linear(-1e-17, 0.1), "0");
        assert_eq!(format_linear(1e9 + 2.0, 1.0), "1.000000002G");
    }

    #[test]
    fn palette_cycles_and_legend_overflows() {
        let lines: Vec<Line> = (0..30)
            .map(|i| line(&format!("series {i}"), vec![(0.0, i as f64), (1.0, 1.0)]))
            .collect();
        let doc = render_svg("many", &[panel(XScale::Linear, false, lines)]);
        assert_well_formed(&doc);
        assert_eq!(doc.matches("<polyline").count(), 30);
        assert!(doc.contains("more</text>"));
        assert_eq!(colour(0), colour(PALETTE.len()));
    }

    #[test]
    fn long_labels_are_shortened_on_char_boundaries() {
        let label = "é".repeat(100);
        let short = shorten(&label, LEGEND_LABEL_CHARS);
        assert_eq!(short.chars().count(), LEGEND_LABEL_CHARS);
        assert!(short.ends_with('…'));
    }
}
