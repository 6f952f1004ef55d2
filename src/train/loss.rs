//! Losses on logits (the last layer's activation is folded in, for numerical stability) and
//! accuracy.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::spec::Loss;

/// Mean loss over the batch.
///
/// # Shapes
///
/// - logits: `[batch, 1]` (binary) or `[batch, classes]` (categorical)
/// - labels: `[batch]` class indices
/// - output: `[1]`
pub fn loss(kind: Loss, logits: Tensor<2>, labels: &[usize]) -> Tensor<1> {
    smoothed(kind, logits, labels, 0.0)
}

/// The target of class `label` among `classes` (1 output for binary) at output `j`, with label
/// smoothing `eps` as Keras applies it: `y (1 - eps) + eps / 2` for a binary label,
/// `onehot (1 - eps) + eps / classes` for a categorical one.
pub fn target(kind: Loss, label: usize, j: usize, classes: usize, eps: f32) -> f32 {
    let y = match kind {
        Loss::BinaryCrossentropy => label as f32,
        Loss::CategoricalCrossentropy => f32::from(u8::from(j == label)),
    };
    let k = match kind {
        Loss::BinaryCrossentropy => 2.0,
        Loss::CategoricalCrossentropy => classes as f32,
    };
    y * (1.0 - eps) + eps / k
}

/// Mean loss over the batch against label-smoothed targets ([`target`]; `eps = 0` is [`loss`]).
pub fn smoothed(kind: Loss, logits: Tensor<2>, labels: &[usize], eps: f32) -> Tensor<1> {
    let device = logits.device();
    let [batch, classes] = logits.dims();
    match kind {
        Loss::BinaryCrossentropy => {
            // max(z, 0) - z*y + log(1 + exp(-|z|)): sigmoid + cross-entropy without overflow.
            let y: Vec<f32> = labels.iter().map(|&l| target(kind, l, 0, 1, eps)).collect();
            let y = Tensor::<2>::from_data(TensorData::new(y, [batch, 1]), &device);
            let z = logits;
            (z.clone().clamp_min(0.0) - z.clone() * y + z.abs().neg().exp().log1p()).mean()
        }
        Loss::CategoricalCrossentropy => {
            let mut onehot = vec![0f32; batch * classes];
            for (i, &l) in labels.iter().enumerate() {
                for j in 0..classes {
                    onehot[i * classes + j] = target(kind, l, j, classes, eps);
                }
            }
            let y = Tensor::<2>::from_data(TensorData::new(onehot, [batch, classes]), &device);
            (log_softmax(logits, 1) * y).sum_dim(1).mean().neg()
        }
    }
}

/// Predicted class of each example.
pub fn predictions(kind: Loss, logits: Tensor<2>) -> Vec<usize> {
    match kind {
        Loss::BinaryCrossentropy => logits
            .into_data()
            .iter::<f32>()
            .map(|z| usize::from(z > 0.0))
            .collect(),
        Loss::CategoricalCrossentropy => logits
            .argmax(1)
            .into_data()
            .iter::<i64>()
            .map(|c| c as usize)
            .collect(),
    }
}

/// Class probabilities of each example: `[1 - p, p]` for a sigmoid output, the softmax
/// otherwise.
pub fn probabilities(kind: Loss, logits: Tensor<2>) -> Vec<Vec<f32>> {
    match kind {
        Loss::BinaryCrossentropy => logits
            .into_data()
            .iter::<f32>()
            .map(|z| {
                let p = 1.0 / (1.0 + (-z).exp());
                vec![1.0 - p, p]
            })
            .collect(),
        Loss::CategoricalCrossentropy => {
            let [_, classes] = logits.dims();
            let v: Vec<f32> = burn::tensor::activation::softmax(logits, 1)
                .into_data()
                .iter::<f32>()
                .collect();
            v.chunks(classes).map(<[f32]>::to_vec).collect()
        }
    }
}

/// Number of correct predictions (reads the logits back to the host).
pub fn correct(kind: Loss, logits: Tensor<2>, labels: &[usize]) -> usize {
    predictions(kind, logits)
        .iter()
        .zip(labels)
        .filter(|(p, l)| p == l)
        .count()
}

/// Number of correct predictions as a tensor on the logits' device (nothing is read back): a
/// sigmoid output is right when `z > 0` says class 1, a softmax one when the arg max is the label.
///
/// # Shapes
///
/// - logits: `[batch, 1]` or `[batch, classes]`; output: `[1]`
pub fn correct_on_device(kind: Loss, logits: Tensor<2>, labels: &[usize]) -> Tensor<1> {
    let device = logits.device();
    let [batch, _] = logits.dims();
    let y: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
    let y = Tensor::<2>::from_data(TensorData::new(y, [batch, 1]), &device);
    let predicted = match kind {
        Loss::BinaryCrossentropy => logits.greater_elem(0.0).float(),
        Loss::CategoricalCrossentropy => logits.argmax(1).float(),
    };
    predicted.equal(y).float().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(v: &[f32], classes: usize) -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(v.to_vec(), [v.len() / classes, classes]),
            &Device::flex(),
        )
    }

    fn scalar(t: Tensor<1>) -> f32 {
        t.into_scalar::<f32>()
    }

    #[test]
    fn binary_crossentropy_of_a_zero_logit_is_ln2() {
        let l = scalar(loss(
            Loss::BinaryCrossentropy,
            logits(&[0.0, 0.0], 1),
            &[0, 1],
        ));
        assert!((l - std::f32::consts::LN_2).abs() < 1e-6, "{l}");
    }

    #[test]
    fn binary_crossentropy_is_stable_for_large_logits() {
        // A confident wrong answer costs |z|; a confident right one costs ~0; nothing overflows.
        let l = scalar(loss(
            Loss::BinaryCrossentropy,
            logits(&[100.0, -100.0], 1),
            &[0, 0],
        ));
        assert!((l - 50.0).abs() < 1e-4, "{l}");
    }

    #[test]
    fn categorical_crossentropy_of_equal_logits_is_ln_classes() {
        let l = scalar(loss(
            Loss::CategoricalCrossentropy,
            logits(&[1.0, 1.0, 1.0], 3),
            &[2],
        ));
        assert!((l - 3f32.ln()).abs() < 1e-6, "{l}");
    }

    #[test]
    fn label_smoothing_moves_the_targets_and_the_loss_minimum() {
        let b = Loss::BinaryCrossentropy;
        let near = |a: f32, b: f32| (a - b).abs() < 1e-6;
        assert!(near(target(b, 1, 0, 1, 0.2), 0.9));
        assert!(near(target(b, 0, 0, 1, 0.2), 0.1));
        assert_eq!(target(b, 1, 0, 1, 0.0), 1.0);
        let c = Loss::CategoricalCrossentropy;
        let t: Vec<f32> = (0..4).map(|j| target(c, 2, j, 4, 0.4)).collect();
        assert!(
            t.iter().zip([0.1, 0.1, 0.7, 0.1]).all(|(a, b)| near(*a, b)),
            "{t:?}"
        );
        // The binary loss against 0.9 is lowest at the logit of 0.9, not at +infinity.
        let at = |z: f32| scalar(smoothed(b, logits(&[z], 1), &[1], 0.2));
        let best = (0.9f32 / 0.1).ln();
        assert!(at(best) < at(best - 0.5) && at(best) < at(best + 0.5));
        assert!(at(8.0) > at(best));
        assert_eq!(
            scalar(smoothed(b, logits(&[1.5], 1), &[1], 0.0)),
            scalar(loss(b, logits(&[1.5], 1), &[1]))
        );
    }

    #[test]
    fn accuracy_counts_thresholded_and_argmax_predictions() {
        assert_eq!(
            correct(
                Loss::BinaryCrossentropy,
                logits(&[2.0, -1.0, 0.5], 1),
                &[1, 1, 1]
            ),
            2
        );
        assert_eq!(
            correct(
                Loss::CategoricalCrossentropy,
                logits(&[0.1, 0.9, 0.8, 0.2], 2),
                &[1, 1]
            ),
            1
        );
    }
}
