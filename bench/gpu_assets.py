#!/usr/bin/env python3
"""Synthetic assets laid out like the asset mirror (../shared/assets), for a machine that has none
(the GPU machine: only the working tree travels there, 64 MiB at most):

    weights/vgg16_imagenet_notop.safetensors   VGG16's 13 convolutions under Keras' names, in
                                               PyTorch's layout (out, in, kh, kw), He-uniform
                                               random kernels, small random biases
    data/cats_and_dogs_small/{train,validation,test}/{cats,dogs}/*.jpg
                                               JPEGs of the book's size (150x150 by default):
                                               smooth random colour fields, cats warmer, dogs
                                               cooler, so that a head can learn something

Timings do not depend on what the values are; the comparison checks runner against PyTorch on
the same weights and inputs before it times anything.

    python3 bench/gpu_assets.py --out /tmp/runner-assets [--train 1000 --val 500 --test 500 --size 150]
(counts per class). Needs numpy, safetensors and pillow.
"""
import argparse
import os

import numpy as np


def vgg16_weights(path, seed):
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    blocks, widths = [2, 2, 3, 3, 3], [64, 128, 256, 512, 512]
    tensors, cin = {}, 3
    for b, (n, c) in enumerate(zip(blocks, widths), start=1):
        for i in range(1, n + 1):
            bound = np.sqrt(6.0 / (cin * 9))
            tensors[f"block{b}_conv{i}.weight"] = rng.uniform(-bound, bound, (c, cin, 3, 3)).astype(np.float32)
            tensors[f"block{b}_conv{i}.bias"] = rng.uniform(-0.05, 0.05, (c,)).astype(np.float32)
            cin = c
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path)


def image(rng, size, dog):
    # A smooth field (a coarse random grid resized up), tinted by class, plus fine noise.
    from PIL import Image
    coarse = Image.fromarray(rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8))
    field = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float64)
    tint = np.array([-30.0, 0.0, 40.0]) if dog else np.array([40.0, 10.0, -30.0])
    img = field + tint + rng.normal(0, 12, (size, size, 3))
    return img.clip(0, 255).astype(np.uint8)


def write_split(root, split, per_class, size, rng):
    from PIL import Image
    for cls in ["cats", "dogs"]:
        d = os.path.join(root, split, cls)
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(image(rng, size, cls == "dogs")).save(
                os.path.join(d, f"{cls[:-1]}.{i}.jpg"), quality=90)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=1000, help="training images per class")
    ap.add_argument("--val", type=int, default=500, help="validation images per class")
    ap.add_argument("--test", type=int, default=500, help="test images per class")
    ap.add_argument("--size", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    vgg16_weights(os.path.join(args.out, "weights", "vgg16_imagenet_notop.safetensors"), args.seed)
    data = os.path.join(args.out, "data", "cats_and_dogs_small")
    for split, n in [("train", args.train), ("validation", args.val), ("test", args.test)]:
        write_split(data, split, n, args.size, rng)
    print(f"{args.out}: VGG16 weights, {2 * (args.train + args.val + args.test)} images of {args.size}x{args.size}")


if __name__ == "__main__":
    main()
