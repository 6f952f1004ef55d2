//! `runner bench`: the input pipeline against the model, on an experiment's real data.
//!
//! Prints one table: decode + resize throughput over every split, augmentation throughput from
//! memory (all cores, as in training), the training step of the experiment with augmentation
//! (augment, frozen base, trainable part), their ratio, and the peak resident memory.

pub mod workloads;

use std::time::Instant;

use burn::module::Module;
use burn::prelude::Device;

use crate::data::{augment, folder};
use crate::model::TransferModel;
use crate::plan::Plan;
use crate::spec::AugmentSpec;
use crate::train::{self, TrainError, TrainSource};

/// Peak resident memory of this process so far, from `/proc/self/status` (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs the benchmark and returns the table.
pub fn run(plan: &Plan, device: &Device, steps: usize) -> Result<String, TrainError> {
    let spec = &plan.spec;
    let size = spec.data.image_size;
    let mut rows: Vec<(String, String)> = Vec::new();

    let t = Instant::now();
    let mut images = Vec::new();
    for listing in &plan.splits {
        images.push(folder::load_split(listing, size, spec.data.interpolation).0);
    }
    let decoded: usize = images.iter().map(|i| i.len()).sum();
    let decode_rate = decoded as f64 / t.elapsed().as_secs_f64();
    rows.push((
        format!(
            "decode + resize to {}x{} ({decoded} images, {} threads)",
            size[0],
            size[1],
            rayon::current_num_threads()
        ),
        format!("{decode_rate:.0} images/s"),
    ));

    let aug = spec.augment.clone().unwrap_or_else(AugmentSpec::notebook);
    let train_images = &images[0];
    let all: Vec<usize> = (0..train_images.len()).collect();
    let t = Instant::now();
    let epochs = 2;
    for e in 1..=epochs {
        std::hint::black_box(augment::augment_batch(
            train_images,
            &all,
            &aug,
            spec.experiment.seed,
            e,
        )?);
    }
    let aug_rate = (epochs * all.len()) as f64 / t.elapsed().as_secs_f64();
    rows.push((
        format!(
            "augmentation from memory ({} images x {epochs} epochs)",
            all.len()
        ),
        format!("{aug_rate:.0} images/s"),
    ));

    crate::device::seed_host(spec.experiment.seed);
    let model = TransferModel::build(plan, device)?;
    let val = &images[1];
    let few: Vec<usize> = (0..spec.data.batch_size.min(val.len())).collect();
    let small = val.subset(&few);
    let val_feats = train::features::extract(&model, &small, plan, device, "bench", None).map_err(
        |e| match e {
            train::ExtractError::Data(e) => TrainError::Data(e),
            train::ExtractError::Interrupted => unreachable!("no interrupt flag was given"),
        },
    )?;
    let mut bench_plan = plan.clone();
    bench_plan.phases.truncate(1);
    bench_plan.phases[0].epochs = 1;
    bench_plan.spec.train.steps_per_epoch = Some(steps);
    let source = TrainSource::Augmented {
        images: train_images,
        spec: &aug,
        frozen: model.valid(),
    };
    let t = Instant::now();
    let (_, _) = train::fit(model, &source, &val_feats, &bench_plan, device, "bench");
    let secs = t.elapsed().as_secs_f64();
    let per_step = secs / steps as f64;
    let train_rate = (steps * spec.data.batch_size) as f64 / secs;
    rows.push((
        format!(
            "training step, augmented, trainable from {} (batch {}, {steps} steps)",
            plan.cutoff.label, spec.data.batch_size
        ),
        format!("{per_step:.2} s/step = {train_rate:.1} images/s"),
    ));
    let epoch_steps = spec
        .train
        .steps_per_epoch
        .unwrap_or_else(|| train_images.len().div_ceil(spec.data.batch_size));
    rows.push((
        format!("one epoch ({epoch_steps} steps), estimated"),
        format!("{:.0} s", per_step * epoch_steps as f64),
    ));
    rows.push((
        "augmentation / training throughput".into(),
        format!("{:.0}x", aug_rate / train_rate),
    ));
    if let Some(mib) = peak_rss_mib() {
        rows.push((
            "peak resident memory (whole benchmark)".into(),
            format!("{mib:.0} MiB"),
        ));
    }

    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
    let mut out = format!(
        "{:<width$} | result\n{}-|-{}\n",
        "measure",
        "-".repeat(width),
        "-".repeat(30)
    );
    for (k, v) in rows {
        out += &format!("{k:<width$} | {v}\n");
    }
    Ok(out)
}
