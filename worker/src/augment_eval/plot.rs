//! `report.png`: test macro-F1 (mean ± std over the seeds) of both conditions at every training
//! fraction, with the paired difference and its bootstrap interval in the legend.

use super::report::Report;
use crate::train::plot::{write_png, PlotError, DEV_COLOR, FONT, TRAIN_COLOR};
use plotters::prelude::*;
use std::path::Path;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;

pub fn render(report: &Report, path: &Path) -> Result<(), PlotError> {
    write_png(path, |tmp| draw(report, tmp))
}

fn draw(report: &Report, tmp: &Path) -> Result<(), String> {
    let fractions = &report.fractions;
    let conditions = [("original", TRAIN_COLOR, -0.08), ("augmented", DEV_COLOR, 0.08)];
    let bars = |f: &super::report::FractionReport, c: usize| {
        let m = if c == 0 {
            &f.original.macro_f1
        } else {
            &f.augmented.macro_f1
        };
        (m.mean, m.std.unwrap_or(0.0))
    };
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for f in fractions {
        for c in 0..2 {
            let (mean, std) = bars(f, c);
            lo = lo.min(mean - std);
            hi = hi.max(mean + std);
        }
    }
    let margin = ((hi - lo) * 0.15).max(0.01);
    let (lo, hi) = ((lo - margin).max(0.0), (hi + margin).min(1.0));
    let root = BitMapBackend::new(tmp, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "kormlm augment-eval: test macro-F1, mean ± std over {} seed(s)",
                report.seeds.len()
            ),
            (FONT, 20),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..fractions.len() as f64 - 0.5, lo..hi)
        .map_err(|e| e.to_string())?;
    let labels: Vec<String> = fractions.iter().map(|f| format!("{}%", f.fraction * 100.0)).collect();
    chart
        .configure_mesh()
        .x_desc("share of the training set")
        .y_desc("test macro-F1")
        .x_labels(fractions.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .disable_x_mesh()
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(|e| e.to_string())?;
    for (c, (name, color, offset)) in conditions.into_iter().enumerate() {
        let points: Vec<(f64, f64, f64)> = fractions
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let (mean, std) = bars(f, c);
                (i as f64 + offset, mean, std)
            })
            .collect();
        let legend = if c == 0 {
            name.to_string()
        } else {
            let d = &fractions[fractions.len() - 1].difference_macro_f1;
            format!(
                "{name} (Δ at {}: {:+.4}, {:.0}% CI [{:+.4}, {:+.4}])",
                labels[labels.len() - 1],
                d.mean,
                report.confidence * 100.0,
                d.ci_low,
                d.ci_high
            )
        };
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|&(x, y, _)| (x, y)),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(legend)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&(x, y, std)| ErrorBar::new_vertical(x, y - std, y, y + std, color.filled(), 10)),
            )
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(points.iter().map(|&(x, y, _)| Circle::new((x, y), 5, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
