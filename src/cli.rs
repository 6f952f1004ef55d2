//! Command line: `runner <experiment.toml>` runs it; `check` validates; `plan` prints the model.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use tracing::info;

use crate::assets::Locations;
use crate::device::{self, DeviceChoice};
use crate::head::Shape;
use crate::plan::{self, Plan};
use crate::spec::load;
use crate::train::{self, checkpoint};

/// Transfer learning on images from a TOML file.
#[derive(Debug, Parser)]
#[command(name = "runner", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Experiment file to run (same as `runner run FILE`).
    experiment: Option<PathBuf>,
    /// Continue the latest unfinished run of this experiment from its checkpoint.
    #[arg(long)]
    resume: bool,
    /// Run every experiment (*.toml) of the folder given, and every point of their [sweep] grids.
    #[arg(long)]
    sweep: bool,
    #[command(flatten)]
    sweep_options: SweepOptions,
    #[command(flatten)]
    common: Common,
}

/// Options of a sweep.
#[derive(Debug, Args, Clone, Default)]
pub struct SweepOptions {
    /// Rerun points whose config already completed in the results folder.
    #[arg(long)]
    force: bool,
    /// Run only shard i of n (0-based: points i, i+n, ...), e.g. --shard $SLURM_ARRAY_TASK_ID/8.
    #[arg(long, value_name = "I/N", value_parser = crate::sweep::parse_shard)]
    shard: Option<(usize, usize)>,
}

/// Options shared by every command.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Compute device.
    #[arg(long, global = true, value_enum, default_value_t = DeviceChoice::Auto)]
    pub(crate) device: DeviceChoice,
    /// Override a spec value, e.g. `--set optimizer.lr=1e-4` (repeatable; wins over the file
    /// and RUNNER_* variables).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub(crate) sets: Vec<String>,
    /// Folder for run results.
    #[arg(long, global = true, env = "RUNNER_RESULTS", default_value = "results")]
    pub(crate) results: PathBuf,
    /// Local asset mirror with weights/ and data/ (default: $RUNNER_ASSETS).
    #[arg(long, global = true, value_name = "DIR")]
    pub(crate) assets: Option<PathBuf>,
    /// Folder of the feature cache (default: $XDG_CACHE_HOME/runner/features or
    /// ~/.cache/runner/features).
    #[arg(long, global = true, env = "RUNNER_CACHE", value_name = "DIR")]
    pub(crate) cache: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train an experiment and write results/<run_id>.parquet.
    Run {
        /// The experiment file.
        experiment: PathBuf,
        /// Continue the latest unfinished run of this experiment from its checkpoint.
        #[arg(long)]
        resume: bool,
    },
    /// Run every experiment of folders (or files), and every point of their [sweep] grids.
    Sweep {
        /// Folders of experiments, or experiment files.
        #[arg(required = true)]
        targets: Vec<PathBuf>,
        #[command(flatten)]
        options: SweepOptions,
    },
    /// One row per run (or per epoch) of a results folder, through a polars lazy scan.
    Results {
        /// The results folder (default: --results).
        dir: Option<PathBuf>,
        /// Keep rows where `COLUMN OP VALUE` holds (OP: = != > >= < <= ~), repeatable.
        #[arg(long, value_name = "EXPR")]
        filter: Vec<String>,
        /// Sort by this column (`-col` for descending).
        #[arg(long, value_name = "COLUMN", allow_hyphen_values = true)]
        sort: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = crate::results::query::Format::Table)]
        format: crate::results::query::Format,
        /// One row per epoch instead of one per run.
        #[arg(long)]
        epochs: bool,
    },
    /// Plot training and validation accuracy and loss per epoch (PNG or SVG).
    Plot {
        /// Run ids, run tables (.parquet) or results folders (default: --results).
        runs: Vec<String>,
        /// The image to write: .png or .svg.
        #[arg(long, default_value = "curves.png")]
        out: PathBuf,
        /// Exponential moving average factor, e.g. 0.8 (the notebook's).
        #[arg(long, value_name = "FACTOR")]
        smooth: Option<f64>,
    },
    /// Print a run's log readably; --follow keeps printing until the run ends.
    Logs {
        /// The run id.
        run_id: String,
        /// Keep reading new events until the run finishes.
        #[arg(long, short)]
        follow: bool,
    },
    /// Put named assets (weights, datasets) into weights/ and data/, verified, from the local
    /// mirror, an HTTP mirror or the original publisher; `--list` shows the catalogue.
    Fetch {
        /// Asset names, e.g. vgg16/imagenet cats_and_dogs_small.
        #[arg(value_name = "ASSETS")]
        names: Vec<String>,
        /// List the catalogue.
        #[arg(long)]
        list: bool,
        /// Base URL of an HTTP mirror laid out like the asset folder.
        #[arg(long, env = "RUNNER_ASSETS_URL", value_name = "URL")]
        assets_url: Option<String>,
        /// Fetch the originals (Keras', torchvision's, Microsoft's files) through this base URL
        /// instead of their own hosts: a caching proxy that keeps their paths.
        #[arg(long, env = "RUNNER_UPSTREAM_BASE", value_name = "URL")]
        upstream_base: Option<String>,
        /// The project folder the files go into (under weights/ and data/).
        #[arg(long, default_value = ".", value_name = "DIR")]
        into: PathBuf,
    },
    /// Continue an interrupted run from its last checkpoint (refused if the config changed).
    Resume {
        /// The run id (the name of its results/<run_id>.parquet).
        run_id: String,
    },
    /// Print class probabilities for images with a trained run's model.
    Predict {
        /// The run id.
        run_id: String,
        /// Image files or folders (searched recursively).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Which weights: the final model, or the best or last checkpoint.
        #[arg(long, value_enum, default_value_t = crate::predict::Which::Final)]
        weights: crate::predict::Which,
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
    /// Run one workload of the PyTorch comparison (`bench/compare.py` runs them all): prints a
    /// JSON line with its timings and writes `<out>/<workload>.safetensors` for the check.
    BenchWorkload {
        /// matmul, vgg16_forward, fine_tune_step, conv_head_step, dense_head_epoch,
        /// fine_tune_epoch, decode_resize, augment or extract (`--set` applies to the
        /// experiments' specs: `--set data.batch_size=64`).
        workload: String,
        /// The folder of the experiments whose plans the workloads use.
        #[arg(long, default_value = "experiments", value_name = "DIR")]
        experiments: PathBuf,
        /// Where the check file goes.
        #[arg(long, default_value = "bench/out", value_name = "DIR")]
        out: PathBuf,
        /// Untimed runs first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Images for the extract (memory) workload and the fine_tune_epoch workload.
        #[arg(long, default_value_t = 4000)]
        images: usize,
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

pub(crate) fn bad_input(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        error: e.into(),
    }
}

pub(crate) fn failed(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 1,
        error: e.into(),
    }
}

/// Loads and validates one experiment file.
pub fn load_plan(path: &Path, common: &Common) -> Result<Plan, Failure> {
    let locations = Locations::new(common.assets.clone());
    load::load_checked(path, &common.sets, &[], |l| plan::build(l, &locations)).map_err(bad_input)
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<(), Failure> {
    let common = cli.common;
    match (cli.command, cli.experiment) {
        (Some(Command::Run { experiment, resume }), _) => {
            run_experiment(&experiment, &common, resume)
        }
        (None, Some(target)) if cli.sweep => crate::sweep::run(
            &[target],
            &common,
            cli.sweep_options.force,
            cli.sweep_options.shard,
        ),
        (None, Some(experiment)) => {
            // A file with a [sweep] grid runs as a sweep.
            let grid = load::grid(&experiment);
            if matches!(&grid, Err(load::SpecError::Invalid(_)))
                || grid.is_ok_and(|g| g.iter().any(|p| !p.is_empty()))
            {
                return crate::sweep::run(
                    &[experiment],
                    &common,
                    cli.sweep_options.force,
                    cli.sweep_options.shard,
                );
            }
            if let Some((i, n)) = cli.sweep_options.shard {
                return Err(bad_input(anyhow::anyhow!(
                    "--shard {i}/{n}: {} has no [sweep] grid, so there is nothing to shard; --shard applies to a folder, --sweep or a file with a grid",
                    experiment.display()
                )));
            }
            if cli.sweep_options.force {
                return Err(bad_input(anyhow::anyhow!(
                    "--force: {} has no [sweep] grid; --force reruns a sweep's finished points (a single file always runs)",
                    experiment.display()
                )));
            }
            run_experiment(&experiment, &common, cli.resume)
        }
        (Some(Command::Sweep { targets, options }), _) => {
            crate::sweep::run(&targets, &common, options.force, options.shard)
        }
        (
            Some(Command::Results {
                dir,
                filter,
                sort,
                format,
                epochs,
            }),
            _,
        ) => {
            let dir = dir.unwrap_or(common.results.clone());
            let q = crate::results::query::Query {
                filters: filter,
                sort,
                epochs,
                format,
            };
            match crate::results::query::query(&dir, &q).map_err(bad_input)? {
                Some(df) => print!(
                    "{}",
                    crate::results::query::render(&df, format).map_err(failed)?
                ),
                None => eprintln!("no runs in {}", dir.display()),
            }
            Ok(())
        }
        (Some(Command::Plot { runs, out, smooth }), _) => plot(&runs, &out, smooth, &common),
        (Some(Command::Logs { run_id, follow }), _) => {
            let path = common.results.join(format!("{run_id}.log.jsonl"));
            if !path.is_file() {
                return Err(bad_input(anyhow::anyhow!(
                    "{}: no log for run {run_id} in {}",
                    path.display(),
                    common.results.display()
                )));
            }
            match crate::logs::show(&path, follow, &mut std::io::stdout().lock()) {
                // `runner logs RUN | head`: the reader has what it wanted.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r.map_err(|e| failed(anyhow::anyhow!("{}: {e}", path.display()))),
            }
        }
        (Some(Command::Resume { run_id }), _) => resume(&run_id, None, &common),
        (
            Some(Command::Fetch {
                names,
                list,
                assets_url,
                upstream_base,
                into,
            }),
            _,
        ) => fetch(&names, list, [assets_url, upstream_base], &into, &common),
        (
            Some(Command::Predict {
                run_id,
                inputs,
                weights,
            }),
            _,
        ) => predict(&run_id, &inputs, weights, &common),
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
            let train = plan.split("train").expect("the plan requires train/");
            let grid = crate::data::preview::grid(
                &plan.spec,
                &plan.file,
                &train.files,
                images.max(1),
                variants,
            )
            .map_err(bad_input)?;
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
            let selected = device::select(common.device).map_err(bad_input)?;
            if let Some(limit) = selected.max_tensor_bytes {
                fits_on_device(&plan, limit, &selected.name).map_err(bad_input)?;
            }
            let (device, name) = (selected.device, selected.name);
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
        (
            Some(Command::BenchWorkload {
                workload,
                experiments,
                out,
                warmup,
                repeats,
                images,
            }),
            _,
        ) => {
            let selected = device::select(common.device).map_err(bad_input)?;
            let device = selected.device;
            let opts = crate::bench::workloads::Options {
                warmup,
                repeats,
                images,
                sets: common.sets.clone(),
                experiments,
                out: out.clone(),
            };
            let mut report =
                crate::bench::workloads::run(&workload, &opts, &device).map_err(bad_input)?;
            report.device = selected.name;
            crate::bench::workloads::write_check(&report, &out).map_err(failed)?;
            println!("{}", report.json());
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
        // Every point of a `[sweep]` grid is checked as the sweep would run it.
        match crate::sweep::expand_checked(std::slice::from_ref(f), common) {
            Ok(points) if points.len() == 1 && points[0].sets.is_empty() => println!(
                "{}: ok ({} classes, config {})",
                f.display(),
                points[0].plan.classes.len(),
                points[0].plan.config_hash
            ),
            Ok(points) => println!(
                "{}: ok ([sweep] grid of {} points, each checked; {} classes)",
                f.display(),
                points.len(),
                points.first().map_or(0, |p| p.plan.classes.len())
            ),
            Err(problems) => {
                failures += 1;
                eprintln!("{}", problems.join("\n"));
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
        dir.join(c).exists()
            || ["parquet", "toml", "log.jsonl"]
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

/// The default feature cache folder.
fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("runner")
        .join("features")
}

fn run_experiment(path: &Path, common: &Common, resume_latest: bool) -> Result<(), Failure> {
    let plan = load_plan(path, common)?;
    if resume_latest {
        let id = latest_unfinished(&common.results, &plan.spec.experiment.name)?;
        return resume(&id, Some(path), common);
    }
    fresh(&plan, path, Vec::new(), common).1
}

/// A new run id for `plan`, claimed by creating its folder `results/<run_id>/` (atomic: two
/// processes starting the same experiment in the same second get different ids).
fn claim_run_id(results: &Path, id: String) -> String {
    let _ = std::fs::create_dir_all(results);
    let mut candidate = unique_run_id(results, id.clone());
    for n in 2..10_000 {
        match std::fs::create_dir(results.join(&candidate)) {
            Ok(()) => return candidate,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                candidate = unique_run_id(results, format!("{id}-{n}"));
            }
            Err(_) => return candidate,
        }
    }
    candidate
}

/// Starts a new run of `plan` (from `path`, with the grid values `point_sets`); returns its id
/// and how it ended.
pub(crate) fn fresh(
    plan: &Plan,
    path: &Path,
    point_sets: Vec<String>,
    common: &Common,
) -> (String, Result<(), Failure>) {
    let now = chrono::Utc::now();
    let id = claim_run_id(&common.results, run_id(plan, now));
    let mut sets = point_sets;
    sets.extend(common.sets.iter().cloned());
    let origin = train::Origin {
        file: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        sets,
        config: crate::results::config_toml(plan),
        config_hash: plan.config_hash.clone(),
        started_at: now.to_rfc3339(),
        classes: plan.classes.clone(),
    };
    let r = execute(plan, &id, origin, None, common);
    if r.is_err() {
        // A run refused before it wrote anything (no such device, a batch that does not fit)
        // leaves no empty folder behind; `remove_dir` removes only an empty one.
        let _ = std::fs::remove_dir(common.results.join(&id));
    }
    (id, r)
}

/// The newest run of `experiment` in `results` that has a checkpoint and did not finish.
fn latest_unfinished(results: &Path, experiment: &str) -> Result<String, Failure> {
    let mut candidates: Vec<(String, String)> = std::fs::read_dir(results)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let ck = checkpoint::last_path(results, &name);
                    (name.starts_with(&format!("{experiment}-")) && ck.is_file()).then(|| {
                        let started = checkpoint::read(&ck)
                            .map(|c| c.state.origin.started_at)
                            .unwrap_or_default();
                        (started, name)
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    candidates.retain(|(_, id)| run_status(results, id).as_deref() != Some("completed"));
    candidates.sort();
    candidates.pop().map(|(_, id)| id).ok_or_else(|| {
        bad_input(anyhow::anyhow!(
            "--resume: no unfinished run of experiment \"{experiment}\" with a checkpoint in {}",
            results.display()
        ))
    })
}

/// The `status` of a run's results table, if it has one.
fn run_status(results: &Path, id: &str) -> Option<String> {
    let (df, _) = crate::results::read_run(&results.join(format!("{id}.parquet"))).ok()?;
    let col = df.column("status").ok()?;
    col.str().ok()?.get(0).map(str::to_string)
}

/// Every `key.path = value` of a TOML document.
fn flatten(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        toml::Value::Array(a) if a.iter().any(|x| x.is_table()) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The keys whose values differ between two resolved configs: `key: old -> new`.
pub fn config_drift(old: &str, new: &str) -> Vec<String> {
    let parse = |s: &str| {
        let mut m = std::collections::BTreeMap::new();
        if let Ok(v) = toml::from_str::<toml::Value>(s) {
            flatten("", &v, &mut m);
        }
        m
    };
    let (a, b) = (parse(old), parse(new));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
            format!("{k}: {} -> {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

/// Continues run `id` from its last checkpoint, after checking that the experiment still
/// resolves to the same config.
pub(crate) fn resume(id: &str, file: Option<&Path>, common: &Common) -> Result<(), Failure> {
    let ck_path = checkpoint::last_path(&common.results, id);
    if !ck_path.exists() {
        let known = common.results.join(id).is_dir()
            || common.results.join(format!("{id}.parquet")).is_file();
        return Err(bad_input(if known {
            anyhow::anyhow!(
                "run {id} has no checkpoint ({} is not there): it stopped before its first one (written after each epoch, and on Ctrl-C), so there is nothing to resume; start the experiment again",
                ck_path.display()
            )
        } else {
            anyhow::anyhow!(
                "no run {id} in {}; `runner results {}` lists the runs there",
                common.results.display(),
                common.results.display()
            )
        }));
    }
    // Temporary files a killed process left in the run's folder (this process now owns it).
    crate::results::remove_stale_temporaries(&checkpoint::run_dir(&common.results, id), "");
    crate::results::remove_stale_temporaries(&common.results, &format!("{id}."));
    let ck = checkpoint::read(&ck_path).map_err(bad_input)?;
    if run_status(&common.results, id).as_deref() == Some("completed") {
        return Err(bad_input(anyhow::anyhow!(
            "run {id} has already completed; nothing to resume"
        )));
    }
    let origin = ck.state.origin.clone();
    // The experiment file as given now, else the one the run started from, else the config
    // the run stored beside its results.
    let stored = common.results.join(format!("{id}.toml"));
    let source = [file.map(Path::to_path_buf), Some(origin.file.clone())]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or(stored);
    let mut sets = origin.sets.clone();
    sets.extend(common.sets.iter().cloned());
    let with_sets = Common {
        sets,
        ..common.clone()
    };
    let plan = load_plan(&source, &with_sets)?;
    let now = crate::results::config_toml(&plan);
    let drift = config_drift(&origin.config, &now);
    if !drift.is_empty() {
        return Err(bad_input(anyhow::anyhow!(
            "{}: the config changed since run {id} started, refusing to resume ({} key{} differ{}; run it as a new experiment instead):\n  {}",
            source.display(),
            drift.len(),
            if drift.len() == 1 { "" } else { "s" },
            if drift.len() == 1 { "s" } else { "" },
            drift.join("\n  ")
        )));
    }
    execute(&plan, id, origin, Some(ck), common)
}

/// Installs the Ctrl-C (and SIGTERM) handling: the first signal sets the flag (the run finishes
/// its step, checkpoints and stops); a second one exits at once.
fn interrupt_flag() -> Option<Arc<AtomicBool>> {
    // Once per process: a sweep runs many experiments, and a Ctrl-C stops it as a whole.
    static FLAG: std::sync::OnceLock<Option<Arc<AtomicBool>>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone()).ok()?;
            signal_hook::flag::register(sig, flag.clone()).ok()?;
        }
        Some(flag)
    })
    .clone()
}

fn fetch(
    names: &[String],
    list: bool,
    [url, upstream_base]: [Option<String>; 2],
    into: &Path,
    common: &Common,
) -> Result<(), Failure> {
    use crate::assets::{CATALOGUE, find_asset};
    if list || names.is_empty() {
        for a in &CATALOGUE {
            let mirror = match &a.files {
                Some(crate::assets::AssetFiles::One { path, .. }) => path.to_string(),
                Some(crate::assets::AssetFiles::Listed { dir, .. }) => format!("{dir}/"),
                None => "-".into(),
            };
            println!(
                "{:<22} {}\n{:<22} mirror: {mirror}\n{:<22} original: {} -> {}",
                a.name, a.description, "", "", a.upstream.url, a.upstream.path
            );
        }
        return Ok(());
    }
    let mut assets = Vec::new();
    for n in names {
        let known: Vec<&str> = CATALOGUE.iter().map(|a| a.name).collect();
        assets.push(find_asset(n).ok_or_else(|| {
            bad_input(anyhow::anyhow!(
                "unknown asset \"{n}\"{}; known assets: {}",
                load::closest(n, &known),
                known.join(", ")
            ))
        })?);
    }
    let sources = crate::fetch::Sources {
        mirror: Locations::new(common.assets.clone()).mirror,
        url,
        upstream_base,
    };
    for a in assets {
        let [present, copied, downloaded] =
            crate::fetch::fetch(a, into, &sources).map_err(|e| match e {
                crate::fetch::FetchError::Unavailable(_) => bad_input(e),
                _ => failed(e),
            })?;
        println!(
            "{}: {present} already present, {copied} copied from the mirror, {downloaded} downloaded (all verified)",
            a.name
        );
    }
    Ok(())
}

fn plot(runs: &[String], out: &Path, smooth: Option<f64>, common: &Common) -> Result<(), Failure> {
    if let Some(f) = smooth.filter(|f| !(0.0..1.0).contains(f)) {
        return Err(bad_input(anyhow::anyhow!(
            "--smooth {f}: the factor must be in [0, 1), e.g. 0.8"
        )));
    }
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if ext != "png" && ext != "svg" {
        return Err(bad_input(anyhow::anyhow!(
            "--out {}: runner plots to .png or .svg files, not \".{ext}\"",
            out.display()
        )));
    }
    let targets: Vec<String> = if runs.is_empty() {
        vec![common.results.display().to_string()]
    } else {
        runs.to_vec()
    };
    let mut files = Vec::new();
    for t in &targets {
        let p = PathBuf::from(t);
        if p.is_dir() {
            files.extend(crate::results::query::run_files(&p));
        } else if p.is_file() {
            files.push(p);
        } else {
            let f = common.results.join(format!("{t}.parquet"));
            if !f.is_file() {
                return Err(bad_input(anyhow::anyhow!(
                    "{t}: not a run id in {}, a run table or a results folder",
                    common.results.display()
                )));
            }
            files.push(f);
        }
    }
    if files.is_empty() {
        return Err(bad_input(anyhow::anyhow!(
            "no runs to plot in {}",
            targets.join(", ")
        )));
    }
    let curves = crate::plot::load(&files).map_err(bad_input)?;
    crate::plot::plot(&curves, out, smooth).map_err(failed)?;
    println!("{}: {} runs", out.display(), curves.len());
    Ok(())
}

/// Refuses a batch whose largest activation is more than one tensor may take on the device (a
/// GPU adapter's storage-buffer binding limit), naming the keys and the batch size that fits.
fn fits_on_device(plan: &Plan, limit: u64, device: &str) -> anyhow::Result<()> {
    let [h, w] = plan.spec.data.image_size;
    let per_image = plan.backbone.largest_activation([h, w]) as u64 * 4;
    let batch = plan.spec.data.batch_size as u64;
    if per_image * batch <= limit {
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let fit = limit / per_image.max(1);
    let advice = if fit >= 1 {
        format!("use data.batch_size = {fit} or less, or a smaller data.image_size")
    } else {
        "even one image does not fit: use a smaller data.image_size".to_string()
    };
    anyhow::bail!(
        "{}: data.batch_size = {batch} with data.image_size = [{h}, {w}]: the largest activation of {} takes {:.0} MiB per batch, more than the {:.0} MiB one tensor may take on {device}; {advice}",
        plan.file.display(),
        plan.backbone.name,
        mib(per_image * batch),
        mib(limit)
    )
}

fn execute(
    plan: &Plan,
    id: &str,
    origin: train::Origin,
    resume_from: Option<train::Checkpoint>,
    common: &Common,
) -> Result<(), Failure> {
    let selected = device::select(common.device).map_err(bad_input)?;
    if let Some(limit) = selected.max_tensor_bytes {
        fits_on_device(plan, limit, &selected.name).map_err(bad_input)?;
    }
    let (device, device_name) = (selected.device, selected.name.as_str());
    let log_path = common.results.join(format!("{id}.log.jsonl"));
    crate::logging::open_run_log(&log_path).map_err(|e| {
        failed(anyhow::anyhow!(
            "{}: cannot write the run log: {e}",
            log_path.display()
        ))
    })?;
    let started = Instant::now();
    let resuming = resume_from.is_some();
    info!(run = %id, experiment = %plan.spec.experiment.name, file = %plan.file.display(), device = device_name, config_hash = %plan.config_hash, resuming, "Run started.");
    let cache_dir = match plan.spec.train.cache {
        crate::spec::CacheMode::Off => None,
        crate::spec::CacheMode::Auto => {
            Some(common.cache.clone().unwrap_or_else(default_cache_dir))
        }
    };
    let opts = train::RunOptions {
        run_id: id.to_string(),
        results: common.results.clone(),
        origin: origin.clone(),
        cache: train::FeatureCache::new(cache_dir),
        resume: resume_from,
        interrupt: interrupt_flag(),
    };
    let results = &common.results;
    // The last progress written, so that a run stopped by a write error (a full disk) is
    // recorded as failed, with the reason, instead of staying `running`.
    let last = std::cell::RefCell::new(None::<train::Progress>);
    let result = train::run(plan, &device, opts, |progress| {
        *last.borrow_mut() = Some(progress.clone());
        if let Err(e) = crate::results::write_run(
            results,
            plan,
            id,
            &origin.started_at,
            &progress.record(),
            None,
        ) {
            tracing::warn!(run = %id, error = %e, "Cannot write the results table.");
        }
    });
    let record_failed = |progress: Option<&train::Progress>, e: &dyn std::fmt::Display| {
        let mut p = progress.cloned().unwrap_or_default();
        p.status = train::Status::Failed;
        p.error = Some(e.to_string());
        if let Err(w) =
            crate::results::write_run(results, plan, id, &origin.started_at, &p.record(), None)
        {
            tracing::warn!(run = %id, error = %w, "Cannot record the failed run either.");
        }
    };
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(run = %id, error = %e, "Run failed.");
            crate::logging::close_run_log();
            return Err(match e {
                // Bad images and weights are input problems, found before any training step.
                train::TrainError::Data(_)
                | train::TrainError::Weights(_)
                | train::TrainError::EmptyClass { .. }
                | train::TrainError::Restore { .. } => bad_input(e),
                train::TrainError::Write(_) => {
                    record_failed(last.borrow().as_ref(), &e);
                    failed(e)
                }
            });
        }
    };
    let progress = &outcome.progress;
    let history = &progress.history;
    let best = crate::metrics::best_val_acc(history);
    match progress.status {
        train::Status::Interrupted => {
            crate::logging::close_run_log();
            return Err(Failure {
                code: 130,
                error: anyhow::anyhow!(
                    "{id}: interrupted after {} epochs (step {} of the next); checkpoint and results written. Resume with: runner resume {id} --results {}",
                    history.len(),
                    progress.step,
                    results.display()
                ),
            });
        }
        train::Status::Diverged => {
            let (epoch, step) = progress.diverged_at.unwrap_or_default();
            crate::logging::close_run_log();
            return Err(failed(anyhow::anyhow!(
                "{id}: diverged at epoch {epoch}, step {step} (the loss is not finite); results written with status \"diverged\". Try a lower learning rate or train.clip_grad_norm."
            )));
        }
        train::Status::Running | train::Status::Completed | train::Status::Failed => {}
    }
    // The model and the predictions first: the table says `completed` only once they are
    // written, so a run whose model could not be saved (a full disk) is never taken as done.
    let fail = |e: &dyn std::fmt::Display| {
        tracing::error!(run = %id, error = %e, "Run failed.");
        record_failed(Some(progress), e);
        crate::logging::close_run_log();
        failed(anyhow::anyhow!("{e}"))
    };
    if !outcome.predictions.is_empty() {
        crate::results::write_predictions(results, id, &plan.classes, &outcome.predictions)
            .map_err(|e| fail(&e))?;
    }
    let model_dir =
        crate::predict::save(results, id, plan, &outcome.model).map_err(|e| fail(&e))?;
    let written = crate::results::write_run(
        results,
        plan,
        id,
        &origin.started_at,
        &progress.record(),
        outcome.test,
    )
    .map_err(|e| fail(&e))?;
    let last = history.last();
    info!(
        run = %id,
        results = %written.display(),
        model = %model_dir.display(),
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

fn predict(
    run_id: &str,
    inputs: &[PathBuf],
    which: crate::predict::Which,
    common: &Common,
) -> Result<(), Failure> {
    let device = device::select(common.device).map_err(bad_input)?.device;
    let (card, model) =
        crate::predict::load(&common.results, run_id, which, &device).map_err(bad_input)?;
    let files = crate::predict::collect_images(inputs).map_err(bad_input)?;
    if files.is_empty() {
        return Err(bad_input(anyhow::anyhow!(
            "no image files ({}) in {}",
            crate::data::folder::IMAGE_EXTENSIONS.join(", "),
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let rows = crate::predict::predict(&card, &model, &files, &device);
    let width = rows
        .iter()
        .map(|(p, _)| p.display().to_string().len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut header = format!("{:<width$}", "path");
    for c in &card.classes {
        header += &format!("  {c:>10}");
    }
    println!("{header}  predicted");
    let mut bad = 0;
    for (path, r) in rows {
        match r {
            Ok(p) => {
                let mut line = format!("{:<width$}", path.display());
                for v in &p {
                    line += &format!("  {v:>10.4}");
                }
                let best = p
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                    .0;
                println!(
                    "{line}  {}",
                    card.classes.get(best).map_or("?", String::as_str)
                );
            }
            Err(e) => {
                bad += 1;
                eprintln!("{}: cannot read: {e}", path.display());
            }
        }
    }
    if bad > 0 {
        return Err(bad_input(anyhow::anyhow!(
            "{bad} of the images could not be read"
        )));
    }
    Ok(())
}

use crate::head::thousands;

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
            format!("{} ({})", l.name, l.kind()),
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
        "Experiment: {} ({})\nBackbone: {} weights {} preprocess {} (its weights' own: {}), trainable from {}\nInput: ({h}, {w}, 3), at least {m}x{m} for {}; {} classes: {}\nLayer names (cutoffs): {} ... {}\n\n",
        plan.spec.experiment.name,
        plan.file.display(),
        def.name,
        plan.weights.display(),
        plan.preprocess.as_str(),
        def.preprocess_for(&plan.weights).as_str(),
        plan.cutoff.label,
        def.name,
        plan.classes.len(),
        plan.classes.join(", "),
        def.layers().first().map_or("", |l| l.name.as_str()),
        def.layers().last().map_or("", |l| l.name.as_str()),
        m = def.min_input,
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
    let frozen_tensors: Vec<String> = if def.family != crate::backbone::Family::Vgg {
        // Every tensor of each frozen layer (BatchNorm statistics included).
        def.layers()[..plan.cutoff.index]
            .iter()
            .map(|l| format!("{}.*", l.name))
            .collect()
    } else {
        def.expected_tensors()
            .into_iter()
            .filter(|(name, _)| {
                def.layers()
                    .iter()
                    .position(|l| name.starts_with(&format!("{}.", l.name)))
                    .is_some_and(|i| i < plan.cutoff.index)
            })
            .map(|(n, _)| n)
            .collect()
    };
    let head_params: usize = plan.head_shapes.iter().map(|(_, p)| p).sum();
    s += &format!("Phases ({}):\n", plan.phases.len());
    for (i, ph) in plan.phases.iter().enumerate() {
        let base_trainable: usize = def.layers()[ph.cutoff.index..]
            .iter()
            .map(|l| l.num_params())
            .sum();
        s += &format!(
            "  {}. {}: {} epochs, trainable from {} ({} trainable params), {} lr {}, schedule {}, {}{}\n",
            i + 1,
            ph.name,
            ph.epochs,
            ph.cutoff.label,
            thousands(base_trainable + head_params),
            ph.optimizer.kind(),
            ph.optimizer.lr(),
            ph.schedule.kind(),
            if ph.augment.is_some() {
                "augmented"
            } else {
                "not augmented (activations at the cutoff computed once)"
            },
            ph.early_stopping
                .as_ref()
                .map_or(String::new(), |e| format!(
                    ", early stopping (patience {})",
                    e.patience
                ))
        );
    }
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
