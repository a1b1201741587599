"""The ``train-memory`` stage's declaration: what it reads, writes and is defined by. It imports no torch,
so listing the stages (CLI, dvc.yaml, lineage) stays quick; the training itself is ``training.memory``."""
from __future__ import annotations

from memforge.pipelines.named_decoder import decoder_inputs, decoder_path, external_decoder
from memforge.pipelines.stage import Context, Published, Stage


class TrainMemory(Stage):
    """MLP memory training on the kNN targets: one step loop with checkpoints."""

    name = "train-memory"
    summary = "train the MLP memory on the kNN targets"
    outputs = ("memory",)
    format = "safetensors"
    inputs = ("targets/train", "keys/train", "tokens", "decoder")
    content = ("memory.input_layer", "memory.depth", "memory.hidden_mult", "memory.width", "memory.activation",
               "memory.lm_head", "memory.mode", "memory.alpha", "memory.batch_size", "memory.learning_rate",
               "memory.weight_decay", "memory.ema_decay", "memory.warmup_steps", "memory.max_steps",
               "memory.shuffle_buffer_chunks", "memory.seed", "memory.precision", "encode.model",
               "encode.representation")
    execution = ("memory.checkpoint_every", "memory.device", "memory.nproc_per_node", "memory.nnodes",
                 "memory.rdzv_endpoint", "encode.batch_size", "runtime.trust_remote_code")
    launch = "memory"

    def input_roles(self, ctx: Context) -> tuple[str, ...]:
        return self.inputs[:3] + decoder_inputs(ctx.params)

    def check(self, ctx: Context) -> None:
        from memforge.pipelines import devices
        from memforge.pipelines.encoder import hidden_size, load_encoder, model_fingerprint, transformer_blocks
        from memforge.training.memory import check_shape, check_targets, resolves_offline

        ctx.scratch["device"] = devices.use(ctx.params.memory.device, "memory.device")
        path = ctx.scratch["decoder_path"] = decoder_path(ctx)
        decoder = ctx.scratch["decoder"] = load_encoder(path, ctx.params.runtime.trust_remote_code)
        keys = ctx.inputs["keys/train"]
        check_targets(ctx.inputs["targets/train"], keys, int(decoder.config.vocab_size))
        check_shape(ctx.params.memory, hidden_size(decoder))
        fingerprint = ctx.scratch["decoder_fingerprint"] = model_fingerprint(path)  # hashes every weight: once
        ctx.scratch["offline"] = resolves_offline(ctx.params, keys, fingerprint, len(transformer_blocks(decoder)))

    def artifact_params(self, ctx: Context, role: str) -> dict:
        values = ctx.params.values([key for key in self.content if key != "encode.model"], strip="memory")
        values["representation"] = values.pop("encode.representation")
        mode = "offline" if ctx.scratch["offline"] else "online"
        return {**values, **external_decoder(ctx.params, ctx.scratch["decoder_fingerprint"]), "resolved_mode": mode}

    def artifact_inputs(self, ctx: Context, role: str) -> dict:
        named = {"decoder": ctx.inputs["decoder"]} if "decoder" in ctx.inputs else {}
        return {"targets": ctx.inputs["targets/train"], "keys": ctx.inputs["keys/train"], **named}

    def run(self, ctx: Context, role: str, build) -> Published:
        from memforge.training.memory import train_memory
        from memforge.training.world import World

        world = ctx.scratch.get("world") or World(device=ctx.scratch["device"])
        return train_memory(ctx.params, ctx.scratch["decoder"], ctx.scratch["decoder_fingerprint"],
                            ctx.scratch["offline"], ctx.inputs, build.uri, world)
