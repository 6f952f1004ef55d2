//! Pretrained weights: safetensors in Keras naming (`block1_conv1.weight`, OIHW), remapped onto
//! runner's module tree (`convs.0.weight`) with burn-store. The load result is checked: a missing,
//! unexpected or wrong-shaped tensor is an error that names it, never a silent random init.

use std::path::{Path, PathBuf};

use burn::store::{ApplyError, KeyRemapper, ModuleSnapshot, SafetensorsStore};

use super::vgg::Vgg;
use super::{BackboneDef, LayerOp};

/// Errors from loading backbone weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file is not a readable safetensors file.
    #[error("{path}: cannot read weights: {message}")]
    Unreadable {
        /// The weights file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The file does not fit the backbone.
    #[error("{path}: the weights do not fit {backbone}:\n  {}", problems.join("\n  "))]
    Mismatch {
        /// The weights file.
        path: PathBuf,
        /// The backbone.
        backbone: String,
        /// One line per missing, unexpected or wrong-shaped tensor.
        problems: Vec<String>,
    },
}

/// Module path (`convs.3.weight`) to Keras name (`block2_conv2.weight`), and back.
fn name_pairs(def: &BackboneDef) -> Vec<(String, String)> {
    def.layers()
        .iter()
        .filter_map(|l| match l.op {
            LayerOp::Conv { index, .. } => Some((index, l.name.clone())),
            _ => None,
        })
        .flat_map(|(i, name)| {
            ["weight", "bias"].map(|t| (format!("convs.{i}.{t}"), format!("{name}.{t}")))
        })
        .collect()
}

fn keras_name(pairs: &[(String, String)], module_path: &str) -> String {
    pairs
        .iter()
        .find(|(m, _)| m == module_path)
        .map(|(_, k)| k.clone())
        .unwrap_or_else(|| module_path.to_string())
}

/// Loads Keras-named safetensors weights into a VGG base and checks that every tensor landed.
pub fn load_vgg(def: &BackboneDef, mut model: Vgg, path: &Path) -> Result<Vgg, WeightsError> {
    let pairs = name_pairs(def);
    let remap = KeyRemapper::from_patterns(
        def.layers()
            .iter()
            .filter_map(|l| match l.op {
                LayerOp::Conv { index, .. } => Some((
                    format!(r"^{}\.(weight|bias)$", l.name),
                    format!("convs.{index}.$1"),
                )),
                _ => None,
            })
            .collect(),
    )
    .map_err(|e| WeightsError::Unreadable {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut store = SafetensorsStore::from_file(path)
        .remap(remap)
        .validate(false)
        .allow_partial(true);
    let result = model
        .load_from(&mut store)
        .map_err(|e| WeightsError::Unreadable {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;

    let mut problems = Vec::new();
    for e in &result.errors {
        problems.push(match e {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => format!(
                "tensor {} has shape {:?}, expected {:?}",
                keras_name(&pairs, path),
                found.as_slice(),
                expected.as_slice()
            ),
            ApplyError::DTypeMismatch {
                path,
                expected,
                found,
            } => format!(
                "tensor {} has dtype {found:?}, expected {expected:?}",
                keras_name(&pairs, path)
            ),
            ApplyError::AdapterError { path, message }
            | ApplyError::LoadError { path, message } => {
                format!("tensor {}: {message}", keras_name(&pairs, path))
            }
        });
    }
    for (path, _) in &result.missing {
        problems.push(format!("missing tensor {}", keras_name(&pairs, path)));
    }
    // A runner model's export also holds its head: not part of the base.
    for path in result.unused.iter().filter(|p| !p.starts_with("head.")) {
        problems.push(format!(
            "unexpected tensor {path} (not a layer of {})",
            def.name
        ));
    }
    if !problems.is_empty() {
        return Err(WeightsError::Mismatch {
            path: path.to_path_buf(),
            backbone: def.name.to_string(),
            problems,
        });
    }
    tracing::debug!(path = %path.display(), tensors = result.applied.len(), "Backbone weights loaded.");
    Ok(model)
}
