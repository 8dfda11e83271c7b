"""Every python snippet of the README runs as written, each in a fresh interpreter."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs(code, tmp_path, shm_prefix):
    # in a scratch directory, with this session's segment prefix so that the leak check sees its runs
    env = dict(os.environ, RSD_SHM_PREFIX=shm_prefix)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, f"{code}\n--- stderr:\n{r.stderr}"
    assert r.stdout.strip(), "a snippet shows something"
