import time

import pytest

from fitmap.errors import BadInput
from fitmap.planning.devices import RESERVE_FIXED, default_reserve, make_machine, parse_gpus
from fitmap.sizes import GiB, MiB, fmt_bytes, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [
        ("10GiB", 10 * GiB),
        ("10GB", 10 * 10**9),
        ("512MiB", 512 * MiB),
        ("1.5GiB", int(1.5 * GiB)),
        ("24g", 24 * GiB),
        ("100", 100),
        (" 2 TiB ", 2 << 40),
        ("80MB", 80 * 10**6),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "10 parsecs", "-1GiB", "0GiB", "1..5GB"])
def test_parse_size_rejects(text):
    with pytest.raises(BadInput, match="size"):
        parse_size(text)


def test_fmt_bytes():
    assert fmt_bytes(GiB * 1.5) == "1.5 GiB"
    assert fmt_bytes(512) == "512 B"


def test_hypothetical_gpus_mixed_sizes():
    gpus = parse_gpus("2x24GiB,1x80GiB")
    assert [g.capacity for g in gpus] == [24 * GiB, 24 * GiB, 80 * GiB]
    assert [g.index for g in gpus] == [0, 1, 2]
    assert gpus[0].reserve == default_reserve(24 * GiB) > RESERVE_FIXED


def test_reserve_override():
    m = make_machine("2x16GiB", cpu="8GiB", reserve="0")
    assert all(g.reserve == 0 for g in m.gpus) and m.cpu == 8 * GiB


@pytest.mark.parametrize(
    "text,needle",
    [
        ("0,1", "does not exist"),  # this machine has no GPU
        ("0:10GiB", "does not exist"),
        ("4xlots", "cannot read size"),
        ("a,b", "cannot read GPU"),
        ("0,", "empty entry"),
    ],
)
def test_bad_gpu_specs(text, needle, monkeypatch):
    monkeypatch.setattr("fitmap.planning.devices.detected_gpus", lambda: [])
    with pytest.raises(BadInput, match=needle):
        parse_gpus(text)


def test_detected_gpus_with_budget(monkeypatch):
    monkeypatch.setattr("fitmap.planning.devices.detected_gpus", lambda: [("A", 16 * GiB), ("B", 24 * GiB)])
    gpus = parse_gpus("1:10GiB,0")
    assert [(g.index, g.capacity) for g in gpus] == [(1, 10 * GiB), (0, 16 * GiB)]
    with pytest.raises(BadInput, match="GPU 2 does not exist: this machine has 2 GPU"):
        parse_gpus("2")
    with pytest.raises(BadInput, match="twice"):
        parse_gpus("0,0")


def test_disk_must_be_writable_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BadInput, match="is a file"):
        make_machine(None, "1GiB", f)
    with pytest.raises(BadInput, match="neither the directory nor its parent"):
        make_machine(None, "1GiB", tmp_path / "a" / "b")
    m = make_machine(None, "1GiB", tmp_path)
    assert m.disk == tmp_path and m.disk_bytes > 0


def test_nvml_detection_honours_cuda_visible_devices(monkeypatch):
    """Without a CUDA torch, NVML lists the GPUs; CUDA_VISIBLE_DEVICES picks and reorders them."""
    import sys
    import types

    from fitmap.planning import devices

    cards = [("A100-40GB", 40 * GiB), ("A100-80GB", 80 * GiB), ("L4", 24 * GiB)]
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: len(cards),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: cards[h][0],
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=cards[h][1]),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert devices._nvml_gpus() == [cards[2], cards[0]]
    gpus = parse_gpus("0,1")
    assert [(g.name, g.capacity) for g in gpus] == [cards[2], cards[0]]


def test_mapped_bytes_counts_the_pages_of_files_under_a_directory(tmp_path):
    """The checkpoint's resident pages, not RssFile's growth (which counts library code pages too)."""
    import mmap
    import os

    from fitmap.planning.devices import mapped_bytes

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("no /proc/self/smaps")
    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(8 << 20))
    assert mapped_bytes(tmp_path) == 0
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        total = sum(m[i] for i in range(0, len(m), 4096))  # touch every page
        assert total >= 0 and 8 << 20 <= mapped_bytes(tmp_path) <= (8 << 20) + (1 << 20)
        assert mapped_bytes(tmp_path / "elsewhere") == 0


def test_the_sampler_sees_a_tensor_live_and_freed():
    import torch

    from fitmap.planning import devices

    if devices.heap_live() is None:
        pytest.skip("the C allocator does not report live bytes here (not glibc >= 2.33)")
    with devices.RssSampler(interval=0.001) as s:
        t = torch.ones(40 * 2**20, dtype=torch.uint8)
        time.sleep(0.05)
        del t
    grew = s.live_peak - s.live_start
    # the process frees a few of its own small blocks meanwhile (seen: 40 MiB less 24 KiB)
    assert 39 * 2**20 <= grew < 44 * 2**20
    assert devices.heap_live() - s.live_start < 4 * 2**20


def test_a_slow_allocator_census_backs_off_then_stops(monkeypatch):
    """glibc walks its free lists under the allocator's lock: on a fragmented heap one count
    takes milliseconds, which must not stall the model's thread every 5 ms."""
    from fitmap.planning import devices

    cost = [0.01]

    def slow_census():
        end = time.thread_time() + cost[0]
        while time.thread_time() < end:  # busy: the census's cost is the sampler thread's CPU time
            pass
        return 1 << 20

    monkeypatch.setattr(devices, "heap_live", slow_census)
    s = devices.RssSampler(interval=0.001)
    s.live_start = s.live_peak = 0
    s._sample()
    assert s.live_peak == 1 << 20 and s._wait >= 0.01 / s.LIVE_DUTY
    cost[0] = s.LIVE_GIVE_UP + 0.01
    s._sample()
    assert s.live_peak is None and s.live_given_up
