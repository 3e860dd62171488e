"""The README's results section, generated from ``benchmarks/results/*.json`` (never typed by hand).

``jointface bench report`` rewrites the part of README.md between
``<!-- results:start -->`` and ``<!-- results:end -->``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .run import markdown_for

START, END = "<!-- results:start -->", "<!-- results:end -->"
ORDER = ("p1", "p2", "p3", "p4", "p5")


def results_markdown(results_dir: Path) -> str:
    parts = []
    for stem in ORDER:
        path = results_dir / f"{stem}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        env = result.get("environment", {})
        engines = ", ".join(f"{name} `{record.get('version')}`" for name, record in result.get("engines", {}).items())
        commit = (env.get("git_commit") or "?")[:10] + (" (uncommitted changes)" if env.get("git_dirty") else "")
        parts.append(markdown_for(result).rstrip() + "\n\n"
                     f"<sub>{path.as_posix()}: {env.get('date')}, commit {commit}, {env.get('cpu')} "
                     f"({env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads); engines: "
                     f"{engines}</sub>\n")
        for name, plot in (result.get("plots") or {}).items():
            parts.append(f"![{result['protocol']} {name}]({Path(plot).as_posix()})\n")
    return "\n".join(parts) if parts else "No results yet: run `jointface bench all`.\n"


def update_readme(readme: Path, results_dir: Path) -> bool:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{results_markdown(results_dir)}{END}{tail}"
    changed = new != text
    readme.write_text(new)
    return changed
