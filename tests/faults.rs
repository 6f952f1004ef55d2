//! Faults: runs that died, files they left behind.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STARTED: &str = r#"{"timestamp":"2026-12-01T00:00:00Z","level":"INFO","message":"Run started.","run":"r1","target":"runner::cli"}"#;
const FINISHED: &str = r#"{"timestamp":"2026-12-01T00:00:09Z","level":"INFO","message":"Run finished.","run":"r1","target":"runner::cli"}"#;

fn follow(results: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_runner"))
        .args([
            "logs",
            "r1",
            "--follow",
            "--results",
            results.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn following_the_log_of_a_killed_run_returns_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("r1.log.jsonl");
    // A non-UTF-8 line among the events: shown, not the end of the log.
    let mut bytes = format!("{STARTED}\n").into_bytes();
    bytes.extend_from_slice(b"\xff\xfe damaged\n");
    std::fs::write(&log, &bytes).unwrap();
    let mut child = follow(dir.path());
    let status = wait(&mut child, Duration::from_secs(20)).expect("--follow of a dead run returns");
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Run started."), "{text}");
    assert!(text.contains("damaged"), "{text}");
    assert!(text.contains("the run is not running"), "{text}");
}

#[test]
fn following_a_live_run_waits_for_its_last_event() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("r1.log.jsonl");
    std::fs::write(&log, format!("{STARTED}\n")).unwrap();
    // This test is the writer: it holds the lock a running run holds.
    let mut writer = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    writer.try_lock().unwrap();
    let mut child = follow(dir.path());
    assert!(
        wait(&mut child, Duration::from_millis(1500)).is_none(),
        "still following while the writer lives"
    );
    writeln!(writer, "{FINISHED}").unwrap();
    writer.flush().unwrap();
    let status = wait(&mut child, Duration::from_secs(20)).expect("returns after the last event");
    assert!(status.success());
    let text = String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned();
    assert!(text.contains("Run finished."), "{text}");
    assert!(!text.contains("not running"), "{text}");
}

#[test]
fn temporaries_a_killed_writer_left_are_removed_when_the_run_is_resumed() {
    let s = common::cli::setup(&[]);
    common::cli::ok(&common::cli::run(&s, &[]));
    let id = common::cli::files_with(&s.results, ".parquet")[0]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // What write_atomic leaves when its process is killed between create and rename.
    let in_run = s.results.join(&id).join(".last.ckpt.Xa9b2c.tmp");
    let beside = s.results.join(format!(".{id}.parquet.Qw3e4r.tmp"));
    let other = s.results.join(".other-run.parquet.Zz9y8x.tmp");
    for p in [&in_run, &beside, &other] {
        std::fs::write(p, vec![0u8; 4096]).unwrap();
    }
    let out = common::cli::runner(
        &["resume", &id, "--results", s.results.to_str().unwrap()],
        s.dir.path(),
    );
    // The run had completed: nothing to resume, but its leftovers are gone.
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already completed"));
    assert!(
        !in_run.exists() && !beside.exists(),
        "the run's temporaries are removed"
    );
    assert!(other.exists(), "another run's are not touched");
    // The run's own files are intact.
    assert!(s.results.join(&id).join("last.ckpt").is_file());
    assert!(s.results.join(format!("{id}.parquet")).is_file());
}

/// Runs the tiny experiment with writes of files ending in `suffix` failing as on a full disk.
fn run_failing(s: &common::cli::Setup, suffix: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_runner"))
        .args([
            s.spec.to_str().unwrap(),
            "--device",
            "cpu",
            "--results",
            s.results.to_str().unwrap(),
        ])
        .current_dir(s.dir.path())
        .env_remove("RUNNER_ASSETS")
        .env("RUNNER_CACHE", s.dir.path().join("cache"))
        .env("RUNNER_FAIL_WRITE", suffix)
        .output()
        .unwrap()
}

/// `runner resume id` succeeds and the table then says `completed`.
fn resume_to_completion(s: &common::cli::Setup, id: &str) {
    let out = common::cli::runner(
        &["resume", id, "--results", s.results.to_str().unwrap()],
        s.dir.path(),
    );
    common::cli::ok(&out);
    let (status, _) = status_and_error(s);
    assert_eq!(status, "completed");
}

fn status_and_error(s: &common::cli::Setup) -> (String, String) {
    let tables = common::cli::files_with(&s.results, ".parquet");
    assert_eq!(tables.len(), 1, "{tables:?}");
    let (df, _) = runner::results::read_run(&tables[0]).unwrap();
    let get = |c: &str| {
        df.column(c)
            .unwrap()
            .str()
            .unwrap()
            .get(0)
            .unwrap_or("")
            .to_string()
    };
    (get("status"), get("error"))
}

#[test]
fn a_full_disk_at_each_kind_of_write_leaves_a_truthful_status() {
    for suffix in [
        "model.bpk",
        "model.json",
        "last.ckpt",
        ".predictions.parquet",
    ] {
        let s = common::cli::setup(&[]);
        let out = run_failing(&s, suffix);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{suffix}: {err}");
        assert!(
            err.contains("injected by RUNNER_FAIL_WRITE"),
            "{suffix}: {err}"
        );
        let (status, error) = status_and_error(&s);
        assert_eq!(
            status, "failed",
            "{suffix}: the table must not say {status}"
        );
        assert!(
            error.contains("injected by RUNNER_FAIL_WRITE"),
            "{suffix}: {error}"
        );
        // No temporary file is left behind.
        let leftovers: Vec<_> = walk(&s.results)
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{suffix}: {leftovers:?}");
    }
}

#[test]
fn a_safetensors_export_that_cannot_be_written_names_the_file_and_leaves_nothing() {
    let s = common::cli::setup(&[]);
    common::cli::ok(&common::cli::run(&s, &[]));
    let (id, _) = common::cli::only_run(&s.results);
    let file = s.results.join(&id).join("model.safetensors");
    let export = |fail: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_runner"));
        c.args(["export", &id, "--format", "safetensors"])
            .args(["--results", s.results.to_str().unwrap()])
            .current_dir(s.dir.path())
            .env_remove("RUNNER_ASSETS")
            .env("RUNNER_CACHE", s.dir.path().join("cache"));
        if let Some(f) = fail {
            c.env("RUNNER_FAIL_WRITE", f);
        }
        c.output().unwrap()
    };
    let out = export(Some("model.safetensors"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("injected by RUNNER_FAIL_WRITE"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(!file.exists());
    let leftovers: Vec<_> = walk(&s.results)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Then it works, and again over the file it wrote; the run's table still says completed.
    for _ in 0..2 {
        let out = export(None);
        assert!(out.status.success(), "{out:?}");
        assert!(file.is_file());
    }
    assert_eq!(status_and_error(&s).0, "completed");
    // --images is for the ONNX check: refused, exit 2.
    let out = common::cli::runner(
        &[
            "export",
            &id,
            "--format",
            "safetensors",
            "--limit",
            "3",
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn a_run_table_that_cannot_be_written_is_an_error_not_a_silent_success() {
    let s = common::cli::setup(&[]);
    let out = run_failing(&s, ".parquet");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Cannot write the results table"), "{err}");
    assert!(common::cli::files_with(&s.results, ".parquet").is_empty());
}

#[test]
fn a_feature_cache_that_cannot_be_written_does_not_stop_the_run() {
    let s = common::cli::setup(&[]);
    // The cache's files are under RUNNER_CACHE (`<dir>/cache/`): a cache is an optimisation,
    // so the run goes on without it, says so, and is what its table says.
    let out = run_failing(&s, "/cache/");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("injected by RUNNER_FAIL_WRITE"),
        "the failed cache write is logged: {err}"
    );
    let (status, _) = status_and_error(&s);
    assert_eq!(status, "completed");
    let cached: Vec<_> = walk(&s.dir.path().join("cache"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".safetensors"))
        .collect();
    assert!(cached.is_empty(), "{cached:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn results_show_a_killed_run_as_stopped_and_a_live_one_as_running() {
    let s = common::cli::setup(&[("epochs = 2", "epochs = 8\nsteps_per_epoch = 4000")]);
    let results = s.results.to_str().unwrap().to_string();
    let mut child = common::cli::spawn_run(&s, &[]);
    common::cli::wait_for_checkpoint(&s.results, &mut child);
    let status = || {
        let out = common::cli::runner(&["results", &results, "--format", "csv"], s.dir.path());
        common::cli::ok(&out);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
        let col = header.iter().position(|h| *h == "status").unwrap();
        text.lines()
            .nth(1)
            .unwrap()
            .split(',')
            .nth(col)
            .unwrap()
            .to_string()
    };
    assert_eq!(status(), "running", "a live run");
    common::cli::signal(&child, "-KILL");
    child.wait().unwrap();
    // The table itself still says running (a killed process writes nothing); the reader
    // knows better from the log's lock.
    let (df, _) =
        runner::results::read_run(&common::cli::files_with(&s.results, ".parquet")[0]).unwrap();
    assert_eq!(
        df.column("status").unwrap().str().unwrap().get(0),
        Some("running")
    );
    assert_eq!(status(), "stopped", "a killed run");
}

#[test]
fn an_image_that_changes_while_its_split_is_decoded_every_epoch_fails_the_run_which_resumes() {
    let s = common::cli::setup(&[("epochs = 2", "epochs = 2\nsteps_per_epoch = 60")]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    let augment = "\n[augment]\nhorizontal_flip = true\nzoom = 0.2\n";
    std::fs::write(&s.spec, format!("{text}{augment}")).unwrap();
    let image = s.data.join("train/cats/cats.3.png");
    let original = std::fs::read(&image).unwrap();
    let mut child = common::cli::spawn_run(&s, &["--set", "data.max_decoded_mib=0"]);
    // Once the first epoch is written, the image is replaced: the second epoch decodes it again.
    let id = common::cli::wait_for_checkpoint(&s.results, &mut child);
    // Renamed into place: a run must never read it half-written (it would be undecodable).
    let replacement = s.dir.path().join("replacement.png");
    image::RgbImage::new(40, 40).save(&replacement).unwrap();
    std::fs::rename(&replacement, &image).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let named = format!(
        "{}: the file changed while runner was using it",
        image.display()
    );
    assert!(err.contains(&named), "{err}");
    let (status, error) = status_and_error(&s);
    assert_eq!(status, "failed");
    assert!(error.contains(&named), "{error}");
    assert!(s.results.join(&id).join("last.ckpt").is_file());

    // The file back as it was: the run resumes from its last epoch and completes.
    std::fs::write(&image, original).unwrap();
    resume_to_completion(&s, &id);
    let (df, _) = runner::results::read_run(&s.results.join(format!("{id}.parquet"))).unwrap();
    assert_eq!(df.height(), 2);
}

#[test]
fn a_feature_cache_that_cannot_be_written_is_done_without_and_the_run_is_the_same() {
    let s = common::cli::setup(&[]);
    // Every write under the cache folder fails as on a full disk; nothing else does.
    let out = run_failing(&s, "/cache/");
    common::cli::ok(&out);
    let (status, _) = status_and_error(&s);
    assert_eq!(status, "completed");
    let tables = common::cli::files_with(&s.results, ".parquet");
    let id = tables[0]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let ev = common::cli::events(&s.results, &id);
    // Train, validation and test: each extracted, none written.
    assert_eq!(
        common::cli::count(&ev, "Cannot write the feature cache; going on without it."),
        3
    );
    assert_eq!(common::cli::count(&ev, "Feature cache written."), 0);
    let cache = s.dir.path().join("cache");
    let left: Vec<_> = std::fs::read_dir(&cache)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let (without, _) = runner::results::read_run(&tables[0]).unwrap();

    // The same run with the cache written: the same losses, read from the files.
    std::fs::remove_dir_all(&s.results).unwrap();
    common::cli::ok(&common::cli::run(&s, &[]));
    let tables = common::cli::files_with(&s.results, ".parquet");
    let (with, _) = runner::results::read_run(&tables[0]).unwrap();
    for c in ["train_loss", "val_loss", "test_loss"] {
        let values =
            |df: &polars::prelude::DataFrame| df.column(c).unwrap().f64().unwrap().to_vec();
        assert_eq!(values(&without), values(&with), "{c} differs");
    }
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 3);
}

#[test]
fn a_cached_split_damaged_during_the_run_fails_it_naming_the_file_and_the_run_resumes() {
    // Long enough that the file is damaged while epochs are still to come.
    let s = common::cli::setup(&[("epochs = 2", "epochs = 400\nsteps_per_epoch = 20")]);
    let mut child = common::cli::spawn_run(&s, &[]);
    let id = common::cli::wait_for_checkpoint(&s.results, &mut child);
    let cache = s.dir.path().join("cache");
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    assert_eq!(entries.len(), 2, "train and validation: {entries:?}");
    for p in &entries {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(100)
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot read the cached activations")
            && entries
                .iter()
                .any(|p| err.contains(&p.display().to_string())),
        "{err}"
    );
    let (status, error) = status_and_error(&s);
    assert_eq!(status, "failed");
    assert!(
        error.contains("cannot read the cached activations"),
        "{error}"
    );
    assert!(s.results.join(&id).join("last.ckpt").is_file());

    // On resume the damaged files fail their check and are rebuilt.
    resume_to_completion(&s, &id);
    let ev = common::cli::events(&s.results, &id);
    assert!(common::cli::count(&ev, "Feature cache file is corrupt; rebuilding it.") >= 2);
}
