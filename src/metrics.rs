//! What a run measures: per-epoch metrics, evaluations, predictions and the run's status. The
//! types both `train` (which produces them) and `results` (which records them) use; imports
//! nothing of runner.

use serde::{Deserialize, Serialize};

/// Metrics of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number, counted across phases.
    pub epoch: usize,
    /// Index of the phase in `Plan::phases`.
    pub phase: usize,
    /// Mean training loss over the epoch's batches (dropout active).
    pub train_loss: f64,
    /// Training accuracy over the epoch.
    pub train_acc: f64,
    /// Validation loss.
    pub val_loss: f64,
    /// Validation accuracy.
    pub val_acc: f64,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Wall time of the epoch, training and validation.
    pub seconds: f64,
}

/// Loss and accuracy on one split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean loss.
    pub loss: f64,
    /// Accuracy.
    pub acc: f64,
}

/// The state of a run, as stored with every result row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Training (the results are rewritten after every epoch).
    #[default]
    Running,
    /// Every phase finished (or stopped early).
    Completed,
    /// Stopped by Ctrl-C; `runner resume` continues it.
    Interrupted,
    /// The training loss became NaN or infinite.
    Diverged,
    /// The run stopped with an error (recorded by a sweep, which goes on).
    Failed,
}

impl Status {
    /// The name stored in the results.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Interrupted => "interrupted",
            Self::Diverged => "diverged",
            Self::Failed => "failed",
        }
    }
}

/// Sums over the steps of an unfinished epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    /// Sum of batch losses times batch sizes.
    pub loss_sum: f64,
    /// Correct predictions.
    pub correct: usize,
    /// Examples seen.
    pub seen: usize,
    /// Seconds spent.
    pub seconds: f64,
}

/// One test image's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The image file.
    pub path: std::path::PathBuf,
    /// True class index.
    pub label: usize,
    /// Probability of each class.
    pub probabilities: Vec<f32>,
}

/// What a results table records of a run: its epochs, status, skipped images and error.
#[derive(Debug, Clone, Copy)]
pub struct RunRecord<'a> {
    /// Every finished epoch.
    pub history: &'a [EpochMetrics],
    /// Run status.
    pub status: Status,
    /// Images left out by `data.on_bad_image = "skip"`.
    pub skipped_images: usize,
    /// What stopped a diverged or failed run.
    pub error: Option<&'a str>,
}

/// The best validation accuracy of `history` (NaN when no epoch has a finite one).
pub fn best_val_acc(history: &[EpochMetrics]) -> f64 {
    best_of(history.iter().map(|m| m.val_acc)).unwrap_or(f64::NAN)
}

/// The largest finite value (a diverged epoch's NaN is no best), if any.
pub fn best_of(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.max(v))))
}

/// The predicted class: the index of the highest probability (the first of equals; 0 when
/// there are none).
pub fn predicted_class(probabilities: &[f32]) -> usize {
    probabilities
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
        .0
}
