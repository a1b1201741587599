"""The ``export`` stage's declaration: the decoder and its trained memory published as one Hugging Face causal
LM (``<artifacts_dir>/export/model``), mixed as evaluate chose on dev unless ``export.*`` overrides. It imports
no torch, so listing the stages stays quick; the model is ``training.memory_lm``, the writing ``training.export``."""
from __future__ import annotations

from memforge.pipelines.named_decoder import decoder_inputs, decoder_path, external_decoder
from memforge.pipelines.stage import Context, Published, Stage
from memforge.storage.errors import MemforgeError


class Export(Stage):
    """Decoder + memory as one Hugging Face model directory (weights, tokenizer, modelling code, mixing rule)."""

    name = "export"
    summary = "decoder + memory as one Hugging Face causal LM (generate, lm-eval)"
    outputs = ("export",)
    format = "hf-model"
    inputs = ("tokens", "memory", "eval", "decoder")
    content = ("export.lam", "export.memory_temperature", "encode.model")
    execution = ("runtime.trust_remote_code",)

    def input_roles(self, ctx: Context) -> tuple[str, ...]:
        return self.inputs[:3] + decoder_inputs(ctx.params)

    def check(self, ctx: Context) -> None:
        from memforge.pipelines.encoder import model_fingerprint

        path = ctx.scratch["decoder_path"] = decoder_path(ctx)
        fingerprint = ctx.scratch["decoder_fingerprint"] = model_fingerprint(path)
        memory = ctx.inputs["memory"]  # that eval scored this memory is a contract (pipelines.contracts)
        if "decoder" not in ctx.inputs and memory.params.get("decoder") != fingerprint:
            raise MemforgeError(f"export: {memory.uri} was trained on another decoder "
                                f"({str(memory.params.get('decoder'))[:12]}), not on {path} ({fingerprint[:12]}); "
                                "retrain the memory")
        ctx.scratch["mixing"] = mixing_rule(ctx.params.export, ctx.inputs["eval"].manifest["stats"])

    def artifact_params(self, ctx: Context, role: str) -> dict:
        values = ctx.params.values(["export.lam", "export.memory_temperature"], strip="export")
        return {**values, **external_decoder(ctx.params, ctx.scratch["decoder_fingerprint"])}

    def run(self, ctx: Context, role: str, build) -> Published:
        from memforge.training.export import export

        return export(ctx.params, ctx.scratch["decoder_path"], ctx.scratch["decoder_fingerprint"], ctx.inputs,
                      ctx.scratch["mixing"], build.uri)


def mixing_rule(export_params, evaluation_stats: dict) -> dict:
    """λ and τ of the exported mixture: ``export.lam`` / ``export.memory_temperature`` where set, else evaluate's
    dev choices (``memory_lambda`` / ``memory_temperature`` of its metrics); and where each came from."""
    rule = {}
    for key, chosen in (("lam", "memory_lambda"), ("memory_temperature", "memory_temperature")):
        value = getattr(export_params, key)
        rule[key] = float(value if value is not None else evaluation_stats[chosen])
        rule[f"{key}_from"] = "params" if value is not None else "evaluate"
    return rule
