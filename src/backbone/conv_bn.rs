//! A convolution without bias followed by BatchNorm: the unit MobileNetV2 and ResNet50 are built
//! from (torchvision's `Conv2dNormActivation` without its activation).

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;

/// The activation after the BatchNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// None (MobileNetV2's linear projections, ResNet's last convolution of a block).
    None,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)` (MobileNetV2).
    Relu6,
}

/// A convolution without bias, then BatchNorm.
#[derive(Module, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    /// Gradients on or off; BatchNorm uses batch statistics only when trainable and not
    /// `bn_frozen`.
    pub(crate) fn trainable(mut self, t: bool, bn_frozen: bool) -> Self {
        self.conv.weight = self.conv.weight.set_require_grad(t);
        self.bn.gamma = self.bn.gamma.set_require_grad(t);
        self.bn.beta = self.bn.beta.set_require_grad(t);
        self.bn.training = burn::module::Param::from_bool(t && !bn_frozen);
        self
    }

    pub(crate) fn stats(&self, out: &mut Vec<f32>) {
        out.extend(self.bn.running_mean.value().into_data().iter::<f32>());
        out.extend(self.bn.running_var.value().into_data().iter::<f32>());
    }

    pub(crate) fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        groups: usize,
        device: &Device,
    ) -> Self {
        Self {
            conv: Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
                .with_groups(groups)
                .with_bias(false)
                .init(device),
            bn: BatchNormConfig::new(cout).with_epsilon(1e-5).init(device),
        }
    }

    /// BatchNorm running mean and variance values (burn counts them in `num_params`).
    pub(crate) fn running_stats(&self) -> usize {
        2 * self.bn.gamma.dims()[0]
    }

    /// The same as ONNX nodes on `x` (BatchNorm on its running statistics).
    pub(crate) fn to_onnx(&self, g: &mut crate::onnx::Graph, x: &str, act: Act) -> String {
        let y = g.conv(&self.conv, x);
        let y = g.batch_norm(&self.bn, &y);
        match act {
            Act::None => y,
            Act::Relu => g.node("Relu", &[&y], &[]),
            Act::Relu6 => g.clip(&y, 0.0, 6.0),
        }
    }

    pub(crate) fn forward(&self, x: Tensor<4>, act: Act) -> Tensor<4> {
        let y = self.bn.forward(self.conv.forward(x));
        match act {
            Act::None => y,
            Act::Relu => burn::tensor::activation::relu(y),
            Act::Relu6 => y.clamp(0.0, 6.0),
        }
    }
}
