"""``fitmap chat``: a multi-turn conversation with a placed model, images included.

The model is planned for the context the conversation may reach (``--new`` per
turn, up to the model's window), loaded once, and each turn re-encodes the
conversation with the chat template. ``/image PATH`` attaches an image to the
next message; ``/exit`` (or end of input) quits.
"""

from __future__ import annotations

import sys
from typing import TextIO

from fitmap import pipeline
from fitmap.errors import BadInput
from fitmap.planning.devices import Machine
from fitmap.runtime.prompting import Prompter, open_image
from fitmap.runtime.run import generate, local_model_dir, measured, plan_for_run, start

CHAT_CONTEXT = 4096  # prompt tokens the plan makes room for


def chat(
    model: str,
    image_paths: list[str],
    new: int,
    machine: Machine,
    plan_file: str | None,
    trust_remote_code: bool,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    quantize: str | None = None,
) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout  # the streams of the call, not of the import
    from fitmap.cli import report

    prep = pipeline.prepare(
        pipeline.PlanRequest(model, machine, trust_remote_code=trust_remote_code, estimate="analytic")
    )
    model_dir = local_model_dir(prep)
    prompter = Prompter.for_model(model_dir, prep.skeleton.config, trust_remote_code)
    pending = [open_image(p) for p in image_paths]
    window = pipeline.context_window(prep)
    if new >= window:
        raise BadInput(
            f"--new {new} leaves no room for a prompt: {prep.inventory.name} reads at most {window} "
            f"tokens; give --new below {window}"
        )
    context = min(CHAT_CONTEXT, window - new)  # the conversation the plan makes room for
    plan, _ = plan_for_run(model, context, pending, new, plan_file, machine, trust_remote_code, quantize)
    loaded, sampler = start(model_dir, plan, trust_remote_code)
    with loaded:
        out.write("fitmap chat: /image PATH attaches an image, /exit quits\n")
        for line in _lines(stdin, out):
            if line.startswith("/image "):
                try:
                    pending.append(open_image(line.split(" ", 1)[1].strip(), flag="/image"))
                    out.write("(image attached to your next message)\n")
                except BadInput as e:
                    out.write(f"{e}\n")
                continue
            if not line.strip():
                continue
            prompter.add_user(line, pending)
            pending = []
            out.write("assistant: ")
            text, _, _ = generate(loaded, prompter, new, out)
            prompter.add_assistant(text)
        report.print_memory(measured(plan, sampler, model_dir), plan)
    return 0


def _lines(stdin: TextIO, out: TextIO):
    while True:
        out.write("you: ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            out.write("\n")
            return
        yield line.rstrip("\n")
