//! Run results: `results/<run_id>.parquet`, one row per epoch, written atomically, with the
//! resolved config in the file's metadata and beside it as `results/<run_id>.toml`.
//! The only module that imports polars.
//!
//! # Schema, version 3
//!
//! Version 2 added `phase`; version 3 `sweep_point`, `error` and the `failed` status. Older
//! files still read: missing columns come back as nulls.
//!
//! | column | type | meaning |
//! | --- | --- | --- |
//! | `schema_version` | u32 | 3 |
//! | `run_id` | str | `<experiment>-<UTC yyyymmdd-hhmmss>-<config hash>` |
//! | `experiment` | str | `experiment.name` |
//! | `config_hash` | str | sha256 prefix of the resolved spec |
//! | `status` | str | `running` (rewritten after every epoch), `completed`, `interrupted`, `diverged` or `failed` |
//! | `sweep_point` | str, null outside a grid | the `[sweep]` values of this run, e.g. `optimizer.lr = 1e-5` |
//! | `error` | str, null | why a diverged or failed run stopped |
//! | `started_at` | str | RFC 3339, UTC |
//! | `backbone`, `weights`, `preprocess` | str | backbone settings; `weights` is the file used |
//! | `head` | str | the head's layers, e.g. `flatten > dense(256, relu) > dropout(0.5) > dense(1, sigmoid)` |
//! | `phase` | str | the phase's name (`train` without `[[phase]]`) |
//! | `trainable_from` | str | the phase's freeze cutoff |
//! | `optimizer` | str | the phase's optimizer kind |
//! | `lr` | f64 | learning rate of the epoch's last step |
//! | `batch_size` | u32 | |
//! | `seed` | u64 | |
//! | `image_size` | str | `HxW` |
//! | `epoch` | u32 | 1-based, counted across phases (null on the single row of a run that failed before its first epoch) |
//! | `train_loss`, `train_acc`, `val_loss`, `val_acc` | f64 | per-epoch metrics (a diverged epoch: its partial training metrics, NaN validation) |
//! | `seconds` | f64 | wall time of the epoch |
//! | `test_loss`, `test_acc` | f64, null without a test split | final test evaluation, same on every row |
//! | `skipped_images` | u32 | images left out by `data.on_bad_image = "skip"` |
//!
//! File metadata: `runner.schema_version` and `runner.config` (the resolved spec as TOML).
//! The column names and types are defined once, in [`schema`].

pub mod query;
pub mod schema;

use schema::col as C;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::metrics::{EpochMetrics, Evaluation, Prediction, RunRecord};
use crate::plan::Plan;

/// Version of the results schema written by this build.
pub const SCHEMA_VERSION: u32 = 3;
/// Parquet metadata key holding the resolved config.
pub const CONFIG_KEY: &str = "runner.config";

pub use crate::io::{WriteError, remove_stale_temporaries, write_atomic};

/// Errors writing or reading results.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// A file could not be written.
    #[error(transparent)]
    Write(#[from] crate::io::WriteError),
    /// A results query is malformed.
    #[error(transparent)]
    Query(#[from] query::QueryError),
    /// A file could not be read.
    #[error("{path}: cannot read results: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// The resolved spec as TOML.
pub fn config_toml(plan: &Plan) -> String {
    toml::to_string_pretty(&plan.spec).unwrap_or_default()
}

/// The per-epoch table of a run.
pub fn run_frame(
    plan: &Plan,
    run_id: &str,
    started_at: &str,
    progress: &RunRecord<'_>,
    test: Option<Evaluation>,
) -> PolarsResult<DataFrame> {
    let epochs = progress.history;
    // A run that failed before its first epoch still gets one row, with null metrics.
    let n = epochs.len().max(1);
    let phase = |m: &EpochMetrics| &plan.phases[m.phase.min(plan.phases.len() - 1)];
    let spec = &plan.spec;
    let s = |v: &str| vec![v.to_string(); n];
    let [h, w] = spec.data.image_size;
    let col = |f: fn(&EpochMetrics) -> f64| {
        let mut v: Vec<Option<f64>> = epochs.iter().map(|m| Some(f(m))).collect();
        v.resize(n, None);
        v
    };
    // Per-phase values; the first phase's on the row of a run without epochs.
    let per = |f: &dyn Fn(&crate::plan::PhasePlan) -> String| {
        let mut v: Vec<String> = epochs.iter().map(|m| f(phase(m))).collect();
        v.resize(n, f(&plan.phases[0]));
        v
    };
    df! {
        C::SCHEMA_VERSION => vec![SCHEMA_VERSION; n],
        C::RUN_ID => s(run_id),
        C::EXPERIMENT => s(&spec.experiment.name),
        C::CONFIG_HASH => s(&plan.config_hash),
        C::STATUS => s(progress.status.as_str()),
        C::STARTED_AT => s(started_at),
        C::BACKBONE => s(plan.backbone.name),
        C::WEIGHTS => s(&plan.weights.display().to_string()),
        C::PREPROCESS => s(plan.preprocess.as_str()),
        C::HEAD => per(&|p| crate::spec::describe_layers(&p.head)),
        C::SWEEP_POINT => vec![plan.sweep_point.clone(); n],
        C::PHASE => per(&|p| p.name.clone()),
        C::TRAINABLE_FROM => per(&|p| p.cutoff.label.clone()),
        C::OPTIMIZER => per(&|p| p.optimizer.kind().to_string()),
        C::LR => col(|m| m.lr),
        C::BATCH_SIZE => vec![spec.data.batch_size as u32; n],
        C::SEED => vec![spec.experiment.seed; n],
        C::IMAGE_SIZE => s(&format!("{h}x{w}")),
        C::EPOCH => { let mut v: Vec<Option<u32>> = epochs.iter().map(|m| Some(m.epoch as u32)).collect(); v.resize(n, None); v },
        C::TRAIN_LOSS => col(|m| m.train_loss),
        C::TRAIN_ACC => col(|m| m.train_acc),
        C::VAL_LOSS => col(|m| m.val_loss),
        C::VAL_ACC => col(|m| m.val_acc),
        C::SECONDS => col(|m| m.seconds),
        C::TEST_LOSS => vec![test.map(|t| t.loss); n],
        C::TEST_ACC => vec![test.map(|t| t.acc); n],
        C::SKIPPED_IMAGES => vec![progress.skipped_images as u32; n],
        C::ERROR => vec![progress.error.map(str::to_string); n],
    }
}

/// Writes `results/<run_id>.toml` and `results/<run_id>.parquet`, both atomically.
pub fn write_run(
    dir: &Path,
    plan: &Plan,
    run_id: &str,
    started_at: &str,
    progress: &RunRecord<'_>,
    test: Option<Evaluation>,
) -> Result<PathBuf, ResultsError> {
    let config = config_toml(plan);
    write_atomic(&dir.join(format!("{run_id}.toml")), |f| {
        f.write_all(config.as_bytes())
    })?;
    let path = dir.join(format!("{run_id}.parquet"));
    let mut df = run_frame(plan, run_id, started_at, progress, test)
        .map_err(|e| WriteError::new(&path, e))?;
    write_atomic(&path, |f| {
        ParquetWriter::new(f)
            .with_key_value_metadata(Some(KeyValueMetadata::from_static(vec![
                ("runner.schema_version".into(), SCHEMA_VERSION.to_string()),
                (CONFIG_KEY.into(), config),
            ])))
            .finish(&mut df)
            .map(|_| ())
    })?;
    Ok(path)
}

/// Writes `results/<run_id>.predictions.parquet`: one row per test image with its path, true
/// class, predicted class, the probability of the predicted class and one `p_<class>` column per
/// class.
pub fn write_predictions(
    dir: &Path,
    run_id: &str,
    classes: &[String],
    predictions: &[Prediction],
) -> Result<PathBuf, ResultsError> {
    let path = dir.join(format!("{run_id}.predictions.parquet"));
    let fail = |e: PolarsError| WriteError::new(&path, e);
    let predicted: Vec<usize> = predictions
        .iter()
        .map(|p| crate::metrics::predicted_class(&p.probabilities))
        .collect();
    let name = |i: usize| classes.get(i).cloned().unwrap_or_else(|| i.to_string());
    let mut columns: Vec<Column> = vec![
        Column::new(
            "path".into(),
            predictions
                .iter()
                .map(|p| p.path.display().to_string())
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "label".into(),
            predictions
                .iter()
                .map(|p| name(p.label))
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "predicted".into(),
            predicted.iter().map(|&c| name(c)).collect::<Vec<_>>(),
        ),
        Column::new(
            "probability".into(),
            predictions
                .iter()
                .zip(&predicted)
                .map(|(p, &c)| f64::from(p.probabilities[c]))
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "correct".into(),
            predictions
                .iter()
                .zip(&predicted)
                .map(|(p, &c)| p.label == c)
                .collect::<Vec<_>>(),
        ),
    ];
    for (i, class) in classes.iter().enumerate() {
        columns.push(Column::new(
            format!("p_{class}").into(),
            predictions
                .iter()
                .map(|p| f64::from(p.probabilities.get(i).copied().unwrap_or(f32::NAN)))
                .collect::<Vec<_>>(),
        ));
    }
    let mut df = DataFrame::new(predictions.len(), columns).map_err(fail)?;
    write_atomic(&path, |f| ParquetWriter::new(f).finish(&mut df).map(|_| ()))?;
    Ok(path)
}

/// A string column as strings (nulls, or a missing column, as empty).
pub fn strings(df: &DataFrame, name: &str) -> Vec<String> {
    df.column(name)
        .ok()
        .and_then(|c| {
            c.str().ok().map(|c| {
                c.iter()
                    .map(|v| v.unwrap_or_default().to_string())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Reads a run's table and its file metadata.
pub fn read_run(path: &Path) -> Result<(DataFrame, Vec<(String, String)>), ResultsError> {
    let err = |e: &dyn std::fmt::Display| ResultsError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let file = File::open(path).map_err(|e| err(&e))?;
    let mut reader = ParquetReader::new(file);
    let meta = reader
        .get_metadata()
        .map_err(|e| err(&e))?
        .key_value_metadata()
        .as_ref()
        .map(|kv| {
            kv.iter()
                .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let df = reader.finish().map_err(|e| err(&e))?;
    Ok((df, meta))
}
