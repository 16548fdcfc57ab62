"""DoRA under DeepSpeed ZeRO on CPU (gloo): 2 processes give the losses of 1 process and of plain PyTorch."""
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

import ds_dora_train
import subprocesses

SCRIPT = Path(__file__).with_name("ds_dora_train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(tmp_path, gpus: int, stage: int, micro: int, accum: int, *extra: str) -> list[float]:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    out = tmp_path / f"losses_{gpus}_{stage}_{accum}{'_'.join(extra)}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [launcher, "--num_gpus", str(gpus), "--master_port", str(free_port()), str(SCRIPT),
           "--stage", str(stage), "--micro", str(micro), "--accum", str(accum), "--out", str(out), *extra]
    proc = subprocesses.run(cmd, what=f"DeepSpeed DoRA training, {gpus} process(es), ZeRO-{stage}", timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def plain_losses():
    return ds_dora_train.train_plain(accum=2, optimizer_name="sgd")


@pytest.mark.parametrize("stage", [3, 2])
def test_two_process_zero_matches_single_process(tmp_path, plain_losses, stage):
    two = run_deepspeed(tmp_path, gpus=2, stage=stage, micro=4, accum=1)
    assert len(two) == ds_dora_train.STEPS
    assert two[-1] < two[0] - 0.02  # it trains
    assert two == pytest.approx(plain_losses, rel=1e-5)
    if stage == 3:
        one = run_deepspeed(tmp_path, gpus=1, stage=stage, micro=4, accum=2)
        assert two == pytest.approx(one, rel=1e-5)


def test_sparse_exact_dropout_under_zero3_follows_the_dense_form(tmp_path):
    """2 processes, ZeRO-3, dropout 0.05 in the exact form, adapters perturbed away from their init (so the dropped
    input's terms, (g - 1) W0 x~ and B A x~, matter from the first step): the sparse second product (forced) gives
    the dense form's losses, the masks being the same; the sparse form ran. (Halving the sampled correction in
    backward makes this test fail.)"""
    runs = {form: run_deepspeed(tmp_path, 2, 3, 4, 1, "--dropout", "0.05", "--sparse-dropout", form)
            for form in ("never", "always")}
    assert runs["never"]["sparse_forwards"] == 0 and runs["always"]["sparse_forwards"] > 0
    dense, sparse = runs["never"]["losses"], runs["always"]["losses"]
    assert dense[-1] < dense[0] - 0.02  # it trains
    assert sparse == pytest.approx(dense, rel=1e-5)
