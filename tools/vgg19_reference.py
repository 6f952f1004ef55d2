"""Independent reference for runner's VGG19 base: weights drawn from the tests' SplitMix64 stream
(tests/common/mod.rs, `Rng`), reimplemented here in numpy, and a plain numpy forward pass (float64,
im2col; the same code as tools/vgg16_reference.py with VGG19's 2-2-4-4-4 blocks). Run once to make
tests/fixtures/vgg19_reference.safetensors:

    python tools/vgg19_reference.py tests/fixtures/vgg19_reference.safetensors

The fixture holds only the input (`input`, [3, 64, 64] float32) and the output (`output`,
[512, 2, 2] float32): the Rust test draws the same weights from the same seed. Needs numpy,
safetensors.
"""
import sys
import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from vgg16_reference import forward  # noqa: E402

BLOCKS = [2, 2, 4, 4, 4]
CHANNELS = [64, 128, 256, 512, 512]
WEIGHT_SEED, INPUT_SEED = 21, 22
GAMMA = np.uint64(0x9E3779B97F4A7C15)


class Rng:
    """SplitMix64, as tests/common/mod.rs: state += GAMMA, then the mix."""

    def __init__(self, seed):
        self.state = np.uint64(seed)

    def next_u64(self, n):
        with np.errstate(over="ignore"):
            z = self.state + GAMMA * np.arange(1, n + 1, dtype=np.uint64)
            self.state = z[-1]
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return z ^ (z >> np.uint64(31))

    def uniform(self, n):
        """Uniform in [-1, 1), float32, exactly as `Rng::uniform`."""
        x = (self.next_u64(n) >> np.uint64(40)).astype(np.float32)
        return x / np.float32(1 << 24) * np.float32(2.0) - np.float32(1.0)


def weights():
    rng, out, cin = Rng(WEIGHT_SEED), {}, 3
    for b, (n, cout) in enumerate(zip(BLOCKS, CHANNELS), start=1):
        for c in range(1, n + 1):
            name = f"block{b}_conv{c}"
            a = np.sqrt(np.float32(6.0) / np.float32(cin * 9)).astype(np.float32)
            out[f"{name}.weight"] = (rng.uniform(cout * cin * 9) * a).reshape(cout, cin, 3, 3)
            out[f"{name}.bias"] = rng.uniform(cout) * np.float32(0.1)
            cin = cout
    return out


if __name__ == "__main__":
    x = Rng(INPUT_SEED).uniform(3 * 64 * 64).reshape(3, 64, 64)
    y = forward(x.astype(np.float64), weights(), BLOCKS)
    save_file({"input": x, "output": y.astype(np.float32)}, sys.argv[1])
