//! Optimizers from the spec, with Keras' semantics (burn's own defaults differ: its RMSprop uses
//! alpha 0.99, momentum 0.9, epsilon 1e-5, and its SGD momentum dampens by 0.1).

use burn::grad_clipping::GradientClippingConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer, RmsPropConfig, SgdConfig};

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
        }) => RmsPropConfig::new()
            .with_alpha(rho as f32)
            .with_momentum(momentum as f32)
            .with_epsilon(epsilon as f32)
            .with_centered(centered)
            .with_weight_decay(l2(weight_decay))
            .init(),
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
