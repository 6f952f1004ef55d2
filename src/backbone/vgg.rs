//! The VGG convolutional base (no top), with Keras layer names.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

use super::weights::KeyMap;
use super::{BackboneDef, LayerOp};
use crate::cpu::{pool, winograd};

/// A VGG base: 3x3 same convolutions with ReLU, 2x2 max pooling after each block.
#[derive(Module, Debug)]
pub struct Vgg {
    /// The convolutions in order; `convs.{i}` in the module tree.
    pub convs: Vec<Conv2d>,
    pool: MaxPool2d,
    #[module(skip)]
    ops: Vec<LayerOp>,
}

impl Vgg {
    /// Loads Keras-named (or torchvision-named) VGG weights, any [`super::weights::Format`];
    /// every tensor of the model must be found with its shape.
    pub fn load(
        self,
        def: &BackboneDef,
        path: &std::path::Path,
    ) -> Result<Self, super::weights::WeightsError> {
        super::weights::load(self, &key_map(def), path, def.name)
    }

    /// A VGG base with freshly initialised weights (load real ones with [`Vgg::load`]).
    pub fn init(def: &BackboneDef, device: &Device) -> Self {
        let ops: Vec<LayerOp> = def.layers().iter().map(|l| l.op).collect();
        let convs = ops
            .iter()
            .filter_map(|op| match *op {
                LayerOp::Conv {
                    in_channels,
                    out_channels,
                    ..
                } => Some(
                    Conv2dConfig::new([in_channels, out_channels], [3, 3])
                        .with_padding(PaddingConfig2d::Same)
                        .init(device),
                ),
                _ => None,
            })
            .collect();
        Self {
            convs,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            ops,
        }
    }

    /// The layers from `from` on.
    pub fn ops_from(&self, from: usize) -> &[LayerOp] {
        &self.ops[from.min(self.ops.len())..]
    }

    /// Number of layers (convolutions and pools).
    pub fn num_layers(&self) -> usize {
        self.ops.len()
    }

    /// The base as ONNX nodes on `x`.
    pub fn to_onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> String {
        let mut y = x.to_string();
        for op in &self.ops {
            y = match *op {
                LayerOp::Conv { index, .. } => {
                    let c = g.conv(&self.convs[index], &y);
                    g.node("Relu", &[&c], &[])
                }
                LayerOp::MaxPool | LayerOp::Block { .. } => g.max_pool(&self.pool, &y),
            };
        }
        y
    }

    /// Runs layers `from..to` (indices into the backbone's layer list).
    ///
    /// # Shapes
    ///
    /// - input: `[batch, channels, height, width]` as expected by layer `from`
    /// - output: `[batch, channels, height, width]` after layer `to - 1`
    pub fn forward_range(&self, mut x: Tensor<4>, from: usize, to: usize) -> Tensor<4> {
        for op in &self.ops[from..to] {
            x = match *op {
                LayerOp::Conv { index, .. } => relu(self.convs[index].forward(x)),
                LayerOp::MaxPool | LayerOp::Block { .. } => self.pool.forward(x),
            };
        }
        x
    }

    /// Runs layers `0..to` where no gradient is wanted (the frozen part): on burn's CPU backend by
    /// Winograd convolutions (`cpu::winograd`, about 2x faster than burn's own), elsewhere (GPU,
    /// autodiff tensors) by `forward_range`.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, 3, height, width]`; output: `[batch, channels, height, width]` after layer `to - 1`
    pub fn forward_frozen(&self, x: Tensor<4>, to: usize) -> Tensor<4> {
        let device = x.device();
        if !crate::cpu::is_cpu(&device) || to == 0 {
            return self.forward_range(x, 0, to);
        }
        let [n, mut c, mut h, mut w] = x.dims();
        let mut data = x
            .into_data()
            .try_into_vec::<f32>()
            .expect("backbone activations are f32");
        for op in &self.ops[..to] {
            match *op {
                LayerOp::Conv { index, .. } => {
                    let conv = &self.convs[index];
                    let [cout, cin, kh, kw] = conv.weight.dims();
                    assert_eq!((cin, kh, kw), (c, 3, 3), "VGG convolutions are 3x3");
                    let weight = conv.weight.val().into_data().try_into_vec::<f32>();
                    let bias = match &conv.bias {
                        Some(b) => b.val().into_data().try_into_vec::<f32>(),
                        None => Ok(vec![0.0; cout]),
                    };
                    let fast = winograd::Conv3x3::new(
                        &weight.expect("f32 weights"),
                        &bias.expect("f32 bias"),
                        cout,
                        cin,
                    );
                    data = fast.forward(&data, n, h, w);
                    c = cout;
                }
                LayerOp::MaxPool | LayerOp::Block { .. } => {
                    data = pool::max_pool(&data, n * c, h, w);
                    (h, w) = (h / 2, w / 2);
                }
            }
        }
        Tensor::from_data(TensorData::new(data, [n, c, h, w]), &device)
    }

    /// Indices (into `convs`) of the convolutions that sit before layer `cut`.
    pub fn convs_before(&self, cut: usize) -> Vec<usize> {
        self.ops[..cut]
            .iter()
            .filter_map(|op| match op {
                LayerOp::Conv { index, .. } => Some(*index),
                _ => None,
            })
            .collect()
    }

    /// Stops gradients for every convolution that sits before layer `cut`, and lets them flow
    /// for every one after it (a later phase may unfreeze layers).
    pub fn freeze_before(mut self, cut: usize) -> Self {
        let frozen = self.convs_before(cut);
        self.convs = self
            .convs
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                let trainable = !frozen.contains(&i);
                c.weight = c.weight.set_require_grad(trainable);
                c.bias = c.bias.map(|b| b.set_require_grad(trainable));
                c
            })
            .collect();
        self
    }
}

/// How published VGG weights name the convolutions: Keras' `block1_conv1` (the asset mirror, `.h5`
/// files; the name messages use) and torchvision's `features.0` (`.pth` files). The classifiers of
/// either (`fc1`, `fc2`, `predictions`; `classifier.*`) are ignored.
pub fn key_map(def: &BackboneDef) -> KeyMap {
    let (mut keras, mut torchvision) = (Vec::new(), Vec::new());
    // torchvision's `features` is a Sequential of convolutions, ReLUs and pools.
    let mut feature = 0;
    for l in def.layers() {
        if let LayerOp::Conv { index, .. } = l.op {
            keras.push((l.name.clone(), format!("convs.{index}")));
            torchvision.push((format!("features.{feature}"), format!("convs.{index}")));
            feature += 2;
        } else {
            feature += 1;
        }
    }
    KeyMap {
        pairs: keras.into_iter().chain(torchvision).collect(),
        extra: ["fc1.", "fc2.", "predictions.", "classifier."]
            .map(String::from)
            .to_vec(),
        keras: true,
    }
}
