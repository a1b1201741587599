"""train-decoder: a real (tiny) LM trained from the token store, loadable with from_pretrained,
beating the unigram baseline; SIGKILL mid-training resumes from the last checkpoint and ends
with the same weights as an uninterrupted run; the trained decoder is then the encoder."""
from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from memforge.flows.cli import main
from memforge.storage.artifact import open_artifact
from memforge.storage.verify import verify

from crash import kill_when, rerun
from tiny_lm import write_corpus

pytestmark = pytest.mark.stage

DECODER = {"decoder.vocab_size": 320, "decoder.n_layer": 2, "decoder.n_head": 2, "decoder.n_embd": 48,
           "decoder.block_size": 32, "decoder.batch_size": 8, "decoder.max_steps": 60, "decoder.warmup_steps": 5,
           "decoder.learning_rate": 0.005, "decoder.checkpoint_every": 20}


def settings_args(root, art, **overrides) -> list[str]:
    settings = {"artifacts_dir": art, "corpus.train": f"[{root}/corpus/train/*.txt]",
                "corpus.validation": f"[{root}/corpus/validation/*.txt]", "encode.block_size": 32,
                "encode.stride": 16, "encode.chunk_rows": 64, "encode.shard_chunks": 2, **DECODER, **overrides}
    args = ["--params", str(root / "params.yaml")]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder")
    write_corpus(root / "corpus" / "train", 6, 150, seed=5)
    write_corpus(root / "corpus" / "validation", 2, 80, seed=6)
    (root / "params.yaml").write_text("{}\n")
    args = settings_args(root, root / "art")
    beam = ["--", "--direct_running_mode=in_memory"]
    assert main(["prepare", *args, *beam]) == 0
    assert main(["train-decoder", *args]) == 0
    return {"root": root, "art": root / "art", "args": args, "beam": beam}


def test_decoder_is_a_real_lm_that_from_pretrained_loads(trained):
    decoder = trained["art"] / "decoder"
    model = AutoModelForCausalLM.from_pretrained(decoder / "model")
    tokenizer = AutoTokenizer.from_pretrained(decoder / "model")
    assert model.config.n_layer == 2 and model.config.vocab_size == len(tokenizer)
    stats = open_artifact(str(decoder), "decoder").manifest["stats"]
    print(f"validation perplexity {stats['validation_perplexity']:.2f}, unigram {stats['unigram_perplexity']:.2f}")
    assert stats["validation_perplexity"] < 0.5 * stats["unigram_perplexity"]
    curve = json.loads((decoder / "loss.json").read_text())
    assert [point["step"] for point in curve] == list(range(1, 61)) and curve[-1]["loss"] < curve[0]["loss"]
    assert not (decoder / "_checkpoints").exists() and verify(str(decoder)) == []


def test_trained_decoder_is_the_encoder_when_none_is_configured(trained):
    assert main(["encode", *trained["args"], *trained["beam"]]) == 0
    keys = open_artifact(str(trained["art"] / "keys" / "train"), "keys").manifest
    decoder = open_artifact(str(trained["art"] / "decoder"), "decoder")
    assert {"role": "decoder", "fingerprint": decoder.fingerprint}.items() <= next(
        i for i in keys["inputs"] if i["role"] == "decoder").items()


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(trained, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "tokens").symlink_to(trained["art"] / "tokens")
    args = settings_args(trained["root"], art)
    checkpoints = art / "decoder" / "_checkpoints"
    kill_when(["train-decoder", *args], lambda: any(checkpoints.glob("step-*/trainer.json")))
    assert not (art / "decoder" / "_manifest.json").exists()
    done = sorted(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("step-*/trainer.json"))
    assert done and done[-1] < 60
    # Checkpoints are progress like shard markers: a rerun with other params is refused, not restarted.
    other = rerun(["train-decoder", *args, "--set", "decoder.learning_rate=0.002"])
    assert other.returncode == 1 and "finished shards or checkpoints; pass --rebuild" in other.stderr, other.stderr
    assert "Traceback" not in other.stderr
    result = rerun(["train-decoder", *args])
    assert result.returncode == 0, result.stderr
    assert f"resuming from the checkpoint of step {done[-1]}" in result.stderr
    # The same run uninterrupted, in a process like the resumed one (torch's thread count, which this
    # pytest process may have changed, decides the float summation order).
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "tokens").symlink_to(trained["art"] / "tokens")
    assert rerun(["train-decoder", *settings_args(trained["root"], clean)]).returncode == 0
    resumed = open_artifact(str(art / "decoder"), "decoder").manifest
    uninterrupted = open_artifact(str(clean / "decoder"), "decoder").manifest
    assert resumed["stats"]["resumed_from_step"] == done[-1]
    assert resumed["files"]["model/model.safetensors"] == uninterrupted["files"]["model/model.safetensors"]
    assert resumed["stats"]["final_train_loss"] == uninterrupted["stats"]["final_train_loss"]
    assert json.loads((art / "decoder" / "loss.json").read_text()) == json.loads(
        (clean / "decoder" / "loss.json").read_text())


def test_fine_tuning_needs_the_token_store_tokenizer(trained, tmp_path, capsys):
    from tiny_lm import make_gpt2

    other = make_gpt2(tmp_path / "other", ["completely different text for another vocabulary"] * 20, vocab_size=300)
    art = tmp_path / "art"
    art.mkdir()
    (art / "tokens").symlink_to(trained["art"] / "tokens")
    assert main(["train-decoder", *settings_args(trained["root"], art, **{"decoder.init": other})]) == 1
    assert "its tokenizer differs from the token store's" in capsys.readouterr().err
    assert not (art / "decoder" / "_manifest.json").exists()


def test_fine_tuning_from_decoder_init_starts_from_its_weights_on_one_rank_or_two(trained, tmp_path):
    """``decoder.init`` naming a model with the token store's tokenizer (here: the trained decoder, without
    dropout) fine-tunes it: the run succeeds, starts from its low loss instead of a fresh model's, records the
    init, and the result loads with from_pretrained. On two ranks the steps are the same: the loss curves agree."""
    init = tmp_path / "init"
    shutil.copytree(trained["art"] / "decoder" / "model", init)
    config = json.loads((init / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # dropout masks differ with the ranks
    (init / "config.json").write_text(json.dumps(config))
    curves = {}
    for ranks in (1, 2):
        art = tmp_path / f"art-{ranks}"
        art.mkdir()
        (art / "tokens").symlink_to(trained["art"] / "tokens")
        assert main(["train-decoder", *settings_args(trained["root"], art, **{
            "decoder.init": init, "decoder.max_steps": 5, "decoder.nproc_per_node": ranks})]) == 0
        curves[ranks] = [row["loss"] for row in json.loads((art / "decoder" / "loss.json").read_text())]
        manifest = open_artifact(str(art / "decoder"), "decoder").manifest
        assert manifest["stats"]["init"] == str(init) and manifest["stats"]["world_size"] == ranks
        assert verify(str(art / "decoder")) == []
        AutoModelForCausalLM.from_pretrained(art / "decoder" / "model")
    fresh = json.loads((trained["art"] / "decoder" / "loss.json").read_text())
    print(f"first loss: fine-tuned {curves[1][0]:.3f}, from scratch {fresh[0]['loss']:.3f}; 2 ranks {curves[2]}")
    assert curves[1][0] < 0.75 * fresh[0]["loss"]
    assert max(abs(a - b) for a, b in zip(curves[1], curves[2])) < 1e-4


def test_a_diverged_decoder_publishes_strict_json(trained, tmp_path, caplog):
    """A learning rate of 1e12 drives the loss and the validation perplexity to NaN: the manifest (and the loss
    curve) record them as null and stay strict JSON (no NaN or Infinity token), and the log says which keys."""
    art = tmp_path / "art"
    art.mkdir()
    (art / "tokens").symlink_to(trained["art"] / "tokens")
    assert main(["train-decoder", *settings_args(trained["root"], art, **{
        "decoder.learning_rate": 1e12, "decoder.max_steps": 4, "decoder.warmup_steps": 1,
        "decoder.checkpoint_every": 4})]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} in a memforge JSON file")

    manifest = json.loads((art / "decoder" / "_manifest.json").read_text(), parse_constant=refuse)
    curve = json.loads((art / "decoder" / "loss.json").read_text(), parse_constant=refuse)
    assert manifest["stats"]["validation_perplexity"] is None and manifest["stats"]["final_train_loss"] is None
    assert curve[-1]["loss"] is None
    assert "_manifest.json: stats.final_train_loss (nan), stats.validation_perplexity (nan) are not a finite " \
           "number; written as null" in caplog.text
    assert verify(str(art / "decoder")) == []
