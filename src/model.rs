//! The transfer model: a pretrained base (frozen below the cutoff) and the head.

use burn::prelude::*;

use crate::backbone::BackboneDef;
use crate::backbone::vgg::Vgg;
use crate::backbone::weights::{self, WeightsError};
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

/// Backbone plus head. Layers of the backbone before `cut` are frozen.
#[derive(Module, Debug)]
pub struct TransferModel {
    /// The convolutional base.
    pub backbone: Vgg,
    /// The layers on top.
    pub head: Head,
    #[module(skip)]
    cut: usize,
}

impl TransferModel {
    /// Builds the model of `plan` on `device` and loads the backbone's pretrained weights.
    pub fn build(plan: &Plan, device: &Device) -> Result<Self, WeightsError> {
        let backbone = Vgg::init(plan.backbone, device);
        let backbone = weights::load_vgg(plan.backbone, backbone, &plan.weights)?;
        Ok(Self::from_parts(plan, backbone, device))
    }

    /// Assembles the model around an already loaded backbone.
    pub fn from_parts(plan: &Plan, backbone: Vgg, device: &Device) -> Self {
        let cut = plan
            .phases
            .first()
            .map_or(plan.cutoff.index, |p| p.cutoff.index);
        let head = Head::init(&plan.spec.head.layers, Shape::Map(plan.base_output), device);
        // burn initialises parameters lazily, on first use: draw them now, right after the
        // seed, so that they do not depend on what runs first (a feature cache hit or miss).
        head.visit(&mut Materialize);
        Self {
            backbone: backbone.freeze_before(cut),
            head,
            cut,
        }
    }

    /// A model of this architecture with fresh weights (to load a saved record into).
    pub fn init(
        def: &BackboneDef,
        layers: &[LayerSpec],
        image_size: [usize; 2],
        cut: usize,
        device: &Device,
    ) -> Self {
        let base_output = def.shape_at(def.layers().len(), image_size);
        Self {
            backbone: Vgg::init(def, device).freeze_before(cut),
            head: Head::init(layers, Shape::Map(base_output), device),
            cut,
        }
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

    /// SHA-256 of the current weights of the frozen convolutions (part of the feature cache key).
    pub fn frozen_digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for i in self.backbone.convs_before(self.cut) {
            let c = &self.backbone.convs[i];
            h.update(c.weight.val().into_data().as_bytes());
            if let Some(b) = &c.bias {
                h.update(b.val().into_data().as_bytes());
            }
        }
        h.finalize().into()
    }

    /// The frozen part of the base: activations at the cutoff. Run it on a `valid()` copy, so that
    /// nothing is recorded for backward.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, 3, height, width]`, preprocessed
    /// - output: `[batch, c, h, w]` at the cutoff
    pub fn frozen_features(&self, x: Tensor<4>) -> Tensor<4> {
        self.backbone.forward_range(x, 0, self.cut)
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
