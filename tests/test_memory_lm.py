"""The exported decoder + memory model (``training.memory_lm``) over each decoder family memforge encodes with:
its logits are the mixture of the decoder's and the memory's distributions at the memory's input, generation
with the KV cache takes the steps a cache-free loop takes, λ 0 is the decoder, and it survives a save/load."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from memforge.pipelines.encoder import RepresentationCapture, load_encoder
from memforge.pipelines.tokenizer import load_tokenizer
from memforge.training.compose import compose, save_model
from memforge.training.mlp_memory import MemoryConfig, MLPMemory

from tiny_lm import make_family_lm, make_gpt2, write_corpus

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def family(request, tmp_path_factory):
    """(decoder, memory, the composed model at λ 0.4, τ 1.5 reading block 0's output, its saved directory)."""
    root = tmp_path_factory.mktemp(request.param)
    texts = [path.read_text() for path in write_corpus(root / "corpus", 4, 120, seed=1)]
    path = (make_gpt2(root / "model", texts, n_embd=32) if request.param == "gpt2"
            else make_family_lm(request.param, root / "model", texts))
    decoder = load_encoder(str(path))
    torch.manual_seed(0)
    memory = MLPMemory(MemoryConfig(input_dim=32, vocab_size=decoder.config.vocab_size, depth=2, hidden_mult=2)).eval()
    model = compose(decoder, memory, 0.4, 1.5, "block_output", 0, {"decoder": request.param})
    save_model(model, load_tokenizer(str(path)), root / "export")
    return decoder, memory, model, root / "export"


def test_the_logits_are_the_mixture_at_the_memorys_input(family):
    decoder, memory, model, _ = family
    ids = torch.randint(3, decoder.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        capture = RepresentationCapture(decoder, "block_output", 0, stop=False)
        p_dec = torch.softmax(decoder(ids).logits.double(), -1)
        p_mem = torch.softmax(memory(capture.value).double() / 1.5, -1)
        capture.handle.remove()
        expected = torch.log(0.4 * p_mem + 0.6 * p_dec)
        mixed = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    torch.testing.assert_close(mixed.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(last, mixed[:, -1:], rtol=0, atol=1e-6)
    assert math.isclose(float(mixed.exp().sum(-1).mean()), 1.0, abs_tol=1e-5)


def test_cached_generation_takes_the_cache_free_steps_and_lambda_zero_is_the_decoder(family):
    decoder, _, _, directory = family
    model = AutoModelForCausalLM.from_pretrained(directory)
    prompt = torch.randint(3, decoder.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    grown = prompt
    for _ in range(8):
        with torch.no_grad():
            grown = torch.cat([grown, model(grown, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, grown)
    model.config.lam = 0.0
    greedy = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 8, "do_sample": False}
    assert torch.equal(model.generate(prompt, **greedy), decoder.generate(prompt, **greedy))


def test_a_bad_mixing_rule_is_refused():
    from memforge.training.memory_lm_config import MemoryLMConfig

    with pytest.raises(ValueError, match="lam: 1.5"):
        MemoryLMConfig(lam=1.5)
    with pytest.raises(ValueError, match="memory_temperature: 0"):
        MemoryLMConfig(memory_temperature=0)


def test_left_padded_batches_generate_what_each_prompt_does_alone(family):
    """Batched generation pads prompts on the left: positions come from the attention mask (``position_ids``), so
    the shorter prompt continues as it does unbatched."""
    decoder, _, _, directory = family
    model = AutoModelForCausalLM.from_pretrained(directory)
    long, short = (torch.randint(3, decoder.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                   for n in (9, 4))
    pad = decoder.config.eos_token_id
    batch = torch.cat([long, torch.cat([torch.full((1, 5), pad), short], 1)])
    mask = torch.cat([torch.ones(1, 9, dtype=torch.long), torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1).long()])
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": pad}
    together = model.generate(batch, attention_mask=mask, **greedy)
    for row, prompt in enumerate((long, short)):
        alone = model.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy)
        assert torch.equal(together[row, -6:], alone[0, -6:]), row
