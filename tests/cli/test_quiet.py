"""Third-party noise: importing bitsandbytes (``fitmap run --quantize nf4|int8``) fetches a CPU kernel
through the ``kernels`` package, whose Hub check logs "Skipping publisher trust check for ..." as a
warning to the user's terminal. quiet_third_parties() silences it at its logger (``--verbose``
does not call it, so it still shows there)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from fitmap.cli import quiet_third_parties
from fitmap.model import build

LOGGERS = ("kernels", "kernels._internals.hf_hub", "bitsandbytes", "torch._subclasses.fake_tensor")


@pytest.fixture
def restored(monkeypatch):
    """quiet_third_parties() changes process-wide state: put it back for the other tests."""
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    for var in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(var, os.environ.get(var, "x"))
    monkeypatch.setattr(build, "MODEL_PRINTS", build.MODEL_PRINTS)
    tf = sys.modules.get("transformers")
    verbosity = tf.logging.get_verbosity() if tf is not None else None
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    if tf is not None and verbosity is not None:
        tf.logging.set_verbosity(verbosity)


def test_the_kernels_trust_check_warning_is_quiet(restored):
    hub = logging.getLogger("kernels._internals.hf_hub")  # the logger that prints the line (kernels' own name)
    assert hub.level == logging.NOTSET  # kernels leaves it to its parent
    quiet_third_parties()
    assert not hub.isEnabledFor(logging.WARNING)
    assert hub.isEnabledFor(logging.ERROR)  # a real failure still shows


_IMPORT = "import bitsandbytes"
_QUIET = "from fitmap.cli import quiet_third_parties; quiet_third_parties(); import bitsandbytes"


def _stderr(code: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # offline: the trust check is skipped with the warning
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_importing_bitsandbytes_prints_no_trust_check_line():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("kernels")
    loud = _stderr(_IMPORT)
    if "publisher trust check" not in loud:
        pytest.skip("this CPU's bitsandbytes does not fetch the kernel (no AVX512-BF16)")
    assert "publisher trust check" not in _stderr(_QUIET)
