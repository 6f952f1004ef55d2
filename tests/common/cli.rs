//! Running the `runner` binary on a generated dataset, and reading what it wrote.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use polars::prelude::*;

/// A temporary folder with a dataset, a weights file, `tiny.toml` and a results folder.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub spec: PathBuf,
    pub results: PathBuf,
    pub data: PathBuf,
    pub weights: PathBuf,
}

/// The tiny experiment, with text replacements applied to its spec.
pub fn setup(extra_replace: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = super::make_dataset(&dir.path().join("data"), &["cats", "dogs"], [8, 4, 4], 40);
    let weights = dir.path().join("w.safetensors");
    super::write_vgg_weights(&weights, runner::backbone::find("vgg16").unwrap(), 9);
    let mut text = super::spec_text(&data, &weights, "");
    for (a, b) in extra_replace {
        text = text.replace(a, b);
    }
    let spec = dir.path().join("tiny.toml");
    std::fs::write(&spec, text).unwrap();
    let results = dir.path().join("results");
    Setup {
        dir,
        spec,
        results,
        data,
        weights,
    }
}

/// `runner export ID --format safetensors` of a run in the setup's results: the whole model as
/// one file, which a run no longer writes by itself. Returns the file.
pub fn exported_safetensors(s: &Setup, id: &str) -> PathBuf {
    let out = runner(
        &[
            "export",
            id,
            "--format",
            "safetensors",
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    let file = s.results.join(id).join("model.safetensors");
    assert!(file.is_file(), "{}", file.display());
    file
}

/// Runs the binary in `cwd`, with the feature cache under `cwd/cache`.
pub fn runner(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUNNER_ASSETS")
        .env("RUNNER_CACHE", cwd.join("cache"))
        .env("RUNNER_LOG", "info")
        .output()
        .unwrap()
}

/// Runs the tiny experiment with `extra` arguments.
pub fn run(s: &Setup, extra: &[&str]) -> Output {
    runner(&run_args(s, extra), s.dir.path())
}

/// The tiny experiment's command line on the CPU into the setup's results, then `extra`.
fn run_args<'a>(s: &'a Setup, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        s.spec.to_str().unwrap(),
        "--device",
        "cpu",
        "--results",
        s.results.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

pub fn files_with(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| {
        let name = p.to_string_lossy();
        // Run tables only: per-image predictions sit beside them.
        name.ends_with(suffix) && (suffix != ".parquet" || !name.ends_with(".predictions.parquet"))
    });
    v.sort();
    v
}

pub fn first_str(df: &DataFrame, col: &str) -> String {
    df.column(col)
        .unwrap()
        .str()
        .unwrap()
        .get(0)
        .unwrap()
        .to_string()
}

pub fn f64s(df: &DataFrame, col: &str) -> Vec<f64> {
    df.column(col)
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect()
}

/// Starts the binary in the background in the setup's folder (feature cache under it).
pub fn spawn(s: &Setup, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(args)
        .current_dir(s.dir.path())
        .env_remove("RUNNER_ASSETS")
        .env("RUNNER_CACHE", s.dir.path().join("cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Starts the tiny experiment in the background with `extra` arguments (as [`run`] does).
pub fn spawn_run(s: &Setup, extra: &[&str]) -> Child {
    spawn(s, &run_args(s, extra))
}

/// Asserts a zero exit, showing the output otherwise.
pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A string column, nulls as empty strings.
pub fn strs(df: &DataFrame, col: &str) -> Vec<String> {
    df.column(col)
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect()
}

pub fn u32s(df: &DataFrame, col: &str) -> Vec<u32> {
    df.column(col)
        .unwrap()
        .u32()
        .unwrap()
        .into_no_null_iter()
        .collect()
}

/// The only run table in `results`, and its run id.
pub fn only_run(results: &Path) -> (String, DataFrame) {
    let tables = files_with(results, ".parquet");
    assert_eq!(tables.len(), 1, "{tables:?}");
    let id = tables[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_end_matches(".parquet")
        .to_string();
    (id, runner::results::read_run(&tables[0]).unwrap().0)
}

pub fn events(results: &Path, id: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(results.join(format!("{id}.log.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn count(events: &[serde_json::Value], message: &str) -> usize {
    events.iter().filter(|e| e["message"] == message).count()
}

/// Waits until some run in `results` has written its first checkpoint and results table;
/// returns the run id.
pub fn wait_for_checkpoint(results: &Path, child: &mut Child) -> String {
    let started = Instant::now();
    loop {
        if let Ok(rd) = std::fs::read_dir(results) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if e.path().join("last.ckpt").is_file()
                    && results.join(format!("{id}.parquet")).is_file()
                {
                    return id;
                }
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint"
        );
        // Generous: on a software GPU adapter the first epoch includes kernel autotuning.
        assert!(started.elapsed() < Duration::from_secs(600));
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// The run id of a run log `<results>/<run_id>.log.jsonl`.
pub fn run_id_of_log(log: &Path) -> String {
    log.file_name()
        .unwrap()
        .to_string_lossy()
        .trim_end_matches(".log.jsonl")
        .to_string()
}

/// The Python the tests' tools run with: `$RUNNER_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("RUNNER_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs `tools/<script>` with [`python`] on `args` and parses its JSON output; `None` (the
/// test skipped, with a message) where that Python cannot import `modules`, unless
/// `RUNNER_REQUIRE_TOOLS=1`, where that fails the test.
pub fn python_tool(modules: &str, script: &str, args: &[&Path]) -> Option<serde_json::Value> {
    if !python_has(modules) {
        return None;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools")
        .join(script);
    let out = Command::new(python())
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// Whether [`python`] imports `modules` (e.g. `onnx, onnxruntime`); a missing one is skipped
/// with a message, or fails the test under `RUNNER_REQUIRE_TOOLS=1`.
pub fn python_has(modules: &str) -> bool {
    let found = Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("RUNNER_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
            "RUNNER_REQUIRE_TOOLS=1 but {} cannot import {modules} (set RUNNER_PYTHON to a Python that has them)",
            python()
        );
        eprintln!("skipped: no Python with {modules}");
    }
    found
}
