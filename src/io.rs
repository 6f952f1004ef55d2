//! Files written so that a crash, a kill or a full disk never leaves half of one: every file
//! runner writes (results, checkpoints, caches, models, plots) goes through [`write_atomic`].
//! Imports nothing of runner.

use std::fs::File;
use std::path::{Path, PathBuf};

/// A file that could not be written (the earlier version, if any, is untouched).
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot write: {message}", path.display())]
pub struct WriteError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// Writes `path` atomically: a uniquely named temporary file in the same folder
/// (`.<name>.<random>.tmp`), synced, renamed over `path`, and the folder synced so that the rename
/// survives a power cut. On an error the temporary file is removed and `path` is untouched.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut File) -> Result<(), String>,
) -> Result<(), WriteError> {
    let err = |message: String| WriteError {
        path: path.to_path_buf(),
        message,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Fault injection for the tests: `RUNNER_FAIL_WRITE=<text>` makes every write of a file
    // whose path contains it fail as a full disk would, after its temporary file was created.
    let inject = std::env::var("RUNNER_FAIL_WRITE")
        .ok()
        .filter(|s| !s.is_empty() && path.to_string_lossy().contains(s.as_str()));
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| err(e.to_string()))?;
    if inject.is_some() {
        return Err(err(format!(
            "{} (injected by RUNNER_FAIL_WRITE)",
            std::io::Error::from(std::io::ErrorKind::StorageFull)
        )));
    }
    write(tmp.as_file_mut()).map_err(err)?;
    tmp.as_file().sync_all().map_err(|e| err(e.to_string()))?;
    tmp.persist(path).map_err(|e| err(e.error.to_string()))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Removes the temporary files [`write_atomic`] leaves when its process is killed mid-write
/// (`.<name>.<random>.tmp`) from `dir` whose name starts with `.<prefix>`; only for files this
/// process owns (a run's, on resume).
pub fn remove_stale_temporaries(dir: &Path, prefix: &str) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&format!(".{prefix}")) && name.ends_with(".tmp") && e.path().is_file() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
