//! Activations at the freeze cutoff: computed once per split and phase when the layers below
//! the cutoff are frozen and the split is not augmented, and kept on disk under a content key so
//! that later runs and sweeps skip the base entirely.
//!
//! The key hashes everything the activations depend on: the backbone, the cut layer, the frozen
//! layers' current weights (not the file name: a layer trained in an earlier phase changes the
//! key), the preprocessing, the image size and resampling filter, and the bytes and labels of
//! every image, in order. A cache file holds the activations as safetensors with the key and a
//! checksum in its metadata; a file that fails any check is logged, removed and rebuilt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::data::{self, DataError, Images};
use crate::model::TransferModel;
use crate::plan::Plan;

/// Version of the cache file layout and key; bump to invalidate every entry (2: bilinear
/// resizing moved to fast_image_resize, pixels differ by up to 2 levels).
const CACHE_VERSION: &str = "2";

/// The largest split kept whole in device memory by [`Features::resident`] (2 GiB: 65,536 images
/// of VGG16's 4x4x512 activations).
pub const RESIDENT_LIMIT: usize = 2 << 30;

/// Activations at the cutoff for every image of one split, `[n, c, h, w]` row-major.
#[derive(Debug, Clone)]
pub struct Features {
    /// Values.
    pub values: Vec<f32>,
    /// `[c, h, w]` of one example.
    pub shape: [usize; 3],
    /// Labels.
    pub labels: Vec<usize>,
    /// Source image of each example.
    pub paths: Vec<PathBuf>,
}

impl Features {
    /// A batch of examples as a tensor on `device`.
    ///
    /// # Shapes
    ///
    /// - output: `[indices.len(), c, h, w]`
    pub fn batch(&self, indices: &[usize], device: &Device) -> (Tensor<4>, Vec<usize>) {
        let per: usize = self.shape.iter().product();
        let mut buf = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            buf.extend_from_slice(&self.values[i * per..(i + 1) * per]);
        }
        let [c, h, w] = self.shape;
        let x = Tensor::from_data(TensorData::new(buf, [indices.len(), c, h, w]), device);
        (x, indices.iter().map(|&i| self.labels[i]).collect())
    }

    /// Every example as one tensor on `device` (a GPU keeps a phase's training split there), or
    /// `None` when the split is larger than [`RESIDENT_LIMIT`] or than one tensor may be there.
    ///
    /// # Shapes
    ///
    /// - output: `[n, c, h, w]`
    pub fn resident(&self, device: &Device) -> Option<Tensor<4>> {
        let bytes = (self.values.len() * 4) as u64;
        let limit = (RESIDENT_LIMIT as u64).min(crate::device::max_tensor_bytes(device));
        if bytes > limit || self.is_empty() {
            return None;
        }
        let [c, h, w] = self.shape;
        Some(Tensor::from_data(
            TensorData::new(self.values.clone(), [self.len(), c, h, w]),
            device,
        ))
    }

    /// A batch gathered on the device from [`resident`](Self::resident)'s tensor: only the
    /// indices travel. The batch is on `all`'s device, with autodiff (no gradient required).
    ///
    /// # Shapes
    ///
    /// - all: `[n, c, h, w]`; output: `[indices.len(), c, h, w]`
    pub fn gather(&self, all: &Tensor<4>, indices: &[usize]) -> (Tensor<4>, Vec<usize>) {
        let device = all.device();
        let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [indices.len()]), &device);
        let x = all.clone().select(0, idx).autodiff();
        (x, indices.iter().map(|&i| self.labels[i]).collect())
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Why a split's activations could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// An image could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Ctrl-C (or SIGTERM) during the extraction: it stops at the next batch, so that a stop
    /// asked for during a long extraction is not kept waiting for minutes.
    #[error("interrupted while extracting features")]
    Interrupted,
}

/// Runs the frozen part of the base once over a split, batch by batch (a split decoded on demand
/// is decoded one batch at a time, so only the activations at the cutoff accumulate). Stops
/// between batches once `interrupt` is set.
pub fn extract(
    model: &TransferModel,
    images: &Images,
    plan: &Plan,
    device: &Device,
    run: &str,
    interrupt: Option<&AtomicBool>,
) -> Result<Features, ExtractError> {
    let frozen = model.valid();
    let plain = device.clone().without_autodiff();
    let batch = plan.spec.data.batch_size;
    let shape = plan
        .backbone
        .shape_at(model.cut(), [images.height, images.width]);
    let mut values = Vec::with_capacity(images.len() * shape.iter().product::<usize>());
    let started = Instant::now();
    // The terminal's extraction bar goes on every way out (an interruption, a bad image).
    struct ClearBar;
    impl Drop for ClearBar {
        fn drop(&mut self) {
            crate::logging::progress_done();
        }
    }
    let _bar = ClearBar;
    let n_batches = images.len().div_ceil(batch);
    let indices: Vec<usize> = (0..images.len()).collect();
    for (b, chunk) in indices.chunks(batch).enumerate() {
        if interrupt.is_some_and(|f| f.load(Ordering::Relaxed)) {
            crate::logging::progress_done();
            warn!(run, split = %images.split, done = b * batch, total = images.len(), "Interrupted while extracting features.");
            return Err(ExtractError::Interrupted);
        }
        let x = data::batch_tensor(images, chunk, plan.preprocess, &plain)?;
        let y = frozen.frozen_features(x);
        values.extend(y.into_data().iter::<f32>());
        if (b + 1) % 10 == 0 || b + 1 == n_batches {
            let done = ((b + 1) * batch).min(images.len());
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
            info!(run, split = %images.split, cut = model.cut(), done, total = images.len(), images_per_s = format!("{rate:.1}"), "Extracting features.");
        }
    }
    Ok(Features {
        values,
        shape,
        labels: images.labels.clone(),
        paths: images.paths.clone(),
    })
}

/// The content key of the activations of `images` at `model`'s cutoff (hex SHA-256).
pub fn key(model: &TransferModel, images: &Images, plan: &Plan) -> String {
    let mut h = Sha256::new();
    let spec = &plan.spec;
    h.update(
        format!(
            "runner-features-v{CACHE_VERSION}\nbackbone={}\ncut={}\npreprocess={}\nsize={}x{}\ninterpolation={:?}\n",
            plan.backbone.name,
            model.cut(),
            plan.preprocess.as_str(),
            images.height,
            images.width,
            spec.data.interpolation,
        )
        .as_bytes(),
    );
    if images.mirrored {
        // Only then, so that the keys of existing entries stay what they were.
        h.update(b"mirrored\n");
    }
    h.update(model.frozen_digest());
    for (digest, label) in images.digests.iter().zip(&images.labels) {
        h.update(digest);
        h.update((*label as u64).to_le_bytes());
    }
    crate::io::hex(&h.finalize())
}

/// The on-disk cache, or none (`train.cache = "off"` or no folder).
#[derive(Debug, Clone, Default)]
pub struct FeatureCache {
    dir: Option<PathBuf>,
    memo: HashMap<String, Arc<Features>>,
    interrupt: Option<Arc<AtomicBool>>,
}

impl FeatureCache {
    /// A cache in `dir` (created when first written); `None` keeps activations in memory only.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            memo: HashMap::new(),
            interrupt: None,
        }
    }

    /// Extractions stop at the next batch once `flag` is set (the run's Ctrl-C flag).
    pub fn interrupt_on(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.interrupt = flag;
    }

    /// The file holding `key`.
    pub fn path(&self, key: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{key}.safetensors")))
    }

    /// The activations of `images` at `model`'s cutoff: from memory, from disk, or computed
    /// (and then stored). Fails only when an image decoded on demand no longer decodes.
    pub fn features(
        &mut self,
        model: &TransferModel,
        images: &Images,
        plan: &Plan,
        device: &Device,
        run: &str,
    ) -> Result<Arc<Features>, ExtractError> {
        let key = key(model, images, plan);
        if let Some(f) = self.memo.get(&key) {
            return Ok(f.clone());
        }
        let short = &key[..16];
        let loaded = self.path(&key).and_then(|path| {
            if !path.exists() {
                return None;
            }
            match read(&path, &key, images) {
                Ok(f) => {
                    info!(run, split = %images.split, cut = model.cut(), key = short, file = %path.display(), "Feature cache hit.");
                    Some(f)
                }
                Err(reason) => {
                    warn!(run, split = %images.split, file = %path.display(), %reason, "Feature cache file is corrupt; rebuilding it.");
                    let _ = std::fs::remove_file(&path);
                    None
                }
            }
        });
        let f = match loaded {
            Some(f) => f,
            None => {
                if self.dir.is_some() {
                    info!(run, split = %images.split, cut = model.cut(), key = short, "Feature cache miss.");
                }
                let f = extract(model, images, plan, device, run, self.interrupt.as_deref())?;
                if let Some(path) = self.path(&key) {
                    match write(&path, &key, &f) {
                        Ok(()) => {
                            info!(run, split = %images.split, file = %path.display(), "Feature cache written.")
                        }
                        Err(e) => {
                            warn!(run, file = %path.display(), error = %e, "Cannot write the feature cache; going on without it.")
                        }
                    }
                }
                f
            }
        };
        let f = Arc::new(f);
        self.memo.insert(key, f.clone());
        Ok(f)
    }
}

/// Writes one cache entry atomically, as safetensors, streaming the values (no copy of the
/// activations is made: the file is written in 64 KiB pieces).
pub fn write(path: &Path, key: &str, f: &Features) -> Result<(), crate::io::WriteError> {
    use std::io::Write;
    let [c, h, w] = f.shape;
    let n = f.len();
    let data_bytes = f.values.len() * 4;
    let mut sha = Sha256::new();
    for piece in f.values.chunks(1 << 14) {
        sha.update(le_bytes(piece));
    }
    // A safetensors header (JSON, then spaces to a multiple of 8 bytes); the data follows it.
    let header = serde_json::json!({
        "__metadata__": {
            "runner.key": key,
            "runner.version": CACHE_VERSION,
            "runner.sha256": crate::io::hex(&sha.finalize()),
        },
        "features": {"dtype": "F32", "shape": [n, c, h, w], "data_offsets": [0, data_bytes]},
        "labels": {"dtype": "U32", "shape": [n], "data_offsets": [data_bytes, data_bytes + 4 * n]},
    });
    let mut header = header.to_string().into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    crate::io::write_atomic(path, |file| {
        let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
        let io = |e: std::io::Error| e.to_string();
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&header).map_err(io)?;
        for piece in f.values.chunks(1 << 14) {
            out.write_all(&le_bytes(piece)).map_err(io)?;
        }
        for l in &f.labels {
            out.write_all(&(*l as u32).to_le_bytes()).map_err(io)?;
        }
        out.flush().map_err(io)
    })
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Why a cache entry cannot be used (it is then rebuilt).
#[derive(Debug, thiserror::Error)]
pub enum CacheEntryError {
    /// The file could not be read.
    #[error("{0}")]
    Read(std::io::Error),
    /// Not a safetensors file.
    #[error("not a safetensors file: {0}")]
    Format(safetensors::SafeTensorError),
    /// The key inside is not the file's name.
    #[error("its key does not match its file name")]
    Key,
    /// A tensor is missing.
    #[error("no {name} tensor: {error}")]
    Missing {
        /// The tensor.
        name: &'static str,
        /// The reader's error.
        error: safetensors::SafeTensorError,
    },
    /// The features' checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// The features are not `[images, c, h, w]` f32.
    #[error("expected f32 [{images}, c, h, w], found {dtype:?} {shape:?}")]
    Shape {
        /// The number of images.
        images: usize,
        /// The stored dtype.
        dtype: Dtype,
        /// The stored shape.
        shape: Vec<usize>,
    },
    /// The labels are not the images'.
    #[error("labels differ from the images'")]
    Labels,
}

/// Reads and checks one cache entry against the key and the images it should describe.
pub fn read(path: &Path, key: &str, images: &Images) -> Result<Features, CacheEntryError> {
    let bytes = std::fs::read(path).map_err(CacheEntryError::Read)?;
    let st = SafeTensors::deserialize(&bytes).map_err(CacheEntryError::Format)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(CacheEntryError::Format)?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("runner.key").map(String::as_str) != Some(key) {
        return Err(CacheEntryError::Key);
    }
    let tensor = |name: &'static str| {
        st.tensor(name)
            .map_err(|error| CacheEntryError::Missing { name, error })
    };
    let feats = tensor("features")?;
    let labels = tensor("labels")?;
    if meta.get("runner.sha256") != Some(&crate::io::hex(&Sha256::digest(feats.data()))) {
        return Err(CacheEntryError::Checksum);
    }
    let shape = feats.shape();
    if feats.dtype() != Dtype::F32 || shape.len() != 4 || shape[0] != images.len() {
        return Err(CacheEntryError::Shape {
            images: images.len(),
            dtype: feats.dtype(),
            shape: shape.to_vec(),
        });
    }
    let stored: Vec<usize> = labels
        .data()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    if stored != images.labels {
        return Err(CacheEntryError::Labels);
    }
    Ok(Features {
        values: feats
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        shape: [shape[1], shape[2], shape[3]],
        labels: stored,
        paths: images.paths.clone(),
    })
}
