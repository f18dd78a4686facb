"""The README's API tour runs as written, so it cannot rot."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_tour_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        if code.startswith("# with `lorakit serve` running"):  # a client of a server started in a shell
            continue
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    block = lines[lines.index("```bash") + 1:lines.index("```bash") + 3]
    assert block[0].startswith("./setup.sh && .venv/bin/lorakit train")
    assert block[1].startswith(".venv/bin/python -m pytest")
