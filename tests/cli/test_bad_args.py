"""Bad command-line values found by a user pass (issue 27): exit 2 and one line on stderr."""

from __future__ import annotations

import pytest

from fitmap.cli import main

SERVE_PLAN = ["plan", "llama-3.1-8b", "--gpus", "2x24GiB", "--serve", "--estimate", "analytic"]


def _one_line(capsys, args: list[str], needle: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    return err


def test_plan_serve_out_fails_as_plain_plan_out_does(tmp_path, capsys):
    for out in (str(tmp_path), str(tmp_path / "no" / "such" / "serve.json"), "/dev/full"):
        plain = _one_line(
            capsys, ["plan", "llama-3.1-8b", "--gpus", "1x24GiB", "--estimate", "analytic", "--out", out], "cannot"
        )
        served = _one_line(capsys, [*SERVE_PLAN, "--out", out], "cannot write the plan")
        assert served == plain  # the same line, word for word
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("port", ["70000", "65536", "-1", "0"])
def test_serve_port_out_of_range_is_one_line(capsys, port):
    pytest.importorskip("fastapi")  # serve says first when it is missing
    _one_line(capsys, ["serve", "llama-3.1-8b", "--port", port], f"--port {port} is not a TCP port")


def test_a_huge_gpus_value_is_not_echoed_whole(capsys):
    err = _one_line(capsys, ["plan", "llama-3.1-8b", "--gpus", "x" * 100_000, "--estimate", "analytic"], "--gpus")
    assert len(err) < 400


def test_demo_with_the_cache_pointing_at_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FITMAP_CACHE", str(blocker))
    _one_line(capsys, ["demo"], "is not a directory")
