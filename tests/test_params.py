"""params.yaml parsing: defaults, overrides, and errors that name the dotted key."""
from pathlib import Path

import pytest
import yaml

from memforge.flows.cli import main
from memforge.storage.errors import ParamsError
from memforge.storage.params import Params, load_params

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def test_repo_params_file_matches_defaults():
    """The shipped params.yaml is valid and spells out exactly the typed defaults."""
    shipped = load_params(REPO / "params.yaml")
    assert shipped == Params()
    assert set(yaml.safe_load((REPO / "params.yaml").read_text())) == set(Params.model_fields)


def test_set_overrides_are_typed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("targets:\n  k: 16\n  width: 8\n")
    params = load_params(path, ["targets.temperature=4", "encode.dtype=bfloat16", "corpus.train=[a.txt, 'b/*.jsonl']"])
    assert params.targets.k == 16 and params.targets.width == 8
    assert params.targets.temperature == 4.0
    assert params.encode.dtype == "bfloat16"
    assert params.corpus.train == ["a.txt", "b/*.jsonl"]
    assert params.section("targets")["temperature"] == 4.0


@pytest.mark.parametrize("override, key, reason", [
    ("targets.kk=3", "targets.kk", "unknown key"),
    ("nosuchsection.x=1", "nosuchsection", "unknown key"),
    ("targets.k=-1", "targets.k", "greater than 0"),
    ("decoder.n_layer=abc", "decoder.n_layer", "valid integer"),
    ("targets.temperature=0", "targets.temperature", "greater than 0"),
    ("targets.width=2000", "targets.width", "must not exceed k (1024)"),
    ("encode.stride=256", "encode.stride", "smaller than block_size (256)"),
    ("encode.dtype=int8", "encode.dtype", "float16"),
    ("targets.temperature=inf", "targets.temperature", "finite number"),  # a manifest must stay strict JSON
    ("memory.learning_rate=.nan", "memory.learning_rate", "finite number"),
    ("memory.nnodes=2", "memory.rdzv_endpoint", "nnodes is 2: name a HOST:PORT"),
    ("decoder.rdzv_endpoint=node0", "decoder.rdzv_endpoint", "should match pattern"),
    ("memory.nproc_per_node=0", "memory.nproc_per_node", "greater than 0"),
])
def test_bad_values_name_the_dotted_key(override, key, reason):
    with pytest.raises(ParamsError) as error:
        load_params(REPO / "params.yaml", [override])
    message = str(error.value)
    assert f"{key}: " in message and reason in message


def test_bad_file_names_file_and_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("targets:\n  k: -5\nindex:\n  nprobe: many\n")
    assert main(["ls", str(tmp_path), "--params", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err
    assert "targets.k: Input should be greater than 0 (got -5)" in err
    assert "index.nprobe: " in err and "'many'" in err


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ParamsError, match="expected dotted.key=value"):
        load_params(None, ["targets.k"])
    path = tmp_path / "broken.yaml"
    path.write_text("targets: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)
    with pytest.raises(ParamsError, match="cannot read params file"):
        load_params(tmp_path / "missing.yaml")


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("targets:\n  width: 16\n  k: 64\n  width: 32\n")
    with pytest.raises(ParamsError, match=rf"{path}: .*key 'width' is given twice, on lines 2 and 4"):
        load_params(path)
    with pytest.raises(ParamsError, match="key 'a' is given twice"):
        load_params(None, ["corpus.train={a: 1, a: 2}"])
