"""Ray stays at the edges: the soup package and the ``raysoup soup`` path import no Ray
(checked in a fresh interpreter, where nothing else has imported it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import raysoup.soup

SOUP = Path(raysoup.soup.__file__).parent


def _ray_modules_after_importing(modules: list[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import json\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_module_of_the_soup_package_imports_ray() -> None:
    modules = sorted(f"raysoup.soup.{p.stem}" for p in SOUP.glob("*.py"))
    assert "raysoup.soup.posthoc" in modules and "raysoup.soup.maker" in modules
    assert _ray_modules_after_importing(modules) == []


def test_the_raysoup_soup_command_path_imports_no_ray() -> None:
    # what `raysoup soup` imports before it reads a sweep (running it on a finished sweep
    # without Ray is test_sweep_run's quickstart test)
    modules = ["raysoup.cli", "raysoup.soup.posthoc", "raysoup.results", "raysoup.sweep.record"]
    assert _ray_modules_after_importing(modules) == []
