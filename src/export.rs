//! `runner export RUN_ID --format onnx`: the trained model as one ONNX file (preprocessing,
//! base, head and probabilities in the graph; classes, input and preprocessing in its metadata),
//! checked against runner's own predictions by tract, an ONNX runtime that shares no code with
//! burn.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use tract_onnx::prelude::*;

use crate::data::folder;
use crate::model::{OnnxSignature, TransferModel};
use crate::predict::{ModelCard, Which};

/// `runner export --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// ONNX (opset 13), for ONNX Runtime, tract, OpenVINO, TensorRT...
    Onnx,
    /// safetensors: every weight, the frozen base included, under the ImageNet file's names
    /// (another experiment's `backbone.weights`, or any safetensors reader).
    Safetensors,
}

/// Largest probability difference the check accepts.
pub const TOLERANCE: f32 = 1e-4;

/// How the exported file compares with runner on the checked images.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    /// Images run through both.
    pub images: usize,
    /// Images whose predicted class is the same.
    pub same_label: usize,
    /// Largest absolute difference of a class probability.
    pub max_difference: f32,
    /// The image where it is largest.
    pub worst: Option<PathBuf>,
    /// The file's output did not have one row per image and one column per class.
    pub shape_error: Option<String>,
}

impl Agreement {
    /// Every label the same, every probability within [`TOLERANCE`], every row there.
    pub fn passed(&self) -> bool {
        self.shape_error.is_none()
            && self.same_label == self.images
            && self.max_difference <= TOLERANCE
    }
}

/// `out` with `.onnx` replaced by `.<tag>.onnx` (`model.unchecked.onnx`).
pub fn sibling(out: &Path, tag: &str) -> PathBuf {
    out.with_extension(format!("{tag}.onnx"))
}

/// The images the check runs on: `images` (files or folders), else the run's validation split;
/// at most `limit` of them.
pub fn images_to_check(
    card: &ModelCard,
    locations: &crate::assets::Locations,
    images: &[PathBuf],
    limit: Option<usize>,
) -> anyhow::Result<Vec<PathBuf>> {
    if limit == Some(0) {
        anyhow::bail!("--limit 0: the exported model must be checked on at least one image");
    }
    let mut files = if images.is_empty() {
        validation_images(card, locations).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the run's validation images ({}/validation) are not there to check the exported model on; name images with --images",
                card.run_id,
                card.spec.data.dir
            )
        })?
    } else {
        crate::predict::collect_images(images)?
    };
    if let Some(n) = limit {
        files.truncate(n);
    }
    Ok(files)
}

/// What goes wrong in an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The file could not be written.
    #[error(transparent)]
    Write(#[from] crate::io::WriteError),
    /// tract could not load or run the file.
    #[error("{path}: the ONNX runtime (tract) cannot run the exported file: {message}")]
    Runtime {
        /// The exported file.
        path: PathBuf,
        /// tract's error.
        message: String,
    },
}

/// The metadata stored in the file: what a user of the file needs to feed it and read it.
pub fn metadata(card: &ModelCard, which: Which, sig: &OnnxSignature) -> Vec<(String, String)> {
    let [h, w] = sig.image_size;
    let spec = &card.spec;
    let resize = format!("{:?}", spec.data.interpolation).to_lowercase();
    vec![
        ("runner.run_id".into(), card.run_id.clone()),
        ("runner.weights".into(), which.as_str().into()),
        (
            "runner.classes".into(),
            serde_json::to_string(&card.classes).unwrap_or_default(),
        ),
        (
            "runner.input".into(),
            format!(
                "pixels: float32 [batch, {h}, {w}, 3], RGB values 0-255 of each image resized to {h}x{w} ({resize}, aspect ratio not kept), as runner decodes it"
            ),
        ),
        (
            "runner.preprocess".into(),
            format!(
                "{} (in the graph: do not apply it again)",
                sig.preprocess.as_str()
            ),
        ),
        (
            "runner.output".into(),
            format!(
                "probabilities: float32 [batch, {}], one per class in runner.classes' order (already softmax/sigmoid: do not apply it again)",
                card.classes.len().max(2)
            ),
        ),
        (
            "runner.test_time_augmentation".into(),
            if sig.flip {
                "horizontal_flip (in the graph: each image's probabilities averaged with its mirror's)"
            } else {
                "none"
            }
            .into(),
        ),
        ("runner.backbone".into(), spec.backbone.name.clone()),
        ("runner.experiment".into(), spec.experiment.name.clone()),
    ]
}

/// The signature of a run's model as its card describes it.
pub fn signature(card: &ModelCard) -> OnnxSignature {
    OnnxSignature {
        image_size: card.spec.data.image_size,
        preprocess: card.preprocess,
        loss: card.spec.train.loss,
        flip: card.spec.train.test_time_augmentation
            == crate::spec::TestTimeAugmentation::HorizontalFlip,
        classes: card.classes.len(),
    }
}

/// Writes `model` as ONNX to `out`; returns the number of nodes and bytes.
pub fn write(
    model: &TransferModel,
    card: &ModelCard,
    which: Which,
    out: &Path,
) -> Result<(usize, usize), ExportError> {
    let sig = signature(card);
    let doc = format!(
        "runner run {} ({} weights): {} on {}, classes {}",
        card.run_id,
        which.as_str(),
        card.spec.experiment.name,
        card.spec.backbone.name,
        card.classes.join(", ")
    );
    let proto = model
        .to_onnx(sig)
        .finish(&doc, &metadata(card, which, &sig));
    let bytes = proto.bytes();
    crate::io::write_atomic(out, |f| std::io::Write::write_all(f, &bytes))?;
    Ok((proto.nodes(), bytes.len()))
}

/// Runs the file at `path` with tract on `files` (decoded and resized as runner does) and
/// compares with runner's probabilities `expected` (one row per file); unreadable images are
/// left out of both.
pub fn check(
    path: &Path,
    card: &ModelCard,
    files: &[PathBuf],
    expected: &[Vec<f32>],
) -> Result<Agreement, ExportError> {
    let runtime = |e: anyhow::Error| ExportError::Runtime {
        path: path.to_path_buf(),
        message: format!("{e:#}"),
    };
    let model = tract_onnx::onnx()
        .model_for_path(path)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(runtime)?;
    let [h, w] = card.spec.data.image_size;
    let mut agreement = Agreement {
        images: 0,
        same_label: 0,
        max_difference: 0.0,
        worst: None,
        shape_error: None,
    };
    let pairs: Vec<(&PathBuf, &Vec<f32>)> = files.iter().zip(expected).collect();
    for chunk in pairs.chunks(16) {
        let mut pixels = Vec::with_capacity(chunk.len() * h * w * 3);
        let mut kept = Vec::new();
        for (p, want) in chunk {
            if let Ok(d) = folder::decode(p, [h, w], card.spec.data.interpolation) {
                pixels.extend(d.pixels.iter().map(|&v| f32::from(v)));
                kept.push((*p, *want));
            }
        }
        if kept.is_empty() {
            continue;
        }
        let input = tract_onnx::prelude::Tensor::from_shape(&[kept.len(), h, w, 3], &pixels)
            .map_err(runtime)?;
        let out = model.run(tvec!(input.into())).map_err(runtime)?;
        let probs = out[0].to_plain_array_view::<f32>().map_err(runtime)?;
        let want_shape = [kept.len(), kept[0].1.len()];
        if probs.shape() != want_shape {
            agreement.shape_error = Some(format!(
                "its output is {:?} for {} images, not {want_shape:?}",
                probs.shape(),
                kept.len()
            ));
            agreement.images += kept.len();
            continue;
        }
        let flat: Vec<f32> = probs.iter().copied().collect();
        for ((p, want), got) in kept.iter().zip(flat.chunks(want_shape[1])) {
            agreement.images += 1;
            // A tie within the tolerance may break either way.
            let (g, w) = (argmax(got), argmax(want));
            if g == w || (got[g] - got[w]).abs() <= TOLERANCE {
                agreement.same_label += 1;
            }
            for (a, b) in got.iter().zip(want.iter()) {
                let d = (a - b).abs();
                if d > agreement.max_difference || d.is_nan() {
                    agreement.max_difference = if d.is_nan() { f32::INFINITY } else { d };
                    agreement.worst = Some((*p).clone());
                }
            }
        }
    }
    Ok(agreement)
}

fn argmax(v: &[f32]) -> usize {
    crate::metrics::predicted_class(v)
}

/// The validation images of the run's data folder (or `None` when it is not there).
pub fn validation_images(
    card: &ModelCard,
    locations: &crate::assets::Locations,
) -> Option<Vec<PathBuf>> {
    let dir = locations
        .path(&card.spec.data.dir, "data folder", true)
        .ok()?
        .join("validation");
    crate::predict::collect_images(&[dir])
        .ok()
        .filter(|f| !f.is_empty())
}

/// The images read (in order), runner's probabilities for them, and the unreadable ones with
/// why.
pub type Predicted = (Vec<PathBuf>, Vec<Vec<f32>>, Vec<(PathBuf, String)>);

/// Runner's probabilities for `files` (the unreadable ones get none).
pub fn runner_probabilities(
    card: &ModelCard,
    model: &TransferModel,
    files: &[PathBuf],
    device: &Device,
) -> Predicted {
    let (mut paths, mut probs, mut unreadable) = (Vec::new(), Vec::new(), Vec::new());
    for (p, r) in crate::predict::predict(card, model, files, device) {
        match r {
            Ok(v) => {
                paths.push(p);
                probs.push(v);
            }
            Err(e) => unreadable.push((p, e.to_string())),
        }
    }
    (paths, probs, unreadable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_rows_or_a_far_probability_fail_the_check() {
        let good = Agreement {
            images: 4,
            same_label: 4,
            max_difference: 1e-6,
            worst: None,
            shape_error: None,
        };
        assert!(good.passed());
        let rows = Agreement {
            shape_error: Some("its output is [2, 2] for 4 images".into()),
            ..good.clone()
        };
        assert!(!rows.passed());
        let far = Agreement {
            max_difference: 2e-4,
            ..good.clone()
        };
        assert!(!far.passed());
        let label = Agreement {
            same_label: 3,
            ..good
        };
        assert!(!label.passed());
        assert_eq!(
            sibling(Path::new("r/model.onnx"), "unchecked"),
            Path::new("r/model.unchecked.onnx")
        );
    }
}
