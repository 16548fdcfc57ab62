"""`python -m eval score tvc` as an `evaluate` metric: evaluate.load("<this repository>/eval/metrics/tvc").

It runs this repository's scorer (eval/hf_metrics.py: the references and arguments it takes), so the repository must
be importable: installed (pip install -e <repository>) or on PYTHONPATH. docs/eval_datasets_and_metrics.md
"""
import evaluate

TASK = "tvc"


def _scorer():
    # imported here, not at the top: evaluate would read a top-level import of `eval` as a package to pip-install
    try:
        from eval import hf_metrics
    except ImportError as e:
        raise ImportError(f"the {TASK} metric runs the scorers of the dora-vl repository (its `eval` package), which "
                          f"is not importable here ({e}): pip install -e <repository>, or add the repository to "
                          f"PYTHONPATH") from None
    return hf_metrics


class TvcMetric(evaluate.Metric):
    def _info(self):
        return _scorer().metric_info(TASK, evaluate)

    def _compute(self, predictions, references, **kwargs):
        return _scorer().compute(TASK, predictions, references, **kwargs)
