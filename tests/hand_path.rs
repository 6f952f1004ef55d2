//! The hand-written training step (`train::hand`: dense heads, VGG convolutions above the cutoff)
//! computes what burn's autodiff computes: the same loss, predictions and gradients (dropout masks
//! included), and a training run through it is the same run. Small generated images and weights;
//! no asset mirror needed.

mod common;

use std::path::Path;
use std::sync::Mutex;

use burn::module::{ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use runner::model::TransferModel;
use runner::plan::Plan;
use runner::spec::Loss;
use runner::train::hand::HandPath;
use runner::train::{self, Features, TrainSource, loss};

/// burn's CPU backend has one random stream per process (building a model draws from it too):
/// the tests of this file take turns.
static RNG: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A 64x64 VGG16 plan with `head` as its head, trainable from `trainable_from` (activations
/// `[512, 2, 2]` at the cutoff for "none", `[512, 4, 4]` for "block5_conv1").
fn plan(dir: &Path, classes: &[&str], head: &str, loss: &str, trainable_from: &str) -> Plan {
    let data = common::make_dataset(&dir.join("data"), classes, [2, 2, 1], 64);
    let weights = dir.join("vgg16.safetensors");
    common::write_vgg_weights(&weights, runner::backbone::find("vgg16").unwrap(), 5);
    let replace = [
        (common::DENSE_HEAD.to_string(), head.to_string()),
        (
            "loss = \"binary_crossentropy\"".into(),
            format!("loss = \"{loss}\""),
        ),
        (
            "image_size = [32, 32]".into(),
            "image_size = [64, 64]".into(),
        ),
        (
            "trainable_from = \"none\"".into(),
            format!("trainable_from = \"{trainable_from}\""),
        ),
    ];
    let mut text = common::spec_text(&data, &weights, "");
    for (from, to) in replace {
        assert!(text.contains(&from), "{from}");
        text = text.replace(&from, &to);
    }
    common::plan_for(dir, &text)
}

/// The notebook's dense head on two classes, trainable from `trainable_from`.
fn notebook(dir: &Path, trainable_from: &str) -> Plan {
    let (classes, loss) = (&["cats", "dogs"], "binary_crossentropy");
    plan(dir, classes, common::DENSE_HEAD, loss, trainable_from)
}

/// Activations at the cutoff of a 64x64 VGG16: `[512, 2, 2]` after the base, `[512, 4, 4]` at
/// block5 (after block4's pool).
fn features(n: usize, classes: usize, seed: u64, shape: [usize; 3]) -> Features {
    let mut rng = common::Rng::new(seed);
    let per: usize = shape.iter().product();
    Features::new(
        (0..n * per).map(|_| rng.uniform() * 2.0).collect(),
        shape,
        (0..n).map(|i| (i * 7 + 1) % classes).collect(),
        (0..n).map(|i| format!("{i}.jpg").into()).collect(),
    )
}

/// Ids and ranks of every parameter of a module.
#[derive(Default)]
struct Ids(Vec<(ParamId, usize)>);

impl ModuleVisitor for Ids {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push((param.id, D));
    }
}

fn ids(model: &TransferModel) -> Vec<(ParamId, usize)> {
    let mut v = Ids::default();
    model.visit(&mut v);
    v.0
}

/// A parameter's gradient as values, if there is one.
fn grad(g: &GradientsParams, id: ParamId, rank: usize) -> Option<Vec<f32>> {
    let values = |d: TensorData| d.iter::<f32>().collect();
    match rank {
        1 => g.get::<1>(id).map(|t| values(t.into_data())),
        2 => g.get::<2>(id).map(|t| values(t.into_data())),
        4 => g.get::<4>(id).map(|t| values(t.into_data())),
        _ => unreachable!(),
    }
}

/// All values of every trainable parameter (block5 too when it trains), in visiting order.
fn trainable_values(model: &TransferModel) -> Vec<Vec<f32>> {
    struct Values(Vec<Vec<f32>>);
    impl ModuleVisitor for Values {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val();
            if t.is_require_grad() {
                self.0.push(t.into_data().iter::<f32>().collect());
            }
        }
    }
    let mut v = Values(Vec::new());
    model.visit(&mut v);
    v.0
}

/// The activations' shape at the plan's (first phase's) cutoff.
fn cut_shape(plan: &Plan) -> [usize; 3] {
    let cut = plan.phases[0].cutoff.index;
    plan.backbone.shape_at(cut, plan.spec.data.image_size)
}

/// One step both ways on the same batch and seed: same loss, predictions and gradients, for
/// `params` parameters.
fn same_step(plan: &Plan, kind: Loss, classes: usize, params: usize) {
    // Plain targets, and label-smoothed ones (`train.label_smoothing`).
    for eps in [0.0, 0.2] {
        same_step_with(plan, kind, classes, params, eps);
    }
}

fn same_step_with(plan: &Plan, kind: Loss, classes: usize, params: usize, eps: f32) {
    let _turn = turn();
    let device = Device::flex().autodiff();
    let mut model = TransferModel::build(plan, &device).unwrap();
    let f = features(6, classes, 11, cut_shape(plan));
    let idx: Vec<usize> = (0..6).collect();
    let (x, labels) = f.batch(&idx, &device).unwrap();

    device.seed(42);
    let logits = model.forward_from_cut(x.clone());
    let want_correct = loss::correct(kind, logits.clone().without_autodiff(), &labels);
    let l = loss::smoothed(kind, logits, &labels, eps);
    let want = GradientsParams::from_grads(l.backward(), &model);
    let want_loss = l.into_scalar::<f32>();

    let before = trainable_values(&model);
    let path = HandPath::of(&model, &device, kind)
        .expect("a head of dense layers")
        .with_label_smoothing(eps);
    device.seed(42);
    let got = path.step(&mut model, x, &labels);

    assert!(
        (got.loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
        "loss {} vs autodiff {want_loss}",
        got.loss
    );
    assert_eq!(got.correct, want_correct);
    let mut compared = 0;
    for (id, rank) in ids(&model) {
        match (grad(&got.grads, id, rank), grad(&want, id, rank)) {
            (Some(g), Some(w)) => {
                let err = common::relative_error(&g, &w);
                assert!(
                    err < 1e-5,
                    "parameter {id} (rank {rank}): relative error {err}"
                );
                compared += 1;
            }
            (None, None) => {}
            (g, w) => panic!(
                "parameter {id}: gradient by hand {:?}, by autodiff {:?}",
                g.is_some(),
                w.is_some()
            ),
        }
    }
    assert_eq!(
        compared, params,
        "every trainable parameter has its gradient"
    );
    // The parameters (block5's too) went back where they were, unchanged and still trainable.
    assert_eq!(trainable_values(&model), before);
    device.seed(42);
    let again = path.step(&mut model, f.batch(&idx, &device).unwrap().0, &labels);
    assert_eq!(again.loss, got.loss);
}

#[test]
fn hand_written_step_matches_autodiff_for_the_notebooks_dense_head() {
    let dir = tempfile::tempdir().unwrap();
    same_step(
        &notebook(dir.path(), "none"),
        Loss::BinaryCrossentropy,
        2,
        4,
    );
}

#[test]
fn hand_written_step_matches_autodiff_when_fine_tuning_block5() {
    let dir = tempfile::tempdir().unwrap();
    let plan = notebook(dir.path(), "block5_conv1");
    assert_eq!(cut_shape(&plan), [512, 4, 4]);
    // block5's three convolutions (weight and bias each) and the head's two dense layers.
    same_step(&plan, Loss::BinaryCrossentropy, 2, 10);
}

#[test]
fn hand_written_step_matches_autodiff_with_pooling_tanh_sigmoid_and_softmax() {
    let head = r#"
[[head.layers]]
kind = "global_average_pool"
[[head.layers]]
kind = "dense"
units = 8
activation = "tanh"
[[head.layers]]
kind = "dropout"
rate = 0.3
[[head.layers]]
kind = "dense"
units = 8
activation = "sigmoid"
[[head.layers]]
kind = "dense"
units = 3
activation = "softmax"
"#;
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(
        dir.path(),
        &["a", "b", "c"],
        head,
        "categorical_crossentropy",
        "none",
    );
    same_step(&plan, Loss::CategoricalCrossentropy, 3, 6);
}

#[test]
fn hand_written_step_matches_autodiff_with_dropout_on_the_feature_map() {
    let head = r#"
[[head.layers]]
kind = "dropout"
rate = 0.25
[[head.layers]]
kind = "flatten"
[[head.layers]]
kind = "dense"
units = 5
activation = "linear"
[[head.layers]]
kind = "dense"
units = 1
activation = "sigmoid"
"#;
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(
        dir.path(),
        &["cats", "dogs"],
        head,
        "binary_crossentropy",
        "none",
    );
    same_step(&plan, Loss::BinaryCrossentropy, 2, 4);
}

#[test]
fn convolutional_heads_and_bases_other_than_vgg_above_the_cutoff_stay_with_autodiff() {
    let _turn = turn();
    let device = Device::flex().autodiff();
    let conv = r#"
[[head.layers]]
kind = "conv2d"
filters = 4
kernel = 1
activation = "relu"
[[head.layers]]
kind = "flatten"
[[head.layers]]
kind = "dense"
units = 1
activation = "sigmoid"
"#;
    let dir = tempfile::tempdir().unwrap();
    let p = plan(
        dir.path(),
        &["cats", "dogs"],
        conv,
        "binary_crossentropy",
        "none",
    );
    let model = TransferModel::build(&p, &device).unwrap();
    assert!(HandPath::of(&model, &device, Loss::BinaryCrossentropy).is_none());

    let dir = tempfile::tempdir().unwrap();
    let dense = notebook(dir.path(), "none");
    let model = TransferModel::build(&dense, &device).unwrap();
    assert!(HandPath::of(&model, &device, Loss::BinaryCrossentropy).is_some());
    // VGG convolutions above the cutoff are taken by hand.
    let dir = tempfile::tempdir().unwrap();
    let unfrozen = notebook(dir.path(), "block5_conv1");
    let model = TransferModel::build(&unfrozen, &device).unwrap();
    assert!(!model.head_starts_at_cut(), "block5 runs above the cutoff");
    assert!(HandPath::of(&model, &device, Loss::BinaryCrossentropy).is_some());
    // A base other than VGG with layers above the cutoff is not.
    let resnet = runner::backbone::find("resnet50").unwrap();
    let layers = &dense.spec.head.layers;
    let model = runner::model::ModelConfig {
        backbone: resnet,
        cut: resnet.layers().len() - 1,
        head: layers.clone(),
        image_size: [64, 64],
        batchnorm_frozen: false,
    }
    .init(&device);
    assert!(!model.head_starts_at_cut());
    assert!(HandPath::of(&model, &device, Loss::BinaryCrossentropy).is_none());
}

/// Two epochs of `p` on generated activations at its cutoff, by hand and by autodiff: the same
/// metrics, the same weights after, and those moved.
fn same_run(p: &Plan, params: usize) {
    let device = Device::flex().autodiff();
    let train_set = features(24, 2, 3, cut_shape(p));
    let val = features(8, 2, 4, cut_shape(p));
    let run = |hand: bool| {
        device.seed(1);
        let model = TransferModel::build(p, &device).unwrap();
        let (model, history) = train::fit_with(
            model,
            &TrainSource::Features(&train_set),
            &val,
            p,
            &device,
            "test",
            hand,
        );
        (trainable_values(&model), history)
    };
    let (by_hand, hand_history) = run(true);
    let (by_autodiff, auto_history) = run(false);
    assert_eq!(hand_history.len(), 2);
    for (h, a) in hand_history.iter().zip(&auto_history) {
        for (x, y) in [
            (h.train_loss, a.train_loss),
            (h.val_loss, a.val_loss),
            (h.train_acc, a.train_acc),
        ] {
            // RMSprop divides by the running RMS: rounding differences of 1e-7 in small
            // gradients grow to about 1e-5 in two epochs.
            assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{h:?} vs {a:?}");
        }
    }
    assert_eq!(by_hand.len(), params);
    device.seed(1);
    let start = trainable_values(&TransferModel::build(p, &device).unwrap());
    for ((h, a), s) in by_hand.iter().zip(&by_autodiff).zip(&start) {
        let err = common::relative_error(h, a);
        assert!(err < 1e-4, "weights after training differ: {err}");
        // Training moved them: the comparison is not between untouched weights.
        assert_ne!(h, s);
    }
}

#[test]
fn training_by_hand_written_steps_is_the_same_run_as_by_autodiff() {
    let _turn = turn();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    same_run(&notebook(a.path(), "none"), 4);
    same_run(&notebook(b.path(), "block5_conv1"), 10);
}
