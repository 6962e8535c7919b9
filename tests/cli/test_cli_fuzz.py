"""Hundreds of generated command lines: each ends in success or one clear error line, never a traceback.

Flags and values are drawn from what a user might type (valid, out of range, NaN, garbage, missing files),
on the tiny model folder and with an empty data folder, so a valid run takes a fraction of a second.
"""
from __future__ import annotations

import contextlib
import io
import time
import traceback

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import comp_core.cli as cli  # noqa: E402

RATIOS = ["0", "0.1", "0.2", "0.5", "0.95", "1", "1.5", "-0.1", "nan", "inf", "abc", ""]
SIZES = ["-1", "0", "1", "2", "3", "2.5", "x", ""]
LENGTHS = ["1", "2", "16", "32", "300", "100000", "-4", "y"]
COMMON = {
    "--device": ["cpu", "cuda", "cuda:7", "tpu", "auto", ""],
    "--dtype": ["float32", "bfloat16", "float16", "int8", "auto", ""],
    "--threads": ["1", "0", "-2", "many"],  # chosen rarely: added as 1 otherwise
}
PRUNE = {
    "--method": ["comp", "shortgpt", "magnitude-sp", "wanda-sp", "magnitude", "wanda", "comp-layers", "bogus"],
    "--ratio": RATIOS,
    "--sparsity": ["0.5", "2:4", "4:8", "5:4", "0", "1.2", "x"],
    "--protect": ["0,1", "0,1,2,3,4,5", "-1", "99", "a,b", ""],
    "--remove-layers": ["0", "1", "2", "min", "auto", "-2", "x"],
    "--score": ["diag", "obs", "cond", "activation", "magnitude", "fisher", "bogus"],
    "--dense-kinds": ["down,o", "all", "down", "foo", ""],
    "--inputs": ["identical", "accumulated", "paired", "other"],
    "--granularity": ["hybrid", "layers", "neurons", "atoms"],
    "--set": ["refit=blend", "refit=never", "refit=bogus", "damp=-1", "nosuch=1", "x", "="],
    "--calib": ["sample", "data-free", "c4", "wikitext2", "missing.txt", "missing.gguf"],
    "--n-samples": SIZES,
    "--seq-len": LENGTHS,
    "--seed": ["0", "7", "-1", "s"],
}
EVAL = {
    "--eval": ["sample", "wikitext2", "sample,ptb", "imagenet", ""],
    "--max-windows": ["1", "2", "0", "-1", "w"],
    "--eval-seq-len": ["16", "64", "1", "100000", "z"],
}
FLAGS = ["--paper", "--no-mask-tuning", "--overwrite", "--json", "--scores"]
COMMANDS = ["prune", "analyze", "eval", "compare", "bench-speed"]


@st.composite
def command_lines(draw, folder: str, out_dir: str):
    command = draw(st.sampled_from(COMMANDS + ["", "bogus"]))
    argv = [command] if command else []
    options = dict(COMMON)
    if command in ("prune", "analyze"):
        options |= PRUNE
    if command in ("prune", "eval", "compare"):
        options |= EVAL
    if command == "compare":
        options |= {"--methods": ["comp", "shortgpt,magnitude-sp", "magnitude", "bogus", ""],
                    "--ratio": ["0.2", "0.1,0.2", "x", "1.5", ""], "--sparsity": ["0.5", "2:4", "9:4"],
                    "--set": ["shortgpt.x=1", "magnitude-sp.ratio=0.1", "bad"], "--calib": ["sample", "c4"],
                    "--n-samples": SIZES, "--seq-len": LENGTHS, "--no-bytes": None}
    if command == "bench-speed":
        options |= {"--pruned": [out_dir + "/none", "", "/dev/null"], "--repeats": ["1", "0", "r"]}
    if command == "eval":
        options |= {"--tasks": ["piqa", "nosuchtask", ""], "--limit": ["1", "0", "l"]}
    if command == "prune":
        options |= {"--out": [out_dir + "/saved", out_dir + "/a-file/x", out_dir]}
    chosen = draw(st.lists(st.sampled_from(sorted(options)), max_size=6, unique=True))
    for flag in chosen:
        values = options[flag]
        argv += [flag] if values is None else [flag, draw(st.sampled_from(values))]
    argv += draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True))
    if draw(st.integers(0, 9)) > 0:  # mostly the tiny model; sometimes none (the bundled one) or a bad path
        argv += ["--model", folder]
    else:
        argv += ["--model", draw(st.sampled_from([out_dir + "/no-model", out_dir + "/a-file"]))]
    if command in COMMANDS and "--threads" not in chosen:  # tiny models only lose from threads on a busy box
        argv += ["--threads", "1"]
    if command in ("prune", "analyze", "compare"):  # small calibration unless the draw chose a size
        argv += [] if "--n-samples" in chosen else ["--n-samples", "2"]
        argv += [] if "--seq-len" in chosen else ["--seq-len", "16"]
        argv += [] if "--calib" in chosen else ["--calib", "sample"]  # c4 would fail: the data folder is empty
    if command in ("prune", "eval", "compare") and "--eval-seq-len" not in chosen:
        argv += ["--eval-seq-len", "16"]
    if command in ("prune", "eval", "compare") and "--max-windows" not in chosen:
        argv += ["--max-windows", "2"]
    return argv


def test_generated_command_lines_never_end_in_a_traceback(tiny_folder, tmp_path, monkeypatch):
    empty = tmp_path / "data"
    empty.mkdir()
    (tmp_path / "a-file").write_text("not a model")
    monkeypatch.setenv("COMP_DATA_DIR", str(empty))
    monkeypatch.chdir(tmp_path)
    seen: list[tuple[int, list[str]]] = []

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(command_lines(str(tiny_folder), str(tmp_path)))
    def check(argv):
        argv = argv + ["--quiet"] if argv and argv[0] in COMMANDS else argv
        err, out = io.StringIO(), io.StringIO()
        started = time.perf_counter()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = cli.main(argv)
        except SystemExit as stop:  # argparse: usage + one "error:" line, exit 2
            code = stop.code
            assert code in (0, 2), (argv, err.getvalue())
            if code == 2:
                assert "error:" in err.getvalue(), (argv, err.getvalue())
        except BaseException:  # noqa: BLE001 - the property: nothing else escapes
            pytest.fail(f"{argv} raised:\n{traceback.format_exc()}")
        finally:
            torch.set_num_threads(1)
        message = err.getvalue()
        assert "Traceback" not in message, (argv, message)
        assert code in (0, 2, 3), (argv, code, message)
        if code in (2, 3) and "usage:" not in message:
            assert len([line for line in message.splitlines() if line.strip()]) == 1, (argv, message)
        seen.append((code, argv, time.perf_counter() - started))

    check()
    codes = [c for c, _, _ in seen]
    assert len(seen) >= 300 and codes.count(0) >= 20 and codes.count(2) >= 100, (codes.count(0), codes.count(2))
