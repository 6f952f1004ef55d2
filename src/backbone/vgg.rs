//! The VGG convolutional base (no top), with Keras layer names.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

use super::weights::KeyMap;
use super::{BackboneDef, LayerOp};
use crate::cpu::{pool, winograd};

/// The largest activation, in floats (24 MiB), that [`Vgg::forward_frozen`] computes over a
/// whole batch: earlier layers run a few images at a time (see `Vgg::frozen_in_groups`).
const GROUP_FLOATS: usize = 6 << 20;

/// How [`Vgg::forward_frozen`] splits the layers `ops` over a batch `[n, c, h, w]`: the layers
/// before the first returned (`split`) run `group` images at a time (as many as keep each of
/// their activations within `limit` floats), the rest over the whole batch, once every
/// activation from `split` on fits within `limit`.
pub fn groups(ops: &[LayerOp], [n, c, h, w]: [usize; 4], limit: usize) -> (usize, usize) {
    let to = ops.len();
    // out[i]: the floats layer i puts out for one image.
    let mut shape = [c, h, w];
    let out: Vec<usize> = ops
        .iter()
        .map(|op| {
            shape = op.output_shape(shape);
            shape.iter().product()
        })
        .collect();
    let at = |i: usize| if i == 0 { c * h * w } else { out[i - 1] };
    // The first layer from which every activation of the whole batch fits.
    let split = (0..=to)
        .find(|&s| (s..=to).all(|i| n * at(i) <= limit))
        .unwrap_or(to);
    let per_image = (0..=split).map(at).max().unwrap_or(1);
    (split, (limit / per_image).clamp(1, n.max(1)))
}

/// [`groups`] with the limit the frozen forward uses (24 MiB per activation).
pub fn frozen_groups(ops: &[LayerOp], dims: [usize; 4]) -> (usize, usize) {
    groups(ops, dims, GROUP_FLOATS)
}

/// Makes `buf` at least `len` long (its values to be overwritten), growing it by exactly what is
/// missing: a doubled capacity could cross the allocator's 32 MiB threshold for fresh mappings.
fn at_least(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.reserve_exact(len - buf.len());
        buf.resize(len, 0.0);
    }
}

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
        let [n, c, h, w] = x.dims();
        let input = x
            .into_data()
            .try_into_vec::<f32>()
            .expect("backbone activations are f32");
        let (y, [c, h, w]) = self.frozen_in_groups(&input, [n, c, h, w], to, GROUP_FLOATS);
        Tensor::from_data(TensorData::new(y, [n, c, h, w]), &device)
    }

    /// [`Vgg::forward_frozen`] on planar values: the first layers, whose activations over the
    /// whole batch would be larger than `limit` floats, a few images at a time (as many as keep
    /// each activation within `limit`), the rest over the whole batch. Returns the output and its
    /// `[c, h, w]`.
    ///
    /// Whole-batch activations of the first block are 115 MiB each (20 images at 150x150): glibc
    /// maps such buffers afresh and unmaps them when freed, so every layer of every batch had
    /// the kernel map and zero new pages, 12 % of the time (perf, `runner bench-workload
    /// vgg16_forward`). Buffers within `limit` come from the allocator's heap and are reused
    /// (`cpu::keep_freed_memory`); the result is the same, image by image.
    fn frozen_in_groups(
        &self,
        input: &[f32],
        [n, c, h, w]: [usize; 4],
        to: usize,
        limit: usize,
    ) -> (Vec<f32>, [usize; 3]) {
        let (split, group) = groups(&self.ops[..to], [n, c, h, w], limit);
        // Storage for the two activations and the scratch, shared by every group and the rest
        // of the batch; it only grows.
        let mut bufs: [Vec<f32>; 3] = Default::default();
        let (len, shape) = if split == 0 {
            self.frozen_layers(input, [n, c, h, w], 0..to, &mut bufs)
        } else {
            let mut mid = Vec::new();
            let mut shape = [c, h, w];
            for first in (0..n).step_by(group) {
                let k = group.min(n - first);
                let images = &input[first * c * h * w..][..k * c * h * w];
                let (len, s) = self.frozen_layers(images, [k, c, h, w], 0..split, &mut bufs);
                // The whole batch's activation at the split, reserved exactly: a doubled
                // capacity could cross the allocator's threshold for fresh mappings.
                mid.reserve_exact((len / k * n).saturating_sub(mid.len()));
                mid.extend_from_slice(&bufs[0][..len]);
                shape = s;
            }
            let [c, h, w] = shape;
            self.frozen_layers(&mid, [n, c, h, w], split..to, &mut bufs)
        };
        let mut y = std::mem::take(&mut bufs[0]);
        y.truncate(len);
        y.shrink_to_fit();
        (y, shape)
    }

    /// Layers `layers` by Winograd convolutions and pools on `[n, c, h, w]` planar values,
    /// `bufs` the storage of the two activations the layers alternate between and of the
    /// convolutions' scratch. Leaves the output in the first `len` floats of `bufs[0]` and
    /// returns `len` and its `[c, h, w]`.
    fn frozen_layers(
        &self,
        input: &[f32],
        [n, mut c, mut h, mut w]: [usize; 4],
        layers: std::ops::Range<usize>,
        bufs: &mut [Vec<f32>; 3],
    ) -> (usize, [usize; 3]) {
        let [src, dst, scratch] = bufs;
        let mut len = input.len();
        at_least(src, len);
        src[..len].copy_from_slice(input);
        for op in &self.ops[layers] {
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
                    let fast = winograd::Conv3x3::with_tile(
                        &weight.expect("f32 weights"),
                        &bias.expect("f32 bias"),
                        cout,
                        cin,
                        winograd::Tile::for_layer(cin, cout, [h, w]),
                    );
                    let out = n * cout * h * w;
                    at_least(dst, out);
                    at_least(scratch, fast.scratch_len([n, h, w]));
                    fast.forward_into(&src[..len], [n, h, w], &mut dst[..out], scratch);
                    (len, c) = (out, cout);
                }
                LayerOp::MaxPool | LayerOp::Block { .. } => {
                    let out = n * c * (h / 2) * (w / 2);
                    at_least(dst, out);
                    pool::max_pool_into(&src[..len], n * c, h, w, &mut dst[..out]);
                    (len, h, w) = (out, h / 2, w / 2);
                }
            }
            std::mem::swap(src, dst);
        }
        (len, [c, h, w])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_three_blocks_run_four_images_at_a_time_at_150x150() {
        let def = crate::backbone::find("vgg16").expect("vgg16 is defined");
        let ops: Vec<LayerOp> = def.layers().iter().map(|l| l.op).collect();
        // Layers 0..10 (block1_conv1 to block3_pool) run in groups: block3_conv3's output for
        // 20 images, 20 x 256 x 37 x 37 floats, is over 6 Mi; 6 Mi / (64 x 150 x 150) is 4.
        assert_eq!(frozen_groups(&ops, [20, 3, 150, 150]), (10, 4));
        // A small batch runs whole.
        assert_eq!(frozen_groups(&ops, [2, 3, 32, 32]).0, 0);
    }

    #[test]
    fn images_in_groups_give_what_the_whole_batch_gives() {
        let device = Device::flex();
        let def = crate::backbone::find("vgg16").expect("vgg16 is defined");
        let vgg = Vgg::init(def, &device);
        let (n, h, w) = (3, 32, 30);
        let x: Vec<f32> = (0..n * 3 * h * w)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let burn = |to: usize| {
            let t = Tensor::<4>::from_data(TensorData::new(x.clone(), [n, 3, h, w]), &device);
            vgg.forward_range(t, 0, to)
                .into_data()
                .try_into_vec::<f32>()
                .unwrap()
        };
        for to in [1, 3, 7, vgg.num_layers()] {
            let want = burn(to);
            let (whole, shape) = vgg.frozen_in_groups(&x, [n, 3, h, w], to, usize::MAX);
            assert_eq!(whole.len(), want.len(), "to {to}");
            assert_eq!(n * shape.iter().product::<usize>(), want.len(), "to {to}");
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            for (g, e) in whole.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-4 * scale, "to {to}: {g} vs {e}");
            }
            // Limits that put one image, two, or the whole batch in a group, and split the
            // layers at different places.
            for limit in [1, 64 * h * w, 2 * 64 * h * w, 64 * h * w * n / 4] {
                let (grouped, s) = vgg.frozen_in_groups(&x, [n, 3, h, w], to, limit);
                assert_eq!(s, shape, "to {to}, limit {limit}");
                assert_eq!(grouped, whole, "to {to}, limit {limit}");
            }
        }
    }
}
