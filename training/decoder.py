"""``memforge train-decoder``: language-model training of the decoder on the token store.

From scratch (``decoder.init: null``: a GPT-2 sized by the ``decoder`` params, with the token
store's tokenizer) or fine-tuning a local Hugging Face causal LM (``decoder.init: PATH``, whose
tokenizer must be the token store's). Random blocks of the train stream, AdamW with warmup and
cosine or linear decay, gradient accumulation, a checkpoint every ``decoder.checkpoint_every``
steps; a rerun resumes from the newest checkpoint. Output ``<artifacts_dir>/decoder``: ``model/``
(config, safetensors, tokenizer: what ``from_pretrained`` loads), ``loss.json`` (the training
curve) and the manifest with validation and unigram perplexities.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time

import torch
import torch.nn.functional as F

from memforge.pipelines import devices
from memforge.pipelines.encoder import retie_output_embeddings
from memforge.pipelines.stage import Published
from memforge.pipelines.tokenizer import check_same_tokenizer, load_tokenizer
from memforge.storage import fs, local_cache
from memforge.storage.errors import MemforgeError
from memforge.storage.stores import TOKENIZER_DIR
from memforge.training.checkpoint import DIR as CHECKPOINTS_DIR
from memforge.training.checkpoint import Checkpoints
from memforge.training.lm_eval import perplexity, target_log_probs, unigram_log_probs
from memforge.training.optim import adamw, apply_gradients, learning_rate_at, set_learning_rate
from memforge.training.token_stream import TokenStream
from memforge.training.world import World, data_parallel

log = logging.getLogger("memforge")

MODEL_DIR = "model"
LOSS_CURVE = "loss.json"


def build_model(config, tokenizer) -> torch.nn.Module:
    """A fresh GPT-2 sized by ``config`` for ``tokenizer``, or the HF model at ``config.init`` (a local
    directory or any fsspec URL, fetched once)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if config.init is None:
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_positions=config.block_size, n_layer=config.n_layer,
            n_head=config.n_head, n_embd=config.n_embd,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    try:
        path = local_cache.local_path(config.init, local_cache.listing_key(config.init))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise MemforgeError(f"decoder.init: {config.init}: cannot load a causal LM: {exc}") from None
    retie_output_embeddings(model, path)
    check_same_tokenizer(path, tokenizer, "decoder.init", named=config.init)
    return model


def _check_block_size(model: torch.nn.Module, config) -> None:
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit is not None and config.block_size > limit:
        raise MemforgeError(f"decoder.block_size: {config.block_size} exceeds the model's {limit} positions")


def train_decoder(config, tokens, uri: str, world: World) -> Published | None:
    """Train (or resume training) the decoder into ``uri`` as this rank of ``world`` (autocast to
    ``config.precision``). Each step's blocks are the same whatever the world size; a rank reads and trains on
    every world-size-th of them. Rank 0 writes the checkpoints and the model, and returns what the manifest
    records; the other ranks return None."""
    device = world.device
    if config.batch_size < world.size:
        raise MemforgeError(f"decoder.batch_size: {config.batch_size} blocks per micro-step cannot be shared among "
                            f"{world.size} ranks; raise it to at least {world.size} or run fewer ranks")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = load_tokenizer(fs.local_dir(tokens.path(TOKENIZER_DIR), scratch))
    torch.manual_seed(config.seed)  # initial weights and dropout; a resumed run restores the RNG state
    model = build_model(config, tokenizer)
    _check_block_size(model, config)
    model.to(device)
    optimizer = adamw(model, config.learning_rate, config.weight_decay)
    scaler = devices.grad_scaler(device, config.precision)
    checkpoints = Checkpoints(uri)
    record = checkpoints.restore(model, optimizer, scaler) or {"step": 0, "losses": []}
    replicas = data_parallel(model, world)
    train = TokenStream(tokens, "train")
    losses = record["losses"]
    started, first_step = time.perf_counter(), record["step"]
    predicted = config.batch_size * config.block_size * config.grad_accum  # tokens predicted per global step
    model.train()
    for step in range(first_step, config.max_steps):
        set_learning_rate(optimizer, learning_rate_at(step, config.learning_rate, config.warmup_steps,
                                                      config.max_steps, config.schedule))
        step_loss = 0.0
        for micro in range(config.grad_accum):
            block = torch.from_numpy(train.random_blocks(config.seed, step, micro, config.batch_size,
                                                         config.block_size + 1, world.rank, world.size)).to(device)
            last = micro + 1 == config.grad_accum
            with (contextlib.nullcontext() if last or world.backend is None else replicas.no_sync()):
                with devices.autocast(device, config.precision):
                    logits = replicas(block[:, :-1]).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), block[:, 1:].flatten(), reduction="sum")
                # this rank's share of the global step's mean; data parallelism averages the ranks' gradients
                scaler.scale(loss * world.size / predicted).backward()
            step_loss += loss.item() / predicted
        apply_gradients(model, optimizer, scaler)
        losses.append([step + 1, round(world.all_sum([step_loss])[0], 6)])
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.max_steps:
            if world.writer:
                checkpoints.save(step + 1, model, optimizer, scaler, {"losses": losses})
            log.info("train-decoder: step %d/%d, loss %.4f", step + 1, config.max_steps, losses[-1][1])
    seconds = time.perf_counter() - started
    if not world.writer:
        return None
    trained_tokens = (config.max_steps - first_step) * config.grad_accum * config.batch_size * config.block_size

    validation = TokenStream(tokens, "validation")
    with devices.autocast(device, config.precision):
        validation_ppl = perplexity(target_log_probs(model, validation, config.block_size))
    unigram_ppl = perplexity(unigram_log_probs(train, validation, len(tokenizer)))
    log.info("train-decoder: validation perplexity %.2f (unigram baseline %.2f)", validation_ppl, unigram_ppl)
    model.to("cpu")  # the saved model loads anywhere
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        fs.upload_dir(scratch, fs.join(uri, MODEL_DIR))
    fs.write_json_atomic(fs.join(uri, LOSS_CURVE), [{"step": s, "loss": v} for s, v in losses])
    fs.remove_tree(fs.join(uri, CHECKPOINTS_DIR))  # the final model is saved; the artifact keeps only it
    return Published(
        counts={"steps": config.max_steps, "parameters": sum(p.numel() for p in model.parameters()),
                "vocab_size": len(tokenizer), "validation_tokens": validation.n_tokens},
        stats={"final_train_loss": losses[-1][1], "validation_perplexity": round(validation_ppl, 4),
               "unigram_perplexity": round(unigram_ppl, 4), "resumed_from_step": first_step,
               "train_tokens_per_second": round(trained_tokens / seconds, 1) if seconds > 0 else None,
               "init": config.init or "scratch", "precision": config.precision, **world.describe()},
    )
