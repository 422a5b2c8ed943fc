"""Continuous batching (fitmap.serve.batcher) against ``generate``: requests that join a running
batch at different steps get the greedy tokens ``from_pretrained(...).generate`` gives each alone
(text models, MLA and MoE caches, a VLM with images and multimodal RoPE, a replica whose blocks
stream from disk); seeded sampling is the same alone or batched; stop strings cut the text."""

from __future__ import annotations

import asyncio

import pytest
import torch
import transformers

from fitmap.serve.batcher import Batch, cache_kind
from fitmap.serve.engine import Request
from tests import tiny


class Ids:
    """A tokenizer whose text is the token ids: what a row generated, exactly."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f" {i}" for i in ids)


def _job(max_tokens: int, **settings) -> Request:
    job = Request(None, "-", max_tokens, **settings)
    job.out = []  # type: ignore[attr-defined]
    job.emit = job.out.append  # type: ignore[method-assign,attr-defined]
    return job


def _joined(model, prompts: list[dict], new: int, joins: list[int], tok=None, **settings) -> list[list[int]]:
    """Every prompt decoded in one batch; prompt i joins after ``joins[i]`` steps of the batch."""
    kind = cache_kind(model)
    assert kind is not None
    batch = Batch(model, torch.device("cpu"), tok or Ids(), set(), kind[0])
    jobs = [_job(new, **settings) for _ in prompts]
    rows = {}
    for step in range(max(joins) + 1):
        for i, at in enumerate(joins):
            if at == step:
                batch.join(jobs[i], prompts[i])
                rows[i] = batch.rows[-1] if batch.rows and batch.rows[-1].job is jobs[i] else None
        if step < max(joins):
            batch.step()
    while batch.rows:
        batch.step()
    assert batch.cache is None and batch.footprint() == 0  # every row left, nothing held
    return [r.ids if r is not None else [] for _, r in sorted(rows.items())]


def _alone(model, inputs: dict, new: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "mixtral"])
def test_rows_joining_at_different_steps_decode_as_generate_does_alone(family):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny.config(family)).eval()
    prompts = [{"input_ids": torch.randint(3, 200, (1, n))} for n in (5, 11, 3, 8)]
    got = _joined(model, prompts, 7, joins=[0, 2, 2, 5])
    assert got == [_alone(model, p, 7) for p in prompts]


def test_image_rows_keep_their_own_multimodal_positions(tmp_path):
    """The demo Qwen2-VL: image requests (M-RoPE offsets of their own) and a text request share a
    batch; each decodes as ``generate`` alone."""
    from PIL import Image

    from fitmap.cli.demo import demo_checkpoint
    from fitmap.runtime.prompting import Prompter

    path = demo_checkpoint(tmp_path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    assert cache_kind(model) == ("cache", True)

    def inputs(text: str, size) -> dict:
        p = Prompter.for_model(path, model.config)
        p.add_user(text, [Image.new("RGB", size, (200, 10, 10))] if size else [])
        return p.inputs(torch.device("cpu"))

    prompts = [inputs("what is in this image ?", (64, 48)), inputs("hello there", None), inputs("and this", (40, 90))]
    got = _joined(model, prompts, 8, joins=[0, 1, 3])
    assert got == [_alone(model, p, 8) for p in prompts]


def test_seeded_sampling_is_the_same_alone_or_in_a_batch():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny.config("llama")).eval()
    prompts = [{"input_ids": torch.randint(3, 200, (1, n))} for n in (6, 9, 4)]
    settings = {"temperature": 0.9, "top_p": 0.8, "seed": 1234}
    together = _joined(model, prompts, 10, joins=[0, 1, 1], **settings)
    alone = [_joined(model, [p], 10, joins=[0], **settings)[0] for p in prompts]
    assert together == alone
    assert len({tuple(x) for x in together}) == 3  # sampled, not one answer for every prompt
    other = _joined(model, prompts[:1], 10, joins=[0], **(settings | {"seed": 99}))
    assert other != alone[:1]


def test_a_stop_string_cuts_the_text_before_it_and_ends_the_row():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny.config("llama")).eval()
    prompt = {"input_ids": torch.randint(3, 200, (1, 6))}
    tokens = _alone(model, prompt, 8)
    stop = f" {tokens[3]}"  # the text of the fourth token: the answer ends before it
    batch = Batch(model, torch.device("cpu"), Ids(), set(), "cache")
    job = _job(8, stop=(stop,))
    batch.join(job, prompt)
    while batch.rows:
        batch.step()
    text = "".join(job.out)  # type: ignore[attr-defined]
    assert job.finish_reason == "stop" and stop not in text
    assert text == Ids().decode(tokens[: tokens.index(tokens[3])])


def test_the_footprint_counts_left_padding_and_what_rows_may_still_generate():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny.config("llama")).eval()
    batch = Batch(model, torch.device("cpu"), Ids(), set(), "cache")
    batch.join(_job(10), {"input_ids": torch.randint(3, 200, (1, 4))})  # 4 in the cache, 1 made, 9 to come
    assert batch.footprint() == 1 * (4 + 9)
    assert batch.footprint(prompt=12, new=3) == 2 * (12 + 9)  # the wider prompt pads the first row
    batch.step()
    assert batch.footprint() == 5 + 8 and batch.tokens == 5 + 8


def test_models_whose_cache_is_not_plain_attention_are_not_batched_step_by_step():
    sliding = transformers.MistralConfig(**tiny.TEXT, sliding_window=16)
    assert cache_kind(transformers.AutoModelForCausalLM.from_config(sliding)) is None
    assert cache_kind(transformers.AutoModelForCausalLM.from_config(tiny.config("llama"))) == ("cache", True)


def test_a_model_that_fails_on_a_padded_batch_is_found_before_any_request():
    """transformers 5.25's DeepSeek-V3 raises in its attention on a padding mask (``generate`` with a
    left-padded batch too): the probe says so, and the replica serves one request at a time."""
    torch.manual_seed(0)
    llama = transformers.AutoModelForCausalLM.from_config(tiny.config("llama")).eval()
    assert Batch(llama, torch.device("cpu"), Ids(), set(), "cache").probe() is None
    model = transformers.AutoModelForCausalLM.from_config(tiny.config("deepseek_v3")).eval()
    ids = torch.randint(3, 200, (2, 5))
    try:
        model.generate(ids, attention_mask=torch.tensor([[0] * 2 + [1] * 3, [1] * 5]), max_new_tokens=2)
    except RuntimeError:
        why = Batch(model, torch.device("cpu"), Ids(), set(), "cache").probe()
        assert why is not None and "RuntimeError" in why
    else:  # a transformers that decodes it: so does the batch
        assert Batch(model, torch.device("cpu"), Ids(), set(), "cache").probe() is None


def test_a_replica_streaming_blocks_from_disk_batches_continuously(tmp_path, monkeypatch):
    """The server's engine on a plan that streams blocks from disk: requests sent together decode
    in one batch through the offload hooks and answer as ``from_pretrained``'s ``generate`` alone."""
    from fitmap import pipeline
    from fitmap.planning.devices import make_machine
    from fitmap.planning.workload import Workload
    from fitmap.runtime import threads
    from fitmap.serve import engine as eng
    from fitmap.serve.placement import serve_plan
    from tests.remote import byte_tokenizer

    # one thread for both ways: greedy ties of a random model must not turn on the thread count
    monkeypatch.setattr(threads, "_fixed", threads.Threads(1, "--threads"))

    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(tiny.config("llama")).eval()
    with torch.no_grad():  # wide weights: no near-ties between tokens for rounding to flip
        for w in lm.parameters():
            w.normal_(0, 0.3)
    path = tmp_path / "m"
    lm.save_pretrained(path, max_shard_size="200KB")
    byte_tokenizer(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    machine = make_machine(None, int(size * 1.7), tmp_path / "disk")  # room for the buffers, not the blocks
    req = pipeline.PlanRequest(str(path), machine, Workload(4, 64, 6), estimate="analytic")
    plan = serve_plan(req, concurrency=4)
    assert "disk" in plan.replicas[0].plan.device_map.values()

    tok = transformers.AutoTokenizer.from_pretrained(path)
    prompts, alone = [], []
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replica computes: this thread's count is its own, not the worker's
    try:  # from_pretrained's greedy answer to each prompt alone, for prompts it answers without a near-tie
        for p in [" ".join(chr(97 + (i * 7 + j) % 26) for j in range(1 + i % 4)) for i in range(24)]:
            ids = tok([p], return_tensors="pt")
            out = lm.generate(
                **ids,
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
            gaps = [float(s.topk(2).values[0, 0] - s.topk(2).values[0, 1]) for s in out.scores]
            new = out.sequences[0, ids["input_ids"].shape[1] :]
            if int(new.numel()) == 6 and min(gaps) > 2e-3 and len(prompts) < 4:  # rounding cannot flip these
                prompts.append(p)
                alone.append((tok.decode(new, skip_special_tokens=True), 6))
    finally:
        torch.set_num_threads(threads_before)
    assert len(prompts) == 4, "enough prompts the random model answers without a near-tie"

    engine = eng.Engine(path, plan)
    engine.start()
    loop = asyncio.new_event_loop()

    async def go():
        jobs = [eng.Request(None, p, 6) for p in prompts]
        for j in jobs:
            j.loop, j.chunks = loop, asyncio.Queue()
            engine.submit(j)
        out = []
        for j in jobs:
            parts = []
            while (item := await j.chunks.get()) is not eng.END:
                assert not isinstance(item, BaseException), item
                parts.append(item)
            out.append(("".join(parts), j.completion_tokens))
        return out

    try:
        together = loop.run_until_complete(go())
        steps = engine.workers[0].batch.steps
    finally:
        engine.stop()
        loop.close()
    assert together == alone and all(n == 6 for _, n in alone), (together, alone)
    assert steps < 4 * 6  # decoded together, not one after another


@pytest.mark.parametrize("where", ["cpu-compute", "disk-compute"])
def test_a_batch_over_experts_fetched_per_routed_expert_decodes_as_generate_alone(checkpoints, where):
    """Experts on the CPU (in RAM, or left on disk and read per routed expert): rows of a batch route to
    different experts, and each still gets the tokens it gets alone."""
    from fitmap.runtime import loader
    from tests.runtime.test_cpu_experts import _experts_plan

    d = checkpoints("qwen3_moe")
    plan, _ = _experts_plan(d, where)
    torch.manual_seed(0)
    prompts = [{"input_ids": torch.randint(3, 200, (1, n))} for n in (5, 11, 3)]
    with loader.load(d, plan, progress=False) as lm:
        got = _joined(lm.model, prompts, 6, joins=[0, 2, 3])
        assert got == [_alone(lm.model, p, 6) for p in prompts]
