"""Vision-language families planned, checked and run with an image, each on a tiny random-weight
model of the real transformers class: the vision tower, its projector and the text embeddings stay on
one GPU, the check on fake devices is clean, a cpu + disk split generates from_pretrained's greedy
tokens for a prompt with an image, and the image-token count is the image processor's."""

from __future__ import annotations

import pytest
import torch
import transformers

import fitmap
from fitmap.pipeline import PlanRequest, prepare
from fitmap.planning.devices import make_machine
from fitmap.planning.images import QWEN_PIXELS, image_shape
from fitmap.planning.workload import Workload
from fitmap.runtime import loader
from fitmap.simulation.check import check
from fitmap.simulation.vision_inputs import vision_inputs
from tests.runtime.test_loader import plan_for
from tests.tiny import NO_IMAGE_TOKEN, OTHER_VLMS

FAMILIES = [
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "mistral3",
    "glm4v",
    "llava",
    "internvl",
    "idefics3",
    "smolvlm",
    "llava_onevision",
]
IMAGE = (100, 80)


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_with_an_image_keeps_the_vision_side_together_and_checks_clean(checkpoints, family):
    d = checkpoints(family)
    plan = fitmap.plan(str(d), gpus="2x1GiB", prompt=32, new=8, images=(IMAGE,))
    assert plan.fits and plan.estimate == "simulate"
    input_side = plan.groups["input"]
    assert any(t in u for u in input_side for t in ("visual.", "vision_tower", "vision_model"))
    assert any(t in u for u in input_side for t in ("merger", "projector", "connector"))
    _vision_side_together_and_clean(d, plan)


def _vision_side_together_and_clean(d, plan) -> None:
    input_side = plan.groups["input"]
    assert any("embed_tokens" in u for u in input_side)
    assert len({plan.device_map[u] for u in input_side}) == 1
    prep = prepare(PlanRequest(str(d), make_machine("2x1GiB", None, None)))
    assert check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan).clean


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_and_disk_split_generates_from_pretraineds_tokens_with_an_image(checkpoints, family):
    _split_run_gives_from_pretraineds_tokens(checkpoints(family))


def _split_run_gives_from_pretraineds_tokens(d) -> None:
    config = transformers.AutoConfig.from_pretrained(d)
    inputs, tokens = vision_inputs(config, Workload(1, 12, 6, (IMAGE,)), torch.device("cpu"))
    assert tokens == image_shape(config, *IMAGE).tokens > 0
    inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(0))
    want = transformers.AutoModelForImageTextToText.from_pretrained(d).eval()
    expected = want.generate(**inputs, max_new_tokens=6, do_sample=False)
    layers = [
        u
        for u in plan_for(d).device_map
        if ".layers." in u and not any(t in u for t in ("visual", "vision", "encoder"))
    ]
    with loader.load(d, plan_for(d, {layers[-1]: "disk", layers[0]: "disk"}), progress=False) as lm:
        got = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


SIZES = [(100, 80), (640, 480), (1344, 1344), (3000, 200), (200, 3000), (4100, 4100)]


@pytest.mark.parametrize("model_type", sorted(QWEN_PIXELS))
def test_qwen_image_tokens_are_the_image_processors(model_type):
    """Each family's published processor settings (patch 14 or 16, 2x2 merge, its pixel limits): the
    tokens fitmap predicts are the grid the real image processor makes, merged."""
    from PIL import Image

    patch = 16 if model_type.startswith("qwen3") else 14
    lo, hi = QWEN_PIXELS[model_type]
    processor = transformers.Qwen2VLImageProcessor(
        size={"shortest_edge": lo, "longest_edge": hi}, patch_size=patch, merge_size=2
    )
    config = transformers.AutoConfig.for_model(model_type, vision_config={"patch_size": patch, "spatial_merge_size": 2})
    for w, h in SIZES:
        grid = processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0]
        assert image_shape(config, w, h).tokens == int(grid.prod()) // 4, (model_type, w, h)


def test_mistral3_image_tokens_are_its_image_processors():
    """Mistral Small 3.1's published settings (longest edge 1540, 14-px patches, 2x2 merge): the tokens
    fitmap predicts are the merged patches of the size its image processor resizes to."""
    from PIL import Image

    config = transformers.AutoConfig.for_model("mistral3")
    processor = transformers.PixtralImageProcessorPil(size={"longest_edge": 1540}, patch_size=14)
    for w, h in SIZES:
        rh, rw = processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_sizes"][0].tolist()
        assert image_shape(config, w, h).tokens == (rh // 28) * (rw // 28), (w, h)


def test_glm4v_image_tokens_are_its_image_processors():
    from PIL import Image

    config = transformers.AutoConfig.for_model("glm4v")
    processor = transformers.Glm4vImageProcessorPil()
    for w, h in [s for s in SIZES if max(s) / min(s) < 200]:
        grid = processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0]
        assert image_shape(config, w, h).tokens == int(grid.prod()) // 4, (w, h)


def _idefics3_config_dir(tmp_path, **vision):
    config = transformers.Idefics3Config(vision_config=vision) if vision else transformers.Idefics3Config()
    config.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.slow
def test_idefics3_at_full_size_checks_with_its_tiles(tmp_path, capsys):
    """Idefics3-8B's tower (364 px tiles, 14 px patches) with a 1344x1344 image: 16 tiles + the whole image,
    6.8 M input values, which the model scans for padding tiles (``(pixel_values == 0).sum``): simulated and
    checked clean, from the config alone."""
    from fitmap.cli import main

    d = _idefics3_config_dir(
        tmp_path,
        image_size=364,
        patch_size=14,
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
    )
    config = transformers.AutoConfig.from_pretrained(d)
    assert image_shape(config, 1344, 1344).tokens == 17 * 169
    code = main(["plan", d, "--gpus", "2x24GiB", "--image", "1344x1344", "--prompt", "512", "--new", "64", "--check"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0 and "simulate costs" in out and "no device mismatch" in out


def test_a_model_the_fake_devices_cannot_run_gets_one_line_from_check(tmp_path, capsys):
    """transformers' default Idefics3 config (224 px, 32 px patches: a 7 x 7 grid its pixel shuffle cannot
    halve) fails in the model's own code: the plan falls back to the analytic estimate and says why; the
    check says where, in one line."""
    from fitmap.cli import main

    d = _idefics3_config_dir(tmp_path)
    code = main(["plan", d, "--gpus", "2x24GiB", "--image", "448x448", "--prompt", "64", "--new", "8", "--check"])
    captured = capsys.readouterr()
    assert "analytic (simulation failed: RuntimeError" in " ".join(captured.out.split())
    assert code == 1 and len(captured.err.strip().splitlines()) == 1
    assert "cannot replay this model on fake devices" in captured.err and "modeling_idefics3.py:" in captured.err


def test_a_simulation_that_failed_is_remembered(tmp_path, monkeypatch):
    """The same request again goes analytic at once, with the same reason and the same map."""
    from fitmap.simulation import costs as simulate_module

    d = _idefics3_config_dir(tmp_path)
    plan = fitmap.plan(d, gpus="2x24GiB", prompt=64, new=8, images=((448, 448),))
    assert "simulation failed" in plan.estimate

    def not_again(*args, **kwargs):
        raise AssertionError("simulated again")

    monkeypatch.setattr(simulate_module, "simulated_costs", not_again)
    again = fitmap.plan(d, gpus="2x24GiB", prompt=64, new=8, images=((448, 448),))
    assert again.estimate == plan.estimate and again.device_map == plan.device_map


@pytest.mark.parametrize("family", ["mistral3", "glm4v", "idefics3", "smolvlm", "llava_onevision", "qwen3_vl"])
def test_the_model_takes_the_image_tokens_predicted_at_several_sizes(checkpoints, family):
    """The model's own check (image features == image tokens, in its forward) passes for the counts
    fitmap predicts, at sizes that tile, pad and resize differently; and two images in one prompt."""
    d = checkpoints(family)
    config = transformers.AutoConfig.from_pretrained(d)
    model = transformers.AutoModelForImageTextToText.from_pretrained(d).eval()
    for images in [((100, 80),), ((30, 200),), ((300, 120),), ((64, 64), (120, 40))]:
        inputs, tokens = vision_inputs(config, Workload(1, 8, 1, images), torch.device("cpu"))
        assert tokens == sum(image_shape(config, w, h).tokens for w, h in images) or len(images) > 1
        with torch.no_grad():
            out = model(**inputs)
        assert out.logits.shape[1] == inputs["input_ids"].shape[1]


def test_llama4_tiles_as_its_image_processor_cuts_them(checkpoints):
    """Llama 4 (336 px tiles, 14 px patches, pixel shuffle to a quarter: 144 tokens a tile): the best-fit
    canvas of at most 16 tiles, plus a global tile when there are several. Its image processor needs
    torchvision, so the rule is fitmap's. Where transformers' own forward runs with an image (5.25 on), the
    plan is simulated like every other family's; where it does not (5.24 fails on ``image_outputs``), the
    plan falls back to the analytic estimate and names the model's file. Either way the vision side stays
    together."""
    config = transformers.AutoConfig.for_model("llama4", vision_config={"image_size": 336, "patch_size": 14})
    for (w, h), tiles in [((336, 336), 1), ((672, 336), 3), ((336, 1000), 4), ((1000, 1000), 10), ((5000, 5000), 17)]:
        shape = image_shape(config, w, h)
        assert (shape.tiles, shape.tokens) == (tiles, 144 * tiles), (w, h)
    d = checkpoints("llama4")
    plan = fitmap.plan(str(d), gpus="2x1GiB", prompt=32, new=8, images=(IMAGE,))
    assert plan.fits and any("vision_model" in u for u in plan.groups["input"])
    if plan.estimate != "simulate":
        assert "simulation failed" in plan.estimate and "modeling_llama4.py:" in plan.estimate
        assert len({plan.device_map[u] for u in plan.groups["input"]}) == 1
        return
    _vision_side_together_and_clean(d, plan)
    _split_run_gives_from_pretraineds_tokens(d)


def test_run_with_an_image_on_a_vlm_without_processor_files_says_what_to_copy(checkpoints, tmp_path, capsys):
    from PIL import Image

    from fitmap.cli import main

    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "a.png")
    model = str(checkpoints("qwen3_vl"))
    capsys.readouterr()
    code = main(
        ["run", model, "--prompt", "what is this", "--image", str(tmp_path / "a.png"), "--new", "2", "--cpu", "1GiB"]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no image processor" in err and "copy the processor files" in err


@pytest.mark.parametrize("family", OTHER_VLMS)
def test_any_vlm_plans_with_an_image_through_its_processor_and_checks_clean(checkpoints, family):
    """No per-family code: the image processor its type pairs with, fitted to the tower, and the count of
    features its own get_image_features returns; the simulation then runs the model's placeholder check."""
    d = checkpoints(family)
    plan = fitmap.plan(str(d), gpus="2x1GiB", prompt=32, new=8, images=(IMAGE,))
    assert plan.fits and plan.estimate == "simulate", plan.estimate
    _vision_side_together_and_clean(d, plan)


@pytest.mark.parametrize("family", OTHER_VLMS)
def test_any_vlm_split_run_gives_from_pretraineds_tokens_with_the_inputs_fitmap_makes(checkpoints, family):
    d = checkpoints(family)
    want = transformers.AutoModelForImageTextToText.from_pretrained(d).eval()
    config = want.config
    inputs, tokens = vision_inputs(config, Workload(1, 12, 6, (IMAGE,)), torch.device("cpu"), model=want)
    assert tokens > 0 and int((inputs["input_ids"] == _image_id(config)).sum()) == tokens
    inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(0))
    expected = want.generate(**inputs, max_new_tokens=6, do_sample=False)
    towers = ("visual", "vision", "encoder", "perceiver", "qformer", "connector")
    layers = [u for u in plan_for(d).device_map if ".layers." in u and not any(t in u for t in towers)]
    with loader.load(d, plan_for(d, {layers[-1]: "disk", layers[0]: "disk"}), progress=False) as lm:
        got = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


def _image_id(config) -> int:
    return getattr(config, "image_token_id", None) or config.image_token_index


def test_a_text_plan_of_a_model_that_requires_images_simulates_with_one(checkpoints):
    """BLIP-2's forward has no text-only path: its plan is simulated with one image of its tower's size."""
    plan = fitmap.plan(str(checkpoints("blip-2")), gpus="2x1GiB", prompt=32, new=8)
    assert plan.estimate == "simulate", plan.estimate


@pytest.mark.parametrize("family", NO_IMAGE_TOKEN)
def test_a_vlm_whose_config_names_no_image_token_simulates_with_its_image_and_runs(checkpoints, family):
    """GIT puts the image features before the text itself; Kosmos-2 puts them where its
    ``image_embeds_position_mask`` says. The plan counts the positions the model's own prefill caches,
    its check is clean, and a split run gives from_pretrained's tokens with the inputs fitmap makes."""
    from fitmap.simulation.costs import simulated_costs

    d = checkpoints(family)
    plan = fitmap.plan(str(d), gpus="2x1GiB", prompt=32, new=8, images=(IMAGE,))
    assert plan.fits and plan.estimate == "simulate", plan.estimate
    prep = prepare(PlanRequest(str(d), make_machine("2x1GiB", None, None)))
    assert check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan).clean
    want = transformers.AutoModelForImageTextToText.from_pretrained(d).eval()
    inputs, _ = vision_inputs(want.config, Workload(1, 12, 6, (IMAGE,)), torch.device("cpu"), model=want)
    with torch.no_grad():
        cached = want(**inputs, use_cache=True).cache.get_seq_length()
    planned = simulated_costs(prep, Workload(1, 12, 6, (IMAGE,))).image_tokens
    assert planned > 0 and cached == 12 + planned  # the prompt's 12 text tokens, then the image's
    pixels = next(k for k in ("pixel_values", "flattened_patches") if k in inputs)
    inputs[pixels] = torch.randn(inputs[pixels].shape, generator=torch.Generator().manual_seed(0))
    expected = want.generate(**inputs, max_new_tokens=6, do_sample=False)
    layers = [u.name for u in prep.skeleton.units if u.layer is not None]  # the text model's blocks
    with loader.load(d, plan_for(d, {layers[-1]: "disk", layers[0]: "disk"}), progress=False) as lm:
        got = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


def test_a_processor_giving_flattened_patches_sizes_the_image():
    """Pix2Struct's (and Kosmos-2.5's) processor gives ``flattened_patches``, not ``pixel_values``: the
    plan counts its rows (it raised KeyError before)."""
    from fitmap.planning.images import model_image_processor, processed_images
    from fitmap.planning.workload import Workload

    config = transformers.Pix2StructConfig()
    made = processed_images(model_image_processor(config), Workload(images=((64, 48),)))["flattened_patches"]
    assert image_shape(config, 64, 48).patches == made.shape[1] > 0


def test_deepseek_vl_hybrids_high_resolution_tower_gets_images_of_its_size():
    from fitmap.planning.images import model_image_processor

    config = transformers.DeepseekVLHybridConfig(high_res_vision_config={"image_size": 256})
    processor = model_image_processor(config)
    assert (processor.high_res_size.height, processor.high_res_size.width) == (256, 256)


@pytest.mark.parametrize(
    "model_type", ["dots3_note", "llava_onevision1_5", "hy_v4_vl", "mistral_large4", "florence2", "gemma4"]
)
def test_types_that_fell_back_simulate_with_an_image_and_check_clean(tmp_path, model_type):
    """dots.ocr 3 and LLaVA-OneVision-1.5 take 2-D patches from Qwen2-VL's processor (no temporal patch),
    dots.ocr 3's vision tower computes experts with ``_grouped_mm`` while its image tokens are counted;
    HY-V4-VL and Mistral Large 4 keep an indexer cache; Florence-2, an encoder-decoder naming its image
    token, stays simulated; Gemma 4 with its vision tower. Tiny configs as bench/zoo.py makes them."""
    from bench.zoo import tiny_config

    torch.manual_seed(0)
    transformers.AutoModelForImageTextToText.from_config(tiny_config(model_type)).save_pretrained(tmp_path)
    plan = fitmap.plan(str(tmp_path), gpus="2x1GiB", prompt=16, new=4, images=((64, 48),), reserve="0MiB")
    assert plan.estimate == "simulate", plan.estimate
    prep = prepare(PlanRequest(str(tmp_path), make_machine("2x1GiB", None, None)))
    assert check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan).clean


def test_an_encoder_decoder_vlm_whose_model_names_no_input_embeddings_plans_with_the_reason(tmp_path):
    """PP-FormulaNet raises NotImplementedError from get_input_embeddings: its vocabulary's table is found
    instead, and its image workload is planned analytically, saying why."""
    from bench.zoo import tiny_config

    torch.manual_seed(0)
    transformers.AutoModelForImageTextToText.from_config(tiny_config("pp_formulanet")).save_pretrained(tmp_path)
    plan = fitmap.plan(str(tmp_path), gpus="2x1GiB", prompt=16, new=4, images=((64, 48),), reserve="0MiB")
    assert plan.fits and "an encoder-decoder model" in plan.estimate
