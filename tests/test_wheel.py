"""The built wheel holds one import name and works installed (not editable) in a fresh environment, from a
folder with its own ``storage`` and ``training`` packages."""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from tiny_lm import write_corpus
from working_tree import copy_working_tree

pytestmark = pytest.mark.integration

USER_SCRIPT = """
import json, sys
import memforge, memforge.storage.artifact, storage, training

corpus, art, chain = sys.argv[1:4]
overrides = [f"artifacts_dir={art}", f"corpus.train=[{corpus}/train/*.txt]",
             f"corpus.validation=[{corpus}/validation/*.txt]", "decoder.vocab_size=300"]
published = memforge.run_stage("prepare", overrides=overrides, beam_args=["--direct_running_mode=in_memory"])
tokens = memforge.open_artifact(f"{art}/tokens", kind="tokens")
targets = memforge.read_targets(f"{chain}/targets/train")
keys = memforge.read_keys(f"{chain}/keys/train")
print(json.dumps({
    "memforge": memforge.__file__, "storage_file": memforge.storage.artifact.__file__,
    "user_storage": storage.MARK, "user_training": training.MARK,
    "published": str(published), "tokens_problems": tokens.verify(), "tokens_rows": tokens.manifest["counts"],
    "lineage_kind": memforge.lineage(f"{chain}/targets/train")["kind"],
    "targets_rows": len(targets), "targets_table_rows": targets.to_arrow(0, 10).num_rows,
    "keys_rows": len(keys), "batch": list(next(iter(targets.iterable()))["tokens"].shape)}))
"""


def test_wheel_installs_one_package_and_its_api_works_beside_user_packages(chain, tmp_path):
    sources = copy_working_tree(tmp_path / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(sources)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("memforge_mlp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops - {"memforge"} == {f"{wheel.name.split('-py')[0]}.dist-info"}, tops
    for package in ("storage", "pipelines", "training", "flows", "bench"):
        assert f"memforge/{package}/__init__.py" in names, package
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "memforge = memforge.flows.cli:main" in entry_points

    # A fresh environment: memforge from the wheel, its dependencies seen from this test's environment.
    env_dir = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    user = tmp_path / "research"
    for package in ("storage", "training"):
        (user / package).mkdir(parents=True)
        (user / package / "__init__.py").write_text(f"MARK = 'the user\\'s own {package}'\n")
    (user / "build_targets.py").write_text(textwrap.dedent(USER_SCRIPT))
    write_corpus(user / "corpus" / "train", 4, 120, seed=1)
    write_corpus(user / "corpus" / "validation", 2, 60, seed=2)
    done = subprocess.run([str(python), "build_targets.py", str(user / "corpus"), str(user / "art"),
                           str(chain["art"])], cwd=user, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["memforge"].startswith(str(site)) and found["storage_file"].startswith(str(site / "memforge"))
    assert found["user_storage"] == "the user's own storage" and found["user_training"] == "the user's own training"
    assert found["tokens_problems"] == [] and found["tokens_rows"]["train_tokens"] > 0
    assert found["lineage_kind"] == "targets" and found["targets_rows"] == found["keys_rows"] > 10
    assert found["targets_table_rows"] == 10 and found["batch"] == [8]
    console = env_dir / "bin" / "memforge"
    verified = subprocess.run([str(console), "verify", str(user / "art" / "tokens")], capture_output=True, text=True,
                              timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stderr[-2000:]
