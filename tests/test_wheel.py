"""The built wheel ships the styles and the live page's files: installed into another venv, it lists and loads the
styles outside the checkout."""

import os
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from latentgraph.serve.page import STATIC

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import latentgraph as lg
    from latentgraph.checkpoints.published import list_styles
    print(lg.__file__)
    print(",".join(list_styles()))
    system = lg.load_style("deliberation", device="cpu")
    for agent in system.agents.values():
        agent.latent_steps = 2
    print(len(system.run(["What is 2 + 3?"], rounds=2, do_sample=False, max_new_tokens=3).texts))
""")


@pytest.mark.slow
def test_wheel_installs_and_loads_a_style_outside_the_checkout(published_hub, tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("latentgraph-*.whl"))
    page_files = {f"latentgraph/serve/static/{path.name}" for path in STATIC.iterdir()}
    assert "latentgraph/serve/static/index.html" in page_files
    assert page_files <= set(zipfile.ZipFile(wheel).namelist())  # the live page's files ship
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    target = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    # The new venv borrows torch & co. from this one (a plain path: its .pth files, such as the editable
    # install's, are not run), and gets latentgraph only from the wheel.
    Path(target, "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    result = subprocess.run([python, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    path, styles, answers = result.stdout.split()[-3:]
    assert path.startswith(target) and str(ROOT) not in path
    assert styles.split(",") == ["sequential_light", "sequential_scaled", "mixture", "distillation", "deliberation",
                                  "latent_mas"]
    assert answers == "1"
