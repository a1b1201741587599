"""Make helper modules in tests/ (e.g. toy_stage) importable from the test files."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
