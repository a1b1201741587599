"""The Markdown report of a bench run: machine, commit and date, then per part a table of its figures, each with
the note of what it measures (from the part's ``NOTES``). Reports are generated, never edited by hand."""
from __future__ import annotations

from memforge.bench import machine
from memforge.bench.measure import Note, PartRun
from memforge.storage.errors import MemforgeError


def _cell(value) -> str:
    return str(value).replace("|", "\\|")


def _value(figure: str, figures: dict, note: Note) -> str:
    """The figure's value; a ratio's with both sides when the part reports them."""
    value = _cell(figures[figure])
    if note.ratio_of and all(side in figures for side in note.ratio_of):
        numerator, denominator = (_cell(figures[side]) for side in note.ratio_of)
        return f"{value} = {numerator} ÷ {denominator}"
    return value


def _what(note: Note) -> str:
    return note.what + (f" (`{note.ratio_of[0]}` ÷ `{note.ratio_of[1]}`)" if note.ratio_of else "")


def markdown(runs: dict[str, PartRun], notes: dict[str, dict[str, Note]]) -> str:
    """The report of the parts in ``runs`` (part name → its figures and seconds); ``notes``: part name → the
    part's notes by figure. Refuses a figure without a note."""
    missing = [f"{part}: {figure}" for part, ran in runs.items() for figure in ran.figures
               if figure not in notes[part]]
    if missing:
        raise MemforgeError(f"bench report: figures without a note in their part's NOTES: {', '.join(missing)}")
    command = "memforge bench" + "".join(f" --only {part}" for part in runs)
    lines = [f"### `{command}`", "", "| | |", "|---|---|", f"| Machine | {machine.machine()} |",
             f"| Commit | {machine.commit()} |", f"| Date | {machine.utc_now()} |",
             f"| Wall time | {sum(ran.seconds for ran in runs.values()):.0f} s |",
             f"| Load average at the end | {machine.load()} |"]
    for part, ran in runs.items():
        lines += ["", f"#### {part} ({ran.seconds:.0f} s)", "", "| Figure | Value | What it measures |",
                  "|---|---|---|"]
        lines += [f"| `{figure}` | {_value(figure, ran.figures, notes[part][figure])} | "
                  f"{_cell(notes[part][figure].what)} |" for figure in ran.figures]
    return "\n".join(lines) + "\n"


def notes_markdown(notes: dict[str, dict[str, Note]]) -> str:
    """Every part's figures and what each measures, one table per part (for the docs)."""
    lines = []
    for part, part_notes in notes.items():
        lines += [f"### {part}", "", "| Figure | What it measures |", "|---|---|"]
        lines += [f"| `{figure}` | {_cell(_what(note))} |" for figure, note in part_notes.items()]
        lines.append("")
    return "\n".join(lines)
