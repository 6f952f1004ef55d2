//! Images from folders, decoded once, and their conversion to network input.

pub mod augment;
pub mod folder;
pub mod preview;

use burn::prelude::*;

use crate::spec::Preprocess;
pub use folder::{DataError, Images, SplitListing};

/// ImageNet mean, BGR order, on the 0-255 scale (Keras `preprocess_input` for VGG).
const CAFFE_MEAN_BGR: [f32; 3] = [103.939, 116.779, 123.68];
/// ImageNet mean and standard deviation, RGB order, on the 0-1 scale (torchvision).
const TORCH_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const TORCH_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Writes one HWC RGB u8 image into `out` as CHW f32 with the preprocessing applied.
pub fn preprocess_into(pixels: &[u8], hw: usize, pre: Preprocess, out: &mut [f32]) {
    for (c, (src, scale, shift)) in preprocess_affine(pre).into_iter().enumerate() {
        let plane = &mut out[c * hw..(c + 1) * hw];
        for (o, px) in plane.iter_mut().zip(pixels.chunks_exact(3)) {
            *o = f32::from(px[src]) * scale + shift;
        }
    }
}

/// What preprocessing does to each output channel `c`: `(src, scale, shift)`, reading input
/// (RGB) channel `src` and mapping `v -> v * scale + shift`.
pub fn preprocess_affine(pre: Preprocess) -> [(usize, f32, f32); 3] {
    std::array::from_fn(|c| match pre {
        Preprocess::Rescale => (c, 1.0 / 255.0, 0.0),
        Preprocess::Caffe => (2 - c, 1.0, -CAFFE_MEAN_BGR[c]),
        Preprocess::Torch => (
            c,
            1.0 / (255.0 * TORCH_STD[c]),
            -TORCH_MEAN[c] / TORCH_STD[c],
        ),
    })
}

/// A batch of images `indices` as network input (decoded now when the split is decoded on
/// demand; an image that no longer decodes is an error naming its file).
///
/// # Shapes
///
/// - output: `[indices.len(), 3, height, width]`
pub fn batch_tensor(
    images: &Images,
    indices: &[usize],
    pre: Preprocess,
    device: &Device,
) -> Result<Tensor<4>, DataError> {
    let size = [images.height, images.width];
    let x = match images.on_demand {
        None => to_tensor(
            indices.iter().map(|&i| images.image(i)),
            indices.len(),
            size,
            pre,
            device,
        ),
        Some(_) => pixels_tensor(
            &images.pixels_of(indices)?,
            indices.len(),
            size,
            pre,
            device,
        ),
    };
    // Mirrored left to right: the width axis reversed.
    Ok(if images.mirrored { x.flip([3]) } else { x })
}

/// `n` HWC RGB u8 images stored back to back, as network input.
///
/// # Shapes
///
/// - output: `[n, 3, height, width]`
pub fn pixels_tensor(
    pixels: &[u8],
    n: usize,
    [h, w]: [usize; 2],
    pre: Preprocess,
    device: &Device,
) -> Tensor<4> {
    to_tensor(pixels.chunks_exact(h * w * 3), n, [h, w], pre, device)
}

fn to_tensor<'a>(
    images: impl Iterator<Item = &'a [u8]>,
    n: usize,
    [h, w]: [usize; 2],
    pre: Preprocess,
    device: &Device,
) -> Tensor<4> {
    let hw = h * w;
    let mut buf = vec![0f32; n * 3 * hw];
    for (chunk, img) in buf.chunks_exact_mut(3 * hw).zip(images) {
        preprocess_into(img, hw, pre, chunk);
    }
    Tensor::from_data(TensorData::new(buf, [n, 3, h, w]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caffe_preprocessing_is_bgr_minus_the_imagenet_mean() {
        let mut out = [0f32; 3];
        preprocess_into(&[10, 20, 30], 1, Preprocess::Caffe, &mut out);
        assert_eq!(out, [30.0 - 103.939, 20.0 - 116.779, 10.0 - 123.68]);
    }

    #[test]
    fn rescale_and_torch_preprocessing_keep_rgb_order() {
        let mut out = [0f32; 3];
        preprocess_into(&[255, 0, 51], 1, Preprocess::Rescale, &mut out);
        assert_eq!(out[..2], [1.0, 0.0]);
        assert!((out[2] - 0.2).abs() < 1e-6, "{out:?}");
        preprocess_into(&[255, 0, 51], 1, Preprocess::Torch, &mut out);
        let want = [
            (1.0 - 0.485) / 0.229,
            (0.0 - 0.456) / 0.224,
            (0.2 - 0.406) / 0.225,
        ];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn planes_are_channel_first() {
        // Two pixels: the output holds all red values, then all green, then all blue.
        let mut out = [0f32; 6];
        preprocess_into(&[255, 0, 0, 0, 255, 0], 2, Preprocess::Rescale, &mut out);
        assert_eq!(out, [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    }
}
