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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grayscale_and_rgba_images_become_rgb() {
        let dir = tempfile::tempdir().unwrap();
        let gray = dir.path().join("gray.png");
        image::GrayImage::from_pixel(4, 4, image::Luma([77]))
            .save(&gray)
            .unwrap();
        let rgba = dir.path().join("rgba.png");
        image::RgbaImage::from_pixel(4, 4, image::Rgba([1, 2, 3, 0]))
            .save(&rgba)
            .unwrap();
        assert_eq!(
            decode(&gray, [2, 2], Interpolation::Bilinear).unwrap(),
            vec![77; 12]
        );
        assert_eq!(
            decode(&rgba, [4, 4], Interpolation::Nearest).unwrap(),
            [1, 2, 3].repeat(16)
        );
    }

    #[test]
    fn classes_come_from_sorted_folder_names_and_non_images_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        for class in ["zebra", "ant"] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            image::RgbImage::new(2, 2)
                .save(dir.path().join(class).join("a.png"))
                .unwrap();
        }
        std::fs::write(dir.path().join("ant/notes.txt"), "x").unwrap();
        let l = scan_split("train", dir.path()).unwrap();
        assert_eq!(l.classes, vec!["ant", "zebra"]);
        assert_eq!(
            l.files.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(l.ignored, vec![dir.path().join("ant/notes.txt")]);
    }

    #[test]
    fn truncated_and_empty_files_are_each_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        let good = dir.path().join("a/good.png");
        image::RgbImage::new(8, 8).save(&good).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        std::fs::write(dir.path().join("a/cut.png"), &bytes[..bytes.len() / 2]).unwrap();
        std::fs::write(dir.path().join("a/zero.jpg"), b"").unwrap();
        let l = scan_split("train", dir.path()).unwrap();
        let Err(DataError::BadImages(bad)) = load_split(&l, [8, 8], Interpolation::Bilinear) else {
            panic!("expected bad images");
        };
        let names: Vec<String> = bad
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into())
            .collect();
        assert_eq!(names, vec!["cut.png", "zero.jpg"]);
        assert!(bad[1].1.contains("empty file"), "{bad:?}");
    }
}
