//! Pretrained weights in three formats, told apart by their first bytes: safetensors, PyTorch
//! state dicts (`.pth`, read with burn-store) and Keras HDF5 files (`.h5`, read with hdf5-pure).
//! Each backbone family declares an explicit key map from the names its weights are published
//! under (Keras names for VGG, torchvision names for every family) onto runner's module tree; the
//! load result is checked: a missing, unexpected or wrong-shaped tensor is an error that names it,
//! never a silent random init.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{
    ApplyError, ApplyResult, KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter, PytorchStore,
    SafetensorsStore, SafetensorsStoreError,
};

/// Errors from loading backbone weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file is not a readable weights file.
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

/// The file formats weights are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// safetensors (`.safetensors`), as the asset mirror and runner's own exports hold them.
    Safetensors,
    /// A PyTorch state dict (`torch.save(model.state_dict(), "x.pth")`, zip or legacy pickle).
    PyTorch,
    /// A Keras HDF5 weights file (`model.save_weights("x.h5")`, `~/.keras/models/*.h5`).
    KerasH5,
}

impl Format {
    /// Tells the format from the file's first bytes (not its extension).
    pub fn detect(path: &Path) -> Result<Self, WeightsError> {
        let unreadable = |message: String| WeightsError::Unreadable {
            path: path.to_path_buf(),
            message,
        };
        let mut head = Vec::with_capacity(9);
        std::fs::File::open(path)
            .and_then(|f| f.take(9).read_to_end(&mut head))
            .map_err(|e| unreadable(e.to_string()))?;
        // safetensors first: its first byte is the low byte of the header's length, which is
        // 0x80, a legacy pickle's first byte, for one file in 256.
        let header_fits = || {
            let len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            std::fs::metadata(path).is_ok_and(|m| len.saturating_add(8) <= m.len())
        };
        if head.starts_with(b"\x89HDF\r\n\x1a\n") {
            Ok(Self::KerasH5)
        } else if head.len() == 9 && head[8] == b'{' && header_fits() {
            Ok(Self::Safetensors)
        } else if head.starts_with(b"PK\x03\x04") || head.first() == Some(&0x80) {
            Ok(Self::PyTorch)
        } else {
            Err(unreadable(
                "not a safetensors, PyTorch (.pth) or Keras HDF5 (.h5) weights file".into(),
            ))
        }
    }

    /// The format's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Safetensors => "safetensors",
            Self::PyTorch => "PyTorch",
            Self::KerasH5 => "Keras HDF5",
        }
    }
}

/// How a family's published weights are named: `(file prefix, module prefix)` pairs (a tensor
/// `<file prefix>.<rest>` loads into `<module prefix>.<rest>`), and the prefixes of tensors a
/// file may hold that are not part of the base (an ImageNet classifier).
#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    /// `(file prefix, module prefix)`; for a module prefix, the first pair naming it gives the
    /// name messages use.
    pub pairs: Vec<(String, String)>,
    /// Prefixes of tensors that are ignored when present (`classifier.`, `fc.`).
    pub extra: Vec<String>,
    /// Whether the family can be read from a Keras HDF5 file (the Keras layouts of MobileNetV2
    /// and ResNet50 differ from torchvision's: padding, biases, layer order).
    pub keras: bool,
}

impl KeyMap {
    fn remapper(&self) -> Result<KeyRemapper, regex::Error> {
        KeyRemapper::from_patterns(
            self.pairs
                .iter()
                .map(|(file, module)| {
                    (
                        format!(r"^{}\.(.+)$", regex_escape(file)),
                        format!("{module}.$1"),
                    )
                })
                .collect(),
        )
    }

    /// The file's name for the module tensor at `path`.
    pub fn file_name(&self, path: &str) -> String {
        self.pairs
            .iter()
            .find_map(|(file, module)| {
                path.strip_prefix(module.as_str())
                    .filter(|rest| rest.starts_with('.'))
                    .map(|rest| format!("{file}{rest}"))
            })
            .unwrap_or_else(|| path.to_string())
    }

    fn ignored(&self, name: &str) -> bool {
        name.ends_with("num_batches_tracked")
            // A runner model's export also holds its head: not part of the base.
            || name.starts_with("head.")
            || self.extra.iter().any(|e| name.starts_with(e.as_str()))
    }
}

/// The module path -> file name map for a model at `root` (e.g. `backbone.ResNet50`), to export
/// under the file's names.
pub fn export_remapper(
    root: &str,
    pairs: &[(String, String)],
) -> Result<KeyRemapper, regex::Error> {
    let root = if root.is_empty() {
        String::new()
    } else {
        format!(r"{}\.", regex_escape(root))
    };
    let mut seen = std::collections::HashSet::new();
    KeyRemapper::from_patterns(
        pairs
            .iter()
            // A module prefix exports under its first (primary) name.
            .filter(|(_, module)| seen.insert(module.clone()))
            .map(|(file, module)| {
                (
                    format!(r"^{root}{}\.(.+)$", regex_escape(module)),
                    format!("{file}.$1"),
                )
            })
            .collect(),
    )
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = r"\.+*?()|[]{}^$#&-~".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// Loads the weights file at `path` (any [`Format`]) into `module` through `map`, and checks that
/// every tensor of the module was found with its shape.
pub fn load<M: Module>(
    mut module: M,
    map: &KeyMap,
    path: &Path,
    backbone: &str,
) -> Result<M, WeightsError> {
    let unreadable = |message: String| WeightsError::Unreadable {
        path: path.to_path_buf(),
        message,
    };
    let format = Format::detect(path)?;
    let remap = map.remapper().map_err(|e| unreadable(e.to_string()))?;
    let result = match format {
        Format::Safetensors => {
            let mut store = SafetensorsStore::from_file(path)
                .remap(remap)
                .with_from_adapter(PyTorchToBurnAdapter)
                .validate(false)
                .allow_partial(true);
            module.load_from(&mut store).map_err(|e| e.to_string())
        }
        Format::PyTorch => {
            let mut store = PytorchStore::from_file(path)
                .remap(remap)
                .map_indices_contiguous(false)
                .validate(false)
                .allow_partial(true);
            module.load_from(&mut store).map_err(|e| e.to_string())
        }
        Format::KerasH5 => {
            if !map.keras {
                return Err(unreadable(format!(
                    "{backbone} cannot be read from a Keras HDF5 file (Keras' {backbone} is laid \
                     out differently from torchvision's, which runner builds); use torchvision's \
                     weights as .pth or .safetensors"
                )));
            }
            let bytes = keras_h5_to_safetensors(path).map_err(|e| unreadable(e.to_string()))?;
            let mut store = SafetensorsStore::from_bytes(Some(bytes))
                .remap(remap)
                .validate(false)
                .allow_partial(true);
            module.load_from(&mut store).map_err(|e| e.to_string())
        }
    }
    .map_err(|e| unreadable(format!("{} file: {e}", format.name())))?;
    check(&result, map, path, backbone)?;
    tracing::debug!(path = %path.display(), format = format.name(), tensors = result.applied.len(), "Backbone weights loaded.");
    Ok(module)
}

/// `module` (at `root` in its model, `""` for a model of its own) as safetensors bytes under the
/// names of `map`; `torch` converts to PyTorch's conventions (BatchNorm `weight`/`bias`, Linear
/// `[out, in]`); `metadata` goes into the header.
pub fn to_safetensors<M: Module>(
    module: &M,
    root: &str,
    map: &KeyMap,
    torch: bool,
    metadata: &[(&str, String)],
) -> Result<Vec<u8>, ExportError> {
    let mut store = SafetensorsStore::from_bytes(None).remap(export_remapper(root, &map.pairs)?);
    for (k, v) in metadata {
        store = store.metadata(*k, v.clone());
    }
    if torch {
        store = store.with_to_adapter(burn::store::BurnToPyTorchAdapter);
    }
    module.save_into(&mut store)?;
    Ok(store.get_bytes()?)
}

/// Why a module could not be written as safetensors.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A key pattern is not a valid regular expression.
    #[error("{0}")]
    Remap(#[from] regex::Error),
    /// The store could not collect or encode the tensors.
    #[error("{0}")]
    Store(#[from] SafetensorsStoreError),
}

/// Why a Keras HDF5 file could not be read; `at` is the group or dataset.
#[derive(Debug, thiserror::Error)]
pub enum H5Error {
    /// Not an HDF5 file.
    #[error("HDF5: {0}")]
    Open(hdf5_pure::Error),
    /// A group, attribute or dataset could not be read.
    #[error("{}{error}", if at.is_empty() { String::new() } else { format!("{at}: ") })]
    Read {
        /// Where in the file (`""` at the root).
        at: String,
        /// The reader's error.
        error: hdf5_pure::Error,
    },
    /// A dataset's declared size is beyond any weight's.
    #[error(
        "{at}: the file declares a tensor of shape {shape:?}, more than the {MAX_TENSOR_VALUES} values a weight may have (a damaged file?)"
    )]
    TooLarge {
        /// The dataset.
        at: String,
        /// Its declared shape.
        shape: Vec<usize>,
    },
    /// No weights at all.
    #[error("no layer weights in the file (not a Keras weights file?)")]
    Empty,
    /// A tensor could not be encoded.
    #[error("{name}: {error}")]
    Encode {
        /// The tensor.
        name: String,
        /// The encoder's error.
        error: safetensors::SafeTensorError,
    },
    /// The tensors could not be written as safetensors.
    #[error("{0}")]
    Serialize(safetensors::SafeTensorError),
}

/// Every problem of a load, one line each, named as the file names them.
fn check(
    result: &ApplyResult,
    map: &KeyMap,
    path: &Path,
    backbone: &str,
) -> Result<(), WeightsError> {
    let mut problems = Vec::new();
    for e in &result.errors {
        problems.push(match e {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => format!(
                "tensor {} has shape {:?}, expected {:?}",
                map.file_name(path),
                found.as_slice(),
                expected.as_slice()
            ),
            ApplyError::DTypeMismatch {
                path,
                expected,
                found,
            } => format!(
                "tensor {} has dtype {found:?}, expected {expected:?}",
                map.file_name(path)
            ),
            ApplyError::AdapterError { path, message }
            | ApplyError::LoadError { path, message } => {
                format!("tensor {}: {message}", map.file_name(path))
            }
        });
    }
    for (path, _) in &result.missing {
        problems.push(format!("missing tensor {}", map.file_name(path)));
    }
    for path in result.unused.iter().filter(|p| !map.ignored(p)) {
        problems.push(format!(
            "unexpected tensor {path} (not a layer of {backbone})"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(WeightsError::Mismatch {
            path: path.to_path_buf(),
            backbone: backbone.to_string(),
            problems,
        })
    }
}

/// The most values one weight tensor may have when read (2^28: 1 GiB of f32).
pub const MAX_TENSOR_VALUES: usize = 1 << 28;

/// Reads a Keras HDF5 weights file into safetensors bytes named `<layer>.weight` / `<layer>.bias`
/// (convolution kernels transposed from Keras' HWIO to OIHW, dense kernels to `[out, in]`).
///
/// Both layouts Keras writes are read: Keras 2's (`save_weights("x.h5")`, the files in
/// `~/.keras/models`: `/<layer>/<layer>/kernel:0`, under `/model_weights` in a whole-model file)
/// and Keras 3's `.weights.h5` (`/layers/<layer>/vars/0` kernel, `/vars/1` bias).
pub fn keras_h5_to_safetensors(path: &Path) -> Result<Vec<u8>, H5Error> {
    let file = hdf5_pure::File::open(path).map_err(H5Error::Open)?;
    let root_err = |error| H5Error::Read {
        at: String::new(),
        error,
    };
    let mut root = file.root();
    let top = root.groups().map_err(root_err)?;
    if top.iter().any(|g| g == "model_weights") {
        root = root.group("model_weights").map_err(root_err)?;
    }
    let keras3 = root
        .groups()
        .map_err(root_err)?
        .iter()
        .any(|g| g == "layers")
        && !root.attrs().map_err(root_err)?.contains_key("layer_names");
    if keras3 {
        root = root.group("layers").map_err(root_err)?;
    }
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for key in root.groups().map_err(root_err)? {
        let group = root.group(&key).map_err(|error| H5Error::Read {
            at: key.clone(),
            error,
        })?;
        // Keras 3 keys its groups by class (`conv2d_3`); the layer's name is an attribute of
        // `vars`.
        let layer = if keras3 {
            match group.group("vars").and_then(|v| v.attrs()) {
                Ok(attrs) => match attrs.get("name") {
                    Some(
                        hdf5_pure::AttrValue::String(n)
                        | hdf5_pure::AttrValue::VarLenString(n)
                        | hdf5_pure::AttrValue::AsciiString(n),
                    ) => n.clone(),
                    _ => key.clone(),
                },
                Err(_) => continue,
            }
        } else {
            key.clone()
        };
        let mut found: Vec<(String, hdf5_pure::Dataset)> = Vec::new();
        collect_datasets(&group, "", &mut found).map_err(|error| H5Error::Read {
            at: layer.clone(),
            error,
        })?;
        for (name, ds) in found {
            let leaf = name.rsplit('/').next().unwrap_or(&name);
            let leaf = leaf.strip_suffix(":0").unwrap_or(leaf);
            let role = match (keras3, leaf) {
                (false, "kernel" | "depthwise_kernel") | (true, "0") => "weight",
                (false, "bias") | (true, "1") => "bias",
                (false, other) => other,
                (true, _) => continue,
            };
            let at = format!("{key}/{name}");
            let shape: Vec<usize> = ds
                .shape()
                .map_err(|error| H5Error::Read {
                    at: at.clone(),
                    error,
                })?
                .into_iter()
                .map(|d| d as usize)
                .collect();
            // The reader allocates what the header declares: a damaged header must not ask for
            // terabytes. No backbone tensor comes near 2^28 values (1 GiB of f32).
            let values_declared = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= MAX_TENSOR_VALUES);
            if values_declared.is_none() {
                return Err(H5Error::TooLarge { at, shape });
            }
            let values = ds.read_f32().map_err(|error| H5Error::Read { at, error })?;
            let (shape, values) = match (role, shape.as_slice()) {
                ("weight", &[h, w, i, o]) => {
                    (vec![o, i, h, w], hwio_to_oihw(&values, [h, w, i, o]))
                }
                ("weight", &[i, o]) => (vec![o, i], transpose2(&values, i, o)),
                _ => (shape, values),
            };
            tensors.push((format!("{layer}.{role}"), shape, values));
        }
    }
    if tensors.is_empty() {
        return Err(H5Error::Empty);
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let bytes: &[u8] = bytemuck_f32(values);
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|error| H5Error::Encode {
                    name: name.clone(),
                    error,
                })
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, None).map_err(H5Error::Serialize)
}

fn collect_datasets(
    group: &hdf5_pure::Group,
    prefix: &str,
    out: &mut Vec<(String, hdf5_pure::Dataset)>,
) -> Result<(), hdf5_pure::Error> {
    for name in group.datasets()? {
        let ds = group.dataset(&name)?;
        out.push((format!("{prefix}{name}"), ds));
    }
    for name in group.groups()? {
        let sub = group.group(&name)?;
        collect_datasets(&sub, &format!("{prefix}{name}/"), out)?;
    }
    Ok(())
}

fn hwio_to_oihw(v: &[f32], [h, w, i, o]: [usize; 4]) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for (src, &x) in v.iter().enumerate() {
        let (oo, rest) = (src % o, src / o);
        let (ii, rest) = (rest % i, rest / i);
        let (ww, hh) = (rest % w, rest / w);
        out[((oo * i + ii) * h + hh) * w + ww] = x;
    }
    out
}

fn transpose2(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the slice covers exactly
    // the vector's memory. safetensors stores little-endian, as x86-64 and aarch64 are.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Whether a weights file is named the torchvision way (`features.0.weight` for VGG), whose
/// weights expect torch preprocessing rather than Keras' caffe: a PyTorch file, or a safetensors
/// file whose header names `features.*` tensors.
pub fn torchvision_named(path: &Path) -> bool {
    match Format::detect(path) {
        Ok(Format::PyTorch) => true,
        Ok(Format::Safetensors) => safetensors_names(path)
            .map(|names| names.iter().any(|n| n.starts_with("features.")))
            .unwrap_or(false),
        _ => false,
    }
}

/// The tensor names in a safetensors file's header (reads the header only).
pub fn safetensors_names(path: &Path) -> std::io::Result<Vec<String>> {
    let mut f = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len).min(100 << 20) as usize;
    let mut header = vec![0u8; len];
    f.read_exact(&mut header)?;
    let value: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(value
        .as_object()
        .map(|o| o.keys().filter(|k| *k != "__metadata__").cloned().collect())
        .unwrap_or_default())
}
