"""Bad input to `prepare` and `encode` is a clean, one-line CLI error that names the file, key or
value at fault (exit 1, no traceback), and nothing is published. Errors found inside Beam workers
(undecodable or empty documents, bad JSONL) are checked too, so those cases run a one-worker pipeline."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import T5Config

from memforge.flows.cli import main
from memforge.storage import fs
from memforge.storage.artifact import open_artifact

from tiny_lm import WORDS, make_gpt2, write_corpus

pytestmark = pytest.mark.stage

MANIFEST = "_manifest.json"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny local GPT-2 (own tokenizer, n_positions=64), good train/validation text and an empty params file."""
    root = tmp_path_factory.mktemp("bad_input")
    train = write_corpus(root / "good" / "train", 4, 60, seed=1)
    write_corpus(root / "good" / "validation", 2, 40, seed=2)
    model = make_gpt2(root / "model", [p.read_text() for p in train])
    params = root / "empty.yaml"
    params.write_text("")
    return {"root": root, "model": model, "params": params,
            "train": root / "good" / "train", "validation": root / "good" / "validation"}


def stage_args(env, command: str, art: Path, train: list[str] | None = None,
               validation: list[str] | None = None, **settings) -> list[str]:
    """CLI args for ``command`` with the tiny model and small geometry; ``settings`` are extra
    ``--set`` overrides (``corpus__format="jsonl"`` -> ``corpus.format=jsonl``)."""
    values = {
        "artifacts_dir": str(art), "encode.model": str(env["model"]),
        "corpus.train": json.dumps([str(p) for p in (train if train is not None else [env["train"] / "*.txt"])]),
        "corpus.validation": json.dumps([str(p) for p in (validation if validation is not None
                                                          else [env["validation"] / "*.txt"])]),
        "encode.block_size": 32, "encode.stride": 16, "encode.chunk_rows": 64, "encode.shard_chunks": 2,
        "runtime.num_workers": 1,
    }
    values.update({key.replace("__", "."): value for key, value in settings.items()})
    args = [command, "--params", str(env["params"])]
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, command: str, *expected: str) -> str:
    """Exit 1 with one `memforge <command>: error:` message containing every ``expected`` substring."""
    assert code == 1, err
    assert f"memforge {command}: error: " in err, err
    assert "Traceback" not in err, err
    message = err[err.index(f"memforge {command}: error: "):]
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def assert_unpublished(*artifact_dirs: Path) -> None:
    for directory in artifact_dirs:
        assert not (directory / MANIFEST).exists(), f"{directory} was published"


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


# -- prepare: sources ---------------------------------------------------------------------------

def test_glob_matching_no_file(env, tmp_path, capsys):
    art = tmp_path / "art"
    pattern = str(tmp_path / "nowhere" / "*.txt")
    code, err = run_cli(stage_args(env, "prepare", art, train=[pattern]), capsys)
    assert_refused(code, err, "prepare", "corpus.train[0]: no file matches", pattern)
    assert_unpublished(art / "tokens")


def test_missing_source_is_named_by_key_and_index(env, tmp_path, capsys):
    art = tmp_path / "art"
    missing = str(tmp_path / "absent.txt")
    code, err = run_cli(stage_args(env, "prepare", art, train=[env["train"] / "*.txt", missing]), capsys)
    assert_refused(code, err, "prepare", "corpus.train[1]: no file matches", missing)
    code, err = run_cli(stage_args(env, "prepare", art, validation=[missing]), capsys)
    assert_refused(code, err, "prepare", "corpus.validation[0]: no file matches", missing)
    assert_unpublished(art / "tokens")


# -- prepare: content (found in the Beam workers or at publish time) ---------------------------

@pytest.mark.parametrize("content", ["", "  \n\t\n"], ids=["empty", "whitespace"])
def test_empty_or_whitespace_corpus(env, tmp_path, capsys, content):
    art = tmp_path / "art"
    write(tmp_path / "corpus" / "a.txt", content)
    write(tmp_path / "corpus" / "b.txt", content)
    code, err = run_cli(stage_args(env, "prepare", art, train=[tmp_path / "corpus" / "*.txt"]), capsys)
    if content:
        assert_refused(code, err, "prepare", "corpus.train", "empty or whitespace")
        assert_unpublished(art / "tokens")
    else:  # refused before any work: no Beam job, nothing left behind
        assert_refused(code, err, "prepare", "corpus.train", "2 file(s) are empty (0 bytes)", "a.txt")
        assert not (art / "tokens").exists()


def test_binary_file(env, tmp_path, capsys):
    art = tmp_path / "art"
    bad = write(tmp_path / "corpus" / "binary.txt", b"some text\x00\x01\x02 more")
    train = [env["train"] / "*.txt", bad]
    code, err = run_cli(stage_args(env, "prepare", art, train=train), capsys)
    assert_refused(code, err, "prepare", str(bad), "NUL byte at byte offset 9", "on_decode_error")
    assert_unpublished(art / "tokens")


def test_non_utf8_file(env, tmp_path, capsys):
    art = tmp_path / "art"
    bad = write(tmp_path / "corpus" / "latin.txt", b"hello \xff\xfe world")
    train = [env["train"] / "*.txt", bad]
    code, err = run_cli(stage_args(env, "prepare", art, train=train), capsys)
    assert_refused(code, err, "prepare", str(bad), "not valid UTF-8 at byte offset 6")
    assert_unpublished(art / "tokens")


def test_skip_undecodable_files_counts_them(env, tmp_path, capsys):
    art = tmp_path / "art"
    bad = [write(tmp_path / "corpus" / "binary.txt", b"some text\x00 more"),
           write(tmp_path / "corpus" / "latin.txt", b"hello \xff\xfe world")]
    train = [env["train"] / "*.txt", *bad]
    code, err = run_cli(stage_args(env, "prepare", art, train=train, corpus__on_decode_error="skip"), capsys)
    assert code == 0, err
    tokens = open_artifact(str(art / "tokens"), "tokens")
    assert tokens.manifest["stats"]["skipped_documents"] == len(bad)
    assert tokens.manifest["stats"]["splits"]["train"]["documents"] == len(list(env["train"].glob("*.txt")))


def test_jsonl_line_not_json(env, tmp_path, capsys):
    art = tmp_path / "art"
    bad = write(tmp_path / "corpus" / "data.jsonl", '{"text": "alpha beta gamma"}\n{"text": oops\n')
    code, err = run_cli(stage_args(env, "prepare", art, train=[bad]), capsys)
    assert_refused(code, err, "prepare", f"{bad} line 2", "not valid JSON")
    assert_unpublished(art / "tokens")


def test_jsonl_records_without_text_field(env, tmp_path, capsys):
    art = tmp_path / "art"
    bad = write(tmp_path / "corpus" / "data.jsonl", '{"body": "alpha beta gamma"}\n{"body": "delta"}\n')
    code, err = run_cli(stage_args(env, "prepare", art, train=[bad]), capsys)
    assert_refused(code, err, "prepare", f"{bad} line 1", "'text'")
    assert_unpublished(art / "tokens")


def test_good_jsonl_and_parquet_prepare(env, tmp_path, capsys):
    art = tmp_path / "art"
    texts = [p.read_text() for p in sorted(env["train"].glob("*.txt"))]
    write(tmp_path / "corpus" / "train" / "a.jsonl", "".join(json.dumps({"text": t, "id": i}) + "\n"
                                                             for i, t in enumerate(texts[:2])))
    pq.write_table(pa.table({"text": texts[2:], "id": list(range(len(texts) - 2))}),
                   tmp_path / "corpus" / "train" / "b.parquet")
    val = [p.read_text() for p in sorted(env["validation"].glob("*.txt"))]
    write(tmp_path / "corpus" / "validation" / "v.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in val))
    code, err = run_cli(stage_args(env, "prepare", art, train=[tmp_path / "corpus" / "train" / "*"],
                                   validation=[tmp_path / "corpus" / "validation" / "*"],
                                   corpus__format="auto"), capsys)
    assert code == 0, err
    splits = open_artifact(str(art / "tokens"), "tokens").manifest["stats"]["splits"]
    assert splits["train"]["documents"] == len(texts)
    assert splits["validation"]["documents"] == len(val)


def test_empty_validation_split(env, tmp_path, capsys):
    art = tmp_path / "art"
    code, err = run_cli(stage_args(env, "prepare", art, validation=[], corpus__validation_fraction=0), capsys)
    assert_refused(code, err, "prepare", "validation split", "corpus.validation")
    assert_unpublished(art / "tokens")


def test_a_file_in_two_splits_is_refused(env, tmp_path, capsys):
    """A test (or validation) file that is also a train file would put its tokens in the datastore."""
    art = tmp_path / "art"
    shared = sorted(env["train"].glob("*.txt"))[0]
    code, err = run_cli(stage_args(env, "prepare", art, corpus__test=json.dumps([str(shared)])), capsys)
    assert_refused(code, err, "prepare", "corpus.test[0]", f"{shared} is also a file of corpus.train")
    assert not (art / "tokens").exists()


@pytest.mark.parametrize("content", ["", "  \n\t\n"], ids=["empty", "whitespace"])
def test_empty_test_split(env, tmp_path, capsys, content):
    """A test split that is named but holds no token is refused (as an empty validation split is)."""
    art = tmp_path / "art"
    empty = write(tmp_path / "test.txt", content)
    code, err = run_cli(stage_args(env, "prepare", art, corpus__test=json.dumps([str(empty)])), capsys)
    assert_refused(code, err, "prepare", "corpus.test", "empty" if not content else "fewer than 2 tokens")
    assert_unpublished(art / "tokens")


# -- encode -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(env, tmp_path_factory):
    """A published token store made with the tiny model's tokenizer."""
    art = tmp_path_factory.mktemp("prepared") / "art"
    assert main(stage_args(env, "prepare", art)) == 0
    return art


def keys_dirs(art: Path) -> tuple[Path, Path]:
    return art / "keys" / "train", art / "keys" / "validation"


def test_encode_missing_model(env, prepared, tmp_path, capsys):
    model = str(tmp_path / "no_such_model")
    code, err = run_cli(stage_args(env, "encode", prepared, encode__model=model), capsys)
    assert_refused(code, err, "encode", f"encode.model: {model}: no such directory")
    assert_unpublished(*keys_dirs(prepared))


def test_encode_non_causal_lm(env, prepared, tmp_path, capsys):
    model = tmp_path / "t5"
    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=400).save_pretrained(model)
    code, err = run_cli(stage_args(env, "encode", prepared, encode__model=str(model)), capsys)
    assert_refused(code, err, "encode", str(model), "cannot load as a causal LM")
    assert_unpublished(*keys_dirs(prepared))


def test_encode_model_with_its_own_code(env, prepared, tmp_path, capsys):
    """A model whose config names its own code: refused naming runtime.trust_remote_code; the code never runs."""
    model = tmp_path / "custom"
    write(model / "config.json", json.dumps({"model_type": "my-custom", "auto_map": {
        "AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"}}))
    write(model / "configuration_my.py", f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    code, err = run_cli(stage_args(env, "encode", prepared, encode__model=str(model)), capsys)
    assert_refused(code, err, "encode", str(model), "needs its own code", "runtime.trust_remote_code=true")
    assert not (tmp_path / "ran").exists()
    assert_unpublished(*keys_dirs(prepared))


def test_encode_block_size_beyond_positions(env, prepared, capsys):
    code, err = run_cli(stage_args(env, "encode", prepared, encode__block_size=128, encode__stride=64), capsys)
    assert_refused(code, err, "encode", "encode.block_size: 128 exceeds the maximum positions (64)",
                   str(env["model"]))
    assert_unpublished(*keys_dirs(prepared))


def test_encode_stride_not_below_block_size(env, prepared, capsys):
    code, err = run_cli(stage_args(env, "encode", prepared, encode__block_size=32, encode__stride=32), capsys)
    assert_refused(code, err, "encode", "encode.stride", "smaller than block_size")
    assert_unpublished(*keys_dirs(prepared))


def test_encode_before_prepare(env, tmp_path, capsys):
    art = tmp_path / "art"
    code, err = run_cli(stage_args(env, "encode", art), capsys)
    assert_refused(code, err, "encode", str(art / "tokens"), "no artifact here")
    assert_unpublished(*keys_dirs(art))


def test_jsonl_decode_errors_give_the_file_offset(env, tmp_path, capsys):
    """Offsets in JSONL errors count from the start of the file, not of the line."""
    first = b'{"text": "first line"}\n'
    bad = write(tmp_path / "x.jsonl", first + b'{"text": "ok \xff"}\n')
    code, err = run_cli(stage_args(env, "prepare", tmp_path / "art", train=[bad]), capsys)
    assert_refused(code, err, "prepare", f"{bad} line 2: not valid UTF-8 at byte offset {len(first) + 13}")
    assert_unpublished(tmp_path / "art" / "tokens")


def test_failed_attempt_does_not_force_rebuild(env, tmp_path, capsys):
    """A prepare that failed on bad input finished no shard; the corrected rerun needs no --rebuild."""
    art = tmp_path / "art"
    code, err = run_cli(stage_args(env, "prepare", art, train=[tmp_path / "nothing*.txt"]), capsys)
    assert code == 1
    code, err = run_cli(stage_args(env, "prepare", art, **{"encode__model": "/nonexistent/model"}), capsys)
    assert_refused(code, err, "prepare", "encode.model: /nonexistent/model: no such directory")
    code, err = run_cli(stage_args(env, "prepare", art), capsys)
    assert code == 0, err
    assert open_artifact(str(art / "tokens"), "tokens").manifest["counts"]["train_tokens"] > 0


# -- faults of the operating system inside Beam workers -------------------------------------------

def test_a_write_beyond_the_file_size_limit_is_one_named_line(env, tmp_path):
    """`ulimit -f` (RLIMIT_FSIZE) below a token part's size: the worker process's write fails with EFBIG
    (Python ignores SIGXFSZ); the CLI prints one named line, no traceback, and publishes nothing."""
    words = np.random.default_rng(0).choice(WORDS, 40_000)  # random words: the part does not compress below the limit
    train = write(tmp_path / "big" / "train.txt", " ".join(words))
    limit = 24 * 1024  # above the tokenizer's files, below the train part's
    args = stage_args(env, "prepare", tmp_path / "art", train=[train])
    limited = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d)); "
               "from memforge.flows.cli import main; sys.exit(main(sys.argv[1:]))" % (limit, limit))
    run = subprocess.run([sys.executable, "-c", limited, *args], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 1, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("memforge ")]
    assert len(errors) == 1 and errors[0].startswith("memforge prepare: error: "), run.stderr
    assert "Traceback" not in run.stderr and "OSError" not in run.stderr
    part = tmp_path / "art" / "tokens" / "train" / "part-00000.parquet"
    assert f"{part}: File too large (EFBIG) while prepare built" in errors[0] and "ulimit -f" in errors[0]
    assert_unpublished(tmp_path / "art" / "tokens")
    assert not part.exists() and not list((tmp_path / "art").rglob(f"*{fs.TEMP_INFIX}*"))
    assert not (tmp_path / "art" / "tokens" / "_lease.json").exists()


# -- a huge line and corpus.max_bytes ------------------------------------------------------------

HUGE_LINE = b"alpha beta gamma delta " * 1_500_000  # 34.5 MB without a line break


def test_a_huge_line_beyond_max_bytes_is_refused_at_once(env, tmp_path, capsys):
    """One 34.5 MB line in a file and corpus.max_bytes 1 MB: nothing of the split fits, a named error in seconds
    (taking the file whole would keep prepare busy for minutes)."""
    train = write(tmp_path / "huge" / "train.txt", HUGE_LINE + b"\n")
    started = time.monotonic()
    code, err = run_cli(stage_args(env, "prepare", tmp_path / "art", train=[train], corpus__max_bytes=1_000_000),
                        capsys)
    assert_refused(code, err, "prepare", f"corpus.train: {train}: its first line is longer than "
                   "corpus.max_bytes (1,000,000 bytes)", "raise corpus.max_bytes")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "art" / "tokens").exists()


def test_max_bytes_cuts_a_file_at_a_line_end_and_says_what_it_left_out(env, tmp_path, capsys, caplog):
    """corpus.max_bytes is a hard cap: the file that reaches it is read up to its last line end inside it (here
    its short lines, not the 34.5 MB line after them), later files are left out, and both are logged."""
    lines = b"".join(f"line {i} alpha beta gamma\n".encode() for i in range(200))
    first = write(tmp_path / "capped" / "a.txt", lines + HUGE_LINE + b"\n")
    write(tmp_path / "capped" / "b.txt", lines)
    art = tmp_path / "art"
    started = time.monotonic()
    code, err = run_cli(stage_args(env, "prepare", art, train=[tmp_path / "capped" / "*.txt"],
                                   corpus__max_bytes=len(lines) + 1000) + ["--", "--direct_running_mode=in_memory"],
                        capsys)
    assert code == 0, err
    assert time.monotonic() - started < 60
    left_out = first.stat().st_size - len(lines)
    assert (f"corpus.train: corpus.max_bytes ({len(lines) + 1000:,} bytes) reached: {len(lines):,} bytes read; "
            f"left out {left_out:,} bytes of {first} and 1 more files ({len(lines):,} bytes)") in caplog.text
    tokens = open_artifact(str(art / "tokens"), "tokens").manifest
    train = tokens["stats"]["splits"]["train"]
    assert train["documents"] == 1 and train["tokens"] < 10_000  # the short lines of a.txt, none of b.txt
    assert tokens["stats"]["capped"] == {"corpus.train": {  # what the cap left out, in the manifest
        "max_bytes": len(lines) + 1000, "read_bytes": len(lines), "left_out_bytes": left_out + len(lines),
        "left_out_files": 1, "cut_file": str(first)}}
