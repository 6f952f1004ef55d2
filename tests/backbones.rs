//! ResNet50 and the weight formats: parameter counts, forward passes against torchvision, and
//! PyTorch `.pth` / Keras `.h5` files written by the real tools (tools/weights_fixtures.py)
//! loaded tensor by tensor, with their error paths.

mod common;

use std::collections::HashMap;

use burn::prelude::*;
use runner::backbone::mobilenet::MobileNetV2;
use runner::backbone::resnet::ResNet50;
use runner::backbone::vgg::Vgg;
use runner::backbone::{self, Cutoff, weights};
use runner::model::Backbone;

fn def(name: &str) -> &'static backbone::BackboneDef {
    backbone::find(name).unwrap()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Every tensor of a safetensors buffer, by name.
fn tensors(bytes: &[u8]) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.names()
        .into_iter()
        .map(|n| {
            let t = st.tensor(n).unwrap();
            (
                n.to_string(),
                (t.shape().to_vec(), common::f32_tensor(&st, n)),
            )
        })
        .collect()
}

#[test]
fn every_backbone_has_its_reference_parameter_count() {
    // Parameters only: BatchNorm running statistics are buffers, not parameters.
    let device = Device::flex();
    assert_eq!(def("vgg16").num_params(), 14_714_688);
    assert_eq!(def("vgg19").num_params(), 20_024_384);
    assert_eq!(def("mobilenet_v2").num_params(), 2_223_872);
    assert_eq!(def("resnet50").num_params(), 23_508_032);
    // The modules agree with the declared layers.
    assert_eq!(ResNet50::init(1000, &device).feature_params(), 23_508_032);
    assert_eq!(ResNet50::init(0, &device).feature_params(), 23_508_032);
    assert_eq!(MobileNetV2::init(0, &device).feature_params(), 2_223_872);
    let vgg19 = Vgg::init(def("vgg19"), &device);
    assert_eq!(vgg19.num_params(), 20_024_384);
    // And torchvision's own state dict, counted from its recorded keys.
    for (model, want) in [("resnet50", 23_508_032), ("mobilenet_v2", 2_223_872)] {
        let top = if model == "resnet50" {
            "fc."
        } else {
            "classifier."
        };
        let counted: usize = common::torchvision_keys(model)
            .iter()
            .filter(|(k, _)| {
                !k.starts_with(top)
                    && !k.contains("running_")
                    && !k.ends_with("num_batches_tracked")
            })
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(counted, want, "{model}");
    }
}

#[test]
fn resnet50_layers_shapes_and_cutoffs_follow_torchvision() {
    let r = def("resnet50");
    let names: Vec<String> = r.layers().into_iter().map(|l| l.name).collect();
    assert_eq!(names.len(), 17);
    assert_eq!(names[0], "conv1");
    assert_eq!(names[1], "layer1.0");
    assert_eq!(names[16], "layer4.2");
    assert_eq!(r.shape_at(17, [224, 224]), [2048, 7, 7]);
    assert_eq!(r.shape_at(17, [150, 150]), [2048, 5, 5]);
    assert_eq!(r.shape_at(1, [150, 150]), [64, 38, 38]);
    // A stage name is its first block.
    assert_eq!(Cutoff::resolve(r, "layer4").unwrap().index, 14);
    assert_eq!(Cutoff::resolve(r, "layer4.0").unwrap().index, 14);
    assert_eq!(Cutoff::resolve(r, "layer3.5").unwrap().index, 13);
    let e = Cutoff::resolve(r, "layer5.0").unwrap_err();
    assert!(e.to_string().contains("not a layer of resnet50"), "{e}");
    assert_eq!(e.backbone, "resnet50");
    assert!(
        e.nearest.iter().any(|n| n == "layer4.0" || n == "layer1.0"),
        "{e}"
    );
    let e = Cutoff::resolve(r, "block5_conv1").unwrap_err();
    assert_eq!(e.nearest.len(), 3, "{e}");
    assert!(
        e.nearest.iter().any(|n| n.starts_with("layer"))
            && !e.nearest.iter().any(|n| n.contains("block")),
        "ResNet50's own names: {e}"
    );
    assert!(
        e.to_string().contains(&format!("\"{}\"", e.nearest[0])),
        "{e}"
    );
}

/// Loads `model` from torchvision-named SplitMix weights and compares its feature map with
/// torchvision's on the fixture's input (tools/weights_fixtures.py, seeds 31 and 32).
fn matches_torchvision(model: &str, features: impl Fn(&std::path::Path, Tensor<4>) -> Tensor<4>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{model}.safetensors"));
    common::write_torchvision_weights(&path, &common::torchvision_keys(model), 31);
    let bytes = std::fs::read(common::fixture(&format!("{model}_reference.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let input = common::f32_tensor(&st, "input");
    let mut rng = common::Rng::new(32);
    let drawn: Vec<f32> = (0..2 * 3 * 64 * 64).map(|_| rng.uniform()).collect();
    assert_eq!(input, drawn, "the fixture's input is the tests' stream");
    let x = Tensor::<4>::from_data(TensorData::new(input, [2, 3, 64, 64]), &Device::flex());
    let got = values(features(&path, x));
    let want = common::f32_tensor(&st, "output");
    let rel = common::relative_error(&got, &want);
    assert!(rel < 1e-4, "{model}: relative error {rel}");
}

#[test]
fn resnet50_forward_matches_torchvision() {
    matches_torchvision("resnet50", |path, x| {
        let m = ResNet50::init(1000, &Device::flex());
        let map = m.key_map();
        let m = weights::load(m, &map, path, "resnet50").unwrap();
        m.features(x)
    });
}

#[test]
fn mobilenet_v2_forward_matches_torchvision() {
    matches_torchvision("mobilenet_v2", |path, x| {
        MobileNetV2::init(1000, &Device::flex())
            .load(path)
            .unwrap()
            .features(x)
    });
}

/// A loaded base exported under torchvision's names holds, for every key, the pattern value of
/// that key's position in torchvision's state dict: every tensor landed in its own place, in
/// its own layout.
fn assert_pattern(exported: &HashMap<String, (Vec<usize>, Vec<f32>)>, model: &str, skip: &str) {
    let keys = common::torchvision_keys(model);
    let mut checked = 0;
    for (k, (name, shape)) in keys.iter().enumerate() {
        if name.ends_with("num_batches_tracked") || name.starts_with(skip) {
            continue;
        }
        let (got_shape, got) = exported
            .get(name)
            .unwrap_or_else(|| panic!("{name} not exported"));
        assert_eq!(got_shape, shape, "{name}");
        for (j, v) in got.iter().enumerate() {
            let want = common::pattern(k, j);
            assert!((v - want).abs() < 1e-4, "{name}[{j}] = {v}, want {want}");
        }
        checked += 1;
    }
    assert!(checked > 50, "{checked}");
}

#[test]
fn a_safetensors_file_whose_header_length_starts_like_a_pickle_is_safetensors() {
    // The first byte of a safetensors file is the low byte of its header's length; 0x80 is also
    // a legacy pickle's first byte. One export in 256 was refused as "not a PyTorch checkpoint".
    let dir = tempfile::tempdir().unwrap();
    let values = [1.0f32, 2.0, 3.0];
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &bytes).unwrap();
    for pad in 0..300 {
        let meta = std::collections::HashMap::from([("pad".to_string(), "x".repeat(pad))]);
        let file = safetensors::serialize([("t", view.clone())], Some(meta)).unwrap();
        if file[0] != 0x80 {
            continue;
        }
        let path = dir.path().join("w.safetensors");
        std::fs::write(&path, &file).unwrap();
        assert_eq!(
            weights::Format::detect(&path).unwrap(),
            weights::Format::Safetensors
        );
        return;
    }
    panic!("no padding gave a header length ending in 0x80");
}

#[test]
fn a_torchvision_pth_loads_every_tensor_in_place() {
    let path = common::fixture("resnet50_torchvision.pth");
    assert_eq!(
        weights::Format::detect(&path).unwrap(),
        weights::Format::PyTorch
    );
    let device = Device::flex();
    // With its classifier: fc.weight is transposed into burn's layout and back.
    let m = ResNet50::init(1000, &device);
    let map = m.key_map();
    let m = weights::load(m, &map, &path, "resnet50").unwrap();
    let bytes = weights::to_safetensors(&m, "", &map, true, &[]).unwrap();
    assert_pattern(&tensors(&bytes), "resnet50", "-");
    // As a backbone: the classifier in the file is ignored.
    let b = Backbone::init(def("resnet50"), &device)
        .load(def("resnet50"), &path)
        .unwrap();
    let bytes = b.to_published_safetensors(def("resnet50")).unwrap();
    let exported = tensors(&bytes);
    assert!(!exported.contains_key("fc.weight"));
    assert_pattern(&exported, "resnet50", "fc.");
}

#[test]
fn a_torchvision_vgg16_pth_loads_under_keras_names() {
    let path = common::fixture("vgg16_torchvision.pth");
    let vgg16 = def("vgg16");
    let b = Backbone::init(vgg16, &Device::flex())
        .load(vgg16, &path)
        .unwrap();
    let exported = tensors(&b.to_published_safetensors(vgg16).unwrap());
    // torchvision's features.{0,2,5,...}: conv c is key 2c (weight) and 2c + 1 (bias).
    let convs: Vec<String> = vgg16
        .expected_tensors()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for (k, name) in convs.iter().enumerate() {
        let (_, got) = &exported[name];
        for (j, v) in got.iter().enumerate().step_by(7) {
            assert!(
                (v - common::pattern(k, j)).abs() < 1e-4,
                "{name}[{j}] = {v}"
            );
        }
    }
    // Its weights expect torch preprocessing: the plan picks it unless the spec says otherwise.
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), &["cats", "dogs"], [1, 1, 1], 32);
    let plan = common::plan_for(
        dir.path(),
        &common::spec_text(&data, &path, "").replace("preprocess = \"caffe\"\n", ""),
    );
    assert_eq!(plan.preprocess, runner::spec::Preprocess::Torch);
}

/// Checks a Keras VGG file: conv `c` holds `pattern(c, j)` at HWIO flat index `j`, so element
/// `(o, i, h, w)` of the OIHW weight is `pattern(c, ((h * 3 + w) * I + i) * O + o)`; the bias
/// is `-pattern(c, o)`.
fn assert_keras_vgg(name: &str, file: &str) {
    let d = def(name);
    let path = common::fixture(file);
    assert_eq!(
        weights::Format::detect(&path).unwrap(),
        weights::Format::KerasH5
    );
    let vgg = Vgg::init(d, &Device::flex()).load(d, &path).unwrap();
    for (c, conv) in vgg.convs.iter().enumerate() {
        let [o_n, i_n, _, _] = conv.weight.dims();
        let w = values(conv.weight.val());
        for o in (0..o_n).step_by(5) {
            for i in (0..i_n).step_by(3) {
                for h in 0..3 {
                    for x in 0..3 {
                        let got = w[((o * i_n + i) * 3 + h) * 3 + x];
                        let want = common::pattern(c, ((h * 3 + x) * i_n + i) * o_n + o);
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{name} conv {c} ({o},{i},{h},{x}): {got} != {want}"
                        );
                    }
                }
            }
        }
        let b = values(conv.bias.as_ref().unwrap().val());
        for (o, v) in b.iter().enumerate() {
            assert!((v + common::pattern(c, o)).abs() < 1e-4);
        }
    }
}

#[test]
fn a_keras3_weights_h5_loads_with_kernels_transposed() {
    assert_keras_vgg("vgg16", "vgg16_keras3.weights.h5");
}

#[test]
fn a_keras2_notop_h5_loads_with_kernels_transposed() {
    assert_keras_vgg("vgg19", "vgg19_keras2_notop.h5");
}

#[test]
fn weight_files_that_do_not_fit_name_the_file_and_the_tensor() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let load_resnet = |path: &std::path::Path| {
        Backbone::init(def("resnet50"), &device)
            .load(def("resnet50"), path)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // A Keras file for a family whose Keras layout differs.
    let h5 = common::fixture("vgg16_keras3.weights.h5");
    let e = load_resnet(&h5);
    assert!(
        e.starts_with(&format!("{}: cannot read weights", h5.display())),
        "{e}"
    );
    assert!(
        e.contains("Keras HDF5") && e.contains(".pth or .safetensors"),
        "{e}"
    );
    // VGG16's .pth as ResNet50: every ResNet tensor missing, VGG's unexpected, under the
    // file's names.
    let pth = common::fixture("vgg16_torchvision.pth");
    let e = load_resnet(&pth);
    assert!(e.contains("the weights do not fit resnet50"), "{e}");
    assert!(e.contains("missing tensor layer4.2.bn3.running_var"), "{e}");
    assert!(e.contains("unexpected tensor features.0.weight"), "{e}");
    // One wrong shape and one missing tensor in a torchvision-named file.
    let mut keys = common::torchvision_keys("resnet50");
    keys.retain(|(k, _)| k != "layer2.1.bn2.weight");
    for (k, s) in keys.iter_mut() {
        if k == "layer1.0.conv1.weight" {
            *s = vec![64, 64, 3, 3];
        }
    }
    let bad = dir.path().join("bad.safetensors");
    common::write_torchvision_weights(&bad, &keys, 1);
    let e = load_resnet(&bad);
    assert!(
        e.starts_with(&format!(
            "{}: the weights do not fit resnet50",
            bad.display()
        )),
        "{e}"
    );
    assert!(
        e.contains(
            "tensor layer1.0.conv1.weight has shape [64, 64, 3, 3], expected [64, 64, 1, 1]"
        ),
        "{e}"
    );
    assert!(
        e.contains("missing tensor layer2.1.bn2.gamma")
            || e.contains("missing tensor layer2.1.bn2.weight"),
        "{e}"
    );
    // A truncated .pth and a file of no known format.
    let cut = dir.path().join("cut.pth");
    let full = std::fs::read(&pth).unwrap();
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let e = Backbone::init(def("vgg16"), &device)
        .load(def("vgg16"), &cut)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "{}: cannot read weights: PyTorch file",
            cut.display()
        )),
        "{e}"
    );
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"GIF89a not weights").unwrap();
    let e = load_resnet(&junk);
    assert!(
        e.contains("not a safetensors, PyTorch (.pth) or Keras HDF5 (.h5) weights file"),
        "{e}"
    );
}

#[test]
fn resnet50_trains_above_its_cutoff_with_frozen_batchnorm_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), &["cats", "dogs"], [4, 2, 2], 32);
    let weights = dir.path().join("resnet50.safetensors");
    common::write_torchvision_weights(&weights, &common::torchvision_keys("resnet50"), 5);
    let text = common::spec_text(&data, &weights, "")
        .replace(
            "name = \"vgg16\"",
            "name = \"resnet50\"\nbatchnorm = \"frozen\"",
        )
        .replace("preprocess = \"caffe\"", "preprocess = \"torch\"")
        .replace("trainable_from = \"none\"", "trainable_from = \"layer4\"");
    let plan = common::plan_for(dir.path(), &text);
    assert_eq!(plan.base_output, [2048, 1, 1]);
    assert_eq!(plan.cutoff.index, 14);
    let device = Device::flex().autodiff();
    let before = runner::model::TransferModel::build(&plan, &device).unwrap();
    let stats = |b: &Backbone| match b {
        Backbone::ResNet50(r) => r.batchnorm_stats(),
        _ => unreachable!(),
    };
    let published = |b: &Backbone| tensors(&b.to_published_safetensors(def("resnet50")).unwrap());
    let (stats0, w0) = (stats(&before.backbone), published(&before.backbone));
    let outcome = common::train(&plan, &device, &dir.path().join("results"));
    let after = outcome.model;
    assert_eq!(
        stats(&after.backbone),
        stats0,
        "frozen BatchNorm statistics never move"
    );
    let w1 = published(&after.backbone);
    for (name, (_, v)) in &w0 {
        let changed = w1[name].1 != *v;
        let trainable = name.starts_with("layer4.") && !name.contains("running_");
        assert_eq!(changed, trainable, "{name}: changed {changed}");
    }
}

#[test]
fn a_keras_file_declaring_a_tensor_of_terabytes_is_refused_before_reading() {
    // What the weight fuzzer found: hdf5-pure allocates a dataset's declared size (here
    // 65536 x 65536 x 3 x 64 f32, 3 TB, in a file of a few KB) and the process aborted.
    let path = common::fixture("h5_declares_terabytes.h5");
    let e = weights::keras_h5_to_safetensors(&path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("block1_conv1")
            && e.contains("more than the 268435456 values a weight may have"),
        "{e}"
    );
}
