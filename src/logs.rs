//! `runner logs <run_id> [--follow]`: a run's JSON-lines log, one readable line per event. The
//! file itself stays one JSON object per line.

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

/// Fields shown in the line's head rather than as `key=value`.
const HEAD: [&str; 5] = ["timestamp", "level", "message", "target", "run"];

/// One event as a readable line: `HH:MM:SS LEVEL message key=value ...`.
pub fn render(line: &str) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let s = |k: &str| map.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let time = s("timestamp").get(11..19).unwrap_or_default();
    let mut out = format!("{time} {:<5} {}", s("level"), s("message"));
    for (k, v) in &map {
        if HEAD.contains(&k.as_str()) {
            continue;
        }
        let v = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() && f.abs() >= 1e-3 => format!("{f:.4}"),
                _ => n.to_string(),
            },
            other => other.to_string(),
        };
        out += &format!(" {k}={v}");
    }
    out
}

/// Whether an event ends a run (finished, failed, interrupted or diverged).
fn is_last(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .is_some_and(|m| {
            m == "Run finished."
                || m == "Run failed."
                || m.starts_with("Interrupted")
                || m.starts_with("Training diverged")
        })
}

/// Writes the log at `path` to `out`; with `follow`, keeps reading new events until the run
/// ends, or until no process writes the log any more (a run killed or crashed: its writer's lock
/// on the file is gone), which it then says.
pub fn show(path: &Path, follow: bool, out: &mut impl Write) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut pos = 0u64;
    loop {
        // Whether a writer holds the file, asked before reading, so that nothing it wrote
        // before it died is missed.
        let writer_gone = follow && file.try_lock_shared().is_ok();
        if writer_gone {
            let _ = file.unlock();
        }
        file.seek(SeekFrom::Start(pos))?;
        let mut reader = BufReader::new(&file);
        let mut ended = false;
        loop {
            let mut raw = Vec::new();
            let n = reader.read_until(b'\n', &mut raw)?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            if !raw.ends_with(b"\n") {
                // A line still being written: read it whole next time.
                pos -= n as u64;
                break;
            }
            // A line that is not UTF-8 (a damaged file) is shown with replacement characters,
            // not the end of the log.
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            writeln!(out, "{}", render(line))?;
            ended = is_last(line);
        }
        out.flush()?;
        if !follow || ended {
            return Ok(());
        }
        if writer_gone {
            writeln!(
                out,
                "(the run is not running: its log has no final event and no process writes it; it was killed or crashed; `runner resume` continues it from its last checkpoint)"
            )?;
            out.flush()?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
