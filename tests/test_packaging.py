"""`pip install .` and `pip install -e .` give dora, data, eval and recipes, importable from any folder."""
import shutil
import sys
from pathlib import Path

import pytest

import subprocesses

ROOT = Path(__file__).resolve().parents[1]
USE = ("import dora, data, eval, recipes, recipes.llava.train, recipes.vlbart.train\n"
       "from dora import apply_dora\n"
       "from importlib.resources import files\n"
       "assert files('recipes').joinpath('llava/configs/llava_v1_5_7b_dora.yaml').is_file()\n"
       "import evaluate\n"  # the metric scripts travel with eval and load from where it was installed
       "metric = evaluate.load(str(files('eval') / 'metrics' / 'textvqa'))\n"
       "assert metric.compute(predictions=['nokia'], references=[['Nokia'] * 10])['score'] == 100.0\n"
       "print(dora.__file__)\n")


def _source_copy(dest: Path) -> Path:
    """The working tree's files (what a clone holds), away from the repository so that nothing is built in it."""
    listed = subprocesses.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], what="git ls-files",
                              timeout=60, cwd=ROOT)
    names = listed.stdout.splitlines()
    for name in names:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.parametrize("editable", [False, True])
def test_pip_install_gives_the_four_packages(tmp_path, editable):
    src = _source_copy(tmp_path / "src")
    prefix = tmp_path / "prefix"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--prefix",
               str(prefix), *(["-e", "."] if editable else ["."])]
    done = subprocesses.run(install, what=f"pip install {'-e ' if editable else ''}.", timeout=300, cwd=src)
    assert done.returncode == 0, subprocesses.output(done)
    site_packages = next(prefix.glob("lib/python*/site-packages"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    used = subprocesses.run([sys.executable, "-c", f"import site; site.addsitedir({str(site_packages)!r})\n" + USE],
                            what="importing the installed packages from another folder", timeout=300, cwd=elsewhere)
    assert used.returncode == 0, subprocesses.output(used)
    where = Path(used.stdout.strip().splitlines()[-1])
    assert where == (src if editable else site_packages) / "dora" / "__init__.py"
