#!/usr/bin/env python3
"""runner's curves beside the notebook's, epoch by epoch, as Markdown.

Reads `runner results --epochs --format csv` (from a file or standard input) and prints, for each
replay of the notebook ("Using a pre-trained convnet", its Colab run) found in it, the validation
accuracy per epoch next to the history the notebook printed. Standard library only.

    runner results /work/runs/results --epochs --format csv | tools/notebook_compare.py
"""

import csv
import sys

# val_acc per epoch as the notebook printed them (issue 17 quotes them).
NOTEBOOK = {
    "notebook_feature_extraction": {
        "train": [0.818, 0.846, 0.872, 0.878, 0.888, 0.888, 0.896, 0.896, 0.893, 0.899,
                  0.902, 0.901, 0.904, 0.902, 0.902],
    },
    "notebook_fine_tune": {
        "frozen_augmented": [0.810, 0.858, 0.844, 0.885, 0.847],
        "fine_tune": [0.910, 0.914, 0.907, 0.911, 0.910, 0.909, 0.919, 0.912, 0.924, 0.913,
                      0.912, 0.926, 0.920, 0.919, 0.909, 0.924, 0.920, 0.889, 0.925, 0.922],
    },
    "notebook_conv_head": {
        "frozen_augmented": [0.810, 0.858, 0.844, 0.885, 0.847],
        "fine_tune": [0.910, 0.914, 0.907, 0.911, 0.910, 0.909, 0.919, 0.912, 0.924, 0.913,
                      0.912, 0.926, 0.920, 0.919, 0.909, 0.924, 0.920, 0.889, 0.925, 0.922],
        "conv_head": [0.882, 0.898, 0.894, 0.905, 0.911],
    },
}
NOTEBOOK_TEST = {"notebook_fine_tune": 0.918}


def main() -> None:
    src = open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin
    rows = list(csv.DictReader(src))
    # The latest run of each replayed experiment.
    latest = {}
    for r in rows:
        e = r["experiment"]
        if e in NOTEBOOK and r["started_at"] >= latest.get(e, ("", ""))[0]:
            latest[e] = (r["started_at"], r["run_id"])
    for exp, (_, run_id) in sorted(latest.items()):
        runs = sorted((r for r in rows if r["run_id"] == run_id), key=lambda r: int(r["epoch"]))
        print(f"### {exp} (`{run_id}`, {runs[0]['status']})\n")
        print("| epoch | phase | notebook val_acc | runner val_acc | difference |")
        print("| ---: | --- | ---: | ---: | ---: |")
        seen = {}
        diffs = []
        for r in runs:
            phase = r["phase"]
            i = seen.get(phase, 0)
            seen[phase] = i + 1
            ref = NOTEBOOK[exp].get(phase, [])
            want = ref[i] if i < len(ref) else None
            got = float(r["val_acc"])
            d = "" if want is None else f"{got - want:+.3f}"
            if want is not None:
                diffs.append(got - want)
            print(f"| {r['epoch']} | {phase} | {'' if want is None else f'{want:.3f}'} | {got:.3f} | {d} |")
        if diffs:
            mean = sum(diffs) / len(diffs)
            print(f"\nMean difference {mean:+.4f} over {len(diffs)} epochs; "
                  f"largest {max(diffs, key=abs):+.3f}.")
        test = runs[-1].get("test_acc", "")
        if test:
            ref = NOTEBOOK_TEST.get(exp)
            print(f"test_acc: runner {float(test):.3f}" + (f", notebook {ref:.3f}" if ref else ""))
        print()


if __name__ == "__main__":
    main()
