//! runner: transfer learning on images from a TOML file.
//!
//! experiment TOML -> [`spec`] (serde, strict) -> [`plan`] (validated, resolved) ->
//! [`model`] (backbone + head) -> [`train`] -> [`results`] (parquet) and [`logging`] (JSON lines).
#![warn(missing_docs)]

pub mod assets;
pub mod backbone;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod console;
pub mod cpu;
pub mod data;
pub mod device;
pub mod export;
pub mod failure;
pub mod fetch;
pub mod head;
pub mod init;
pub mod io;
pub mod logging;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod onnx;
pub mod page;
pub mod plan;
pub mod plot;
pub mod predict;
pub mod report;
pub mod results;
pub mod run;
pub mod settings;
pub mod spec;
pub mod sweep;
pub mod tensorboard;
pub mod train;
