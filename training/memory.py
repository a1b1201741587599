"""``memforge train-memory``: train the MLP memory to imitate the kNN distributions.

Loss = α·KL(p_kNN ‖ p_mem) + (1−α)·CE(next token), with p_kNN the stored sparse distribution
(renormalised over its stored tokens) and log p_mem gathered at those tokens only: no dense
[rows, vocab] target exists anywhere. Query states are the decoder's hidden states at
``memory.input_layer``: read from the key store when the decoder is the encoder at that layer
(offline), else computed by running the frozen decoder (online). Checkpoints and resume as for
the decoder. Output ``<artifacts_dir>/memory``: ``model/`` (config.json + model.safetensors),
``loss.json`` and the manifest.
"""
from __future__ import annotations

import logging
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from memforge.pipelines import devices
from memforge.pipelines.encoder import RepresentationCapture, hidden_size
from memforge.pipelines.stage import Published
from memforge.storage import fs
from memforge.storage.artifact import Artifact
from memforge.storage.errors import MemforgeError
from memforge.storage.stores import DistributionStore, KeyStore
from memforge.training.checkpoint import DIR as CHECKPOINTS_DIR
from memforge.training.checkpoint import Checkpoints
from memforge.training.memory_data import Coverage, DecoderStates, KeyStoreStates, MemoryRows
from memforge.training.mlp_memory import MemoryConfig, MLPMemory
from memforge.training.optim import adamw, apply_gradients, learning_rate_at, set_learning_rate
from memforge.training.world import World, data_parallel

log = logging.getLogger("memforge")

MODEL_DIR = "model"
LOSS_CURVE = "loss.json"


def memory_loss_sums(logits: torch.Tensor, tokens: torch.Tensor, probs: torch.Tensor, remainder: torch.Tensor,
                     next_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ KL over the rows with targets, how many rows have targets, Σ CE) of a batch's rows from their sparse
    targets (tokens -1 = padding): sums, so the rows of a global batch split over ranks add up to the same loss.

    The KL runs over the stored tokens plus one remainder bucket: the kNN mass of the tokens not stored
    (``remainder``) against the memory's mass outside the stored tokens. No target mass is dropped or
    renormalised away; with nothing cut off it is the KL of the full distribution.
    """
    log_q = torch.log_softmax(logits.float(), dim=-1)
    stored = tokens >= 0
    index = tokens.clamp_min(0).long()
    p = torch.where(stored, probs, torch.zeros_like(probs))
    rest = remainder.clamp(0.0, 1.0)
    has_targets = (p.sum(dim=1) + rest) > 0
    log_q_at = log_q.gather(1, index)
    is_stored = torch.zeros_like(log_q).scatter_add_(1, index, stored.to(log_q.dtype)) > 0
    # Finite even when every vocabulary token is stored (then ``rest`` is 0 and the bucket adds nothing).
    log_q_rest = torch.logsumexp(log_q.masked_fill(is_stored, float("-inf")), dim=1).clamp_min(-1e4)
    kl_rows = (p * (torch.log(p.clamp_min(1e-30)) - log_q_at)).sum(dim=1) + \
        rest * (torch.log(rest.clamp_min(1e-30)) - log_q_rest)
    ce = F.nll_loss(log_q, next_token, reduction="sum")
    return kl_rows[has_targets].sum(), has_targets.sum(), ce


def memory_loss(logits: torch.Tensor, tokens: torch.Tensor, probs: torch.Tensor, remainder: torch.Tensor,
                next_token: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α·KL + (1−α)·CE, KL, CE) of a batch, each the mean over its rows (the KL's over the rows with targets)."""
    kl_sum, with_targets, ce_sum = memory_loss_sums(logits, tokens, probs, remainder, next_token)
    kl = kl_sum / with_targets.clamp_min(1)
    ce = ce_sum / len(next_token)
    return alpha * kl + (1 - alpha) * ce, kl, ce


def moving_average(decay: float):
    """``AveragedModel``'s update for an exponential moving average of the weights with ``decay``; while fewer
    than 1/(1−decay) steps have been averaged it is their plain mean, so a short run publishes the mean of
    its steps rather than (mostly) its first one."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        weight = max(1.0 - decay, 1.0 / (float(n_averaged) + 1.0))
        for mean, value in zip(averaged, current):
            mean.lerp_(value, weight)
    return update


def build_memory(config, input_dim: int, vocab_size: int) -> MLPMemory:
    """An MLP memory of the ``memory`` section's shape over inputs of ``input_dim`` (initialised: seed first)."""
    return MemoryConfig(input_dim, vocab_size, config.depth, config.hidden_mult, config.activation, config.lm_head,
                        config.width).build()


def check_shape(config, decoder_width: int) -> None:
    """Refuse a memory whose head cannot be the decoder's: a ``memory.width`` other than the decoder's with
    ``memory.lm_head`` frozen or tied."""
    if config.width not in (None, decoder_width) and config.lm_head != "own":
        raise MemforgeError(f"memory.width: {config.width} differs from the decoder's hidden size ({decoder_width}), "
                            f"so its LM head cannot be the decoder's (memory.lm_head: {config.lm_head}); "
                            "set memory.lm_head: own or memory.width: null")


def check_targets(targets: Artifact, keys: Artifact, decoder_vocab: int) -> None:
    """Refuse targets whose rows do not align with the key store's or that do not fit the decoder's vocabulary
    (that they were built from this key store is a contract: ``pipelines.contracts``)."""
    if targets.manifest["counts"]["rows"] != keys.manifest["counts"]["rows"]:
        raise MemforgeError(f"{targets.uri}: {targets.manifest['counts']['rows']} rows do not align with the "
                            f"{keys.manifest['counts']['rows']} rows of {keys.uri}")
    vocab = targets.manifest["counts"]["vocab_size"]
    if vocab != decoder_vocab:
        raise MemforgeError(f"{targets.uri}: vocabulary of {vocab} tokens, but the decoder has {decoder_vocab}")


def resolves_offline(params, keys: Artifact, decoder_fingerprint: str, n_blocks: int) -> bool:
    """True when the stored keys are the decoder's states at the memory's input layer."""
    stats = keys.manifest["stats"]
    same_model = stats["model_fingerprint"] == decoder_fingerprint
    same_layer = stats["layer"] % n_blocks == params.memory.input_layer % n_blocks
    possible = same_model and same_layer and stats["representation"] == params.encode.representation
    if params.memory.mode == "offline" and not possible:
        raise MemforgeError(f"memory.mode: offline needs the key store to hold the decoder's states at layer "
                            f"{params.memory.input_layer}, but {keys.uri} was encoded by another model or layer "
                            f"(model {stats['model_fingerprint'][:12]}, layer {stats['layer']}); use online or auto")
    return possible and params.memory.mode != "online"


def train_memory(params, decoder, decoder_fingerprint: str, offline: bool, inputs: dict[str, Artifact], uri: str,
                 world: World) -> Published | None:
    """Train (or resume training) the MLP memory into ``uri`` as this rank of ``world`` (autocast to
    ``memory.precision``; online, the decoder runs on the rank's device too). Rank 0 writes the checkpoints and
    the model and returns what the manifest records; the other ranks return None."""
    config, device = params.memory, world.device
    targets, keys = inputs["targets/train"], inputs["keys/train"]
    torch.manual_seed(config.seed)
    memory = build_memory(config, hidden_size(decoder), int(decoder.config.vocab_size))
    if config.lm_head != "own":
        memory.use_decoder_head(decoder.get_output_embeddings().weight.detach())
    memory.to(device)
    optimizer = adamw(memory, config.learning_rate, config.weight_decay)
    scaler = devices.grad_scaler(device, config.precision)
    average = AveragedModel(memory, multi_avg_fn=moving_average(config.ema_decay), use_buffers=True) \
        if config.ema_decay else None
    checkpoints = Checkpoints(uri)
    record = checkpoints.restore(memory, optimizer, scaler, average) or {"step": 0, "losses": []}
    model = data_parallel(memory, world)
    key_store = KeyStore.open(keys.uri)
    if offline:
        states = KeyStoreStates(key_store)
    else:
        tokens = inputs["tokens"]
        decoder.to(device)
        capture = RepresentationCapture(decoder, params.encode.representation, config.input_layer)
        states = DecoderStates(decoder, capture, tokens.uri, tokens.manifest["stats"]["splits"]["train"]["parts"],
                               keys.manifest["stats"]["block_size"], keys.manifest["stats"]["stride"],
                               params.encode.batch_size, hidden_size(decoder))
    distributions = DistributionStore.open(targets.uri)
    rows = MemoryRows(states, key_store, distributions, distributions.rows.array("tokens").chunks[0],
                      config.shuffle_buffer_chunks, config.seed, world.rank, world.size)
    losses, first_step = record["losses"], record["step"]
    # the checkpoint's counts are every rank's: one rank carries them on
    coverage = Coverage(rows.n_rows, record.get("coverage") if world.writer else None)
    first_epoch = min([first_step * config.batch_size // rows.n_rows,
                       *map(int, record.get("coverage", {}).get("open", {}))])
    if config.shuffle_buffer_chunks % world.size:
        log.warning("train-memory: memory.shuffle_buffer_chunks (%d) is not a multiple of the %d ranks: the "
                    "ranks share some chunks, each reading its part of them", config.shuffle_buffer_chunks,
                    world.size)
    log.info("train-memory: %s mode, %d rows, steps %d..%d on %d rank(s)", "offline" if offline else "online",
             rows.n_rows, first_step, config.max_steps, world.size)
    started, saving = time.perf_counter(), 0.0
    model.train()
    batches = rows.batches(first_step, config.batch_size, coverage)
    for step in range(first_step, config.max_steps):
        batch = next(batches)
        set_learning_rate(optimizer, learning_rate_at(step, config.learning_rate, config.warmup_steps,
                                                      config.max_steps))
        states, tokens, probs, remainder, next_token = (
            torch.from_numpy(array).to(device) for array in (batch.states, batch.tokens, batch.probs,
                                                             batch.remainder, batch.next_token))
        with devices.autocast(device, config.precision):
            logits = model(states)
        kl_sum, with_targets, ce_sum = memory_loss_sums(logits, tokens, probs, remainder, next_token)  # float32
        kl_total, targets_total, ce_total = world.all_sum([kl_sum.item(), float(with_targets), ce_sum.item()])
        # this rank's share of the global batch's loss; data parallelism averages the ranks' gradients
        loss = config.alpha * kl_sum / max(targets_total, 1.0) + (1 - config.alpha) * ce_sum / config.batch_size
        scaler.scale(loss * world.size).backward()
        apply_gradients(memory, optimizer, scaler)
        if average is not None:
            average.update_parameters(memory)
        kl, ce = kl_total / max(targets_total, 1.0), ce_total / config.batch_size
        losses.append([step + 1, round(config.alpha * kl + (1 - config.alpha) * ce, 6), round(kl, 6), round(ce, 6)])
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.max_steps:
            coverage.merge(world, range(first_epoch, ((step + 1) * config.batch_size - 1) // rows.n_rows + 1))
            if world.writer:
                saved = time.perf_counter()
                checkpoints.save(step + 1, memory, optimizer, scaler, {"losses": losses,
                                                                        "coverage": coverage.record()}, average)
                saving += time.perf_counter() - saved
            log.info("train-memory: step %d/%d, loss %.4f (KL %.4f, CE %.4f)", step + 1, config.max_steps,
                     *losses[-1][1:])
    seconds = time.perf_counter() - started - saving  # the steps' time; writing checkpoints is reported apart
    log.info("train-memory: rank %d read %d rows (the targets have %d)", world.rank, rows.rows_read, rows.n_rows)
    if not world.writer:
        return None
    if average is not None:  # the published memory is the running average of its weights
        memory = average.module
    memory.to("cpu")  # the saved memory loads anywhere
    memory.config.update({"input_layer": config.input_layer, "representation": params.encode.representation,
                          "decoder": decoder_fingerprint})
    with tempfile.TemporaryDirectory() as scratch:
        memory.save_pretrained(scratch)
        fs.upload_dir(scratch, fs.join(uri, MODEL_DIR))
    fs.write_json_atomic(fs.join(uri, LOSS_CURVE),
                         [{"step": s, "loss": v, "kl": kl, "ce": ce} for s, v, kl, ce in losses])
    fs.remove_tree(fs.join(uri, CHECKPOINTS_DIR))
    return Published(
        counts={"steps": config.max_steps, "rows": rows.n_rows, "vocab_size": memory.config.vocab_size,
                "parameters": sum(p.numel() for p in memory.parameters())},
        stats={"mode": "offline" if offline else "online", "final_loss": losses[-1][1], "final_kl": losses[-1][2],
               "final_ce": losses[-1][3], "resumed_from_step": first_step, "input_dim": memory.config.input_dim,
               "precision": config.precision, **world.describe(),
               "coverage": {"passes_checked": coverage.checked, "rows_in_open_passes":
                            {str(e): c for e, (c, _) in sorted(coverage.open.items())}},
               "rows_per_second": round((config.max_steps - first_step) * config.batch_size / seconds, 1)
               if seconds > 0 else None, "checkpoint_seconds": round(saving, 2)},
    )

