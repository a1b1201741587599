"""The evaluation in the papers' form: one Markdown table of valid and test perplexity per model, with the
chosen λ and temperatures, k, nprobe, the key and the memory input, and the dev/test protocol; and, when
evaluate scored lm-eval tasks, a table of their metrics for the decoder and decoder + memory."""
from __future__ import annotations

FILE = "report.md"
MODELS = (("decoder", "decoder", None, None), ("knnlm", "kNN-LM", "knn_lambda", "temperature"),
          ("decoder+memory", "decoder + memory", "memory_lambda", "memory_temperature"),
          ("memory_alone", "memory alone", None, "1"))
SIDE_NAMES = {"test split": ("valid", "test")}  # other protocols divide the validation split


def render(metrics: dict) -> str:
    """The table and its settings, from evaluate's metrics."""
    protocol = metrics["protocol"]
    dev_name, test_name = SIDE_NAMES.get(protocol["name"], ("dev (validation part)", "test (validation part)"))
    lines = [f"| model | λ | T (kNN-LM) / τ (memory) | {dev_name} perplexity | {test_name} perplexity |",
             "|---|---|---|---|---|"]
    for name, label, lam, temperature in MODELS:
        lines.append(f"| {label} | {_value(metrics, lam)} | {_value(metrics, temperature)} "
                     f"| {metrics['dev_perplexity'][name]:.2f} | {metrics['perplexity'][name]:.2f} |")
    dev, test = protocol["dev"], protocol["test"]
    keys, memory = metrics["keys"], metrics["memory_input"]
    lines += ["",
              f"- Protocol: {protocol['name']}: λ and temperatures chosen on {dev_name} ({dev['split']} split, "
              f"{dev['rows']:,} rows), reported on {test_name} ({test['split']} split, {test['rows']:,} rows).",
              f"- kNN-LM: k {metrics['k']}, nprobe {metrics['nprobe']}, "
              f"{'exact' if metrics['exact_distances'] else 'index (approximate)'} distances; keys: "
              f"{keys['representation']} of {_layer(keys['layer'])}.",
              f"- Memory input: {memory['representation']} of {_layer(memory['layer'])}; the memory alone is "
              "scored at τ 1, its own output.",
              "- Tokens/s: " + ", ".join(f"{name} {value:,.0f}" for name, value in metrics["tokens_per_second"].items())
              + "."]
    lines += [f"- Warning: {warning}." for warning in metrics.get("warnings", [])]
    if "lm_eval" in metrics:
        lines += ["", *_lm_eval_table(metrics["lm_eval"], metrics)]
    return "\n".join(lines) + "\n"


def _lm_eval_table(lm_eval: dict, metrics: dict) -> list[str]:
    """One row per lm-eval task and metric: the decoder's value and decoder + memory's."""
    lines = ["| lm-eval task | documents | metric | decoder | decoder + memory |", "|---|---|---|---|---|"]
    for task, scores in lm_eval["tasks"].items():
        for metric, value in scores["decoder"].items():
            lines.append(f"| {task} | {scores.get('samples', '–')} | {metric} | {value:.4f} "
                         f"| {scores['decoder+memory'][metric]:.4f} |")
    lines += ["", f"- lm-eval {lm_eval['version']}, zero-shot unless the task sets shots; decoder + memory at the "
                  f"memory's λ {metrics['memory_lambda']:g} and τ {metrics['memory_temperature']:g}."]
    return lines


def _value(metrics: dict, key: str | None) -> str:
    """The chosen value named ``key`` (a literal when it is not a metrics key), – when there is none."""
    if key is None:
        return "–"
    return f"{metrics[key]:g}" if key in metrics else key


def _layer(layer: int) -> str:
    return f"layer {layer}" + (" (the last block)" if layer == -1 else "")
