//! Test helpers: small generated images, random VGG weight files, spec files. No network, no
//! asset mirror.
#![allow(dead_code)]

pub mod cli;

use std::path::{Path, PathBuf};

use runner::backbone::BackboneDef;

/// A deterministic pseudo-random stream (SplitMix64), for pixels and weights.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Writes a PNG whose colour depends on the class: class 0 reddish, class 1 bluish, class 2
/// greenish, with noise, so that even random conv features separate them.
pub fn write_image(path: &Path, class: usize, size: u32, rng: &mut Rng) {
    let mut img = image::RgbImage::new(size, size);
    for p in img.pixels_mut() {
        let noise = |r: &mut Rng| (r.uniform() * 40.0) as i32;
        let mut c = [90i32, 90, 90];
        c[class % 3] = 200;
        *p = image::Rgb([
            (c[0] + noise(rng)).clamp(0, 255) as u8,
            (c[1] + noise(rng)).clamp(0, 255) as u8,
            (c[2] + noise(rng)).clamp(0, 255) as u8,
        ]);
    }
    img.save(path).expect("write test image");
}

/// A dataset folder with `train/`, `validation/`, `test/`, each with `classes` folders of `n`
/// images of `size` pixels.
pub fn make_dataset(root: &Path, classes: &[&str], n: [usize; 3], size: u32) -> PathBuf {
    let mut rng = Rng::new(7);
    for (split, count) in ["train", "validation", "test"].iter().zip(n) {
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..count {
                write_image(&dir.join(format!("{class}.{i}.png")), label, size, &mut rng);
            }
        }
    }
    root.to_path_buf()
}

/// Writes a VGG weight file in Keras naming with He-scaled random values (biases zero).
pub fn write_vgg_weights(path: &Path, def: &BackboneDef, seed: u64) {
    write_vgg_weights_with(path, def, seed, 0.0);
}

/// Like [`write_vgg_weights`] with biases drawn from `[-bias, bias)`; the stream is the one
/// tools/vgg19_reference.py reimplements (per conv: the kernel, then the bias).
pub fn write_vgg_weights_with(path: &Path, def: &BackboneDef, seed: u64, bias: f32) {
    let mut rng = Rng::new(seed);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = def
        .expected_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if shape.len() == 4 {
                let fan_in = (shape[1] * 9) as f32;
                let a = (6.0 / fan_in).sqrt();
                (0..n).map(|_| rng.uniform() * a).collect()
            } else if bias != 0.0 {
                (0..n).map(|_| rng.uniform() * bias).collect()
            } else {
                vec![0.0; n]
            };
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, shape, bytes)
        })
        .collect();
    write_safetensors(path, &tensors);
}

/// Writes raw f32 tensors `(name, shape, little-endian bytes)` as a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// The head of the notebook's first experiment, as TOML.
pub const DENSE_HEAD: &str = r#"
[[head.layers]]
kind = "flatten"
[[head.layers]]
kind = "dense"
units = 16
activation = "relu"
[[head.layers]]
kind = "dropout"
rate = 0.5
[[head.layers]]
kind = "dense"
units = 1
activation = "sigmoid"
"#;

/// A complete small spec: `data` and `weights` paths, 32x32 images, the dense head.
pub fn spec_text(data: &Path, weights: &Path, extra: &str) -> String {
    format!(
        r#"
[experiment]
name = "tiny"
seed = 3

[data]
dir = "{}"
image_size = [32, 32]
batch_size = 4

[backbone]
name = "vgg16"
weights = "{}"
preprocess = "caffe"
trainable_from = "none"
{DENSE_HEAD}
[optimizer]
kind = "rmsprop"
lr = 1e-3

[train]
epochs = 2
loss = "binary_crossentropy"
{extra}"#,
        data.display(),
        weights.display()
    )
}

/// Writes `text` as `<dir>/exp.toml`, loads and plans it (no mirror).
pub fn plan_for(dir: &Path, text: &str) -> runner::plan::Plan {
    let p = dir.join("exp.toml");
    std::fs::write(&p, text).unwrap();
    let loaded = runner::spec::load::load(&p, &[]).unwrap();
    runner::plan::build(&loaded, &runner::assets::Locations { mirror: None }).unwrap()
}

/// The asset mirror, when this machine has one (`$RUNNER_ASSETS`, else `../shared/assets`).
pub fn mirror() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("RUNNER_ASSETS").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/assets")),
    ];
    // Absolute: the tests run the binary from other folders, and a relative
    // RUNNER_ASSETS=../shared/assets (the README's) means the folder it was set in.
    let found = candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("weights").is_dir())
        .map(|p| std::path::absolute(&p).unwrap_or(p));
    if found.is_none() && std::env::var_os("RUNNER_REQUIRE_ASSETS").is_some_and(|v| v == "1") {
        panic!(
            "RUNNER_REQUIRE_ASSETS=1 but no asset mirror: neither $RUNNER_ASSETS nor ../shared/assets has weights/"
        );
    }
    found
}

/// The values of a little-endian f32 tensor in a safetensors file.
pub fn f32_tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Trains `plan` in-process with checkpoints under `results` and no feature cache on disk.
#[allow(dead_code)]
pub fn train(
    plan: &runner::plan::Plan,
    device: &burn::prelude::Device,
    results: &Path,
) -> runner::train::Outcome {
    runner::train::run(plan, device, run_options(plan, results, None, None), |_| {}).unwrap()
}

/// The options of an in-process run `test` of `plan`: checkpoints under `results`, no feature
/// cache on disk, optionally resumed from a checkpoint or stopped by a flag.
#[allow(dead_code)]
pub fn run_options(
    plan: &runner::plan::Plan,
    results: &Path,
    resume: Option<runner::train::Checkpoint>,
    interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> runner::train::RunOptions {
    runner::train::RunOptions {
        run_id: "test".into(),
        results: results.to_path_buf(),
        origin: runner::train::Origin {
            file: plan.file.clone(),
            sets: Vec::new(),
            point: Vec::new(),
            config: String::new(),
            config_hash: plan.config_hash.clone(),
            started_at: String::new(),
            classes: plan.classes.clone(),
        },
        cache: runner::train::FeatureCache::new(None),
        resume,
        interrupt,
    }
}

/// `|got - want| / |want|` in the L2 norm.
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "tensor sizes differ");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum();
    (num / den).sqrt()
}

/// A file of tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// torchvision's state-dict keys and shapes of `model` (`resnet50`, `mobilenet_v2`, `vgg16`), in
/// order, as tools/weights_fixtures.py recorded them from torchvision.
pub fn torchvision_keys(model: &str) -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(fixture("torchvision_keys.json")).unwrap();
    let all: std::collections::HashMap<String, Vec<(String, Vec<usize>)>> =
        serde_json::from_str(&text).unwrap();
    all[model].clone()
}

/// Writes torchvision-named weights drawn from the SplitMix stream exactly as
/// tools/weights_fixtures.py `splitmix_state` does: per float tensor in state-dict order, He
/// uniform kernels, BatchNorm scale `1 + 0.1u`, biases and running means `0.1u`, running
/// variances `1 + 0.5u`. `num_batches_tracked` (an integer) is left out, as safetensors exports
/// often do.
pub fn write_torchvision_weights(path: &Path, keys: &[(String, Vec<usize>)], seed: u64) {
    let mut rng = Rng::new(seed);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = keys
        .iter()
        .filter(|(name, _)| !name.ends_with("num_batches_tracked"))
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let u: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
            let values: Vec<f32> = if name.ends_with("running_var") {
                u.iter().map(|u| 1.0 + 0.5 * u).collect()
            } else if name.ends_with("running_mean") || name.ends_with("bias") {
                u.iter().map(|u| 0.1 * u).collect()
            } else if shape.len() == 1 {
                u.iter().map(|u| 1.0 + 0.1 * u).collect()
            } else {
                let fan_in: usize = shape[1..].iter().product();
                let a = (6.0 / fan_in as f32).sqrt();
                u.iter().map(|u| u * a).collect()
            };
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    write_safetensors(path, &tensors);
}

/// The fixtures' pattern value of element `j` of the tensor at position `k`:
/// `k + (j % 97) / 1000` (tools/weights_fixtures.py).
pub fn pattern(k: usize, j: usize) -> f32 {
    (k as f64 + (j % 97) as f64 / 1000.0) as f32
}

/// The experiment files this repository ships: `experiments/*.toml` and one folder down
/// (`experiments/notebook/`), sorted.
#[allow(dead_code)]
pub fn shipped_experiments() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            out.push(p);
        }
    }
    out.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    out.sort();
    out
}

/// The notebook's chain of cells as `[[phase]]` tables: `dense` epochs of the dense head over the
/// frozen base, then `conv` epochs of a fresh conv head (`[[phase.head.layers]]`) on the same
/// base, trainable from block5_conv3.
#[allow(dead_code)]
pub fn new_head_phases(dense: usize, conv: usize) -> String {
    format!(
        r#"
[[phase]]
name = "dense"
epochs = {dense}

[[phase]]
name = "conv"
epochs = {conv}
trainable_from = "block5_conv3"

[[phase.head.layers]]
kind = "conv2d"
filters = 4
kernel = 1
activation = "relu"
[[phase.head.layers]]
kind = "flatten"
[[phase.head.layers]]
kind = "dense"
units = 1
activation = "sigmoid"
"#
    )
}
