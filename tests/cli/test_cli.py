"""The command line: exit codes, one clear message, JSON shape."""

import json
import subprocess
import sys

import pytest

from fitmap.cli import main


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json(capsys, tmp_path):
    out_file = tmp_path / "p.json"
    code, out, _ = run(
        [
            "plan",
            "llama-3.1-8b",
            "--gpus",
            "2x16GiB",
            "--cpu",
            "8GiB",
            "--json",
            "--estimate",
            "analytic",
            "--out",
            str(out_file),
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(out)
    assert data["fits"] and data == json.loads(out_file.read_text())
    assert {d["device"] for d in data["devices"]} == {"0", "1", "cpu"}


def test_plan_table(capsys):
    code, out, _ = run(["plan", "qwen2-vl-7b", "--gpus", "2x16GiB", "--image", "1344x1344"], capsys)
    assert code == 0 and "cuda:0" in out and "fits" in out


def test_inspect(capsys, checkpoints):
    code, out, _ = run(["inspect", str(checkpoints("gemma2")), "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["tied"] == [["model.embed_tokens.weight", "lm_head.weight"]]
    assert data["checkpoint_bytes"] == data["planned_weight_bytes"]
    code, out, _ = run(["inspect", "mixtral-8x7b"], capsys)
    assert code == 0 and "MixtralDecoderLayer" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["plan", "llama-3.1-70", "--gpus", "1x24GiB"], "did you mean"),
        (["plan", "llama-3.1-8b", "--gpus", "2x16Gib!"], "cannot read size"),
        (["plan", "llama-3.1-8b", "--gpus", "3"], "GPU 3 does not exist"),
        (["plan", "llama-3.1-8b", "--gpus", "1x24GiB", "--image", "big"], "WIDTHxHEIGHT"),
        (["plan", "llama-3.1-8b", "--gpus", "1x24GiB", "--pin", "lm_head"], "MODULE=DEVICE"),
        (["plan", "llama-3.1-8b", "--gpus", "1x24GiB", "--batch", "0"], "--batch must be at least 1"),
        (
            ["plan", "llama-3.1-405b", "--gpus", "2x80GiB", "--cpu", "64GiB", "--estimate", "analytic"],
            "needs .* GiB more",
        ),
        (["plan", "llama-3.1-8b", "--gpus", "0:abc"], "'abc' is not a size; write a budget like 0:10GiB"),
        (["plan", "llama-3.1-8b", "--gpus", "2x24GiB", "--reserve", "100GiB"], "--reserve 100.0 GiB leaves nothing"),
        (
            [
                "plan",
                "llama-3.1-70b",
                "--gpus",
                "2x24GiB",
                "--reserve",
                "20GiB",
                "--cpu",
                "1GiB",
                "--estimate",
                "analytic",
            ],
            "--reserve 20.0 GiB keeps that much of each GPU free",
        ),
        (["inspect", ""], "the model is empty"),
    ],
)
def test_bad_input_exits_2_with_one_message(args, needle, capsys):
    code, _, err = run(args, capsys)
    assert code == 2
    assert err.startswith(f"fitmap {args[0]}: ") and "Traceback" not in err
    import re

    assert re.search(needle, err) or needle in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_console_script_exit_code():
    """The installed entry point exits 2 with no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "fitmap.cli", "inspect", "/nonexistent/model"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not a catalog name" in proc.stderr


@pytest.mark.parametrize("value", ["false", "False", 0, 1, None, "yes"])
def test_trust_remote_code_must_be_a_real_bool(value, tmp_path):
    """A non-empty string is truthy: ``trust_remote_code="false"`` must not run a repository's code."""
    import fitmap
    from fitmap.model import skeleton
    from fitmap.runtime import loader

    with pytest.raises(fitmap.BadInput, match="trust_remote_code must be True or False"):
        fitmap.plan("llama-3.1-8b", gpus="1x24GiB", trust_remote_code=value)
    with pytest.raises(fitmap.BadInput, match="trust_remote_code"):
        loader.load(tmp_path, None, trust_remote_code=value)
    with pytest.raises(fitmap.BadInput, match="trust_remote_code"):
        skeleton.build_model(None, "causal-lm", None, trust_remote_code=value)


def test_estimate_must_be_known():
    import fitmap

    with pytest.raises(fitmap.BadInput, match="estimate must be"):
        fitmap.plan("llama-3.1-8b", gpus="1x24GiB", estimate="magic")


def test_plan_file_faults_are_one_line(tmp_path, capsys):
    base = ["plan", "llama-3.1-8b", "--gpus", "2x16GiB", "--cpu", "8GiB", "--estimate", "analytic"]
    for out in (str(tmp_path), str(tmp_path / "no" / "such" / "p.json"), "/dev/full"):
        code, _, err = run(base + ["--out", out], capsys)
        assert code == 2 and "cannot write the plan" in err and len(err.strip().splitlines()) == 1, err
    # a plan that does not fit is not written, and run refuses one that says it does not fit
    p = tmp_path / "p.json"
    code, _, err = run(["plan", "llama-3.1-8b", "--cpu", "1KiB", "--estimate", "analytic", "--out", str(p)], capsys)
    assert code == 2 and not p.exists()
    code, _, err = run(["check", "llama-3.1-8b", "--plan", str(tmp_path)], capsys)
    assert code == 2 and "cannot read plan file" in err


@pytest.mark.parametrize("device", ["tpu", "cuda:7", None, 7, -1])
def test_a_hand_edited_plan_with_a_device_it_does_not_have_is_refused(tmp_path, capsys, device):
    p = tmp_path / "p.json"
    assert main(["plan", "llama-3.1-8b", "--gpus", "2x16GiB", "--estimate", "analytic", "--out", str(p)]) == 0
    data = json.loads(p.read_text())
    data["device_map"]["model.layers.3"] = device
    p.write_text(json.dumps(data))
    capsys.readouterr()
    code, _, err = run(["check", "llama-3.1-8b", "--plan", str(p)], capsys)
    assert code == 2 and "devices it does not have" in err and "model.layers.3" in err, err


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(prompt=1.5), "prompt must be a whole number"),
        (dict(batch="4"), "batch must be a whole number"),
        (dict(images=[(-5, 100)]), "an image is"),
        (dict(images=["1344x1344"]), "an image is"),
        (dict(images=[(0, 0)]), "an image is"),
        (dict(gpus="100000000x1GiB"), "between 1 and 1024"),
        (dict(gpus=2), "gpus must be a string"),
        (dict(gpus=["0"]), "gpus must be a string"),
        (dict(cpu=-5), "cpu must be a size"),
        (dict(cpu=True), "cpu must be a size"),
        (dict(reserve="-1GiB"), "--reserve: size '-1GiB' is negative"),
        (dict(disk=3), "disk must be a directory path"),
        (dict(policy="fast"), "policy must be one of 'balanced'"),
        (dict(dtype="bfloat16"), "dtype must be one of 'auto', 'bf16'"),
    ],
)
def test_api_bad_values_raise_fitmap_errors(kwargs, needle):
    import fitmap

    args = dict(gpus="1x24GiB") | kwargs
    with pytest.raises(fitmap.BadInput, match=needle):
        fitmap.plan("llama-3.1-8b", **args)


def test_prompt_beyond_the_window_is_refused(capsys, checkpoints):
    code, _, err = run(["plan", str(checkpoints("llama")), "--prompt", "100000", "--estimate", "analytic"], capsys)
    assert code == 2 and "reads at most 2048 tokens" in err and "--prompt 1792" in err


def test_a_user_sees_fitmap_lines_only(checkpoints):
    """No torch / transformers warning or log in the user's face (``--verbose`` shows them)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fitmap.cli",
            "plan",
            str(checkpoints("qwen2_vl")),
            "--gpus",
            "2x1GiB",
            "--image",
            "112x112",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "fits" in proc.stdout
    assert proc.stderr == "", proc.stderr


def test_images_for_a_text_model_are_refused(capsys, checkpoints, tmp_path):
    code, _, err = run(["plan", "llama-3.1-8b", "--gpus", "1x24GiB", "--image", "1344x1344"], capsys)
    assert code == 2 and "takes no images" in err


@pytest.mark.parametrize(
    "edit,needle", [({"num_attention_heads": 5}, "not a multiple"), ({"hidden_size": "64"}, "expected int")]
)
def test_a_config_transformers_rejects_is_one_line(capsys, checkpoints, tmp_path, edit, needle):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(checkpoints("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | edit))
    code, _, err = run(["plan", str(d), "--estimate", "analytic"], capsys)
    assert code == 2 and needle in err and "rejected by transformers" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["plan", "llama-3.1-8b", "--cpu", "-5GiB"], "--cpu: size '-5GiB' is negative"),
        (["plan", "llama-3.1-8b", "--gpus", "1x24GiB", "--prompt", "-3"], "--prompt must be non-negative"),
    ],
)
def test_negative_values_get_fitmaps_message(args, needle, capsys):
    code, _, err = run(args, capsys)
    assert code == 2 and needle in err, err


def test_starting_the_cli_loads_no_torch():
    """The heavy imports happen inside main's handler, where Ctrl-C becomes "interrupted" (exit 130),
    and `fitmap --help` answers at once."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, fitmap, fitmap.cli; print('torch' in sys.modules); print(fitmap.Plan.__name__)",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.stdout.split() == ["False", "Plan"], proc.stderr


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    from fitmap import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.HANDLERS, "plan", interrupted)
    code, _, err = run(["plan", "llama-3.1-8b"], capsys)
    assert code == 130 and err.strip() == "interrupted"


def test_repository_code_runs_only_with_true(tmp_path):
    """A remote-code model whose configuration module writes a file when imported: no value of
    trust_remote_code but True runs it (checked in a fresh process, so nothing is imported yet)."""
    import shutil

    from tests.pitfalls import make_pitfall

    made = make_pitfall("glm", tmp_path / "made")
    d = tmp_path / "probe_glm"
    shutil.copytree(made, d)
    config_py = next(d.glob("configuration_*.py"))
    config_py.write_text("import os\nopen(os.environ['FITMAP_PROBE'], 'w').write('ran')\n" + config_py.read_text())
    probe = tmp_path / "probe.txt"
    script = f"""
import fitmap
for value in ("false", "False", 0, 1, None, False):
    try:
        fitmap.plan({str(d)!r}, gpus="1x1GiB", trust_remote_code=value, estimate="analytic")
        raise SystemExit(f"planned with trust_remote_code={{value!r}}")
    except fitmap.BadInput:
        pass
import os
print("ran" if os.path.exists(os.environ["FITMAP_PROBE"]) else "not run")
fitmap.plan({str(d)!r}, gpus="1x1GiB", trust_remote_code=True, estimate="analytic")
print("ran" if os.path.exists(os.environ["FITMAP_PROBE"]) else "not run")
"""
    env = dict(__import__("os").environ, FITMAP_PROBE=str(probe), HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["not", "run", "ran"]  # refused five ways; True runs it (the probe works)
