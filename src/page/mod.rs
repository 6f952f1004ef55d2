//! `runner report`: one self-contained HTML page of a results folder. The runs table (sortable,
//! filterable), the curves and config differences of the runs selected, each evaluated run's
//! confusion matrix and its most confidently misclassified test images as thumbnails, and the
//! runs that failed with their error. Scripts, styles and pictures are inline: no network, no
//! server; the page opens from a file or a mail.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use polars::prelude::*;
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::data::folder;
use crate::results::query::{self, Format, Query};
use crate::results::schema::col as C;

const TEMPLATE: &str = include_str!("report.html");
const STYLE: &str = include_str!("report.css");
const SCRIPT: &str = include_str!("report.js");

/// The longest side of a thumbnail, in pixels.
pub const THUMBNAIL: u32 = 128;
/// A resolved config larger than this is left out of the page (it is not one runner wrote).
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// A predictions table with more rows than this is left out (runner writes one row per test
/// image).
const MAX_PREDICTIONS: usize = 1_000_000;

/// What the page shows besides the tables.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Misclassified test images shown per run, most confidently wrong first.
    pub misclassified: usize,
}

/// Why a page could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// The folder is missing or its tables cannot be read.
    #[error(transparent)]
    Results(#[from] crate::results::ResultsError),
    /// The folder holds no run tables.
    #[error("{}: no run tables (<run_id>.parquet) in this folder; run an experiment first, or give the results folder", .0.display())]
    NoRuns(PathBuf),
    /// The page could not be written.
    #[error(transparent)]
    Write(#[from] crate::io::WriteError),
}

/// Why a predictions table or an image is left out of the page (the page says so).
#[derive(Debug, thiserror::Error)]
pub enum LeftOut {
    /// The file could not be read.
    #[error("{0}")]
    Io(std::io::Error),
    /// Not a readable parquet table.
    #[error("{0}")]
    Parquet(PolarsError),
    /// More rows than runner writes.
    #[error("{0} rows, more than the {MAX_PREDICTIONS} a predictions table may have")]
    TooMany(usize),
    /// A column runner writes is missing or of another type.
    #[error("no {kind} column \"{name}\"")]
    Column {
        /// The column.
        name: &'static str,
        /// `text` or `number`.
        kind: &'static str,
    },
    /// A value runner would not have written (an empty label, a probability outside [0, 1]).
    #[error("column \"{name}\", row {row}: {value}")]
    Value {
        /// The column.
        name: &'static str,
        /// The row (0-based).
        row: usize,
        /// What is wrong with it.
        value: String,
    },
    /// The image's header is not readable.
    #[error("{0}")]
    Image(image::ImageError),
    /// runner's decoder refused the image.
    #[error("{0}")]
    Decode(folder::DecodeError),
}

/// What went into a written page.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Runs in the table.
    pub runs: usize,
    /// Runs with a confusion matrix.
    pub evaluated: usize,
    /// Distinct thumbnails embedded.
    pub thumbnails: usize,
    /// Notes about what was left out (unreadable predictions, missing images), one per case.
    pub notes: Vec<String>,
    /// The page's size in bytes.
    pub bytes: usize,
}

/// Writes the page of `dir` to `out` (atomically).
pub fn write(dir: &Path, out: &Path, options: Options) -> Result<Summary, PageError> {
    let (html, mut summary) = build(dir, options)?;
    summary.bytes = html.len();
    crate::io::write_atomic(out, |f| std::io::Write::write_all(f, html.as_bytes()))?;
    Ok(summary)
}

/// The page of `dir` as HTML text, and what went into it.
pub fn build(dir: &Path, options: Options) -> Result<(String, Summary), PageError> {
    let runs = rows(dir, false, &[])?;
    if runs.is_empty() {
        return Err(PageError::NoRuns(dir.to_path_buf()));
    }
    let ids: Vec<String> = runs
        .iter()
        .filter_map(|r| r[C::RUN_ID].as_str().map(str::to_string))
        .collect();
    let curve_columns = [
        C::RUN_ID,
        C::EPOCH,
        C::PHASE,
        C::TRAIN_LOSS,
        C::TRAIN_ACC,
        C::VAL_LOSS,
        C::VAL_ACC,
    ];
    let epochs = curves(&rows(dir, true, &curve_columns)?);
    let mut summary = Summary {
        runs: runs.len(),
        ..Summary::default()
    };
    for p in query::run_files(dir) {
        if let Some(why) = query::not_a_run_table(&p) {
            summary
                .notes
                .push(format!("{}: not a readable run table: {why}", p.display()));
        }
    }
    let configs: BTreeMap<&str, Value> = ids
        .iter()
        .map(|id| (id.as_str(), config(dir, id, &mut summary.notes)))
        .collect();
    let mut thumbnails = Thumbnails::default();
    let mut evaluations = BTreeMap::new();
    for id in &ids {
        let path = dir.join(format!("{id}.predictions.parquet"));
        if !path.exists() {
            continue;
        }
        match evaluation(&path, options.misclassified, &mut thumbnails) {
            Ok(e) => {
                evaluations.insert(id.as_str(), e);
            }
            Err(why) => summary
                .notes
                .push(format!("{}: left out of the page: {why}", path.display())),
        }
    }
    summary.evaluated = evaluations.len();
    let base = dir.parent().unwrap_or(Path::new("."));
    let images = thumbnails.render(base, &mut summary.notes);
    summary.thumbnails = images.len();
    let data = json!({
        "folder": dir.display().to_string(),
        "generated": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "version": env!("CARGO_PKG_VERSION"),
        "runs": runs,
        "epochs": epochs,
        "configs": configs,
        "evaluations": evaluations,
        "images": images,
        "notes": summary.notes,
    });
    Ok((page(&data), summary))
}

/// The template with the style, the data and the script in place.
fn page(data: &Value) -> String {
    // `<` only occurs inside JSON strings, where `\u003c` means the same: no `</script>` or
    // `<!--` in the data can end the script element early.
    let data = data.to_string().replace('<', "\\u003c");
    // The template is cut at its three places once, so that nothing the data holds (a
    // `/*SCRIPT*/` in a folder name) is taken for one of them.
    let mut out = String::with_capacity(TEMPLATE.len() + STYLE.len() + SCRIPT.len() + data.len());
    let mut rest = TEMPLATE;
    for (mark, with) in [
        ("/*STYLE*/", STYLE),
        ("/*DATA*/", data.as_str()),
        ("/*SCRIPT*/", SCRIPT),
    ] {
        let (before, after) = rest.split_once(mark).unwrap_or((rest, ""));
        out.push_str(before);
        out.push_str(with);
        rest = after;
    }
    out.push_str(rest);
    out
}

/// `runner results --format json` of `dir` (per run, or per epoch with `columns`), as values.
fn rows(dir: &Path, epochs: bool, columns: &[&str]) -> Result<Vec<Value>, PageError> {
    let q = Query {
        filters: Vec::new(),
        sort: None,
        epochs,
        format: Format::Json,
        columns: columns.iter().map(|c| c.to_string()).collect(),
    };
    let Some(df) = query::query(dir, &q)? else {
        return Ok(Vec::new());
    };
    let text = query::render(&df, Format::Json)?;
    Ok(serde_json::from_str::<Vec<Value>>(&text).unwrap_or_default())
}

/// Per-epoch rows grouped by run, as columns (`epoch`, `phase`, `train_loss`, ...).
fn curves(rows: &[Value]) -> BTreeMap<String, BTreeMap<String, Vec<Value>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    for r in rows {
        let Some(obj) = r.as_object() else { continue };
        let Some(id) = obj.get(C::RUN_ID).and_then(Value::as_str) else {
            continue;
        };
        if obj.get(C::EPOCH).is_none_or(Value::is_null) {
            continue;
        }
        let run = out.entry(id.to_string()).or_default();
        for (k, v) in obj.iter().filter(|(k, _)| k.as_str() != C::RUN_ID) {
            run.entry(k.clone()).or_default().push(v.clone());
        }
    }
    out
}

/// The run's resolved config (`<run_id>.toml`) as dotted keys and their values in TOML's
/// notation; `null` when it is missing or unreadable (with a note).
fn config(dir: &Path, id: &str, notes: &mut Vec<String>) -> Value {
    let path = dir.join(format!("{id}.toml"));
    let text = match std::fs::metadata(&path) {
        // The same TOML is in the run table's metadata (a folder of tables only).
        Err(_) => match crate::results::read_run(&dir.join(format!("{id}.parquet")))
            .ok()
            .and_then(|(_, meta)| {
                meta.into_iter()
                    .find(|(k, _)| k == crate::results::CONFIG_KEY)
                    .map(|(_, v)| v)
            }) {
            Some(text) => Ok(text),
            None => return Value::Null,
        },
        Ok(m) if m.len() > MAX_CONFIG_BYTES => {
            notes.push(format!(
                "{}: {} bytes, not a config runner wrote; left out",
                path.display(),
                m.len()
            ));
            return Value::Null;
        }
        Ok(_) => std::fs::read_to_string(&path),
    };
    match text.map_err(|e| e.to_string()).and_then(|t| {
        t.parse::<toml::Table>()
            .map_err(|e| e.message().to_string())
    }) {
        Ok(table) => {
            let mut flat = BTreeMap::new();
            flatten("", &toml::Value::Table(table), &mut flat);
            json!(flat)
        }
        Err(why) => {
            notes.push(format!("{}: not readable: {why}", path.display()));
            Value::Null
        }
    }
}

/// `a.b.c = value` for every leaf of `v`; arrays of tables (`head.layers`, `phase`) are numbered
/// (`head.layers.1.units`).
fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        toml::Value::Table(t) => t.iter().for_each(|(k, v)| flatten(&key(k), v, out)),
        toml::Value::Array(a) if a.iter().any(toml::Value::is_table) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| flatten(&key(&(i + 1).to_string()), v, out)),
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// A run's test evaluation: the classes, the confusion matrix (rows true, columns predicted)
/// and its most confidently misclassified images (indices into the page's images).
fn evaluation(path: &Path, limit: usize, thumbs: &mut Thumbnails) -> Result<Value, LeftOut> {
    let file = std::fs::File::open(path).map_err(LeftOut::Io)?;
    let mut reader = ParquetReader::new(file);
    let rows = reader.num_rows().map_err(LeftOut::Parquet)?;
    if rows > MAX_PREDICTIONS {
        return Err(LeftOut::TooMany(rows));
    }
    let df = reader.finish().map_err(LeftOut::Parquet)?;
    let text = |name: &'static str| -> Result<Vec<String>, LeftOut> {
        let column = df
            .column(name)
            .ok()
            .and_then(|c| c.cast(&DataType::String).ok());
        let column = column.ok_or(LeftOut::Column { name, kind: "text" })?;
        let c = column
            .str()
            .map_err(|_| LeftOut::Column { name, kind: "text" })?;
        c.iter()
            .enumerate()
            .map(|(row, v)| {
                v.map(str::to_string).ok_or(LeftOut::Value {
                    name,
                    row,
                    value: "empty".into(),
                })
            })
            .collect()
    };
    let (paths, labels, predicted) = (text("path")?, text("label")?, text("predicted")?);
    let number = LeftOut::Column {
        name: "probability",
        kind: "number",
    };
    let probability: Vec<f64> = df
        .column("probability")
        .and_then(|c| c.cast(&DataType::Float64))
        .ok()
        .and_then(|c| c.f64().ok().cloned())
        .ok_or(number)?
        .iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect();
    if let Some((row, p)) = probability
        .iter()
        .enumerate()
        .find(|(_, p)| !(0.0..=1.0).contains(*p))
    {
        return Err(LeftOut::Value {
            name: "probability",
            row,
            value: format!("{p} is not a probability"),
        });
    }
    // The classes in the model's order: its `p_<class>` columns; then any other name seen.
    let mut classes: Vec<String> = df
        .get_column_names()
        .iter()
        .filter_map(|n| n.strip_prefix("p_").map(str::to_string))
        .collect();
    for name in labels.iter().chain(&predicted) {
        if !classes.contains(name) {
            classes.push(name.clone());
        }
    }
    let index: HashMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let mut matrix = vec![vec![0u64; classes.len()]; classes.len()];
    let mut wrong = Vec::new();
    for (i, (l, p)) in labels.iter().zip(&predicted).enumerate() {
        matrix[index[l.as_str()]][index[p.as_str()]] += 1;
        if l != p {
            wrong.push(i);
        }
    }
    // Most confidently wrong first; ties by path, so the page is the same every time.
    wrong.sort_by(|&a, &b| {
        probability[b]
            .total_cmp(&probability[a])
            .then_with(|| paths[a].cmp(&paths[b]))
    });
    let shown: Vec<Value> = wrong
        .iter()
        .take(limit)
        .map(|&i| {
            json!({
                "image": thumbs.add(&paths[i]),
                "path": paths[i],
                "label": labels[i],
                "predicted": predicted[i],
                "probability": probability[i],
            })
        })
        .collect();
    Ok(json!({
        "classes": classes,
        "matrix": matrix,
        "images": labels.len(),
        "wrong": wrong.len(),
        "shown": shown,
    }))
}

/// The distinct images the page shows, each once however many runs show it.
#[derive(Default)]
struct Thumbnails {
    paths: Vec<String>,
    index: HashMap<String, usize>,
}

impl Thumbnails {
    fn add(&mut self, path: &str) -> usize {
        if let Some(&i) = self.index.get(path) {
            return i;
        }
        self.paths.push(path.to_string());
        self.index.insert(path.to_string(), self.paths.len() - 1);
        self.paths.len() - 1
    }

    /// Each image as a JPEG data URL (`src`), or why it is not shown (`missing`). A relative
    /// path is looked for from the current folder, then from the results folder's parent (where
    /// the run was started, usually).
    fn render(&self, base: &Path, notes: &mut Vec<String>) -> Vec<Value> {
        let images: Vec<Value> = self
            .paths
            .par_iter()
            .map(|p| {
                let given = PathBuf::from(p);
                let found = if given.is_relative() && !given.exists() {
                    base.join(&given)
                } else {
                    given
                };
                match thumbnail(&found) {
                    Ok(src) => json!({ "path": p, "src": src }),
                    Err(why) => json!({ "path": p, "missing": why.to_string() }),
                }
            })
            .collect();
        let missing = images.iter().filter(|v| v.get("missing").is_some()).count();
        if missing > 0 {
            notes.push(format!(
                "{missing} of {} misclassified images could not be read (moved or deleted since the run?); their captions stay",
                images.len()
            ));
        }
        images
    }
}

/// The image at `path` at most [`THUMBNAIL`] pixels on its longer side, as a JPEG data URL.
/// Decoded by runner's own decoder, with its size and pixel limits.
pub fn thumbnail(path: &Path) -> Result<String, LeftOut> {
    use base64::Engine;
    // A pipe or a device would block the header read (runner's decoder says the same).
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(LeftOut::Decode(folder::DecodeError::NotAFile));
    }
    let (w, h) = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(LeftOut::Io)?
        .into_dimensions()
        .map_err(LeftOut::Image)?;
    let scale = f64::from(THUMBNAIL) / f64::from(w.max(h).max(1));
    let size = |x: u32| ((f64::from(x) * scale.min(1.0)).round() as u32).max(1);
    let (tw, th) = (size(w), size(h));
    let decoded = folder::decode(
        path,
        [th as usize, tw as usize],
        crate::spec::Interpolation::Bilinear,
    )
    .map_err(LeftOut::Decode)?;
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
        .encode(&decoded.pixels, tw, th, image::ExtendedColorType::Rgb8)
        .map_err(LeftOut::Image)?;
    Ok(format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&jpeg)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_flatten_to_dotted_keys_with_numbered_layers() {
        let t: toml::Table = r#"
            [optimizer]
            kind = "rmsprop"
            lr = 1e-4
            [[head.layers]]
            kind = "flatten"
            [[head.layers]]
            kind = "dense"
            units = 256
            [data]
            image_size = [150, 150]
        "#
        .parse()
        .unwrap();
        let mut flat = BTreeMap::new();
        flatten("", &toml::Value::Table(t), &mut flat);
        assert_eq!(flat["optimizer.lr"], "0.0001");
        assert_eq!(flat["optimizer.kind"], "\"rmsprop\"");
        assert_eq!(flat["head.layers.2.units"], "256");
        assert_eq!(flat["head.layers.1.kind"], "\"flatten\"");
        assert_eq!(flat["data.image_size"], "[150, 150]");
    }

    #[test]
    fn the_data_cannot_take_the_place_of_the_style_or_the_script() {
        let html = page(&json!({ "dir": "/data/*SCRIPT*/x/*STYLE*/y/*DATA*/" }));
        assert_eq!(html.matches(SCRIPT).count(), 1);
        assert_eq!(html.matches(STYLE).count(), 1);
        assert!(html.contains("/data/*SCRIPT*/x/*STYLE*/y/*DATA*/"));
        assert!(html.find(SCRIPT) > html.find("/data/*SCRIPT*/"));
    }

    #[test]
    fn the_data_cannot_end_the_script_element() {
        let html = page(&json!({ "error": "</script><script>alert(1)</script><!--" }));
        let start = html.find("id=\"runner-data\"").unwrap();
        let end = start + html[start..].find("</script>").unwrap();
        assert!(html[start..end].contains("\\u003c/script>\\u003cscript>alert(1)"));
        assert!(!html[start..end].contains("<!--"));
    }
}
