//! Files written so that a crash, a kill or a full disk never leaves half of one: every file
//! runner writes (results, checkpoints, caches, models, plots) goes through [`write_atomic`].
//! Imports nothing of runner.

use std::fs::File;
use std::path::{Path, PathBuf};

/// Any error, typed (downcast it to see which).
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A file that could not be written (the earlier version, if any, is untouched).
// The cause is in the message (not a `source`, which `{:#}` would print a second time).
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot write: {cause}", path.display())]
pub struct WriteError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong: the I/O, encoder or format error.
    pub cause: Cause,
}

impl WriteError {
    /// `path` could not be written because of `cause`.
    pub fn new(path: &Path, cause: impl Into<Cause>) -> Self {
        Self {
            path: path.to_path_buf(),
            cause: cause.into(),
        }
    }
}

/// Writes `path` atomically: a uniquely named temporary file in the same folder
/// (`.<name>.<random>.tmp`), synced, renamed over `path`, and the folder synced so that the rename
/// survives a power cut. On an error the temporary file is removed and `path` is untouched.
pub fn write_atomic<E: Into<Cause>>(
    path: &Path,
    write: impl FnOnce(&mut File) -> Result<(), E>,
) -> Result<(), WriteError> {
    let mut file = AtomicFile::create(path)?;
    write(file.file()).map_err(|e| WriteError::new(path, e))?;
    file.commit().map(drop)
}

/// A file being written in place of `path`, for a writer that goes on for long (a feature
/// cache written batch by batch during an extraction): the temporary file of [`write_atomic`],
/// renamed over `path` by [`commit`](Self::commit) and removed when dropped before that.
#[derive(Debug)]
pub struct AtomicFile {
    path: PathBuf,
    tmp: tempfile::NamedTempFile,
}

impl AtomicFile {
    /// Creates the temporary file beside `path` (and `path`'s folder when missing).
    pub fn create(path: &Path) -> Result<Self, WriteError> {
        let err = |cause: Cause| WriteError {
            path: path.to_path_buf(),
            cause,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| err(e.into()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let inject = injected_failure(path);
        // 0666 less the umask, as any file a program creates (tempfile's default is 0600, which
        // would leave a model or a table unreadable to the other users of a shared results folder).
        let mode = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o666);
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .permissions(mode)
            .tempfile_in(dir)
            .map_err(|e| err(e.into()))?;
        if let Some(e) = inject {
            return Err(err(e.into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
        })
    }

    /// The file `path` will be.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary file, to write to (and read back from).
    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// Syncs the file, renames it over `path` and syncs the folder; returns the file, open.
    pub fn commit(self) -> Result<File, WriteError> {
        self.try_commit().map_err(|(e, _)| e)
    }

    /// [`commit`](Self::commit), giving the temporary file back when it fails.
    #[allow(clippy::result_large_err)] // once per file
    pub fn try_commit(self) -> Result<File, (WriteError, Self)> {
        let err = |path: &Path, cause: Cause| WriteError {
            path: path.to_path_buf(),
            cause,
        };
        if let Err(e) = self.tmp.as_file().sync_all() {
            return Err((err(&self.path, e.into()), self));
        }
        let file = match self.tmp.persist(&self.path) {
            Ok(file) => file,
            Err(e) => {
                let path = self.path;
                return Err((err(&path, e.error.into()), Self { path, tmp: e.file }));
            }
        };
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(file)
    }
}

/// Bytes as lowercase hexadecimal (SHA-256 digests in cards, checkpoints and caches).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why an `--out` path is refused before anything is written.
#[derive(Debug, thiserror::Error)]
pub enum OutError {
    /// Not one of the extensions the command writes.
    #[error("--out {}: the file name must end in .{} (runner does not replace other files with {what})", path.display(), exts.join(" or ."))]
    Extension {
        /// The path given.
        path: PathBuf,
        /// The extensions allowed.
        exts: Vec<&'static str>,
        /// What the command writes, e.g. `a model`.
        what: &'static str,
    },
    /// A folder.
    #[error("--out {}: is a folder, not a file", .0.display())]
    Folder(PathBuf),
    /// Its folder is missing.
    #[error("--out {}: the folder {} does not exist", .0.display(), .1.display())]
    NoFolder(PathBuf, PathBuf),
}

/// `--out` must name a file with one of `exts` (case-insensitive) in a folder that exists.
pub fn check_out(out: &Path, exts: &[&'static str], what: &'static str) -> Result<(), OutError> {
    if out
        .extension()
        .is_none_or(|e| !exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
    {
        return Err(OutError::Extension {
            path: out.to_path_buf(),
            exts: exts.to_vec(),
            what,
        });
    }
    if out.is_dir() {
        return Err(OutError::Folder(out.to_path_buf()));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent.filter(|p| !p.is_dir()) {
        return Err(OutError::NoFolder(out.to_path_buf(), dir.to_path_buf()));
    }
    Ok(())
}

/// Fault injection for the tests: `RUNNER_FAIL_WRITE=<text>` makes every write of a file whose
/// path contains it fail as a full disk would (atomic writes after their temporary file was
/// created, TensorBoard's appends).
pub fn injected_failure(path: &Path) -> Option<std::io::Error> {
    std::env::var("RUNNER_FAIL_WRITE")
        .ok()
        .filter(|s| !s.is_empty() && path.to_string_lossy().contains(s.as_str()))
        .map(|_| {
            std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "{} (injected by RUNNER_FAIL_WRITE)",
                    std::io::Error::from(std::io::ErrorKind::StorageFull)
                ),
            )
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn out_paths_are_checked_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let bad = check_out(Path::new("model.bpk"), &["onnx"], "a model").unwrap_err();
        assert_eq!(
            bad.to_string(),
            "--out model.bpk: the file name must end in .onnx (runner does not replace other files with a model)"
        );
        assert!(check_out(Path::new("m.ONNX"), &["onnx"], "a model").is_ok());
        assert!(check_out(Path::new("r.htm"), &["html", "htm"], "a page").is_ok());
        assert!(matches!(
            check_out(&dir.path().join("no/r.html"), &["html"], "a page"),
            Err(OutError::NoFolder(..))
        ));
        let folder = dir.path().join("x.html");
        std::fs::create_dir(&folder).unwrap();
        assert!(matches!(
            check_out(&folder, &["html"], "a page"),
            Err(OutError::Folder(_))
        ));
    }

    #[test]
    fn a_written_file_is_readable_by_others_as_the_umask_allows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        write_atomic(&path, |f| std::io::Write::write_all(f, b"x")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        // Not tempfile's 0600: group and others get what the umask leaves them.
        let umask = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_string()))
            })
            .and_then(|v| u32::from_str_radix(&v, 8).ok())
            .unwrap_or(0o022);
        assert_eq!(mode, 0o666 & !umask, "{mode:o}");
    }
}
