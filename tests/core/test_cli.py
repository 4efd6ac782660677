import json

import pytest

from rankwise.cli.main import main


def test_train_eval_methods_via_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--steps", "6", "--seq-len", "32", "--eval-batches", "2", "--dtype", "fp32", "--quiet"]
    assert main([*args, "--out", str(out), "--stop-at", "3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    final = json.loads((out / "metrics.json").read_text())
    assert final["steps"] == 6 and final["config"]["seq_len"] == 32
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval_loss"] == pytest.approx(final["final_eval_loss"], abs=1e-6)
    assert main(["methods", "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)]
    assert "full" in names


# bad inputs: the one table in tests/core/test_bad_inputs.py
