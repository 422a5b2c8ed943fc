"""fitmap serve as pipeline stages: torchrun starts 2 processes (gloo on loopback), rank 0 listens and
generates, rank 1 runs the second half of the blocks. The official openai client gets
``from_pretrained``'s greedy text, streamed or not; a rank killed ends the server with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.serve.server import _wait_healthy, free_port  # noqa: E402  (after the skips)


def _ranks(torchrun: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of the processes torchrun started."""
    out = {}
    for child in Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            out[rank] = int(child)
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks' processes through /proc")
def test_serve_split_across_two_ranks_answers_the_openai_client_and_ends_when_a_rank_dies(tmp_path):
    import transformers

    from tests import tiny
    from tests.remote import byte_tokenizer
    from tests.runtime.test_loader import plan_for

    model = tiny.make_checkpoint("llama", tmp_path / "m")
    byte_tokenizer(model)
    plan_for(model).save(tmp_path / "plan.json")
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node=2", f"--master-port={free_port()}"]
    cmd += ["-m", "fitmap.cli", "serve", str(model), "--plan", str(tmp_path / "plan.json"), "--port", str(port)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "FITMAP_DIST_TIMEOUT": "20"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        tok = transformers.AutoTokenizer.from_pretrained(model)
        ref = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
        for prompt in ("hello there", "the sky is"):
            ids = tok([prompt], return_tensors="pt")
            want = ref.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1] :]
            text = tok.decode(want, skip_special_tokens=True)
            got = client.completions.create(model=model.name, prompt=prompt, max_tokens=6)
            assert got.choices[0].text == text
            streamed = client.completions.create(model=model.name, prompt=prompt, max_tokens=6, stream=True)
            assert "".join(c.choices[0].text for c in streamed) == text
        os.kill(_ranks(proc)[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model=model.name, prompt="hello there", max_tokens=6)
        out, _ = proc.communicate(timeout=60)
        assert time.monotonic() - start < 30 and proc.returncode != 0
        said = [line for line in out.splitlines() if line.startswith("fitmap serve: rank")]
        assert len(said) == 1, out[-3000:]
        assert said[0].startswith("fitmap serve: rank 1 (stage model.layers.2 .. model.layers.3) is gone:")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
