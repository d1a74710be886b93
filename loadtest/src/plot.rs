//! SVG plots of a load-test run: panels (a timeline, latency by percentile)
//! stacked in one document under its title.
//!
//! Drawn with plotters' SVG backend, without its font features (`ttf`,
//! `ab_glyph`): the SVG backend writes text as `<text>` elements and leaves
//! the glyphs to the viewer, and plotters lays text out from an estimate of
//! its width (0.7 em a byte), which is all a chart needs here. So no system
//! font library is linked.
//!
//! What is ours: turning the points into what can be plotted (non-finite
//! values, values at or below zero on a log axis, quantiles on the
//! percentile axis), ranges that are never empty, tick labels (SI suffixes,
//! "99.9%"), the legend beside each chart rather than over its data, and a
//! cap on the vertices of one line. Plotters escapes the text it writes;
//! characters XML does not allow at all are dropped here first. The output
//! is a standalone document that opens in browsers, rsvg and Inkscape.

use plotters::coord::combinators::LogCoord;
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

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

/// Renders panels stacked vertically (each about 1,000 x 400 px, with its legend on the
/// right) under a document title, and returns the SVG document.
#[must_use]
pub fn render_svg(title: &str, panels: &[Panel]) -> String {
    let mut out = String::new();
    match draw_document(&mut out, title, panels) {
        Ok(()) => out,
        // Drawing into a string fails only on a plotters bug; the caller still gets a
        // well-formed document, which says so.
        Err(e) => {
            let mut out = String::new();
            let note = format!("the plot could not be drawn: {e}");
            match draw_document(&mut out, &note, &[]) {
                Ok(()) => out,
                Err(_) => EMPTY_SVG.to_owned(),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------

/// Width of one panel's chart: plotting area and the axis labels left of it.
const CHART_W: u32 = 1000;
/// Room right of the chart for the legend.
const LEGEND_W: u32 = 210;
/// Height of one panel: title, plotting area, x tick labels and x label.
const PANEL_H: u32 = 420;
/// Room at the top of the document for its title.
const DOC_TITLE_H: u32 = 48;
/// Body height when there are no panels, so the "no data" note has room.
const EMPTY_BODY_H: u32 = 60;
/// Total document width.
const DOC_W: u32 = CHART_W + LEGEND_W;
/// Height of one legend row.
const LEGEND_ROW_H: i32 = 18;
/// Longest legend label, in characters, before it is shortened with an ellipsis.
const LEGEND_LABEL_CHARS: usize = 26;
/// Longest title or axis label, in characters; longer text would run off the page.
const TITLE_CHARS: usize = 140;
/// Upper bound on the vertices drawn per line, so huge series stay small on disk.
const MAX_LINE_POINTS: usize = 2000;
/// Decades a log axis spans at most, below its largest value.
const MAX_LOG_DECADES: i32 = 60;
/// Largest quantile plotted on a percentile axis (six nines).
const MAX_QUANTILE: f64 = 1.0 - 1e-6;
/// Data magnitudes are clamped to this, so that spans stay finite.
const VALUE_LIMIT: f64 = 1e300;
/// plotters writes an SVG font size of size / 1.24; sizes here are in pixels.
const FONT_SCALE: f64 = 1.24;
const FONT: &str = "sans-serif";
/// What is returned if even the error note cannot be drawn.
const EMPTY_SVG: &str =
    "<svg width=\"1\" height=\"1\" viewBox=\"0 0 1 1\" xmlns=\"http://www.w3.org/2000/svg\"></svg>\n";

/// Distinguishable line colours (Tableau 10 subset), cycled when there are more lines.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn colour(index: usize) -> RGBColor {
    PALETTE[index % PALETTE.len()]
}

fn font(px: f64) -> TextStyle<'static> {
    TextStyle::from((FONT, px * FONT_SCALE).into_font())
}

fn draw_document(out: &mut String, title: &str, panels: &[Panel]) -> DrawResult {
    let body = match panels.len() {
        0 => EMPTY_BODY_H,
        n => PANEL_H * u32::try_from(n).unwrap_or(u32::MAX / PANEL_H),
    };
    let root = SVGBackend::with_string(out, (DOC_W, DOC_TITLE_H + body)).into_drawing_area();
    root.fill(&WHITE)?;
    let centre = Pos::new(HPos::Center, VPos::Center);
    root.draw_text(
        &clean(title, TITLE_CHARS),
        &font(20.0).pos(centre),
        (DOC_W as i32 / 2, DOC_TITLE_H as i32 / 2),
    )?;
    let (_, body) = root.split_vertically(DOC_TITLE_H);
    if panels.is_empty() {
        body.draw_text(
            "no data",
            &font(14.0).pos(centre),
            (DOC_W as i32 / 2, EMPTY_BODY_H as i32 / 2),
        )?;
    }
    let mut rest = body;
    for panel in panels {
        let (this, below) = rest.split_vertically(PANEL_H);
        draw_panel(&this, panel)?;
        rest = below;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(area: &Area, panel: &Panel) -> DrawResult {
    let (chart, legend) = area.split_horizontally(CHART_W);
    let mut series: Vec<Vec<(f64, f64)>> = panel
        .lines
        .iter()
        .map(|l| thin(plottable(l, panel.x_scale, panel.y_log), MAX_LINE_POINTS))
        .collect();
    draw_legend(&legend, &panel.lines, &series)?;
    let Some(mut b) = Bounds::of(&series) else {
        return draw_empty_chart(&chart, panel);
    };
    if panel.y_log {
        // Values more than MAX_LOG_DECADES below the largest sit on the floor of the
        // axis: plotters' log axis divides its ends, and a quotient that overflows
        // (1e300 / 1e-300) sends its tick search into a loop without end.
        let floor = b.y_max / 10f64.powi(MAX_LOG_DECADES);
        for p in series.iter_mut().flatten() {
            p.1 = p.1.max(floor);
        }
        b.y_min = b.y_min.max(floor);
    }
    let (x0, x1) = widen(b.x_min, b.x_max);
    let linear_x = || RangedCoordf64::from(x0..x1);
    let linear_y = || {
        let (y0, y1) = pad_linear(b.y_min, b.y_max);
        RangedCoordf64::from(y0..y1)
    };
    let log_y = || LogCoord::from(log_range(b.y_min, b.y_max).log_scale());
    // One chart function, four coordinate types.
    match (panel.x_scale, panel.y_log) {
        (XScale::Linear, false) => draw_chart(&chart, panel, &series, linear_x(), linear_y()),
        (XScale::Linear, true) => draw_chart(&chart, panel, &series, linear_x(), log_y()),
        (XScale::Percentile, false) => {
            draw_chart(&chart, panel, &series, percentile_axis(b.x_max), linear_y())
        }
        (XScale::Percentile, true) => {
            draw_chart(&chart, panel, &series, percentile_axis(b.x_max), log_y())
        }
    }
}

/// One panel's chart: title, axes with labelled ticks and a grid, and the lines.
fn draw_chart<X, Y>(
    area: &Area,
    panel: &Panel,
    series: &[Vec<(f64, f64)>],
    x: X,
    y: Y,
) -> DrawResult
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(clean(&panel.title, TITLE_CHARS), font(15.0))
        .margin(10)
        .x_label_area_size(48)
        .y_label_area_size(90)
        .build_cartesian_2d(x, y)?;
    let x_label = |v: &f64| match panel.x_scale {
        XScale::Linear => format_si(*v),
        XScale::Percentile => percentile_label(*v),
    };
    chart
        .configure_mesh()
        .x_desc(clean(&panel.x_label, TITLE_CHARS))
        .y_desc(clean(&panel.y_label, TITLE_CHARS))
        .axis_desc_style(font(13.0))
        .label_style(font(11.0))
        .x_labels(8)
        .y_labels(8)
        .x_label_formatter(&x_label)
        .y_label_formatter(&|v: &f64| format_si(*v))
        // No light grid: besides, plotters' log axis enumerates its light lines
        // decade by decade, which takes minutes over hundreds of decades.
        .max_light_lines(0)
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;
    for (index, points) in series.iter().enumerate() {
        let style = colour(index).stroke_width(2);
        chart.draw_series(LineSeries::new(points.iter().copied(), style))?;
        // A one-vertex line draws nothing: mark a lone point.
        if let [p] = points.as_slice() {
            chart.draw_series(std::iter::once(Circle::new(*p, 3, colour(index).filled())))?;
        }
    }
    Ok(())
}

/// A panel without a single plottable point: its title, a frame and "no data".
fn draw_empty_chart(area: &Area, panel: &Panel) -> DrawResult {
    let mut chart = ChartBuilder::on(area)
        .caption(clean(&panel.title, TITLE_CHARS), font(15.0))
        .margin(10)
        .x_label_area_size(48)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(0)
        .y_labels(0)
        .x_desc(clean(&panel.x_label, TITLE_CHARS))
        .y_desc(clean(&panel.y_label, TITLE_CHARS))
        .axis_desc_style(font(13.0))
        .draw()?;
    let centre = font(16.0).pos(Pos::new(HPos::Center, VPos::Center));
    chart.draw_series(std::iter::once(Text::new("no data", (0.5, 0.5), centre)))?;
    Ok(())
}

/// The legend beside a chart: a swatch and a label per line, "(no data)" after a line
/// with nothing to plot, and "+N more" in the last row when the lines outnumber the rows.
fn draw_legend(area: &Area, lines: &[Line], series: &[Vec<(f64, f64)>]) -> DrawResult {
    // Level with the plotting area: below the chart's caption and margin.
    let top = 48;
    let (_, height) = area.dim_in_pixel();
    let rows = ((height as i32 - top - 60) / LEGEND_ROW_H).max(1) as usize;
    let shown = if lines.len() > rows {
        rows - 1
    } else {
        lines.len()
    };
    let style = font(12.0).pos(Pos::new(HPos::Left, VPos::Center));
    for (index, line) in lines.iter().take(shown).enumerate() {
        let y = top + index as i32 * LEGEND_ROW_H;
        let mut label = clean(&line.label, LEGEND_LABEL_CHARS);
        if series.get(index).is_none_or(|p| p.is_empty()) {
            label.push_str(" (no data)");
        }
        area.draw(&Rectangle::new(
            [(8, y - 5), (20, y + 5)],
            colour(index).filled(),
        ))?;
        area.draw_text(&label, &style, (26, y))?;
    }
    if shown < lines.len() {
        let y = top + shown as i32 * LEGEND_ROW_H;
        area.draw_text(&format!("+{} more", lines.len() - shown), &style, (26, y))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------

/// A line's points as plotted: x on the percentile axis as -log10(1 - q); points that
/// cannot be plotted (non-finite, y <= 0 on a log axis, q < 0) dropped.
fn plottable(line: &Line, x_scale: XScale, y_log: bool) -> Vec<(f64, f64)> {
    line.points
        .iter()
        .filter_map(|&(x, y)| {
            if !(x.is_finite() && y.is_finite()) || (y_log && y <= 0.0) {
                return None;
            }
            let x = match x_scale {
                XScale::Linear => x.clamp(-VALUE_LIMIT, VALUE_LIMIT),
                XScale::Percentile if x < 0.0 => return None,
                XScale::Percentile => -(1.0 - x.min(MAX_QUANTILE)).log10(),
            };
            Some((x, y.clamp(-VALUE_LIMIT, VALUE_LIMIT)))
        })
        .collect()
}

/// Extent of all plottable points of a panel.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    x_min: f64,
    x_max: f64,
    y_min: f64,
    y_max: f64,
}

impl Bounds {
    /// `None` when no series has a single point.
    fn of(series: &[Vec<(f64, f64)>]) -> Option<Bounds> {
        let mut points = series.iter().flatten();
        let &(x, y) = points.next()?;
        let start = Bounds {
            x_min: x,
            x_max: x,
            y_min: y,
            y_max: y,
        };
        Some(points.fold(start, |b, &(x, y)| Bounds {
            x_min: b.x_min.min(x),
            x_max: b.x_max.max(x),
            y_min: b.y_min.min(y),
            y_max: b.y_max.max(y),
        }))
    }
}

/// A range with a span: one value (or two too close to tell apart) gets room around it.
fn widen(lo: f64, hi: f64) -> (f64, f64) {
    let mid = lo / 2.0 + hi / 2.0;
    if hi - lo > (mid.abs() * 1e-9).max(1e-290) {
        return (lo, hi);
    }
    let half = if mid.abs() * 0.1 > 1e-290 {
        mid.abs() * 0.1
    } else {
        1.0
    };
    (mid - half, mid + half)
}

/// A linear y range with 5 % of room above the data (and below it, unless that would
/// cross zero from values that are all positive: counts and rates start at 0).
fn pad_linear(lo: f64, hi: f64) -> (f64, f64) {
    let (lo, hi) = widen(lo, hi);
    let pad = (hi - lo) * 0.05;
    let low = if lo >= 0.0 && lo - pad < 0.0 {
        0.0
    } else {
        lo - pad
    };
    (low, hi + pad)
}

/// A log y range over whole decades around positive `lo..=hi`.
fn log_range(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let low = 10f64.powf(lo.log10().floor());
    let high = 10f64.powf(hi.log10().ceil());
    let high = if high <= low { low * 10.0 } else { high };
    // Exponents of positive finite f64 lie within -324..309: both are finite and > 0
    // except at the very ends of f64, which the clamps keep out.
    low.max(f64::MIN_POSITIVE)..high.min(VALUE_LIMIT)
}

/// The percentile axis: 0 % up to the next level of nines at or above the largest
/// quantile present (`max_t` = -log10(1 - q)), ticks at 0 %, 50 % and each level.
fn percentile_axis(max_t: f64) -> PercentileAxis {
    // The small tolerance keeps q = 0.999 (t = 2.9999999999999996) on 99.9%.
    let nines = ((max_t - 1e-9).ceil() as i64).clamp(1, 6);
    let mut ticks = vec![0.0, 2f64.log10()];
    ticks.extend((1..=nines).map(|n| n as f64));
    PercentileAxis {
        linear: (0.0..nines as f64).into(),
        ticks,
    }
}

/// The percentile axis as plotters sees it: linear in -log10(1 - q), its ticks ours.
/// (plotters' own `with_key_points` keeps the tick positions but loses the label
/// formatter of an `f64` axis, so it cannot draw labelled ticks.)
struct PercentileAxis {
    linear: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ranged for PercentileAxis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, _hint: H) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.linear.range()
    }
}

impl ValueFormatter<f64> for PercentileAxis {
    fn format(value: &f64) -> String {
        percentile_label(*value)
    }
}

/// "0%", "50%", "90%", "99%", "99.9%", ... at the percentile axis's ticks.
fn percentile_label(t: f64) -> String {
    if t.abs() < 1e-9 {
        return "0%".into();
    }
    if (t - 2f64.log10()).abs() < 1e-9 {
        return "50%".into();
    }
    match t.round() as i64 {
        ..=1 => "90%".into(),
        2 => "99%".into(),
        n => format!("99.{}%", "9".repeat((n - 2).clamp(0, 16) as usize)),
    }
}

/// A tick value, compactly: "0", "250", "1.5k", "2M", "0.25", "1e-5". Ticks are nice
/// numbers, so six decimals in the unit are plenty; trailing zeros are dropped, which
/// also hides float noise (0.30000000000000004 reads "0.3").
fn format_si(v: f64) -> String {
    let m = v.abs();
    if !v.is_finite() {
        return String::new();
    }
    if m < 1e-12 {
        return "0".into();
    }
    if !(1e-3..1e15).contains(&m) {
        let text = format!("{v:.3e}");
        return match text.split_once('e') {
            Some((mantissa, exp)) => format!("{}e{exp}", trim_fraction(mantissa)),
            None => text,
        };
    }
    let (unit, suffix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(u, _)| m >= *u)
        .unwrap_or((1.0, ""));
    format!("{}{suffix}", trim_fraction(&format!("{:.6}", v / unit)))
}

fn trim_fraction(text: &str) -> &str {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        text
    }
}

/// Text as drawn: characters XML does not allow dropped (plotters escapes the rest),
/// and at most `max_chars` characters, the cut marked with an ellipsis.
fn clean(text: &str, max_chars: usize) -> String {
    let allowed = |c: &char| {
        matches!(*c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}')
            || *c >= '\u{10000}'
    };
    let text: String = text.chars().filter(allowed).collect();
    if text.chars().count() <= max_chars {
        return text;
    }
    let mut short: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    short.push('…');
    short
}

/// At most about `max_points` vertices of a line, first and last kept: the points are
/// cut into runs of equal length, and of each run the lowest and the highest point stay,
/// in their order, so that a spike survives the cut.
fn thin(points: Vec<(f64, f64)>, max_points: usize) -> Vec<(f64, f64)> {
    let max_points = max_points.max(4);
    if points.len() <= max_points {
        return points;
    }
    let runs = (max_points - 2) / 2;
    let inner = &points[1..points.len() - 1];
    let run = inner.len().div_ceil(runs);
    let mut out = Vec::with_capacity(max_points);
    out.push(points[0]);
    for chunk in inner.chunks(run) {
        let by_y = |a: &&(f64, f64), b: &&(f64, f64)| a.1.total_cmp(&b.1);
        let (lo, hi) = (
            chunk.iter().enumerate().min_by(|a, b| by_y(&a.1, &b.1)),
            chunk.iter().enumerate().max_by(|a, b| by_y(&a.1, &b.1)),
        );
        if let (Some((i, &low)), Some((j, &high))) = (lo, hi) {
            match i.cmp(&j) {
                std::cmp::Ordering::Less => out.extend([low, high]),
                std::cmp::Ordering::Greater => out.extend([high, low]),
                std::cmp::Ordering::Equal => out.push(low),
            }
        }
    }
    out.push(points[points.len() - 1]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(label: &str, points: &[(f64, f64)]) -> Line {
        Line {
            label: label.into(),
            points: points.to_vec(),
        }
    }

    fn panel(x_scale: XScale, y_log: bool, lines: Vec<Line>) -> Panel {
        Panel {
            title: "t".into(),
            x_label: "seconds".into(),
            y_label: "devices".into(),
            x_scale,
            y_log,
            lines,
        }
    }

    /// The text of every `<text>` element, trimmed.
    fn texts(doc: &str) -> Vec<String> {
        doc.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..];
                Some(body[..body.find("</text>")?].trim().to_owned())
            })
            .collect()
    }

    fn assert_document(doc: &str) {
        assert!(doc.starts_with("<svg"), "{}", &doc[..doc.len().min(200)]);
        assert!(doc.trim_end().ends_with("</svg>"));
        for bad in ["NaN", "inf", "\u{0}"] {
            assert!(!doc.contains(bad), "{bad} in the document");
        }
        assert_eq!(doc.matches("<text").count(), doc.matches("</text>").count());
    }

    #[test]
    fn a_timeline_has_its_titles_axes_ticks_legend_and_lines() {
        let doc = render_svg(
            "tether-loadtest broadcast: 2000 devices",
            &[panel(
                XScale::Linear,
                false,
                vec![
                    line(
                        "devices online",
                        &[(0.0, 0.0), (0.1, 2000.0), (0.14, 2000.0)],
                    ),
                    line("logins /s", &[(0.0, 500.0), (0.14, 500.0)]),
                ],
            )],
        );
        assert_document(&doc);
        let t = texts(&doc);
        for want in [
            "tether-loadtest broadcast: 2000 devices",
            "t",
            "seconds",
            "devices",
            "devices online",
            "logins /s",
            "0",
            "2k",
        ] {
            assert!(t.iter().any(|s| s == want), "no {want:?} in {t:?}");
        }
        // One line each, in its colour.
        for stroke in ["#1F77B4", "#FF7F0E"] {
            let lines = doc
                .matches(&format!("stroke=\"{stroke}\" stroke-width=\"2\""))
                .count();
            assert_eq!(lines, 1, "{stroke}: {doc}");
        }
    }

    #[test]
    fn text_is_escaped_and_characters_xml_forbids_are_dropped() {
        let doc = render_svg(
            "<b>&\"x\"\u{1}",
            &[panel(
                XScale::Linear,
                false,
                vec![line("a<b", &[(0.0, 1.0), (1.0, 2.0)])],
            )],
        );
        assert_document(&doc);
        assert!(doc.contains("&lt;b&gt;&amp;&quot;x&quot;"), "{doc}");
        assert!(doc.contains("a&lt;b"));
        assert!(!doc.contains("<b>") && !doc.contains('\u{1}'));
    }

    #[test]
    fn panels_and_lines_without_data_say_so() {
        let doc = render_svg("empty", &[]);
        assert_document(&doc);
        assert!(texts(&doc).contains(&"no data".to_owned()));
        let doc = render_svg(
            "x",
            &[panel(
                XScale::Linear,
                true,
                vec![line("rate", &[(0.0, 0.0), (1.0, -5.0), (f64::NAN, 1.0)])],
            )],
        );
        assert_document(&doc);
        let t = texts(&doc);
        assert!(t.contains(&"no data".to_owned()), "{t:?}");
        assert!(t.contains(&"rate (no data)".to_owned()), "{t:?}");
    }

    #[test]
    fn degenerate_and_extreme_inputs_give_valid_documents() {
        for points in [
            vec![(1.0, 5.0)],
            vec![(1.0, 5.0), (1.0, 5.0)],
            vec![(0.0, f64::MAX), (1.0, -f64::MAX)],
            vec![(f64::INFINITY, 1.0), (0.0, f64::NAN), (2.0, 1e-300)],
            vec![(0.0, f64::MIN_POSITIVE), (1.0, 1e300)],
        ] {
            for (x_scale, y_log) in [
                (XScale::Linear, false),
                (XScale::Linear, true),
                (XScale::Percentile, false),
                (XScale::Percentile, true),
            ] {
                let doc = render_svg("x", &[panel(x_scale, y_log, vec![line("l", &points)])]);
                assert_document(&doc);
            }
        }
    }

    #[test]
    fn a_single_point_gets_a_marker() {
        let doc = render_svg(
            "x",
            &[panel(
                XScale::Linear,
                false,
                vec![line("one", &[(3.0, 7.0)])],
            )],
        );
        assert_document(&doc);
        assert!(doc.contains("<circle"), "{doc}");
    }

    #[test]
    fn the_percentile_axis_is_labelled_in_nines_up_to_the_largest_quantile() {
        let spectrum: Vec<(f64, f64)> = [0.0, 0.5, 0.9, 0.99, 0.999]
            .iter()
            .map(|&q| (q, 1.0 + q * 10.0))
            .collect();
        let doc = render_svg(
            "x",
            &[panel(
                XScale::Percentile,
                true,
                vec![line("push", &spectrum)],
            )],
        );
        assert_document(&doc);
        let t = texts(&doc);
        for want in ["0%", "50%", "90%", "99%", "99.9%"] {
            assert!(t.contains(&want.to_owned()), "no {want} in {t:?}");
        }
        assert!(!t.contains(&"99.99%".to_owned()), "{t:?}");
        // Log y: decades labelled.
        assert!(
            t.contains(&"1".to_owned()) && t.contains(&"10".to_owned()),
            "{t:?}"
        );
        assert_eq!(percentile_label(6.0), "99.9999%");
        assert!((-(1.0 - 0.99f64).log10() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn numbers_are_compact() {
        assert_eq!(format_si(0.0), "0");
        assert_eq!(format_si(250.0), "250");
        assert_eq!(format_si(1500.0), "1.5k");
        assert_eq!(format_si(2e6), "2M");
        assert_eq!(format_si(0.1 + 0.2), "0.3");
        assert_eq!(format_si(-4200.0), "-4.2k");
        assert_eq!(format_si(1e-5), "1e-5");
        assert_eq!(format_si(1.25e20), "1.25e20");
        assert_eq!(format_si(f64::NAN), "");
    }

    #[test]
    fn long_lines_are_thinned_keeping_ends_and_spikes() {
        let mut points: Vec<(f64, f64)> = (0..100_000).map(|i| (i as f64, 1.0)).collect();
        points[54_321].1 = 1e6;
        let thinned = thin(points.clone(), MAX_LINE_POINTS);
        assert!(thinned.len() <= MAX_LINE_POINTS, "{}", thinned.len());
        assert_eq!(thinned.first(), points.first());
        assert_eq!(thinned.last(), points.last());
        assert!(thinned.contains(&(54_321.0, 1e6)), "the spike is kept");
        assert!(thinned.windows(2).all(|w| w[0].0 <= w[1].0), "order kept");
        let doc = render_svg(
            "x",
            &[panel(XScale::Linear, false, vec![line("big", &points)])],
        );
        assert_document(&doc);
        assert!(doc.len() < 200_000, "{} bytes", doc.len());
    }

    #[test]
    fn a_full_legend_ends_in_a_count_of_the_rest_and_labels_are_shortened() {
        let lines: Vec<Line> = (0..40)
            .map(|i| line(&format!("series {i}"), &[(0.0, i as f64), (1.0, 1.0)]))
            .collect();
        let doc = render_svg("x", &[panel(XScale::Linear, false, lines)]);
        assert_document(&doc);
        assert!(texts(&doc)
            .iter()
            .any(|t| t.starts_with('+') && t.ends_with(" more")));
        assert_eq!(clean("ééééé", 3), "éé…");
        assert_eq!(clean("short", 26), "short");
    }
}
