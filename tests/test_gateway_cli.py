"""`shoal gateway` refuses bad arguments with a message and exit code 2, no traceback."""

from __future__ import annotations

import pytest

from shoal.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--static", "tiny"], "expected MODEL=URL"),
        (["--static", "tiny=localhost:8000"], "is not an http(s) URL"),
        (["--static", "tiny=http://h:1", "--namespace", "x"], "cannot be combined"),
        (["--kubeconfig", "/nonexistent/kubeconfig"], "cannot load Kubernetes credentials"),
        (["--static", "tiny=http://h:1", "--max-attempts", "0"], "--max-attempts must be"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert main(["gateway", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
