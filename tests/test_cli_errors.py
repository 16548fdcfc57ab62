"""One error style for every command: bad input is `error: ...` on stderr and exit status 2, never a traceback;
`--help` names the command as it is typed (python -m ...)."""
import os
import sys
from pathlib import Path

import pytest

import subprocesses

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/run"

CASES = {
    "dora.analysis": (["--base", MISSING, "--checkpoints", MISSING, "--out", "OUT"], f"{MISSING} not found"),
    "recipes.llava.merge": ([MISSING, "--out", "OUT"], f"config file {MISSING}/config.yaml not found"),
    "recipes.vlm.merge": ([MISSING, "--out", "OUT"], f"config file {MISSING}/config.yaml not found"),
    "recipes.vlbart.evaluate": ([MISSING], f"config file {MISSING}/config.yaml not found"),
    "recipes.inspect": ([MISSING], f"model: {MISSING} not found"),
    "data.features": (["info", MISSING], f"{MISSING} is not a feature store (no store.json)"),
    "data.video": (["features", "--videos-dir", MISSING, "--out", "OUT"], f"video folder {MISSING} not found"),
}


@pytest.mark.parametrize("module", sorted(CASES))
def test_bad_input_is_one_error_line_and_exit_2(module, tmp_path):
    args, message = CASES[module]
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    done = subprocesses.run([sys.executable, "-m", module, *args], what=f"python -m {module} on a missing run",
                            timeout=120, cwd=ROOT)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, subprocesses.output(done)
    assert len(lines) == 1 and message in lines[0], subprocesses.output(done)
    help_text = subprocesses.run([sys.executable, "-m", module, "--help"], what=f"python -m {module} --help",
                                 timeout=120, cwd=ROOT)
    assert help_text.returncode == 0 and help_text.stdout.startswith(f"usage: python -m {module} "), help_text.stdout


def test_a_checkpoint_that_brings_its_own_code_is_one_error_line_until_trusted(tmp_path):
    """Phi-3.5-vision and InternVL2 load only with trust_remote_code: the inspector and the recipe say so in one
    line (they printed transformers' ValueError traceback), and --trust-remote-code / model.trust_remote_code opt in."""
    import json

    import yaml

    from vlm_families import build_remote_code_checkpoint

    model = build_remote_code_checkpoint(tmp_path / "remote", ["What colour is the square?", "It is red."] * 4)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(ROOT)}

    def run(*args):
        return subprocesses.run([sys.executable, *args], what=" ".join(args[:2]), timeout=300, cwd=ROOT, env=env)

    def one_error_line(done, text):
        lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 2 and "Traceback" not in done.stderr, subprocesses.output(done)
        assert len(lines) == 1 and text in lines[0], subprocesses.output(done)

    one_error_line(run("-m", "recipes.inspect", str(model)), "rerun with --trust-remote-code if you trust that code")
    trusted = run("-m", "recipes.inspect", str(model), "--trust-remote-code", "--rank", "4")
    assert trusted.returncode == 0 and "model\\.multi_modal_projector" in trusted.stdout, subprocesses.output(trusted)

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "Hi?"},
                                                               {"from": "gpt", "value": "Yes."}]}]))
    config = {"model": {"path": str(model), "dtype": "fp32"}, "data": {"data_path": str(data)},
              "dora": {"rules": [{"match": r"model\.language_model\.layers\.\d+\.self_attn\.q_proj", "rank": 2}]},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    one_error_line(run("recipes/vlm/train.py", str(tmp_path / "c.yaml")),
                   "set model.trust_remote_code: true if you trust that code")
    # opted in, the model is the checkpoint's own class
    built = run("-c", "from recipes.vlm.train import ChatModelConfig, build_model; "
                      f"m, p = build_model(ChatModelConfig(path={str(model)!r}, trust_remote_code=True)); "
                      "print(type(m).__name__)")
    assert built.returncode == 0 and "TinyRemoteForConditionalGeneration" in built.stdout, subprocesses.output(built)


def test_a_library_s_value_error_keeps_its_traceback_while_data_s_own_checks_are_one_line(capsys):
    """data/ checks its inputs with ValueError (one line, exit 2); a ValueError from inside numpy is a bug."""
    import numpy as np

    from data.features import run_cli

    def ours():
        from data.features import dtype_from_name
        dtype_from_name("float8")

    assert run_cli(ours) == 2 and capsys.readouterr().err.startswith("error: unknown dtype 'float8'")
    with pytest.raises(ValueError):
        run_cli(lambda: np.zeros(2).reshape(3))  # a bug's error: raised, with its traceback
