//! Learning-rate schedules, early stopping and best-epoch tracking: small state machines whose
//! state goes into every checkpoint, so that a resumed run makes the same decisions.

use serde::{Deserialize, Serialize};

use crate::spec::{
    CosineScheduleSpec, EarlyStoppingSpec, ExponentialScheduleSpec, Monitor, PlateauScheduleSpec,
    ScheduleSpec, StepScheduleSpec,
};

use super::EpochMetrics;

/// The value of `monitor` in an epoch's metrics.
pub fn metric(m: &EpochMetrics, monitor: Monitor) -> f64 {
    match monitor {
        Monitor::ValLoss => m.val_loss,
        Monitor::ValAcc => m.val_acc,
        Monitor::TrainLoss => m.train_loss,
        Monitor::TrainAcc => m.train_acc,
    }
}

/// The best value of a metric seen so far, and how many epochs ago it was.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tracker {
    /// Best value so far.
    pub best: Option<f64>,
    /// Epoch (run-wide, 1-based) of the best value.
    pub best_epoch: usize,
    /// Epochs since the last improvement.
    pub wait: usize,
}

impl Tracker {
    /// Records `value` of `epoch`; true when it improves on the best by more than `min_delta`
    /// (Keras' rule). A NaN never improves.
    pub fn update(&mut self, value: f64, epoch: usize, monitor: Monitor, min_delta: f64) -> bool {
        let better = match self.best {
            _ if value.is_nan() => false,
            None => true,
            Some(b) if monitor.higher_is_better() => value > b + min_delta,
            Some(b) => value < b - min_delta,
        };
        if better {
            self.best = Some(value);
            self.best_epoch = epoch;
            self.wait = 0;
        } else {
            self.wait += 1;
        }
        better
    }
}

/// Schedule state that changes with the metrics (reduce-on-plateau).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// Product of the reductions so far.
    pub factor: f64,
    /// The monitored metric.
    pub tracker: Tracker,
    /// Epochs of cooldown left.
    pub cooldown: usize,
}

impl Default for ScheduleState {
    fn default() -> Self {
        Self {
            factor: 1.0,
            tracker: Tracker::default(),
            cooldown: 0,
        }
    }
}

/// A phase's learning rate as a function of its optimizer step.
#[derive(Debug, Clone)]
pub struct Schedule {
    spec: ScheduleSpec,
    base_lr: f64,
    steps_per_epoch: usize,
    total_steps: usize,
    default_monitor: Monitor,
    /// Checkpointed state.
    pub state: ScheduleState,
}

impl Schedule {
    /// A schedule starting from `base_lr` over `epochs` epochs of `steps_per_epoch` steps.
    pub fn new(
        spec: &ScheduleSpec,
        base_lr: f64,
        steps_per_epoch: usize,
        epochs: usize,
        default_monitor: Monitor,
    ) -> Self {
        Self {
            spec: spec.clone(),
            base_lr,
            steps_per_epoch: steps_per_epoch.max(1),
            total_steps: (steps_per_epoch * epochs).max(1),
            default_monitor,
            state: ScheduleState::default(),
        }
    }

    /// The learning rate of optimizer step `step` (0-based, counted from the phase's start).
    pub fn lr(&self, step: usize) -> f64 {
        let lr = self.base_lr;
        let epochs_done = step as f64 / self.steps_per_epoch as f64;
        match &self.spec {
            ScheduleSpec::Constant(_) => lr,
            ScheduleSpec::Step(StepScheduleSpec {
                every_epochs,
                gamma,
            }) => {
                let k = (step / self.steps_per_epoch) / (*every_epochs).max(1);
                lr * gamma.powi(k as i32)
            }
            ScheduleSpec::Exponential(ExponentialScheduleSpec { gamma, staircase }) => {
                let e = if *staircase {
                    epochs_done.floor()
                } else {
                    epochs_done
                };
                lr * gamma.powf(e)
            }
            ScheduleSpec::Cosine(CosineScheduleSpec {
                warmup_epochs,
                min_lr,
            }) => {
                let warm = (warmup_epochs * self.steps_per_epoch as f64).round() as usize;
                if step < warm {
                    lr * (step + 1) as f64 / warm as f64
                } else {
                    let span = self.total_steps.saturating_sub(warm).max(1) as f64;
                    let t = ((step - warm) as f64 / span).min(1.0);
                    min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
            ScheduleSpec::ReduceOnPlateau(PlateauScheduleSpec { min_lr, .. }) => {
                (lr * self.state.factor).max(min_lr.min(lr))
            }
        }
    }

    /// Updates reduce-on-plateau after an epoch; returns the new rate when it was reduced.
    pub fn epoch_end(&mut self, m: &EpochMetrics) -> Option<f64> {
        let ScheduleSpec::ReduceOnPlateau(p) = &self.spec else {
            return None;
        };
        let monitor = p.monitor.unwrap_or(self.default_monitor);
        let before = self.lr(0);
        let st = &mut self.state;
        // Keras' order: count down the cooldown, then compare; epochs in cooldown do not wait.
        if st.cooldown > 0 {
            st.cooldown -= 1;
            st.tracker.wait = 0;
        }
        if st
            .tracker
            .update(metric(m, monitor), m.epoch, monitor, p.min_delta)
        {
            return None;
        }
        if st.cooldown > 0 {
            st.tracker.wait = 0;
            return None;
        }
        if st.tracker.wait >= p.patience && before > p.min_lr {
            st.factor *= p.factor;
            st.cooldown = p.cooldown;
            st.tracker.wait = 0;
            return Some(self.lr(0));
        }
        None
    }
}

/// What early stopping decided after an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The monitored metric improved.
    pub improved: bool,
    /// The phase should stop.
    pub stop: bool,
}

/// Keras' `EarlyStopping`.
pub fn early_stopping(
    spec: &EarlyStoppingSpec,
    default_monitor: Monitor,
    tracker: &mut Tracker,
    m: &EpochMetrics,
) -> Decision {
    let monitor = spec.monitor.unwrap_or(default_monitor);
    let improved = tracker.update(metric(m, monitor), m.epoch, monitor, spec.min_delta);
    Decision {
        improved,
        stop: !improved && tracker.wait >= spec.patience,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::NoSettings;

    fn metrics(epoch: usize, val_loss: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            phase: 0,
            train_loss: 0.0,
            train_acc: 0.0,
            val_loss,
            val_acc: 0.0,
            lr: 0.0,
            seconds: 0.0,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn constant_step_and_exponential_rates_at_given_steps() {
        let c = Schedule::new(
            &ScheduleSpec::Constant(NoSettings {}),
            0.1,
            10,
            5,
            Monitor::ValLoss,
        );
        assert!([0, 9, 49].iter().all(|&s| c.lr(s) == 0.1));
        let step = ScheduleSpec::Step(StepScheduleSpec {
            every_epochs: 2,
            gamma: 0.5,
        });
        let s = Schedule::new(&step, 0.1, 10, 6, Monitor::ValLoss);
        // epochs 0-1 at 0.1, 2-3 at 0.05, 4-5 at 0.025
        for (at, want) in [(0, 0.1), (19, 0.1), (20, 0.05), (39, 0.05), (40, 0.025)] {
            assert!(close(s.lr(at), want), "step {at}: {} != {want}", s.lr(at));
        }
        let exp = |staircase| {
            Schedule::new(
                &ScheduleSpec::Exponential(ExponentialScheduleSpec {
                    gamma: 0.9,
                    staircase,
                }),
                1.0,
                10,
                5,
                Monitor::ValLoss,
            )
        };
        assert!(close(exp(false).lr(0), 1.0));
        assert!(close(exp(false).lr(5), 0.9f64.powf(0.5)));
        assert!(close(exp(false).lr(20), 0.81));
        assert!(close(exp(true).lr(15), 0.9));
        assert!(close(exp(true).lr(9), 1.0));
    }

    #[test]
    fn cosine_warms_up_linearly_then_decays_to_min_lr() {
        let spec = ScheduleSpec::Cosine(CosineScheduleSpec {
            warmup_epochs: 1.0,
            min_lr: 0.01,
        });
        // 10 steps per epoch, 5 epochs: 10 warm-up steps, then 40 steps of cosine.
        let s = Schedule::new(&spec, 1.0, 10, 5, Monitor::ValLoss);
        assert!(close(s.lr(0), 0.1));
        assert!(close(s.lr(4), 0.5));
        assert!(close(s.lr(9), 1.0));
        assert!(close(s.lr(10), 1.0));
        assert!(close(s.lr(30), 0.01 + 0.99 * 0.5));
        assert!(close(s.lr(50), 0.01));
        assert!((10..50).all(|t| s.lr(t + 1) <= s.lr(t)));
    }

    #[test]
    fn reduce_on_plateau_follows_keras() {
        let spec = ScheduleSpec::ReduceOnPlateau(PlateauScheduleSpec {
            monitor: None,
            factor: 0.5,
            patience: 2,
            min_delta: 0.0,
            cooldown: 1,
            min_lr: 0.2,
        });
        let mut s = Schedule::new(&spec, 1.0, 10, 20, Monitor::ValLoss);
        let losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95];
        let mut lrs = Vec::new();
        for (i, l) in losses.iter().enumerate() {
            s.epoch_end(&metrics(i + 1, *l));
            lrs.push(s.lr(0));
        }
        // No improvement after epoch 2: reduced after epoch 4 (patience 2); epoch 5 is the
        // cooldown and counts as the first epoch of waiting again, so epoch 6 reduces to 0.25
        // and epoch 8 to 0.125, clamped at min_lr 0.2; at min_lr it stays.
        assert_eq!(lrs, [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2]);
    }

    #[test]
    fn early_stopping_waits_patience_epochs_and_remembers_the_best() {
        let spec = EarlyStoppingSpec {
            monitor: None,
            patience: 2,
            min_delta: 0.01,
            restore_best: true,
        };
        let mut t = Tracker::default();
        let losses = [1.0, 0.8, 0.795, 0.7, 0.71, 0.72, 0.73];
        let mut stopped_at = None;
        for (i, l) in losses.iter().enumerate() {
            let d = early_stopping(&spec, Monitor::ValLoss, &mut t, &metrics(i + 1, *l));
            if d.stop {
                stopped_at = Some(i + 1);
                break;
            }
        }
        // 0.795 is not better than 0.8 by more than 0.01 (one epoch of waiting); epoch 4
        // improves; 5 and 6 do not: the second epoch without improvement (patience 2) stops,
        // as Keras does.
        assert_eq!(stopped_at, Some(6));
        assert_eq!((t.best, t.best_epoch), (Some(0.7), 4));
        let acc = EarlyStoppingSpec {
            monitor: Some(Monitor::ValAcc),
            ..spec
        };
        let mut t = Tracker::default();
        let mut m = metrics(1, 0.0);
        m.val_acc = 0.5;
        assert!(early_stopping(&acc, Monitor::ValLoss, &mut t, &m).improved);
        m.val_acc = 0.6;
        m.epoch = 2;
        assert!(early_stopping(&acc, Monitor::ValLoss, &mut t, &m).improved);
    }
}
