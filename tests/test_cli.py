"""The persimmon-rt command on the embedded demo model (CPU)."""

import io
import json
import os
import subprocess
import sys

import pytest

from persimmon_rt import cli


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
