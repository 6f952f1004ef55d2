//! The bad-input corpus: each case is a bad spec, image, argument or results folder given to
//! the binary as a user would. Every case pins its exit code (2 for bad input), must not panic,
//! must write nothing, and its message is pinned by a snapshot (`tests/snapshots/`), so that a
//! change of wording is a reviewed change (`cargo insta review`, or `INSTA_UPDATE=always` then
//! read the diff).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A temporary project: a tiny dataset, a weights file and the base spec.
struct Project {
    dir: tempfile::TempDir,
    data: PathBuf,
    weights: PathBuf,
}

impl Project {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = common::make_dataset(&dir.path().join("data"), &["cats", "dogs"], [2, 1, 1], 8);
        let weights = dir.path().join("w.safetensors");
        common::write_vgg_weights(&weights, runner::backbone::find("vgg16").unwrap(), 9);
        Self { dir, data, weights }
    }

    fn base(&self) -> String {
        common::spec_text(&self.data, &self.weights, "")
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// One case: a name, the arguments (`{spec}` is the case's spec file), its environment and the
/// exit code it must end with.
struct Case {
    name: String,
    spec: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    code: i32,
    /// A run refused after its log was opened (bad images found while loading): only that log
    /// is written, and it names the problem; no run table claims anything.
    logs_only: bool,
}

fn case(name: &str, spec: String) -> Case {
    Case {
        name: name.into(),
        spec: Some(spec),
        args: vec!["check".into(), "{spec}".into()],
        env: vec![],
        code: 2,
        logs_only: false,
    }
}

fn replaced(base: &str, from: &str, to: &str) -> String {
    assert!(base.contains(from), "the base spec has {from:?}");
    base.replacen(from, to, 1)
}

/// Runs every case; returns the report the snapshot pins. Asserts per case what must hold
/// whatever the wording: the exit code, no panic, nothing written.
fn run_all(p: &Project, cases: Vec<Case>) -> String {
    let mut report = String::new();
    for c in cases {
        let spec = p.path().join(format!("{}.toml", c.name));
        if let Some(text) = &c.spec {
            std::fs::write(&spec, text).unwrap();
        }
        let results = p.path().join("results");
        let args: Vec<String> = c
            .args
            .iter()
            .map(|a| {
                a.replace("{spec}", spec.to_str().unwrap())
                    .replace("{dir}", p.path().to_str().unwrap())
            })
            .collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
        cmd.args(&args)
            .arg("--results")
            .arg(&results)
            .current_dir(p.path())
            .env_remove("RUNNER_ASSETS")
            .env("RUNNER_CACHE", p.path().join("cache"))
            .env("RUNNER_LOG", "warn");
        for (k, v) in &c.env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(c.code),
            "case {}: exit code\n{stderr}",
            c.name
        );
        assert!(!stderr.contains("panicked"), "case {}: {stderr}", c.name);
        // A stand-in for a bad required value is never shown to the user.
        assert!(!stderr.contains("placeholder"), "case {}: {stderr}", c.name);
        if c.logs_only {
            let written: Vec<PathBuf> = std::fs::read_dir(&results)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            assert_eq!(written.len(), 1, "case {}: {written:?}", c.name);
            let log = std::fs::read_to_string(&written[0]).unwrap();
            assert!(
                written[0].to_string_lossy().ends_with(".log.jsonl") && log.contains("Run failed."),
                "case {}: {log}",
                c.name
            );
            std::fs::remove_dir_all(&results).unwrap();
        } else {
            assert!(
                !results.exists() || std::fs::read_dir(&results).unwrap().next().is_none(),
                "case {}: wrote into results/",
                c.name
            );
        }
        let text = stderr
            .replace(p.path().to_str().unwrap(), "<dir>")
            .lines()
            .map(normalise_log_line)
            .collect::<Vec<_>>()
            .join("\n");
        report += &format!(
            "## {} (exit {})\n$ runner {}\n{}\n\n",
            c.name,
            c.code,
            args.join(" ").replace(p.path().to_str().unwrap(), "<dir>"),
            text.trim_end()
        );
    }
    report
}

/// A console log line without what changes from run to run: its timestamp and the run id.
fn normalise_log_line(l: &str) -> String {
    let timestamped = l.len() > 20 && l.as_bytes()[4] == b'-' && l.as_bytes()[10] == b'T';
    let l = match l.find("Z ") {
        Some(i) if timestamped => l[i + 2..].trim_start(),
        _ => l,
    };
    match l.find("run=") {
        Some(i) => {
            let end = l[i..].find(' ').map_or(l.len(), |j| i + j);
            format!("{}run=<id>{}", &l[..i], &l[end..])
        }
        None => l.to_string(),
    }
}

#[test]
fn bad_specs() {
    let p = Project::new();
    let b = p.base();
    let r = |from: &str, to: &str| replaced(&b, from, to);
    let layer = |l: &str| {
        replaced(
            &b,
            "[[head.layers]]\nkind = \"flatten\"",
            &format!("[[head.layers]]\n{l}\n[[head.layers]]\nkind = \"flatten\""),
        )
    };
    let mut cases = vec![
        // [experiment]
        case(
            "experiment_unknown_key",
            r("seed = 3", "seed = 3\ncolour = 1"),
        ),
        case(
            "experiment_name_unsafe",
            r("name = \"tiny\"", "name = \"a/b\""),
        ),
        case("experiment_name_empty", r("name = \"tiny\"", "name = \"\"")),
        case("experiment_seed_negative", r("seed = 3", "seed = -1")),
        case("experiment_seed_text", r("seed = 3", "seed = \"three\"")),
        case(
            "experiment_missing",
            r("[experiment]\nname = \"tiny\"\nseed = 3\n", ""),
        ),
        // [data]
        case(
            "data_dir_missing_folder",
            r(
                &format!("dir = \"{}\"", p.data.display()),
                "dir = \"nowhere\"",
            ),
        ),
        case(
            "data_image_size_three",
            r("image_size = [32, 32]", "image_size = [32, 32, 3]"),
        ),
        case(
            "data_image_size_one",
            r("image_size = [32, 32]", "image_size = [32]"),
        ),
        case(
            "data_image_size_small",
            r("image_size = [32, 32]", "image_size = [8, 8]"),
        ),
        case(
            "data_image_size_huge",
            r("image_size = [32, 32]", "image_size = [100000, 100000]"),
        ),
        case(
            "data_image_size_text",
            r("image_size = [32, 32]", "image_size = \"big\""),
        ),
        case("data_batch_zero", r("batch_size = 4", "batch_size = 0")),
        case("data_batch_float", r("batch_size = 4", "batch_size = 4.5")),
        case(
            "data_interpolation_unknown",
            r(
                "batch_size = 4",
                "batch_size = 4\ninterpolation = \"lanczos\"",
            ),
        ),
        case(
            "data_on_bad_image_unknown",
            r(
                "batch_size = 4",
                "batch_size = 4\non_bad_image = \"ignore\"",
            ),
        ),
        // [backbone]
        case(
            "backbone_unknown",
            r("name = \"vgg16\"", "name = \"vgg17\""),
        ),
        case(
            "backbone_weights_missing_file",
            r(
                &format!("weights = \"{}\"", p.weights.display()),
                "weights = \"missing.safetensors\"",
            ),
        ),
        case(
            "backbone_cutoff_unknown",
            r(
                "trainable_from = \"none\"",
                "trainable_from = \"block5_conv\"",
            ),
        ),
        case(
            "backbone_preprocess_unknown",
            r("preprocess = \"caffe\"", "preprocess = \"keras\""),
        ),
        // [head]
        case(
            "head_no_layers",
            r("[[head.layers]]\nkind = \"flatten\"\n", "")
                .replace("[[head.layers]]", "[[nothing]]"),
        ),
        case("head_layer_kind_unknown", layer("kind = \"conv3d\"")),
        case("head_layer_kind_missing", layer("filters = 4")),
        case(
            "head_conv_stride_zero",
            layer("kind = \"conv2d\"\nfilters = 4\nkernel = 1\nstride = 0\npadding = \"same\""),
        ),
        case(
            "head_conv_kernel_zero",
            layer("kind = \"conv2d\"\nfilters = 4\nkernel = 0\npadding = \"same\""),
        ),
        case(
            "head_conv_filters_zero",
            layer("kind = \"conv2d\"\nfilters = 0\nkernel = 1"),
        ),
        case(
            "head_conv_kernel_huge",
            layer("kind = \"conv2d\"\nfilters = 4\nkernel = 100001\npadding = \"same\""),
        ),
        case(
            "head_conv_kernel_three_values",
            layer("kind = \"conv2d\"\nfilters = 4\nkernel = [1, 1, 1]"),
        ),
        case(
            "head_conv_valid_too_big",
            layer("kind = \"conv2d\"\nfilters = 4\nkernel = 3"),
        ),
        case(
            "head_conv_padding_unknown",
            layer("kind = \"conv2d\"\nfilters = 4\nkernel = 1\npadding = \"full\""),
        ),
        case("head_pool_zero", layer("kind = \"max_pool2d\"\npool = 0")),
        case(
            "head_pool_stride_zero",
            layer("kind = \"max_pool2d\"\npool = 1\nstride = 0"),
        ),
        case("head_dense_huge", r("units = 16", "units = 4000000000")),
        case(
            "head_dense_overflow",
            r("units = 16", "units = 9223372036854775807"),
        ),
        case("head_dense_zero", r("units = 16", "units = 0")),
        case("head_dense_negative", r("units = 16", "units = -3")),
        case(
            "head_activation_unknown",
            r("activation = \"relu\"", "activation = \"gelu2\""),
        ),
        case("head_dropout_one", r("rate = 0.5", "rate = 1.0")),
        case("head_dropout_misspelt", r("rate = 0.5", "prob = 0.5")),
        case(
            "head_dense_before_flatten",
            r("[[head.layers]]\nkind = \"flatten\"\n", ""),
        ),
        // [optimizer]
        case(
            "optimizer_kind_unknown",
            r("kind = \"rmsprop\"", "kind = \"adagrad\""),
        ),
        case("optimizer_lr_negative", r("lr = 1e-3", "lr = -1")),
        case("optimizer_lr_text", r("lr = 1e-3", "lr = \"fast\"")),
        case(
            "optimizer_unknown_key",
            r("lr = 1e-3", "lr = 1e-3\nrhoo = 0.9"),
        ),
        case(
            "optimizer_missing",
            r("[optimizer]\nkind = \"rmsprop\"\nlr = 1e-3\n", ""),
        ),
        // [train]
        case("train_epochs_zero", r("epochs = 2", "epochs = 0")),
        case(
            "train_loss_unknown",
            r("loss = \"binary_crossentropy\"", "loss = \"hinge\""),
        ),
        case(
            "train_categorical_on_one_unit",
            r(
                "loss = \"binary_crossentropy\"",
                "loss = \"categorical_crossentropy\"",
            ),
        ),
        // sections
        case("section_unknown", format!("{b}\n[optimiser]\nlr = 1\n")),
        case(
            "three_problems_at_once",
            r("rate = 0.5", "prob = 0.5")
                .replace(
                    "trainable_from = \"none\"",
                    "trainable_from = \"block5_conv\"",
                )
                .replace("lr = 1e-3", "lr = -1"),
        ),
        // A bad or missing *required* value (no default) still lets every other section and
        // the plan's rules be checked in the same pass (a placeholder stands in for it).
        case(
            "required_value_bad_and_a_rule",
            r("lr = 1e-3", "lr = \"x\"").replace("epochs = 2", "epochs = 0"),
        ),
        case(
            "required_key_misspelt_and_a_rule",
            r("name = \"vgg16\"", "nmae = \"vgg16\"").replace("batch_size = 4", "batch_size = 0"),
        ),
        case(
            "required_key_misspelt_and_a_rule_that_names_it",
            r("name = \"vgg16\"", "nmae = \"vgg16\"")
                .replace("image_size = [32, 32]", "image_size = [0, 32]"),
        ),
        case(
            "required_key_missing_and_a_rule",
            r("name = \"tiny\"\n", "")
                .replace("trainable_from = \"none\"", "trainable_from = \"block9\""),
        ),
        case(
            "required_layer_value_bad_and_a_rule",
            r("units = 16", "units = \"big\"").replace("rate = 0.5", "rate = 1.5"),
        ),
        case("toml_syntax", r("epochs = 2", "epochs = = 2")),
        // [sweep]
        case(
            "sweep_scalar",
            format!("{b}\n[sweep]\n\"optimizer.lr\" = 1e-3\n"),
        ),
        case(
            "sweep_empty_list",
            format!("{b}\n[sweep]\n\"optimizer.lr\" = []\n"),
        ),
        case(
            "sweep_unknown_key",
            format!("{b}\n[sweep]\n\"optimizer.lrr\" = [1e-3, 1e-4]\n"),
        ),
        case(
            "sweep_bad_value",
            format!("{b}\n[sweep]\n\"optimizer.lr\" = [1e-3, -1.0]\n"),
        ),
        case(
            "sweep_indexed_key",
            format!("{b}\n[sweep]\n\"head.layers[1].units\" = [8, 16]\n"),
        ),
        case(
            "sweep_key_not_a_section",
            format!("{b}\n[sweep]\n\"sweep.x\" = [1, 2]\n"),
        ),
        case("sweep_empty_key", format!("{b}\n[sweep]\n\"\" = [1, 2]\n")),
        case(
            "sweep_too_many_points",
            format!(
                "{b}\n[sweep]\n\"optimizer.lr\" = [{}]\n\"experiment.seed\" = [{}]\n",
                (0..200)
                    .map(|i| format!("{}e-4", i + 1))
                    .collect::<Vec<_>>()
                    .join(", "),
                (0..100)
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    ];
    // Optional sections, appended to the valid base.
    let add = |section: &str| format!("{b}\n{section}\n");
    for (name, section) in [
        ("augment_unknown_key", "[augment]\nrotation = 40"),
        (
            "augment_rotation_text",
            "[augment]\nrotation_degrees = \"a lot\"",
        ),
        (
            "augment_rotation_negative",
            "[augment]\nrotation_degrees = -10",
        ),
        ("augment_shift_too_large", "[augment]\nwidth_shift = 5.0"),
        ("augment_zoom_negative", "[augment]\nzoom = -0.5"),
        ("augment_flip_number", "[augment]\nhorizontal_flip = 1"),
        ("augment_fill_unknown", "[augment]\nfill = \"mirror\""),
        (
            "augment_fill_value_huge",
            "[augment]\nfill = \"constant\"\nfill_value = 1e9",
        ),
        ("augment_not_a_table", "augment = 3"),
        ("schedule_kind_unknown", "[schedule]\nkind = \"linear\""),
        ("schedule_kind_missing", "[schedule]\ngamma = 0.5"),
        (
            "schedule_step_every_zero",
            "[schedule]\nkind = \"step\"\nevery_epochs = 0",
        ),
        (
            "schedule_step_gamma_negative",
            "[schedule]\nkind = \"step\"\nevery_epochs = 1\ngamma = -0.1",
        ),
        (
            "schedule_exponential_unknown_key",
            "[schedule]\nkind = \"exponential\"\ngama = 0.9",
        ),
        (
            "schedule_cosine_min_lr_negative",
            "[schedule]\nkind = \"cosine\"\nmin_lr = -1",
        ),
        (
            "schedule_plateau_factor_above_one",
            "[schedule]\nkind = \"reduce_on_plateau\"\nfactor = 2.0",
        ),
        (
            "schedule_plateau_monitor_unknown",
            "[schedule]\nkind = \"reduce_on_plateau\"\nmonitor = \"val_f1\"",
        ),
        (
            "early_stopping_patience_missing",
            "[early_stopping]\nmonitor = \"val_loss\"",
        ),
        (
            "early_stopping_patience_negative",
            "[early_stopping]\npatience = -2",
        ),
        (
            "early_stopping_monitor_unknown",
            "[early_stopping]\npatience = 2\nmonitor = \"accuracy\"",
        ),
        (
            "early_stopping_unknown_key",
            "[early_stopping]\npatience = 2\nrestore = true",
        ),
        ("phase_not_a_list", "phase = 3"),
        (
            "phase_unknown_key",
            "[[phase]]\nname = \"a\"\nepochs = 1\nlearning_rate = 1",
        ),
        ("phase_epochs_zero", "[[phase]]\nname = \"a\"\nepochs = 0"),
        (
            "phase_cutoff_unknown",
            "[[phase]]\nname = \"a\"\nepochs = 1\ntrainable_from = \"block9_conv1\"",
        ),
        (
            "phase_optimizer_kind_unknown",
            "[[phase]]\nname = \"a\"\nepochs = 1\n[phase.optimizer]\nkind = \"lion\"\nlr = 1e-4",
        ),
        (
            "phase_optimizer_lr_zero",
            "[[phase]]\nname = \"a\"\nepochs = 1\n[phase.optimizer]\nkind = \"sgd\"\nlr = 0",
        ),
        (
            "phase_schedule_kind_unknown",
            "[[phase]]\nname = \"a\"\nepochs = 1\n[phase.schedule]\nkind = \"wave\"",
        ),
        (
            "phase_names_repeat",
            "[[phase]]\nname = \"a\"\nepochs = 1\n[[phase]]\nname = \"a\"\nepochs = 1",
        ),
        (
            "phase_head_on_the_first_phase",
            "[[phase]]\nname = \"a\"\nepochs = 1\n[[phase.head.layers]]\nkind = \"flatten\"\n[[phase.head.layers]]\nkind = \"dense\"\nunits = 1\nactivation = \"sigmoid\"",
        ),
        (
            "phase_head_layers_bad",
            "[[phase]]\nname = \"a\"\nepochs = 1\n[[phase]]\nname = \"b\"\nepochs = 1\n[[phase.head.layers]]\nkind = \"dense\"\nunits = 0\n[[phase.head.layers]]\nkind = \"pool\"\n[[phase.head.layers]]\nkind = \"dense\"\nunits = 3\nactivation = \"softmax\"",
        ),
        (
            "phase_head_shape_and_loss",
            "[[phase]]\nname = \"a\"\nepochs = 1\n[[phase]]\nname = \"b\"\nepochs = 1\n[[phase.head.layers]]\nkind = \"dense\"\nunits = 8\n[[phase.head.layers]]\nkind = \"dense\"\nunits = 1\nactivation = \"relu\"",
        ),
        (
            "phase_head_without_layers",
            "[[phase]]\nname = \"a\"\nepochs = 1\n[[phase]]\nname = \"b\"\nepochs = 1\n[phase.head]\nunits = 3",
        ),
    ] {
        cases.push(case(name, add(section)));
    }
    for (name, from, to) in [
        (
            "train_steps_zero",
            "epochs = 2",
            "epochs = 2\nsteps_per_epoch = 0",
        ),
        (
            "train_validation_steps_zero",
            "epochs = 2",
            "epochs = 2\nvalidation_steps = 0",
        ),
        (
            "train_monitor_unknown",
            "epochs = 2",
            "epochs = 2\nmonitor = \"val_f1\"",
        ),
        (
            "train_clip_negative",
            "epochs = 2",
            "epochs = 2\nclip_grad_norm = -1.0",
        ),
        (
            "train_label_smoothing_one",
            "epochs = 2",
            "epochs = 2\nlabel_smoothing = 1.0",
        ),
        (
            "train_test_time_augmentation_unknown",
            "epochs = 2",
            "epochs = 2\ntest_time_augmentation = \"vertical_flip\"",
        ),
        (
            "train_cache_unknown",
            "epochs = 2",
            "epochs = 2\ncache = \"always\"",
        ),
        ("train_epochs_float", "epochs = 2", "epochs = 2.5"),
        ("optimizer_rho_one", "lr = 1e-3", "lr = 1e-3\nrho = 1.0"),
        (
            "optimizer_momentum_negative",
            "lr = 1e-3",
            "lr = 1e-3\nmomentum = -0.5",
        ),
        (
            "optimizer_epsilon_zero",
            "lr = 1e-3",
            "lr = 1e-3\nepsilon = 0",
        ),
        (
            "optimizer_weight_decay_negative",
            "lr = 1e-3",
            "lr = 1e-3\nweight_decay = -0.1",
        ),
        ("optimizer_lr_infinite", "lr = 1e-3", "lr = inf"),
        ("optimizer_lr_nan", "lr = 1e-3", "lr = nan"),
        (
            "optimizer_sgd_with_rho",
            "kind = \"rmsprop\"\nlr = 1e-3",
            "kind = \"sgd\"\nlr = 1e-3\nrho = 0.9",
        ),
        (
            "backbone_batchnorm_unknown",
            "trainable_from = \"none\"",
            "trainable_from = \"none\"\nbatchnorm = \"sometimes\"",
        ),
        (
            "backbone_weights_empty",
            &format!("weights = \"{}\"", p.weights.display()),
            "weights = \"\"",
        ),
        (
            "experiment_description_number",
            "seed = 3",
            "seed = 3\ndescription = 5",
        ),
        (
            "data_dir_number",
            &format!("dir = \"{}\"", p.data.display()),
            "dir = 5",
        ),
        (
            "head_not_a_list",
            "[[head.layers]]\nkind = \"flatten\"",
            "[head.oops]\nkind = \"flatten\"\n[[head.layers]]\nkind = \"flatten\"",
        ),
    ] {
        cases.push(case(name, r(from, to)));
    }
    // Environment and --set layers.
    let mut env_case = case("env_misspelt_section", b.clone());
    env_case.env = vec![("RUNNER_OPTIMIZR__LR".into(), "1e-4".into())];
    cases.push(env_case);
    // The README's own example: a number in an environment variable is a number.
    let mut env_number = case("env_scientific_number_is_a_number", b.clone());
    env_number.env = vec![("RUNNER_OPTIMIZER__LR".into(), "1e-4".into())];
    env_number.code = 0;
    cases.push(env_number);
    let mut env_indexed = case("env_indexed_key", b.clone());
    env_indexed.env = vec![("RUNNER_HEAD__LAYERS[1]__UNITS".into(), "8".into())];
    cases.push(env_indexed);
    let mut env_bad = case("env_bad_value", b.clone());
    env_bad.env = vec![("RUNNER_OPTIMIZER__LR".into(), "-5".into())];
    cases.push(env_bad);
    for (name, set) in [
        ("set_bad_value", "optimizer.lr=-1"),
        ("set_unknown_key", "optimizer.lrr=1"),
        ("set_no_equals", "optimizer.lr"),
        ("set_indexed_bad_value", "head.layers[1].units=0"),
        ("set_indexed_out_of_range", "head.layers[9].units=4"),
        ("set_indexed_not_a_number", "head.layers[x].units=4"),
        ("set_image_size_three", "data.image_size=[32,32,3]"),
    ] {
        let mut c = case(name, b.clone());
        c.args.extend(["--set".into(), set.into()]);
        cases.push(c);
    }
    insta::assert_snapshot!(run_all(&p, cases));
}

#[test]
fn bad_images_and_folders() {
    let p = Project::new();
    let b = p.base();
    let train = p.data.join("train");
    // A JPEG whose header claims 65500x65500 pixels.
    let small = p.path().join("small.jpg");
    image::RgbImage::new(8, 8).save(&small).unwrap();
    let mut jpeg = std::fs::read(&small).unwrap();
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]);
    std::fs::write(train.join("cats/bomb.jpg"), &jpeg).unwrap();
    std::fs::write(train.join("cats/empty.png"), b"").unwrap();
    std::fs::write(train.join("dogs/text.jpg"), b"not an image at all").unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(train.join("gone.png"), train.join("dogs/dangling.png"))
            .unwrap();
        std::os::unix::fs::symlink(train.join("dogs/loop.png"), train.join("dogs/loop.png"))
            .unwrap();
    }
    let mut run = case("bad_images_fail_before_training", b.clone());
    run.args = vec!["{spec}".into(), "--device".into(), "cpu".into()];
    run.logs_only = true;
    let mut cases = vec![run];
    // Dataset layouts, each a copy of a good one with one thing wrong.
    let layout = |name: &str, change: &dyn Fn(&Path)| {
        let root = common::make_dataset(
            &p.path().join(format!("layout_{name}")),
            &["cats", "dogs"],
            [1, 1, 1],
            8,
        );
        change(&root);
        case(
            &format!("layout_{name}"),
            b.replace(&p.data.display().to_string(), &root.display().to_string()),
        )
    };
    // Weights files that cannot be used: refused when the run loads them, naming the file
    // (only the run log is written).
    for (name, bytes) in [
        ("weights_junk", b"not a weights file".to_vec()),
        ("weights_cut_short", {
            let w = std::fs::read(&p.weights).unwrap();
            w[..w.len() / 2].to_vec()
        }),
    ] {
        let file = p.path().join(format!("{name}.safetensors"));
        std::fs::write(&file, bytes).unwrap();
        let mut c = layout(name, &|_| {});
        c.name = name.into();
        c.spec = c.spec.map(|t| {
            t.replace(
                &p.weights.display().to_string(),
                &file.display().to_string(),
            )
        });
        c.args = vec!["{spec}".into(), "--device".into(), "cpu".into()];
        c.logs_only = true;
        cases.push(c);
    }
    cases.push(layout("no_validation_folder", &|r| {
        std::fs::remove_dir_all(r.join("validation")).unwrap()
    }));
    cases.push(layout("no_train_folder", &|r| {
        std::fs::remove_dir_all(r.join("train")).unwrap()
    }));
    cases.push(layout("class_folders_differ", &|r| {
        std::fs::rename(r.join("validation/dogs"), r.join("validation/dog")).unwrap()
    }));
    cases.push(layout("one_class", &|r| {
        for split in ["train", "validation", "test"] {
            std::fs::remove_dir_all(r.join(split).join("dogs")).unwrap();
        }
    }));
    cases.push(layout("empty_class_folder", &|r| {
        for e in std::fs::read_dir(r.join("train/dogs")).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
    }));
    cases.push(layout("only_text_files_in_a_class", &|r| {
        for e in std::fs::read_dir(r.join("train/dogs")).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        std::fs::write(r.join("train/dogs/notes.txt"), b"hello").unwrap();
    }));
    cases.push(layout("dir_is_a_file", &|r| {
        std::fs::remove_dir_all(r).unwrap();
        std::fs::write(r, b"not a folder").unwrap();
    }));
    #[cfg(unix)]
    cases.push(layout("non_utf8_class_folder", &|r| {
        use std::os::unix::ffi::OsStrExt;
        for split in ["train", "validation", "test"] {
            std::fs::rename(
                r.join(split).join("dogs"),
                r.join(split).join(std::ffi::OsStr::from_bytes(b"d\xffgs")),
            )
            .unwrap();
        }
    }));
    insta::assert_snapshot!(run_all(&p, cases));
}

#[test]
fn bad_arguments_and_results_folders() {
    let p = Project::new();
    let b = p.base();
    // A results folder with one real run and one junk table.
    let spec = p.path().join("good.toml");
    std::fs::write(&spec, &b).unwrap();
    let out = common::cli::runner(
        &[
            spec.to_str().unwrap(),
            "--device",
            "cpu",
            "--results",
            p.path().join("junk").to_str().unwrap(),
        ],
        p.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let junk = p.path().join("junk");
    std::fs::write(junk.join("x.parquet"), b"junk").unwrap();
    let mut cases = Vec::new();
    let mut add = |name: &str, args: &[&str]| {
        let mut c = case(name, b.clone());
        c.args = args.iter().map(|s| s.to_string()).collect();
        cases.push(c);
    };
    add("results_missing_folder", &["results", "{dir}/nowhere"]);
    add("results_with_one_junk_table", &["results", "{dir}/junk"]);
    add("results_file_not_folder", &["results", "{spec}"]);
    add(
        "results_filter_text_compared",
        &["results", "{dir}/junk", "--filter", "experiment>3"],
    );
    add(
        "results_filter_no_operator",
        &["results", "{dir}/junk", "--filter", "experiment"],
    );
    add(
        "plot_out_jpg",
        &["plot", "{dir}/junk", "--out", "{dir}/a.jpg"],
    );
    add(
        "plot_smooth_out_of_range",
        &["plot", "--smooth", "1.5", "--out", "{dir}/a.png"],
    );
    add("shard_without_grid", &["{spec}", "--shard", "1/2"]);
    add("shard_malformed", &["{spec}", "--shard", "2/2"]);
    add("resume_unknown_run", &["resume", "nope"]);
    add("logs_unknown_run", &["logs", "nope"]);
    add(
        "predict_unknown_run",
        &["predict", "nope", "{dir}/small.png"],
    );
    add("device_unknown", &["check", "{spec}", "--device", "tpu"]);
    add("spec_file_missing", &["check", "{dir}/nothing.toml"]);
    // Run and plan print the error with its chain: the cause once, not twice.
    add("spec_file_missing_run", &["{dir}/nothing.toml"]);
    add("spec_file_missing_plan", &["plan", "{dir}/nothing.toml"]);
    add(
        "results_sort_unknown_column",
        &["results", "{dir}/junk", "--sort", "accuracy"],
    );
    add(
        "results_format_unknown",
        &["results", "{dir}/junk", "--format", "xml"],
    );
    add(
        "predict_missing_image",
        &["predict", "nope", "{dir}/no_such_image.png"],
    );
    add(
        "fetch_unknown_asset",
        &["fetch", "vgg99/imagenet", "--into", "{dir}/fetched"],
    );
    add("set_empty_key", &["check", "{spec}", "--set", "=1"]);
    add("sweep_missing_folder", &["--sweep", "{dir}/no_such_folder"]);
    std::fs::create_dir_all(p.path().join("empty")).unwrap();
    add("sweep_folder_without_specs", &["--sweep", "{dir}/empty"]);
    add("spec_is_a_folder", &["check", "{dir}/junk"]);
    add("unknown_command_flag", &["check", "{spec}", "--fast"]);
    // Not an error: the good run is listed, the junk table named in a warning.
    cases[1].code = 0;
    insta::assert_snapshot!(run_all(&p, cases));
}

#[test]
fn bad_saved_models() {
    let p = Project::new();
    let spec = p.path().join("good.toml");
    std::fs::write(&spec, p.base()).unwrap();
    let runs = p.path().join("runs");
    let out = common::cli::runner(
        &[
            spec.to_str().unwrap(),
            "--device",
            "cpu",
            "--results",
            runs.to_str().unwrap(),
        ],
        p.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = common::cli::files_with(&runs, ".parquet")[0]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let image = p.data.join("test/cats/cats.0.png");
    let card_path = runs.join(&id).join("model.json");
    let bpk_path = runs.join(&id).join("model.bpk");
    let card = std::fs::read_to_string(&card_path).unwrap();
    let bpk = std::fs::read(&bpk_path).unwrap();
    let edit = |from: &str, to: &str| {
        assert!(card.contains(from), "model.json has {from:?}:\n{card}");
        card.replacen(from, to, 1)
    };
    let json: serde_json::Value = serde_json::from_str(&card).unwrap();
    let cut = json["cut"].as_u64().unwrap();
    assert_eq!(json["card_version"], runner::predict::CARD_VERSION);
    let without = |keys: &[&str]| {
        let mut j = json.clone();
        for k in keys {
            j.as_object_mut().unwrap().remove(*k).unwrap();
        }
        serde_json::to_string_pretty(&j).unwrap()
    };
    let with = |key: &str, value: serde_json::Value| {
        let mut j = json.clone();
        j[key] = value;
        serde_json::to_string_pretty(&j).unwrap()
    };
    let mut cases: Vec<(&str, String, Vec<u8>)> = vec![
        (
            "model_json_cut_past_the_backbone",
            edit(&format!("\"cut\": {cut}"), "\"cut\": 999"),
            bpk.clone(),
        ),
        (
            "model_json_head_units_changed",
            edit("\"units\": 16", "\"units\": 17"),
            bpk.clone(),
        ),
        (
            "model_json_head_layer_zero_units",
            edit("\"units\": 16", "\"units\": 0"),
            bpk.clone(),
        ),
        (
            "model_json_one_class_name",
            edit("\"cats\",", ""),
            bpk.clone(),
        ),
        (
            "model_json_not_json",
            "{ this is not json".into(),
            bpk.clone(),
        ),
        (
            "model_json_preprocess_contradicts_spec",
            edit(
                "\n  \"preprocess\": \"caffe\",",
                "\n  \"preprocess\": \"torch\",",
            ),
            bpk.clone(),
        ),
        (
            "model_json_other_run_id",
            edit(
                &format!("\"run_id\": \"{id}\""),
                "\"run_id\": \"another-run\"",
            ),
            bpk.clone(),
        ),
        (
            "model_json_checksum_deleted",
            without(&["bpk_sha256"]),
            bpk.clone(),
        ),
        (
            "model_json_checksum_not_hex",
            with("bpk_sha256", serde_json::json!("not-a-checksum")),
            bpk.clone(),
        ),
        (
            "model_json_checksum_not_a_string",
            with("bpk_sha256", serde_json::json!(5)),
            bpk.clone(),
        ),
        (
            "model_json_card_version_from_the_future",
            with("card_version", serde_json::json!(99)),
            bpk.clone(),
        ),
        ("model_bpk_damaged", card.clone(), {
            let mut b = bpk.clone();
            let i = b.len() / 2;
            b[i] ^= 0xFF;
            b
        }),
        (
            "model_bpk_cut_short",
            card.clone(),
            bpk[..bpk.len() / 3].to_vec(),
        ),
    ];
    let predict = || {
        common::cli::runner(
            &[
                "predict",
                &id,
                image.to_str().unwrap(),
                "--device",
                "cpu",
                "--results",
                runs.to_str().unwrap(),
            ],
            p.path(),
        )
    };
    let mut report = String::new();
    for (name, card_text, bpk_bytes) in cases.drain(..) {
        std::fs::write(&card_path, &card_text).unwrap();
        std::fs::write(&bpk_path, &bpk_bytes).unwrap();
        let out = predict();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        report += &format!(
            "## {name} (exit 2)\n{}\n\n",
            err.replace(p.path().to_str().unwrap(), "<dir>")
                .replace(&id, "<run>")
                .lines()
                .map(normalise_log_line)
                .map(|l| l
                    .split(' ')
                    .map(|w| {
                        let bare = w.trim_end_matches(',');
                        if bare.len() == 64 && bare.bytes().all(|c| c.is_ascii_hexdigit()) {
                            w.replace(bare, "<sha256>")
                        } else {
                            w.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" "))
                .collect::<Vec<_>>()
                .join("\n")
                .trim_end()
        );
    }
    // A card written before checksums were recorded (version 1: neither `card_version` nor
    // `bpk_sha256`) is still read, with a warning that model.bpk is not verified.
    std::fs::write(&card_path, without(&["card_version", "bpk_sha256"])).unwrap();
    std::fs::write(&bpk_path, &bpk).unwrap();
    let out = predict();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("model.bpk is not verified"), "{err}");
    // Restored, the model predicts again.
    std::fs::write(&card_path, &card).unwrap();
    std::fs::write(&bpk_path, &bpk).unwrap();
    let out = predict();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    insta::assert_snapshot!(report);
}
