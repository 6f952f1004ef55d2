//! Layering: built-in defaults < file < RUNNER_* environment < --set. In its own test binary,
//! because it sets process environment variables.

mod common;

use runner::assets::Locations;
use runner::plan;
use runner::spec::load;

#[test]
fn environment_overrides_the_file_and_set_overrides_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), &["a", "b"], [1, 1, 1], 8);
    let weights = dir.path().join("w.safetensors");
    std::fs::write(&weights, b"x").unwrap();
    let spec = dir.path().join("exp.toml");
    std::fs::write(&spec, common::spec_text(&data, &weights, "")).unwrap();

    // SAFETY: this test binary has a single test, so no other thread reads the environment.
    unsafe {
        std::env::set_var("RUNNER_OPTIMIZER__LR", "0.25");
        std::env::set_var("RUNNER_TRAIN__EPOCHS", "0");
        std::env::set_var("RUNNER_ASSETS", dir.path());
    }
    let loaded = load::load(&spec, &[]).unwrap();
    assert_eq!(loaded.spec.optimizer.lr(), 0.25);
    let e = plan::build(&loaded, &Locations { mirror: None })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("environment variable RUNNER_TRAIN__EPOCHS: train.epochs: must be at least 1"),
        "{e}"
    );

    let loaded = load::load(&spec, &["optimizer.lr=0.5".into(), "train.epochs=3".into()]).unwrap();
    assert_eq!(loaded.spec.optimizer.lr(), 0.5);
    assert_eq!(loaded.spec.train.epochs, 3);
    // RUNNER_ASSETS is a runner setting, not a spec key: it is not reported as unknown.
    let plan = plan::build(&loaded, &Locations { mirror: None }).unwrap();
    assert_eq!(plan.spec.optimizer.kind(), "rmsprop");
}
