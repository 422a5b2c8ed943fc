"""fitmap serve as pipeline stages: torchrun starts 2 processes (gloo on loopback), rank 0 listens and
generates, rank 1 runs the second half of the blocks. After an idle spell longer than the ranks'
time-out, the official openai client gets ``from_pretrained``'s greedy text, streamed or not, and
for requests sent together (one continuous batch, the other rank's cache kept in step); a rank
killed ends the server with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
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
@pytest.mark.parametrize("micro", [1, 2])
def test_serve_split_across_two_ranks_answers_the_openai_client_and_ends_when_a_rank_dies(tmp_path, micro):
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
    cmd += ["--micro-batches", str(micro)]  # 2: two continuous batches in flight, replies taken in order
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "FITMAP_DIST_TIMEOUT": "8"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}")
        time.sleep(10)  # idle past the ranks' time-out: rank 0's pings keep the stage waiting
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        tok = transformers.AutoTokenizer.from_pretrained(model)
        ref = transformers.AutoModelForCausalLM.from_pretrained(model).eval()

        def alone(prompt: str, new: int) -> str:
            ids = tok([prompt], return_tensors="pt")
            want = ref.generate(**ids, max_new_tokens=new, do_sample=False)[0, ids["input_ids"].shape[1] :]
            eos = ref.generation_config.eos_token_id  # the config's end token is no text (a byte of this tokenizer)
            return tok.decode([t for t in want.tolist() if t != eos], skip_special_tokens=True)

        for prompt in ("hello there", "the sky is"):
            got = client.completions.create(model=model.name, prompt=prompt, max_tokens=6)
            assert got.choices[0].text == alone(prompt, 6)
            streamed = client.completions.create(model=model.name, prompt=prompt, max_tokens=6, stream=True)
            assert "".join(c.choices[0].text for c in streamed) == alone(prompt, 6)
        # several at once: they join one continuous batch, whose rows the other rank's cache follows
        asks = [("hello there", 6), ("the sky is blue and", 4), ("a b c d e f g", 8), ("x", 5), ("hello", 7)]
        got: dict[int, str] = {}

        def send(i: int) -> None:
            time.sleep(0.05 * i)
            got[i] = (
                client.completions.create(model=model.name, prompt=asks[i][0], max_tokens=asks[i][1]).choices[0].text
            )

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == {i: alone(p, n) for i, (p, n) in enumerate(asks)}
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
