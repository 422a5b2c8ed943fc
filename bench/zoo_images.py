"""With one image, which of the installed transformers' image-text-to-text types does fitmap simulate?

The image column of ``bench/zoo.py`` alone, fast: for every type in transformers' image-text-to-text
mapping, the tiny config ``bench/zoo.py`` makes (its config class's defaults, shrunk), a random checkpoint,
then ``fitmap.plan(..., images=((64, 48),))`` on two fake 1 GiB GPUs: simulated, or the analytic estimate
with the reason; and where simulated, ``fitmap check`` of that plan: clean (repairs allowed) or not. Each
type in its own process with a time-out.

    .venv/bin/python bench/zoo_images.py --out images.md
    .venv/bin/python bench/zoo_images.py --types llava_next,paligemma
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE = (64, 48)


def one(model_type: str) -> dict:
    """Plan and check one type with an image (in this process)."""
    import torch

    sys.path.insert(0, str(HERE))
    import zoo

    import fitmap
    from fitmap.pipeline import prepare_for
    from fitmap.simulation.check import check

    try:
        cfg = zoo.tiny_config(model_type)
        torch.manual_seed(0)
        model = zoo.auto_class("image-text-to-text").from_config(cfg)
    except Exception as e:
        return {"status": "no tiny model", "reason": zoo.first_line(e)}
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        del model
        try:
            plan = fitmap.plan(d, "2x1GiB", prompt=16, new=4, images=(IMAGE,), reserve="0MiB")
        except Exception as e:
            return {"status": "plan error", "reason": zoo.first_line(e)}
        if plan.estimate != "simulate":
            return {"status": "analytic", "reason": plan.estimate}
        try:
            prep = prepare_for(d, plan)
            report = check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan)
        except Exception as e:
            return {"status": "check error", "reason": zoo.first_line(e)}
        return {"status": "simulated, clean" if report.clean else "simulated, not clean", "reason": ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", help="comma-separated model types (default: every image-text-to-text type)")
    ap.add_argument("--out", type=Path, help="the markdown table goes here")
    ap.add_argument("--timeout", type=int, default=180)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("ZOO-IMAGES " + json.dumps(one(args.one)))
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    types = args.types.split(",") if args.types else sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    rows = []
    for i, t in enumerate(types, 1):
        start = time.monotonic()
        try:
            p = subprocess.run(
                [sys.executable, __file__, "--one", t], capture_output=True, text=True, env=env, timeout=args.timeout
            )
            line = next((x for x in p.stdout.splitlines() if x.startswith("ZOO-IMAGES ")), None)
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:200]
            row = json.loads(line[11:]) if line else {"status": "crashed", "reason": tail}
        except subprocess.TimeoutExpired:
            row = {"status": "time-out", "reason": f"over {args.timeout} s"}
        rows.append((t, row))
        print(f"[{i}/{len(types)}] {t}: {row['status']} ({time.monotonic() - start:.0f} s) {row['reason'][:160]}")
    built = [r for _, r in rows if r["status"] != "no tiny model"]
    good = [r for r in built if r["status"] == "simulated, clean"]
    summary = (
        f"with one image ({IMAGE[0]}x{IMAGE[1]}): {len(good)}/{len(built)} = {len(good) / max(1, len(built)):.0%} of "
        f"the image-text-to-text types with a tiny model simulate with a clean check ({len(rows) - len(built)} types "
        "without one)"
    )
    print(summary)
    if args.out:
        import transformers

        lines = [
            f"transformers {transformers.__version__}; {summary}",
            "",
            "| type | result | reason |",
            "|---|---|---|",
        ]
        lines += [f"| {t} | {r['status']} | {r['reason'].replace('|', '/')[:200]} |" for t, r in rows]
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
