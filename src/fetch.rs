//! Getting named assets: from a local mirror folder (copied and verified) or over HTTP (an HTTP
//! mirror of the same layout, `--assets-url` or `$RUNNER_ASSETS_URL`), with resumed downloads
//! (HTTP Range), SHA-256 verification, a progress bar on a terminal, and an atomic landing: the
//! bytes go to `.<name>.part` beside the destination and are renamed only once verified, so a
//! destination file is always whole and correct.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::assets::{Asset, AssetFiles, Locations};

/// Errors getting an asset.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The bytes do not match the catalogue.
    #[error(
        "{what}: checksum mismatch: expected sha256 {expected}, found {found}; the file was not kept"
    )]
    Checksum {
        /// The URL or path read.
        what: String,
        /// SHA-256 from the catalogue.
        expected: String,
        /// SHA-256 of what arrived.
        found: String,
    },
    /// The transfer failed after every attempt.
    #[error("{url}: download failed after {attempts} attempts: {message}")]
    Download {
        /// The URL.
        url: String,
        /// Attempts made.
        attempts: usize,
        /// The last error.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// No source has the asset.
    #[error("{0}")]
    Unavailable(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FetchError + '_ {
    move |e| FetchError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn part_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.part"))
}

/// Verifies `part` and renames it to `dest`; a mismatch removes it.
fn land(part: &Path, dest: &Path, sha256: &str, what: &str) -> Result<(), FetchError> {
    let found = sha256_file(part)?;
    if found != sha256 {
        let _ = std::fs::remove_file(part);
        return Err(FetchError::Checksum {
            what: what.to_string(),
            expected: sha256.to_string(),
            found,
        });
    }
    std::fs::File::open(part)
        .and_then(|f| f.sync_all())
        .map_err(io(part))?;
    std::fs::rename(part, dest).map_err(io(dest))
}

fn bar(len: Option<u64>, label: &str) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len.unwrap_or(0));
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.set_prefix(label.to_string());
    b
}

/// Downloads `url` to `dest`, resuming a previous partial download, and verifies `sha256`.
pub fn download(url: &str, dest: &Path, sha256: &str) -> Result<(), FetchError> {
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let part = part_path(dest);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .build()
        .into();
    const ATTEMPTS: usize = 5;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        let mut req = agent.get(url);
        if have > 0 {
            req = req.header("Range", &format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(e) => {
                last = e.to_string();
                std::thread::sleep(Duration::from_millis(200 * attempt as u64));
                continue;
            }
        };
        let status = resp.status().as_u16();
        let (append, total) = match status {
            206 => (true, None),
            200 => (false, None),
            // The partial file already holds everything.
            416 if have > 0 => return land(&part, dest, sha256, url),
            _ => {
                return Err(FetchError::Download {
                    url: url.to_string(),
                    attempts: attempt,
                    message: format!("HTTP {status}"),
                });
            }
        };
        let length = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let total = total.or(length.map(|l| if append { l + have } else { l }));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&part)
            .map_err(io(&part))?;
        let progress = bar(
            total,
            dest.file_name().map_or("", |n| n.to_str().unwrap_or("")),
        );
        progress.set_position(if append { have } else { 0 });
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        let outcome = loop {
            match body.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    file.write_all(&buf[..n]).map_err(io(&part))?;
                    got += n as u64;
                    progress.inc(n as u64);
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        progress.finish_and_clear();
        file.flush().map_err(io(&part))?;
        let complete = length.is_none_or(|l| got >= l);
        match outcome {
            Ok(()) if complete => return land(&part, dest, sha256, url),
            Ok(()) => last = format!("connection closed after {got} of {length:?} bytes"),
            Err(e) => last = e,
        }
        tracing::warn!(url, attempt, have = have + got, error = %last, "Download interrupted; resuming.");
    }
    Err(FetchError::Download {
        url: url.to_string(),
        attempts: ATTEMPTS,
        message: last,
    })
}

/// Copies a local file to `dest` through the same verified, atomic landing.
pub fn copy(src: &Path, dest: &Path, sha256: &str) -> Result<(), FetchError> {
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let part = part_path(dest);
    std::fs::copy(src, &part).map_err(io(src))?;
    land(&part, dest, sha256, &src.display().to_string())
}

/// Where `fetch` looks, in order.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// A local mirror folder.
    pub mirror: Option<PathBuf>,
    /// An HTTP mirror of the same layout (base URL).
    pub url: Option<String>,
}

/// What `fetch` did with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// Already there with the right checksum.
    Present,
    /// Copied from the local mirror.
    Copied,
    /// Downloaded.
    Downloaded,
}

/// Puts one file of an asset at `root/rel`, verified.
pub fn fetch_file(
    root: &Path,
    rel: &str,
    sha256: &str,
    sources: &Sources,
) -> Result<Done, FetchError> {
    let dest = root.join(rel);
    if dest.is_file() && sha256_file(&dest)? == sha256 {
        return Ok(Done::Present);
    }
    if let Some(m) = &sources.mirror {
        let src = m.join(rel);
        if src.is_file() {
            copy(&src, &dest, sha256)?;
            return Ok(Done::Copied);
        }
    }
    if let Some(base) = &sources.url {
        let url = format!("{}/{}", base.trim_end_matches('/'), rel);
        download(&url, &dest, sha256)?;
        return Ok(Done::Downloaded);
    }
    Err(FetchError::Unavailable(format!(
        "{rel}: not in {} and no source to get it from",
        root.display()
    )))
}

/// Fetches every file of `asset` into `root` (the project folder: files land in `weights/` and
/// `data/`). Returns how many files were present, copied and downloaded.
pub fn fetch(asset: &Asset, root: &Path, sources: &Sources) -> Result<[usize; 3], FetchError> {
    let mut counts = [0usize; 3];
    let mut tally = |d: Done| match d {
        Done::Present => counts[0] += 1,
        Done::Copied => counts[1] += 1,
        Done::Downloaded => counts[2] += 1,
    };
    let unavailable = |e: FetchError| match e {
        FetchError::Unavailable(_) => FetchError::Unavailable(Locations::offline_help(asset)),
        other => other,
    };
    match &asset.files {
        AssetFiles::One { path, sha256 } => {
            tally(fetch_file(root, path, sha256, sources).map_err(unavailable)?);
        }
        AssetFiles::Listed {
            sums,
            sums_sha256,
            dir,
        } => {
            tally(fetch_file(root, sums, sums_sha256, sources).map_err(unavailable)?);
            let list = std::fs::read_to_string(root.join(sums)).map_err(io(&root.join(sums)))?;
            let entries: Vec<(String, String)> = list
                .lines()
                .filter_map(|l| l.split_once("  "))
                .map(|(h, p)| (h.to_string(), p.trim_start_matches("./").to_string()))
                .collect();
            let dir = dir.trim_end_matches('/');
            for (hash, rel) in entries {
                tally(
                    fetch_file(root, &format!("{dir}/{rel}"), &hash, sources)
                        .map_err(unavailable)?,
                );
            }
        }
    }
    Ok(counts)
}
