//! Getting named assets: from a local mirror folder (copied and verified), over HTTP (an HTTP
//! mirror of the same layout, `--assets-url` or `$RUNNER_ASSETS_URL`), or from the original
//! publisher (Keras' and torchvision's weight files, Microsoft's Dogs-vs-Cats archive, from which
//! the book's split is built). Downloads resume (HTTP Range) or restart, are verified (SHA-256,
//! or the publisher's own check: torch.hub's SHA-256 prefix, Keras' MD5), show a progress bar on
//! a terminal, and land atomically: the bytes go to `.<name>.part` beside the destination and
//! are renamed only once verified, so a destination file is always whole and correct.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::assets::{Asset, AssetFiles, Build, Check, Locations, Upstream};

/// Errors getting an asset.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The bytes do not match the catalogue.
    #[error("{what}: checksum mismatch: expected {expected}, found {found}; the file was not kept")]
    Checksum {
        /// The URL or path read.
        what: String,
        /// The expected digest, with its kind (`sha256 …`, `md5 …`).
        expected: String,
        /// The digest of what arrived, of the same kind.
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

/// Lowercase hex SHA-256 and MD5 of a file, in one pass.
pub fn digests(path: &Path) -> Result<(String, String), FetchError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let (mut sha, mut md5) = (Sha256::new(), md5::Md5::new());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        md5.update(&buf[..n]);
    }
    Ok((
        crate::io::hex(&sha.finalize()),
        crate::io::hex(&md5.finalize()),
    ))
}

/// Lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    digests(path).map(|(sha, _)| sha)
}

/// Whether the file at `path` passes `check`; `Err` says what was expected and found.
pub fn verify(path: &Path, check: Check<'_>) -> Result<Result<(), (String, String)>, FetchError> {
    let (sha, md5) = digests(path)?;
    Ok(match check {
        Check::Sha256(want) if sha != want => {
            Err((format!("sha256 {want}"), format!("sha256 {sha}")))
        }
        Check::Sha256Prefix(want) if !sha.starts_with(want) => Err((
            format!("sha256 beginning {want} (torchvision's file name)"),
            format!("sha256 {sha}"),
        )),
        Check::Md5(want) if md5 != want => Err((
            format!("md5 {want} (Keras' file_hash)"),
            format!("md5 {md5}"),
        )),
        Check::Unpublished => {
            tracing::info!(path = %path.display(), sha256 = %sha, "Downloaded; its publisher gives no checksum to compare with.");
            Ok(())
        }
        _ => Ok(()),
    })
}

fn part_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.part"))
}

/// Verifies `part` and renames it to `dest`; a mismatch removes it.
fn land(part: &Path, dest: &Path, check: Check<'_>, what: &str) -> Result<(), FetchError> {
    if let Err((expected, found)) = verify(part, check)? {
        let _ = std::fs::remove_file(part);
        return Err(FetchError::Checksum {
            what: what.to_string(),
            expected,
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

/// Downloads `url` to `dest`, resuming a previous partial download, and verifies it.
pub fn download(url: &str, dest: &Path, check: Check<'_>) -> Result<(), FetchError> {
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
            416 if have > 0 => return land(&part, dest, check, url),
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
            Ok(()) if complete => return land(&part, dest, check, url),
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
pub fn copy(src: &Path, dest: &Path, check: Check<'_>) -> Result<(), FetchError> {
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let part = part_path(dest);
    std::fs::copy(src, &part).map_err(io(src))?;
    land(&part, dest, check, &src.display().to_string())
}

/// Where `fetch` looks, in order.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// A local mirror folder.
    pub mirror: Option<PathBuf>,
    /// An HTTP mirror of the same layout (base URL).
    pub url: Option<String>,
    /// A base URL that replaces the scheme and host of the upstream URLs (a caching proxy that
    /// keeps their paths).
    pub upstream_base: Option<String>,
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

/// Puts one file of an asset at `root/rel`, verified: already there, else from the local mirror,
/// else from the HTTP mirror, else from `upstream_url` when given.
pub fn fetch_file(
    root: &Path,
    rel: &str,
    check: Check<'_>,
    sources: &Sources,
    upstream_url: Option<&str>,
) -> Result<Done, FetchError> {
    let dest = root.join(rel);
    if dest.is_file() && verify(&dest, check)?.is_ok() {
        return Ok(Done::Present);
    }
    if let Some(m) = &sources.mirror {
        let src = m.join(rel);
        if src.is_file() {
            copy(&src, &dest, check)?;
            return Ok(Done::Copied);
        }
    }
    let url = sources
        .url
        .as_ref()
        .map(|base| format!("{}/{}", base.trim_end_matches('/'), rel))
        .or(upstream_url.map(str::to_string));
    if let Some(url) = url {
        download(&url, &dest, check)?;
        return Ok(Done::Downloaded);
    }
    Err(FetchError::Unavailable(format!(
        "{rel}: not in {} and no source to get it from",
        root.display()
    )))
}

/// The mirror's files of an asset (pinned by SHA-256), from the project, the local mirror or the
/// HTTP mirror.
fn fetch_files(
    files: &AssetFiles,
    root: &Path,
    sources: &Sources,
) -> Result<[usize; 3], FetchError> {
    let mut counts = [0usize; 3];
    let mut tally = |d: Done| match d {
        Done::Present => counts[0] += 1,
        Done::Copied => counts[1] += 1,
        Done::Downloaded => counts[2] += 1,
    };
    match files {
        AssetFiles::One { path, sha256 } => {
            tally(fetch_file(
                root,
                path,
                Check::Sha256(sha256),
                sources,
                None,
            )?);
        }
        AssetFiles::Listed {
            sums,
            sums_sha256,
            dir,
        } => {
            tally(fetch_file(
                root,
                sums,
                Check::Sha256(sums_sha256),
                sources,
                None,
            )?);
            let list = std::fs::read_to_string(root.join(sums)).map_err(io(&root.join(sums)))?;
            let entries: Vec<(String, String)> = list
                .lines()
                .filter_map(|l| l.split_once("  "))
                .map(|(h, p)| (h.to_string(), p.trim_start_matches("./").to_string()))
                .collect();
            let dir = dir.trim_end_matches('/');
            for (hash, rel) in entries {
                tally(fetch_file(
                    root,
                    &format!("{dir}/{rel}"),
                    Check::Sha256(&hash),
                    sources,
                    None,
                )?);
            }
        }
    }
    Ok(counts)
}

/// The upstream URL, with its scheme and host replaced by `base` when given.
fn upstream_url(up: &Upstream, base: Option<&str>) -> String {
    match base {
        None => up.url.to_string(),
        Some(base) => {
            let path = up
                .url
                .split_once("://")
                .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
                .unwrap_or("/");
            format!("{}{path}", base.trim_end_matches('/'))
        }
    }
}

/// Fetches `asset` into `root` (the project folder: files land in `weights/` and `data/`): its
/// mirror files when a mirror has them, else its upstream original (and what is built from
/// it). Returns how many files were present, copied and downloaded.
pub fn fetch(asset: &Asset, root: &Path, sources: &Sources) -> Result<[usize; 3], FetchError> {
    let offline = |e: FetchError| match e {
        FetchError::Unavailable(_) => FetchError::Unavailable(Locations::offline_help(asset)),
        FetchError::Download { .. } => {
            FetchError::Unavailable(format!("{e}\n{}", Locations::offline_help(asset)))
        }
        other => other,
    };
    if let Some(files) = &asset.files {
        match fetch_files(files, root, sources) {
            Err(FetchError::Unavailable(_)) => {}
            // An HTTP mirror without this asset: the original may still be reachable.
            Err(FetchError::Download { .. }) if sources.url.is_some() => {}
            other => return other.map_err(offline),
        }
    }
    let up = &asset.upstream;
    if let Build::DogsVsCatsSplit { dir } = up.then
        && built_marker(&root.join(dir)).is_file()
    {
        return Ok([1, 0, 0]);
    }
    let url = upstream_url(up, sources.upstream_base.as_deref());
    let done = fetch_file(root, up.path, up.check, sources, Some(&url)).map_err(offline)?;
    if let Build::DogsVsCatsSplit { dir } = up.then {
        let report = build_dogs_vs_cats(&root.join(up.path), &root.join(dir))?;
        tracing::info!(
            dir,
            skipped = report.skipped.len(),
            "Built the book's split from the archive."
        );
    }
    Ok(match done {
        Done::Present => [1, 0, 0],
        Done::Copied => [0, 1, 0],
        Done::Downloaded => [0, 0, 1],
    })
}

/// The file that records what a split folder was built from (`<dir>.BUILT`).
pub fn built_marker(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!("{name}.BUILT"))
}

/// What building the split did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitReport {
    /// Archive entries left out because they do not decode (Microsoft's archive has empty and
    /// broken files).
    pub skipped: Vec<String>,
    /// Images written per class.
    pub per_class: usize,
}

/// Builds the book's split from Microsoft's Dogs-vs-Cats archive (`PetImages/Cat/<n>.jpg`,
/// `PetImages/Dog/<n>.jpg`), the book's way: per class, the images in numeric order, the first
/// 1000 to `train/`, the next 500 to `validation/`, the next 500 to `test/`, as
/// `<class>s/<class>.<n>.jpg`. Images that do not decode are skipped (and reported). The split is
/// written to `.<dir>.part` and renamed into place; an existing `dir` is never touched.
pub fn build_dogs_vs_cats(archive: &Path, dir: &Path) -> Result<SplitReport, FetchError> {
    let zip_err = |e: zip::result::ZipError| FetchError::Io {
        path: archive.to_path_buf(),
        message: format!("not a readable zip archive: {e}"),
    };
    if dir.exists() {
        return Err(FetchError::Io {
            path: dir.to_path_buf(),
            message: "exists but is not a verified or built split (no matching SHA256SUMS, no \
                      .BUILT record); move it away to build the split from the archive"
                .into(),
        });
    }
    let file = std::fs::File::open(archive).map_err(io(archive))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(zip_err)?;
    // (number, entry index) per class.
    let mut entries: [Vec<(u64, usize)>; 2] = [Vec::new(), Vec::new()];
    for i in 0..zip.len() {
        let name = zip
            .by_index_raw(i)
            .map_err(zip_err)?
            .name()
            .map_err(zip_err)?
            .replace('\\', "/");
        let Some(rest) = name.strip_prefix("PetImages/") else {
            continue;
        };
        let Some((class, file)) = rest.split_once('/') else {
            continue;
        };
        let Some(n) = file
            .strip_suffix(".jpg")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        match class {
            "Cat" => entries[0].push((n, i)),
            "Dog" => entries[1].push((n, i)),
            _ => {}
        }
    }
    let part = part_path(dir);
    if part.exists() {
        std::fs::remove_dir_all(&part).map_err(io(&part))?;
    }
    let mut report = SplitReport {
        per_class: 2000,
        ..SplitReport::default()
    };
    for (class, list) in entries.iter_mut().enumerate() {
        let (folder, prefix) = [("cats", "cat"), ("dogs", "dog")][class];
        list.sort_unstable();
        let mut taken = 0usize;
        for &(n, i) in list.iter() {
            if taken == report.per_class {
                break;
            }
            let mut entry = zip.by_index(i).map_err(zip_err)?;
            let name = entry.name().map_err(zip_err)?.to_string();
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            // Reading to the end checks the entry's CRC-32.
            entry.read_to_end(&mut bytes).map_err(|e| FetchError::Io {
                path: archive.to_path_buf(),
                message: format!("{name}: {e}"),
            })?;
            if image::load_from_memory(&bytes).is_err() {
                tracing::warn!(entry = %name, "Skipped: the image does not decode.");
                report.skipped.push(name);
                continue;
            }
            let split = match taken {
                0..1000 => "train",
                1000..1500 => "validation",
                _ => "test",
            };
            let out = part.join(split).join(folder);
            std::fs::create_dir_all(&out).map_err(io(&out))?;
            let path = out.join(format!("{prefix}.{n}.jpg"));
            std::fs::write(&path, &bytes).map_err(io(&path))?;
            taken += 1;
        }
        if taken < report.per_class {
            let _ = std::fs::remove_dir_all(&part);
            return Err(FetchError::Io {
                path: archive.to_path_buf(),
                message: format!(
                    "only {taken} readable PetImages/{}/ images, the split needs {}",
                    ["Cat", "Dog"][class],
                    report.per_class
                ),
            });
        }
    }
    std::fs::rename(&part, dir).map_err(io(dir))?;
    let (sha, _) = digests(archive)?;
    let marker = built_marker(dir);
    let text = format!(
        "built from {} (sha256 {sha}), the book's way: per class, images in numeric order, 1000 train / 500 validation / 500 test\nskipped (do not decode): {}\n",
        archive.display(),
        if report.skipped.is_empty() {
            "none".to_string()
        } else {
            report.skipped.join(", ")
        }
    );
    let tmp = part_path(&marker);
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &marker).map_err(io(&marker))?;
    Ok(report)
}
