"""lm-evaluation-harness on the decoder + memory model: the real ``lm_eval`` CLI on an exported directory with
the local task shipped here (tests/lm_eval_tasks), lm-eval's loglikelihood equal to the model's own log-probs,
and ``memforge evaluate`` scoring the tasks named in ``evaluate.lm_eval_tasks`` with the decoder alone and
with its memory. Offline: nothing is downloaded."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from memforge.flows.cli import main
from memforge.pipelines.encoder import load_encoder
from memforge.training.compose import compose, save_model
from memforge.training.mlp_memory import MemoryConfig, MLPMemory

from chain import stage_args
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
    """The composed model (λ ``LAM``, τ ``TAU``) and the directory ``compose.save_model`` wrote it to."""
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


def linked_art(chain, art: Path) -> Path:
    """An artifacts folder whose inputs are the chain's (links), so evaluate writes its own ``eval`` here."""
    art.mkdir()
    for name in ("tokens", "decoder", "keys", "index", "targets", "memory"):
        (art / name).symlink_to(chain["art"] / name)
    return art


@pytest.mark.stage
def test_evaluate_scores_the_named_tasks_with_the_decoder_and_with_its_memory(chain, tmp_path, capsys):
    """``evaluate.lm_eval_tasks`` on the tiny chain: metrics.json and report.md hold each metric for the decoder
    and for decoder + memory side by side, over ``lm_eval_limit`` documents. With λ 0 the only choice, decoder +
    memory is the decoder (log(0·p_mem + 1·p_dec)), and the decoder's column is what lm-eval gives that decoder
    loaded on its own."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    art = linked_art(chain, tmp_path / "art")
    settings = {"evaluate.lm_eval_tasks": f"[{TASK}]", "evaluate.lm_eval_include_path": str(TASKS),
                "evaluate.lm_eval_limit": 6, "evaluate.lambda_grid": "[0.0]"}
    assert main(["evaluate", *stage_args(chain["root"], art, **settings)]) == 0
    metrics = json.loads((art / "eval" / "metrics.json").read_text())
    assert metrics["memory_lambda"] == 0.0
    lm_eval = metrics["lm_eval"]
    scores = lm_eval["tasks"][TASK]
    assert scores["samples"] == 6 and lm_eval["version"] == "0.4.13"
    assert set(scores["decoder"]) == set(scores["decoder+memory"]) == {"acc", "acc_norm", "brier_score"}
    for metric, value in scores["decoder"].items():
        assert scores["decoder+memory"][metric] == pytest.approx(value, abs=1e-6), metric
    directory = chain["art"] / "decoder" / "model"
    decoder = HFLM(pretrained=load_encoder(str(directory)), tokenizer=AutoTokenizer.from_pretrained(directory))
    alone = simple_evaluate(decoder, tasks=[TASK], limit=6, bootstrap_iters=0,
                            task_manager=TaskManager(include_path=str(TASKS)))
    for metric, value in scores["decoder"].items():
        assert alone["results"][TASK][f"{metric},none"] == pytest.approx(value, abs=1e-6), metric
    report = (art / "eval" / "report.md").read_text()
    assert f"| {TASK} | 6 | brier_score | {scores['decoder']['brier_score']:.4f} | " in report
    assert report in capsys.readouterr().out
    print("lm-eval in evaluate:", json.dumps(lm_eval))


@pytest.mark.stage
@pytest.mark.parametrize("tasks, without_lm_eval, message", [
    (f"[{TASK}, memforge_tinny]", False, f"evaluate.lm_eval_tasks: no task 'memforge_tinny' in lm-eval 0.4.13's tasks "
                                         f"or {TASKS}; did you mean {TASK}"),
    (f"[{TASK}]", True, "evaluate.lm_eval_tasks needs 'lm_eval', which is not installed"),
])
def test_evaluate_refuses_unknown_tasks_and_a_missing_lm_eval_before_scoring(chain, tmp_path, monkeypatch, capsys,
                                                                            tasks, without_lm_eval, message):
    """A task name lm-eval does not know, or named tasks without lm-eval installed: evaluate's check refuses,
    naming the key (and the extra that installs lm-eval), and nothing is written."""
    if without_lm_eval:
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # as when it is not installed
    art = linked_art(chain, tmp_path / "art")
    settings = {"evaluate.lm_eval_tasks": tasks, "evaluate.lm_eval_include_path": str(TASKS)}
    capsys.readouterr()
    assert main(["evaluate", *stage_args(chain["root"], art, **settings)]) == 1
    err = capsys.readouterr().err
    assert message in err
    if without_lm_eval:
        assert "pip install 'memforge-mlp[eval]'" in err
    assert not (art / "eval").exists()


@pytest.mark.unit
def test_evaluate_imports_no_lm_eval_unless_tasks_are_named():
    """lm-eval is an optional extra: the evaluate stage and its scoring import it only for named tasks."""
    check = ("import sys, memforge.training.evaluate, memforge.training.evaluate_stage; "
             "assert 'lm_eval' not in sys.modules, 'imported lm_eval'")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.unit
def test_the_local_task_files_are_content(tmp_path):
    """Editing a task YAML or its documents under ``evaluate.lm_eval_include_path`` changes the digest that enters
    evaluate's fingerprint; a path that is no directory is refused naming the key."""
    from memforge.storage.errors import MemforgeError
    from memforge.training.harness import include_digest

    tasks = shutil.copytree(TASKS, tmp_path / "tasks")
    before = include_digest(str(tasks))
    documents = tasks / TASK / f"{TASK}.jsonl"
    documents.write_text(documents.read_text().replace('"answer": 2', '"answer": 1', 1))
    assert include_digest(str(tasks)) != before
    with pytest.raises(MemforgeError, match=f"evaluate.lm_eval_include_path: {tmp_path / 'none'} is not a directory"):
        include_digest(str(tmp_path / "none"))
