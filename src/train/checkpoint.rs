//! Checkpoints: `results/<run_id>/last.ckpt` after every epoch (and on Ctrl-C, mid-epoch) and
//! `results/<run_id>/best.ckpt` when the monitored metric improves.
//!
//! One file each, written atomically (temporary file, fsync, rename), so a kill at any moment
//! leaves the previous checkpoint intact. Layout: the magic line `RUNNER-CKPT-1\n`, then four
//! length-prefixed (u64 little-endian) sections: the state as JSON, the model (burnpack), the
//! optimizer (burnpack) and the early-stopping best weights (burnpack, or empty); then the
//! SHA-256 of everything before it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Progress;
use crate::io::{WriteError, write_atomic};

const MAGIC: &[u8] = b"RUNNER-CKPT-1\n";

/// Where a run came from, to resume it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    /// The experiment file.
    pub file: PathBuf,
    /// `--set` arguments given.
    pub sets: Vec<String>,
    /// The `[sweep]` point's values as `key=value` (TOML), empty outside a grid. Checkpoints
    /// written before it existed have the point among `sets`.
    #[serde(default)]
    pub point: Vec<String>,
    /// The resolved spec as TOML.
    pub config: String,
    /// Hash of the resolved spec.
    pub config_hash: String,
    /// RFC 3339 start time of the run.
    pub started_at: String,
    /// Class names of the data.
    pub classes: Vec<String>,
}

/// Everything but the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The run.
    pub run_id: String,
    /// How to rebuild the run's spec.
    pub origin: Origin,
    /// Where training stands.
    pub progress: Progress,
    /// The backbone layers the model section leaves out (the weights file's, unchanged);
    /// `None` in checkpoints that hold the whole model (all written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<crate::model::FrozenBase>,
}

/// A whole checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Position, metrics and schedule state.
    pub state: State,
    /// The model's record (burnpack bytes).
    pub model: Vec<u8>,
    /// The optimizer's record (burnpack bytes).
    pub optimizer: Vec<u8>,
    /// The best weights of the current phase, for early stopping's `restore_best` (or empty).
    pub phase_best: Vec<u8>,
}

/// Errors reading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// No such file.
    #[error(
        "{path}: no checkpoint here ({source}); was the run started with this --results folder?"
    )]
    Missing {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is damaged.
    #[error("{path}: damaged checkpoint: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The folder with a run's checkpoints and saved model.
pub fn run_dir(results: &Path, run_id: &str) -> PathBuf {
    results.join(run_id)
}

/// `results/<run_id>/last.ckpt`.
pub fn last_path(results: &Path, run_id: &str) -> PathBuf {
    run_dir(results, run_id).join("last.ckpt")
}

/// `results/<run_id>/best.ckpt`.
pub fn best_path(results: &Path, run_id: &str) -> PathBuf {
    run_dir(results, run_id).join("best.ckpt")
}

/// Writes `ck` to `path` atomically.
pub fn write(path: &Path, ck: &Checkpoint) -> Result<(), WriteError> {
    let json = serde_json::to_vec(&ck.state).map_err(|e| WriteError::new(path, e))?;
    let mut buf = Vec::with_capacity(
        MAGIC.len() + 32 + 32 + json.len() + ck.model.len() + ck.optimizer.len(),
    );
    buf.extend_from_slice(MAGIC);
    for section in [&json, &ck.model, &ck.optimizer, &ck.phase_best] {
        buf.extend_from_slice(&(section.len() as u64).to_le_bytes());
        buf.extend_from_slice(section);
    }
    let digest = Sha256::digest(&buf);
    buf.extend_from_slice(&digest);
    write_atomic(path, |f| f.write_all(&buf))
}

/// Makes `to` a copy of the checkpoint just written at `from`: a hard link renamed into place
/// (atomic, no second write of a large file), or a fresh write where links are not supported.
pub fn copy(from: &Path, to: &Path, ck: &Checkpoint) -> Result<(), WriteError> {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = to.with_file_name(format!(".{name}.{}.link", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    match std::fs::hard_link(from, &tmp).and_then(|()| std::fs::rename(&tmp, to)) {
        Ok(()) => Ok(()),
        Err(_) => {
            let _ = std::fs::remove_file(&tmp);
            write(to, ck)
        }
    }
}

/// Reads and verifies a checkpoint.
pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Missing {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |message: &str| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    if bytes.len() < MAGIC.len() + 32 || !bytes.starts_with(MAGIC) {
        return Err(corrupt("not a runner checkpoint"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err(corrupt("checksum mismatch (truncated or modified)"));
    }
    let mut rest = &body[MAGIC.len()..];
    let mut sections = Vec::with_capacity(4);
    for _ in 0..4 {
        if rest.len() < 8 {
            return Err(corrupt("truncated section header"));
        }
        let (len, tail) = rest.split_at(8);
        let len = u64::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        if tail.len() < len {
            return Err(corrupt("truncated section"));
        }
        let (section, tail) = tail.split_at(len);
        sections.push(section.to_vec());
        rest = tail;
    }
    let state: State = serde_json::from_slice(&sections[0])
        .map_err(|e| corrupt(&format!("unreadable state: {e}")))?;
    let phase_best = sections.pop().unwrap_or_default();
    let optimizer = sections.pop().unwrap_or_default();
    let model = sections.pop().unwrap_or_default();
    Ok(Checkpoint {
        state,
        model,
        optimizer,
        phase_best,
    })
}
