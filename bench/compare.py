#!/usr/bin/env python3
"""runner against PyTorch on this machine, in one invocation: the same workloads, the same thread
count, each in its own process (so peak memory is per workload), warm-up then repeats, medians.
Before timing, each workload checks that both sides compute the same thing from the same weights
and inputs (runner writes them to bench/out/<workload>.safetensors).

    RUNNER_ASSETS=../shared/assets python bench/compare.py [--runner target/release/runner]
        [--threads 2] [--repeats 5] [--only vgg16_forward,augment] [--images 1000,4000]

Needs (in the Python that runs it, a venv outside the repo): torch (CPU wheel), torchvision,
numpy, safetensors, pillow. Prints one table (markdown).
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
CAFFE_MEAN = [103.939, 116.779, 123.68]


def run_child(cmd, env):
    """Runs cmd, returns (stdout, peak RSS of the child in MiB)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out, err = p.communicate()
    # communicate() reaped it; rusage of all waited-for children is cumulative-max, so read the
    # child's own figure from its JSON when it has one.
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-3000:]}")
    return out


# ---------------------------------------------------------------- PyTorch side (worker process)

def median_time(f, warmup, repeats):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        f()
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


def load_head(torch, modules, check):
    """Assigns runner's initial head parameters (check `head.<i>`, burn layouts) in order."""
    params = [p for m in modules for p in m.parameters()]
    i = 0
    for p in params:
        v = torch.from_numpy(np.ascontiguousarray(check[f"head.{i}"]))
        if v.ndim == 2:  # burn Linear [in, out] -> torch [out, in]
            v = v.t().contiguous()
        assert tuple(v.shape) == tuple(p.shape), (i, v.shape, p.shape)
        p.data = v.clone()
        i += 1
    assert f"head.{i}" not in check, "runner's head has more parameters"


def experiment(name):
    with open(os.path.join(ROOT, "experiments", name), "rb") as f:
        return tomllib.load(f)


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


def torch_worker(name, out, warmup, repeats, images_n):
    import torch
    import torch.nn as nn
    from safetensors.numpy import load_file
    torch.manual_seed(0)
    assets = os.environ.get("RUNNER_ASSETS", os.path.join(ROOT, "..", "shared", "assets"))
    weights = os.path.join(assets, "weights", "vgg16_imagenet_notop.safetensors")
    data = os.path.join(assets, "data", "cats_and_dogs_small")
    res = {"workload": name, "check": ""}
    check = load_file(os.path.join(out, f"{name}.safetensors")) if name not in ("matmul", "augment", "extract") else {}

    if name == "matmul":
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        med, ts = median_time(lambda: a @ b, warmup, repeats)
        res.update(items=1, gflop_per_item=2 * n ** 3 / 1e9)

    elif name == "vgg16_forward":
        base = vgg16(torch, nn, weights).eval()
        x = torch.from_numpy(check["input"])
        with torch.no_grad():
            y = base(x)
            res["check"] = f"output rel err {rel(y.numpy(), check['output']):.1e}"
            assert rel(y.numpy(), check["output"]) < 1e-4, res["check"]
            med, ts = median_time(lambda: base(x), warmup, repeats)
        res.update(items=x.shape[0])

    elif name in ("fine_tune_step", "conv_head_step"):
        base = vgg16(torch, nn, weights)
        x = torch.from_numpy(check["input"])
        y = torch.from_numpy(check["labels"])
        if name == "fine_tune_step":
            exp = experiment("fine_tune.toml")
            lr = exp["phase"][1]["optimizer"]["lr"]
            frozen, block5 = base[:24], base[24:]
            for p in frozen.parameters():
                p.requires_grad_(False)
            dense = [nn.Linear(512 * 4 * 4, 256), nn.Linear(256, 1)]
            load_head(torch, dense, check)
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
            conv = nn.Conv2d(512, 32, 3)
            dense = [nn.Linear(32 * 2 * 2, 256), nn.Linear(256, 1)]
            load_head(torch, [conv] + dense, check)
            drop = None
            def trainable(f):
                return dense[1](torch.relu(dense[0](torch.flatten(torch.relu(conv(f)), 1))))
            params = [p for m in [conv] + dense for p in m.parameters()]

        def forward(x):
            with torch.no_grad():
                f = frozen(x)
            return trainable(f)
        r, got = check_two_steps(torch, forward, params, lr, x, y, check["metrics"])
        res["check"] = f"losses rel err {r:.1e}"
        assert r < 1e-4, (res["check"], got, check["metrics"].tolist())

        if drop is not None:
            drop.p = 0.5
        opt = rmsprop(torch, params, lr)
        bce = nn.BCEWithLogitsLoss()
        if name == "conv_head_step":
            from torchvision.transforms import v2
            aug = v2.Compose([v2.RandomAffine(degrees=40, translate=(0.2, 0.2), scale=(0.8, 1.2), shear=0.2),
                              v2.RandomHorizontalFlip()])
            # The batch as decoded pixels (uint8 RGB): undo caffe preprocessing of the check input.
            mean = torch.tensor(CAFFE_MEAN).view(1, 3, 1, 1)
            pixels = (x + mean).flip(1).round().clamp(0, 255).to(torch.uint8)

            def batch():
                imgs = torch.stack([aug(p) for p in pixels]).float()
                return imgs.flip(1) - mean
        else:
            def batch():
                return x

        def step():
            opt.zero_grad()
            loss = bce(forward(batch())[:, 0], y)
            loss.backward()
            opt.step()
        med, ts = median_time(step, warmup, repeats)
        res.update(items=x.shape[0], gflop_per_item=None)

    elif name == "dense_head_epoch":
        exp = experiment("feature_extraction.toml")
        lr = exp["optimizer"]["lr"]
        batch = exp["data"]["batch_size"]
        dense = [nn.Linear(8192, 256), nn.Linear(256, 1)]
        load_head(torch, dense, check)
        drop = nn.Dropout(0.0)
        def forward(f):
            return dense[1](drop(torch.relu(dense[0](f))))
        params = [p for m in dense for p in m.parameters()]
        r, got = check_two_steps(torch, forward, params, lr, torch.from_numpy(check["features"]),
                                 torch.from_numpy(check["labels"]), check["metrics"])
        res["check"] = f"losses rel err {r:.1e}"
        assert r < 1e-4, (res["check"], got, check["metrics"].tolist())
        drop.p = 0.5
        feats = torch.rand(2000, 8192)
        labels = (torch.arange(2000) % 2).float()
        opt = rmsprop(torch, params, lr)
        bce = nn.BCEWithLogitsLoss()

        def epoch():
            order = torch.randperm(2000)
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
        t = time.perf_counter()
        feats = []
        with torch.no_grad():
            for i in range(0, len(files), 20):
                x = torch.stack([torch.from_numpy(decode_one(f)).permute(2, 0, 1) for f in files[i:i + 20]]).float()
                feats.append(base(x.flip(1) - mean))
        med, ts = time.perf_counter() - t, [time.perf_counter() - t]
        res.update(items=len(files), check="streamed: decoded per batch, features kept")

    res.update(median_s=med, seconds=ts, items_per_s=res["items"] / med, peak_rss_mib=peak_rss_mib(),
               threads=torch.get_num_threads())
    print(json.dumps(res))


def decode_one(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((150, 150), Image.BILINEAR))


# ---------------------------------------------------------------- the driver

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runner", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "runner"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default=",".join(WORKLOADS))
    ap.add_argument("--images", default="1000,4000", help="image counts for the memory workload")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.torch_worker:
        import torch
        torch.set_num_threads(args.threads)
        torch_worker(args.torch_worker, args.out, args.warmup, args.repeats, args.images and int(args.images))
        return

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               RUNNER_LOG="warn")
    rows = []
    for w in args.only.split(","):
        counts = args.images.split(",") if w == "extract" else [None]
        for n in counts:
            extra = ["--images", n] if n else []
            reps = ["--warmup", "0", "--repeats", "1"] if w == "extract" else ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
            r = json.loads(run_child([args.runner, "bench-workload", w, "--out", args.out] + reps + extra, env).strip().splitlines()[-1])
            t = json.loads(run_child([sys.executable, __file__, "--torch-worker", w, "--out", args.out,
                                      "--threads", str(args.threads), "--images", n or "0"] + reps, env).strip().splitlines()[-1])
            rows.append((w if not n else f"{w} ({n} images)", r, t))
            print(f"{rows[-1][0]}: runner {r['items_per_s']:.2f}/s, torch {t['items_per_s']:.2f}/s", file=sys.stderr)

    ceiling = max([r["gflop_per_s"] for w, r, _ in rows if w == "matmul"] +
                  [t["items_per_s"] * t["gflop_per_item"] for w, _, t in rows if w == "matmul"] or [float("nan")])
    print(f"runner vs PyTorch, {args.threads} threads, median of {args.repeats} after {args.warmup} warm-up; "
          f"ceiling = best measured float32 matmul: {ceiling:.0f} GFLOP/s\n")
    print("| workload | runner items/s | PyTorch items/s | runner / PyTorch | runner GFLOP/s (% of ceiling) | PyTorch GFLOP/s (% of ceiling) | runner peak MiB | PyTorch peak MiB | same result |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w, r, t in rows:
        gf = r.get("gflop_per_item") or 0.0
        def g(ips):
            return f"{ips * gf:.0f} ({100 * ips * gf / ceiling:.0f} %)" if gf else "-"
        print(f"| {w}: {r['what']} | {r['items_per_s']:.2f} | {t['items_per_s']:.2f} | "
              f"{r['items_per_s'] / t['items_per_s']:.2f} | {g(r['items_per_s'])} | {g(t['items_per_s'])} | "
              f"{r['peak_rss_mib']:.0f} | {t['peak_rss_mib']:.0f} | {t['check'] or '-'} |")


if __name__ == "__main__":
    main()
