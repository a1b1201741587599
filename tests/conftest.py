"""Make helper modules in tests/ (e.g. toy_stage) importable from the test files; shared fixtures."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """The tiny demo chain up to a trained memory (built once for all training tests)."""
    from chain import build_chain

    return build_chain(tmp_path_factory.mktemp("chain"))
