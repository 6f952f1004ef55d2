//! MobileNetV2 (torchvision's layout): a stem convolution, 17 inverted residual blocks with
//! depthwise convolutions, a 1x1 convolution to 1280 channels, and the ImageNet classifier; every
//! convolution is followed by BatchNorm (and ReLU6 except the projections).
//!
//! Weights load from torchvision's state dict (the mirror's safetensors file, or a `.pth`) through
//! an explicit key map and burn-store's PyTorch adapter (BatchNorm `weight`/`bias` to
//! `gamma`/`beta`, Linear transposed); the load result is checked tensor by tensor. On a device
//! without autodiff BatchNorm uses its running statistics and never updates them.

use std::path::Path;

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use super::conv_bn::{Act, ConvBn};
use super::weights::{KeyMap, WeightsError};
use super::{LayerInfo, LayerOp};

/// The 19 layers with torchvision's names (`features.0` ... `features.18`): what the plan, the
/// summary and the freeze cutoff see.
pub fn layers() -> Vec<LayerInfo> {
    let bn = |c: usize| 2 * c;
    let mut out = vec![LayerInfo {
        name: "features.0".into(),
        op: LayerOp::Block {
            kind: "Conv2dNormActivation",
            out_channels: 32,
            stride: 2,
            params: 3 * 32 * 9 + bn(32),
        },
    }];
    let mut cin = 32;
    for (t, c, n, s) in SETTINGS {
        for i in 0..n {
            let hidden = cin * t;
            let expand = if t == 1 { 0 } else { cin * hidden + bn(hidden) };
            out.push(LayerInfo {
                name: format!("features.{}", out.len()),
                op: LayerOp::Block {
                    kind: "InvertedResidual",
                    out_channels: c,
                    stride: if i == 0 { s } else { 1 },
                    params: expand + hidden * 9 + bn(hidden) + hidden * c + bn(c),
                },
            });
            cin = c;
        }
    }
    out.push(LayerInfo {
        name: "features.18".into(),
        op: LayerOp::Block {
            kind: "Conv2dNormActivation",
            out_channels: 1280,
            stride: 1,
            params: 320 * 1280 + bn(1280),
        },
    });
    out
}

/// `(expansion, output channels, repeats, first stride)` of each stage (torchvision).
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// An inverted residual block: 1x1 expansion (absent when the expansion is 1), 3x3 depthwise,
/// 1x1 linear projection, and the skip connection when shapes allow.
#[derive(Module, Debug)]
pub struct InvertedResidual {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    #[module(skip)]
    residual: bool,
}

impl InvertedResidual {
    fn to_onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> String {
        let mut y = x.to_string();
        if let Some(e) = &self.expand {
            y = e.to_onnx(g, &y, Act::Relu6);
        }
        let y = self.depthwise.to_onnx(g, &y, Act::Relu6);
        let y = self.project.to_onnx(g, &y, Act::None);
        if self.residual {
            g.node("Add", &[&y, x], &[])
        } else {
            y
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut y = x.clone();
        if let Some(e) = &self.expand {
            y = e.forward(y, Act::Relu6);
        }
        y = self
            .project
            .forward(self.depthwise.forward(y, Act::Relu6), Act::None);
        if self.residual { y + x } else { y }
    }
}

/// MobileNetV2, with its ImageNet classifier or without (as a backbone).
#[derive(Module, Debug)]
pub struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    last: ConvBn,
    classifier: Option<Linear>,
    /// Trainable BatchNorm layers keep their running statistics too.
    #[module(skip)]
    bn_frozen: bool,
}

impl MobileNetV2 {
    /// Fresh weights (load real ones with [`MobileNetV2::load`]); `classes = 0` leaves the
    /// classifier out (the backbone of a transfer model).
    pub fn init(classes: usize, device: &Device) -> Self {
        let mut blocks = Vec::new();
        let mut cin = 32;
        for (t, c, n, s) in SETTINGS {
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                let hidden = cin * t;
                blocks.push(InvertedResidual {
                    expand: (t != 1).then(|| ConvBn::new(cin, hidden, 1, 1, 1, device)),
                    depthwise: ConvBn::new(hidden, hidden, 3, stride, hidden, device),
                    project: ConvBn::new(hidden, c, 1, 1, 1, device),
                    residual: stride == 1 && cin == c,
                });
                cin = c;
            }
        }
        Self {
            stem: ConvBn::new(3, 32, 3, 2, 1, device),
            blocks,
            last: ConvBn::new(320, 1280, 1, 1, 1, device),
            classifier: (classes > 0).then(|| LinearConfig::new(1280, classes).init(device)),
            bn_frozen: false,
        }
    }

    /// Keeps BatchNorm on its running statistics even where the layers train.
    pub fn with_batchnorm_frozen(mut self, frozen: bool) -> Self {
        self.bn_frozen = frozen;
        self
    }

    /// The base (without the classifier) as ONNX nodes on `x`, as inference runs it.
    pub fn to_onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> String {
        let mut y = self.stem.to_onnx(g, x, Act::Relu6);
        for b in &self.blocks {
            y = b.to_onnx(g, &y);
        }
        self.last.to_onnx(g, &y, Act::Relu6)
    }

    /// Every BatchNorm running mean and variance, in layer order.
    pub fn batchnorm_stats(&self) -> Vec<f32> {
        let mut out = Vec::new();
        self.stem.stats(&mut out);
        for b in &self.blocks {
            for c in b.expand.iter().chain([&b.depthwise, &b.project]) {
                c.stats(&mut out);
            }
        }
        self.last.stats(&mut out);
        out
    }

    /// Number of layers (19).
    pub fn num_layers(&self) -> usize {
        self.blocks.len() + 2
    }

    /// Runs layers `from..to` (0 the stem, 1-17 the blocks, 18 the last convolution).
    ///
    /// # Shapes
    ///
    /// - input: the input of layer `from`
    /// - output: the output of layer `to - 1`
    pub fn forward_range(&self, mut x: Tensor<4>, from: usize, to: usize) -> Tensor<4> {
        let last = self.num_layers() - 1;
        for i in from..to {
            x = match i {
                0 => self.stem.forward(x, Act::Relu6),
                i if i == last => self.last.forward(x, Act::Relu6),
                i => self.blocks[i - 1].forward(x),
            };
        }
        x
    }

    /// Layers before `cut` get no gradients, the others do.
    pub fn freeze_before(self, cut: usize) -> Self {
        let last = self.num_layers() - 1;
        let f = self.bn_frozen;
        let blocks = self
            .blocks
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let t = i + 1 >= cut;
                InvertedResidual {
                    expand: b.expand.map(|e| e.trainable(t, f)),
                    depthwise: b.depthwise.trainable(t, f),
                    project: b.project.trainable(t, f),
                    residual: b.residual,
                }
            })
            .collect();
        Self {
            stem: self.stem.trainable(cut == 0, f),
            blocks,
            last: self.last.trainable(last >= cut, f),
            classifier: self.classifier,
            bn_frozen: f,
        }
    }

    /// Feeds every parameter and running statistic of layers before `cut` to `v`.
    pub fn visit_before<V: burn::module::ModuleVisitor>(&self, cut: usize, v: &mut V) {
        if cut > 0 {
            self.stem.visit(v);
        }
        for b in self.blocks.iter().take(cut.saturating_sub(1)) {
            b.visit(v);
        }
        if cut >= self.num_layers() {
            self.last.visit(v);
        }
    }

    /// `(torchvision prefix, module path prefix)` of every layer.
    fn key_pairs() -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = [
            ("features.0.0", "stem.conv"),
            ("features.0.1", "stem.bn"),
            ("features.18.0", "last.conv"),
            ("features.18.1", "last.bn"),
            ("classifier.1", "classifier"),
            // The first block has no expansion: its depthwise convolution comes first.
            ("features.1.conv.0.0", "blocks.0.depthwise.conv"),
            ("features.1.conv.0.1", "blocks.0.depthwise.bn"),
            ("features.1.conv.1", "blocks.0.project.conv"),
            ("features.1.conv.2", "blocks.0.project.bn"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        for i in 2..=17 {
            for (from, to) in [
                ("conv.0.0", "expand.conv"),
                ("conv.0.1", "expand.bn"),
                ("conv.1.0", "depthwise.conv"),
                ("conv.1.1", "depthwise.bn"),
                ("conv.2", "project.conv"),
                ("conv.3", "project.bn"),
            ] {
                pairs.push((
                    format!("features.{i}.{from}"),
                    format!("blocks.{}.{to}", i - 1),
                ));
            }
        }
        pairs
    }

    /// How torchvision's state dict names this model's tensors (`classifier.*` ignored without
    /// the classifier).
    pub fn key_map(&self) -> KeyMap {
        KeyMap {
            pairs: Self::key_pairs(),
            extra: if self.classifier.is_some() {
                vec![]
            } else {
                vec!["classifier.".into()]
            },
            keras: false,
        }
    }

    /// Loads torchvision's MobileNetV2 state dict (safetensors or `.pth`); every tensor of the
    /// model must be found with its shape (BatchNorm's `num_batches_tracked` is ignored).
    pub fn load(self, path: &Path) -> Result<Self, WeightsError> {
        let map = self.key_map();
        super::weights::load(self, &map, path, "mobilenet_v2")
    }

    /// The 1280-channel feature map.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, 3, height, width]`, torch-preprocessed
    /// - output: `[batch, 1280, height / 32, width / 32]` (rounded up)
    pub fn features(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.stem.forward(x, Act::Relu6);
        for b in &self.blocks {
            x = b.forward(x);
        }
        self.last.forward(x, Act::Relu6)
    }

    /// ImageNet logits: features, global average pooling, the classifier.
    ///
    /// # Shapes
    ///
    /// - output: `[batch, classes]`
    pub fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        let f = self.features(x);
        let [n, c, _, _] = f.dims();
        let pooled = f.mean_dim(3).mean_dim(2).reshape([n, c]);
        match &self.classifier {
            Some(l) => l.forward(pooled),
            None => pooled,
        }
    }

    /// Parameters of the feature extractor (no classifier, no BatchNorm running statistics).
    pub fn feature_params(&self) -> usize {
        let stats: usize = [&self.stem, &self.last]
            .into_iter()
            .chain(
                self.blocks
                    .iter()
                    .flat_map(|b| b.expand.iter().chain([&b.depthwise, &b.project])),
            )
            .map(ConvBn::running_stats)
            .sum();
        self.num_params() - self.classifier.as_ref().map_or(0, |c| c.num_params()) - stats
    }
}
