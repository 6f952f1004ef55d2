//! Fuzzing on the stable toolchain: proptest drives random mutations of real inputs (the shipped
//! experiments, small images, the weight fixtures) through runner's spec loading and checks, its
//! image decoder and its weight readers. None may panic; each must answer Ok or a located error.
//!
//! CI runs a short pass (`RUNNER_FUZZ_CASES`, default 48 per target). A long run:
//! `RUNNER_FUZZ_SECONDS=600 cargo test --release --test fuzz -- --test-threads 3`. A failure is
//! shrunk and its seed kept in `tests/fuzz.proptest-regressions`, replayed first on every run.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestError, TestRunner};

/// One mutation of a byte string: where (a fraction of the length), what, and a byte.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(u32, u8),
    Delete(u32, u16),
    Insert(u32, u8),
    Truncate(u32),
    /// Replace a TOML value (the text after `= ` on some line) by an interesting token.
    Value(u32, usize),
    Duplicate(u32, u16),
}

const TOKENS: [&str; 22] = [
    "0",
    "-1",
    "1e308",
    "-1e308",
    "nan",
    "inf",
    "9223372036854775807",
    "\"\"",
    "[]",
    "{}",
    "[1, 2, 3]",
    "[0, 0]",
    "true",
    "\"none\"",
    "\"all\"",
    "[[1]]",
    "1.5",
    "\"\\u0000\"",
    "\"block5_conv1\"",
    "100000",
    "[100000, 100000]",
    "{ kind = \"dense\" }",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<u32>(), any::<u8>()).prop_map(|(p, b)| Mutation::Flip(p, b)),
        (any::<u32>(), 1u16..64).prop_map(|(p, n)| Mutation::Delete(p, n)),
        (any::<u32>(), any::<u8>()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        any::<u32>().prop_map(Mutation::Truncate),
        (any::<u32>(), 0..TOKENS.len()).prop_map(|(p, t)| Mutation::Value(p, t)),
        (any::<u32>(), 1u16..256).prop_map(|(p, n)| Mutation::Duplicate(p, n)),
    ]
}

fn at(p: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (p as u64 * len as u64 / u32::MAX as u64) as usize % (len + 1)
    }
}

fn apply(seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in muts {
        let len = b.len();
        match *m {
            Mutation::Flip(p, x) if len > 0 => {
                let i = at(p, len - 1);
                b[i] ^= x.max(1);
            }
            Mutation::Delete(p, n) => {
                let i = at(p, len);
                let j = (i + n as usize).min(len);
                b.drain(i..j);
            }
            Mutation::Insert(p, x) => b.insert(at(p, len), x),
            Mutation::Truncate(p) => b.truncate(at(p, len)),
            Mutation::Value(p, t) => {
                let text = String::from_utf8_lossy(&b).into_owned();
                let lines: Vec<&str> = text.lines().collect();
                let with_value: Vec<usize> = (0..lines.len())
                    .filter(|&i| lines[i].contains(" = "))
                    .collect();
                if !with_value.is_empty() {
                    let k = with_value[at(p, with_value.len() - 1)];
                    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                    let key = out[k].split(" = ").next().unwrap_or("").to_string();
                    out[k] = format!("{key} = {}", TOKENS[t]);
                    b = out.join("\n").into_bytes();
                }
            }
            Mutation::Duplicate(p, n) => {
                let i = at(p, len);
                let j = (i + n as usize).min(len);
                let piece = b[i..j].to_vec();
                b.splice(i..i, piece);
            }
            _ => {}
        }
    }
    b
}

/// Runs `check` on mutations of `seeds` until the case count or the time is spent.
fn fuzz(name: &str, seeds: Vec<Vec<u8>>, check: impl Fn(&[u8])) {
    let cases = std::env::var("RUNNER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let limit = std::env::var("RUNNER_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);
    let started = Instant::now();
    let mut config = Config {
        cases: if limit.is_some() { u32::MAX } else { cases },
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fuzz.proptest-regressions",
        ))),
        ..Config::default()
    };
    config.max_shrink_iters = 2000;
    let mut runner = TestRunner::new(config);
    let count = std::cell::Cell::new(0u64);
    let strategy = (0..seeds.len(), prop::collection::vec(mutation(), 1..6));
    let result = runner.run(&strategy, |(s, muts)| {
        if limit.is_some_and(|l| started.elapsed() > l) {
            // Time is up: rejections end the run (proptest stops after max_global_rejects).
            return Err(TestCaseError::reject("time is up"));
        }
        count.set(count.get() + 1);
        check(&apply(&seeds[s], &muts));
        Ok(())
    });
    if let Some(l) = limit {
        eprintln!(
            "fuzz {name}: {} inputs in {:?} (limit {l:?})",
            count.get(),
            started.elapsed()
        );
    }
    match result {
        Ok(()) => {}
        Err(TestError::Abort(_)) if limit.is_some_and(|l| started.elapsed() > l) => {}
        Err(e) => panic!("fuzz {name}: {e}"),
    }
}

#[test]
fn spec_loading_and_checks() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::make_dataset(&dir.path().join("data"), &["cats", "dogs"], [1, 1, 1], 8);
    let weights = dir.path().join("w.safetensors");
    std::fs::write(&weights, b"not read by the plan").unwrap();
    let mut seeds: Vec<Vec<u8>> = common::shipped_experiments()
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    seeds.push(common::spec_text(&data, &weights, "").into_bytes());
    seeds.push(
        format!(
            "{}\n[sweep]\n\"optimizer.lr\" = [1e-3, 1e-4]\n",
            common::spec_text(&data, &weights, "")
        )
        .into_bytes(),
    );
    let path = dir.path().join("exp.toml");
    let locations = runner::assets::Locations { mirror: None };
    fuzz("spec", seeds, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        if let Ok(grid) = runner::spec::load::grid(&path) {
            for point in grid.iter().take(4) {
                let _ = runner::spec::load::load_checked(&path, &[], point, |l| {
                    runner::plan::build(l, &locations)
                });
            }
        }
    });
}

#[test]
fn image_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let mut seeds = Vec::new();
    for (name, img) in [
        (
            "a.png",
            image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(9, 7, |x, y| {
                image::Rgb([x as u8 * 20, y as u8 * 30, 7])
            })),
        ),
        (
            "b.jpg",
            image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(16, 8, |x, y| {
                image::Rgb([x as u8 * 9, y as u8 * 20, 99])
            })),
        ),
        (
            "c.png",
            image::DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_pixel(
                5,
                5,
                image::LumaA([9, 200]),
            )),
        ),
        (
            "d.png",
            image::DynamicImage::ImageRgba16(image::ImageBuffer::from_pixel(
                3,
                4,
                image::Rgba([1000u16, 2, 3, 65535]),
            )),
        ),
    ] {
        let p = dir.path().join(name);
        img.save(&p).unwrap();
        seeds.push(std::fs::read(&p).unwrap());
    }
    let path = dir.path().join("x.img");
    fuzz("image", seeds, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        if let Ok(d) =
            runner::data::folder::decode(&path, [8, 8], runner::spec::Interpolation::Bilinear)
        {
            assert_eq!(d.pixels.len(), 8 * 8 * 3);
        }
    });
}

#[test]
fn weight_readers() {
    use burn::prelude::Device;
    use runner::model::Backbone;
    let dir = tempfile::tempdir().unwrap();
    // A small safetensors file under VGG's names (shapes that do not fit: the reader is what
    // is fuzzed, then the check that names what does not fit).
    let small = dir.path().join("s.safetensors");
    let data = vec![0u8; 4 * 3 * 3 * 3 * 4];
    let views = vec![
        (
            "block1_conv1_W_1:0".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 3, 3, 3], &data)
                .unwrap(),
        ),
        (
            "block1_conv1_b_1:0".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data[..16])
                .unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &small).unwrap();
    let seeds: Vec<(PathBuf, Vec<u8>)> = vec![
        (
            dir.path().join("x.safetensors"),
            std::fs::read(&small).unwrap(),
        ),
        (
            dir.path().join("x.pth"),
            std::fs::read(common::fixture("vgg16_torchvision.pth")).unwrap(),
        ),
        (
            dir.path().join("x.h5"),
            std::fs::read(common::fixture("vgg16_keras3.weights.h5")).unwrap(),
        ),
    ];
    let def = runner::backbone::find("vgg16").unwrap();
    let device = Device::flex();
    let base = Backbone::init(def, &device);
    // The seed index is carried in the first byte (the file's extension picks the reader).
    let tagged: Vec<Vec<u8>> = seeds
        .iter()
        .enumerate()
        .map(|(i, (_, b))| {
            let mut v = vec![i as u8];
            v.extend_from_slice(b);
            v
        })
        .collect();
    fuzz("weights", tagged, |bytes| {
        let Some((&tag, body)) = bytes.split_first() else {
            return;
        };
        let (path, _) = &seeds[tag as usize % seeds.len()];
        std::fs::write(path, body).unwrap();
        let _ = base.clone().load(def, path);
    });
}
