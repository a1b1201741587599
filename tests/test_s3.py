"""Every stage with ``artifacts_dir`` and the corpus on an S3 object store (an S3-compatible server on
127.0.0.1, through s3fs): the whole chain, then ls, lineage and verify, and verify catching a deleted object."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

from memforge.flows.cli import main
from memforge.flows.server import stop_process_group
from memforge.flows.stages import stage_names

from chain import stage_args
from moto_server import CREDENTIALS, moto_server
from tiny_lm import write_corpus

pytestmark = pytest.mark.integration

BUCKET = "memforge-test"


def test_the_whole_chain_on_s3(chain, s3_server, tmp_path, capsys, monkeypatch):
    """... and each index file is downloaded at most once by this process (index's recall, targets' search
    threads and evaluate share one local copy); a decoder on S3 named by URL as encode.model encodes the
    same keys, its Beam worker processes fetching it from the URL themselves."""
    import s3fs

    downloads: Counter[str] = Counter()
    download = s3fs.S3FileSystem._get_file

    async def counted(self, rpath, lpath, **kwargs):
        downloads[rpath] += 1
        return await download(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", counted)
    s3fs.S3FileSystem.clear_instance_cache()  # cached instances bound their sync get_file to the old method
    s3 = s3fs.S3FileSystem(use_listings_cache=False)
    s3.mkdir(BUCKET)
    s3.put(str(chain["root"] / "corpus") + "/", f"{BUCKET}/corpus/", recursive=True)
    art = f"s3://{BUCKET}/art"
    args = stage_args(chain["root"], art, **{"corpus.train": f"[s3://{BUCKET}/corpus/train/*.txt]",
                                             "corpus.validation": f"[s3://{BUCKET}/corpus/validation/*.txt]"})
    for stage in stage_names():  # Beam in this process: the worker pool's own S3 reads are encode's, below
        assert main([stage, *args, "--", "--direct_running_mode=in_memory"]) == 0, stage
    for role in ("tokens", "keys/train", "keys/validation"):  # the same data as on a local disk
        on_s3 = json.loads(s3.cat(f"{BUCKET}/art/{role}/_manifest.json"))
        local = json.loads((chain["art"] / role / "_manifest.json").read_text())
        assert on_s3["files"] == local["files"], role
    capsys.readouterr()
    assert main(["ls", *args]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("tokens", "keys/train", "index", "targets/train", "memory", "eval"))
    assert main(["lineage", f"{art}/eval"]) == 0
    assert "memory" in capsys.readouterr().out
    assert main(["retemper", f"{art}/targets/train", "--temperature", "2", "--out", f"{art}/targets/train-T2"]) == 0
    assert main(["verify", f"{art}/targets/train-T2"]) == 0
    capsys.readouterr()
    assert main(["explain", f"{art}/targets/train", "--row", "3"]) == 0
    assert capsys.readouterr().out.startswith("train row 3")
    assert main(["verify", f"{art}/keys/train"]) == 0
    keys = json.loads(s3.cat(f"{BUCKET}/art/keys/train/_manifest.json"))
    victim = sorted(name for name in keys["files"] if "/c/" in name)[0]
    s3.rm(f"{BUCKET}/art/keys/train/{victim}")
    capsys.readouterr()
    assert main(["verify", f"{art}/keys/train"]) == 1
    assert victim in capsys.readouterr().out
    index_files = {path.rsplit("/", 1)[-1]: count for path, count in downloads.items() if "/art/index/" in path}
    print("downloads of index files by this process:", index_files)
    assert {"values.npy", "keys.npy"} <= index_files.keys() and set(index_files.values()) == {1}

    local = tmp_path / "art"
    local.mkdir()
    os.symlink(chain["art"] / "tokens", local / "tokens")
    assert main(["encode", *stage_args(chain["root"], local, **{"encode.model": f"{art}/decoder/model"})]) == 0
    for split in ("train", "validation"):
        encoded = json.loads((local / "keys" / split / "_manifest.json").read_text())
        assert encoded["files"] == json.loads((chain["art"] / "keys" / split / "_manifest.json").read_text())["files"]
    s3fs.S3FileSystem.clear_instance_cache()  # no instance stays bound to the counting method


def test_encode_killed_on_s3_resumes_to_the_same_files(chain, s3_server, caplog):
    """SIGKILL of `memforge encode` (its whole process group) writing to S3 once a shard is durable; the rerun
    skips the done shards and the key stores equal the uninterrupted local run's, file for file."""
    import s3fs

    from memforge.storage.verify import verify

    from crash import kill_when

    s3 = s3fs.S3FileSystem(use_listings_cache=False)
    s3.mkdir(f"{BUCKET}-resume")
    art = f"s3://{BUCKET}-resume/art"
    for name in ("tokens", "decoder"):
        s3.put(str(chain["art"] / name) + "/", f"{BUCKET}-resume/art/{name}/", recursive=True)
    args = ["encode", *stage_args(chain["root"], art), "--set", "encode.batch_size=1"]
    markers = f"{BUCKET}-resume/art/keys/train/_shards"
    code, log = kill_when(args, lambda: bool(s3.exists(markers) and s3.ls(markers)), timeout=120)
    assert code == -9, log[-3000:]
    done = len(s3.ls(markers))
    assert not s3.exists(f"{BUCKET}-resume/art/keys/train/_manifest.json")
    with caplog.at_level("INFO", logger="memforge"):
        assert main(args) == 0
    skipped = int(re.search(r"encode: train: \d+ rows in \d+ shards; (\d+) shards already done", caplog.text)[1])
    assert skipped >= done > 0
    for split in ("train", "validation"):
        resumed = json.loads(s3.cat(f"{BUCKET}-resume/art/keys/{split}/_manifest.json"))
        assert resumed["files"] == json.loads((chain["art"] / "keys" / split / "_manifest.json").read_text())["files"]
        assert verify(f"{art}/keys/{split}") == []


def test_targets_search_a_merged_on_disk_index_that_lies_on_s3(chain, s3_server, tmp_path):
    """An IVF-PQ index merged on disk (built locally, where FAISS writes the merged lists), copied to S3 with
    the rest of the chain: targets there search it through the local cache (merged.index and merged.ivfdata
    fetched once) and write the same files as the local run."""
    import s3fs

    from memforge.storage import local_cache

    index_settings = {"index.factory": "IVF16,PQ8", "index.nprobe": 4, "index.train_points_per_list": 39}
    local = tmp_path / "art"
    local.mkdir()
    for name in ("tokens", "keys"):
        os.symlink(chain["art"] / name, local / name)
    for stage in ("index", "targets"):
        assert main([stage, *stage_args(chain["root"], local, **index_settings)]) == 0
    assert json.loads((local / "index" / "_manifest.json").read_text())["stats"]["merge"] == "ondisk"
    s3 = s3fs.S3FileSystem(use_listings_cache=False)
    s3.mkdir(f"{BUCKET}-merged")
    for name, source in (("tokens", chain["art"]), ("keys", chain["art"]), ("index", local)):
        s3.put(str(source / name) + "/", f"{BUCKET}-merged/art/{name}/", recursive=True)
    art = f"s3://{BUCKET}-merged/art"
    assert main(["targets", *stage_args(chain["root"], art, **index_settings)]) == 0
    for split in ("train", "validation"):
        on_s3 = json.loads(s3.cat(f"{BUCKET}-merged/art/targets/{split}/_manifest.json"))
        assert on_s3["files"] == json.loads((local / "targets" / split / "_manifest.json").read_text())["files"]
    assert [local_cache.fetches[f"{art}/index/{name}"] for name in ("merged.index", "merged.ivfdata")] == [1, 1]


def test_an_object_store_killed_mid_prepare_is_one_named_line(tmp_path):
    """A moto server of this test's own is killed once prepare has planned its shards on it: one named line
    (the artifact, the client's cause), exit 1; the lease's release fails too, which is logged and never masks
    the stage's error."""
    import s3fs

    write_corpus(tmp_path / "corpus" / "train", 3, 100, seed=1)
    write_corpus(tmp_path / "corpus" / "validation", 1, 60, seed=2)
    (tmp_path / "p.yaml").write_text("{}\n")
    with moto_server(tmp_path / "moto.log") as (server, endpoint):
        s3 = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, use_listings_cache=False,
                               skip_instance_cache=True)
        s3.mkdir("dying")
        s3.put(str(tmp_path / "corpus") + "/", "dying/corpus/", recursive=True)
        settings = {"artifacts_dir": "s3://dying/art", "corpus.train": "[s3://dying/corpus/train/*.txt]",
                    "corpus.validation": "[s3://dying/corpus/validation/*.txt]", "decoder.vocab_size": 320,
                    "runtime.num_workers": 1}
        args = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
        env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"}
        run = subprocess.Popen([sys.executable, "-m", "memforge.flows.cli", "prepare", "--params",
                                str(tmp_path / "p.yaml"), *args], env=env, cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while not s3.exists("dying/art/tokens/_plan.json"):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1]
            time.sleep(0.05)
        stop_process_group(server)
        _, err = run.communicate(timeout=240)
    assert run.returncode == 1, err
    named = [line for line in err.splitlines() if line.startswith("memforge ")]
    assert len(named) == 1 and err.rstrip().endswith(named[0]), err
    assert named[0].startswith("memforge prepare: error: s3://dying/art/tokens: the object store stopped "
                               "answering while prepare ran (Could not connect to the endpoint URL: "
                               f'"{endpoint}/dying'), named[0]
    failed_request = named[0].split('"')[1]  # an object of the artifact, or a listing of its prefix
    assert "art/tokens" in failed_request or "art%2Ftokens" in failed_request, named[0]
    assert "_lease.json: the lease was not released (EndpointConnectionError" in err
