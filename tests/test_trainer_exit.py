"""Leaving the process group: gloo's worker threads are found and left idle before the interpreter exits (see
recipes.trainer.leave_process_group for the abort this prevents)."""
import json
import sys
import textwrap
from pathlib import Path

import subprocesses

ROOT = Path(__file__).resolve().parents[1]


def test_leave_process_group_finds_the_gloo_workers_and_leaves_them_idle(tmp_path):
    # A fresh interpreter: a 1-process gloo group, a collective on a Python tensor, then leave as the trainer does.
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch, torch.distributed as dist
        from recipes import trainer
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        t = torch.ones(3)
        dist.all_reduce(t)
        before = trainer._gloo_worker_states()
        dist.barrier()
        trainer.leave_process_group()
        after = trainer._gloo_worker_states()
        import json
        print(json.dumps({{"before": before, "after": after, "initialized": dist.is_initialized()}}))
    """)
    out = subprocesses.run([sys.executable, "-c", script], what="a gloo process group leaving", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["before"]) >= 2, out.stdout  # gloo's runloop threads (and its tcp loop), seen by name
    assert "R" not in result["after"].values(), out.stdout  # none runnable: nothing left mid-destruction
    assert result["initialized"] is False
