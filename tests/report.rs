//! `runner report` in a real browser: headless Chromium (Debian's `chromium`) loads the page of a
//! tiny real sweep, driven by `tools/report_browser.py` over the DevTools protocol (the Python
//! standard library only). The page must render without a script error or a network request,
//! hold every run, sort and filter as the table says, and show the selected runs' curves, config
//! differences, confusion matrices and misclassified images. The screenshot is kept in
//! `$CARGO_TARGET_TMPDIR`. Where Chromium is missing the tests are skipped with a message, unless
//! `RUNNER_REQUIRE_TOOLS=1`, where that fails them.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cli::*;
use polars::prelude::*;
use serde_json::Value;

/// A 2x2 grid: two rates, two label smoothings.
const GRID: &str =
    "\n[sweep]\n\"optimizer.lr\" = [1e-3, 1e-4]\n\"train.label_smoothing\" = [0.0, 0.1]\n";

fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("RUNNER_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
            "RUNNER_REQUIRE_TOOLS=1 but Chromium is not installed (apt-get install chromium)"
        );
        eprintln!("skipped: no Chromium (apt-get install chromium)");
    }
    found
}

/// What the browser saw of `page`, with the screenshot at `shot`.
fn browse(page: &Path, shot: &Path, extra: &[&str]) -> Value {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/report_browser.py");
    let out = Command::new(python())
        .arg(tool)
        .arg(page)
        .arg(shot)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "report_browser.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(v["errors"], serde_json::json!([]), "script errors");
    assert_eq!(
        v["requests"],
        serde_json::json!([]),
        "a self-contained page asks for nothing"
    );
    let png = std::fs::read(shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a screenshot"
    );
    v
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// `runner results --format json` of `results`: one object per run.
fn per_run(s: &Setup) -> Vec<Value> {
    let out = runner(
        &["results", s.results.to_str().unwrap(), "--format", "json"],
        s.dir.path(),
    );
    ok(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The run ids sorted by `key` as the page sorts numbers: descending (best first) on the first
/// click, ascending on the second; empty values last both ways, ties by run id.
fn sorted(runs: &[Value], key: &str, desc: bool) -> Vec<String> {
    let mut v: Vec<(Option<f64>, String)> = runs
        .iter()
        .map(|r| (r[key].as_f64(), r["run_id"].as_str().unwrap().to_string()))
        .collect();
    v.sort_by(|a, b| match (a.0, b.0) {
        (None, None) => a.1.cmp(&b.1),
        (None, _) => std::cmp::Ordering::Greater,
        (_, None) => std::cmp::Ordering::Less,
        (Some(x), Some(y)) => {
            let c = x.total_cmp(&y);
            if desc { c.reverse() } else { c }.then_with(|| a.1.cmp(&b.1))
        }
    });
    v.into_iter().map(|x| x.1).collect()
}

/// The tiny sweep (four points) and one run that failed writing its model (after its test
/// evaluation, which the page shows too).
fn sweep_and_failure() -> (Setup, String) {
    let s = setup(&[]);
    let text = std::fs::read_to_string(&s.spec).unwrap();
    std::fs::write(&s.spec, format!("{text}{GRID}")).unwrap();
    let broken = s.dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        text.replace("name = \"tiny\"", "name = \"broken\"")
            .replace("epochs = 2", "epochs = 1"),
    )
    .unwrap();
    ok(&runner(
        &[
            "sweep",
            s.spec.to_str().unwrap(),
            "--device",
            "cpu",
            "--results",
            s.results.to_str().unwrap(),
        ],
        s.dir.path(),
    ));
    let failed = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args([broken.to_str().unwrap(), "--device", "cpu"])
        .args(["--results", s.results.to_str().unwrap()])
        .current_dir(s.dir.path())
        .env("RUNNER_CACHE", s.dir.path().join("cache"))
        .env("RUNNER_FAIL_WRITE", "model.json")
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let id = per_run(&s)
        .iter()
        .find(|r| r["status"] == "failed")
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .expect("a failed run");
    (s, id)
}

fn report(s: &Setup, page: &Path) -> String {
    let out = runner(
        &[
            "report",
            s.results.to_str().unwrap(),
            "--out",
            page.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    ok(&out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The confusion matrix of a run's predictions table, rows true and columns predicted, in the
/// order of its `p_<class>` columns.
fn confusion(results: &Path, id: &str) -> (Vec<Vec<u64>>, usize) {
    let path = results.join(format!("{id}.predictions.parquet"));
    let df = ParquetReader::new(std::fs::File::open(path).unwrap())
        .finish()
        .unwrap();
    let classes: Vec<String> = df
        .get_column_names()
        .iter()
        .filter_map(|n| n.strip_prefix("p_").map(str::to_string))
        .collect();
    let at = |c: &str| classes.iter().position(|x| x == c).unwrap();
    let mut m = vec![vec![0; classes.len()]; classes.len()];
    let (labels, predicted) = (strs(&df, "label"), strs(&df, "predicted"));
    for (l, p) in labels.iter().zip(&predicted) {
        m[at(l)][at(p)] += 1;
    }
    let wrong = labels
        .iter()
        .zip(&predicted)
        .filter(|(l, p)| l != p)
        .count();
    (m, wrong)
}

#[test]
fn the_report_of_a_real_sweep_sorts_filters_and_shows_what_was_selected() {
    let Some(chromium) = chromium() else { return };
    let (s, failed) = sweep_and_failure();
    let runs = per_run(&s);
    assert_eq!(runs.len(), 5);
    // Hostile text in a config value: shown as text, never as markup or as the page's script.
    let toml = s.results.join(format!("{failed}.toml"));
    let text = std::fs::read_to_string(&toml).unwrap();
    let hostile = r#"/x/*SCRIPT*/</script><img src=x onerror=alert(1)>/*STYLE*/"#;
    let start = text.find("\ndir = ").unwrap() + 1;
    let end = start + text[start..].find('\n').unwrap();
    std::fs::write(
        &toml,
        format!("{}dir = '{hostile}'{}", &text[..start], &text[end..]),
    )
    .unwrap();
    let page = s.dir.path().join("report.html");
    let said = report(&s, &page);
    assert!(said.contains("5 runs, 5 with a test evaluation"), "{said}");

    // Two points that differ in their rate only.
    let point = |lr: &str, ls: &str| {
        runs.iter()
            .find(|r| {
                r["sweep_point"].as_str().is_some_and(|p| {
                    p == format!("optimizer.lr = {lr}, train.label_smoothing = {ls}")
                })
            })
            .map(|r| r["run_id"].as_str().unwrap().to_string())
            .unwrap()
    };
    let (a, b) = (point("0.001", "0.0"), point("0.0001", "0.0"));
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report.png");
    let v = browse(
        &page,
        &shot,
        &[
            "--chromium",
            chromium.to_str().unwrap(),
            "--sort",
            "best_val_acc",
            "--filter",
            "lr=0.0001",
            "--select",
            &format!("{a},{b}"),
        ],
    );
    eprintln!("screenshot: {}", shot.display());

    // Every run is in the table, and sorting follows the numbers.
    let mut all: Vec<String> = runs
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect();
    let mut shown = ids(&v["run_ids"]);
    shown.sort();
    all.sort();
    assert_eq!(shown, all);
    assert_eq!(v["count"], "5 runs");
    assert_eq!(
        ids(&v["sort"]["first"]),
        sorted(&runs, "best_val_acc", true)
    );
    assert_eq!(v["sort"]["first_aria"], "descending");
    assert_eq!(
        ids(&v["sort"]["second"]),
        sorted(&runs, "best_val_acc", false)
    );
    assert_eq!(v["sort"]["second_aria"], "ascending");

    // The filter matches the config: the two points at lr 1e-4.
    let mut want: Vec<String> = vec![point("0.0001", "0.0"), point("0.0001", "0.1")];
    want.sort();
    let mut got = ids(&v["filter"]["shown"]);
    got.sort();
    assert_eq!(got, want);
    assert_eq!(v["filter"]["count"], "2 of 5 runs shown");

    // The best run is selected at first; then the two ticked.
    let completed: Vec<Value> = runs
        .iter()
        .filter(|r| r["status"] == "completed")
        .cloned()
        .collect();
    let best = sorted(&completed, "best_val_acc", true)[0].clone();
    assert_eq!(ids(&v["initial_selection"]["selected"]), [best]);
    let sel = &v["selection"];
    let mut ticked = ids(&sel["selected"]);
    ticked.sort();
    let mut ab = vec![a.clone(), b.clone()];
    ab.sort();
    assert_eq!(ticked, ab);
    for chart in ["acc", "loss"] {
        assert_eq!(
            ids(&sel["charts"][chart]),
            [
                format!("{a} train"),
                format!("{a} val"),
                format!("{b} train"),
                format!("{b} val")
            ],
            "{chart}"
        );
    }
    assert_eq!(ids(&sel["diff_keys"]), ["optimizer.lr"]);
    for id in [&a, &b] {
        let e = &sel["evaluations"][id.as_str()];
        let (matrix, wrong) = confusion(&s.results, id);
        let page_matrix: Vec<Vec<u64>> = serde_json::from_value(e["matrix"].clone()).unwrap();
        assert_eq!(page_matrix, matrix, "{id}");
        assert_eq!(page_matrix.iter().flatten().sum::<u64>(), 8);
        assert_eq!(e["classes"], serde_json::json!(["cats", "dogs"]));
        assert_eq!(e["thumbnails"], wrong.min(24) as u64, "{id}");
        assert_eq!(e["decoded"], e["thumbnails"], "every thumbnail decodes");
    }

    // The failed run is listed with its error.
    let listed: BTreeMap<String, String> = v["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["run"].as_str().unwrap().to_string(),
                f["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(listed.keys().collect::<Vec<_>>(), [&failed]);
    assert!(
        listed[&failed].contains("injected by RUNNER_FAIL_WRITE"),
        "{listed:?}"
    );

    // A link that names runs (one malformed, one unknown) opens on them; the hostile config
    // value is in their difference, as text: no request for `x`, no script error.
    let hash = format!("runs=%,{failed},{a},nowhere");
    let shot2 = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-link.png");
    let v = browse(
        &page,
        &shot2,
        &["--chromium", chromium.to_str().unwrap(), "--hash", &hash],
    );
    let sel = &v["initial_selection"];
    let mut picked = ids(&sel["selected"]);
    picked.sort();
    let mut want = vec![failed.clone(), a.clone()];
    want.sort();
    assert_eq!(picked, want);
    let note = sel["note"].as_str().unwrap();
    assert!(
        note.contains("Not in this folder") && note.contains("%, nowhere"),
        "{note}"
    );
    let keys = ids(&sel["diff_keys"]);
    assert!(keys.contains(&"data.dir".to_string()), "{keys:?}");
    assert_eq!(sel["hash"], format!("#runs={failed},{a}"));
}

#[test]
fn two_hundred_runs_stay_usable() {
    let Some(chromium) = chromium() else { return };
    let (s, _) = sweep_and_failure();
    // 200 runs: the five real ones, copied under new ids (the table, config and predictions).
    let originals = per_run(&s);
    for k in 0..195 {
        let from = originals[k % originals.len()]["run_id"].as_str().unwrap();
        let id = format!("copy{k:03}-{from}");
        let (mut df, _) =
            runner::results::read_run(&s.results.join(format!("{from}.parquet"))).unwrap();
        let n = df.height();
        df.with_column(Column::new("run_id".into(), vec![id.clone(); n]))
            .unwrap();
        let mut f = std::fs::File::create(s.results.join(format!("{id}.parquet"))).unwrap();
        ParquetWriter::new(&mut f).finish(&mut df).unwrap();
        for ext in ["toml", "predictions.parquet"] {
            let src = s.results.join(format!("{from}.{ext}"));
            if src.exists() {
                std::fs::copy(src, s.results.join(format!("{id}.{ext}"))).unwrap();
            }
        }
    }
    let page = s.dir.path().join("report.html");
    let said = report(&s, &page);
    assert!(
        said.contains("200 runs, 200 with a test evaluation"),
        "{said}"
    );
    let runs = per_run(&s);
    assert_eq!(runs.len(), 200);
    let select: Vec<&str> = runs
        .iter()
        .take(30)
        .map(|r| r["run_id"].as_str().unwrap())
        .collect();
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-200.png");
    let v = browse(
        &page,
        &shot,
        &[
            "--chromium",
            chromium.to_str().unwrap(),
            "--sort",
            "test_acc",
            "--filter",
            "copy19",
            "--select",
            &select.join(","),
        ],
    );
    assert_eq!(v["run_ids"].as_array().unwrap().len(), 200);
    assert_eq!(v["count"], "200 runs");
    assert_eq!(ids(&v["sort"]["first"]), sorted(&runs, "test_acc", true));
    assert_eq!(ids(&v["sort"]["second"]), sorted(&runs, "test_acc", false));
    assert_eq!(v["filter"]["shown"].as_array().unwrap().len(), 5);
    // 30 selected: the first 24 get curves, the note says so.
    assert_eq!(v["selection"]["selected"].as_array().unwrap().len(), 30);
    assert_eq!(
        v["selection"]["charts"]["acc"].as_array().unwrap().len(),
        48
    );
    assert!(
        v["selection"]["note"]
            .as_str()
            .unwrap()
            .contains("the first 24"),
        "{}",
        v["selection"]["note"]
    );
    // How long the page took here (informative; not asserted).
    eprintln!(
        "200 runs, {} KB page: {}",
        std::fs::metadata(&page).unwrap().len() / 1000,
        v["timings_ms"]
    );
}

#[test]
fn bad_folders_and_outputs_exit_2_and_a_broken_file_is_left_out_with_a_note() {
    let (s, _) = sweep_and_failure();
    let page = s.dir.path().join("report.html");
    std::fs::write(&page, "an earlier page").unwrap();
    let cwd = s.dir.path();
    let r = s.results.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["report", "nowhere", "--out", "report.html"],
            "nowhere: cannot read results: no such folder",
        ),
        (&["report", "data", "--out", "report.html"], "no run tables"),
        (
            &["report", r, "--out", "page.png"],
            "--out page.png: the file name must end in .html or .htm",
        ),
        (
            &["report", r, "--out", "no/report.html"],
            "the folder no does not exist",
        ),
        (&["report", r, "--out", "results"], "must end in .html"),
    ];
    for (args, want) in cases {
        let out = runner(args, cwd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(std::fs::read_to_string(&page).unwrap(), "an earlier page");
    }
    // A predictions table cut short and a test image moved away: the page is written, each
    // said once, the rest of the runs as they were.
    let tables = files_with(&s.results, ".predictions.parquet");
    let cut = &tables[0];
    let bytes = std::fs::read(cut).unwrap();
    std::fs::write(cut, &bytes[..bytes.len() / 2]).unwrap();
    for t in &tables[1..] {
        let df = ParquetReader::new(std::fs::File::open(t).unwrap())
            .finish()
            .unwrap();
        for p in strs(&df, "path") {
            let _ = std::fs::remove_file(p);
        }
    }
    let out = runner(&["report", r, "--out", page.to_str().unwrap()], cwd);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&cut.display().to_string()), "{err}");
    assert!(err.contains("could not be read"), "{err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("5 runs, 4 with a test evaluation"),
        "{out:?}"
    );
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        html.contains("\"missing\""),
        "placeholders for the moved images"
    );

    // A folder of tables only: the configs come from the tables' metadata. A parquet file that
    // is not a run table is named on the page and hides nothing.
    for t in files_with(&s.results, ".toml") {
        std::fs::remove_file(t).unwrap();
    }
    let mut stray = polars::df!("x" => [1i64, 2]).unwrap();
    let stray_path = s.results.join("other.parquet");
    ParquetWriter::new(std::fs::File::create(&stray_path).unwrap())
        .finish(&mut stray)
        .unwrap();
    let out = runner(&["report", r, "--out", page.to_str().unwrap()], cwd);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("5 runs"),
        "{out:?}"
    );
    let data = page_data(&page);
    for run in data["runs"].as_array().unwrap() {
        let id = run["run_id"].as_str().unwrap();
        assert_eq!(data["configs"][id]["optimizer.kind"], "\"rmsprop\"", "{id}");
    }
    let notes = data["notes"].to_string();
    assert!(
        notes.contains("other.parquet: not a readable run table"),
        "{notes}"
    );
}

/// The JSON a page carries.
fn page_data(page: &Path) -> Value {
    let html = std::fs::read_to_string(page).unwrap();
    let start = html.find("id=\"runner-data\">").unwrap() + "id=\"runner-data\">".len();
    let end = start + html[start..].find("</script>").unwrap();
    serde_json::from_str(&html[start..end]).unwrap()
}
