//! The training loop, in phases. Within a phase the layers below the freeze cutoff do not
//! change, so for every split that is not augmented their activations are computed once (or read
//! from the feature cache) and only the part above is trained. Each phase starts a fresh
//! optimizer and keeps the weights of the one before; epochs are numbered across the run.
//!
//! Everything random is a function of the seed and the position: shuffling and augmentation of
//! `(seed, epoch)`, dropout of `(seed, epoch, step)` (the device is reseeded before every step).
//! With the model, optimizer, schedule and early-stopping state in a checkpoint, a resumed run
//! therefore continues exactly as an uninterrupted one would.

pub mod checkpoint;
pub mod features;
pub mod hand;
pub mod loss;
pub mod optim;
pub mod schedule;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::store::{ModuleRecord, RecordError};
use burn::tensor::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::backbone::weights::WeightsError;
use crate::data::{self, DataError, Images, augment};
pub use crate::metrics::{EpochMetrics, Evaluation, Partial, Prediction, Status};
use crate::model::{FrozenBase, TransferModel};
use crate::plan::{PhasePlan, Plan};
use crate::spec::{AugmentSpec, MAX_DECODED_MIB, OnBadImage};
pub use checkpoint::{Checkpoint, Origin};
pub use features::{ExtractError, FeatureCache, Features};
use schedule::{Schedule, ScheduleState, Tracker};

/// Errors that stop a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Images could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Backbone weights could not be loaded.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Every image of a class was skipped.
    #[error("{dir}: no readable images left in this class folder after skipping bad files")]
    EmptyClass {
        /// The class folder.
        dir: std::path::PathBuf,
    },
    /// A checkpoint's tensors do not fit this model.
    #[error("{path}: cannot restore the checkpoint: {part}{error}")]
    Restore {
        /// The checkpoint.
        path: std::path::PathBuf,
        /// Which part: `""` for the model, `"optimizer state: "`.
        part: &'static str,
        /// burn's error.
        error: RecordError,
    },
    /// The weights file a checkpoint's frozen layers come from is not what it was.
    #[error(
        "{path}: the checkpoint holds the trained layers only; its first {layers} backbone layers are those of {weights}, but that file's values differ now (replaced or changed since the run started): put the original back to resume"
    )]
    FrozenChanged {
        /// The checkpoint.
        path: std::path::PathBuf,
        /// The weights file.
        weights: std::path::PathBuf,
        /// How many layers come from it.
        layers: usize,
    },
    /// A checkpoint or result file could not be written.
    #[error(transparent)]
    Write(#[from] crate::io::WriteError),
}

/// Where a run stands: what a checkpoint restores.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Current phase.
    pub phase: usize,
    /// Completed epochs of the current phase.
    pub epoch_in_phase: usize,
    /// Completed steps of the current epoch (0 at an epoch boundary).
    pub step: usize,
    /// The current epoch's sums so far.
    pub partial: Partial,
    /// The current phase stopped early.
    pub phase_done: bool,
    /// Every finished epoch.
    pub history: Vec<EpochMetrics>,
    /// The current phase's schedule state.
    pub schedule: ScheduleState,
    /// The current phase's early-stopping state.
    pub stopping: Tracker,
    /// `train.monitor` over the run (the best checkpoint).
    pub best: Tracker,
    /// Images left out by `data.on_bad_image = "skip"`.
    pub skipped_images: usize,
    /// Run status.
    pub status: Status,
    /// `(epoch, step)` where the loss stopped being finite.
    pub diverged_at: Option<(usize, usize)>,
    /// What stopped a diverged or failed run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The phase whose head the model carries (`PhasePlan::head_from`; 0 for the first head).
    #[serde(default)]
    pub head_from: usize,
    /// Store the whole model in checkpoints and `model.bpk`: the run resumed from a checkpoint
    /// that held it whole (written before frozen layers were left out) and whose frozen layers
    /// are not the weights file's any more, so they cannot be referred to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub store_whole: bool,
}

impl Progress {
    /// On to the next phase: its epochs, steps, schedule and early stopping start afresh.
    fn next_phase(&mut self) {
        self.phase += 1;
        self.epoch_in_phase = 0;
        self.step = 0;
        self.phase_done = false;
        self.schedule = ScheduleState::default();
        self.stopping = Tracker::default();
    }

    /// Records that the loss stopped being finite in epoch `epoch` (at `self.step`): the epoch's
    /// partial training metrics with NaN validation, the status and the error.
    fn diverged(&mut self, epoch: usize, lr: f64) {
        let p = std::mem::take(&mut self.partial);
        let n = p.seen.max(1) as f64;
        self.history.push(EpochMetrics {
            epoch,
            phase: self.phase,
            train_loss: p.loss_sum / n,
            train_acc: p.correct as f64 / n,
            val_loss: f64::NAN,
            val_acc: f64::NAN,
            lr,
            seconds: p.seconds,
        });
        self.status = Status::Diverged;
        self.diverged_at = Some((epoch, self.step));
        self.error = Some(format!(
            "diverged at epoch {epoch}, step {}: the training loss is not finite",
            self.step
        ));
    }

    /// What the results table records of it.
    pub fn record(&self) -> crate::metrics::RunRecord<'_> {
        crate::metrics::RunRecord {
            history: &self.history,
            status: self.status,
            skipped_images: self.skipped_images,
            error: self.error.as_deref(),
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Epochs, status and position.
    pub progress: Progress,
    /// Test split evaluation, when the data has a test split and the run completed.
    pub test: Option<Evaluation>,
    /// Per-image test predictions.
    pub predictions: Vec<Prediction>,
    /// The model as the run left it.
    pub model: TransferModel,
}

impl Outcome {
    /// A run that stopped before the test split (interrupted or diverged).
    fn stopped(progress: Progress, model: TransferModel) -> Self {
        Self {
            progress,
            test: None,
            predictions: Vec::new(),
            model,
        }
    }
}

/// How to run: identity, where results go, the cache, a checkpoint to resume and the Ctrl-C flag.
pub struct RunOptions {
    /// The run id.
    pub run_id: String,
    /// The results folder (checkpoints go under `<results>/<run_id>/`).
    pub results: std::path::PathBuf,
    /// Where the run came from.
    pub origin: Origin,
    /// Activations at the cutoff.
    pub cache: FeatureCache,
    /// A checkpoint to continue from.
    pub resume: Option<Checkpoint>,
    /// Set by the first Ctrl-C: finish the step, checkpoint, stop.
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// A model's weights as burnpack bytes, without the backbone layers `frozen` leaves out.
pub fn model_bytes(
    model: &TransferModel,
    frozen: Option<&FrozenBase>,
) -> Result<Vec<u8>, RecordError> {
    model.stored_record(frozen).into_bytes().map(|b| b.to_vec())
}

/// Loads burnpack bytes into `model` (parameter ids included, so optimizer state still fits).
/// With `frozen`, the bytes hold every parameter but the backbone layers it names, which
/// `model` must already hold (loaded from the weights file, checked by the caller); the record
/// must hold exactly the rest.
pub fn load_model_bytes(
    model: TransferModel,
    bytes: &[u8],
    frozen: Option<&FrozenBase>,
) -> Result<TransferModel, RecordError> {
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes.to_vec()))?;
    let want = model.stored_tensors(frozen);
    if frozen.is_some() && record.len() != want {
        return Err(RecordError::Validation(format!(
            "it holds {} tensors, but this model has {want} besides the frozen layers",
            record.len()
        )));
    }
    let cut = model.cut();
    model
        .try_load_record(record.allow_partial(frozen.is_some()))
        .map(|m| m.with_cut(cut))
}

/// The seed of the device before step `step` of epoch `epoch` (dropout masks).
fn step_seed(seed: u64, epoch: usize, step: usize) -> u64 {
    let mut z = seed
        ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic shuffling: SplitMix64 seeded from the run seed and the epoch.
pub fn shuffled(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut state = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

/// The training indices of one epoch: `steps` batches from successive shuffled passes; each
/// index comes with the pass it belongs to (passes after the first draw fresh transforms).
pub fn epoch_order(
    n: usize,
    batch: usize,
    steps: Option<usize>,
    seed: u64,
    epoch: usize,
) -> Vec<(usize, usize)> {
    let want = steps.map_or(n, |s| s * batch);
    let mut out = Vec::with_capacity(want);
    let mut pass = 0;
    while out.len() < want && n > 0 {
        let key = if pass == 0 {
            epoch
        } else {
            epoch + pass * 1_000_003
        };
        out.extend(
            shuffled(n, seed, key)
                .into_iter()
                .map(|i| (i, pass))
                .take(want - out.len()),
        );
        pass += 1;
    }
    out
}

/// Loss and accuracy of `model` (in validation mode) over a split's features, and each
/// example's class probabilities when `keep` is set. Each batch's mean loss and correct count stay
/// on the device until the split is done and are read back together (a second read for the
/// probabilities), then summed on the host in f64, batch by batch.
pub fn evaluate_with(
    model: &TransferModel,
    feats: &Features,
    plan: &Plan,
    device: &Device,
    keep: bool,
) -> Result<(Evaluation, Vec<Prediction>), DataError> {
    let m = model.valid();
    let plain = device.clone().without_autodiff();
    let kind = plan.spec.train.loss;
    let mut stats = Vec::new();
    let mut sizes = Vec::new();
    let mut logits_all = Vec::new();
    let indices: Vec<usize> = (0..feats.len()).collect();
    for chunk in indices.chunks(plan.spec.data.batch_size) {
        let (x, y) = feats.batch(chunk, &plain)?;
        let logits = m.forward_from_cut(x);
        let correct = loss::correct_on_device(kind, logits.clone(), &y);
        stats.push(Tensor::cat(
            vec![loss::loss(kind, logits.clone(), &y), correct],
            0,
        ));
        sizes.push(chunk.len());
        if keep {
            logits_all.push(logits);
        }
    }
    let n = feats.len().max(1) as f64;
    let (mut loss_sum, mut correct) = (0.0, 0.0);
    if !stats.is_empty() {
        let v: Vec<f32> = Tensor::cat(stats, 0).into_data().iter::<f32>().collect();
        for (pair, n) in v.chunks_exact(2).zip(&sizes) {
            loss_sum += f64::from(pair[0]) * *n as f64;
            correct += f64::from(pair[1]).round();
        }
    }
    let e = Evaluation {
        loss: loss_sum / n,
        acc: correct / n,
    };
    let mut out = Vec::new();
    if !logits_all.is_empty() {
        let probs = loss::probabilities(kind, Tensor::cat(logits_all, 0));
        for (i, p) in probs.into_iter().enumerate() {
            out.push(Prediction {
                path: feats.paths[i].clone(),
                label: feats.labels[i],
                probabilities: p,
            });
        }
    }
    Ok((e, out))
}

/// The predictions of two views of the same images averaged, with the loss (`-ln p(label)`,
/// `p` clipped to Keras' 1e-7) and accuracy of the averaged probabilities.
pub fn averaged(mut a: Vec<Prediction>, b: &[Prediction]) -> (Evaluation, Vec<Prediction>) {
    let (mut loss, mut correct) = (0.0, 0usize);
    for (p, q) in a.iter_mut().zip(b) {
        for (x, y) in p.probabilities.iter_mut().zip(&q.probabilities) {
            *x = (*x + *y) / 2.0;
        }
        let at = p.probabilities.get(p.label).copied().unwrap_or(0.0);
        loss -= f64::from(at.clamp(1e-7, 1.0)).ln();
        correct += usize::from(crate::metrics::predicted_class(&p.probabilities) == p.label);
    }
    let n = a.len().max(1) as f64;
    let e = Evaluation {
        loss: loss / n,
        acc: correct as f64 / n,
    };
    (e, a)
}

/// Loss and accuracy of `model` (in validation mode) over a split's features.
pub fn evaluate(
    model: &TransferModel,
    feats: &Features,
    plan: &Plan,
    device: &Device,
) -> Result<Evaluation, DataError> {
    Ok(evaluate_with(model, feats, plan, device, false)?.0)
}

/// Where training batches come from.
// One per phase: boxing the model would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum TrainSource<'a> {
    /// Activations at the cutoff, computed once (no augmentation).
    Features(&'a Features),
    /// Decoded images, augmented per step and run through the frozen part of the base (a
    /// `valid()` copy, so no gradients and no stored activations).
    Augmented {
        /// The training images.
        images: &'a Images,
        /// The transforms.
        spec: &'a AugmentSpec,
        /// The model without autodiff, for the frozen prefix.
        frozen: TransferModel,
    },
}

impl TrainSource<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Features(f) => f.len(),
            Self::Augmented { images, .. } => images.len(),
        }
    }
}

/// One step's loss and correct count: computed on the host (the hand-written CPU step) or still
/// on the device as a `[loss, correct]` tensor.
enum Stat {
    Host(f32, usize),
    Device(Box<Tensor<1>>),
}

/// Steps whose statistics have not been added to the epoch's sums yet.
#[derive(Default)]
struct Pending {
    /// Each step's statistics, its batch size and the step count after it.
    steps: Vec<(Stat, usize, usize)>,
}

/// Reads of training statistics back to the host (one per [`Pending::read_into`] that had device
/// values): a count that tests hold a GPU epoch to.
static STAT_READS: AtomicUsize = AtomicUsize::new(0);

/// How many times the training loop has read statistics back from the device in this process.
pub fn stat_reads() -> usize {
    STAT_READS.load(Ordering::SeqCst)
}

/// A step's loss was not finite (the run diverged).
struct NotFinite;

impl Pending {
    fn push(&mut self, stat: Stat, batch: usize, step: usize) {
        self.steps.push((stat, batch, step));
    }

    /// Reads every pending step's values back (one read for all of them) and adds them to the
    /// epoch's sums in order, up to and including the first step whose loss is not finite; that
    /// one sets `progress.step` and is reported as [`NotFinite`].
    fn read_into(&mut self, progress: &mut Progress) -> Result<(), NotFinite> {
        if self.steps.is_empty() {
            return Ok(());
        }
        let steps = std::mem::take(&mut self.steps);
        let on_device: Vec<Tensor<1>> = steps
            .iter()
            .filter_map(|(s, ..)| match s {
                Stat::Device(t) => Some((**t).clone()),
                Stat::Host(..) => None,
            })
            .collect();
        let mut read = Vec::new().into_iter();
        if !on_device.is_empty() {
            STAT_READS.fetch_add(1, Ordering::SeqCst);
            read = Tensor::cat(on_device, 0)
                .into_data()
                .iter::<f32>()
                .collect::<Vec<f32>>()
                .into_iter();
        }
        for (stat, batch, step) in steps {
            let (value, correct) = match stat {
                Stat::Host(v, c) => (v, c),
                Stat::Device(_) => {
                    let v = read.next().unwrap_or(f32::NAN);
                    let c = read.next().unwrap_or(0.0);
                    (v, c.round().max(0.0) as usize)
                }
            };
            let p = &mut progress.partial;
            p.loss_sum += f64::from(value) * batch as f64;
            p.correct += correct;
            p.seen += batch;
            if !value.is_finite() {
                progress.step = step;
                return Err(NotFinite);
            }
        }
        Ok(())
    }
}

/// How a run of steps ended.
enum StepsEnd {
    Finished(TransferModel),
    Interrupted(TransferModel),
    Diverged(TransferModel),
    /// An image of a split decoded on demand could not be read again.
    Failed(DataError),
}

/// One phase's optimizer and schedule, and the settings its steps need.
pub struct PhaseRunner<'a> {
    plan: &'a Plan,
    device: &'a Device,
    run: &'a str,
    /// The phase's optimizer.
    pub optimizer: ModuleOptimizer,
    /// The phase's learning-rate schedule.
    pub schedule: Schedule,
    steps: usize,
    last_lr: f64,
    interrupt: Option<Arc<AtomicBool>>,
    /// Whether steps are computed by hand (`hand::HandPath`: dense heads, VGG convolutions above
    /// the cutoff, on the CPU) where they can; burn's autodiff otherwise. On by default; tests
    /// compare the two.
    pub by_hand: bool,
    /// The phase's cached training activations in device memory (GPU only; `Some(None)` when
    /// they do not fit).
    resident: Option<Option<Tensor<4>>>,
}

impl<'a> PhaseRunner<'a> {
    /// A fresh optimizer and schedule for `phase`, whose epochs have `steps` steps.
    pub fn new(
        plan: &'a Plan,
        phase: &PhasePlan,
        steps: usize,
        device: &'a Device,
        run: &'a str,
    ) -> Self {
        let lr = phase.optimizer.lr();
        Self {
            plan,
            device,
            run,
            optimizer: optim::build(&phase.optimizer, plan.spec.train.clip_grad_norm),
            schedule: Schedule::new(
                &phase.schedule,
                lr,
                steps,
                phase.epochs,
                plan.spec.train.monitor,
            ),
            steps,
            last_lr: lr,
            interrupt: None,
            by_hand: true,
            resident: None,
        }
    }

    fn interrupted(&self) -> bool {
        self.interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
    }

    /// Trains on `batches` (the epoch's remaining ones), updating `progress`.
    ///
    /// Each step's loss and correct count stay on the device until they are read back, all at
    /// once: every step on the CPU (where a read costs nothing and the loss is checked before the
    /// update), every log interval (a tenth of the epoch) on a GPU, so that the device is never
    /// waited for in between. A loss that is not finite stops the run at the step that produced it.
    fn steps(
        &mut self,
        mut model: TransferModel,
        progress: &mut Progress,
        epoch: usize,
        started: Instant,
        batches: impl Iterator<Item = (Tensor<4>, Vec<usize>)>,
    ) -> StepsEnd {
        let kind = self.plan.spec.train.loss;
        let eps = self.plan.spec.train.label_smoothing.unwrap_or(0.0) as f32;
        let seed = self.plan.spec.experiment.seed;
        let report_every = self.steps.div_ceil(10).max(1);
        let read_every = if crate::cpu::is_cpu(self.device) {
            1
        } else {
            report_every
        };
        let hand = self
            .by_hand
            .then(|| hand::HandPath::of(&model, self.device, kind))
            .flatten()
            .map(|p| p.with_label_smoothing(eps));
        let mut pending = Pending::default();
        for (x, y) in batches {
            let at = progress.epoch_in_phase * self.steps + progress.step;
            let lr = self.schedule.lr(at);
            crate::device::seed_host(step_seed(seed, epoch, progress.step));
            let (stat, grads) = match &hand {
                Some(path) => {
                    let step = path.step(&mut model, x, &y);
                    (Stat::Host(step.loss, step.correct), step.grads)
                }
                None => {
                    let logits = model.forward_from_cut(x);
                    let correct =
                        loss::correct_on_device(kind, logits.clone().without_autodiff(), &y);
                    let l = loss::smoothed(kind, logits, &y, eps);
                    let grads = l.backward();
                    let stat = Tensor::cat(vec![l.without_autodiff(), correct], 0);
                    (
                        Stat::Device(Box::new(stat)),
                        GradientsParams::from_grads(grads, &model),
                    )
                }
            };
            progress.step += 1;
            pending.push(stat, y.len(), progress.step);
            let due = progress.step.is_multiple_of(read_every) || progress.step >= self.steps;
            if due && pending.read_into(progress).is_err() {
                return StepsEnd::Diverged(model);
            }
            model = self.optimizer.step(lr, model, grads);
            if hand.is_some() {
                hand::release_graphs(self.device);
            }
            self.last_lr = lr;
            if due {
                self.report(progress, epoch, started, lr, report_every);
            }
            if self.interrupted() {
                if pending.read_into(progress).is_err() {
                    return StepsEnd::Diverged(model);
                }
                return StepsEnd::Interrupted(model);
            }
        }
        if pending.read_into(progress).is_err() {
            return StepsEnd::Diverged(model);
        }
        StepsEnd::Finished(model)
    }

    /// The progress bar, and a log line every `report_every` steps.
    fn report(
        &self,
        progress: &Progress,
        epoch: usize,
        started: Instant,
        lr: f64,
        report_every: usize,
    ) {
        let p = &progress.partial;
        let rate = p.seen as f64 / (p.seconds + started.elapsed().as_secs_f64()).max(1e-9);
        let seen = p.seen.max(1) as f64;
        crate::logging::progress(
            epoch,
            progress.step,
            self.steps,
            p.loss_sum / seen,
            p.correct as f64 / seen,
            rate,
        );
        if progress.step.is_multiple_of(report_every) || progress.step == self.steps {
            let (loss, acc) = (p.loss_sum / seen, p.correct as f64 / seen);
            crate::tensorboard::batch(epoch, progress.step, self.steps, loss, acc, lr);
        }
        if progress.step.is_multiple_of(report_every) && progress.step < self.steps {
            info!(
                target: "runner::progress",
                run = self.run,
                epoch,
                step = progress.step,
                steps = self.steps,
                lr,
                loss = p.loss_sum / seen,
                acc = p.correct as f64 / seen,
                images_per_s = rate,
                "Training."
            );
        }
    }

    /// Runs the rest of epoch `epoch` from `progress.step`.
    fn epoch(
        &mut self,
        model: TransferModel,
        train: &TrainSource<'_>,
        progress: &mut Progress,
        epoch: usize,
    ) -> StepsEnd {
        let spec = &self.plan.spec;
        let (seed, batch) = (spec.experiment.seed, spec.data.batch_size);
        let started = Instant::now();
        let order = epoch_order(train.len(), batch, spec.train.steps_per_epoch, seed, epoch);
        let chunks: Vec<&[(usize, usize)]> = order.chunks(batch).skip(progress.step).collect();
        let device = self.device;
        let plain = device.clone().without_autodiff();
        let end = match train {
            TrainSource::Features(f) => {
                // On a GPU the whole split stays in device memory for the phase (when it fits)
                // and each batch is gathered there; on the CPU batches are copied out.
                if self.resident.is_none() && !crate::cpu::is_cpu(device) {
                    self.resident = Some(f.resident(&plain));
                }
                let resident = self.resident.clone().flatten();
                // A cache file that no longer reads ends the epoch with its error.
                let failed = std::sync::Mutex::new(None);
                let batches = chunks.iter().map_while(|chunk| {
                    let idx: Vec<usize> = chunk.iter().map(|(i, _)| *i).collect();
                    match &resident {
                        Some(all) => Some(f.gather(all, &idx)),
                        None => f
                            .batch(&idx, device)
                            .map_err(|e| {
                                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e)
                            })
                            .ok(),
                    }
                });
                // On the CPU, on a worker of the thread pool: the parallel parts of each step
                // then start there instead of waking the pool from outside and sleeping until
                // it is done. (A GPU's work is queued from this thread.)
                let end = if crate::cpu::is_cpu(device) {
                    rayon::scope(|_| self.steps(model, progress, epoch, started, batches))
                } else {
                    self.steps(model, progress, epoch, started, batches)
                };
                match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    Some(e) => StepsEnd::Failed(e),
                    None => end,
                }
            }
            TrainSource::Augmented {
                images,
                spec: aug,
                frozen,
            } => {
                // Augmentation, preprocessing and the upload of the next batches run on another
                // thread while this one computes; the channel bounds how far ahead it gets.
                // A split decoded on demand is decoded there too; an image that fails then ends
                // the epoch with its error.
                let preprocess = self.plan.preprocess;
                let failed = std::cell::Cell::new(None);
                let end = std::thread::scope(|scope| {
                    let (tx, rx) = std::sync::mpsc::sync_channel(2);
                    let chunks_ref = &chunks;
                    let plain = &plain;
                    scope.spawn(move || {
                        for chunk in chunks_ref {
                            let x = augment::augment_pass_batch(images, chunk, aug, seed, epoch)
                                .map(|pixels| {
                                    data::pixels_tensor(
                                        &pixels,
                                        chunk.len(),
                                        [images.height, images.width],
                                        preprocess,
                                        plain,
                                    )
                                });
                            let stop = x.is_err();
                            if tx.send(x).is_err() || stop {
                                return;
                            }
                        }
                    });
                    let received = rx
                        .iter()
                        .map_while(|x| x.map_err(|e| failed.set(Some(e))).ok());
                    let batches = chunks.iter().zip(received).map(|(chunk, x)| {
                        let y: Vec<usize> = chunk.iter().map(|(i, _)| images.labels[*i]).collect();
                        (frozen.frozen_features(x).autodiff(), y)
                    });
                    self.steps(model, progress, epoch, started, batches)
                });
                match failed.take() {
                    Some(e) => StepsEnd::Failed(e),
                    None => end,
                }
            }
        };
        progress.partial.seconds += started.elapsed().as_secs_f64();
        crate::logging::progress_done();
        end
    }
}

/// Trains `model` for `epochs` epochs on `train`, validating after each (no checkpoints, no
/// phases: the benchmark's loop).
pub fn fit(
    model: TransferModel,
    train: &TrainSource<'_>,
    validation: &Features,
    plan: &Plan,
    device: &Device,
    run: &str,
) -> (TransferModel, Vec<EpochMetrics>) {
    fit_with(model, train, validation, plan, device, run, true)
}

/// [`fit`], with steps computed by hand allowed (`by_hand`) or not.
pub fn fit_with(
    mut model: TransferModel,
    train: &TrainSource<'_>,
    validation: &Features,
    plan: &Plan,
    device: &Device,
    run: &str,
    by_hand: bool,
) -> (TransferModel, Vec<EpochMetrics>) {
    let phase = &plan.phases[0];
    let steps = steps_per_epoch(plan, train.len());
    let mut runner = PhaseRunner::new(plan, phase, steps, device, run);
    runner.by_hand = by_hand;
    let mut progress = Progress::default();
    for epoch in 1..=phase.epochs {
        model = match runner.epoch(model, train, &mut progress, epoch) {
            StepsEnd::Finished(m) | StepsEnd::Interrupted(m) | StepsEnd::Diverged(m) => m,
            // The benchmark's splits are held in memory.
            StepsEnd::Failed(e) => panic!("{e}"),
        };
        let m = finish_epoch(&mut progress, &runner, &model, validation, epoch, run);
        progress.history.push(m.unwrap_or_else(|e| panic!("{e}")));
    }
    (model, progress.history)
}

/// Steps per epoch: `train.steps_per_epoch`, or one pass over `n` examples.
fn steps_per_epoch(plan: &Plan, n: usize) -> usize {
    plan.spec
        .train
        .steps_per_epoch
        .unwrap_or_else(|| n.div_ceil(plan.spec.data.batch_size))
        .max(1)
}

/// Validates and turns the epoch's sums into its metrics; resets the sums.
fn finish_epoch(
    progress: &mut Progress,
    runner: &PhaseRunner<'_>,
    model: &TransferModel,
    validation: &Features,
    epoch: usize,
    run: &str,
) -> Result<EpochMetrics, DataError> {
    let started = Instant::now();
    let val = evaluate(model, validation, runner.plan, runner.device)?;
    let p = std::mem::take(&mut progress.partial);
    let n = p.seen.max(1) as f64;
    let m = EpochMetrics {
        epoch,
        phase: progress.phase,
        train_loss: p.loss_sum / n,
        train_acc: p.correct as f64 / n,
        val_loss: val.loss,
        val_acc: val.acc,
        lr: runner.last_lr,
        seconds: p.seconds + started.elapsed().as_secs_f64(),
    };
    progress.step = 0;
    progress.epoch_in_phase += 1;
    let phase = &runner.plan.phases[m.phase];
    info!(
        run,
        epoch,
        phase = %phase.name,
        phase_epoch = progress.epoch_in_phase,
        phase_epochs = phase.epochs,
        epochs = runner.plan.phases.iter().map(|p| p.epochs).sum::<usize>(),
        steps = runner.steps,
        train_loss = m.train_loss,
        train_acc = m.train_acc,
        val_loss = m.val_loss,
        val_acc = m.val_acc,
        lr = m.lr,
        seconds = m.seconds,
        "Epoch finished."
    );
    Ok(m)
}

/// Decodes every split and applies the `data.on_bad_image` policy: `fail` lists every bad file
/// of every split; `skip` logs each and leaves it out. Returns the images and the skipped count.
fn load_images(plan: &Plan, run: &str) -> Result<(Vec<Images>, usize), TrainError> {
    let spec = &plan.spec;
    let mut images = Vec::new();
    let mut bad = Vec::new();
    // Only an augmented training split is read image by image every epoch, and it is held in
    // memory when it fits `data.max_decoded_mib`; every other split is read once per phase by
    // the feature extraction, and a larger augmented one once per epoch, so they are decoded
    // again batch by batch instead of being held (memory stays flat however many images a split
    // has).
    let augmented = plan.phases.iter().any(|p| p.augment.is_some());
    let [h, w] = spec.data.image_size;
    let budget = spec.data.max_decoded_mib.unwrap_or(MAX_DECODED_MIB) << 20;
    for (k, listing) in plan.splits.iter().enumerate() {
        let fits = (listing.files.len() as u64).saturating_mul((h * w * 3) as u64) <= budget;
        let keep = k == 0 && augmented && fits;
        if k == 0 && augmented && !fits {
            info!(run, split = %listing.name, images = listing.files.len(), max_decoded_mib = budget >> 20, "The augmented split is larger than data.max_decoded_mib: it is decoded again batch by batch every epoch.");
        }
        let (imgs, report) = data::folder::load_split_with(
            listing,
            spec.data.image_size,
            spec.data.interpolation,
            keep,
        );
        for (path, note) in &report.converted {
            debug!(run, path = %path.display(), note, "Image converted.");
        }
        if !report.converted.is_empty() {
            warn!(run, split = %listing.name, images = report.converted.len(), first = %report.converted[0].0.display(), note = %report.converted[0].1, "Images converted to 8-bit RGB.");
        }
        info!(run, split = %listing.name, images = imgs.len(), bad = report.bad.len(), "Split decoded.");
        bad.extend(report.bad);
        images.push(imgs);
    }
    if bad.is_empty() {
        return Ok((images, 0));
    }
    if spec.data.on_bad_image == OnBadImage::Fail {
        return Err(DataError::BadImages(bad).into());
    }
    for (path, reason) in &bad {
        warn!(run, path = %path.display(), reason, "Image skipped.");
    }
    for (imgs, listing) in images.iter().zip(&plan.splits) {
        for (label, class) in listing.classes.iter().enumerate() {
            if !imgs.labels.contains(&label) {
                return Err(TrainError::EmptyClass {
                    dir: listing.dir.join(class),
                });
            }
        }
    }
    Ok((images, bad.len()))
}

/// Builds the checkpoint of the current state and writes it as `last.ckpt`.
fn write_last(
    opts: &RunOptions,
    progress: &Progress,
    (model, frozen): (&TransferModel, Option<&FrozenBase>),
    optimizer: &ModuleOptimizer,
    phase_best: Option<&TransferModel>,
) -> Result<Checkpoint, TrainError> {
    let ck = checkpoint_of(opts, progress, (model, frozen), optimizer, phase_best)?;
    checkpoint::write(&checkpoint::last_path(&opts.results, &opts.run_id), &ck)?;
    Ok(ck)
}

/// The checkpoint of the current state.
fn checkpoint_of(
    opts: &RunOptions,
    progress: &Progress,
    (model, frozen): (&TransferModel, Option<&FrozenBase>),
    optimizer: &ModuleOptimizer,
    phase_best: Option<&TransferModel>,
) -> Result<Checkpoint, TrainError> {
    let path = checkpoint::last_path(&opts.results, &opts.run_id);
    let fail =
        |e: burn::store::RecordError| TrainError::Write(crate::io::WriteError::new(&path, e));
    Ok(Checkpoint {
        state: checkpoint::State {
            run_id: opts.run_id.clone(),
            origin: opts.origin.clone(),
            progress: progress.clone(),
            frozen: frozen.cloned(),
        },
        model: model_bytes(model, frozen).map_err(fail)?,
        optimizer: optimizer.into_bytes().map(|b| b.to_vec()).map_err(fail)?,
        phase_best: match phase_best {
            Some(m) => model_bytes(m, frozen).map_err(fail)?,
            None => Vec::new(),
        },
    })
}

/// The whole run: decode, build (or restore a checkpoint), then each phase: activations at its
/// cutoff, training with a checkpoint after every epoch; then the test split. `on_update` is
/// called after every epoch and when the run stops, to write the results.
pub fn run(
    plan: &Plan,
    device: &Device,
    mut opts: RunOptions,
    mut on_update: impl FnMut(&Progress),
) -> Result<Outcome, TrainError> {
    let spec = &plan.spec;
    let run_id = opts.run_id.clone();
    let run = run_id.as_str();
    let started = Instant::now();
    info!(run, phase = "load_data", dir = %plan.data_dir.display(), "Phase started.");
    let (images, skipped) = load_images(plan, run)?;
    info!(
        run,
        phase = "load_data",
        skipped_images = skipped,
        seconds = started.elapsed().as_secs_f64(),
        "Phase finished."
    );

    info!(run, phase = "build_model", weights = %plan.weights.display(), "Phase started.");
    crate::device::seed_host(spec.experiment.seed);
    let mut model = TransferModel::build(plan, device)?;
    let mut progress = Progress {
        skipped_images: skipped,
        ..Default::default()
    };
    let mut optimizer_state: Option<Vec<u8>> = None;
    let mut phase_best: Option<TransferModel> = None;
    if let Some(ck) = opts.resume.take() {
        let path = checkpoint::last_path(&opts.results, run);
        let from = ck.state.progress.head_from;
        if from != 0 {
            // The checkpoint holds the head a later phase started: that model's shape.
            model =
                crate::model::ModelConfig::for_phase(plan, from).assemble(model.backbone, device);
        }
        // A checkpoint that holds the whole model: are its frozen layers still the file's?
        let frozen = plan.frozen_layers(ck.state.progress.phase);
        let whole = ck.state.frozen.is_none() && ck.state.progress.phase < plan.phases.len();
        let file_digest = whole.then(|| model.backbone.digest_before(frozen));
        let restored = restore(model, ck, (&path, &plan.weights))?;
        (model, phase_best, optimizer_state, progress) = restored;
        if file_digest.is_some_and(|d| d != model.backbone.digest_before(frozen)) {
            tracing::warn!(
                run,
                weights = %plan.weights.display(),
                "The checkpoint's frozen layers differ from this weights file (changed since the run started?): the run goes on with the checkpoint's values and stores its whole model."
            );
            progress.store_whole = true;
        }
        info!(
            run,
            phase = %plan.phases.get(progress.phase).map_or("", |p| p.name.as_str()),
            epochs_done = progress.history.len(),
            step = progress.step,
            "Run resumed."
        );
    }
    let validation = validation_sample(plan, &images[1]);

    let mut cache = std::mem::take(&mut opts.cache);
    cache.interrupt_on(opts.interrupt.clone());
    while progress.phase < plan.phases.len() {
        let ph = &plan.phases[progress.phase];
        if progress.phase_done || progress.epoch_in_phase >= ph.epochs {
            progress.next_phase();
            optimizer_state = None;
            phase_best = None;
            continue;
        }
        if ph.head_from != progress.head_from {
            model = new_head(plan, &mut progress, model, device, run);
        }
        let ctx = Ctx {
            plan,
            device,
            opts: &opts,
            images: &images,
            validation: &validation,
            run,
        };
        let state = optimizer_state.take();
        match run_phase(
            ctx,
            &mut cache,
            &mut progress,
            model,
            state,
            &mut phase_best,
            &mut on_update,
        )? {
            PhaseEnd::Finished(m) => model = m,
            PhaseEnd::Stopped(outcome) => return Ok(outcome),
        }
    }

    progress.status = Status::Completed;
    let (test, predictions) = match images.get(2) {
        Some(t) => match test_evaluation(&mut cache, &model, t, plan, device, run) {
            Ok((e, p)) => (Some(e), p),
            Err(ExtractError::Data(e)) => return Err(e.into()),
            Err(ExtractError::Interrupted) => {
                let at = (opts.results.as_path(), run);
                return Ok(interrupted(&mut progress, model, &mut on_update, at));
            }
        },
        None => (None, Vec::new()),
    };
    Ok(Outcome {
        progress,
        test,
        predictions,
        model,
    })
}

/// The model with the fresh head of the current phase (`[[phase.head.layers]]`) on the
/// backbone as trained so far. Its weights are drawn from a seed of its own (the experiment's
/// and the phase's), so a resumed run draws the same. The run's best checkpoint starts again
/// with it: the new head's first improving epoch replaces `best.ckpt` (each checkpoint records
/// its `head_from`, so `runner predict` builds the head it holds).
fn new_head(
    plan: &Plan,
    progress: &mut Progress,
    model: TransferModel,
    device: &Device,
    run: &str,
) -> TransferModel {
    let ph = &plan.phases[progress.phase];
    crate::device::seed_host(step_seed(
        plan.spec.experiment.seed,
        ph.head_from,
        usize::MAX,
    ));
    let config = crate::model::ModelConfig::for_phase(plan, progress.phase);
    let model = config.assemble(model.backbone, device);
    progress.head_from = ph.head_from;
    progress.best = Tracker::default();
    let params: usize = ph.head_shapes.iter().map(|(_, p)| p).sum();
    info!(
        run,
        phase = %ph.name,
        head = %crate::spec::describe_layers(&ph.head),
        params,
        "New head."
    );
    model
}

/// What a run works with, phase after phase.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    plan: &'a Plan,
    device: &'a Device,
    opts: &'a RunOptions,
    images: &'a [Images],
    validation: &'a Images,
    run: &'a str,
}

/// How a phase ended: with its model (the run goes on) or with the run stopped.
#[allow(clippy::large_enum_variant)] // once per phase, moved once
enum PhaseEnd {
    Finished(TransferModel),
    Stopped(Outcome),
}

/// Runs the current phase of `progress` to its end (its epochs, or early stopping), from
/// `model` (and a resumed optimizer state), writing a checkpoint and calling `on_update` after
/// every epoch; stops the run when interrupted or diverged.
fn run_phase(
    ctx: Ctx<'_>,
    cache: &mut FeatureCache,
    progress: &mut Progress,
    mut model: TransferModel,
    optimizer_state: Option<Vec<u8>>,
    phase_best: &mut Option<TransferModel>,
    on_update: &mut impl FnMut(&Progress),
) -> Result<PhaseEnd, TrainError> {
    let Ctx {
        plan,
        device,
        opts,
        images,
        run,
        ..
    } = ctx;
    let spec = &plan.spec;
    let ph = &plan.phases[progress.phase];
    let phase_started = Instant::now();
    model = model.with_cut(ph.cutoff.index);
    // What no phase so far trained stays out of the checkpoints (the weights file holds it).
    let frozen = (!progress.store_whole)
        .then(|| model.frozen_base(plan.frozen_layers(progress.phase), &plan.weights))
        .flatten();
    let frozen = frozen.as_ref();
    info!(
        run,
        phase = %ph.name,
        epochs = ph.epochs,
        trainable_from = %ph.cutoff.label,
        optimizer = ph.optimizer.kind(),
        lr = ph.optimizer.lr(),
        schedule = ph.schedule.kind(),
        augmented = ph.augment.is_some(),
        "Phase started."
    );
    let extracted = phase_features(cache, &model, ph.augment.is_none(), ctx);
    let (train_feats, val_feats) = match extracted {
        Ok(f) => f,
        Err(ExtractError::Data(e)) => return Err(e.into()),
        Err(ExtractError::Interrupted) => {
            let at = (opts.results.as_path(), run);
            return Ok(PhaseEnd::Stopped(interrupted(
                progress, model, on_update, at,
            )));
        }
    };
    let source = match (&ph.augment, &train_feats) {
        (Some(aug), _) => TrainSource::Augmented {
            images: &images[0],
            spec: aug,
            frozen: model.valid(),
        },
        (None, Some(f)) => TrainSource::Features(f),
        (None, None) => unreachable!("features are extracted when there is no augmentation"),
    };
    let steps = steps_per_epoch(plan, source.len());
    let mut runner = PhaseRunner::new(plan, ph, steps, device, run);
    runner.interrupt = opts.interrupt.clone();
    runner.schedule.state = progress.schedule.clone();
    if let Some(bytes) = optimizer_state {
        let path = checkpoint::last_path(&opts.results, run);
        runner.optimizer = restore_optimizer(ph, spec, bytes, path)?;
    }
    while progress.epoch_in_phase < ph.epochs && !progress.phase_done {
        let epoch = progress.history.len() + 1;
        match runner.epoch(model, &source, progress, epoch) {
            StepsEnd::Finished(m) => model = m,
            StepsEnd::Failed(e) => return Err(e.into()), // last.ckpt stays, to resume from
            StepsEnd::Interrupted(m) => {
                progress.status = Status::Interrupted;
                let at = (&m, frozen);
                write_last(opts, progress, at, &runner.optimizer, phase_best.as_ref())?;
                on_update(progress);
                let step = progress.step;
                warn!(run, epoch, step, "Interrupted; checkpoint written.");
                return Ok(PhaseEnd::Stopped(Outcome::stopped(
                    std::mem::take(progress),
                    m,
                )));
            }
            StepsEnd::Diverged(m) => {
                progress.diverged(epoch, runner.last_lr);
                tracing::error!(
                    run,
                    epoch,
                    step = progress.step,
                    phase = %ph.name,
                    lr = runner.last_lr,
                    "Training diverged: the loss is not finite. The last good checkpoint is kept; try a lower learning rate or train.clip_grad_norm."
                );
                on_update(progress);
                return Ok(PhaseEnd::Stopped(Outcome::stopped(
                    std::mem::take(progress),
                    m,
                )));
            }
        }
        let m = finish_epoch(progress, &runner, &model, &val_feats, epoch, run)?;
        if let Some(lr) = runner.schedule.epoch_end(&m) {
            info!(run, epoch, lr, "Learning rate reduced on plateau.");
        }
        progress.schedule = runner.schedule.state.clone();
        if let Some(es) = &ph.early_stopping {
            let at = (run, ph.name.as_str());
            let monitor = spec.train.monitor;
            model = early_stopping(es, monitor, progress, model, phase_best, &m, at);
        }
        let improved = progress.best.update(
            schedule::metric(&m, spec.train.monitor),
            m.epoch,
            spec.train.monitor,
            0.0,
        );
        progress.history.push(m);
        // A Ctrl-C during validation stops here, with this epoch's checkpoint.
        let interrupted = runner.interrupted();
        if interrupted {
            progress.status = Status::Interrupted;
        }
        let ck = write_last(
            opts,
            progress,
            (&model, frozen),
            &runner.optimizer,
            phase_best.as_ref(),
        )?;
        if improved {
            let last = checkpoint::last_path(&opts.results, run);
            checkpoint::copy(&last, &checkpoint::best_path(&opts.results, run), &ck)?;
        }
        on_update(progress);
        if interrupted {
            warn!(run, epoch, "Interrupted; checkpoint written.");
            return Ok(PhaseEnd::Stopped(Outcome::stopped(
                std::mem::take(progress),
                model,
            )));
        }
    }
    drop(source);
    info!(
        run,
        phase = %ph.name,
        seconds = phase_started.elapsed().as_secs_f64(),
        "Phase finished."
    );
    Ok(PhaseEnd::Finished(model))
}

/// Early stopping after epoch `m`: keeps the phase's best model when `restore_best` asks, and
/// ends the phase (restoring that model) when the monitor stopped improving. Returns the model
/// to go on with.
fn early_stopping(
    es: &crate::spec::EarlyStoppingSpec,
    monitor: crate::spec::Monitor,
    progress: &mut Progress,
    mut model: TransferModel,
    phase_best: &mut Option<TransferModel>,
    m: &EpochMetrics,
    (run, phase): (&str, &str),
) -> TransferModel {
    let d = schedule::early_stopping(es, monitor, &mut progress.stopping, m);
    if d.improved && es.restore_best {
        *phase_best = Some(model.clone());
    }
    if d.stop {
        progress.phase_done = true;
        let restored = es.restore_best && phase_best.is_some();
        if let Some(best) = phase_best.take().filter(|_| es.restore_best) {
            model = best;
        }
        let best_epoch = progress.stopping.best_epoch;
        info!(
            run,
            epoch = m.epoch,
            phase = %phase,
            best_epoch,
            restored,
            "Early stopping."
        );
    }
    model
}

/// A checkpoint's model, best-of-phase model, optimizer state and progress, onto `model`.
#[allow(clippy::type_complexity)]
fn restore(
    model: TransferModel,
    ck: Checkpoint,
    (path, weights): (&std::path::Path, &std::path::Path),
) -> Result<
    (
        TransferModel,
        Option<TransferModel>,
        Option<Vec<u8>>,
        Progress,
    ),
    TrainError,
> {
    let frozen = ck.state.frozen.as_ref();
    if let Some(f) = frozen.filter(|f| !f.matches(&model.backbone)) {
        return Err(TrainError::FrozenChanged {
            path: path.to_path_buf(),
            weights: weights.to_path_buf(),
            layers: f.layers,
        });
    }
    let restore = |m: TransferModel, bytes: &[u8]| {
        load_model_bytes(m, bytes, frozen).map_err(|error| TrainError::Restore {
            path: path.to_path_buf(),
            part: "",
            error,
        })
    };
    let model = restore(model, &ck.model)?;
    let phase_best = if ck.phase_best.is_empty() {
        None
    } else {
        Some(restore(model.clone(), &ck.phase_best)?)
    };
    let mut progress = ck.state.progress;
    progress.status = Status::Running;
    let optimizer = Some(ck.optimizer).filter(|b| !b.is_empty());
    Ok((model, phase_best, optimizer, progress))
}

/// The optimizer of phase `ph` with a checkpoint's state.
fn restore_optimizer(
    ph: &PhasePlan,
    spec: &crate::spec::Spec,
    bytes: Vec<u8>,
    path: std::path::PathBuf,
) -> Result<ModuleOptimizer, TrainError> {
    optim::build(&ph.optimizer, spec.train.clip_grad_norm)
        .from_bytes(Bytes::from_bytes_vec(bytes))
        .map_err(|error| TrainError::Restore {
            path,
            part: "optimizer state: ",
            error,
        })
}

/// The validation images: `train.validation_steps` batches of a fixed, seeded sample of the
/// split, or all of it.
fn validation_sample<'a>(plan: &Plan, images: &'a Images) -> std::borrow::Cow<'a, Images> {
    let spec = &plan.spec;
    let batch = spec.data.batch_size;
    match spec.train.validation_steps {
        Some(s) if s * batch < images.len() => {
            let mut idx: Vec<usize> = shuffled(images.len(), spec.experiment.seed, 0)
                .into_iter()
                .take(s * batch)
                .collect();
            idx.sort_unstable();
            std::borrow::Cow::Owned(images.subset(&idx))
        }
        _ => std::borrow::Cow::Borrowed(images),
    }
}

/// The training split's activations (when cached) and the validation split's.
type PhaseFeatures = (Option<Arc<Features>>, Arc<Features>);

/// The phase's activations at the cutoff: the training split's when it is not augmented, and
/// the validation split's.
fn phase_features(
    cache: &mut FeatureCache,
    model: &TransferModel,
    cached_training: bool,
    ctx: Ctx<'_>,
) -> Result<PhaseFeatures, ExtractError> {
    let Ctx {
        plan,
        device,
        images,
        validation,
        run,
        ..
    } = ctx;
    let train = cached_training
        .then(|| cache.features(model, &images[0], plan, device, run))
        .transpose()?;
    Ok((train, cache.features(model, validation, plan, device, run)?))
}

/// A run stopped by Ctrl-C during a feature extraction: recorded as interrupted, with the
/// epochs it finished (their checkpoint is already written).
fn interrupted(
    progress: &mut Progress,
    model: TransferModel,
    on_update: &mut impl FnMut(&Progress),
    (results, run): (&std::path::Path, &str),
) -> Outcome {
    progress.status = Status::Interrupted;
    if !checkpoint::last_path(results, run).exists() {
        progress.error = Some(
            "interrupted while extracting features, before the first checkpoint: nothing to resume; start the experiment again".into(),
        );
    }
    on_update(progress);
    Outcome::stopped(std::mem::take(progress), model)
}

/// The test split's loss, accuracy and per-image predictions.
fn test_evaluation(
    cache: &mut FeatureCache,
    model: &TransferModel,
    images: &Images,
    plan: &Plan,
    device: &Device,
    run: &str,
) -> Result<(Evaluation, Vec<Prediction>), ExtractError> {
    let f = cache.features(model, images, plan, device, run)?;
    let (e, p) = match plan.spec.train.test_time_augmentation {
        crate::spec::TestTimeAugmentation::None => evaluate_with(model, &f, plan, device, true)?,
        crate::spec::TestTimeAugmentation::HorizontalFlip => {
            let mirrored = cache.features(model, &images.mirrored(), plan, device, run)?;
            let (_, a) = evaluate_with(model, &f, plan, device, true)?;
            let (_, b) = evaluate_with(model, &mirrored, plan, device, true)?;
            averaged(a, &b)
        }
    };
    info!(
        run,
        phase = "test",
        test_loss = e.loss,
        test_acc = e.acc,
        "Test evaluation finished."
    );
    Ok((e, p))
}

#[cfg(test)]
mod tests {
    use super::shuffled;

    #[test]
    fn shuffling_is_a_permutation_fixed_by_seed_and_epoch() {
        let a = shuffled(100, 42, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, shuffled(100, 42, 1));
        assert_ne!(a, shuffled(100, 42, 2));
        assert_ne!(a, shuffled(100, 43, 1));
    }
}

#[cfg(test)]
mod order_tests {
    use super::epoch_order;

    #[test]
    fn steps_per_epoch_cycles_through_fresh_passes() {
        // The notebook: 100 steps of 20 over 2000 images is exactly one pass.
        let one = epoch_order(2000, 20, Some(100), 1, 1);
        assert_eq!(one.len(), 2000);
        assert!(one.iter().all(|(_, pass)| *pass == 0));
        // More steps than the split holds continue into a second, differently shuffled pass.
        let two = epoch_order(10, 4, Some(4), 1, 1);
        assert_eq!(two.len(), 16);
        assert_eq!(two.iter().filter(|(_, p)| *p == 1).count(), 6);
        let first: Vec<usize> = two[..10].iter().map(|(i, _)| *i).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        // Fewer steps take a prefix; no steps given is one pass.
        assert_eq!(epoch_order(10, 4, Some(1), 1, 1).len(), 4);
        assert_eq!(epoch_order(10, 4, None, 1, 1).len(), 10);
    }
}
