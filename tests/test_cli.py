"""The persimmon-rt command on the embedded demo model (CPU)."""

import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from persimmon_rt import cli
from persimmon_rt.convert import convert_adept_checkpoint
from persimmon_rt.demo import demo_model_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "persimmon_rt"]


def cli_env(**extra):
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def run_on_terminal(argv, keys: bytes, timeout=120):
    """Run the command on a pseudo-terminal (stdin, stdout and stderr), type `keys`, and return (exit code,
    everything the terminal showed)."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(CLI + argv, stdin=terminal, stdout=terminal, stderr=terminal, env=cli_env(),
                            close_fds=True)
    os.close(terminal)
    os.write(controller, keys)
    shown, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 1)
        if ready:
            try:
                chunk = os.read(controller, 4096)
            except OSError:                           # EIO: the command has exited and closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(controller)
    return proc.wait(timeout=timeout), shown.decode("utf-8", "replace")


def run_cli(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_is_deterministic_when_greedy(capsys):
    argv = ["generate", "ROMEO:", "--json", "--temperature", "0", "--max-new-tokens", "12"]
    code, out, _ = run_cli(argv, capsys)
    first = json.loads(out)
    assert code == 0 and len(first["token_ids"]) == 12 and first["finish_reason"] == "length"
    assert first["text"].strip()
    _, out, _ = run_cli(argv, capsys)
    assert json.loads(out)["token_ids"] == first["token_ids"]


def test_generate_streams_text_and_reads_stdin(capsys, monkeypatch):
    code, out, _ = run_cli(["generate", "--max-new-tokens", "16", "--seed", "1"], capsys, "KING HENRY:\n",
                           monkeypatch)
    assert code == 0 and len(out.strip()) > 0


def test_generate_stop_string_cuts_the_text(capsys):
    code, out, _ = run_cli(["generate", "ROMEO:", "--json", "--temperature", "0", "--max-new-tokens", "40",
                            "--stop", "\n"], capsys)
    result = json.loads(out)
    assert code == 0 and "\n" not in result["text"].strip("\n") and result["finish_reason"] == "stop"


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--model", "/nonexistent/model"], "config.json"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--max-new-tokens", "5000"], "max_seq_len"),
    (["generate", "hi", "--model", os.path.join(demo_model_path(), "config.json")],
     f"is a file; expected the model directory that holds config.json (--model {demo_model_path()})"),
    (["info", "--model", "/nonexistent/model"], "no such directory"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("persimmon-rt: error:") and message in err


def test_empty_stdin_prompt_is_an_error(capsys, monkeypatch):
    code, _, err = run_cli(["generate"], capsys, "", monkeypatch)
    assert code == 1 and "empty prompt" in err


def test_chat_keeps_history_and_resets(capsys, monkeypatch):
    script = "Good morrow, sir.\nWhat news?\n/reset\nFarewell.\n/quit\n"
    code, out, err = run_cli(["chat", "--max-new-tokens", "8", "--seed", "0"], capsys, script, monkeypatch)
    assert code == 0 and out.count("adept:") == 3 and "history cleared" in err


def test_info_describes_build_and_model(capsys):
    code, out, _ = run_cli(["info", "--batch", "2", "--context", "512"], capsys)
    assert code == 0 and "CUDA extension" in out and "M parameters" in out and "batch 2 x context 512" in out


def test_module_entry_point_and_usage_errors():
    ok = subprocess.run([sys.executable, "-m", "persimmon_rt", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and "persimmon-rt" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "persimmon_rt", "nosuchcommand"], capture_output=True, text=True)
    assert bad.returncode == 2 and "persimmon-rt: error:" in bad.stderr


def test_bench_on_the_demo_model_and_against_transformers(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    code, out, _ = run_cli(["bench", "--context", "16", "--batch", "1,2", "--prefill", "32", "--new-tokens", "4",
                            "--json", str(out_json)], capsys)
    result = json.loads(out_json.read_text())
    cases = [r["case"] for r in result["rows"]]
    assert code == 0 and cases == ["decode b=1 ctx=16", "decode b=2 ctx=16", "prefill 32"]
    assert all(r["ms_per_step"] > 0 for r in result["rows"][:2]) and "decode b=2 ctx=16" in out
    pytest.importorskip("transformers")
    code, out, _ = run_cli(["bench", "--preset", "tiny", "--transformers", "eager,compile", "--context", "8",
                            "--new-tokens", "4", "--prefill", ""], capsys)
    assert code == 0 and "transformers eager" in out and "transformers sdpa+static+compile" in out


def test_bench_cold_start_loads_a_fresh_process(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    code, out, _ = run_cli(["bench", "--context", "8", "--new-tokens", "2", "--cold-start", "--cold-start-dir",
                            str(tmp_path), "--json", str(out_json)], capsys)
    row = next(r for r in json.loads(out_json.read_text())["rows"] if r["case"] == "cold start")
    assert code == 0 and "cold start" in out
    assert 0 < row["load_s"] < row["total_s"] and row["checkpoint_gib"] > 0 and row["peak_host_anon_gib"] > 0
    assert os.listdir(tmp_path) == ["bench.json"]          # the temporary checkpoint is gone


@pytest.mark.parametrize("encoding", ["utf-8:surrogateescape", "utf-8:strict"])
def test_invalid_utf8_input_is_named(encoding):
    env = cli_env(PYTHONIOENCODING=encoding)
    stdin = subprocess.run(CLI + ["generate"], input=b"ROMEO: \xff\xfe\xc3\x28 hello\n", capture_output=True, env=env)
    assert stdin.returncode == 1 and stdin.stderr.decode() == (
        "persimmon-rt: error: standard input is not valid UTF-8 (byte 0xff at offset 7); re-encode it as UTF-8 "
        "first\n")
    argument = subprocess.run(CLI + ["generate", b"caf\xe9"], capture_output=True, env=env)
    assert argument.returncode == 1 and b"the prompt argument is not valid UTF-8 (byte 0xe9 at offset 3)" \
        in argument.stderr
    chat = subprocess.run(CLI + ["chat", "--max-new-tokens", "2"], input=b"caf\xe9\n/quit\n", capture_output=True,
                          env=env)
    assert chat.returncode == 0 and b"that line is not valid UTF-8" in chat.stderr and b"adept:" not in chat.stdout


def test_closed_pipe_ends_quietly():
    proc = subprocess.Popen(CLI + ["generate", "ROMEO:", "--max-new-tokens", "400", "--seed", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    assert proc.stdout.read(1)                       # the first token is out; close before the rest comes
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == cli.EXIT_BROKEN_PIPE and err == b""


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    for default in ("(default: 128)", "(default: 0.8)", "(default: 0.95)", "0 = off (default: 0)"):
        assert default in out, default
    with pytest.raises(SystemExit):
        cli.main(["chat", "--help"])
    assert "(default: 0.7)" in " ".join(capsys.readouterr().out.split())


def test_generate_on_a_terminal_says_it_reads_standard_input():
    code, shown = run_on_terminal(["generate", "--max-new-tokens", "2", "--seed", "0"], b"ROMEO:\n\x04")
    assert code == 0 and "reading the prompt from standard input (end it with Ctrl-D)" in shown, shown


def test_chat_ctrl_d_ends_the_line_before_leaving():
    code, shown = run_on_terminal(["chat", "--max-new-tokens", "2"], b"\x04")
    assert code == 0 and shown.endswith("human: \r\n"), repr(shown)


def test_chat_unknown_command_is_not_sent(capsys, monkeypatch):
    script = "/rest\n//etc is a path\n/help\n/quit\n"
    code, out, err = run_cli(["chat", "--max-new-tokens", "4", "--seed", "0"], capsys, script, monkeypatch)
    assert code == 0 and out.count("adept:") == 1          # only the // message went to the model
    assert "unknown command /rest (not sent)" in err and "/reset clears the history" in err


def test_info_estimates_memory_at_the_dtype_generate_uses(capsys):
    code, out, _ = run_cli(["info"], capsys)
    want = "float16" if torch.cuda.is_available() else "float32"
    assert code == 0 and f"memory at {want}," in out
    code, out, _ = run_cli(["info", "--dtype", "bfloat16"], capsys)
    assert code == 0 and "memory at bfloat16," in out


def test_convert_into_a_non_empty_directory_names_the_right_switch(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    code, _, err = run_cli(["convert", "--adept", str(tmp_path / "release"), "--out", str(tmp_path)], capsys)
    assert code == 1 and "pass --overwrite to replace it" in err and "overwrite=True" not in err
    with pytest.raises(FileExistsError, match=r"pass overwrite=True to replace it\)$"):
        convert_adept_checkpoint(tmp_path / "release", tmp_path)
