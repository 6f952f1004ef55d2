//! The training loop: activations at the freeze cutoff are computed once per split (nothing
//! below the cutoff changes and no augmentation is declared), then only the part above is trained.

pub mod loss;
pub mod optim;

use std::time::Instant;

use burn::optim::GradientsParams;
use burn::prelude::*;
use tracing::info;

use crate::backbone::weights::WeightsError;
use crate::data::{self, DataError, Images};
use crate::model::TransferModel;
use crate::plan::Plan;

/// Errors that stop a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Images could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Backbone weights could not be loaded.
    #[error(transparent)]
    Weights(#[from] WeightsError),
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

/// Trains `model` on precomputed features at the cutoff.
pub fn fit(
    mut model: TransferModel,
    train: &Features,
    validation: &Features,
    plan: &Plan,
    device: &Device,
    run: &str,
    mut on_epoch: impl FnMut(&EpochMetrics),
) -> (TransferModel, Vec<EpochMetrics>) {
    let spec = &plan.spec;
    let kind = spec.train.loss;
    let mut optimizer = optim::build(&spec.optimizer);
    let lr = spec.optimizer.lr();
    let mut history = Vec::with_capacity(spec.train.epochs);
    for epoch in 1..=spec.train.epochs {
        let started = Instant::now();
        let order = shuffled(train.len(), spec.experiment.seed, epoch);
        let (mut loss_sum, mut correct) = (0.0, 0usize);
        for chunk in order.chunks(spec.data.batch_size) {
            let (x, y) = train.batch(chunk, device);
            let logits = model.forward_from_cut(x);
            correct += loss::correct(kind, logits.clone().without_autodiff(), &y);
            let l = loss::loss(kind, logits, &y);
            let grads = GradientsParams::from_grads(l.backward(), &model);
            loss_sum += f64::from(l.into_scalar::<f32>()) * chunk.len() as f64;
            model = optimizer.step(lr, model, grads);
        }
        let val = evaluate(&model, validation, plan, device);
        let n = train.len().max(1) as f64;
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
    // Every split is decoded before any error is returned, so that every bad file is listed.
    let mut images = Vec::new();
    let mut bad = Vec::new();
    for listing in &plan.splits {
        match data::folder::load_split(listing, spec.data.image_size, spec.data.interpolation) {
            Ok(imgs) => {
                info!(run, split = %listing.name, images = imgs.len(), ignored = listing.ignored.len(), "Split decoded.");
                images.push(imgs);
            }
            Err(DataError::BadImages(files)) => bad.extend(files),
            Err(e) => return Err(e.into()),
        }
    }
    if !bad.is_empty() {
        return Err(DataError::BadImages(bad).into());
    }
    info!(
        run,
        phase = "load_data",
        seconds = started.elapsed().as_secs_f64(),
        "Phase finished."
    );

    info!(run, phase = "build_model", weights = %plan.weights.display(), "Phase started.");
    device.seed(spec.experiment.seed);
    let model = TransferModel::build(plan, device)?;

    let started = Instant::now();
    info!(run, phase = "extract_features", cut = %plan.cutoff.label, "Phase started.");
    let feats: Vec<Features> = images
        .iter()
        .map(|imgs| extract_features(&model, imgs, plan, device, run))
        .collect();
    drop(images);
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
        "Phase started."
    );
    device.seed(spec.experiment.seed);
    let (model, epochs) = fit(model, &feats[0], &feats[1], plan, device, run, on_epoch);
    info!(
        run,
        phase = "train",
        seconds = started.elapsed().as_secs_f64(),
        "Phase finished."
    );

    let test = feats.get(2).map(|t| {
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
