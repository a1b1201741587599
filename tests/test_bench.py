"""The benchmark's own measuring tools and its report (the benchmark itself runs as `memforge bench`, never as a
timed test)."""
import datetime
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from memforge.bench import measure, report
from memforge.bench import run as bench
from memforge.bench.measure import Note, PartRun

ALLOCATE = "import subprocess, sys, time; b = bytearray({mb} << 20); b[::4096] = b'x' * len(b[::4096]); " \
           "time.sleep(0.5){child}"


@pytest.mark.unit
def test_peak_rss_counts_the_whole_process_tree():
    """A parent holding 100 MB that starts a child holding 200 MB peaks above 300 MB in total."""
    child = "; subprocess.run([sys.executable, '-c', " + repr(ALLOCATE.format(mb=200, child="")) + "], check=True)"
    peak = measure.peak_tree_memory([sys.executable, "-c", ALLOCATE.format(mb=100, child=child)])
    assert peak.rss > 300 * 2**20
    assert peak.seconds >= 1.0


@pytest.mark.unit
def test_pss_counts_a_file_mapped_by_the_whole_tree_once(tmp_path):
    """Parent and child both map the same 200 MB file: their RSS sums count it twice, their PSS once."""
    data = tmp_path / "mapped.bin"
    data.write_bytes(b"x" * (200 << 20))
    touch = (f"import mmap, subprocess, sys, time; f = open({str(data)!r}, 'rb'); "
             "m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); s = sum(m[i] for i in range(0, len(m), 4096)); "
             "time.sleep(2.0){child}")  # long enough to be sampled on a loaded machine
    child = "; subprocess.run([sys.executable, '-c', " + repr(touch.format(child="")) + "], check=True)"
    peak = measure.peak_tree_memory([sys.executable, "-c", touch.format(child=child)])
    assert peak.rss > 400 * 2**20
    assert 200 * 2**20 < peak.pss < 300 * 2**20


@pytest.mark.unit
def test_peak_rss_reports_a_failing_command():
    with pytest.raises(RuntimeError, match="exited 3"):
        measure.peak_tree_memory([sys.executable, "-c", "raise SystemExit(3)"])


@pytest.mark.unit
def test_table_aligns_figures():
    assert bench.table({"a": 1, "longer_name": 0.5}).splitlines() == ["a            1", "longer_name  0.5"]


@pytest.mark.unit
def test_growth_exponent_and_the_scale_summary():
    """b of time ∝ N^b is fitted in log-log space; the summary divides each stage's time, memory and disk by
    what it is per, and compares the largest size with the smallest."""
    from memforge.bench import scale as bench_scale

    assert bench_scale.fit_exponent([1, 2, 4, 8], [3, 6, 12, 24]) == 1.0
    assert bench_scale.fit_exponent([1, 4, 16], [5, 10, 20]) == 0.5
    sizes = {}
    for scale in (1, 2, 4):
        rows = 1000 * scale
        stage = {"seconds": 2.0 * scale ** 1.5, "peak_rss_mb": 100.0 + scale, "peak_private_mb": 50.0 + scale,
                 "peak_pss_mb": 80.0 + 2 * scale, "disk_bytes": 10 * rows, "per": rows}
        sizes[scale] = {"datastore_rows": rows, "stages": {name: dict(stage) for name in bench_scale.STAGES},
                        "index_factory": "IVF64,PQ8", "index_codes_mb": 0.01 * scale, "workspace_disk_gb": 0.1,
                        "memory_loop_seconds_per_step": 0.02, "tokens_per_second": {"knnlm": 1.0}}
    table = bench_scale.summarise(sizes)
    targets = table["targets"]
    assert targets["b_time"] == 1.5
    assert targets["seconds_per"] == [0.002, float(f"{2 * 2 ** 1.5 / 2000:.4g}"), 0.004]
    assert targets["seconds_per_4x_vs_1x"] == 2.0 and targets["peak_rss_4x_vs_1x"] == round(104 / 101, 3)
    assert targets["disk_bytes_per"] == [10.0, 10.0, 10.0]
    assert table["index_peak_rss_minus_codes_mb"] == [101.0, 102.0, 104.0]
    assert targets["peak_private_4x_vs_1x"] == round(54 / 51, 3)
    assert targets["peak_pss_mb"] == [82.0, 84.0, 88.0] and targets["peak_pss_4x_vs_1x"] == round(88 / 82, 3)
    assert table["index_peak_pss_minus_codes_mb"] == [82.0, 84.0, 88.0]


@pytest.mark.unit
def test_synthetic_datastore_rows_are_real_rows_then_seeded_noisy_copies():
    from memforge.bench import knnlm_scale as bench_knnlm_scale

    rng = np.random.default_rng(0)
    real = rng.standard_normal((10, 4)).astype(np.float16)
    values = np.arange(10, dtype=np.int32)
    noise = np.full(4, 0.01, np.float32)
    keys, vals, source = bench_knnlm_scale.synthetic_rows(real, values, noise, 5, 25)
    assert np.array_equal(keys[:5], real[5:].astype(np.float32)) and np.array_equal(vals, np.arange(5, 25) % 10)
    assert np.array_equal(source, np.arange(5, 25) % 10)
    copies = keys[5:] - real[np.arange(10, 25) % 10].astype(np.float32)
    assert 0 < np.abs(copies).max() < 0.1
    again, _, _ = bench_knnlm_scale.synthetic_rows(real, values, noise, 5, 25)
    assert np.array_equal(keys, again)  # seeded by the first row: any size's rows are the same rows


@pytest.mark.unit
def test_synthetic_rows_join_their_sources_lists_and_real_rows_are_added_as_faiss_adds_them():
    """Real rows added with their nearest centroid give the index ``index.add`` gives; noisy copies land in
    their source's list, so every list grows in proportion to its real size."""
    import faiss

    from memforge.bench import knnlm_scale as bench_knnlm_scale

    rng = np.random.default_rng(1)
    real = rng.standard_normal((600, 8)).astype(np.float32)
    values = np.arange(600, dtype=np.int32)
    plain, real_only, grown = (faiss.index_factory(8, "IVF16,PQ4") for _ in range(3))
    for index in (plain, real_only, grown):
        index.train(real)
        faiss.extract_index_ivf(index).nprobe = 4
    plain.add(real)
    lists = bench_knnlm_scale.real_lists(grown, real)
    bench_knnlm_scale.add_to_lists(real_only, real, lists)
    assert [np.array_equal(a, b) for a, b in zip(plain.search(real[:50], 5),
                                                  real_only.search(real[:50], 5))] == [True, True]
    for start in range(0, 1800, 500):  # blocks straddle the end of the real rows
        keys, _, source = bench_knnlm_scale.synthetic_rows(real, values, np.full(8, 0.01, np.float32), start,
                                                           min(1800, start + 500))
        bench_knnlm_scale.add_to_lists(grown, keys, lists[source])
    assert grown.ntotal == 1800
    sizes = [[faiss.extract_index_ivf(i).invlists.list_size(n) for n in range(16)] for i in (plain, grown)]
    assert [3 * n for n in sizes[0]] == sizes[1] and sum(sizes[0]) == 600


@pytest.mark.unit
def test_the_synthetic_datastore_grows_in_steps_and_reads_back_its_rows(tmp_path, monkeypatch):
    """Grown to 1000 then 2000 rows (blocks of 300), the datastore's index and its row files hold the synthetic
    rows of those blocks; a real key's exact nearest neighbour is itself, at distance 0."""
    from memforge.bench import knnlm_scale as bench_knnlm_scale

    monkeypatch.setitem(bench_knnlm_scale.REFERENCE, "nlist", 16)
    monkeypatch.setattr(bench_knnlm_scale, "ADD_BLOCK", 300)
    real = np.random.default_rng(2).standard_normal((16 * 39, 8)).astype(np.float16)
    values = np.arange(len(real), dtype=np.int32)
    datastore = bench_knnlm_scale.SyntheticDatastore(real, values, str(tmp_path), 2000)
    datastore.grow(1000)
    datastore.grow(2000)
    assert datastore.index.ntotal == 2000 and datastore.factory == "IVF16,PQ4"
    blocks = [bench_knnlm_scale.synthetic_rows(real, values, datastore.noise, start, min(stop, start + 300))
              for stop, starts in ((1000, range(0, 1000, 300)), (2000, range(1000, 2000, 300))) for start in starts]
    rows = datastore.rows()
    assert np.array_equal(rows.key_rows(0, 2000), np.concatenate([keys for keys, _, _ in blocks]).astype(np.float16))
    assert np.array_equal(rows.values, np.concatenate([vals for _, vals, _ in blocks]))
    queries = real[:5].astype(np.float32)
    dists, ids, found = rows.neighbours(queries, *datastore.searcher.search(queries, 50), exact=True, k=1)
    assert ids.ravel().tolist() == [0, 1, 2, 3, 4] and not dists.any() and found.ravel().tolist() == [0, 1, 2, 3, 4]


@pytest.mark.unit
def test_knnlm_fit_extrapolates_a_linear_cost_and_labels_it():
    """kNN-LM's seconds per token = a + c·N is recovered from exact points; the extrapolation uses it."""
    from memforge.bench import knnlm_scale as bench_knnlm_scale

    a, c = 2e-4, 1e-11
    series = [{"datastore_rows": n, "tokens_per_second": {"knnlm": 1 / (a + c * n), "memory": 1e4, "decoder": 2e4}}
              for n in (2 ** 20, 2 ** 22, 2 ** 24)]
    fitted = bench_knnlm_scale.fit(series)
    assert np.isclose(fitted["knnlm_seconds_per_token"]["fixed"], a, rtol=1e-3)
    assert np.isclose(fitted["knnlm_seconds_per_token"]["per_key"], c, rtol=1e-3)
    at_100m = fitted["extrapolation (not measured)"]["100M"]
    assert np.isclose(at_100m["memory_vs_knnlm"], 1e4 * (a + c * 1e8), rtol=1e-2)
    assert fitted["memory_tokens_per_second_spread"] == [0.0, 0.0]
    assert fitted["memory_per_decoder_spread"] == [0.0, 0.0]
    drifting = [{**p, "tokens_per_second": {**p["tokens_per_second"], "memory": 1e4 * f, "decoder": 2e4 * f}}
                for p, f in zip(series, (1.0, 0.8, 1.2))]  # the machine slows both passes alike
    drifted = bench_knnlm_scale.fit(drifting)
    assert drifted["memory_tokens_per_second_spread"] == [-0.2, 0.2]
    assert drifted["memory_per_decoder_spread"] == [0.0, 0.0]


@pytest.mark.unit
def test_memory_part_refuses_before_any_part_runs_when_the_demo_is_missing(tmp_path, monkeypatch):
    from memforge.storage.errors import MemforgeError

    monkeypatch.chdir(tmp_path)  # no params.yaml, no artifacts: `memforge run` never ran here
    ran = []
    monkeypatch.setitem(bench.PARTS, "storage", lambda ws: ran.append("storage") or {})
    with pytest.raises(MemforgeError, match=r"lacks the demo's tokens, decoder, keys/validation, index, memory"):
        bench.run(only=["storage", "memory"], workdir=str(tmp_path / "work"))
    assert ran == []  # refused up front, not after the long parts


@pytest.mark.unit
def test_each_part_prints_its_figures_as_it_ends(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.PARTS, "storage", lambda ws: {"keys_bytes_per_token": 118.57})

    def failing(ws):
        raise RuntimeError("disk full")

    monkeypatch.setitem(bench.PARTS, "dask", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        bench.run(only=["storage", "dask"], workdir=str(tmp_path))
    assert 'memforge bench: storage: {"keys_bytes_per_token": 118.57}' in capsys.readouterr().err


@pytest.mark.unit
def test_round_orders_rotate_the_variants_and_end_with_the_last():
    orders = measure.round_orders(3, 3)
    assert all(sorted(order) == [0, 1, 2] for order in orders)
    assert [sorted(order[position] for order in orders) for position in range(3)] == [[0, 1, 2]] * 3
    assert orders[-1] == [0, 1, 2]
    assert measure.round_orders(2, 1) == [[0, 1]] and measure.round_orders(1, 1) == [[0]]


@pytest.mark.unit
def test_every_ratio_names_two_figures_of_its_own_part():
    for part, notes in bench.NOTES.items():
        assert notes, part
        for figure, note in notes.items():
            assert note.what and "\n" not in note.what, (part, figure)
            assert note.ratio_of is None or set(note.ratio_of) <= set(notes), (part, figure, note.ratio_of)
    assert set(bench.NOTES) == set(bench.PARTS)


@pytest.mark.unit
def test_report_shows_a_ratio_with_both_sides_and_refuses_a_figure_without_a_note():
    notes = {"p": {"a_s": Note("seconds of a"), "b_s": Note("seconds of b"),
                   "b_vs_a": Note("a seconds ÷ b seconds", ("a_s", "b_s"))}}
    text = report.markdown({"p": PartRun({"a_s": 3.0, "b_s": 1.5, "b_vs_a": 2.0}, 4.2)}, notes)
    assert "| `b_vs_a` | 2.0 = 3.0 ÷ 1.5 | a seconds ÷ b seconds |" in text
    assert "#### p (4 s)" in text and "### `memforge bench --only p`" in text
    from memforge.storage.errors import MemforgeError

    with pytest.raises(MemforgeError, match="p: c_s"):
        report.markdown({"p": PartRun({"a_s": 3.0, "c_s": 1.0}, 1.0)}, notes)


@pytest.mark.stage
def test_bench_report_of_the_storage_part(tmp_path, monkeypatch, capsys):
    """`memforge bench --only storage --report FILE` over a tenth of the bench's corpus: the report states
    machine, commit and date, and every figure the run printed, with its note."""
    from memforge.bench import workspace
    from memforge.flows.cli import main
    from memforge.storage.provenance import code_version

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(workspace, "CORPUS_BYTES", workspace.CORPUS_BYTES // 10)
    before = datetime.datetime.now(datetime.timezone.utc).replace(second=0, microsecond=0)
    assert main(["bench", "--only", "storage", "--json", "--workdir", str(tmp_path / "work"),
                 "--report", "report.md"]) == 0
    printed = json.loads(capsys.readouterr().out)
    text = Path("report.md").read_text()
    assert set(printed) == set(bench.NOTES["storage"])
    for figure, value in printed.items():
        assert f"| `{figure}` | {value} | {bench.NOTES['storage'][figure].what} |" in text
    assert re.search(r"\| Machine \| .+, \d+ logical cores .*GiB memory, GPU: ", text)
    assert re.search(r"\| Load average at the end \| (\d+\.\d\d, ){2}\d+\.\d\d \(1, 5, 15 min\) on \d+ logical", text)
    version = code_version(())
    if version["git_sha"]:
        assert f"| Commit | {version['git_sha'][:7]}" in text
    date = datetime.datetime.strptime(re.search(r"\| Date \| (.+) UTC \|", text).group(1), "%Y-%m-%d %H:%M")
    assert before <= date.replace(tzinfo=datetime.timezone.utc) <= datetime.datetime.now(datetime.timezone.utc)
    assert not list((tmp_path / "work").iterdir())  # the scratch workspace is removed


BENCHMARKS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


@pytest.mark.unit
def test_the_benchmarks_page_explains_figures_from_the_notes_and_shows_whole_reports():
    """docs/benchmarks.md: its figure notes are the parts' NOTES as generated; each report on it is a whole
    generated report (machine, commit, date, then tables of figures)."""
    page = BENCHMARKS_PAGE.read_text()
    assert report.notes_markdown(bench.NOTES) in page
    reports = page.split("## Latest reports", 1)[1].split("### `memforge bench")[1:]
    assert reports
    for text in reports:
        assert re.search(r"\| Machine \| .+ \|\n\| Commit \| \w{7}.* \|\n\| Date \| \d{4}-\d\d-\d\d \d\d:\d\d UTC \|",
                         text)
        figures = re.findall(r"^\| `(\w+)` \| ", text, flags=re.MULTILINE)
        assert figures and all(any(f in notes for notes in bench.NOTES.values()) for f in figures)


@pytest.mark.stage
def test_the_shape_part_measures_each_keep_rule_on_a_tiny_chain(chain, tmp_path):
    """The shape part's measurement over a copy of the tiny chain's tokens, decoder, keys and index (up to date
    there, so not rebuilt), at k 40: every figure its notes name, each rule's rows within its rule, and a
    floor at the reference's 1e-8 (floor8) keeping at least the mass the top 32 keep."""
    import shutil

    from memforge.bench import shape
    from memforge.storage.params import load_params

    from chain import overrides

    art = tmp_path / "art"
    for name in ("tokens", "decoder", "keys", "index"):
        shutil.copytree(chain["art"] / name, art / name, symlinks=True)
    params = load_params(chain["root"] / "params.yaml", [*overrides(chain["args"]), f"artifacts_dir={art}",
                                                        "targets.k=40", "targets.width=null"])
    figures = shape.measure_rules(params)
    assert set(figures) == set(shape.NOTES)
    assert figures["shape_k"] == 40 and figures["width32_kept_tokens_max"] <= 32 < 40
    assert figures["floor8_kept_mass_median"] >= figures["width32_kept_mass_median"]
    assert figures["floor8_kept_tokens_max"] >= figures["floor4_kept_tokens_max"]
    assert all(figures[f"{rule}_memory_dev_perplexity"] > 1 for rule in shape.RULES)


@pytest.mark.stage
def test_the_train_part_trains_one_rank_and_two_on_the_same_batches(chain, tmp_path, monkeypatch):
    """The train part's measurement over the tiny chain's targets at a small memory and batch: both runs train
    through `memforge train-memory`, every figure has its note, and the two loss curves agree."""
    from memforge.bench import train
    from memforge.storage.params import load_params

    from chain import overrides

    monkeypatch.setattr(train, "MEMORY", {**train.MEMORY, "width": 64, "hidden_mult": 2, "depth": 2})
    monkeypatch.setattr(train, "BATCHES", {64: 6})
    params = load_params(chain["root"] / "params.yaml", overrides(chain["args"]))
    figures = train.measure_scaling(params, tmp_path)
    notes = {**train.NOTES, **train._batch_notes(64)}
    assert set(figures) <= set(notes) and figures["train_gpus"] == 0
    assert figures["train_cpu_b64_1_rank_rows_per_s"] > 0 and figures["train_cpu_b64_2_ranks_rows_per_s"] > 0
    rows = json.loads((chain["art"] / "targets" / "train" / "_manifest.json").read_text())["counts"]["rows"]
    assert figures["train_cpu_b64_loss_gap"] < 1e-4 and figures["train_rows"] == rows
