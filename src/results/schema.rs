//! The results table's schema, defined once: every column's name and type, in table order. The
//! writer (`results::run_frame`), the reader (`query::scan`), the queries, `plot`, `run` and
//! `sweep` name columns through these constants; a test checks the writer against the list.

use polars::prelude::{DataType, Schema};

/// Column names.
pub mod col {
    /// `schema_version` (u32).
    pub const SCHEMA_VERSION: &str = "schema_version";
    /// `run_id` (str).
    pub const RUN_ID: &str = "run_id";
    /// `experiment` (str).
    pub const EXPERIMENT: &str = "experiment";
    /// `config_hash` (str).
    pub const CONFIG_HASH: &str = "config_hash";
    /// `status` (str).
    pub const STATUS: &str = "status";
    /// `started_at` (str).
    pub const STARTED_AT: &str = "started_at";
    /// `backbone` (str).
    pub const BACKBONE: &str = "backbone";
    /// `weights` (str).
    pub const WEIGHTS: &str = "weights";
    /// `preprocess` (str).
    pub const PREPROCESS: &str = "preprocess";
    /// `head` (str).
    pub const HEAD: &str = "head";
    /// `sweep_point` (str, null outside a grid).
    pub const SWEEP_POINT: &str = "sweep_point";
    /// `phase` (str).
    pub const PHASE: &str = "phase";
    /// `trainable_from` (str).
    pub const TRAINABLE_FROM: &str = "trainable_from";
    /// `optimizer` (str).
    pub const OPTIMIZER: &str = "optimizer";
    /// `lr` (f64).
    pub const LR: &str = "lr";
    /// `batch_size` (u32).
    pub const BATCH_SIZE: &str = "batch_size";
    /// `seed` (u64).
    pub const SEED: &str = "seed";
    /// `image_size` (str).
    pub const IMAGE_SIZE: &str = "image_size";
    /// `epoch` (u32).
    pub const EPOCH: &str = "epoch";
    /// `train_loss` (f64).
    pub const TRAIN_LOSS: &str = "train_loss";
    /// `train_acc` (f64).
    pub const TRAIN_ACC: &str = "train_acc";
    /// `val_loss` (f64).
    pub const VAL_LOSS: &str = "val_loss";
    /// `val_acc` (f64).
    pub const VAL_ACC: &str = "val_acc";
    /// `seconds` (f64).
    pub const SECONDS: &str = "seconds";
    /// `test_loss` (f64).
    pub const TEST_LOSS: &str = "test_loss";
    /// `test_acc` (f64).
    pub const TEST_ACC: &str = "test_acc";
    /// `skipped_images` (u32).
    pub const SKIPPED_IMAGES: &str = "skipped_images";
    /// `error` (str, null).
    pub const ERROR: &str = "error";
}

/// Every column this build writes, in table order, with its type (see the table in
/// `results/mod.rs`).
pub fn columns() -> [(&'static str, DataType); 28] {
    use DataType::*;
    [
        (col::SCHEMA_VERSION, UInt32),
        (col::RUN_ID, String),
        (col::EXPERIMENT, String),
        (col::CONFIG_HASH, String),
        (col::STATUS, String),
        (col::STARTED_AT, String),
        (col::BACKBONE, String),
        (col::WEIGHTS, String),
        (col::PREPROCESS, String),
        (col::HEAD, String),
        (col::SWEEP_POINT, String),
        (col::PHASE, String),
        (col::TRAINABLE_FROM, String),
        (col::OPTIMIZER, String),
        (col::LR, Float64),
        (col::BATCH_SIZE, UInt32),
        (col::SEED, UInt64),
        (col::IMAGE_SIZE, String),
        (col::EPOCH, UInt32),
        (col::TRAIN_LOSS, Float64),
        (col::TRAIN_ACC, Float64),
        (col::VAL_LOSS, Float64),
        (col::VAL_ACC, Float64),
        (col::SECONDS, Float64),
        (col::TEST_LOSS, Float64),
        (col::TEST_ACC, Float64),
        (col::SKIPPED_IMAGES, UInt32),
        (col::ERROR, String),
    ]
}

/// [`columns`] as a polars schema: older files are read into it (missing columns are null).
pub fn schema() -> Schema {
    let mut s = Schema::default();
    for (name, dt) in columns() {
        s.insert(name.into(), dt);
    }
    s
}
