"""The README's "Fine-tune on your own data" walk-through, run as written: every ```bash block of that
section, in order, in a fresh directory outside the repo (no PYTHONPATH: the config file there imports
``configs.*`` from the installed package)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Fine-tune on your own data"


def walkthrough_blocks() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```bash\n(.*?)```", text[start:end if end >= 0 else None], flags=re.S)


def test_walkthrough_section_has_every_step():
    script = "\n".join(walkthrough_blocks())
    for verb in ("ovla-jax import", "ovla-jax stats", "ovla-jax train", "ovla-jax eval", "ovla-jax convert",
                 "ovla-jax serve"):
        assert verb in script, verb


def test_readme_walkthrough_runs_as_written(tmp_path):
    pytest.importorskip("av")
    pytest.importorskip("uvicorn")
    pytest.importorskip("json_numpy")
    script = "set -euo pipefail\n" + "\n".join(walkthrough_blocks())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # this venv's ovla-jax
    env["HOME"] = str(tmp_path / "home")  # the statistics cache starts empty
    out = subprocess.run(["bash", "-c", script], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                         timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "episodes 8, steps 96" in out.stdout  # the import's summary
    assert "trained to step 40" in out.stdout
    assert re.search(r"offline evaluation: my_robot / val, \d+ frames, head l1", out.stdout), out.stdout
    assert "action chunk (8, 7)" in out.stdout
    assert (tmp_path / "my_robot_hf" / "config.json").is_file()
    assert (tmp_path / "runs" / "my_robot" / "offline_eval.json").is_file()
