//! Sweeps: every experiment of a folder, and every point of a file's `[sweep]` grid, in a stable
//! order (files by name, grid points in key order), each a run with its own config hash.
//!
//! Every point is loaded and checked before the first one starts. A point whose config hash
//! already completed in the results folder is skipped (`--force` reruns it); one that was
//! interrupted resumes from its checkpoint. A failed or diverged run is recorded (status and
//! error) and the sweep goes on. `--shard i/n` runs points `i, i + n, i + 2n, ...` (0-based) of
//! the expanded list, so that n machines sharing one results folder split a sweep; each point is
//! claimed with a lock on `results/.locks/<config_hash>.lock` while it runs, so concurrent sweeps
//! never run the same point twice at the same time, and per-run files with atomic renames mean
//! they never overwrite each other.

use std::path::{Path, PathBuf};

use anyhow::Context;
use std::time::Instant;

use crate::failure::{Failure, bad_input, failed};
use crate::plan::{self, Plan};
use crate::results::schema::col as C;
use crate::results::{self, query};
use crate::run;
use crate::settings::Settings;
use crate::spec::load;
use crate::train::{self, checkpoint};

/// One run of a sweep.
#[derive(Debug, Clone)]
pub struct Point {
    /// The experiment file.
    pub file: PathBuf,
    /// The grid values of this point, as `--set` arguments (`key=value`).
    pub sets: Vec<String>,
    /// The checked plan.
    pub plan: Plan,
}

/// The experiment files of `targets`: a folder's `*.toml` (sorted by name), or the files given.
pub fn files_of(targets: &[PathBuf]) -> Result<Vec<PathBuf>, Failure> {
    let mut out = Vec::new();
    for t in targets {
        if t.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(t)
                .with_context(|| t.display().to_string())
                .map_err(bad_input)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
                .collect();
            v.sort();
            if v.is_empty() {
                return Err(bad_input(anyhow::anyhow!(
                    "{}: no experiment files (*.toml) in this folder",
                    t.display()
                )));
            }
            out.extend(v);
        } else if t.is_file() {
            out.push(t.clone());
        } else {
            return Err(bad_input(anyhow::anyhow!(
                "{}: no such file or folder",
                t.display()
            )));
        }
    }
    Ok(out)
}

/// Every point of every file, each loaded and checked; all problems of all points at once.
pub fn expand(files: &[PathBuf], settings: &Settings) -> Result<Vec<Point>, Failure> {
    expand_checked(files, settings).map_err(|problems| {
        bad_input(anyhow::anyhow!(
            "nothing was run: {} of the sweep's experiments or points have problems\n{}",
            problems.len(),
            problems.join("\n")
        ))
    })
}

/// [`expand`], its problems as a list (one entry per file or point).
pub fn expand_checked(files: &[PathBuf], settings: &Settings) -> Result<Vec<Point>, Vec<String>> {
    let mut points = Vec::new();
    let mut problems = Vec::new();
    let locations = &settings.locations;
    for f in files {
        let grid = match load::grid(f) {
            Ok(g) => g,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        let mut seen: Vec<String> = Vec::new();
        for values in grid {
            let label = values
                .iter()
                .map(|(k, v)| format!("{k} = {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let checked =
                load::load_checked(f, &settings.sets, &values, |l| plan::build(l, locations))
                    .map_err(|e| e.to_string());
            match checked {
                Ok(plan) => points.push(Point {
                    file: f.clone(),
                    sets: values.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                    plan,
                }),
                Err(e) if label.is_empty() => problems.push(e),
                // The same problem at every point (a misspelt key in the grid) is said once.
                Err(e) if seen.contains(&e) => {}
                Err(e) => {
                    problems.push(format!("[sweep] point {label}:\n{e}"));
                    seen.push(e);
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(points)
    } else {
        Err(problems)
    }
}

/// The indices of shard `i` of `n` (0-based) out of `len` points: `i, i + n, ...`.
pub fn shard_indices(len: usize, i: usize, n: usize) -> Vec<usize> {
    (0..len).filter(|k| k % n.max(1) == i).collect()
}

/// A `--shard` that is not `i/n` with `0 <= i < n`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// No `/`.
    #[error("expected i/n, e.g. 0/4, got \"{0}\"")]
    Form(String),
    /// A side that is not a number.
    #[error("\"{0}\" is not a number")]
    NotNumber(String),
    /// `i` not below `n`.
    #[error("shard {0}/{1}: i counts from 0 and must be below n (e.g. 0/4 .. 3/4)")]
    Range(usize, usize),
}

/// Parses `i/n` with `0 <= i < n`.
pub fn parse_shard(s: &str) -> Result<(usize, usize), ShardError> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| ShardError::Form(s.to_string()))?;
    let number = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|_| ShardError::NotNumber(x.to_string()))
    };
    let (i, n) = (number(i)?, number(n)?);
    if n == 0 || i >= n {
        return Err(ShardError::Range(i, n));
    }
    Ok((i, n))
}

/// A lock held while a point runs, or `None` when another process holds it.
fn claim(results: &Path, hash: &str) -> std::io::Result<Option<std::fs::File>> {
    let dir = results.join(".locks");
    std::fs::create_dir_all(&dir)?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{hash}.lock")))?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// One line of the summary.
#[derive(Debug, Clone)]
struct Row {
    run: String,
    status: String,
    best: Option<f64>,
    test: Option<f64>,
    seconds: f64,
    note: String,
}

/// Status, best val_acc and test_acc from a run's table.
fn read_row(results: &Path, id: &str) -> Option<(String, Option<f64>, Option<f64>)> {
    let (df, _) = results::read_run(&results.join(format!("{id}.parquet"))).ok()?;
    let status = df.column(C::STATUS).ok()?.str().ok()?.get(0)?.to_string();
    let f = |name: &str| -> Vec<f64> {
        df.column(name)
            .ok()
            .and_then(|c| c.f64().ok().map(|c| c.iter().flatten().collect()))
            .unwrap_or_default()
    };
    let best = crate::metrics::best_of(f(C::VAL_ACC));
    Some((status, best, f(C::TEST_ACC).first().copied()))
}

/// Records a run that stopped with an error: its progress so far (from the last checkpoint, if
/// any) with status `failed` and the message.
fn record_failure(point: &Point, settings: &Settings, id: &str, message: &str) {
    let results = &settings.results;
    let ck = checkpoint::read(&checkpoint::last_path(results, id)).ok();
    let started_at = ck
        .as_ref()
        .map(|c| c.state.origin.started_at.clone())
        .unwrap_or_else(|| chrono::Utc::now().to_rfc3339());
    let mut progress = ck.map(|c| c.state.progress).unwrap_or_default();
    if progress.status != train::Status::Diverged {
        progress.status = train::Status::Failed;
        progress.error = Some(message.to_string());
    }
    if let Err(e) = results::write_run(
        results,
        &point.plan,
        id,
        &started_at,
        &progress.record(),
        None,
    ) {
        tracing::warn!(run = id, error = %e, "Cannot record the failed run.");
    }
}

impl Row {
    /// A point not run, and why.
    fn skipped(run: String, note: &str) -> Self {
        Row {
            run,
            status: "skipped".into(),
            best: None,
            test: None,
            seconds: 0.0,
            note: note.into(),
        }
    }
}

fn summary(rows: &[Row]) -> String {
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    let width = rows.iter().map(|r| r.run.len()).max().unwrap_or(3).max(3);
    let mut s = format!(
        "{:<width$}  {:<11}  {:>12}  {:>8}  {:>9}  note\n",
        "run", "status", "best val_acc", "test_acc", "seconds"
    );
    for r in rows {
        s += &format!(
            "{:<width$}  {:<11}  {:>12}  {:>8}  {:>9.1}  {}\n",
            r.run,
            r.status,
            fmt(r.best),
            fmt(r.test),
            r.seconds,
            r.note
        );
    }
    s
}

/// Runs the sweep over `targets` (folders or files).
pub fn run(
    targets: &[PathBuf],
    settings: &Settings,
    force: bool,
    shard: Option<(usize, usize)>,
) -> Result<(), Failure> {
    let files = files_of(targets)?;
    let all = expand(&files, settings)?;
    let total = all.len();
    let picked = match shard {
        Some((i, n)) => shard_indices(total, i, n),
        None => (0..total).collect(),
    };
    println!(
        "sweep: {} experiment files, {total} runs{}",
        files.len(),
        shard.map_or(String::new(), |(i, n)| format!(
            ", shard {i}/{n}: {} of them",
            picked.len()
        ))
    );
    let results_dir = &settings.results;
    std::fs::create_dir_all(results_dir)
        .with_context(|| results_dir.display().to_string())
        .map_err(failed)?;
    let mut rows = Vec::new();
    let mut bad = 0;
    for (n, &k) in picked.iter().enumerate() {
        let point = &all[k];
        let hash = point.plan.config_hash.clone();
        let name = &point.plan.spec.experiment.name;
        let label = point.plan.sweep_point.clone().unwrap_or_default();
        println!(
            "[{}/{}] {name} {label} (config {})",
            n + 1,
            picked.len(),
            &hash[..8]
        );
        let started = Instant::now();
        let lock = claim(results_dir, &hash)
            .with_context(|| results_dir.display().to_string())
            .map_err(failed)?;
        let Some(_lock) = lock else {
            let note = "running in another process";
            println!("  skipped: {note}");
            rows.push(Row::skipped(format!("{name}-{}", &hash[..8]), note));
            continue;
        };
        let known = query::runs_by_hash(results_dir)
            .map_err(failed)?
            .remove(&hash)
            .unwrap_or_default();
        if !force && let Some((id, _, _)) = known.iter().rev().find(|r| r.1 == "completed") {
            let (_, best, test) = read_row(results_dir, id).unwrap_or_default();
            println!("  skipped: already completed as {id} (--force reruns it)");
            rows.push(Row {
                run: id.clone(),
                status: "skipped".into(),
                best,
                test,
                seconds: 0.0,
                note: "already completed (--force reruns it)".into(),
            });
            continue;
        }
        let resumable = known.iter().rev().find(|r| {
            (r.1 == "running" || r.1 == "interrupted")
                && checkpoint::last_path(results_dir, &r.0).is_file()
        });
        let (id, result, note) = match resumable {
            Some((id, _, _)) if !force => {
                println!("  resuming {id} from its checkpoint");
                (
                    id.clone(),
                    run::resume(id, Some(&point.file), settings),
                    "resumed".to_string(),
                )
            }
            _ => {
                let (id, r) = run::fresh(&point.plan, &point.file, point.sets.clone(), settings);
                (id, r, String::new())
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        match &result {
            Err(f) if f.code == 130 => {
                let resumable = crate::train::checkpoint::last_path(results_dir, &id).exists();
                rows.push(Row {
                    run: id,
                    status: "interrupted".into(),
                    best: None,
                    test: None,
                    seconds,
                    note: if resumable {
                        "Ctrl-C: the sweep stops; run it again to resume".into()
                    } else {
                        "Ctrl-C before its first checkpoint: running the sweep again starts this point anew".into()
                    },
                });
                print!("{}", summary(&rows));
                return result;
            }
            Err(f) => {
                bad += 1;
                eprintln!("  {:#}", f.error);
                // A resume refused before training (its weights file changed, say) leaves the
                // run as it was, resumable once that is fixed. A diverged run has recorded
                // itself; anything else is recorded as failed.
                let recorded = read_row(results_dir, &id).map(|r| r.0);
                let refused = note == "resumed" && f.code == 2;
                if !refused && matches!(recorded.as_deref(), None | Some("running")) {
                    record_failure(point, settings, &id, &format!("{:#}", f.error));
                }
            }
            Ok(()) => {}
        }
        let (status, best, test) =
            read_row(results_dir, &id).unwrap_or(("failed".into(), None, None));
        rows.push(Row {
            run: id,
            status,
            best,
            test,
            seconds,
            note: match &result {
                Err(f) => format!("{:#}", f.error)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(120)
                    .collect(),
                Ok(()) => note,
            },
        });
    }
    print!("{}", summary(&rows));
    if bad > 0 {
        return Err(failed(anyhow::anyhow!(
            "{bad} of {} runs failed or diverged (recorded in {})",
            picked.len(),
            results_dir.display()
        )));
    }
    Ok(())
}

/// `runner check`: validates experiment files, every point of their `[sweep]` grids included,
/// without running them.
pub fn check(files: &[PathBuf], settings: &Settings) -> Result<(), Failure> {
    let mut failures = 0;
    for f in files {
        // Every point of a `[sweep]` grid is checked as the sweep would run it.
        match expand_checked(std::slice::from_ref(f), settings) {
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
