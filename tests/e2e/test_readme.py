"""The README as a newcomer runs it: every ``console`` block, in order, in one working folder,
against a live server, with the environment active. Each command must exit 0 (or what its
block's ``<!-- readme-test: exit N -->`` says) and print what the README shows: the same words
and whole numbers, fractional numbers within 1e-3, and lines that report a time or a rate only
in shape. A ``...`` line ends the comparison early.

Directives, in an HTML comment just before a block: ``server ENV=VALUE ...`` (run it against a
server started with those settings), ``exit N``, ``output varies`` (check the exit status only),
``needs bf16`` (skip where the CPU has no bf16)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from support import ROOT, ServerProcess

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
MARK = "@@readme-command-done@@"
_DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
_TOKEN = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?|-?\d+|[A-Za-z_]+|\S")
_TIMING = re.compile(r"images/s|\d\s*(?:ms|s)\b|\(\d+(?:\.\d+)?\s*s\)")


@dataclass
class Command:
    text: str
    output: list[str] = field(default_factory=list)


@dataclass
class Block:
    line: int
    commands: list[Command]
    directive: str = ""

    @property
    def server_env(self) -> dict[str, str]:
        words = self.directive.split()
        if not words or words[0] != "server":
            return {}
        return dict(word.split("=", 1) for word in words[1:])

    @property
    def exit_status(self) -> int:
        found = re.search(r"\bexit (\d+)", self.directive)
        return int(found.group(1)) if found else 0


def _complete(command: str) -> bool:
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command)
    except ValueError:  # an open quote: the command goes on on the next line
        return False
    return True


def console_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        if lines[index].strip() != "```console":
            index += 1
            continue
        before = lines[index - 1] if index else ""
        directive = match.group(1) if (match := _DIRECTIVE.search(before)) else ""
        block = Block(index + 1, [], directive)
        index += 1
        while lines[index].strip() != "```":
            line = lines[index]
            if line.startswith("$ "):
                command = line[2:]
                while not _complete(command):
                    index += 1
                    command += "\n" + lines[index]
                block.commands.append(Command(command))
            else:
                block.commands[-1].output.append(line)
            index += 1
        blocks.append(block)
        index += 1
    return blocks


def tokens(line: str) -> list[str]:
    found = _TOKEN.findall(line)
    if _TIMING.search(line):  # a time or a rate: its shape, not its value
        return ["<n>" if token[-1].isdigit() else token for token in found]
    return found


def same_token(expected: str, got: str) -> bool:
    if expected == got:
        return True
    if "." in expected and "." in got:
        try:
            a, b = float(expected), float(got)
        except ValueError:
            return False
        return abs(a - b) <= 1e-3 + 1e-3 * abs(a)
    return False


def mismatch(expected: list[str], got: list[str]) -> str | None:
    """Why ``got`` is not what the README shows, or None when it is."""
    expected = [line.rstrip() for line in expected]
    got = [line.rstrip() for line in got]
    while expected and not expected[-1]:
        expected.pop()
    while got and not got[-1]:
        got.pop()
    if "..." in expected:
        expected = expected[: expected.index("...")]
        got = got[: len(expected)]
    if len(expected) != len(got):
        return f"{len(got)} lines instead of {len(expected)}"
    for number, (want, have) in enumerate(zip(expected, got, strict=True), 1):
        a, b = tokens(want), tokens(have)
        if len(a) != len(b) or not all(same_token(x, y) for x, y in zip(a, b, strict=True)):
            return f"line {number}: README {want!r}, got {have!r}"
    return None


def on_port(text: str, port: int) -> str:
    """``text`` with the README's server address moved to ``port``."""
    return text.replace("localhost:8000", f"localhost:{port}").replace(
        "127.0.0.1:8000", f"127.0.0.1:{port}"
    )


def run_block(block: Block, work: Path, port: int) -> list[tuple[Command, int, list[str]]]:
    """Every command of ``block`` in one bash, in order (so variables carry over), with the
    README's port replaced by the live server's; each with its exit status and output."""
    address = f"http://127.0.0.1:{port}"
    script = []
    for command in block.commands:
        text = on_port(command.text, port)
        if text.startswith("evalserve predict") and "--url" not in text:
            # It asks http://127.0.0.1:8000 by default, as the README's server listens there.
            text = text.replace("evalserve predict", f"evalserve predict --url {address}", 1)
        script.append(text)
        script.append(f"status=$?; printf '\\n{MARK} %d\\n' \"$status\"")
    venv = Path(sys.executable).parents[1]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EVALSERVE_")}
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=work,
        # curl shows no progress meter on a terminal; here its output is a pipe, so say so.
        env={**environment, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "CURL_HOME": str(work)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    parts = re.split(rf"\n{MARK} (\d+)\n", result.stdout)
    outputs, statuses = parts[0:-1:2], [int(status) for status in parts[1::2]]
    assert len(statuses) == len(block.commands), result.stdout
    return [
        (command, status, output.splitlines())
        for command, status, output in zip(block.commands, statuses, outputs, strict=True)
    ]


def start(work: Path, env: dict[str, str], number: int) -> ServerProcess:
    server = ServerProcess(work / f"server-{number}.log", EVALSERVE_DEVICE="cpu", **env)
    server.wait_ready()
    return server


def test_every_console_block_of_the_readme_runs_as_written() -> None:
    blocks = console_blocks(README.read_text())
    assert len(blocks) >= 10, "the README's console blocks were not found"
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        # The repository's folders, as a clone has them (outputs land in this folder only).
        for name in ("app", "models", "tests"):
            (work / name).symlink_to(ROOT / name)
        (work / ".venv").symlink_to(Path(sys.executable).parents[1])
        (work / ".curlrc").write_text("no-progress-meter\n")
        servers: dict[tuple[tuple[str, str], ...], ServerProcess] = {}
        try:
            for block in blocks:
                if "needs bf16" in block.directive and not _has_bf16():
                    continue
                key = tuple(sorted(block.server_env.items()))
                if key not in servers:
                    servers[key] = start(work, block.server_env, len(servers))
                port = servers[key].port
                for command, status, output in run_block(block, work, port):
                    where = f"README line {block.line}: $ {command.text}"
                    wanted = block.exit_status if len(block.commands) == 1 else 0
                    assert status == wanted, f"{where}\nexit {status}\n" + "\n".join(output)
                    if command.output and "output varies" not in block.directive:
                        shown = [on_port(line, port) for line in command.output]
                        problem = mismatch(shown, output)
                        assert problem is None, f"{where}\n{problem}\n" + "\n".join(output)
        finally:
            for server in servers.values():
                assert server.stop() == 0, server.output()


def _has_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_the_block_parser_reads_commands_outputs_and_directives() -> None:
    text = (
        "<!-- readme-test: server EVALSERVE_API_KEYS=a,b -->\n```console\n"
        '$ echo one \\\n  two\none two\n$ curl -d \'{"a": 1,\n  "b": 2}\' x\n{}\n```\n'
    )
    [block] = console_blocks(text)
    assert block.server_env == {"EVALSERVE_API_KEYS": "a,b"}
    assert [c.text for c in block.commands] == [
        "echo one \\\n  two",
        'curl -d \'{"a": 1,\n  "b": 2}\' x',
    ]
    assert [c.output for c in block.commands] == [["one two"], ["{}"]]


@pytest.mark.parametrize(
    ("shown", "printed", "same"),
    [
        (["score 0.3277019"], ["score 0.32770"], True),
        (["score 0.3277"], ["score 0.3301"], False),
        (
            ["top-1 99.44%", "4682.8 images/s (0.08 s)"],
            ["top-1 99.44%", "512.0 images/s (1.2 s)"],
            True,
        ),
        (["top-1 99.44%"], ["top-1 98.89%"], False),
        (["index 285"], ["index 286"], False),
        (["a", "..."], ["a", "b", "c"], True),
        (["a", "b"], ["a"], False),
    ],
)
def test_outputs_compare_words_and_numbers_but_not_timings(
    shown: list[str], printed: list[str], same: bool
) -> None:
    assert (mismatch(shown, printed) is None) is same
