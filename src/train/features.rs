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
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::prelude::*;
use safetensors::Dtype;
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

/// Activations at the cutoff for every image of one split, `[n, c, h, w]` row-major: in memory,
/// or read from their cache file batch by batch (the file's pages stay in the system's cache,
/// not in the run's memory, so a split of any size costs one batch).
#[derive(Debug, Clone)]
pub struct Features {
    /// The values.
    store: Store,
    /// `[c, h, w]` of one example.
    pub shape: [usize; 3],
    /// Labels.
    pub labels: Vec<usize>,
    /// Source image of each example.
    pub paths: Vec<PathBuf>,
}

/// Where the values of [`Features`] are.
#[derive(Debug, Clone)]
enum Store {
    Memory(Vec<f32>),
    /// A cache file, checked when opened: the values start at `offset`, little-endian f32.
    File {
        file: Arc<File>,
        offset: u64,
        path: PathBuf,
    },
}

impl Features {
    /// Activations held in memory.
    ///
    /// # Panics
    ///
    /// When `values` is not `labels.len()` examples of `shape`.
    pub fn new(
        values: Vec<f32>,
        shape: [usize; 3],
        labels: Vec<usize>,
        paths: Vec<PathBuf>,
    ) -> Self {
        assert_eq!(values.len(), labels.len() * shape.iter().product::<usize>());
        Self {
            store: Store::Memory(values),
            shape,
            labels,
            paths,
        }
    }

    /// Values of one example.
    fn per(&self) -> usize {
        self.shape.iter().product()
    }

    /// The cache file the values are read from, if they are not in memory.
    pub fn file(&self) -> Option<&Path> {
        match &self.store {
            Store::Memory(_) => None,
            Store::File { path, .. } => Some(path),
        }
    }

    /// Every value (read whole from the cache file when the split is there).
    pub fn values(&self) -> Result<std::borrow::Cow<'_, [f32]>, DataError> {
        match &self.store {
            Store::Memory(v) => Ok(v.as_slice().into()),
            Store::File { .. } => {
                let all: Vec<usize> = (0..self.len()).collect();
                let mut out = Vec::with_capacity(self.len() * self.per());
                self.gather_into(&all, &mut out)?;
                Ok(out.into())
            }
        }
    }

    /// Appends the values of the examples `indices`, in order, to `out`. From a file, each run of
    /// consecutive indices is one read.
    fn gather_into(&self, indices: &[usize], out: &mut Vec<f32>) -> Result<(), DataError> {
        let per = self.per();
        match &self.store {
            Store::Memory(v) => {
                for &i in indices {
                    out.extend_from_slice(&v[i * per..(i + 1) * per]);
                }
            }
            Store::File { file, offset, path } => {
                use std::os::unix::fs::FileExt;
                let mut bytes = Vec::new();
                let mut rest = indices;
                while let Some(&first) = rest.first() {
                    let run = 1 + rest.windows(2).take_while(|w| w[1] == w[0] + 1).count();
                    bytes.resize(run * per * 4, 0);
                    let at = offset + (first * per * 4) as u64;
                    file.read_exact_at(&mut bytes, at).map_err(|error| {
                        DataError::FeatureCache {
                            path: path.clone(),
                            error,
                        }
                    })?;
                    out.extend(
                        bytes
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    );
                    rest = &rest[run..];
                }
            }
        }
        Ok(())
    }

    /// A batch of examples as a tensor on `device`; fails only when the cache file the values
    /// are read from no longer reads.
    ///
    /// # Shapes
    ///
    /// - output: `[indices.len(), c, h, w]`
    pub fn batch(
        &self,
        indices: &[usize],
        device: &Device,
    ) -> Result<(Tensor<4>, Vec<usize>), DataError> {
        let mut buf = Vec::with_capacity(indices.len() * self.per());
        self.gather_into(indices, &mut buf)?;
        let [c, h, w] = self.shape;
        let x = Tensor::from_data(TensorData::new(buf, [indices.len(), c, h, w]), device);
        Ok((x, indices.iter().map(|&i| self.labels[i]).collect()))
    }

    /// Every example as one tensor on `device` (a GPU keeps a phase's training split there), or
    /// `None` when the split is larger than [`RESIDENT_LIMIT`] or than one tensor may be there,
    /// or its cache file does not read (the batches then say why).
    ///
    /// # Shapes
    ///
    /// - output: `[n, c, h, w]`
    pub fn resident(&self, device: &Device) -> Option<Tensor<4>> {
        let bytes = (self.len() * self.per() * 4) as u64;
        let limit = (RESIDENT_LIMIT as u64).min(crate::device::max_tensor_bytes(device));
        if bytes > limit || self.is_empty() {
            return None;
        }
        let [c, h, w] = self.shape;
        let values = self.values().ok()?.into_owned();
        Some(Tensor::from_data(
            TensorData::new(values, [self.len(), c, h, w]),
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

/// Runs the frozen part of the base once over a split, batch by batch, keeping the activations
/// in memory (a split decoded on demand is decoded one batch at a time, so only the activations
/// at the cutoff accumulate). Stops between batches once `interrupt` is set.
pub fn extract(
    model: &TransferModel,
    images: &Images,
    plan: &Plan,
    device: &Device,
    run: &str,
    interrupt: Option<&AtomicBool>,
) -> Result<Features, ExtractError> {
    extract_into(model, images, plan, device, (run, interrupt), None)
}

/// The shape of one example's activations at `model`'s cutoff.
fn shape_of(model: &TransferModel, images: &Images, plan: &Plan) -> [usize; 3] {
    plan.backbone
        .shape_at(model.cut(), [images.height, images.width])
}

/// [`extract`], writing each batch's activations to `entry` as they come (so that only one
/// batch is in memory) when there is one; a write that fails logs why and the extraction goes
/// on in memory, with what was written read back.
fn extract_into(
    model: &TransferModel,
    images: &Images,
    plan: &Plan,
    device: &Device,
    (run, interrupt): (&str, Option<&AtomicBool>),
    entry: Option<EntryWriter>,
) -> Result<Features, ExtractError> {
    let frozen = model.valid();
    let plain = device.clone().without_autodiff();
    let batch = plan.spec.data.batch_size;
    let shape = shape_of(model, images, plan);
    let mut sink = match entry {
        Some(w) => Sink::File(Box::new(w)),
        None => Sink::Memory(Vec::with_capacity(
            images.len() * shape.iter().product::<usize>(),
        )),
    };
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
        sink.push(y.into_data().iter::<f32>().collect(), run)?;
        if (b + 1) % 10 == 0 || b + 1 == n_batches {
            let done = ((b + 1) * batch).min(images.len());
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
            info!(run, split = %images.split, cut = model.cut(), done, total = images.len(), images_per_s = format!("{rate:.1}"), "Extracting features.");
        }
    }
    Ok(Features {
        store: sink.finish(&images.labels, run)?,
        shape,
        labels: images.labels.clone(),
        paths: images.paths.clone(),
    })
}

/// Where an extraction puts its activations.
enum Sink {
    Memory(Vec<f32>),
    File(Box<EntryWriter>),
}

impl Sink {
    /// Adds one batch's activations.
    fn push(&mut self, values: Vec<f32>, run: &str) -> Result<(), DataError> {
        match self {
            Self::Memory(v) => v.extend(values),
            Self::File(w) => {
                if let Err(e) = w.append(&values) {
                    let mut kept = self.fall_back(&e, run)?;
                    kept.extend(values);
                    *self = Self::Memory(kept);
                }
            }
        }
        Ok(())
    }

    /// The values written so far, read back, after `e` (logged).
    fn fall_back(&mut self, e: &crate::io::WriteError, run: &str) -> Result<Vec<f32>, DataError> {
        warn!(run, file = %e.path.display(), error = %e, "Cannot write the feature cache; going on without it.");
        match std::mem::replace(self, Self::Memory(Vec::new())) {
            Self::Memory(v) => Ok(v),
            Self::File(w) => w.recover(),
        }
    }

    /// The extraction's store: the committed cache file, or memory.
    fn finish(self, labels: &[usize], run: &str) -> Result<Store, DataError> {
        match self {
            Self::Memory(v) => Ok(Store::Memory(v)),
            Self::File(w) => match w.finish(labels) {
                Ok(store) => Ok(store),
                Err((e, w)) => Ok(Store::Memory(Self::File(w).fall_back(&e, run)?)),
            },
        }
    }
}

/// The header of a cache entry (safetensors JSON, padded with spaces to a multiple of 8 bytes).
/// `sha` has the same length whatever its value, so the header written before the values (with
/// a placeholder) is rewritten in place once they are all written.
fn header(key: &str, sha: &str, n: usize, [c, h, w]: [usize; 3]) -> Vec<u8> {
    let data_bytes = n * c * h * w * 4;
    let header = serde_json::json!({
        "__metadata__": {
            "runner.key": key,
            "runner.version": CACHE_VERSION,
            "runner.sha256": sha,
        },
        "features": {"dtype": "F32", "shape": [n, c, h, w], "data_offsets": [0, data_bytes]},
        "labels": {"dtype": "U32", "shape": [n], "data_offsets": [data_bytes, data_bytes + 4 * n]},
    });
    let mut header = header.to_string().into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    header
}

/// A cache entry written batch by batch as its activations are extracted, into the temporary
/// file of [`crate::io::AtomicFile`]: renamed over the entry's path once complete, removed when
/// the extraction stops before that.
#[derive(Debug)]
struct EntryWriter {
    file: crate::io::AtomicFile,
    key: String,
    n: usize,
    shape: [usize; 3],
    /// Where the values start.
    offset: u64,
    /// Values written so far.
    written: usize,
    sha: Sha256,
}

impl EntryWriter {
    /// Starts the entry `key` of `n` examples of `shape` at `path`.
    fn create(
        path: &Path,
        key: &str,
        n: usize,
        shape: [usize; 3],
    ) -> Result<Self, crate::io::WriteError> {
        use std::io::Write;
        let mut file = crate::io::AtomicFile::create(path)?;
        let header = header(key, &"0".repeat(64), n, shape);
        let io = |e| crate::io::WriteError::new(path, e);
        file.file()
            .write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        file.file().write_all(&header).map_err(io)?;
        Ok(Self {
            file,
            key: key.to_string(),
            n,
            shape,
            offset: 8 + header.len() as u64,
            written: 0,
            sha: Sha256::new(),
        })
    }

    /// Appends values.
    fn append(&mut self, values: &[f32]) -> Result<(), crate::io::WriteError> {
        use std::io::Write;
        let bytes = le_bytes(values);
        let path = self.file.path().to_path_buf();
        self.file
            .file()
            .write_all(&bytes)
            .map_err(|e| crate::io::WriteError::new(&path, e))?;
        self.sha.update(&bytes);
        self.written += values.len();
        Ok(())
    }

    /// Appends the labels, writes the checksum into the header and renames the file over the
    /// entry's path. Fails (giving the writer back, to recover from) when the values are not all
    /// there or a write fails.
    #[allow(clippy::result_large_err)] // once per extraction
    fn finish(
        mut self: Box<Self>,
        labels: &[usize],
    ) -> Result<Store, (crate::io::WriteError, Box<Self>)> {
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        let path = self.file.path().to_path_buf();
        let io = |e| crate::io::WriteError::new(&path, e);
        let expected = self.n * self.shape.iter().product::<usize>();
        if self.written != expected || labels.len() != self.n {
            let e =
                std::io::Error::other(format!("{} of {expected} values extracted", self.written));
            return Err((io(e), self));
        }
        let labels: Vec<u8> = labels
            .iter()
            .flat_map(|l| (*l as u32).to_le_bytes())
            .collect();
        if let Err(e) = self.file.file().write_all(&labels) {
            return Err((io(e), self));
        }
        let sha = crate::io::hex(&self.sha.clone().finalize());
        let header = header(&self.key, &sha, self.n, self.shape);
        assert_eq!(
            8 + header.len() as u64,
            self.offset,
            "the header keeps its length"
        );
        if let Err(e) = self.file.file().write_all_at(&header, 8) {
            return Err((io(e), self));
        }
        let me = *self;
        match me.file.try_commit() {
            Ok(file) => Ok(Store::File {
                file: Arc::new(file),
                offset: me.offset,
                path,
            }),
            Err((e, file)) => Err((e, Box::new(Self { file, ..me }))),
        }
    }

    /// The values written so far, read back from the temporary file (which is then removed).
    fn recover(mut self) -> Result<Vec<f32>, DataError> {
        use std::os::unix::fs::FileExt;
        let mut bytes = vec![0u8; self.written * 4];
        let path = self.file.path().to_path_buf();
        self.file
            .file()
            .read_exact_at(&mut bytes, self.offset)
            .map_err(|error| DataError::FeatureCache { path, error })?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
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
                let entry = self.path(&key).and_then(|path| {
                    info!(run, split = %images.split, cut = model.cut(), key = short, "Feature cache miss.");
                    if let Some(dir) = path.parent() {
                        remove_stale_partials(dir, run);
                    }
                    let shape = shape_of(model, images, plan);
                    EntryWriter::create(&path, &key, images.len(), shape)
                        .map_err(|e| warn!(run, file = %path.display(), error = %e, "Cannot write the feature cache; going on without it."))
                        .ok()
                });
                let interrupt = self.interrupt.as_deref();
                let f = extract_into(model, images, plan, device, (run, interrupt), entry)?;
                if let Some(path) = f.file() {
                    info!(run, split = %images.split, file = %path.display(), "Feature cache written.");
                }
                f
            }
        };
        let f = Arc::new(f);
        self.memo.insert(key, f.clone());
        Ok(f)
    }
}

/// A partial cache entry left by an extraction that was killed is removed once nothing has
/// written to it for this long (a live extraction writes every batch).
pub const STALE_PARTIAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes from `dir` the partial entries (`.<key>.safetensors.<random>.tmp`) no process has
/// written to for [`STALE_PARTIAL`]: an extraction killed (not stopped) leaves one behind, as
/// large as what it had extracted.
fn remove_stale_partials(dir: &Path, run: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.contains(".safetensors.") && name.ends_with(".tmp")) {
            continue;
        }
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_PARTIAL);
        if stale
            && e.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(e.path()).is_ok()
        {
            info!(run, file = %e.path().display(), "Removed a partial feature cache file left by a killed extraction.");
        }
    }
}

/// Writes one cache entry atomically, as safetensors (the values are written batch by batch,
/// as an extraction writes them).
pub fn write(path: &Path, key: &str, f: &Features) -> Result<(), crate::io::WriteError> {
    let mut w = EntryWriter::create(path, key, f.len(), f.shape)?;
    let io = |e: DataError| crate::io::WriteError::new(path, e);
    let indices: Vec<usize> = (0..f.len()).collect();
    for chunk in indices.chunks(256) {
        let mut values = Vec::new();
        f.gather_into(chunk, &mut values).map_err(io)?;
        w.append(&values)?;
    }
    Box::new(w).finish(&f.labels).map(drop).map_err(|(e, _)| e)
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
    /// Not a cache entry's layout.
    #[error("not a feature cache file: {0}")]
    Format(String),
    /// The key inside is not the file's name.
    #[error("its key does not match its file name")]
    Key,
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

/// The largest header read (safetensors' own limit).
const MAX_HEADER: u64 = 100 << 20;

/// Opens and checks one cache entry against the key and the images it should describe: its
/// layout, key, checksum (read through once, not kept) and labels. The values are then read from
/// the file batch by batch.
pub fn read(path: &Path, key: &str, images: &Images) -> Result<Features, CacheEntryError> {
    use std::io::Read;
    let format = |what: String| CacheEntryError::Format(what);
    let file = File::open(path).map_err(CacheEntryError::Read)?;
    let len = file.metadata().map_err(CacheEntryError::Read)?.len();
    let mut r = std::io::BufReader::with_capacity(1 << 20, &file);
    let mut n8 = [0u8; 8];
    r.read_exact(&mut n8)
        .map_err(|_| format("shorter than a header".into()))?;
    let header_len = u64::from_le_bytes(n8);
    if header_len > MAX_HEADER || 8 + header_len > len {
        return Err(format(format!("a header of {header_len} bytes")));
    }
    let mut header = vec![0u8; header_len as usize];
    r.read_exact(&mut header).map_err(CacheEntryError::Read)?;
    // safetensors' own reading of a header (it refuses overlapping or misplaced tensors).
    let header: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| format(format!("its header: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("runner.key").map(String::as_str) != Some(key) {
        return Err(CacheEntryError::Key);
    }
    let (Some(feats), Some(labels)) = (header.info("features"), header.info("labels")) else {
        return Err(format("no features or labels tensor".into()));
    };
    let shape = &feats.shape;
    let values_bytes = shape
        .iter()
        .try_fold(4usize, |a, &d| a.checked_mul(d))
        .filter(|_| feats.dtype == Dtype::F32 && shape.len() == 4 && shape[0] == images.len());
    let Some(values_bytes) = values_bytes else {
        return Err(CacheEntryError::Shape {
            images: images.len(),
            dtype: feats.dtype,
            shape: shape.clone(),
        });
    };
    let labels_bytes = 4 * images.len();
    if feats.data_offsets != (0, values_bytes)
        || labels.dtype != Dtype::U32
        || labels.shape != [images.len()]
        || labels.data_offsets != (values_bytes, values_bytes + labels_bytes)
        || len != 8 + header_len + (values_bytes + labels_bytes) as u64
    {
        return Err(format(format!(
            "its tensors do not fill its {len} bytes as a cache entry's do"
        )));
    }
    let mut sha = Sha256::new();
    let copied = std::io::copy(&mut (&mut r).take(values_bytes as u64), &mut sha)
        .map_err(CacheEntryError::Read)?;
    if copied != values_bytes as u64
        || meta.get("runner.sha256") != Some(&crate::io::hex(&sha.finalize()))
    {
        return Err(CacheEntryError::Checksum);
    }
    let mut stored = vec![0u8; labels_bytes];
    r.read_exact(&mut stored).map_err(CacheEntryError::Read)?;
    let stored: Vec<usize> = stored
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    if stored != images.labels {
        return Err(CacheEntryError::Labels);
    }
    drop(r);
    Ok(Features {
        store: Store::File {
            file: Arc::new(file),
            offset: 8 + header_len,
            path: path.to_path_buf(),
        },
        shape: [shape[1], shape[2], shape[3]],
        labels: stored,
        paths: images.paths.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` examples of `shape`, distinct values, labels alternating.
    fn features(n: usize, shape: [usize; 3]) -> Features {
        let per: usize = shape.iter().product();
        Features::new(
            (0..n * per).map(|i| i as f32 * 0.25 - 3.0).collect(),
            shape,
            (0..n).map(|i| i % 2).collect(),
            (0..n).map(|i| PathBuf::from(format!("{i}.png"))).collect(),
        )
    }

    /// Images that only describe `f`'s examples (no pixels), as a cache read checks them.
    fn images_of(f: &Features) -> Images {
        Images {
            split: "train".into(),
            height: 1,
            width: 1,
            pixels: Vec::new(),
            labels: f.labels.clone(),
            paths: f.paths.clone(),
            digests: vec![[0; 32]; f.len()],
            on_demand: None,
            mirrored: false,
        }
    }

    /// An entry `k` of `n` examples of `shape` written in a fresh folder.
    fn written(n: usize, shape: [usize; 3]) -> (tempfile::TempDir, PathBuf, Features) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.safetensors");
        let f = features(n, shape);
        write(&path, "k", &f).unwrap();
        (dir, path, f)
    }

    #[test]
    fn an_entry_written_batch_by_batch_is_read_back_from_the_file_batch_by_batch() {
        let (dir, path, f) = written(9, [2, 3, 1]);
        // A valid safetensors file, as the cache's format says.
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("features").unwrap().shape(), [9, 2, 3, 1]);
        let back = read(&path, "k", &images_of(&f)).unwrap();
        assert_eq!(back.file(), Some(path.as_path()));
        assert_eq!(back.values().unwrap(), f.values().unwrap());
        // Out of order, repeated and consecutive indices (one read per consecutive run).
        let cpu = Device::default();
        let idx = [8, 0, 1, 2, 5, 5, 4];
        let (a, la) = back.batch(&idx, &cpu).unwrap();
        let (b, lb) = f.batch(&idx, &cpu).unwrap();
        assert_eq!(la, lb);
        a.into_data().assert_eq(&b.into_data(), true);
        // Nothing but the entry is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_file_truncated_after_it_was_opened_fails_the_batch_naming_it() {
        let (_dir, path, f) = written(4, [8, 1, 1]);
        let back = read(&path, "k", &images_of(&f)).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 40)
            .unwrap();
        let e = back.batch(&[3], &Device::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("run again"),
            "{msg}"
        );
        // Earlier examples still read; a new open refuses the file.
        assert!(back.batch(&[0], &Device::default()).is_ok());
        assert!(matches!(
            read(&path, "k", &images_of(&f)),
            Err(CacheEntryError::Format(_))
        ));
    }

    #[test]
    fn every_damage_to_an_entry_is_refused_by_its_check() {
        let (_dir, path, f) = written(3, [4, 1, 1]);
        let good = std::fs::read(&path).unwrap();
        let images = images_of(&f);
        let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let check = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            read(&path, "k", &images).map(drop)
        };
        assert!(check(&good).is_ok());
        assert!(matches!(
            read(&path, "other", &images),
            Err(CacheEntryError::Key)
        ));
        let mut flipped = good.clone();
        flipped[8 + header_len + 5] ^= 1;
        assert!(matches!(check(&flipped), Err(CacheEntryError::Checksum)));
        let mut label = good.clone();
        let last = label.len() - 4;
        label[last] ^= 1;
        assert!(matches!(check(&label), Err(CacheEntryError::Labels)));
        assert!(matches!(
            check(&good[..good.len() - 1]),
            Err(CacheEntryError::Format(_))
        ));
        assert!(matches!(check(&good[..5]), Err(CacheEntryError::Format(_))));
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(check(&huge), Err(CacheEntryError::Format(_))));
        assert!(matches!(
            check(b"{not a header}\n\n"),
            Err(CacheEntryError::Format(_))
        ));
        let fewer = images_of(&features(2, [4, 1, 1]));
        std::fs::write(&path, &good).unwrap();
        assert!(matches!(
            read(&path, "k", &fewer),
            Err(CacheEntryError::Shape { .. })
        ));
    }

    #[test]
    fn a_write_that_fails_mid_extraction_gives_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.safetensors");
        let mut w = EntryWriter::create(&path, "k", 3, [2, 1, 1]).unwrap();
        w.append(&[1.0, 2.0]).unwrap();
        w.append(&[3.5, -4.0]).unwrap();
        // The sink reads back the two batches and goes on in memory with the third.
        let mut sink = Sink::File(Box::new(w));
        let e = crate::io::WriteError::new(&path, std::io::Error::other("disk full"));
        let mut kept = sink.fall_back(&e, "test").unwrap();
        kept.extend([5.0, 6.0]);
        assert_eq!(kept, [1.0, 2.0, 3.5, -4.0, 5.0, 6.0]);
        // The partial file is gone and no entry was written.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // An entry missing values is not committed: the writer is given back.
        let mut w = EntryWriter::create(&path, "k", 3, [2, 1, 1]).unwrap();
        w.append(&[1.0, 2.0]).unwrap();
        let (e, w) = Box::new(w).finish(&[0, 1, 0]).unwrap_err();
        assert!(e.to_string().contains("2 of 6 values"), "{e}");
        assert_eq!(w.recover().unwrap(), [1.0, 2.0]);
        assert!(!path.exists());
    }

    #[test]
    fn only_partial_entries_nothing_wrote_to_for_an_hour_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(".abc.safetensors.x1y2.tmp");
        let live = dir.path().join(".def.safetensors.z3w4.tmp");
        let entry = dir.path().join("abc.safetensors");
        let other = dir.path().join(".notes.tmp");
        for p in [&old, &live, &entry, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        let hours_ago = std::time::SystemTime::now() - 2 * STALE_PARTIAL;
        for p in [&old, &entry, &other] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(hours_ago)
                .unwrap();
        }
        remove_stale_partials(dir.path(), "test");
        assert!(!old.exists());
        assert!(live.exists() && entry.exists() && other.exists());
    }
}
