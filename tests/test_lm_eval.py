"""lm-evaluation-harness on the decoder + memory model: the real ``lm_eval`` CLI on an exported directory with
the local task shipped here (tests/lm_eval_tasks), lm-eval's loglikelihood equal to the model's own log-probs,
and ``memforge evaluate`` scoring the tasks named in ``evaluate.lm_eval_tasks`` with the decoder alone and
with its memory. Offline: nothing is downloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from memforge.pipelines.encoder import load_encoder
from memforge.training.export import compose, save_model
from memforge.training.mlp_memory import MemoryConfig, MLPMemory

from tiny_lm import WORDS, make_gpt2

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK = "memforge_tiny"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
LAM, TAU = 0.4, 1.3  # a mixture that is neither model alone, the memory's logits tempered


@pytest.fixture(scope="module")
def decoder_and_memory(tmp_path_factory):
    """A random tiny GPT-2 (its tokenizer trained on the Greek-letter words of the task) and a random memory
    reading its last block's FFN input."""
    directory = make_gpt2(tmp_path_factory.mktemp("gpt2"), [" ".join(WORDS)] * 20)
    decoder = load_encoder(str(directory))
    torch.manual_seed(1)
    memory = MLPMemory(MemoryConfig(input_dim=decoder.config.n_embd, vocab_size=decoder.config.vocab_size, depth=2,
                                    hidden_mult=2)).eval()
    return decoder, memory, AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def exported(decoder_and_memory, tmp_path_factory):
    """The composed model (λ ``LAM``, τ ``TAU``) and the directory ``export.save_model`` wrote it to."""
    decoder, memory, tokenizer = decoder_and_memory
    model = compose(decoder, memory, LAM, TAU, "ffn_input", -1)
    directory = tmp_path_factory.mktemp("exported")
    save_model(model, tokenizer, directory)
    return model, directory


@pytest.mark.stage
def test_the_lm_eval_cli_scores_the_exported_model_on_a_local_task(exported, tmp_path):
    """``lm_eval --model hf`` loads the exported directory with its own code (trust_remote_code) and scores the
    local multiple-choice task: exit 0, and a result with each of the task's metrics."""
    _, directory = exported
    command = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf",
               "--model_args", f"pretrained={directory},trust_remote_code=True", "--tasks", TASK,
               "--include_path", str(TASKS), "--device", "cpu", "--batch_size", "2",
               "--output_path", str(tmp_path / "out")]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    scores = json.loads(results_file.read_text())["results"][TASK]
    for metric in ("acc", "acc_norm", "brier_score"):
        assert 0.0 <= scores[f"{metric},none"] <= 1.0, metric
    print("lm_eval CLI on the exported model:", {key: value for key, value in scores.items() if "," in key})


@pytest.mark.unit
@pytest.mark.parametrize("loaded_from", ["instance", "directory"])
def test_lm_eval_loglikelihood_is_the_models_own_sum_of_log_probs(exported, loaded_from):
    """HFLM's loglikelihood of (context, continuation) requests, batched and padded, equals the sum of the
    composed model's log-softmax at the continuation's tokens, computed here one request at a time."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, directory = exported
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if loaded_from == "instance":
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    else:
        lm = HFLM(pretrained=str(directory), trust_remote_code=True, device="cpu", dtype="float32", batch_size=2)
    pairs = [("alpha beta gamma", " delta"), ("omega psi chi phi upsilon tau", " sigma rho pi"),
             ("kappa", " lambda mu nu xi omicron")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    harness = [log_likelihood for log_likelihood, _ in lm.loglikelihood(requests)]
    for (context, continuation), theirs in zip(pairs, harness):
        context_ids = tokenizer(context).input_ids
        ids = tokenizer(context + continuation).input_ids
        assert ids[:len(context_ids)] == context_ids, "the continuation would change the context's tokens"
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        ours = sum(log_probs[t - 1, ids[t]].item() for t in range(len(context_ids), len(ids)))
        print(f"{context!r} + {continuation!r}: lm-eval {theirs:.6f}, model {ours:.6f}")
        assert theirs == pytest.approx(ours, abs=1e-5)
