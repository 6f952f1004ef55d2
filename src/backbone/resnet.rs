//! ResNet50 (torchvision's layout, v1.5: the stride of a downsampling block is on its 3x3
//! convolution): a 7x7 stem with max pooling, then 16 bottleneck blocks in four stages
//! (`layer1` .. `layer4`: 3, 4, 6, 3 blocks), and the ImageNet classifier `fc`. Every
//! convolution is followed by BatchNorm; the first block of each stage projects its input with
//! a 1x1 convolution (`downsample`).
//!
//! The layers the plan and the cutoff see are `conv1` (the stem) and the blocks, named as
//! torchvision names them (`layer1.0` .. `layer4.2`); a stage name (`layer4`) is its first block.

use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

use super::conv_bn::{Act, ConvBn};
use super::weights::KeyMap;
use super::{LayerInfo, LayerOp};

/// `(blocks, bottleneck width)` of each stage; a block outputs `4 * width` channels.
const STAGES: [(usize, usize); 4] = [(3, 64), (4, 128), (6, 256), (3, 512)];

/// The 17 layers with torchvision's names: `conv1` (stem: convolution, BatchNorm, ReLU, max
/// pooling) and `layer1.0` .. `layer4.2`.
pub fn layers() -> Vec<LayerInfo> {
    let bn = |c: usize| 2 * c;
    let mut out = vec![LayerInfo {
        name: "conv1".into(),
        op: LayerOp::Block {
            kind: "Conv+BN+ReLU+MaxPool",
            out_channels: 64,
            stride: 4,
            params: 3 * 64 * 49 + bn(64),
        },
    }];
    let mut cin = 64;
    for (s, (n, width)) in STAGES.into_iter().enumerate() {
        for b in 0..n {
            let cout = 4 * width;
            let down = if b == 0 { cin * cout + bn(cout) } else { 0 };
            out.push(LayerInfo {
                name: format!("layer{}.{b}", s + 1),
                op: LayerOp::Block {
                    kind: "Bottleneck",
                    out_channels: cout,
                    stride: if b == 0 && s > 0 { 2 } else { 1 },
                    params: cin * width
                        + bn(width)
                        + width * width * 9
                        + bn(width)
                        + width * cout
                        + bn(cout)
                        + down,
                },
            });
            cin = cout;
        }
    }
    out
}

/// A bottleneck block: 1x1 reduce, 3x3 (with the stride), 1x1 expand, plus the shortcut.
#[derive(Module, Debug)]
pub struct Bottleneck {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
    downsample: Option<ConvBn>,
}

impl Bottleneck {
    fn new(cin: usize, width: usize, stride: usize, device: &Device) -> Self {
        let cout = 4 * width;
        Self {
            conv1: ConvBn::new(cin, width, 1, 1, 1, device),
            conv2: ConvBn::new(width, width, 3, stride, 1, device),
            conv3: ConvBn::new(width, cout, 1, 1, 1, device),
            downsample: (stride != 1 || cin != cout)
                .then(|| ConvBn::new(cin, cout, 1, stride, 1, device)),
        }
    }

    fn units(&self) -> impl Iterator<Item = &ConvBn> {
        [&self.conv1, &self.conv2, &self.conv3]
            .into_iter()
            .chain(self.downsample.as_ref())
    }

    fn trainable(self, t: bool, bn_frozen: bool) -> Self {
        Self {
            conv1: self.conv1.trainable(t, bn_frozen),
            conv2: self.conv2.trainable(t, bn_frozen),
            conv3: self.conv3.trainable(t, bn_frozen),
            downsample: self.downsample.map(|d| d.trainable(t, bn_frozen)),
        }
    }

    fn to_onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> String {
        let y = self.conv1.to_onnx(g, x, Act::Relu);
        let y = self.conv2.to_onnx(g, &y, Act::Relu);
        let y = self.conv3.to_onnx(g, &y, Act::None);
        let shortcut = match &self.downsample {
            Some(d) => d.to_onnx(g, x, Act::None),
            None => x.to_string(),
        };
        let sum = g.node("Add", &[&y, &shortcut], &[]);
        g.node("Relu", &[&sum], &[])
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = self.conv1.forward(x.clone(), Act::Relu);
        let y = self.conv2.forward(y, Act::Relu);
        let y = self.conv3.forward(y, Act::None);
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x, Act::None),
            None => x,
        };
        burn::tensor::activation::relu(y + shortcut)
    }
}

/// ResNet50, with its ImageNet classifier or without (as a backbone).
#[derive(Module, Debug)]
pub struct ResNet50 {
    stem: ConvBn,
    pool: MaxPool2d,
    blocks: Vec<Bottleneck>,
    fc: Option<Linear>,
    /// Trainable BatchNorm layers keep their running statistics too.
    #[module(skip)]
    bn_frozen: bool,
}

impl ResNet50 {
    /// Fresh weights; `classes = 0` leaves the classifier out (the backbone of a transfer model).
    pub fn init(classes: usize, device: &Device) -> Self {
        let mut blocks = Vec::new();
        let mut cin = 64;
        for (s, (n, width)) in STAGES.into_iter().enumerate() {
            for b in 0..n {
                let stride = if b == 0 && s > 0 { 2 } else { 1 };
                blocks.push(Bottleneck::new(cin, width, stride, device));
                cin = 4 * width;
            }
        }
        Self {
            stem: ConvBn::new(3, 64, 7, 2, 1, device),
            pool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            blocks,
            fc: (classes > 0).then(|| LinearConfig::new(2048, classes).init(device)),
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
        let y = self.stem.to_onnx(g, x, Act::Relu);
        let mut y = g.max_pool(&self.pool, &y);
        for b in &self.blocks {
            y = b.to_onnx(g, &y);
        }
        y
    }

    /// Number of layers (17: the stem and 16 blocks).
    pub fn num_layers(&self) -> usize {
        self.blocks.len() + 1
    }

    /// Runs layers `from..to` (0 the stem, 1-16 the blocks).
    ///
    /// # Shapes
    ///
    /// - input: the input of layer `from`
    /// - output: the output of layer `to - 1`
    pub fn forward_range(&self, mut x: Tensor<4>, from: usize, to: usize) -> Tensor<4> {
        for i in from..to {
            x = match i {
                0 => self.pool.forward(self.stem.forward(x, Act::Relu)),
                i => self.blocks[i - 1].forward(x),
            };
        }
        x
    }

    /// The 2048-channel feature map.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, 3, height, width]`, torch-preprocessed
    /// - output: `[batch, 2048, height / 32, width / 32]` (rounded up)
    pub fn features(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_range(x, 0, self.num_layers())
    }

    /// ImageNet logits: features, global average pooling, the classifier.
    ///
    /// # Shapes
    ///
    /// - output: `[batch, classes]` (`[batch, 2048]` without the classifier)
    pub fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        let f = self.features(x);
        let [n, c, _, _] = f.dims();
        let pooled = f.mean_dim(3).mean_dim(2).reshape([n, c]);
        match &self.fc {
            Some(l) => l.forward(pooled),
            None => pooled,
        }
    }

    /// Layers before `cut` get no gradients, the others do.
    pub fn freeze_before(self, cut: usize) -> Self {
        let f = self.bn_frozen;
        Self {
            stem: self.stem.trainable(cut == 0, f),
            pool: self.pool,
            blocks: self
                .blocks
                .into_iter()
                .enumerate()
                .map(|(i, b)| b.trainable(i + 1 >= cut, f))
                .collect(),
            fc: self.fc,
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
    }

    /// Every BatchNorm running mean and variance, in layer order.
    pub fn batchnorm_stats(&self) -> Vec<f32> {
        let mut out = Vec::new();
        self.stem.stats(&mut out);
        for u in self.blocks.iter().flat_map(Bottleneck::units) {
            u.stats(&mut out);
        }
        out
    }

    /// Parameters of the feature extractor (no classifier, no BatchNorm running statistics).
    pub fn feature_params(&self) -> usize {
        let stats: usize = std::iter::once(&self.stem)
            .chain(self.blocks.iter().flat_map(Bottleneck::units))
            .map(ConvBn::running_stats)
            .sum();
        self.num_params() - self.fc.as_ref().map_or(0, |c| c.num_params()) - stats
    }

    /// `(torchvision prefix, module path prefix)` of every convolution and BatchNorm.
    fn key_pairs() -> Vec<(String, String)> {
        let mut pairs = vec![
            ("conv1".to_string(), "stem.conv".to_string()),
            ("bn1".into(), "stem.bn".into()),
            ("fc".into(), "fc".into()),
        ];
        let mut i = 0;
        for (s, (n, _)) in STAGES.into_iter().enumerate() {
            for b in 0..n {
                let tv = format!("layer{}.{b}", s + 1);
                for u in 1..=3 {
                    pairs.push((format!("{tv}.conv{u}"), format!("blocks.{i}.conv{u}.conv")));
                    pairs.push((format!("{tv}.bn{u}"), format!("blocks.{i}.conv{u}.bn")));
                }
                if b == 0 {
                    pairs.push((
                        format!("{tv}.downsample.0"),
                        format!("blocks.{i}.downsample.conv"),
                    ));
                    pairs.push((
                        format!("{tv}.downsample.1"),
                        format!("blocks.{i}.downsample.bn"),
                    ));
                }
                i += 1;
            }
        }
        pairs
    }

    /// How torchvision's state dict names this model's tensors (`fc.*` ignored without the
    /// classifier).
    pub fn key_map(&self) -> KeyMap {
        KeyMap {
            pairs: Self::key_pairs(),
            extra: if self.fc.is_some() {
                vec![]
            } else {
                vec!["fc.".into()]
            },
            keras: false,
        }
    }
}
