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


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "nope"], "unknown model preset"),
    (["train", "--steps", "-1"], "steps must be a positive integer"),
    (["train", "--method", "bogus"], "unknown method 'bogus'"),
    (["train", "--data", "/no/such/path.txt"], "does not exist"),
    (["train", "--rank", "4"], "does not take option(s) rank"),
    (["train", "--opt", "novalue"], "KEY=VALUE"),
    (["eval", "/no/such/run"], "no checkpoint"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not out.exists()
