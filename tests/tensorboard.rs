//! `--tensorboard`, read back by TensorBoard's own event reader (`tools/tensorboard_read.py`
//! through the Python of `$RUNNER_PYTHON`, else `python3`, with the `tensorboard` package). CI
//! installs it (`.ci/run`); with `RUNNER_REQUIRE_TOOLS=1` a missing reader fails the tests
//! instead of skipping them.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::cli::*;
use serde_json::Value;

/// What TensorBoard's reader finds in `results/<id>/tensorboard`; `None` where the reader is
/// not installed (and need not be).
fn try_read_back(results: &Path, id: &str) -> Option<Value> {
    let dir = results.join(id).join("tensorboard");
    python_tool("tensorboard", "tensorboard_read.py", &[&dir])
}

/// Whether the reader can run here; panics when it must.
fn reader_available() -> bool {
    python_has("tensorboard")
}

fn read_back(results: &Path, id: &str) -> Value {
    try_read_back(results, id).expect("the reader was found available")
}

/// `(step, value)` of a scalar tag of a folder.
fn series(tb: &Value, folder: &str, tag: &str) -> Vec<(i64, f64)> {
    tb[folder]["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no {folder}/{tag} in {tb}"))
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// Each value is the table's, as the f32 TensorBoard stores (compared as f32: serde_json's
/// default parsing may miss the last bit of a double).
fn assert_matches(got: &[(i64, f64)], want: &[f64], what: &str) {
    let steps: Vec<i64> = got.iter().map(|p| p.0).collect();
    let expected: Vec<i64> = (1..=want.len() as i64).collect();
    assert_eq!(steps, expected, "{what}: one value per epoch, at the epoch");
    for ((_, g), w) in got.iter().zip(want) {
        assert_eq!(*g as f32, *w as f32, "{what}");
    }
}

/// Each `(folder, tag, column)`: the tag's values are the table column's, one per epoch.
fn assert_epochs(tb: &Value, df: &polars::prelude::DataFrame, which: &[(&str, &str, &str)]) {
    for (folder, tag, column) in which {
        let what = format!("{folder}/{tag}");
        assert_matches(&series(tb, folder, tag), &f64s(df, column), &what);
    }
}

/// `runner resume ID --tensorboard` in the setup's folder.
fn resume(s: &Setup, id: &str) -> std::process::Output {
    let results = s.results.to_str().unwrap();
    let args = [
        "resume",
        id,
        "--device",
        "cpu",
        "--tensorboard",
        "--results",
        results,
    ];
    runner(&args, s.dir.path())
}

const TWO_PHASES: &str = r#"
[[phase]]
name = "head"
epochs = 2

[[phase]]
name = "fine_tune"
epochs = 2
trainable_from = "block5_conv3"
optimizer = { kind = "sgd", lr = 1e-4 }
"#;

#[test]
fn every_scalar_of_a_two_phase_run_reads_back_with_its_step() {
    if !reader_available() {
        return;
    }
    let s = setup(&[]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    std::fs::write(&s.spec, text + TWO_PHASES).unwrap();
    ok(&run(&s, &["--tensorboard"]));
    let (id, df) = only_run(&s.results);
    let tb = read_back(&s.results, &id);

    assert_epochs(
        &tb,
        &df,
        &[
            ("train", "epoch_loss", "train_loss"),
            ("train", "epoch_accuracy", "train_acc"),
            ("train", "epoch_learning_rate", "lr"),
            ("validation", "epoch_loss", "val_loss"),
            ("validation", "epoch_accuracy", "val_acc"),
        ],
    );
    let test = series(&tb, "test", "epoch_accuracy");
    assert_eq!(test.len(), 1);
    assert_eq!(test[0].0, 4);
    assert_eq!(test[0].1 as f32, f64s(&df, "test_acc")[0] as f32);

    // 16 training images in batches of 4: 4 steps an epoch, each reported; the global step
    // counts on across epochs and phases, and an epoch's last running mean is its loss.
    let batch = series(&tb, "train", "batch_loss");
    assert_eq!(
        batch.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=16).collect::<Vec<_>>()
    );
    let epoch_loss = series(&tb, "train", "epoch_loss");
    for (e, (_, loss)) in epoch_loss.iter().enumerate() {
        let last_step = batch.iter().find(|p| p.0 == 4 * (e as i64 + 1)).unwrap();
        assert!(
            (last_step.1 - loss).abs() <= 1e-6 * loss.abs().max(1.0),
            "{last_step:?} {loss}"
        );
    }
    let lr = series(&tb, "train", "batch_learning_rate");
    assert_eq!(lr[0].1 as f32, 1e-3);
    assert_eq!(
        lr[8].1 as f32, 1e-4,
        "the second phase's rate from its first step"
    );

    // The phase as text, at each phase's first epoch.
    let phases = tb["train"]["text"]["phase"].as_array().unwrap();
    assert_eq!(phases.len(), 2, "{phases:?}");
    assert_eq!(phases[0][0], 1);
    assert!(
        phases[0][1]
            .as_str()
            .unwrap()
            .starts_with("phase 1 of 2, `head`: 2 epochs"),
        "{phases:?}"
    );
    assert_eq!(phases[1][0], 3);
    let second = phases[1][1].as_str().unwrap();
    assert!(
        second.contains("`fine_tune`")
            && second.contains("trainable from `block5_conv3`")
            && second.contains("sgd lr 0.0001"),
        "{second}"
    );

    // The HParams session: the configuration, grouped by its hash, and how it ended.
    let hp = &tb["hparams"];
    assert_eq!(hp["status"], "STATUS_SUCCESS");
    assert_eq!(
        hp["group_name"].as_str().unwrap(),
        first_str(&df, "config_hash")
    );
    let values = &hp["hparams"];
    assert_eq!(values["backbone"], "vgg16");
    assert_eq!(values["optimizer"], "rmsprop");
    assert_eq!(values["lr"], 1e-3);
    assert_eq!(values["batch_size"], 4.0);
    assert_eq!(values["epochs"], 4.0);
    assert_eq!(values["image_size"], "32x32");
    assert_eq!(values["fine_tune.optimizer"], "sgd");
    assert_eq!(values["fine_tune.lr"], 1e-4);
    assert_eq!(values["fine_tune.trainable_from"], "block5_conv3");
    assert_eq!(values["augmented"], false);
}

#[test]
fn a_sweep_gives_each_point_its_hyperparameters() {
    if !reader_available() {
        return;
    }
    let s = setup(&[]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    let grid =
        "\n[sweep]\n\"optimizer.lr\" = [1e-3, 1e-4]\n\"train.label_smoothing\" = [0.0, 0.1]\n";
    std::fs::write(&s.spec, text + grid).unwrap();
    let dir = s.spec.parent().unwrap().to_path_buf();
    let sweep = |results: &Path, tensorboard: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
        cmd.args([
            "sweep",
            s.spec.to_str().unwrap(),
            "--device",
            "cpu",
            "--results",
        ])
        .arg(results)
        .current_dir(&dir)
        .env_remove("RUNNER_ASSETS")
        .env_remove("RUNNER_TENSORBOARD")
        .env("RUNNER_CACHE", dir.join("cache"));
        if tensorboard {
            // The environment variable, as a cluster job would set it.
            cmd.env("RUNNER_TENSORBOARD", "1");
        }
        ok(&cmd.output().unwrap());
    };
    let run_ids = |results: &Path| -> Vec<String> {
        files_with(results, ".parquet")
            .iter()
            .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".predictions.parquet"))
            .map(|n| n.trim_end_matches(".parquet").to_string())
            .collect()
    };
    let results = dir.join("tb_results");
    sweep(&results, true);
    let mut seen = BTreeSet::new();
    for id in run_ids(&results) {
        let tb = read_back(&results, &id);
        let hp = &tb["hparams"]["hparams"];
        assert_eq!(tb["hparams"]["status"], "STATUS_SUCCESS");
        let point = (
            hp["optimizer.lr"].to_string(),
            hp["train.label_smoothing"].to_string(),
        );
        assert_eq!(
            hp["lr"], hp["optimizer.lr"],
            "the lr column is the swept value"
        );
        assert_eq!(
            hp.as_object()
                .unwrap()
                .keys()
                .filter(|k| *k == "lr")
                .count(),
            1
        );
        assert!(seen.insert(point.clone()), "{point:?} twice");
        assert_eq!(series(&tb, "validation", "epoch_accuracy").len(), 2);
    }
    assert_eq!(seen.len(), 4, "{seen:?}");

    // A value that is not a boolean is refused, naming the variable's flag.
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["check", s.spec.to_str().unwrap()])
        .env("RUNNER_TENSORBOARD", "banana")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tensorboard"));

    // Without the flag or the variable nothing is written.
    sweep(&s.results, false);
    let ids = run_ids(&s.results);
    assert_eq!(ids.len(), 4);
    for id in ids {
        assert!(s.results.join(&id).is_dir());
        assert!(!s.results.join(id).join("tensorboard").exists());
    }
}

#[test]
fn a_killed_and_resumed_run_has_each_epoch_and_step_once() {
    if !reader_available() {
        return;
    }
    // As tests/training.rs' killed runs: long enough that the kill lands mid-run (a step of
    // the dense head on cached features takes about 60 us here).
    let s = setup(&[("epochs = 2", "epochs = 8\nsteps_per_epoch = 4000")]);
    let dir = s.spec.parent().unwrap().to_path_buf();
    let spawn_run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_runner"))
            .args([
                s.spec.to_str().unwrap(),
                "--device",
                "cpu",
                "--tensorboard",
                "--results",
            ])
            .arg(&s.results)
            .args(extra)
            .current_dir(&dir)
            .env_remove("RUNNER_ASSETS")
            .env("RUNNER_CACHE", dir.join("cache"))
            .spawn()
            .unwrap()
    };
    let mut child = spawn_run(&[]);
    let id = wait_for_checkpoint(&s.results, &mut child);
    std::thread::sleep(std::time::Duration::from_millis(100));
    signal(&child, "-KILL");
    child.wait().unwrap();
    // (A kill between the checkpoint and its epoch's events leaves none yet.)
    let killed = read_back(&s.results, &id);
    let before = killed["train"]["scalars"]["epoch_loss"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(before < 8, "killed before the end");

    let out = resume(&s, &id);
    ok(&out);
    let (_, df) = only_run(&s.results);
    let tb = read_back(&s.results, &id);
    assert_epochs(
        &tb,
        &df,
        &[
            ("train", "epoch_loss", "train_loss"),
            ("validation", "epoch_accuracy", "val_acc"),
        ],
    );
    let steps: Vec<i64> = series(&tb, "train", "batch_loss")
        .iter()
        .map(|p| p.0)
        .collect();
    // 4000 steps an epoch, reported every 400th: 80 points over 8 epochs.
    let expected: Vec<i64> = (1..=80).map(|k| 400 * k).collect();
    assert_eq!(steps, expected, "every reported step once, in order");
    let files = std::fs::read_dir(s.results.join(&id).join("tensorboard/train"))
        .unwrap()
        .count();
    assert_eq!(files, 2, "the resumed run adds its own file");
    assert_eq!(tb["hparams"]["status"], "STATUS_SUCCESS");
}

#[test]
fn a_run_that_failed_at_its_end_and_was_resumed_reads_as_a_success() {
    if !reader_available() {
        return;
    }
    let s = setup(&[]);
    let dir = s.spec.parent().unwrap().to_path_buf();
    // A full disk when the model is saved: the run is recorded failed, its checkpoints stay.
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args([
            s.spec.to_str().unwrap(),
            "--device",
            "cpu",
            "--tensorboard",
            "--results",
        ])
        .arg(&s.results)
        .current_dir(&dir)
        .env_remove("RUNNER_ASSETS")
        .env("RUNNER_CACHE", dir.join("cache"))
        .env("RUNNER_FAIL_WRITE", "model.bpk")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let (id, _) = only_run(&s.results);
    assert_eq!(
        read_back(&s.results, &id)["hparams"]["status"],
        "STATUS_FAILURE"
    );

    let out = resume(&s, &id);
    ok(&out);
    let tb = read_back(&s.results, &id);
    assert_eq!(
        tb["hparams"]["status"], "STATUS_SUCCESS",
        "the earlier end does not stay"
    );
    let (_, df) = only_run(&s.results);
    assert_eq!(strs(&df, "status")[0], "completed");
    assert_epochs(&tb, &df, &[("validation", "epoch_accuracy", "val_acc")]);
}

#[test]
fn a_tensorboard_folder_that_cannot_be_written_does_not_stop_the_run() {
    let s = setup(&[]);
    let dir = s.spec.parent().unwrap().to_path_buf();
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args([
            s.spec.to_str().unwrap(),
            "--device",
            "cpu",
            "--tensorboard",
            "--results",
        ])
        .arg(&s.results)
        .current_dir(&dir)
        .env_remove("RUNNER_ASSETS")
        .env("RUNNER_CACHE", dir.join("cache"))
        .env("RUNNER_FAIL_WRITE", "tensorboard/validation")
        .output()
        .unwrap();
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    // One warning, naming the folder and the cause; the table is the truth.
    assert_eq!(
        err.matches("Cannot write TensorBoard events").count(),
        1,
        "{err}"
    );
    assert!(
        err.contains("tensorboard/validation") && err.contains("injected by RUNNER_FAIL_WRITE"),
        "{err}"
    );
    let (_, df) = only_run(&s.results);
    assert_eq!(strs(&df, "status")[0], "completed");
}
