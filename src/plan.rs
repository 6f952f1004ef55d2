//! Spec -> Plan: every value checked, every path resolved, every problem collected (each with its
//! file and key path) before anything runs.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::assets::Locations;
use crate::backbone::{self, BackboneDef, Cutoff};
use crate::data::folder::{self, SplitListing};
use crate::head::{self, Shape};
use crate::spec::load::{Loaded, Problem, Problems};
use crate::spec::{
    Activation, AdamSpec, AugmentSpec, Conv2dSpec, CosineScheduleSpec, DenseSpec, DropoutSpec,
    EarlyStoppingSpec, ExponentialScheduleSpec, LayerSpec, Loss, MaxPool2dSpec, NoSettings,
    OptimizerSpec, PlateauScheduleSpec, Preprocess, RmspropSpec, ScheduleSpec, SgdSpec, Spec,
    StepScheduleSpec,
};

/// The split names, in the order they are used; `test` is optional.
pub const SPLITS: [&str; 3] = ["train", "validation", "test"];

/// A validated, resolved experiment.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The spec as resolved from all layers.
    pub spec: Spec,
    /// The experiment file.
    pub file: PathBuf,
    /// The backbone architecture.
    pub backbone: &'static BackboneDef,
    /// The weights file to load.
    pub weights: PathBuf,
    /// Input preprocessing (the spec's, or the backbone's default).
    pub preprocess: Preprocess,
    /// First trainable backbone layer.
    pub cutoff: Cutoff,
    /// The resolved data folder.
    pub data_dir: PathBuf,
    /// `train`, `validation` and, when present, `test`.
    pub splits: Vec<SplitListing>,
    /// Class names (sorted folder names).
    pub classes: Vec<String>,
    /// Output shape of the backbone.
    pub base_output: [usize; 3],
    /// Output shape and parameter count of each head layer.
    pub head_shapes: Vec<(Shape, usize)>,
    /// Hash of the resolved spec.
    pub config_hash: String,
    /// The training phases, in order (one, named `train`, without `[[phase]]`).
    pub phases: Vec<PhasePlan>,
    /// The `[sweep]` point, e.g. `optimizer.lr = 1e-5, backbone.trainable_from = "none"`.
    pub sweep_point: Option<String>,
    /// The same point, key by key (empty outside a grid).
    pub sweep_values: Vec<(String, toml::Value)>,
}

/// One resolved training phase: every setting filled in from the experiment's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct PhasePlan {
    /// Name, stored on the phase's result rows.
    pub name: String,
    /// Epochs.
    pub epochs: usize,
    /// First trainable backbone layer.
    pub cutoff: Cutoff,
    /// A fresh optimizer for the phase.
    pub optimizer: OptimizerSpec,
    /// Learning-rate schedule.
    pub schedule: ScheduleSpec,
    /// Augmentation of the training split; `None` when off (absent or `{}`).
    pub augment: Option<AugmentSpec>,
    /// Early stopping.
    pub early_stopping: Option<EarlyStoppingSpec>,
    /// The head's layers in this phase.
    pub head: Vec<LayerSpec>,
    /// Output shape and parameter count of each of them.
    pub head_shapes: Vec<(Shape, usize)>,
    /// The phase that declared this head (`[[phase.head.layers]]`), 0 for `[[head.layers]]`; a
    /// phase whose `head_from` differs from the one before starts a fresh head there.
    pub head_from: usize,
}

impl Plan {
    /// The split listing named `name`, if present.
    pub fn split(&self, name: &str) -> Option<&SplitListing> {
        self.splits.iter().find(|s| s.name == name)
    }

    /// How many of the backbone's layers (from the input) no phase up to `phase` trains: the
    /// smallest cutoff so far.
    pub fn frozen_layers(&self, phase: usize) -> usize {
        self.phases
            .iter()
            .take(phase + 1)
            .map(|p| p.cutoff.index)
            .min()
            .unwrap_or(self.cutoff.index)
    }
}

/// The file `backbone.weights` names: `imagenet` is the mirror's safetensors, else the original
/// file `runner fetch` downloads; anything else a path (from the current folder, then the mirror).
pub fn resolve_weights(
    def: &backbone::BackboneDef,
    w: &str,
    locations: &Locations,
) -> Result<PathBuf, crate::assets::NotFound> {
    if w != "imagenet" {
        return locations.path(w, "weights file", false);
    }
    let original = crate::assets::find_asset(&format!("{}/imagenet", def.name))
        .and_then(|a| a.upstream.path.strip_prefix("weights/"));
    let what = format!("ImageNet weights for {}", def.name);
    locations
        .weights_file(def.imagenet_file, &what)
        .or_else(|first| match original {
            Some(file) => {
                locations
                    .weights_file(file, &what)
                    .map_err(|second| crate::assets::NotFound {
                        tried: [first.tried, second.tried].concat(),
                        ..second
                    })
            }
            None => Err(first),
        })
}

/// A short, stable hash of the resolved spec. `train.keep` (what a finished run keeps on disk)
/// and `data.max_decoded_mib` (whether decoded images are held or decoded again) are left out:
/// they change no number, so changing them neither reruns a sweep's points nor refuses a resume.
pub fn config_hash(spec: &Spec) -> String {
    let mut spec = spec.clone();
    spec.train.keep = None;
    spec.data.max_decoded_mib = None;
    let json = serde_json::to_string(&spec).unwrap_or_default();
    let digest = Sha256::digest(json.as_bytes());
    crate::io::hex(&digest[..8])
}

/// Checks the loaded spec and resolves it into a plan, or returns every problem found.
pub fn build(loaded: &Loaded, locations: &Locations) -> Result<Plan, Problems> {
    let spec = &loaded.spec;
    let mut problems: Vec<Problem> = Vec::new();
    let mut bad = |key: &str, message: String| problems.push(loaded.problem(key, message));
    experiment_rules(spec, &mut bad);
    let (def, weights, cutoff) = backbone_rules(spec, locations, &mut bad);
    let (data_dir, splits, classes) = data_rules(spec, def, locations, &mut bad);
    let (base_output, head_shapes) = head_rules(spec, &spec.head.layers, "head", def, &mut bad);
    if spec.train.epochs == 0 {
        bad("train.epochs", "must be at least 1, got 0".into());
    }
    loss_rules(spec, &spec.head.layers, "head", &classes, &mut bad);
    training_rules(spec, &mut bad);
    let first_head = (spec.head.layers.clone(), head_shapes.clone());
    let phases = phase_plans(spec, def, cutoff.as_ref(), &classes, first_head, &mut bad);
    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    let (Some(def), Some(weights), Some(cutoff), Some(data_dir)) = (def, weights, cutoff, data_dir)
    else {
        unreachable!("every None above reported a problem");
    };
    let preprocess = spec
        .backbone
        .preprocess
        .unwrap_or_else(|| def.preprocess_for(&weights));
    Ok(Plan {
        spec: spec.clone(),
        file: loaded.file.clone(),
        backbone: def,
        weights,
        preprocess,
        cutoff,
        data_dir,
        splits,
        classes,
        base_output,
        head_shapes,
        config_hash: config_hash(spec),
        phases,
        sweep_point: (!loaded.point.is_empty()).then(|| {
            loaded
                .point
                .iter()
                .map(|(k, v)| format!("{k} = {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }),
        sweep_values: loaded.point.clone(),
    })
}

/// `[experiment]`: the name is usable in file names.
fn experiment_rules(spec: &Spec, bad: &mut impl FnMut(&str, String)) {
    let name = &spec.experiment.name;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        bad(
            "experiment.name",
            format!(
                "must be non-empty and use only letters, digits, '_', '-' and '.', got \"{name}\""
            ),
        );
    }
}

/// `[backbone]`: a known backbone, its weights found, its freeze cutoff a layer of it.
fn backbone_rules(
    spec: &Spec,
    locations: &Locations,
    bad: &mut impl FnMut(&str, String),
) -> (
    Option<&'static BackboneDef>,
    Option<PathBuf>,
    Option<Cutoff>,
) {
    let def = backbone::find(&spec.backbone.name);
    if def.is_none() {
        bad(
            "backbone.name",
            format!(
                "unknown backbone \"{}\"{}; known backbones: {}",
                spec.backbone.name,
                crate::spec::load::closest(&spec.backbone.name, &backbone::backbone_names()),
                backbone::backbone_names().join(", ")
            ),
        );
    }
    let weights = def.and_then(|def| {
        let w = &spec.backbone.weights;
        if w.trim().is_empty() {
            bad(
                "backbone.weights",
                "is empty: give \"imagenet\" or the path of a weights file (.safetensors, .pth, .h5)".into(),
            );
            return None;
        }
        let found = resolve_weights(def, w, locations);
        let asset = format!("{}/imagenet", def.name);
        found
            .map_err(|e| {
                let mut m = e.to_string().trim_end().to_string();
                if w == "imagenet" && crate::assets::find_asset(&asset).is_some() {
                    m += &format!("\n  or get it with: runner fetch {asset}");
                }
                bad("backbone.weights", m)
            })
            .ok()
    });
    let cutoff = def.and_then(|def| {
        Cutoff::resolve(def, &spec.backbone.trainable_from)
            .map_err(|e| bad("backbone.trainable_from", e.to_string()))
            .ok()
    });

    (def, weights, cutoff)
}

/// `[data]`: image size and batch size in range, the folder with train/ and validation/ (test/
/// optional), the same class folders in each, none empty, at least two.
fn data_rules(
    spec: &Spec,
    def: Option<&'static BackboneDef>,
    locations: &Locations,
    bad: &mut impl FnMut(&str, String),
) -> (Option<PathBuf>, Vec<SplitListing>, Vec<String>) {
    let [h, w] = spec.data.image_size;
    let min = def.map_or(1, |d| d.min_input);
    if h < min || w < min || h > 4096 || w > 4096 {
        bad(
            "data.image_size",
            match def {
                Some(d) => format!(
                    "each side must be in [{min}, 4096] for {}, got [{h}, {w}]",
                    d.name
                ),
                None => format!("each side must be in [{min}, 4096], got [{h}, {w}]"),
            },
        );
    }
    if spec.data.batch_size == 0 {
        bad("data.batch_size", "must be at least 1, got 0".into());
    }
    let data_dir = locations
        .path(&spec.data.dir, "data folder", true)
        .map_err(|e| bad("data.dir", e.to_string().trim_end().to_string()))
        .ok();
    let (splits, classes) = match &data_dir {
        Some(dir) => data_folder(dir, &mut |why| bad("data.dir", why)),
        None => (Vec::new(), Vec::new()),
    };
    (data_dir, splits, classes)
}

/// The splits of a data folder (train/ and validation/, test/ optional) and their classes, with
/// every problem given to `bad`: a missing split, class folders that differ from train/'s, an
/// empty class folder, fewer than two classes. `runner init` checks a folder with it too.
pub fn data_folder(dir: &Path, bad: &mut impl FnMut(String)) -> (Vec<SplitListing>, Vec<String>) {
    let mut splits = Vec::new();
    for split in SPLITS {
        let p = dir.join(split);
        if !p.is_dir() {
            if split != "test" {
                bad(format!("{}: missing the {split}/ folder", dir.display()));
            }
            continue;
        }
        match folder::scan_split(split, &p) {
            Ok(l) => splits.push(l),
            Err(e) => bad(e.to_string()),
        }
    }
    let classes = splits
        .first()
        .map(|s| s.classes.clone())
        .unwrap_or_default();
    for s in &splits {
        if s.classes != classes {
            bad(format!(
                "{}: class folders {:?} differ from train/'s {:?}",
                s.dir.display(),
                s.classes,
                classes
            ));
        }
        for (label, class) in s.classes.iter().enumerate() {
            if !s.files.iter().any(|(_, l)| *l == label) {
                bad(format!(
                    "{}: class folder {class}/ has no images ({})",
                    s.dir.display(),
                    folder::IMAGE_EXTENSIONS.join(", ")
                ));
            }
        }
    }
    if !splits.is_empty() && classes.len() < 2 {
        bad(format!(
            "{}: needs at least two class folders in train/, found {:?}",
            splits[0].dir.display(),
            classes
        ));
    }

    (splits, classes)
}

/// `[head]`: at least one layer, each layer's values, the shapes through the head from the
/// backbone's output, and the head's size; the base's output shape and each layer's output shape
/// and parameter count.
fn head_rules(
    spec: &Spec,
    layers: &[LayerSpec],
    prefix: &str,
    def: Option<&'static BackboneDef>,
    bad: &mut impl FnMut(&str, String),
) -> ([usize; 3], Vec<(Shape, usize)>) {
    let [h, w] = spec.data.image_size;
    let min = def.map_or(1, |d| d.min_input);
    let base_output = match def {
        Some(def) => def.shape_at(def.layers().len(), [h, w]),
        None => [0, 0, 0],
    };
    let mut head_shapes = Vec::new();
    if layers.is_empty() {
        bad(
            &format!("{prefix}.layers"),
            "the head needs at least one layer".into(),
        );
    }
    let mut shape = Some(Shape::Map(base_output))
        .filter(|_| def.is_some() && (min..=4096).contains(&h) && (min..=4096).contains(&w));
    let mut head_params = 0usize;
    for (i, layer) in layers.iter().enumerate() {
        let at = format!("{prefix}.layers[{i}]");
        let mut layer_ok = true;
        layer_rules(layer, &at, &mut |key: &str, msg: String| {
            layer_ok = false;
            bad(key, msg)
        });
        if !layer_ok {
            // The shapes after a layer with a bad value mean nothing: stop inferring there.
            shape = None;
        }
        if let Some(s) = shape {
            match head::infer(layer, s) {
                Ok((out, params)) => {
                    head_shapes.push((out, params));
                    shape = Some(out);
                    head_params = head_params.saturating_add(params);
                    if head_params > head::MAX_HEAD_PARAMS {
                        bad(
                            &at,
                            format!(
                                "the head has {} parameters up to this layer, more than the {} a head may have (about {:.0} GiB as f32)",
                                head::thousands(head_params),
                                head::thousands(head::MAX_HEAD_PARAMS),
                                head_params as f64 * 4.0 / (1u64 << 30) as f64
                            ),
                        );
                        shape = None;
                    }
                }
                Err(e) => {
                    bad(&at, format!("{e} (input {})", s.keras()));
                    shape = None;
                }
            }
        }
    }

    (base_output, head_shapes)
}

/// The loss against the last layer of a head (at `prefix`) and the classes.
fn loss_rules(
    spec: &Spec,
    layers: &[LayerSpec],
    prefix: &str,
    classes: &[String],
    bad: &mut impl FnMut(&str, String),
) {
    if let Some(last) = layers.last() {
        let at = format!("{prefix}.layers[{}]", layers.len() - 1);
        let n = classes.len();
        match (spec.train.loss, last) {
            (
                Loss::BinaryCrossentropy,
                LayerSpec::Dense(DenseSpec {
                    units: 1,
                    activation: Activation::Sigmoid,
                }),
            ) => {
                // Once, for the first head: a phase's head would say the same.
                if n > 2 && prefix == "head" {
                    bad(
                        "train.loss",
                        format!(
                            "binary_crossentropy needs exactly 2 classes, the data has {n} ({}); use categorical_crossentropy with a softmax layer of {n} units",
                            classes.join(", ")
                        ),
                    );
                }
            }
            (Loss::BinaryCrossentropy, _) => bad(
                &at,
                format!(
                    "binary_crossentropy needs a last layer of kind = \"dense\", units = 1, activation = \"sigmoid\"; got {}",
                    last.describe()
                ),
            ),
            (
                Loss::CategoricalCrossentropy,
                LayerSpec::Dense(DenseSpec {
                    units,
                    activation: Activation::Softmax,
                }),
            ) => {
                if n >= 2 && *units != n {
                    bad(
                        &format!("{at}.units"),
                        format!(
                            "categorical_crossentropy needs one unit per class: {n} ({}), got {units}",
                            classes.join(", ")
                        ),
                    );
                }
            }
            (Loss::CategoricalCrossentropy, _) => bad(
                &at,
                format!(
                    "categorical_crossentropy needs a last layer of kind = \"dense\", activation = \"softmax\", units = number of classes; got {}",
                    last.describe()
                ),
            ),
        }
    }
}

/// `[optimizer]`, `[augment]`, the step counts, `[schedule]`, `[early_stopping]` and
/// `train.clip_grad_norm`.
fn training_rules(spec: &Spec, bad: &mut impl FnMut(&str, String)) {
    optimizer_rules(&spec.optimizer, "optimizer", bad);
    if let Some(a) = &spec.augment {
        augment_rules(a, "augment", bad);
    }
    for (key, v) in [
        ("train.steps_per_epoch", spec.train.steps_per_epoch),
        ("train.validation_steps", spec.train.validation_steps),
    ] {
        if v == Some(0) {
            bad(key, "must be at least 1 when given, got 0".into());
        }
    }

    // [schedule], [early_stopping], [train] extras and [[phase]]
    if let Some(sch) = &spec.schedule {
        schedule_rules(sch, "schedule", bad);
    }
    if let Some(es) = &spec.early_stopping {
        stopping_rules(es, "early_stopping", bad);
    }
    if let Some(c) = spec.train.clip_grad_norm {
        ranged(bad, "train")("clip_grad_norm", c, c > 0.0, "a positive number");
    }
    if let Some(e) = spec.train.label_smoothing {
        ranged(bad, "train")("label_smoothing", e, (0.0..1.0).contains(&e), "in [0, 1)");
    }
}

/// `[[phase]]` (one phase named `train` without any): each phase's values, and its plan with
/// what it does not set taken from the top-level sections.
fn phase_plans(
    spec: &Spec,
    def: Option<&'static BackboneDef>,
    cutoff: Option<&Cutoff>,
    classes: &[String],
    first_head: (Vec<LayerSpec>, Vec<(Shape, usize)>),
    bad: &mut impl FnMut(&str, String),
) -> Vec<PhasePlan> {
    let mut phases = Vec::new();
    // The head each phase trains, and the phase that declared it (0: the first head).
    let (mut head, mut head_from) = (first_head, 0);
    let phase_specs = if spec.phase.is_empty() {
        vec![crate::spec::PhaseSpec {
            name: "train".into(),
            ..Default::default()
        }]
    } else {
        spec.phase.clone()
    };
    for (i, p) in phase_specs.iter().enumerate() {
        let at = format!("phase[{i}]");
        if p.name.is_empty()
            || !p
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            bad(
                &format!("{at}.name"),
                format!(
                    "must be non-empty and use only letters, digits, '_', '-' and '.', got \"{}\"",
                    p.name
                ),
            );
        } else if phase_specs[..i].iter().any(|q| q.name == p.name) {
            bad(
                &format!("{at}.name"),
                format!("\"{}\" is already the name of an earlier phase", p.name),
            );
        }
        if p.epochs == Some(0) {
            bad(&format!("{at}.epochs"), "must be at least 1, got 0".into());
        }
        if let Some(o) = &p.optimizer {
            optimizer_rules(o, &format!("{at}.optimizer"), bad);
        }
        if let Some(sch) = &p.schedule {
            schedule_rules(sch, &format!("{at}.schedule"), bad);
        }
        if let Some(es) = &p.early_stopping {
            stopping_rules(es, &format!("{at}.early_stopping"), bad);
        }
        if let Some(a) = &p.augment {
            augment_rules(a, &format!("{at}.augment"), bad);
        }
        match &p.head {
            Some(_) if i == 0 => bad(
                &format!("{at}.head"),
                "the first phase trains the head of [[head.layers]]; a phase's own head replaces the one trained before it, so declare it on a later phase".into(),
            ),
            Some(h) => {
                let prefix = format!("{at}.head");
                let (_, shapes) = head_rules(spec, &h.layers, &prefix, def, bad);
                loss_rules(spec, &h.layers, &prefix, classes, bad);
                (head, head_from) = ((h.layers.clone(), shapes), i);
            }
            None => {}
        }
        let phase_cut = match (&p.trainable_from, def) {
            (Some(t), Some(def)) => Cutoff::resolve(def, t)
                .map_err(|e| bad(&format!("{at}.trainable_from"), e.to_string()))
                .ok(),
            (None, _) => cutoff.cloned(),
            (Some(_), None) => None,
        };
        if let Some(c) = phase_cut {
            phases.push(PhasePlan {
                name: p.name.clone(),
                epochs: p.epochs.unwrap_or(spec.train.epochs),
                cutoff: c,
                optimizer: p
                    .optimizer
                    .clone()
                    .unwrap_or_else(|| spec.optimizer.clone()),
                schedule: p
                    .schedule
                    .clone()
                    .or_else(|| spec.schedule.clone())
                    .unwrap_or(ScheduleSpec::Constant(NoSettings {})),
                augment: p
                    .augment
                    .clone()
                    .or_else(|| spec.augment.clone())
                    .filter(|a| !a.is_identity()),
                early_stopping: p
                    .early_stopping
                    .clone()
                    .or_else(|| spec.early_stopping.clone()),
                head: head.0.clone(),
                head_shapes: head.1.clone(),
                head_from,
            });
        }
    }

    phases
}

fn layer_rules(layer: &LayerSpec, at: &str, bad: &mut impl FnMut(&str, String)) {
    let positive = |bad: &mut dyn FnMut(&str, String), key: &str, v: usize| {
        if v == 0 {
            bad(&format!("{at}.{key}"), "must be at least 1, got 0".into());
        }
    };
    match layer {
        LayerSpec::Conv2d(Conv2dSpec {
            filters,
            kernel,
            stride,
            ..
        }) => {
            positive(bad, "filters", *filters);
            positive(bad, "kernel", kernel.hw().into_iter().min().unwrap_or(0));
            positive(bad, "stride", stride.hw().into_iter().min().unwrap_or(0));
        }
        LayerSpec::MaxPool2d(MaxPool2dSpec { pool, stride }) => {
            positive(bad, "pool", pool.hw().into_iter().min().unwrap_or(0));
            if let Some(s) = stride {
                positive(bad, "stride", s.hw().into_iter().min().unwrap_or(0));
            }
        }
        LayerSpec::Dense(DenseSpec { units, .. }) => positive(bad, "units", *units),
        LayerSpec::Dropout(DropoutSpec { rate }) => {
            if !(0.0..1.0).contains(rate) {
                bad(
                    &format!("{at}.rate"),
                    format!("must be in [0, 1), got {rate}"),
                );
            }
        }
        LayerSpec::GlobalAveragePool(_) | LayerSpec::Flatten(_) => {}
    }
}

/// A checker for numbers in `section`: `check(key, value, ok, "what was expected")`.
fn ranged<'a>(
    bad: &'a mut impl FnMut(&str, String),
    section: &'a str,
) -> impl FnMut(&str, f64, bool, &str) + 'a {
    move |key, v, ok, range| {
        if !ok || !v.is_finite() {
            bad(
                &format!("{section}.{key}"),
                format!("must be {range}, got {v}"),
            );
        }
    }
}

fn augment_rules(a: &AugmentSpec, at: &str, bad: &mut impl FnMut(&str, String)) {
    let mut check = ranged(bad, at);
    check(
        "rotation_degrees",
        a.rotation_degrees,
        a.rotation_degrees >= 0.0,
        "at least 0 (a range [-r, r])",
    );
    check(
        "shear_degrees",
        a.shear_degrees,
        a.shear_degrees >= 0.0,
        "at least 0 (a range [-s, s])",
    );
    for (key, v) in [
        ("width_shift", a.width_shift),
        ("height_shift", a.height_shift),
    ] {
        check(key, v, (0.0..1.0).contains(&v), "a fraction in [0, 1)");
    }
    check(
        "zoom",
        a.zoom,
        (0.0..1.0).contains(&a.zoom),
        "in [0, 1) (scales are drawn from [1 - zoom, 1 + zoom])",
    );
    check(
        "fill_value",
        a.fill_value,
        (0.0..=255.0).contains(&a.fill_value),
        "a pixel value in [0, 255]",
    );
}

fn optimizer_rules(opt: &OptimizerSpec, at: &str, bad: &mut impl FnMut(&str, String)) {
    let mut check = ranged(bad, at);
    let lr = opt.lr();
    check("lr", lr, lr > 0.0, "a positive number");
    match opt {
        OptimizerSpec::Rmsprop(RmspropSpec {
            rho,
            momentum,
            epsilon,
            ..
        }) => {
            check("rho", *rho, (0.0..1.0).contains(rho), "in [0, 1)");
            check(
                "momentum",
                *momentum,
                (0.0..1.0).contains(momentum),
                "in [0, 1)",
            );
            check("epsilon", *epsilon, *epsilon > 0.0, "positive");
        }
        OptimizerSpec::Adam(a) | OptimizerSpec::Adamw(a) => {
            let AdamSpec {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
                ..
            } = a;
            check("beta_1", *beta_1, (0.0..1.0).contains(beta_1), "in [0, 1)");
            check("beta_2", *beta_2, (0.0..1.0).contains(beta_2), "in [0, 1)");
            check("epsilon", *epsilon, *epsilon > 0.0, "positive");
            match (opt, weight_decay) {
                (OptimizerSpec::Adam(_), Some(wd)) if *wd != 0.0 => check(
                    "weight_decay",
                    *wd,
                    false,
                    "0 for adam (use kind = \"adamw\" for decoupled weight decay)",
                ),
                (_, Some(wd)) => check("weight_decay", *wd, *wd >= 0.0, "at least 0"),
                _ => {}
            }
        }
        OptimizerSpec::Sgd(SgdSpec { momentum, .. }) => {
            check(
                "momentum",
                *momentum,
                (0.0..1.0).contains(momentum),
                "in [0, 1)",
            );
        }
    }
    if let OptimizerSpec::Rmsprop(RmspropSpec {
        weight_decay: Some(wd),
        ..
    })
    | OptimizerSpec::Sgd(SgdSpec {
        weight_decay: Some(wd),
        ..
    }) = opt
    {
        check("weight_decay", *wd, *wd >= 0.0, "at least 0");
    }
}

fn schedule_rules(sch: &ScheduleSpec, at: &str, bad: &mut impl FnMut(&str, String)) {
    let mut check = ranged(bad, at);
    match sch {
        ScheduleSpec::Constant(_) => {}
        ScheduleSpec::Step(StepScheduleSpec {
            every_epochs,
            gamma,
        }) => {
            check(
                "every_epochs",
                *every_epochs as f64,
                *every_epochs > 0,
                "at least 1",
            );
            check("gamma", *gamma, *gamma > 0.0 && *gamma <= 1.0, "in (0, 1]");
        }
        ScheduleSpec::Exponential(ExponentialScheduleSpec { gamma, .. }) => {
            check("gamma", *gamma, *gamma > 0.0 && *gamma <= 1.0, "in (0, 1]");
        }
        ScheduleSpec::Cosine(CosineScheduleSpec {
            warmup_epochs,
            min_lr,
        }) => {
            check(
                "warmup_epochs",
                *warmup_epochs,
                *warmup_epochs >= 0.0,
                "at least 0",
            );
            check("min_lr", *min_lr, *min_lr >= 0.0, "at least 0");
        }
        ScheduleSpec::ReduceOnPlateau(PlateauScheduleSpec {
            factor,
            min_delta,
            min_lr,
            ..
        }) => {
            check(
                "factor",
                *factor,
                *factor > 0.0 && *factor < 1.0,
                "in (0, 1)",
            );
            check("min_delta", *min_delta, *min_delta >= 0.0, "at least 0");
            check("min_lr", *min_lr, *min_lr >= 0.0, "at least 0");
        }
    }
}

fn stopping_rules(es: &EarlyStoppingSpec, at: &str, bad: &mut impl FnMut(&str, String)) {
    let mut check = ranged(bad, at);
    check("min_delta", es.min_delta, es.min_delta >= 0.0, "at least 0");
}
