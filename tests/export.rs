//! `runner export --format onnx`: the exported file agrees with runner's own predictions, as
//! tract runs it (in `runner export`), and the ONNX project's checker and ONNX Runtime accept it
//! (`tools/onnx_check.py` through `$RUNNER_PYTHON`, else `python3`, with `onnx` and
//! `onnxruntime`; CI installs them; with `RUNNER_REQUIRE_TOOLS=1` a missing one fails the test).

mod common;

use std::path::Path;
use std::process::Output;

use common::cli::*;
use serde_json::Value;

fn export(s: &Setup, id: &str, extra: &[&str]) -> Output {
    let mut args = vec!["export", id, "--results", s.results.to_str().unwrap()];
    args.extend_from_slice(extra);
    runner(&args, s.dir.path())
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the ONNX checker and ONNX Runtime say of `model` (`None` where they are not installed
/// and need not be).
fn onnx_check(model: &Path) -> Option<Value> {
    python_tool("onnx, onnxruntime", "onnx_check.py", &[model])
}

/// The agreement line's numbers: (images, same labels, largest difference).
fn agreement(out: &Output) -> (usize, usize, f64) {
    let text = stdout(out);
    let line = text
        .lines()
        .find(|l| l.starts_with("checked with tract"))
        .unwrap_or_else(|| panic!("no agreement line in {text}"));
    let number_after = |key: &str| -> String {
        let at = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
        line[at..]
            .split([' ', ',', '('])
            .find(|w| !w.is_empty())
            .unwrap()
            .to_string()
    };
    (
        number_after(" on ").parse().unwrap(),
        number_after("labels agree on ").parse().unwrap(),
        number_after("largest probability difference ")
            .parse()
            .unwrap(),
    )
}

const CONV_HEAD: &str = r#"
[[head.layers]]
kind = "conv2d"
filters = 8
kernel = 1
activation = "relu"
[[head.layers]]
kind = "max_pool2d"
pool = 1
[[head.layers]]
kind = "flatten"
[[head.layers]]
kind = "dropout"
rate = 0.5
[[head.layers]]
kind = "dense"
units = 1
activation = "sigmoid"
"#;

#[test]
fn a_vgg_run_exports_and_tract_agrees_with_runner_on_every_validation_image() {
    // caffe preprocessing (a channel swap and a shift in the graph), a convolution, a pool, a
    // dropout and a sigmoid output; the last block fine-tuned.
    let s = setup(&[(
        "trainable_from = \"none\"",
        "trainable_from = \"block5_conv3\"",
    )]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    let head_at = text.find("[[head.layers]]").unwrap();
    let optimizer_at = text.find("[optimizer]").unwrap();
    let text = format!("{}{CONV_HEAD}\n{}", &text[..head_at], &text[optimizer_at..]);
    std::fs::write(&s.spec, text).unwrap();
    ok(&run(&s, &[]));
    let (id, _) = only_run(&s.results);

    let out = export(&s, &id, &[]);
    ok(&out);
    let model = s.results.join(&id).join("model.onnx");
    assert!(
        stdout(&out).starts_with(&format!("{}: ONNX (opset 13)", model.display())),
        "{}",
        stdout(&out)
    );
    let (images, same, diff) = agreement(&out);
    assert_eq!(
        (images, same),
        (8, 8),
        "every validation image, every label"
    );
    assert!(diff <= 1e-4, "{diff}");

    if let Some(check) = onnx_check(&model) {
        let meta = &check["metadata"];
        assert_eq!(meta["runner.classes"], r#"["cats","dogs"]"#);
        assert_eq!(meta["runner.run_id"], id.as_str());
        assert!(
            meta["runner.preprocess"]
                .as_str()
                .unwrap()
                .starts_with("caffe (in the graph")
        );
        assert_eq!(check["producer"], "runner");
        assert_eq!(
            check["input"][1].as_array().unwrap()[1..],
            ["32", "32", "3"]
        );
        assert_eq!(check["result_shape"], serde_json::json!([2, 2]));
        for sum in check["row_sums"].as_array().unwrap() {
            assert!((sum.as_f64().unwrap() - 1.0).abs() < 1e-5, "{check}");
        }
    }

    // The best checkpoint, to a file named on the command line.
    let elsewhere = s.dir.path().join("deploy.onnx");
    let out = export(
        &s,
        &id,
        &[
            "--weights",
            "best",
            "--out",
            elsewhere.to_str().unwrap(),
            "--limit",
            "3",
        ],
    );
    ok(&out);
    assert_eq!(agreement(&out).0, 3);
    assert!(elsewhere.is_file());
}

/// A three-class run of `backbone` on torchvision-named weights: a global-average head with a
/// softmax, test-time flips, its last block fine-tuned.
fn three_class_run(backbone: &str, cutoff: &str, preprocess: &str) -> (Setup, String) {
    let s = setup(&[]);
    let data = common::make_dataset(&s.dir.path().join("data3"), &["a", "b", "c"], [4, 2, 2], 64);
    let weights = s.dir.path().join(format!("{backbone}.safetensors"));
    common::write_torchvision_weights(&weights, &common::torchvision_keys(backbone), 5);
    let text = common::spec_text(
        &data,
        &weights,
        "test_time_augmentation = \"horizontal_flip\"\n",
    )
    .replace("name = \"vgg16\"", &format!("name = \"{backbone}\""))
    .replace(
        "preprocess = \"caffe\"",
        &format!("preprocess = \"{preprocess}\""),
    )
    .replace("image_size = [32, 32]", "image_size = [64, 48]")
    .replace(
        "trainable_from = \"none\"",
        &format!("trainable_from = \"{cutoff}\""),
    )
    .replace("kind = \"flatten\"", "kind = \"global_average_pool\"")
    .replace(
        "units = 1\nactivation = \"sigmoid\"",
        "units = 3\nactivation = \"softmax\"",
    )
    .replace("binary_crossentropy", "categorical_crossentropy");
    std::fs::write(&s.spec, text).unwrap();
    ok(&run(&s, &[]));
    let (id, _) = only_run(&s.results);
    (s, id)
}

#[test]
fn mobilenet_v2_and_resnet50_runs_with_three_classes_and_flips_export_and_agree() {
    for (backbone, cutoff, preprocess) in [
        ("mobilenet_v2", "features.17", "torch"),
        ("resnet50", "layer4.2", "rescale"),
    ] {
        let (s, id) = three_class_run(backbone, cutoff, preprocess);
        let out = export(&s, &id, &[]);
        ok(&out);
        let (images, same, diff) = agreement(&out);
        assert_eq!((images, same), (6, 6), "{backbone}");
        assert!(diff <= 1e-4, "{backbone}: {diff}");
        if let Some(check) = onnx_check(&s.results.join(&id).join("model.onnx")) {
            assert_eq!(
                check["result_shape"],
                serde_json::json!([2, 3]),
                "{backbone}"
            );
            assert_eq!(
                check["input"][1].as_array().unwrap()[1..],
                ["64", "48", "3"]
            );
            assert!(
                check["metadata"]["runner.test_time_augmentation"]
                    .as_str()
                    .unwrap()
                    .starts_with("horizontal_flip")
            );
        }
    }
}

#[test]
fn export_names_what_is_missing_and_writes_nothing_then() {
    let s = setup(&[]);
    let out = export(&s, "no_such_run", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run no_such_run"));

    ok(&run(&s, &[]));
    let (id, _) = only_run(&s.results);
    let missing = s.dir.path().join("nowhere").join("m.onnx");
    let out = export(&s, &id, &["--out", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--out") && err.contains("nowhere"), "{err}");

    // Only an .onnx file is written; at least one image is checked.
    let bpk = s.results.join(&id).join("model.bpk");
    let before = std::fs::read(&bpk).unwrap();
    let out = export(&s, &id, &["--out", bpk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must end in .onnx"));
    assert_eq!(
        std::fs::read(&bpk).unwrap(),
        before,
        "the model is untouched"
    );
    // A folder nothing can be written in (even as root).
    let out = export(&s, &id, &["--out", "/proc/runner-model.onnx"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--out /proc/runner-model.onnx: cannot write"),
        "{err}"
    );
    let out = export(&s, &id, &["--limit", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--limit 0"));
    let out = export(&s, &id, &["--set", "data.image_size=[64,64]"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--set does not apply"));
    let empty = s.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("broken.jpg"), b"not a jpeg").unwrap();
    let out = export(&s, &id, &["--images", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("none of the images could be read") && err.contains("broken.jpg"),
        "{err}"
    );
    assert!(!s.results.join(&id).join("model.onnx").exists());
    assert!(!s.results.join(&id).join("model.unchecked.onnx").exists());

    // The validation split gone: the check needs images, named with --images.
    std::fs::rename(s.data.join("validation"), s.dir.path().join("moved")).unwrap();
    let out = export(&s, &id, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("validation images") && err.contains("--images"),
        "{err}"
    );
    assert!(!s.results.join(&id).join("model.onnx").exists());
    let moved = s.dir.path().join("moved");
    // A trailing slash (a completed folder name); an unreadable image among good ones is named
    // and left out.
    std::fs::copy(empty.join("broken.jpg"), moved.join("broken.jpg")).unwrap();
    let out = export(
        &s,
        &format!("{id}/"),
        &["--images", moved.to_str().unwrap()],
    );
    ok(&out);
    assert_eq!(agreement(&out).0, 8);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.jpg") && err.contains("left out of the check"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(s.results.join(&id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".onnx"))
        .collect();
    assert_eq!(
        left,
        ["model.onnx"],
        "the checked file, renamed; no temporary left"
    );
}

#[test]
fn an_unfinished_run_exports_its_last_checkpoint_and_says_so() {
    let s = setup(&[]);
    ok(&run(&s, &[]));
    let (id, _) = only_run(&s.results);
    // What a run still training (or interrupted) has: checkpoints, no model.json.
    std::fs::remove_file(s.results.join(&id).join("model.json")).unwrap();
    let out = export(&s, &id, &[]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has not finished") && err.contains("last checkpoint"),
        "{err}"
    );
    if let Some(check) = onnx_check(&s.results.join(&id).join("model.onnx")) {
        assert_eq!(check["metadata"]["runner.weights"], "last");
    }
}
