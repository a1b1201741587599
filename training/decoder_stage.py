"""The ``train-decoder`` stage's declaration: what it reads, writes and is defined by. It imports no torch,
so listing the stages (CLI, dvc.yaml, lineage) stays quick; the training itself is ``training.decoder``."""
from __future__ import annotations

from memforge.pipelines.stage import Context, Published, Stage
from memforge.storage.errors import MemforgeError


class TrainDecoder(Stage):
    """Language-model training of the decoder: one step loop with checkpoints."""

    name = "train-decoder"
    summary = "train the decoder LM from scratch or fine-tune a local HF model"
    outputs = ("decoder",)
    format = "huggingface"
    inputs = ("tokens",)
    content = ("decoder.init", "decoder.n_layer", "decoder.n_head", "decoder.n_embd", "decoder.block_size",
               "decoder.batch_size", "decoder.grad_accum", "decoder.learning_rate", "decoder.weight_decay",
               "decoder.warmup_steps", "decoder.max_steps", "decoder.schedule", "decoder.seed", "decoder.precision")
    execution = ("decoder.checkpoint_every", "decoder.device", "decoder.nproc_per_node", "decoder.nnodes",
                 "decoder.rdzv_endpoint")
    launch = "decoder"

    def check(self, ctx: Context) -> None:
        from memforge.pipelines import devices, model_source

        tokens, block_size = ctx.inputs["tokens"], ctx.params.decoder.block_size
        n_tokens = tokens.manifest["counts"]["train_tokens"]
        if n_tokens < block_size + 1:
            raise MemforgeError(f"decoder.block_size: {block_size} needs at least {block_size + 1} training "
                                f"tokens, but {tokens.uri} has {n_tokens}; lower it or add text")
        if ctx.params.decoder.init:
            model_source.require(ctx.params.decoder.init, "decoder.init")
        ctx.scratch["device"] = devices.use(ctx.params.decoder.device, "decoder.device")

    def artifact_params(self, ctx: Context, role: str) -> dict:
        return ctx.params.values(self.content, strip="decoder")

    def run(self, ctx: Context, role: str, build) -> Published:
        from memforge.training.decoder import train_decoder
        from memforge.training.world import World

        world = ctx.scratch.get("world") or World(device=ctx.scratch["device"])
        return train_decoder(ctx.params.decoder, ctx.inputs["tokens"], build.uri, world)
