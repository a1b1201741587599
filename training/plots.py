"""PNG plots of an evaluation: perplexity against λ, and the training loss curves (matplotlib, Agg)."""
from __future__ import annotations

import os
import tempfile

from storage import fs


def write(uri: str, sweep: list[dict], curves: dict[str, list[dict]]) -> None:
    """``lambda.png`` (kNN-LM and decoder+memory perplexity vs λ) and ``loss.png`` under ``uri``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    with tempfile.TemporaryDirectory() as scratch:
        figure, axis = pyplot.subplots(figsize=(5, 3.5))
        lambdas = [point["lambda"] for point in sweep]
        for name, label in (("knnlm", "kNN-LM"), ("memory", "decoder + memory")):
            axis.plot(lambdas, [point[name] for point in sweep], marker="o", label=label)
        axis.set(xlabel="λ", ylabel="validation perplexity", title="Interpolation weight")
        axis.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(scratch, "lambda.png"), dpi=100)
        pyplot.close(figure)
        figure, axis = pyplot.subplots(figsize=(5, 3.5))
        for name, curve in curves.items():
            axis.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=name)
        axis.set(xlabel="step", ylabel="training loss", title="Training loss")
        axis.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(scratch, "loss.png"), dpi=100)
        pyplot.close(figure)
        for name in ("lambda.png", "loss.png"):
            with open(os.path.join(scratch, name), "rb") as handle:
                fs.write_bytes_atomic(fs.join(uri, name), handle.read())
