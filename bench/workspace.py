"""The bench's models, corpora and params, built on first use in a temporary workspace."""
from __future__ import annotations

from pathlib import Path

from memforge.storage.params import Params, parse_params

MODELS = {"tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2}, "small": {"n_layer": 4, "n_embd": 128, "n_head": 4}}
SHAPES = {**MODELS, "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12}}  # the GPU bench's encoder
CORPUS_BYTES = 1_000_000  # 1x; the 4x run reads four times as much of the standard library
BLOCK, STRIDE, VOCAB = 256, 128, 2048


def with_sections(params: Params, **sections) -> Params:
    """``params`` with the keys of each named section replaced (``index={"device": "cuda"}``)."""
    return params.model_copy(update={name: getattr(params, name).model_copy(update=values)
                                     for name, values in sections.items()})


class Workspace:
    """Models, corpora and params for one bench run, built on first use under a temp directory."""

    def __init__(self, root: Path, out_dir: str = "bench-out"):
        self.root, self.out_dir = root, out_dir
        self._models: dict[str, Path] = {}
        self._prepared: dict[int, Params] = {}

    def model(self, name: str) -> Path:
        """A GPT-2 of shape ``SHAPES[name]`` (random weights, seeded) with a BPE tokenizer trained on the 1x
        corpus, saved once."""
        if name not in self._models:
            import torch
            from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

            from memforge.pipelines.corpus import source_files
            from memforge.pipelines.tokenizer import train_tokenizer
            from memforge.pipelines.tokenizer_sample import sample_texts

            path = self.root / f"model-{name}"
            corpus = parse_params({"corpus": self.corpus(1)}).corpus
            train_tokenizer(sample_texts(source_files(corpus), corpus), VOCAB, str(path))
            tokenizer = AutoTokenizer.from_pretrained(path)
            torch.manual_seed(0)
            GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=BLOCK, **SHAPES[name],
                                       bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
            self._models[name] = path
        return self._models[name]

    @staticmethod
    def corpus(scale: int) -> dict:
        """The corpus section for ``scale`` x ``CORPUS_BYTES`` of the standard library's ``.py`` files."""
        return {"train": ["{stdlib}/**/*.py"], "max_bytes": CORPUS_BYTES * scale, "validation_fraction": 0.05,
                "on_decode_error": "skip"}

    def params(self, scale: int, model: str) -> Params:
        """Params for an encode of the ``scale``x corpus with ``model`` (prepared once per scale)."""
        params = parse_params({
            "artifacts_dir": str(self.root / f"art-{scale}x"), "corpus": self.corpus(scale),
            "encode": {"model": str(self.model("tiny")), "block_size": BLOCK, "stride": STRIDE, "batch_size": 8},
            "runtime": {"num_workers": 2, "threads_per_worker": 1},
        })
        if scale not in self._prepared:
            from memforge.flows.stages import run_stage

            run_stage("prepare", params)
            self._prepared[scale] = params
        encode = {**params.section("encode"), "model": str(self.model(model))}
        return params.model_copy(update={"encode": params.encode.model_copy(update=encode)})
