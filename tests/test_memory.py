"""train-memory on a real tiny chain (prepare -> train-decoder -> encode -> index -> targets, see chain.py):
offline and online query states agree, the loss falls, and
targets that do not belong to the key store or the decoder are refused."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel
from transformers import AutoModel

from memforge.flows.cli import main
from memforge.pipelines.encoder import RepresentationCapture, load_encoder
from memforge.storage.artifact import open_artifact
from memforge.storage.stores import KeyStore
from memforge.storage.verify import verify
from memforge.training.memory import moving_average
from memforge.training.memory_data import DecoderStates, KeyStoreStates
from memforge.training.mlp_memory import MemoryConfig, MLPMemory

from chain import rewrite_manifest, stage_args

pytestmark = pytest.mark.stage


def linked(chain, tmp_path, names=("tokens", "decoder", "keys", "index", "targets")):
    art = tmp_path / "art"
    art.mkdir()
    for name in names:
        (art / name).symlink_to(chain["art"] / name)
    return art


def test_offline_memory_learns_and_loads(chain):
    memory = chain["art"] / "memory"
    manifest = open_artifact(str(memory), "memory").manifest
    assert manifest["stats"]["mode"] == "offline" and manifest["params"]["resolved_mode"] == "offline"
    curve = json.loads((memory / "loss.json").read_text())
    assert len(curve) == 30 and np.mean([p["kl"] for p in curve[-5:]]) < np.mean([p["kl"] for p in curve[:5]])
    model = AutoModel.from_pretrained(str(memory / "model"))  # the standard loader
    assert isinstance(model, MLPMemory) and not model.training
    decoder = load_encoder(str(chain["art"] / "decoder" / "model"))
    assert model.config.input_dim == 48 and model.config.vocab_size == decoder.config.vocab_size
    # lm_head: tied (the default) starts from the decoder's LM head and trains it further
    head = decoder.get_output_embeddings().weight
    assert model.head.weight.shape == head.shape and not torch.equal(model.head.weight, head)
    assert manifest["params"]["lm_head"] == "tied"
    # Its logits are those of the saved weights, applied by hand.
    weights = load_file(str(memory / "model" / "model.safetensors"))
    hidden = torch.randn(5, 48)
    expected = hidden
    for block in range(model.config.depth):
        w = {name: weights[f"blocks.{block}.{name}"] for name in ("norm.weight", "norm.bias", "up.weight", "up.bias",
                                                                 "down.weight", "down.bias")}
        normed = F.layer_norm(expected, (48,), w["norm.weight"], w["norm.bias"])
        expected = expected + F.linear(F.gelu(F.linear(normed, w["up.weight"], w["up.bias"])), w["down.weight"],
                                       w["down.bias"])
    expected = F.linear(F.layer_norm(expected, (48,), weights["norm.weight"], weights["norm.bias"]),
                        weights["head.weight"])
    with torch.no_grad():
        assert torch.allclose(model(hidden), expected, atol=1e-5)
    assert verify(str(memory)) == []


def test_online_states_are_the_stored_keys(chain):
    """Online mode runs the decoder on the windows that own the rows: the same states as encode stored."""
    decoder = load_encoder(str(chain["art"] / "decoder" / "model"))
    tokens = open_artifact(str(chain["art"] / "tokens"), "tokens")
    online = DecoderStates(decoder, RepresentationCapture(decoder, "ffn_input", -1), tokens.uri,
                           tokens.manifest["stats"]["splits"]["train"]["parts"], 32, 16, 8, 48)
    offline = KeyStoreStates(KeyStore.open(str(chain["art"] / "keys" / "train")))
    for start, stop in ((0, 64), (300, 400)):
        np.testing.assert_allclose(online(start, stop), offline(start, stop), rtol=2e-3, atol=2e-3)


def test_online_mode_trains_on_two_ranks(chain, tmp_path):
    """Online, each rank runs the decoder on the windows of its own rows."""
    art = linked(chain, tmp_path)
    assert main(["train-memory", *stage_args(chain["root"], art, **{"memory.mode": "online", "memory.max_steps": 5,
                                                                     "memory.nproc_per_node": 2})]) == 0
    stats = open_artifact(str(art / "memory"), "memory").manifest["stats"]
    assert (stats["mode"], stats["world_size"], stats["backend"]) == ("online", 2, "gloo")


def test_online_training_with_an_encoder_that_is_not_the_decoder(chain, tmp_path):
    """A datastore encoded by another model (d 32, ``encode.model``), a memory for the trained decoder
    (d 48): auto resolves to online, the memory reads the decoder's states (its input is the decoder's
    width) and learns the other model's neighbour distributions."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    encoder_dir = tmp_path / "encoder"
    tokenizer = AutoTokenizer.from_pretrained(chain["art"] / "decoder" / "model")
    tokenizer.save_pretrained(encoder_dir)
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(encoder_dir)
    art = linked(chain, tmp_path, names=("tokens", "decoder"))
    for stage in ("encode", "index", "targets"):
        assert main([stage, *stage_args(chain["root"], art, **{"encode.model": encoder_dir})]) == 0, stage
    assert KeyStore.open(str(art / "keys" / "train")).keys(0, 1).shape[1] == 32
    # a frozen head, so the memory's head is exactly the decoder's (not the other model's)
    assert main(["train-memory", *stage_args(chain["root"], art, **{"memory.max_steps": 20,
                                                                    "memory.lm_head": "frozen"})]) == 0
    memory = open_artifact(str(art / "memory"), "memory")
    assert memory.manifest["params"]["resolved_mode"] == "online" and memory.manifest["stats"]["input_dim"] == 48
    assert {i["role"] for i in memory.manifest["inputs"]} == {"targets", "keys", "decoder"}
    curve = json.loads((art / "memory" / "loss.json").read_text())
    assert np.mean([p["kl"] for p in curve[-5:]]) < np.mean([p["kl"] for p in curve[:5]])
    model = AutoModel.from_pretrained(str(art / "memory" / "model"))
    decoder = load_encoder(str(chain["art"] / "decoder" / "model"))
    assert model.config.input_dim == 48 and torch.equal(model.head.weight, decoder.get_output_embeddings().weight)
    assert verify(str(art / "memory")) == []


def test_the_published_memory_is_the_average_of_its_steps_unless_ema_decay_is_null(chain, tmp_path):
    art = linked(chain, tmp_path)
    assert main(["train-memory", *stage_args(chain["root"], art, **{"memory.ema_decay": "null"})]) == 0
    last = open_artifact(str(art / "memory"), "memory").manifest
    averaged = open_artifact(str(chain["art"] / "memory"), "memory").manifest  # same seed, data and steps
    assert last["params"]["ema_decay"] is None and averaged["params"]["ema_decay"] == 0.999
    # The same training run (up to float summation order, which torch's thread count decides) ...
    assert last["stats"]["final_loss"] == pytest.approx(averaged["stats"]["final_loss"], abs=1e-4)
    # ... whose published weights differ by far more than that order could explain.
    last_weights, averaged_weights = (load_file(str(root / "memory" / "model" / "model.safetensors"))
                                      for root in (art, chain["art"]))
    assert max((last_weights[name] - averaged_weights[name]).abs().max().item() for name in last_weights) > 1e-3


def test_moving_average_is_the_mean_of_the_steps_then_exponential():
    model = torch.nn.Linear(1, 1, bias=False)
    average = AveragedModel(model, multi_avg_fn=moving_average(0.75), use_buffers=True)  # 1/(1-0.75) = 4 steps
    for value, expected in ((1.0, 1.0), (2.0, 1.5), (3.0, 2.0), (4.0, 2.5), (5.0, 2.5 + 0.25 * (5.0 - 2.5))):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update_parameters(model)
        assert average.module.weight.item() == pytest.approx(expected)


def _edited_targets(chain, tmp_path, edit) -> list[str]:
    art = linked(chain, tmp_path, ("tokens", "decoder", "keys", "index"))
    shutil.copytree(chain["art"] / "targets", art / "targets")
    rewrite_manifest(art / "targets" / "train", edit)
    return ["train-memory", *stage_args(chain["root"], art)]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["counts"].update(vocab_size=999), "vocabulary of 999 tokens, but the decoder has"),
    (lambda m: m["counts"].update(rows=m["counts"]["rows"] - 64), "rows do not align with the"),
    (lambda m: next(i for i in m["inputs"] if i["role"] == "queries").update(content_digest="f" * 64),
     "its inputs disagree on keys/train: "),
])
def test_mismatched_targets_are_refused(chain, tmp_path, capsys, edit, message):
    args = _edited_targets(chain, tmp_path, edit)
    capsys.readouterr()
    assert main(args) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "art" / "memory").exists()


@pytest.mark.parametrize("lm_head, trained", [("frozen", False), ("tied", True)])
def test_the_decoders_head_is_copied_in_and_trained_only_when_tied(lm_head, trained):
    memory = MemoryConfig(input_dim=8, vocab_size=11, depth=1, hidden_mult=2, lm_head=lm_head).build()
    head = torch.randn(11, 8)
    memory.use_decoder_head(head)
    assert torch.equal(memory.head.weight, head) and memory.head.weight.requires_grad is trained
    with pytest.raises(ValueError, match=r"\(11, 9\) does not fit"):
        memory.use_decoder_head(torch.randn(11, 9))


def test_a_wider_memory_trains_with_its_own_head_and_refuses_the_decoders(chain, tmp_path, capsys):
    """memory.width above the decoder's hidden size: a projection widens the input and the memory's own head
    reads the wider state; with the decoder's head (frozen or tied) it is refused before any work."""
    art = linked(chain, tmp_path)
    assert main(["train-memory", *stage_args(chain["root"], art, **{"memory.width": 80, "memory.lm_head": "tied",
                                                                     "memory.max_steps": 5})]) == 1
    assert "memory.width: 80 differs from the decoder's hidden size" in capsys.readouterr().err
    assert not (art / "memory").exists()
    assert main(["train-memory", *stage_args(chain["root"], art, **{"memory.width": 80, "memory.lm_head": "own",
                                                                     "memory.max_steps": 5})]) == 0
    memory = AutoModel.from_pretrained(str(art / "memory" / "model"))
    width = memory.config.input_dim
    assert memory.config.width == 80 != width and memory.project.weight.shape == (80, width)
    assert memory.head.weight.shape == (memory.config.vocab_size, 80)
    assert memory(torch.zeros(2, width)).shape == (2, memory.config.vocab_size)


def test_the_loss_keeps_the_mass_of_tokens_not_stored():
    """KL from width-m targets plus the remainder bucket, against the KL of the full k-token distribution:
    equal when nothing is cut off, never above it otherwise (coarser distributions), and the cut-off mass
    is never renormalised onto the stored tokens."""
    from memforge.pipelines.knn import KeepRule, distributions
    from memforge.training.memory import memory_loss

    rng = np.random.default_rng(0)
    n, k, vocab = 256, 64, 40
    dists = np.sort(rng.exponential(1.0, (n, k)), axis=1).astype(np.float32)
    values = rng.zipf(1.3, (n, k)) % vocab
    logits = torch.from_numpy(rng.normal(0, 2, (n, vocab)).astype(np.float32))
    next_token = torch.from_numpy(values[:, 0].astype(np.int64))

    def kl(width: int) -> tuple[torch.Tensor, np.ndarray]:
        tokens, probs, truncated = distributions(dists, values, 1.0, KeepRule(width))
        loss, kl_value, _ = memory_loss(logits, torch.from_numpy(tokens), torch.from_numpy(probs),
                                        torch.from_numpy(truncated), next_token, alpha=1.0)
        assert torch.isclose(loss, kl_value)
        return kl_value, truncated

    full, nothing_cut = kl(k)
    assert float(nothing_cut.max()) < 1e-6
    tokens, probs, _ = distributions(dists, values, 1.0, KeepRule(k))
    p = np.zeros((n, vocab))
    rows = np.repeat(np.arange(n), tokens.shape[1]).reshape(tokens.shape)
    np.add.at(p, (rows, np.clip(tokens, 0, None)), np.where(tokens >= 0, probs, 0))
    log_q = torch.log_softmax(logits.double(), dim=1).numpy()
    reference = np.mean(np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - log_q), 0), axis=1))
    assert float(full) == pytest.approx(reference, rel=1e-5)
    for width in (4, 8):
        bucketed, cut = kl(width)
        assert float(cut.mean()) > 0.01, "the test must cut real mass"
        assert float(bucketed) <= float(full) + 1e-5
        print(f"width {width}: mean cut mass {cut.mean():.3f}, KL with bucket {float(bucketed):.4f}, "
              f"full KL {float(full):.4f}")
