"""Independent reference for runner's VGG16 base: a plain numpy forward pass (float64, im2col),
written without burn, run once to make tests/fixtures/vgg16_reference.safetensors.

    python tools/vgg16_reference.py ../shared/assets tests/fixtures/vgg16_reference.safetensors

The fixture holds the resized input image (`input`, HWC uint8, resized here with PIL bilinear so
the Rust test does not depend on runner's resizer) and the base's output for two preprocessings
(`rescale`, `caffe`), each [512, 4, 4] (CHW) float32. Needs numpy, safetensors, pillow.
"""
import sys
import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

BLOCKS = [2, 2, 3, 3, 3]


def conv3x3_same_relu(x, w, b):
    c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    cols = np.empty((c, 3, 3, h, wd))
    for i in range(3):
        for j in range(3):
            cols[:, i, j] = xp[:, i:i + h, j:j + wd]
    out = w.reshape(w.shape[0], -1) @ cols.reshape(c * 9, h * wd) + b[:, None]
    return np.maximum(out, 0).reshape(w.shape[0], h, wd)


def maxpool2(x):
    c, h, w = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(c, h // 2, 2, w // 2, 2).max(axis=(2, 4))


def forward(x, weights, blocks=BLOCKS):
    for b, n in enumerate(blocks, start=1):
        for c in range(1, n + 1):
            name = f"block{b}_conv{c}"
            x = conv3x3_same_relu(x, weights[f"{name}.weight"].astype(np.float64),
                                  weights[f"{name}.bias"].astype(np.float64))
        x = maxpool2(x)
    return x


def main(assets, out):
    weights = load_file(f"{assets}/weights/vgg16_imagenet_notop.safetensors")
    img = Image.open(f"{assets}/data/cats_and_dogs_small/test/cats/cat.1500.jpg").convert("RGB")
    img = img.resize((150, 150), Image.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)  # H, W, 3 (RGB)
    rgb = pixels.astype(np.float64).transpose(2, 0, 1)  # 3, H, W
    rescale = rgb / 255.0
    caffe = rgb[::-1] - np.array([103.939, 116.779, 123.68])[:, None, None]
    save_file({
        "input": pixels,
        "rescale": forward(rescale, weights).astype(np.float32),
        "caffe": forward(caffe, weights).astype(np.float32),
    }, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
