"""Conversations in: JSONL files of `{"messages": [{"role": ..., "content": ...}, ...]}`, checked one by one,
and the small conversations file that ships with the project, made from the bundled plays.

    python -m llm_core.chat.conversations [--count 3000] [--out data/conversations.jsonl]

writes the shipped file again (deterministic: the same file for the same count and seed).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Iterator

from llm_core.data.chat_template import conversation_problem
from llm_core.config import PROJECT_ROOT
from llm_core.files import Quarantine, short_hash, write_text


def read_conversations(path: Path, quarantine: Quarantine) -> Iterator[tuple[str, list[dict]]]:
    """(id, messages) of each usable line of a JSONL file; the others go to `quarantine` with their reason.
    The id is a hash of the messages: the same conversation has the same id in any file, at any line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                quarantine.add_record(str(path), f"not JSON: {exc.msg}", line, f"line {number}")
                continue
            messages = record.get("messages") if isinstance(record, dict) else None
            problem = conversation_problem(messages)
            if problem:
                quarantine.add_record(str(path), problem, line, f"line {number}")
                continue
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            yield short_hash(messages), messages


# ---------------------------------------------------------------------------------------------
# the shipped conversations, made from the bundled plays

SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]+):$")
MAX_LINE_CHARS = 60  # short enough for three turns to fit the default profile's 64-token context


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, first line) of each speech: a "NAME:" line followed by the speech, blank line between."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        match = SPEAKER.match(lines[0]) if len(lines) > 1 else None
        if match and len(lines[1]) <= MAX_LINE_CHARS:
            name = " ".join(w if re.fullmatch("[IVX]+", w) else w.capitalize() for w in match.group(1).split())
            out.append((name, lines[1].strip()))
    return out


def from_plays(text: str, count: int, seed: int = 0) -> list[dict]:
    """`count` conversations about consecutive speeches: who says a line, what the next speaker answers,
    and a two-round one (a line of a speaker, then who answers it and how)."""
    said = speeches(text)
    pairs = list(zip(said, said[1:]))
    out = []
    for pair, kind in random.Random(seed).sample([(p, k) for p in pairs for k in range(3)], count):  # no repeats
        (first, line), (second, answer) = pair
        if kind == 0:
            messages = [{"role": "user", "content": f'Who says: "{line}"'},
                        {"role": "assistant", "content": f"{first}."}]
        elif kind == 1:
            messages = [{"role": "user", "content": f'{first} says: "{line}" What does {second} answer?'},
                        {"role": "assistant", "content": answer}]
        else:
            messages = [{"role": "user", "content": f"Give me a line of {first}."},
                        {"role": "assistant", "content": line},
                        {"role": "user", "content": "Who answers, and how?"},
                        {"role": "assistant", "content": f"{second}: {answer}"}]
        out.append({"messages": messages})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plays", default=str(PROJECT_ROOT / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--out", default=str(PROJECT_ROOT / "data" / "conversations.jsonl"))
    a = parser.parse_args(argv)
    conversations = from_plays(Path(a.plays).read_text(), a.count, a.seed)
    write_text(Path(a.out), "".join(json.dumps(c) + "\n" for c in conversations))
    print(f"{len(conversations)} conversations -> {a.out}")


if __name__ == "__main__":
    main()
