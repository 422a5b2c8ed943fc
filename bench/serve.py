"""Serving throughput: fitmap serve with one replica (requests one at a time, and batched) and
with two, against the server a user writes by hand (transformers ``generate`` behind a FastAPI
handler, one request at a time).

Same model (the demo's tiny Qwen2-VL, random weights, on the CPU), same requests, one run:
``--clients`` threads each send ``--requests`` chat completions (text, greedy,
``max_tokens`` 16) as plain HTTP JSON requests; requests/s over the whole
run, p50/p99 latency per request. Each server is a separate process on loopback.

    .venv/bin/python bench/serve.py                  # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
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
    lm = transformers.AutoModelForImageTextToText.from_pretrained(model, dtype="auto").eval().to(device)  # as stored
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


def up(port: int, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not start")


def load(port: int, model: str, clients: int, requests: int) -> dict:
    """``clients`` threads, each sending ``requests`` chat completions one after another (plain HTTP
    with JSON, so the script needs no client library on a bare GPU machine)."""
    import json

    body = json.dumps({"model": model, "messages": PROMPT, "max_tokens": 16}).encode()

    def ask() -> str:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"]

    ask()  # warm-up
    latencies, texts, errors = [], [], []

    def one():
        for _ in range(requests):
            t = time.perf_counter()
            try:
                texts.append(ask())
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
        "rps": len(texts) / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": len(errors),
        "distinct": len(set(texts)),
        "n": len(texts),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--gpu", action="store_true", help="servers on GPU 0 (naive: .to('cuda'); fitmap: --gpus 0)")
    ap.add_argument("--naive", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive:
        naive_server(args.naive[0], int(args.naive[1]), args.naive[2])
        return 0
    from fitmap.cli.demo import demo_checkpoint

    model = str(demo_checkpoint())
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    where = ["--gpus", "0"] if args.gpu else ["--cpu", "4GiB"]
    variants = {
        "naive: from_pretrained + generate behind FastAPI, one at a time": lambda p: [
            sys.executable,
            __file__,
            "--naive",
            model,
            str(p),
            "cuda" if args.gpu else "cpu",
        ],
        "fitmap serve, 1 replica, --max-batch 1 (one request at a time)": lambda p: [
            sys.executable,
            "-m",
            "fitmap.cli",
            "serve",
            model,
            *where,
            "--replicas",
            "1",
            "--new",
            "16",
            "--max-batch",
            "1",
            "--port",
            str(p),
        ],
        "fitmap serve, 1 replica": lambda p: [
            sys.executable,
            "-m",
            "fitmap.cli",
            "serve",
            model,
            *where,
            "--replicas",
            "1",
            "--new",
            "16",
            "--port",
            str(p),
        ],
    }
    if not args.gpu:  # one GPU holds one replica; on the CPU two replicas share the cores
        variants["fitmap serve, 2 replicas"] = lambda p: [
            sys.executable,
            "-m",
            "fitmap.cli",
            "serve",
            model,
            *where,
            "--replicas",
            "2",
            "--new",
            "16",
            "--port",
            str(p),
        ]
    print(
        f"{args.clients} clients x {args.requests} requests, max_tokens 16, greedy; {os.cpu_count()} CPU cores"
        f"{'; servers on GPU 0' if args.gpu else ''}\n"
    )
    print("| server | requests/s | p50 latency | p99 latency | errors | distinct texts |")
    print("|---|---|---|---|---|---|")
    for name, cmd in variants.items():
        port = free_port()
        proc = subprocess.Popen(cmd(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            up(port, proc)
            r = load(port, model, args.clients, args.requests)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(
            f"| {name} | {r['rps']:.2f} | {r['p50']:.2f} s | {r['p99']:.2f} s | {r['errors']} | {r['distinct']} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
