//! The loss-curve plot: train and dev loss per epoch, drawn from `training_log.jsonl` into a
//! PNG next to it after every evaluation.

use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

/// File name of the plot inside the output directory.
pub const LOSS_CURVE_FILE: &str = "loss_curve.png";

const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;
pub const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
pub const DEV_COLOR: RGBColor = RGBColor(214, 39, 40);
pub(crate) const FONT: &str = "sans-serif";

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path} line {line}: {message}")]
    Log { path: String, line: usize, message: String },
    #[error("{path}: no evaluation record to plot yet")]
    Empty { path: String },
    #[error("drawing {path}: {message}")]
    Draw { path: String, message: String },
}

/// One epoch's mean training loss (over all masked tokens of the epoch) and dev loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochLoss {
    /// 1-based, as shown on the axis.
    pub epoch: u32,
    pub train: Option<f64>,
    pub dev: f64,
}

/// The evaluation records of a training log; when an epoch was evaluated twice (a run resumed
/// after its last evaluation), the later record wins.
pub fn epoch_losses(log: &Path) -> Result<Vec<EpochLoss>, PlotError> {
    let path = log.display().to_string();
    let text = std::fs::read_to_string(log).map_err(|e| PlotError::Io {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let mut by_epoch = std::collections::BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| PlotError::Log {
            path: path.clone(),
            line: i + 1,
            message,
        };
        let record: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if record["type"] != "eval" {
            continue;
        }
        let epoch = record["epoch"]
            .as_u64()
            .ok_or_else(|| bad("an eval record without an integer \"epoch\"".into()))?;
        let dev = record["val_loss"]
            .as_f64()
            .ok_or_else(|| bad("an eval record without a numeric \"val_loss\"".into()))?;
        let epoch = u32::try_from(epoch + 1).map_err(|_| bad(format!("epoch {epoch} is out of range")))?;
        let train = record["train_loss"].as_f64();
        by_epoch.insert(epoch, EpochLoss { epoch, train, dev });
    }
    Ok(by_epoch.into_values().collect())
}

pub(crate) fn register_font() {
    static FONT_ONCE: Once = Once::new();
    FONT_ONCE.call_once(|| {
        // The font is compiled in, so this fails only if the file in the repository is broken.
        plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../../assets/fonts/DejaVuSans.ttf"),
        )
        .unwrap_or_else(|_| panic!("worker/assets/fonts/DejaVuSans.ttf is not a valid font"));
    });
}

/// Draws `points` into the PNG `path` (durably, as `write_png`).
pub fn render_loss_curve(points: &[EpochLoss], path: &Path) -> Result<(), PlotError> {
    if points.is_empty() {
        return Err(PlotError::Empty {
            path: path.display().to_string(),
        });
    }
    write_png(path, |tmp| draw(points, tmp))
}

/// Writes the PNG `path` that `draw` draws into the file it is given, durably: under a hidden
/// temporary name, flushed, renamed (a failed drawing or write leaves the previous plot and no
/// temporary file).
pub(crate) fn write_png(path: &Path, draw: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), PlotError> {
    let shown = path.display().to_string();
    register_font();
    // The image encoder picks the format from the extension, so the temporary name keeps it.
    let tmp = {
        let hidden = kormlm_proto::durable::temp_path(path);
        hidden.with_file_name(format!(
            "{}.png",
            hidden.file_name().unwrap_or_default().to_string_lossy()
        ))
    };
    let written = draw(&tmp)
        .map_err(|message| PlotError::Draw {
            path: shown.clone(),
            message,
        })
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| e.to_string())
                .and_then(|()| kormlm_proto::durable::rename(&tmp, path).map_err(|e| e.error.to_string()))
                .map_err(|message| PlotError::Io {
                    path: shown.clone(),
                    message,
                })
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Reads the log and draws its plot; what the training loop calls after every evaluation.
pub fn plot_log(log: &Path, png: &Path) -> Result<usize, PlotError> {
    let points = epoch_losses(log)?;
    render_loss_curve(&points, png)?;
    Ok(points.len())
}

fn draw(points: &[EpochLoss], tmp: &Path) -> Result<(), String> {
    let last = points.last().map_or(1, |p| p.epoch);
    let values = points.iter().flat_map(|p| [Some(p.dev), p.train]).flatten();
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let margin = ((hi - lo) * 0.08).max(1e-3);

    let root = BitMapBackend::new(tmp, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("kormlm: masked-LM loss per epoch", (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.5f64..last as f64 + 0.5, (lo - margin)..(hi + margin))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss")
        .x_labels(last.min(20) as usize)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(|e| e.to_string())?;

    let train: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| p.train.map(|t| (f64::from(p.epoch), t)))
        .collect();
    let dev: Vec<(f64, f64)> = points.iter().map(|p| (f64::from(p.epoch), p.dev)).collect();
    for (series, color, label) in [(&train, TRAIN_COLOR, "train loss"), (&dev, DEV_COLOR, "dev loss")] {
        if series.is_empty() {
            continue;
        }
        let style = color.stroke_width(3);
        chart
            .draw_series(LineSeries::new(series.iter().copied(), style))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart
            .draw_series(series.iter().map(|&(x, y)| Circle::new((x, y), 4, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    // The epoch whose model is kept as `best/` (the first lowest dev loss).
    let best = points
        .iter()
        .fold(None::<&EpochLoss>, |b, p| match b {
            Some(b) if b.dev <= p.dev => Some(b),
            _ => Some(p),
        })
        .expect("points is not empty");
    let x = f64::from(best.epoch);
    let marker = BLACK.mix(0.45).stroke_width(2);
    chart
        .draw_series(LineSeries::new([(x, lo - margin), (x, hi + margin)], marker))
        .map_err(|e| e.to_string())?
        .label(format!("best dev loss (epoch {})", best.epoch))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], marker));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
        let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let pixels = buf[..info.buffer_size()]
            .chunks(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect();
        (info.width, info.height, pixels)
    }

    fn count(pixels: &[[u8; 3]], c: RGBColor) -> usize {
        pixels.iter().filter(|p| **p == [c.0, c.1, c.2]).count()
    }

    #[test]
    fn the_log_becomes_a_png_with_both_curves() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("training_log.jsonl");
        let mut text = String::new();
        for epoch in 0..4 {
            text += &format!("{{\"type\":\"train\",\"epoch\":{epoch},\"step\":3,\"loss\":9.0}}\n");
            let dev = 6.0 - f64::from(epoch) * 0.5;
            text += &format!(
                "{{\"type\":\"eval\",\"epoch\":{epoch},\"val_loss\":{dev},\"train_loss\":{}}}\n",
                dev + 0.4
            );
        }
        // A resumed run evaluates epoch 4 (index 3) again: the later record wins.
        text += "{\"type\":\"eval\",\"epoch\":3,\"val_loss\":4.25,\"train_loss\":4.5}\n";
        std::fs::write(&log, text).unwrap();
        let points = epoch_losses(&log).unwrap();
        assert_eq!(points.len(), 4);
        assert_eq!(
            points[3],
            EpochLoss {
                epoch: 4,
                train: Some(4.5),
                dev: 4.25
            }
        );

        let png = dir.path().join(LOSS_CURVE_FILE);
        assert_eq!(plot_log(&log, &png).unwrap(), 4);
        let (w, h, pixels) = decode(&png);
        assert_eq!((w, h), (WIDTH, HEIGHT));
        assert!(count(&pixels, TRAIN_COLOR) > 500, "the train curve is drawn");
        assert!(count(&pixels, DEV_COLOR) > 500, "the dev curve is drawn");
        let dark = pixels.iter().filter(|p| p.iter().all(|&c| c < 60)).count();
        assert!(dark > 1000, "axes and labels are drawn ({dark} dark pixels)");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "no temporary file is left: {leftovers:?}");
    }

    #[test]
    fn a_log_without_evaluations_or_with_a_bad_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("training_log.jsonl");
        std::fs::write(&log, "{\"type\":\"train\",\"epoch\":0,\"loss\":9.0}\n").unwrap();
        let err = plot_log(&log, &dir.path().join("p.png")).unwrap_err().to_string();
        assert!(err.contains("no evaluation record"), "{err}");
        std::fs::write(&log, "{\"type\":\"eval\",\"epoch\":0,\"val_loss\":1.0}\n{oops\n").unwrap();
        let err = plot_log(&log, &dir.path().join("p.png")).unwrap_err().to_string();
        assert!(err.contains("training_log.jsonl line 2"), "{err}");
        assert!(!dir.path().join("p.png").exists());
    }
}
