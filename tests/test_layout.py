"""The sweep folder's layout: one object knows it, the README lists it."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysoup.io.layout import ENTRIES, SweepLayout

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_lists_every_entry_of_the_layout_with_its_meaning() -> None:
    text = README.read_text()
    section = text[text.index("### Storage: a local path or a URI") :]
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(f"- `{ENTRIES[0][0]}`"))
    block = []  # the list's items, up to the first line that is not part of the list
    for line in lines[first:]:
        if line.startswith("- `"):
            block.append(line)
        elif not line.startswith("  "):
            break
    assert block == [f"- `{pattern}`: {meaning}" for pattern, meaning in ENTRIES]


@pytest.mark.parametrize("storage_root", ["s3://bucket/runs/?endpoint_override=h:9", "local"])
def test_a_uri_and_a_path_get_the_same_layout(storage_root: str, tmp_path: Path) -> None:
    root = storage_root if "://" in storage_root else tmp_path / storage_root
    layout = SweepLayout.of(root, "exp")

    def tail(location: object) -> str:
        text = str(location).split("?")[0]
        return text[text.index("exp") :]

    assert tail(layout.record) == "exp/sweep.json"
    assert tail(layout.checkpoint("aux", "aux-X-h0")) == "exp/checkpoints/aux/aux-X-h0"
    assert tail(layout.failure("lp", "k")) == "exp/failures/lp/k.txt"
    assert tail(layout.soup_checkpoint("greedy", "g")) == "exp/checkpoints/soup/greedy/g"
    assert tail(layout.soup_state) == "exp/soup_state.json"
    assert tail(layout.tune) == "exp/tune" and tail(layout.results) == "exp/results"
    if "://" in storage_root:
        assert str(layout.record).endswith("?endpoint_override=h:9")  # the query stays last
    else:
        assert layout.root == tmp_path.resolve() / "local" / "exp"
