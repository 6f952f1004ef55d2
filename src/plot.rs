//! `runner plot`: training and validation accuracy and loss per epoch, as the notebook draws them
//! (training as dots, validation as a line), for one or several runs on one figure, with an
//! optional exponential moving average (the notebook's `smooth_curve`) and the phase boundaries
//! marked. PNG or SVG, chosen by the file extension; the font is bundled, so it renders the same
//! on a machine without fonts.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::results::schema::col as C;
use crate::results::{self, ResultsError};

/// DejaVu Sans (see fonts/DejaVuSans-LICENSE.txt).
const FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// One run's curves.
#[derive(Debug, Clone)]
pub struct Curves {
    /// Legend label.
    pub label: String,
    /// Epoch numbers.
    pub epoch: Vec<f64>,
    /// Training accuracy.
    pub train_acc: Vec<f64>,
    /// Validation accuracy.
    pub val_acc: Vec<f64>,
    /// Training loss.
    pub train_loss: Vec<f64>,
    /// Validation loss.
    pub val_loss: Vec<f64>,
    /// `(epoch, phase name)` where each phase after the first starts.
    pub boundaries: Vec<(f64, String)>,
}

/// The notebook's `smooth_curve`: `s[i] = s[i-1] * factor + x[i] * (1 - factor)`.
pub fn smooth(values: &[f64], factor: f64) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::with_capacity(values.len());
    for &v in values {
        let s = match out.last() {
            Some(&prev) if v.is_finite() => prev * factor + v * (1.0 - factor),
            Some(&prev) => prev,
            None => v,
        };
        out.push(s);
    }
    out
}

/// Reads the curves of the run tables `files`.
pub fn load(files: &[PathBuf]) -> Result<Vec<Curves>, ResultsError> {
    let mut out = Vec::new();
    for f in files {
        let (df, _) = results::read_run(f)?;
        let err = |e: &dyn std::fmt::Display| ResultsError::Read {
            path: f.clone(),
            message: e.to_string(),
        };
        let num = |name: &str| -> Result<Vec<f64>, ResultsError> {
            let c = df.column(name).map_err(|e| err(&e))?;
            let c = c
                .cast(&polars::prelude::DataType::Float64)
                .map_err(|e| err(&e))?;
            Ok(c.f64()
                .map_err(|e| err(&e))?
                .iter()
                .map(|v| v.unwrap_or(f64::NAN))
                .collect())
        };
        let text = |name: &str| results::strings(&df, name);

        let epoch = num(C::EPOCH)?;
        let phases = text(C::PHASE);
        let mut boundaries = Vec::new();
        for i in 1..phases.len().min(epoch.len()) {
            if phases[i] != phases[i - 1] {
                boundaries.push((epoch[i] - 0.5, phases[i].clone()));
            }
        }
        let run_id = text(C::RUN_ID).first().cloned().unwrap_or_default();
        let label = match text(C::SWEEP_POINT).first().filter(|s| !s.is_empty()) {
            Some(p) => format!(
                "{} ({p})",
                text(C::EXPERIMENT).first().cloned().unwrap_or_default()
            ),
            None => run_id,
        };
        out.push(Curves {
            label,
            train_acc: num(C::TRAIN_ACC)?,
            val_acc: num(C::VAL_ACC)?,
            train_loss: num(C::TRAIN_LOSS)?,
            val_loss: num(C::VAL_LOSS)?,
            epoch,
            boundaries,
        });
    }
    Ok(out)
}

fn color(i: usize) -> RGBColor {
    // Tableau 10: distinct, readable on white.
    const C: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = C[i % C.len()];
    RGBColor(r, g, b)
}

type DrawResult<T> = Result<T, crate::io::Cause>;

fn panel<DB: DrawingBackend<ErrorType: 'static>>(
    area: &DrawingArea<DB, Shift>,
    runs: &[Curves],
    title: &str,
    y_desc: &str,
    pick: fn(&Curves) -> (&Vec<f64>, &Vec<f64>),
    smoothing: Option<f64>,
    legend_at: SeriesLabelPosition,
) -> DrawResult<()> {
    let series = |c: &Curves| {
        let (t, v) = pick(c);
        match smoothing {
            Some(f) => (smooth(t, f), smooth(v, f)),
            None => (t.clone(), v.clone()),
        }
    };
    let max_epoch = runs
        .iter()
        .flat_map(|c| c.epoch.iter().copied())
        .fold(1.0, f64::max);
    let values: Vec<f64> = runs
        .iter()
        .flat_map(|c| {
            let (t, v) = pick(c);
            t.iter().chain(v).copied().collect::<Vec<_>>()
        })
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.08).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.5..max_epoch + 0.5, (lo - pad)..(hi + pad))
        .map_err(crate::io::Cause::from)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .x_labels((max_epoch as usize).clamp(2, 12))
        .x_label_formatter(&|x| {
            // Epochs are whole numbers: no tick label between them.
            if (x - x.round()).abs() < 1e-6 {
                format!("{}", x.round() as i64)
            } else {
                String::new()
            }
        })
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(crate::io::Cause::from)?;
    for c in runs {
        for (x, name) in &c.boundaries {
            chart
                .draw_series(DashedLineSeries::new(
                    [(*x, lo - pad), (*x, hi + pad)],
                    6,
                    4,
                    BLACK.mix(0.45).stroke_width(1),
                ))
                .map_err(crate::io::Cause::from)?;
            chart
                .draw_series([Text::new(
                    format!(" {name}"),
                    (*x, hi + pad * 0.6),
                    ("sans-serif", 13).into_font().color(&BLACK.mix(0.6)),
                )])
                .map_err(crate::io::Cause::from)?;
        }
    }
    let several = runs.len() > 1;
    for (i, c) in runs.iter().enumerate() {
        let col = color(i);
        let (train, val) = series(c);
        let name = |what: &str| {
            if several {
                format!("{} {what}", c.label)
            } else {
                what.to_string()
            }
        };
        let pts: Vec<(f64, f64)> = c
            .epoch
            .iter()
            .zip(&train)
            .filter(|(_, v)| v.is_finite())
            .map(|(x, v)| (*x, *v))
            .collect();
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, col.filled())))
            .map_err(crate::io::Cause::from)?
            .label(name("training"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 3, col.filled()));
        let line: Vec<(f64, f64)> = c
            .epoch
            .iter()
            .zip(&val)
            .filter(|(_, v)| v.is_finite())
            .map(|(x, v)| (*x, *v))
            .collect();
        chart
            .draw_series(LineSeries::new(line, col.stroke_width(2)))
            .map_err(crate::io::Cause::from)?
            .label(name("validation"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], col.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(legend_at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(crate::io::Cause::from)?;
    Ok(())
}

fn draw<DB: DrawingBackend<ErrorType: 'static>>(
    root: DrawingArea<DB, Shift>,
    runs: &[Curves],
    smoothing: Option<f64>,
) -> DrawResult<()> {
    root.fill(&WHITE)?;
    let title = match smoothing {
        Some(f) => format!(" (smoothed, factor {f})"),
        None => String::new(),
    };
    let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
    panel(
        &left,
        runs,
        &format!("Training and validation accuracy{title}"),
        "accuracy",
        |c| (&c.train_acc, &c.val_acc),
        smoothing,
        // Accuracy rises and loss falls: the legend goes where the curves usually are not.
        SeriesLabelPosition::LowerRight,
    )?;
    panel(
        &right,
        runs,
        &format!("Training and validation loss{title}"),
        "loss",
        |c| (&c.train_loss, &c.val_loss),
        smoothing,
        SeriesLabelPosition::UpperRight,
    )?;
    Ok(root.present()?)
}

/// Draws `runs` into `out` (`.png` or `.svg`), atomically.
pub fn plot(runs: &[Curves], out: &Path, smoothing: Option<f64>) -> Result<(), ResultsError> {
    let fail = |cause: crate::io::Cause| ResultsError::from(crate::io::WriteError::new(out, cause));
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let (w, h) = (1400u32, 520u32);
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "svg" => {
            let mut svg = String::new();
            draw(
                SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area(),
                runs,
                smoothing,
            )
            .map_err(fail)?;
            results::write_atomic(out, |f| std::io::Write::write_all(f, svg.as_bytes()))
                .map_err(Into::into)
        }
        "png" => {
            let mut buf = vec![0u8; (w * h * 3) as usize];
            draw(
                BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area(),
                runs,
                smoothing,
            )
            .map_err(fail)?;
            let img = image::RgbImage::from_raw(w, h, buf)
                .ok_or_else(|| fail("image buffer of the wrong size".into()))?;
            results::write_atomic(out, |f| {
                img.write_to(&mut std::io::BufWriter::new(f), image::ImageFormat::Png)
            })
            .map_err(Into::into)
        }
        _ => Err(fail(
            format!("unknown image format \".{ext}\": use a .png or .svg file name").into(),
        )),
    }
}
