//! The PNG of a set of runs: warm-up time and endpoint-change p99 against the number of proxies,
//! one line per protocol (manifest-mode runs only; the API-server run is one size).
//!
//! Drawn with plotters' bitmap backend and its pure-Rust glyph renderer (`ab_glyph`): no system
//! font library is linked; the TrueType file is read at run time (`--font`).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::report::RunReport;

/// The font family name the text is drawn with (registered from `--font`).
const FAMILY: &str = "sans-serif";

/// What a panel shows of a run.
type Figure = fn(&RunReport) -> f64;
/// One line: its label, its points (proxies, value) and its colour.
type Line = (&'static str, Vec<(f64, f64)>, RGBColor);

pub fn draw(reports: &[RunReport], png: &Path, font: &Path) -> Result<()> {
    let bytes = std::fs::read(font)
        .with_context(|| format!("reading the plot font {} (see --font)", font.display()))?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a TrueType font", font.display()))?;
    let root = BitMapBackend::new(png, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let panels = root.split_evenly((1, 2));
    let series = |protocol: &str, value: Figure| -> Vec<(f64, f64)> {
        let mut points: Vec<(f64, f64)> = reports
            .iter()
            .filter(|r| r.protocol == protocol && r.source == "manifests")
            .map(|r| (r.proxies as f64, value(r)))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    };
    let charts: [(&str, &str, Figure); 2] = [
        (
            "Warm-up: all proxies hold a full configuration",
            "seconds",
            |r| r.warmup.all_warm_s,
        ),
        ("One endpoint change: p99 until ACKed", "seconds", |r| {
            r.endpoint_change.latency.p99_ms / 1000.0
        }),
    ];
    for (panel, (title, unit, value)) in panels.iter().zip(charts) {
        let lines: Vec<Line> = vec![
            ("SotW", series("sotw", value), BLUE),
            ("delta", series("delta", value), RED),
        ];
        let max_x = lines
            .iter()
            .flat_map(|(_, p, _)| p.iter().map(|(x, _)| *x))
            .fold(1.0, f64::max);
        let max_y = lines
            .iter()
            .flat_map(|(_, p, _)| p.iter().map(|(_, y)| *y))
            .fold(0.001, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(title, (FAMILY, 18))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_x * 1.05, 0.0..max_y * 1.15)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("proxies")
            .y_desc(unit)
            .label_style((FAMILY, 13))
            .draw()
            .map_err(plot_error)?;
        for (label, points, color) in lines {
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(plot_error)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 4, color.filled())),
                )
                .map_err(plot_error)?;
        }
        chart
            .configure_series_labels()
            .label_font((FAMILY, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::error::Error + Send + Sync + 'static>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}
