//! `runner init DATA_DIR`: an experiment file scaffolded from a data folder it inspects (the
//! classes, how many images each split has, their typical size, the loss and head the classes
//! call for), commented, on the best recipe measured on Dogs-vs-Cats
//! (`experiments/recommended/mobilenet_v2_fine_tune.toml`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::data::folder::{SplitListing, scan_split};
use crate::failure::{Failure, bad_input, failed};

/// At most this many images of the training split have their header read for the typical size.
const SIZE_SAMPLE: usize = 64;

/// What the data folder holds.
struct Survey {
    splits: Vec<SplitListing>,
    /// Median width and height of a sample of training images (their headers only).
    median: Option<(u32, u32)>,
}

/// Writes the scaffold for `data` to `out` (default `experiments/<folder name>.toml`); never
/// over an existing file.
pub fn init(data: &Path, out: Option<&Path>) -> Result<(), Failure> {
    let survey = survey(data).map_err(bad_input)?;
    let name = data
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "experiment".into())
        .replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
            "_",
        );
    let out = out.map_or_else(
        || PathBuf::from("experiments").join(format!("{name}.toml")),
        Path::to_path_buf,
    );
    if out.exists() {
        return Err(bad_input(anyhow::anyhow!(
            "{}: already exists; runner init does not overwrite a file (give --out another path)",
            out.display()
        )));
    }
    let text = scaffold(data, &name, &survey);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the folder", dir.display()))
            .map_err(bad_input)?;
    }
    crate::io::write_atomic(&out, |f| std::io::Write::write_all(f, text.as_bytes()))
        .map_err(failed)?;
    let classes = &survey.splits[0].classes;
    println!(
        "{}: {} classes ({}), {} training images. Check it with `runner check {0}`, look at the model with `runner plan {0}`, run it with `runner {0}`.",
        out.display(),
        classes.len(),
        classes.join(", "),
        survey.splits[0].files.len()
    );
    Ok(())
}

/// Lists the splits and reads the headers of a sample of training images.
fn survey(data: &Path) -> anyhow::Result<Survey> {
    if !data.is_dir() {
        anyhow::bail!("{}: not a folder", data.display());
    }
    if !data.join("train").is_dir() && scan_split("train", data).is_ok_and(|l| !l.files.is_empty())
    {
        anyhow::bail!(
            "{}: missing the train/ folder; it holds class folders directly: put them under {0}/train/ and {0}/validation/ (and test/, optional), each with the same class folders",
            data.display()
        );
    }
    let mut problems = Vec::new();
    let (splits, _) = crate::plan::data_folder(data, &mut |why| problems.push(why));
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    let train = &splits[0];
    let step = train.files.len().div_ceil(SIZE_SAMPLE).max(1);
    let mut sizes: Vec<(u32, u32)> = train
        .files
        .iter()
        .step_by(step)
        .filter_map(|(p, _)| image::image_dimensions(p).ok())
        .collect();
    let median = (!sizes.is_empty()).then(|| {
        sizes.sort_by_key(|&(w, h)| u64::from(w) * u64::from(h));
        sizes[sizes.len() / 2]
    });
    Ok(Survey { splits, median })
}

/// The experiment file's text.
fn scaffold(data: &Path, name: &str, s: &Survey) -> String {
    let classes = &s.splits[0].classes;
    let k = classes.len();
    let counts: Vec<String> = s
        .splits
        .iter()
        .map(|l| format!("{} {}", l.files.len(), l.name))
        .collect();
    let size = s.median.map_or(
        "unknown (no training image header could be read)".into(),
        |(w, h)| format!("{w}x{h}"),
    );
    let (units, activation, loss) = if k == 2 {
        (1, "sigmoid", "binary_crossentropy")
    } else {
        (k, "softmax", "categorical_crossentropy")
    };
    let mut t = String::new();
    let _ = writeln!(t, "# Written by `runner init {}`.", data.display());
    let _ = writeln!(t, "# Classes ({k}): {}.", classes.join(", "));
    let _ = writeln!(
        t,
        "# Images: {}. Median training image: {size} pixels.",
        counts.join(", ")
    );
    t += "# The recipe is experiments/recommended/mobilenet_v2_fine_tune.toml (val_acc 0.990, test_acc
# 0.987 on Dogs-vs-Cats): a head trained on cached activations of the frozen base (seconds),
# then the top of the base fine-tuned on augmented images. `runner check FILE` validates it,
# `runner plan FILE` shows the model, `runner FILE` runs it.
";
    let _ = write!(
        t,
        r#"
[experiment]
name = "{name}"
seed = 42

[data]
dir = "{dir}"
image_size = [224, 224]            # MobileNetV2's own size (the median training image is {size})
batch_size = 32

[backbone]
name = "mobilenet_v2"
weights = "imagenet"               # weights/mobilenet_v2_imagenet.safetensors (runner fetch mobilenet_v2/imagenet)
preprocess = "torch"               # what those weights were trained with
trainable_from = "none"
batchnorm = "frozen"               # fine-tuning keeps the ImageNet BatchNorm statistics

[augment]                          # for the fine_tune phase (the head phase has augment = {{}})
rotation_degrees = 20
zoom = 0.15
horizontal_flip = true             # false where left and right differ (text, digits, some scans)
fill = "nearest"

[[head.layers]]
kind = "global_average_pool"
[[head.layers]]
kind = "dropout"
rate = 0.2
[[head.layers]]
kind = "dense"
units = {units}                          # {k} classes
activation = "{activation}"

[optimizer]
kind = "adamw"
lr = 1e-3
weight_decay = 1e-4

[schedule]
kind = "cosine"
warmup_epochs = 1.0
min_lr = 1e-5

[train]
epochs = 10
loss = "{loss}"
monitor = "val_acc"
test_time_augmentation = "horizontal_flip"   # "none" where flips change the class

[[phase]]
name = "head"
epochs = 10
trainable_from = "none"
augment = {{}}                       # no augmentation: trains on cached activations

[[phase]]
name = "fine_tune"
epochs = 10
trainable_from = "features.10"     # the last 8 blocks; "features.14" is cheaper, "all" deeper
optimizer = {{ kind = "adamw", lr = 3e-5, weight_decay = 1e-4 }}
schedule = {{ kind = "cosine", warmup_epochs = 1.0, min_lr = 1e-7 }}
"#,
        dir = data
            .display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\""),
    );
    t
}
