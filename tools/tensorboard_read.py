#!/usr/bin/env python3
"""Reads a run's TensorBoard folder back with TensorBoard's own event reader and prints it as JSON.

Usage: python tools/tensorboard_read.py results/<run_id>/tensorboard

Needs the `tensorboard` package (a venv outside the repo: `python3 -m venv ~/.venvs/tb &&
~/.venvs/tb/bin/pip install tensorboard`). It loads the run folder and each of its subfolders
(`train`, `validation`, `test`) with `EventAccumulator`, as TensorBoard's dashboards do, and
prints one JSON object:

    {"train": {"scalars": {"epoch_loss": [[1, 0.69], ...], ...},
               "text": {"phase": [[1, "..."]]}},
     "validation": {...}, "test": {...},
     "hparams": {"hparams": {"optimizer": "rmsprop", ...}, "group_name": "...",
                 "status": "STATUS_SUCCESS"}}

Every record is read (no sampling), and a record whose CRC does not match fails the read.
"""

import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2


def load(path):
    acc = event_accumulator.EventAccumulator(
        path,
        size_guidance={
            event_accumulator.SCALARS: 0,
            event_accumulator.TENSORS: 0,
        },
    )
    acc.Reload()
    return acc


def folder(acc):
    tags = acc.Tags()
    scalars = {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in tags["scalars"]
    }
    text = {}
    for tag in tags["tensors"]:
        meta = acc.SummaryMetadata(tag)
        if meta.plugin_data.plugin_name == "text":
            text[tag] = [
                [e.step, e.tensor_proto.string_val[0].decode("utf-8")]
                for e in acc.Tensors(tag)
            ]
    return {"scalars": scalars, "text": text}


def hparams(acc):
    out = {}
    for tag, content in acc.PluginTagToContent("hparams").items():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            info = data.session_start_info
            values = {}
            for name, v in info.hparams.items():
                kind = v.WhichOneof("kind")
                values[name] = getattr(v, kind)
            out["hparams"] = values
            out["group_name"] = info.group_name
        if data.HasField("session_end_info"):
            out["status"] = api_pb2.Status.Name(data.session_end_info.status)
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = sys.argv[1]
    if not os.path.isdir(root):
        sys.exit(f"{root}: not a folder")
    out = {"hparams": hparams(load(root))}
    for sub in sorted(os.listdir(root)):
        path = os.path.join(root, sub)
        if os.path.isdir(path):
            out[sub] = folder(load(path))
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
