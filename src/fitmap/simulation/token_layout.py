"""The token layout of a sequence with images: a short text head (the chat template's), each image's
run of placeholder tokens (with the markers its processor puts around it), then the rest of the prompt.
Shared by the per-family input builders (:mod:`fitmap.simulation.vision_inputs`) and the generic one
(:mod:`fitmap.simulation.any_vlm`)."""

from __future__ import annotations

from typing import Any

import torch

from fitmap.errors import BadInput

TEXT_TOKEN = 100  # an ordinary vocabulary id for text tokens (never a special token)
IMAGE_CONTEXT = 101  # the image placeholder id for models whose tokenizer, not config, knows it
HEAD = 4  # text tokens before the first image (the chat template's role header)

Inputs = tuple[dict[str, Any], int]  # the model's keyword arguments (tensors, ids, lists), image tokens


class UnsupportedInputs(BadInput):
    """No input builder for this model type: the planner falls back to the analytic estimate."""


def token_row(prompt: int, runs: list[list[int]], image_token: int) -> list[int]:
    """One sequence: a text head, each image's run (markers included), the rest of the text.

    Markers are text tokens of the prompt; a prompt too short to hold them grows.
    """
    markers = sum(1 for run in runs for t in run if t != image_token)
    text = max(prompt - markers, 0)
    head = min(HEAD, text)
    row = [TEXT_TOKEN] * head
    for run in runs:
        row += run
    return row + [TEXT_TOKEN] * (text - head)


def text_inputs(rows: list[int], batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.tensor([rows] * batch, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
