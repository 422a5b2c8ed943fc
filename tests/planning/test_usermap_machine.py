"""A bare device map naming devices the machine does not have (issue 27): one line with the fix, exit 2,
before anything is simulated; a map whose check fails writes no ``.fitmap.json``."""

from __future__ import annotations

import json

import pytest

from fitmap.cli import main
from fitmap.errors import BadInput
from fitmap.planning.devices import make_machine
from fitmap.planning.usermap import check_devices, device_of


@pytest.fixture
def tiny(checkpoints):
    return str(checkpoints("llama"))


def _check(capsys, tmp_path, model: str, dm: dict, *flags: str) -> str:
    (tmp_path / "map.json").write_text(json.dumps(dm))
    code = main(["check", model, "--plan", str(tmp_path / "map.json"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "map.fitmap.json").exists()
    return err


def test_a_gpu_beyond_those_given_names_the_gpus_there_are(tiny, tmp_path, capsys):
    err = _check(capsys, tmp_path, tiny, {"": 0, "lm_head": "cuda:9"}, "--gpus", "2x1GiB")
    assert "'lm_head' on GPU 9 but --gpus 2x1GiB gives 2 GPU(s) (0-1)" in err
    assert "name GPUs 0-1 in the map, or give --gpus with 10 GPUs" in err


def test_a_gpu_with_no_gpus_given_says_so(tiny, tmp_path, capsys):
    err = _check(capsys, tmp_path, tiny, {"": 1}, "--cpu", "1GiB")
    assert "on GPU 1 but without --gpus fitmap has 0 GPU(s)" in err and "give --gpus with 2 GPUs" in err


def test_disk_without_a_disk_tier_asks_for_disk(tiny, tmp_path, capsys):
    err = _check(capsys, tmp_path, tiny, {"": 0, "lm_head": "disk"}, "--gpus", "1x1GiB")
    assert "on 'disk' (e.g. 'lm_head') but no disk tier was given; give --disk DIR" in err


def test_a_map_whose_check_fails_writes_nothing(tiny, tmp_path, capsys):
    err = _check(capsys, tmp_path, tiny, {"": 0}, "--gpus", "1x64KiB", "--reserve", "0", "--prompt", "16")
    assert "exceed capacity" in err and "nothing was written" in err


def test_a_huge_device_name_or_key_is_not_echoed_whole(tiny, tmp_path, capsys):
    huge = "x" * 10_000_000
    err = _check(capsys, tmp_path, tiny, {"": 0, "lm_head": huge}, "--gpus", "1x1GiB")
    assert "is not a device" in err and len(err) < 300
    err = _check(capsys, tmp_path, tiny, {"": 0, huge: 0}, "--gpus", "1x1GiB")
    assert "does not have" in err and len(err) < 300
    with pytest.raises(BadInput) as e:
        device_of(huge, huge)
    assert len(str(e.value)) < 300


def test_check_devices_on_its_own():
    machine = make_machine("3x1GiB", 1 << 30)
    check_devices({"a": 0, "b": 2, "c": "cpu"}, machine, "--gpus 3x1GiB gives")
    with pytest.raises(BadInput, match=r"GPU 3 but --gpus 3x1GiB gives 3 GPU\(s\) \(0-2\); name GPUs 0-2"):
        check_devices({"a": 0, "b": 3}, machine, "--gpus 3x1GiB gives")
    with pytest.raises(BadInput, match="no disk tier"):
        check_devices({"a": "disk"}, machine, "--gpus 3x1GiB gives")
