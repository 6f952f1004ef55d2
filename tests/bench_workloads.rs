//! The benchmark's workloads (`runner bench-workload`, compared with PyTorch by bench/compare.py)
//! compute what the training pipeline computes: the same activations at the cutoff, the same
//! losses after the same updates. Small generated images and weights; no asset mirror needed.

mod common;

use std::path::Path;

use burn::prelude::*;
use runner::bench::workloads::{self, Options};

/// A data folder whose training split is exactly the images the workloads pick (the first and
/// last `batch / 2` of the class-sorted listing), used as validation split too.
fn dataset(root: &Path) -> std::path::PathBuf {
    let data = common::make_dataset(root, &["cats", "dogs"], [2, 2, 1], 32);
    // validation = the training images, so the pipeline's validation loss is the bench's.
    std::fs::remove_dir_all(data.join("validation")).unwrap();
    for class in ["cats", "dogs"] {
        let to = data.join("validation").join(class);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(data.join("train").join(class)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
    data
}

/// `common::spec_text` without the head's dropout and with `extra` appended.
fn spec(data: &Path, weights: &Path, extra: &str) -> String {
    let dropout = "[[head.layers]]\nkind = \"dropout\"\nrate = 0.5\n";
    assert!(common::DENSE_HEAD.contains(dropout));
    common::spec_text(data, weights, extra).replace(dropout, "")
}

fn options(experiments: &Path, out: &Path) -> Options {
    Options {
        warmup: 0,
        repeats: 1,
        images: 8,
        sets: Vec::new(),
        experiments: experiments.to_path_buf(),
        out: out.to_path_buf(),
    }
}

#[test]
fn bench_workloads_compute_what_the_training_pipeline_computes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data"));
    let weights = dir.path().join("vgg16.safetensors");
    common::write_vgg_weights(&weights, runner::backbone::find("vgg16").unwrap(), 5);
    let experiments = dir.path().join("experiments");
    std::fs::create_dir_all(&experiments).unwrap();
    let fine_tune_phases = r#"
[[phase]]
name = "head"
epochs = 1
trainable_from = "none"

[[phase]]
name = "fine_tune"
epochs = 2
trainable_from = "block5_conv1"
"#;
    std::fs::write(
        experiments.join("feature_extraction.toml"),
        spec(&data, &weights, ""),
    )
    .unwrap();
    std::fs::write(
        experiments.join("fine_tune.toml"),
        spec(&data, &weights, fine_tune_phases).replace("epochs = 2\nloss", "loss"),
    )
    .unwrap();
    let device = Device::flex().autodiff();
    let opts = options(&experiments, &dir.path().join("out"));

    // 1. vgg16_forward: the output is the pipeline's activations at the cutoff for those images.
    let r = workloads::run("vgg16_forward", &opts, &device).unwrap();
    let output = &r.check.iter().find(|(n, _, _)| n == "output").unwrap().2;
    let plan = common::plan_for(dir.path(), &spec(&data, &weights, ""));
    let plain = device.clone().without_autodiff();
    device.seed(plan.spec.experiment.seed);
    let model = runner::model::TransferModel::build(&plan, &plain).unwrap();
    let listing = plan.split("train").unwrap();
    let (images, _) = runner::data::folder::load_split(
        listing,
        plan.spec.data.image_size,
        plan.spec.data.interpolation,
    );
    let feats =
        runner::train::features::extract(&model, &images, &plan, &plain, "test", None).unwrap();
    // The workload takes the listing's first two and last two, the last ones from the end.
    let values = feats.values().unwrap();
    let per = values.len() / feats.len();
    let rows: Vec<f32> = [0, 1, 3, 2]
        .iter()
        .flat_map(|&i| values[i * per..(i + 1) * per].to_vec())
        .collect();
    assert_eq!(output.len(), rows.len());
    let rel = common::relative_error(output, &rows);
    assert!(
        rel < 1e-6,
        "vgg16_forward vs the pipeline's features: {rel}"
    );
    assert!(
        rows.iter().any(|v| *v != 0.0),
        "the activations are not all zero"
    );

    // 1b. vgg16_layers: every convolution timed, the multiplies of the whole forward.
    let layers = workloads::run("vgg16_layers", &opts, &device).unwrap();
    assert_eq!(layers.items, r.items);
    assert_eq!(layers.seconds.len(), 1);
    assert!(layers.seconds[0] > 0.0);
    assert_eq!(layers.done_gflop_per_item, r.done_gflop_per_item);

    // 2. fine_tune_step: the losses of two one-step epochs are those of a pipeline run of the
    // fine_tune phase alone on the same four images (validation = the same images).
    let r = workloads::run("fine_tune_step", &opts, &device).unwrap();
    let metrics = &r.check.iter().find(|(n, _, _)| n == "metrics").unwrap().2;
    let alone = spec(
        &data,
        &weights,
        "steps_per_epoch = 1\n[[phase]]\nname = \"fine_tune\"\nepochs = 2\ntrainable_from = \"block5_conv1\"\n",
    )
    .replace("epochs = 2\nloss", "loss");
    let plan = common::plan_for(dir.path(), &alone);
    device.seed(plan.spec.experiment.seed);
    let outcome = common::train(&plan, &device, &dir.path().join("results"));
    let history = &outcome.progress.history;
    assert_eq!(history.len(), 2);
    let want: Vec<f32> = history
        .iter()
        .flat_map(|m| [m.train_loss as f32, m.val_loss as f32])
        .collect();
    let rel = common::relative_error(metrics, &want);
    assert!(
        rel < 1e-5,
        "fine_tune_step {metrics:?} vs the pipeline {want:?}: {rel}"
    );
    assert_ne!(
        want[1], want[3],
        "the second update changed the validation loss"
    );
}
