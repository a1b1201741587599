"""The ``evaluate`` stage's declaration: what it reads, writes and is defined by. It imports no torch, so
listing the stages (CLI, dvc.yaml, lineage) stays quick; the scoring itself is ``training.evaluate``."""
from __future__ import annotations

from memforge.pipelines.named_decoder import decoder_inputs, decoder_path, external_decoder
from memforge.pipelines.stage import Context, Published, Stage
from memforge.storage.errors import MemforgeError


class Evaluate(Stage):
    """Perplexity and speed of the decoder, kNN-LM and decoder + memory on the validation and test splits."""

    name = "evaluate"
    summary = "perplexity and tokens/s of decoder, kNN-LM and decoder+memory; lm-eval tasks when named"
    outputs = ("eval",)
    format = "metrics"
    inputs = ("tokens", "keys/validation", "index", "memory", "decoder")
    content = ("evaluate.k", "evaluate.nprobe", "evaluate.dev_fraction", "evaluate.split_seed",
               "evaluate.lambda_grid", "evaluate.temperature_grid", "evaluate.memory_temperature_grid",
               "evaluate.precision", "evaluate.lm_eval_tasks", "evaluate.lm_eval_include_path",
               "evaluate.lm_eval_limit", "encode.model")
    execution = ("evaluate.batch_size", "evaluate.device", "index.device", "index.threads", "runtime.trust_remote_code")
    dvc_files = {"outs": ("_manifest.json", "token_log_probs.parquet", "report.md"), "metrics": ("metrics.json",),
                 "plots": (("lambda.json", {"x": "lambda"}), ("loss.json", {"x": "step", "y": "loss"}),
                           "lambda.png", "loss.png")}

    def input_roles(self, ctx: Context) -> tuple[str, ...]:
        return self.inputs[:4] + decoder_inputs(ctx.params)

    def check(self, ctx: Context) -> None:
        from memforge.pipelines import devices, faiss_gpu
        from memforge.pipelines.encoder import model_fingerprint

        ctx.scratch["device"] = devices.use(ctx.params.evaluate.device, "evaluate.device")
        ctx.scratch["search_gpu"] = faiss_gpu.faiss_gpu(ctx.params.index.device)
        queries, index = ctx.inputs["keys/validation"], ctx.inputs["index"]
        path = ctx.scratch["decoder_path"] = decoder_path(ctx)
        decoder_fingerprint = ctx.scratch["decoder_fingerprint"] = model_fingerprint(path)  # hashes every weight
        encoded_by = queries.manifest["stats"]["model_fingerprint"]
        if encoded_by != decoder_fingerprint:
            raise MemforgeError(f"evaluate: kNN-LM queries come from the decoder's forward pass, but {queries.uri} "
                                f"was encoded by model {encoded_by[:12]}, not by the decoder {path} "
                                f"({decoder_fingerprint[:12]}); encode with the decoder (encode.model: null)")
        memory = ctx.inputs["memory"]  # a decoder artifact's identity is a contract (pipelines.contracts)
        if "decoder" not in ctx.inputs and memory.params.get("decoder") != decoder_fingerprint:
            raise MemforgeError(f"evaluate: {memory.uri} was trained on another decoder "
                                f"({str(memory.params.get('decoder'))[:12]}), not on {path} "
                                f"({decoder_fingerprint[:12]}); retrain the memory")
        nlist = index.manifest["stats"]["nlist"]
        if nlist is not None and ctx.params.evaluate.nprobe > nlist:
            raise MemforgeError(f"evaluate.nprobe: {ctx.params.evaluate.nprobe} exceeds the index's nlist ({nlist})")
        if ctx.params.evaluate.lm_eval_tasks:
            from memforge.training import harness

            config = ctx.params.evaluate
            ctx.scratch["lm_eval"] = harness.task_manager(config.lm_eval_tasks, config.lm_eval_include_path)

    def external(self, ctx: Context) -> dict | None:
        """The content of the local lm-eval task directory when tasks are named: its files define metrics."""
        path = ctx.params.evaluate.lm_eval_include_path
        if path is None or not ctx.params.evaluate.lm_eval_tasks:
            return None
        from memforge.training.harness import include_digest

        return {"lm_eval_include": include_digest(path)}

    def artifact_params(self, ctx: Context, role: str) -> dict:
        values = ctx.params.values([key for key in self.content if key != "encode.model"], strip="evaluate")
        return {**values, **external_decoder(ctx.params, ctx.scratch["decoder_fingerprint"]),
                **(self.external(ctx) or {})}

    def artifact_inputs(self, ctx: Context, role: str) -> dict:
        named = {"decoder": ctx.inputs["decoder"]} if "decoder" in ctx.inputs else {}
        return {"tokens": ctx.inputs["tokens"], "queries": ctx.inputs["keys/validation"], "index": ctx.inputs["index"],
                "memory": ctx.inputs["memory"], **named}

    def run(self, ctx: Context, role: str, build) -> Published:
        from memforge.training.evaluate import evaluate

        return evaluate(ctx.params, ctx.scratch["decoder_path"], ctx.inputs, build.uri, ctx.scratch["device"],
                        ctx.scratch.get("lm_eval"), ctx.scratch["search_gpu"])
