//! The transfer model: a pretrained base (frozen below the cutoff) and the head.

use burn::prelude::*;

use crate::backbone::vgg::Vgg;
use crate::backbone::weights::{self, WeightsError};
use crate::head::{Head, Shape};
use crate::plan::Plan;

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
        let cut = plan.cutoff.index;
        let head = Head::init(&plan.spec.head.layers, Shape::Map(plan.base_output), device);
        Self {
            backbone: backbone.freeze_before(cut),
            head,
            cut,
        }
    }

    /// Index of the first trainable backbone layer.
    pub fn cut(&self) -> usize {
        self.cut
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
