"""Stage 7 — Run: load a plan's model once and generate, reporting measured vs predicted memory.

``fitmap run`` answers one prompt (text, optional images) and prints, per device,
the memory measured during the run beside the plan's prediction. ``fitmap chat``
keeps a multi-turn conversation. Both stream tokens to the terminal.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TextIO

import torch

from fitmap import pipeline
from fitmap.errors import BadInput, DoesNotFit, OutOfBudget
from fitmap.planning import devices
from fitmap.planning.plan import Plan
from fitmap.planning.workload import Workload
from fitmap.runtime import distributed
from fitmap.runtime.loader import LoadedModel, load
from fitmap.runtime.prompting import Prompter
from fitmap.runtime.threads import apply as apply_threads
from fitmap.sizes import fmt_bytes


@dataclass(frozen=True)
class DeviceUse:
    device: str  # "0", "1", ..., "cpu"
    predicted_bytes: int  # the plan's total for the device
    measured_bytes: int  # GPUs: torch.cuda.max_memory_allocated; cpu: peak RSS above the pre-load RSS
    what: str  # how it was measured


@dataclass(frozen=True)
class Answer:
    text: str
    new_tokens: int
    seconds: float
    load_seconds: float
    memory: tuple[DeviceUse, ...]
    plan: Plan


def plan_for_run(
    model: str,
    prompter_tokens: int,
    images: list,
    new: int,
    args_plan: str | None,
    machine: devices.Machine,
    trust_remote_code: bool,
    quantize: str | None = None,
) -> tuple[Plan, pipeline.Prepared]:
    """The plan to run: from ``--plan`` (checked against the model), or made now for this prompt."""
    sizes = tuple(img.size for img in images)
    req = pipeline.PlanRequest(
        model,
        machine,
        Workload(1, max(1, prompter_tokens), new, sizes),
        trust_remote_code=trust_remote_code,
        quantize=quantize,
    )
    if args_plan:
        plan = Plan.load(args_plan)
        if not plan.fits:
            raise DoesNotFit(
                f"plan {args_plan} does not fit its machine ({plan.advice or 'fits: false'}); "
                "re-plan until fitmap plan says it fits"
            )
        if quantize is not None and quantize != plan.quantize:
            raise BadInput(
                f"--quantize {quantize} differs from the plan's ({plan.quantize or 'none'}); the plan "
                "was sized for its own: drop --quantize, or re-plan with it"
            )
        req = replace(req, dtype=_dtype_of(plan), quantize=plan.quantize)
        prep = pipeline.prepare(req)
        pipeline.require_matching(plan, prep)
        return plan, prep
    prep = pipeline.prepare(req)
    plan = pipeline.plan(req, prep)
    if not plan.fits:
        raise DoesNotFit(plan.advice)
    return plan, prep


def _dtype_of(plan: Plan):
    from fitmap.planning.workload import Dtype

    return Dtype({"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(plan.dtype, "auto"))


def local_model_dir(prep: pipeline.Prepared) -> Path:
    if prep.inventory.path is None:
        raise BadInput(
            f"{prep.inventory.name} is a catalog architecture with no weights: fitmap run needs a model "
            "directory or a Hugging Face id in the local cache; use fitmap plan/check for catalog names"
        )
    if prep.inventory.source == "config":
        raise BadInput(
            f"{prep.inventory.path} holds config.json but no weights (*.safetensors or pytorch_model.bin); "
            "download them to run the model (fitmap plan and check work from the config alone)"
        )
    return prep.inventory.path


def start(
    model_dir: Path, plan: Plan, trust_remote_code: bool, readahead: bool = True
) -> tuple[LoadedModel, devices.RssSampler]:
    """Load the model per ``plan`` with GPU budgets enforced; memory is sampled from here on."""
    for d in plan.devices:
        if d.device.isdigit() and torch.cuda.is_available():
            devices.enforce_budget(int(d.device), d.capacity_bytes - d.reserve_bytes)
    apply_threads(plan)  # before loading: torch keeps a thread's count once it has run an op
    sampler = devices.RssSampler().__enter__()
    try:
        ranks = distributed.Ranks.from_env()
        if ranks is not None:  # started by torchrun: this process runs one stage of the plan
            return distributed.load_stage(str(model_dir), model_dir, plan, ranks, trust_remote_code, readahead), sampler
        return load(model_dir, plan, trust_remote_code=trust_remote_code, readahead=readahead), sampler
    except torch.OutOfMemoryError as e:
        sampler.__exit__(None, None, None)
        raise OutOfBudget(
            f"a GPU ran out of memory while loading, inside the budgets the plan set "
            f"({_budgets(plan)}): {str(e).splitlines()[0][:160]}. Another process may hold "
            "memory on it (see nvidia-smi); free it, or re-plan with --gpus naming smaller "
            "budgets or a larger --reserve"
        ) from None
    except BaseException:
        sampler.__exit__(None, None, None)
        raise


def _budgets(plan: Plan) -> str:
    return ", ".join(
        f"GPU {d.device}: {fmt_bytes(d.capacity_bytes - d.reserve_bytes)}" for d in plan.devices if d.device.isdigit()
    )


def generate(loaded: LoadedModel, prompter: Prompter, new: int, out: TextIO | None) -> tuple[str, int, float]:
    """Greedy generation of up to ``new`` tokens; streams text to ``out`` when given."""
    import time

    own = own_chat(loaded.model)
    if own is not None and (own in OWN_IMAGE_FORMS or not prompter.has_images()):
        return _own_chat(loaded, own, prompter, new, out)
    from transformers import StoppingCriteriaList

    inputs = prompter.inputs(loaded.input_device)
    streamer = _Streamer(prompter.tokenizer, out) if out is not None else None
    t = time.perf_counter()
    try:
        with torch.inference_mode():
            ids = loaded.model.generate(  # type: ignore[operator]  # a PreTrainedModel method
                **inputs,
                max_new_tokens=new,
                do_sample=False,
                streamer=streamer,
                pad_token_id=prompter.tokenizer.pad_token_id or prompter.tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([_Tuning(loaded.plan)]),
            )
    except torch.OutOfMemoryError as e:
        raise OutOfBudget(out_of_budget_message(loaded.plan, int(inputs["input_ids"].shape[1]), new, e)) from None
    seconds = time.perf_counter() - t
    new_ids = ids[0, inputs["input_ids"].shape[1] :]
    return prompter.decode(new_ids), int(new_ids.numel()), seconds


class _Tuning:
    """A stopping criterion that never stops: between two decode steps, torch's threads follow
    the cores other processes leave free (:class:`fitmap.runtime.threads.Tuner`)."""

    def __init__(self, plan: Plan) -> None:
        from fitmap.runtime import threads

        self.tune = threads.Tuner(threads.current() or threads.choose((plan,)))

    def __call__(self, input_ids, scores, **kwargs):
        self.tune()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# the own paths that take images: every prompt goes through them (ChatGLM3's chat() is text only)
OWN_IMAGE_FORMS = ("internvl", "minicpmv", "cogvlm", "glm4v")


def own_chat(model) -> str | None:
    """Which form of its own ``chat()`` the model's code (remote code) defines, if any:
    ``"glm"`` — ChatGLM's ``chat(tokenizer, query, history)``; ``"internvl"`` — InternVL's
    ``chat(tokenizer, pixel_values, question, generation_config, history)``; ``"minicpmv"`` —
    ``chat(image, msgs, tokenizer)``; ``"cogvlm"`` — no ``chat()``, but
    ``build_conversation_input_ids`` to feed ``generate``; ``"glm4v"`` — no ``chat()``, its tokenizer's
    ``apply_chat_template`` takes the image beside the text and makes ``generate``'s inputs. Prompt format,
    image tokens and stop tokens are then the model's."""
    import inspect

    build = getattr(type(model), "build_conversation_input_ids", None)
    if build is not None and getattr(build, "__module__", "").startswith("transformers_modules"):
        return "cogvlm"
    remote = type(model).__module__.startswith("transformers_modules")
    if remote and getattr(getattr(model, "config", None), "boi_token_id", None) is not None:
        return "glm4v"  # GLM-4V: images between boi and eoi, laid out by its tokenizer's chat template
    fn = getattr(type(model), "chat", None)
    if fn is None or not getattr(fn, "__module__", "").startswith("transformers_modules"):
        return None
    params = list(inspect.signature(fn).parameters)[1:]
    if params[:2] == ["tokenizer", "query"] and "history" in params:
        return "glm"
    if params[:4] == ["tokenizer", "pixel_values", "question", "generation_config"]:
        return "internvl"
    if params[:3] == ["image", "msgs", "tokenizer"]:
        return "minicpmv"
    return None


def _own_chat(
    loaded: LoadedModel, form: str, prompter: Prompter, new: int, out: TextIO | None
) -> tuple[str, int, float]:
    """One turn through the model's own ``chat()``, greedy, at most ``new`` tokens."""
    import time

    turns = prompter.text_turns()
    query, history = turns[-1]["content"], turns[:-1]
    model: Any = loaded.model  # its own remote code: chat(), build_conversation_input_ids(), no stubs
    tokenizer = prompter.tokenizer
    count = None  # the reply's tokens: counted from the ids where the model's path returns them
    generated: list[int] = []
    t = time.perf_counter()
    try:
        with torch.inference_mode(), _counting_generate(generated):
            if form == "glm":
                reply, _ = model.chat(
                    tokenizer, query, history=history, max_new_tokens=new, do_sample=False, num_beams=1
                )
            elif form == "cogvlm":  # no chat(): its card builds the inputs with the model, then generate()
                pairs = [(a["content"], b["content"]) for a, b in zip(history[0::2], history[1::2])]
                images = list(prompter.messages[-1]["images"])
                built = model.build_conversation_input_ids(tokenizer, query=query, history=pairs, images=images or None)
                device, dtype = loaded.input_device, _float_dtype(model)
                kwargs = {k: built[k][None].to(device) for k in ("input_ids", "token_type_ids", "attention_mask")}
                kwargs["images"] = [[img.to(device, dtype) for img in built["images"]]] if built["images"] else None
                ids = model.generate(
                    **kwargs,
                    max_new_tokens=new,
                    do_sample=False,
                    pad_token_id=getattr(model.config, "pad_token_id", None),
                )
                new_ids = ids[0, kwargs["input_ids"].shape[1] :]
                reply, count = tokenizer.decode(new_ids, skip_special_tokens=True), int(new_ids.numel())
            elif form == "glm4v":  # its card: the tokenizer's chat template with the image, then generate()
                images = list(prompter.messages[-1]["images"])
                messages = [{"role": m["role"], "content": m["content"]} for m in history]
                messages.append({"role": "user", "content": query} | ({"image": images[0]} if images else {}))
                built = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_tensors="pt", return_dict=True
                )
                device, dtype = loaded.input_device, _float_dtype(model)
                kwargs = {k: v.to(device, dtype) if k == "images" else v.to(device) for k, v in built.items()}
                ids = model.generate(**kwargs, max_new_tokens=new, do_sample=False)
                new_ids = ids[0, kwargs["input_ids"].shape[1] :]
                reply, count = tokenizer.decode(new_ids, skip_special_tokens=True), int(new_ids.numel())
            elif form == "minicpmv":  # greedy: sampling=False alone is beam search with a repetition penalty
                msgs = history + [{"role": "user", "content": list(prompter.messages[-1]["images"]) + [query]}]
                reply = model.chat(
                    image=None,
                    msgs=msgs,
                    tokenizer=tokenizer,
                    processor=prompter.processor,
                    max_new_tokens=new,
                    sampling=False,
                    num_beams=1,
                    repetition_penalty=1.0,
                )
            else:
                pairs = [(a["content"], b["content"]) for a, b in zip(history[0::2], history[1::2])]
                pixels = prompter.internvl_pixels(loaded.input_device, _float_dtype(model))
                reply = model.chat(
                    tokenizer, pixels, query, dict(max_new_tokens=new, do_sample=False), history=pairs or None
                )
    except torch.OutOfMemoryError as e:
        raise OutOfBudget(out_of_budget_message(loaded.plan, 0, new, e)) from None
    seconds = time.perf_counter() - t
    text = reply if isinstance(reply, str) else str(reply)
    if out is not None:
        out.write(text + "\n")
        out.flush()
    if count is None and generated:
        count = generated[-1]
    return text, count if count is not None else len(tokenizer.encode(text, add_special_tokens=False)), seconds


@contextlib.contextmanager
def _counting_generate(counts: list[int]):
    """While a model's own ``chat()`` runs: the new tokens each ``generate`` call made (its output less
    the ``input_ids`` it was given; all of it when it was given ``inputs_embeds`` alone)."""
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate

    def generate(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        ids = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        given = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            counts.append(int(ids.shape[1]) - (int(given.shape[1]) if isinstance(given, torch.Tensor) else 0))
        return out

    GenerationMixin.generate = generate  # type: ignore[method-assign]  # counted while chat() runs
    try:
        yield
    finally:
        GenerationMixin.generate = original  # type: ignore[method-assign]  # restores the patch


def _float_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def out_of_budget_message(plan: Plan, tokens: int, new: int, error: BaseException) -> str:
    """One line for a GPU that ran out inside its budget: the budget, what the plan was made for, the fix."""
    import re

    m = re.search(r"GPU (\d+)", str(error))
    gpu = m.group(1) if m else next((d.device for d in plan.devices if d.device.isdigit()), "?")
    led = next((d for d in plan.devices if d.device == gpu), None)
    budget = f" (budget {fmt_bytes(led.capacity_bytes - led.reserve_bytes)})" if led is not None else ""
    w = plan.workload
    made_for = f"batch {w.batch}, {w.prompt} prompt + {w.new} new tokens"
    return (
        f"GPU {gpu} ran out of memory{budget} during generation: this request has {tokens} prompt tokens and "
        f"{new} new, the plan was made for {made_for}. Re-plan for this request (fitmap plan ... --prompt "
        f"{tokens} --new {new} --out plan.json), or shorten the prompt"
    )


class _Streamer:
    """Prints decoded text as tokens arrive (transformers' TextStreamer, to any stream)."""

    def __init__(self, tokenizer, out: TextIO) -> None:
        from transformers import TextStreamer

        self.inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.inner.on_finalized_text = self._print  # type: ignore[method-assign]  # prints to self.out

    def _print(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()

    def put(self, value) -> None:
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


def measured(plan: Plan, sampler: devices.RssSampler, model_dir: Path | None = None) -> tuple[DeviceUse, ...]:
    """Per device: GPUs from torch's allocator; the CPU from the peak of the bytes live in the C
    allocator (and pinned host memory) above what the process held before loading, plus the
    checkpoint's pages mapped (``model_dir``'s mappings in /proc/self/smaps; else all
    file-backed growth). Where the allocator cannot say (not glibc), sampled resident private
    memory instead; the resident peak is always in the row's text."""
    sampler.__exit__(None, None, None)
    mapped = devices.mapped_bytes(model_dir) if model_dir is not None else None
    out = []
    for d in plan.devices:
        if d.device.isdigit():
            peak = devices.gpu_peak(int(d.device)) if torch.cuda.is_available() else 0
            out.append(DeviceUse(d.device, d.total_bytes, peak, "torch.cuda.max_memory_allocated"))
        elif d.device == "cpu":
            anon = max(0, sampler.anon_peak - sampler.anon_start)
            if mapped is not None:
                file, what = mapped, "checkpoint pages mapped (smaps)"
            else:
                file, what = max(0, sampler.file_peak - sampler.file_start), "file-backed pages (RssFile)"
            live = None
            if sampler.live_peak is not None:
                assert sampler.live_start is not None  # read together with live_peak (RssSampler.__enter__)
                live = max(0, sampler.live_peak - sampler.live_start)
            if live is None:
                why = " (the allocator's count of live bytes grew too slow to sample)" if sampler.live_given_up else ""
                out.append(
                    DeviceUse(
                        "cpu",
                        d.total_bytes,
                        anon + file,
                        f"resident memory grew by up to {fmt_bytes(anon)} private + {fmt_bytes(file)} {what}{why}",
                    )
                )
                continue
            live += devices.pinned_host_peak()
            out.append(
                DeviceUse(
                    "cpu",
                    d.total_bytes,
                    live + file,
                    f"at the peak, {fmt_bytes(live)} allocated since before loading + {fmt_bytes(file)} "
                    f"{what}. Resident memory grew by up to {fmt_bytes(anon + file)} ({fmt_bytes(anon)} "
                    f"private): it also holds what the C allocator keeps for reuse after a free",
                )
            )
    return tuple(out)


def text_tokens(prompter: Prompter, config) -> int:
    """Prompt tokens that are not image placeholders (the plan adds image tokens itself)."""
    ids = prompter.inputs(torch.device("cpu"))["input_ids"]
    image_id = getattr(config, "image_token_id", None)
    return int((ids != image_id).sum()) if image_id is not None else int(ids.numel())


def answer(
    model: str,
    text: str,
    images: list,
    new: int,
    machine: devices.Machine,
    plan_file: str | None = None,
    trust_remote_code: bool = False,
    out: TextIO | None | Literal["stdout"] = "stdout",
    quantize: str | None = None,
) -> Answer:
    """Plan (or read the plan), load, answer ``text`` about ``images``, measure. The reply streams to
    ``out`` (the current ``sys.stdout`` by default; None: not at all)."""
    out = sys.stdout if out == "stdout" else out
    prep_inv = pipeline.prepare(
        pipeline.PlanRequest(model, machine, trust_remote_code=trust_remote_code, estimate="analytic")
    )
    model_dir = local_model_dir(prep_inv)
    prompter = Prompter.for_model(model_dir, prep_inv.skeleton.config, trust_remote_code)
    prompter.add_user(text, images)
    tokens = text_tokens(prompter, prep_inv.skeleton.config)
    plan, _ = plan_for_run(model, tokens, images, new, plan_file, machine, trust_remote_code, quantize)
    loaded, sampler = start(model_dir, plan, trust_remote_code)
    with loaded:
        reply, n, seconds = generate(loaded, prompter, new, out)
        return Answer(reply, n, seconds, loaded.seconds, measured(plan, sampler, model_dir), plan)
