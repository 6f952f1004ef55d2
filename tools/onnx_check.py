#!/usr/bin/env python3
"""Checks an exported model with the ONNX project's own tools and prints what they find as JSON.

Usage: python tools/onnx_check.py results/<run_id>/model.onnx

Needs `onnx` and `onnxruntime` (a venv outside the repo). `onnx.checker.check_model(full_check=True)`
validates the file against the ONNX specification (with shape inference); ONNX Runtime (CPU)
then loads it and runs two images of random pixels. Prints one JSON object: the metadata, the
input and output names and shapes, and the output's row sums (1 for probabilities).
"""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    out = session.get_outputs()[0]
    _, h, w, c = inp.shape
    pixels = np.random.default_rng(0).uniform(0, 255, size=(2, h, w, c)).astype(np.float32)
    (probs,) = session.run([out.name], {inp.name: pixels})
    meta = session.get_modelmeta()
    json.dump(
        {
            "metadata": dict(meta.custom_metadata_map),
            "producer": meta.producer_name,
            "input": [inp.name, [str(d) for d in inp.shape]],
            "output": [out.name, [str(d) for d in out.shape]],
            "result_shape": list(probs.shape),
            "row_sums": [float(s) for s in probs.sum(axis=1)],
        },
        sys.stdout,
        indent=1,
        sort_keys=True,
    )
    print()


if __name__ == "__main__":
    main()
