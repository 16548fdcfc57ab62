"""The README and docs/ say nothing the repository does not hold (issue 24, items 1 and 4).

- Every relative link in README.md and docs/*.md points to a file that exists and, for `#anchor`, to a heading of
  that file (GitHub's anchor rule).
- Every package in requirements.txt is imported by the project's code (dora/ data/ eval/ recipes/ bench/ launch/),
  or is named below with the package that needs it; every third-party import of that code is in requirements.txt.
- Every command the README and docs/ show exists with the flags it shows: `python -m MODULE` modules and
  `python bench/X.py` scripts accept each `--flag` (their argparse parsers, subcommands included, are read in one
  child process without running the programs), `bash X.sh` scripts exist, `make TARGET` targets are in the
  Makefile.
"""
from __future__ import annotations

import ast
import json
import re
import shlex
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import pytest
import subprocesses

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = ("dora", "data", "eval", "recipes", "bench", "launch")
PROJECT_PACKAGES = {"dora", "data", "eval", "recipes", "bench", "tests"}

# Pages written on other branches at the same time and linked from here already (DVoRA, benchmark splits as
# `datasets` and scorers as `evaluate` metrics, more VLM families). The merger removes each entry when its page
# lands; the test then fails for an entry whose file exists, so that the list is emptied.
PENDING_PAGES: set = set()

# Requirements that another branch wires into the code (`evaluate` metrics for the benchmark scorers). The merger
# removes each entry when that code lands; the test then fails for an entry the code imports.
PENDING_IMPORTS: set = set()

# Distribution name -> import name, where they differ.
IMPORT_NAMES = {"pyyaml": "yaml", "open_clip_torch": "open_clip", "pillow": "PIL", "protobuf": "google.protobuf",
                "huggingface_hub": "huggingface_hub"}

# Requirements the code does not import itself, each with the requirement that needs it (checked against that
# package's metadata) and why it is listed.
NEEDED_BY = {
    "torchvision": ("open_clip_torch", "open_clip's image transforms; pinned beside torch as the tested pair"),
    "sentencepiece": ("transformers", "vicuna-7b-v1.5 ships tokenizer.model only: transformers converts it"),
    "protobuf": ("transformers", "with sentencepiece, converting a slow sentencepiece tokenizer"),
    "openpyxl": ("pandas", "eval submit mmbench writes the server's .xlsx with engine='openpyxl'"),
}
TEST_ONLY = {"pytest"}


# ----------------------------------------------------------------------------------------------------- links

FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    return INLINE_CODE.sub("", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (word characters, `-` and spaces kept), spaces
    to `-`. Markdown links in the heading count by their text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset:
    seen: dict = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(page: Path):
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # https:, mailto:
        yield target


def test_github_anchor_rule():
    assert github_anchor("QDoRA: DoRA on a 4-bit or 8-bit base") == "qdora-dora-on-a-4-bit-or-8-bit-base"
    assert github_anchor("The DoRA layer (`python bench/dora_layer.py`)") == "the-dora-layer-python-benchdora_layerpy"
    assert github_anchor("Trainer + PEFT DoRA") == "trainer--peft-dora"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if rel in PENDING_PAGES and not dest.exists():
            continue
        if not dest.exists():
            bad.append(f"{target}: no file {rel}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading with anchor #{anchor} in {rel}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_pending_pages_are_still_pending():
    landed = sorted(p for p in PENDING_PAGES if (ROOT / p).exists())
    assert not landed, f"{landed} exist now: remove them from PENDING_PAGES in {Path(__file__).name}"


def test_every_docs_page_is_linked_from_the_readme_and_says_what_it_covers():
    readme = set(links(ROOT / "README.md"))
    for page in PAGES[1:]:
        assert any(t.partition("#")[0] == f"docs/{page.name}" for t in readme), f"README does not link {page.name}"
        title, _, rest = page.read_text().partition("\n")
        opening = rest.strip().split("\n\n", 1)[0]
        assert title.startswith("# ") and opening and not opening.startswith("#"), (
            f"{page.name}: a title, then a paragraph saying what the page covers")


def test_readme_is_the_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    # the two commands that do all set-up on a fresh machine open it (`.ci/run` runs `make test`)
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[:2] for line in first_block] == [["make", "demo"], ["make", "test"]]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# ------------------------------------------------------------------------------------------------ requirements

def _requirements() -> list:
    names = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower().replace("-", "_"))
    return names


@cache
def _imports(dirs: tuple) -> dict:
    """Top-level name -> files of the absolute imports (at any depth of the code) under `dirs`."""
    found: dict = {}
    for d in dirs:
        for file in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    found.setdefault(mod, set()).add(file.relative_to(ROOT).as_posix())
    return found


def _imported(import_name: str, dirs: tuple = CODE_DIRS) -> bool:
    return any(m == import_name or m.startswith(import_name + ".") for m in _imports(dirs))


def _import_name(dist: str) -> str:
    return IMPORT_NAMES.get(dist, dist)


def test_every_requirement_is_used():
    unused = []
    for dist in _requirements():
        if dist in PENDING_IMPORTS:
            assert not _imported(_import_name(dist)), (
                f"{dist} is imported now: remove it from PENDING_IMPORTS in {Path(__file__).name}")
        elif dist in TEST_ONLY:
            assert _imported(_import_name(dist), ("tests",)), f"{dist}: listed for the tests, which do not import it"
        elif dist in NEEDED_BY:
            needer, why = NEEDED_BY[dist]
            assert needer in _requirements() and _imported(_import_name(needer)), f"{dist}: {needer} unused ({why})"
            try:
                declared = requires(needer) or []
            except PackageNotFoundError:
                continue  # not installed here: the names above still hold
            assert any(re.match(rf"{dist}\b", r.replace("-", "_"), re.IGNORECASE) for r in declared), (
                f"{dist}: {needer}'s metadata does not ask for it ({why})")
        elif not _imported(_import_name(dist)):
            unused.append(dist)
    assert not unused, (f"requirements.txt lists packages nothing in {', '.join(CODE_DIRS)} imports: {unused} "
                        "(remove them, or name the package that needs them in NEEDED_BY)")


def test_every_third_party_import_is_a_requirement():
    provided = {_import_name(d).split(".")[0] for d in _requirements()}
    local = PROJECT_PACKAGES | {p.stem for p in (ROOT / "bench").glob("*.py")}
    missing = {}
    for mod, files in _imports(CODE_DIRS).items():
        top = mod.split(".")[0]
        if top not in sys.stdlib_module_names and top not in local and top not in provided:
            missing.setdefault(top, set()).update(files)
    assert not missing, f"imported but not in requirements.txt: {missing}"


# ---------------------------------------------------------------------------------------------------- commands

SEPARATORS = {";", "&", "&&", "|", "||", "do", "done", "then", "fi", "wait", "(", ")"}
PYTHONS = {"python", "python3", ".venv/bin/python", "$(PY)"}


def _snippets(page: Path):
    """Shell lines of the page: fenced blocks that are not Python, and inline code that starts with a command."""
    text = page.read_text()
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        if m.group(1) in ("", "bash", "sh", "shell", "console"):
            yield from m.group(2).replace("\\\n", " ").splitlines()
    for m in INLINE_CODE.finditer(FENCE.sub("", text)):
        code = m.group(0).strip("`")
        if re.match(r"(\S+=\S+ )*(python3? |make |bash )", code):
            yield code


def _tokens(line: str) -> list:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in a placeholder
        words = line.split("#", 1)[0].split()
    out = []
    for w in words:
        if w.endswith(";") and w != ";":
            out += [w[:-1], ";"]
        else:
            out.append(w)
    return out


def commands():
    """(page, kind, target, positional words, flags) for every command shown."""
    for page in PAGES:
        for line in _snippets(page):
            words = _tokens(line)
            for i, w in enumerate(words):
                rest = []
                for x in words[i + 1:]:
                    if x in SEPARATORS:
                        break
                    rest.append(x)
                if w in PYTHONS and len(rest) >= 2 and rest[0] == "-m":
                    kind, target, args = "module", rest[1], rest[2:]
                elif w in PYTHONS and rest and rest[0].endswith(".py"):
                    kind, target, args = "script", rest[0], rest[1:]
                elif w == "bash" and rest and rest[0].endswith(".sh"):
                    kind, target, args = "file", rest[0], []
                elif w == "make" and (i == 0 or words[i - 1] in SEPARATORS):
                    kind, target, args = "make", None, [a for a in rest if re.fullmatch(r"[\w-]+", a)]
                else:
                    continue
                args = [a.strip("[]") for a in args]
                positional = [a for a in args if not a.startswith("-")]
                flags = sorted({a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2})
                yield page.relative_to(ROOT).as_posix(), kind, target, positional, flags


# Run in one child: each module / script is started as __main__ with argparse's parse_args replaced by a capture
# of the parser, so nothing past building its parser runs. Prints {target: tree}, a tree being
# {"options": [...], "subcommands": {name: tree}} or {"error": "..."}.
CAPTURE = r"""
import argparse, contextlib, io, json, runpy, sys
targets = json.loads(sys.argv[1])
class Captured(BaseException):
    def __init__(self, parser): self.parser = parser
def capture(self, *args, **kwargs): raise Captured(self)
argparse.ArgumentParser.parse_args = capture
argparse.ArgumentParser.parse_known_args = capture
def tree(parser):
    out = {"options": sorted(o for a in parser._actions for o in a.option_strings), "subcommands": {},
           "required": False}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            out["required"] = bool(a.required)
            for name, sub in a.choices.items():
                out["subcommands"][name] = tree(sub)
    return out
result = {}
for kind, target in targets:
    sys.argv = [target]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
        result[target] = {"error": "ran to its end without parsing arguments with argparse"}
    except Captured as c:
        result[target] = tree(c.parser)
    except BaseException as e:
        result[target] = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(result))
"""


@cache
def parsers() -> dict:
    wanted = sorted({(kind, target) for _, kind, target, _, _ in commands()
                     if kind == "script" or (kind == "module" and target.split(".")[0] in PROJECT_PACKAGES)})
    done = subprocesses.run([sys.executable, "-c", CAPTURE, json.dumps(wanted)], what="reading the CLI parsers",
                            timeout=120, cwd=ROOT)
    assert done.returncode == 0, subprocesses.output(done)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _make_targets() -> set:
    return set(re.findall(r"^([\w-]+)\s*:", (ROOT / "Makefile").read_text(), re.MULTILINE))


def test_the_pages_show_commands():
    kinds = {kind for _, kind, _, _, _ in commands()}
    assert kinds == {"module", "script", "file", "make"}, kinds
    assert len(list(commands())) > 100


def test_every_command_shown_exists_with_the_flags_it_shows():
    trees = parsers()
    bad = []
    for page, kind, target, positional, flags in commands():
        where = f"{page}: {target or 'make'} {' '.join(positional + flags)}"
        if kind == "make":
            bad += [f"{where}: no make target {t}" for t in positional if t not in _make_targets()]
        elif kind == "file":
            parts = Path(target).parts  # `~/dora-vl/launch/x.sh`: the repository elsewhere
            inside = Path(*parts[min((i for i, p in enumerate(parts) if p in CODE_DIRS), default=0):])
            if not (ROOT / inside).is_file():
                bad.append(f"{where}: no file {target}")
        elif kind == "script" and not (ROOT / target).is_file():
            bad.append(f"{where}: no file {target}")
        elif target in trees:
            node = trees[target]
            if "error" in node:
                bad.append(f"{where}: {node['error']}")
                continue
            options = set(node["options"])
            for word in positional:  # descend into subcommands (`eval score vqav2`: `score`)
                if word in node["subcommands"]:
                    node = node["subcommands"][word]
                    options |= set(node["options"])
            if node["subcommands"] and node["required"] and positional:
                bad.append(f"{where}: none of {positional} is a subcommand of {target} "
                           f"({', '.join(sorted(node['subcommands']))})")
            bad += [f"{where}: {target} has no option {f}" for f in flags if f not in options]
    assert not bad, "commands shown in README.md / docs that do not exist as shown:\n" + "\n".join(sorted(set(bad)))
