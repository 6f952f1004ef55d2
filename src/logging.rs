//! Tracing: readable lines on the console, and JSON lines in the current run's
//! `results/<run_id>.log.jsonl` (one object per event, fields flattened: `timestamp`, `level`,
//! `message`, `target`, then the event's own fields such as `run`, `epoch`, `val_acc`).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

static RUN_LOG: Mutex<Option<File>> = Mutex::new(None);
/// The epoch's progress bar, on a terminal only.
static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

fn stderr_is_terminal() -> bool {
    io::IsTerminal::is_terminal(&io::stderr())
}

/// Shows the training progress of the current epoch: a bar with steps, images/s, running loss
/// and accuracy and the ETA on a terminal; nothing otherwise (the log has `Training.` events).
pub fn progress(epoch: usize, step: usize, steps: usize, loss: f64, acc: f64, images_per_s: f64) {
    bar(
        format!("epoch {epoch}"),
        step,
        steps,
        format!(
            "loss {}  acc {}  {images_per_s:.1} images/s",
            crate::console::significant(loss),
            crate::console::significant(acc)
        ),
    );
}

/// Sets the terminal's progress bar (nothing when stderr is not a terminal).
fn bar(prefix: String, pos: usize, len: usize, message: String) {
    if !stderr_is_terminal() {
        return;
    }
    let Ok(mut g) = BAR.lock() else { return };
    let bar = g.get_or_insert_with(|| {
        let b = indicatif::ProgressBar::new(len as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    });
    bar.set_length(len as u64);
    bar.set_prefix(prefix);
    bar.set_position(pos as u64);
    bar.set_message(message);
}

/// Removes the progress bar (the epoch is over).
pub fn progress_done() {
    if let Ok(mut g) = BAR.lock()
        && let Some(b) = g.take()
    {
        b.finish_and_clear();
    }
}

/// Console output that steps around the progress bar.
struct Console;

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bar = BAR.lock().ok().and_then(|g| g.clone());
        match bar {
            Some(b) => b.suspend(|| io::stderr().write_all(buf)).map(|_| buf.len()),
            None => io::stderr().write_all(buf).map(|_| buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Writes to the open run log, or nowhere.
pub struct RunLogWriter;

impl Write for RunLogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match RUN_LOG
            .lock()
            .map(|mut g| g.as_mut().map(|f| f.write_all(buf)))
        {
            Ok(Some(r)) => r.map(|_| buf.len()),
            _ => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match RUN_LOG.lock().map(|mut g| g.as_mut().map(|f| f.flush())) {
            Ok(Some(r)) => r,
            _ => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for RunLogWriter {
    type Writer = RunLogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        RunLogWriter
    }
}

/// Sends JSON events to `path` from now on (appending), until [`close_run_log`].
pub fn open_run_log(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // Held while the run writes its log: `runner logs --follow` tells a live run from a dead
    // one (killed, crashed) by whether it can take a shared lock on the file.
    let _ = f.try_lock();
    if let Ok(mut g) = RUN_LOG.lock() {
        *g = Some(f);
    }
    Ok(())
}

/// The run log of the run in progress: JSON events go to its file from [`RunLog::open`] until
/// it is dropped (on every way out of the run, early returns and errors included).
#[must_use = "the run log is closed when this is dropped"]
pub struct RunLog(());

impl RunLog {
    /// Sends JSON events to `path` (appending) until the returned guard is dropped.
    pub fn open(path: &Path) -> io::Result<Self> {
        open_run_log(path)?;
        Ok(Self(()))
    }
}

impl Drop for RunLog {
    fn drop(&mut self) {
        close_run_log();
    }
}

/// Stops writing JSON events to the run log.
pub fn close_run_log() {
    if let Ok(mut g) = RUN_LOG.lock() {
        if let Some(f) = g.as_mut() {
            let _ = f.flush();
        }
        *g = None;
    }
}

/// An event's fields as JSON values, as the run log writes them.
#[derive(Default)]
struct Fields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for Fields {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        // JSON has no NaN or infinity: keep them as text rather than as a blank.
        let v = if value.is_finite() {
            value.into()
        } else {
            format!("{value}").into()
        };
        self.0.insert(field.name().into(), v);
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

/// The console a person reads ([`crate::console`]): short lines, the progress bars on a
/// terminal.
struct Human {
    terminal: bool,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Human {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let f = fields.0;
        let message = f
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_string();
        let level = event.metadata().level().as_str();
        if self.terminal && message == "Extracting features." {
            let n = |k: &str| f.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
            let (done, total) = (n("done"), n("total"));
            let split = f.get("split").and_then(|v| v.as_str()).unwrap_or_default();
            let rate = f
                .get("images_per_s")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            bar(split.to_string(), done, total, format!("{rate} images/s"));
            if done >= total {
                progress_done();
            }
        }
        if let Some(line) = crate::console::line(level, &message, &f, self.terminal) {
            let _ = Console.write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// Installs the console and run-log layers. `RUNNER_LOG` sets the console filter (default info);
/// `RUNNER_LOG_FORMAT=fields` prints every event with all its fields and a timestamp instead of
/// the short lines.
pub fn init() {
    let terminal = stderr_is_terminal();
    let fields = std::env::var("RUNNER_LOG_FORMAT").is_ok_and(|v| v == "fields");
    let filter = || {
        // cubecl says "Tuning <key>" at info for every kernel it autotunes: debug detail.
        let mut filter = EnvFilter::try_from_env("RUNNER_LOG")
            .unwrap_or_else(|_| EnvFilter::new("info,cubecl_runtime::tune=warn"));
        // On a terminal the progress bar shows what the `Training.` events say.
        if terminal && let Ok(d) = "runner::progress=off".parse() {
            filter = filter.add_directive(d);
        }
        filter
    };
    let (full, human) = if fields {
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(|| Console)
            .with_ansi(terminal)
            .with_target(false)
            .compact();
        (Some(layer), None)
    } else {
        (None, Some(Human { terminal }))
    };
    let json = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(RunLogWriter)
        .with_filter(EnvFilter::new("runner=debug"));
    let _ = tracing_subscriber::registry()
        .with(full.with_filter(filter()))
        .with(human.with_filter(filter()))
        .with(json)
        .try_init();
}
