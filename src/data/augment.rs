//! Data augmentation with Keras `ImageDataGenerator` semantics.
//!
//! Every geometric part (rotation, shift, shear, zoom, flips) is composed into one affine map
//! from output pixel to input position, and each image is resampled once (bilinear, as Keras'
//! `order=1`), so chained transforms add no blur. The parameters of image `i` in epoch `e` are
//! drawn from a generator seeded by `(seed, epoch, i)` only, so the result does not depend on the
//! number of threads or on batch order.
//!
//! Deliberate differences from Keras: images stay u8 (the result is rounded once); `wrap` is
//! periodic tiling (scipy's `grid-wrap`; Keras passes scipy's legacy `wrap`, which repeats
//! the edge row oddly); flips are folded into the same resampling instead of applied after it,
//! which gives identical pixels.

use rayon::prelude::*;

use super::{DataError, Images};
use crate::spec::{AugmentSpec, Fill};

/// The random draw for one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transform {
    /// Rotation, degrees.
    pub theta: f64,
    /// Shift along rows (height), pixels.
    pub tx: f64,
    /// Shift along columns (width), pixels.
    pub ty: f64,
    /// Shear, degrees.
    pub shear: f64,
    /// Zoom along rows (Keras semantics: above 1 shows more of the image, smaller).
    pub zx: f64,
    /// Zoom along columns.
    pub zy: f64,
    /// Mirror left-right.
    pub flip_horizontal: bool,
    /// Mirror top-bottom.
    pub flip_vertical: bool,
}

impl Transform {
    /// The identity.
    pub const IDENTITY: Self = Self {
        theta: 0.0,
        tx: 0.0,
        ty: 0.0,
        shear: 0.0,
        zx: 1.0,
        zy: 1.0,
        flip_horizontal: false,
        flip_vertical: false,
    };
}

/// SplitMix64 seeded from `(seed, epoch, index)`.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, epoch: u64, index: u64) -> Self {
        let mut r = Self(seed);
        let a = r.next_u64() ^ epoch.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        let mut r = Self(a);
        let b = r.next_u64() ^ index.wrapping_mul(0xA076_1D64_78BD_642F);
        Self(b)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// Draws the transform of image `index` in `epoch` (Keras `get_random_transform`).
pub fn draw(
    spec: &AugmentSpec,
    [h, w]: [usize; 2],
    seed: u64,
    epoch: usize,
    index: usize,
) -> Transform {
    let mut r = Rng::new(seed, epoch as u64, index as u64);
    let mut sym = |range: f64| {
        if range > 0.0 {
            r.uniform(-range, range)
        } else {
            0.0
        }
    };
    let theta = sym(spec.rotation_degrees);
    let tx = sym(spec.height_shift) * h as f64;
    let ty = sym(spec.width_shift) * w as f64;
    let shear = sym(spec.shear_degrees);
    let (zx, zy) = if spec.zoom > 0.0 {
        (
            r.uniform(1.0 - spec.zoom, 1.0 + spec.zoom),
            r.uniform(1.0 - spec.zoom, 1.0 + spec.zoom),
        )
    } else {
        (1.0, 1.0)
    };
    let flip_horizontal = spec.horizontal_flip && r.uniform(0.0, 1.0) < 0.5;
    let flip_vertical = spec.vertical_flip && r.uniform(0.0, 1.0) < 0.5;
    Transform {
        theta,
        tx,
        ty,
        shear,
        zx,
        zy,
        flip_horizontal,
        flip_vertical,
    }
}

type Mat = [[f64; 3]; 3];

fn mul(a: &Mat, b: &Mat) -> Mat {
    let mut m = [[0.0; 3]; 3];
    for (i, row) in m.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    m
}

/// The map from output `(row, col, 1)` to input `(row, col)` (Keras `apply_affine_transform`,
/// then the flips folded in).
pub fn matrix(t: &Transform, [h, w]: [usize; 2]) -> Mat {
    let (s, c) = t.theta.to_radians().sin_cos();
    let rotation = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
    let shift = [[1.0, 0.0, t.tx], [0.0, 1.0, t.ty], [0.0, 0.0, 1.0]];
    let (ss, sc) = t.shear.to_radians().sin_cos();
    let shear = [[1.0, -ss, 0.0], [0.0, sc, 0.0], [0.0, 0.0, 1.0]];
    let zoom = [[t.zx, 0.0, 0.0], [0.0, t.zy, 0.0], [0.0, 0.0, 1.0]];
    let m = mul(&mul(&mul(&rotation, &shift), &shear), &zoom);
    let (ox, oy) = (h as f64 / 2.0 - 0.5, w as f64 / 2.0 - 0.5);
    let offset = [[1.0, 0.0, ox], [0.0, 1.0, oy], [0.0, 0.0, 1.0]];
    let reset = [[1.0, 0.0, -ox], [0.0, 1.0, -oy], [0.0, 0.0, 1.0]];
    let mut m = mul(&mul(&offset, &m), &reset);
    // Flipping the output is reading the mirrored output position.
    let flip = [
        [
            if t.flip_vertical { -1.0 } else { 1.0 },
            0.0,
            if t.flip_vertical { h as f64 - 1.0 } else { 0.0 },
        ],
        [
            0.0,
            if t.flip_horizontal { -1.0 } else { 1.0 },
            if t.flip_horizontal {
                w as f64 - 1.0
            } else {
                0.0
            },
        ],
        [0.0, 0.0, 1.0],
    ];
    m = mul(&m, &flip);
    m
}

/// Index along an axis of length `n` for position `i` outside or inside it, per fill mode;
/// `None` means the fill value.
fn index(i: i64, n: usize, fill: Fill) -> Option<usize> {
    let n = n as i64;
    if (0..n).contains(&i) {
        return Some(i as usize);
    }
    match fill {
        Fill::Nearest => Some(i.clamp(0, n - 1) as usize),
        Fill::Constant => None,
        Fill::Reflect => {
            // Half-sample symmetric: d c b a | a b c d | d c b a
            let period = 2 * n;
            let m = i.rem_euclid(period);
            Some(if m < n { m } else { period - 1 - m } as usize)
        }
        Fill::Wrap => Some(i.rem_euclid(n) as usize),
    }
}

/// Resamples one HWC RGB u8 image through `t` into `out` (same size).
pub fn apply(
    t: &Transform,
    src: &[u8],
    [h, w]: [usize; 2],
    fill: Fill,
    fill_value: f64,
    out: &mut [u8],
) {
    if *t == Transform::IDENTITY {
        out.copy_from_slice(src);
        return;
    }
    let m = matrix(t, [h, w]);
    let cval = fill_value.clamp(0.0, 255.0) as f32;
    let px = |r: Option<usize>, c: Option<usize>, ch: usize| -> f32 {
        match (r, c) {
            (Some(r), Some(c)) => f32::from(src[(r * w + c) * 3 + ch]),
            _ => cval,
        }
    };
    for r in 0..h {
        for c in 0..w {
            let (rf, cf) = (r as f64, c as f64);
            let ir = m[0][0] * rf + m[0][1] * cf + m[0][2];
            let ic = m[1][0] * rf + m[1][1] * cf + m[1][2];
            let dst = &mut out[(r * w + c) * 3..(r * w + c) * 3 + 3];
            // scipy's `constant` mode: a position outside the image takes the fill value.
            let eps = 1e-9;
            if fill == Fill::Constant
                && (ir < -eps
                    || ir > (h - 1) as f64 + eps
                    || ic < -eps
                    || ic > (w - 1) as f64 + eps)
            {
                dst.fill(cval.round() as u8);
                continue;
            }
            let (r0, c0) = (ir.floor(), ic.floor());
            let (fr, fc) = ((ir - r0) as f32, (ic - c0) as f32);
            let (r0, c0) = (r0 as i64, c0 as i64);
            let mode = if fill == Fill::Constant {
                Fill::Nearest
            } else {
                fill
            };
            let (ra, rb) = (index(r0, h, mode), index(r0 + 1, h, mode));
            let (ca, cb) = (index(c0, w, mode), index(c0 + 1, w, mode));
            for (ch, d) in dst.iter_mut().enumerate() {
                let top = px(ra, ca, ch) * (1.0 - fc) + px(ra, cb, ch) * fc;
                let bottom = px(rb, ca, ch) * (1.0 - fc) + px(rb, cb, ch) * fc;
                *d = (top * (1.0 - fr) + bottom * fr).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// Augmented copies of images `indices` of `images` for `epoch`, in parallel; HWC u8, in order.
/// A split decoded on demand is decoded now; an image that no longer decodes, or whose file
/// changed, is an error naming it.
pub fn augment_batch(
    images: &Images,
    indices: &[usize],
    spec: &AugmentSpec,
    seed: u64,
    epoch: usize,
) -> Result<Vec<u8>, DataError> {
    let items: Vec<(usize, usize)> = indices.iter().map(|&i| (i, 0)).collect();
    augment_pass_batch(images, &items, spec, seed, epoch)
}

/// Like [`augment_batch`] for `(index, pass)` items: an image seen again in a later pass of the
/// same epoch (when `steps_per_epoch` asks for more than one pass) gets a fresh transform.
pub fn augment_pass_batch(
    images: &Images,
    items: &[(usize, usize)],
    spec: &AugmentSpec,
    seed: u64,
    epoch: usize,
) -> Result<Vec<u8>, DataError> {
    // The mirrored view exists for test-time augmentation only, which `batch_tensor` applies.
    debug_assert!(!images.mirrored, "augmentation reads the pixels as stored");
    let size = [images.height, images.width];
    let n = images.height * images.width * 3;
    // A split decoded on demand: this batch's images, each decoded once (an image may come
    // twice when `steps_per_epoch` asks for more than one pass).
    let decoded = match images.on_demand {
        None => None,
        Some(_) => {
            let mut unique: Vec<usize> = items.iter().map(|&(i, _)| i).collect();
            unique.sort_unstable();
            unique.dedup();
            let pixels = images.pixels_of(&unique)?;
            Some((unique, pixels))
        }
    };
    let source = |i: usize| match &decoded {
        None => images.image(i),
        Some((unique, pixels)) => {
            let at = unique.binary_search(&i).expect("every item was decoded");
            &pixels[at * n..][..n]
        }
    };
    let mut out = vec![0u8; items.len() * n];
    out.par_chunks_mut(n)
        .zip(items.par_iter())
        .for_each(|(dst, &(i, pass))| {
            let key = if pass == 0 {
                epoch
            } else {
                epoch + pass * 1_000_003
            };
            let t = draw(spec, size, seed, key, i);
            apply(&t, source(i), size, spec.fill, spec.fill_value, dst);
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> AugmentSpec {
        AugmentSpec::default()
    }

    /// A 3x3 single-colour-per-pixel image: pixel (r, c) has value 10 * (3r + c) in every channel.
    fn grid(h: usize, w: usize) -> Vec<u8> {
        (0..h * w).flat_map(|i| [(i * 10) as u8; 3]).collect()
    }

    fn at(img: &[u8], w: usize, r: usize, c: usize) -> u8 {
        img[(r * w + c) * 3]
    }

    fn run(t: Transform, src: &[u8], hw: [usize; 2], fill: Fill, value: f64) -> Vec<u8> {
        let mut out = vec![0u8; src.len()];
        apply(&t, src, hw, fill, value, &mut out);
        out
    }

    #[test]
    fn zero_ranges_change_nothing() {
        let spec = none();
        for i in 0..10 {
            assert_eq!(draw(&spec, [8, 8], 1, 1, i), Transform::IDENTITY);
        }
        let src = grid(4, 5);
        let t = Transform {
            zx: 1.0,
            ..Transform::IDENTITY
        };
        assert_eq!(run(t, &src, [4, 5], Fill::Nearest, 0.0), src);
    }

    #[test]
    fn flipping_twice_is_the_identity() {
        let src = grid(4, 5);
        for t in [
            Transform {
                flip_horizontal: true,
                ..Transform::IDENTITY
            },
            Transform {
                flip_vertical: true,
                ..Transform::IDENTITY
            },
        ] {
            let once = run(t, &src, [4, 5], Fill::Nearest, 0.0);
            assert_ne!(once, src);
            assert_eq!(run(t, &once, [4, 5], Fill::Nearest, 0.0), src);
        }
        let h = run(
            Transform {
                flip_horizontal: true,
                ..Transform::IDENTITY
            },
            &src,
            [4, 5],
            Fill::Nearest,
            0.0,
        );
        assert_eq!(at(&h, 5, 0, 0), at(&src, 5, 0, 4));
        assert_eq!(at(&h, 5, 3, 1), at(&src, 5, 3, 3));
    }

    #[test]
    fn a_90_degree_rotation_moves_a_known_pixel() {
        let src = grid(3, 3);
        let out = run(
            Transform {
                theta: 90.0,
                ..Transform::IDENTITY
            },
            &src,
            [3, 3],
            Fill::Nearest,
            0.0,
        );
        // Output (r, c) reads input (2 - c, r): the bottom-left pixel goes to the top-left.
        for r in 0..3 {
            for c in 0..3 {
                assert_eq!(at(&out, 3, r, c), at(&src, 3, 2 - c, r), "({r}, {c})");
            }
        }
    }

    #[test]
    fn a_whole_pixel_shift_moves_the_image_and_fills_the_border_per_mode() {
        // Shifting by ty = 2 columns: output (r, c) reads input (r, c + 2).
        let src = grid(1, 4); // values 0, 10, 20, 30
        let t = Transform {
            ty: 2.0,
            ..Transform::IDENTITY
        };
        let row = |fill, v| {
            run(t, &src, [1, 4], fill, v)
                .chunks(3)
                .map(|p| p[0])
                .collect::<Vec<u8>>()
        };
        assert_eq!(row(Fill::Nearest, 0.0), vec![20, 30, 30, 30]);
        assert_eq!(row(Fill::Constant, 7.0), vec![20, 30, 7, 7]);
        assert_eq!(row(Fill::Reflect, 0.0), vec![20, 30, 30, 20]);
        assert_eq!(row(Fill::Wrap, 0.0), vec![20, 30, 0, 10]);
    }

    #[test]
    fn the_same_seed_gives_the_same_transform_and_epochs_differ() {
        let spec = AugmentSpec::notebook();
        assert_eq!(
            draw(&spec, [150, 150], 42, 3, 17),
            draw(&spec, [150, 150], 42, 3, 17)
        );
        assert_ne!(
            draw(&spec, [150, 150], 42, 3, 17),
            draw(&spec, [150, 150], 42, 4, 17)
        );
        assert_ne!(
            draw(&spec, [150, 150], 42, 3, 17),
            draw(&spec, [150, 150], 42, 3, 18)
        );
        assert_ne!(
            draw(&spec, [150, 150], 42, 3, 17),
            draw(&spec, [150, 150], 43, 3, 17)
        );
        let images = Images {
            split: "train".into(),
            height: 6,
            width: 6,
            pixels: (0..4 * 6 * 6 * 3).map(|i| (i * 7 % 251) as u8).collect(),
            labels: vec![0; 4],
            paths: vec![Default::default(); 4],
            digests: vec![[0; 32]; 4],
            on_demand: None,
            mirrored: false,
        };
        let batch = |idx: &[usize], epoch| augment_batch(&images, idx, &spec, 42, epoch).unwrap();
        let a = batch(&[0, 1, 2, 3], 1);
        assert_eq!(a, batch(&[0, 1, 2, 3], 1));
        assert_ne!(a, batch(&[0, 1, 2, 3], 2));
        // Image 2's result does not depend on which batch or position it is in.
        let alone = batch(&[2], 1);
        assert_eq!(&a[2 * 108..3 * 108], &alone[..]);
    }

    #[test]
    fn a_split_decoded_batch_by_batch_augments_as_the_one_held_and_names_a_changed_file() {
        use crate::data::folder::{load_split_with, scan_split};
        use crate::spec::Interpolation;
        let dir = tempfile::tempdir().unwrap();
        for (class, n) in [("cats", 3u8), ("dogs", 3)] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            for i in 0..n {
                image::RgbImage::from_fn(20, 16, |x, y| {
                    image::Rgb([x as u8 * 11, y as u8 * 13, i * 70 + 5])
                })
                .save(dir.path().join(class).join(format!("{i}.png")))
                .unwrap();
            }
        }
        let l = scan_split("train", dir.path()).unwrap();
        let (held, _) = load_split_with(&l, [12, 10], Interpolation::Bilinear, true);
        let (lazy, _) = load_split_with(&l, [12, 10], Interpolation::Bilinear, false);
        assert!(lazy.pixels.is_empty() && lazy.on_demand.is_some());
        let spec = AugmentSpec::notebook();
        // Image 4 twice (a second pass of the epoch), out of order.
        let items = [(4, 0), (1, 0), (4, 1), (0, 0), (5, 0)];
        let want = augment_pass_batch(&held, &items, &spec, 7, 3).unwrap();
        assert_eq!(
            augment_pass_batch(&lazy, &items, &spec, 7, 3).unwrap(),
            want
        );
        assert_ne!(
            &want[..360],
            &want[2 * 360..3 * 360],
            "a second pass is a new draw"
        );

        image::RgbImage::new(20, 16).save(&lazy.paths[1]).unwrap();
        let e = augment_pass_batch(&lazy, &items, &spec, 7, 3)
            .unwrap_err()
            .to_string();
        let named = format!(
            "{}: the file changed while runner was using it",
            lazy.paths[1].display()
        );
        assert!(e.contains(&named), "{e}");
        // What is held is not read again.
        assert_eq!(
            augment_pass_batch(&held, &items, &spec, 7, 3).unwrap(),
            want
        );
    }

    #[test]
    fn draws_stay_within_their_ranges() {
        let spec = AugmentSpec {
            rotation_degrees: 40.0,
            width_shift: 0.2,
            height_shift: 0.1,
            zoom: 0.2,
            ..none()
        };
        for i in 0..500 {
            let t = draw(&spec, [100, 200], 1, 1, i);
            assert!(t.theta.abs() <= 40.0 && t.tx.abs() <= 10.0 && t.ty.abs() <= 40.0);
            assert!((0.8..=1.2).contains(&t.zx) && (0.8..=1.2).contains(&t.zy));
        }
    }
}
