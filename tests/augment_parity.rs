//! Augmentation against Keras: `tools/keras_affine_reference.py` ran Keras' own
//! `apply_affine_transform` (scipy.ndimage, order 1) on random rotation, shift, shear and zoom
//! draws, for the nearest, constant and reflect fill modes; runner's single resampling must give
//! the same pixels (up to runner's rounding to u8).

use runner::data::augment::{self, Transform};
use runner::spec::Fill;

#[test]
fn affine_transforms_match_keras_pixel_for_pixel() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/augment_reference.safetensors"
    ))
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let input = st.tensor("input").unwrap();
    let [h, w] = [input.shape()[0], input.shape()[1]];
    let src = input.data().to_vec();
    let f64s = |name: &str| -> Vec<f64> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let params = f64s("params");
    let expected: Vec<f32> = st
        .tensor("expected")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let n = h * w * 3;
    for (k, p) in params.chunks_exact(8).enumerate() {
        let t = Transform {
            theta: p[0],
            tx: p[1],
            ty: p[2],
            shear: p[3],
            zx: p[4],
            zy: p[5],
            flip_horizontal: false,
            flip_vertical: false,
        };
        let fill = [Fill::Nearest, Fill::Constant, Fill::Reflect][p[6] as usize];
        let mut out = vec![0u8; n];
        augment::apply(&t, &src, [h, w], fill, p[7], &mut out);
        let want = &expected[k * n..(k + 1) * n];
        let worst = out
            .iter()
            .zip(want)
            .map(|(&o, &e)| (f32::from(o) - e).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 0.5 + 1e-3,
            "draw {k} ({fill:?}, {p:?}): largest difference {worst}"
        );
    }
}
