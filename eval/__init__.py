"""Benchmark evaluation: metrics (pure functions over strings), readers of the official formats, server
submission writers, and one CLI (`python -m eval score|submit|tasks`). No torch import here: generation, which
needs a model, lives in its own module and is loaded only by `python -m eval generate`."""
