//! The command line: clap's definitions of every command and option, turned once into
//! [`Settings`] and the commands' own arguments, then one call per command (`run`, `sweep`,
//! `commands`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::assets::Locations;
use crate::device::DeviceChoice;
use crate::failure::{Failure, bad_input};
use crate::settings::Settings;
use crate::spec::load;
use crate::{commands, run, sweep};

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
    /// Also write TensorBoard event files per run, in results/<run_id>/tensorboard/ (Keras'
    /// layout: train/, validation/, test/, and the HParams session), for
    /// `tensorboard --logdir results`.
    #[arg(long, global = true, env = "RUNNER_TENSORBOARD", value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) tensorboard: bool,
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
        /// Only these columns, in this order (comma-separated), e.g.
        /// `--columns experiment,best_val_acc,test_acc`.
        #[arg(long, value_name = "COLUMNS", value_delimiter = ',')]
        columns: Vec<String>,
    },
    /// One self-contained HTML page of a results folder: the runs (sortable, filterable), the
    /// selected runs' curves and config differences, confusion matrices, the misclassified test
    /// images, the failed runs. No network or server needed to open it.
    Report {
        /// The results folder (default: --results).
        dir: Option<PathBuf>,
        /// The page to write (.html).
        #[arg(long, default_value = "report.html")]
        out: PathBuf,
        /// Misclassified test images shown per run, most confidently wrong first.
        #[arg(long, value_name = "N", default_value_t = 24)]
        misclassified: usize,
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
    /// Export a trained run's model: for deployment as ONNX (preprocessing, base, head and
    /// probabilities in one file, checked against runner's own predictions), or as safetensors
    /// (every weight, to reuse as another experiment's `backbone.weights`).
    Export {
        /// The run id.
        run_id: String,
        /// The format.
        #[arg(long, value_enum, default_value_t = crate::export::Format::Onnx)]
        format: crate::export::Format,
        /// Where the file goes (default: results/<run_id>/model.onnx or model.safetensors).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Which weights: the final model, or the best or last checkpoint.
        #[arg(long, value_enum, default_value_t = crate::predict::Which::Final)]
        weights: crate::predict::Which,
        /// Images to check the file on (default: the run's validation split).
        #[arg(long, value_name = "PATH")]
        images: Vec<PathBuf>,
        /// Check on at most this many of them (default: all).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
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
        /// matmul, vgg16_forward, vgg16_layers, fine_tune_step, conv_head_step, dense_head_epoch,
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
    /// Write an experiment file for a data folder (train/, validation/, test/ optional, with one
    /// folder per class): its classes, sizes and loss filled in, commented.
    Init {
        /// The data folder.
        data: PathBuf,
        /// The file to write (default: experiments/<folder name>.toml); never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the shell completion script, e.g. `runner completions bash >
    /// ~/.local/share/bash-completion/completions/runner`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (runner.1 and one runner-COMMAND.1 per command) into a folder, e.g.
    /// `runner manpages ~/.local/share/man/man1`; `man runner` then shows them.
    Manpages {
        /// The folder to write into (created if missing).
        dir: PathBuf,
    },
}
impl Common {
    /// The settings every command is given: the asset mirror resolved, the cache folder's
    /// default filled in.
    pub fn settings(&self) -> Settings {
        Settings {
            device: self.device,
            sets: self.sets.clone(),
            results: self.results.clone(),
            locations: Locations::new(self.assets.clone()),
            cache: self
                .cache
                .clone()
                .unwrap_or_else(crate::settings::default_cache_dir),
            tensorboard: self.tensorboard,
        }
    }
}

/// Runs the parsed command line: its arguments resolved once, then one call per command.
pub fn run(cli: Cli) -> Result<(), Failure> {
    let s = &cli.common.settings();
    let SweepOptions { force, shard } = cli.sweep_options;
    match (cli.command, cli.experiment) {
        (Some(Command::Run { experiment, resume }), _) => {
            run::run_experiment(&experiment, s, resume)
        }
        (None, Some(target)) if cli.sweep => sweep::run(&[target], s, force, shard),
        (None, Some(experiment)) => {
            // A file with a [sweep] grid runs as a sweep.
            let grid = load::grid(&experiment);
            if matches!(&grid, Err(load::SpecError::Invalid(_)))
                || grid.is_ok_and(|g| g.iter().any(|p| !p.is_empty()))
            {
                return sweep::run(&[experiment], s, force, shard);
            }
            if let Some((i, n)) = shard {
                return Err(bad_input(anyhow::anyhow!(
                    "--shard {i}/{n}: {} has no [sweep] grid, so there is nothing to shard; --shard applies to a folder, --sweep or a file with a grid",
                    experiment.display()
                )));
            }
            if force {
                return Err(bad_input(anyhow::anyhow!(
                    "--force: {} has no [sweep] grid; --force reruns a sweep's finished points (a single file always runs)",
                    experiment.display()
                )));
            }
            run::run_experiment(&experiment, s, cli.resume)
        }
        (Some(Command::Sweep { targets, options }), _) => {
            sweep::run(&targets, s, options.force, options.shard)
        }
        (
            Some(Command::Results {
                dir,
                filter,
                sort,
                format,
                epochs,
                columns,
            }),
            _,
        ) => {
            let q = crate::results::query::Query {
                filters: filter,
                sort,
                epochs,
                format,
                columns: columns.iter().map(|c| c.trim().to_string()).collect(),
            };
            commands::results(dir.as_deref().unwrap_or(&s.results), &q)
        }
        (
            Some(Command::Report {
                dir,
                out,
                misclassified,
            }),
            _,
        ) => commands::report_page(dir.as_deref().unwrap_or(&s.results), &out, misclassified),
        (Some(Command::Plot { runs, out, smooth }), _) => commands::plot(&runs, &out, smooth, s),
        (Some(Command::Logs { run_id, follow }), _) => commands::logs(&run_id, follow, s),
        (Some(Command::Resume { run_id }), _) => run::resume(&run_id, None, s),
        (
            Some(Command::Fetch {
                names,
                list,
                assets_url,
                upstream_base,
                into,
            }),
            _,
        ) => commands::fetch(&names, list, [assets_url, upstream_base], &into, s),
        (
            Some(Command::Predict {
                run_id,
                inputs,
                weights,
            }),
            _,
        ) => commands::predict(&run_id, &inputs, weights, s),
        (
            Some(Command::Export {
                run_id,
                format,
                out,
                weights,
                images,
                limit,
            }),
            _,
        ) => commands::export(&run_id, (format, out), weights, (&images, limit), s),
        (Some(Command::Check { experiments }), _) => sweep::check(&experiments, s),
        (Some(Command::Plan { experiment }), _) => commands::plan(&experiment, s),
        (
            Some(Command::AugmentPreview {
                experiment,
                out,
                images,
                variants,
            }),
            _,
        ) => commands::augment_preview(&experiment, &out, images, variants, s),
        (Some(Command::Bench { experiment, steps }), _) => commands::bench(&experiment, steps, s),
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
            let opts = crate::bench::workloads::Options {
                warmup,
                repeats,
                images,
                sets: s.sets.clone(),
                experiments,
                out,
            };
            commands::bench_workload(&workload, &opts, s)
        }
        (Some(Command::Completions { shell }), _) => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "runner", &mut std::io::stdout());
            Ok(())
        }
        (Some(Command::Manpages { dir }), _) => manpages(&dir),
        (Some(Command::Init { data, out }), _) => crate::init::init(&data, out.as_deref()),
        (None, None) => Err(bad_input(anyhow::anyhow!(
            "no experiment given; try `runner experiments/feature_extraction.toml` or `runner --help`"
        ))),
    }
}

/// Writes `runner.1` and one `runner-<command>.1` per command into `dir`.
fn manpages(dir: &std::path::Path) -> Result<(), Failure> {
    let cmd = <Cli as clap::CommandFactory>::command();
    std::fs::create_dir_all(dir)
        .and_then(|()| clap_mangen::generate_to(cmd, dir))
        .map_err(|e| {
            bad_input(anyhow::anyhow!(
                "{}: cannot write the man pages: {e}",
                dir.display()
            ))
        })?;
    println!("man pages written to {}", dir.display());
    Ok(())
}
