"""Bare device maps (fitmap.planning.usermap): what accelerate accepts, fitmap accepts; the rest is one line."""

import pytest

from fitmap.errors import BadInput
from fitmap.planning.usermap import device_of, normalized, owner_key

PARAMS = [
    "embed.weight",
    "layers.0.attn.q.weight",
    "layers.0.mlp.up.weight",
    "layers.1.attn.q.weight",
    "layers.1.mlp.up.weight",
    "head.weight",
]


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


@pytest.mark.parametrize(
    "content,needle",
    [
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"model.layers.99": 0, "": 1}', "does not have"),
        ('{"model.embed_tokens": "tpu", "": 0}', "'tpu' is not a device"),
    ],
)
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

    user = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers": 0,
        "model.layers.20": 1,
        "model.layers.21.mlp": 1,
        "model.norm": 1,
        "lm_head": "cuda:1",
    }
    (tmp_path / "map.json").write_text(json.dumps(user))
    code = main(["check", "llama-3.1-8b", "--plan", str(tmp_path / "map.json"), "--gpus", "2x24GiB"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert out.count("mismatch: ") == 1 and "mismatch: aten.add in model.layers.21 " in out
    assert "no device mismatch after repairs" in out


def test_a_bare_map_is_checked_with_the_workload_given(checkpoints, tmp_path, capsys):
    """A VLM's vision tower only runs with an image: ``--image`` (and the token counts) reach the
    replay of a bare map; a fitmap plan keeps its own workload and says so in one line."""
    import json

    from fitmap.cli import main

    model = str(checkpoints("qwen2_vl"))
    (tmp_path / "map.json").write_text(json.dumps({"": 0, "model.visual.merger": 1}))
    peaks = {}
    for image in ([], ["--image", "224x224"]):
        args = [
            "check",
            model,
            "--plan",
            str(tmp_path / "map.json"),
            "--gpus",
            "2x1GiB",
            "--prompt",
            "16",
            "--new",
            "4",
            "--json",
        ]
        assert main(args + image) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["workload"]["prompt"] == 16 and out["workload"]["images"] == image[1:]
        peaks[bool(image)] = {d["device"]: d["peak_bytes"] for d in out["check"]["devices"]}
    assert peaks[True]["1"] > peaks[False]["1"]  # the merger ran on GPU 1 with the image only
    code = main(["check", model, "--plan", str(tmp_path / "map.fitmap.json"), "--image", "224x224"])
    err = capsys.readouterr().err
    assert code == 2 and "--image describes the workload of a bare device map" in err
    assert len(err.strip().splitlines()) == 1
