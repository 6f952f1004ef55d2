"""Reference pixels for runner's augmentation: Keras' `apply_affine_transform` (keras 2.x
`keras/preprocessing/image.py`, reproduced here line for line since Keras itself is not needed)
on scipy.ndimage, run once to make tests/fixtures/augment_reference.safetensors.

    python tools/keras_affine_reference.py tests/fixtures/augment_reference.safetensors

Stores `input` (HWC uint8, a smooth pattern), `params` ([K, 8] float64: theta, tx, ty, shear,
zx, zy, fill mode index (0 nearest, 1 constant, 2 reflect), cval) and `expected` ([K, H, W, 3]
float32, Keras' float output before any rounding). Needs numpy, scipy, safetensors.
"""
import sys
import numpy as np
from scipy import ndimage
from safetensors.numpy import save_file

MODES = ["nearest", "constant", "reflect"]


def transform_matrix_offset_center(matrix, x, y):
    o_x = float(x) / 2 - 0.5
    o_y = float(y) / 2 - 0.5
    offset_matrix = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset_matrix = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    return np.dot(np.dot(offset_matrix, matrix), reset_matrix)


def apply_affine_transform(x, theta=0, tx=0, ty=0, shear=0, zx=1, zy=1, row_axis=0, col_axis=1,
                           channel_axis=2, fill_mode="nearest", cval=0.0, order=1):
    transform_matrix = None
    if theta != 0:
        theta = np.deg2rad(theta)
        rotation_matrix = np.array([[np.cos(theta), -np.sin(theta), 0],
                                    [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
        transform_matrix = rotation_matrix
    if tx != 0 or ty != 0:
        shift_matrix = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
        transform_matrix = shift_matrix if transform_matrix is None else np.dot(transform_matrix, shift_matrix)
    if shear != 0:
        shear = np.deg2rad(shear)
        shear_matrix = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
        transform_matrix = shear_matrix if transform_matrix is None else np.dot(transform_matrix, shear_matrix)
    if zx != 1 or zy != 1:
        zoom_matrix = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
        transform_matrix = zoom_matrix if transform_matrix is None else np.dot(transform_matrix, zoom_matrix)
    if transform_matrix is not None:
        h, w = x.shape[row_axis], x.shape[col_axis]
        transform_matrix = transform_matrix_offset_center(transform_matrix, h, w)
        x = np.rollaxis(x, channel_axis, 0)
        final_affine_matrix = transform_matrix[:2, :2]
        final_offset = transform_matrix[:2, 2]
        channel_images = [ndimage.affine_transform(x_channel, final_affine_matrix, final_offset,
                                                   order=order, mode=fill_mode, cval=cval)
                          for x_channel in x]
        x = np.stack(channel_images, axis=0)
        x = np.rollaxis(x, 0, channel_axis + 1)
    return x


def main(out):
    h, w = 24, 32
    r, c = np.mgrid[0:h, 0:w]
    img = np.stack([r * 10 % 256, c * 7 % 256, (r * c) % 256], axis=-1).astype(np.uint8)
    rng = np.random.default_rng(0)
    params, expected = [], []
    for k in range(24):
        mode = k % 3
        p = [rng.uniform(-40, 40), rng.uniform(-0.2, 0.2) * h, rng.uniform(-0.2, 0.2) * w,
             rng.uniform(-20, 20), rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2), mode, 77.0]
        y = apply_affine_transform(img.astype(np.float32), *p[:6], fill_mode=MODES[mode], cval=p[7])
        params.append(p)
        expected.append(np.ascontiguousarray(y, dtype=np.float32))
    save_file({"input": img, "params": np.array(params, dtype=np.float64),
               "expected": np.ascontiguousarray(np.stack(expected))}, out)


if __name__ == "__main__":
    main(sys.argv[1])
