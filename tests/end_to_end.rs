//! The `runner` binary end to end on generated images and random weights: results, logs,
//! reproducibility, and bad input reported before training with nothing lost.

mod common;

use polars::prelude::*;

use common::cli::*;

#[test]
fn a_tiny_run_writes_a_parquet_table_a_config_and_a_json_log() {
    let s = setup(&[]);
    let out = run(&s, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parquet = files_with(&s.results, ".parquet");
    assert_eq!(parquet.len(), 1);
    let (df, meta) = runner::results::read_run(&parquet[0]).unwrap();
    assert_eq!(df.height(), 2);
    let epochs: Vec<u32> = df
        .column("epoch")
        .unwrap()
        .u32()
        .unwrap()
        .into_no_null_iter()
        .collect();
    assert_eq!(epochs, vec![1, 2]);
    let name = first_str(&df, "experiment");
    assert_eq!(name, "tiny");
    for col in ["train_loss", "val_loss", "test_loss"] {
        assert!(
            f64s(&df, col).iter().all(|v| v.is_finite() && *v > 0.0),
            "{col}"
        );
    }
    for col in ["train_acc", "val_acc", "test_acc"] {
        assert!(
            f64s(&df, col).iter().all(|v| (0.0..=1.0).contains(v)),
            "{col}"
        );
    }
    // Accuracies are counts over 16 training / 8 validation images.
    assert!(
        f64s(&df, "val_acc")
            .iter()
            .all(|v| (v * 8.0 - (v * 8.0).round()).abs() < 1e-9)
    );
    let head = first_str(&df, "head");
    assert_eq!(
        head,
        "flatten > dense(16, relu) > dropout(0.5) > dense(1, sigmoid)"
    );
    assert_eq!(df.column("lr").unwrap().f64().unwrap().get(0), Some(1e-3));
    let config = meta
        .iter()
        .find(|(k, _)| k == runner::results::CONFIG_KEY)
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(
        config.contains("name = \"tiny\"") && config.contains("trainable_from = \"none\""),
        "{config}"
    );
    let toml = std::fs::read_to_string(parquet[0].with_extension("toml")).unwrap();
    assert_eq!(toml, config);

    let log = std::fs::read_to_string(files_with(&s.results, ".log.jsonl")[0].clone()).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let epoch_events: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["message"] == "Epoch finished.")
        .collect();
    assert_eq!(epoch_events.len(), 2);
    assert_eq!(epoch_events[1]["epoch"], 2);
    assert!(epoch_events[0]["val_acc"].is_number() && epoch_events[0]["run"].is_string());
    assert!(
        events.iter().any(|e| e["message"] == "Feature cache miss."),
        "the first run computes the activations at the cutoff"
    );
    for phase in ["load_data", "build_model", "train", "test"] {
        assert!(
            events.iter().any(|e| e["phase"] == phase),
            "no event for phase {phase}"
        );
    }
}

#[test]
fn the_same_seed_gives_the_same_numbers() {
    let s = setup(&[]);
    for _ in 0..2 {
        let out = run(&s, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&s, &["--set", "experiment.seed=4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parquet = files_with(&s.results, ".parquet");
    assert_eq!(parquet.len(), 3, "each run keeps its own file: {parquet:?}");
    let tables: Vec<DataFrame> = parquet
        .iter()
        .map(|p| runner::results::read_run(p).unwrap().0)
        .collect();
    let seed = |df: &DataFrame| df.column("seed").unwrap().u64().unwrap().get(0).unwrap();
    let (same, other): (Vec<&DataFrame>, Vec<&DataFrame>) =
        tables.iter().partition(|df| seed(df) == 3);
    assert_eq!(same.len(), 2);
    for col in [
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "test_loss",
    ] {
        assert_eq!(f64s(same[0], col), f64s(same[1], col), "{col}");
    }
    assert_ne!(f64s(same[0], "train_loss"), f64s(other[0], "train_loss"));
}

#[test]
fn a_corrupt_image_is_named_before_training_and_nothing_is_lost() {
    let s = setup(&[]);
    std::fs::write(
        s.data.join("train/cats/broken.jpg"),
        b"\xff\xd8\xff\xe0 not really a jpeg",
    )
    .unwrap();
    std::fs::write(s.data.join("validation/dogs/empty.png"), b"").unwrap();
    std::fs::create_dir_all(&s.results).unwrap();
    let earlier = s.results.join("earlier.parquet");
    std::fs::write(&earlier, b"an earlier run").unwrap();
    let out = run(&s, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.jpg: truncated JPEG"), "{err}");
    assert!(err.contains("empty.png: empty file (0 bytes)"), "{err}");
    assert!(!err.contains("Epoch finished"), "{err}");
    assert_eq!(std::fs::read(&earlier).unwrap(), b"an earlier run");
    assert_eq!(files_with(&s.results, ".parquet"), vec![earlier]);
}

#[test]
fn a_bad_weights_file_stops_the_run_with_its_name() {
    let s = setup(&[]);
    let w = s.dir.path().join("w.safetensors");
    common::write_safetensors(&w, &[("block1_conv1.weight".into(), vec![1], vec![0; 4])]);
    let out = run(&s, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: the weights do not fit vgg16", w.display())),
        "{err}"
    );
    assert!(files_with(&s.results, ".parquet").is_empty());
}

#[test]
fn check_and_plan_commands_validate_without_training() {
    let s = setup(&[]);
    let out = runner(&["check", s.spec.to_str().unwrap()], s.dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok (2 classes"));

    let bad = s.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&s.spec)
            .unwrap()
            .replace("rate = 0.5", "rate = 2.0"),
    )
    .unwrap();
    let out = runner(
        &["check", s.spec.to_str().unwrap(), bad.to_str().unwrap()],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}: head.layers[2].rate: must be in [0, 1), got 2",
            bad.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("1 of 2 experiment files have problems"),
        "{err}"
    );

    let out = runner(&["plan", s.spec.to_str().unwrap()], s.dir.path());
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("block5_pool (MaxPooling2D)") && text.contains("(1, 1, 512)"),
        "{text}"
    );
    assert!(text.contains("Trainable params: 8,225"), "{text}");
    assert!(!s.results.exists(), "check and plan write nothing");
}

#[test]
fn asking_for_wgpu_without_an_adapter_is_a_clear_error_and_auto_falls_back_to_the_cpu() {
    let s = setup(&[]);
    // No Vulkan driver and no EGL vendor library: wgpu finds no adapter at all.
    let hidden = |device: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
            .args([
                s.spec.to_str().unwrap(),
                "--device",
                device,
                "--results",
                s.results.to_str().unwrap(),
            ])
            .current_dir(s.dir.path())
            .env_remove("RUNNER_ASSETS")
            .env("RUNNER_CACHE", s.dir.path().join("cache"))
            .env("VK_DRIVER_FILES", "/nonexistent")
            .env("VK_ICD_FILENAMES", "/nonexistent")
            .env("__EGL_VENDOR_LIBRARY_FILENAMES", "/nonexistent")
            .output()
            .unwrap()
    };
    let out = hidden("wgpu");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = if cfg!(feature = "wgpu") {
        "no wgpu adapter found"
    } else {
        "built without the wgpu feature"
    };
    assert!(err.contains(want), "{err}");
    assert!(files_with(&s.results, ".parquet").is_empty(), "nothing ran");
    let left: Vec<_> = std::fs::read_dir(&s.results).unwrap().collect();
    assert!(left.is_empty(), "a refused run leaves no folder: {left:?}");
    let out = hidden("auto");
    ok(&out);
    let id = files_with(&s.results, ".parquet")[0]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let log = std::fs::read_to_string(s.results.join(format!("{id}.log.jsonl"))).unwrap();
    assert!(log.contains(r#""device":"cpu (flex)""#), "{log}");
}

const AUGMENT: &str = "\n[augment]\nrotation_degrees = 40\nwidth_shift = 0.2\nheight_shift = 0.2\nzoom = 0.2\nhorizontal_flip = true\n";

#[test]
fn an_augmented_run_trains_end_to_end_and_is_reproducible() {
    let s = setup(&[("epochs = 2", "epochs = 2\nsteps_per_epoch = 5")]);
    std::fs::write(
        &s.spec,
        format!("{}{AUGMENT}", std::fs::read_to_string(&s.spec).unwrap()),
    )
    .unwrap();
    // The second run decodes its training split again batch by batch every epoch instead of
    // holding it (a split larger than `data.max_decoded_mib`): the same pixels, the same run.
    for sets in [&[][..], &["--set", "data.max_decoded_mib=0"]] {
        let out = run(&s, sets);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.contains("decoded again batch by batch every epoch"),
            !sets.is_empty(),
            "{err}"
        );
    }
    let tables: Vec<DataFrame> = files_with(&s.results, ".parquet")
        .iter()
        .map(|p| runner::results::read_run(p).unwrap().0)
        .collect();
    assert_eq!(tables.len(), 2);
    // 5 steps of 4 images: more than the 16 training images, so a second pass is drawn.
    assert_eq!(
        f64s(&tables[0], "train_acc")
            .iter()
            .map(|a| (a * 20.0).round() / 20.0)
            .collect::<Vec<_>>(),
        f64s(&tables[0], "train_acc")
    );
    for col in ["train_loss", "val_loss", "test_loss"] {
        assert_eq!(f64s(&tables[0], col), f64s(&tables[1], col), "{col}");
    }
    // `data.max_decoded_mib` changes no number: the same config hash (a sweep skips the point),
    // and a resume may change it.
    assert_eq!(
        first_str(&tables[0], "config_hash"),
        first_str(&tables[1], "config_hash")
    );
    let drift = runner::run::config_drift("[data]\nmax_decoded_mib = 0\n", "[data]\n");
    assert!(drift.is_empty(), "{drift:?}");
    // A value that is not a count of MiB is named with its key and file.
    let out = run(&s, &["--set", "data.max_decoded_mib=-1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("data.max_decoded_mib"), "{err}");
    assert_eq!(
        files_with(&s.results, ".parquet").len(),
        2,
        "nothing new written"
    );
}

#[test]
fn skip_policy_leaves_bad_images_out_and_counts_them() {
    let s = setup(&[("batch_size = 4", "batch_size = 4\non_bad_image = \"skip\"")]);
    std::fs::write(
        s.data.join("train/cats/broken.jpg"),
        b"\xff\xd8\xff\xe0 not really a jpeg",
    )
    .unwrap();
    std::fs::write(s.data.join("train/dogs/notes.txt"), b"hello").unwrap();
    let out = run(&s, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Image skipped.") && err.contains("broken.jpg") && err.contains("notes.txt"),
        "{err}"
    );
    let df = runner::results::read_run(&files_with(&s.results, ".parquet")[0])
        .unwrap()
        .0;
    assert_eq!(
        df.column("skipped_images").unwrap().u32().unwrap().get(0),
        Some(2)
    );
}

#[test]
fn augment_preview_writes_a_grid_png() {
    let s = setup(&[]);
    let out_png = s.dir.path().join("grid.png");
    let no_aug = runner(
        &[
            "augment-preview",
            s.spec.to_str().unwrap(),
            "--out",
            out_png.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert_eq!(no_aug.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_aug.stderr).contains("declares no [augment] section"));
    std::fs::write(
        &s.spec,
        format!("{}{AUGMENT}", std::fs::read_to_string(&s.spec).unwrap()),
    )
    .unwrap();
    let out = runner(
        &[
            "augment-preview",
            s.spec.to_str().unwrap(),
            "--out",
            out_png.to_str().unwrap(),
            "--images",
            "3",
            "--variants",
            "5",
        ],
        s.dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&out_png).unwrap().to_rgb8();
    // 6 columns and 3 rows of 32x32 tiles with 4-pixel gaps.
    assert_eq!(img.dimensions(), (6 * 36 - 4, 3 * 36 - 4));
    let tile = |c: u32, r: u32| image::imageops::crop_imm(&img, c * 36, r * 36, 32, 32).to_image();
    assert_ne!(
        tile(0, 0),
        tile(1, 0),
        "an augmented version differs from the original"
    );
}

#[test]
fn an_unwritable_results_folder_is_named_and_nothing_is_trained() {
    let s = setup(&[]);
    let blocker = s.dir.path().join("not_a_folder");
    std::fs::write(&blocker, b"keep me").unwrap();
    let out = runner(
        &[
            s.spec.to_str().unwrap(),
            "--device",
            "cpu",
            "--results",
            blocker.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}", blocker.display())) && err.contains("cannot write the run log"),
        "{err}"
    );
    assert!(!err.contains("Epoch finished"), "{err}");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"keep me");
}

/// Every experiment this repository ships runs end to end, so none of them rots: each with its
/// own backbone, head, phases, augmentation, optimizer, schedule and evaluation, on a generated
/// dataset and random weights of its backbone, at 96x96 (the smallest size every shipped head
/// fits: VGG16's block5_pool is 3x3 there, for the conv heads), one epoch per phase of two steps.
#[test]
fn every_shipped_experiment_runs_a_few_steps_on_tiny_images() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), &["cats", "dogs"], [8, 4, 4], 40);
    let results = dir.path().join("results");
    let mut weights = std::collections::HashMap::new();
    let files = common::shipped_experiments();
    assert!(files.len() >= 12, "{files:?}");
    for file in files {
        let loaded = runner::spec::load::load(&file, &[]).unwrap();
        let spec = &loaded.spec;
        let backbone = spec.backbone.name.clone();
        let w = weights
            .entry(backbone.clone())
            .or_insert_with(|| {
                let path = dir.path().join(format!("{backbone}.safetensors"));
                match backbone.as_str() {
                    "vgg16" => common::write_vgg_weights(
                        &path,
                        runner::backbone::find("vgg16").unwrap(),
                        3,
                    ),
                    name => {
                        common::write_torchvision_weights(&path, &common::torchvision_keys(name), 3)
                    }
                }
                path
            })
            .clone();
        let mut sets = vec![
            format!("data.dir={}", data.display()),
            "data.image_size=[96, 96]".to_string(),
            "data.batch_size=4".to_string(),
            format!("backbone.weights={}", w.display()),
            "train.epochs=1".to_string(),
            "train.steps_per_epoch=2".to_string(),
            "train.validation_steps=1".to_string(),
        ];
        sets.extend((0..spec.phase.len()).map(|i| format!("phase[{i}].epochs=1")));
        let mut args = vec![
            file.to_str().unwrap(),
            "--device",
            "cpu",
            "--results",
            results.to_str().unwrap(),
        ];
        for s in &sets {
            args.extend(["--set", s.as_str()]);
        }
        let out = runner(&args, dir.path());
        assert!(
            out.status.success(),
            "{}: exit {:?}\n{}",
            file.display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        let name = &spec.experiment.name;
        let table = files_with(&results, ".parquet")
            .into_iter()
            .find(|p| {
                let f = p.file_name().unwrap().to_string_lossy();
                f.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with("-20"))
            })
            .unwrap_or_else(|| panic!("{}: no results table for {name}", file.display()));
        let (df, _) = runner::results::read_run(&table).unwrap();
        let epochs = spec.phase.len().max(1);
        assert_eq!(df.height(), epochs, "{}: one row per phase", file.display());
        assert_eq!(
            strs(&df, "status"),
            vec!["completed".to_string(); epochs],
            "{}",
            file.display()
        );
        let test_acc = f64s(&df, "test_acc");
        assert!(
            test_acc.iter().all(|v| (0.0..=1.0).contains(v)),
            "{}: test_acc {test_acc:?}",
            file.display()
        );
    }
}

/// The console of a run, not on a terminal (a pipe, a CI log): one short line per event, the
/// run id once, no timestamps or `key=value` fields, Keras-style epoch lines with four
/// significant digits, nothing wider than 160 columns.
#[test]
fn the_console_is_short_lines_a_person_reads() {
    let s = setup(&[]);
    let out = run(&s, &[]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let (id, _) = only_run(&s.results);
    // The run id where the run starts, and in the model's folder where it ends.
    let naming: Vec<&str> = err.lines().filter(|l| l.contains(id.as_str())).collect();
    assert_eq!(naming.len(), 2, "{err}");
    assert!(naming[1].starts_with("Finished in "), "{err}");
    assert!(
        err.lines()
            .next()
            .unwrap()
            .starts_with(&format!("Run {id} (")),
        "{err}"
    );
    for l in err.lines() {
        assert!(l.chars().count() <= 160, "wider than 160 columns: {l}");
        assert!(!l.contains("run="), "{l}");
        assert!(!l.starts_with("20"), "a timestamp: {l}");
        assert!(!l.contains(".safetensors\"") && !l.contains("key="), "{l}");
    }
    let epochs: Vec<&str> = err.lines().filter(|l| l.starts_with("Epoch ")).collect();
    assert_eq!(epochs.len(), 2, "{err}");
    // 16 training images in batches of 4.
    assert!(epochs[1].starts_with("Epoch 2/2  4/4  "), "{}", epochs[1]);
    for key in ["loss", "acc", "val_loss", "val_acc", "lr"] {
        let value = epochs[0]
            .split(&format!("  {key} "))
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {key}: {}", epochs[0]));
        let digits = value
            .trim_start_matches(['0', '.', '-'])
            .split('e')
            .next()
            .unwrap()
            .replace('.', "");
        assert!(
            digits.len() <= 4,
            "{key} {value}: more than 4 significant digits"
        );
    }
    assert!(err.contains("Test: loss "), "{err}");
    assert!(err.contains("Finished in "), "{err}");
    // The run log still has every field of every event.
    let ev = events(&s.results, &id);
    let e = ev
        .iter()
        .find(|e| e["message"] == "Epoch finished.")
        .unwrap();
    for k in [
        "run",
        "epoch",
        "epochs",
        "steps",
        "train_loss",
        "val_acc",
        "timestamp",
    ] {
        assert!(!e[k].is_null(), "{k}: {e}");
    }
    // RUNNER_LOG_FORMAT=fields puts the full lines back on the console.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .args([s.spec.to_str().unwrap(), "--device", "cpu", "--results"])
        .arg(s.dir.path().join("fields"))
        .current_dir(s.dir.path())
        .env("RUNNER_CACHE", s.dir.path().join("cache"))
        .env("RUNNER_LOG_FORMAT", "fields")
        .env("RUNNER_LOG", "info")
        .output()
        .unwrap();
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Epoch finished. run=") && err.contains("val_acc="),
        "{err}"
    );
}

/// The same run in a real terminal (tmux, 160x50): a progress bar while an epoch runs, gone
/// once it ends; epoch lines; no `Training.` step lines.
#[test]
fn on_a_terminal_a_run_prints_epoch_lines_and_clears_its_progress_bar() {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("RUNNER_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
            "RUNNER_REQUIRE_TOOLS=1 but tmux is not installed"
        );
        eprintln!("skipped: no tmux");
        return;
    }
    // Epochs of a few seconds, so that the bar is on the screen long enough to be seen.
    let s = setup(&[("epochs = 2", "epochs = 3\nsteps_per_epoch = 1500")]);
    let socket = format!("runner-test-{}", std::process::id());
    let tmux = |args: &[&str]| {
        std::process::Command::new("tmux")
            .args(["-L", &socket])
            .args(args)
            .output()
            .unwrap()
    };
    let done = s.dir.path().join("done");
    let command = format!(
        "cd {dir} && RUNNER_LOG=info RUNNER_CACHE={dir}/cache {bin} {spec} --device cpu --results {results}; touch {done}; sleep 120",
        dir = s.dir.path().display(),
        bin = env!("CARGO_BIN_EXE_runner"),
        spec = s.spec.display(),
        results = s.results.display(),
        done = done.display(),
    );
    // The server goes with the test, passed or failed.
    struct Server<'a>(&'a dyn Fn(&[&str]) -> std::process::Output);
    impl Drop for Server<'_> {
        fn drop(&mut self) {
            (self.0)(&["kill-server"]);
        }
    }
    let _server = Server(&tmux);
    ok(&tmux(&[
        "new-session",
        "-d",
        "-s",
        "run",
        "-x",
        "160",
        "-y",
        "50",
        &command,
    ]));
    let screen =
        || String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "run"]).stdout).into_owned();
    let started = std::time::Instant::now();
    let mut bar = None;
    while !done.exists() {
        let now = screen();
        if bar.is_none() {
            bar = now
                .lines()
                .find(|l| l.contains("ETA") && l.contains("epoch "))
                .map(str::to_string);
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(300),
            "{now}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let screen = screen();
    let bar = bar.unwrap_or_else(|| panic!("no progress bar was seen:\n{screen}"));
    assert!(
        bar.contains("epoch ") && bar.contains("/1500") && bar.contains("images/s"),
        "{bar}"
    );
    let (id, _) = only_run(&s.results);
    assert!(screen.contains(&format!("Run {id} (")), "{screen}");
    let epochs: Vec<&str> = screen.lines().filter(|l| l.starts_with("Epoch ")).collect();
    assert_eq!(epochs.len(), 3, "{screen}");
    assert!(epochs[2].starts_with("Epoch 3/3  1500/1500  "), "{screen}");
    assert!(
        !screen
            .lines()
            .any(|l| l.trim_start().starts_with("150/1500")),
        "no step lines on a terminal:\n{screen}"
    );
    assert!(
        !screen.contains("ETA"),
        "the progress bar is cleared:\n{screen}"
    );
}

/// `runner completions SHELL` prints a script the shell really completes with, and `runner
/// manpages DIR` writes a page per command.
#[test]
fn shell_completions_complete_and_man_pages_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = runner(&["completions", "bash"], dir.path());
    ok(&out);
    let script = dir.path().join("runner.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    // What bash offers after `runner pre` and after `runner results --for`.
    let complete = |line: &str| {
        let words: Vec<&str> = line.split(' ').collect();
        let program = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}; _runner runner '{}' '{}'; echo \"${{COMPREPLY[@]}}\"",
            script.display(),
            words.join(" "),
            words.len() - 1,
            line.len(),
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &program])
            .output()
            .unwrap();
        ok(&out);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(complete("runner pre"), "predict");
    assert_eq!(complete("runner results --for"), "--format");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = runner(&["completions", shell], dir.path());
        ok(&out);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("augment-preview"),
            "{shell}"
        );
    }
    let out = runner(&["completions", "tcsh"], dir.path());
    assert_eq!(out.status.code(), Some(2));

    let man = dir.path().join("man1");
    ok(&runner(&["manpages", man.to_str().unwrap()], dir.path()));
    let page = std::fs::read_to_string(man.join("runner.1")).unwrap();
    assert!(page.contains(".TH runner 1"), "{page}");
    assert!(page.contains("Transfer learning on images from a TOML file"));
    let predict = std::fs::read_to_string(man.join("runner-predict.1")).unwrap();
    assert!(predict.contains("\\-\\-weights"), "{predict}");
    // A folder that cannot be made is named.
    let blocked = dir.path().join("file");
    std::fs::write(&blocked, "").unwrap();
    let out = runner(
        &["manpages", blocked.join("man1").to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write the man pages"));
}

/// `runner init DATA_DIR` writes an experiment that validates, with the classes' loss and head,
/// and never overwrites; a folder it cannot use is named.
#[test]
fn init_scaffolds_an_experiment_that_validates_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("mnv2.safetensors");
    common::write_torchvision_weights(&weights, &common::torchvision_keys("mobilenet_v2"), 3);
    let set_weights = format!("backbone.weights={}", weights.display());
    for classes in [&["cats", "dogs"][..], &["a", "b", "c"]] {
        let data = dir.path().join(format!("data{}", classes.len()));
        common::make_dataset(&data, classes, [3, 2, 1], 40);
        let out = dir.path().join(format!("exp{}.toml", classes.len()));
        ok(&runner(
            &[
                "init",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            dir.path(),
        ));
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.contains(&format!(
            "# Classes ({}): {}.",
            classes.len(),
            classes.join(", ")
        )));
        assert!(
            text.contains("Median training image: 40x40 pixels"),
            "{text}"
        );
        let (units, loss) = if classes.len() == 2 {
            ("units = 1 ", "binary_crossentropy")
        } else {
            ("units = 3 ", "categorical_crossentropy")
        };
        assert!(text.contains(units) && text.contains(loss), "{text}");
        let check = runner(
            &["check", out.to_str().unwrap(), "--set", &set_weights],
            dir.path(),
        );
        ok(&check);
        // Never over an existing file.
        let again = runner(
            &[
                "init",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            dir.path(),
        );
        assert_eq!(again.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), text);
    }
    // The default file name; a folder of class folders without splits; a missing folder.
    let data = dir.path().join("data2");
    ok(&runner(&["init", data.to_str().unwrap()], dir.path()));
    assert!(dir.path().join("experiments/data2.toml").is_file());
    for (bad, says) in [
        (data.join("train"), "missing the train/ folder"),
        (dir.path().join("nowhere"), "not a folder"),
        (
            common::make_dataset(&dir.path().join("empty"), &["a", "b"], [2, 2, 0], 40),
            "test: class folder a/ has no images",
        ),
    ] {
        let out = runner(&["init", bad.to_str().unwrap()], dir.path());
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(says) && err.contains(bad.to_str().unwrap()),
            "{err}"
        );
    }
}

/// Numbers on the console: four significant digits after rounding, NaN and infinities shown;
/// records of the `log` crate (wgpu, cubecl) without their bookkeeping fields.
#[test]
fn console_numbers_have_four_significant_digits_and_log_records_their_origin() {
    use runner::console::{duration, significant};
    for (v, want) in [
        (0.8950, "0.8950"),
        (0.39016962839, "0.3902"),
        (12.3456, "12.35"),
        (0.99996, "1.000"),
        (9.9996, "10.00"),
        (9999.6, "1.000e4"),
        (12345.6, "1.235e4"),
        (2e-5, "2.000e-5"),
        (-0.5, "-0.5000"),
        (0.0, "0"),
        (f64::NAN, "NaN"),
        (f64::INFINITY, "inf"),
    ] {
        assert_eq!(significant(v), want, "{v}");
    }
    for (s, want) in [
        (0.45, "0.45s"),
        (9.996, "10s"),
        (59.6, "1m 00s"),
        (3725.0, "1h 02m"),
    ] {
        assert_eq!(duration(s), want, "{s}");
    }
    let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        r#"{"message": "Missing downlevel flags", "log.target": "wgpu_core::instance",
            "log.module_path": "wgpu_core::instance", "log.file": "/x/instance.rs", "log.line": 12,
            "run": "r1"}"#,
    )
    .unwrap();
    assert_eq!(
        runner::console::generic("WARN", "Missing downlevel flags", &fields),
        "warning: wgpu_core::instance: Missing downlevel flags run=r1"
    );
}
