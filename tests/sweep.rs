//! Sweeps (folders and grids), skip-if-done, shards, concurrent sweeps, failures, `runner
//! results`, `runner plot` and `runner logs`: the binary on generated images and random weights.

mod common;

use std::path::Path;
use std::process::Command;

use polars::prelude::*;

use common::cli::*;

const GRID: &str = "\n[sweep]\n\"optimizer.lr\" = [1e-3, 1e-4]\n\"train.epochs\" = [1, 2]\n";

/// `(config_hash, status, sweep_point)` of every run table in `results`.
fn runs(results: &Path) -> Vec<(String, String, String)> {
    files_with(results, ".parquet")
        .iter()
        .map(|p| {
            let df = runner::results::read_run(p).unwrap().0;
            (
                strs(&df, "config_hash")[0].clone(),
                strs(&df, "status")[0].clone(),
                strs(&df, "sweep_point")[0].clone(),
            )
        })
        .collect()
}

fn grid_setup() -> Setup {
    let s = setup(&[]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    std::fs::write(&s.spec, format!("{text}{GRID}")).unwrap();
    s
}

#[test]
fn a_grid_expands_to_the_cartesian_product_each_with_its_own_hash() {
    let s = grid_setup();
    let points = runner::spec::load::grid(&s.spec).unwrap();
    assert_eq!(points.len(), 4);
    let out = run(&s, &[]);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("4 runs"), "{stdout}");
    let r = runs(&s.results);
    assert_eq!(r.len(), 4);
    let mut hashes: Vec<&String> = r.iter().map(|x| &x.0).collect();
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), 4, "each point has its own config hash");
    assert!(r.iter().all(|x| x.1 == "completed"));
    let mut points: Vec<&String> = r.iter().map(|x| &x.2).collect();
    points.sort();
    assert_eq!(
        points,
        [
            "optimizer.lr = 0.0001, train.epochs = 1",
            "optimizer.lr = 0.0001, train.epochs = 2",
            "optimizer.lr = 0.001, train.epochs = 1",
            "optimizer.lr = 0.001, train.epochs = 2",
        ]
    );

    // Done points are skipped; --force reruns them.
    let out = run(&s, &["--sweep"]);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("skipped: already completed").count(),
        4,
        "{stdout}"
    );
    assert_eq!(runs(&s.results).len(), 4);
    ok(&run(&s, &["--force"]));
    assert_eq!(runs(&s.results).len(), 8);
}

#[test]
fn every_grid_point_is_checked_before_the_first_runs() {
    let s = setup(&[]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    std::fs::write(
        &s.spec,
        format!("{text}\n[sweep]\n\"optimizer.lr\" = [1e-3, -1.0]\n\"train.epoch\" = [1]\n"),
    )
    .unwrap();
    let out = run(&s, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing was run"), "{err}");
    assert!(err.contains("[sweep] train.epoch"), "{err}");
    assert!(err.contains("unknown field `epoch`"), "{err}");
    assert!(files_with(&s.results, ".parquet").is_empty());
    std::fs::write(&s.spec, format!("{text}\n[sweep]\n\"optimizer.lr\" = []\n")).unwrap();
    let out = run(&s, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("sweep.\"optimizer.lr\": expected a non-empty array")
    );
}

#[test]
fn shards_partition_the_points_exactly() {
    for len in 0..12 {
        for n in 1..5 {
            let mut all: Vec<usize> = (0..n)
                .flat_map(|i| runner::sweep::shard_indices(len, i, n))
                .collect();
            all.sort();
            assert_eq!(all, (0..len).collect::<Vec<_>>(), "len {len}, n {n}");
        }
    }
    assert!(runner::sweep::parse_shard("2/2").is_err());
    assert!(runner::sweep::parse_shard("1/0").is_err());
    assert_eq!(runner::sweep::parse_shard("1/3"), Ok((1, 3)));

    let s = grid_setup();
    let a = run(&s, &["--shard", "0/3"]);
    ok(&a);
    assert!(String::from_utf8_lossy(&a.stdout).contains("shard 0/3: 2 of them"));
    ok(&run(&s, &["--shard", "1/3"]));
    ok(&run(&s, &["--shard", "2/3"]));
    let mut hashes: Vec<String> = runs(&s.results).into_iter().map(|r| r.0).collect();
    assert_eq!(hashes.len(), 4);
    hashes.sort();
    hashes.dedup();
    assert_eq!(
        hashes.len(),
        4,
        "every point exactly once across the shards"
    );
}

#[test]
fn two_sweeps_writing_to_one_folder_at_once_lose_nothing() {
    let s = grid_setup();
    let args = [
        "sweep",
        s.spec.to_str().unwrap(),
        "--device",
        "cpu",
        "--results",
        s.results.to_str().unwrap(),
    ];
    let spawn = || common::cli::spawn(&s, &args);
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    ok(&a);
    ok(&b);
    let r = runs(&s.results);
    let mut completed: Vec<&String> = r
        .iter()
        .filter(|x| x.1 == "completed")
        .map(|x| &x.0)
        .collect();
    completed.sort();
    completed.dedup();
    assert_eq!(completed.len(), 4, "every point completed: {r:?}");
    // Every file is whole, and every run has its config, log and model.
    for p in files_with(&s.results, ".parquet") {
        let id = p.file_stem().unwrap().to_string_lossy().to_string();
        assert!(s.results.join(format!("{id}.toml")).is_file());
        assert!(s.results.join(format!("{id}.log.jsonl")).is_file());
        assert!(s.results.join(&id).join("model.bpk").is_file());
    }
}

#[test]
fn a_failed_run_is_recorded_and_the_sweep_goes_on() {
    let s = setup(&[]);
    let dir = s.dir.path().join("experiments");
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(&s.spec).unwrap();
    let broken = s.dir.path().join("broken.safetensors");
    std::fs::write(&broken, b"these are not weights").unwrap();
    std::fs::write(dir.join("a.toml"), text.replace("\"tiny\"", "\"a\"")).unwrap();
    std::fs::write(
        dir.join("b.toml"),
        text.replace("\"tiny\"", "\"b\"")
            .replace(s.weights.to_str().unwrap(), broken.to_str().unwrap()),
    )
    .unwrap();
    std::fs::write(
        dir.join("c.toml"),
        text.replace("\"tiny\"", "\"c\"")
            .replace("lr = 1e-3", "lr = 1e30"),
    )
    .unwrap();
    std::fs::write(dir.join("d.toml"), text.replace("\"tiny\"", "\"d\"")).unwrap();
    let out = runner(
        &[
            "--sweep",
            dir.to_str().unwrap(),
            "--device",
            "cpu",
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 of 4 runs failed or diverged"), "{err}");
    let table = runner::results::query::query(
        &s.results,
        &runner::results::query::Query {
            filters: vec![],
            sort: Some("experiment".into()),
            epochs: false,
            format: runner::results::query::Format::Table,
            columns: vec![],
        },
    )
    .unwrap()
    .unwrap();
    assert_eq!(strs(&table, "experiment"), ["a", "b", "c", "d"]);
    assert_eq!(
        strs(&table, "status"),
        ["completed", "failed", "diverged", "completed"],
        "{stdout}"
    );
    let errors = strs(&table, "error");
    assert!(errors[1].contains("broken.safetensors"), "{errors:?}");
    assert!(errors[2].contains("diverged at epoch 1"), "{errors:?}");
    assert!(
        stdout.contains("failed") && stdout.contains("diverged"),
        "{stdout}"
    );
}

/// A table as schema version 1 wrote it (no `phase`, `sweep_point`, `error`).
fn write_v1(path: &Path) {
    let mut df = df! {
        "schema_version" => [1u32, 1],
        "run_id" => ["old-20260101-000000-abcdef12"; 2],
        "experiment" => ["old"; 2],
        "config_hash" => ["abcdef1234567890"; 2],
        "status" => ["completed"; 2],
        "started_at" => ["2026-01-01T00:00:00+00:00"; 2],
        "backbone" => ["vgg16"; 2],
        "weights" => ["w.safetensors"; 2],
        "preprocess" => ["rescale"; 2],
        "trainable_from" => ["none"; 2],
        "head" => ["flatten > dense(1, sigmoid)"; 2],
        "optimizer" => ["rmsprop"; 2],
        "lr" => [2e-5, 2e-5],
        "batch_size" => [20u32, 20],
        "seed" => [42u64, 42],
        "image_size" => ["150x150"; 2],
        "epoch" => [1u32, 2],
        "train_loss" => [0.6, 0.5],
        "train_acc" => [0.7, 0.8],
        "val_loss" => [0.5, 0.45],
        "val_acc" => [0.8, 0.85],
        "seconds" => [10.0, 11.0],
        "test_loss" => [0.4, 0.4],
        "test_acc" => [0.84, 0.84],
        "skipped_images" => [0u32, 0],
    }
    .unwrap();
    let f = std::fs::File::create(path).unwrap();
    ParquetWriter::new(f).finish(&mut df).unwrap();
}

#[test]
fn results_reads_older_schemas_and_filters_sorts_and_formats() {
    let s = setup(&[]);
    ok(&run(&s, &[]));
    write_v1(&s.results.join("old-20260101-000000-abcdef12.parquet"));
    let results = |extra: &[&str]| {
        let mut args = vec!["results", s.results.to_str().unwrap()];
        args.extend_from_slice(extra);
        runner(&args, s.dir.path())
    };
    let out = results(&["--format", "json", "--sort", "-best_val_acc"]);
    ok(&out);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 2);
    let old = rows.iter().find(|r| r["experiment"] == "old").unwrap();
    assert_eq!(old["best_val_acc"], 0.85);
    assert_eq!(old["final_val_acc"], 0.85);
    assert_eq!(old["epochs"], 2);
    assert!(old["phases"] == 0 || old["phases"] == 1, "{old}");
    let new = rows.iter().find(|r| r["experiment"] == "tiny").unwrap();
    assert_eq!(new["status"], "completed");
    assert_eq!(new["epochs"], 2);
    let best = |r: &serde_json::Value| r["best_val_acc"].as_f64().unwrap();
    assert!(best(&rows[0]) >= best(&rows[1]), "sorted descending");

    let out = results(&["--filter", "experiment=old", "--format", "csv"]);
    ok(&out);
    let csv = String::from_utf8_lossy(&out.stdout);
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .starts_with("run_id,experiment,status")
    );
    let out = results(&["--epochs", "--filter", "val_acc>=0.85"]);
    ok(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("old-20260101-000000-abcdef12"), "{table}");
    let out = results(&["--filter", "val_accc>1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no column \"val_accc\""));

    // A Markdown table of chosen columns, in their order, numbers right-aligned.
    let out = results(&[
        "--format",
        "markdown",
        "--columns",
        "experiment,epochs,best_val_acc",
        "--sort",
        "experiment",
    ]);
    ok(&out);
    let md = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines[0], "| experiment | epochs | best_val_acc |", "{md}");
    assert_eq!(lines[1], "| --- | ---: | ---: |", "{md}");
    assert_eq!(lines[2], "| old | 2 | 0.8500 |", "{md}");
    assert!(lines[3].starts_with("| tiny | 2 | "), "{md}");
    assert_eq!(lines.len(), 4);
    // Alignment follows the column's type, not its first value (a null error is still text).
    let out = results(&["--format", "markdown", "--columns", "experiment, error"]);
    ok(&out);
    let md = String::from_utf8_lossy(&out.stdout);
    assert_eq!(md.lines().nth(1), Some("| --- | --- |"), "{md}");
    let out = results(&["--columns", "experiment,experiment"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"experiment\" is given twice"));
    let out = results(&["--columns", "experiment,best_val_accc"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--columns experiment,best_val_accc: no column \"best_val_accc\" (did you mean \"best_val_acc\"?)"), "{err}");
}

#[test]
fn plot_draws_png_and_svg_and_logs_render_the_run() {
    let s = setup(&[("epochs = 2", "epochs = 4")]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    std::fs::write(
        &s.spec,
        format!("{text}\n[[phase]]\nname = \"head\"\nepochs = 2\n\n[[phase]]\nname = \"tune\"\nepochs = 2\ntrainable_from = \"block5_conv1\"\n"),
    )
    .unwrap();
    ok(&run(&s, &[]));
    write_v1(&s.results.join("old-20260101-000000-abcdef12.parquet"));
    let png = s.dir.path().join("curves.png");
    let out = runner(
        &[
            "plot",
            "--results",
            s.results.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
            "--smooth",
            "0.8",
        ],
        s.dir.path(),
    );
    ok(&out);
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1400, 520));
    let coloured = img
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0;
            r.abs_diff(g) > 40 || g.abs_diff(b) > 40
        })
        .count();
    assert!(coloured > 500, "curves in colour: {coloured} pixels");
    let svg = s.dir.path().join("curves.svg");
    let id = files_with(&s.results, ".parquet")
        .into_iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().to_string())
        .find(|id| id.starts_with("tiny"))
        .unwrap();
    let out = runner(
        &[
            "plot",
            &id,
            "--results",
            s.results.to_str().unwrap(),
            "--out",
            svg.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    ok(&out);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("Training and validation loss"));
    assert!(text.contains("tune"), "the phase boundary is labelled");
    let out = runner(
        &["plot", "nope", "--results", s.results.to_str().unwrap()],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope: not a run id"));
    let out = runner(
        &[
            "plot",
            &id,
            "--smooth",
            "1.5",
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--smooth 1.5: the factor must be in [0, 1)")
    );
    let out = runner(
        &["logs", "nope", "--results", s.results.to_str().unwrap()],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no log for run nope"));

    // logs: readable lines; --follow returns once the run has ended.
    for follow in [false, true] {
        let mut args = vec![
            "logs",
            id.as_str(),
            "--results",
            s.results.to_str().unwrap(),
        ];
        if follow {
            args.push("--follow");
        }
        let out = runner(&args, s.dir.path());
        ok(&out);
        let text = String::from_utf8_lossy(&out.stdout);
        let epochs: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("Epoch finished."))
            .collect();
        assert_eq!(epochs.len(), 4, "{text}");
        assert!(
            epochs[0].contains("INFO") && epochs[0].contains("val_acc="),
            "{}",
            epochs[0]
        );
        assert!(text.lines().last().unwrap().contains("Run finished."));
    }
}

#[test]
fn smoothing_is_the_notebooks_exponential_moving_average() {
    let s = runner::plot::smooth(&[1.0, 0.0, 0.0, 1.0], 0.8);
    let want = [1.0, 0.8, 0.64, 0.712];
    for (a, b) in s.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{s:?}");
    }
}

#[test]
fn logs_follow_a_live_run_until_it_ends() {
    let s = setup(&[("epochs = 2", "epochs = 6\nsteps_per_epoch = 4000")]);
    let mut child = common::cli::spawn_run(&s, &[]);
    // Start following as soon as the log exists, long before the run ends.
    let log = loop {
        if let Some(l) = files_with(&s.results, ".log.jsonl").pop() {
            break l;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended too soon"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let id = run_id_of_log(&log);
    let out = runner(
        &[
            "logs",
            &id,
            "--follow",
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    ok(&out);
    assert!(child.wait().unwrap().success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("Epoch finished.").count(), 6, "{text}");
    assert!(
        text.lines().last().unwrap().contains("Run finished."),
        "{text}"
    );
}

#[test]
fn an_interrupted_sweep_resumes_where_it_stopped() {
    let s = setup(&[("epochs = 2", "epochs = 6\nsteps_per_epoch = 4000")]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    std::fs::write(
        &s.spec,
        format!("{text}\n[sweep]\n\"optimizer.lr\" = [1e-3, 1e-4]\n"),
    )
    .unwrap();
    let args = [
        s.spec.to_str().unwrap(),
        "--device",
        "cpu",
        "--results",
        s.results.to_str().unwrap(),
    ];
    let mut child = common::cli::spawn(&s, &args);
    // Ctrl-C once the first point has a checkpoint.
    loop {
        let started = std::fs::read_dir(&s.results)
            .map(|rd| rd.flatten().any(|e| e.path().join("last.ckpt").is_file()))
            .unwrap_or(false);
        if started {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep ended too soon"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&out.stdout).contains("interrupted"));
    let first = runs(&s.results);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1, "interrupted");

    let out = runner(&args, s.dir.path());
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("resuming"), "{stdout}");
    let r = runs(&s.results);
    assert_eq!(
        r.len(),
        2,
        "the interrupted run was continued, not restarted: {r:?}"
    );
    assert!(r.iter().all(|x| x.1 == "completed"), "{r:?}");
    // The resumed run is still its grid point (it once lost its `sweep_point` on every row).
    let mut points: Vec<&str> = r.iter().map(|x| x.2.as_str()).collect();
    points.sort();
    assert_eq!(points, ["optimizer.lr = 0.0001", "optimizer.lr = 0.001"]);
    for p in files_with(&s.results, ".parquet") {
        let df = runner::results::read_run(&p).unwrap().0;
        let sp = strs(&df, "sweep_point");
        assert!(sp.iter().all(|x| x == &sp[0]), "{}: {sp:?}", p.display());
    }
}

#[test]
fn the_writer_writes_the_one_schema_the_readers_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), &["a", "b"], [1, 1, 1], 8);
    let weights = dir.path().join("w.safetensors");
    std::fs::write(&weights, b"not read by the plan").unwrap();
    let plan = common::plan_for(dir.path(), &common::spec_text(&data, &weights, ""));
    let progress = runner::train::Progress::default();
    let df = runner::results::run_frame(&plan, "r", "t", &progress.record(), None).unwrap();
    let got: Vec<(String, DataType)> = df
        .schema()
        .iter()
        .map(|(n, d)| (n.to_string(), d.clone()))
        .collect();
    let want: Vec<(String, DataType)> = runner::results::schema::columns()
        .into_iter()
        .map(|(n, d)| (n.to_string(), d))
        .collect();
    assert_eq!(got, want);
}
