//! The README's Slurm job array on a real Slurm: `tools/slurm_check.sh` stands up a one-node
//! cluster on this machine (Debian's slurmctld, slurmd and munge; it installs them with apt-get
//! when missing, so it needs root), submits the README's job script with `sbatch --array` over a
//! tiny grid, kills one array task while it trains, resubmits the array and checks that every
//! point ran once, that the killed run was resumed under its id and that `runner results` shows
//! every point completed. Where Slurm cannot be set up (not root, no apt-get) the test is skipped
//! with a message, unless `RUNNER_REQUIRE_TOOLS=1`, where that fails it.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::cli::{files_with, strs};

/// The script's exit status when Slurm cannot be set up here.
const NO_SLURM: i32 = 3;

/// Six points (three rates, two seeds) of ten short epochs that train `block5_conv3`, so that an
/// array task can be caught, and killed, while its run trains.
const GRID: &str = r#"
[sweep]
"optimizer.lr" = [1e-4, 3e-5, 1e-5]
"experiment.seed" = [1, 2]
"#;

fn require_tools() -> bool {
    std::env::var_os("RUNNER_REQUIRE_TOOLS").is_some_and(|v| v == "1")
}

#[test]
fn the_readme_slurm_array_runs_every_point_once_and_resumes_a_killed_task() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), &["cats", "dogs"], [8, 4, 4], 40);
    let weights = dir.path().join("w.safetensors");
    common::write_vgg_weights(&weights, runner::backbone::find("vgg16").unwrap(), 9);
    let text = common::spec_text(&data, &weights, GRID)
        .replace(
            r#"trainable_from = "none""#,
            r#"trainable_from = "block5_conv3""#,
        )
        .replace("epochs = 2", "epochs = 10");
    let experiments = dir.path().join("experiments");
    std::fs::create_dir_all(&experiments).unwrap();
    std::fs::write(experiments.join("grid.toml"), text).unwrap();
    let results = dir.path().join("results");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/slurm_check.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_runner"))
        .arg(&experiments)
        .arg(&results)
        .env_remove("RUNNER_ASSETS")
        .env_remove("RUNNER_RESULTS")
        .env("RUNNER_CACHE", dir.path().join("cache"))
        .output()
        .expect("run bash tools/slurm_check.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    if out.status.code() == Some(NO_SLURM) {
        assert!(
            !require_tools(),
            "RUNNER_REQUIRE_TOOLS=1 but Slurm cannot be set up here:\n{stderr}"
        );
        eprintln!("skipped: {}", stderr.trim());
        return;
    }
    assert!(
        out.status.success(),
        "tools/slurm_check.sh: exit {:?}\n{stderr}",
        out.status.code()
    );
    eprintln!(
        "tools/slurm_check.sh passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );

    // What the script checked, read back here through the library: six run tables, one per
    // point, every one completed.
    let tables = files_with(&results, ".parquet");
    let mut points = BTreeSet::new();
    for t in &tables {
        let df = runner::results::read_run(t).unwrap().0;
        assert!(
            strs(&df, "status").iter().all(|s| s == "completed"),
            "{t:?}"
        );
        let point = strs(&df, "sweep_point");
        assert!(!point[0].is_empty(), "{t:?} has no sweep_point");
        assert!(
            points.insert(point[0].clone()),
            "{t:?}: a second run of {}",
            point[0]
        );
    }
    assert_eq!(points.len(), 6, "{points:?}");
}
