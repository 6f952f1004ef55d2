"""Fixtures for runner's weight formats and the ResNet50 / MobileNetV2 forward passes, made with
the real tools: PyTorch + torchvision (state dict keys, .pth files, reference forward passes), Keras
3 (its .weights.h5 layout) and h5py (Keras 2's layout, as in ~/.keras/models). Run once:

    KERAS_BACKEND=torch python tools/weights_fixtures.py tests/fixtures

Needs torch, torchvision, keras, h5py, numpy, safetensors (a venv outside the repo).

Writes:
- torchvision_keys.json: every state-dict key and shape of torchvision's resnet50, mobilenet_v2
  and vgg16, in order.
- resnet50_reference.safetensors, mobilenet_v2_reference.safetensors: `input` [2, 3, 64, 64] and
  torchvision's feature map `output` (eval mode) with weights drawn from the tests' SplitMix64
  stream (tests/common/mod.rs) in state-dict order; the Rust test draws the same weights.
- resnet50_torchvision.pth, vgg16_torchvision.pth: `torch.save(state_dict)` with the pattern
  value `k + (j % 97) / 1000` (k: the key's position in the state dict, j: the flat index), so a
  loaded tensor says which key it came from and whether its layout survived. Re-zipped with
  deflate to stay small (torch writes stored entries).
- vgg16_keras3.weights.h5: Keras 3 `save_weights` of VGG16 with the pattern (k: the convolution's
  position; bias `-(k + ...)`), kernels in Keras' HWIO order; re-packed with gzip.
- vgg19_keras2_notop.h5: the layout of Keras 2's vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5
  (`layer_names`, `weight_names`, `block1_conv1/block1_conv1/kernel:0`), written with h5py.
"""
import json
import os
import sys
import zipfile

import h5py
import numpy as np
import torch
import torchvision
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(__file__))
from vgg19_reference import Rng  # noqa: E402

WEIGHT_SEED, INPUT_SEED = 31, 32


def pattern(k, n):
    return (k + (np.arange(n) % 97) / 1000.0).astype(np.float32)


def splitmix_state(sd):
    """Every float tensor of the state dict in order, drawn from the SplitMix64 stream as
    tests/common/mod.rs `torchvision_weights` does."""
    rng, out = Rng(WEIGHT_SEED), {}
    for name, t in sd.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        n, shape = t.numel(), tuple(t.shape)
        u = rng.uniform(n)
        if name.endswith("running_var"):
            v = np.float32(1.0) + np.float32(0.5) * u
        elif name.endswith("running_mean") or name.endswith("bias"):
            v = np.float32(0.1) * u
        elif len(shape) == 1:  # BatchNorm weight
            v = np.float32(1.0) + np.float32(0.1) * u
        else:
            fan_in = int(np.prod(shape[1:]))
            v = u * np.sqrt(np.float32(6.0) / np.float32(fan_in)).astype(np.float32)
        out[name] = torch.from_numpy(v.reshape(shape).copy())
    return out


def rezip(path):
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    os.replace(tmp, path)


def pattern_state(sd):
    return {
        name: (torch.from_numpy(pattern(k, t.numel()).reshape(tuple(t.shape))) if t.is_floating_point() else t)
        for k, (name, t) in enumerate(sd.items())
    }


def main(out):
    torch.manual_seed(0)
    models = {
        "resnet50": torchvision.models.resnet50().eval(),
        "mobilenet_v2": torchvision.models.mobilenet_v2().eval(),
        "vgg16": torchvision.models.vgg16().eval(),
    }
    keys = {n: [[k, list(v.shape)] for k, v in m.state_dict().items()] for n, m in models.items()}
    with open(os.path.join(out, "torchvision_keys.json"), "w") as f:
        json.dump(keys, f)

    x = Rng(INPUT_SEED).uniform(2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    for name in ["resnet50", "mobilenet_v2"]:
        m = models[name]
        m.load_state_dict(splitmix_state(m.state_dict()))
        with torch.no_grad():
            if name == "resnet50":
                f = torch.nn.Sequential(*list(m.children())[:-2])(torch.from_numpy(x))
            else:
                f = m.features(torch.from_numpy(x))
        save_file({"input": x, "output": f.numpy().astype(np.float32)},
                  os.path.join(out, f"{name}_reference.safetensors"))

    for name in ["resnet50", "vgg16"]:
        sd = models[name].state_dict()
        if name == "vgg16":  # the base and the last classifier layer (the others are 470 MB)
            sd = {k: v for k, v in sd.items() if k.startswith("features.") or k.startswith("classifier.6")}
        path = os.path.join(out, f"{name}_torchvision.pth")
        torch.save(pattern_state(sd), path)
        rezip(path)

    import keras
    m = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    convs = [l for l in m.layers if l.weights]
    for k, l in enumerate(convs):
        kern, bias = l.get_weights()
        l.set_weights([pattern(k, kern.size).reshape(kern.shape), -pattern(k, bias.size)])
    raw = os.path.join(out, "vgg16_keras3.raw.weights.h5")
    m.save_weights(raw)
    path = os.path.join(out, "vgg16_keras3.weights.h5")
    with h5py.File(raw) as src, h5py.File(path, "w") as dst:
        def copy(name, obj):
            if isinstance(obj, h5py.Group):
                g = dst.require_group(name)
            else:
                g = dst.create_dataset(name, data=obj[()], chunks=obj.shape or None, compression="gzip", compression_opts=9)
            for a, v in obj.attrs.items():
                g.attrs[a] = v
        for a, v in src.attrs.items():
            dst.attrs[a] = v
        src.visititems(copy)
    os.remove(raw)

    blocks = [2, 2, 4, 4, 4]
    widths = [64, 128, 256, 512, 512]
    with h5py.File(os.path.join(out, "vgg19_keras2_notop.h5"), "w") as f:
        names, cin, k = ["input_1"], 3, 0
        f.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S")
        for b, (n, w) in enumerate(zip(blocks, widths), start=1):
            for c in range(1, n + 1):
                layer = f"block{b}_conv{c}"
                g = f.create_group(layer)
                g.attrs["weight_names"] = np.array([f"{layer}/kernel:0".encode(), f"{layer}/bias:0".encode()])
                g.create_dataset(f"{layer}/kernel:0", data=pattern(k, 9 * cin * w).reshape(3, 3, cin, w),
                                 chunks=(3, 3, cin, w), compression="gzip", compression_opts=9)
                g.create_dataset(f"{layer}/bias:0", data=-pattern(k, w), compression="gzip")
                names.append(layer)
                cin, k = w, k + 1
            pool = f"block{b}_pool"
            f.create_group(pool).attrs["weight_names"] = np.array([], dtype="S")
            names.append(pool)
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.1.5"


if __name__ == "__main__":
    main(sys.argv[1])
