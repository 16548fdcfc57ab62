"""One error style for every command: bad input is `error: ...` on stderr and exit status 2, never a traceback;
`--help` names the command as it is typed (python -m ...)."""
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
