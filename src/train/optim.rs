//! Optimizers from the spec, with Keras' semantics (burn's own defaults differ: its RMSprop uses
//! alpha 0.99, momentum 0.9, epsilon 1e-5, and its SGD momentum dampens by 0.1).

use burn::grad_clipping::GradientClippingConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{
    AdamConfig, AdamWConfig, CenteredState, LearningRate, ModuleOptimizer, Optimizer, RmsProp,
    RmsPropConfig, RmsPropState, SgdConfig, SquareAvgState,
};
use burn::prelude::*;

use crate::spec::{ADAMW_WEIGHT_DECAY, AdamSpec, OptimizerSpec, RmspropSpec, SgdSpec};

/// The optimizer of a spec, clipping each parameter's gradient to `clip_norm` when given
/// (Keras `clipnorm`).
pub fn build(spec: &OptimizerSpec, clip_norm: Option<f64>) -> ModuleOptimizer {
    let optimizer = build_plain(spec);
    match clip_norm {
        Some(c) => optimizer.with_grad_clipping(GradientClippingConfig::Norm(c as f32).init()),
        None => optimizer,
    }
}

fn l2(weight_decay: Option<f64>) -> Option<WeightDecayConfig> {
    weight_decay
        .filter(|w| *w > 0.0)
        .map(|w| WeightDecayConfig::new(w as f32))
}

fn build_plain(spec: &OptimizerSpec) -> ModuleOptimizer {
    match spec.clone() {
        OptimizerSpec::Rmsprop(RmspropSpec {
            rho,
            momentum,
            epsilon,
            centered,
            weight_decay,
            ..
        }) => {
            let config = RmsPropConfig::new()
                .with_alpha(rho as f32)
                .with_momentum(momentum as f32)
                .with_epsilon(epsilon as f32)
                .with_centered(centered)
                .with_weight_decay(l2(weight_decay));
            ModuleOptimizer::from(FusedRmsProp {
                burn: config.build(),
                alpha: rho as f32,
                epsilon: epsilon as f32,
                weight_decay: weight_decay.filter(|w| *w > 0.0).map(|w| w as f32),
                fusable: momentum == 0.0 && !centered,
            })
        }
        OptimizerSpec::Adam(AdamSpec {
            beta_1,
            beta_2,
            epsilon,
            ..
        }) => AdamConfig::new()
            .with_beta_1(beta_1 as f32)
            .with_beta_2(beta_2 as f32)
            .with_epsilon(epsilon as f32)
            .init(),
        OptimizerSpec::Adamw(AdamSpec {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            ..
        }) => AdamWConfig::new()
            .with_beta_1(beta_1 as f32)
            .with_beta_2(beta_2 as f32)
            .with_epsilon(epsilon as f32)
            .with_weight_decay(weight_decay.unwrap_or(ADAMW_WEIGHT_DECAY) as f32)
            .init(),
        OptimizerSpec::Sgd(SgdSpec {
            momentum,
            nesterov,
            weight_decay,
            ..
        }) => {
            let config = SgdConfig::new().with_weight_decay(l2(weight_decay));
            if momentum > 0.0 {
                config
                    .with_momentum(Some(
                        MomentumConfig::new()
                            .with_momentum(momentum)
                            .with_dampening(0.0)
                            .with_nesterov(nesterov),
                    ))
                    .init()
            } else {
                config.init()
            }
        }
    }
}

/// RMSprop as burn computes it (same formulas, same order of operations, same state record), in
/// one pass over each parameter on the CPU when there is no momentum and it is not centered
/// (Keras' defaults, the notebook's optimizer). burn's version runs a chain of whole-tensor
/// operations, each allocating a new tensor: for the dense head's 2.1 million weights that chain
/// was 45 % of a training step (perf on `runner bench-workload dense_head_epoch`). Elsewhere (GPU,
/// momentum, centered) it is burn's own step.
#[derive(Clone)]
pub struct FusedRmsProp {
    burn: RmsProp,
    alpha: f32,
    epsilon: f32,
    weight_decay: Option<f32>,
    fusable: bool,
}

impl FusedRmsProp {
    /// Whether `step` takes the fused path for a parameter on `device`.
    pub fn fuses(&self, device: &Device) -> bool {
        self.fusable && crate::cpu::is_cpu(device)
    }

    /// The fused step: with `g' = g + wd p`, `s = alpha s + (1 - alpha) g'^2`,
    /// `p = p - (g' / (sqrt(s) + eps)) lr`.
    pub fn fused_step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<RmsPropState<D>>,
    ) -> (Tensor<D>, Option<RmsPropState<D>>) {
        let device = tensor.device();
        let shape = tensor.shape();
        // Updated in place in the tensors' own buffers: no copy of the 8 MB a dense head's
        // weights take (`into_data` hands a uniquely held buffer over as it is).
        let mut p = tensor.into_data();
        let g = grad.into_data();
        let mut sq = match state {
            Some(RmsPropState {
                square_avg,
                centered,
                ..
            }) => {
                // `centered.avg` is the same tensor: drop it so the buffer is held once.
                drop(centered);
                square_avg.square_avg.into_data()
            }
            None => TensorData::new(vec![0.0f32; shape.num_elements()], shape.clone()),
        };
        let (alpha, eps, lr) = (self.alpha, self.epsilon, lr as f32);
        let wd = self.weight_decay.unwrap_or(0.0);
        let f32s = "parameters are f32";
        crate::cpu::rmsprop::update(
            p.as_mut_slice::<f32>().expect(f32s),
            sq.as_mut_slice::<f32>().expect(f32s),
            g.as_slice::<f32>().expect(f32s),
            [alpha, eps, lr, wd],
        );
        let square_avg = Tensor::from_data(sq, &device);
        let state = RmsPropState::new(
            SquareAvgState::new(square_avg.clone()),
            CenteredState::new(None, square_avg),
            None,
        );
        (Tensor::from_data(p, &device), Some(state))
    }
}

impl Optimizer for FusedRmsProp {
    type State<const D: usize> = RmsPropState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        if self.fuses(&tensor.device()) {
            self.fused_step(lr, tensor, grad, state)
        } else {
            self.burn.step(lr, tensor, grad, state)
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        RmsProp::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::decay::WeightDecayConfig;

    fn tensor(seed: u32, n: usize) -> Tensor<2> {
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let z = (i as u32 ^ seed).wrapping_mul(2654435761);
                ((z >> 9) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        Tensor::from_data(TensorData::new(v, [n / 50, 50]), &Device::flex())
    }

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().iter::<f32>().collect()
    }

    #[test]
    fn fused_rmsprop_follows_burns_rmsprop_step_by_step() {
        for wd in [None, Some(0.01f32)] {
            let config = RmsPropConfig::new()
                .with_alpha(0.9)
                .with_momentum(0.0)
                .with_epsilon(1e-7)
                .with_weight_decay(wd.map(WeightDecayConfig::new));
            let fused = FusedRmsProp {
                burn: config.build(),
                alpha: 0.9,
                epsilon: 1e-7,
                weight_decay: wd,
                fusable: true,
            };
            assert!(fused.fuses(&Device::flex()));
            let reference = config.build();
            let n = 100_000; // several parallel chunks
            let (mut a, mut b) = (tensor(1, n), tensor(1, n));
            let (mut sa, mut sb) = (None, None);
            for step in 0..4 {
                let g = tensor(10 + step, n);
                let lr = 1e-3 * (step + 1) as f64;
                (a, sa) = fused.fused_step(lr, a, g.clone(), sa);
                (b, sb) = reference.step(lr, b, g, sb);
            }
            let (va, vb) = (values(a), values(b));
            let worst = va
                .iter()
                .zip(&vb)
                .map(|(x, y)| (x - y).abs() / (1e-3 + y.abs()))
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-6,
                "weight decay {wd:?}: worst relative difference {worst}"
            );
            let start = values(tensor(1, n));
            assert!(va.iter().zip(&start).filter(|(x, y)| x != y).count() > n * 9 / 10);
            let (qa, qb) = (
                values(sa.unwrap().square_avg.square_avg),
                values(sb.unwrap().square_avg.square_avg),
            );
            for (x, y) in qa.iter().zip(&qb) {
                assert!((x - y).abs() <= 1e-6 * y.abs() + 1e-12, "{x} vs {y}");
            }
        }
    }
}
