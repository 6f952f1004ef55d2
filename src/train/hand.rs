//! Training steps computed by hand on the CPU for the notebook's models: a head of dense,
//! dropout, flatten and global-average-pool layers, under VGG convolutions and pools above the
//! cutoff (fine-tuning block5) or right on the cutoff (cached features, augmented images).
//!
//! burn's autodiff runs such a step as tensor operations that each allocate their output (its CPU
//! matrix product zero-fills a new buffer and then copies it once more to re-align it), and its
//! convolutions run image by image; for the dense head on cached features that bookkeeping cost
//! more than the arithmetic (perf on `runner bench-workload dense_head_epoch`: 15 % in
//! memset/memmove of the weight gradient alone). Here the dense layers' three matrix products run
//! on `gemm` (the crate burn's CPU backend uses) straight from the parameters' own buffers, and a
//! 3x3 convolution runs forward and carries its gradient back by Winograd's F(2x2, 3x3) over the
//! whole batch, its parameters' gradients by one im2col product (`cpu::winograd`). The
//! gradients go to the phase's optimizer exactly as burn's would: optimizer state, schedules,
//! gradient clipping and checkpoints are unchanged. Dropout masks come from the device's random
//! stream with the shapes burn's `Dropout` draws them in, so a run is the same run either way
//! (tested step by step and run by run against autodiff).

use burn::module::{Param, ParamId, ParamMapper};
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use rayon::prelude::*;

use crate::backbone::LayerOp;
use crate::cpu::{
    self, pool,
    winograd::{self, Conv3x3},
};
use crate::head::Plain;
use crate::model::{Backbone, TransferModel};
use crate::spec::{Activation, Loss};

/// One layer of the path.
#[derive(Debug, Clone, Copy)]
enum Op {
    Dense {
        layer: usize,
        /// The head's last layer: its activation is folded into the loss.
        last: bool,
    },
    Dropout {
        prob: f64,
    },
    Flatten,
    GlobalAverage,
    /// A VGG convolution of the base (3x3, same, ReLU), by its index among the convolutions.
    Conv {
        index: usize,
    },
    /// A VGG 2x2 max pool.
    Pool,
}

/// The hand-written step for one model's trainable part.
#[derive(Debug, Clone)]
pub struct HandPath {
    ops: Vec<Op>,
    loss: Loss,
    smoothing: f32,
}

/// What one step computed.
pub struct Step {
    /// Mean loss over the batch.
    pub loss: f32,
    /// Correct predictions in the batch.
    pub correct: usize,
    /// Gradients of the trainable parameters.
    pub grads: GradientsParams,
}

/// A parameter taken out of its module for the step.
struct Taken<const D: usize> {
    id: ParamId,
    data: TensorData,
    mapper: ParamMapper<Tensor<D>>,
    trainable: bool,
}

impl<const D: usize> Taken<D> {
    fn new(p: Param<Tensor<D>>) -> Self {
        let (id, tensor, mapper) = p.consume();
        let trainable = tensor.is_require_grad();
        // Where the module holds the only reference (a parameter the optimizer or this step put
        // back), this hands the buffer over without a copy.
        let data = tensor.into_data();
        Self {
            id,
            data,
            mapper,
            trainable,
        }
    }

    fn values(&self) -> &[f32] {
        self.data.as_slice::<f32>().expect("parameters are f32")
    }

    /// Registers `values` (this parameter's shape) as its gradient, on the device without
    /// autodiff as burn's gradients are.
    fn register(&self, grads: &mut GradientsParams, values: Vec<f32>, inner: &Device) {
        let shape = self.data.shape().clone();
        grads.register(
            self.id,
            Tensor::<D>::from_data(TensorData::new(values, shape), inner),
        );
    }

    fn back(self, device: &Device) -> Param<Tensor<D>> {
        let tensor = Tensor::<D>::from_data(self.data, device).set_require_grad(self.trainable);
        Param::from_mapped_value(self.id, tensor, self.mapper)
    }
}

/// A convolution's parameters, taken out for the step.
struct ConvParams {
    weight: Taken<4>,
    bias: Option<Taken<1>>,
    cin: usize,
    cout: usize,
}

/// The parameters of one op.
enum Params {
    None,
    Dense(DenseParams),
    Conv(ConvParams),
}

/// A stand-in while a parameter is out (holds no memory).
fn stand_in<const D: usize>(device: &Device) -> Param<Tensor<D>> {
    Param::initialized(ParamId::new(), Tensor::empty([0; D], device))
}

/// A dense layer's parameters, taken out for the step.
struct DenseParams {
    weight: Taken<2>,
    bias: Option<Taken<1>>,
    activation: Activation,
    inputs: usize,
    units: usize,
}

impl HandPath {
    /// The path for `model` training on `device`, or `None` where burn's autodiff runs the step:
    /// a device other than burn's CPU backend, layers of a base other than VGG above the cutoff,
    /// a convolution or pool in the head, a softmax before the last layer.
    pub fn of(model: &TransferModel, device: &Device, loss: Loss) -> Option<Self> {
        if !crate::cpu::is_cpu(device) {
            return None;
        }
        let n = model.head.layers.len();
        let mut ops = Vec::with_capacity(n);
        if !model.head_starts_at_cut() {
            let Backbone::Vgg(v) = &model.backbone else {
                return None;
            };
            for op in v.ops_from(model.cut()) {
                ops.push(match *op {
                    LayerOp::Conv { index, .. } => Op::Conv { index },
                    LayerOp::MaxPool => Op::Pool,
                    LayerOp::Block { .. } => return None,
                });
            }
        }
        for (layer, l) in model.head.layers.iter().enumerate() {
            let last = layer + 1 == n;
            ops.push(match l.plain() {
                Plain::Dense(Activation::Softmax) if !last => return None,
                Plain::Dense(_) => Op::Dense { layer, last },
                Plain::Dropout { prob, training } if training && prob > 0.0 => Op::Dropout { prob },
                Plain::Dropout { .. } => continue,
                Plain::Flatten => Op::Flatten,
                Plain::GlobalAverage => Op::GlobalAverage,
                Plain::Spatial => return None,
            });
        }
        ops.iter()
            .any(|o| matches!(o, Op::Dense { .. } | Op::Conv { .. }))
            .then_some(Self {
                ops,
                loss,
                smoothing: 0.0,
            })
    }

    /// The same path against label-smoothed targets (`train.label_smoothing`).
    pub fn with_label_smoothing(self, eps: f32) -> Self {
        Self {
            smoothing: eps,
            ..self
        }
    }

    /// One training step: loss, correct predictions and gradients of `model` on `x`, with the
    /// device's random stream (seeded by the caller) drawing the dropout masks.
    ///
    /// # Shapes
    ///
    /// - x: `[batch, c, h, w]`, activations at the cutoff
    /// - labels: `[batch]`
    pub fn step(&self, model: &mut TransferModel, x: Tensor<4>, labels: &[usize]) -> Step {
        let device = x.device();
        let dims = x.dims().to_vec();
        let batch = dims[0];
        let input = x.into_data();
        let input = input.as_slice::<f32>().expect("activations are f32");
        let params = self.take_params(model, &device);
        let tape = self.forward(&params, input, dims);
        let logits = value(input, &tape.outs, self.ops.len());
        let classes = tape.dims[1..].iter().product::<usize>();
        let (loss, correct, grad) =
            loss_and_grad(self.loss, logits, classes, labels, self.smoothing);
        let grads = self.backward(&params, input, &tape, batch, grad, &device);
        self.put_back(model, params, &device);
        Step {
            loss,
            correct,
            grads,
        }
    }

    /// Takes the trainable path's parameters out of `model` (stand-ins are left in their place
    /// until [`HandPath::put_back`]).
    fn take_params(&self, model: &mut TransferModel, device: &Device) -> Vec<Params> {
        let mut params: Vec<Params> = Vec::with_capacity(self.ops.len());
        for op in &self.ops {
            params.push(match *op {
                Op::Dense { layer, .. } => {
                    let (linear, activation) = model
                        .head
                        .take_dense(layer)
                        .expect("the path was made from this head");
                    let Linear { weight, bias } = linear;
                    let weight = Taken::new(weight);
                    let [inputs, units] = weight.data.shape()[..] else {
                        unreachable!("a dense weight is a matrix")
                    };
                    Params::Dense(DenseParams {
                        weight,
                        bias: bias.map(Taken::new),
                        activation,
                        inputs,
                        units,
                    })
                }
                Op::Conv { index } => {
                    let Backbone::Vgg(v) = &mut model.backbone else {
                        unreachable!("the path was made from a VGG base")
                    };
                    let conv = &mut v.convs[index];
                    let weight = Taken::new(std::mem::replace(&mut conv.weight, stand_in(device)));
                    let bias = conv.bias.take().map(Taken::new);
                    let [cout, cin, 3, 3] = weight.data.shape()[..] else {
                        unreachable!("VGG convolutions are 3x3")
                    };
                    Params::Conv(ConvParams {
                        weight,
                        bias,
                        cin,
                        cout,
                    })
                }
                _ => Params::None,
            });
        }

        params
    }

    /// The forward pass from `input` of shape `dims`, keeping what the backward pass needs.
    fn forward(&self, params: &[Params], input: &[f32], mut dims: Vec<usize>) -> Tape {
        let batch = dims[0];
        // Forward. `outs[i]` is op i's output; `None` where it is its input unchanged.
        let mut outs: Vec<Option<Vec<f32>>> = Vec::with_capacity(self.ops.len());
        let mut masks: Vec<Option<Vec<f32>>> = vec![None; self.ops.len()];
        let mut in_dims = Vec::with_capacity(self.ops.len());
        for (i, op) in self.ops.iter().enumerate() {
            let x = value(input, &outs, i);
            in_dims.push(dims.clone());
            let out = match *op {
                Op::Dense { last, .. } => {
                    let Params::Dense(p) = &params[i] else {
                        unreachable!("dense ops hold dense parameters")
                    };
                    let mut z = affine(x, batch, p);
                    if !last {
                        activate(&mut z, p.activation);
                    }
                    dims = vec![batch, p.units];
                    Some(z)
                }
                Op::Dropout { prob } => {
                    // As burn's Dropout: a mask of the input's shape, then two products.
                    let keep = 1.0 - prob;
                    let mask = bernoulli(&dims, keep);
                    let scale = (1.0 / keep) as f32;
                    let y = x.iter().zip(&mask).map(|(v, m)| (v * m) * scale).collect();
                    masks[i] = Some(mask);
                    Some(y)
                }
                Op::Flatten => {
                    dims = vec![batch, dims[1..].iter().product()];
                    None
                }
                Op::GlobalAverage if dims.len() == 4 => {
                    let (c, hw) = (dims[1], dims[2] * dims[3]);
                    dims = vec![batch, c];
                    Some(
                        x.chunks(hw)
                            .map(|s| s.iter().sum::<f32>() / hw as f32)
                            .collect(),
                    )
                }
                Op::GlobalAverage => None,
                Op::Conv { .. } => {
                    let Params::Conv(p) = &params[i] else {
                        unreachable!("convolutions hold convolution parameters")
                    };
                    let (h, w) = (dims[2], dims[3]);
                    let zeros;
                    let bias = match &p.bias {
                        Some(b) => b.values(),
                        None => {
                            zeros = vec![0.0; p.cout];
                            &zeros
                        }
                    };
                    // F(2x2): its rounding (about 1e-6, F(4x4)'s nearer 1e-5) keeps the
                    // gradients within 1e-5 of autodiff's, and VGG's trainable blocks at
                    // 150x150 (9x9 maps) run as fast with it (`bench-workload vgg16_layers`).
                    let tile = winograd::Tile::F2;
                    let conv = Conv3x3::with_tile(p.weight.values(), bias, p.cout, p.cin, tile);
                    dims = vec![batch, p.cout, h, w];
                    Some(conv.forward(x, batch, h, w))
                }
                Op::Pool => {
                    let (c, h, w) = (dims[1], dims[2], dims[3]);
                    dims = vec![batch, c, h / 2, w / 2];
                    Some(pool::max_pool(x, batch * c, h, w))
                }
            };
            outs.push(out);
        }

        Tape {
            outs,
            masks,
            in_dims,
            dims,
        }
    }

    /// The backward pass from `grad` (d loss / d logits): every trainable parameter's gradient.
    fn backward(
        &self,
        params: &[Params],
        input: &[f32],
        tape: &Tape,
        batch: usize,
        mut grad: Vec<f32>,
        device: &Device,
    ) -> GradientsParams {
        let Tape {
            outs,
            masks,
            in_dims,
            ..
        } = tape;
        // Backward: `grad` is d loss / d (output of op i).
        let first_param = self
            .ops
            .iter()
            .position(|o| matches!(o, Op::Dense { .. } | Op::Conv { .. }));
        let inner = device.clone().without_autodiff();
        let mut grads = GradientsParams::new();
        for i in (0..self.ops.len()).rev() {
            match self.ops[i] {
                Op::Dense { last, .. } => {
                    let Params::Dense(p) = &params[i] else {
                        unreachable!("dense ops hold dense parameters")
                    };
                    let out = value(input, outs, i + 1);
                    if !last {
                        activation_grad(&mut grad, out, p.activation);
                    }
                    let x = value(input, outs, i);
                    if p.weight.trainable {
                        let dw = cpu::gemm::xt_g(x, &grad, batch, p.inputs, p.units);
                        p.weight.register(&mut grads, dw, &inner);
                    }
                    if let Some(b) = p.bias.as_ref().filter(|b| b.trainable) {
                        let mut db = vec![0f32; p.units];
                        for row in grad.chunks(p.units) {
                            db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
                        }
                        b.register(&mut grads, db, &inner);
                    }
                    if Some(i) == first_param {
                        break;
                    }
                    grad = input_grad(&grad, p, batch);
                }
                Op::Dropout { prob } => {
                    let mask = masks[i].as_ref().expect("dropout ops keep their mask");
                    let scale = (1.0 / (1.0 - prob)) as f32;
                    grad.iter_mut()
                        .zip(mask)
                        .for_each(|(g, m)| *g = (*g * scale) * m);
                }
                Op::Flatten => {}
                Op::Conv { .. } => {
                    let Params::Conv(p) = &params[i] else {
                        unreachable!("convolutions hold convolution parameters")
                    };
                    let d = &in_dims[i];
                    let (h, w) = (d[2], d[3]);
                    activation_grad(&mut grad, value(input, outs, i + 1), Activation::Relu);
                    let x = value(input, outs, i);
                    let trainable_bias = p.bias.as_ref().filter(|b| b.trainable);
                    if p.weight.trainable || trainable_bias.is_some() {
                        let (dw, db) =
                            winograd::conv3x3_param_grads(x, &grad, [batch, p.cin, p.cout, h, w]);
                        if p.weight.trainable {
                            p.weight.register(&mut grads, dw, &inner);
                        }
                        if let Some(b) = trainable_bias {
                            b.register(&mut grads, db, &inner);
                        }
                    }
                    if Some(i) == first_param {
                        break;
                    }
                    let tile = winograd::Tile::F2;
                    grad = Conv3x3::backward_input(p.weight.values(), p.cout, p.cin, tile)
                        .forward(&grad, batch, h, w);
                }
                Op::Pool => {
                    let d = &in_dims[i];
                    grad = pool::max_pool_backward(
                        value(input, outs, i),
                        &grad,
                        batch * d[1],
                        d[2],
                        d[3],
                    );
                }
                Op::GlobalAverage => {
                    let d = &in_dims[i];
                    if d.len() == 4 {
                        let hw = d[2] * d[3];
                        grad = grad
                            .iter()
                            .flat_map(|g| std::iter::repeat_n(g / hw as f32, hw))
                            .collect();
                    }
                }
            }
        }

        grads
    }

    /// Puts the parameters taken by [`HandPath::take_params`] back into `model`.
    fn put_back(&self, model: &mut TransferModel, params: Vec<Params>, device: &Device) {
        for (op, p) in self.ops.iter().zip(params) {
            match (op, p) {
                (Op::Dense { layer, .. }, Params::Dense(p)) => {
                    let linear = Linear {
                        weight: p.weight.back(device),
                        bias: p.bias.map(|b| b.back(device)),
                    };
                    model.head.put_dense(*layer, linear, p.activation);
                }
                (Op::Conv { index }, Params::Conv(p)) => {
                    if let Backbone::Vgg(v) = &mut model.backbone {
                        let conv = &mut v.convs[*index];
                        conv.weight = p.weight.back(device);
                        conv.bias = p.bias.map(|b| b.back(device));
                    }
                }
                _ => {}
            }
        }
    }
}

/// What the forward pass keeps for the backward pass: each op's output (`None` where it is its
/// input unchanged), dropout masks, each op's input shape, and the output's shape.
struct Tape {
    outs: Vec<Option<Vec<f32>>>,
    masks: Vec<Option<Vec<f32>>>,
    in_dims: Vec<Vec<usize>>,
    dims: Vec<usize>,
}

/// The output of op `i - 1` (the input for `i == 0`), skipping ops that pass it on unchanged.
fn value<'a>(input: &'a [f32], outs: &'a [Option<Vec<f32>>], i: usize) -> &'a [f32] {
    outs[..i]
        .iter()
        .rev()
        .find_map(|o| o.as_deref())
        .unwrap_or(input)
}

/// A Bernoulli(`keep`) mask of shape `dims`, drawn from the host's random stream as the head's
/// dropout draws it.
fn bernoulli(dims: &[usize], keep: f64) -> Vec<f32> {
    let d = Distribution::Bernoulli(keep);
    let host = Device::flex();
    let data = match *dims {
        [a, b] => crate::device::host_random([a, b], d, &host).into_data(),
        [a, b, c, e] => crate::device::host_random([a, b, c, e], d, &host).into_data(),
        _ => unreachable!("activations are vectors or feature maps"),
    };
    data.try_into_vec::<f32>().expect("masks are f32")
}

/// `x W + b`.
///
/// # Shapes
///
/// - x: `[batch, inputs]`
/// - output: `[batch, units]`
fn affine(x: &[f32], batch: usize, p: &DenseParams) -> Vec<f32> {
    let (n, k) = (p.units, p.inputs);
    let mut z = match &p.bias {
        Some(b) => b.values().repeat(batch),
        None => vec![0f32; batch * n],
    };
    let w = p.weight.values();
    cpu::gemm::matmul(&mut z, [batch, n, k], (x, k, 1), (w, n, 1), true);
    z
}

/// `d loss / d x = g W^T`.
fn input_grad(g: &[f32], p: &DenseParams, batch: usize) -> Vec<f32> {
    let (n, k) = (p.units, p.inputs);
    let mut dx = vec![0f32; batch * k];
    // W^T as a [units, inputs] operand: row stride 1, column stride `units`.
    cpu::gemm::matmul(
        &mut dx,
        [batch, k, n],
        (g, n, 1),
        (p.weight.values(), 1, n),
        false,
    );
    dx
}

fn activate(z: &mut [f32], a: Activation) {
    let f: fn(f32) -> f32 = match a {
        Activation::Linear => return,
        Activation::Relu => |v| v.max(0.0),
        Activation::Sigmoid => |v| 1.0 / (1.0 + (-v).exp()),
        Activation::Tanh => f32::tanh,
        Activation::Softmax => unreachable!("softmax runs only as the last layer's activation"),
    };
    z.par_chunks_mut(1 << 14)
        .for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
}

/// `grad *= f'(z)`, from the activation's output `y = f(z)`.
fn activation_grad(grad: &mut [f32], y: &[f32], a: Activation) {
    let d: fn(f32) -> f32 = match a {
        Activation::Linear => return,
        Activation::Relu => |y| if y > 0.0 { 1.0 } else { 0.0 },
        Activation::Sigmoid => |y| y * (1.0 - y),
        Activation::Tanh => |y| 1.0 - y * y,
        Activation::Softmax => unreachable!("softmax runs only as the last layer's activation"),
    };
    grad.iter_mut().zip(y).for_each(|(g, y)| *g *= d(*y));
}

/// Mean loss, correct predictions and `d loss / d logits`, as `loss::loss` and `loss::correct`
/// compute them.
fn loss_and_grad(
    kind: Loss,
    logits: &[f32],
    classes: usize,
    labels: &[usize],
    eps: f32,
) -> (f32, usize, Vec<f32>) {
    let target = |label: usize, j: usize| super::loss::target(kind, label, j, classes, eps);
    let batch = labels.len();
    let mut grad = vec![0f32; logits.len()];
    let (mut sum, mut correct) = (0f32, 0usize);
    match kind {
        Loss::BinaryCrossentropy => {
            let n = logits.len() as f32;
            for (i, (&z, g)) in logits.iter().zip(grad.iter_mut()).enumerate() {
                let y = target(labels[i / classes], 0);
                sum += z.max(0.0) - z * y + (-z.abs()).exp().ln_1p();
                *g = (1.0 / (1.0 + (-z).exp()) - y) / n;
            }
            correct = logits
                .iter()
                .zip(labels)
                .filter(|(z, l)| usize::from(**z > 0.0) == **l)
                .count();
            (sum / n, correct, grad)
        }
        Loss::CategoricalCrossentropy => {
            for ((row, g), &label) in logits
                .chunks(classes)
                .zip(grad.chunks_mut(classes))
                .zip(labels)
            {
                let (best, max) =
                    row.iter()
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |(bi, bv), (j, &v)| {
                            if v > bv { (j, v) } else { (bi, bv) }
                        });
                correct += usize::from(best == label);
                let total: f32 = row.iter().map(|v| (v - max).exp()).sum();
                let lse = max + total.ln();
                for (j, (v, gj)) in row.iter().zip(g.iter_mut()).enumerate() {
                    let p = (v - lse).exp();
                    let y = target(label, j);
                    sum += y * (lse - v);
                    *gj = (p - y) / batch as f32;
                }
            }
            (sum / batch as f32, correct, grad)
        }
    }
}

/// Frees burn's autodiff bookkeeping of the tensors no longer alive. burn sweeps it only during a
/// backward pass, which the hand-written step never runs, while every step registers its
/// parameters (`require_grad`) anew: without this sweep each step kept about 26 KiB (10,000 steps
/// of the MobileNetV2 head: 104 MiB to 353 MiB peak). The backward of one scalar sweeps it.
pub fn release_graphs(device: &Device) {
    let t = Tensor::<1>::from_floats([0.0], device).require_grad();
    drop(t.sum().backward());
}
