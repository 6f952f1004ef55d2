//! What every command is given, resolved once from the command line (and its environment
//! variables) by `cli`.

use std::path::PathBuf;

use crate::assets::Locations;
use crate::device::DeviceChoice;

/// What every command is given, resolved from the command line once.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Compute device.
    pub device: DeviceChoice,
    /// `--set KEY=VALUE` overrides (over the file and RUNNER_* variables).
    pub sets: Vec<String>,
    /// Folder for run results.
    pub results: PathBuf,
    /// The asset mirror, if any.
    pub locations: Locations,
    /// Folder of the feature cache.
    pub cache: PathBuf,
    /// Write TensorBoard event files per run (`results/<run_id>/tensorboard/`).
    pub tensorboard: bool,
}

/// The default feature cache folder.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("runner")
        .join("features")
}
