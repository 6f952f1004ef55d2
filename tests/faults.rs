//! Faults: runs that died, files they left behind.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STARTED: &str = r#"{"timestamp":"2026-12-01T00:00:00Z","level":"INFO","message":"Run started.","run":"r1","target":"runner::cli"}"#;
const FINISHED: &str = r#"{"timestamp":"2026-12-01T00:00:09Z","level":"INFO","message":"Run finished.","run":"r1","target":"runner::cli"}"#;

fn follow(results: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_runner"))
        .args([
            "logs",
            "r1",
            "--follow",
            "--results",
            results.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn following_the_log_of_a_killed_run_returns_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("r1.log.jsonl");
    // A non-UTF-8 line among the events: shown, not the end of the log.
    let mut bytes = format!("{STARTED}\n").into_bytes();
    bytes.extend_from_slice(b"\xff\xfe damaged\n");
    std::fs::write(&log, &bytes).unwrap();
    let mut child = follow(dir.path());
    let status = wait(&mut child, Duration::from_secs(20)).expect("--follow of a dead run returns");
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Run started."), "{text}");
    assert!(text.contains("damaged"), "{text}");
    assert!(text.contains("the run is not running"), "{text}");
}

#[test]
fn following_a_live_run_waits_for_its_last_event() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("r1.log.jsonl");
    std::fs::write(&log, format!("{STARTED}\n")).unwrap();
    // This test is the writer: it holds the lock a running run holds.
    let mut writer = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    writer.try_lock().unwrap();
    let mut child = follow(dir.path());
    assert!(
        wait(&mut child, Duration::from_millis(1500)).is_none(),
        "still following while the writer lives"
    );
    writeln!(writer, "{FINISHED}").unwrap();
    writer.flush().unwrap();
    let status = wait(&mut child, Duration::from_secs(20)).expect("returns after the last event");
    assert!(status.success());
    let text = String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned();
    assert!(text.contains("Run finished."), "{text}");
    assert!(!text.contains("not running"), "{text}");
}

#[test]
fn temporaries_a_killed_writer_left_are_removed_when_the_run_is_resumed() {
    let s = common::cli::setup(&[]);
    common::cli::ok(&common::cli::run(&s, &[]));
    let id = common::cli::files_with(&s.results, ".parquet")[0]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // What write_atomic leaves when its process is killed between create and rename.
    let in_run = s.results.join(&id).join(".last.ckpt.Xa9b2c.tmp");
    let beside = s.results.join(format!(".{id}.parquet.Qw3e4r.tmp"));
    let other = s.results.join(".other-run.parquet.Zz9y8x.tmp");
    for p in [&in_run, &beside, &other] {
        std::fs::write(p, vec![0u8; 4096]).unwrap();
    }
    let out = common::cli::runner(
        &["resume", &id, "--results", s.results.to_str().unwrap()],
        s.dir.path(),
    );
    // The run had completed: nothing to resume, but its leftovers are gone.
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already completed"));
    assert!(
        !in_run.exists() && !beside.exists(),
        "the run's temporaries are removed"
    );
    assert!(other.exists(), "another run's are not touched");
    // The run's own files are intact.
    assert!(s.results.join(&id).join("last.ckpt").is_file());
    assert!(s.results.join(format!("{id}.parquet")).is_file());
}
