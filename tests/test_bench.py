"""The benchmark's own measuring tools (the benchmark itself runs as `memforge bench`, never as a timed test)."""
import sys

import pytest

from flows import bench

ALLOCATE = "import subprocess, sys, time; b = bytearray({mb} << 20); b[::4096] = b'x' * len(b[::4096]); " \
           "time.sleep(0.5){child}"


def test_peak_rss_counts_the_whole_process_tree():
    """A parent holding 100 MB that starts a child holding 200 MB peaks above 300 MB in total."""
    child = "; subprocess.run([sys.executable, '-c', " + repr(ALLOCATE.format(mb=200, child="")) + "], check=True)"
    peak, seconds = bench._peak_tree_rss([sys.executable, "-c", ALLOCATE.format(mb=100, child=child)])
    assert peak > 300 * 2**20
    assert seconds >= 1.0


def test_peak_rss_reports_a_failing_command():
    with pytest.raises(RuntimeError, match="exited 3"):
        bench._peak_tree_rss([sys.executable, "-c", "raise SystemExit(3)"])


def test_table_aligns_figures():
    assert bench.table({"a": 1, "longer_name": 0.5}).splitlines() == ["a            1", "longer_name  0.5"]
