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


@pytest.mark.parametrize("content,needle", [
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"model.layers.99": 0, "": 1}', "does not have"),
    ('{"model.embed_tokens": "tpu", "": 0}', "'tpu' is not a device"),
])
def test_check_of_a_bad_map_is_one_line(tmp_path, capsys, content, needle):
    from fitmap.cli import main

    (tmp_path / "map.json").write_text(content)
    code = main(["check", "llama-3.1-8b", "--plan", str(tmp_path / "map.json"), "--gpus", "2x24GiB"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_a_key_naming_a_module_list_places_each_block(tmp_path, capsys):
    """``"model.layers": 0`` is hooked per block, as accelerate does: the only error in this map is
    the block it splits (layer 21's MLP on GPU 1)."""
    import json

    from fitmap.cli import main

    user = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers": 0, "model.layers.20": 1,
            "model.layers.21.mlp": 1, "model.norm": 1, "lm_head": "cuda:1"}
    (tmp_path / "map.json").write_text(json.dumps(user))
    code = main(["check", "llama-3.1-8b", "--plan", str(tmp_path / "map.json"), "--gpus", "2x24GiB"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert out.count("mismatch: ") == 1 and "mismatch: aten.add in model.layers.21 " in out
    assert "no device mismatch after repairs" in out
