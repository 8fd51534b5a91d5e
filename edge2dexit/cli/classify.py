"""`edge2dexit classify`: one or many texts, one line (or one JSON object) per text."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, TextIO

import typer
from tqdm import tqdm

from ..errors import Edge2DExitError, OutputError
from .app import app, friendly
from .inputs import Item, iter_items
from .options import BUNDLE, GPU_LAYERS, LEXICAL, MODEL, N_CTX, POLICY, THREADS, WIDTH, engine_settings


@app.command()
@friendly
def classify(
    inputs: List[str] = typer.Argument(..., help="Text files, directories of *.txt, tables (.csv .tsv .jsonl: one "
                                                 "text per row) or '-' for standard input."),
    bundle: Optional[Path] = BUNDLE,
    model: Optional[str] = MODEL,
    policy: Optional[str] = POLICY,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per text, one per line."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Append JSON lines to this file instead of printing."),
    resume: bool = typer.Option(False, "--resume", help="With --output: skip the texts the file already has a record of."),
    ordered: bool = typer.Option(False, "--ordered", help="Report in input order (else as each text finishes)."),
    text_column: str = typer.Option("text", "--text-column", help="Column (or JSON key) of the text in tables."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Column (or JSON key) of each row's id in "
                                                                      "tables (default: file:line)."),
    lines: bool = typer.Option(False, "--lines", help="Standard input holds one text per line (blank lines are "
                                                      "skipped)."),
    truncate: bool = typer.Option(False, "--truncate", help="Read only what fits the context instead of failing."),
    lexical: bool = LEXICAL,
    max_error: Optional[float] = typer.Option(None, "--max-error", help="Answer 'unsure' where the answer is not "
                                              "sure enough for the error among the answered texts to stay within "
                                              "this rate, in (0, 1); refused (exit 2) below what the bundle can "
                                              "promise, which the refusal says."),
    coverage: Optional[float] = typer.Option(None, "--coverage", help="Give the labels that cannot be ruled out: "
                                             "a set holding the true label this often, in (0, 1)."),
    explain: bool = typer.Option(False, "--explain", help="Say why: the sentences (and words) that weighed most "
                                                          "towards each answer."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Read each text alone, so that its result "
                                       "never depends on the texts read beside it (--width 1; see the README's "
                                       "Reliability section for what sharing decodes changes and what it saves)."),
    n_ctx: int = N_CTX,
    width: Optional[int] = WIDTH,
    threads: Optional[int] = THREADS,
    gpu_layers: Optional[int] = GPU_LAYERS,
) -> None:
    """Classify each text. A text that cannot be classified becomes an error record and the others go on; the
    exit code is then that of the first failure: 3 bad input, 4 model, 5 bundle, 6 text too long for the context."""
    from ..classifier import Classifier

    if resume and output is None:
        raise typer.BadParameter("--resume needs --output", param_hint="--resume")
    if deterministic and width not in (None, 1):
        raise typer.BadParameter("--deterministic reads one text at a time: leave --width out", param_hint="--width")
    done = _recorded_ids(output) if resume else set()
    items = [item for item in iter_items(inputs, text_column, id_column, lines) if item.id not in done]
    settings = engine_settings(n_ctx, 1 if deterministic else width, threads, gpu_layers)
    failure = 0
    with _sink(output) as sink, Classifier(bundle, model=model, policy=policy, settings=settings, truncate=truncate,
                                           lexical=lexical, max_error=max_error, coverage=coverage) as clf:
        n_layer = clf.engine.n_layer
        progress = tqdm(total=len(items), unit="text", disable=output is None or None, leave=False)
        for item, outcome in _outcomes(clf, items, ordered):
            progress.update()
            if isinstance(outcome, Edge2DExitError):
                failure = failure or outcome.exit_code
                typer.echo(f"edge2dexit: {item.id}: {outcome}", err=True)
                record = {"input": item.id, "error": str(outcome), "exit_code": outcome.exit_code}
            else:
                record = {"input": item.id, **outcome.to_dict()}
            if as_json or output is not None:
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            elif not isinstance(outcome, Edge2DExitError):
                sink.write(f"{item.id}: {_readable(outcome, n_layer)}\n")
                if explain:
                    sink.write(_why(outcome))
        progress.close()
    raise typer.Exit(failure)


def _readable(result, n_layer: int) -> str:
    """One result as a line: the label ("unsure" where the classifier abstained, its best guess beside it), where
    reading stopped, what it cost."""
    guess = f"{result.label} ({result.scores[result.label]:.2f})"
    answer = f"unsure (best guess {guess})" if result.abstained else guess
    if result.prediction_set is not None:
        answer += f"  could be: {', '.join(result.prediction_set)}"
    total = "?" if result.sentences_total is None else result.sentences_total
    where = ("the words alone decided" if result.lexical else
             f"read {result.sentences_read}/{total} sentences, exit at layer {result.exit_layer + 1}/{n_layer}"
             + (", the words weighed in" if result.answered_by == "llm+words" else ""))
    return (f"{answer}  {where} [{result.policy}], {result.token_layers} token-layers, {result.seconds:.2f} s"
            + ("  (truncated)" if result.truncated else ""))


def _why(result) -> str:
    """The answer's evidence as indented lines: the sentences that pushed hardest towards it, then the words, then
    where the head leaned before reading anything (the rest of the log-odds is what the other sentences took away)."""
    evidence = result.evidence
    lines = [f"  why {evidence.label} over {evidence.against} (log-odds {evidence.log_odds:+.2f}):"]
    lines += [f"    {s.contribution:+.2f}  sentence {s.index + 1}: {_quote(s.text)}" for s in evidence.deciding()]
    if evidence.ngrams:
        lines.append(f"    {evidence.words:+.2f}  the words: " + ", ".join(f"{ngram!r} {share:+.2f}"
                                                                         for ngram, share in evidence.ngrams))
    if round(evidence.constant, 2):
        lines.append(f"    {evidence.constant:+.2f}  before reading anything (the bias)")
    return "\n".join(lines) + "\n"


def _quote(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _outcomes(clf, items: list[Item], ordered: bool) -> Iterator[tuple[Item, object]]:
    """(item, Result or error) for every item: unreadable ones in their place, the others as the classifier
    finishes them (or, `ordered`, in input order)."""
    unreadable: list[int] = []

    def readable() -> Iterator[tuple[int, str]]:
        for index, item in enumerate(items):
            if item.error is not None:
                unreadable.append(index)
            else:
                yield index, item.text

    waiting: dict[int, object] = {}
    next_index = 0

    def emit(index: int, outcome: object) -> Iterator[tuple[Item, object]]:
        nonlocal next_index
        if not ordered:
            yield items[index], outcome
            return
        waiting[index] = outcome
        while next_index in waiting:
            yield items[next_index], waiting.pop(next_index)
            next_index += 1

    for index, outcome in clf.classify_many(readable()):
        while unreadable:
            bad = unreadable.pop(0)
            yield from emit(bad, items[bad].error)
        yield from emit(index, outcome)
    for bad in unreadable:
        yield from emit(bad, items[bad].error)


class _Sink:
    """Where records go, one at a time and flushed, so that an interrupted run leaves whole records behind. A write
    that fails (a full disk, a closed device) is an OutputError naming the place; a reader that went away (a
    closed pipe) is left to the CLI's rule."""

    def __init__(self, stream: TextIO, name: str):
        self.stream, self.name = stream, name
        self.failed = False  # a write failed: what it left in the stream's buffer cannot be written either

    def write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            self.failed = True
            raise OutputError(f"cannot write to {self.name}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Close the file; its last flush failing again after a failed write is that same failure, already said."""
        try:
            self.stream.close()
        except OSError as exc:
            if not self.failed:
                raise OutputError(f"cannot write to {self.name}: {exc.strerror or exc}") from None


@contextmanager
def _sink(output: Path | None) -> Iterator[_Sink]:
    """Standard output, or `output` opened for appending — starting on a fresh line if a crash cut the last record
    short — and checked before any text is read."""
    if output is None:
        yield _Sink(sys.stdout, "standard output")
        return
    try:
        cut_short = False
        if output.is_file() and output.stat().st_size:
            with open(output, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut_short = f.read(1) != b"\n"
        stream = open(output, "a", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write to {output}: {exc.strerror or exc}") from None
    sink = _Sink(stream, str(output))
    try:
        if cut_short:
            sink.write("\n")
        yield sink
    finally:
        sink.close()


def _recorded_ids(output: Path) -> set[str]:
    """Inputs the output file already has a result for (error records are retried)."""
    if not output.is_file():
        return set()
    ids = set()
    try:
        with open(output, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: its text is classified again
                if isinstance(record, dict) and "error" not in record and "input" in record:
                    ids.add(record["input"])
    except UnicodeDecodeError:
        raise OutputError(f"{output} is not a file of edge2dexit's records (it is not UTF-8): name "
                          "another output file to resume into") from None
    except OSError as exc:
        raise OutputError(f"cannot read {output} to resume: {exc.strerror or exc}") from None
    return ids
