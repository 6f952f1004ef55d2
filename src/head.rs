//! The head: `LayerSpec` -> `Layer` (a `#[derive(Module)]` enum), shapes inferred from the input.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation;

use crate::spec::{
    Activation, Conv2dSpec, DenseSpec, DropoutSpec, LayerSpec, MaxPool2dSpec, Padding,
};

/// The shape of one example between layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A feature map `[channels, height, width]`.
    Map([usize; 3]),
    /// A vector of features.
    Flat(usize),
}

impl Shape {
    /// Keras-style text, channels last: `(4, 4, 512)` or `(8192)`.
    pub fn keras(&self) -> String {
        match self {
            Self::Map([c, h, w]) => format!("({h}, {w}, {c})"),
            Self::Flat(n) => format!("({n})"),
        }
    }
}

/// The most parameters a head may have: 2^30 (4 GiB of f32 weights; training holds the
/// gradients and the optimizer's state beside them, up to four times that).
pub const MAX_HEAD_PARAMS: usize = 1 << 30;

/// The most values one layer's output may have per image: 2^26 (256 MiB of f32 per image).
pub const MAX_VALUES_PER_IMAGE: usize = 1 << 26;

/// Output size and explicit padding `(before, after)` of a window along one axis, as Keras;
/// `None` when the window does not fit (or is empty, or never moves).
fn window(
    input: usize,
    kernel: usize,
    stride: usize,
    padding: Padding,
) -> Option<(usize, usize, usize)> {
    if kernel == 0 || stride == 0 {
        return None;
    }
    match padding {
        Padding::Valid => (input >= kernel).then(|| ((input - kernel) / stride + 1, 0, 0)),
        Padding::Same => {
            let out = input.div_ceil(stride);
            let total = (out.checked_sub(1)?)
                .checked_mul(stride)?
                .checked_add(kernel)?
                .saturating_sub(input);
            Some((out, total / 2, total - total / 2))
        }
    }
}

/// `a * b * ...`, `None` on overflow.
fn product(xs: &[usize]) -> Option<usize> {
    xs.iter().try_fold(1usize, |acc, &x| acc.checked_mul(x))
}

/// A count with thousands separators: `2,048,000`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Why a layer cannot take its input: a shape that does not fit, or a size beyond the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// A size of zero (`filters`, `kernel`, `stride`, `pool` or `units`).
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// A valid convolution's kernel is larger than the feature map.
    #[error(
        "a {}x{} valid convolution cannot run on a {}x{} feature map; use padding = \"same\", a smaller kernel or a larger image_size",
        kernel[0], kernel[1], map[0], map[1]
    )]
    ConvTooLarge {
        /// Kernel height and width.
        kernel: [usize; 2],
        /// Feature map height and width.
        map: [usize; 2],
    },
    /// A pool window is larger than the feature map.
    #[error("a {}x{} pool cannot run on a {}x{} feature map", pool[0], pool[1], map[0], map[1])]
    PoolTooLarge {
        /// Pool height and width.
        pool: [usize; 2],
        /// Feature map height and width.
        map: [usize; 2],
    },
    /// More parameters than a head may have.
    #[error(
        "{} parameters (about {:.0} GiB as f32, up to four times that while training), more than the {} a head may have",
        thousands(*.0), gib(*.0), thousands(MAX_HEAD_PARAMS)
    )]
    TooManyParams(usize),
    /// So many parameters that the count overflows.
    #[error(
        "more parameters than can be counted, far more than the {} a head may have",
        thousands(MAX_HEAD_PARAMS)
    )]
    ParamsUncountable,
    /// A larger output per image than a layer may have.
    #[error(
        "its output has {} values per image (about {:.1} GiB as f32 per image), more than the {} a layer may have",
        thousands(*.0), gib(*.0), thousands(MAX_VALUES_PER_IMAGE)
    )]
    TooManyValues(usize),
    /// So many output values that the count overflows.
    #[error("its output has more values than can be counted")]
    ValuesUncountable,
    /// A dense layer after a feature map.
    #[error(
        "dense needs a vector but gets a feature map; put a flatten or global_average_pool layer before it"
    )]
    DenseNeedsVector,
    /// A spatial layer after a vector.
    #[error(
        "{kind} needs a feature map but gets a vector of {len}; put it before flatten/global_average_pool"
    )]
    NeedsMap {
        /// The layer's kind.
        kind: &'static str,
        /// The vector's length.
        len: usize,
    },
}

/// `n` f32 values in GiB.
fn gib(n: usize) -> f64 {
    n as f64 * 4.0 / (1u64 << 30) as f64
}

/// `Err` when `params` parameters or `values` output values per image are beyond the limits.
fn sized(
    out: Shape,
    params: Option<usize>,
    values: Option<usize>,
) -> Result<(Shape, usize), ShapeError> {
    match params {
        Some(p) if p <= MAX_HEAD_PARAMS => {}
        Some(p) => return Err(ShapeError::TooManyParams(p)),
        None => return Err(ShapeError::ParamsUncountable),
    }
    match values {
        Some(v) if v <= MAX_VALUES_PER_IMAGE => Ok((out, params.unwrap_or(0))),
        Some(v) => Err(ShapeError::TooManyValues(v)),
        None => Err(ShapeError::ValuesUncountable),
    }
}

/// The output shape and parameter count of one layer, or why it cannot take `input`.
pub fn infer(layer: &LayerSpec, input: Shape) -> Result<(Shape, usize), ShapeError> {
    match (layer, input) {
        (
            LayerSpec::Conv2d(Conv2dSpec {
                filters,
                kernel,
                stride,
                padding,
                ..
            }),
            Shape::Map([c, h, w]),
        ) => {
            let [kh, kw] = kernel.hw();
            let [sh, sw] = stride.hw();
            if [*filters, kh, kw, sh, sw].contains(&0) {
                return Err(ShapeError::Zero("filters, kernel and stride"));
            }
            match (window(h, kh, sh, *padding), window(w, kw, sw, *padding)) {
                (Some((oh, ..)), Some((ow, ..))) => sized(
                    Shape::Map([*filters, oh, ow]),
                    product(&[*filters, c, kh, kw]).and_then(|p| p.checked_add(*filters)),
                    product(&[*filters, oh, ow]),
                ),
                _ => Err(ShapeError::ConvTooLarge {
                    kernel: [kh, kw],
                    map: [h, w],
                }),
            }
        }
        (LayerSpec::MaxPool2d(MaxPool2dSpec { pool, stride }), Shape::Map([c, h, w])) => {
            let [ph, pw] = pool.hw();
            let [sh, sw] = stride.unwrap_or(*pool).hw();
            if [ph, pw, sh, sw].contains(&0) {
                return Err(ShapeError::Zero("pool and stride"));
            }
            match (
                window(h, ph, sh, Padding::Valid),
                window(w, pw, sw, Padding::Valid),
            ) {
                (Some((oh, ..)), Some((ow, ..))) => Ok((Shape::Map([c, oh, ow]), 0)),
                _ => Err(ShapeError::PoolTooLarge {
                    pool: [ph, pw],
                    map: [h, w],
                }),
            }
        }
        (LayerSpec::GlobalAveragePool(_), Shape::Map([c, ..])) => Ok((Shape::Flat(c), 0)),
        (LayerSpec::Flatten(_), Shape::Map([c, h, w])) => match product(&[c, h, w]) {
            Some(n) => Ok((Shape::Flat(n), 0)),
            None => Err(ShapeError::ValuesUncountable),
        },
        (LayerSpec::Flatten(_), Shape::Flat(n)) => Ok((Shape::Flat(n), 0)),
        (LayerSpec::Dense(DenseSpec { units, .. }), Shape::Flat(n)) => {
            if *units == 0 {
                return Err(ShapeError::Zero("units"));
            }
            sized(
                Shape::Flat(*units),
                n.checked_mul(*units).and_then(|p| p.checked_add(*units)),
                Some(*units),
            )
        }
        (LayerSpec::Dense(_), Shape::Map(_)) => Err(ShapeError::DenseNeedsVector),
        (LayerSpec::Dropout(_), s) => Ok((s, 0)),
        (l, Shape::Flat(n)) => Err(ShapeError::NeedsMap {
            kind: l.kind(),
            len: n,
        }),
    }
}

/// Applies an activation.
fn activate<const D: usize>(x: Tensor<D>, a: Activation) -> Tensor<D> {
    match a {
        Activation::Linear => x,
        Activation::Relu => activation::relu(x),
        Activation::Sigmoid => activation::sigmoid(x),
        Activation::Softmax => activation::softmax(x, D - 1),
        Activation::Tanh => activation::tanh(x),
    }
}

/// [`activate`] as an ONNX node (none for `linear`).
fn activation_onnx(g: &mut crate::onnx::Graph, x: String, a: Activation) -> String {
    let op = match a {
        Activation::Linear => return x,
        Activation::Relu => "Relu",
        Activation::Sigmoid => "Sigmoid",
        Activation::Softmax => {
            return g.node("Softmax", &[&x], &[("axis", crate::onnx::Attr::Int(-1))]);
        }
        Activation::Tanh => "Tanh",
    };
    g.node(op, &[&x], &[])
}

/// Activations between layers: a feature map or a batch of vectors.
#[derive(Debug, Clone)]
pub enum Act {
    /// `[batch, channels, height, width]`
    Map(Tensor<4>),
    /// `[batch, features]`
    Flat(Tensor<2>),
}

impl Act {
    /// The batch of vectors; panics on a feature map, which plan validation rules out.
    pub fn flat(self) -> Tensor<2> {
        match self {
            Self::Flat(x) => x,
            Self::Map(x) => x.flatten(1, 3),
        }
    }
}

/// A convolution with its activation.
#[derive(Module, Debug)]
pub struct ConvLayer {
    conv: Conv2d,
    #[module(skip)]
    activation: Activation,
}

/// A dense layer with its activation.
#[derive(Module, Debug)]
pub struct DenseLayer {
    linear: Linear,
    #[module(skip)]
    activation: Activation,
}

/// A parameter-free reshaping layer.
#[derive(Module, Debug)]
pub struct ReshapeLayer {
    #[module(skip)]
    global_average: bool,
}

/// One head layer.
#[derive(Module, Debug)]
pub enum Layer {
    /// `conv2d`
    Conv(ConvLayer),
    /// `max_pool2d`
    Pool(MaxPool2d),
    /// `flatten` or `global_average_pool`
    Reshape(ReshapeLayer),
    /// `dense`
    Dense(DenseLayer),
    /// `dropout`
    Dropout(Dropout),
}

impl Layer {
    /// Builds the layer for an input of shape `input` (already validated by the plan).
    pub fn init(spec: &LayerSpec, input: Shape, device: &Device) -> Self {
        // Keras' default initialiser for Dense and Conv2D kernels; biases start at zero.
        let glorot = Initializer::XavierUniform { gain: 1.0 };
        match (spec, input) {
            (
                LayerSpec::Conv2d(Conv2dSpec {
                    filters,
                    kernel,
                    stride,
                    padding,
                    activation,
                }),
                Shape::Map([c, h, w]),
            ) => {
                let [kh, kw] = kernel.hw();
                let [sh, sw] = stride.hw();
                let (_, top, bottom) = window(h, kh, sh, *padding).unwrap_or((0, 0, 0));
                let (_, left, right) = window(w, kw, sw, *padding).unwrap_or((0, 0, 0));
                let conv = Conv2dConfig::new([c, *filters], [kh, kw])
                    .with_stride([sh, sw])
                    .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
                    .with_initializer(glorot)
                    .init(device);
                Self::Conv(ConvLayer {
                    conv: zero_conv_bias(conv),
                    activation: *activation,
                })
            }
            (LayerSpec::MaxPool2d(MaxPool2dSpec { pool, stride }), _) => Self::Pool(
                MaxPool2dConfig::new(pool.hw())
                    .with_strides(stride.unwrap_or(*pool).hw())
                    .init(),
            ),
            (LayerSpec::GlobalAveragePool(_), _) => Self::Reshape(ReshapeLayer {
                global_average: true,
            }),
            (LayerSpec::Flatten(_), _) => Self::Reshape(ReshapeLayer {
                global_average: false,
            }),
            (LayerSpec::Dense(DenseSpec { units, activation }), s) => {
                let n = match s {
                    Shape::Flat(n) => n,
                    Shape::Map([c, h, w]) => c * h * w,
                };
                let linear = LinearConfig::new(n, *units)
                    .with_initializer(glorot)
                    .init(device);
                Self::Dense(DenseLayer {
                    linear: zero_linear_bias(linear),
                    activation: *activation,
                })
            }
            (LayerSpec::Dropout(DropoutSpec { rate }), _) => {
                Self::Dropout(DropoutConfig::new(*rate).init())
            }
            (LayerSpec::Conv2d(_), Shape::Flat(_)) => {
                unreachable!("the plan rejects a convolution on a vector")
            }
        }
    }

    /// Runs the layer; `final_activation` false leaves a dense layer's activation out (logits).
    ///
    /// # Shapes
    ///
    /// - input: `[batch, c, h, w]` or `[batch, n]`
    /// - output: `[batch, c', h', w']` or `[batch, n']`
    pub fn forward(&self, x: Act, final_activation: bool) -> Act {
        match (self, x) {
            (Self::Conv(l), Act::Map(x)) => Act::Map(activate(l.conv.forward(x), l.activation)),
            (Self::Pool(p), Act::Map(x)) => Act::Map(p.forward(x)),
            (Self::Reshape(r), Act::Map(x)) if r.global_average => {
                let [b, c, _, _] = x.dims();
                Act::Flat(x.mean_dim(3).mean_dim(2).reshape([b, c]))
            }
            (Self::Reshape(_), x) => Act::Flat(x.flat()),
            (Self::Dense(l), x) => {
                let y = l.linear.forward(x.flat());
                Act::Flat(if final_activation {
                    activate(y, l.activation)
                } else {
                    y
                })
            }
            (Self::Dropout(d), Act::Map(x)) => Act::Map(dropout(d, x)),
            (Self::Dropout(d), Act::Flat(x)) => Act::Flat(dropout(d, x)),
            (_, Act::Flat(_)) => unreachable!("the plan rejects spatial layers on vectors"),
        }
    }
}

/// burn's `Dropout::forward` with the mask drawn from the host's random stream
/// ([`crate::device::host_random`]) instead of the computing device's: the same seed drops the
/// same values on every device. Active while training (an autodiff input, a layer not frozen).
///
/// # Shapes
///
/// - input: `[..., any]`; output: the same
fn dropout<const D: usize>(d: &Dropout, x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    if !d.training.is_enabled() || !device.is_autodiff() || d.prob == 0.0 {
        return x;
    }
    let keep = 1.0 - d.prob;
    let mask = crate::device::host_random(
        x.dims(),
        burn::tensor::Distribution::Bernoulli(keep),
        &device,
    );
    x * mask * (1.0 / keep)
}

/// A head layer as the hand-written training step (`train::hand`) sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Plain {
    /// A dense layer with its activation.
    Dense(Activation),
    /// Dropout: `prob` of the values dropped while `training`.
    Dropout {
        /// Probability of dropping a value.
        prob: f64,
        /// Whether it drops values (a frozen layer does not).
        training: bool,
    },
    /// `flatten`.
    Flatten,
    /// `global_average_pool`.
    GlobalAverage,
    /// A convolution or a pool.
    Spatial,
}

impl Layer {
    /// What the layer is, without its parameters.
    pub fn plain(&self) -> Plain {
        match self {
            Self::Dense(l) => Plain::Dense(l.activation),
            Self::Dropout(d) => Plain::Dropout {
                prob: d.prob,
                training: d.training.is_enabled(),
            },
            Self::Reshape(r) if r.global_average => Plain::GlobalAverage,
            Self::Reshape(_) => Plain::Flatten,
            Self::Conv(_) | Self::Pool(_) => Plain::Spatial,
        }
    }
}

// `Param::map` keeps the new tensor's (absent) gradient tracking: ask for it again, or the
// biases stay at zero for the whole run.
fn zero_linear_bias(mut l: Linear) -> Linear {
    l.bias = l
        .bias
        .map(|b| b.map(|t| t.zeros_like()).set_require_grad(true));
    l
}

fn zero_conv_bias(mut c: Conv2d) -> Conv2d {
    c.bias = c
        .bias
        .map(|b| b.map(|t| t.zeros_like()).set_require_grad(true));
    c
}

/// The head: layers applied in order.
#[derive(Module, Debug)]
pub struct Head {
    /// The layers.
    pub layers: Vec<Layer>,
}

impl Head {
    /// Builds the head for the backbone output shape `input`.
    pub fn init(specs: &[LayerSpec], input: Shape, device: &Device) -> Self {
        let mut shape = input;
        let mut layers = Vec::with_capacity(specs.len());
        for spec in specs {
            layers.push(Layer::init(spec, shape, device));
            shape = infer(spec, shape).map(|(s, _)| s).unwrap_or(shape);
        }
        Self { layers }
    }

    /// Takes the parameters of dense layer `i` out of the head (a flatten stands in for it until
    /// [`put_dense`](Self::put_dense)); `None` when layer `i` is not dense.
    pub fn take_dense(&mut self, i: usize) -> Option<(Linear, Activation)> {
        let stand_in = Layer::Reshape(ReshapeLayer {
            global_average: false,
        });
        match std::mem::replace(self.layers.get_mut(i)?, stand_in) {
            Layer::Dense(DenseLayer { linear, activation }) => Some((linear, activation)),
            other => {
                self.layers[i] = other;
                None
            }
        }
    }

    /// Puts the parameters of dense layer `i` back.
    pub fn put_dense(&mut self, i: usize, linear: Linear, activation: Activation) {
        self.layers[i] = Layer::Dense(DenseLayer { linear, activation });
    }

    /// The layers as ONNX nodes on `x` (the backbone's output), as [`Head::forward_logits`]
    /// runs them at inference (dropout is the identity): logits out.
    pub fn to_onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> String {
        use crate::onnx::Attr;
        let n = self.layers.len();
        let mut y = x.to_string();
        for (i, l) in self.layers.iter().enumerate() {
            y = match l {
                Layer::Conv(c) => {
                    let z = g.conv(&c.conv, &y);
                    activation_onnx(g, z, c.activation)
                }
                Layer::Pool(p) => g.max_pool(p, &y),
                Layer::Reshape(r) if r.global_average => {
                    let z = g.node("GlobalAveragePool", &[&y], &[]);
                    g.node("Flatten", &[&z], &[("axis", Attr::Int(1))])
                }
                Layer::Reshape(_) => g.node("Flatten", &[&y], &[("axis", Attr::Int(1))]),
                Layer::Dense(d) => {
                    // A dense layer flattens a feature map first (a no-op on a vector).
                    let flat = g.node("Flatten", &[&y], &[("axis", Attr::Int(1))]);
                    let z = g.linear(&d.linear, &flat);
                    if i + 1 < n {
                        activation_onnx(g, z, d.activation)
                    } else {
                        z
                    }
                }
                Layer::Dropout(_) => y,
            };
        }
        g.node("Flatten", &[&y], &[("axis", Attr::Int(1))])
    }

    /// Logits: every layer, with the last layer's activation left out.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, c, h, w]` (the backbone's output)
    /// - output: `[batch, outputs]`
    pub fn forward_logits(&self, x: Tensor<4>) -> Tensor<2> {
        let n = self.layers.len();
        let mut act = Act::Map(x);
        for (i, l) in self.layers.iter().enumerate() {
            act = l.forward(act, i + 1 < n);
        }
        act.flat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{NoSettings, Size2};

    fn conv(kernel: usize, stride: usize, padding: Padding) -> LayerSpec {
        LayerSpec::Conv2d(Conv2dSpec {
            filters: 32,
            kernel: Size2::Square(kernel),
            stride: Size2::Square(stride),
            padding,
            activation: Activation::Relu,
        })
    }

    #[test]
    fn conv_shapes_follow_keras() {
        let input = Shape::Map([512, 4, 4]);
        // The notebook's conv head: Conv2D(32, 3x3) on 4x4x512 -> 2x2x32, 147,488 parameters.
        assert_eq!(
            infer(&conv(3, 1, Padding::Valid), input),
            Ok((Shape::Map([32, 2, 2]), 147_488))
        );
        assert_eq!(
            infer(&conv(3, 1, Padding::Same), input).unwrap().0,
            Shape::Map([32, 4, 4])
        );
        // same with stride 2 is ceil(9 / 2) = 5, as Keras.
        assert_eq!(
            infer(&conv(3, 2, Padding::Same), Shape::Map([1, 9, 9]))
                .unwrap()
                .0,
            Shape::Map([32, 5, 5])
        );
        assert_eq!(
            infer(&conv(3, 2, Padding::Valid), Shape::Map([1, 9, 9]))
                .unwrap()
                .0,
            Shape::Map([32, 4, 4])
        );
    }

    #[test]
    fn same_padding_matches_the_inferred_shape_when_run() {
        let device = Device::flex();
        for (k, s, n) in [(3, 1, 9), (3, 2, 9), (4, 2, 8), (5, 3, 7)] {
            let spec = conv(k, s, Padding::Same);
            let (Shape::Map(want), _) = infer(&spec, Shape::Map([2, n, n])).unwrap() else {
                unreachable!()
            };
            let layer = Layer::init(&spec, Shape::Map([2, n, n]), &device);
            let Act::Map(y) = layer.forward(Act::Map(Tensor::zeros([1, 2, n, n], &device)), true)
            else {
                unreachable!()
            };
            assert_eq!(y.dims()[1..], want, "kernel {k} stride {s} input {n}");
        }
    }

    #[test]
    fn global_average_pool_and_flatten_make_vectors() {
        let m = Shape::Map([512, 4, 4]);
        assert_eq!(
            infer(&LayerSpec::GlobalAveragePool(NoSettings {}), m),
            Ok((Shape::Flat(512), 0))
        );
        assert_eq!(
            infer(&LayerSpec::Flatten(NoSettings {}), m),
            Ok((Shape::Flat(8192), 0))
        );
    }
}
