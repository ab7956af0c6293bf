//! SVG charts of a run's ratios, written beside the Markdown table: one
//! chart per kind of figure (throughput, time, cost), one bar per figure
//! with a baseline, on a log scale centred on 1 (the baseline): a figure of
//! reach green where it does better than its baseline and orange where it
//! does worse; a baseline beside another (rathole beside plain TCP) grey.
//! Plain SVG text with no scripts or external references, so a browser or
//! a Markdown viewer shows it as it is.

use std::fmt::Write as _;

/// One bar: a figure's ratio to its baseline.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    /// What is measured, e.g. "throughput, reach routed, 1 hub".
    pub label: String,
    /// What it is compared with.
    pub baseline: String,
    /// value / baseline.
    pub ratio: f64,
}

/// Which way is better for a chart's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// A larger ratio is better (throughput, rates).
    Higher,
    /// A smaller ratio is better (times, CPU, memory).
    Lower,
}

/// The charts a run gets: (file stem, title, which way is better) for
/// each kind of unit; `None` for units charted nowhere.
pub fn kind_of(unit: &str) -> Option<(&'static str, &'static str, Better)> {
    match unit {
        "Gbit/s" | "Mbit/s" | "1/s" | "x" => Some((
            "bench-throughput",
            "Throughput and rates: ratio to baseline (higher is better)",
            Better::Higher,
        )),
        "us" | "ms" => Some((
            "bench-time",
            "Round trips and setup times: ratio to baseline (lower is better)",
            Better::Lower,
        )),
        "s/GB" | "CPU s/GB" => Some((
            "bench-cpu",
            "CPU per gigabyte: ratio to baseline (lower is better)",
            Better::Lower,
        )),
        _ => None,
    }
}

const WIDTH: f64 = 1100.0;
const LABEL_W: f64 = 700.0;
const ROW_H: f64 = 18.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 30.0;

/// The chart of `bars` as SVG text. Bars whose ratio is not a positive
/// finite number are left out.
pub fn svg(title: &str, better: Better, bars: &[Bar]) -> String {
    let bars: Vec<&Bar> = bars
        .iter()
        .filter(|b| b.ratio.is_finite() && b.ratio > 0.0)
        .collect();
    // Decades from below the smallest ratio to above the largest, always
    // including 1 (the baseline).
    let lo = bars
        .iter()
        .map(|b| b.ratio.log10().floor())
        .fold(0.0f64, f64::min);
    let hi = bars
        .iter()
        .map(|b| b.ratio.log10().ceil())
        .fold(0.0f64, f64::max);
    let (lo, hi) = if hi - lo < 1.0 {
        (lo - 1.0, hi + 1.0)
    } else {
        (lo, hi)
    };
    let plot_x = LABEL_W + 10.0;
    let plot_w = WIDTH - plot_x - 70.0;
    let x = |ratio: f64| plot_x + (ratio.log10() - lo) / (hi - lo) * plot_w;
    let height = TOP + ROW_H * bars.len() as f64 + BOTTOM;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="#ffffff"/><text x="10" y="20" font-size="14" font-weight="bold">{}</text>"##,
        escape(title)
    );
    // Decade grid lines with their ratios; the baseline (1) darker.
    let mut d = lo;
    while d <= hi {
        let gx = x(10f64.powf(d));
        let (stroke, w) = if d == 0.0 {
            ("#333333", 1.5)
        } else {
            ("#dddddd", 1.0)
        };
        let _ = writeln!(
            s,
            r##"<line x1="{gx:.1}" y1="{}" x2="{gx:.1}" y2="{:.1}" stroke="{stroke}" stroke-width="{w}"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555555">{}</text>"##,
            TOP - 8.0,
            height - BOTTOM + 4.0,
            height - 10.0,
            decade(d)
        );
        d += 1.0;
    }
    for (i, b) in bars.iter().enumerate() {
        let y = TOP + ROW_H * i as f64;
        let good = match better {
            Better::Higher => b.ratio >= 1.0,
            Better::Lower => b.ratio <= 1.0,
        };
        let fill = match (b.label.contains("reach"), good) {
            (false, _) => "#9e9e9e",
            (true, true) => "#3a9d5d",
            (true, false) => "#e08a2e",
        };
        let (x0, x1) = (x(1.0), x(b.ratio));
        let (left, w) = (x0.min(x1), (x1 - x0).abs().max(1.0));
        let label = format!("{}  vs  {}", b.label, b.baseline);
        let _ = writeln!(
            s,
            r##"<text x="{LABEL_W}" y="{:.1}" text-anchor="end">{}</text><rect x="{left:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="{fill}"><title>{}: {}</title></rect><text x="{:.1}" y="{:.1}" fill="#333333">{}</text>"##,
            y + 12.0,
            escape(&label),
            y + 3.0,
            ROW_H - 6.0,
            escape(&label),
            ratio_text(b.ratio),
            x0.max(x1) + 4.0,
            y + 12.0,
            ratio_text(b.ratio)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A ratio as the table prints it.
fn ratio_text(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 1.0 {
        format!("{r:.2}x")
    } else {
        format!("{r:.3}x")
    }
}

/// 10^d as a short label: 0.01, 0.1, 1, 10, 100.
fn decade(d: f64) -> String {
    let v = 10f64.powf(d);
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// Text safe inside an SVG element.
fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(label: &str, ratio: f64) -> Bar {
        Bar {
            label: label.into(),
            baseline: "plain TCP".into(),
            ratio,
        }
    }

    #[test]
    fn one_bar_per_finite_ratio_coloured_by_which_way_is_better() {
        let bars = [
            bar("reach <direct>", 0.97),
            bar("reach routed & more", 2.5),
            bar("no baseline", f64::NAN),
            bar("zero", 0.0),
        ];
        let s = svg("Throughput", Better::Higher, &bars);
        assert_eq!(s.matches("<rect x=").count(), 2, "{s}");
        assert!(s.contains("reach &lt;direct&gt;  vs  plain TCP"), "escaped");
        assert!(s.contains("reach routed &amp; more"));
        assert!(!s.contains("no baseline"));
        // Higher is better: 0.97 is orange, 2.5 green.
        let orange = s.find("#e08a2e").unwrap();
        let green = s.find("#3a9d5d").unwrap();
        assert!(orange < green, "first bar orange, second green");
        assert!(s.contains(">0.970x<") && s.contains(">2.50x<"));
        let lower = svg("Time", Better::Lower, &bars);
        assert!(lower.find("#3a9d5d").unwrap() < lower.find("#e08a2e").unwrap());
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn the_scale_spans_every_ratio_and_the_baseline() {
        let s = svg("t", Better::Higher, &[bar("a", 0.012), bar("b", 70.0)]);
        for tick in [">0.01<", ">0.1<", ">1<", ">10<", ">100<"] {
            assert!(s.contains(tick), "{tick} missing");
        }
        // Nothing to chart is still a valid (empty) chart.
        let empty = svg("t", Better::Lower, &[]);
        assert!(empty.contains(">1<") && empty.ends_with("</svg>\n"));
    }

    #[test]
    fn units_map_to_their_charts() {
        assert_eq!(kind_of("Gbit/s").map(|k| k.0), Some("bench-throughput"));
        assert_eq!(kind_of("us").map(|k| k.2), Some(Better::Lower));
        assert_eq!(kind_of("CPU s/GB").map(|k| k.0), Some("bench-cpu"));
        assert_eq!(kind_of("MiB"), None);
    }
}
