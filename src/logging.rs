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
    if let Ok(mut g) = RUN_LOG.lock() {
        *g = Some(f);
    }
    Ok(())
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

/// Installs the console and run-log layers. `RUNNER_LOG` sets the console filter (default info).
pub fn init() {
    let console = tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_target(false)
        .compact()
        .with_filter(
            EnvFilter::try_from_env("RUNNER_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        );
    let json = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(RunLogWriter)
        .with_filter(EnvFilter::new("runner=debug"));
    let _ = tracing_subscriber::registry()
        .with(console)
        .with(json)
        .try_init();
}
