"""Fuzzing the checkpoint parsers: any header or index a file can hold gives a TensorInfo map
or a CheckpointError that names the file — never another exception, never a read outside the
model directory."""

import json
import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fitmap.errors import CheckpointError
from fitmap.model.inventory import read_safetensors_header, read_weights

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["BF16", "F32", "I64", "F8_E4M3", "X9"]) | json_values,
        "shape": st.lists(st.integers(-3, 64), max_size=3) | json_values,
        "data_offsets": st.tuples(st.integers(-300, 300), st.integers(-300, 300)).map(list) | json_values,
    }
)
headers = st.dictionaries(st.text(max_size=10), entries | json_values, max_size=4) | json_values
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(path, header_bytes: bytes, data: bytes, claimed: int | None = None) -> None:
    n = len(header_bytes) if claimed is None else claimed
    path.write_bytes(struct.pack("<Q", n) + header_bytes + data)


@FUZZ
@given(header=headers, data=st.binary(max_size=256), cut=st.integers(0, 40))
def test_any_header_gives_infos_or_a_checkpoint_error(tmp_path, header, data, cut):
    f = tmp_path / "model.safetensors"
    raw = json.dumps(header).encode()
    _write(f, raw, data)
    for path in (f,):
        try:
            infos = read_safetensors_header(path)
        except CheckpointError as e:
            assert str(path) in str(e) or path.name in str(e)
            continue
        for t in infos.values():
            assert 0 <= t.offset and t.offset + t.nbytes <= path.stat().st_size
    f.write_bytes(f.read_bytes()[: max(0, f.stat().st_size - cut)])  # truncated anywhere
    try:
        read_safetensors_header(f)
    except CheckpointError:
        pass


@FUZZ
@given(claimed=st.integers(0, 2**64 - 1), body=st.binary(max_size=64))
def test_any_header_length_gives_infos_or_a_checkpoint_error(tmp_path, claimed, body):
    f = tmp_path / "model.safetensors"
    _write(f, body, b"", claimed)
    try:
        read_safetensors_header(f)
    except CheckpointError:
        pass


@FUZZ
@given(index=json_values | st.fixed_dictionaries({"weight_map": json_values}))
@example(index={"weight_map": {"": "\x00"}})  # a NUL byte in a file name: ValueError from the path, once
def test_any_index_gives_weights_or_a_checkpoint_error(tmp_path, index):
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        read_weights(d)
    except CheckpointError:
        pass


def test_an_index_naming_a_file_outside_the_directory_is_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    try:
        read_weights(d)
        raise AssertionError("read a file outside the model directory")
    except CheckpointError as e:
        assert "outside" in str(e)


def test_a_directory_or_a_dangling_link_named_model_safetensors(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").mkdir()
    try:
        read_weights(d)
    except CheckpointError:
        pass
    (d / "model.safetensors").rmdir()
    (d / "model.safetensors").symlink_to(tmp_path / "gone")
    try:
        read_weights(d)
        raise AssertionError("a dangling link read as weights")
    except CheckpointError as e:
        assert "model.safetensors" in str(e)
