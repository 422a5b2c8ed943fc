"""Hybrid propagation: small known tensors carry real values beside their fakes."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode

from fitmap.simulation import hybrid


@pytest.fixture
def fake():
    """(fake mode, twins) with propagation on, as the simulator enters them."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad(), hybrid.propagation(mode) as twins:
        yield mode, twins


def _grid():
    """Qwen2-VL's ``image_grid_thw`` for two images, on the first fake GPU."""
    return torch.tensor([[1, 4, 6], [1, 2, 2]], device="meta:0")


def test_tolist_on_a_derived_int_tensor(fake):
    _, twins = fake
    grid = _grid()
    tokens = grid.prod(-1) // 4
    assert isinstance(tokens, FakeTensor) and tokens.device == torch.device("meta:0")
    assert tokens.tolist() == [6, 1]
    assert int(grid[0, 2]) == 6 and grid.max().item() == 6
    assert torch.equal(twins.real(tokens), torch.tensor([6, 1]))


def test_repeat_interleave_with_tensor_counts(fake):
    grid = _grid()
    seqlens = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    assert seqlens.shape == (2,) and seqlens.device == torch.device("meta:0")
    cu = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    assert cu.tolist() == [0, 24, 28]
    ids = torch.arange(3, device="meta:1").repeat_interleave(torch.tensor([2, 0, 3], device="meta:1"))
    assert ids.shape == (5,) and ids.device == torch.device("meta:1") and ids.tolist() == [0, 0, 2, 2, 2]


def test_nonzero_and_other_data_dependent_shapes(fake):
    grid = _grid()
    nz = torch.nonzero(grid > 3)
    assert nz.shape == (2, 2) and nz.device == torch.device("meta:0") and nz.tolist() == [[0, 1], [0, 2]]
    assert torch.unique(grid).tolist() == [1, 2, 4, 6]
    assert torch.masked_select(grid, grid > 1).tolist() == [4, 6, 2, 2]


def test_boolean_index_of_an_activation_takes_its_shape_from_the_mask(fake):
    _, twins = fake
    mask = torch.arange(6, device="meta:1") % 2 == 0
    hidden = torch.empty(6, 8, device="meta:1", dtype=torch.bfloat16)
    picked = hidden[mask]
    assert picked.shape == (3, 8) and picked.device == torch.device("meta:1") and twins.real(picked) is None
    hidden[mask] = torch.empty(3, 8, device="meta:1", dtype=torch.bfloat16)  # index_put_ works too
    other_gpu = torch.arange(6, device="meta:0") > 2
    with pytest.raises(RuntimeError, match="found at least two devices"):
        hidden[other_gpu]


def test_torch_tensor_of_zero_dim_tensors(fake):
    grid = _grid()
    deltas = [grid[0].max() + 1 - 10, grid[1, 1] * 3]  # get_rope_index's mrope_position_deltas
    t = torch.tensor(deltas, device="meta:0").unsqueeze(1)
    assert isinstance(t, FakeTensor) and t.device == torch.device("meta:0")
    assert t.tolist() == [[-3], [6]]


def test_weights_and_activations_have_no_twin(fake):
    _, twins = fake
    layer = nn.Linear(4, 4, dtype=torch.bfloat16, device="meta:0")
    x = torch.zeros(2, 4, device="meta:0", dtype=torch.bfloat16)  # a defined value: known
    y = layer(x)
    ids = y.argmax(-1)  # integers computed from activations are unknown too
    assert twins.real(x) is not None
    assert all(twins.real(t) is None for t in (layer.weight, y, ids))
    with pytest.raises(DataDependentOutputException):
        ids[0].item()


def test_positions_routed_through_floats_keep_their_values(fake):
    """Qwen2-VL builds temporal positions as ``(arange(t) * interval).long()``."""
    positions = (torch.arange(3, device="meta:0") * 1.0).long()
    assert positions.tolist() == [0, 1, 2]


def test_unknown_writes_make_twins_stale(fake):
    _, twins = fake
    ids = torch.zeros(2, 3, dtype=torch.long, device="meta:0")
    row = ids[0]
    ids[:, 1] = torch.arange(2, device="meta:0")  # known write: the twin follows, views too
    assert ids.tolist() == [[0, 0, 0], [0, 1, 0]] and row.tolist() == [0, 0, 0]
    ids.add_(torch.empty(2, 3, device="meta:0").long())  # unknown write
    assert twins.real(ids) is None and twins.real(row) is None


def test_float_masks_are_known_and_their_values_can_be_read(fake):
    """CogVLM picks its attention kernel with ``(mask == tril).all()`` on a float mask."""
    mask = torch.full((4, 4), torch.finfo(torch.float32).min, device="meta:0")
    cond = torch.arange(4, device="meta:0")
    mask.masked_fill_(cond < (cond + 1).view(4, 1), 0)
    is_low_triangle = ((mask == 0) == torch.ones_like(mask).tril()).all()
    assert bool(is_low_triangle)


def test_large_integer_tensors_have_no_twin():
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, hybrid.RealTwins(mode, max_numel=100) as twins:
        small, big = torch.ones(100, dtype=torch.long), torch.ones(101, dtype=torch.long)
        assert twins.real(small) is not None and twins.real(big) is None


def test_patches_are_undone_on_exit():
    tensor, tolist = torch.tensor, FakeTensor.tolist
    mode = FakeTensorMode()
    with mode, hybrid.propagation(mode):
        assert torch.tensor is not tensor
    assert torch.tensor is tensor and FakeTensor.tolist is tolist
