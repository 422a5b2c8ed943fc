"""Run by torchrun in tests/runtime/test_distributed.py: every rank loads its stage of PLAN; rank 0
generates greedily from fixed ids and writes the tokens to OUT (JSON)."""

from __future__ import annotations

import json
import sys

import torch

from fitmap.errors import FitmapError
from fitmap.planning.plan import Plan
from fitmap.runtime.run import start

IDS = [[1, 17, 33, 41, 99, 250, 7, 300], [1, 400, 5, 6, 8, 13, 21, 34]]


def image_inputs(config) -> dict:
    """One 100x80 image and a 12-token prompt, as the model's processor lays them out; seeded pixels."""
    from fitmap.planning.workload import Workload
    from fitmap.simulation.vision_inputs import vision_inputs

    inputs, _ = vision_inputs(config, Workload(1, 12, 6, ((100, 80),)), torch.device("cpu"))
    inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(0))
    return inputs


def _die_after(steps: int) -> None:
    """This rank is killed (SIGKILL, no clean-up) when its stage has run ``steps`` steps."""
    import os
    import signal

    from fitmap.runtime import distributed

    real, count = distributed._send, [0]

    def send(obj, dst):
        count[0] += 1
        if count[0] > steps:
            os.kill(os.getpid(), signal.SIGKILL)
        real(obj, dst)

    distributed._send = send


def main(model_dir: str, plan_file: str, out: str, new: int) -> int:
    import os

    plan_file = os.environ.get(f"STAGES_DRIVER_PLAN_{os.environ.get('RANK')}", plan_file)  # a rank's own file
    die = os.environ.get("STAGES_DRIVER_KILL_RANK")
    if die is not None and os.environ.get("RANK") == die:
        _die_after(3)
    try:
        loaded, sampler = start(model_dir, Plan.load(plan_file), False)
    except FitmapError as e:
        if e.exit_code == 0:
            return 0
        print(f"fitmap: {e}", file=sys.stderr)
        return e.exit_code
    sampler.__exit__(None, None, None)
    inputs = image_inputs(loaded.model.config) if hasattr(loaded.model.config, "vision_config") else None
    try:
        with loaded:
            if inputs is not None:  # a VLM: one image, the inputs its processor would make
                tokens = loaded.model.generate(**inputs, max_new_tokens=new, do_sample=False)
                again = loaded.model.generate(**inputs, max_new_tokens=new, do_sample=False)
            else:
                tokens = loaded.model.generate(input_ids=torch.tensor(IDS), max_new_tokens=new, do_sample=False)
                again = loaded.model.generate(input_ids=torch.tensor(IDS[:1]), max_new_tokens=new, do_sample=False)
    except FitmapError as e:  # as fitmap's command line says it
        print(f"fitmap: {e}", file=sys.stderr)
        return e.exit_code
    with open(out, "w") as f:
        json.dump({"tokens": tokens.tolist(), "again": again.tolist()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
