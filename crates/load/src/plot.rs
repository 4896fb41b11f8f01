//! An SVG plot of a run: throughput (logins and answers per second) and p99 latency over
//! time, one point per second. Plain SVG text, no plotting library.

use std::fmt::Write;

use crate::scenario::Sample;

const W: f64 = 900.0;
const H: f64 = 260.0;
const PAD_L: f64 = 70.0;
const PAD_R: f64 = 20.0;
const PAD_T: f64 = 30.0;
const PAD_B: f64 = 35.0;

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let e = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * e {
            return m * e;
        }
    }
    10.0 * e
}

fn panel(
    out: &mut String,
    y0: f64,
    title: &str,
    unit: &str,
    series: &[(&str, &str, Vec<f64>)],
    t_max: f64,
) {
    let ymax = nice_max(
        series
            .iter()
            .flat_map(|(_, _, v)| v.iter().copied())
            .fold(0.0, f64::max),
    );
    let (x0, x1) = (PAD_L, W - PAD_R);
    let (top, bottom) = (y0 + PAD_T, y0 + H - PAD_B);
    let sx = |t: f64| x0 + (x1 - x0) * t / t_max.max(1.0);
    let sy = |v: f64| bottom - (bottom - top) * v / ymax;
    let _ = writeln!(
        out,
        r#"<text x="{x0}" y="{}" font-size="14" font-weight="bold">{title}</text>"#,
        y0 + 18.0
    );
    let _ = writeln!(
        out,
        r##"<rect x="{x0}" y="{top}" width="{}" height="{}" fill="none" stroke="#888"/>"##,
        x1 - x0,
        bottom - top
    );
    for k in 0..=4 {
        let v = ymax * k as f64 / 4.0;
        let y = sy(v);
        let _ = writeln!(
            out,
            r##"<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" font-size="11" text-anchor="end">{}</text>"##,
            x0 - 5.0,
            y + 4.0,
            fmt_num(v)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="12" y="{}" font-size="11" transform="rotate(-90 12 {})" text-anchor="middle">{unit}</text>"#,
        (top + bottom) / 2.0,
        (top + bottom) / 2.0
    );
    for k in 0..=5 {
        let t = t_max * k as f64 / 5.0;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{:.0} s</text>"#,
            sx(t),
            bottom + 15.0,
            t
        );
    }
    for (i, (name, color, v)) in series.iter().enumerate() {
        let pts: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(t, y)| format!("{:.1},{:.1}", sx(t as f64 + 1.0), sy(*y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            pts.join(" ")
        );
        let lx = x1 - 200.0 + 100.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}" font-size="11">{name}</text>"#,
            y0 + 14.0,
            lx + 15.0,
            y0 + 14.0,
            lx + 20.0,
            y0 + 18.0
        );
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Renders the timeline as an SVG document.
pub fn svg(title: &str, samples: &[Sample]) -> String {
    let t_max = samples.len().max(1) as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{}" font-family="sans-serif">"#,
        2.0 * H + 30.0
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="18" font-size="15" text-anchor="middle">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    panel(
        &mut out,
        20.0,
        "Throughput",
        "per second",
        &[
            (
                "logins/s",
                "#1f77b4",
                samples.iter().map(|s| s.logins as f64).collect(),
            ),
            (
                "answers/s",
                "#2ca02c",
                samples.iter().map(|s| s.answers as f64).collect(),
            ),
        ],
        t_max,
    );
    panel(
        &mut out,
        20.0 + H,
        "Latency of keepalives and requests (p99 per second)",
        "ms",
        &[(
            "p99 ms",
            "#d62728",
            samples.iter().map(|s| s.p99_us as f64 / 1000.0).collect(),
        )],
        t_max,
    );
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_is_an_svg_with_both_panels_and_a_point_per_second() {
        let samples: Vec<Sample> = (1..=3)
            .map(|t| Sample {
                t,
                phase: "steady",
                logins: 10 * t as u64,
                answers: 100,
                online: 5,
                p99_us: 1500,
                rss_bytes: 0,
                cpu_s: 0.1,
                load_cpu_s: 0.1,
            })
            .collect();
        let s = svg("a <run>", &samples);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("Throughput") && s.contains("Latency"));
        assert!(s.contains("a &lt;run&gt;"));
        assert_eq!(s.matches("<polyline").count(), 3);
        assert_eq!(nice_max(3.2), 5.0);
        assert_eq!(nice_max(0.0), 1.0);
    }
}
