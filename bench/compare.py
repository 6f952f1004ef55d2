#!/usr/bin/env python3
"""runner against PyTorch on this machine, in one invocation: the same workloads, the same thread
count, each in its own process (so peak memory is per workload), warm-up then repeats, medians.
Before timing, each workload checks that both sides compute the same thing from the same weights
and inputs (runner writes them to bench/out/<workload>.safetensors).

    RUNNER_ASSETS=../shared/assets python bench/compare.py [--runner target/release/runner]
        [--threads 2] [--repeats 5] [--only vgg16_forward,augment] [--images 1000,4000]

GPU (bench/gpu.sh runs it so): runner on `--device wgpu` against PyTorch on CUDA, in its defaults
and with channels_last + cudnn.benchmark, every timing synchronised with the device:

    RUNNER_ASSETS=... python bench/compare.py --gpu [--torch-device cuda] [--set data.image_size=[48,48]]

CPU peers, each its own column and each checked equal to runner before it is timed: PyTorch
eager (its default), channels_last, torch.compile (inductor), and ONNX Runtime (CPU) on the same
weights exported to ONNX for the VGG16 forward and the feature extraction. The ratio is runner
over the best of them.

Needs (in the Python that runs it, a venv outside the repo): torch, torchvision, numpy,
safetensors, pillow, onnx, onnxruntime. Prints one table (markdown).
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time
import tomllib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKLOADS = ["matmul", "vgg16_forward", "fine_tune_step", "conv_head_step", "dense_head_epoch",
             "decode_resize", "augment", "extract"]
# The GPU table: (row name, runner workload, extra --set for both sides); LARGE is --large-batch.
GPU_WORKLOADS = [
    ("vgg16_forward", "vgg16_forward", []),
    ("vgg16_forward (large batch)", "vgg16_forward", ["data.batch_size=LARGE"]),
    ("fine_tune_step", "fine_tune_step", []),
    ("conv_head_step", "conv_head_step", []),
    ("dense_head_epoch", "dense_head_epoch", []),
    ("fine_tune_epoch", "fine_tune_epoch", []),
]
CAFFE_MEAN = [103.939, 116.779, 123.68]


def run_child(cmd, env):
    """Runs cmd, returns (stdout, peak RSS of the child in MiB)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out, err = p.communicate()
    # communicate() reaped it; rusage of all waited-for children is cumulative-max, so read the
    # child's own figure from its JSON when it has one.
    if p.returncode != 0:
        import signal
        how = (f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0
               else f"exit code {p.returncode}")
        tail = [ln for ln in err.splitlines() if ln.strip() and " WARN " not in ln and " INFO " not in ln]
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-3000:]}\n"
                           f"{how}" + (f": {tail[-1][-300:]}" if tail else ""))
    return out


# ---------------------------------------------------------------- PyTorch side (worker process)

CHECK_ONLY = [False]  # --check-only: the worker stops after its check (timing_defaults)


class Checked(Exception):
    """Raised by a --check-only worker once its check passed, carrying its result."""

    def __init__(self, res):
        super().__init__("checked")
        self.res = res


SYNC = [lambda: None]  # torch.cuda.synchronize on a GPU: the clock stops when the work is done


def median_time(f, warmup, repeats):
    for _ in range(warmup):
        f()
    SYNC[0]()
    ts = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        f()
        SYNC[0]()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2], ts


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def rel(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def vgg16(torch, nn, weights_path):
    from safetensors.numpy import load_file
    w = load_file(weights_path)
    blocks = [2, 2, 3, 3, 3]
    widths = [64, 128, 256, 512, 512]
    layers, cin = [], 3
    for b, (n, c) in enumerate(zip(blocks, widths), start=1):
        for i in range(1, n + 1):
            conv = nn.Conv2d(cin, c, 3, padding=1)
            conv.weight.data = torch.from_numpy(w[f"block{b}_conv{i}.weight"])
            conv.bias.data = torch.from_numpy(w[f"block{b}_conv{i}.bias"])
            layers += [conv, nn.ReLU(inplace=True)]
            cin = c
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def load_head(torch, modules, check, dev="cpu", fmt=None):
    """Assigns runner's initial head parameters (check `head.<i>`, burn layouts) in order, on
    `dev` (a convolution's kernel in memory format `fmt`)."""
    params = [p for m in modules for p in m.parameters()]
    i = 0
    for p in params:
        v = torch.from_numpy(np.ascontiguousarray(check[f"head.{i}"]))
        if v.ndim == 2:  # burn Linear [in, out] -> torch [out, in]
            v = v.t().contiguous()
        assert tuple(v.shape) == tuple(p.shape), (i, v.shape, p.shape)
        v = v.clone().to(dev)
        p.data = v.contiguous(memory_format=fmt) if fmt is not None and v.ndim == 4 else v
        i += 1
    assert f"head.{i}" not in check, "runner's head has more parameters"


SETS = []  # --set key=value overrides, applied to the experiments as runner applies them


def experiment(name):
    with open(os.path.join(ROOT, "experiments", name), "rb") as f:
        exp = tomllib.load(f)
    for kv in SETS:
        key, value = kv.split("=", 1)
        *path, last = key.split(".")
        table = exp
        for k in path:
            table = table.setdefault(k, {})
        table[last] = tomllib.loads(f"v = {value}")["v"]
    return exp


def rmsprop(torch, params, lr):
    # Keras' RMSprop (rho 0.9, no momentum, epsilon 1e-7) = torch's with alpha 0.9.
    return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-7, momentum=0.0)


def check_two_steps(torch, forward, params, lr, x, y, want):
    """Two one-step epochs as runner's check: training loss before each update, validation loss
    after it, dropout off."""
    bce = torch.nn.BCEWithLogitsLoss()
    opt = rmsprop(torch, params, lr)
    got = []
    for _ in range(2):
        opt.zero_grad()
        loss = bce(forward(x)[:, 0], y)
        loss.backward()
        got.append(loss.item())
        opt.step()
        with torch.no_grad():
            got.append(bce(forward(x)[:, 0], y).item())
    return rel(got, want), got


def assert_two_steps(res, r, got, want):
    """The loss before any update must agree to 1e-4; after RMSprop's first steps, which divide each
    gradient by its own magnitude (so a gradient that rounding sends across zero moves its weight
    the other way), to 2e-3: channels_last and the GPU's kernels round differently."""
    first = abs(got[0] - float(want[0])) / max(abs(float(want[0])), 1e-12)
    res["check"] = f"first loss rel err {first:.1e}, after two updates {r:.1e}"
    assert first < 1e-4 and r < 2e-3, (res["check"], got, want.tolist())


# The peers of the CPU table, each its own column: PyTorch as a user runs it by default, with
# channels_last, with torch.compile (inductor), and ONNX Runtime on the same weights exported.
PEERS = ["eager", "channels_last", "compile", "ort"]
PEER_LABEL = {"eager": "PyTorch", "channels_last": "PyTorch channels_last",
              "compile": "PyTorch torch.compile", "ort": "ONNX Runtime"}
# Which peers a workload has (no convolution: no channels_last; ONNX Runtime: inference only).
WORKLOAD_PEERS = {
    "matmul": ["eager"],
    "vgg16_forward": ["eager", "channels_last", "compile", "ort"],
    "fine_tune_step": ["eager", "channels_last", "compile"],
    "conv_head_step": ["eager", "channels_last", "compile"],
    "dense_head_epoch": ["eager", "compile"],
    "decode_resize": ["eager"],
    "augment": ["eager"],
    "extract": ["eager", "ort"],
}


def ort_session(torch, base, x, threads):
    """`base` exported to ONNX (opset 17, any batch) and an ONNX Runtime CPU session on it."""
    import tempfile
    import onnxruntime as ort
    path = os.path.join(tempfile.mkdtemp(prefix="runner-bench-"), "vgg16.onnx")
    torch.onnx.export(base, x[:1], path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"x": np.ascontiguousarray(a, np.float32)})[0]


def torch_worker(name, out, warmup, repeats, images_n, device="cpu", channels_last=False, size=150,
                 mode="eager"):
    import torch
    import torch.nn as nn
    from safetensors.numpy import load_file
    torch.manual_seed(0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        SYNC[0] = torch.cuda.synchronize
        # The check compares float32 arithmetic: no TF32 while checking (restored for timing).
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = channels_last
    else:
        tf32 = None

    def timing_defaults():
        if CHECK_ONLY[0]:
            raise Checked(res)
        if tf32 is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32

    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def to(x):
        x = x.to(dev)
        return x.contiguous(memory_format=fmt) if x.ndim == 4 else x

    assets = os.environ.get("RUNNER_ASSETS", os.path.join(ROOT, "..", "shared", "assets"))
    weights = os.path.join(assets, "weights", "vgg16_imagenet_notop.safetensors")
    data = os.path.join(assets, "data", "cats_and_dogs_small")
    res = {"workload": name, "check": ""}
    check = load_file(os.path.join(out, f"{name}.safetensors")) if name not in ("matmul", "augment", "extract") else {}

    compiled = mode == "compile"

    def net(m):
        return m.to(dev).to(memory_format=fmt)

    def maybe_compile(f):
        return torch.compile(f) if compiled else f

    if name == "matmul":
        n = 2048
        a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
        med, ts = median_time(lambda: a @ b, warmup, repeats)
        res.update(items=1, gflop_per_item=2 * n ** 3 / 1e9)

    elif name == "vgg16_forward":
        base = net(vgg16(torch, nn, weights).eval())
        x = to(torch.from_numpy(check["input"]))
        with torch.no_grad():
            if mode == "ort":
                run = ort_session(torch, base, x, torch.get_num_threads())
                xn = x.numpy()
                forward = lambda: run(xn)  # noqa: E731
                y = forward()
            else:
                base = maybe_compile(base)
                forward = lambda: base(x)  # noqa: E731
                y = forward().float().cpu().numpy()
            err = rel(y, check["output"])
            res["check"] = f"output rel err {err:.1e}"
            assert err < 1e-4, res["check"]
            timing_defaults()
            med, ts = median_time(forward, warmup, repeats)
        res.update(items=x.shape[0])

    elif name in ("fine_tune_step", "conv_head_step", "fine_tune_epoch"):
        base = net(vgg16(torch, nn, weights))
        x = to(torch.from_numpy(check["input"]))
        y = to(torch.from_numpy(check["labels"]))
        hw = x.shape[-1] // 32  # the base's output is (size / 32) square
        if name in ("fine_tune_step", "fine_tune_epoch"):
            exp = experiment("fine_tune.toml")
            lr = exp["phase"][1]["optimizer"]["lr"]
            frozen, block5 = base[:24], base[24:]
            for p in frozen.parameters():
                p.requires_grad_(False)
            dense = [nn.Linear(512 * hw * hw, 256).to(dev), nn.Linear(256, 1).to(dev)]
            load_head(torch, dense, check, dev)
            drop = nn.Dropout(0.0)
            def trainable(f):
                return dense[1](drop(torch.relu(dense[0](torch.flatten(block5(f), 1)))))
            params = list(block5.parameters()) + [p for m in dense for p in m.parameters()]
        else:
            exp = experiment("conv_head.toml")
            lr = exp["optimizer"]["lr"]
            frozen = base
            for p in frozen.parameters():
                p.requires_grad_(False)
            conv = net(nn.Conv2d(512, 32, 3))
            flat = 32 * max(hw - 2, 0) ** 2
            dense = [nn.Linear(flat, 256).to(dev), nn.Linear(256, 1).to(dev)]
            load_head(torch, [conv] + dense, check, dev, fmt)
            drop = None
            def trainable(f):
                return dense[1](torch.relu(dense[0](torch.flatten(torch.relu(conv(f)), 1))))
            params = [p for m in [conv] + dense for p in m.parameters()]

        frozen_run, trainable_run = maybe_compile(frozen), maybe_compile(trainable)

        def forward(x):
            with torch.no_grad():
                f = frozen_run(x)
            return trainable_run(f)
        r, got = check_two_steps(torch, forward, params, lr, x, y, check["metrics"])
        assert_two_steps(res, r, got, check["metrics"])
        timing_defaults()

        if drop is not None:
            drop.p = 0.5
        opt = rmsprop(torch, params, lr)
        bce = nn.BCEWithLogitsLoss()
        from torchvision.transforms import v2
        aug = v2.Compose([v2.RandomAffine(degrees=40, translate=(0.2, 0.2), scale=(0.8, 1.2), shear=0.2),
                          v2.RandomHorizontalFlip()])
        mean = torch.tensor(CAFFE_MEAN).view(1, 3, 1, 1)

        def step(xb, yb):
            opt.zero_grad()
            loss = bce(forward(xb)[:, 0], yb)
            loss.backward()
            opt.step()

        if name == "fine_tune_epoch":
            # A PyTorch user's epoch: the decoded training images in memory, augmented per image
            # by DataLoader workers, pinned, copied to the device while it computes.
            files = sorted(glob.glob(os.path.join(data, "train", "*", "*.jpg")))[:images_n]
            pixels = torch.stack([torch.from_numpy(decode_one(f, size)).permute(2, 0, 1) for f in files])
            labels = torch.tensor([float("/dogs/" in f) for f in files])
            batch = int(exp["data"]["batch_size"])

            workers = min(8, os.cpu_count() or 1)
            loader = torch.utils.data.DataLoader(
                Augmented(pixels, labels, aug), batch_size=batch, shuffle=True, num_workers=workers,
                pin_memory=dev.type == "cuda", persistent_workers=True, drop_last=False)
            mean_dev = mean.to(dev)

            def epoch():
                for xb, yb in loader:
                    xb = xb.to(dev, non_blocking=True).float()
                    step(to(xb.flip(1) - mean_dev), yb.to(dev, non_blocking=True))
            med, ts = median_time(epoch, warmup, repeats)
            res.update(items=len(files), gflop_per_item=None, loader_workers=workers)
        else:
            if name == "conv_head_step":
                # The batch as decoded pixels (uint8 RGB): undo caffe preprocessing of the check input.
                pixels = (x.cpu() + mean).flip(1).round().clamp(0, 255).to(torch.uint8)

                def batch():
                    imgs = torch.stack([aug(p) for p in pixels]).float()
                    return to(imgs.flip(1) - mean)
            else:
                def batch():
                    return x
            med, ts = median_time(lambda: step(batch(), y), warmup, repeats)
            res.update(items=x.shape[0], gflop_per_item=None)

    elif name == "dense_head_epoch":
        exp = experiment("feature_extraction.toml")
        lr = exp["optimizer"]["lr"]
        batch = exp["data"]["batch_size"]
        n_in = check["features"].shape[1]
        dense = [nn.Linear(n_in, 256).to(dev), nn.Linear(256, 1).to(dev)]
        load_head(torch, dense, check, dev)
        drop = nn.Dropout(0.0)
        def forward_eager(f):
            return dense[1](drop(torch.relu(dense[0](f))))
        forward = maybe_compile(forward_eager)
        params = [p for m in dense for p in m.parameters()]
        r, got = check_two_steps(torch, forward, params, lr, to(torch.from_numpy(check["features"])),
                                 to(torch.from_numpy(check["labels"])), check["metrics"])
        assert_two_steps(res, r, got, check["metrics"])
        timing_defaults()
        drop.p = 0.5
        # The split resident on the device, as runner keeps it.
        feats = torch.rand(2000, n_in, device=dev)
        labels = (torch.arange(2000, device=dev) % 2).float()
        opt = rmsprop(torch, params, lr)
        bce = nn.BCEWithLogitsLoss()

        def epoch():
            order = torch.randperm(2000, device=dev)
            for i in range(0, 2000, batch):
                idx = order[i:i + batch]
                opt.zero_grad()
                loss = bce(forward(feats[idx])[:, 0], labels[idx])
                loss.backward()
                opt.step()
        med, ts = median_time(epoch, warmup, repeats)
        res.update(items=2000)

    elif name == "decode_resize":
        from concurrent.futures import ProcessPoolExecutor
        files = sorted(glob.glob(os.path.join(data, "*", "*", "*.jpg")))
        threads = torch.get_num_threads()
        with ProcessPoolExecutor(threads) as pool:
            med, ts = median_time(lambda: list(pool.map(decode_one, files, chunksize=64)), warmup, repeats)
        res.update(items=len(files), check="not compared (different JPEG decoders and resize filters)")

    elif name == "augment":
        from torchvision.transforms import v2
        files = sorted(glob.glob(os.path.join(data, "train", "*", "*.jpg")))
        pixels = [torch.from_numpy(decode_one(f)).permute(2, 0, 1).contiguous() for f in files]
        aug = v2.Compose([v2.RandomAffine(degrees=40, translate=(0.2, 0.2), scale=(0.8, 1.2), shear=0.2),
                          v2.RandomHorizontalFlip()])
        med, ts = median_time(lambda: [aug(p) for p in pixels], warmup, repeats)
        res.update(items=len(pixels), check="not compared (random transforms; parity is tested in tests/augment_parity.rs)")

    elif name == "extract":
        from PIL import Image  # noqa: F401
        base = vgg16(torch, nn, weights).eval()
        files = []
        for split in ["train", "validation", "test"]:
            files += sorted(glob.glob(os.path.join(data, split, "*", "*.jpg")))
        files = files[:images_n]
        mean = torch.tensor(CAFFE_MEAN).view(1, 3, 1, 1)
        run = base
        if mode == "ort":
            run = ort_session(torch, base, torch.zeros(1, 3, size, size), torch.get_num_threads())
        t = time.perf_counter()
        feats = []
        with torch.no_grad():
            for i in range(0, len(files), 20):
                x = torch.stack([torch.from_numpy(decode_one(f)).permute(2, 0, 1) for f in files[i:i + 20]]).float()
                xb = x.flip(1) - mean
                feats.append(run(xb.numpy()) if mode == "ort" else base(xb))
        med, ts = time.perf_counter() - t, [time.perf_counter() - t]
        res.update(items=len(files), check="streamed: decoded per batch, features kept")

    res.update(median_s=med, seconds=ts, items_per_s=res["items"] / med, peak_rss_mib=peak_rss_mib(),
               threads=torch.get_num_threads(), device=str(dev), channels_last=channels_last, mode=mode)
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    print(json.dumps(res))


class Augmented:
    """Decoded images in memory, each augmented when a DataLoader worker fetches it (a map-style
    dataset; at module level so that workers can unpickle it under any start method)."""

    def __init__(self, pixels, labels, aug):
        self.pixels, self.labels, self.aug = pixels, labels, aug

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return self.aug(self.pixels[i]), self.labels[i]


def decode_one(path, size=150):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))


# ---------------------------------------------------------------- the driver

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runner", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "runner"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default=None)
    ap.add_argument("--images", default="1000,4000", help="image counts for the memory workload (the GPU epoch: one count)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--gpu", action="store_true", help="the GPU table: runner --device wgpu against PyTorch on --torch-device")
    ap.add_argument("--torch-device", default="auto", help="cuda, cpu or auto (cuda when there is one)")
    ap.add_argument("--set", action="append", default=[], help="key=value for the experiments' specs, both sides")
    ap.add_argument("--large-batch", type=int, default=64, help="the batch of the second VGG16 forward row")
    ap.add_argument("--variant", action="append", default=[],
                    help="GPU table: label=binary:device (repeatable; default wgpu=<--runner>:wgpu)")
    ap.add_argument("--table", default=None, help="GPU table: the markdown file, rewritten after each workload")
    ap.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    ap.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="eager", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=150, help=argparse.SUPPRESS)
    args = ap.parse_args()

    SETS.extend(args.set)
    if args.torch_worker:
        import torch
        torch.set_num_threads(args.threads)
        CHECK_ONLY[0] = args.check_only
        try:
            torch_worker(args.torch_worker, args.out, args.warmup, args.repeats, args.images and int(args.images),
                         args.torch_device, args.channels_last or args.mode == "channels_last", args.size,
                         args.mode)
        except Checked as c:
            print(json.dumps(c.res))
        return

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               RUNNER_LOG="warn")
    if args.gpu:
        return gpu_table(args, env)
    rows = []
    for w in (args.only or ",".join(WORKLOADS)).split(","):
        counts = args.images.split(",") if w == "extract" else [None]
        for n in counts:
            extra = ["--images", n] if n else []
            reps = ["--warmup", "0", "--repeats", "1"] if w == "extract" else ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
            r = json.loads(run_child([args.runner, "bench-workload", w, "--out", args.out] + reps + extra, env).strip().splitlines()[-1])
            peers = {}
            for mode in WORKLOAD_PEERS.get(w, ["eager"]):
                # torch.compile's first calls compile: one more warm-up run than the others.
                mreps = reps if mode != "compile" else ["--warmup", str(args.warmup + 1)] + reps[2:]
                try:
                    peers[mode] = json.loads(run_child(
                        [sys.executable, __file__, "--torch-worker", w, "--out", args.out, "--threads", str(args.threads),
                         "--images", n or "0", "--mode", mode] + mreps, env).strip().splitlines()[-1])
                except RuntimeError as e:
                    peers[mode] = {"failed": str(e).strip().splitlines()[-1][-200:]}
            rows.append((w if not n else f"{w} ({n} images)", r, peers))
            got = ", ".join(f"{m} {p['items_per_s']:.2f}/s" if "items_per_s" in p else f"{m} failed" for m, p in peers.items())
            print(f"{rows[-1][0]}: runner {r['items_per_s']:.2f}/s, {got}", file=sys.stderr)

    ceiling = max([r["gflop_per_s"] for w, r, _ in rows if w == "matmul"] +
                  [p["eager"]["items_per_s"] * p["eager"]["gflop_per_item"] for w, _, p in rows if w == "matmul"] or [float("nan")])
    print(f"runner vs the strongest CPU peer, {args.threads} threads, median of {args.repeats} after {args.warmup} warm-up "
          f"(torch.compile: one more); each peer checked equal to runner before timing. Ceiling = best measured float32 "
          f"matmul: {ceiling:.0f} GFLOP/s. runner's GFLOP/s counts the multiplies its kernels do (Winograd: F(2x2,3x3) "
          f"16 per 2x2 tile where the direct convolution does 36, F(4x4,3x3) 36 per 4x4 tile where it does 144; the trainable convolutions' backward in a training step); a peer's counts the "
          f"direct convolutions' forward.\n")
    head = ["workload", "runner items/s"] + [f"{PEER_LABEL[m]} items/s" for m in PEERS] + [
        "runner / best peer", "runner GFLOP/s done (% of ceiling)", "best peer GFLOP/s (% of ceiling)",
        "runner peak MiB", "best peer peak MiB", "same result (best peer)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for w, r, peers in rows:
        ok = {m: p for m, p in peers.items() if "items_per_s" in p}
        best_mode = max(ok, key=lambda m: ok[m]["items_per_s"]) if ok else None
        best = ok[best_mode] if best_mode else None

        def cell(m):
            if m not in peers:
                return "-"
            p = peers[m]
            return f"{p['items_per_s']:.2f}" if "items_per_s" in p else "failed"

        done = r.get("done_gflop_per_item") or r.get("gflop_per_item") or 0.0
        direct = r.get("gflop_per_item") or 0.0

        def g(ips, gf):
            return f"{ips * gf:.0f} ({100 * ips * gf / ceiling:.0f} %)" if gf else "-"
        ratio = f"{r['items_per_s'] / best['items_per_s']:.2f} ({PEER_LABEL[best_mode]})" if best else "-"
        cols = [f"{w}: {r['what']}", f"{r['items_per_s']:.2f}"] + [cell(m) for m in PEERS] + [
            ratio, g(r["items_per_s"], done), g(best["items_per_s"], direct) if best else "-",
            f"{r['peak_rss_mib']:.0f}", f"{best['peak_rss_mib']:.0f}" if best else "-",
            (best.get("check") or "-") if best else "-"]
        print("| " + " | ".join(cols) + " |")
    for w, r, peers in rows:
        for m, p in peers.items():
            if "failed" in p:
                print(f"\n{w}, {PEER_LABEL[m]}: failed: {p['failed']}")


def gpu_table(args, env):
    """runner's GPU variants (--variant label=binary:device, e.g. wgsl=runner:wgpu,
    spirv=runner-x:wgpu) against PyTorch on the same card, default and
    channels_last. PyTorch is timed once per workload and checked against the first variant's
    outputs; every other variant is checked against PyTorch too (check only). A variant that fails
    (a kernel the adapter refuses, say) is reported and left out of the later rows. The
    table is rewritten after every workload, so a run stopped at its time limit keeps its rows."""
    torch_device = args.torch_device
    if torch_device == "auto":
        out = run_child([sys.executable, "-c", "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"], env)
        torch_device = out.strip().splitlines()[-1]
    variants = []
    for v in args.variant or [f"wgpu={args.runner}:wgpu"]:
        label, rest = v.split("=", 1)
        binary, device = rest.rsplit(":", 1)
        variants.append((label, binary, device))
    sets = [x for kv in args.set for x in ("--set", kv)]
    size = 150
    for kv in args.set:
        if kv.startswith("data.image_size="):
            size = int(kv.split("=", 1)[1].strip("[]").split(",")[0])
    epoch_images = args.images.split(",")[0]
    names = args.only.split(",") if args.only else None
    rows, failed, devices = [], {}, {}

    def torch_child(w, out_dir, wsets, reps, cl=False, check_only=False):
        cmd = [sys.executable, __file__, "--torch-worker", w, "--out", out_dir, "--threads", str(args.threads),
               "--images", epoch_images, "--torch-device", torch_device, "--size", str(size)] + reps + wsets
        cmd += (["--channels-last"] if cl else []) + (["--check-only"] if check_only else [])
        return json.loads(run_child(cmd, env).strip().splitlines()[-1])

    for row, w, extra_sets in GPU_WORKLOADS:
        if names and row not in names and w not in names:
            continue
        out_dir = os.path.join(args.out, "gpu", row.replace(" ", "_").replace("(", "").replace(")", ""))
        wsets = sets + [x for kv in extra_sets for x in ("--set", kv.replace("LARGE", str(args.large_batch)))]
        reps = ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        t0 = time.time()
        rs = []  # (label, report, check)
        for label, binary, device in variants:
            if label in failed:
                continue
            vdir = os.path.join(out_dir, label)
            try:
                r = json.loads(run_child([binary, "bench-workload", w, "--device", device, "--out", vdir,
                                          "--images", epoch_images] + wsets + reps, env).strip().splitlines()[-1])
            except RuntimeError as e:
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                failed[label] = f"{row}: " + (lines[-1] if lines else str(e))[-400:]
                print(f"{row}: {label} failed: {failed[label]}", file=sys.stderr)
                continue
            devices[label] = r.get("device", device)
            rs.append([label, r, vdir])
        if not rs:
            continue
        ts = []
        for cl in [False, True]:
            if cl and w == "dense_head_epoch":
                ts.append(None)  # no convolution: memory format does not apply
                continue
            ts.append(torch_child(w, rs[0][2], wsets, reps, cl))
        for entry in rs:
            if entry is rs[0]:
                entry[2] = ts[0]["check"] or "-"
                continue
            try:
                entry[2] = torch_child(w, entry[2], wsets, reps, check_only=True)["check"] or "-"
            except RuntimeError as e:
                entry[2] = "DIFFERS: " + str(e).strip().splitlines()[-1][-300:]
        rows.append((row, rs, ts))
        best = max(t["items_per_s"] for t in ts if t)
        got = ", ".join(f"{label} {r['items_per_s']:.2f}/s" for label, r, _ in rs)
        print(f"{row}: runner {got}, torch best {best:.2f}/s ({time.time() - t0:.0f} s)", file=sys.stderr)
        write_gpu_table(args, rows, failed, devices, torch_device)
    write_gpu_table(args, rows, failed, devices, torch_device)


def write_gpu_table(args, rows, failed, devices, torch_device):
    gpu = next((t.get("gpu") for _, _, ts in rows for t in ts if t and t.get("gpu")), torch_device)
    lines = [f"runner vs PyTorch on {gpu}, median of {args.repeats} after {args.warmup} warm-up, "
             f"every timing synchronised with the device; PyTorch checked with TF32 off, timed in its defaults "
             f"(TF32 convolutions on a GPU) and with channels_last + cudnn.benchmark. runner variants: "
             + "; ".join(f"`{label}` = {d}" for label, d in devices.items()), ""]
    lines.append("| workload | runner variant | runner items/s | PyTorch items/s | PyTorch channels_last items/s | runner / best PyTorch | runner GFLOP/s | seconds per run (runner) | same result |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for row, rs, ts in rows:
        best = max(t["items_per_s"] for t in ts if t)
        cl = f"{ts[1]['items_per_s']:.1f}" if ts[1] else "-"
        for label, r, check in rs:
            gf = r.get("gflop_per_item") or 0.0
            lines.append(f"| {row}: {r['what']} | {label} | {r['items_per_s']:.1f} | {ts[0]['items_per_s']:.1f} | {cl} | "
                         f"{r['items_per_s'] / best:.2f} | {r['items_per_s'] * gf:.0f} | {r['median_s']:.3f} | {check} |")
    for label, why in failed.items():
        lines += ["", f"`{label}` failed: {why}"]
    text = "\n".join(lines) + "\n"
    if args.table:
        with open(args.table + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.table + ".tmp", args.table)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
