"""The CLI's one error boundary: one ``error:`` line and a non-zero exit, ``--debug`` for the traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from components import registry
from components.errors import SKFError, UserInputError
from components.settings import Limits, get_settings
from flows.cli import describe_error, main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code or 0), capsys.readouterr().err


class _Refused(SKFError):
    exit_code = 3


def test_project_error_is_one_line_with_its_exit_code(capsys, monkeypatch) -> None:
    def refuse(kind=None):
        raise _Refused("/data/x.png: refused\nbecause; fix it")

    monkeypatch.setattr(registry, "entries", refuse)
    code, err = _run(["components"], capsys)
    assert code == 3
    assert err == "error: /data/x.png: refused because; fix it\n"


def test_unexpected_error_is_one_line_and_points_at_debug(capsys, monkeypatch) -> None:
    def broken(kind=None):
        raise TypeError("boom\nsecond line")

    monkeypatch.setattr(registry, "entries", broken)
    code, err = _run(["components"], capsys)
    assert code == 1
    assert (
        err
        == "error: unexpected TypeError: boom second line (rerun with `skf --debug …` for the traceback and report it)\n"
    )


@pytest.mark.parametrize("argv", [["--debug", "components"], ["components", "--debug"]])
def test_debug_anywhere_re_raises(argv, monkeypatch) -> None:
    def broken(kind=None):
        raise SKFError("a project error")

    monkeypatch.setattr(registry, "entries", broken)
    with pytest.raises(SKFError, match="a project error"):
        main(argv)


def test_usage_errors_keep_clicks_message_and_exit_2(capsys) -> None:
    code, err = _run(["ingest"], capsys)
    assert code == 2
    assert "Missing argument" in err and "Traceback" not in err


def test_success_exits_zero(capsys) -> None:
    code, _ = _run(["components", "--kind", "skb"], capsys)
    assert code == 0


_PROBE = """
import sys
from components import registry
from components.errors import UserInputError
from flows.cli import main

def refuse(kind=None):
    raise UserInputError("bad value for --kind; pass one of skb, se")

registry.entries = refuse
main(sys.argv[1:])
"""


@pytest.mark.parametrize("debug", [False, True])
def test_a_real_process_prints_one_line_or_the_traceback(debug: bool) -> None:
    """The console entry point's process: exit status and stderr as a shell user sees them."""
    argv = ["components"] + (["--debug"] if debug else [])
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120)
    if debug:
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "UserInputError" in proc.stderr
    else:
        assert proc.returncode == 2
        assert proc.stderr == "error: bad value for --kind; pass one of skb, se\n"


def test_key_error_messages_lose_their_quotes() -> None:
    class Unknown(SKFError, KeyError):
        pass

    assert describe_error(Unknown("unknown spec x; known: a, b")) == ("unknown spec x; known: a, b", 1)
    assert describe_error(FileNotFoundError(2, "No such file or directory", "/x/y"))[0].endswith("/x/y")
    assert describe_error(RuntimeError("bug")) is None


def test_limits_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SKF_MAX_FILE_BYTES", "1_000")
    monkeypatch.setenv("SKF_ENHANCE_TILE", "256")
    limits = get_settings().limits
    assert limits.max_file_bytes == 1000 and limits.enhance_tile == 256
    assert limits.max_archive_members == Limits().max_archive_members


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [("SKF_MAX_FILE_BYTES", "lots", "not a whole number"), ("SKF_ENHANCE_TILE", "8", "SKF_ENHANCE_TILE")],
)
def test_bad_limit_settings_are_user_errors(monkeypatch, capsys, var, value, needle) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(UserInputError, match=needle):
        get_settings()
    monkeypatch.setattr(registry, "entries", lambda kind=None: get_settings())
    code, err = _run(["components"], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1


@pytest.mark.parametrize("ref", ["nope@99", "demo@x"])
def test_precompute_with_a_bad_dataset_ref_is_one_line(ref: str, skf_home, capsys) -> None:
    code, err = _run(["precompute", ref, "--skb", "skb/hrnet-w18-small-test@1"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert ref.split("@")[0] in err
