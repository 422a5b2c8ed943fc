"""Serving throughput, side by side in one run: fitmap serve (continuous batching), transformers'
own server (``transformers serve --continuous-batching``) and the server a user writes by hand
(``generate`` behind a FastAPI handler, one request at a time), each quiet and under a background
CPU load (one busy-loop process per core).

Model: a tiny Qwen2 text model with random weights (float32, the demo's tokenizer and chat
template), made once under a temporary directory, on the CPU. ``c`` clients (1, 8, 32) each send
``--requests`` chat completions one after another (greedy, ``max_tokens`` ``--new``) as plain HTTP
JSON; completion tokens/s over the whole load, p50 latency per request. Each server is a separate
process on loopback, started once and measured quiet, then loaded.

    .venv/bin/python bench/serve.py                  # about 10 minutes on 2 cores
    .venv/bin/python bench/serve.py --servers fitmap,transformers --clients 8,32
    .venv/bin/python bench/serve.py --gpu            # the demo's Qwen2-VL on GPU 0 (fitmap and naive)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPT = [{"role": "user", "content": "what is in this image ?"}]


def naive_server(model: str, port: int, device: str = "cpu") -> None:
    """What a user writes: from_pretrained once, generate per request under a lock."""
    import threading as th

    import torch
    import transformers
    import uvicorn
    from fastapi import FastAPI

    tok = transformers.AutoTokenizer.from_pretrained(model)
    vlm = hasattr(transformers.AutoConfig.from_pretrained(model), "vision_config")
    auto = transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM
    lm = auto.from_pretrained(model, dtype="auto").eval().to(device)  # as stored
    lock = th.Lock()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        text = tok.apply_chat_template(
            [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in body["messages"]],
            add_generation_prompt=True,
            tokenize=False,
        )
        inputs = tok([text], return_tensors="pt").to(device)
        with lock, torch.inference_mode():
            out = lm.generate(**inputs, max_new_tokens=body.get("max_tokens", 16), do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length",
                    "message": {"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)},
                }
            ],
            "usage": {
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "completion_tokens": int(new.numel()),
                "total_tokens": int(out.shape[1]),
            },
        }

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def up(port: int, proc: subprocess.Popen, log, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not start")


@contextlib.contextmanager
def running(cmd: list[str], port: int, env: dict):
    """The server ``cmd`` started (its output in a temporary file, not a pipe a chatty server could
    fill), once ``/health`` answers; stopped after."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        up(port, proc, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def tiny_qwen2(root: Path, hidden: int = 256, layers: int = 6) -> Path:
    """A Qwen2 text model with random weights and the demo's tokenizer and chat template."""
    import shutil

    import torch
    import transformers

    from fitmap.cli.demo import demo_checkpoint

    target = root / ("qwen2-tiny-random" if (hidden, layers) == (256, 6) else f"qwen2-random-h{hidden}-l{layers}")
    if (target / "config.json").is_file():
        return target
    demo = demo_checkpoint()
    tok = transformers.AutoTokenizer.from_pretrained(demo)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # wide enough that greedy decoding does not settle on one token
    model.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo / name, target / name)
    return target


def load(port: int, model: str, clients: int, requests: int, new: int) -> dict:
    """``clients`` threads, each sending ``requests`` chat completions one after another (plain HTTP
    with JSON, so the script needs no client library on a bare GPU machine)."""
    import json

    body = json.dumps({"model": model, "messages": PROMPT, "max_tokens": new, "temperature": 0}).encode()

    def ask() -> tuple[str, int]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=900) as r:
            out = json.loads(r.read())
        return out["choices"][0]["message"]["content"], int(out["usage"]["completion_tokens"])

    latencies, texts, tokens, errors = [], [], [], []

    def one():
        for _ in range(requests):
            t = time.perf_counter()
            try:
                text, n = ask()
                texts.append(text)
                tokens.append(n)
            except Exception as e:  # noqa: BLE001  (counted)
                errors.append(e)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "tok_s": sum(tokens) / wall,
        "p50": statistics.median(latencies),
        "errors": len(errors),
        "distinct": len(set(texts)),
        "n": len(texts),
    }


def busy() -> None:
    while True:
        pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated (default 1,8,32)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--new", type=int, default=32, help="max_tokens per request (default 32)")
    ap.add_argument("--servers", default="fitmap,transformers,naive", help="which servers (default all three)")
    ap.add_argument("--rounds", type=int, default=1, help="the servers one after another, this many times (default 1)")
    ap.add_argument("--fitmap-args", default="", help="more arguments for fitmap serve, e.g. '--threads 2'")
    ap.add_argument("--gpu", action="store_true", help="the demo's Qwen2-VL on GPU 0 (fitmap --gpus 0; naive .to)")
    ap.add_argument("--naive", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive:
        naive_server(args.naive[0], int(args.naive[1]), args.naive[2])
        return 0
    import multiprocessing

    from fitmap.cli.demo import demo_checkpoint

    clients = [int(c) for c in args.clients.split(",")]
    model = str(demo_checkpoint() if args.gpu else tiny_qwen2(Path(tempfile.gettempdir()) / "fitmap-bench"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    where = ["--gpus", "0"] if args.gpu else ["--cpu", "4GiB"]
    most = max(clients)
    commands = {
        "fitmap": lambda p: [
            *(sys.executable, "-m", "fitmap.cli", "serve", model, *where, "--replicas", "1"),
            *("--new", str(args.new), "--prompt", "64", "--concurrency", str(most)),
            *("--max-queue", str(4 * most), "--port", str(p), *args.fitmap_args.split()),
        ],
        "transformers": lambda p: [
            *(str(Path(sys.executable).parent / "transformers"), "serve", model, "--continuous-batching"),
            *("--device", "cuda:0" if args.gpu else "cpu", "--port", str(p), "--log-level", "warning"),
        ],
        "naive": lambda p: [sys.executable, __file__, "--naive", model, str(p), "cuda" if args.gpu else "cpu"],
    }
    names = {
        "fitmap": "fitmap serve (1 replica, continuous batching)",
        "transformers": "transformers serve --continuous-batching",
        "naive": "naive: generate behind FastAPI, one at a time",
    }
    chosen = [s for s in args.servers.split(",") if s]
    print(
        f"{model.rsplit('/', 1)[-1]}; clients x {args.requests} requests each, max_tokens {args.new}, greedy; "
        f"{os.cpu_count()} CPU cores{'; servers on GPU 0' if args.gpu else ''}; loaded = one busy-loop process "
        "per core beside the server\n"
    )
    print("| server | load | c | tok/s | p50 latency | errors | distinct texts |")
    print("|---|---|---|---|---|---|---|")
    for key in [k for _ in range(args.rounds) for k in chosen]:  # rounds interleaved: the machine drifts
        port = free_port()
        with running(commands[key](port), port, env):
            load(port, model, 1, 1, args.new)  # warm-up
            for loaded in (False, True):
                hogs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(os.cpu_count() or 1) if loaded]
                for h in hogs:
                    h.start()
                try:
                    for c in clients:
                        r = load(port, model, c, args.requests, args.new)
                        print(
                            f"| {names[key]} | {'loaded' if loaded else 'quiet'} | {c} | {r['tok_s']:.1f} | "
                            f"{r['p50']:.2f} s | {r['errors']} | {r['distinct']} |",
                            flush=True,
                        )
                finally:
                    for h in hogs:
                        h.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
