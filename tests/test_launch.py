"""The launch scripts: run from any folder (paths relative to it), and a demo rerun never deletes a finished run."""
import json
import os
import stat
import sys
from pathlib import Path

import pytest

import subprocesses
from recipes.demo import run_dir

ROOT = Path(__file__).resolve().parents[1]

# Stand-ins that log how the script called them: the demo steps and DeepSpeed (which "trains" by writing the
# summary a finished run has); everything else goes to the real Python.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$LAUNCH_LOG"
case "$*" in
  "-m recipes.llava.demo "*|"-m recipes.vlbart.demo "*|"-m recipes.vlm.demo "*|"-m recipes.deepspeed_ops check") exit 0 ;;
esac
exec {python} "$@"
"""
FAKE_DEEPSPEED = """#!/usr/bin/env bash
echo "deepspeed $*" >> "$LAUNCH_LOG"
for a in "$@"; do
  case $a in train.output_dir=*) d=${a#train.output_dir=}; mkdir -p "$d"; echo '{}' > "$d/train_summary.json" ;; esac
done
"""


def test_run_dir_keeps_finished_runs_and_honours_output_dir(tmp_path):
    default = tmp_path / "run"
    assert run_dir(default) == default
    (default).mkdir()
    assert run_dir(default) == default  # an unfinished run resumes
    (default / "train_summary.json").write_text("{}")
    assert run_dir(default) == tmp_path / "run_2"
    (tmp_path / "run_2").mkdir()
    (tmp_path / "run_2" / "train_summary.json").write_text("{}")
    assert run_dir(default) == tmp_path / "run_3"
    assert run_dir(default, ["train.lr=1", "train.output_dir=mine"]) == Path("mine")


def _fakes(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", FAKE_PYTHON.format(python=sys.executable)), ("deepspeed", FAKE_DEEPSPEED)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "launch.log"
    return dict(os.environ, PYTHON=str(bin_dir / "python"), DEEPSPEED=str(bin_dir / "deepspeed"),
                LAUNCH_LOG=str(log), NUM_GPUS="2"), log


@pytest.mark.parametrize("script, root, config", [
    ("llava_dora.sh", "runs/demo", "recipes/llava/configs/demo.yaml"),
    ("vlbart_dora.sh", "runs/vlbart_demo", "recipes/vlbart/configs/demo_image.yaml"),
    ("vlm_dora.sh", "runs/vlm_demo", "recipes/vlm/configs/demo.yaml"),
    ("vlbart_dora.sh video", "runs/vlbart_video_demo", "recipes/vlbart/configs/demo_video.yaml")])
def test_a_demo_rerun_trains_beside_the_finished_run_and_finish_reads_the_run_it_trained(tmp_path, script, root,
                                                                                          config):
    env, log = _fakes(tmp_path)
    script, *lead = script.split()  # "vlbart_dora.sh video": the video demo
    here = tmp_path / "elsewhere"  # not the repository: the demo writes runs/ here
    here.mkdir()

    def launch(*args):
        log.write_text("")
        done = subprocesses.run(["bash", str(ROOT / "launch" / script), *lead, *args], what=f"launch/{script}",
                                timeout=120, cwd=here, env=env)
        assert done.returncode == 0, subprocesses.output(done)
        calls = log.read_text().splitlines()
        trained = [c for c in calls if c.startswith("deepspeed ")]
        finished = [c for c in calls if " finish " in c]
        assert len(trained) == len(finished) == 1, calls
        assert f" {ROOT / config} " in trained[0] + " "
        prepared = [c for c in calls if " prepare " in c]
        assert all((" --video " in c) == bool(lead) for c in prepared + finished), calls
        return trained[0], finished[0], done.stderr

    trained, finished, _ = launch()
    assert trained.endswith(f"train.output_dir={root}/run") and finished.endswith(f"--run {root}/run")
    assert (here / root / "run" / "train_summary.json").is_file()
    trained, finished, said = launch("train.lr=0.01")
    assert trained.endswith(f"train.lr=0.01 train.output_dir={root}/run_2") and finished.endswith(f"--run {root}/run_2")
    assert f"{root}/run holds a finished run, kept: this run trains in {root}/run_2" in said
    assert (here / root / "run" / "train_summary.json").is_file()
    trained, finished, _ = launch("train.output_dir=mine")
    assert finished.endswith("--run mine") and (here / "mine" / "train_summary.json").is_file()


def test_a_config_path_is_relative_to_the_folder_the_script_is_run_from(tmp_path):
    """The real launcher and recipe, 1 process: the config given as `my.yaml` in another folder is found (it used
    to be looked up in the repository), and its error is the recipe's one-line report."""
    here = tmp_path / "elsewhere"
    here.mkdir()
    (here / "my.yaml").write_text("train: {output_dir: out}\ntrian: {lr: 0.1}\n")
    env = dict(os.environ, NUM_GPUS="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)  # this environment's Python
    done = subprocesses.run(["bash", str(ROOT / "launch" / "llava_dora.sh"), "my.yaml"], what="launch/llava_dora.sh "
                            "my.yaml from another folder", timeout=300, cwd=here, env=env)
    assert done.returncode == 2, subprocesses.output(done)
    assert "error: my.yaml (with its overrides): unknown section 'trian' (did you mean 'train'?)" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in here.iterdir()) == ["my.yaml"]  # stopped before anything was written


def test_the_generic_demo_checkpoint_loads_as_any_family_does(llava_assets, tmp_path):
    """`recipes.vlm.demo prepare`'s checkpoint: the LLaVA demo's parts as one llava-1.5-hf-shaped checkpoint that the
    generic recipe reads through the Auto classes, its template the one tests/vlm_families.py checks against the real
    llava-1.5-hf rendering, and the demo's data labelled through it (answers and the EOS the template lacks)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from data.vlm_chat import ChatDataConfig, ChatDataset
    from recipes.vlm.demo import LLAVA_15_TEMPLATE, assemble_checkpoint

    out = assemble_checkpoint(Path(llava_assets["llm"]).parent, tmp_path / "model")
    model, processor = AutoModelForImageTextToText.from_pretrained(out), AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor.chat_template == LLAVA_15_TEMPLATE
    dataset = ChatDataset(ChatDataConfig(data_path=str(llava_assets["train"]), image_folder=str(llava_assets["images"]),
                                         max_length=256), processor)
    sample = dataset[0]
    assert "skip" not in sample, sample
    tokenizer = processor.tokenizer
    learned = tokenizer.decode([t for t, label in zip(sample["ids"], sample["labels"]) if label != -100])
    assert learned.count(tokenizer.eos_token) == len([c for c in json.loads(Path(llava_assets["train"]).read_text())[0]
                                                      ["conversations"] if c["from"] == "gpt"])
