"""The memforge CLI: help for every command, unimplemented stages, run, ls."""
import subprocess
import sys
from pathlib import Path

import pytest

from memforge.flows import stages
from memforge.flows.cli import main

COMMANDS = [*stages.stage_names(), "run", "ls", "lineage", "verify", "retemper", "explain", "bench", "dvc-yaml"]


@pytest.mark.unit
@pytest.mark.parametrize("command", COMMANDS)
def test_help_documents_each_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"memforge {command}" in out
    if command in stages.stage_names():
        assert "--params" in out and "--set" in out and "--rebuild" in out


@pytest.mark.unit
def test_console_script_is_installed():
    script = Path(sys.executable).parent / "memforge"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for command in COMMANDS:
        assert command in out
    assert "artifacts_dir" in out and "keys/<split>" in out


@pytest.mark.stage
def test_run_stops_at_the_first_failing_stage(tmp_path, capsys):
    code = main(["run", "--set", f"artifacts_dir={tmp_path}", "--from", "train-memory", "--until", "evaluate"])
    captured = capsys.readouterr()
    assert code == 1
    assert (f"memforge run: error: stage train-memory: train-memory reads targets/train: {tmp_path}/targets/train: "
            "no artifact here (path does not exist)") in captured.err
    assert not (tmp_path / "eval").exists() and "evaluate" not in captured.out


@pytest.mark.stage
def test_run_rejects_reversed_range(capsys):
    assert main(["run", "--from", "targets", "--until", "encode"]) == 1
    assert "--from targets comes after --until encode" in capsys.readouterr().err


@pytest.mark.unit
def test_beam_options_pass_through_after_double_dash(tmp_path, capsys):
    # Everything after `--` is for Beam and never reaches memforge's own parser.
    assert main(["encode", "--set", f"artifacts_dir={tmp_path}", "--", "--runner=FlinkRunner",
                 "--flink_master=host:8081"]) == 1
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "no artifact here" in err


@pytest.mark.unit
def test_runner_options():
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    from memforge.pipelines.runner import pipeline

    default, name = pipeline([], num_workers=3)
    direct = default.options.view_as(DirectOptions)
    assert name == "FnApiRunner(multi_processing)" and type(default.runner).__name__ == "FnApiRunner"
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("multi_processing", 3)
    threads, name = pipeline([], num_workers=2, running_mode="multi_threading")
    assert name == "FnApiRunner(multi_threading)"
    assert threads.options.view_as(DirectOptions).direct_running_mode == "multi_threading"
    in_memory, name = pipeline(["--direct_running_mode=in_memory"], num_workers=3, running_mode="multi_threading")
    assert in_memory.options.view_as(DirectOptions).direct_running_mode == "in_memory"
    assert name == "FnApiRunner(in_memory)"
    flink, name = pipeline(["--runner=FlinkRunner", "--flink_master=host:8081"], num_workers=3)
    assert name == "FlinkRunner"
    assert flink.options.get_all_options()["flink_master"] == "host:8081"
    assert isinstance(flink.options, PipelineOptions)


@pytest.mark.unit
def test_ls_empty_dir(tmp_path, capsys):
    assert main(["ls", str(tmp_path)]) == 0
    assert "no artifacts under" in capsys.readouterr().out


@pytest.mark.unit
def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "memforge.flows.cli", "verify", "/nonexistent/artifact"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "no artifact here" in result.stdout


@pytest.mark.unit
def test_exit_codes(tmp_path, capsys):
    """0 success, 1 a named error or a problem found, 2 a command line that does not parse (130: test_flows)."""
    assert main(["ls", str(tmp_path)]) == 0
    assert main(["verify", str(tmp_path / "missing")]) == 1
    assert main(["prepare", "--set", "targets.k=-1"]) == 1
    assert "targets.k" in capsys.readouterr().err
    for argv in (["no-such-command"], ["prepare", "--no-such-flag"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2


@pytest.mark.unit
def test_os_errors_are_one_named_line(tmp_path, capsys):
    """An artifacts_dir that is a file, lies below one, or below a path that cannot exist: the path and the cause,
    exit 1."""
    (tmp_path / "a-file").write_text("not a directory")
    corpus = tmp_path / "corpus.txt"  # within corpus.max_bytes: nothing is logged before the error
    corpus.write_text("alpha beta gamma\n")
    for where, named, cause in ((tmp_path / "a-file", tmp_path / "a-file", "Not a directory"),
                                (tmp_path / "a-file" / "below", tmp_path / "a-file", "Not a directory"),
                                ("/proc/no-such/dir", "/proc/no-such", "No such file or directory")):
        assert main(["prepare", "--set", f"artifacts_dir={where}", "--set", f"corpus.train=[{corpus}]"]) == 1
        err = capsys.readouterr().err
        assert f"memforge prepare: error: {named}" in err and cause in err and "Traceback" not in err


@pytest.mark.unit
def test_a_reader_that_goes_away_stops_the_output_quietly(tmp_path):
    """`memforge ls | head`: the pipe closes before memforge writes; no traceback, exit 1."""
    listing = subprocess.Popen([sys.executable, "-m", "memforge.flows.cli", "ls", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    listing.stdout.close()
    err = listing.stderr.read().decode()
    assert listing.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
