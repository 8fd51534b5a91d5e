"""tools/paired.py compare: the paired figure BENCHMARKS quotes, checked on records whose answer is known."""

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).parent.parent / "tools" / "paired.py"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_compare_pairs_two_outputs_on_the_same_documents(tmp_path):
    truth = tmp_path / "test.jsonl"
    labels = ["positive", "negative"] * 5
    write_jsonl(truth, [{"text": f"review {i}", "label": label} for i, label in enumerate(labels)])

    def output(name: str, wrong: set[int], error_at: int | None = None) -> Path:
        records = []
        for i, label in enumerate(labels):
            key = f"{truth}:{i + 1}"
            if i == error_at:
                records.append({"input": key, "error": "unreadable"})  # left out of both sides
                continue
            flipped = "negative" if label == "positive" else "positive"
            records.append({"input": key, "label": flipped if i in wrong else label, "token_layers": 100,
                            "exit_layer": -1 if i % 2 else 14})
        write_jsonl(tmp_path / name, records)
        return tmp_path / name

    first, second = output("a.jsonl", wrong={0, 1, 2}), output("b.jsonl", wrong={0}, error_at=9)
    done = subprocess.run([sys.executable, str(TOOL), "compare", str(truth), str(first), str(second)],
                          capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert "accuracy 0.6667" in lines[0] and "answered by the words 44.4%" in lines[0]
    assert "accuracy 0.8889" in lines[1]
    assert lines[2].startswith("paired difference (second − first) over 9 documents: +0.2222")
