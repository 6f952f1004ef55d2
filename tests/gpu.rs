//! The GPU path (burn's wgpu backend) computes what the CPU path computes: forward passes of every
//! backbone family, one training step of every kind of trainable part (loss, predictions, every
//! gradient), every optimizer and schedule over a few steps, whole runs through the binary,
//! checkpoints and feature caches moved between the devices, and `runner predict`.
//!
//! On a machine without a GPU these run on a software Vulkan adapter (Mesa's lavapipe, which
//! `.ci/run` installs). Where no wgpu adapter is there they are skipped with a message, unless
//! `RUNNER_REQUIRE_GPU=1` says one must be (CI sets it): then they fail.

mod common;

use std::path::Path;
use std::sync::Mutex;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use runner::device::{self, DeviceChoice};
use runner::model::{Backbone, TransferModel};
use runner::plan::Plan;
use runner::train::hand::HandPath;
use runner::train::{self, Features, TrainSource, loss};

/// The host's random stream is one per process and the software adapter has two cores: the tests
/// of this file take turns.
static TURN: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether CI says a wgpu adapter must be there.
fn required() -> bool {
    std::env::var("RUNNER_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The wgpu device (with autodiff), or `None` when there is none and none is required.
fn gpu() -> Option<Device> {
    match device::select(DeviceChoice::Wgpu) {
        Ok(s) => {
            eprintln!("GPU tests on {}", s.name);
            Some(s.device)
        }
        Err(e) if required() => panic!("RUNNER_REQUIRE_GPU=1 but there is no wgpu adapter: {e}"),
        Err(e) => {
            eprintln!("skipped: {e} (set RUNNER_REQUIRE_GPU=1 to make this a failure)");
            None
        }
    }
}

fn cpu() -> Device {
    Device::flex().autodiff()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f64) {
    let err = common::relative_error(got, want);
    assert!(
        err <= tolerance,
        "{what}: relative error {err:.2e} > {tolerance:.0e}"
    );
}

// ------------------------------------------------------------------------------------ forwards

/// A VGG16, MobileNetV2 or ResNet50 weights file with random values, in the layout its loader
/// reads (Keras names for VGG, torchvision's otherwise).
fn random_weights(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.safetensors"));
    match name {
        "vgg16" => {
            common::write_vgg_weights_with(&path, runner::backbone::find(name).unwrap(), 5, 0.1)
        }
        _ => common::write_torchvision_weights(&path, &common::torchvision_keys(name), 5),
    }
    path
}

fn random_input(n: usize, size: usize, seed: u64) -> Vec<f32> {
    let mut rng = common::Rng::new(seed);
    (0..n * 3 * size * size)
        .map(|_| rng.uniform() * 2.0)
        .collect()
}

#[test]
fn every_backbone_family_computes_the_cpu_forward_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let _turn = turn();
    let gpu = gpu.without_autodiff();
    let dir = tempfile::tempdir().unwrap();
    for (name, size) in [("vgg16", 48), ("mobilenet_v2", 64), ("resnet50", 32)] {
        let def = runner::backbone::find(name).unwrap();
        let weights = random_weights(dir.path(), name);
        let on = |d: &Device| Backbone::init(def, d).load(def, &weights).unwrap();
        let (b_cpu, b_gpu) = (on(&Device::flex()), on(&gpu));
        let n = b_cpu.num_layers();
        let x = random_input(2, size, 3);
        let input =
            |d: &Device| Tensor::<4>::from_data(TensorData::new(x.clone(), [2, 3, size, size]), d);
        let want = values(b_cpu.forward_range(input(&Device::flex()), 0, n));
        let got = values(b_gpu.forward_range(input(&gpu), 0, n));
        assert_close(
            &format!("{name} forward at {size}x{size}"),
            &got,
            &want,
            1e-4,
        );
        // VGG's frozen layers run by Winograd on the CPU, by burn's convolutions on the GPU.
        if let (Some(v_cpu), Some(v_gpu)) = (b_cpu.vgg(), b_gpu.vgg()) {
            let want = values(v_cpu.forward_frozen(input(&Device::flex()), n));
            let got = values(v_gpu.forward_frozen(input(&gpu), n));
            assert_close(
                "vgg16 frozen forward (Winograd on the CPU)",
                &got,
                &want,
                1e-4,
            );
        }
    }
}

// ------------------------------------------------------------------------------ training steps

/// A plan on generated images at `size`, with `head` and `extra` backbone settings.
fn plan(dir: &Path, backbone: &str, size: usize, head: &str, backbone_extra: &str) -> Plan {
    let data = common::make_dataset(&dir.join("data"), &["cats", "dogs"], [3, 2, 1], size as u32);
    let weights = random_weights(dir, backbone);
    let mut text = common::spec_text(&data, &weights, "")
        .replace(common::DENSE_HEAD, head)
        .replace(
            "image_size = [32, 32]",
            &format!("image_size = [{size}, {size}]"),
        )
        .replace("name = \"vgg16\"", &format!("name = \"{backbone}\""))
        .replace("trainable_from = \"none\"", backbone_extra);
    if backbone != "vgg16" {
        text = text.replace("preprocess = \"caffe\"", "preprocess = \"torch\"");
    }
    common::plan_for(dir, &text)
}

/// A 32x32 VGG16 plan, whole base frozen, with `head`, `[train]`'s `epochs = 2` replaced by
/// `train` and the optimizer by `optimizer` (when given), `extra` appended.
fn small_plan(dir: &Path, head: &str, train: &str, optimizer: Option<&str>, extra: &str) -> Plan {
    plan(dir, "vgg16", 32, head, "trainable_from = \"none\"");
    let mut text = std::fs::read_to_string(dir.join("exp.toml"))
        .unwrap()
        .replace("epochs = 2", train);
    if let Some(o) = optimizer {
        text = text.replace("kind = \"rmsprop\"\nlr = 1e-3", o);
    }
    common::plan_for(dir, &(text + extra))
}

/// Two runs' epochs have the same learning rates and, within 1e-3, the same losses and validation
/// accuracy.
fn assert_same_history(what: &str, a: &[train::EpochMetrics], b: &[train::EpochMetrics]) {
    assert_eq!(a.len(), b.len(), "{what}: epochs");
    for (a, b) in a.iter().zip(b) {
        assert_eq!(a.lr, b.lr, "{what}: learning rate of epoch {}", a.epoch);
        for (x, y) in [
            (a.train_loss, b.train_loss),
            (a.val_loss, b.val_loss),
            (a.val_acc, b.val_acc),
        ] {
            assert!(
                (x - y).abs() <= 1e-3 * x.abs().max(1.0),
                "{what}: {a:?} vs {b:?}"
            );
        }
    }
}

/// Random activations at the plan's cutoff.
fn features(plan: &Plan, n: usize, seed: u64) -> Features {
    let shape = plan
        .backbone
        .shape_at(plan.phases[0].cutoff.index, plan.spec.data.image_size);
    let mut rng = common::Rng::new(seed);
    let per: usize = shape.iter().product();
    Features::new(
        (0..n * per).map(|_| rng.uniform().abs() * 2.0).collect(),
        shape,
        (0..n).map(|i| (i * 7 + 1) % 2).collect(),
        (0..n).map(|i| format!("{i}.png").into()).collect(),
    )
}

/// Every float parameter: id, rank, trainable, module path.
#[derive(Default)]
struct Ids {
    params: Vec<(ParamId, usize, bool, String)>,
    path: Vec<String>,
}

impl ModuleVisitor for Ids {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let trainable = param.val().is_require_grad();
        self.params
            .push((param.id, D, trainable, self.path.join(".")));
    }
}

fn ids(model: &TransferModel) -> Vec<(ParamId, usize, bool, String)> {
    let mut v = Ids::default();
    model.visit(&mut v);
    v.params
}

fn grad(g: &GradientsParams, id: ParamId, rank: usize) -> Option<Vec<f32>> {
    match rank {
        1 => g.get::<1>(id).map(values),
        2 => g.get::<2>(id).map(values),
        4 => g.get::<4>(id).map(values),
        _ => unreachable!("parameters are vectors, matrices or kernels"),
    }
}

/// What a training step computed: loss, correct count, gradients.
struct StepResult {
    loss: f32,
    correct: usize,
    grads: GradientsParams,
}

/// One training step as runner's training loop takes it on `device`: by hand where the CPU has
/// that path, by autodiff otherwise (and on the GPU).
fn step(model: &mut TransferModel, x: Tensor<4>, labels: &[usize], plan: &Plan) -> StepResult {
    let kind = plan.spec.train.loss;
    let device = x.device();
    device::seed_host(42);
    if let Some(path) = HandPath::of(model, &device, kind) {
        let s = path.step(model, x, labels);
        return StepResult {
            loss: s.loss,
            correct: s.correct,
            grads: s.grads,
        };
    }
    let logits = model.forward_from_cut(x);
    let correct = loss::correct(kind, logits.clone().without_autodiff(), labels);
    let l = loss::loss(kind, logits, labels);
    let grads = GradientsParams::from_grads(l.backward(), &*model);
    StepResult {
        loss: l.into_scalar::<f32>(),
        correct,
        grads,
    }
}

/// The CPU model and the same model (same parameter ids and values) on the GPU.
fn both(plan: &Plan, gpu: &Device) -> (TransferModel, TransferModel) {
    device::seed_host(plan.spec.experiment.seed);
    let on_cpu = TransferModel::build(plan, &cpu()).unwrap();
    let on_gpu = on_cpu.clone().fork(gpu);
    (on_cpu, on_gpu)
}

/// The step on both devices from activations `x_cpu` / `x_gpu` of the same batch: the same
/// predictions before it, loss, correct count and every trainable parameter's gradient.
fn same_step(
    what: &str,
    plan: &Plan,
    (mut m_cpu, mut m_gpu): (TransferModel, TransferModel),
    x_cpu: Tensor<4>,
    x_gpu: Tensor<4>,
    labels: &[usize],
    trainable: usize,
) -> (TransferModel, TransferModel) {
    let p_cpu = values(
        m_cpu
            .valid()
            .forward_from_cut(x_cpu.clone().without_autodiff()),
    );
    let p_gpu = values(
        m_gpu
            .valid()
            .forward_from_cut(x_gpu.clone().without_autodiff()),
    );
    assert_close(&format!("{what}: predictions"), &p_gpu, &p_cpu, 1e-3);
    let want = step(&mut m_cpu, x_cpu, labels, plan);
    let got = step(&mut m_gpu, x_gpu, labels, plan);
    assert!(
        ((got.loss - want.loss) / want.loss.abs().max(1e-6)).abs() <= 1e-3,
        "{what}: loss {} on the GPU, {} on the CPU",
        got.loss,
        want.loss
    );
    assert_eq!(got.correct, want.correct, "{what}: correct predictions");
    let mut compared = Vec::new();
    for (id, rank, _, path) in ids(&m_cpu) {
        match (grad(&got.grads, id, rank), grad(&want.grads, id, rank)) {
            (Some(g), Some(w)) => compared.push((path, g, w)),
            (None, None) => {}
            (g, w) => panic!(
                "{what}: parameter {path} has a gradient on the GPU: {}, on the CPU: {}",
                g.is_some(),
                w.is_some()
            ),
        }
    }
    assert_eq!(
        compared.len(),
        trainable,
        "{what}: every trainable parameter's gradient"
    );
    // Relative to the gradient's own size, or to a thousandth of the largest gradient's where a
    // gradient is zero but for rounding: the shift of a BatchNorm that feeds a training BatchNorm
    // (through a 1x1 convolution) cancels in the next one's batch mean, so its gradient is noise.
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let largest = compared.iter().map(|(_, _, w)| norm(w)).fold(0.0, f64::max);
    for (path, g, w) in &compared {
        let diff: Vec<f32> = g.iter().zip(w).map(|(a, b)| a - b).collect();
        let err = norm(&diff) / norm(w).max(1e-3 * largest).max(1e-30);
        assert!(
            err <= 1e-3,
            "{what}: gradient of {path}: relative error {err:.2e} (norms {:.3e} on the GPU, {:.3e} on the CPU, largest {largest:.3e})",
            norm(g),
            norm(w)
        );
    }
    (m_cpu, m_gpu)
}

/// Features at the cutoff as a batch on `device` (with autodiff, as the training loop has them).
fn batch(f: &Features, device: &Device) -> (Tensor<4>, Vec<usize>) {
    let idx: Vec<usize> = (0..f.len()).collect();
    f.batch(&idx, device).unwrap()
}

#[test]
fn a_dense_head_on_cached_features_takes_the_same_step() {
    let Some(gpu) = gpu() else { return };
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    // flatten > dense(16, relu) > dropout(0.5) > dense(1, sigmoid): the mask is the host's on both.
    let plan = plan(
        dir.path(),
        "vgg16",
        64,
        common::DENSE_HEAD,
        "trainable_from = \"none\"",
    );
    let f = features(&plan, 6, 11);
    let (x_cpu, labels) = batch(&f, &cpu());
    let (x_gpu, _) = batch(&f, &gpu);
    same_step(
        "dense head",
        &plan,
        both(&plan, &gpu),
        x_cpu,
        x_gpu,
        &labels,
        4,
    );
}

#[test]
fn fine_tuning_block5_takes_the_same_step() {
    let Some(gpu) = gpu() else { return };
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(
        dir.path(),
        "vgg16",
        64,
        common::DENSE_HEAD,
        "trainable_from = \"block5_conv1\"",
    );
    let f = features(&plan, 4, 12);
    assert_eq!(f.shape, [512, 4, 4]);
    let (x_cpu, labels) = batch(&f, &cpu());
    let (x_gpu, _) = batch(&f, &gpu);
    // block5's three convolutions (weight and bias) and the head's two dense layers.
    same_step(
        "block5 + dense head",
        &plan,
        both(&plan, &gpu),
        x_cpu,
        x_gpu,
        &labels,
        10,
    );
}

const CONV_HEAD: &str = r#"
[[head.layers]]
kind = "conv2d"
filters = 8
kernel = 3
padding = "same"
activation = "relu"
[[head.layers]]
kind = "flatten"
[[head.layers]]
kind = "dense"
units = 8
activation = "relu"
[[head.layers]]
kind = "dense"
units = 1
activation = "sigmoid"
"#;

#[test]
fn a_conv_head_over_the_frozen_base_takes_the_same_augmented_step() {
    let Some(gpu) = gpu() else { return };
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(
        dir.path(),
        "vgg16",
        64,
        CONV_HEAD,
        "trainable_from = \"none\"",
    );
    let listing = plan.split("train").unwrap();
    let size = plan.spec.data.image_size;
    let images = runner::data::folder::load_split(listing, size, plan.spec.data.interpolation).0;
    let items: Vec<(usize, usize)> = (0..images.len()).map(|i| (i, 0)).collect();
    let aug = runner::spec::AugmentSpec::notebook();
    let pixels = runner::data::augment::augment_pass_batch(&images, &items, &aug, 7, 1).unwrap();
    let (m_cpu, m_gpu) = both(&plan, &gpu);
    // The frozen base on each device, outside autodiff, as the training loop runs it.
    let frozen = |m: &TransferModel, d: &Device| {
        let x = runner::data::pixels_tensor(
            &pixels,
            items.len(),
            size,
            plan.preprocess,
            &d.clone().without_autodiff(),
        );
        m.valid().frozen_features(x).autodiff()
    };
    let (x_cpu, x_gpu) = (frozen(&m_cpu, &cpu()), frozen(&m_gpu, &gpu));
    assert_close(
        "frozen base on augmented images",
        &values(x_gpu.clone()),
        &values(x_cpu.clone()),
        1e-4,
    );
    let labels = images.labels.clone();
    same_step("conv head", &plan, (m_cpu, m_gpu), x_cpu, x_gpu, &labels, 6);
}

#[test]
fn mobilenet_v2_above_its_cutoff_takes_the_same_step_with_batchnorm_training_or_frozen() {
    let Some(gpu) = gpu() else { return };
    let _turn = turn();
    let stats = |m: &TransferModel| match &m.backbone {
        Backbone::MobileNetV2(n) => n.batchnorm_stats(),
        _ => unreachable!("a MobileNetV2 plan"),
    };
    for mode in ["train", "frozen"] {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(
            dir.path(),
            "mobilenet_v2",
            64,
            common::DENSE_HEAD,
            &format!("trainable_from = \"features.17\"\nbatchnorm = \"{mode}\""),
        );
        let f = features(&plan, 4, 13);
        let (x_cpu, labels) = batch(&f, &cpu());
        let (x_gpu, _) = batch(&f, &gpu);
        let (m_cpu, _) = both(&plan, &gpu);
        let before = stats(&m_cpu);
        // features.17 (three convolutions, three BatchNorms of weight and bias), features.18 (a
        // convolution and a BatchNorm), the head's two dense layers.
        let trainable = ids(&m_cpu).iter().filter(|(_, _, t, _)| *t).count();
        assert_eq!(trainable, 3 + 6 + 1 + 2 + 4);
        let (m_cpu, m_gpu) = same_step(
            &format!("MobileNetV2, batchnorm {mode}"),
            &plan,
            both(&plan, &gpu),
            x_cpu,
            x_gpu,
            &labels,
            trainable,
        );
        // The step's forward updates the running statistics the same way (or, frozen, not at all).
        let (after_cpu, after_gpu) = (stats(&m_cpu), stats(&m_gpu));
        assert_close(
            &format!("batchnorm {mode}: running statistics"),
            &after_gpu,
            &after_cpu,
            1e-4,
        );
        assert_eq!(after_cpu != before, mode == "train", "batchnorm {mode}");
    }
}

// ------------------------------------------------------------------- optimizers and schedules

/// Every trainable parameter's values, in visiting order.
fn trainable_values(model: &TransferModel) -> Vec<f32> {
    struct Values(Vec<f32>);
    impl ModuleVisitor for Values {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val();
            if t.is_require_grad() {
                self.0.extend(t.into_data().iter::<f32>());
            }
        }
    }
    let mut v = Values(Vec::new());
    model.visit(&mut v);
    v.0
}

#[test]
fn every_optimizer_and_schedule_moves_the_parameters_alike() {
    let Some(gpu) = gpu() else { return };
    let _turn = turn();
    let cases = [
        ("kind = \"rmsprop\"\nlr = 1e-3", "kind = \"constant\""),
        (
            "kind = \"rmsprop\"\nlr = 1e-3\nmomentum = 0.9\ncentered = true\nweight_decay = 1e-4",
            "kind = \"step\"\nevery_epochs = 1\ngamma = 0.5",
        ),
        (
            "kind = \"adam\"\nlr = 1e-3",
            "kind = \"exponential\"\ngamma = 0.7",
        ),
        (
            "kind = \"adamw\"\nlr = 1e-3\nweight_decay = 0.01",
            "kind = \"cosine\"\nwarmup_epochs = 1",
        ),
        (
            "kind = \"sgd\"\nlr = 1e-2\nmomentum = 0.9\nnesterov = true",
            "kind = \"reduce_on_plateau\"\nfactor = 0.5\npatience = 0\nmin_delta = 1000.0",
        ),
    ];
    for (optimizer, schedule) in cases {
        let dir = tempfile::tempdir().unwrap();
        let p = small_plan(
            dir.path(),
            common::DENSE_HEAD,
            "epochs = 3\nsteps_per_epoch = 3",
            Some(optimizer),
            &format!("\n[schedule]\n{schedule}\n"),
        );
        let train_f = features(&p, 8, 21);
        let val_f = features(&p, 4, 22);
        let (m_cpu, m_gpu) = both(&p, &gpu);
        let start = trainable_values(&m_cpu);
        let (m_cpu, h_cpu) = train::fit(
            m_cpu,
            &TrainSource::Features(&train_f),
            &val_f,
            &p,
            &cpu(),
            "cpu",
        );
        let (m_gpu, h_gpu) = train::fit(
            m_gpu,
            &TrainSource::Features(&train_f),
            &val_f,
            &p,
            &gpu,
            "gpu",
        );
        let what = format!(
            "{} / {}",
            optimizer.lines().next().unwrap(),
            schedule.lines().next().unwrap()
        );
        let (after_cpu, after_gpu) = (trainable_values(&m_cpu), trainable_values(&m_gpu));
        assert_ne!(after_cpu, start, "{what}: the parameters moved");
        assert_close(
            &format!("{what}: parameters after 9 steps"),
            &after_gpu,
            &after_cpu,
            1e-4,
        );
        // The validation after each epoch sees that epoch's last update too.
        assert_same_history(&what, &h_cpu, &h_gpu);
    }
}

#[test]
fn an_augmented_phase_trains_alike_with_batches_made_on_another_thread() {
    let Some(gpu) = gpu() else { return };
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let p = small_plan(
        dir.path(),
        common::DENSE_HEAD,
        "epochs = 2\nsteps_per_epoch = 2",
        None,
        "",
    );
    let images = runner::data::folder::load_split(
        p.split("train").unwrap(),
        p.spec.data.image_size,
        p.spec.data.interpolation,
    )
    .0;
    let aug = runner::spec::AugmentSpec::notebook();
    let val = features(&p, 4, 41);
    let (m_cpu, m_gpu) = both(&p, &gpu);
    let mut histories = Vec::new();
    for (m, d) in [(m_cpu, cpu()), (m_gpu, gpu.clone())] {
        // Augmentation, preprocessing and the upload run on the training loop's producer thread.
        let source = TrainSource::Augmented {
            images: &images,
            spec: &aug,
            frozen: m.valid(),
        };
        let (m, h) = train::fit(m, &source, &val, &p, &d, "augmented");
        histories.push((trainable_values(&m), h));
    }
    let ((w_cpu, h_cpu), (w_gpu, h_gpu)) = (&histories[0], &histories[1]);
    assert_close("parameters after two augmented epochs", w_gpu, w_cpu, 1e-4);
    assert_same_history("augmented", h_cpu, h_gpu);
}

#[test]
fn the_validation_after_an_epoch_sees_its_last_update() {
    let Some(gpu) = gpu() else { return };
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let dropout = "[[head.layers]]\nkind = \"dropout\"\nrate = 0.5\n";
    // One step an epoch: the validation right after it is the only read of the updated weights.
    let head = common::DENSE_HEAD.replace(dropout, "");
    let p = small_plan(
        dir.path(),
        &head,
        "epochs = 2\nsteps_per_epoch = 1",
        None,
        "",
    );
    let f = features(&p, 4, 51);
    let (m_cpu, m_gpu) = both(&p, &gpu);
    let (_, h_cpu) = train::fit(m_cpu, &TrainSource::Features(&f), &f, &p, &cpu(), "cpu");
    let (_, h_gpu) = train::fit(m_gpu, &TrainSource::Features(&f), &f, &p, &gpu, "gpu");
    // cubecl's default stream per thread once gave the GPU's first validation the weights from
    // before the update: its loss was the training loss of the same batch.
    assert!(
        (h_gpu[0].val_loss - h_gpu[0].train_loss).abs() > 1e-3,
        "{h_gpu:?}"
    );
    assert_same_history("one-step epochs", &h_cpu, &h_gpu);
}

// ---------------------------------------------------------------------------- host reads

#[test]
fn a_gpu_epoch_reads_its_statistics_back_once_per_log_interval() {
    let Some(gpu) = gpu() else { return };
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let p20 = small_plan(
        dir.path(),
        common::DENSE_HEAD,
        "epochs = 1\nsteps_per_epoch = 20",
        None,
        "",
    );
    let f = features(&p20, 8, 31);
    let (m_cpu, m_gpu) = both(&p20, &gpu);
    let before = train::stat_reads();
    let _ = train::fit(m_gpu, &TrainSource::Features(&f), &f, &p20, &gpu, "gpu");
    let gpu_reads = train::stat_reads() - before;
    // 20 steps, a log line every 2: 10 reads, not 20.
    assert_eq!(
        gpu_reads, 10,
        "reads of training statistics in a 20-step GPU epoch"
    );
    let before = train::stat_reads();
    let _ = train::fit(m_cpu, &TrainSource::Features(&f), &f, &p20, &cpu(), "cpu");
    // The CPU's hand-written step computes its statistics on the host: nothing to read back.
    assert_eq!(train::stat_reads() - before, 0);
}

// ---------------------------------------------------------------------- through the binary

use common::cli::{self as cli, Setup};

/// The tiny experiment on `device`, results in `results`, the feature cache shared by the setup.
fn run_on(s: &Setup, device: &str, results: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        s.spec.to_str().unwrap(),
        "--device",
        device,
        "--results",
        results.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    cli::runner(&args, s.dir.path())
}

const METRICS: [&str; 7] = [
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "test_loss",
    "test_acc",
];

/// Two run tables hold the same epochs and metrics within `tolerance` (relative, or absolute
/// below 1).
fn assert_same_metrics(
    what: &str,
    a: &polars::prelude::DataFrame,
    b: &polars::prelude::DataFrame,
    tolerance: f64,
) {
    assert_eq!(
        cli::u32s(a, "epoch"),
        cli::u32s(b, "epoch"),
        "{what}: epochs"
    );
    for col in METRICS {
        let (x, y) = (cli::f64s(a, col), cli::f64s(b, col));
        for (u, v) in x.iter().zip(&y) {
            assert!(
                (u - v).abs() <= tolerance * u.abs().max(1.0),
                "{what}: {col} {x:?} vs {y:?}"
            );
        }
    }
}

/// `runner predict` of run `id`'s model on the test images: `(path, p_cats, p_dogs)` per line.
fn predict(s: &Setup, results: &Path, id: &str, device: &str) -> Vec<(String, f64, f64)> {
    let out = cli::runner(
        &[
            "predict",
            id,
            s.data.join("test").to_str().unwrap(),
            "--results",
            results.to_str().unwrap(),
            "--device",
            device,
        ],
        s.dir.path(),
    );
    cli::ok(&out);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|line| {
            let c: Vec<&str> = line.split_whitespace().collect();
            (
                c[0].to_string(),
                c[1].parse().unwrap(),
                c[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_run_on_the_gpu_is_the_cpu_run_with_the_same_table_cache_and_predictions() {
    let Some(_) = gpu() else { return };
    let _turn = turn();
    let s = cli::setup(&[]);
    let (on_cpu, on_gpu) = (s.dir.path().join("cpu"), s.dir.path().join("gpu"));
    cli::ok(&run_on(&s, "cpu", &on_cpu, &[]));
    cli::ok(&run_on(&s, "wgpu", &on_gpu, &[]));
    let (id_cpu, t_cpu) = cli::only_run(&on_cpu);
    let (id_gpu, t_gpu) = cli::only_run(&on_gpu);
    assert_eq!(t_cpu.schema(), t_gpu.schema(), "the same results schema");
    assert_same_metrics("two epochs", &t_cpu, &t_gpu, 1e-3);
    assert_eq!(cli::strs(&t_gpu, "status"), ["completed", "completed"]);

    // The GPU run named its adapter and read the activations the CPU run had cached.
    let ev = cli::events(&on_gpu, &id_gpu);
    let started = ev.iter().find(|e| e["message"] == "Run started.").unwrap();
    assert!(
        started["device"].as_str().unwrap().starts_with("wgpu: "),
        "{started}"
    );
    assert_eq!(
        cli::count(&ev, "Feature cache hit."),
        3,
        "train, validation and test from the CPU's cache"
    );
    assert_eq!(cli::count(&ev, "Feature cache miss."), 0);

    // Per-image test predictions, and `runner predict` of either model on either device.
    let p_cpu = runner::results::read_run(&on_cpu.join(format!("{id_cpu}.predictions.parquet")))
        .unwrap()
        .0;
    let p_gpu = runner::results::read_run(&on_gpu.join(format!("{id_gpu}.predictions.parquet")))
        .unwrap()
        .0;
    let dogs = |df: &polars::prelude::DataFrame| {
        cli::f64s(df, "p_dogs")
            .iter()
            .map(|v| *v as f32)
            .collect::<Vec<_>>()
    };
    assert_close("test predictions", &dogs(&p_gpu), &dogs(&p_cpu), 1e-3);
    let a = predict(&s, &on_gpu, &id_gpu, "cpu");
    let b = predict(&s, &on_gpu, &id_gpu, "wgpu");
    let c = predict(&s, &on_cpu, &id_cpu, "wgpu");
    assert_eq!(a.len(), 8);
    for ((x, y), z) in a.iter().zip(&b).zip(&c) {
        assert_eq!(x.0, y.0);
        assert!(
            (x.2 - y.2).abs() <= 2e-4 && (x.2 - z.2).abs() <= 2e-3,
            "{x:?} {y:?} {z:?}"
        );
    }
}

/// Long enough to stop after its first checkpoint (on the CPU too): 8 epochs of 40 steps.
const LONG: [(&str, &str); 1] = [("epochs = 2", "epochs = 8\nsteps_per_epoch = 40")];

/// Starts the run on `device`, stops it with `sig` after its first checkpoint (`-INT`: Ctrl-C,
/// which checkpoints in the middle of the epoch; `-KILL`), resumes it on `then`: returns the
/// finished table.
fn stopped_and_resumed(
    s: &Setup,
    results: &Path,
    device: &str,
    sig: &str,
    then: &str,
) -> polars::prelude::DataFrame {
    let mut child = cli::spawn(
        s,
        &[
            s.spec.to_str().unwrap(),
            "--device",
            device,
            "--results",
            results.to_str().unwrap(),
        ],
    );
    let id = cli::wait_for_checkpoint(results, &mut child);
    cli::signal(&child, sig);
    let status = child.wait().unwrap();
    let (_, partial) = cli::only_run(results);
    assert!(partial.height() < 8, "stopped before the end");
    if sig == "-INT" {
        assert_eq!(status.code(), Some(130));
        let ck = runner::train::checkpoint::read(&results.join(&id).join("last.ckpt")).unwrap();
        assert!(
            ck.state.progress.step > 0,
            "Ctrl-C checkpoints in the middle of an epoch"
        );
    }
    let out = cli::runner(
        &[
            "resume",
            &id,
            "--results",
            results.to_str().unwrap(),
            "--device",
            then,
        ],
        s.dir.path(),
    );
    cli::ok(&out);
    let (_, done) = cli::only_run(results);
    assert!(cli::strs(&done, "status").iter().all(|v| v == "completed"));
    let ev = cli::events(results, &id);
    assert_eq!(cli::count(&ev, "Run resumed."), 1);
    done
}

#[test]
fn a_checkpoint_written_on_one_device_resumes_on_the_other() {
    let Some(_) = gpu() else { return };
    let _turn = turn();
    let s = cli::setup(&LONG);
    // The GPU run comes first: it writes the feature cache the CPU runs then read. Ctrl-C stops
    // it mid-epoch, its statistics read back into the checkpoint first.
    let gpu_first = stopped_and_resumed(
        &s,
        &s.dir.path().join("gpu_then_cpu"),
        "wgpu",
        "-INT",
        "cpu",
    );
    let baseline_dir = s.dir.path().join("baseline");
    cli::ok(&run_on(&s, "cpu", &baseline_dir, &[]));
    let (id, baseline) = cli::only_run(&baseline_dir);
    assert_eq!(
        cli::count(&cli::events(&baseline_dir, &id), "Feature cache hit."),
        3,
        "the CPU run reads the activations the GPU run cached"
    );
    assert_same_metrics("GPU, then resumed on the CPU", &gpu_first, &baseline, 1e-3);
    let cpu_first = stopped_and_resumed(
        &s,
        &s.dir.path().join("cpu_then_gpu"),
        "cpu",
        "-KILL",
        "wgpu",
    );
    assert_same_metrics("CPU, then resumed on the GPU", &cpu_first, &baseline, 1e-3);
}

#[test]
fn a_batch_larger_than_the_adapter_can_hold_is_refused_before_training() {
    let Some(_) = gpu() else { return };
    let _turn = turn();
    // 512 images of 512x512: VGG16's first activation alone is 32 GiB, over any adapter's limit.
    let s = cli::setup(&[
        ("image_size = [32, 32]", "image_size = [512, 512]"),
        ("batch_size = 4", "batch_size = 512"),
    ]);
    let out = run_on(&s, "wgpu", &s.results, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("data.batch_size = 512 with data.image_size = [512, 512]")
            && err.contains("MiB one tensor may take on wgpu: ")
            && err.contains("use data.batch_size = "),
        "{err}"
    );
    assert!(
        cli::files_with(&s.results, ".parquet").is_empty(),
        "nothing trained"
    );
}

#[test]
fn a_run_that_diverges_on_the_gpu_stops_at_the_step_the_cpu_stops_at() {
    let Some(_) = gpu() else { return };
    let _turn = turn();
    // Ten steps an epoch, read back every step on the CPU and once per log interval on the GPU.
    let s = cli::setup(&[("epochs = 2", "epochs = 2\nsteps_per_epoch = 10")]);
    let mut at = Vec::new();
    for device in ["cpu", "wgpu"] {
        let results = s.dir.path().join(device);
        let out = run_on(&s, device, &results, &["--set", "optimizer.lr=1e30"]);
        assert_eq!(out.status.code(), Some(1), "{device}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let (id, table) = cli::only_run(&results);
        assert!(
            cli::strs(&table, "status").iter().all(|v| v == "diverged"),
            "{device}"
        );
        assert!(
            !results.join(&id).join("model.bpk").exists(),
            "{device}: no model saved"
        );
        let step = err
            .split("diverged at ")
            .nth(1)
            .and_then(|rest| rest.split(" (").next())
            .unwrap_or_else(|| panic!("{device}: {err}"))
            .to_string();
        at.push(step);
    }
    assert_eq!(
        at[0], at[1],
        "the epoch and step where the loss stopped being finite"
    );
}

#[test]
fn a_new_head_label_smoothing_and_test_time_flips_run_alike_on_the_gpu() {
    let Some(_) = gpu() else { return };
    let _turn = turn();
    // A dense head, then a fresh conv head on a base trainable from block5_conv3.
    let s = cli::setup(&[(
        "epochs = 2",
        "epochs = 2\nlabel_smoothing = 0.1\ntest_time_augmentation = \"horizontal_flip\"",
    )]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    std::fs::write(&s.spec, text + &common::new_head_phases(1, 1)).unwrap();
    let (on_cpu, on_gpu) = (s.dir.path().join("cpu"), s.dir.path().join("gpu"));
    cli::ok(&run_on(&s, "cpu", &on_cpu, &[]));
    cli::ok(&run_on(&s, "wgpu", &on_gpu, &[]));
    let (id_cpu, t_cpu) = cli::only_run(&on_cpu);
    let (id_gpu, t_gpu) = cli::only_run(&on_gpu);
    assert_eq!(cli::strs(&t_gpu, "phase"), ["dense", "conv"]);
    assert_same_metrics("a new head", &t_cpu, &t_gpu, 1e-3);
    // The averaged views, on either device, from either model.
    let a = predict(&s, &on_cpu, &id_cpu, "cpu");
    let b = predict(&s, &on_gpu, &id_gpu, "wgpu");
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        assert!(x.0 == y.0 && (x.2 - y.2).abs() <= 2e-3, "{x:?} {y:?}");
    }
}
