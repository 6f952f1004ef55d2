//! Disk per run: checkpoints and `model.bpk` leave out the backbone layers no phase trained
//! (`model.json` and the checkpoint name the weights file and the digest of those layers), and
//! `train.keep` decides what a completed run keeps. `predict`, `export` and `resume` rebuild
//! the model from the weights file and say clearly when it is missing or changed.

mod common;

use std::path::Path;

use common::cli::*;

/// Two phases: the dense head on the frozen base, then block5_conv3 and the head.
const PHASES: &str = r#"
[[phase]]
name = "head"
epochs = 1
trainable_from = "none"

[[phase]]
name = "fine_tune"
epochs = 1
trainable_from = "block5_conv3"
"#;

fn size(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .len()
}

fn predict(s: &Setup, id: &str, extra: &[&str]) -> std::process::Output {
    let test = s.data.join("test");
    let mut args = vec![
        "predict",
        id,
        test.to_str().unwrap(),
        "--results",
        s.results.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    runner(&args, s.dir.path())
}

/// `(path, p_dogs)` of each line `runner predict` printed.
fn dogs(out: &std::process::Output) -> Vec<(String, f64)> {
    ok(out);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols[0].to_string(), cols[2].parse().unwrap())
        })
        .collect()
}

#[test]
fn the_frozen_base_stays_out_of_checkpoints_and_the_model_and_predict_rebuilds_it() {
    let s = setup(&[]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    std::fs::write(&s.spec, format!("{text}{PHASES}")).unwrap();
    ok(&run(&s, &[]));
    let (id, _) = only_run(&s.results);
    let dir = s.results.join(&id);

    // What the run left out: the layers before block5_conv3, from the weights file.
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.json")).unwrap()).unwrap();
    assert_eq!(card["card_version"], 3);
    let def = runner::backbone::find("vgg16").unwrap();
    let cut = runner::backbone::Cutoff::resolve(def, "block5_conv3")
        .unwrap()
        .index;
    assert_eq!(card["frozen"]["layers"], cut as u64);
    assert_eq!(
        card["frozen"]["weights"],
        std::path::absolute(&s.weights)
            .unwrap()
            .display()
            .to_string()
    );
    let ck = runner::train::checkpoint::read(&dir.join("last.ckpt")).unwrap();
    assert_eq!(
        ck.state.frozen.as_ref().map(|f| f.layers),
        Some(cut),
        "the checkpoint of the last phase leaves out what it did not train"
    );

    // VGG16's base is 14.7M parameters; block5_conv3 2.4M; this head 0.13M (a 512x1x1 map).
    let weights = size(&s.weights);
    for f in ["model.bpk", "last.ckpt", "best.ckpt"] {
        let n = size(&dir.join(f));
        // A checkpoint also holds the optimizer's state (twice the trained parameters here).
        let share = if f == "model.bpk" { 4 } else { 2 };
        assert!(
            n * share < weights,
            "{f}: {n} bytes against {weights} of weights"
        );
    }

    // predict (from model.bpk) gives the run's own test probabilities.
    let p = runner::results::read_run(&s.results.join(format!("{id}.predictions.parquet")))
        .unwrap()
        .0;
    let (paths, want) = (strs(&p, "path"), f64s(&p, "p_dogs"));
    let got = dogs(&predict(&s, &id, &[]));
    assert_eq!(got.len(), 8);
    for (path, d) in &got {
        let i = paths.iter().position(|p| p == path).unwrap();
        assert!((d - want[i]).abs() < 1e-4, "{path}: {d} vs {}", want[i]);
    }
    // --weights last reads the checkpoint: the same weights.
    let last = dogs(&predict(&s, &id, &["--weights", "last"]));
    assert_eq!(last, got);

    // The weights file moved away: named, exit 2.
    let moved = s.dir.path().join("moved.safetensors");
    std::fs::rename(&s.weights, &moved).unwrap();
    let out = predict(&s, &id, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("holds the trained layers only")
            && err.contains(&s.weights.display().to_string())
            && err.contains("which is missing"),
        "{err}"
    );
    // Other weights at its place: refused, not silently used.
    common::write_vgg_weights(&s.weights, def, 10);
    for which in ["final", "best"] {
        let out = predict(&s, &id, &["--weights", which]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{which}: {err}");
        assert!(err.contains("values differ now"), "{which}: {err}");
    }
    // The original back: it works again.
    std::fs::rename(&moved, &s.weights).unwrap();
    assert_eq!(dogs(&predict(&s, &id, &[])), got);
}

#[test]
fn resume_refuses_a_changed_weights_file_and_continues_with_the_original() {
    let s = setup(&[("epochs = 2", "epochs = 6\nsteps_per_epoch = 4000")]);
    let args = [
        s.spec.to_str().unwrap(),
        "--device",
        "cpu",
        "--results",
        s.results.to_str().unwrap(),
    ];
    let mut child = spawn(&s, &args);
    let id = wait_for_checkpoint(&s.results, &mut child);
    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let ck = runner::train::checkpoint::read(&s.results.join(&id).join("last.ckpt")).unwrap();
    assert!(ck.state.frozen.is_some());

    let original = std::fs::read(&s.weights).unwrap();
    common::write_vgg_weights(&s.weights, runner::backbone::find("vgg16").unwrap(), 10);
    let resume = |s: &Setup| {
        runner(
            &[
                "resume",
                &id,
                "--device",
                "cpu",
                "--results",
                s.results.to_str().unwrap(),
            ],
            s.dir.path(),
        )
    };
    let out = resume(&s);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("last.ckpt") && err.contains("values differ now"),
        "{err}"
    );
    std::fs::write(&s.weights, original).unwrap();
    ok(&resume(&s));
    let (_, df) = only_run(&s.results);
    assert_eq!(strs(&df, "status")[0], "completed");
    assert_eq!(df.height(), 6);
}

#[test]
fn train_keep_decides_which_checkpoints_a_completed_run_keeps() {
    for (keep, kept) in [
        ("all", &["best.ckpt", "last.ckpt"][..]),
        ("best", &["best.ckpt"][..]),
        ("model", &[][..]),
    ] {
        let s = setup(&[(
            "loss = \"binary_crossentropy\"",
            &format!("loss = \"binary_crossentropy\"\nkeep = \"{keep}\""),
        )]);
        ok(&run(&s, &[]));
        let (id, _) = only_run(&s.results);
        let dir = s.results.join(&id);
        for f in ["best.ckpt", "last.ckpt"] {
            assert_eq!(
                dir.join(f).exists(),
                kept.contains(&f),
                "keep = {keep}: {f}"
            );
        }
        for f in ["model.bpk", "model.json"] {
            assert!(dir.join(f).is_file(), "keep = {keep}: {f}");
        }
        // The whole model with its frozen base is written on demand only.
        assert!(!dir.join("model.safetensors").exists(), "keep = {keep}");
        let final_ = dogs(&predict(&s, &id, &[]));
        // --weights last is the final model when last.ckpt is not kept.
        assert_eq!(
            dogs(&predict(&s, &id, &["--weights", "last"])),
            final_,
            "{keep}"
        );
        let best = predict(&s, &id, &["--weights", "best"]);
        if keep == "model" {
            let err = String::from_utf8_lossy(&best.stderr);
            assert_eq!(best.status.code(), Some(2), "{err}");
            assert!(
                err.contains("not kept") && err.contains("--weights final"),
                "{err}"
            );
        } else {
            ok(&best);
        }
    }
}

/// A run killed mid-way (its table says `running`, its checkpoint is there).
fn killed_run(s: &Setup, args: &[&str]) -> String {
    let mut child = spawn(s, args);
    let id = wait_for_checkpoint(&s.results, &mut child);
    signal(&child, "-KILL");
    child.wait().unwrap();
    id
}

#[test]
fn a_whole_model_checkpoint_resumes_on_a_changed_file_and_stores_the_whole_model() {
    let s = setup(&[("epochs = 2", "epochs = 6\nsteps_per_epoch = 4000")]);
    let args = [
        s.spec.to_str().unwrap(),
        "--device",
        "cpu",
        "--results",
        s.results.to_str().unwrap(),
    ];
    let id = killed_run(&s, &args);
    // Rewrite the checkpoint as runners before 3 wrote it: the whole model, no `frozen`.
    let path = s.results.join(&id).join("last.ckpt");
    let mut ck = runner::train::checkpoint::read(&path).unwrap();
    let device = burn::prelude::Device::flex();
    let (_, model) = runner::predict::load(
        &s.results,
        &id,
        runner::predict::Which::Last,
        &device,
        &Default::default(),
    )
    .unwrap();
    ck.model = runner::train::model_bytes(&model, None).unwrap();
    ck.state.frozen = None;
    runner::train::checkpoint::write(&path, &ck).unwrap();
    // The weights file changes: the checkpoint's values win, and the run stores them whole.
    common::write_vgg_weights(&s.weights, runner::backbone::find("vgg16").unwrap(), 10);
    let out = runner(
        &[
            "resume",
            &id,
            "--device",
            "cpu",
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stores its whole model"),
        "{out:?}"
    );
    let card: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.results.join(&id).join("model.json")).unwrap(),
    )
    .unwrap();
    assert!(card.get("frozen").is_none(), "{card}");
    let p = runner::results::read_run(&s.results.join(format!("{id}.predictions.parquet")))
        .unwrap()
        .0;
    let (paths, want) = (strs(&p, "path"), f64s(&p, "p_dogs"));
    for (path, d) in dogs(&predict(&s, &id, &[])) {
        let i = paths.iter().position(|p| p == &path).unwrap();
        assert!((d - want[i]).abs() < 1e-4, "{path}: {d} vs {}", want[i]);
    }
}

#[test]
fn a_sweep_leaves_a_run_it_cannot_resume_resumable() {
    let s = setup(&[("epochs = 2", "epochs = 6\nsteps_per_epoch = 4000")]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    std::fs::write(
        &s.spec,
        format!("{text}\n[sweep]\n\"optimizer.lr\" = [1e-3]\n"),
    )
    .unwrap();
    let args = [
        "sweep",
        s.spec.to_str().unwrap(),
        "--device",
        "cpu",
        "--results",
        s.results.to_str().unwrap(),
    ];
    let id = killed_run(&s, &args);
    let original = std::fs::read(&s.weights).unwrap();
    common::write_vgg_weights(&s.weights, runner::backbone::find("vgg16").unwrap(), 10);
    let out = runner(&args, s.dir.path());
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("values differ now"),
        "{out:?}"
    );
    let (_, df) = only_run(&s.results);
    assert_eq!(strs(&df, "status")[0], "running", "not recorded as failed");
    // The file back: the same sweep resumes the same run.
    std::fs::write(&s.weights, original).unwrap();
    ok(&runner(&args, s.dir.path()));
    let (again, df) = only_run(&s.results);
    assert_eq!(again, id);
    assert_eq!(strs(&df, "status")[0], "completed");
}

#[test]
fn train_keep_changes_neither_the_config_hash_nor_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), &["cats", "dogs"], [4, 2, 2], 32);
    let weights = dir.path().join("w.safetensors");
    common::write_vgg_weights(&weights, runner::backbone::find("vgg16").unwrap(), 9);
    let base = common::spec_text(&data, &weights, "");
    let hash = |extra: &str| {
        let text = base.replace(
            "loss = \"binary_crossentropy\"",
            &format!("loss = \"binary_crossentropy\"\n{extra}"),
        );
        common::plan_for(dir.path(), &text).config_hash
    };
    let plain = hash("");
    for keep in ["all", "best", "model"] {
        assert_eq!(hash(&format!("keep = \"{keep}\"")), plain, "{keep}");
    }
    // A value that is not one of the three is named with its key, exit 2.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        base.replace(
            "loss = \"binary_crossentropy\"",
            "loss = \"binary_crossentropy\"\nkeep = \"none\"",
        ),
    )
    .unwrap();
    let out = runner(&["check", bad.to_str().unwrap()], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("train.keep") && err.contains("bad.toml"),
        "{err}"
    );
    assert!(
        runner::run::config_drift(
            "[train]\nepochs = 2\n",
            "[train]\nepochs = 2\nkeep = \"model\"\n"
        )
        .is_empty()
    );
}

#[test]
fn a_named_weights_file_that_moved_is_found_again_through_the_mirror() {
    let s = setup(&[]);
    let mirror = s.dir.path().join("mirror");
    std::fs::create_dir_all(mirror.join("weights")).unwrap();
    std::fs::rename(
        &s.weights,
        mirror.join("weights/vgg16_imagenet_notop.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(&s.spec).unwrap().replace(
        &format!("weights = \"{}\"", s.weights.display()),
        "weights = \"imagenet\"",
    );
    assert!(text.contains("weights = \"imagenet\""));
    std::fs::write(&s.spec, text).unwrap();
    ok(&run(&s, &["--assets", mirror.to_str().unwrap()]));
    let (id, _) = only_run(&s.results);
    let got = dogs(&predict(&s, &id, &[]));
    // The mirror moves: without it, the error says where to point; with --assets, it is found.
    let moved = s.dir.path().join("moved");
    std::fs::rename(&mirror, &moved).unwrap();
    let out = predict(&s, &id, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("which is missing") && err.contains("--assets"),
        "{err}"
    );
    assert_eq!(
        dogs(&predict(&s, &id, &["--assets", moved.to_str().unwrap()])),
        got
    );
}
