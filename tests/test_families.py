"""Llama- and Qwen2-style models (tiny, built from configs by tiny_lm): the captured FFN input, block output and
final hidden state equal a forward pass written out here, and the chain runs on each with it as encoder and
decoder: prepare, encode, index, targets, train-memory (offline and online) and evaluate publish sound artifacts."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from memforge.flows.cli import main
from memforge.pipelines.encoder import RepresentationCapture, load_encoder
from memforge.storage.artifact import open_artifact
from memforge.storage.stores import KeyStore

from chain import stage_args
from tiny_lm import FAMILIES, make_family_lm, write_corpus

IN_PROCESS = ("--", "--direct_running_mode=in_memory")
CHAIN = ("prepare", "encode", "index", "targets", "train-memory", "evaluate")
PUBLISHED = ("tokens", "keys/train", "keys/validation", "index", "targets/train", "targets/validation", "memory",
             "eval")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The demo chain's corpus and, per family, a tiny model with a tokenizer trained on it."""
    root = tmp_path_factory.mktemp("families")
    train = write_corpus(root / "corpus" / "train", 6, 150, seed=7)
    write_corpus(root / "corpus" / "validation", 2, 60, seed=8)
    (root / "params.yaml").write_text("{}\n")
    texts = [path.read_text() for path in train]
    return {"root": root, "train": train, "models": {family: make_family_lm(family, root / family, texts)
                                                     for family in FAMILIES}}


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary positions on ``x`` [heads, T, head_dim] as Llama and Qwen2 apply them: at position t, the pair of
    dimensions (i, i + half) turns by t · θ^(-i/half)."""
    half = x.shape[-1] // 2
    angles = torch.arange(x.shape[1])[:, None] * theta ** (-torch.arange(half) / half)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * angles.cos() - second * angles.sin(), second * angles.cos() + first * angles.sin()], -1)


def block_by_hand(block: torch.nn.Module, x: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(FFN input, output) of one Llama/Qwen2 block on one window ``x`` [T, d]: pre-norm causal attention with
    rotary positions and query heads sharing the KV heads, then the gated SiLU feed-forward sublayer."""
    attention, mlp = block.self_attn, block.mlp
    n_heads, n_kv = attention.config.num_attention_heads, attention.config.num_key_value_heads
    length, width = x.shape
    head_dim = width // n_heads
    normed = rms_norm(x, block.input_layernorm)
    query = attention.q_proj(normed).view(length, n_heads, head_dim).transpose(0, 1)
    key, value = (project(normed).view(length, n_kv, head_dim).transpose(0, 1).repeat_interleave(n_heads // n_kv, 0)
                  for project in (attention.k_proj, attention.v_proj))
    scores = rotate(query, theta) @ rotate(key, theta).transpose(1, 2) / math.sqrt(head_dim)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    mixed = (scores.softmax(-1) @ value).transpose(0, 1).reshape(length, width)
    residual = x + attention.o_proj(mixed)
    ffn_input = rms_norm(residual, block.post_attention_layernorm)
    return ffn_input, residual + mlp.down_proj(F.silu(mlp.gate_proj(ffn_input)) * mlp.up_proj(ffn_input))


@pytest.mark.unit
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_captured_states_equal_a_forward_pass_by_hand(project, family):
    """The last block run by hand from its input (the previous block's output) gives the final hidden state
    the model gives; its FFN input, its output and the final norm's output are what the hooks capture."""
    model = load_encoder(str(project["models"][family]))  # as encode loads it
    assert isinstance(model, FAMILIES[family][1])
    ids = torch.randint(model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings, each block's output (last normed)
        theta = model.config.rope_parameters["rope_theta"]
        ffn_input, output = (torch.stack(states) for states in zip(*(block_by_hand(model.model.layers[-1], x, theta)
                                                                         for x in hidden[-2])))
        final = rms_norm(output, model.model.norm)
        torch.testing.assert_close(final, hidden[-1], rtol=1e-4, atol=1e-4)  # the hand-written pass is the model's
        assert not torch.allclose(ffn_input, final, atol=1e-2)  # the two norms' inputs and weights differ
        expected = {("ffn_input", -1): ffn_input, ("block_output", -1): output, ("final", -1): final,
                    ("block_output", 0): hidden[1]}
        for (representation, layer), state in expected.items():
            capture = RepresentationCapture(model, representation, layer)
            torch.testing.assert_close(capture(model, ids), state, rtol=1e-4, atol=1e-4,
                                       msg=lambda text: f"{family} {representation} {layer}: {text}")
            capture.handle.remove()


@pytest.mark.stage
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_chain_runs_with_the_family_as_encoder_and_decoder(project, family, tmp_path):
    root, model = project["root"], project["models"][family]
    tiny = {"encode.model": model, "memory.max_steps": 6, "memory.checkpoint_every": 6}
    art = tmp_path / "art"
    for stage in CHAIN:
        assert main([stage, *stage_args(root, art, **tiny), *IN_PROCESS]) == 0, stage
    keys = open_artifact(str(art / "keys" / "train"), "keys").manifest
    assert keys["params"]["model"]["model_class"] == FAMILIES[family][1].__name__
    # The stored keys of the first window are the FFN input of the last block, as captured on that window.
    tokenizer = AutoTokenizer.from_pretrained(model)
    first = torch.tensor(tokenizer(project["train"][0].read_text(), add_special_tokens=False)["input_ids"][:32])
    decoder = load_encoder(str(model))
    with torch.no_grad():
        captured = RepresentationCapture(decoder, "ffn_input", -1)(decoder, first[None])[0, :31]
    stored = torch.from_numpy(KeyStore.open(str(art / "keys" / "train")).keys(0, 31).astype("float32"))
    torch.testing.assert_close(stored, captured, rtol=2e-3, atol=2e-3)
    assert open_artifact(str(art / "memory"), "memory").manifest["params"]["resolved_mode"] == "offline"
    metrics = json.loads((art / "eval" / "metrics.json").read_text())
    assert all(math.isfinite(value) and value > 1 for value in metrics["perplexity"].values())

    online = tmp_path / "online"
    online.mkdir()
    for name in ("tokens", "keys", "index", "targets"):
        (online / name).symlink_to(art / name)
    assert main(["train-memory", *stage_args(root, online, **tiny, **{"memory.mode": "online"}), *IN_PROCESS]) == 0
    assert open_artifact(str(online / "memory"), "memory").manifest["params"]["resolved_mode"] == "online"
    for name in PUBLISHED:
        assert main(["verify", str(art / name)]) == 0, name
    assert main(["verify", str(online / "memory")]) == 0
