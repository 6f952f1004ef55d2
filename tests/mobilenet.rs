//! MobileNetV2 from the mirror's torchvision weights: parameter count, and a real check that its
//! ImageNet classifier puts real cat photos in a cat class and dog photos in a dog class.

mod common;

use burn::prelude::*;
use runner::backbone::mobilenet::MobileNetV2;
use runner::spec::Preprocess;

#[test]
fn mobilenet_v2_features_have_torchvisions_parameter_count() {
    let m = MobileNetV2::init(1000, &Device::flex());
    // Convolutions and BatchNorm scale/shift; running statistics are not parameters.
    assert_eq!(m.feature_params(), 2_223_872);
}

/// torchvision's eval transform: resize the short side to 256, centre-crop 224.
fn load(path: &std::path::Path) -> Vec<u8> {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let s = 256.0 / w.min(h) as f32;
    let (nw, nh) = ((w as f32 * s).round() as u32, (h as f32 * s).round() as u32);
    let r = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
    image::imageops::crop_imm(&r, (nw - 224) / 2, (nh - 224) / 2, 224, 224)
        .to_image()
        .into_raw()
}

#[test]
fn its_imagenet_classifier_recognises_real_cats_and_dogs() {
    let Some(mirror) = common::mirror() else {
        eprintln!("skipped: no asset mirror (set RUNNER_ASSETS) for the MobileNetV2 weights");
        return;
    };
    let device = Device::flex();
    let m = MobileNetV2::init(1000, &device)
        .load(&mirror.join("weights/mobilenet_v2_imagenet.safetensors"))
        .unwrap();
    let test = mirror.join("data/cats_and_dogs_small/test");
    let mut counts = Vec::new();
    for (class, range) in [("cats", 281..=285usize), ("dogs", 151..=268usize)] {
        let files: Vec<_> = (0..50)
            .map(|i| {
                test.join(class)
                    .join(format!("{}.{}.jpg", &class[..3], 1500 + i))
            })
            .collect();
        let mut hits = 0;
        for chunk in files.chunks(10) {
            let mut buf = vec![0f32; chunk.len() * 3 * 224 * 224];
            for (out, f) in buf.chunks_exact_mut(3 * 224 * 224).zip(chunk) {
                runner::data::preprocess_into(&load(f), 224 * 224, Preprocess::Torch, out);
            }
            let x =
                Tensor::<4>::from_data(TensorData::new(buf, [chunk.len(), 3, 224, 224]), &device);
            let top: Vec<i64> = m.logits(x).argmax(1).into_data().iter::<i64>().collect();
            hits += top
                .iter()
                .filter(|&&c| range.contains(&(c as usize)))
                .count();
        }
        eprintln!("{class}: {hits} of 50 in ImageNet classes {range:?}");
        counts.push(hits);
    }
    assert!(counts[0] > 25 && counts[1] > 25, "{counts:?}");
}

/// A tiny generated dataset and a spec fine-tuning the mirror's MobileNetV2 from features.17:
/// the folder, the weights file and the spec text.
fn tiny_mobilenet(mirror: &std::path::Path) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), &["cats", "dogs"], [4, 2, 2], 64);
    let weights = mirror.join("weights/mobilenet_v2_imagenet.safetensors");
    let text = common::spec_text(&data, &weights, "")
        .replace("name = \"vgg16\"", "name = \"mobilenet_v2\"")
        .replace("preprocess = \"caffe\"", "preprocess = \"torch\"")
        .replace("image_size = [32, 32]", "image_size = [64, 64]")
        .replace(
            "trainable_from = \"none\"",
            "trainable_from = \"features.17\"",
        );
    (dir, weights, text)
}

#[test]
fn mobilenet_v2_is_a_backbone_of_the_spec_and_fine_tunes_only_above_its_cutoff() {
    let Some(mirror) = common::mirror() else {
        eprintln!("skipped: no asset mirror (set RUNNER_ASSETS) for the MobileNetV2 weights");
        return;
    };
    let (dir, _, text) = tiny_mobilenet(&mirror);
    let plan = common::plan_for(dir.path(), &text);
    assert_eq!(plan.backbone.num_params(), 2_223_872);
    assert_eq!(plan.base_output, [1280, 2, 2]);
    assert_eq!(plan.cutoff.index, 17);
    let summary = runner::report::summary(&plan);
    assert!(
        summary.contains("preprocess torch (its weights' own: torch)")
            && summary.contains("at least 32x32 for mobilenet_v2")
            && summary.contains("Layer names (cutoffs): features.0 ... features.18"),
        "{summary}"
    );
    assert!(
        summary.contains("features.17 (InvertedResidual)"),
        "{summary}"
    );
    assert!(
        summary.contains("features.16.*") && !summary.contains("features.17.*"),
        "{summary}"
    );
    let e = runner::backbone::Cutoff::resolve(plan.backbone, "features.19")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a layer of mobilenet_v2") && e.contains("features.1"),
        "{e}"
    );

    let device = Device::flex().autodiff();
    let before = runner::model::TransferModel::build(&plan, &device).unwrap();
    let outcome = common::train(&plan, &device, &dir.path().join("results"));
    assert_eq!(outcome.progress.history.len(), 2);
    assert!(outcome.test.is_some());
    // Layers 0-16 frozen (their digest is unchanged), 17-18 trained.
    let after = outcome.model;
    assert_eq!(
        before.backbone.digest_before(17),
        after.backbone.digest_before(17)
    );
    assert_ne!(
        before.backbone.digest_before(19),
        after.backbone.digest_before(19)
    );
}

#[test]
fn batchnorm_above_the_cutoff_updates_its_statistics_unless_frozen() {
    let Some(mirror) = common::mirror() else {
        eprintln!("skipped: no asset mirror (set RUNNER_ASSETS) for the MobileNetV2 weights");
        return;
    };
    let (dir, _, text) = tiny_mobilenet(&mirror);
    let stats = |m: &runner::model::TransferModel| match &m.backbone {
        runner::model::Backbone::MobileNetV2(n) => n.batchnorm_stats(),
        _ => unreachable!(),
    };
    for (mode, moves) in [("train", true), ("frozen", false)] {
        let plan = common::plan_for(
            dir.path(),
            &text.replace(
                "trainable_from = \"features.17\"",
                &format!("trainable_from = \"features.17\"\nbatchnorm = \"{mode}\""),
            ),
        );
        let device = Device::flex().autodiff();
        let before = stats(&runner::model::TransferModel::build(&plan, &device).unwrap());
        let after = stats(&common::train(&plan, &device, &dir.path().join(mode)).model);
        assert_eq!(before.len(), after.len());
        // The statistics of the layers below the cutoff never move; the last layer's move only
        // when BatchNorm trains.
        // mean and variance per channel: features.18 (1280) and features.17 (960 + 960 + 320).
        let tail = 2 * 1280;
        let n = before.len();
        let below = n - tail - 2 * (960 + 960 + 320);
        assert_eq!(before[..below], after[..below]);
        assert_eq!(before[n - tail..] != after[n - tail..], moves, "{mode}");
    }
}

#[test]
fn a_saved_mobilenet_model_exports_torchvision_names_and_reloads_as_backbone_weights() {
    let Some(mirror) = common::mirror() else {
        eprintln!("skipped: no asset mirror (set RUNNER_ASSETS) for the MobileNetV2 weights");
        return;
    };
    let (dir, weights, text) = tiny_mobilenet(&mirror);
    let plan = common::plan_for(dir.path(), &text);
    let device = Device::flex().autodiff();
    let results = dir.path().join("results");
    let trained = common::train(&plan, &device, &results).model;
    let saved = runner::predict::save(&results, "test", &plan, (&trained, false)).unwrap();
    assert!(
        !saved.join("model.safetensors").exists(),
        "written on demand only"
    );
    // What `runner export test --format safetensors` writes: the saved model, loaded back.
    let (card, model) = runner::predict::load(
        &results,
        "test",
        runner::predict::Which::Final,
        &Device::flex(),
        &runner::assets::Locations::new(None),
    )
    .unwrap();
    let file = saved.join("model.safetensors");
    runner::predict::write_safetensors(&file, &model, &card).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    for want in [
        "features.0.0.weight",
        "features.0.1.weight",
        "features.17.conv.3.running_var",
        "features.18.1.bias",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    // The export is a valid weights file for another experiment: the same base, bit for bit.
    let again = common::plan_for(
        dir.path(),
        &text.replace(weights.to_str().unwrap(), file.to_str().unwrap()),
    );
    let reloaded = runner::model::TransferModel::build(&again, &device).unwrap();
    assert_eq!(
        reloaded.backbone.digest_before(19),
        trained.backbone.digest_before(19)
    );
}
