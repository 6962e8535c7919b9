"""comp_core.evaluate.zeroshot: the local copies converted to what lm-eval's tasks read, and `eval --tasks` checked
against a plain lm-eval run with the same task configs (tiny random Llama, small --limit)."""
from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from comp_core.evaluate import zeroshot as zs
from comp_core.cli import main
from comp_core.data import DataError

from tests.helpers import DATA  # noqa: E402
ZS = DATA / "zeroshot"
LOCAL = tuple(zs.LOCAL_TASKS)


def harness_installed() -> bool:
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):  # a module entry of None (hidden on purpose) raises ValueError
        return False


HAS_HARNESS = harness_installed()
HAS_DATA = all((ZS / spec.folder).is_dir() for spec in zs.LOCAL_TASKS.values())
needs_harness = pytest.mark.skipif(not HAS_HARNESS, reason=f"lm-eval not installed ({zs.INSTALL_HINT})")
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"no local zero-shot copies under {ZS} (set COMP_DATA_DIR)")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--quiet", "--threads", "1"])
    out = capsys.readouterr()
    return code, out.out, out.err


def raw_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def accuracies(results: dict) -> dict:
    return {task: {k: v for k, v in metrics.items() if k.startswith("acc")} for task, metrics in results.items()}


# ------------------------------------------------------------------------ conversions on small written files


def write_small_copies(root: Path) -> Path:
    """Two items of every local task in the shared/data layout, written the way the real files are."""
    base = root / "zeroshot"
    for folder in ("boolq", "piqa", "winogrande", "arc_easy", "hellaswag"):
        (base / folder).mkdir(parents=True)
    with gzip.open(base / "boolq" / "val.jsonl.gz", "wt", encoding="utf-8") as handle:
        for i, label in enumerate(("true", "false")):
            handle.write(json.dumps({"question": f"is it {i}", "passage": f"Passage {i}.", "idx": i, "label": label})
                         + "\n")
    (base / "piqa" / "valid.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "goal": f"goal {i}", "sol1": "one", "sol2": "two"}) + "\n" for i in range(2)))
    (base / "piqa" / "valid-labels.lst").write_text("1\n0\n")
    (base / "winogrande" / "dev.jsonl").write_text("".join(
        json.dumps({"qID": f"w{i}", "sentence": "Ann beat Bo so _ won.", "option1": "Ann", "option2": "Bo",
                    "answer": a}) + "\n" for i, a in enumerate(("1", "2"))))
    (base / "winogrande" / "dev-labels.lst").write_text("1\n2\n")
    for name in ("ARC-Easy-Test.jsonl", "ARC-Easy-Dev.jsonl"):
        (base / "arc_easy" / name).write_text("".join(json.dumps(
            {"id": f"a{i}", "question": {"stem": f"Q{i}?", "choices": [{"text": "x", "label": key[0]},
                                                                        {"text": "y", "label": key[1]}]},
             "answerKey": key[1]}) + "\n" for i, key in enumerate((("A", "B"), ("1", "2")))))
    with bz2.open(base / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as handle:
        handle.write("Roof shingle removal: A man is sitting on a roof. he\n3\na\nb\nc\nstarts pulling up roofing.\n"
                     "Health: How to rest. Lie down.\n0\nSleep.\nRun.\nJump.\nSing.\n")
    return root


def test_small_copies_convert_to_the_hub_fields(tmp_path):
    root = write_small_copies(tmp_path)
    boolq = zs.load_local_docs("boolq", root)["validation"]
    assert [set(d) for d in boolq] == [{"question", "passage", "idx", "label"}] * 2
    assert [d["label"] for d in boolq] == [1, 0]
    piqa = zs.load_local_docs("piqa", root)["validation"]
    assert [d["label"] for d in piqa] == [1, 0] and set(piqa[0]) == {"goal", "sol1", "sol2", "label"}
    wino = zs.load_local_docs("winogrande", root)["validation"]
    assert [d["answer"] for d in wino] == ["1", "2"] and set(wino[0]) == {"sentence", "option1", "option2", "answer"}
    arc = zs.load_local_docs("arc_easy", root)
    assert set(arc) == {"test", "validation"}
    assert arc["test"][1] == {"id": "a1", "question": "Q1?", "choices": {"text": ["x", "y"], "label": ["1", "2"]},
                              "answerKey": "2"}
    hella = zs.load_local_docs("hellaswag", root)["validation"]
    assert hella[0]["ctx_a"] == "A man is sitting on a roof." and hella[0]["ctx_b"] == "he"
    assert hella[0]["label"] == "3" and hella[0]["endings"][3] == "starts pulling up roofing."
    assert hella[1]["ctx_b"] == "" and hella[1]["activity_label"] == "Health"


@pytest.mark.parametrize("ctx, expect", [
    ("A man is sitting on a roof. he", ("A man is sitting on a roof.", "he")),
    ("She bends down. Then grabs it! the lady", ("She bends down. Then grabs it!", "the lady")),
    ("How to rest. Lie down.", ("How to rest. Lie down.", "")),
    ("no sentence end here", ("no sentence end here", "")),
])
def test_hellaswag_context_split(ctx, expect):
    assert zs._split_hellaswag_ctx(ctx) == expect
    ctx_a, ctx_b = zs._split_hellaswag_ctx(ctx)
    assert (ctx_a + " " + ctx_b).strip() == ctx  # nothing lost: the harness joins them the same way


def test_missing_file_names_the_expected_path(tmp_path):
    root = write_small_copies(tmp_path)
    (root / "zeroshot" / "piqa" / "valid-labels.lst").unlink()
    with pytest.raises(DataError, match=str(root / "zeroshot" / "piqa" / "valid-labels.lst")):
        zs.load_local_docs("piqa", root)
    with pytest.raises(DataError, match="COMP_DATA_DIR"):
        zs.local_files("boolq", tmp_path / "empty")


def test_bad_labels_are_refused(tmp_path):
    root = write_small_copies(tmp_path)
    (root / "zeroshot" / "winogrande" / "dev-labels.lst").write_text("2\n2\n")
    with pytest.raises(DataError, match="differ"):
        zs.load_local_docs("winogrande", root)
    (root / "zeroshot" / "piqa" / "valid-labels.lst").write_text("1\n")
    with pytest.raises(DataError, match="1 labels for 2 items"):
        zs.load_local_docs("piqa", root)


def test_arc_challenge_has_no_local_copy():
    with pytest.raises(zs.ZeroShotError, match="no local copy.*hub"):
        zs.load_local_docs("arc_challenge", DATA)


def test_missing_extra_is_one_clear_line(tiny_folder, capsys, monkeypatch):
    monkeypatch.setenv("COMP_DATA_DIR", str(DATA))  # --data-dir sets it; restored afterwards
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails as if not installed
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_folder), "--tasks", "boolq", "--data-dir", str(DATA))
    assert code == 2
    assert err.count("\n") == 1 and "pip install -e '.[eval]'" in err


def test_limit_needs_tasks(tiny_folder, capsys):
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_folder), "--limit", "5")
    assert code == 2 and "--limit" in err


# ------------------------------------------------------------------------------ the real local copies


@needs_data
def test_local_copies_item_counts_and_labels():
    boolq = zs.load_local_docs("boolq", DATA)["validation"]
    raw = raw_jsonl(ZS / "boolq" / "val.jsonl.gz")
    assert len(boolq) == len(raw) == 3270
    assert [d["label"] for d in boolq] == [int(r["label"] == "true") for r in raw]

    piqa = zs.load_local_docs("piqa", DATA)["validation"]
    assert len(piqa) == len(raw_jsonl(ZS / "piqa" / "valid.jsonl")) == 1838
    assert [d["label"] for d in piqa] == [int(y) for y in lines(ZS / "piqa" / "valid-labels.lst")]

    wino = zs.load_local_docs("winogrande", DATA)["validation"]
    assert len(wino) == 1267
    assert [d["answer"] for d in wino] == lines(ZS / "winogrande" / "dev-labels.lst")

    arc = zs.load_local_docs("arc_easy", DATA)
    assert len(arc["test"]) == 2376 and len(arc["validation"]) == 570
    assert all(d["answerKey"] in d["choices"]["label"] for d in arc["test"])
    assert {d["answerKey"] for d in arc["test"]} >= {"A", "B", "C", "D", "1"}  # a few numeric keys, kept as on the hub

    hella = zs.load_local_docs("hellaswag", DATA)["validation"]
    assert len(hella) == 10042
    assert all(len(d["endings"]) == 4 and d["label"] in ("0", "1", "2", "3") for d in hella)
    first = hella[0]
    assert (first["activity_label"], first["ctx_a"], first["ctx_b"], first["label"]) == \
        ("Roof shingle removal", "A man is sitting on a roof.", "he", "3")
    assert first["endings"][3] == "starts pulling up roofing on a roof."


# --------------------------------------------------------------------------------- against the harness


def harness_task(task: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False).load([zs.task_config(task, DATA)])["tasks"][task]


@needs_harness
@needs_data
def test_configs_are_the_harness_own_but_the_data():
    from lm_eval.tasks._yaml_loader import load_yaml
    import lm_eval.tasks

    data_keys = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "training_split",
                 "validation_split", "test_split", "fewshot_split"}
    for task in LOCAL:
        own = load_yaml(Path(lm_eval.tasks.__file__).parent / zs.HARNESS_YAML[task], resolve_func=True)
        ours = zs.task_config(task, DATA)
        assert {k: v for k, v in ours.items() if k not in data_keys} == \
            {k: v for k, v in own.items() if k not in data_keys}, task
        assert ours["training_split"] is None and ours["dataset_path"] == str(ZS / zs.LOCAL_TASKS[task].folder)
        for key in ("validation_split", "test_split"):  # the splits the harness scores are kept
            assert ours.get(key) == own.get(key), (task, key)


@needs_harness
@needs_data
def test_harness_reads_the_converted_items():
    """The harness's own doc_to_text / doc_to_target / doc_to_choice on the first local item of each task."""
    boolq = harness_task("boolq")
    raw = raw_jsonl(ZS / "boolq" / "val.jsonl.gz")[0]
    doc = boolq.eval_docs[0]
    assert len(boolq.eval_docs) == 3270
    assert boolq.doc_to_text(doc) == f"{raw['passage']}\nQuestion: {raw['question']}?\nAnswer:"
    assert boolq.doc_to_choice(doc) == ["no", "yes"] and boolq.doc_to_target(doc) == int(raw["label"] == "true")

    piqa = harness_task("piqa")
    raw = raw_jsonl(ZS / "piqa" / "valid.jsonl")[0]
    doc = piqa.eval_docs[0]
    assert len(piqa.eval_docs) == 1838
    assert piqa.doc_to_text(doc) == f"Question: {raw['goal']}\nAnswer:"
    assert piqa.doc_to_choice(doc) == [raw["sol1"], raw["sol2"]]
    assert piqa.doc_to_target(doc) == int(lines(ZS / "piqa" / "valid-labels.lst")[0])

    wino = harness_task("winogrande")
    raw = raw_jsonl(ZS / "winogrande" / "dev.jsonl")[0]
    doc = wino.eval_docs[0]
    blank = raw["sentence"].index("_")
    assert len(wino.eval_docs) == 1267
    assert wino.doc_to_text(doc) == int(raw["answer"]) - 1  # partial scoring: the gold context's index
    assert wino.doc_to_choice(doc) == [raw["sentence"][:blank] + raw[key] for key in ("option1", "option2")]
    assert wino.doc_to_target(doc) == raw["sentence"][blank + 1:].strip()

    arc = harness_task("arc_easy")
    raw = raw_jsonl(ZS / "arc_easy" / "ARC-Easy-Test.jsonl")[0]
    doc = arc.eval_docs[0]
    labels = [c["label"] for c in raw["question"]["choices"]]
    assert len(arc.eval_docs) == 2376  # the test split, as the harness scores it
    assert arc.doc_to_text(doc) == f"Question: {raw['question']['stem']}\nAnswer:"
    assert arc.doc_to_choice(doc) == [c["text"] for c in raw["question"]["choices"]]
    assert arc.doc_to_target(doc) == labels.index(raw["answerKey"])

    hella = harness_task("hellaswag")
    doc = hella.eval_docs[0]
    assert len(hella.eval_docs) == 10042
    assert hella.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert hella.doc_to_target(doc) == 3 and hella.doc_to_choice(doc)[3] == "starts pulling up roofing on a roof."


@needs_harness
@needs_data
def test_eval_tasks_equals_a_plain_harness_run(tiny_folder, capsys, monkeypatch):
    """`comp-explorer eval --tasks` (model loaded by comp_core, wrapped in HFLM) == lm-eval loading the folder
    itself (model="hf") on the same task configs: every metric, every task; no perplexity is run."""
    import lm_eval

    monkeypatch.setenv("COMP_DATA_DIR", str(DATA))
    limit = 10
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_folder), "--tasks", ",".join(LOCAL),
                             "--limit", str(limit), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert "ppl" not in report
    ours = report["zeroshot"]
    assert set(ours["results"]) == set(LOCAL) and ours["limit"] == limit
    assert all(n["effective"] == limit for n in ours["n_samples"].values())
    assert all("acc,none" in r for r in ours["results"].values())
    assert all("acc_norm,none" in ours["results"][t] for t in ("piqa", "arc_easy", "hellaswag"))

    plain = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tiny_folder), "device": "cpu",
                                                            "dtype": "float32"},
                                    tasks=[zs.task_config(t, DATA) for t in LOCAL], limit=limit, batch_size=1,
                                    log_samples=False, task_manager=zs._task_manager(False))
    assert accuracies(ours["results"]) == accuracies({t: plain["results"][t] for t in LOCAL})
    assert ours["n_samples"] == {t: plain["n-samples"][t] for t in LOCAL}


@needs_harness
@needs_data
def test_saved_pruned_folder_scores_like_the_model_in_memory(tmp_path, capsys, monkeypatch):
    from tests.helpers import make_calib, make_tiny_model
    from tests.tiny_tokenizer import make_tiny_tokenizer
    from comp_core import CompConfig, prune, save_pruned

    monkeypatch.setenv("COMP_DATA_DIR", str(DATA))
    tokenizer = make_tiny_tokenizer()
    pruned, result = prune(make_tiny_model("llama"), make_calib(), CompConfig(ratio=0.3, remove_layers=1))
    folder = save_pruned(pruned, tokenizer, tmp_path / "pruned", result)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "comp_llama"
    tasks = ["boolq", "winogrande"]
    in_memory = zs.evaluate_tasks(pruned, tokenizer, tasks, limit=8, quiet=True)
    code, out, err = run_cli(capsys, "eval", "--model", str(folder), "--tasks", ",".join(tasks), "--limit", "8",
                             "--json")
    assert code == 0, err
    assert accuracies(json.loads(out)["zeroshot"]["results"]) == accuracies(in_memory.results)
    assert "| boolq | 8/3270 |" in in_memory.table()


@needs_harness
@needs_data
def test_arc_challenge_says_it_needs_the_hub(tiny_folder, capsys, monkeypatch):
    import datasets

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.setenv("COMP_DATA_DIR", str(DATA))
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_folder), "--tasks", "boolq,arc_challenge",
                           "--limit", "2", "--data-dir", str(DATA))
    assert code == 2
    assert "arc_challenge" in err and "no local copy" in err and "hub" in err


@needs_harness
def test_missing_local_copy_names_the_path(tiny_folder, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COMP_DATA_DIR", str(DATA))
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_folder), "--tasks", "hellaswag",
                           "--data-dir", str(tmp_path))
    assert code == 2
    assert str(tmp_path / "zeroshot" / "hellaswag" / "hellaswag_val_full.txt.bz2") in err


@needs_harness
def test_unknown_task_is_a_clear_error():
    with pytest.raises(zs.ZeroShotError, match="unknown lm-eval task 'no_such_task'"):
        zs.build_tasks(["no_such_task"])  # builds the harness's full task index: a few seconds


@needs_data
def test_eval_without_tasks_still_measures_wikitext2(tiny_folder, capsys, monkeypatch):
    monkeypatch.setenv("COMP_DATA_DIR", str(DATA))
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_folder), "--max-windows", "1", "--eval-seq-len", "64",
                             "--json")
    assert code == 0, err
    report = json.loads(out)
    assert "wikitext2" in report["ppl"] and "zeroshot" not in report


@needs_harness
@needs_data
def test_tasks_with_eval_runs_both(tiny_folder, capsys, monkeypatch):
    monkeypatch.setenv("COMP_DATA_DIR", str(DATA))
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_folder), "--tasks", "boolq", "--limit", "2",
                             "--eval", "ptb", "--max-windows", "1", "--eval-seq-len", "64")
    assert code == 0, err
    assert "| boolq | 2/3270 |" in out and "ptb=" in out  # the table, then the perplexity row


@needs_harness
@needs_data
def test_compare_scores_every_row_on_the_tasks(tiny_folder, capsys, monkeypatch):
    """`compare --tasks` adds the papers' accuracy (acc_norm where the task has it, else acc) to every row:
    the original's equals `eval --tasks` on the same model; a pruned row's differs; the table shows them."""
    monkeypatch.setenv("COMP_DATA_DIR", str(DATA))
    tasks, limit = "boolq,piqa", 8
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_folder), "--tasks", tasks, "--limit", str(limit),
                             "--json")
    assert code == 0, err
    alone = json.loads(out)["zeroshot"]
    expected = {"boolq": alone["results"]["boolq"]["acc,none"], "piqa": alone["results"]["piqa"]["acc_norm,none"]}
    assert alone["headline"] == expected
    code, out, err = run_cli(capsys, "compare", "--model", str(tiny_folder), "--methods", "magnitude",
                             "--sparsity", "0.9", "--tasks", tasks, "--limit", str(limit), "--calib", "wikitext2",
                             "--n-samples", "2", "--seq-len", "16", "--max-windows", "2", "--eval-seq-len", "64",
                             "--no-bytes", "--json")
    assert code == 0, err
    report = json.loads(out)
    original, masked = report["rows"]
    assert original["method"] == "original" and original["accuracy"] == expected
    assert masked["method"] == "magnitude" and set(masked["accuracy"]) == {"boolq", "piqa"}
    assert all(0.0 <= v <= 1.0 for v in masked["accuracy"].values())
    assert "acc boolq" in report["table"] and "mean acc" in report["table"]
    assert report["eval"]["tasks"] == ["boolq", "piqa"] and report["eval"]["task_limit"] == limit


def test_compare_limit_needs_tasks(tiny_folder, capsys):
    code, _, err = run_cli(capsys, "compare", "--model", str(tiny_folder), "--methods", "magnitude", "--limit", "5")
    assert code == 2 and "--limit applies to zero-shot --tasks" in err
