"""Bare device maps (fitmap.usermap): what accelerate accepts, fitmap accepts; the rest is one line."""

import pytest

from fitmap.errors import BadInput
from fitmap.usermap import device_of, normalized, owner_key

PARAMS = ["embed.weight", "layers.0.attn.q.weight", "layers.0.mlp.up.weight", "layers.1.attn.q.weight",
          "layers.1.mlp.up.weight", "head.weight"]


def test_devices_as_accelerate_writes_them():
    assert [device_of(v, "k") for v in (0, "1", "cuda:2", "CPU", "disk")] == [0, 1, 2, "cpu", "disk"]
    for bad in ("tpu", -1, None, 1.5, "cuda:x"):
        with pytest.raises(BadInput, match="is not a device"):
            device_of(bad, "layers.0")


def test_keys_coarser_and_finer_than_units_longest_wins():
    dm = normalized({"": 0, "layers.1": 1, "layers.1.mlp": "cuda:0", "head": "cpu"}, PARAMS)
    assert owner_key("layers.1.mlp.up.weight", dm) == "layers.1.mlp"
    assert owner_key("layers.1.attn.q.weight", dm) == "layers.1"
    assert owner_key("embed.weight", dm) == ""


def test_unknown_modules_and_unplaced_weights_are_refused():
    with pytest.raises(BadInput, match="does not have"):
        normalized({"layers.7": 0, "": 1}, PARAMS)
    with pytest.raises(BadInput, match="no device for 1 parameter.*head.weight"):
        normalized({"embed": 0, "layers": 1}, PARAMS)
