//! Memory that must not grow with the number of training steps, counted by the allocator (live
//! bytes, not timing, not RSS).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use burn::prelude::*;
use runner::model::TransferModel;
use runner::train::{self, Features, TrainSource};

/// The system allocator, counting the bytes allocated and not yet freed.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size() as isize, Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_add(new as isize - l.size() as isize, Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Live bytes after `steps` steps of the notebook's dense head, computed by hand, on `features`.
fn train(dir: &std::path::Path, features: &Features, steps: usize) -> isize {
    let data = common::make_dataset(&dir.join("data"), &["cats", "dogs"], [2, 2, 1], 32);
    let weights = dir.join("w.safetensors");
    common::write_vgg_weights(&weights, runner::backbone::find("vgg16").unwrap(), 3);
    let text = common::spec_text(&data, &weights, "").replace(
        "epochs = 2",
        &format!("epochs = 1\nsteps_per_epoch = {steps}"),
    );
    let plan = common::plan_for(dir, &text);
    let device = Device::flex().autodiff();
    let model = TransferModel::build(&plan, &device).unwrap();
    let (model, history) = train::fit(
        model,
        &TrainSource::Features(features),
        features,
        &plan,
        &device,
        "t",
    );
    assert_eq!(history.len(), 1);
    assert!(history[0].train_loss.is_finite());
    drop((model, history));
    LIVE.load(Relaxed)
}

#[test]
fn the_hand_written_step_keeps_nothing_per_step() {
    let dir = tempfile::tempdir().unwrap();
    // VGG16's activations at 32x32 (1x1x512), as the tiny experiment caches them.
    let n = 40;
    let features = Features::new(
        (0..n * 512).map(|i| (i % 97) as f32 / 97.0).collect(),
        [512, 1, 1],
        (0..n).map(|i| i % 2).collect(),
        (0..n).map(|i| format!("{i}.png").into()).collect(),
    );
    // The first run settles what is allocated once (thread pools, caches, statics).
    train(dir.path(), &features, 50);
    let before = train(dir.path(), &features, 50);
    let after = train(dir.path(), &features, 1050);
    // Before the fix each step kept a few kilobytes of autodiff bookkeeping: megabytes here.
    let grown = after - before;
    assert!(
        grown < 256 << 10,
        "1000 more steps kept {grown} bytes ({} per step)",
        grown / 1000
    );
}
