//! The backbone: weight import and its checks, the forward pass against an independent
//! reference, and freezing.

mod common;

use burn::prelude::*;
use runner::backbone;
use runner::backbone::vgg::Vgg;
use runner::model::TransferModel;
use runner::spec::Preprocess;

fn vgg16() -> &'static backbone::BackboneDef {
    backbone::find("vgg16").unwrap()
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

#[test]
fn weight_import_reports_missing_unexpected_and_misshapen_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    common::write_safetensors(
        &path,
        &[
            (
                "block1_conv1.weight".into(),
                vec![64, 3, 1, 1],
                vec![0; 64 * 3 * 4],
            ),
            ("block6_conv1.weight".into(), vec![2], vec![0; 8]),
        ],
    );
    let device = Device::flex();
    let e = Vgg::init(vgg16(), &device)
        .load(vgg16(), &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("{}: the weights do not fit vgg16", path.display())),
        "{e}"
    );
    assert!(
        e.contains("tensor block1_conv1.weight has shape [64, 3, 1, 1], expected [64, 3, 3, 3]"),
        "{e}"
    );
    assert!(e.contains("missing tensor block1_conv1.bias"), "{e}");
    assert!(e.contains("missing tensor block5_conv3.weight"), "{e}");
    assert!(e.contains("unexpected tensor block6_conv1.weight"), "{e}");
}

#[test]
fn weight_import_rejects_a_file_that_is_not_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.safetensors");
    std::fs::write(&path, b"this is not a weights file").unwrap();
    let device = Device::flex();
    let e = Vgg::init(vgg16(), &device)
        .load(vgg16(), &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("{}: cannot read weights", path.display())),
        "{e}"
    );
}

#[test]
fn weight_import_puts_every_tensor_in_its_layer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vgg16.safetensors");
    common::write_vgg_weights(&path, vgg16(), 11);
    // The same stream the helper used: the first values of block1_conv1 and block5_conv3.
    let file = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    let expect = |name: &str| common::f32_tensor(&st, name);
    let device = Device::flex();
    let vgg = Vgg::init(vgg16(), &device).load(vgg16(), &path).unwrap();
    for (i, name) in [
        (0, "block1_conv1"),
        (6, "block3_conv3"),
        (7, "block4_conv1"),
        (12, "block5_conv3"),
    ] {
        let w = values(vgg.convs[i].weight.val());
        assert!(
            w == expect(&format!("{name}.weight")),
            "convs[{i}] should hold {name}"
        );
    }
}

/// The base's output on a real image against a numpy forward pass (tools/vgg16_reference.py),
/// with the real ImageNet weights. Needs the asset mirror; CI has it beside the clone.
#[test]
fn forward_matches_the_numpy_reference_on_a_real_image() {
    let Some(mirror) = common::mirror() else {
        eprintln!("skipped: no asset mirror (set RUNNER_ASSETS) for the real VGG16 weights");
        return;
    };
    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/vgg16_reference.safetensors"
    ))
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&fixture).unwrap();
    let pixels = st.tensor("input").unwrap().data().to_vec();
    let device = Device::flex();
    let vgg = Vgg::init(vgg16(), &device)
        .load(
            vgg16(),
            &mirror.join("weights/vgg16_imagenet_notop.safetensors"),
        )
        .unwrap();
    for (pre, name) in [
        (Preprocess::Rescale, "rescale"),
        (Preprocess::Caffe, "caffe"),
    ] {
        let mut input = vec![0f32; 3 * 150 * 150];
        runner::data::preprocess_into(&pixels, 150 * 150, pre, &mut input);
        let x = Tensor::<4>::from_data(TensorData::new(input, [1, 3, 150, 150]), &device);
        let want = common::f32_tensor(&st, name);
        // burn's convolutions, and the Winograd path the frozen layers take on the CPU.
        let n = vgg.num_layers();
        for (way, got) in [
            ("burn", values(vgg.forward_range(x.clone(), 0, n))),
            ("winograd", values(vgg.forward_frozen(x, n))),
        ] {
            assert_eq!(got.len(), 512 * 4 * 4);
            let rel = common::relative_error(&got, &want);
            assert!(rel < 1e-4, "{name}, {way}: relative error {rel}");
        }
    }
}

/// Trains with `trainable_from = "block5_conv1"` and checks that exactly block 5 changed.
fn only_block5_changes(extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), &["cats", "dogs"], [4, 2, 2], 32);
    let weights = dir.path().join("w.safetensors");
    common::write_vgg_weights(&weights, vgg16(), 5);
    let text = common::spec_text(&data, &weights, extra).replace(
        "trainable_from = \"none\"",
        "trainable_from = \"block5_conv1\"",
    );
    let plan = common::plan_for(dir.path(), &text);
    let device = Device::flex().autodiff();
    let before = TransferModel::build(&plan, &device).unwrap();
    let outcome = common::train(&plan, &device, &dir.path().join("results"));
    let after = outcome.model;
    for i in 0..13 {
        let a = values(before.backbone.vgg().unwrap().convs[i].weight.val());
        let b = values(after.backbone.vgg().unwrap().convs[i].weight.val());
        if i < 10 {
            assert_eq!(a, b, "conv {i} is below block5_conv1 and must not change");
        } else {
            assert_ne!(a, b, "conv {i} is trainable and should have changed");
        }
    }
}

#[test]
fn layers_below_the_cutoff_do_not_change_in_training() {
    only_block5_changes("");
}

#[test]
fn layers_below_the_cutoff_do_not_change_in_augmented_training() {
    only_block5_changes("\n[augment]\nrotation_degrees = 20\nhorizontal_flip = true\n");
}

/// Every float parameter of a module, in visiting order.
struct Values(Vec<Vec<f32>>);

impl burn::module::ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        self.0.push(param.val().into_data().iter::<f32>().collect());
    }
}

fn head_values(m: &TransferModel) -> Vec<Vec<f32>> {
    let mut v = Values(Vec::new());
    m.head.visit(&mut v);
    v.0
}

#[test]
fn every_head_parameter_trains_and_a_restored_model_and_optimizer_continue_exactly() {
    use burn::optim::GradientsParams;
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), &["cats", "dogs"], [4, 2, 2], 32);
    let weights = dir.path().join("w.safetensors");
    common::write_vgg_weights(&weights, vgg16(), 5);
    let plan = common::plan_for(dir.path(), &common::spec_text(&data, &weights, ""));
    let device = Device::flex().autodiff();
    device.seed(1);
    let mut model = TransferModel::build(&plan, &device).unwrap();
    let initial = head_values(&model);
    let mut opt = runner::train::optim::build(&plan.spec.optimizer, None);
    let x = Tensor::<4>::random([4, 512, 1, 1], burn::tensor::Distribution::Default, &device);
    let y = vec![0usize, 1, 0, 1];
    let step = |m: TransferModel, o: &mut burn::optim::ModuleOptimizer| {
        device.seed(9);
        let logits = m.forward_from_cut(x.clone());
        let l = runner::train::loss::loss(plan.spec.train.loss, logits, &y);
        let g = GradientsParams::from_grads(l.backward(), &m);
        o.step(1e-3, m, g)
    };
    for _ in 0..3 {
        model = step(model, &mut opt);
    }
    // Kernels and biases (which start at zero) all move.
    let trained = head_values(&model);
    assert_eq!(trained.len(), 4);
    for (i, (a, b)) in initial.iter().zip(&trained).enumerate() {
        assert_ne!(a, b, "head parameter {i} did not train");
    }

    // A checkpoint leaves the frozen base out: the fresh model loads it from the weights file.
    let frozen = model.frozen_base(plan.frozen_layers(0), &plan.weights);
    assert!(frozen.is_some(), "the whole base is frozen");
    let model_bytes = runner::train::model_bytes(&model, frozen.as_ref()).unwrap();
    let full = runner::train::model_bytes(&model, None).unwrap();
    assert!(
        model_bytes.len() * 4 < full.len(),
        "{} of {}",
        model_bytes.len(),
        full.len()
    );
    let opt_bytes = opt.into_bytes().unwrap().to_vec();
    let fresh = TransferModel::build(&plan, &device).unwrap();
    assert!(frozen.as_ref().unwrap().matches(&fresh.backbone));
    let mut restored =
        runner::train::load_model_bytes(fresh, &model_bytes, frozen.as_ref()).unwrap();
    let mut restored_opt = runner::train::optim::build(&plan.spec.optimizer, None)
        .from_bytes(burn::tensor::Bytes::from_bytes_vec(opt_bytes))
        .unwrap();
    assert_eq!(head_values(&restored), trained);
    for _ in 0..2 {
        model = step(model, &mut opt);
        restored = step(restored, &mut restored_opt);
    }
    assert_eq!(head_values(&restored), head_values(&model));
}

#[test]
fn vgg19_forward_matches_the_numpy_reference() {
    // tools/vgg19_reference.py draws the same weights (seed 21) and input (seed 22).
    let def = backbone::find("vgg19").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vgg19.safetensors");
    common::write_vgg_weights_with(&path, def, 21, 0.1);
    let device = Device::flex();
    let vgg = Vgg::init(def, &device).load(def, &path).unwrap();
    let bytes = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/vgg19_reference.safetensors"),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let input = common::f32_tensor(&st, "input");
    let mut rng = common::Rng::new(22);
    let drawn: Vec<f32> = (0..3 * 64 * 64).map(|_| rng.uniform()).collect();
    assert_eq!(input, drawn, "the fixture's input is the tests' stream");
    let x = Tensor::<4>::from_data(TensorData::new(input, [1, 3, 64, 64]), &device);
    let want = common::f32_tensor(&st, "output");
    let n = vgg.num_layers();
    for (way, got) in [
        ("burn", values(vgg.forward_range(x.clone(), 0, n))),
        ("winograd", values(vgg.forward_frozen(x.clone(), n))),
    ] {
        assert_eq!(got.len(), 512 * 2 * 2);
        let rel = common::relative_error(&got, &want);
        assert!(rel < 1e-5, "{way}: relative error {rel}");
    }
    // Cut anywhere: after a convolution, after a pool (odd sizes: the unit tests in winograd.rs).
    for cut in [1, 2, 3, 8, 11, 15, n - 1] {
        let direct = values(vgg.forward_range(x.clone(), 0, cut));
        let fast = values(vgg.forward_frozen(x.clone(), cut));
        assert_eq!(direct.len(), fast.len(), "cut {cut}");
        let rel = common::relative_error(&fast, &direct);
        assert!(rel < 1e-5, "cut {cut}: relative error {rel}");
    }
}
