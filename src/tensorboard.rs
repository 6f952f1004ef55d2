//! TensorBoard event files for the run in progress (`--tensorboard`), laid out as Keras'
//! `TensorBoard` callback lays them out, so that `tensorboard --logdir results` shows runner's
//! runs beside Keras' ones:
//!
//! - `<dir>/train/`: `epoch_loss`, `epoch_accuracy`, `epoch_learning_rate` per epoch (step: the
//!   run's 1-based epoch, as in the results table); `batch_loss`, `batch_accuracy` (the epoch's
//!   running means, as Keras writes them) and `batch_learning_rate` about ten times an epoch
//!   (step: the run's global training step); `phase` (text) at the first epoch of each phase;
//! - `<dir>/validation/`: `epoch_loss`, `epoch_accuracy` per epoch;
//! - `<dir>/test/`: `epoch_loss`, `epoch_accuracy` once, at the last epoch;
//! - `<dir>/`: the HParams plugin's session start (the run's hyperparameters) and end (its
//!   status), so that the runs of a sweep compare in the HParams dashboard.
//!
//! Each file is a TFRecord stream of `tensorflow.Event` protocol buffers (encoded with prost).
//! A resumed run adds a new file to each folder, as a restarted TensorFlow job does. Writing is
//! best effort: the results table is the truth, so a write error is logged once and the run goes
//! on without TensorBoard.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::metrics::{EpochMetrics, Evaluation};

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a scalar (`simple_value`) or a tensor with its plugin's metadata.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
}

/// `tensorflow.SummaryMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    content: Vec<u8>,
}

/// `tensorflow.TensorProto`, the fields a string scalar and an empty float vector need.
#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    /// `DT_FLOAT` = 1, `DT_STRING` = 7.
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    dim: Vec<Dim>,
}

/// `tensorflow.TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, prost::Message)]
struct Dim {
    #[prost(int64, tag = "1")]
    size: i64,
}

/// `tensorboard.hparams.HParamsPluginData`.
#[derive(Clone, PartialEq, prost::Message)]
struct HParamsPluginData {
    #[prost(int32, tag = "1")]
    version: i32,
    #[prost(oneof = "HParamsData", tags = "3, 4")]
    data: Option<HParamsData>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum HParamsData {
    #[prost(message, tag = "3")]
    SessionStartInfo(SessionStartInfo),
    #[prost(message, tag = "4")]
    SessionEndInfo(SessionEndInfo),
}

/// `tensorboard.hparams.SessionStartInfo`.
#[derive(Clone, PartialEq, prost::Message)]
struct SessionStartInfo {
    #[prost(btree_map = "string, message", tag = "1")]
    hparams: BTreeMap<String, PbValue>,
    #[prost(string, tag = "4")]
    group_name: String,
    #[prost(double, tag = "5")]
    start_time_secs: f64,
}

/// `tensorboard.hparams.SessionEndInfo`.
#[derive(Clone, PartialEq, prost::Message)]
struct SessionEndInfo {
    /// `tensorboard.hparams.Status`.
    #[prost(int32, tag = "1")]
    status: i32,
    #[prost(double, tag = "2")]
    end_time_secs: f64,
}

/// `google.protobuf.Value`, the kinds a hyperparameter takes.
#[derive(Clone, PartialEq, prost::Message)]
struct PbValue {
    #[prost(oneof = "PbKind", tags = "2, 3, 4")]
    kind: Option<PbKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum PbKind {
    #[prost(double, tag = "2")]
    Number(f64),
    #[prost(string, tag = "3")]
    String(String),
    #[prost(bool, tag = "4")]
    Bool(bool),
}

/// A hyperparameter's value.
#[derive(Debug, Clone, PartialEq)]
pub enum HParam {
    /// A number.
    Number(f64),
    /// A string.
    Text(String),
    /// A boolean.
    Bool(bool),
}

/// How a run ended, as the HParams dashboard shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `STATUS_SUCCESS`.
    Success,
    /// `STATUS_FAILURE`.
    Failure,
}

/// One folder's event file, opened on first write.
struct Stream {
    dir: PathBuf,
    file: Option<BufWriter<File>>,
}

impl Stream {
    fn new(dir: PathBuf) -> Self {
        Stream { dir, file: None }
    }

    /// Appends `events` as TFRecords and flushes them, so that a TensorBoard following the
    /// folder sees them at once.
    fn write(&mut self, events: &[Event]) -> io::Result<()> {
        self.append(events)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.dir.display())))
    }

    fn append(&mut self, events: &[Event]) -> io::Result<()> {
        if let Some(e) = crate::io::injected_failure(&self.dir) {
            return Err(e);
        }
        if self.file.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            let path = self.dir.join(file_name());
            let mut f = BufWriter::new(File::create_new(&path)?);
            record(&mut f, &event(0, What::FileVersion("brain.Event:2".into())))?;
            self.file = Some(f);
        }
        let f = self.file.as_mut().expect("opened above");
        for e in events {
            record(f, e)?;
        }
        f.flush()
    }
}

/// `events.out.tfevents.<seconds>.<host>.<pid>.<n>`: TensorFlow's file name, unique per process
/// and per file (a resumed run adds a file beside the earlier ones).
fn file_name() -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        })
        .unwrap_or_else(|| "localhost".into());
    format!(
        "events.out.tfevents.{:010}.{host}.{}.{n}.v2",
        now().floor() as u64,
        std::process::id()
    )
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn event(step: i64, what: What) -> Event {
    Event {
        wall_time: now(),
        step,
        what: Some(what),
    }
}

/// TFRecord framing: length, masked CRC-32C of the length, data, masked CRC-32C of the data.
fn record(out: &mut impl Write, e: &Event) -> io::Result<()> {
    let data = e.encode_to_vec();
    let len = (data.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc(&len).to_le_bytes())?;
    out.write_all(&data)?;
    out.write_all(&masked_crc(&data).to_le_bytes())
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn scalar(tag: &str, value: f64) -> SummaryValue {
    SummaryValue {
        tag: tag.into(),
        simple_value: Some(value as f32),
        ..SummaryValue::default()
    }
}

fn summary(step: i64, values: Vec<SummaryValue>) -> Event {
    event(step, What::Summary(Summary { value: values }))
}

/// A text summary (the text plugin: a string scalar tensor).
fn text(tag: &str, body: &str) -> SummaryValue {
    SummaryValue {
        tag: tag.into(),
        tensor: Some(TensorProto {
            dtype: 7,
            tensor_shape: Some(TensorShape::default()),
            string_val: vec![body.as_bytes().to_vec()],
        }),
        metadata: Some(SummaryMetadata {
            plugin_data: Some(PluginData {
                plugin_name: "text".into(),
                content: Vec::new(),
            }),
        }),
        ..SummaryValue::default()
    }
}

/// An HParams plugin summary, as `tensorboard.plugins.hparams.summary_v2` writes it: the plugin
/// data in the metadata, over an empty float tensor.
fn hparams_summary(tag: &str, data: HParamsData) -> SummaryValue {
    let content = HParamsPluginData {
        version: 0,
        data: Some(data),
    }
    .encode_to_vec();
    SummaryValue {
        tag: tag.into(),
        tensor: Some(TensorProto {
            dtype: 1,
            tensor_shape: Some(TensorShape {
                dim: vec![Dim { size: 0 }],
            }),
            string_val: Vec::new(),
        }),
        metadata: Some(SummaryMetadata {
            plugin_data: Some(PluginData {
                plugin_name: "hparams".into(),
                content,
            }),
        }),
        ..SummaryValue::default()
    }
}

/// The event files of the run in progress.
struct Writers {
    root: Stream,
    train: Stream,
    validation: Stream,
    test: Stream,
    /// Epochs of the history already written (a resumed run starts at its checkpoint's).
    written: usize,
    /// The last global step whose batch values were written.
    last_batch: i64,
    /// The phase of the last epoch written.
    last_phase: Option<usize>,
    /// The first write error; nothing more is written after it.
    failed: bool,
}

impl Writers {
    /// Runs `f`; on its first error logs a warning and stops writing.
    fn guarded(&mut self, f: impl FnOnce(&mut Self) -> io::Result<()>) {
        if self.failed {
            return;
        }
        if let Err(e) = f(self) {
            self.failed = true;
            tracing::warn!(error = %e, "Cannot write TensorBoard events; the run goes on without them.");
        }
    }
}

static ACTIVE: Mutex<Option<Writers>> = Mutex::new(None);

fn with_active(f: impl FnOnce(&mut Writers) -> io::Result<()>) {
    let mut guard = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = guard.as_mut() {
        w.guarded(f);
    }
}

/// TensorBoard events for the run in progress go to `dir` until this is dropped.
pub struct Session(());

impl Drop for Session {
    fn drop(&mut self) {
        *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The last `epoch_loss` and `batch_loss` steps of the event files in `dir` (a resumed run's
/// earlier files): every record up to the first that is truncated or fails its checksum.
fn last_steps(dir: &Path) -> (Option<i64>, Option<i64>) {
    let (mut epoch, mut batch) = (None, None);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (epoch, batch);
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().contains("tfevents") {
            continue;
        }
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        let mut rest = bytes.as_slice();
        while let Some((data, tail)) = next_record(rest) {
            rest = tail;
            let Ok(e) = Event::decode(data) else { break };
            let Some(What::Summary(s)) = e.what else {
                continue;
            };
            for v in &s.value {
                let last = match v.tag.as_str() {
                    "epoch_loss" => &mut epoch,
                    "batch_loss" => &mut batch,
                    _ => continue,
                };
                *last = Some(last.map_or(e.step, |l: i64| l.max(e.step)));
            }
        }
    }
    (epoch, batch)
}

/// Removes the event files directly in `dir` (not in its subfolders).
fn remove_event_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && entry.file_name().to_string_lossy().contains("tfevents") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The first TFRecord of `bytes` and what follows it, if it is whole and its checksums match.
fn next_record(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len_bytes = bytes.get(..8)?;
    let crc = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?);
    if masked_crc(len_bytes) != crc {
        return None;
    }
    let len = usize::try_from(u64::from_le_bytes(len_bytes.try_into().ok()?)).ok()?;
    let end = 12usize.checked_add(len)?;
    let data = bytes.get(12..end)?;
    let crc = u32::from_le_bytes(bytes.get(end..end.checked_add(4)?)?.try_into().ok()?);
    (masked_crc(data) == crc).then(|| (data, &bytes[end + 4..]))
}

/// Starts writing the run's events under `dir`: the HParams session start with `hparams`,
/// grouped by `group` (runs with the same configuration). A resumed run's first
/// `epochs_done` epochs are in its checkpoint; what its earlier event files already hold is not
/// written again (its training is the same, step for step).
pub fn open(dir: &Path, hparams: &[(String, HParam)], group: &str, epochs_done: usize) -> Session {
    let (last_epoch, last_batch) = last_steps(&dir.join("train"));
    // An epoch is written when both its training and validation records are.
    let (last_val, _) = last_steps(&dir.join("validation"));
    let written = last_epoch
        .min(last_val)
        .map_or(0, |e| usize::try_from(e).unwrap_or(0));
    // The root folder holds only the HParams session, written afresh below: TensorBoard keeps
    // the first start and end it reads, so an earlier run's end (a failure that was resumed)
    // must not stay.
    remove_event_files(dir);
    let mut w = Writers {
        root: Stream::new(dir.to_path_buf()),
        train: Stream::new(dir.join("train")),
        validation: Stream::new(dir.join("validation")),
        test: Stream::new(dir.join("test")),
        written: written.min(epochs_done),
        last_batch: last_batch.unwrap_or(0),
        last_phase: None,
        failed: false,
    };
    let info = SessionStartInfo {
        hparams: hparams
            .iter()
            .map(|(k, v)| {
                let kind = match v {
                    HParam::Number(x) => PbKind::Number(*x),
                    HParam::Text(s) => PbKind::String(s.clone()),
                    HParam::Bool(b) => PbKind::Bool(*b),
                };
                (k.clone(), PbValue { kind: Some(kind) })
            })
            .collect(),
        group_name: group.into(),
        start_time_secs: now(),
    };
    w.guarded(|w| {
        let start = hparams_summary(
            "_hparams_/session_start_info",
            HParamsData::SessionStartInfo(info),
        );
        w.root.write(&[summary(0, vec![start])])
    });
    *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
    Session(())
}

/// The epochs of `history` not written yet; `phase_text` describes a phase (by index), written
/// as `phase` at the first epoch of each.
pub fn epochs(history: &[EpochMetrics], phase_text: &dyn Fn(usize) -> String) {
    with_active(|w| {
        for m in history.iter().skip(w.written) {
            let step = m.epoch as i64;
            let mut train = vec![
                scalar("epoch_loss", m.train_loss),
                scalar("epoch_accuracy", m.train_acc),
                scalar("epoch_learning_rate", m.lr),
            ];
            let previous = w.last_phase.or_else(|| {
                m.epoch
                    .checked_sub(2)
                    .and_then(|i| history.get(i))
                    .map(|p| p.phase)
            });
            if previous != Some(m.phase) {
                train.push(text("phase", &phase_text(m.phase)));
            }
            w.train.write(&[summary(step, train)])?;
            let val = vec![
                scalar("epoch_loss", m.val_loss),
                scalar("epoch_accuracy", m.val_acc),
            ];
            w.validation.write(&[summary(step, val)])?;
            w.last_phase = Some(m.phase);
            w.written += 1;
        }
        Ok(())
    });
}

/// The training loss and accuracy so far in epoch `epoch` (1-based, across phases), after
/// `step` of its `steps` steps, and the learning rate of that step.
pub fn batch(epoch: usize, step: usize, steps: usize, loss: f64, acc: f64, lr: f64) {
    let global = (epoch.saturating_sub(1) * steps + step) as i64;
    with_active(|w| {
        if global <= w.last_batch {
            return Ok(());
        }
        w.last_batch = global;
        let values = vec![
            scalar("batch_loss", loss),
            scalar("batch_accuracy", acc),
            scalar("batch_learning_rate", lr),
        ];
        w.train.write(&[summary(global, values)])
    });
}

/// The test split's evaluation, at the run's last epoch.
pub fn test(epoch: usize, eval: Evaluation) {
    with_active(|w| {
        let values = vec![
            scalar("epoch_loss", eval.loss),
            scalar("epoch_accuracy", eval.acc),
        ];
        w.test.write(&[summary(epoch as i64, values)])
    });
}

/// The HParams session end: how the run ended.
pub fn end(ending: Ending) {
    with_active(|w| {
        let info = SessionEndInfo {
            status: match ending {
                Ending::Success => 1,
                Ending::Failure => 2,
            },
            end_time_secs: now(),
        };
        let step = w.written as i64;
        let end = hparams_summary(
            "_hparams_/session_end_info",
            HParamsData::SessionEndInfo(info),
        );
        w.root.write(&[summary(step, vec![end])])
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_with_masked_crc32c() {
        // TensorFlow's own value: the masked CRC of the eight zero bytes of a zero length.
        let mut out = Vec::new();
        let e = Event::default();
        record(&mut out, &e).unwrap();
        assert_eq!(&out[..8], &0u64.to_le_bytes());
        assert_eq!(
            u32::from_le_bytes(out[8..12].try_into().unwrap()),
            masked_crc(&[0u8; 8])
        );
        // crc32c("123456789") = 0xe3069283 (the CRC-32C check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn a_scalar_event_encodes_its_fields() {
        let e = summary(3, vec![scalar("epoch_loss", 0.5)]);
        let back = Event::decode(e.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.step, 3);
        let Some(What::Summary(s)) = back.what else {
            panic!("not a summary")
        };
        assert_eq!(s.value[0].tag, "epoch_loss");
        assert_eq!(s.value[0].simple_value, Some(0.5));
    }
}
