//! The transfer model: a pretrained base (frozen below the cutoff) and the head.

use burn::prelude::*;

use crate::backbone::mobilenet::MobileNetV2;
use crate::backbone::resnet::ResNet50;
use crate::backbone::vgg::{self, Vgg};
use crate::backbone::weights::{self, KeyMap, WeightsError};
use crate::backbone::{BackboneDef, Family};
use crate::head::{Head, Shape};
use crate::plan::Plan;
use crate::spec::LayerSpec;

/// Touches every parameter so that lazily initialised ones are drawn.
struct Materialize;

impl burn::module::ModuleVisitor for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        let _ = param.val();
    }
}

/// Hashes every parameter value it visits.
struct Digest(sha2::Sha256);

impl burn::module::ModuleVisitor for Digest {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        use sha2::Digest as _;
        self.0.update(param.val().into_data().as_bytes());
    }
}

/// Collects the ids of the parameters it visits.
struct Ids(Vec<burn::module::ParamId>);

impl burn::module::ModuleVisitor for Ids {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        self.0.push(param.id);
    }
}

/// What a checkpoint or a saved model leaves out: the backbone's first `layers` layers, which
/// no phase trained, so they are still the values of the weights file the run loaded. A model is
/// rebuilt from that file and its digest checked before the stored parameters go on top.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrozenBase {
    /// How many of the backbone's layers (from the input) are the file's.
    pub layers: usize,
    /// The weights file the run loaded (absolute).
    pub weights: std::path::PathBuf,
    /// SHA-256 (hex) of those layers' values as loaded ([`Backbone::digest_before`]).
    pub sha256: String,
}

impl FrozenBase {
    /// Whether `backbone`'s first layers are the ones this describes.
    pub fn matches(&self, backbone: &Backbone) -> bool {
        crate::io::hex(&backbone.digest_before(self.layers)) == self.sha256
    }
}

/// A pretrained base of one of the known families.
// One per model: boxing the large variant would buy nothing (its size differs with the backends
// compiled in).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Backbone {
    /// VGG16 / VGG19.
    Vgg(Vgg),
    /// MobileNetV2 without its classifier.
    MobileNetV2(MobileNetV2),
    /// ResNet50 without its classifier.
    ResNet50(ResNet50),
}

impl Backbone {
    /// A base with fresh weights.
    pub fn init(def: &BackboneDef, device: &Device) -> Self {
        match def.family {
            Family::Vgg => Self::Vgg(Vgg::init(def, device)),
            Family::MobileNetV2 => Self::MobileNetV2(MobileNetV2::init(0, device)),
            Family::ResNet50 => Self::ResNet50(ResNet50::init(0, device)),
        }
    }

    /// BatchNorm on its running statistics even where layers train (no effect on VGG).
    pub fn with_batchnorm_frozen(self, frozen: bool) -> Self {
        match self {
            Self::MobileNetV2(m) => Self::MobileNetV2(m.with_batchnorm_frozen(frozen)),
            Self::ResNet50(r) => Self::ResNet50(r.with_batchnorm_frozen(frozen)),
            vgg @ Self::Vgg(_) => vgg,
        }
    }

    /// How published weights name this base's tensors.
    pub fn key_map(&self, def: &BackboneDef) -> KeyMap {
        match self {
            Self::Vgg(_) => vgg::key_map(def),
            Self::MobileNetV2(m) => m.key_map(),
            Self::ResNet50(r) => r.key_map(),
        }
    }

    /// The variant's segment in module paths (`backbone.<variant>.…`).
    pub fn variant(&self) -> &'static str {
        match self {
            Self::Vgg(_) => "Vgg",
            Self::MobileNetV2(_) => "MobileNetV2",
            Self::ResNet50(_) => "ResNet50",
        }
    }

    /// The base's tensors as safetensors bytes under the names its published weights use (Keras'
    /// for VGG, torchvision's with its conventions otherwise).
    pub fn to_published_safetensors(
        &self,
        def: &BackboneDef,
    ) -> Result<Vec<u8>, weights::ExportError> {
        let torch = def.family != Family::Vgg;
        weights::to_safetensors(self, self.variant(), &self.key_map(def), torch, &[])
    }

    /// Loads the weights file at `path` (safetensors, `.pth` or `.h5`), checking every tensor.
    pub fn load(self, def: &BackboneDef, path: &std::path::Path) -> Result<Self, WeightsError> {
        let map = self.key_map(def);
        Ok(match self {
            Self::Vgg(v) => Self::Vgg(weights::load(v, &map, path, def.name)?),
            Self::MobileNetV2(m) => Self::MobileNetV2(weights::load(m, &map, path, def.name)?),
            Self::ResNet50(r) => Self::ResNet50(weights::load(r, &map, path, def.name)?),
        })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Vgg(v) => v.num_layers(),
            Self::MobileNetV2(m) => m.num_layers(),
            Self::ResNet50(r) => r.num_layers(),
        }
    }

    /// Runs layers `from..to`.
    ///
    /// # Shapes
    ///
    /// - input: the input of layer `from`; output: the output of layer `to - 1`
    pub fn forward_range(&self, x: Tensor<4>, from: usize, to: usize) -> Tensor<4> {
        match self {
            Self::Vgg(v) => v.forward_range(x, from, to),
            Self::MobileNetV2(m) => m.forward_range(x, from, to),
            Self::ResNet50(r) => r.forward_range(x, from, to),
        }
    }

    /// Layers before `cut` get no gradients, the others do.
    pub fn freeze_before(self, cut: usize) -> Self {
        match self {
            Self::Vgg(v) => Self::Vgg(v.freeze_before(cut)),
            Self::MobileNetV2(m) => Self::MobileNetV2(m.freeze_before(cut)),
            Self::ResNet50(r) => Self::ResNet50(r.freeze_before(cut)),
        }
    }

    /// Visits the parameters of the layers before `cut`.
    fn visit_before<V: burn::module::ModuleVisitor>(&self, cut: usize, v: &mut V) {
        match self {
            Self::Vgg(vgg) => {
                for i in vgg.convs_before(cut) {
                    vgg.convs[i].visit(v);
                }
            }
            Self::MobileNetV2(m) => m.visit_before(cut, v),
            Self::ResNet50(r) => r.visit_before(cut, v),
        }
    }

    /// SHA-256 of the current values of the layers before `cut`.
    pub fn digest_before(&self, cut: usize) -> [u8; 32] {
        use sha2::Digest as _;
        let mut d = Digest(sha2::Sha256::new());
        self.visit_before(cut, &mut d);
        d.0.finalize().into()
    }

    /// The ids of the parameters of the layers before `cut`.
    pub fn ids_before(&self, cut: usize) -> Vec<burn::module::ParamId> {
        let mut ids = Ids(Vec::new());
        self.visit_before(cut, &mut ids);
        ids.0
    }

    /// The VGG base, if it is one.
    pub fn vgg(&self) -> Option<&Vgg> {
        match self {
            Self::Vgg(v) => Some(v),
            Self::MobileNetV2(_) | Self::ResNet50(_) => None,
        }
    }
}

/// Backbone plus head. Layers of the backbone before `cut` are frozen.
#[derive(Module, Debug)]
pub struct TransferModel {
    /// The convolutional base.
    pub backbone: Backbone,
    /// The layers on top.
    pub head: Head,
    #[module(skip)]
    cut: usize,
}

/// What a transfer model is, without its weights: the backbone, the freeze cutoff, the head's
/// layers, the input size and how BatchNorm runs. Made from a checked plan for training and from
/// a checked `model.json` for `runner predict`; both build the model with [`ModelConfig::init`]
/// (or [`ModelConfig::assemble`] around a loaded base), so that the two cannot drift apart.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The backbone.
    pub backbone: &'static BackboneDef,
    /// Index of the first trainable backbone layer.
    pub cut: usize,
    /// The head's layers.
    pub head: Vec<LayerSpec>,
    /// `[height, width]` of the input.
    pub image_size: [usize; 2],
    /// BatchNorm on its running statistics even where layers train.
    pub batchnorm_frozen: bool,
}

impl ModelConfig {
    /// The model a plan trains: its first phase's cutoff and head.
    pub fn from_plan(plan: &Plan) -> Self {
        Self::for_phase(plan, 0)
    }

    /// The model of phase `phase` of a plan: its cutoff and its head.
    pub fn for_phase(plan: &Plan, phase: usize) -> Self {
        let ph = plan.phases.get(phase);
        Self {
            backbone: plan.backbone,
            cut: ph.map_or(plan.cutoff.index, |p| p.cutoff.index),
            head: ph.map_or_else(|| plan.spec.head.layers.clone(), |p| p.head.clone()),
            image_size: plan.spec.data.image_size,
            batchnorm_frozen: plan.spec.backbone.batchnorm == crate::spec::BatchNormMode::Frozen,
        }
    }

    /// The base with fresh weights (to load pretrained ones into).
    pub fn init_backbone(&self, device: &Device) -> Backbone {
        Backbone::init(self.backbone, device).with_batchnorm_frozen(self.batchnorm_frozen)
    }

    /// The model with fresh weights (to load a saved record into).
    pub fn init(&self, device: &Device) -> TransferModel {
        self.assemble(self.init_backbone(device), device)
    }

    /// The model around `backbone`, with a new head. The head's weights are drawn from the
    /// host's random stream (then moved to `device`), so that a seed gives the same initial head
    /// on every device. burn initialises parameters lazily, on first use: they are drawn now,
    /// right after the seed, so that they do not depend on what runs first (a feature cache hit
    /// or miss).
    pub fn assemble(&self, backbone: Backbone, device: &Device) -> TransferModel {
        let base_output = self
            .backbone
            .shape_at(self.backbone.layers().len(), self.image_size);
        let head = Head::init(&self.head, Shape::Map(base_output), &crate::device::host());
        head.visit(&mut Materialize);
        TransferModel {
            backbone: backbone.freeze_before(self.cut),
            head: head.fork(device),
            cut: self.cut,
        }
    }
}

/// How an exported model is fed and what it answers: its input size and preprocessing, its
/// loss (the probabilities' form) and test-time flips.
#[derive(Debug, Clone, Copy)]
pub struct OnnxSignature {
    /// `[height, width]` of the input.
    pub image_size: [usize; 2],
    /// The preprocessing folded into the graph.
    pub preprocess: crate::spec::Preprocess,
    /// Sigmoid (two classes) or softmax probabilities.
    pub loss: crate::spec::Loss,
    /// Average each image's probabilities with its mirror's.
    pub flip: bool,
    /// The classes (two for a sigmoid output).
    pub classes: usize,
}

impl TransferModel {
    /// The whole model as an ONNX graph, as `runner predict` runs it: `pixels` in (`[batch,
    /// height, width, 3]`, RGB values 0-255 of the resized image, float32), the preprocessing,
    /// the base, the head, and `probabilities` out (`[batch, classes]`, one per class, averaged
    /// with the mirror's when `flip`).
    pub fn to_onnx(&self, sig: OnnxSignature) -> crate::onnx::Graph {
        use crate::onnx::{Attr, Dim};
        let [h, w] = sig.image_size;
        let mut g = crate::onnx::Graph::default();
        let batch = Dim::Named("batch");
        let pixels = g.input(
            "pixels",
            &[batch.clone(), Dim::Fixed(h), Dim::Fixed(w), Dim::Fixed(3)],
            "RGB pixel values 0-255 (float32) of images resized to the model's input size, NHWC",
        );
        let mut x = g.node(
            "Transpose",
            &[&pixels],
            &[("perm", Attr::Ints(vec![0, 3, 1, 2]))],
        );
        let affine = crate::data::preprocess_affine(sig.preprocess);
        let sources: Vec<i64> = affine.iter().map(|a| a.0 as i64).collect();
        if sources != [0, 1, 2] {
            let idx = g.constant_i64("channels", &sources);
            x = g.node("Gather", &[&x, &idx], &[("axis", Attr::Int(1))]);
        }
        let scale = g.constant("scale", &[1, 3, 1, 1], &affine.map(|a| a.1));
        let shift = g.constant("shift", &[1, 3, 1, 1], &affine.map(|a| a.2));
        x = g.node("Mul", &[&x, &scale], &[]);
        x = g.node("Add", &[&x, &shift], &[]);
        if sig.flip {
            // The mirrors after the images, through the network once.
            let reversed: Vec<i64> = (0..w as i64).rev().collect();
            let idx = g.constant_i64("mirror", &reversed);
            let mirrored = g.node("Gather", &[&x, &idx], &[("axis", Attr::Int(3))]);
            x = g.node("Concat", &[&x, &mirrored], &[("axis", Attr::Int(0))]);
        }
        let features = match &self.backbone {
            Backbone::Vgg(v) => v.to_onnx(&mut g, &x),
            Backbone::MobileNetV2(m) => m.to_onnx(&mut g, &x),
            Backbone::ResNet50(r) => r.to_onnx(&mut g, &x),
        };
        let logits = self.head.to_onnx(&mut g, &features);
        let mut probs = match sig.loss {
            crate::spec::Loss::BinaryCrossentropy => {
                let p = g.node("Sigmoid", &[&logits], &[]);
                let one = g.constant("one", &[], &[1.0]);
                let q = g.node("Sub", &[&one, &p], &[]);
                g.node("Concat", &[&q, &p], &[("axis", Attr::Int(1))])
            }
            crate::spec::Loss::CategoricalCrossentropy => {
                g.node("Softmax", &[&logits], &[("axis", Attr::Int(1))])
            }
        };
        let classes = match sig.loss {
            crate::spec::Loss::BinaryCrossentropy => 2,
            crate::spec::Loss::CategoricalCrossentropy => sig.classes,
        };
        if sig.flip {
            let shape = g.constant_i64("pairs", &[2, -1, classes as i64]);
            let pairs = g.node("Reshape", &[&probs, &shape], &[]);
            probs = g.node(
                "ReduceMean",
                &[&pairs],
                &[("axes", Attr::Ints(vec![0])), ("keepdims", Attr::Int(0))],
            );
        }
        g.output(
            &probs,
            "probabilities",
            &[batch, Dim::Fixed(classes)],
            "class probabilities, in the order of the model's classes",
        );
        g
    }

    /// Builds the model of `plan` on `device` and loads the backbone's pretrained weights.
    pub fn build(plan: &Plan, device: &Device) -> Result<Self, WeightsError> {
        let config = ModelConfig::from_plan(plan);
        let backbone = config
            .init_backbone(device)
            .load(plan.backbone, &plan.weights)?;
        Ok(config.assemble(backbone, device))
    }

    /// Assembles the model of `plan` around an already loaded backbone.
    pub fn from_parts(plan: &Plan, backbone: Backbone, device: &Device) -> Self {
        ModelConfig::from_plan(plan).assemble(backbone, device)
    }

    /// Index of the first trainable backbone layer.
    pub fn cut(&self) -> usize {
        self.cut
    }

    /// The same weights with a new freeze cutoff (a new phase).
    pub fn with_cut(self, cut: usize) -> Self {
        Self {
            backbone: self.backbone.freeze_before(cut),
            head: self.head,
            cut,
        }
    }

    /// What a checkpoint or model of this model leaves out when the backbone's first `layers`
    /// layers never trained (they are `weights`' values); `None` when nothing is left out.
    pub fn frozen_base(&self, layers: usize, weights: &std::path::Path) -> Option<FrozenBase> {
        (layers > 0 && !self.backbone.ids_before(layers).is_empty()).then(|| FrozenBase {
            layers,
            weights: std::path::absolute(weights).unwrap_or_else(|_| weights.to_path_buf()),
            sha256: crate::io::hex(&self.backbone.digest_before(layers)),
        })
    }

    /// The record of every parameter but those `frozen` leaves out (all, for `None`).
    pub fn stored_record(&self, frozen: Option<&FrozenBase>) -> burn::store::ModuleRecord {
        use burn::module::ParamGroup;
        match frozen {
            None => self.clone().into_record(),
            Some(f) => {
                let left_out = ParamGroup::from_ids(self.backbone.ids_before(f.layers));
                self.clone()
                    .into_record_group(ParamGroup::all().exclude(left_out))
            }
        }
    }

    /// How many tensors [`TransferModel::stored_record`] holds.
    pub fn stored_tensors(&self, frozen: Option<&FrozenBase>) -> usize {
        let mut all = Ids(Vec::new());
        self.visit(&mut all);
        all.0.len() - frozen.map_or(0, |f| self.backbone.ids_before(f.layers).len())
    }

    /// SHA-256 of the current weights of the frozen convolutions (part of the feature cache key).
    pub fn frozen_digest(&self) -> [u8; 32] {
        self.backbone.digest_before(self.cut)
    }

    /// The frozen part of the base: activations at the cutoff. Run it on a `valid()` copy, so that
    /// nothing is recorded for backward.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, 3, height, width]`, preprocessed
    /// - output: `[batch, c, h, w]` at the cutoff
    pub fn frozen_features(&self, x: Tensor<4>) -> Tensor<4> {
        match &self.backbone {
            Backbone::Vgg(v) => v.forward_frozen(x, self.cut),
            b => b.forward_range(x, 0, self.cut),
        }
    }

    /// Whether the head starts right at the cutoff (no layer of the base runs above it).
    pub fn head_starts_at_cut(&self) -> bool {
        self.cut >= self.backbone.num_layers()
    }

    /// Logits from activations at the cutoff: the trainable part of the base, then the head.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, c, h, w]` at the cutoff
    /// - output: `[batch, outputs]`
    pub fn forward_from_cut(&self, x: Tensor<4>) -> Tensor<2> {
        let n = self.backbone.num_layers();
        self.head
            .forward_logits(self.backbone.forward_range(x, self.cut, n))
    }
}
