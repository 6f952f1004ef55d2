//! The run lifecycle, for a single experiment and for every point of a sweep: a run id claimed
//! in the results folder, a fresh start or a resume (refused when the config drifted), the
//! device chosen and checked, the run log opened, training, and then the truth recorded: the
//! model and predictions before the `completed` table, a failure as `failed` with its error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context;

use tracing::info;

use crate::device;
use crate::failure::{Failure, bad_input, failed};
use crate::plan::{self, Plan};
use crate::settings::Settings;
use crate::spec::load;
use crate::train::{self, checkpoint};

/// Loads and validates one experiment file.
pub fn load_plan(path: &Path, settings: &Settings) -> Result<Plan, Failure> {
    load_point(path, settings, &[])
}

/// [`load_plan`] at a `[sweep]` point (`key=value` items).
fn load_point(path: &Path, settings: &Settings, point: &[String]) -> Result<Plan, Failure> {
    let point = load::parse_point(point).map_err(bad_input)?;
    load::load_checked(path, &settings.sets, &point, |l| {
        plan::build(l, &settings.locations)
    })
    .map_err(bad_input)
}

/// Runs the experiment `path`, or continues its latest unfinished run (`--resume`).
pub fn run_experiment(
    path: &Path,
    settings: &Settings,
    resume_latest: bool,
) -> Result<(), Failure> {
    let plan = load_plan(path, settings)?;
    if resume_latest {
        let id = latest_unfinished(&settings.results, &plan.spec.experiment.name)?;
        return resume(&id, Some(path), settings);
    }
    fresh(&plan, path, Vec::new(), settings).1
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
pub fn fresh(
    plan: &Plan,
    path: &Path,
    point_sets: Vec<String>,
    settings: &Settings,
) -> (String, Result<(), Failure>) {
    let now = chrono::Utc::now();
    let id = claim_run_id(&settings.results, run_id(plan, now));
    let origin = train::Origin {
        file: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        sets: settings.sets.clone(),
        point: point_sets,
        config: crate::results::config_toml(plan),
        config_hash: plan.config_hash.clone(),
        started_at: now.to_rfc3339(),
        classes: plan.classes.clone(),
    };
    let r = execute(plan, &id, origin, None, settings);
    if r.is_err() {
        // A run refused before it wrote anything (no such device, a batch that does not fit)
        // leaves no empty folder behind; `remove_dir` removes only an empty one.
        let _ = std::fs::remove_dir(settings.results.join(&id));
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
    let col = df.column(crate::results::schema::col::STATUS).ok()?;
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

/// Keys that change no number of a run (left out of the drift check).
const NO_NUMBER_KEYS: [&str; 2] = ["train.keep", "data.max_decoded_mib"];

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
        // What a finished run keeps on disk, and whether decoded images are held in memory,
        // change no number: they may change on resume.
        .filter(|k| a.get(*k) != b.get(*k) && !NO_NUMBER_KEYS.contains(&k.as_str()))
        .map(|k| {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
            format!("{k}: {} -> {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

/// Continues run `id` from its last checkpoint, after checking that the experiment still
/// resolves to the same config.
pub fn resume(id: &str, file: Option<&Path>, settings: &Settings) -> Result<(), Failure> {
    let ck_path = checkpoint::last_path(&settings.results, id);
    if !ck_path.exists() {
        let known = settings.results.join(id).is_dir()
            || settings.results.join(format!("{id}.parquet")).is_file();
        return Err(bad_input(if known {
            anyhow::anyhow!(
                "run {id} has no checkpoint ({} is not there): it stopped before its first one (written after each epoch, and on Ctrl-C), so there is nothing to resume; start the experiment again",
                ck_path.display()
            )
        } else {
            anyhow::anyhow!(
                "no run {id} in {}; `runner results {}` lists the runs there",
                settings.results.display(),
                settings.results.display()
            )
        }));
    }
    // Temporary files a killed process left in the run's folder (this process now owns it).
    crate::results::remove_stale_temporaries(&checkpoint::run_dir(&settings.results, id), "");
    crate::results::remove_stale_temporaries(&settings.results, &format!("{id}."));
    let ck = checkpoint::read(&ck_path).map_err(bad_input)?;
    if run_status(&settings.results, id).as_deref() == Some("completed") {
        return Err(bad_input(anyhow::anyhow!(
            "run {id} has already completed; nothing to resume"
        )));
    }
    let origin = ck.state.origin.clone();
    // The experiment file as given now, else the one the run started from, else the config
    // the run stored beside its results.
    let stored = settings.results.join(format!("{id}.toml"));
    let source = [file.map(Path::to_path_buf), Some(origin.file.clone())]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or(stored);
    let mut sets = origin.sets.clone();
    sets.extend(settings.sets.iter().cloned());
    let with_sets = Settings {
        sets,
        ..settings.clone()
    };
    // The grid values go in as the point they were, so the run keeps its `sweep_point`.
    let plan = load_point(&source, &with_sets, &origin.point)?;
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
    execute(&plan, id, origin, Some(ck), settings)
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

/// Refuses a batch whose largest activation is more than one tensor may take on the device (a
/// GPU adapter's storage-buffer binding limit), naming the keys and the batch size that fits.
pub fn fits_on_device(plan: &Plan, limit: u64, device: &str) -> anyhow::Result<()> {
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

/// Trains `plan` as run `id` (fresh, or from `resume_from`) and records how it ended.
fn execute(
    plan: &Plan,
    id: &str,
    origin: train::Origin,
    resume_from: Option<train::Checkpoint>,
    settings: &Settings,
) -> Result<(), Failure> {
    let selected = device::select(settings.device).map_err(bad_input)?;
    if let Some(limit) = selected.max_tensor_bytes {
        fits_on_device(plan, limit, &selected.name).map_err(bad_input)?;
    }
    let log_path = settings.results.join(format!("{id}.log.jsonl"));
    // Closed on every way out of this function, by its drop.
    let _log = crate::logging::RunLog::open(&log_path)
        .with_context(|| format!("{}: cannot write the run log", log_path.display()))
        .map_err(failed)?;
    let started = Instant::now();
    let resuming = resume_from.is_some();
    info!(run = %id, experiment = %plan.spec.experiment.name, file = %plan.file.display(), device = selected.name.as_str(), config_hash = %plan.config_hash, resuming, "Run started.");
    let epochs_done = resume_from
        .as_ref()
        .map_or(0, |ck| ck.state.progress.history.len());
    let _tensorboard = settings.tensorboard.then(|| {
        let dir = settings.results.join(id).join("tensorboard");
        info!(run = %id, dir = %dir.display(), "TensorBoard events.");
        crate::tensorboard::open(&dir, &hparams(plan), &plan.config_hash, epochs_done)
    });
    let cache_dir = match plan.spec.train.cache {
        crate::spec::CacheMode::Off => None,
        crate::spec::CacheMode::Auto => Some(settings.cache.clone()),
    };
    let opts = train::RunOptions {
        run_id: id.to_string(),
        results: settings.results.clone(),
        origin: origin.clone(),
        cache: train::FeatureCache::new(cache_dir),
        resume: resume_from,
        interrupt: interrupt_flag(),
    };
    let record = Recorder {
        results: &settings.results,
        plan,
        id,
        started_at: &origin.started_at,
    };
    // The last progress written, so that a run stopped by a write error (a full disk) is
    // recorded as failed, with the reason, instead of staying `running`.
    let last = std::cell::RefCell::new(None::<train::Progress>);
    let result = train::run(plan, &selected.device, opts, |progress| {
        *last.borrow_mut() = Some(progress.clone());
        crate::tensorboard::epochs(&progress.history, &|i| phase_text(plan, i));
        if let Err(e) = record.write(progress, None) {
            tracing::warn!(run = %id, error = %e, "Cannot write the results table.");
        }
    });
    let outcome = result.map_err(|e| {
        tracing::error!(run = %id, error = %e, "Run failed.");
        match e {
            // Bad images and weights are input problems, found before any training step, or
            // (an image of a split decoded again every epoch that changed) after some epochs
            // were written: then the table says the run failed, and why.
            train::TrainError::Data(_)
            | train::TrainError::Weights(_)
            | train::TrainError::EmptyClass { .. }
            | train::TrainError::Restore { .. }
            | train::TrainError::FrozenChanged { .. } => {
                if let Some(progress) = last.borrow().as_ref() {
                    record.failed(Some(progress), &e);
                }
                bad_input(e)
            }
            train::TrainError::Write(_) => {
                record.failed(last.borrow().as_ref(), &e);
                failed(e)
            }
        }
    })?;
    stopped_early(&outcome.progress, plan, id, &settings.results)?;
    finish(&record, &outcome, started)
}

/// Removes the checkpoints a completed run does not keep (`train.keep`).
fn remove_unkept(results: &Path, id: &str, keep: crate::spec::Keep) {
    use crate::spec::Keep;
    for (path, kept_by) in [
        (train::checkpoint::last_path(results, id), Keep::All),
        (train::checkpoint::best_path(results, id), Keep::Best),
    ] {
        if keep == Keep::All || keep == kept_by {
            continue;
        }
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!(
                run = %id,
                file = %path.display(),
                error = %e,
                "Cannot remove a checkpoint train.keep does not keep."
            ),
            _ => {}
        }
    }
}

/// Writes a run's results table; records failures.
struct Recorder<'a> {
    results: &'a Path,
    plan: &'a Plan,
    id: &'a str,
    started_at: &'a str,
}

impl Recorder<'_> {
    fn write(
        &self,
        progress: &train::Progress,
        test: Option<crate::metrics::Evaluation>,
    ) -> Result<PathBuf, crate::results::ResultsError> {
        crate::results::write_run(
            self.results,
            self.plan,
            self.id,
            self.started_at,
            &progress.record(),
            test,
        )
    }

    /// Records the run as `failed` with `e`, from its last progress (or none).
    fn failed(&self, progress: Option<&train::Progress>, e: &dyn std::fmt::Display) {
        let mut p = progress.cloned().unwrap_or_default();
        p.status = train::Status::Failed;
        p.error = Some(e.to_string());
        if let Err(w) = self.write(&p, None) {
            tracing::warn!(run = %self.id, error = %w, "Cannot record the failed run either.");
        }
        crate::tensorboard::end(crate::tensorboard::Ending::Failure);
    }
}

/// The HParams dashboard's columns for `plan`: what the results table records of its config
/// (the first phase's optimizer, the cutoff), each later phase's settings under its name, and
/// every key of its `[sweep]` point.
fn hparams(plan: &Plan) -> Vec<(String, crate::tensorboard::HParam)> {
    use crate::tensorboard::HParam::{Number, Text};
    let spec = &plan.spec;
    let [h, w] = spec.data.image_size;
    let text = |k: &str, v: String| (k.to_string(), Text(v));
    let first = &plan.phases[0];
    let mut out = vec![
        text("experiment", spec.experiment.name.clone()),
        text("backbone", plan.backbone.name.to_string()),
        text("preprocess", plan.preprocess.as_str().to_string()),
        text("image_size", format!("{h}x{w}")),
        ("batch_size".into(), Number(spec.data.batch_size as f64)),
        ("seed".into(), Number(spec.experiment.seed as f64)),
        (
            "epochs".into(),
            Number(plan.phases.iter().map(|p| p.epochs).sum::<usize>() as f64),
        ),
        text("head", crate::spec::describe_layers(&first.head)),
        text("trainable_from", first.cutoff.label.clone()),
        text("optimizer", first.optimizer.kind().to_string()),
        ("lr".into(), Number(first.optimizer.lr())),
        text("schedule", first.schedule.kind().to_string()),
        (
            "augmented".into(),
            crate::tensorboard::HParam::Bool(first.augment.is_some()),
        ),
    ];
    for p in &plan.phases[1..] {
        out.push(text(
            &format!("{}.trainable_from", p.name),
            p.cutoff.label.clone(),
        ));
        out.push(text(
            &format!("{}.optimizer", p.name),
            p.optimizer.kind().to_string(),
        ));
        out.push((format!("{}.lr", p.name), Number(p.optimizer.lr())));
        out.push((format!("{}.epochs", p.name), Number(p.epochs as f64)));
    }
    for (k, v) in &plan.sweep_values {
        let value = match v {
            toml::Value::Integer(i) => Number(*i as f64),
            toml::Value::Float(x) => Number(*x),
            toml::Value::Boolean(b) => crate::tensorboard::HParam::Bool(*b),
            toml::Value::String(s) => Text(s.clone()),
            other => Text(other.to_string()),
        };
        out.retain(|(name, _)| name != k);
        out.push((k.clone(), value));
    }
    out
}

/// The phase as TensorBoard's text dashboard shows it at the phase's first epoch.
fn phase_text(plan: &Plan, i: usize) -> String {
    let Some(p) = plan.phases.get(i) else {
        return format!("phase {}", i + 1);
    };
    format!(
        "phase {} of {}, `{}`: {} epochs, trainable from `{}`, {} lr {} ({} schedule), {}; head {}",
        i + 1,
        plan.phases.len(),
        p.name,
        p.epochs,
        p.cutoff.label,
        p.optimizer.kind(),
        p.optimizer.lr(),
        p.schedule.kind(),
        if p.augment.is_some() {
            "augmented"
        } else {
            "not augmented"
        },
        crate::spec::describe_layers(&p.head)
    )
}

/// The failure of a run that stopped before its end: interrupted (130) or diverged (1).
fn stopped_early(
    progress: &train::Progress,
    plan: &Plan,
    id: &str,
    results: &Path,
) -> Result<(), Failure> {
    let epochs = progress.history.len();
    let total: usize = plan.phases.iter().map(|p| p.epochs).sum();
    let at = if progress.step > 0 {
        format!("step {} of the next", progress.step)
    } else if epochs >= total || progress.phase >= plan.phases.len() {
        "during the test evaluation".to_string()
    } else {
        "before the next one's first step".to_string()
    };
    match progress.status {
        train::Status::Interrupted if !checkpoint::last_path(results, id).exists() => {
            Err(Failure {
                code: 130,
                error: anyhow::anyhow!(
                    "{id}: interrupted before its first epoch ended (while extracting features); the results table says \"interrupted\"; there is no checkpoint, so start the experiment again"
                ),
            })
        }
        train::Status::Interrupted => Err(Failure {
            code: 130,
            error: anyhow::anyhow!(
                "{id}: interrupted after {epochs} epochs ({at}); checkpoint and results written. Resume with: runner resume {id} --results {}",
                results.display()
            ),
        }),
        train::Status::Diverged => {
            crate::tensorboard::end(crate::tensorboard::Ending::Failure);
            let (epoch, step) = progress.diverged_at.unwrap_or_default();
            Err(failed(anyhow::anyhow!(
                "{id}: diverged at epoch {epoch}, step {step} (the loss is not finite); results written with status \"diverged\". Try a lower learning rate or train.clip_grad_norm."
            )))
        }
        train::Status::Running | train::Status::Completed | train::Status::Failed => Ok(()),
    }
}

/// Saves what a finished run produced. The model and the predictions first: the table says
/// `completed` only once they are written, so a run whose model could not be saved (a full
/// disk) is never taken as done.
fn finish(
    record: &Recorder<'_>,
    outcome: &train::Outcome,
    started: Instant,
) -> Result<(), Failure> {
    let (results, plan, id) = (record.results, record.plan, record.id);
    let progress = &outcome.progress;
    let fail = |e: anyhow::Error| {
        let message = format!("{e:#}");
        tracing::error!(run = %id, error = %message, "Run failed.");
        record.failed(Some(progress), &message);
        failed(e)
    };
    if !outcome.predictions.is_empty() {
        crate::results::write_predictions(results, id, &plan.classes, &outcome.predictions)
            .map_err(|e| fail(e.into()))?;
    }
    let model_dir = crate::predict::save(results, id, plan, (&outcome.model, progress.store_whole))
        .map_err(|e| fail(e.into()))?;
    let written = record
        .write(progress, outcome.test)
        .map_err(|e| fail(e.into()))?;
    remove_unkept(results, id, plan.spec.train.keep.unwrap_or_default());
    let history = &progress.history;
    let best = crate::metrics::best_val_acc(history);
    let last = history.last();
    if let (Some(test), Some(m)) = (outcome.test, last) {
        crate::tensorboard::test(m.epoch, test);
    }
    crate::tensorboard::end(crate::tensorboard::Ending::Success);
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
    println!(
        "{id}: best val_acc {best:.4}, final val_acc {:.4}, test_acc {}\n  results: {}",
        last.map_or(f64::NAN, |m| m.val_acc),
        outcome
            .test
            .map_or("n/a".into(), |t| format!("{:.4}", t.acc)),
        written.display()
    );
    Ok(())
}
