//! Directory datasets: one folder per split, one subfolder per class (labels from the sorted
//! folder names). Images are decoded once, converted to RGB, resized and kept in memory as u8.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rayon::prelude::*;

use crate::spec::Interpolation;

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Errors from reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A folder could not be listed.
    #[error("{path}: cannot list folder: {source}")]
    List {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Images that could not be decoded; every one is listed.
    #[error("{} image{} cannot be decoded:\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|(p, e)| format!("  {}: {e}\n", p.display())).collect::<String>())]
    BadImages(Vec<(PathBuf, String)>),
}

/// The files of one split, with class labels.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitListing {
    /// `train`, `validation` or `test`.
    pub name: String,
    /// The split's folder.
    pub dir: PathBuf,
    /// Class names, sorted; a label is an index into this.
    pub classes: Vec<String>,
    /// `(path, label)`, sorted by class then file name.
    pub files: Vec<(PathBuf, usize)>,
    /// Files skipped because their extension is not an image's.
    pub ignored: Vec<PathBuf>,
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|source| DataError::List {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.'))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Lists a split folder: class subfolders and their image files.
pub fn scan_split(name: &str, dir: &Path) -> Result<SplitListing, DataError> {
    let mut classes = Vec::new();
    let mut files = Vec::new();
    let mut ignored = Vec::new();
    for class_dir in sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()) {
        let label = classes.len();
        classes.push(
            class_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        for f in sorted_entries(&class_dir)?
            .into_iter()
            .filter(|p| p.is_file())
        {
            if is_image(&f) {
                files.push((f, label));
            } else {
                ignored.push(f);
            }
        }
    }
    Ok(SplitListing {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        classes,
        files,
        ignored,
    })
}

/// Decoded, resized images of one split, RGB u8, row-major `[n, height, width, 3]`.
#[derive(Debug, Clone)]
pub struct Images {
    /// Split name.
    pub split: String,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Pixels, `n * height * width * 3` bytes.
    pub pixels: Vec<u8>,
    /// Label of each image.
    pub labels: Vec<usize>,
    /// Source path of each image.
    pub paths: Vec<PathBuf>,
}

impl Images {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.height * self.width * 3;
        &self.pixels[i * n..(i + 1) * n]
    }
}

fn filter(i: Interpolation) -> FilterType {
    match i {
        Interpolation::Nearest => FilterType::Nearest,
        Interpolation::Bilinear => FilterType::Triangle,
        Interpolation::Bicubic => FilterType::CatmullRom,
    }
}

/// Decodes one file to RGB and resizes it to `[height, width]`.
pub fn decode(path: &Path, [h, w]: [usize; 2], interp: Interpolation) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() == 0 {
        return Err("empty file (0 bytes)".into());
    }
    let img = image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| format!("not a readable image: {e}"))?;
    let rgb = img.to_rgb8();
    let out = if rgb.dimensions() == (w as u32, h as u32) {
        rgb
    } else {
        image::imageops::resize(&rgb, w as u32, h as u32, filter(interp))
    };
    Ok(out.into_raw())
}

/// Decodes every image of a split in parallel; fails with the list of every bad file.
pub fn load_split(
    listing: &SplitListing,
    size: [usize; 2],
    interp: Interpolation,
) -> Result<Images, DataError> {
    let decoded: Vec<Result<Vec<u8>, (PathBuf, String)>> = listing
        .files
        .par_iter()
        .map(|(p, _)| decode(p, size, interp).map_err(|e| (p.clone(), e)))
        .collect();
    let mut pixels = Vec::with_capacity(listing.files.len() * size[0] * size[1] * 3);
    let mut bad = Vec::new();
    for r in decoded {
        match r {
            Ok(px) => pixels.extend_from_slice(&px),
            Err(e) => bad.push(e),
        }
    }
    if !bad.is_empty() {
        return Err(DataError::BadImages(bad));
    }
    Ok(Images {
        split: listing.name.clone(),
        height: size[0],
        width: size[1],
        pixels,
        labels: listing.files.iter().map(|(_, l)| *l).collect(),
        paths: listing.files.iter().map(|(p, _)| p.clone()).collect(),
    })
}
