//! Phases, early stopping, divergence, the feature cache, checkpoints and resume, Ctrl-C, the
//! saved model and `runner predict`: the `runner` binary on generated images and random weights.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;

use polars::prelude::*;

use common::cli::*;

/// The tiny experiment with `extra` appended to its spec (after `[train]`).
fn with_extra(replace: &[(&str, &str)], extra: &str) -> Setup {
    let s = setup(replace);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    std::fs::write(&s.spec, format!("{text}\n{extra}")).unwrap();
    s
}

/// The tensors of a safetensors file whose names start with `prefix`.
fn tensors(path: &Path, prefix: &str) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = common::f32_tensor(&st, &n);
            (n, v)
        })
        .collect()
}

const TWO_PHASES: &str = r#"
[[phase]]
name = "head"
epochs = 2

[[phase]]
name = "fine_tune"
epochs = 1
trainable_from = "block5_conv1"
optimizer = { kind = "rmsprop", lr = 1e-3 }
"#;

#[test]
fn phases_number_epochs_across_the_run_and_unfreeze_only_block5() {
    let s = with_extra(&[], TWO_PHASES);
    ok(&run(&s, &[]));
    let (id, df) = only_run(&s.results);
    assert_eq!(strs(&df, "phase"), ["head", "head", "fine_tune"]);
    assert_eq!(u32s(&df, "epoch"), [1, 2, 3]);
    assert_eq!(
        strs(&df, "trainable_from"),
        ["none", "none", "block5_conv1"]
    );
    assert!(strs(&df, "status").iter().all(|s| s == "completed"));
    let ev = events(&s.results, &id);
    let started: Vec<&str> = ev
        .iter()
        .filter(|e| e["message"] == "Phase started." && e["trainable_from"].is_string())
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(started, ["head", "fine_tune"]);

    // The saved model uses the ImageNet files' names: blocks 1-4 are the weights it was given,
    // block 5 was trained in the second phase.
    let model = exported_safetensors(&s, &id);
    let before = tensors(&s.weights, "block");
    let after = tensors(&model, "block");
    assert_eq!(before.len(), 26);
    assert_eq!(
        before.iter().map(|t| &t.0).collect::<Vec<_>>(),
        after.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        if name.starts_with("block5") {
            assert_ne!(a, b, "{name} is trainable in the fine_tune phase");
        } else {
            assert_eq!(a, b, "{name} is frozen in every phase");
        }
    }
    assert!(!tensors(&model, "head.").is_empty());
    assert!(s.results.join(&id).join("model.bpk").is_file());
    // The export is a valid backbone weights file for another experiment (its head is ignored).
    let text = std::fs::read_to_string(&s.spec)
        .unwrap()
        .replace(s.weights.to_str().unwrap(), model.to_str().unwrap());
    let plan = common::plan_for(s.dir.path(), &text);
    let device = burn::prelude::Device::flex();
    let base = runner::model::TransferModel::build(&plan, &device).unwrap();
    let vgg = base.backbone.vgg().unwrap();
    let block5: Vec<f32> = vgg.convs[10]
        .weight
        .val()
        .into_data()
        .iter::<f32>()
        .collect();
    assert_eq!(
        block5,
        after
            .iter()
            .find(|t| t.0 == "block5_conv1.weight")
            .unwrap()
            .1
    );
    // The best checkpoint is the epoch with the lowest val_loss (train.monitor's default).
    let best = runner::train::checkpoint::read(&s.results.join(&id).join("best.ckpt")).unwrap();
    let val = f64s(&df, "val_loss");
    let lowest = (0..val.len())
        .min_by(|&a, &b| val[a].total_cmp(&val[b]))
        .unwrap();
    assert_eq!(best.state.progress.history.len(), lowest + 1);
    assert_eq!(best.state.progress.best.best_epoch, lowest + 1);
}

#[test]
fn the_second_phase_starts_from_the_first_phases_weights() {
    // A run of the head phase alone, and the same phase followed by one that cannot move the
    // weights (SGD at 1e-30): the final heads are identical only if the weights carried over.
    let alone = with_extra(&[], "[[phase]]\nname = \"head\"\nepochs = 2\n");
    ok(&run(&alone, &[]));
    let then_still = with_extra(
        &[],
        "[[phase]]\nname = \"head\"\nepochs = 2\n\n[[phase]]\nname = \"still\"\nepochs = 1\noptimizer = { kind = \"sgd\", lr = 1e-30 }\n",
    );
    ok(&run(&then_still, &[]));
    let head = |s: &Setup| {
        let (id, _) = only_run(&s.results);
        tensors(&exported_safetensors(s, &id), "head.")
    };
    let (a, b) = (head(&alone), head(&then_still));
    assert!(!a.is_empty());
    assert_eq!(a, b);
}

#[test]
fn early_stopping_stops_the_phase_and_restores_the_best_weights() {
    let first_epoch = with_extra(&[("epochs = 2", "epochs = 1")], "");
    ok(&run(&first_epoch, &[]));
    // min_delta 1000: only the first epoch counts as an improvement; patience 1 stops after
    // the second.
    let stopping = "[early_stopping]\npatience = 1\nmin_delta = 1000.0\nrestore_best = true\n";
    let restored = with_extra(&[("epochs = 2", "epochs = 6")], stopping);
    ok(&run(&restored, &[]));
    let kept = with_extra(
        &[("epochs = 2", "epochs = 6")],
        &stopping.replace("true", "false"),
    );
    ok(&run(&kept, &[]));

    let (id, df) = only_run(&restored.results);
    assert_eq!(u32s(&df, "epoch"), [1, 2]);
    let ev = events(&restored.results, &id);
    let stop: Vec<&serde_json::Value> = ev
        .iter()
        .filter(|e| e["message"] == "Early stopping.")
        .collect();
    assert_eq!(stop.len(), 1);
    assert_eq!(stop[0]["epoch"], 2);
    assert_eq!(stop[0]["best_epoch"], 1);
    assert_eq!(stop[0]["restored"], true);

    let head = |s: &Setup| {
        let (id, _) = only_run(&s.results);
        tensors(&exported_safetensors(s, &id), "head.")
    };
    assert_eq!(head(&restored), head(&first_epoch));
    assert_ne!(head(&kept), head(&first_epoch));
}

#[test]
fn a_diverging_run_is_recorded_as_diverged_with_its_epoch() {
    let s = setup(&[]);
    let out = run(&s, &["--set", "optimizer.lr=1e30"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("diverged at epoch 1"), "{err}");
    let (id, df) = only_run(&s.results);
    assert!(strs(&df, "status").iter().all(|s| s == "diverged"));
    assert_eq!(u32s(&df, "epoch"), [1]);
    let val = f64s(&df, "val_loss");
    assert!(val[0].is_nan());
    let ev = events(&s.results, &id);
    let d: Vec<&serde_json::Value> = ev
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Training diverged"))
        })
        .collect();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["epoch"], 1);
    assert!(d[0]["step"].as_u64().unwrap() >= 1);
    // No model is saved from a diverged run.
    assert!(!s.results.join(&id).join("model.bpk").exists());
}

#[test]
fn a_second_run_reads_the_feature_cache_and_a_corrupt_entry_is_rebuilt() {
    let s = setup(&[]);
    let cache = s.dir.path().join("cache");
    // In the order they ran (run ids sort by the second they started in, then at random: two
    // runs of one second may sort either way).
    let mut tables: Vec<std::path::PathBuf> = Vec::new();
    for _ in 0..2 {
        ok(&run(&s, &[]));
        let new = files_with(&s.results, ".parquet")
            .into_iter()
            .find(|t| !tables.contains(t))
            .unwrap();
        tables.push(new);
    }
    let ids: Vec<String> = tables
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches(".parquet")
                .to_string()
        })
        .collect();
    let (first, second) = (events(&s.results, &ids[0]), events(&s.results, &ids[1]));
    // Train, validation and test at the cutoff: three entries.
    assert_eq!(count(&first, "Feature cache miss."), 3);
    assert_eq!(count(&first, "Feature cache hit."), 0);
    assert_eq!(count(&second, "Feature cache hit."), 3);
    assert_eq!(
        count(&second, "Extracting features."),
        0,
        "the base never ran"
    );
    let metrics = |p: &PathBuf| {
        let df = runner::results::read_run(p).unwrap().0;
        (
            f64s(&df, "train_loss"),
            f64s(&df, "val_loss"),
            f64s(&df, "test_acc"),
        )
    };
    assert_eq!(metrics(&tables[0]), metrics(&tables[1]));

    // Damage every entry: each is detected, rebuilt, and the numbers do not change.
    let entries = files_with(&cache, ".safetensors");
    assert_eq!(entries.len(), 3);
    for e in &entries {
        let mut bytes = std::fs::read(e).unwrap();
        let n = bytes.len();
        bytes[n - 5] ^= 0xFF;
        std::fs::write(e, bytes).unwrap();
    }
    std::fs::write(&entries[0], b"").unwrap();
    ok(&run(&s, &[]));
    let third_table = files_with(&s.results, ".parquet")
        .into_iter()
        .find(|t| !tables.contains(t))
        .unwrap();
    let id = third_table
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_end_matches(".parquet")
        .to_string();
    let third = events(&s.results, &id);
    assert_eq!(
        count(&third, "Feature cache file is corrupt; rebuilding it."),
        3
    );
    assert_eq!(count(&third, "Feature cache written."), 3);
    assert_eq!(metrics(&tables[0]), metrics(&third_table));
    ok(&run(&s, &[]));

    // cache = "off" never touches the folder.
    let off = setup(&[]);
    ok(&run(&off, &["--set", "train.cache=off"]));
    assert!(files_with(&off.dir.path().join("cache"), ".safetensors").is_empty());
}

/// Runs the experiment with its results in `results`.
fn run_in(s: &Setup, results: &Path) -> std::process::Output {
    runner(
        &[
            s.spec.to_str().unwrap(),
            "--device",
            "cpu",
            "--results",
            results.to_str().unwrap(),
        ],
        s.dir.path(),
    )
}

/// Starts the experiment in the background.
fn spawn(s: &Setup, results: &Path) -> Child {
    common::cli::spawn(
        s,
        &[
            s.spec.to_str().unwrap(),
            "--device",
            "cpu",
            "--results",
            results.to_str().unwrap(),
        ],
    )
}

/// Long enough to interrupt: 8 epochs of 40 steps (ten passes over the 16 images each).
const LONG: [(&str, &str); 1] = [("epochs = 2", "epochs = 8\nsteps_per_epoch = 4000")];

/// Per-epoch metrics of a run table.
fn curve(df: &DataFrame) -> Vec<Vec<f64>> {
    ["train_loss", "train_acc", "val_loss", "val_acc", "lr"]
        .iter()
        .map(|c| f64s(df, c))
        .collect()
}

fn assert_same_run(a: &DataFrame, b: &DataFrame) {
    assert_eq!(u32s(a, "epoch"), u32s(b, "epoch"));
    for (x, y) in curve(a).iter().zip(curve(b)) {
        for (u, v) in x.iter().zip(&y) {
            assert!((u - v).abs() <= 1e-4, "{x:?} vs {y:?}");
        }
    }
    let t = |df: &DataFrame| f64s(df, "test_acc")[0];
    assert!((t(a) - t(b)).abs() <= 1e-4);
}

/// The run's table when nothing interrupts it (in its own results folder).
fn uninterrupted(s: &Setup) -> DataFrame {
    let dir = s.dir.path().join("baseline");
    ok(&run_in(s, &dir));
    only_run(&dir).1
}

#[test]
fn a_killed_run_resumes_to_the_same_results_and_refuses_a_changed_config() {
    let s = setup(&LONG);
    let baseline = uninterrupted(&s);

    let mut child = spawn(&s, &s.results);
    let id = wait_for_checkpoint(&s.results, &mut child);
    signal(&child, "-KILL");
    let status = child.wait().unwrap();
    assert!(!status.success());
    let (_, partial) = only_run(&s.results);
    assert!(strs(&partial, "status").iter().all(|s| s == "running"));
    assert!(partial.height() < 8, "killed before the end");

    // A changed value on the command line or in the file is refused, naming the key.
    let out = runner(
        &[
            "resume",
            &id,
            "--results",
            s.results.to_str().unwrap(),
            "--set",
            "optimizer.lr=0.5",
        ],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("optimizer.lr: 0.001 -> 0.5"), "{err}");
    let text = std::fs::read_to_string(&s.spec).unwrap();
    std::fs::write(&s.spec, text.replace("epochs = 8", "epochs = 9")).unwrap();
    let out = run(&s, &["--resume"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.epochs: 8 -> 9"), "{err}");
    std::fs::write(&s.spec, text).unwrap();

    let out = runner(
        &["resume", &id, "--results", s.results.to_str().unwrap()],
        s.dir.path(),
    );
    ok(&out);
    let (_, resumed) = only_run(&s.results);
    assert!(strs(&resumed, "status").iter().all(|s| s == "completed"));
    assert_same_run(&resumed, &baseline);
    let ev = events(&s.results, &id);
    assert_eq!(count(&ev, "Run resumed."), 1);

    // A finished run is not resumed again.
    let out = runner(
        &["resume", &id, "--results", s.results.to_str().unwrap()],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already completed"));
}

#[test]
fn ctrl_c_checkpoints_mid_epoch_and_resume_continues_exactly() {
    let s = setup(&LONG);
    let baseline = uninterrupted(&s);

    let mut child = spawn(&s, &s.results);
    let id = wait_for_checkpoint(&s.results, &mut child);
    // Into the next epoch's steps (its first checkpoint is written at an epoch's end, with
    // the folder synced: a signal right then would land between epochs).
    std::thread::sleep(std::time::Duration::from_millis(150));
    signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("runner resume {id}")), "{err}");
    let (_, partial) = only_run(&s.results);
    assert!(strs(&partial, "status").iter().all(|s| s == "interrupted"));
    let ck = runner::train::checkpoint::read(&s.results.join(&id).join("last.ckpt")).unwrap();
    assert_eq!(ck.state.progress.status, runner::train::Status::Interrupted);
    assert_eq!(ck.state.progress.history.len(), partial.height());
    assert!(
        ck.state.progress.step > 0,
        "the first Ctrl-C finishes the step it is in and checkpoints mid-epoch"
    );

    let out = run(&s, &["--resume"]);
    ok(&out);
    let (_, resumed) = only_run(&s.results);
    assert_same_run(&resumed, &baseline);
}

#[test]
fn ctrl_c_during_a_feature_extraction_stops_at_the_next_batch() {
    // 600 training images at 64x64: minutes on a real dataset, seconds here, but long after
    // the extraction's first progress line.
    let s = setup(&[("image_size = [32, 32]", "image_size = [64, 64]")]);
    common::make_dataset(&s.data, &["cats", "dogs"], [300, 4, 4], 40);
    let mut child = spawn(&s, &s.results);
    let started = std::time::Instant::now();
    let log = loop {
        let log = files_with(&s.results, ".log.jsonl").pop();
        if let Some(log) = log.filter(|l| {
            std::fs::read_to_string(l).is_ok_and(|t| t.contains("Extracting features."))
        }) {
            break log;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "ended before extracting"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(300));
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted before its first epoch ended")
            && err.contains("start the experiment again"),
        "{err}"
    );
    let id = run_id_of_log(&log);
    let ev = events(&s.results, &id);
    assert_eq!(count(&ev, "Interrupted while extracting features."), 1);
    assert_eq!(count(&ev, "Epoch finished."), 0);
    assert_eq!(
        count(&ev, "Feature cache written."),
        0,
        "no partial cache entry"
    );
    let stopped_at = ev
        .iter()
        .find(|e| e["message"] == "Interrupted while extracting features.")
        .unwrap();
    assert_eq!(stopped_at["split"], "train");
    assert!(stopped_at["done"].as_u64().unwrap() < 600, "{stopped_at}");
    // The table says so; there is no checkpoint to resume.
    let (_, table) = only_run(&s.results);
    assert_eq!(strs(&table, "status"), vec!["interrupted".to_string()]);
    assert!(strs(&table, "error")[0].contains("nothing to resume"));
    assert!(!s.results.join(&id).join("last.ckpt").exists());
    let out = runner(
        &["resume", &id, "--results", s.results.to_str().unwrap()],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no checkpoint"));
}

#[test]
fn a_second_ctrl_c_stops_at_once_and_leaves_no_half_written_file() {
    let s = setup(&LONG);
    let mut child = spawn(&s, &s.results);
    wait_for_checkpoint(&s.results, &mut child);
    signal(&child, "-INT");
    signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    for t in files_with(&s.results, ".parquet") {
        runner::results::read_run(&t).expect("a complete results table");
    }
}

#[test]
fn a_damaged_checkpoint_is_named_and_not_used() {
    let s = setup(&LONG);
    let mut child = spawn(&s, &s.results);
    let id = wait_for_checkpoint(&s.results, &mut child);
    signal(&child, "-KILL");
    child.wait().unwrap();
    let ck = s.results.join(&id).join("last.ckpt");
    let mut bytes = std::fs::read(&ck).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&ck, bytes).unwrap();
    let out = runner(
        &["resume", &id, "--results", s.results.to_str().unwrap()],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("last.ckpt") && err.contains("damaged checkpoint"),
        "{err}"
    );
    let out = runner(
        &[
            "resume",
            "no-such-run",
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-run"));
}

#[test]
fn test_predictions_are_written_and_predict_prints_the_same_probabilities() {
    let s = setup(&[]);
    ok(&run(&s, &[]));
    let (id, df) = only_run(&s.results);
    let preds = s.results.join(format!("{id}.predictions.parquet"));
    let p = runner::results::read_run(&preds).unwrap().0;
    assert_eq!(p.height(), 8);
    let correct = p
        .column("correct")
        .unwrap()
        .bool()
        .unwrap()
        .iter()
        .filter(|c| *c == Some(true))
        .count();
    assert!((correct as f64 / 8.0 - f64s(&df, "test_acc")[0]).abs() < 1e-9);
    let labels = strs(&p, "label");
    assert_eq!(labels.iter().filter(|l| *l == "cats").count(), 4);
    let prob = f64s(&p, "probability");
    assert!(prob.iter().all(|v| (0.5..=1.0).contains(v)));
    let dogs = f64s(&p, "p_dogs");

    let out = runner(
        &[
            "predict",
            &id,
            s.data.join("test").to_str().unwrap(),
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains("cats") && lines[0].contains("dogs"));
    assert_eq!(lines.len(), 9, "{stdout}");
    let paths = strs(&p, "path");
    for line in &lines[1..] {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (cat, dog): (f64, f64) = (cols[1].parse().unwrap(), cols[2].parse().unwrap());
        assert!((cat + dog - 1.0).abs() < 2e-4, "{line}");
        let i = paths.iter().position(|p| p == cols[0]).unwrap();
        assert!((dog - dogs[i]).abs() < 1e-4, "{line} vs {}", dogs[i]);
        assert_eq!(cols[3], if dog > cat { "dogs" } else { "cats" });
    }

    // Bad input: an unreadable image is named; an unknown run is named.
    let broken = s.dir.path().join("broken.jpg");
    std::fs::write(&broken, b"not a jpeg").unwrap();
    let out = runner(
        &[
            "predict",
            &id,
            broken.to_str().unwrap(),
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.jpg"));
    let out = runner(
        &[
            "predict",
            "nope",
            broken.to_str().unwrap(),
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run nope"));
}

#[test]
fn schedules_set_the_learning_rate_of_each_epoch() {
    // Step decay: halve every epoch.
    let s = with_extra(
        &[("epochs = 2", "epochs = 3")],
        "[schedule]\nkind = \"step\"\nevery_epochs = 1\ngamma = 0.5\n",
    );
    ok(&run(&s, &[]));
    let (_, df) = only_run(&s.results);
    assert_eq!(f64s(&df, "lr"), [1e-3, 5e-4, 2.5e-4]);
    // Reduce on plateau: with min_delta 1000 only the first epoch improves; patience 1 reduces
    // after each later epoch; the rate never goes below min_lr.
    let s = with_extra(
        &[("epochs = 2", "epochs = 4")],
        "[schedule]\nkind = \"reduce_on_plateau\"\nfactor = 0.1\npatience = 1\nmin_delta = 1000.0\nmin_lr = 2e-6\n",
    );
    ok(&run(&s, &[]));
    let (id, df) = only_run(&s.results);
    let lr = f64s(&df, "lr");
    let want = [1e-3, 1e-3, 1e-4, 1e-5];
    for (a, b) in lr.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{lr:?}");
    }
    assert_eq!(
        count(
            &events(&s.results, &id),
            "Learning rate reduced on plateau."
        ),
        3
    );
}

/// Every file a run left in `results` reads: its table, its checkpoints, its log (but for a last
/// line cut short by the kill).
fn assert_everything_reads(results: &Path) {
    for e in std::fs::read_dir(results).unwrap().flatten() {
        let p = e.path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".parquet") {
            runner::results::read_run(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.ends_with(".log.jsonl") {
            let text = std::fs::read_to_string(&p).unwrap();
            let complete = text.matches('\n').count();
            for line in text.lines().take(complete) {
                assert!(
                    serde_json::from_str::<serde_json::Value>(line).is_ok(),
                    "{name}: {line}"
                );
            }
        } else if p.is_dir() {
            for ck in ["last.ckpt", "best.ckpt"] {
                let c = p.join(ck);
                if c.is_file() {
                    runner::train::checkpoint::read(&c).unwrap_or_else(|e| panic!("{ck}: {e}"));
                }
            }
        }
    }
}

#[test]
fn killed_again_and_again_at_random_points_it_still_resumes_to_the_same_run() {
    let s = setup(&LONG);
    let baseline = uninterrupted(&s);
    // Kill points from a fixed pseudo-random stream: the same loop on every machine.
    let mut rng = common::Rng::new(2026);
    let mut id: Option<String> = None;
    let mut kills = 0;
    for round in 0..6 {
        let mut child = match &id {
            None => spawn(&s, &s.results),
            Some(id) => common::cli::spawn(
                &s,
                &["resume", id, "--results", s.results.to_str().unwrap()],
            ),
        };
        if id.is_none() {
            id = Some(wait_for_checkpoint(&s.results, &mut child));
        }
        let wait = std::time::Duration::from_millis(100 + rng.next_u64() % 900);
        std::thread::sleep(wait);
        if child.try_wait().unwrap().is_some() {
            // It finished before this kill.
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            break;
        }
        signal(&child, "-KILL");
        child.wait().unwrap();
        kills += 1;
        assert_everything_reads(&s.results);
    }
    assert!(
        kills >= 2,
        "the loop killed the run at least twice ({kills})"
    );
    let id = id.unwrap();
    let (_, now) = only_run(&s.results);
    if !strs(&now, "status").iter().all(|x| x == "completed") {
        ok(&runner(
            &["resume", &id, "--results", s.results.to_str().unwrap()],
            s.dir.path(),
        ));
    }
    assert_everything_reads(&s.results);
    let (_, resumed) = only_run(&s.results);
    assert!(strs(&resumed, "status").iter().all(|x| x == "completed"));
    assert_same_run(&resumed, &baseline);
    // The temporary files the kills left are gone after the resume.
    let run_dir = s.results.join(&id);
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `runner predict RUN test/ --weights WHICH`.
fn predict_test_split(s: &Setup, id: &str, which: &str) -> std::process::Output {
    runner(
        &[
            "predict",
            id,
            s.data.join("test").to_str().unwrap(),
            "--weights",
            which,
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    )
}

#[test]
fn a_phase_with_its_own_head_starts_it_fresh_on_the_trained_base_and_predict_uses_it() {
    let s = with_extra(&[], &common::new_head_phases(2, 2));
    ok(&run(&s, &[]));
    let (id, df) = only_run(&s.results);
    assert_eq!(strs(&df, "phase"), ["dense", "dense", "conv", "conv"]);
    let heads = strs(&df, "head");
    assert!(heads[0].starts_with("flatten > dense(16"), "{heads:?}");
    assert_eq!(heads[0], heads[1]);
    assert_eq!(
        heads[2],
        "conv2d(4, 1x1, stride 1x1, valid, relu) > flatten > dense(1, sigmoid)"
    );
    assert_eq!(heads[2], heads[3]);
    let ev = events(&s.results, &id);
    let new: Vec<&serde_json::Value> = ev.iter().filter(|e| e["message"] == "New head.").collect();
    assert_eq!(new.len(), 1);
    assert_eq!(new[0]["phase"], "conv");
    assert_eq!(new[0]["params"], 4 * 512 + 4 + 4 + 1);

    // The saved model is the conv head on a base whose block5_conv3 alone was trained.
    let model = exported_safetensors(&s, &id);
    let head: Vec<(String, usize)> = tensors(&model, "head.")
        .into_iter()
        .map(|(n, v)| (n, v.len()))
        .collect();
    assert_eq!(
        head.iter()
            .map(|h| h.1)
            .collect::<Vec<_>>()
            .iter()
            .sum::<usize>(),
        4 * 512 + 4 + 4 + 1,
        "{head:?}"
    );
    let (before, after) = (tensors(&s.weights, "block"), tensors(&model, "block"));
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        assert_eq!(a == b, !name.starts_with("block5_conv3"), "{name}");
    }
    // The best checkpoint is of the final head: its tracking starts again with the new head.
    let best = runner::train::checkpoint::read(&s.results.join(&id).join("best.ckpt")).unwrap();
    assert_eq!(best.state.progress.head_from, 1);
    assert!(best.state.progress.best.best_epoch >= 3);
    for which in ["final", "best", "last"] {
        let out = predict_test_split(&s, &id, which);
        ok(&out);
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 9);
    }
    // The plan shows it.
    let out = runner(&["plan", s.spec.to_str().unwrap()], s.dir.path());
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "2. conv: 2 epochs, trainable from block5_conv3 (2,361,865 trainable params)"
        ) && text.contains(
            "a new head: conv2d(4, 1x1, stride 1x1, valid, relu) > flatten > dense(1, sigmoid) (2,057 params)"
        ),
        "{text}"
    );
}

#[test]
fn a_run_stopped_before_or_after_a_new_head_resumes_to_the_same_run() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = with_extra(&[], &common::new_head_phases(2, 2));
    let plan = common::plan_for(s.dir.path(), &std::fs::read_to_string(&s.spec).unwrap());
    let device = burn::prelude::Device::flex().autodiff();
    // One feature cache on disk for every run: the activations of the new head's phase are
    // then read, not extracted, so a Ctrl-C at the phase boundary lands in its first steps
    // (during an extraction it stops before them: ctrl_c_during_a_feature_extraction_...).
    let cache = s.dir.path().join("features");
    let opts = |results: &Path, resume, interrupt| runner::train::RunOptions {
        cache: runner::train::FeatureCache::new(Some(cache.clone())),
        ..common::run_options(&plan, results, resume, interrupt)
    };
    let whole = runner::train::run(
        &plan,
        &device,
        opts(&s.dir.path().join("whole"), None, None),
        |_| {},
    )
    .unwrap();
    assert_eq!(whole.progress.history.len(), 4);
    // Stopped in the first steps of the new head's phase and after its first epoch; and the
    // checkpoint of epoch 2, before the new head was drawn.
    let boundary = s.dir.path().join("epoch2.ckpt");
    let mut checkpoints = Vec::new();
    for stop_after in [2, 3] {
        let results = s.dir.path().join(format!("stop{stop_after}"));
        let flag = Arc::new(AtomicBool::new(false));
        let last = results.join("test").join("last.ckpt");
        let stopped = runner::train::run(
            &plan,
            &device,
            opts(&results, None, Some(flag.clone())),
            |p| {
                if p.history.len() == stop_after {
                    if stop_after == 2 && !boundary.exists() {
                        std::fs::copy(&last, &boundary).unwrap();
                    }
                    flag.store(true, Ordering::SeqCst);
                }
            },
        )
        .unwrap();
        assert_eq!(stopped.progress.history.len(), stop_after);
        checkpoints.push((results, runner::train::checkpoint::read(&last).unwrap()));
    }
    let at_boundary = runner::train::checkpoint::read(&boundary).unwrap();
    checkpoints.push((s.dir.path().join("stop2"), at_boundary));
    let froms: Vec<usize> = checkpoints
        .iter()
        .map(|(_, c)| c.state.progress.head_from)
        .collect();
    let info: Vec<_> = checkpoints
        .iter()
        .map(|(_, c)| {
            (
                c.state.progress.history.len(),
                c.state.progress.phase,
                c.state.progress.epoch_in_phase,
                c.state.progress.step,
            )
        })
        .collect();
    assert_eq!(froms, [1, 1, 0], "{info:?}");
    for (results, ck) in checkpoints {
        let stop_after = ck.state.progress.history.len();
        let resumed =
            runner::train::run(&plan, &device, opts(&results, Some(ck), None), |_| {}).unwrap();
        let metrics = |o: &runner::train::Outcome| {
            o.progress
                .history
                .iter()
                .map(|m| (m.epoch, m.train_loss, m.val_loss, m.val_acc))
                .collect::<Vec<_>>()
        };
        let (a, b) = (metrics(&resumed), metrics(&whole));
        assert_eq!(a.len(), 4);
        for (x, y) in a.iter().zip(&b) {
            assert!(
                x.0 == y.0 && (x.1 - y.1).abs() < 1e-5 && (x.2 - y.2).abs() < 1e-5 && x.3 == y.3,
                "stopped after {stop_after}: {a:?} vs {b:?}"
            );
        }
    }
}

#[test]
fn ctrl_c_during_a_later_extraction_or_the_test_evaluation_resumes_to_the_same_run() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = with_extra(&[], &common::new_head_phases(2, 2));
    let plan = common::plan_for(s.dir.path(), &std::fs::read_to_string(&s.spec).unwrap());
    let device = burn::prelude::Device::flex().autodiff();
    let whole = common::train(&plan, &device, &s.dir.path().join("whole"));
    // Activations in memory only: the second phase's new cutoff and the test split are
    // extracted, and the Ctrl-C of epoch 2 (4) lands in that extraction.
    for (stop_after, during) in [
        (2, "the second phase's extraction"),
        (4, "the test evaluation"),
    ] {
        let results = s.dir.path().join(format!("stop{stop_after}"));
        let flag = Arc::new(AtomicBool::new(false));
        let stopped = runner::train::run(
            &plan,
            &device,
            common::run_options(&plan, &results, None, Some(flag.clone())),
            |p| {
                if p.history.len() == stop_after {
                    flag.store(true, Ordering::SeqCst);
                }
            },
        )
        .unwrap();
        assert_eq!(
            stopped.progress.status,
            runner::train::Status::Interrupted,
            "{during}"
        );
        assert_eq!(stopped.progress.history.len(), stop_after, "{during}");
        assert!(stopped.test.is_none(), "{during}");
        assert!(
            stopped.progress.error.is_none(),
            "{during}: it has a checkpoint"
        );
        let ck = runner::train::checkpoint::read(&results.join("test").join("last.ckpt")).unwrap();
        assert_eq!(ck.state.progress.history.len(), stop_after, "{during}");
        // Stopped before any step of the next phase (not after its first one, as when the
        // extraction ran to its end): the checkpoint is still epoch 2's, before the new head.
        assert_eq!(ck.state.progress.step, 0, "{during}");
        if stop_after == 2 {
            assert_eq!(ck.state.progress.head_from, 0, "{during}");
        }
        let resumed = runner::train::run(
            &plan,
            &device,
            common::run_options(&plan, &results, Some(ck), None),
            |_| {},
        )
        .unwrap();
        assert_eq!(resumed.progress.history.len(), 4, "{during}");
        for (a, b) in resumed.progress.history.iter().zip(&whole.progress.history) {
            assert!(
                (a.val_loss - b.val_loss).abs() < 1e-5 && a.val_acc == b.val_acc,
                "{during}"
            );
        }
        let (t, w) = (resumed.test.unwrap(), whole.test.unwrap());
        assert!((t.loss - w.loss).abs() < 1e-5 && t.acc == w.acc, "{during}");
    }
}

/// The `p_dogs` column of a run's test predictions, by file name (class/file).
fn test_dogs(results: &Path, id: &str) -> Vec<(String, f64)> {
    let table = runner::results::read_run(&results.join(format!("{id}.predictions.parquet")))
        .unwrap()
        .0;
    let names = strs(&table, "path").into_iter().map(|p| {
        let p = Path::new(&p);
        let class = p.parent().unwrap().file_name().unwrap().to_string_lossy();
        format!("{class}/{}", p.file_name().unwrap().to_string_lossy())
    });
    names.zip(f64s(&table, "p_dogs")).collect()
}

#[test]
fn test_time_flips_average_each_image_with_its_mirror_and_leave_training_alone() {
    let tta_line = "test_time_augmentation = \"horizontal_flip\"";
    let plain = setup(&[]);
    let tta = with_extra(&[], tta_line);
    // The same data with every test image mirrored: the plain model's view of the mirrors.
    let mirrored = setup(&[]);
    for class in ["cats", "dogs"] {
        for e in std::fs::read_dir(mirrored.data.join("test").join(class)).unwrap() {
            let p = e.unwrap().path();
            let img = image::open(&p).unwrap().to_rgb8();
            image::imageops::flip_horizontal(&img).save(&p).unwrap();
        }
    }
    for s in [&plain, &tta, &mirrored] {
        ok(&run(s, &[]));
    }
    let (a_id, a) = only_run(&plain.results);
    let (b_id, b) = only_run(&tta.results);
    let (c_id, _) = only_run(&mirrored.results);
    // Training and validation are the same run (same seed, one view); the configs differ.
    assert_eq!(f64s(&a, "val_loss"), f64s(&b, "val_loss"));
    assert_eq!(f64s(&a, "train_loss"), f64s(&b, "train_loss"));
    assert_ne!(strs(&a, "config_hash")[0], strs(&b, "config_hash")[0]);

    // Each test image's probability is the mean of the plain model's on it and on its mirror.
    let (on_image, on_mirror, both) = (
        test_dogs(&plain.results, &a_id),
        test_dogs(&mirrored.results, &c_id),
        test_dogs(&tta.results, &b_id),
    );
    assert_eq!(both.len(), 8);
    let mut differs = 0;
    for ((name, p), ((n1, x), (n2, y))) in both.iter().zip(on_image.iter().zip(&on_mirror)) {
        assert!(name == n1 && name == n2);
        assert!(
            (p - (x + y) / 2.0).abs() < 1e-6,
            "{name}: {p} vs ({x} + {y}) / 2"
        );
        differs += usize::from((x - y).abs() > 1e-5);
    }
    assert!(
        differs > 0,
        "a mirror is another view: {on_image:?} vs {on_mirror:?}"
    );
    // test_acc is the averaged probabilities' accuracy.
    let correct = both
        .iter()
        .filter(|(n, p)| (*p > 0.5) == n.starts_with("dogs/"))
        .count();
    assert!((correct as f64 / 8.0 - f64s(&b, "test_acc")[0]).abs() < 1e-9);
    // `runner predict` sees the same two views (the saved model's card says so).
    let device = burn::prelude::Device::flex();
    let (card, model) = runner::predict::load(
        &tta.results,
        &b_id,
        runner::predict::Which::Final,
        &device,
        &Default::default(),
    )
    .unwrap();
    let files: Vec<std::path::PathBuf> = both
        .iter()
        .map(|(n, _)| tta.data.join("test").join(n))
        .collect();
    let rows = runner::predict::predict(&card, &model, &files, &device);
    for ((_, p), (path, r)) in both.iter().zip(rows) {
        let q = f64::from(r.unwrap()[1]);
        assert!((q - p).abs() < 1e-6, "{}: {q} vs {p}", path.display());
    }
}

#[test]
fn label_smoothing_trains_against_softened_targets() {
    // Against targets 0.9 / 0.1 the training loss cannot fall below their entropy, H(0.9).
    let s = with_extra(&[], "label_smoothing = 0.2");
    ok(&run(&s, &[]));
    let plain = setup(&[]);
    ok(&run(&plain, &[]));
    let ((_, a), (_, b)) = (only_run(&s.results), only_run(&plain.results));
    let floor = -(0.9f64 * 0.9f64.ln() + 0.1 * 0.1f64.ln());
    assert!(
        f64s(&a, "train_loss").iter().all(|l| *l >= floor - 1e-6),
        "{:?} under {floor}",
        f64s(&a, "train_loss")
    );
    assert_ne!(f64s(&a, "train_loss"), f64s(&b, "train_loss"));
    assert_ne!(
        f64s(&a, "val_loss"),
        f64s(&b, "val_loss"),
        "the head trained differently"
    );
}

#[test]
fn predict_builds_the_head_a_checkpoint_holds_before_and_after_a_new_head() {
    // Interrupted in the long first phase: the checkpoints hold the dense head, and there is no
    // model.json yet. Resumed to the end: the final model is the conv head.
    let long_first = common::new_head_phases(8, 2);
    let s = with_extra(
        &[("epochs = 2", "epochs = 2\nsteps_per_epoch = 40")],
        &long_first,
    );
    let mut child = spawn(&s, &s.results);
    let id = wait_for_checkpoint(&s.results, &mut child);
    signal(&child, "-INT");
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let ck = runner::train::checkpoint::read(&s.results.join(&id).join("last.ckpt")).unwrap();
    assert_eq!(ck.state.progress.phase, 0);
    assert!(!s.results.join(&id).join("model.json").exists());
    for which in ["final", "best", "last"] {
        let out = predict_test_split(&s, &id, which);
        ok(&out);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().count(),
            9,
            "{which}"
        );
    }
    ok(&run(&s, &["--resume"]));
    let (_, df) = only_run(&s.results);
    assert!(strs(&df, "status").iter().all(|s| s == "completed"));
    let device = burn::prelude::Device::flex();
    for (which, from) in [
        (runner::predict::Which::Final, None),
        (runner::predict::Which::Best, Some(1)),
        (runner::predict::Which::Last, Some(1)),
    ] {
        let (card, model) =
            runner::predict::load(&s.results, &id, which, &device, &Default::default()).unwrap();
        assert_eq!(card.spec.final_head().0, "phase[1].head");
        assert_eq!(model.head.layers.len(), 3, "{which:?}: the conv head");
        if let Some(from) = from {
            let path = if which == runner::predict::Which::Best {
                "best.ckpt"
            } else {
                "last.ckpt"
            };
            let ck = runner::train::checkpoint::read(&s.results.join(&id).join(path)).unwrap();
            assert_eq!(ck.state.progress.head_from, from);
        }
    }
}
