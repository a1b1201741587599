"""``memforge``: one subcommand per stage, plus run, ls, lineage and verify."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from memforge.flows import stages
from memforge.runs import run, run_stage
from memforge.storage import fs
from memforge.storage.artifact import REBUILD_OUTDATED
from memforge.storage.errors import MemforgeError, is_disk_full, store_unreachable
from memforge.storage.lineage import lineage, render
from memforge.storage.listing import find_artifacts, summarise
from memforge.storage.params import load_params, params_file
from memforge.storage.verify import verify

EXIT_PROBLEMS = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C

DESCRIPTION = """\
memforge builds MLP-memory training data: corpus tokens, encoder hidden-state keys,
a sharded FAISS index and kNN distillation targets, then trains and evaluates the memory.

Artifacts (under artifacts_dir, default ./artifacts):
  tokens            token store (Parquet)            <- prepare
  decoder           decoder LM (HF directory)         <- train-decoder
  keys/<split>      keys + values (Zarr)              <- encode
  index             FAISS index shards                <- index
  targets/<split>   neighbours + distributions (Zarr) <- targets
  memory            MLP memory (HF-style directory)   <- train-memory
  eval              metrics.json and plots            <- evaluate
Every artifact is a directory published by its _manifest.json (lineage, checksums).
Beam pipeline options go after `--`, e.g. memforge encode -- --runner=FlinkRunner."""


def _add_params_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", metavar="FILE", help="params file (default: ./params.yaml when present)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one param by dotted key, e.g. --set targets.k=128 (repeatable)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    _add_params_options(parser)
    parser.add_argument("--from", dest="first", choices=stages.stage_names(), help="first stage to run")
    parser.add_argument("--until", dest="last", choices=stages.stage_names(), help="last stage to run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memforge", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for item in stages.all_stages():
        sub = commands.add_parser(
            item.name, help=item.summary,
            description=f"{item.summary}.\nWrites: " + ", ".join(f"<artifacts_dir>/{o}" for o in item.outputs)
            + "\nA rerun resumes from completed shards; a rerun with other params/inputs is refused "
              "unless --rebuild.\nBeam pipeline options go after `--`.",
            formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_params_options(sub)
        replace = sub.add_mutually_exclusive_group()
        replace.add_argument("--rebuild", action="store_true",
                             help="discard whatever artifact is there and build it again")
        replace.add_argument("--replace-outdated", action="store_true",
                             help="replace an artifact built with other params, inputs or code (what dvc repro "
                                  "runs); an interrupted build of the same ones still resumes")
    run = commands.add_parser("run", help="run the build flow (all stages in order) with Prefect",
                              description="Run the Prefect flow memforge-build: " + " -> ".join(stages.stage_names())
                              + ". Stages whose inputs, params and code are unchanged come from Prefect's cache; "
                                "outdated artifacts are replaced; interrupted stages resume from their shards. "
                                "Without PREFECT_API_URL Prefect starts a temporary local server.")
    _add_run_options(run)
    run.add_argument("--rebuild", action="store_true", help="rebuild the selected stages' artifacts")
    serve = commands.add_parser("serve", help="serve the build flow as a scheduled Prefect deployment",
                                description="Serve memforge-build as the deployment memforge-build/<name> "
                                            "(Prefect's flow.serve): it runs on the schedule and whenever "
                                            "triggered (prefect deployment run memforge-build/<name>). "
                                            "Needs PREFECT_API_URL (e.g. a `prefect server start`).")
    _add_run_options(serve)
    serve.add_argument("--cron", help="schedule (default: flow.cron in params)")
    serve.add_argument("--name", default="memforge", help="deployment name (default: memforge)")
    ls = commands.add_parser("ls", help="list artifacts and their status",
                             description="List artifacts (published or incomplete) below DIR.")
    _add_params_options(ls)
    ls.add_argument("dir", nargs="?", metavar="DIR", help="directory or URL (default: artifacts_dir)")
    lin = commands.add_parser("lineage", help="show where an artifact came from",
                              description="Print the upstream tree of an artifact: kind, path, fingerprint, "
                                          "params, code version, build time and run ids of every ancestor.")
    lin.add_argument("path", metavar="PATH")
    lin.add_argument("--json", action="store_true", help="print the tree as JSON")
    ret = commands.add_parser("retemper", help="new distributions for another T (or smaller k) without searching",
                              description="Rebuild the distributions of a targets artifact from its stored "
                                          "neighbours for another temperature and optionally a smaller k and "
                                          "width; the result equals a fresh `memforge targets` run with those "
                                          "params and the source's targets.candidates, fingerprint included.")
    ret.add_argument("targets", metavar="TARGETS", help="a targets artifact, e.g. artifacts/targets/train")
    ret.add_argument("--temperature", type=float, required=True)
    ret.add_argument("--k", type=int, help="keep only the k nearest stored neighbours (default: all)")
    ret.add_argument("--width", type=int, help="the most tokens a row keeps, at most k (default: the source's "
                     "targets.width; its min_prob and mass stay)")
    ret.add_argument("--out", metavar="PATH", help="output artifact (default: TARGETS-T<T>-k<k>)")
    ret.add_argument("--rebuild", action="store_true", help="replace an existing different artifact at --out")
    exp = commands.add_parser("explain", help="show one row's query, neighbours and distribution as text",
                              description="Print the query's context and next token and, for each neighbour, "
                                          "its context, next token, distance and probability.")
    exp.add_argument("targets", metavar="TARGETS")
    exp.add_argument("--row", type=int, required=True)
    exp.add_argument("--context", type=int, default=24, help="tokens of context to show (default 24)")
    bench = commands.add_parser("bench", help="measure stage speed and memory against bare library loops",
                                description="Run benchmark parts and print a table of figures (ratios are "
                                            "stage / bare library, measured in one run on this machine).")
    bench.add_argument("--only", action="append",
                       choices=["encode", "encode_rss", "storage", "faiss", "memory", "dask", "scale", "gpu",
                                "gpu_faiss", "shape", "prepare", "train", "generate"],
                       help="run only this part (repeatable); scale (~40 min), gpu and gpu_faiss (its FAISS figures "
                            "alone; on a CUDA machine), shape "
                            "(the demo's memory trained once per keep rule), prepare (a 200 MB file), train "
                            "(train-memory on 1 and 2 ranks) and generate (generate()'s tokens/s, kNN-LM over 4 M "
                            "keys) run only when asked for")
    bench.add_argument("--json", action="store_true", help="print one JSON object of all figures")
    bench.add_argument("--workdir", help="directory for the temporary workspace (default: system temp)")
    bench.add_argument("--out", default="bench-out", help="directory for the files a part writes (scale: "
                       "scale.json, scale.png; default: bench-out)")
    bench.add_argument("--report", metavar="FILE", help="also write a Markdown report: machine, commit, date, and "
                       "per part its figures with what each measures")
    dvc = commands.add_parser("dvc-yaml", help="write dvc.yaml from the stage declarations",
                              description="Generate dvc.yaml (one DVC stage per memforge stage: its cmd, the code "
                                          "files and input artifacts it depends on, its content params, its "
                                          "outputs) and write it to FILE (default ./dvc.yaml).")
    dvc.add_argument("--output", default="dvc.yaml", metavar="FILE", help="where to write it (- for stdout)")
    ver = commands.add_parser("verify", help="re-check an artifact's checksums and invariants",
                              description="Re-check checksums, shapes, dtypes, shard markers and per-store "
                                          "invariants. Exit 0 when sound, 1 listing each problem.")
    ver.add_argument("path", metavar="PATH")
    return parser


def _cmd_stage(args, beam_args) -> int:
    rebuild = True if args.rebuild else REBUILD_OUTDATED if args.replace_outdated else False
    result = run_stage(args.command, args.params, overrides=args.overrides, rebuild=rebuild, beam_args=beam_args)
    if result is not None:
        print(result)
    if args.command == "evaluate" and result is not None:
        _print_report(result)
    return 0


def _print_report(eval_uri: str) -> None:
    """evaluate's table in the papers' form (valid and test perplexity per model, the chosen values)."""
    from memforge.training.paper_table import FILE

    uri = fs.join(eval_uri, FILE)
    if fs.exists(uri):
        filesystem, path = fs.filesystem(uri)
        with filesystem.open(path, "r", encoding="utf-8") as handle:
            print(handle.read(), end="")


def _cmd_run(args, beam_args) -> int:
    result = run(args.params, overrides=args.overrides, first=args.first, last=args.last, rebuild=args.rebuild,
                 beam_args=beam_args)
    for name, state in result["stages"].items():
        print(f"memforge run: {name}: {state}")
    print(f"memforge run: done; artifacts in {result['artifacts_dir']}")
    if result["metrics"]:
        print(f"memforge run: metrics in {result['metrics']}")
        _print_report(result["metrics"].rsplit("/", 1)[0])
    return 0


def _cmd_serve(args, beam_args) -> int:
    params = load_params(args.params, args.overrides)
    from memforge.flows.server import configured_api_url

    if not configured_api_url():  # a temporary server would never fire the schedule
        raise MemforgeError("serve needs a Prefect server that outlives this process: start one with "
                            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    from memforge.flows.build import build

    build.serve(name=args.name, cron=args.cron or params.flow.cron, parameters={
        "params_file": params_file(args.params), "overrides": args.overrides, "first": args.first, "last": args.last,
        "beam_args": beam_args})
    return 0


def _note(stats: dict) -> str:
    """The figure users look for first: index recall, decoder or evaluation perplexities."""
    if "recall_at_k" in stats:
        return f"recall@{stats['recall_k']}={stats['recall_at_k']}"
    if "validation_perplexity" in stats:
        return f"ppl={stats['validation_perplexity']:g} (unigram {stats['unigram_perplexity']:g})"
    if "perplexity" in stats:
        return "ppl " + " ".join(f"{name}={value:g}" for name, value in stats["perplexity"].items())
    return ""


def _cmd_ls(args, _beam_args) -> int:
    params = load_params(args.params, args.overrides)
    root = args.dir or params.artifacts_dir
    found = [summarise(uri) for uri in find_artifacts(root)]
    if not found:
        print(f"no artifacts under {fs.normalize(root)}")
        return 0
    rows = [("PATH", "KIND", "STATUS", "ROWS", "FINGERPRINT", "WHEN", "NOTE")]
    for item in found:
        rows.append((item["uri"], item["kind"], item["status"], "" if item["rows"] is None else str(item["rows"]),
                     (item["fingerprint"] or "")[:12], item["when"] or "", _note(item["stats"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _cmd_lineage(args, _beam_args) -> int:
    tree = lineage(fs.normalize(args.path))
    if args.json:
        print(json.dumps(tree, indent=2))
    else:
        print("\n".join(render(tree)))
    return EXIT_PROBLEMS if _has_error(tree) else 0


def _has_error(node: dict) -> bool:
    return "error" in node or any(_has_error(child) for child in node["inputs"])


def _cmd_verify(args, _beam_args) -> int:
    problems = verify(args.path)
    for problem in problems:
        print(f"PROBLEM {problem}")
    if problems:
        print(f"{fs.normalize(args.path)}: {len(problems)} problem(s)")
        return EXIT_PROBLEMS
    print(f"{fs.normalize(args.path)}: OK")
    return 0


def _cmd_dvc_yaml(args, _beam_args) -> int:
    from memforge.flows.dvc_yaml import render

    text = render(stages.all_stages(), "." if args.output == "-" else os.path.dirname(os.path.abspath(args.output)))
    if args.output == "-":
        print(text, end="")
    else:
        with open(args.output, "w") as handle:
            handle.write(text)
    return 0


def _cmd_bench(args, _beam_args) -> int:
    from memforge.bench import report
    from memforge.bench import run as bench

    runs = bench.run(args.only, args.workdir, args.out)
    figures = bench.flat(runs)
    print(json.dumps(figures) if args.json else bench.table(figures))
    if args.report:
        with open(args.report, "w") as handle:
            handle.write(report.markdown(runs, bench.NOTES))
    return 0


def _cmd_retemper(args, _beam_args) -> int:
    from memforge.pipelines.retemper import retemper

    print(retemper(args.targets, args.temperature, args.k, args.out, args.rebuild, args.width))
    return 0


def _cmd_explain(args, _beam_args) -> int:
    from memforge.pipelines.retemper import explain

    print(explain(args.targets, args.row, args.context))
    return 0


_COMMANDS = {"run": _cmd_run, "serve": _cmd_serve, "ls": _cmd_ls, "lineage": _cmd_lineage, "verify": _cmd_verify,
             "retemper": _cmd_retemper, "explain": _cmd_explain, "bench": _cmd_bench, "dvc-yaml": _cmd_dvc_yaml}


def _os_error(exc: OSError) -> str:
    """One line for an operating-system error: the path and the cause."""
    if is_disk_full(exc):
        where = exc.filename or "the output"
        return (f"{where}: no space left on its filesystem ({fs.free_space(str(where)) if exc.filename else exc}); "
                "free space and rerun")
    where = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None) or "a file"
    return f"{where}: {exc.strerror or exc}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``memforge`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, beam_args = argv[:split], argv[split + 1:]
    try:
        parser = build_parser()  # imports every stage, and with them FAISS (faiss_build names a missing one)
    except MemforgeError as exc:
        print(f"memforge: error: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("memforge").setLevel(logging.INFO)
    handler = _COMMANDS.get(args.command, _cmd_stage)
    try:
        code = handler(args, beam_args)
        sys.stdout.flush()  # a reader that went away shows here, inside the handling below
        return code
    except MemforgeError as exc:
        print(f"memforge {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except BrokenPipeError:  # `memforge ls | head`: the reader has what it wanted; stop without a word
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PROBLEMS
    except Exception as exc:
        cause = store_unreachable(exc)
        if cause is None and not isinstance(exc, OSError):
            raise
        message = _os_error(exc) if cause is None else \
            f"the object store cannot be reached ({cause}); rerun when it answers"
        print(f"memforge {args.command}: error: {message}", file=sys.stderr)
        return EXIT_PROBLEMS
    except KeyboardInterrupt:
        print(f"memforge {args.command}: interrupted; finished shards and checkpoints are kept, a rerun "
              "resumes", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
