"""Disk-tier reads: byte spans of the original safetensors read into reused buffers."""

import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from fitmap.errors import CheckpointError
from fitmap.model.inventory import read_safetensors_header
from fitmap.runtime import diskread, offload


@pytest.fixture
def shard(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(33, 7, generator=gen),  # odd sizes: alignment inside spans
        "a.bias": torch.randn(7, generator=gen).to(torch.bfloat16),
        "b.weight": torch.randn(5, 3, generator=gen),
        "b.mask": torch.tensor([True, False, True]),
        "c.weight": torch.randn(4, 4, generator=gen),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    return path, tensors


def _unit(path, names, target=None):
    infos = read_safetensors_header(path)
    return {n: (infos[n], target or diskread.DTYPES[infos[n].dtype]) for n in names}


def test_contiguous_tensors_make_one_span_and_read_back_exactly(shard):
    path, tensors = shard
    unit = _unit(path, list(tensors))
    spans = diskread.spans(path.parent, unit)
    assert len(spans) == 1 and spans[0].nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    pool = diskread.Buffers(diskread.buffer_bytes(spans), 1, pinned=False)
    host = diskread.UnitReader(spans, pool)()
    for k, t in load_file(path).items():
        assert torch.equal(host.weights[k], t) and host.weights[k].dtype == t.dtype
    assert host.buffer is not None  # views into the buffer: held until released
    host.release()
    assert pool.acquire() is not None


def test_a_gap_splits_spans_and_casts_are_copies(shard):
    path, tensors = shard
    infos = read_safetensors_header(path)
    order = sorted(tensors, key=lambda n: infos[n].offset)
    picked = [order[0], order[2]]  # not adjacent in the file
    unit = {
        n: (infos[n], torch.bfloat16 if infos[n].dtype == "F32" else diskread.DTYPES[infos[n].dtype]) for n in picked
    }
    spans = diskread.spans(path.parent, unit)
    assert len(spans) == 2
    pool = diskread.Buffers(diskread.buffer_bytes(spans), 1, pinned=False)
    host = diskread.UnitReader(spans, pool)()
    ref = load_file(path)
    for n in picked:
        want = ref[n].to(torch.bfloat16) if ref[n].dtype == torch.float32 else ref[n]
        assert torch.equal(host.weights[n], want)
    if all(ref[n].dtype == torch.float32 for n in picked):
        assert host.buffer is None  # every tensor a cast copy: buffer back at once


def test_a_reader_waits_for_a_free_buffer(shard):
    path, tensors = shard
    spans = diskread.spans(path.parent, _unit(path, list(tensors)))
    pool = diskread.Buffers(diskread.buffer_bytes(spans), 1, pinned=False)
    reader = diskread.UnitReader(spans, pool)
    first = reader()
    got = []
    t = threading.Thread(target=lambda: got.append(reader()))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got  # the only buffer is in use
    first.release()
    t.join(5)
    assert got and torch.equal(got[0].weights["c.weight"], tensors["c.weight"])


def test_truncated_file_is_a_checkpoint_error(shard, tmp_path):
    path, tensors = shard
    spans = diskread.spans(path.parent, _unit(path, list(tensors)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    pool = diskread.Buffers(diskread.buffer_bytes(spans), 1, pinned=False)
    with pytest.raises(CheckpointError, match="truncated"):
        diskread.UnitReader(spans, pool)()
    assert pool.acquire() is not None  # the buffer went back


def test_disk_units_are_read_ahead_as_deep_as_there_are_buffers():
    """At the top of a forward the first ``disk_ahead`` disk units are queued at once, so the disk
    works while earlier units compute."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(5)))
    weights = {str(i): {k: v.clone() for k, v in m.state_dict().items()} for i, m in enumerate(model)}
    want = model(torch.ones(1, 4))
    for m in model:
        m.to("meta")
    units = [offload.Offloaded(p, tuple(w), (lambda p=p: weights[p])) for p, w in weights.items()]
    off = offload.attach(model, units, torch.device("cpu"), disk_ahead=3)
    queued = []
    model.register_forward_pre_hook(lambda m, a: queued.append([p for p, _ in off.streamer.pending]))
    torch.testing.assert_close(model(torch.ones(1, 4)), want)
    assert queued == [["0", "1", "2"]]
    off.close()
