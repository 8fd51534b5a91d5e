"""PNG figures of an evaluation: accuracy per (sentences read × layer) like the paper's Figure 1, each
policy's accuracy/cost frontier, and where documents exit. matplotlib is imported here only (the `eval`
extra); nothing else in the package needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InputError
from .evaluate import Evaluation
from ..policies import policy_names


MIN_DOCUMENTS = 10


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("figures need matplotlib: pip install 'edge2dexit[eval]'") from None
    return plt


def write_figures(ev: Evaluation, calibration: Mapping[str, Any], directory: str | Path) -> list[Path]:
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    shown = max(1, int(np.sum(ev.prefix_grid_docs >= MIN_DOCUMENTS)))  # longer prefixes: too few documents
    image = ax.imshow(ev.prefix_grid[:shown].T, origin="lower", aspect="auto", cmap="viridis",
                      extent=(0.5, shown + 0.5, -0.5, ev.n_layer - 0.5))
    fig.colorbar(image, label="accuracy")
    ax.set(xlabel=f"sentences read (prefixes at least {MIN_DOCUMENTS} documents have)", ylabel="layer",
           title="Prefix-mean head accuracy per (sentences read, layer)")
    written.append(_save(fig, directory / "accuracy_sentence_layer.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colour = dict(zip(policy_names(), plt.cm.tab10.colors))
    for name, points in calibration.get("frontier", {}).items():
        read = [p for p in points if p["cost"] > 0]  # a point where the words answer everything reads nothing
        ax.plot([1 / p["cost"] for p in read], [p["accuracy"] for p in read], "o-", ms=3, c=colour.get(name),
                label=f"{name} (calibration)")
    full = ev.full_read.token_layers
    for name, score in ev.scores.items():
        if score.token_layers > 0:
            base = name.split(" ")[0]
            ax.scatter(full / score.token_layers, score.accuracy, marker="*", s=140, c=[colour.get(base)], zorder=3)
            ax.annotate(name, (full / score.token_layers, score.accuracy), textcoords="offset points", xytext=(4, 4))
    ax.scatter(ev.full_token_layers / ev.oracle_token_layers, ev.oracle_accuracy, marker="X", s=120, c="k")
    ax.annotate("oracle", (ev.full_token_layers / ev.oracle_token_layers, ev.oracle_accuracy),
                textcoords="offset points", xytext=(4, -10))
    ax.set(xscale="log", xlabel="token-layer speed-up against full depth (log)", ylabel="accuracy",
           title="Accuracy / cost: calibration frontiers (lines), test split (stars)")
    ax.legend(fontsize=7)
    written.append(_save(fig, directory / "frontier.png", plt))

    names = list(ev.scores)
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        exits = np.array(ev.scores[name].exits)
        read = (exits[:, 0] + 1) / exits[:, 2]
        ax.scatter(read, exits[:, 1], alpha=0.4, s=12)
        ax.set(title=name, xlabel="share of sentences read", xlim=(0, 1.05), ylim=(-0.5, ev.n_layer - 0.5))
    np.atleast_1d(axes)[0].set_ylabel("exit layer")
    fig.suptitle("Where documents exit")
    written.append(_save(fig, directory / "exits.png", plt))

    if ev.abstention:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        rows = [a for a in ev.abstention if a.answered]
        coverage = [a.answered / ev.n_docs for a in rows]
        ax.plot(coverage, [a.errors / a.answered for a in rows], "o-", label="error among answered")
        for a, c in zip(rows, coverage):
            ax.annotate(f"α {a.error_rate:.0%}", (c, a.errors / a.answered), textcoords="offset points", xytext=(4, 4))
        ax.plot(coverage, [a.error_rate for a in rows], "k:", label="target α")
        ax.set(xlabel="coverage (answered / all)", ylabel="error", title=f"Risk and coverage, {rows[0].policy}"
               if rows else "Risk and coverage")
        ax.legend(fontsize=8)
        written.append(_save(fig, directory / "risk_coverage.png", plt))
    if ev.cascade:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        shares = [c.lexical_share for c in ev.cascade]
        ax.plot(shares, [c.accuracy for c in ev.cascade], "o-")
        for c, share in zip(ev.cascade, shares):
            ax.annotate("never" if c.threshold is None else f"{c.threshold:g}", (share, c.accuracy),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel="answered by the words alone", ylabel="accuracy",
               title=f"The lexical exit before {ev.cascade[0].policy}, by threshold")
        written.append(_save(fig, directory / "cascade.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
