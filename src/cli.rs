//! Command line: `runner <experiment.toml>` runs it; `check` validates; `plan` prints the model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use tracing::info;

use crate::assets::Locations;
use crate::device::{self, DeviceChoice};
use crate::head::Shape;
use crate::plan::{self, Plan};
use crate::spec::load;

/// Transfer learning on images from a TOML file.
#[derive(Debug, Parser)]
#[command(name = "runner", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Experiment file to run (same as `runner run FILE`).
    experiment: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
}

/// Options shared by every command.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Compute device.
    #[arg(long, global = true, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Override a spec value, e.g. `--set optimizer.lr=1e-4` (repeatable; wins over the file
    /// and RUNNER_* variables).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Folder for run results.
    #[arg(long, global = true, env = "RUNNER_RESULTS", default_value = "results")]
    results: PathBuf,
    /// Local asset mirror with weights/ and data/ (default: $RUNNER_ASSETS).
    #[arg(long, global = true, value_name = "DIR")]
    assets: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train an experiment and write results/<run_id>.parquet.
    Run {
        /// The experiment file.
        experiment: PathBuf,
    },
    /// Validate experiment files without running them.
    Check {
        /// Experiment files.
        #[arg(required = true)]
        experiments: Vec<PathBuf>,
    },
    /// Print the model (layers, output shapes, parameters, frozen and trainable) without training.
    Plan {
        /// The experiment file.
        experiment: PathBuf,
    },
    /// Measure decoding, augmentation and the training step on the experiment's data; prints a table.
    Bench {
        /// The experiment file.
        experiment: PathBuf,
        /// Training steps to time.
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// Write a grid of augmented versions of a few training images (one row per image: the
    /// original, then one augmented version per column).
    AugmentPreview {
        /// The experiment file (needs an [augment] section).
        experiment: PathBuf,
        /// The PNG to write.
        #[arg(long, default_value = "augment-preview.png")]
        out: PathBuf,
        /// Rows: images picked evenly across train/.
        #[arg(long, default_value_t = 4)]
        images: usize,
        /// Augmented versions per image.
        #[arg(long, default_value_t = 7)]
        variants: usize,
    },
}

/// A failure with its exit code: 2 for bad input found before running, 1 for a failed run.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failure {
    /// Process exit code.
    pub code: u8,
    /// What went wrong.
    pub error: anyhow::Error,
}

fn bad_input(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        error: e.into(),
    }
}

fn failed(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 1,
        error: e.into(),
    }
}

/// Loads and validates one experiment file.
pub fn load_plan(path: &Path, common: &Common) -> Result<Plan, Failure> {
    let loaded = load::load(path, &common.sets).map_err(bad_input)?;
    plan::build(&loaded, &Locations::new(common.assets.clone())).map_err(bad_input)
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<(), Failure> {
    let common = cli.common;
    match (cli.command, cli.experiment) {
        (Some(Command::Run { experiment }), _) | (None, Some(experiment)) => {
            run_experiment(&experiment, &common)
        }
        (Some(Command::Check { experiments }), _) => check(&experiments, &common),
        (Some(Command::Plan { experiment }), _) => {
            let plan = load_plan(&experiment, &common)?;
            print!("{}", summary(&plan));
            Ok(())
        }
        (
            Some(Command::AugmentPreview {
                experiment,
                out,
                images,
                variants,
            }),
            _,
        ) => {
            let plan = load_plan(&experiment, &common)?;
            let grid =
                crate::data::preview::grid(&plan, images.max(1), variants).map_err(bad_input)?;
            crate::data::preview::write(&grid, &out).map_err(failed)?;
            println!(
                "{}: {} images x {} augmented versions",
                out.display(),
                images.max(1),
                variants
            );
            Ok(())
        }
        (Some(Command::Bench { experiment, steps }), _) => {
            let plan = load_plan(&experiment, &common)?;
            let (device, name) = device::select(common.device).map_err(bad_input)?;
            println!(
                "runner bench {} on {name}, {} ({} cores)",
                experiment.display(),
                chrono::Utc::now().format("%Y-%m-%d"),
                std::thread::available_parallelism().map_or(1, |n| n.get())
            );
            print!(
                "{}",
                crate::bench::run(&plan, &device, steps.max(1)).map_err(bad_input)?
            );
            Ok(())
        }
        (None, None) => Err(bad_input(anyhow::anyhow!(
            "no experiment given; try `runner experiments/feature_extraction.toml` or `runner --help`"
        ))),
    }
}

fn check(files: &[PathBuf], common: &Common) -> Result<(), Failure> {
    let mut failures = 0;
    for f in files {
        match load_plan(f, common) {
            Ok(p) => println!(
                "{}: ok ({} classes, config {})",
                f.display(),
                p.classes.len(),
                p.config_hash
            ),
            Err(e) => {
                failures += 1;
                eprintln!("{}", e.error);
            }
        }
    }
    if failures > 0 {
        return Err(bad_input(anyhow::anyhow!(
            "{failures} of {} experiment files have problems",
            files.len()
        )));
    }
    Ok(())
}

/// A run id: `<experiment>-<UTC yyyymmdd-hhmmss>-<config hash prefix>`.
pub fn run_id(plan: &Plan, now: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "{}-{}-{}",
        plan.spec.experiment.name,
        now.format("%Y%m%d-%H%M%S"),
        &plan.config_hash[..8]
    )
}

/// `id`, or `id-2`, `id-3`... when a run with that id already left files in `dir`.
pub fn unique_run_id(dir: &Path, id: String) -> String {
    let taken = |c: &str| {
        ["parquet", "toml", "log.jsonl"]
            .iter()
            .any(|ext| dir.join(format!("{c}.{ext}")).exists())
    };
    if !taken(&id) {
        return id;
    }
    (2..)
        .map(|n| format!("{id}-{n}"))
        .find(|c| !taken(c))
        .unwrap_or(id)
}

fn run_experiment(path: &Path, common: &Common) -> Result<(), Failure> {
    let plan = load_plan(path, common)?;
    let (device, device_name) = device::select(common.device).map_err(bad_input)?;
    let now = chrono::Utc::now();
    let id = unique_run_id(&common.results, run_id(&plan, now));
    let log_path = common.results.join(format!("{id}.log.jsonl"));
    crate::logging::open_run_log(&log_path).map_err(|e| {
        failed(anyhow::anyhow!(
            "{}: cannot write the run log: {e}",
            log_path.display()
        ))
    })?;
    let started = Instant::now();
    info!(run = %id, experiment = %plan.spec.experiment.name, file = %path.display(), device = device_name, config_hash = %plan.config_hash, "Run started.");
    let result = crate::train::run(&plan, &device, &id, |_| {});
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(run = %id, error = %e, "Run failed.");
            crate::logging::close_run_log();
            // Bad images and weights are input problems, found before any training step.
            return Err(bad_input(e));
        }
    };
    let written = crate::results::write_run(
        &common.results,
        &plan,
        &id,
        &now.to_rfc3339(),
        &outcome.epochs,
        outcome.test,
        outcome.skipped_images,
    )
    .map_err(failed)?;
    let best = outcome
        .epochs
        .iter()
        .map(|m| m.val_acc)
        .fold(f64::NAN, f64::max);
    let last = outcome.epochs.last();
    info!(
        run = %id,
        results = %written.display(),
        best_val_acc = best,
        final_val_acc = last.map(|m| m.val_acc),
        test_acc = outcome.test.map(|t| t.acc),
        seconds = started.elapsed().as_secs_f64(),
        "Run finished."
    );
    crate::logging::close_run_log();
    println!(
        "{id}: best val_acc {best:.4}, final val_acc {:.4}, test_acc {} -> {}",
        last.map_or(f64::NAN, |m| m.val_acc),
        outcome
            .test
            .map_or("n/a".into(), |t| format!("{:.4}", t.acc)),
        written.display()
    );
    Ok(())
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A Keras-style summary of the plan's model.
pub fn summary(plan: &Plan) -> String {
    let def = plan.backbone;
    let [h, w] = plan.spec.data.image_size;
    let mut rows: Vec<(String, String, usize, &str)> = Vec::new();
    let mut shape = [3, h, w];
    let (mut frozen, mut trainable) = (0, 0);
    for (i, l) in def.layers().iter().enumerate() {
        shape = l.output_shape(shape);
        let p = l.num_params();
        let is_frozen = i < plan.cutoff.index;
        if is_frozen {
            frozen += p;
        } else {
            trainable += p;
        }
        let state = match (p, is_frozen) {
            (0, _) => "",
            (_, true) => "frozen",
            (_, false) => "trainable",
        };
        rows.push((
            format!(
                "{} ({})",
                l.name,
                if p > 0 { "Conv2D" } else { "MaxPooling2D" }
            ),
            Shape::Map(shape).keras(),
            p,
            state,
        ));
    }
    for (i, (layer, (out, p))) in plan
        .spec
        .head
        .layers
        .iter()
        .zip(&plan.head_shapes)
        .enumerate()
    {
        trainable += p;
        rows.push((
            format!("head_{i} ({})", layer.describe()),
            out.keras(),
            *p,
            if *p > 0 { "trainable" } else { "" },
        ));
    }
    let mut s = format!(
        "Experiment: {} ({})\nBackbone: {} weights {} preprocess {}, trainable from {}\nInput: ({h}, {w}, 3), {} classes: {}\n\n",
        plan.spec.experiment.name,
        plan.file.display(),
        def.name,
        plan.weights.display(),
        plan.preprocess.as_str(),
        plan.cutoff.label,
        plan.classes.len(),
        plan.classes.join(", ")
    );
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(20).max(20);
    s += &format!(
        "{:<width$}  {:<16}  {:>12}  {}\n",
        "Layer (type)", "Output Shape", "Param #", ""
    );
    s += &format!("{}\n", "=".repeat(width + 44));
    for (name, out, p, state) in &rows {
        s += &format!(
            "{name:<width$}  {out:<16}  {:>12}  {state}\n",
            thousands(*p)
        );
    }
    s += &format!("{}\n", "=".repeat(width + 44));
    let base = def.num_params();
    s += &format!(
        "Total params: {}\nTrainable params: {}\nNon-trainable params: {}\nBackbone params: {} (output {}); head params: {}\n",
        thousands(frozen + trainable),
        thousands(trainable),
        thousands(frozen),
        thousands(base),
        Shape::Map(plan.base_output).keras(),
        thousands(plan.head_shapes.iter().map(|(_, p)| p).sum())
    );
    let frozen_tensors: Vec<String> = def
        .expected_tensors()
        .into_iter()
        .filter(|(name, _)| {
            def.layers()
                .iter()
                .position(|l| name.starts_with(&format!("{}.", l.name)))
                .is_some_and(|i| i < plan.cutoff.index)
        })
        .map(|(n, _)| n)
        .collect();
    s += &format!(
        "Frozen tensors ({}): {}\n",
        frozen_tensors.len(),
        if frozen_tensors.is_empty() {
            "none".into()
        } else {
            frozen_tensors.join(", ")
        }
    );
    s
}
