"""The `edge` command line: every subcommand runs; errors are one line unless --debug."""
import json
import re
import subprocess
import sys


def edge_cli(*args):
    return subprocess.run([sys.executable, "-m", "edge", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_run_streams_text(tiny_bundle):
    r = edge_cli("run", tiny_bundle("llama", "int8"), "hello", "-n", "5", "--stats")
    assert r.returncode == 0, r.stderr
    assert "generated" in r.stderr


def test_inspect_and_verify(tiny_bundle):
    r = edge_cli("inspect", tiny_bundle("llama", "int4"), "--verify", "--tensors")
    assert r.returncode == 0 and "every sha256 matches" in r.stdout and "layers.0.qkv" in r.stdout
    assert "none (data-free)" in r.stdout                         # no --calib
    assert re.search(r"methods\s+mse: \d+ tensors", r.stdout)     # the default search, counted per tensor
    j = json.loads(edge_cli("inspect", tiny_bundle("llama", "int4"), "--json").stdout)
    assert j["quant"] == "int4" and j["format_version"] == 2


def test_bench_json(tiny_bundle):
    r = edge_cli("bench", tiny_bundle("llama", "int4"), "--prompt-tokens", "8", "--gen-tokens", "8", "--repeat", "1", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["decode_tok_s"] > 0 and j["prompt_tok_s"] > 0 and j["peak_rss_mb"] > 0


def test_export_json(tiny_checkpoint, tmp_path):
    r = edge_cli("export", tiny_checkpoint("qwen2"), "-o", tmp_path / "b", "--quant", "int8", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["quant"] == "int8" and 0 < j["mean_rms_rel_err"] < 0.02 and j["peak_rss_mb"] > 0


def test_errors_are_one_line(tmp_path):
    r = edge_cli("run", tmp_path / "missing", "hi")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = edge_cli("--debug", "run", tmp_path / "missing", "hi")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_bad_option_values(tiny_bundle):
    r = edge_cli("run", tiny_bundle("llama"), "hi", "--temperature", "-2")
    assert r.returncode == 1 and "temperature" in r.stderr and "Traceback" not in r.stderr


def test_bench_sweep_runs_each_budget(tiny_bundle, tmp_path):
    r = edge_cli("bench", tiny_bundle("mixtral", "int4"), "--sweep", "1MB,64GB", "--prompt-tokens", "8",
                 "--gen-tokens", "8", "--repeat", "1", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert "too small" in rows[0]["error"] and rows[1]["experts"]["hit_rate"] > 0


def test_chat_loop_reads_turns_until_an_empty_line(chat_bundle):
    r = subprocess.run([sys.executable, "-m", "edge", "chat", str(chat_bundle), "-n", "4"], input="hi\n/reset\nagain\n\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # a prompt for each of the 4 lines; replies end in a newline after "hi" and "again" only
    assert r.stdout.count("> ") == 4 and r.stdout.count("\n") == 2


def test_usage_errors_files_stdin_and_version(tiny_bundle, tmp_path):
    b = tiny_bundle("llama", "int8")
    r = edge_cli("plan", b)                                           # --device is required
    assert r.returncode == 2 and "Usage:" in r.stderr and "--device" in r.stderr and "Traceback" not in r.stderr
    r = edge_cli("eval", b, "--text", tmp_path / "nope.txt")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr.lower()
    r = subprocess.run([sys.executable, "-m", "edge", "run", str(b), "-", "-n", "3", "--stats"], input="hello there",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "prompt tokens" in r.stderr and "[1 prompt" not in r.stderr  # the text, not "-"
    r = edge_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("edge ") and "onnxruntime" in r.stdout
    r = edge_cli("run", "--help")
    assert "--chat " in r.stdout and "<bool>" not in r.stdout      # flags render as flags
    r = edge_cli("bench", b, "--sweep", "300MB,400MB")
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and "dense model" in r.stderr


def test_device_plans_pick_a_context_that_fits(tiny_bundle):
    b = tiny_bundle("llama", "int8")
    r = edge_cli("plan", b, "--device", "raspberry-pi-4:1gb")
    assert r.returncode == 0 and "memory needed" in r.stdout and "memory budget" not in r.stdout
