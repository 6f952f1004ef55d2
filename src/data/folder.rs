//! Directory datasets: one folder per split, one subfolder per class (labels from the sorted
//! folder names). Images are decoded once, converted to RGB, resized and kept in memory as u8.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::spec::Interpolation;

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Errors from reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A folder could not be listed.
    // The cause is in the message (not a `source`, which `{:#}` would print a second time).
    #[error("{path}: cannot list folder: {error}")]
    List {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// Images that could not be decoded; every one is listed.
    #[error("{} image{} cannot be decoded:\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|(p, e)| format!("  {}: {e}\n", p.display())).collect::<String>())]
    BadImages(Vec<(PathBuf, String)>),
    /// The feature cache file a run reads a split's activations from failed to read (it was
    /// truncated or damaged in place after the run checked it).
    #[error("{}: cannot read the cached activations: {error}; run again to rebuild them", path.display())]
    FeatureCache {
        /// The cache file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A class folder whose name is not UTF-8 (class names go into results and saved models).
    #[error("{}: the class folder's name is not valid UTF-8; rename it", .0.display())]
    ClassName(PathBuf),
}

/// The most pixels an image may have (64 megapixels, e.g. 8000x8000): its header is read first,
/// so a file that claims more is refused before anything is allocated for it.
pub const MAX_IMAGE_PIXELS: u64 = 64 * 1000 * 1000;

/// The largest image file read (256 MiB).
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

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
    let rd = std::fs::read_dir(dir).map_err(|error| DataError::List {
        path: dir.to_path_buf(),
        error,
    })?;
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
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
        let Some(name) = class_dir.file_name().and_then(|n| n.to_str()) else {
            return Err(DataError::ClassName(class_dir));
        };
        classes.push(name.to_string());
        // Every entry that is not a folder: a dangling symbolic link or a link loop is kept as a
        // file, so that decoding reports it (named, under `on_bad_image`) instead of it
        // vanishing.
        for f in sorted_entries(&class_dir)?
            .into_iter()
            .filter(|p| !p.is_dir())
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
    /// SHA-256 of each image file's bytes (the feature cache's content key).
    pub digests: Vec<[u8; 32]>,
    /// `None`: `pixels` holds every image. `Some(filter)`: `pixels` is empty and each batch is
    /// decoded again from `paths` when it is needed (a split that is only read once per phase,
    /// through the feature extraction, so memory does not grow with the split).
    pub on_demand: Option<Interpolation>,
    /// Every image is seen mirrored left to right (test-time augmentation's second view).
    pub mirrored: bool,
}

impl Images {
    /// The same images seen mirrored left to right (for `train.test_time_augmentation`); their
    /// activations are cached apart from the originals'.
    pub fn mirrored(&self) -> Self {
        Self {
            split: format!("{} (mirrored)", self.split),
            mirrored: true,
            ..self.clone()
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Self {
        Self {
            split: self.split.clone(),
            height: self.height,
            width: self.width,
            pixels: match self.on_demand {
                None => indices
                    .iter()
                    .flat_map(|&i| self.image(i))
                    .copied()
                    .collect(),
                Some(_) => Vec::new(),
            },
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            paths: indices.iter().map(|&i| self.paths[i].clone()).collect(),
            digests: indices.iter().map(|&i| self.digests[i]).collect(),
            on_demand: self.on_demand,
            mirrored: self.mirrored,
        }
    }

    /// The pixels of image `i` of a split held in memory.
    ///
    /// # Panics
    ///
    /// When the split is decoded on demand (use `pixels_of`).
    pub fn image(&self, i: usize) -> &[u8] {
        assert!(
            self.on_demand.is_none(),
            "{} split is decoded on demand",
            self.split
        );
        let n = self.height * self.width * 3;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// The pixels of the images at `indices`, back to back: from memory, or decoded now (in
    /// parallel). A file that no longer decodes, or whose bytes changed since the split was
    /// first read, is an error naming it.
    pub fn pixels_of(&self, indices: &[usize]) -> Result<Vec<u8>, DataError> {
        let Some(interp) = self.on_demand else {
            return Ok(indices
                .iter()
                .flat_map(|&i| self.image(i))
                .copied()
                .collect());
        };
        let size = [self.height, self.width];
        let decoded: Vec<Result<Vec<u8>, (PathBuf, String)>> = indices
            .par_iter()
            .map(|&i| {
                let path = &self.paths[i];
                match decode(path, size, interp) {
                    Ok(d) if d.digest == self.digests[i] => Ok(d.pixels),
                    Ok(_) => Err((
                        path.clone(),
                        "the file changed while runner was using it".into(),
                    )),
                    Err(e) => Err((
                        path.clone(),
                        format!("{e} (it was readable when the run started)"),
                    )),
                }
            })
            .collect();
        let mut out = Vec::with_capacity(indices.len() * self.height * self.width * 3);
        let mut bad = Vec::new();
        for r in decoded {
            match r {
                Ok(p) => out.extend_from_slice(&p),
                Err(e) => bad.push(e),
            }
        }
        if bad.is_empty() {
            Ok(out)
        } else {
            Err(DataError::BadImages(bad))
        }
    }
}

/// Resizes RGB u8 pixels. Bilinear (the default) runs on `fast_image_resize`'s SIMD kernels, an
/// antialiased convolution whose support widens when shrinking as PIL's and `image`'s do (within
/// 2 levels of `image`'s, 2.5x faster end to end on the 4000 images: `runner bench-workload
/// decode_resize`). Nearest and bicubic stay with `image`: its bicubic rounds to 8 bits between the
/// horizontal and vertical passes as PIL does, which a SIMD bicubic does not (up to 23 levels apart
/// on noise).
fn resize(
    rgb: image::RgbImage,
    [h, w]: [usize; 2],
    interp: Interpolation,
) -> Result<Vec<u8>, ResizeError> {
    use fast_image_resize::{
        FilterType as F, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image,
    };
    let filter = match interp {
        Interpolation::Nearest => FilterType::Nearest,
        Interpolation::Bicubic => FilterType::CatmullRom,
        Interpolation::Bilinear => {
            let (sw, sh) = rgb.dimensions();
            let src = Image::from_vec_u8(sw, sh, rgb.into_raw(), PixelType::U8x3)
                .map_err(ResizeError::Buffer)?;
            let mut dst = Image::new(w as u32, h as u32, PixelType::U8x3);
            let alg = ResizeAlg::Convolution(F::Bilinear);
            Resizer::new()
                .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(alg))
                .map_err(ResizeError::Resize)?;
            return Ok(dst.into_vec());
        }
    };
    Ok(image::imageops::resize(&rgb, w as u32, h as u32, filter).into_raw())
}

/// Number of components declared in a JPEG's frame header (3 for YCbCr, 4 for CMYK/YCCK).
fn jpeg_components(bytes: &[u8]) -> Option<u8> {
    let mut i = 2;
    while i + 9 < bytes.len() {
        if bytes[i] != 0xFF {
            i += 1;
            continue;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        if marker == 0x01 || (0xD0..=0xD8).contains(&marker) {
            i += 2;
            continue;
        }
        if (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker) {
            return Some(bytes[i + 9]);
        }
        i += 2 + usize::from(bytes[i + 2]) * 256 + usize::from(bytes[i + 3]);
    }
    None
}

/// One decoded image and, when it was not plain 8-bit RGB, what it was converted from.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// RGB u8, `[height, width, 3]`.
    pub pixels: Vec<u8>,
    /// e.g. `converted from grayscale to RGB`.
    pub converted: Option<String>,
    /// SHA-256 of the file's bytes.
    pub digest: [u8; 32],
}

/// Why an image file cannot be used; the text is what runner reports beside the file's name.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A symbolic link to nothing.
    #[error("a symbolic link that leads nowhere (dangling, or a loop): {0}")]
    Dangling(std::io::Error),
    /// The file could not be read.
    #[error("{0}")]
    Io(std::io::Error),
    /// A folder, a device, a pipe.
    #[error("not a regular file")]
    NotAFile,
    /// Larger than [`MAX_IMAGE_FILE_BYTES`].
    #[error(
        "a file of {mib} MiB, more than the {max} MiB an image file may have",
        mib = .0 >> 20,
        max = MAX_IMAGE_FILE_BYTES >> 20
    )]
    FileTooLarge(u64),
    /// Zero bytes.
    #[error("empty file (0 bytes)")]
    Empty,
    /// A JPEG without its end-of-image marker.
    #[error("truncated JPEG (no end-of-image marker)")]
    TruncatedJpeg,
    /// The decoder refused it.
    #[error("not a readable image: {0}")]
    Unreadable(image::ImageError),
    /// More pixels than [`MAX_IMAGE_PIXELS`], by its header.
    #[error(
        "its header says {0}x{1} pixels ({mp:.0} megapixels), more than the {max} megapixels an image may have; resize it",
        mp = megapixels(.0, .1),
        max = MAX_IMAGE_PIXELS / 1_000_000
    )]
    TooManyPixels(u32, u32),
    /// Resizing failed.
    #[error("{0}")]
    Resize(ResizeError),
}

/// Why pixels could not be resized (`fast_image_resize`'s errors).
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// The pixels do not fit their declared size.
    #[error("{0}")]
    Buffer(fast_image_resize::ImageBufferError),
    /// The resizer refused.
    #[error("cannot resize: {0}")]
    Resize(fast_image_resize::ResizeError),
}

fn megapixels(w: &u32, h: &u32) -> f64 {
    f64::from(*w) * f64::from(*h) / 1e6
}

/// Decodes one file to RGB and resizes it to `[height, width]`.
pub fn decode(
    path: &Path,
    [h, w]: [usize; 2],
    interp: Interpolation,
) -> Result<Decoded, DecodeError> {
    use image::{ExtendedColorType as C, ImageDecoder};
    let meta = std::fs::metadata(path).map_err(|e| {
        if std::fs::symlink_metadata(path).is_ok() {
            DecodeError::Dangling(e)
        } else {
            DecodeError::Io(e)
        }
    })?;
    if !meta.is_file() {
        return Err(DecodeError::NotAFile);
    }
    if meta.len() > MAX_IMAGE_FILE_BYTES {
        return Err(DecodeError::FileTooLarge(meta.len()));
    }
    let bytes = std::fs::read(path).map_err(DecodeError::Io)?;
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(DecodeError::Io)?;
    // A decoder allocates what the header claims: bound it (the header check below says why in
    // plain words; this catches what a decoder allocates besides the pixels).
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(8 * MAX_IMAGE_PIXELS + (64 << 20));
    reader.limits(limits);
    let is_jpeg = reader.format() == Some(image::ImageFormat::Jpeg);
    if is_jpeg
        && !bytes[bytes.len().saturating_sub(1024)..]
            .windows(2)
            .any(|w| w == [0xFF, 0xD9])
    {
        return Err(DecodeError::TruncatedJpeg);
    }
    let decoder = reader.into_decoder().map_err(DecodeError::Unreadable)?;
    let (dw, dh) = decoder.dimensions();
    if u64::from(dw) * u64::from(dh) > MAX_IMAGE_PIXELS {
        return Err(DecodeError::TooManyPixels(dw, dh));
    }
    let original = decoder.original_color_type();
    let img = image::DynamicImage::from_decoder(decoder).map_err(DecodeError::Unreadable)?;
    let from = match original {
        _ if is_jpeg && jpeg_components(&bytes) == Some(4) => Some("CMYK"),
        C::L8 | C::L1 | C::L2 | C::L4 => Some("grayscale"),
        C::La8 | C::La16 | C::La1 | C::La2 | C::La4 => Some("grayscale with alpha (alpha dropped)"),
        C::Rgba8 | C::Rgba1 | C::Rgba2 | C::Rgba4 => Some("RGBA (alpha dropped)"),
        C::L16 | C::Rgb16 | C::Rgba16 => Some("16-bit"),
        C::Rgb8 => None,
        _ => Some("an unusual colour type"),
    };
    let rgb = img.into_rgb8();
    let pixels = if rgb.dimensions() == (w as u32, h as u32) {
        rgb.into_raw()
    } else {
        resize(rgb, [h, w], interp).map_err(DecodeError::Resize)?
    };
    Ok(Decoded {
        digest: Sha256::digest(&bytes).into(),
        pixels,
        converted: from.map(|f| format!("converted from {f} to RGB")),
    })
}

/// What decoding a split found besides good images.
#[derive(Debug, Clone, Default)]
pub struct Preflight {
    /// Files that are not readable images, with the reason; left out of the split.
    pub bad: Vec<(PathBuf, String)>,
    /// Images that were readable but not 8-bit RGB, with what they were converted from.
    pub converted: Vec<(PathBuf, String)>,
}

/// Decodes every image of a split in parallel and keeps them in memory. Unreadable files (and
/// files that are not images) are left out and reported in the preflight, with the reason.
pub fn load_split(
    listing: &SplitListing,
    size: [usize; 2],
    interp: Interpolation,
) -> (Images, Preflight) {
    load_split_with(listing, size, interp, true)
}

/// Images decoded in parallel at once by [`load_split_with`].
const DECODE_CHUNK: usize = 512;

/// `load_split`, keeping the pixels (`keep`) or only checking every image and recording its
/// digest, to be decoded again batch by batch (`Images::on_demand`).
pub fn load_split_with(
    listing: &SplitListing,
    size: [usize; 2],
    interp: Interpolation,
    keep: bool,
) -> (Images, Preflight) {
    let mut images = Images {
        split: listing.name.clone(),
        height: size[0],
        width: size[1],
        pixels: Vec::with_capacity(if keep {
            listing.files.len() * size[0] * size[1] * 3
        } else {
            0
        }),
        labels: Vec::with_capacity(listing.files.len()),
        paths: Vec::with_capacity(listing.files.len()),
        digests: Vec::with_capacity(listing.files.len()),
        on_demand: (!keep).then_some(interp),
        mirrored: false,
    };
    let mut report = Preflight::default();
    // Decoded in parallel a chunk at a time, so that a held split costs its pixels plus one
    // chunk at its peak, not twice its pixels.
    let decoded = listing.files.chunks(DECODE_CHUNK).flat_map(|chunk| {
        let part: Vec<Result<Decoded, DecodeError>> = chunk
            .par_iter()
            .map(|(p, _)| {
                decode(p, size, interp).map(|mut d| {
                    if !keep {
                        d.pixels = Vec::new();
                    }
                    d
                })
            })
            .collect();
        part
    });
    for ((path, label), r) in listing.files.iter().zip(decoded) {
        match r {
            Ok(d) => {
                images.pixels.extend_from_slice(&d.pixels);
                images.labels.push(*label);
                images.paths.push(path.clone());
                images.digests.push(d.digest);
                if let Some(note) = d.converted {
                    report.converted.push((path.clone(), note));
                }
            }
            Err(e) => report.bad.push((path.clone(), e.to_string())),
        }
    }
    for p in &listing.ignored {
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        report.bad.push((
            p.clone(),
            format!(
                "not an image file (\".{ext}\"); runner reads {}",
                IMAGE_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
            ),
        ));
    }
    (images, report)
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
        let g = decode(&gray, [2, 2], Interpolation::Bilinear).unwrap();
        assert_eq!(g.pixels, vec![77; 12]);
        assert_eq!(
            g.converted.as_deref(),
            Some("converted from grayscale to RGB")
        );
        let a = decode(&rgba, [4, 4], Interpolation::Nearest).unwrap();
        assert_eq!(a.pixels, [1, 2, 3].repeat(16));
        assert_eq!(
            a.converted.as_deref(),
            Some("converted from RGBA (alpha dropped) to RGB")
        );
        let wide = dir.path().join("wide.png");
        image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(2, 2, image::Rgb([65535u16, 0, 0]))
            .save(&wide)
            .unwrap();
        let d = decode(&wide, [2, 2], Interpolation::Nearest).unwrap();
        assert_eq!(d.pixels, [255, 0, 0].repeat(4));
        assert_eq!(d.converted.as_deref(), Some("converted from 16-bit to RGB"));
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
    fn images_whose_headers_claim_too_many_pixels_are_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        // A JPEG whose frame header claims 65500x65500 (no checksum to fix).
        let small = dir.path().join("small.jpg");
        image::RgbImage::new(8, 8).save(&small).unwrap();
        let mut jpeg = std::fs::read(&small).unwrap();
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]);
        std::fs::write(dir.path().join("a/bomb.jpg"), &jpeg).unwrap();
        // A PNG whose IHDR claims 20000x20000, its CRC recomputed.
        let png_small = dir.path().join("small.png");
        image::RgbImage::new(8, 8).save(&png_small).unwrap();
        let mut png = std::fs::read(&png_small).unwrap();
        png[16..20].copy_from_slice(&20000u32.to_be_bytes());
        png[20..24].copy_from_slice(&20000u32.to_be_bytes());
        let crc = crc32fast::hash(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        std::fs::write(dir.path().join("a/huge.png"), &png).unwrap();
        let l = scan_split("train", dir.path()).unwrap();
        let (images, report) = load_split(&l, [8, 8], Interpolation::Bilinear);
        assert_eq!(images.len(), 0);
        let bad: Vec<String> = report
            .bad
            .iter()
            .map(|(p, e)| format!("{}: {e}", p.file_name().unwrap().to_string_lossy()))
            .collect();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].starts_with("bomb.jpg: its header says 65500x65500 pixels (4290 megapixels), more than the 64 megapixels"), "{bad:?}");
        assert!(
            bad[1].starts_with("huge.png: its header says 20000x20000 pixels (400 megapixels)"),
            "{bad:?}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn broken_links_and_non_utf8_names_are_reported_not_dropped() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir_all(&a).unwrap();
        image::RgbImage::new(8, 8).save(a.join("good.png")).unwrap();
        std::os::unix::fs::symlink(a.join("gone.png"), a.join("dangling.png")).unwrap();
        std::os::unix::fs::symlink(a.join("loop.png"), a.join("loop.png")).unwrap();
        let odd = a.join(std::ffi::OsStr::from_bytes(b"caf\xe9.png"));
        image::RgbImage::new(8, 8)
            .save_with_format(&odd, image::ImageFormat::Png)
            .unwrap();
        let l = scan_split("train", dir.path()).unwrap();
        assert_eq!(l.files.len(), 4, "{:?}", l.files);
        let (images, report) = load_split(&l, [8, 8], Interpolation::Bilinear);
        assert_eq!(
            images.len(),
            2,
            "the good file and the non-UTF-8 one decode"
        );
        let bad: Vec<String> = report
            .bad
            .iter()
            .map(|(p, e)| format!("{}: {e}", p.file_name().unwrap().to_string_lossy()))
            .collect();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad.iter()
                .all(|b| b.contains("a symbolic link that leads nowhere")),
            "{bad:?}"
        );
        // A class folder whose name is not UTF-8 is an error naming it.
        std::fs::create_dir_all(dir.path().join(std::ffi::OsStr::from_bytes(b"b\xff"))).unwrap();
        let e = scan_split("train", dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("the class folder's name is not valid UTF-8"),
            "{e}"
        );
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
        let (images, report) = load_split(&l, [8, 8], Interpolation::Bilinear);
        assert_eq!(images.len(), 1);
        let bad = report.bad;
        let names: Vec<String> = bad
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into())
            .collect();
        assert_eq!(names, vec!["cut.png", "zero.jpg"]);
        assert!(bad[1].1.contains("empty file"), "{bad:?}");
    }
}

#[cfg(test)]
mod resize_tests {
    use super::*;

    #[test]
    fn resizing_agrees_with_images_filters() {
        let img = image::RgbImage::from_fn(97, 61, |x, y| {
            image::Rgb([(x * 3 + y) as u8, (x * y % 251) as u8, ((x ^ y) * 5) as u8])
        });
        for (interp, filter, tol) in [
            (Interpolation::Bilinear, FilterType::Triangle, 2),
            (Interpolation::Bicubic, FilterType::CatmullRom, 0),
            (Interpolation::Nearest, FilterType::Nearest, 0),
        ] {
            for [h, w] in [[20, 30], [150, 150], [61, 40]] {
                let got = resize(img.clone(), [h, w], interp).unwrap();
                let want = image::imageops::resize(&img, w as u32, h as u32, filter).into_raw();
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap();
                assert!(worst <= tol, "{interp:?} to {h}x{w}: differs by {worst}");
            }
        }
    }
}

#[cfg(test)]
mod on_demand_tests {
    use super::*;

    #[test]
    fn a_split_decoded_on_demand_gives_the_same_pixels_and_names_a_file_that_changed() {
        let dir = tempfile::tempdir().unwrap();
        for (class, n) in [("cats", 3u8), ("dogs", 2)] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            for i in 0..n {
                image::RgbImage::from_fn(12, 10, |x, y| {
                    image::Rgb([x as u8 * 20, y as u8 * 25, i * 60])
                })
                .save(dir.path().join(class).join(format!("{i}.png")))
                .unwrap();
            }
        }
        let l = scan_split("validation", dir.path()).unwrap();
        let (held, _) = load_split(&l, [6, 5], Interpolation::Bilinear);
        let (lazy, _) = load_split_with(&l, [6, 5], Interpolation::Bilinear, false);
        assert!(lazy.pixels.is_empty() && held.pixels.len() == 5 * 6 * 5 * 3);
        assert_eq!(
            (lazy.labels.clone(), lazy.digests.clone()),
            (held.labels.clone(), held.digests.clone())
        );
        let idx = [4, 0, 2];
        assert_eq!(lazy.pixels_of(&idx).unwrap(), held.pixels_of(&idx).unwrap());
        assert_eq!(
            lazy.subset(&idx).pixels_of(&[0, 1]).unwrap(),
            held.pixels_of(&[4, 0]).unwrap()
        );

        // Rewritten with other content, then cut short: each is named, with the reason.
        let changed = &lazy.paths[2];
        image::RgbImage::new(12, 10).save(changed).unwrap();
        let e = lazy.pixels_of(&idx).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "{}: the file changed while runner was using it",
                changed.display()
            )),
            "{e}"
        );
        std::fs::write(changed, b"").unwrap();
        let e = lazy.pixels_of(&[2]).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "{}: empty file (0 bytes) (it was readable when the run started)",
                changed.display()
            )),
            "{e}"
        );
    }
}

#[cfg(test)]
mod preflight_tests {
    use super::*;

    #[test]
    fn a_truncated_jpeg_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cut.jpg");
        image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 0]))
            .save(&p)
            .unwrap();
        assert!(decode(&p, [8, 8], Interpolation::Bilinear).is_ok());
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() * 2 / 3]).unwrap();
        assert_eq!(
            decode(&p, [8, 8], Interpolation::Bilinear)
                .unwrap_err()
                .to_string(),
            "truncated JPEG (no end-of-image marker)"
        );
    }

    #[test]
    fn a_cmyk_jpeg_header_is_recognised() {
        // SOI, then a baseline frame header declaring 16x16 with 4 components.
        let header = [
            0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x14, 0x08, 0x00, 0x10, 0x00, 0x10, 0x04, 1, 0x11, 0, 2,
            0x11, 0,
        ];
        assert_eq!(jpeg_components(&header), Some(4));
        let rgb = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0, 0, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x00, 0x10,
            0x00, 0x10, 0x03, 1,
        ];
        assert_eq!(jpeg_components(&rgb), Some(3));
    }

    #[test]
    fn a_text_file_among_images_is_reported_as_not_an_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        image::RgbImage::new(4, 4)
            .save(dir.path().join("a/ok.png"))
            .unwrap();
        std::fs::write(dir.path().join("a/labels.txt"), "cat").unwrap();
        let l = scan_split("train", dir.path()).unwrap();
        let (images, report) = load_split(&l, [4, 4], Interpolation::Bilinear);
        assert_eq!(images.len(), 1);
        assert_eq!(report.bad.len(), 1);
        assert!(
            report.bad[0].1.starts_with("not an image file (\".txt\")"),
            "{:?}",
            report.bad
        );
    }
}
