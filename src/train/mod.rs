//! The training loop: activations at the freeze cutoff are computed once per split (nothing
//! below the cutoff changes and no augmentation is declared), then only the part above is trained.

pub mod loss;
pub mod optim;

use std::time::Instant;

use burn::optim::GradientsParams;
use burn::prelude::*;
use tracing::{debug, info, warn};

use crate::backbone::weights::WeightsError;
use crate::data::{self, DataError, Images, augment};
use crate::model::TransferModel;
use crate::plan::Plan;
use crate::spec::{AugmentSpec, OnBadImage};

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
}

/// Metrics of one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches (dropout active).
    pub train_loss: f64,
    /// Training accuracy over the epoch.
    pub train_acc: f64,
    /// Validation loss.
    pub val_loss: f64,
    /// Validation accuracy.
    pub val_acc: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Wall time of the epoch, training and validation.
    pub seconds: f64,
}

/// Loss and accuracy on one split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean loss.
    pub loss: f64,
    /// Accuracy.
    pub acc: f64,
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// One entry per epoch.
    pub epochs: Vec<EpochMetrics>,
    /// Test split evaluation, when the data has a test split.
    pub test: Option<Evaluation>,
    /// The trained model.
    pub model: TransferModel,
    /// Images left out by `data.on_bad_image = "skip"`.
    pub skipped_images: usize,
}

/// Activations at the cutoff for every image of one split, `[n, c, h, w]` row-major.
#[derive(Debug, Clone)]
pub struct Features {
    /// Values.
    pub values: Vec<f32>,
    /// `[c, h, w]` of one example.
    pub shape: [usize; 3],
    /// Labels.
    pub labels: Vec<usize>,
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

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The first `n` examples.
    pub fn head(&self, n: usize) -> Self {
        let n = n.min(self.len());
        let per: usize = self.shape.iter().product();
        Self {
            values: self.values[..n * per].to_vec(),
            shape: self.shape,
            labels: self.labels[..n].to_vec(),
        }
    }
}

/// Runs the frozen part of the base once over a split.
pub fn extract_features(
    model: &TransferModel,
    images: &Images,
    plan: &Plan,
    device: &Device,
    run: &str,
) -> Features {
    let frozen = model.valid();
    let plain = device.clone().without_autodiff();
    let batch = plan.spec.data.batch_size;
    let shape = plan
        .backbone
        .shape_at(model.cut(), [images.height, images.width]);
    let mut values = Vec::with_capacity(images.len() * shape.iter().product::<usize>());
    let started = Instant::now();
    let n_batches = images.len().div_ceil(batch);
    let indices: Vec<usize> = (0..images.len()).collect();
    for (b, chunk) in indices.chunks(batch).enumerate() {
        let x = data::batch_tensor(images, chunk, plan.preprocess, &plain);
        let y = frozen.frozen_features(x);
        values.extend(y.into_data().iter::<f32>());
        if (b + 1) % 10 == 0 || b + 1 == n_batches {
            let done = ((b + 1) * batch).min(images.len());
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
            info!(run, split = %images.split, done, total = images.len(), images_per_s = format!("{rate:.1}"), "Extracting features.");
        }
    }
    Features {
        values,
        shape,
        labels: images.labels.clone(),
    }
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

/// Loss and accuracy of `model` (in validation mode) over a split's features.
pub fn evaluate(
    model: &TransferModel,
    feats: &Features,
    plan: &Plan,
    device: &Device,
) -> Evaluation {
    let m = model.valid();
    let plain = device.clone().without_autodiff();
    let kind = plan.spec.train.loss;
    let (mut loss_sum, mut correct) = (0.0, 0usize);
    let indices: Vec<usize> = (0..feats.len()).collect();
    for chunk in indices.chunks(plan.spec.data.batch_size) {
        let (x, y) = feats.batch(chunk, &plain);
        let logits = m.forward_from_cut(x);
        correct += loss::correct(kind, logits.clone(), &y);
        loss_sum +=
            f64::from(loss::loss(kind, logits, &y).into_scalar::<f32>()) * chunk.len() as f64;
    }
    let n = feats.len().max(1) as f64;
    Evaluation {
        loss: loss_sum / n,
        acc: correct as f64 / n,
    }
}

/// Where training batches come from.
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

/// Trains `model` on `train`, validating on precomputed features after each epoch.
pub fn fit(
    mut model: TransferModel,
    train: &TrainSource<'_>,
    validation: &Features,
    plan: &Plan,
    device: &Device,
    run: &str,
    mut on_epoch: impl FnMut(&EpochMetrics),
) -> (TransferModel, Vec<EpochMetrics>) {
    let spec = &plan.spec;
    let kind = spec.train.loss;
    let seed = spec.experiment.seed;
    let batch = spec.data.batch_size;
    let mut optimizer = optim::build(&spec.optimizer);
    let lr = spec.optimizer.lr();
    let plain = device.clone().without_autodiff();
    let mut history = Vec::with_capacity(spec.train.epochs);
    for epoch in 1..=spec.train.epochs {
        let started = Instant::now();
        let order = epoch_order(train.len(), batch, spec.train.steps_per_epoch, seed, epoch);
        let chunks: Vec<&[(usize, usize)]> = order.chunks(batch).collect();
        let (mut loss_sum, mut correct) = (0.0, 0usize);
        let (steps, mut done, mut seen) = (chunks.len(), 0usize, 0usize);
        let report_every = steps.div_ceil(10).max(1);
        let mut step = |model: TransferModel, x: Tensor<4>, y: &[usize]| -> TransferModel {
            let logits = model.forward_from_cut(x);
            correct += loss::correct(kind, logits.clone().without_autodiff(), y);
            let l = loss::loss(kind, logits, y);
            let grads = GradientsParams::from_grads(l.backward(), &model);
            loss_sum += f64::from(l.into_scalar::<f32>()) * y.len() as f64;
            (done, seen) = (done + 1, seen + y.len());
            if done % report_every == 0 && done < steps {
                let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
                info!(
                    run,
                    epoch,
                    step = done,
                    steps,
                    loss = loss_sum / seen as f64,
                    acc = correct as f64 / seen as f64,
                    images_per_s = rate,
                    "Training."
                );
            }
            optimizer.step(lr, model, grads)
        };
        match train {
            TrainSource::Features(f) => {
                for chunk in &chunks {
                    let idx: Vec<usize> = chunk.iter().map(|(i, _)| *i).collect();
                    let (x, y) = f.batch(&idx, device);
                    model = step(model, x, &y);
                }
            }
            TrainSource::Augmented {
                images,
                spec: aug,
                frozen,
            } => {
                // Augmentation of the next batches runs on another thread while this one
                // computes; the channel bounds how far ahead it gets.
                model = std::thread::scope(|scope| {
                    let mut model = model;
                    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
                    let chunks_ref = &chunks;
                    scope.spawn(move || {
                        for chunk in chunks_ref {
                            let pixels =
                                augment::augment_pass_batch(images, chunk, aug, seed, epoch);
                            if tx.send(pixels).is_err() {
                                return;
                            }
                        }
                    });
                    for (chunk, pixels) in chunks.iter().zip(rx.iter()) {
                        let y: Vec<usize> = chunk.iter().map(|(i, _)| images.labels[*i]).collect();
                        let x = data::pixels_tensor(
                            &pixels,
                            y.len(),
                            [images.height, images.width],
                            plan.preprocess,
                            &plain,
                        );
                        let x = frozen.frozen_features(x).autodiff();
                        model = step(model, x, &y);
                    }
                    model
                });
            }
        }
        let val = evaluate(&model, validation, plan, device);
        let n = order.len().max(1) as f64;
        let m = EpochMetrics {
            epoch,
            train_loss: loss_sum / n,
            train_acc: correct as f64 / n,
            val_loss: val.loss,
            val_acc: val.acc,
            lr,
            seconds: started.elapsed().as_secs_f64(),
        };
        info!(
            run,
            epoch,
            epochs = spec.train.epochs,
            train_loss = m.train_loss,
            train_acc = m.train_acc,
            val_loss = m.val_loss,
            val_acc = m.val_acc,
            seconds = m.seconds,
            "Epoch finished."
        );
        on_epoch(&m);
        history.push(m);
    }
    (model, history)
}

/// Decodes every split and applies the `data.on_bad_image` policy: `fail` lists every bad file
/// of every split; `skip` logs each and leaves it out. Returns the images and the skipped count.
fn load_images(plan: &Plan, run: &str) -> Result<(Vec<Images>, usize), TrainError> {
    let spec = &plan.spec;
    let mut images = Vec::new();
    let mut bad = Vec::new();
    for listing in &plan.splits {
        let (imgs, report) =
            data::folder::load_split(listing, spec.data.image_size, spec.data.interpolation);
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

/// The whole run: decode, build, extract, fit, test.
pub fn run(
    plan: &Plan,
    device: &Device,
    run: &str,
    on_epoch: impl FnMut(&EpochMetrics),
) -> Result<Outcome, TrainError> {
    let spec = &plan.spec;
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
    device.seed(spec.experiment.seed);
    let model = TransferModel::build(plan, device)?;

    // Validation and test are never augmented: their activations at the cutoff are computed
    // once. So is the training split's, when no augmentation is declared.
    let started = Instant::now();
    info!(run, phase = "extract_features", cut = %plan.cutoff.label, "Phase started.");
    let augmented = spec.augment.is_some();
    let feats: Vec<Option<Features>> = images
        .iter()
        .enumerate()
        .map(|(i, imgs)| {
            (i > 0 || !augmented).then(|| extract_features(&model, imgs, plan, device, run))
        })
        .collect();
    info!(
        run,
        phase = "extract_features",
        seconds = started.elapsed().as_secs_f64(),
        "Phase finished."
    );

    let started = Instant::now();
    info!(
        run,
        phase = "train",
        epochs = spec.train.epochs,
        augmented,
        "Phase started."
    );
    device.seed(spec.experiment.seed);
    let source = match (&spec.augment, &feats[0]) {
        (Some(aug), _) => TrainSource::Augmented {
            images: &images[0],
            spec: aug,
            frozen: model.valid(),
        },
        (None, Some(f)) => TrainSource::Features(f),
        (None, None) => unreachable!("features are extracted when there is no augmentation"),
    };
    let validation = feats[1].as_ref().expect("validation features");
    let validation = match spec.train.validation_steps {
        Some(steps) => validation.head(steps * spec.data.batch_size),
        None => validation.clone(),
    };
    let (model, epochs) = fit(model, &source, &validation, plan, device, run, on_epoch);
    drop(source);
    info!(
        run,
        phase = "train",
        seconds = started.elapsed().as_secs_f64(),
        "Phase finished."
    );

    let test = feats.get(2).and_then(Option::as_ref).map(|t| {
        let e = evaluate(&model, t, plan, device);
        info!(
            run,
            phase = "test",
            test_loss = e.loss,
            test_acc = e.acc,
            "Test evaluation finished."
        );
        e
    });
    Ok(Outcome {
        epochs,
        test,
        model,
        skipped_images: skipped,
    })
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
