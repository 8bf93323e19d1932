"""A small reader of Dockerfiles and .dockerignore files, for the deployment lint tests.

Docker is not available where the tests run, so the checks hadolint would make are made
here on the parsed instructions: one :class:`Instruction` per logical line (continuations
joined, comments dropped), grouped into build stages.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, or None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + 3 :] if "CMD" in text else ""
        text = text.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list)
        return [str(v) for v in value]

    def flags(self) -> dict[str, str]:
        """``--name=value`` options before the arguments (COPY --chmod, HEALTHCHECK --interval)."""
        return dict(re.findall(r"--([a-z-]+)=(\S+)", self.args))

    def words(self) -> list[str]:
        """The shell-form arguments without ``--flag=value`` options."""
        return [w for w in self.args.split() if not w.startswith("--")]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Instructions of a Dockerfile, and its stages (the instructions before the first FROM,
    i.e. global ARGs, belong to no stage)."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):  # comments inside a continued instruction
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            parts = ins.words()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].instructions.append(ins)
    return instructions, stages


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """``ARG NAME=default`` values (the last one of each name)."""
    out = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            out[name.strip()] = value.strip().strip('"')
    return out


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


class DockerIgnore:
    """The patterns of a .dockerignore (``**`` any directories, ``!`` re-includes)."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, str]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            self.rules.append((negate, line.lstrip("!").strip("/")))

    def ignored(self, path: str) -> bool:
        """Whether ``path`` (relative to the context, ``/``-separated) stays out of it:
        the last matching rule wins, and a rule on a directory covers what is inside."""
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negate, pattern in self.rules:
            if any(_match(p, pattern) for p in prefixes):
                result = not negate
        return result


def _match(path: str, pattern: str) -> bool:
    if pattern.startswith("**/"):
        rest = pattern[3:]
        segments = path.split("/")
        return any(fnmatch.fnmatchcase("/".join(segments[i:]), rest) for i in range(len(segments)))
    return fnmatch.fnmatchcase(path, pattern) and path.count("/") == pattern.count("/")


def context_files(root: Path, source: str, ignore: DockerIgnore) -> list[str]:
    """The files a ``COPY source`` takes from the build context at ``root``."""
    matches = sorted(root.glob(source.rstrip("/"))) if any(c in source for c in "*?[") else [root / source]
    files: list[str] = []
    for m in matches:
        candidates = [p for p in m.rglob("*") if p.is_file()] if m.is_dir() else [m]
        for p in candidates:
            rel = p.relative_to(root).as_posix()
            if not ignore.ignored(rel):
                files.append(rel)
    return files
