//! `runner augment-preview`: a grid of augmented versions of a few training images, so that a
//! person can see what the `[augment]` settings do.

use std::path::Path;

use super::augment;
use super::folder::{self, Images};
use crate::spec::Spec;

/// Errors making a preview.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// The spec has no `[augment]` section.
    #[error("{0}: the spec declares no [augment] section, so there is nothing to preview")]
    NoAugment(String),
    /// A chosen image could not be read.
    #[error("{path}: {message}")]
    Image {
        /// The image.
        path: String,
        /// Why.
        message: String,
    },
}

/// The grid: one row per image (spread over the classes of `train/`), the original first, then
/// `variants` augmented versions (epochs 1..=variants), 4-pixel white gaps. `spec` is the
/// resolved spec of the experiment `file`; `train` the images of its `train/` split with their
/// labels.
pub fn grid(
    spec: &Spec,
    file: &Path,
    train: &[(std::path::PathBuf, usize)],
    rows: usize,
    variants: usize,
) -> Result<image::RgbImage, PreviewError> {
    let aug = spec
        .augment
        .as_ref()
        .ok_or_else(|| PreviewError::NoAugment(file.display().to_string()))?;
    let n = train.len();
    let picks: Vec<usize> = (0..rows.min(n))
        .map(|r| r * n / rows.min(n).max(1))
        .collect();
    let [h, w] = spec.data.image_size;
    let mut images = Images {
        split: "train".into(),
        height: h,
        width: w,
        pixels: Vec::new(),
        labels: Vec::new(),
        paths: Vec::new(),
        digests: Vec::new(),
        on_demand: None,
        mirrored: false,
    };
    for &i in &picks {
        let (path, label) = &train[i];
        let d = folder::decode(path, [h, w], spec.data.interpolation).map_err(|e| {
            PreviewError::Image {
                path: path.display().to_string(),
                message: e.to_string(),
            }
        })?;
        images.pixels.extend_from_slice(&d.pixels);
        images.labels.push(*label);
        images.paths.push(path.clone());
        images.digests.push(d.digest);
    }
    let gap = 4;
    let cols = variants + 1;
    let mut out = image::RgbImage::from_pixel(
        (cols * (w + gap) - gap) as u32,
        (picks.len() * (h + gap)).saturating_sub(gap) as u32,
        image::Rgb([255, 255, 255]),
    );
    // Column v shows the transform training draws for that image in epoch v.
    let mut columns = vec![images.pixels.clone()];
    for v in 1..=variants {
        let mut col = vec![0u8; images.pixels.len()];
        for (k, &i) in picks.iter().enumerate() {
            let t = augment::draw(aug, [h, w], spec.experiment.seed, v, i);
            let n = h * w * 3;
            augment::apply(
                &t,
                images.image(k),
                [h, w],
                aug.fill,
                aug.fill_value,
                &mut col[k * n..(k + 1) * n],
            );
        }
        columns.push(col);
    }
    for (c, col) in columns.iter().enumerate() {
        for (r, img) in col.chunks_exact(h * w * 3).enumerate() {
            let (x0, y0) = (c * (w + gap), r * (h + gap));
            for (p, px) in img.chunks_exact(3).enumerate() {
                out.put_pixel(
                    (x0 + p % w) as u32,
                    (y0 + p / w) as u32,
                    image::Rgb([px[0], px[1], px[2]]),
                );
            }
        }
    }
    Ok(out)
}

/// Writes the grid as PNG, atomically.
pub fn write(img: &image::RgbImage, out: &Path) -> Result<(), crate::io::WriteError> {
    crate::io::write_atomic(out, |f| {
        let mut buf = std::io::BufWriter::new(f);
        img.write_to(&mut buf, image::ImageFormat::Png)
            .map_err(|e| e.to_string())?;
        std::io::Write::flush(&mut buf).map_err(|e| e.to_string())
    })
}
