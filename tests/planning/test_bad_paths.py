"""fitmap calibrate with a path it cannot use (issue 27): one line, exit 2, before anything is measured."""

from __future__ import annotations

import os

import pytest

from fitmap.cli import main
from fitmap.errors import BadInput
from fitmap.planning import calibrate


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FITMAP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def nothing_measured(monkeypatch):
    """Any measurement fails the test: the path is refused before."""

    def measured(*args, **kwargs):
        raise AssertionError("measured although the path is bad")

    monkeypatch.setattr(calibrate, "disk_read_rate", measured)
    monkeypatch.setattr(calibrate, "ram_copy_rate", measured)


def _one_line(capsys, args: list[str], needle: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    return err


def test_a_file_as_the_disk_is_refused(cache, tmp_path, capsys, nothing_measured):
    (tmp_path / "f").write_text("x")
    _one_line(capsys, ["calibrate", "--disk", str(tmp_path / "f")], "is not a directory")
    _one_line(capsys, ["calibrate", "--disk", str(tmp_path / "f" / "sub")], "is not a directory")
    _one_line(capsys, ["calibrate", "--disk", os.devnull], f"--disk {os.devnull} is not a directory")


def test_an_empty_disk_says_it_is_empty_and_measures_nothing(cache, capsys, nothing_measured):
    for empty in ("", "  "):
        err = _one_line(capsys, ["calibrate", "--disk", empty], "--disk is empty")
        assert "leave --disk out" in err
    with pytest.raises(BadInput, match="--disk is empty"):
        calibrate.disk_dir("")


def test_a_directory_it_cannot_write_is_refused(cache, tmp_path, capsys, monkeypatch, nothing_measured):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    _one_line(capsys, ["calibrate", "--disk", str(locked)], "cannot write in --disk")
    with pytest.raises(BadInput, match="cannot write in --disk"):
        calibrate.measure(locked)


def test_a_directory_it_cannot_make_is_refused(cache, tmp_path, capsys, monkeypatch, nothing_measured):
    from pathlib import Path

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    _one_line(capsys, ["calibrate", "--disk", str(tmp_path / "new")], "cannot make --disk")


def test_a_cache_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch, nothing_measured):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("FITMAP_CACHE", str(tmp_path / "file"))
    err = _one_line(capsys, ["calibrate"], "($FITMAP_CACHE)")
    assert "is not a directory" in err and "point FITMAP_CACHE at a directory" in err
    _one_line(capsys, ["calibrate", "--disk", str(tmp_path / "disk")], "($FITMAP_CACHE)")
    _one_line(capsys, ["calibrate", "--show"], "no calibration of this machine")
    with pytest.raises(BadInput, match="FITMAP_CACHE"):
        calibrate.save(calibrate.Calibration("h", "", "x", (), "", 1.0, 1.0))


def test_a_huge_path_is_not_echoed_whole(cache, tmp_path, capsys, nothing_measured):
    (tmp_path / "f").write_text("x")
    err = _one_line(capsys, ["calibrate", "--disk", str(tmp_path / "f" / ("x" * 200))], "is not a directory")
    assert len(err) < 300
