//! One test per spec rule: each bad input gives an error naming the file and the key path.

mod common;

use std::path::PathBuf;

use runner::assets::Locations;
use runner::plan::{self, Plan};
use runner::spec::load;

struct Fixture {
    dir: tempfile::TempDir,
    data: PathBuf,
    weights: PathBuf,
}

fn fixture(classes: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), classes, [1, 1, 1], 8);
    let weights = dir.path().join("w.safetensors");
    std::fs::write(&weights, b"not read by the plan").unwrap();
    Fixture { dir, data, weights }
}

impl Fixture {
    fn spec(&self) -> String {
        common::spec_text(&self.data, &self.weights, "")
    }

    fn write(&self, text: &str) -> PathBuf {
        let p = self.dir.path().join("exp.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn plan_with(&self, text: &str, sets: &[&str]) -> Result<Plan, String> {
        let p = self.write(text);
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let loaded = load::load(&p, &sets).map_err(|e| e.to_string())?;
        plan::build(&loaded, &Locations { mirror: None }).map_err(|e| e.to_string())
    }

    fn plan(&self, text: &str) -> Result<Plan, String> {
        self.plan_with(text, &[])
    }

    fn file(&self) -> String {
        self.dir.path().join("exp.toml").display().to_string()
    }
}

fn err(r: Result<Plan, String>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn valid_spec_resolves_into_a_plan() {
    let f = fixture(&["cats", "dogs"]);
    let plan = f.plan(&f.spec()).unwrap();
    assert_eq!(plan.classes, vec!["cats", "dogs"]);
    assert_eq!(plan.splits.len(), 3);
    assert_eq!(plan.base_output, [512, 1, 1]);
    assert_eq!(plan.cutoff.index, plan.backbone.layers().len());
}

#[test]
fn unknown_field_names_file_key_and_expected_field() {
    let f = fixture(&["cats", "dogs"]);
    let text = f.spec().replace("rate = 0.5", "prob = 0.5");
    let e = err(f.plan(&text));
    assert!(
        e.contains(&format!(
            "{}: head.layers[2].prob: unknown field `prob`, expected `rate`",
            f.file()
        )),
        "{e}"
    );
}

#[test]
fn unknown_layer_kind_lists_the_valid_kinds() {
    let f = fixture(&["cats", "dogs"]);
    let text = f.spec().replace("kind = \"flatten\"", "kind = \"flaten\"");
    let e = err(f.plan(&text));
    assert!(
        e.contains(
            "head.layers[0].kind: unknown layer kind \"flaten\" (did you mean \"flatten\"?)"
        ),
        "{e}"
    );
    assert!(
        e.contains("conv2d, max_pool2d, global_average_pool, flatten, dense, dropout"),
        "{e}"
    );
}

#[test]
fn unknown_section_is_reported() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&format!("{}\n[trian]\nepochs = 3\n", f.spec())));
    assert!(
        e.contains("trian: unknown section [trian] (did you mean \"train\"?)"),
        "{e}"
    );
}

#[test]
fn every_problem_is_collected_not_just_the_first() {
    let f = fixture(&["cats", "dogs"]);
    let text = f
        .spec()
        .replace("rate = 0.5", "prob = 0.5")
        .replace("kind = \"rmsprop\"", "kind = \"rmsprop\"\nrhoo = 0.9")
        .replace("seed = 3", "seed = 3\ncolour = 1");
    let e = err(f.plan(&text));
    assert!(e.starts_with("3 problems"), "{e}");
    assert!(e.contains("head.layers[2].prob"), "{e}");
    assert!(e.contains("optimizer.rhoo"), "{e}");
    assert!(e.contains("experiment.colour"), "{e}");
}

#[test]
fn semantic_problems_are_all_collected() {
    let f = fixture(&["cats", "dogs"]);
    let text = f
        .spec()
        .replace("rate = 0.5", "rate = 1.5")
        .replace("lr = 1e-3", "lr = -1.0")
        .replace("epochs = 2", "epochs = 0");
    let e = err(f.plan(&text));
    assert!(
        e.contains("head.layers[2].rate: must be in [0, 1), got 1.5"),
        "{e}"
    );
    assert!(
        e.contains("optimizer.lr: must be a positive number, got -1"),
        "{e}"
    );
    assert!(e.contains("train.epochs: must be at least 1, got 0"), "{e}");
}

#[test]
fn dropout_rate_must_be_below_one() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&f.spec().replace("rate = 0.5", "rate = 1.5")));
    assert!(
        e.contains(&format!(
            "{}: head.layers[2].rate: must be in [0, 1), got 1.5",
            f.file()
        )),
        "{e}"
    );
}

#[test]
fn wrong_value_type_names_the_key() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&f.spec().replace("units = 16", "units = \"many\"")));
    assert!(
        e.contains("head.layers[1].units: invalid type: found string \"many\""),
        "{e}"
    );
}

#[test]
fn freeze_cutoff_must_name_a_backbone_layer() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&f.spec().replace(
        "trainable_from = \"none\"",
        "trainable_from = \"block5_conv\"",
    )));
    assert!(
        e.contains("backbone.trainable_from: \"block5_conv\" is not a layer of vgg16"),
        "{e}"
    );
    assert!(e.contains("\"block5_conv1\""), "{e}");
}

#[test]
fn freeze_cutoff_accepts_layer_names_none_and_all() {
    let f = fixture(&["cats", "dogs"]);
    let p = f
        .plan(&f.spec().replace(
            "trainable_from = \"none\"",
            "trainable_from = \"block5_conv1\"",
        ))
        .unwrap();
    assert_eq!(p.backbone.layers()[p.cutoff.index].name, "block5_conv1");
    let p = f
        .plan(
            &f.spec()
                .replace("trainable_from = \"none\"", "trainable_from = \"all\""),
        )
        .unwrap();
    assert_eq!(p.cutoff.index, 0);
}

#[test]
fn head_shapes_must_work() {
    let f = fixture(&["cats", "dogs"]);
    // 32x32 input leaves a 1x1x512 map: a 3x3 valid convolution cannot run on it.
    let conv =
        "[[head.layers]]\nkind = \"conv2d\"\nfilters = 8\nkernel = 3\nactivation = \"relu\"\n";
    let text = f.spec().replacen(
        "[[head.layers]]\nkind = \"flatten\"",
        &format!("{conv}[[head.layers]]\nkind = \"flatten\""),
        1,
    );
    let e = err(f.plan(&text));
    assert!(
        e.contains("head.layers[0]: a 3x3 valid convolution cannot run on a 1x1 feature map"),
        "{e}"
    );
}

#[test]
fn dense_needs_a_vector() {
    let f = fixture(&["cats", "dogs"]);
    let text = f
        .spec()
        .replacen("[[head.layers]]\nkind = \"flatten\"\n", "", 1);
    let e = err(f.plan(&text));
    assert!(
        e.contains("head.layers[0]: dense needs a vector but gets a feature map"),
        "{e}"
    );
}

#[test]
fn loss_must_fit_the_last_layer() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(
        &f.spec()
            .replace("activation = \"sigmoid\"", "activation = \"relu\""),
    ));
    assert!(e.contains("head.layers[3]: binary_crossentropy needs a last layer of kind = \"dense\", units = 1, activation = \"sigmoid\""), "{e}");
}

#[test]
fn binary_crossentropy_needs_two_classes() {
    let f = fixture(&["cats", "dogs", "birds"]);
    let e = err(f.plan(&f.spec()));
    assert!(
        e.contains("train.loss: binary_crossentropy needs exactly 2 classes, the data has 3"),
        "{e}"
    );
}

#[test]
fn categorical_crossentropy_needs_one_unit_per_class() {
    let f = fixture(&["cats", "dogs", "birds"]);
    let text = f
        .spec()
        .replace(
            "units = 1\nactivation = \"sigmoid\"",
            "units = 2\nactivation = \"softmax\"",
        )
        .replace("binary_crossentropy", "categorical_crossentropy");
    let e = err(f.plan(&text));
    assert!(
        e.contains("head.layers[3].units: categorical_crossentropy needs one unit per class: 3"),
        "{e}"
    );
    let ok = text.replace(
        "units = 2\nactivation = \"softmax\"",
        "units = 3\nactivation = \"softmax\"",
    );
    assert!(f.plan(&ok).is_ok());
}

#[test]
fn backbone_must_be_known() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&f.spec().replace("name = \"vgg16\"", "name = \"vgg61\"")));
    assert!(e.contains("backbone.name: unknown backbone \"vgg61\" (did you mean \"vgg16\"?); known backbones: vgg16, vgg19"), "{e}");
}

#[test]
fn missing_weights_file_lists_every_place_tried() {
    let f = fixture(&["cats", "dogs"]);
    let text = f
        .spec()
        .replace(&f.weights.display().to_string(), "nowhere/w.safetensors");
    let p = f.write(&text);
    let loaded = load::load(&p, &[]).unwrap();
    let mirror = f.dir.path().join("mirror");
    let e = plan::build(
        &loaded,
        &Locations {
            mirror: Some(mirror.clone()),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("backbone.weights: weights file not found; tried:"),
        "{e}"
    );
    assert!(e.contains("nowhere/w.safetensors"), "{e}");
    assert!(
        e.contains(&mirror.join("nowhere/w.safetensors").display().to_string()),
        "{e}"
    );
}

#[test]
fn imagenet_weights_are_found_in_the_mirror() {
    let f = fixture(&["cats", "dogs"]);
    let mirror = f.dir.path().join("mirror");
    std::fs::create_dir_all(mirror.join("weights")).unwrap();
    std::fs::write(
        mirror.join("weights/vgg16_imagenet_notop.safetensors"),
        b"x",
    )
    .unwrap();
    let text = f
        .spec()
        .replace(&f.weights.display().to_string(), "imagenet");
    let loaded = load::load(&f.write(&text), &[]).unwrap();
    let plan = plan::build(
        &loaded,
        &Locations {
            mirror: Some(mirror.clone()),
        },
    )
    .unwrap();
    assert_eq!(
        plan.weights,
        mirror.join("weights/vgg16_imagenet_notop.safetensors")
    );
    // Without a mirror the error says where it looked and how to point at one.
    let e = plan::build(&loaded, &Locations { mirror: None })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("weights/vgg16_imagenet_notop.safetensors") && e.contains("RUNNER_ASSETS"),
        "{e}"
    );
    assert!(e.contains("runner fetch vgg16/imagenet"), "{e}");
}

#[test]
fn relative_data_dir_falls_back_to_the_mirror() {
    let f = fixture(&["cats", "dogs"]);
    let mirror = f.dir.path();
    std::fs::rename(&f.data, mirror.join("only_in_mirror")).unwrap();
    let text = f
        .spec()
        .replace(&f.data.display().to_string(), "only_in_mirror");
    let loaded = load::load(&f.write(&text), &[]).unwrap();
    let plan = plan::build(
        &loaded,
        &Locations {
            mirror: Some(mirror.to_path_buf()),
        },
    )
    .unwrap();
    assert_eq!(plan.data_dir, mirror.join("only_in_mirror"));
    let text = f
        .spec()
        .replace(&f.data.display().to_string(), "no/such/data");
    let loaded = load::load(&f.write(&text), &[]).unwrap();
    let e = plan::build(
        &loaded,
        &Locations {
            mirror: Some(mirror.to_path_buf()),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("data.dir: data folder not found; tried:"), "{e}");
    assert!(
        e.contains(&mirror.join("no/such/data").display().to_string()),
        "{e}"
    );
}

#[test]
fn splits_must_have_the_same_class_folders() {
    let f = fixture(&["cats", "dogs"]);
    std::fs::create_dir_all(f.data.join("validation/birds")).unwrap();
    common::write_image(
        &f.data.join("validation/birds/b.png"),
        2,
        8,
        &mut common::Rng::new(1),
    );
    let e = err(f.plan(&f.spec()));
    assert!(e.contains("validation: class folders [\"birds\", \"cats\", \"dogs\"] differ from train/'s [\"cats\", \"dogs\"]"), "{e}");
}

#[test]
fn empty_class_folder_is_reported() {
    let f = fixture(&["cats", "dogs"]);
    std::fs::remove_file(f.data.join("train/dogs/dogs.0.png")).unwrap();
    let e = err(f.plan(&f.spec()));
    assert!(e.contains("class folder dogs/ has no images"), "{e}");
}

#[test]
fn image_size_must_fit_the_backbone() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(
        &f.spec()
            .replace("image_size = [32, 32]", "image_size = [16, 32]"),
    ));
    assert!(
        e.contains("data.image_size: each side must be in [32, 4096] for vgg16, got [16, 32]"),
        "{e}"
    );
}

#[test]
fn batch_size_must_be_positive() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&f.spec().replace("batch_size = 4", "batch_size = 0")));
    assert!(
        e.contains("data.batch_size: must be at least 1, got 0"),
        "{e}"
    );
}

#[test]
fn optimizer_ranges_are_checked() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&f.spec().replace("lr = 1e-3", "lr = 1e-3\nrho = 1.0")));
    assert!(e.contains("optimizer.rho: must be in [0, 1), got 1"), "{e}");
}

#[test]
fn unknown_optimizer_kind_lists_the_kinds() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&f.spec().replace("kind = \"rmsprop\"", "kind = \"rmsprob\"")));
    assert!(e.contains("optimizer.kind: unknown optimizer kind \"rmsprob\" (did you mean \"rmsprop\"?); valid kinds: rmsprop, adam, adamw, sgd"), "{e}");
}

#[test]
fn experiment_name_must_be_file_safe() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&f.spec().replace("name = \"tiny\"", "name = \"a/b\"")));
    assert!(e.contains("experiment.name: must be non-empty"), "{e}");
}

#[test]
fn toml_syntax_error_names_the_file() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan("[experiment\nname = 1"));
    assert!(
        e.starts_with(&format!("{}: not valid TOML", f.file())),
        "{e}"
    );
}

#[test]
fn set_overrides_the_file_and_is_named_in_errors() {
    let f = fixture(&["cats", "dogs"]);
    let p = f
        .plan_with(&f.spec(), &["optimizer.lr=0.5", "train.epochs=7"])
        .unwrap();
    assert_eq!(p.spec.optimizer.lr(), 0.5);
    assert_eq!(p.spec.train.epochs, 7);
    let e = err(f.plan_with(&f.spec(), &["train.epochs=0"]));
    assert!(
        e.contains("--set train.epochs: train.epochs: must be at least 1, got 0"),
        "{e}"
    );
    let e = err(f.plan_with(&f.spec(), &["optimizer"]));
    assert!(
        e.contains("--set optimizer: expected key.path=value"),
        "{e}"
    );
}

#[test]
fn defaults_fill_what_the_file_leaves_out() {
    let f = fixture(&["cats", "dogs"]);
    let text = f
        .spec()
        .replace("seed = 3\n", "")
        .replace("batch_size = 4\n", "");
    let p = f.plan(&text).unwrap();
    assert_eq!(p.spec.experiment.seed, 42);
    assert_eq!(p.spec.data.batch_size, 20);
}

#[test]
fn plan_counts_parameters_like_keras() {
    let f = fixture(&["cats", "dogs"]);
    let text = f
        .spec()
        .replace("image_size = [32, 32]", "image_size = [150, 150]")
        .replace("units = 16", "units = 256");
    let p = f.plan(&text).unwrap();
    assert_eq!(p.backbone.num_params(), 14_714_688);
    assert_eq!(p.base_output, [512, 4, 4]);
    let head: usize = p.head_shapes.iter().map(|(_, n)| n).sum();
    assert_eq!(head, 2_097_665);
    let summary = runner::report::summary(&p);
    assert!(summary.contains("Total params: 16,812,353"), "{summary}");
    assert!(summary.contains("Trainable params: 2,097,665"), "{summary}");
    assert!(
        summary.contains("Non-trainable params: 14,714,688"),
        "{summary}"
    );
    assert!(summary.contains("Frozen tensors (26)"), "{summary}");
}

#[test]
fn plan_says_which_tensors_are_frozen() {
    let f = fixture(&["cats", "dogs"]);
    let text = f.spec().replace(
        "trainable_from = \"none\"",
        "trainable_from = \"block5_conv1\"",
    );
    let p = f.plan(&text).unwrap();
    let summary = runner::report::summary(&p);
    assert!(summary.contains("Frozen tensors (20)"), "{summary}");
    assert!(
        summary.contains("block4_conv3.bias") && !summary.contains("block5_conv1.weight,"),
        "{summary}"
    );
    let trainable_base: usize = p.backbone.layers()[p.cutoff.index..]
        .iter()
        .map(|l| l.num_params())
        .sum();
    assert_eq!(trainable_base, 3 * (512 * 512 * 9 + 512));
}

#[test]
fn a_missing_required_field_is_named() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&f.spec().replace("units = 16\n", "")));
    assert!(
        e.contains("head.layers[1].units: missing field `units`"),
        "{e}"
    );
}

#[test]
fn adam_has_no_weight_decay() {
    let f = fixture(&["cats", "dogs"]);
    let adam = f
        .spec()
        .replace("kind = \"rmsprop\"", "kind = \"adam\"\nweight_decay = 0.01");
    let e = err(f.plan(&adam));
    assert!(
        e.contains("optimizer.weight_decay: must be 0 for adam (use kind = \"adamw\""),
        "{e}"
    );
    assert!(
        f.plan(&adam.replace("kind = \"adam\"", "kind = \"adamw\""))
            .is_ok()
    );
}

const AUGMENT: &str = "\n[augment]\nrotation_degrees = 40\nwidth_shift = 0.2\nheight_shift = 0.2\nshear_degrees = 0.2\nzoom = 0.2\nhorizontal_flip = true\nfill = \"nearest\"\n";

#[test]
fn augment_section_is_optional_and_parsed() {
    let f = fixture(&["cats", "dogs"]);
    assert!(f.plan(&f.spec()).unwrap().spec.augment.is_none());
    let a = f
        .plan(&format!("{}{AUGMENT}", f.spec()))
        .unwrap()
        .spec
        .augment
        .unwrap();
    assert_eq!(
        (
            a.rotation_degrees,
            a.zoom,
            a.horizontal_flip,
            a.vertical_flip
        ),
        (40.0, 0.2, true, false)
    );
}

#[test]
fn augment_ranges_must_not_be_negative() {
    let f = fixture(&["cats", "dogs"]);
    let text = format!(
        "{}{}",
        f.spec(),
        AUGMENT
            .replace("rotation_degrees = 40", "rotation_degrees = -5")
            .replace("width_shift = 0.2", "width_shift = -0.1")
    );
    let e = err(f.plan(&text));
    assert!(
        e.contains("augment.rotation_degrees: must be at least 0 (a range [-r, r]), got -5"),
        "{e}"
    );
    assert!(
        e.contains("augment.width_shift: must be a fraction in [0, 1), got -0.1"),
        "{e}"
    );
}

#[test]
fn augment_zoom_must_be_below_one() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&format!(
        "{}{}",
        f.spec(),
        AUGMENT.replace("zoom = 0.2", "zoom = 1.0")
    )));
    assert!(e.contains("augment.zoom: must be in [0, 1)"), "{e}");
}

#[test]
fn augment_fill_mode_must_be_known() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&format!(
        "{}{}",
        f.spec(),
        AUGMENT.replace("fill = \"nearest\"", "fill = \"mirror\"")
    )));
    assert!(e.contains(&format!("{}: augment.fill: unknown variant `mirror`, expected one of `nearest`, `constant`, `reflect`, `wrap`", f.file())), "{e}");
}

#[test]
fn augment_unknown_key_is_named() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&format!(
        "{}{}",
        f.spec(),
        AUGMENT.replace("shear_degrees", "shear")
    )));
    assert!(e.contains("augment.shear: unknown field `shear`"), "{e}");
}

#[test]
fn step_counts_must_be_positive() {
    let f = fixture(&["cats", "dogs"]);
    let text = f.spec().replace(
        "epochs = 2",
        "epochs = 2\nsteps_per_epoch = 0\nvalidation_steps = 0",
    );
    let e = err(f.plan(&text));
    assert!(
        e.contains("train.steps_per_epoch: must be at least 1 when given, got 0"),
        "{e}"
    );
    assert!(
        e.contains("train.validation_steps: must be at least 1 when given, got 0"),
        "{e}"
    );
}

#[test]
fn bad_image_policy_must_be_fail_or_skip() {
    let f = fixture(&["cats", "dogs"]);
    let e = err(f.plan(&f.spec().replace(
        "batch_size = 4",
        "batch_size = 4\non_bad_image = \"ignore\"",
    )));
    assert!(
        e.contains("data.on_bad_image: unknown variant `ignore`, expected `fail` or `skip`"),
        "{e}"
    );
}

#[test]
fn the_seed_experiments_validate_against_the_mirror() {
    let Some(mirror) = common::mirror() else {
        eprintln!("skipped: no asset mirror");
        return;
    };
    let names = common::shipped_experiments();
    assert!(names.len() >= 9, "{names:?}");
    for p in names {
        let loaded = load::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
        plan::build(
            &loaded,
            &Locations {
                mirror: Some(mirror.clone()),
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

const PHASES: &str = r#"
[[phase]]
name = "head"
epochs = 3

[[phase]]
name = "fine_tune"
epochs = 4
trainable_from = "block5_conv1"
optimizer = { kind = "rmsprop", lr = 1e-5 }
schedule = { kind = "cosine", warmup_epochs = 1 }
augment = {}
"#;

#[test]
fn phases_resolve_with_the_experiment_settings_as_defaults() {
    let f = fixture(&["cats", "dogs"]);
    let text = format!(
        "{}\n[schedule]\nkind = \"step\"\nevery_epochs = 2\n\n[augment]\nrotation_degrees = 10\n\n[early_stopping]\npatience = 2\n{PHASES}",
        f.spec()
    );
    let plan = f.plan(&text).unwrap();
    assert_eq!(plan.phases.len(), 2);
    let (head, tune) = (&plan.phases[0], &plan.phases[1]);
    assert_eq!((head.name.as_str(), head.epochs), ("head", 3));
    assert_eq!(head.cutoff.label, "none");
    assert_eq!(head.optimizer.lr(), 1e-3);
    assert_eq!(head.schedule.kind(), "step");
    assert!(head.augment.is_some());
    assert!(head.early_stopping.is_some());
    assert_eq!(tune.cutoff.label, "block5_conv1");
    assert_eq!(tune.optimizer.lr(), 1e-5);
    assert_eq!(tune.schedule.kind(), "cosine");
    assert!(tune.augment.is_none(), "augment = {{}} turns it off");
    let summary = runner::report::summary(&plan);
    assert!(
        summary.contains("2. fine_tune: 4 epochs, trainable from block5_conv1 (7,087,649 trainable params), rmsprop lr 0.00001, schedule cosine, not augmented"),
        "{summary}"
    );
    assert!(summary.contains("1. head: 3 epochs, trainable from none (8,225 trainable params), rmsprop lr 0.001, schedule step, augmented, early stopping (patience 2)"), "{summary}");
    // Without [[phase]]: one phase named train with the top-level settings.
    let one = f.plan(&f.spec()).unwrap();
    assert_eq!(one.phases.len(), 1);
    assert_eq!(
        (one.phases[0].name.as_str(), one.phases[0].epochs),
        ("train", 2)
    );
    assert_eq!(one.phases[0].schedule.kind(), "constant");
}

#[test]
fn every_bad_phase_value_is_named_with_its_phase_index() {
    let f = fixture(&["cats", "dogs"]);
    let bad = PHASES
        .replace("name = \"fine_tune\"", "name = \"head\"\nepoch = 3")
        .replace("block5_conv1", "block5_conv9")
        .replace(
            "kind = \"rmsprop\", lr = 1e-5",
            "kind = \"rmsprop\", lr = -1.0",
        )
        .replace("kind = \"cosine\"", "kind = \"cosin\"");
    let e = err(f.plan(&format!("{}{bad}", f.spec())));
    // Load errors first: the unknown key and the unknown schedule kind.
    assert!(e.contains("phase[1].epoch: unknown field `epoch`"), "{e}");
    assert!(
        e.contains(
            "phase[1].schedule.kind: unknown schedule kind \"cosin\" (did you mean \"cosine\"?)"
        ),
        "{e}"
    );
    assert!(e.contains(&f.file()), "{e}");
    let bad = PHASES
        .replace("name = \"fine_tune\"", "name = \"head\"")
        .replace("block5_conv1", "block5_conv9")
        .replace(
            "kind = \"rmsprop\", lr = 1e-5",
            "kind = \"rmsprop\", lr = -1.0",
        )
        .replace("epochs = 3", "epochs = 0");
    let e = err(f.plan(&format!("{}{bad}", f.spec())));
    for want in [
        "phase[1].name: \"head\" is already the name of an earlier phase",
        "phase[1].trainable_from:",
        "block5_conv9",
        "phase[1].optimizer.lr: must be a positive number, got -1",
        "phase[0].epochs: must be at least 1, got 0",
    ] {
        assert!(e.contains(want), "missing {want:?} in {e}");
    }
}

#[test]
fn schedule_early_stopping_and_clipping_values_are_checked() {
    let f = fixture(&["cats", "dogs"]);
    let text = format!(
        "{}clip_grad_norm = 0\nmonitor = \"val_accuracy\"\n",
        f.spec()
    );
    let e = err(f.plan(&text));
    assert!(e.contains("train.monitor: unknown variant `val_accuracy`, expected one of `val_loss`, `val_acc`, `train_loss`, `train_acc`"), "{e}");
    let text = format!(
        "{}clip_grad_norm = 0\n\n[schedule]\nkind = \"reduce_on_plateau\"\nfactor = 1.5\n\n[early_stopping]\npatience = 2\nmin_delta = -1\n",
        f.spec()
    );
    let e = err(f.plan(&text));
    for want in [
        "train.clip_grad_norm: must be a positive number, got 0",
        "schedule.factor: must be in (0, 1), got 1.5",
        "early_stopping.min_delta: must be at least 0, got -1",
    ] {
        assert!(e.contains(want), "missing {want:?} in {e}");
    }
    let e = err(f.plan(&format!(
        "{}\n[early_stopping]\nmin_delta = 0.1\n",
        f.spec()
    )));
    assert!(
        e.contains("early_stopping.patience: missing field `patience`"),
        "{e}"
    );
    let e = err(f.plan(&format!("{}\n[schedule]\nkind = \"step\"\n", f.spec())));
    assert!(
        e.contains("schedule.every_epochs: missing field `every_epochs`"),
        "{e}"
    );
}

#[test]
fn zero_strides_and_pools_are_errors_not_panics() {
    let f = fixture(&["cats", "dogs"]);
    for (layer, key) in [
        (
            "kind = \"conv2d\"\nfilters = 4\nkernel = 1\nstride = 0\npadding = \"same\"",
            "stride",
        ),
        (
            "kind = \"conv2d\"\nfilters = 4\nkernel = 0\npadding = \"same\"",
            "kernel",
        ),
        ("kind = \"max_pool2d\"\npool = 0", "pool"),
        ("kind = \"max_pool2d\"\npool = 1\nstride = 0", "stride"),
    ] {
        let text = f.spec().replacen(
            "[[head.layers]]\nkind = \"flatten\"",
            &format!("[[head.layers]]\n{layer}\n[[head.layers]]\nkind = \"flatten\""),
            1,
        );
        let e = err(f.plan(&text));
        assert!(
            e.contains(&format!("head.layers[0].{key}: must be at least 1, got 0")),
            "{layer}: {e}"
        );
        assert!(
            e.starts_with("1 problem"),
            "only the bad value, no shape noise: {e}"
        );
    }
}

#[test]
fn a_head_too_large_to_train_is_refused_with_its_size() {
    let f = fixture(&["cats", "dogs"]);
    let huge_kernel = f.spec().replacen(
        "[[head.layers]]\nkind = \"flatten\"",
        "[[head.layers]]\nkind = \"conv2d\"\nfilters = 4\nkernel = 100001\npadding = \"same\"\n[[head.layers]]\nkind = \"flatten\"",
        1,
    );
    let e = err(f.plan(&huge_kernel));
    assert!(
        e.contains("head.layers[0]: 20,480,409,602,052 parameters (about 76295 GiB as f32"),
        "{e}"
    );
    assert!(
        e.contains("more than the 1,073,741,824 a head may have"),
        "{e}"
    );
    let wide = f.spec().replacen("units = 16", "units = 4000000000", 1);
    assert_ne!(wide, f.spec(), "the dense layer's units are in the spec");
    let e = err(f.plan(&wide));
    assert!(e.contains("2,052,000,000,000 parameters"), "{e}");
    // An overflow is an error too, not a wrap-around.
    let overflow = f
        .spec()
        .replacen("units = 16", "units = 9223372036854775807", 1);
    let e = err(f.plan(&overflow));
    assert!(e.contains("more parameters than can be counted"), "{e}");
}
