"""Every command the documents show runs as written: each `python X.py ...` (or `torchrun ... X.py ...`) line of
the README, EXPERIMENTS.md and the programs' own --help texts (their docstrings) is parsed and checked by that
program's `parse_args`, its own parser and refusals, without training or writing anything (bench/ and tests/
scripts aside). A doc and the code
cannot drift apart: `python train.py --stage 2 --preset paper --weights ...` stood in the README, and train.py
refused it."""

import re
import shlex

import pytest

import experiment
import official
import settings
import tiny_world
import train
import translate
import weights
from conftest import ROOT

MODULES = {"train.py": train, "translate.py": translate, "weights.py": weights, "official.py": official,
           "experiment.py": experiment, "tiny_world.py": tiny_world}
PARSERS = {**{name: module.parse_args for name, module in MODULES.items() if name != "train.py"},
           "train.py": settings.parse_args}  # (train.py's flags are settings.py's)
DOCUMENTS = ["README.md", "EXPERIMENTS.md", *MODULES]


def command_lines(text):
    """The shell lines of a text that run a Python program: fenced code blocks and docstrings line by line (a
    trailing backslash continues a line), inline code spans whole."""
    text = re.sub(r"\s*\\\n\s*", " ", text)
    lines = re.findall(r"`((?:python|torchrun) [^`\n]+)`", text)
    lines += [line.strip() for line in text.splitlines() if re.match(r"\s*(python|torchrun|echo .*\| *python) ",
                                                                     line)]
    return lines


def commands(name):
    """[(program, argv)] of a document, `...` filled from the same program's command before it."""
    out, last = [], {}
    text = MODULES[name].__doc__ if name in MODULES else (ROOT / name).read_text()
    for line in command_lines(text):
        words = shlex.split(line.split("|")[-1], comments=True)
        program = next((w for w in words if w.endswith(".py")), None)
        if program is None or program.startswith(("bench/", "tests/")):  # (the tools around the tests: not checked)
            continue
        assert program in PARSERS, f"{name}: `{line}` runs {program}, which has no command line: write it out"
        argv = words[words.index(program) + 1:]
        assert not any("$" in w for w in argv), f"{name}: write the command out, without shell variables: {line}"
        if "..." in argv:  # "the flags of the command before", less those given here
            given = {w for w in argv if w.startswith("--")}
            before, keep = [], True
            for w in last.get(program, []):
                keep = w not in given if w.startswith("--") else keep
                before += [w] * keep
            argv = [w for w in argv if w != "..."] + before
        last[program] = argv
        out.append((program, argv, line))
    return out


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_in_the_docs_parses(document, monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPTRANS_CACHE", str(tmp_path))
    found = commands(document)
    assert found or document not in ("README.md", "train.py"), f"no command found in {document}"
    for program, argv, line in found:
        try:
            PARSERS[program](argv)
        except SystemExit as e:  # (0: --help)
            if e.code:
                    pytest.fail(f"{document}: `{line}` is refused by {program}: {e.code}")
    assert list(tmp_path.iterdir()) == []  # parsing wrote nothing


def test_the_commands_are_found_and_checked():
    """The reader of this file finds what it should, and a refused command fails the check."""
    doc = "See `python train.py --stage 2 --prefix_len 0`.\n```\npython weights.py --official a.pth \\\n" \
          "    --towers t --src en --tgt de --out o\ntorchrun --nproc_per_node 2 train.py --stage 2 ...  # DDP\n```\n"
    lines = command_lines(doc)
    assert lines == ["python train.py --stage 2 --prefix_len 0",
                     "python weights.py --official a.pth --towers t --src en --tgt de --out o",
                     "torchrun --nproc_per_node 2 train.py --stage 2 ...  # DDP"]
    with pytest.raises(SystemExit):
        settings.parse_args(["--stage", "2", "--preset", "paper", "--weights", "w", "--data", "d"])


def test_the_sizes_the_readme_gives_are_true():
    """"`cliptrans.py` (~570 lines" in the README: within 5% of the file's length today."""
    sizes = re.findall(r"`(\w+\.py)` \(~(\d+) lines", (ROOT / "README.md").read_text())
    assert {name for name, _ in sizes} >= {"cliptrans.py", "train.py"}
    for name, size in sizes:
        lines = len((ROOT / name).read_text().splitlines())
        assert abs(lines - int(size)) <= 0.05 * int(size), f"README: {name} ~{size} lines, it has {lines}"
