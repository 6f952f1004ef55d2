//! What a person reads on the console while a run goes: one short line per event that matters,
//! as Keras prints them (`Epoch 3/30  12s  loss 0.2710  acc 0.8910  val_loss 0.2430  val_acc
//! 0.9020`), numbers to four significant digits, the run id once, no timestamps. The JSON-lines
//! run log keeps every field of every event, with its time; `RUNNER_LOG_FORMAT=fields` puts the
//! full `key=value` lines back on the console.
//!
//! Pure formatting: an event's level, message and fields (as JSON values) in, a line out.

use serde_json::{Map, Value};

/// Fields a generic INFO line leaves out: the run id (named once, when the run starts) and
/// cache keys (kept for the run log). Warnings and errors keep them.
const QUIET: [&str; 3] = ["run", "key", "target"];

/// The console line of one event, or `None` for an event the console leaves to the run log
/// (or, on a terminal, to the progress bar). `terminal`: stderr is a terminal, where the
/// training and extraction progress is a bar rather than lines.
pub fn line(level: &str, message: &str, f: &Map<String, Value>, terminal: bool) -> Option<String> {
    let s = |k: &str| text(f.get(k));
    let n = |k: &str| f.get(k).and_then(Value::as_f64);
    // `text` where the boolean field `k` is true.
    let when = |k: &str, text: &'static str| {
        if f.get(k) == Some(&Value::Bool(true)) {
            text
        } else {
            ""
        }
    };
    let line = match (level, message) {
        ("INFO", "Run started.") => {
            format!(
                "Run {} ({}) on {}{}",
                s("run"),
                s("file"),
                s("device"),
                when("resuming", ", resuming")
            )
        }
        ("INFO", "Run resumed.") => format!(
            "Resumed after {} epochs (step {}), in phase {}",
            s("epochs_done"),
            s("step"),
            s("phase")
        ),
        ("INFO", "Phase started.") => match s("phase").as_str() {
            "load_data" => format!("Reading images from {}", s("dir")),
            "build_model" => format!("Building the model ({})", s("weights")),
            phase => format!(
                "Phase {phase}: {} epochs, trainable from {}, {} lr {}, {} schedule{}",
                s("epochs"),
                s("trainable_from"),
                s("optimizer"),
                n("lr").map(short).unwrap_or_default(),
                s("schedule"),
                when("augmented", ", augmented")
            ),
        },
        ("INFO", "Phase finished.") => match s("phase").as_str() {
            "load_data" => {
                let skipped = n("skipped_images").unwrap_or(0.0);
                let skipped = if skipped > 0.0 {
                    format!(", {skipped} skipped")
                } else {
                    String::new()
                };
                format!(
                    "Images read in {}{skipped}",
                    duration(n("seconds").unwrap_or(0.0))
                )
            }
            phase => format!(
                "Phase {phase} finished in {}",
                duration(n("seconds").unwrap_or(0.0))
            ),
        },
        ("INFO", "Split decoded.") => {
            let bad = n("bad").unwrap_or(0.0);
            let bad = if bad > 0.0 {
                format!(" ({bad} bad)")
            } else {
                String::new()
            };
            format!("  {}: {} images{bad}", s("split"), s("images"))
        }
        ("INFO", "Feature cache hit.") => {
            format!("  {}: activations at the cutoff from the cache", s("split"))
        }
        ("INFO", "Feature cache miss.") => {
            format!("  {}: computing the activations at the cutoff", s("split"))
        }
        ("INFO", "Feature cache written." | "Backbone weights loaded.") => return None,
        // On a terminal the bar shows the extraction; its last event stays as a line.
        ("INFO", "Extracting features.") if terminal && s("done") != s("total") => return None,
        ("INFO", "Extracting features.") => format!(
            "  {}: {}/{} images, {} images/s",
            s("split"),
            s("done"),
            s("total"),
            s("images_per_s")
        ),
        ("INFO", "Training.") if terminal => return None,
        ("INFO", "Training.") => format!(
            "  {}/{}  loss {}  acc {}  {} images/s",
            s("step"),
            s("steps"),
            s("loss"),
            s("acc"),
            s("images_per_s")
        ),
        ("INFO", "Epoch finished.") => {
            let (total, phase_epochs) = (s("epochs"), s("phase_epochs"));
            let phase = if !total.is_empty() && total != phase_epochs {
                format!("  {} {}/{phase_epochs}", s("phase"), s("phase_epoch"))
            } else {
                String::new()
            };
            let of = if total.is_empty() {
                phase_epochs
            } else {
                total
            };
            let steps = s("steps");
            let steps = if steps.is_empty() {
                String::new()
            } else {
                format!("  {steps}/{steps}")
            };
            format!(
                "Epoch {}/{of}{phase}{steps}  {}  loss {}  acc {}  val_loss {}  val_acc {}  lr {}",
                s("epoch"),
                duration(n("seconds").unwrap_or(0.0)),
                s("train_loss"),
                s("train_acc"),
                s("val_loss"),
                s("val_acc"),
                n("lr").map(short).unwrap_or_default()
            )
        }
        ("INFO", "Test evaluation finished.") => {
            format!("Test: loss {}  acc {}", s("test_loss"), s("test_acc"))
        }
        ("INFO", "New head.") => format!(
            "New head for phase {}: {} ({} parameters)",
            s("phase"),
            s("head"),
            s("params")
        ),
        ("INFO", "Run finished.") => format!(
            "Finished in {}; the model is in {}",
            duration(n("seconds").unwrap_or(0.0)),
            s("model")
        ),
        // The error itself is printed once, by the command, as `error: ...`.
        ("ERROR", "Run failed.") => return None,
        _ => generic(level, message, f),
    };
    Some(line)
}

/// Any other event: `message key=value ...`, warnings and errors marked, the run id and cache
/// keys left out.
pub fn generic(level: &str, message: &str, f: &Map<String, Value>) -> String {
    let mark = match level {
        "ERROR" => "error: ",
        "WARN" => "warning: ",
        "DEBUG" => "debug: ",
        "TRACE" => "trace: ",
        _ => "",
    };
    // A record of the `log` crate (wgpu, cubecl): its origin as a prefix, not four fields.
    let origin = match f.get("log.target").and_then(Value::as_str) {
        Some(t) => format!("{t}: "),
        None => String::new(),
    };
    let mut out = format!("{mark}{origin}{message}");
    // The file first: it is what a person acts on (the fields come sorted by name).
    let ordered = f
        .iter()
        .filter(|(k, _)| *k == "file")
        .chain(f.iter().filter(|(k, _)| *k != "file"));
    for (k, v) in ordered {
        if k == "message"
            || k.starts_with("log.")
            || (QUIET.contains(&k.as_str()) && level == "INFO")
        {
            continue;
        }
        out += &format!(" {k}={}", text(Some(v)));
    }
    out
}

/// A field as a person reads it: numbers to four significant digits, strings as they are.
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_f64() => n.as_f64().map(significant).unwrap_or_default(),
        Some(other) => other.to_string(),
    }
}

/// `v` to four significant digits: `0.8950`, `12.35`, `2.000e-5`, `1.235e4`.
pub fn significant(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    // The exponent after rounding to four digits (0.99996 is 1.000, not 0.10000e1).
    let e = format!("{v:.3e}");
    let exponent: i32 = e
        .split_once('e')
        .and_then(|(_, x)| x.parse().ok())
        .unwrap_or(0);
    if (-3..4).contains(&exponent) {
        let decimals = (3 - exponent) as usize;
        format!("{v:.decimals$}")
    } else {
        e
    }
}

/// A rate as it is written in a spec: `0.001`, `2e-5` (trailing zeros left out).
pub fn short(v: f64) -> String {
    let s = significant(v);
    match s.split_once('e') {
        Some((m, e)) => {
            let m = m.trim_end_matches('0').trim_end_matches('.');
            format!("{m}e{e}")
        }
        None if s.contains('.') => s.trim_end_matches('0').trim_end_matches('.').to_string(),
        None => s,
    }
}

/// Seconds as a person reads them: `0.45s`, `12s`, `3m 05s`, `1h 02m`.
pub fn duration(seconds: f64) -> String {
    if seconds < 9.995 {
        return format!("{seconds:.2}s");
    }
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}
