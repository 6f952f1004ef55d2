//! The workloads `bench/compare.py` times against PyTorch, run by `runner bench-workload NAME`:
//! each warms up, repeats, and prints one JSON line (items, seconds of every repeat, GFLOP per
//! item, peak resident memory); each also writes `<out>/<name>.safetensors` with what PyTorch
//! needs to compute the same thing (inputs, initial weights) and runner's results, so the
//! comparison first checks that both sides agree.
//!
//! The training workloads go through the training code itself ([`train::fit`]), with the
//! experiments' own plans (`experiments/fine_tune.toml`, `conv_head.toml`, `feature_extraction.toml`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;

use crate::data::{self, augment, folder};
use crate::model::TransferModel;
use crate::plan::Plan;
use crate::spec::{AugmentSpec, LayerSpec};
use crate::train::{self, TrainSource, features::Features};

/// Every workload, in the table's order.
pub const WORKLOADS: [&str; 10] = [
    "matmul",
    "vgg16_forward",
    "vgg16_layers",
    "fine_tune_step",
    "conv_head_step",
    "dense_head_epoch",
    "fine_tune_epoch",
    "decode_resize",
    "augment",
    "extract",
];

/// How a workload runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs.
    pub repeats: usize,
    /// Images for `extract` (the memory workload) and `fine_tune_epoch` (the epoch's size).
    pub images: usize,
    /// `--set key=value` overrides applied to the experiments' specs (a batch size, an image
    /// size: `bench/gpu.sh` measures batch 64 and runs small sizes on a software adapter).
    pub sets: Vec<String>,
    /// Where the experiments are (`experiments/`).
    pub experiments: PathBuf,
    /// Where the check file goes.
    pub out: PathBuf,
}

/// What a workload measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The workload.
    pub name: String,
    /// Items (images or examples) per timed run.
    pub items: usize,
    /// Seconds of each timed run.
    pub seconds: Vec<f64>,
    /// Floating-point operations per item, in GFLOP (0 when not meaningful): the direct
    /// convolutions' count, the same for every library.
    pub gflop_per_item: f64,
    /// The multiply-adds (x2, in GFLOP) runner's kernels really do per item: Winograd
    /// F(2x2, 3x3) does 16 per 2x2 tile where the direct convolution does 36 (0: as
    /// `gflop_per_item`).
    pub done_gflop_per_item: f64,
    /// What the run was, for the table.
    pub what: String,
    /// The device it ran on (`cpu (flex)`, `wgpu: <adapter> (<API>, <compiler>)`).
    pub device: String,
    /// Tensors for the check file: `(name, shape, values)`.
    pub check: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl Report {
    /// Median seconds per timed run.
    pub fn median(&self) -> f64 {
        let mut s = self.seconds.clone();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
    }

    /// The JSON line `bench/compare.py` reads.
    pub fn json(&self) -> serde_json::Value {
        let median = self.median();
        serde_json::json!({
            "workload": self.name,
            "what": self.what,
            "device": self.device,
            "items": self.items,
            "seconds": self.seconds,
            "median_s": median,
            "items_per_s": self.items as f64 / median,
            "gflop_per_item": self.gflop_per_item,
            "gflop_per_s": self.gflop_per_item * self.items as f64 / median,
            "done_gflop_per_item": if self.done_gflop_per_item > 0.0 {
                self.done_gflop_per_item
            } else {
                self.gflop_per_item
            },
            "threads": rayon::current_num_threads(),
            "peak_rss_mib": super::peak_rss_mib(),
        })
    }
}

/// Forward FLOPs of VGG16's base per image: 2 x multiply-adds of its 13 convolutions.
pub fn vgg16_gflop([h, w]: [usize; 2]) -> f64 {
    let def = crate::backbone::find("vgg16").expect("vgg16 is known");
    let mut shape = [3, h, w];
    let mut flop = 0.0;
    for l in def.layers() {
        let out = l.output_shape(shape);
        if let crate::backbone::LayerOp::Conv {
            in_channels,
            out_channels,
            ..
        } = l.op
        {
            flop += 2.0 * (in_channels * 9 * out_channels * out[1] * out[2]) as f64;
        }
        shape = out;
    }
    flop / 1e9
}

/// What runner's CPU kernels multiply per image in VGG16's base: each 3x3 convolution by
/// Winograd with the tile `cpu::winograd` picks for the layer (F(4x4, 3x3): 2 x 36 x cin x cout per
/// 4x4 output tile, from block3 on; F(2x2, 3x3): 2 x 16 x cin x cout per 2x2 tile; trainable
/// layers F(2x2)); with `trainable_from` (a layer
/// index), also the backward of the trainable convolutions: the kernels' gradient by one im2col
/// product (2 x 9 x cin x cout x h x w) and the input's by the same Winograd convolution, except
/// at the first trainable layer, whose input needs none. The transforms, pooling and the dense
/// head are left out (under 1 % here).
pub fn vgg16_done_gflop([h, w]: [usize; 2], trainable_from: Option<usize>) -> f64 {
    use crate::cpu::winograd::Tile;
    let def = crate::backbone::find("vgg16").expect("vgg16 is known");
    let mut shape = [3, h, w];
    let mut flop = 0.0;
    for (i, l) in def.layers().iter().enumerate() {
        let out = l.output_shape(shape);
        if let crate::backbone::LayerOp::Conv {
            in_channels,
            out_channels,
            ..
        } = l.op
        {
            let pair = (in_channels * out_channels) as f64;
            let map = [out[1], out[2]];
            let trainable = trainable_from.filter(|&t| i >= t);
            // Trainable convolutions run F(2x2) (`train::hand`), frozen ones the layer's tile.
            let tile = match trainable {
                Some(_) => Tile::F2,
                None => Tile::for_layer(in_channels, out_channels, map),
            };
            let winograd = 2.0 * tile.multiplies(in_channels, out_channels, map);
            flop += winograd;
            if let Some(t) = trainable {
                flop += 2.0 * 9.0 * pair * (out[1] * out[2]) as f64;
                if i > t {
                    flop += winograd;
                }
            }
        }
        shape = out;
    }
    flop / 1e9
}

/// Runs workload `name`.
pub fn run(name: &str, opts: &Options, device: &Device) -> anyhow::Result<Report> {
    let mut r = match name {
        "matmul" => matmul(opts, device),
        "vgg16_forward" => vgg16_forward(opts, device)?,
        "vgg16_layers" => vgg16_layers(opts)?,
        "fine_tune_step" => train_step(opts, device, "fine_tune.toml", Some(1), false, None)?,
        "conv_head_step" => train_step(opts, device, "conv_head.toml", None, true, None)?,
        "fine_tune_epoch" => train_step(
            opts,
            device,
            "fine_tune.toml",
            Some(1),
            true,
            Some(opts.images),
        )?,
        "dense_head_epoch" => dense_head_epoch(opts, device)?,
        "decode_resize" => decode_resize(opts)?,
        "augment" => augment_from_memory(opts)?,
        "extract" => extract(opts, device)?,
        other => anyhow::bail!(
            "unknown workload \"{other}\"; workloads: {}",
            WORKLOADS.join(", ")
        ),
    };
    r.name = name.to_string();
    Ok(r)
}

/// Writes the report's check tensors to `<out>/<name>.safetensors`.
pub fn write_check(r: &Report, out: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let path = out.join(format!("{}.safetensors", r.name));
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = r
        .check
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, None, &path)?;
    Ok(path)
}

/// Times `f` `warmup + repeats` times, keeping the timed seconds. The clock stops when `device`
/// has finished the work, not when it was queued (a GPU runs behind the host).
fn time(opts: &Options, device: &Device, mut f: impl FnMut()) -> Vec<f64> {
    let done = || {
        if let Err(e) = device.sync() {
            tracing::warn!(error = %e, "Device sync failed.");
        }
    };
    for _ in 0..opts.warmup {
        f();
    }
    done();
    (0..opts.repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            done();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

fn matmul(opts: &Options, device: &Device) -> Report {
    let device = device.clone().without_autodiff();
    let n: usize = 2048;
    let a = Tensor::<2>::random([n, n], burn::tensor::Distribution::Default, &device);
    let b = Tensor::<2>::random([n, n], burn::tensor::Distribution::Default, &device);
    let seconds = time(opts, &device, || {
        let c = a.clone().matmul(b.clone());
        std::hint::black_box(c.into_data());
    });
    Report {
        items: 1,
        seconds,
        gflop_per_item: 2.0 * (n * n * n) as f64 / 1e9,
        what: format!(
            "float32 matmul {n}x{n} ({})",
            if crate::cpu::is_cpu(&device) {
                "burn flex"
            } else {
                "burn wgpu"
            }
        ),
        ..Report::default()
    }
}

/// The plan of `experiments/<file>`, its assets resolved through `$RUNNER_ASSETS`.
fn plan_of(opts: &Options, file: &str) -> anyhow::Result<Plan> {
    let path = opts.experiments.join(file);
    let loaded =
        crate::spec::load::load(&path, &opts.sets).with_context(|| path.display().to_string())?;
    Ok(crate::plan::build(
        &loaded,
        &crate::assets::Locations::new(None),
    )?)
}

/// The first `n` images of split `name`, decoded and resized.
fn first_images(plan: &Plan, name: &str, n: usize) -> anyhow::Result<folder::Images> {
    let mut listing = plan
        .split(name)
        .ok_or_else(|| anyhow::anyhow!("no {name} split"))?
        .clone();
    // Both classes: take from the front and the back of the (class-sorted) listing.
    let files = listing.files.clone();
    listing.files = files
        .iter()
        .take(n.div_ceil(2))
        .chain(files.iter().rev().take(n / 2))
        .cloned()
        .collect();
    Ok(folder::load_split(
        &listing,
        plan.spec.data.image_size,
        plan.spec.data.interpolation,
    )
    .0)
}

fn vgg16_forward(opts: &Options, device: &Device) -> anyhow::Result<Report> {
    let plan = plan_of(opts, "feature_extraction.toml")?;
    let batch = plan.spec.data.batch_size;
    let images = first_images(&plan, "train", batch)?;
    let plain = device.clone().without_autodiff();
    let model = TransferModel::build(&plan, &plain)?;
    let idx: Vec<usize> = (0..batch).collect();
    let x = data::batch_tensor(&images, &idx, plan.preprocess, &plain)?;
    assert_eq!(
        model.cut(),
        model.backbone.num_layers(),
        "the whole base is frozen"
    );
    let run = || model.frozen_features(x.clone());
    let out: Vec<f32> = run().into_data().iter::<f32>().collect();
    let seconds = time(opts, &plain, || {
        std::hint::black_box(run().into_data());
    });
    let [_, h, w] = plan.base_output;
    Ok(Report {
        items: batch,
        seconds,
        gflop_per_item: vgg16_gflop(plan.spec.data.image_size),
        done_gflop_per_item: vgg16_done_gflop(plan.spec.data.image_size, None),
        what: format!(
            "VGG16 base forward, {}x{}, batch {batch}",
            plan.spec.data.image_size[0], plan.spec.data.image_size[1]
        ),
        check: vec![
            (
                "input".into(),
                vec![batch, 3, images.height, images.width],
                x.into_data().iter::<f32>().collect(),
            ),
            ("output".into(), vec![batch, 512, h, w], out),
        ],
        ..Report::default()
    })
}

/// VGG16's 13 convolutions one by one, by runner's CPU kernels alone (`cpu::winograd`, random
/// weights, the experiment's batch and image size, the first layers a few images at a time as
/// the frozen forward runs them): where the forward's time goes. Prints one row per layer on
/// stderr (median milliseconds per batch and GFLOP/s of the multiplies done by each Winograd
/// tile, how the used tile's work is shared among threads); its seconds are the sums over the
/// layers of the tile the forward uses (`winograd::Tile::for_layer`).
fn vgg16_layers(opts: &Options) -> anyhow::Result<Report> {
    use crate::cpu::winograd::{Conv3x3, Tile};
    let plan = plan_of(opts, "feature_extraction.toml")?;
    let n = plan.spec.data.batch_size;
    let [h, w] = plan.spec.data.image_size;
    let def = crate::backbone::find("vgg16").expect("vgg16 is known");
    let value = |i: usize| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0;
    let ops: Vec<crate::backbone::LayerOp> = def.layers().iter().map(|l| l.op).collect();
    let (split, grouped) = crate::backbone::vgg::frozen_groups(&ops, [n, 3, h, w]);
    let mut shape = [3, h, w];
    let mut total = vec![0.0; opts.repeats.max(1)];
    let mut rows = Vec::new();
    for (i, l) in def.layers().iter().enumerate() {
        let out = l.output_shape(shape);
        if let crate::backbone::LayerOp::Conv {
            in_channels: cin,
            out_channels: cout,
            ..
        } = l.op
        {
            let [_, h, w] = shape;
            let group = if i < split { grouped } else { n };
            let x: Vec<f32> = (0..group * cin * h * w).map(value).collect();
            let weight: Vec<f32> = (0..cout * cin * 9).map(|i| value(i) * 0.05).collect();
            let chosen = Tile::for_layer(cin, cout, [h, w]);
            let mut cells = Vec::new();
            let mut shared = "";
            for tile in [Tile::F2, Tile::F4] {
                let conv = Conv3x3::with_tile(&weight, &vec![0.1; cout], cout, cin, tile);
                let mut y = vec![0.0; group * cout * h * w];
                let mut scratch = vec![0.0; conv.scratch_len([group, h, w])];
                let seconds = time(opts, &Device::flex(), || {
                    for first in (0..n).step_by(group) {
                        let k = group.min(n - first);
                        conv.forward_into(
                            &x[..k * cin * h * w],
                            [k, h, w],
                            &mut y[..k * cout * h * w],
                            &mut scratch,
                        );
                    }
                    std::hint::black_box(&y);
                });
                let mut sorted = seconds.clone();
                sorted.sort_by(f64::total_cmp);
                let median = sorted[sorted.len() / 2];
                let gflop = 2.0 * n as f64 * tile.multiplies(cin, cout, [h, w]) / 1e9;
                let mark = if tile == chosen { " (used)" } else { "" };
                cells.push(format!("{:.1}{mark} | {:.0}", median * 1e3, gflop / median));
                if tile == chosen {
                    for (t, s) in total.iter_mut().zip(&seconds) {
                        *t += s;
                    }
                    shared = if conv.runs_per_thread([group, h, w]) {
                        "each thread its own chunks"
                    } else {
                        "one chunk at a time over all threads"
                    };
                }
            }
            rows.push(format!(
                "| {} | {cin} -> {cout} | {h}x{w} | {group} | {} | {shared} |",
                l.name,
                cells.join(" | "),
            ));
        }
        shape = out;
    }
    eprintln!(
        "| layer | channels | size | images at once | F(2x2): ms per batch of {n} (median) | F(2x2): GFLOP/s done | F(4x4): ms | F(4x4): GFLOP/s done | the used tile's chunks |\n|---|---|---|---|---|---|---|---|---|\n{}",
        rows.join("\n")
    );
    Ok(Report {
        items: n,
        seconds: total,
        gflop_per_item: vgg16_gflop([h, w]),
        done_gflop_per_item: vgg16_done_gflop([h, w], None),
        what: format!("VGG16's 13 convolutions one by one (the kernels alone), {h}x{w}, batch {n}"),
        device: "cpu (runner's kernels)".into(),
        ..Report::default()
    })
}

/// Every float parameter of a module, in visiting order.
struct Params(Vec<(Vec<usize>, Vec<f32>)>);

impl ModuleVisitor for Params {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        self.0
            .push((t.dims().to_vec(), t.into_data().iter::<f32>().collect()));
    }
}

/// The head's parameters as check tensors `head.<i>` (burn layouts: Linear `[in, out]`).
fn head_tensors(model: &TransferModel) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut p = Params(Vec::new());
    model.head.visit(&mut p);
    p.0.into_iter()
        .enumerate()
        .map(|(i, (s, v))| (format!("head.{i}"), s, v))
        .collect()
}

/// The plan with dropout off (for the check, whose random masks no two libraries share).
fn without_dropout(plan: &Plan) -> Plan {
    let mut p = plan.clone();
    let heads =
        std::iter::once(&mut p.spec.head.layers).chain(p.phases.iter_mut().map(|ph| &mut ph.head));
    for l in heads.flatten() {
        if let LayerSpec::Dropout(d) = l {
            d.rate = 0.0;
        }
    }
    p
}

/// One phase of `plan` reduced to `epochs` epochs of `steps` steps.
fn one_phase(plan: &Plan, phase: Option<usize>, epochs: usize, steps: usize) -> Plan {
    let mut p = plan.clone();
    let ph = p.phases[phase.unwrap_or(0)].clone();
    p.phases = vec![ph];
    // The phase's head is the run's first.
    p.phases[0].head_from = 0;
    p.phases[0].epochs = epochs;
    p.phases[0].early_stopping = None;
    p.spec.train.steps_per_epoch = Some(steps);
    p
}

/// Training steps through [`train::fit`] with the experiment's model, head and optimizer: the
/// frozen part of the base runs every step (from decoded images; augmented when `augmented`).
/// The check: two one-step epochs on one batch without dropout or augmentation, their training
/// losses and the validation loss after each update.
/// With `epoch_of: Some(n)`, each timed run is a whole epoch over the first `n` training images
/// (`n / batch` steps) instead of one step.
fn train_step(
    opts: &Options,
    device: &Device,
    file: &str,
    phase: Option<usize>,
    augmented: bool,
    epoch_of: Option<usize>,
) -> anyhow::Result<Report> {
    let plan = plan_of(opts, file)?;
    let batch = plan.spec.data.batch_size;
    let images = first_images(&plan, "train", batch)?;
    let epoch_images = match epoch_of {
        Some(n) => Some(first_images(&plan, "train", n)?),
        None => None,
    };
    let identity = AugmentSpec::default();
    let aug = if augmented {
        plan.phases[phase.unwrap_or(0)]
            .augment
            .clone()
            .unwrap_or_else(AugmentSpec::notebook)
    } else {
        identity.clone()
    };

    // The check, on the training code's path (activations at the cutoff, then the rest).
    let check_plan = one_phase(&without_dropout(&plan), phase, 2, 1);
    crate::device::seed_host(plan.spec.experiment.seed);
    let model = TransferModel::build(&check_plan, device)?;
    let head = head_tensors(&model);
    let feats = train::features::extract(&model, &images, &check_plan, device, "bench", None)?;
    let (_, history) = train::fit(
        model,
        &TrainSource::Features(&feats),
        &feats,
        &check_plan,
        device,
        "bench",
    );
    let metrics: Vec<f32> = history
        .iter()
        .flat_map(|m| [m.train_loss as f32, m.val_loss as f32])
        .collect();
    let idx: Vec<usize> = (0..batch).collect();
    let plain = device.clone().without_autodiff();
    let x = data::batch_tensor(&images, &idx, plan.preprocess, &plain)?;
    let mut check = vec![
        (
            "input".into(),
            vec![batch, 3, images.height, images.width],
            x.into_data().iter::<f32>().collect(),
        ),
        (
            "labels".into(),
            vec![batch],
            images.labels.iter().map(|&l| l as f32).collect(),
        ),
        ("metrics".into(), vec![4], metrics),
    ];
    check.extend(head);

    // The timed steps: the real plan (dropout on), one step per fit (or one epoch), the frozen
    // part every step.
    let timed_images = epoch_images.as_ref().unwrap_or(&images);
    let steps = timed_images.len().div_ceil(batch);
    let timed = one_phase(&plan, phase, 1, steps);
    crate::device::seed_host(plan.spec.experiment.seed);
    let mut model = Some(TransferModel::build(&timed, device)?);
    let val = first_n(&feats, 1);
    let seconds = time(opts, device, || {
        let m = model.take().expect("the model is put back after each step");
        let source = TrainSource::Augmented {
            images: timed_images,
            spec: &aug,
            frozen: m.valid(),
        };
        let (m, _) = train::fit(m, &source, &val, &timed, device, "bench");
        model = Some(m);
    });
    let cut = &timed.phases[0].cutoff;
    let [h, w] = plan.spec.data.image_size;
    let what = match epoch_of {
        Some(_) => format!(
            "training epoch: {} images {h}x{w}, {steps} steps of {batch}, {} head, trainable from {}{}",
            timed_images.len(),
            file.trim_end_matches(".toml"),
            cut.label,
            if augmented { ", augmented" } else { "" }
        ),
        None => format!(
            "training step: {} head, trainable from {}, batch {batch}{}",
            file.trim_end_matches(".toml"),
            cut.label,
            if augmented { ", augmented" } else { "" }
        ),
    };
    Ok(Report {
        items: timed_images.len(),
        seconds,
        // Forward of the base; the trainable part's backward is not counted.
        gflop_per_item: vgg16_gflop([h, w]),
        // What runner does: the forward and the trainable convolutions' backward.
        done_gflop_per_item: vgg16_done_gflop(
            [h, w],
            (cut.index < plan.backbone.layers().len()).then_some(cut.index),
        ),
        what,
        check,
        ..Report::default()
    })
}

/// The first `n` examples of `f`.
fn first_n(f: &Features, n: usize) -> Features {
    let per: usize = f.shape.iter().product();
    let values = f.values().expect("the benchmark's features are in memory");
    Features::new(
        values[..n * per].to_vec(),
        f.shape,
        f.labels[..n].to_vec(),
        f.paths[..n].to_vec(),
    )
}

/// Deterministic activations in `[0, 1)` standing in for cached VGG16 features.
fn synthetic_features(n: usize, shape: [usize; 3]) -> Features {
    let per: usize = shape.iter().product();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let values = (0..n * per)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    Features::new(
        values,
        shape,
        (0..n).map(|i| i % 2).collect(),
        (0..n).map(|i| PathBuf::from(format!("{i}"))).collect(),
    )
}

/// An epoch of the dense head on cached features (2000 x 8192), through [`train::fit`].
fn dense_head_epoch(opts: &Options, device: &Device) -> anyhow::Result<Report> {
    let plan = plan_of(opts, "feature_extraction.toml")?;
    let batch = plan.spec.data.batch_size;
    let train_feats = synthetic_features(2000, plan.base_output);
    let first = first_n(&train_feats, batch);
    let check_plan = one_phase(&without_dropout(&plan), None, 2, 1);
    crate::device::seed_host(plan.spec.experiment.seed);
    let model = TransferModel::build(&check_plan, device)?;
    let mut check = head_tensors(&model);
    let (_, history) = train::fit(
        model,
        &TrainSource::Features(&first),
        &first,
        &check_plan,
        device,
        "bench",
    );
    check.push((
        "metrics".into(),
        vec![4],
        history
            .iter()
            .flat_map(|m| [m.train_loss as f32, m.val_loss as f32])
            .collect(),
    ));
    check.push((
        "features".into(),
        vec![batch, plan.base_output.iter().product()],
        first.values()?.into_owned(),
    ));
    check.push((
        "labels".into(),
        vec![batch],
        first.labels.iter().map(|&l| l as f32).collect(),
    ));

    let steps = 2000 / batch;
    let timed = one_phase(&plan, None, 1, steps);
    crate::device::seed_host(plan.spec.experiment.seed);
    let mut model = Some(TransferModel::build(&timed, device)?);
    let val = first_n(&first, 1);
    let seconds = time(opts, device, || {
        let m = model
            .take()
            .expect("the model is put back after each epoch");
        let (m, _) = train::fit(
            m,
            &TrainSource::Features(&train_feats),
            &val,
            &timed,
            device,
            "bench",
        );
        model = Some(m);
    });
    Ok(Report {
        items: 2000,
        seconds,
        gflop_per_item: 0.0,
        what: format!(
            "dense head epoch on cached features (2000 x {}, batch {batch}, {steps} steps)",
            plan.base_output.iter().product::<usize>()
        ),
        check,
        ..Report::default()
    })
}

fn decode_resize(opts: &Options) -> anyhow::Result<Report> {
    let plan = plan_of(opts, "feature_extraction.toml")?;
    let size = plan.spec.data.image_size;
    let n: usize = plan.splits.iter().map(|s| s.files.len()).sum();
    let mut first = Vec::new();
    let seconds = time(opts, &Device::flex(), || {
        let mut all = Vec::new();
        for listing in &plan.splits {
            all.push(folder::load_split(listing, size, plan.spec.data.interpolation).0);
        }
        first = all[0].image(0).to_vec();
    });
    let path = plan.splits[0].files[0].0.display().to_string();
    tracing::info!(path, "Check image: the first of the first split.");
    Ok(Report {
        items: n,
        seconds,
        gflop_per_item: 0.0,
        what: format!(
            "decode + resize to {}x{} ({n} JPEGs, {} threads)",
            size[0],
            size[1],
            rayon::current_num_threads()
        ),
        check: vec![(
            "first_image".into(),
            vec![size[0], size[1], 3],
            first.iter().map(|&b| f32::from(b)).collect(),
        )],
        ..Report::default()
    })
}

fn augment_from_memory(opts: &Options) -> anyhow::Result<Report> {
    let plan = plan_of(opts, "conv_head.toml")?;
    let listing = plan
        .split("train")
        .ok_or_else(|| anyhow::anyhow!("no train split"))?;
    let images = folder::load_split(
        listing,
        plan.spec.data.image_size,
        plan.spec.data.interpolation,
    )
    .0;
    let aug = plan.phases[0]
        .augment
        .clone()
        .unwrap_or_else(AugmentSpec::notebook);
    let all: Vec<usize> = (0..images.len()).collect();
    let mut epoch = 0;
    let seconds = time(opts, &Device::flex(), || {
        epoch += 1;
        std::hint::black_box(augment::augment_batch(&images, &all, &aug, 42, epoch).ok());
    });
    Ok(Report {
        items: images.len(),
        seconds,
        gflop_per_item: 0.0,
        what: format!(
            "augmentation from memory ({} images, the notebook's transforms, {} threads)",
            images.len(),
            rayon::current_num_threads()
        ),
        check: Vec::new(),
        ..Report::default()
    })
}

/// Feature extraction over the first `opts.images` images (train, then validation, then test)
/// as the training pipeline runs it: each split checked, then decoded batch by batch, through the
/// frozen base, its activations written to a feature cache file: the memory workload.
fn extract(opts: &Options, device: &Device) -> anyhow::Result<Report> {
    let plan = plan_of(opts, "feature_extraction.toml")?;
    let mut left = opts.images;
    let mut n = 0;
    let t = Instant::now();
    let plain = device.clone().without_autodiff();
    let model = TransferModel::build(&plan, &plain)?;
    let dir = tempfile_dir("runner-bench-extract")?;
    let mut cache = train::FeatureCache::new(Some(dir.clone()));
    for listing in &plan.splits {
        if left == 0 {
            break;
        }
        let mut l = listing.clone();
        l.files.truncate(left);
        left -= l.files.len();
        let size = plan.spec.data.image_size;
        let images = folder::load_split_with(&l, size, plan.spec.data.interpolation, false).0;
        n += images.len();
        let f = cache.features(&model, &images, &plan, &plain, "bench")?;
        anyhow::ensure!(f.file().is_some(), "the feature cache was not written");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Report {
        items: n,
        seconds: vec![t.elapsed().as_secs_f64()],
        gflop_per_item: vgg16_gflop(plan.spec.data.image_size),
        done_gflop_per_item: vgg16_done_gflop(plan.spec.data.image_size, None),
        what: format!(
            "feature extraction of {n} images (decoded per batch, base, features written to the cache per split)"
        ),
        check: Vec::new(),
        ..Report::default()
    })
}

/// A fresh folder under the system's temporary folder.
fn tempfile_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::winograd::Tile;

    #[test]
    fn winograd_does_fewer_multiplies_and_the_backward_adds_the_trainable_convolutions() {
        let direct = vgg16_gflop([224, 224]);
        assert!((direct - 30.69).abs() < 0.01, "{direct}");
        // 256x256: every map size is a multiple of 4, so blocks 1 and 2 (F(2x2, 3x3)) do exactly
        // 16 / 36 of the direct count, blocks 3 to 5 (F(4x4, 3x3)) 36 / 144.
        let direct = vgg16_gflop([256, 256]);
        let pairs_1_2 = [
            (3.0, 64.0, 256.0),
            (64.0, 64.0, 256.0),
            (64.0, 128.0, 128.0),
            (128.0, 128.0, 128.0),
        ];
        let direct_1_2: f64 = pairs_1_2
            .iter()
            .map(|(i, o, s)| 2.0 * 9.0 * i * o * s * s / 1e9)
            .sum();
        let forward = vgg16_done_gflop([256, 256], None);
        let want = direct_1_2 * 16.0 / 36.0 + (direct - direct_1_2) * 0.25;
        assert!((forward - want).abs() < 1e-9, "{forward} vs {want}");
        // From block5_conv1 (layer 14): three kernel gradients at 16x16, two input gradients.
        let block5 = 2.0 * 9.0 * 512.0 * 512.0 * 256.0 / 1e9;
        let cut = crate::backbone::Cutoff::resolve(find_vgg16(), "block5_conv1")
            .unwrap()
            .index;
        let step = vgg16_done_gflop([256, 256], Some(cut));
        // Trainable, block 5 runs F(2x2): its forward 16/36 instead of 1/4 of the direct count.
        let want = forward
            + 3.0 * block5 * (16.0 / 36.0 - 0.25)
            + 3.0 * block5
            + 2.0 * block5 * 16.0 / 36.0;
        assert!((step - want).abs() < 1e-6, "{step} vs {want}");
        // Map sizes that are no multiple of the tile round their tiles up: 150x150 (maps of
        // 150, 75, 37, 18 and 9) does more.
        let odd = vgg16_done_gflop([150, 150], None) / vgg16_gflop([150, 150]);
        assert!(odd > 0.35 && odd < 0.37, "{odd}");
        // F(4x4) for many channels on maps where 4x4 tiles need fewer multiplies (3x3, 4x4,
        // 7x7 and more; 5x5 and 6x6 tie); F(2x2) for few channels, and for 1x1 and 2x2 maps.
        assert_eq!(Tile::for_layer(512, 512, [9, 9]), Tile::F4);
        assert_eq!(Tile::for_layer(128, 256, [37, 37]), Tile::F4);
        assert_eq!(Tile::for_layer(128, 128, [75, 75]), Tile::F2);
        assert_eq!(Tile::for_layer(512, 512, [2, 2]), Tile::F2);
    }

    fn find_vgg16() -> &'static crate::backbone::BackboneDef {
        crate::backbone::find("vgg16").unwrap()
    }
}
