"""The bench tables of README.md and docs/bench.md are generated from the committed results file
(``python -m rankwise.bench.docs``), so they cannot drift from it."""

from __future__ import annotations

import shutil
from pathlib import Path

from rankwise.bench import docs

ROOT = Path(__file__).resolve().parents[2]


def test_committed_docs_equal_what_the_script_renders_from_the_committed_results():
    blocks = docs.tables((ROOT / docs.RESULTS).read_text())
    for doc in docs.DOCS:
        text = (ROOT / doc).read_text()
        assert "<!-- bench:tiny:table:begin -->" in text and "<!-- bench:tiny:claims:begin -->" in text, doc
        assert docs.render(text, blocks) == text, f"{doc} drifted: run python -m rankwise.bench.docs"
    for results in (ROOT / "docs").glob("bench_*_results.md"):  # every other committed table set, e.g. the frontier
        name = results.name[len("bench_"):-len("_results.md")]
        assert docs.results_path(name) == results.relative_to(ROOT)
        named = docs.tables(results.read_text())
        assert any(f"<!-- bench:{name}:table:begin -->" in (ROOT / doc).read_text() for doc in docs.DOCS), name
        for doc in docs.DOCS:
            text = (ROOT / doc).read_text()
            assert docs.render(text, named, name) == text, f"{doc} drifted: python -m rankwise.bench.docs --name {name}"
    assert docs.main(["--check", "--root", str(ROOT)]) == 0


def test_a_new_results_file_regenerates_only_the_marked_blocks(tmp_path, capsys):
    for rel in (docs.RESULTS, *docs.DOCS):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, tmp_path / rel)
    old = (tmp_path / docs.RESULTS).read_text()
    old_table = docs.tables(old)["table"]
    new_row = old_table.splitlines()[2].replace("| galore |", "| galore-new |")
    bench = tmp_path / "runs" / "bench"
    bench.mkdir(parents=True)
    (bench / "results.md").write_text(old.replace(old_table.splitlines()[2], new_row))
    readme_before = (tmp_path / "README.md").read_text()
    assert docs.main(["--check", str(bench), "--root", str(tmp_path)]) == 1
    assert "out of date: README.md, docs/bench.md" in capsys.readouterr().err
    assert docs.main([str(bench), "--root", str(tmp_path)]) == 0
    for doc in docs.DOCS:
        text = (tmp_path / doc).read_text()
        assert new_row in text and text.count("| galore-new |") == 1
    readme = (tmp_path / "README.md").read_text()
    assert readme.replace(new_row, old_table.splitlines()[2]) == readme_before  # nothing else changed
    assert (tmp_path / docs.RESULTS).read_text() == (bench / "results.md").read_text()  # the results file is kept
    assert docs.main(["--check", "--root", str(tmp_path)]) == 0
