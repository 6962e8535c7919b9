"""The GUI under interruption and concurrent use, without the data folder, and its security defaults.

Event handlers are called directly on a tiny Llama folder (as tests/ui/test_ui_handlers.py does); the server is
started only where serving is the point. Calibration is data-free or the shipped sample text, so every test here
runs on a fresh machine.
"""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

gr = pytest.importorskip("gradio")

from tests.ui.test_ui_handlers import no_progress, save_tiny_llama  # noqa: E402
from ui import common, sidebar  # noqa: E402
from ui.session import Session  # noqa: E402
from ui.tabs import analyse as analyse_tab  # noqa: E402
from ui.tabs import runs  # noqa: E402

from tests.helpers import ROOT  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-hardening")))


def data(folder):
    return [folder, "sample", "", 4, 32, 0]


def plan(ratio=0.2, n_remove=0, protected=None, kinds=None, depth=2):
    return [ratio, n_remove, False, protected, "diag", True, "identical", kinds, depth]


def cancel_when(session: Session, pattern: str):
    """A gr.Progress stand-in that presses Cancel once a step's description matches ``pattern``."""
    def progress(*_args, desc: str = "", **_kwargs):
        if re.search(pattern, desc or ""):
            common.request_cancel(session)
    return progress


def changed_note(summary: str) -> list[str]:
    return re.findall(r"Changed since the analysis[^.]*", summary)


# ------------------------------------------------------------------------------------------- what-if


def test_prune_first_then_analyse_then_move_the_ratio_shows_no_change(folder):
    session = Session()
    runs.run_prune(session, *data(folder), *plan(protected=[], kinds=[]), progress=no_progress)  # controls empty
    out = analyse_tab.analyse(session, *data(folder), *plan(protected=[], kinds=[]), progress=no_progress)
    protected_u, kinds_u = out[10], out[11]
    assert kinds_u["value"] == sidebar.default_kinds(common.dense_kinds(session))  # the page gets the defaults
    assert set(session.analysis.cfg.dense_kinds) == set(kinds_u["value"])
    _, _, _, summary, *_ = analyse_tab.update_plan(session, 0.25, 0, False, protected_u["value"], "diag", True, "identical",
                                          list(reversed(kinds_u["value"])))
    assert changed_note(summary) == []


# ------------------------------------------------------------------------------------------- cancel


def test_cancel_during_analysis_keeps_the_previous_analysis(folder):
    session = Session()
    analyse_tab.analyse(session, *data(folder), *plan(), progress=no_progress)
    before = session.analysis
    with pytest.raises(gr.Error) as err:
        analyse_tab.analyse(session, *data(folder), *plan(ratio=0.15), progress=cancel_when(session, "Capturing"))
    assert err.value.title == "Cancelled"
    assert session.analysis is before and not session.busy.locked()


def test_cancel_during_prune_keeps_the_previous_pruned_model(folder):
    session = Session()
    runs.run_prune(session, *data(folder), *plan(), progress=no_progress)
    before = (session.pruned, session.result, session.pruned_run, [dict(r) for r in session.runs])
    with pytest.raises(gr.Error) as err:
        runs.run_prune(session, *data(folder), *plan(ratio=0.15), progress=cancel_when(session, "Neuron pruning"))
    assert err.value.title == "Cancelled"
    assert (session.pruned, session.result, session.pruned_run, session.runs) == before
    assert not session.busy.locked()


def test_cancel_during_evaluation_leaves_the_table_as_it_was(folder):
    session = Session()
    runs.run_prune(session, *data(folder), *plan(), progress=no_progress)
    before = [dict(r) for r in session.runs]
    with pytest.raises(gr.Error) as err:
        runs.run_evaluate(session, ["sample"], "quick", False, progress=cancel_when(session, r"· R1"))
    assert err.value.title == "Cancelled"
    assert session.runs == before and not session.busy.locked()
    status, table, *_ = runs.run_evaluate(session, ["sample"], "quick", False, progress=no_progress)
    assert "Sample text" in status and table["ppl sample"].notna().all()


# ------------------------------------------------------------------------------------------- concurrency


def test_two_sessions_prune_at_once_and_both_finish_with_their_own_state(folder):
    sessions = [Session(), Session()]
    sidebar.load(sessions[0], *data(folder), progress=no_progress)  # the shared original, loaded once
    original = {k: v.clone() for k, v in sessions[0].loaded.model.state_dict().items()}
    errors: list[BaseException] = []

    def prune(session, ratio):
        try:
            runs.run_prune(session, *data(folder), *plan(ratio=ratio), progress=no_progress)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=prune, args=(s, r)) for s, r in zip(sessions, (0.2, 0.15))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert [round(s.result.realised_ratio, 2) for s in sessions] == [0.2, 0.15]
    assert sessions[0].pruned is not sessions[1].pruned
    assert all(len([r for r in s.runs if r["run"] != "original"]) == 1 for s in sessions)
    assert all(torch.equal(original[k], v) for k, v in sessions[0].loaded.model.state_dict().items())


def test_a_second_task_in_the_same_tab_gets_a_busy_message(folder, monkeypatch):
    session = Session()
    monkeypatch.setattr(common, "BUSY_WAIT_S", 0.2)
    session.busy.acquire()  # a task of this tab is running
    try:
        with pytest.raises(gr.Error) as err:
            runs.run_prune(session, *data(folder), *plan(), progress=no_progress)
    finally:
        session.busy.release()
    assert err.value.title == "Busy" and "still running" in err.value.message
    assert session.runs == [] and session.pruned is None


# ------------------------------------------------------------------------------------------- memory


def test_out_of_memory_in_the_gui_says_so_with_the_memory_figures(folder, monkeypatch):
    def prune_with(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 93458415616 bytes.")

    monkeypatch.setattr(runs, "prune_with", prune_with)
    session = Session()
    with pytest.raises(gr.Error) as err:
        runs.run_prune(session, *data(folder), *plan(), progress=no_progress)
    assert err.value.title == "Out of memory"
    assert "peak RSS" in err.value.message and "MiB" in err.value.message
    assert session.pruned is None and not session.busy.locked()


# ------------------------------------------------------------------------------------------- no data folder


def test_without_the_data_folder_the_page_offers_the_sample_text_and_data_free(tmp_path, monkeypatch):
    from ui.app import build_app

    monkeypatch.setenv("COMP_DATA_DIR", str(tmp_path))  # an empty folder: no WikiText-2, no C4
    demo = build_app(default_calib="c4")
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert by_id["eval-sets"].value == ["sample"] and by_id["compare-sets"].value == ["sample"]
    assert by_id["calib-name"].value == "data-free"
    assert "WikiText-2 is not available locally" in by_id["data-note"].value


# ------------------------------------------------------------------------------------------- launch, security


def test_launch_without_the_gui_extra_says_which_extra_to_install():
    code = ("import sys, runpy; sys.modules['gradio'] = None; sys.argv = ['launch.py']; "
            "runpy.run_path('launch.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install -e '.[gui]'" in done.stderr and "Traceback" not in done.stderr


def test_launch_with_a_python_without_torch_names_the_venv():
    """`python launch.py` with the system Python: one line naming the venv's Python, no torch traceback."""
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['launch.py']; "
            "runpy.run_path('launch.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "torch is not installed" in done.stderr and ".venv/bin/python launch.py" in done.stderr
    assert "Traceback" not in done.stderr


def test_launch_binds_localhost_without_share_unless_asked(monkeypatch, capsys):
    import launch

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs))
    assert launch.main(["--threads", "1"]) == 0
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False and seen["inbrowser"] is False
    assert "serves on http://127.0.0.1:7860" in capsys.readouterr().out
    launch.main(["--threads", "1", "--browser"])
    assert seen["inbrowser"] is True
    assert not seen.get("allowed_paths")  # nothing beyond Gradio's own upload/cache folders is served
    launch.main(["--threads", "1", "--host", "0.0.0.0"])
    assert seen["server_name"] == "0.0.0.0"
    torch.set_num_threads(1)


def test_the_server_serves_no_file_outside_its_own_folders():
    from ui.app import build_app, launch_kwargs

    demo = build_app()
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        for path in ("/etc/passwd", str(ROOT / "README.md"), str(ROOT / "comp_core" / "cli.py")):
            for prefix in ("gradio_api/file=", "file="):
                url = f"{demo.local_url}{prefix}{path}"
                try:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        status = response.status
                except urllib.error.HTTPError as err:
                    status = err.code
                assert status in (403, 404), (url, status)
    finally:
        demo.close()


# ------------------------------------------------------------------------------------------- progress


def test_progress_says_how_long_the_stage_has_left(monkeypatch):
    from comp_core.events import PruneEvent
    now = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    shown = []
    bridge = common.Bridge(lambda fraction, desc, **kw: shown.append(desc), Session())
    bridge(PruneEvent("neuron-pruning", 1, 11, "layer 2"))  # the stage's clock starts at its first event
    assert "left" not in shown[-1]
    now[0] += 20.0
    bridge(PruneEvent("neuron-pruning", 3, 11, "layer 4"))  # 2 steps in 20 s: 8 to go, about 80 s
    assert shown[-1].endswith("about 80 s left")
    now[0] += 90.0
    bridge(PruneEvent("neuron-pruning", 11, 11, "layer 12"))
    assert "left" not in shown[-1]  # done
    assert common.duration_text(30) == "30 s" and common.duration_text(600) == "10 min"
    assert common.duration_text(3900) == "1 h 5 min"


def test_importing_the_gui_writes_nothing_into_the_source_tree():
    """Gradio writes a .pyi stub beside any module that subclasses one of its components; the ratio slider's
    subclass must not (a read-only install would fail at import, a checkout would gain a stray file)."""
    stubs = sorted((ROOT / "ui").rglob("*.pyi"))
    subprocess.run([sys.executable, "-c", "import ui.app"], cwd=ROOT, check=True, timeout=300)
    assert sorted((ROOT / "ui").rglob("*.pyi")) == stubs == []
