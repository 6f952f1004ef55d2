//! Pretrained convolutional bases: their layer names, shapes, preprocessing and weights.

pub mod conv_bn;
pub mod mobilenet;
pub mod resnet;
pub mod vgg;
pub mod weights;

use crate::spec::Preprocess;

/// What a layer of a backbone does, enough to infer shapes and count parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOp {
    /// 3x3 convolution, `same` padding, ReLU; `index` is its position among the convolutions.
    Conv {
        /// Position among the backbone's convolutions.
        index: usize,
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
    },
    /// 2x2 max pooling, stride 2.
    MaxPool,
    /// A MobileNetV2 stage layer (stem, inverted residual block or last 1x1 convolution): `kind`
    /// for the summary, its output channels, stride and parameter count.
    Block {
        /// `Conv2dNormActivation` or `InvertedResidual`.
        kind: &'static str,
        /// Output channels.
        out_channels: usize,
        /// Stride (1 or 2, `same`-style padding: the output is `ceil(input / stride)`).
        stride: usize,
        /// Parameters (BatchNorm running statistics excluded).
        params: usize,
    },
}

/// The network family of a backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// VGG: blocks of 3x3 convolutions and max pooling.
    Vgg,
    /// MobileNetV2 (torchvision's layout).
    MobileNetV2,
    /// ResNet50 (torchvision's layout).
    ResNet50,
}

/// One named backbone layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Keras layer name, e.g. `block5_conv1`.
    pub name: String,
    /// What it computes.
    pub op: LayerOp,
}

impl LayerInfo {
    /// Parameters of this layer (weights and biases).
    pub fn num_params(&self) -> usize {
        match self.op {
            LayerOp::Conv {
                in_channels,
                out_channels,
                ..
            } => out_channels * in_channels * 9 + out_channels,
            LayerOp::MaxPool => 0,
            LayerOp::Block { params, .. } => params,
        }
    }

    /// The layer's type, as a Keras summary names it.
    pub fn kind(&self) -> &'static str {
        match self.op {
            LayerOp::Conv { .. } => "Conv2D",
            LayerOp::MaxPool => "MaxPooling2D",
            LayerOp::Block { kind, .. } => kind,
        }
    }

    /// Output shape `[channels, height, width]` for an input of that shape.
    pub fn output_shape(&self, shape: [usize; 3]) -> [usize; 3] {
        self.op.output_shape(shape)
    }
}

impl LayerOp {
    /// Output shape `[channels, height, width]` for an input of that shape.
    pub fn output_shape(&self, [c, h, w]: [usize; 3]) -> [usize; 3] {
        match *self {
            LayerOp::Conv { out_channels, .. } => [out_channels, h, w],
            LayerOp::MaxPool => [c, h / 2, w / 2],
            LayerOp::Block {
                out_channels,
                stride,
                ..
            } => [out_channels, h.div_ceil(stride), w.div_ceil(stride)],
        }
    }
}

/// A backbone architecture runner knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackboneDef {
    /// Name used in specs.
    pub name: &'static str,
    /// The network family.
    pub family: Family,
    /// Convolutions per block.
    pub blocks: &'static [usize],
    /// Channels of each block.
    pub widths: &'static [usize],
    /// Preprocessing the ImageNet weights were trained with.
    pub default_preprocess: Preprocess,
    /// File name of the ImageNet weights (in `weights/` or `$RUNNER_ASSETS/weights/`).
    pub imagenet_file: &'static str,
    /// Smallest input height and width that still leaves a 1x1 output.
    pub min_input: usize,
}

/// Every backbone runner can build.
pub const BACKBONES: [BackboneDef; 4] = [
    BackboneDef {
        name: "vgg16",
        family: Family::Vgg,
        blocks: &[2, 2, 3, 3, 3],
        widths: &[64, 128, 256, 512, 512],
        default_preprocess: Preprocess::Caffe,
        imagenet_file: "vgg16_imagenet_notop.safetensors",
        min_input: 32,
    },
    BackboneDef {
        name: "vgg19",
        family: Family::Vgg,
        blocks: &[2, 2, 4, 4, 4],
        widths: &[64, 128, 256, 512, 512],
        default_preprocess: Preprocess::Caffe,
        imagenet_file: "vgg19_imagenet_notop.safetensors",
        min_input: 32,
    },
    BackboneDef {
        name: "mobilenet_v2",
        family: Family::MobileNetV2,
        blocks: &[],
        widths: &[],
        default_preprocess: Preprocess::Torch,
        imagenet_file: "mobilenet_v2_imagenet.safetensors",
        min_input: 32,
    },
    BackboneDef {
        name: "resnet50",
        family: Family::ResNet50,
        blocks: &[],
        widths: &[],
        default_preprocess: Preprocess::Torch,
        imagenet_file: "resnet50_imagenet.safetensors",
        min_input: 32,
    },
];

/// The names of every known backbone.
pub fn backbone_names() -> Vec<&'static str> {
    BACKBONES.iter().map(|b| b.name).collect()
}

/// Looks a backbone up by name.
pub fn find(name: &str) -> Option<&'static BackboneDef> {
    BACKBONES.iter().find(|b| b.name == name)
}

impl BackboneDef {
    /// The layers in order: Keras names for VGG (`block1_conv1` ... `block5_pool`), torchvision
    /// names for MobileNetV2 (`features.0` ... `features.18`) and ResNet50 (`conv1`, `layer1.0`
    /// ... `layer4.2`).
    pub fn layers(&self) -> Vec<LayerInfo> {
        match self.family {
            Family::MobileNetV2 => return mobilenet::layers(),
            Family::ResNet50 => return resnet::layers(),
            Family::Vgg => {}
        }
        let mut out = Vec::new();
        let mut in_channels = 3;
        let mut index = 0;
        for (b, (&n, &width)) in self.blocks.iter().zip(self.widths).enumerate() {
            for c in 0..n {
                out.push(LayerInfo {
                    name: format!("block{}_conv{}", b + 1, c + 1),
                    op: LayerOp::Conv {
                        index,
                        in_channels,
                        out_channels: width,
                    },
                });
                in_channels = width;
                index += 1;
            }
            out.push(LayerInfo {
                name: format!("block{}_pool", b + 1),
                op: LayerOp::MaxPool,
            });
        }
        out
    }

    /// The preprocessing the weights in `weights` were trained with: the family's default,
    /// except torchvision's VGG weights (torch-normalised RGB where Keras' use caffe BGR).
    pub fn preprocess_for(&self, weights: &std::path::Path) -> Preprocess {
        if self.family == Family::Vgg && weights::torchvision_named(weights) {
            Preprocess::Torch
        } else {
            self.default_preprocess
        }
    }

    /// Total parameters of the base.
    pub fn num_params(&self) -> usize {
        self.layers().iter().map(LayerInfo::num_params).sum()
    }

    /// The shape after layer `upto` (exclusive) for an input of `[height, width]`.
    pub fn shape_at(&self, upto: usize, [h, w]: [usize; 2]) -> [usize; 3] {
        self.layers()
            .iter()
            .take(upto)
            .fold([3, h, w], |s, l| l.output_shape(s))
    }

    /// Values of the largest activation one image makes inside the base (an upper bound): the
    /// largest layer output, times 6 for MobileNetV2, whose blocks expand their input six-fold
    /// before the depthwise convolution.
    pub fn largest_activation(&self, [h, w]: [usize; 2]) -> usize {
        let mut shape = [3, h, w];
        let mut largest = 3 * h * w;
        for l in self.layers() {
            shape = l.output_shape(shape);
            largest = largest.max(shape.iter().product());
        }
        match self.family {
            Family::MobileNetV2 => largest * 6,
            Family::Vgg | Family::ResNet50 => largest,
        }
    }

    /// The weight tensors the base expects: `(name, shape)` in Keras naming.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.layers()
            .iter()
            .filter_map(|l| match l.op {
                LayerOp::Conv {
                    in_channels,
                    out_channels,
                    ..
                } => Some([
                    (
                        format!("{}.weight", l.name),
                        vec![out_channels, in_channels, 3, 3],
                    ),
                    (format!("{}.bias", l.name), vec![out_channels]),
                ]),
                LayerOp::MaxPool | LayerOp::Block { .. } => None,
            })
            .flatten()
            .collect()
    }
}

/// A `trainable_from` that names no layer of the backbone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "\"{name}\" is not a layer of {backbone}; nearest layer names: {}; or use \"none\" (all frozen) or \"all\" (all trainable)",
    nearest.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")
)]
pub struct UnknownLayer {
    /// The name given.
    pub name: String,
    /// The backbone's name.
    pub backbone: String,
    /// The three nearest layer names, nearest first.
    pub nearest: Vec<String>,
}

/// Where training starts in the backbone: layers before `index` are frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cutoff {
    /// Index of the first trainable layer; `layers().len()` when the whole base is frozen.
    pub index: usize,
    /// The spec's value (`none`, `all` or a layer name).
    pub label: String,
}

impl Cutoff {
    /// Resolves `trainable_from` against the backbone's layer names.
    pub fn resolve(def: &BackboneDef, trainable_from: &str) -> Result<Self, UnknownLayer> {
        let layers = def.layers();
        let index = match trainable_from {
            "none" => layers.len(),
            "all" => 0,
            // A stage name (`layer4`) stands for its first block (`layer4.0`).
            name => match layers.iter().position(|l| l.name == name).or_else(|| {
                layers.iter().position(|l| {
                    l.name
                        .strip_prefix(name)
                        .is_some_and(|r| r.starts_with('.'))
                })
            }) {
                Some(i) => i,
                None => {
                    let mut names: Vec<(usize, &str)> = layers
                        .iter()
                        .map(|l| (strsim::damerau_levenshtein(name, &l.name), l.name.as_str()))
                        .collect();
                    names.sort();
                    return Err(UnknownLayer {
                        name: name.to_string(),
                        backbone: def.name.to_string(),
                        nearest: names.iter().take(3).map(|(_, n)| n.to_string()).collect(),
                    });
                }
            },
        };
        Ok(Self {
            index,
            label: trainable_from.to_string(),
        })
    }

    /// Whether the whole base is frozen.
    pub fn all_frozen(&self, def: &BackboneDef) -> bool {
        self.index >= def.layers().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_keras() {
        let vgg16 = find("vgg16").unwrap();
        assert_eq!(vgg16.num_params(), 14_714_688);
        assert_eq!(vgg16.expected_tensors().len(), 26);
        assert_eq!(
            vgg16.shape_at(vgg16.layers().len(), [150, 150]),
            [512, 4, 4]
        );
        let vgg19 = find("vgg19").unwrap();
        assert_eq!(vgg19.num_params(), 20_024_384);
        assert_eq!(vgg19.expected_tensors().len(), 32);
    }

    #[test]
    fn layer_names_follow_keras() {
        let names: Vec<String> = find("vgg16")
            .unwrap()
            .layers()
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(names.len(), 18);
        assert_eq!(names[0], "block1_conv1");
        assert_eq!(names[2], "block1_pool");
        assert_eq!(names[14], "block5_conv1");
        assert_eq!(names[17], "block5_pool");
    }
}
