"""PNG plots of an evaluation: perplexity against λ on dev and test, and the training loss curves
(matplotlib, Agg)."""
from __future__ import annotations

import os
import tempfile

from memforge.storage import fs

MODELS = (("knnlm", "kNN-LM", "knn_lambda", "tab:blue"),
          ("decoder+memory", "decoder + memory", "memory_lambda", "tab:orange"))


def write(uri: str, sweep: list[dict], metrics: dict, curves: dict[str, list[dict]]) -> None:
    """``lambda.png`` (each model's dev and test perplexity vs λ, its dev-chosen λ marked) and ``loss.png``
    (the decoder's loss; the memory's loss, KL and CE) under ``uri``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    with tempfile.TemporaryDirectory() as scratch:
        figure, axis = pyplot.subplots(figsize=(6, 4))
        lambdas = [point["lambda"] for point in sweep]
        for name, label, chosen_key, colour in MODELS:
            for side, style in (("dev", "--"), ("test", "-")):
                axis.plot(lambdas, [point[f"{name}_{side}"] for point in sweep], style, color=colour,
                          label=f"{label} ({side})")
            chosen = metrics[chosen_key]
            at = next(point for point in sweep if point["lambda"] == chosen)
            axis.plot([chosen], [at[f"{name}_test"]], "o", color=colour, markersize=8)
            axis.annotate(f"λ={chosen:g}", (chosen, at[f"{name}_test"]), textcoords="offset points", xytext=(4, 6),
                          color=colour)
        axis.set(xlabel="λ", ylabel="perplexity",
                 title=f"Interpolation weight (kNN-LM at T={metrics['temperature']:g}, memory at "
                       f"τ={metrics['memory_temperature']:g}; ● chosen on dev)")
        axis.set_ylim(top=min(axis.get_ylim()[1], 2.5 * sweep[0]["knnlm_test"]))
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(os.path.join(scratch, "lambda.png"), dpi=100)
        pyplot.close(figure)
        figure, axis = pyplot.subplots(figsize=(6, 4))
        for name, curve in curves.items():
            axis.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=f"{name} loss")
            for part in ("kl", "ce"):
                if curve and part in curve[0]:
                    axis.plot([p["step"] for p in curve], [p[part] for p in curve], label=f"{name} {part.upper()}",
                              linewidth=0.8)
        axis.set(xlabel="step", ylabel="training loss", title="Training loss")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(os.path.join(scratch, "loss.png"), dpi=100)
        pyplot.close(figure)
        for name in ("lambda.png", "loss.png"):
            with open(os.path.join(scratch, name), "rb") as handle:
                fs.write_bytes_atomic(fs.join(uri, name), handle.read())
