//! The experiment spec: serde types only, no burn types.
//!
//! Every struct denies unknown fields, so a misspelt key is an error that names it. Defaults
//! live in [`defaults`] (the lowest figment layer) or in `#[serde(default)]` for optional keys.
//! Semantic checks (ranges, shapes, names) are in `crate::plan`, which collects every problem.

pub mod load;

use serde::{Deserialize, Serialize};

/// The built-in defaults: the lowest layer under the file, the environment and `--set`.
pub const DEFAULTS: &str = r#"
[experiment]
seed = 42

[data]
image_size = [150, 150]
batch_size = 20

[backbone]
weights = "imagenet"
trainable_from = "none"

[train]
epochs = 30
loss = "binary_crossentropy"
"#;

/// The top-level sections of a spec, in the order they are checked and documented.
pub const SECTIONS: [&str; 10] = [
    "experiment",
    "data",
    "backbone",
    "head",
    "augment",
    "optimizer",
    "schedule",
    "early_stopping",
    "train",
    "phase",
];

/// A whole experiment, as resolved from all layers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Name and seed of the experiment.
    pub experiment: ExperimentSpec,
    /// Where the images are and how they are batched.
    pub data: DataSpec,
    /// The pretrained convolutional base and its freeze cutoff.
    pub backbone: BackboneSpec,
    /// The layers stacked on top of the base.
    pub head: HeadSpec,
    /// Random transforms of the training images; absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<AugmentSpec>,
    /// The optimizer and its learning rate.
    pub optimizer: OptimizerSpec,
    /// How the learning rate changes during a phase; absent means constant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleSpec>,
    /// Stop a phase when the monitored metric stops improving; absent means never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStoppingSpec>,
    /// Epochs, loss, the monitored metric, clipping and the feature cache.
    pub train: TrainSpec,
    /// Training phases (`[[phase]]`), run in order with the weights carried over; none means one
    /// phase, `train`, with the settings above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phase: Vec<PhaseSpec>,
}

/// `[[phase]]`: one stage of training. Unset keys take the experiment's value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    /// Name of the phase, stored on its result rows (e.g. `head`, `fine_tune`).
    pub name: String,
    /// Epochs of this phase (default `train.epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// Freeze cutoff for this phase (default `backbone.trainable_from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_from: Option<String>,
    /// A fresh optimizer for this phase (default `[optimizer]`); its state starts empty, as after
    /// a Keras `compile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerSpec>,
    /// Learning-rate schedule of this phase (default `[schedule]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleSpec>,
    /// Augmentation of this phase (default `[augment]`); `augment = {}` turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<AugmentSpec>,
    /// Early stopping of this phase (default `[early_stopping]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStoppingSpec>,
    /// A new head for this phase (`[[phase.head.layers]]`), freshly initialised on the backbone
    /// as the earlier phases left it, as a notebook builds a new model on the same `conv_base`;
    /// later phases keep it. Default: the head trained so far goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadSpec>,
}

/// A metric computed every epoch, to monitor.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    /// Validation loss (lower is better).
    #[default]
    ValLoss,
    /// Validation accuracy (higher is better).
    ValAcc,
    /// Training loss (lower is better).
    TrainLoss,
    /// Training accuracy (higher is better).
    TrainAcc,
}

impl Spec {
    /// The head of the model as phase `from` starts it (`PhasePlan::head_from`, a checkpoint's
    /// `head_from`): `[[head.layers]]` for 0, else that phase's `[[phase.head.layers]]`.
    pub fn head_of_phase(&self, from: usize) -> &[LayerSpec] {
        match self.phase.get(from).and_then(|p| p.head.as_ref()) {
            Some(h) if from > 0 => &h.layers,
            _ => &self.head.layers,
        }
    }

    /// The head the last phase trains, and where it is declared (`head`, or `phase[i].head`
    /// for the last `[[phase]]` that declares one): the model a finished run saves.
    pub fn final_head(&self) -> (String, &[LayerSpec]) {
        match self
            .phase
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, p)| p.head.as_ref().map(|h| (i, h)))
        {
            Some((i, h)) => (format!("phase[{i}].head"), &h.layers),
            None => ("head".into(), &self.head.layers),
        }
    }
}

impl Monitor {
    /// The name used in the spec and in result columns.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValLoss => "val_loss",
            Self::ValAcc => "val_acc",
            Self::TrainLoss => "train_loss",
            Self::TrainAcc => "train_acc",
        }
    }

    /// Whether a higher value is better.
    pub fn higher_is_better(self) -> bool {
        matches!(self, Self::ValAcc | Self::TrainAcc)
    }
}

/// `kind = "step"`: multiply the rate by `gamma` every `every_epochs` epochs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StepScheduleSpec {
    /// Epochs between decays.
    pub every_epochs: usize,
    /// Factor applied at each decay.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
}

/// `kind = "exponential"`: multiply the rate by `gamma` per epoch, continuously over the steps
/// (or once per epoch with `staircase = true`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExponentialScheduleSpec {
    /// Factor per epoch, in (0, 1].
    pub gamma: f64,
    /// Decay at epoch boundaries only.
    #[serde(default)]
    pub staircase: bool,
}

/// `kind = "cosine"`: linear warm-up from 0, then cosine decay to `min_lr` at the phase's end.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CosineScheduleSpec {
    /// Length of the linear warm-up, in epochs (fractions allowed).
    pub warmup_epochs: f64,
    /// The rate at the end of the phase.
    pub min_lr: f64,
}

/// `kind = "reduce_on_plateau"`: multiply the rate by `factor` when the monitored metric has not
/// improved for `patience` epochs (Keras `ReduceLROnPlateau`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlateauScheduleSpec {
    /// The metric (default `train.monitor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<Monitor>,
    /// Factor applied to the rate, in (0, 1).
    #[serde(default = "default_gamma")]
    pub factor: f64,
    /// Epochs without improvement before a reduction.
    #[serde(default = "default_plateau_patience")]
    pub patience: usize,
    /// Smallest change that counts as an improvement.
    #[serde(default = "default_min_delta")]
    pub min_delta: f64,
    /// Epochs to wait after a reduction before counting again.
    #[serde(default)]
    pub cooldown: usize,
    /// The rate never goes below this.
    #[serde(default)]
    pub min_lr: f64,
}

/// `[schedule]`: how the learning rate (`optimizer.lr`) changes over a phase, selected by `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, strum::EnumDiscriminants)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[strum_discriminants(
    name(ScheduleKind),
    derive(strum::EnumString, strum::IntoStaticStr, strum::VariantNames),
    strum(serialize_all = "snake_case")
)]
pub enum ScheduleSpec {
    /// The same rate throughout.
    Constant(NoSettings),
    /// Step decay.
    Step(StepScheduleSpec),
    /// Exponential decay.
    Exponential(ExponentialScheduleSpec),
    /// Warm-up then cosine decay.
    Cosine(CosineScheduleSpec),
    /// Reduce on plateau.
    ReduceOnPlateau(PlateauScheduleSpec),
}

impl ScheduleSpec {
    /// The `kind` string.
    pub fn kind(&self) -> &'static str {
        ScheduleKind::from(self).into()
    }
}

fn default_gamma() -> f64 {
    0.1
}
fn default_plateau_patience() -> usize {
    10
}
fn default_min_delta() -> f64 {
    1e-4
}

/// `[early_stopping]` (Keras `EarlyStopping`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingSpec {
    /// The metric (default `train.monitor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<Monitor>,
    /// Epochs without improvement before the phase stops.
    pub patience: usize,
    /// Smallest change that counts as an improvement.
    #[serde(default)]
    pub min_delta: f64,
    /// Put back the weights of the best epoch when the phase stops early.
    #[serde(default)]
    pub restore_best: bool,
}

/// Test-time augmentation: the views of each image whose probabilities are averaged.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TestTimeAugmentation {
    /// The image alone.
    #[default]
    None,
    /// The image and its left-right mirror.
    HorizontalFlip,
}

impl TestTimeAugmentation {
    /// Whether it is `none`.
    pub fn is_none(&self) -> bool {
        *self == Self::None
    }
}

/// Whether activations at the freeze cutoff are kept on disk between runs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Read and write the feature cache (`--cache`, `$RUNNER_CACHE`).
    #[default]
    Auto,
    /// Compute activations in memory for this run only.
    Off,
}

/// `[experiment]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    /// Name of the experiment; part of the run id and of every result row.
    pub name: String,
    /// Seed for weight initialisation, shuffling and dropout: the same seed gives the same run.
    pub seed: u64,
    /// Free text kept with the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `[data]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Folder with `train/`, `validation/` and (optionally) `test/`, each with one folder per class.
    /// A relative path that does not exist is also tried under `$RUNNER_ASSETS/`.
    pub dir: String,
    /// Size every image is resized to, `[height, width]`.
    #[serde(deserialize_with = "pair")]
    pub image_size: [usize; 2],
    /// Images per batch, for training and evaluation.
    pub batch_size: usize,
    /// Resampling filter used to resize images.
    #[serde(default)]
    pub interpolation: Interpolation,
    /// What to do with an image that cannot be read: `fail` (default; every bad file is listed)
    /// or `skip` (each is logged and the count is stored with the run).
    #[serde(default)]
    pub on_bad_image: OnBadImage,
    /// The most MiB of decoded training images held in memory (default 1024). An augmented
    /// training split that decodes to more is decoded again batch by batch every epoch, on the
    /// thread that prepares the next batches, so memory stays flat in the number of images; the
    /// pixels, and so the results, are the same either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_decoded_mib: Option<u64>,
}

/// [`DataSpec::max_decoded_mib`]'s default.
pub const MAX_DECODED_MIB: u64 = 1024;

/// Policy for unreadable images.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnBadImage {
    /// Stop before training with the list of every bad file.
    #[default]
    Fail,
    /// Leave bad files out, log each, and record how many with the run.
    Skip,
}

impl AugmentSpec {
    /// The notebook's augmentation: rotation 40, shifts 0.2, shear 0.2, zoom 0.2, horizontal
    /// flips, nearest fill.
    pub fn notebook() -> Self {
        Self {
            rotation_degrees: 40.0,
            width_shift: 0.2,
            height_shift: 0.2,
            shear_degrees: 0.2,
            zoom: 0.2,
            horizontal_flip: true,
            ..Self::default()
        }
    }
}

/// How pixels outside the image are filled by a geometric transform (Keras `fill_mode`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Fill {
    /// Repeat the edge pixel (`aaaa|abcd|dddd`).
    #[default]
    Nearest,
    /// A constant, `fill_value`.
    Constant,
    /// Mirror at the edge (`dcba|abcd|dcba`).
    Reflect,
    /// Tile the image (`abcd|abcd|abcd`).
    Wrap,
}

/// `[augment]`: Keras `ImageDataGenerator` parameters, training split only. Units are in the
/// names; every range is symmetric around "no change".
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentSpec {
    /// Rotation drawn uniformly from `[-r, r]` degrees.
    pub rotation_degrees: f64,
    /// Horizontal shift drawn from `[-s, s]` times the width, `s` in `[0, 1)`.
    pub width_shift: f64,
    /// Vertical shift drawn from `[-s, s]` times the height, `s` in `[0, 1)`.
    pub height_shift: f64,
    /// Shear angle drawn from `[-s, s]` degrees (Keras takes shear in degrees: the notebook's
    /// 0.2 is 0.2 degrees).
    pub shear_degrees: f64,
    /// Zoom factor per axis drawn from `[1 - z, 1 + z]`, `z` in `[0, 1)`.
    pub zoom: f64,
    /// Mirror left-right with probability 1/2.
    pub horizontal_flip: bool,
    /// Mirror top-bottom with probability 1/2.
    pub vertical_flip: bool,
    /// How the area uncovered by a transform is filled.
    pub fill: Fill,
    /// The pixel value (0-255) for `fill = "constant"`.
    pub fill_value: f64,
}

impl AugmentSpec {
    /// Whether every transform is off (`augment = {}`): the images pass unchanged.
    pub fn is_identity(&self) -> bool {
        self.rotation_degrees == 0.0
            && self.width_shift == 0.0
            && self.height_shift == 0.0
            && self.shear_degrees == 0.0
            && self.zoom == 0.0
            && !self.horizontal_flip
            && !self.vertical_flip
    }
}

/// Resampling filter for resizing.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// Nearest neighbour (Keras' `load_img` default).
    Nearest,
    /// Bilinear (triangle filter).
    #[default]
    Bilinear,
    /// Bicubic (Catmull-Rom).
    Bicubic,
}

/// `[backbone]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackboneSpec {
    /// Backbone architecture, e.g. `vgg16`.
    pub name: String,
    /// `imagenet` (the named asset) or a path to a `.safetensors` file.
    pub weights: String,
    /// Input preprocessing; defaults to the backbone's own (`caffe` for VGG16 is what the
    /// weights were trained with; the notebook uses `rescale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
    /// Freeze cutoff: the first trainable backbone layer, `none` (all frozen) or `all`.
    pub trainable_from: String,
    /// BatchNorm layers above the cutoff (MobileNetV2): `train` normalises with batch statistics
    /// and updates the running ones (Keras' default); `frozen` keeps using and never updates the
    /// running statistics while gamma and beta still train (Keras' advice for fine-tuning).
    /// Below the cutoff BatchNorm is always frozen.
    #[serde(default)]
    pub batchnorm: BatchNormMode,
}

/// How trainable BatchNorm layers behave.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BatchNormMode {
    /// Batch statistics in training, running statistics updated.
    #[default]
    Train,
    /// Running statistics always, never updated.
    Frozen,
}

/// What a completed run keeps besides its model (`train.keep`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// The model, `best.ckpt` and `last.ckpt`.
    #[default]
    All,
    /// The model and `best.ckpt`.
    Best,
    /// The model only.
    Model,
}

impl Keep {
    /// The spec's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Best => "best",
            Self::Model => "model",
        }
    }
}

/// How pixel values (RGB, 0-255) become network input.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Preprocess {
    /// `x / 255`, RGB (the notebook's `ImageDataGenerator(rescale=1./255)`).
    Rescale,
    /// BGR, `x - [103.939, 116.779, 123.68]` (Keras `vgg16.preprocess_input`).
    Caffe,
    /// RGB, `(x / 255 - mean) / std` with the ImageNet mean and std (torchvision).
    Torch,
}

impl Preprocess {
    /// The name used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rescale => "rescale",
            Self::Caffe => "caffe",
            Self::Torch => "torch",
        }
    }
}

/// `[head]`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    /// The layer stack, applied in order to the backbone's output.
    #[serde(default)]
    pub layers: Vec<LayerSpec>,
}

/// Activation applied after a layer.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Identity.
    #[default]
    Linear,
    /// `max(x, 0)`.
    Relu,
    /// Logistic sigmoid; the output of a binary classifier.
    Sigmoid,
    /// Softmax over the last axis; the output of a multi-class classifier.
    Softmax,
    /// Hyperbolic tangent.
    Tanh,
}

/// Padding of a convolution, as in Keras.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// No padding: the output shrinks by `kernel - 1`.
    #[default]
    Valid,
    /// Zero padding so that the output is `ceil(input / stride)`.
    Same,
}

/// A size given as one number (square) or as `[height, width]`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Size2 {
    /// The same along both axes.
    Square(usize),
    /// `[height, width]`.
    Pair([usize; 2]),
}

impl<'de> Deserialize<'de> for Size2 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Size2;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a positive number or two of them, [height, width]")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size2, E> {
                usize::try_from(v)
                    .map(Size2::Square)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size2, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Size2, A::Error> {
                let mut v: Vec<usize> = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                <[usize; 2]>::try_from(v.as_slice())
                    .map(Size2::Pair)
                    .map_err(|_| {
                        serde::de::Error::invalid_length(v.len(), &"two numbers, [height, width]")
                    })
            }
        }
        d.deserialize_any(V)
    }
}

/// Exactly two numbers, `[height, width]` (serde's fixed-size arrays would take the first two
/// of a longer list and drop the rest without a word).
fn pair<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[usize; 2], D::Error> {
    let v: Vec<usize> = Vec::deserialize(d)?;
    <[usize; 2]>::try_from(v.as_slice())
        .map_err(|_| serde::de::Error::invalid_length(v.len(), &"two numbers, [height, width]"))
}

impl Size2 {
    /// As `[height, width]`.
    pub fn hw(self) -> [usize; 2] {
        match self {
            Self::Square(n) => [n, n],
            Self::Pair(p) => p,
        }
    }
}

fn one() -> Size2 {
    Size2::Square(1)
}

fn two() -> Size2 {
    Size2::Square(2)
}

/// `kind = "conv2d"`: 2D convolution (Keras `Conv2D`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Conv2dSpec {
    /// Number of output channels.
    pub filters: usize,
    /// Kernel size: `3` or `[3, 3]`.
    pub kernel: Size2,
    /// Stride: `1` or `[1, 1]`.
    #[serde(default = "one")]
    pub stride: Size2,
    /// `valid` or `same`.
    #[serde(default)]
    pub padding: Padding,
    /// Activation after the convolution.
    #[serde(default)]
    pub activation: Activation,
}

/// `kind = "max_pool2d"`: 2D max pooling (Keras `MaxPooling2D`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MaxPool2dSpec {
    /// Window size, default 2.
    #[serde(default = "two")]
    pub pool: Size2,
    /// Stride, default the window size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<Size2>,
}

/// A layer without settings (`flatten`, `global_average_pool`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

/// `kind = "dense"`: fully connected layer (Keras `Dense`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DenseSpec {
    /// Number of outputs.
    pub units: usize,
    /// Activation after the layer.
    #[serde(default)]
    pub activation: Activation,
}

/// `kind = "dropout"`: dropout, active in training only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DropoutSpec {
    /// Fraction of inputs set to zero, in `[0, 1)`.
    pub rate: f64,
}

/// One head layer, selected by `kind`. Input sizes are inferred, never written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, strum::EnumDiscriminants)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[strum_discriminants(
    name(LayerKind),
    derive(strum::EnumString, strum::IntoStaticStr, strum::VariantNames),
    strum(serialize_all = "snake_case")
)]
pub enum LayerSpec {
    /// 2D convolution.
    Conv2d(Conv2dSpec),
    /// 2D max pooling.
    MaxPool2d(MaxPool2dSpec),
    /// Mean over the spatial axes (Keras `GlobalAveragePooling2D`).
    GlobalAveragePool(NoSettings),
    /// Flatten a feature map into a vector.
    Flatten(NoSettings),
    /// Fully connected layer.
    Dense(DenseSpec),
    /// Dropout.
    Dropout(DropoutSpec),
}

/// A head as one line, its layers' [`LayerSpec::describe`] joined by ` > `, e.g.
/// `flatten > dense(256, relu) > dense(1, sigmoid)` (the results table's `head` column).
pub fn describe_layers(layers: &[LayerSpec]) -> String {
    layers
        .iter()
        .map(LayerSpec::describe)
        .collect::<Vec<_>>()
        .join(" > ")
}

impl LayerSpec {
    /// The `kind` string of this layer.
    pub fn kind(&self) -> &'static str {
        LayerKind::from(self).into()
    }

    /// A compact one-line description, e.g. `dense(256, relu)`.
    pub fn describe(&self) -> String {
        fn act(a: &Activation) -> String {
            format!("{a:?}").to_lowercase()
        }
        match self {
            Self::Conv2d(Conv2dSpec {
                filters,
                kernel,
                stride,
                padding,
                activation,
            }) => {
                let [kh, kw] = kernel.hw();
                let [sh, sw] = stride.hw();
                format!(
                    "conv2d({filters}, {kh}x{kw}, stride {sh}x{sw}, {}, {})",
                    format!("{padding:?}").to_lowercase(),
                    act(activation)
                )
            }
            Self::MaxPool2d(MaxPool2dSpec { pool, stride }) => {
                let [ph, pw] = pool.hw();
                let [sh, sw] = stride.unwrap_or(*pool).hw();
                format!("max_pool2d({ph}x{pw}, stride {sh}x{sw})")
            }
            Self::GlobalAveragePool(_) => "global_average_pool".into(),
            Self::Flatten(_) => "flatten".into(),
            Self::Dense(DenseSpec { units, activation }) => {
                format!("dense({units}, {})", act(activation))
            }
            Self::Dropout(DropoutSpec { rate }) => format!("dropout({rate})"),
        }
    }
}

/// `kind = "rmsprop"` (Keras defaults: rho 0.9, momentum 0, epsilon 1e-7).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RmspropSpec {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the moving average of squared gradients.
    #[serde(default = "default_rho")]
    pub rho: f64,
    /// Momentum.
    #[serde(default)]
    pub momentum: f64,
    /// Added to the denominator for stability.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Normalise by the centred second moment.
    #[serde(default)]
    pub centered: bool,
    /// L2 penalty added to the gradient (PyTorch's `weight_decay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
}

/// `kind = "adam"` or `"adamw"` (Keras defaults: beta_1 0.9, beta_2 0.999, epsilon 1e-7;
/// AdamW weight_decay 0.004).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdamSpec {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    #[serde(default = "default_beta_1")]
    pub beta_1: f64,
    /// Decay of the second moment.
    #[serde(default = "default_beta_2")]
    pub beta_2: f64,
    /// Added to the denominator for stability.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Decoupled weight decay (adamw only; adam rejects a non-zero value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
}

/// `kind = "sgd"`: stochastic gradient descent with optional (Nesterov) momentum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SgdSpec {
    /// Learning rate.
    pub lr: f64,
    /// Momentum.
    #[serde(default)]
    pub momentum: f64,
    /// Use Nesterov momentum.
    #[serde(default)]
    pub nesterov: bool,
    /// L2 penalty added to the gradient (PyTorch's `weight_decay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
}

/// `[optimizer]`, selected by `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, strum::EnumDiscriminants)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[strum_discriminants(
    name(OptimizerKind),
    derive(strum::EnumString, strum::IntoStaticStr, strum::VariantNames),
    strum(serialize_all = "snake_case")
)]
pub enum OptimizerSpec {
    /// RMSprop.
    Rmsprop(RmspropSpec),
    /// Adam.
    Adam(AdamSpec),
    /// AdamW (decoupled weight decay).
    Adamw(AdamSpec),
    /// SGD.
    Sgd(SgdSpec),
}

fn default_rho() -> f64 {
    0.9
}
fn default_epsilon() -> f64 {
    1e-7
}
fn default_beta_1() -> f64 {
    0.9
}
fn default_beta_2() -> f64 {
    0.999
}
/// Keras' default weight decay for AdamW.
pub const ADAMW_WEIGHT_DECAY: f64 = 0.004;

impl OptimizerSpec {
    /// The `kind` string.
    pub fn kind(&self) -> &'static str {
        OptimizerKind::from(self).into()
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::Rmsprop(RmspropSpec { lr, .. })
            | Self::Adam(AdamSpec { lr, .. })
            | Self::Adamw(AdamSpec { lr, .. })
            | Self::Sgd(SgdSpec { lr, .. }) => *lr,
        }
    }
}

/// `[train]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Passes over the training split.
    pub epochs: usize,
    /// Batches per epoch; default: the whole training split once. With augmentation more steps
    /// than the split holds draw fresh transforms (the notebook: 100 steps of 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_per_epoch: Option<usize>,
    /// Validation batches per epoch; default: the whole validation split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_steps: Option<usize>,
    /// `binary_crossentropy` (one sigmoid unit, two classes) or `categorical_crossentropy`
    /// (softmax over N units, N classes).
    pub loss: Loss,
    /// The metric that picks the best checkpoint (and the default for early stopping and
    /// reduce-on-plateau).
    #[serde(default)]
    pub monitor: Monitor,
    /// Clip each parameter's gradient to this L2 norm (Keras `clipnorm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    /// Label smoothing of the training targets, in [0, 1) (Keras' `label_smoothing`: a binary
    /// label becomes `y (1 - e) + e / 2`, a one-hot one `y (1 - e) + e / classes`). Only the
    /// training loss uses it: validation and test losses stay the plain cross-entropy, so that
    /// they compare across runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_smoothing: Option<f64>,
    /// `horizontal_flip`: the test split's evaluation and `runner predict` average the
    /// probabilities of each image and of its left-right mirror (validation stays one view, as
    /// training sees it). Default `none`.
    #[serde(default, skip_serializing_if = "TestTimeAugmentation::is_none")]
    pub test_time_augmentation: TestTimeAugmentation,
    /// What a completed run keeps in `results/<run_id>/` besides its model: `all` (the
    /// default: `best.ckpt` and `last.ckpt` too), `best` (`best.ckpt`, for `runner predict
    /// --weights best`) or `model` (no checkpoint). Checkpoints go only once the model, the
    /// predictions and the table are written; a run that stops before keeps them to resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<Keep>,
    /// `auto`: reuse activations at the cutoff from the on-disk cache; `off`: never touch it.
    #[serde(default)]
    pub cache: CacheMode,
}

/// Loss function.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Binary cross-entropy on one sigmoid output.
    BinaryCrossentropy,
    /// Categorical cross-entropy on a softmax over one unit per class.
    CategoricalCrossentropy,
}

impl Loss {
    /// The name used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BinaryCrossentropy => "binary_crossentropy",
            Self::CategoricalCrossentropy => "categorical_crossentropy",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether serde knows `kind` as a variant of `T` (a missing field is fine: the name is known).
    fn serde_knows<T: serde::de::DeserializeOwned>(kind: &str) -> bool {
        match toml::from_str::<T>(&format!("kind = \"{kind}\"")) {
            Ok(_) => true,
            Err(e) => !e.to_string().contains("unknown variant"),
        }
    }

    #[test]
    fn the_kind_names_are_the_ones_serde_reads() {
        use strum::VariantNames;
        for k in LayerKind::VARIANTS {
            assert!(serde_knows::<LayerSpec>(k), "layer kind {k}");
        }
        for k in OptimizerKind::VARIANTS {
            assert!(serde_knows::<OptimizerSpec>(k), "optimizer kind {k}");
        }
        for k in ScheduleKind::VARIANTS {
            assert!(serde_knows::<ScheduleSpec>(k), "schedule kind {k}");
        }
        assert!(!serde_knows::<LayerSpec>("dense2"));
        assert_eq!(LayerKind::VARIANTS.len(), 6);
        assert_eq!(OptimizerKind::VARIANTS, ["rmsprop", "adam", "adamw", "sgd"]);
    }
}
