"""The whole path through the command-line tools on tiny data, resume, and NaN losses."""

import csv
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mmengine.optim import OptimWrapper

from tests.conftest import bad_input_corpus, edit_task, edit_train
from waterdrop.config import load_registry
from waterdrop.engine.checkpoint import (
    RunFolderError,
    best_checkpoint,
    check_run_folder,
    load_checkpoint,
    load_net,
)
from waterdrop.engine.model import WaterdropModel
from waterdrop.engine.train import build_runner, run_training
from waterdrop.export import export_onnx

REPO = Path(__file__).resolve().parents[1]


def _run_tool(name, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def _tool(name, *args, timeout=600):
    done = _run_tool(name, *args, timeout=timeout)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


class InProcess:
    """A tool's ``main()`` run in this process: the same code path as the command line without
    a fresh interpreter (importing torch again costs seconds a call)."""

    def __init__(self, capsys, monkeypatch):
        self.capsys, self.monkeypatch = capsys, monkeypatch

    def run(self, name, *args) -> subprocess.CompletedProcess:
        main = runpy.run_path(str(REPO / "tools" / name))["main"]
        self.capsys.readouterr()
        self.monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
        code = main()
        captured = self.capsys.readouterr()
        return subprocess.CompletedProcess([name, *args], code, captured.out, captured.err)

    def __call__(self, name, *args) -> str:
        done = self.run(name, *args)
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout


def test_train_eval_export_predict_and_resume(registry_file, demo_root, tmp_path, capsys, monkeypatch):
    work = tmp_path / "run"
    in_process = InProcess(capsys, monkeypatch)  # the first training and predict.py run as commands
    out = _tool("train.py", registry_file, "--work-dir", work, "--epochs", "1")
    assert "epoch 1/1" in out and "disgusting: AP" in out and "scene_tags: mAP" in out
    for produced in ("results.csv", "summary.json", "run.json", "eval/metrics.json", "eval/thresholds.json",
                     "eval/disgusting_pr.png", "eval/disgusting_confusion.png", "eval/scene_tags_pr.png",
                     "config/registry.yaml"):
        assert (work / produced).is_file(), produced
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    # No floor on AP here: one epoch of about ten iterations learns nothing that holds (over
    # train seeds 0-5 the disgusting val AUC ranges 0.28-0.72, chance 0.5); learning is checked
    # by test_validation_scores_follow_the_training_labels. What holds: the demo's val split
    # (800 x 0.04 images, a quarter positive) is scored whole, each image once.
    disgusting = metrics["disgusting"]
    assert (disgusting["count"], disgusting["positives"]) == (32, 8) and disgusting["deploy"]["prevalence"] == 0.005
    assert sum(disgusting["at_threshold"][k] for k in ("tp", "fp", "fn", "tn")) == 32
    assert disgusting["at_threshold"]["tp"] + disgusting["at_threshold"]["fn"] == 8
    assert (metrics["thriller"]["count"], metrics["thriller"]["positives"]) == (24, 6)
    detector = metrics["scene_tags"]["detector"]
    assert set(detector["classes"]) == {"glasses", "ball"} and "micro_after_relations" in metrics["scene_tags"]
    assert "detector mAP@0.5" in out and "after the relation graph" in out

    out = in_process("train.py", registry_file, "--work-dir", work, "--epochs", "2", "--resume")
    assert "epoch 2/2" in out and "epoch 1/2" not in out
    with open(work / "results.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]

    edit_task(registry_file, "disgusting", loss_weight=2.0)  # a changed config cannot continue this run
    done = in_process.run("train.py", registry_file, "--work-dir", work, "--epochs", "3", "--resume")
    assert done.returncode == 2 and "config changed since this run started" in done.stderr
    assert "loss_weight: 1.0 -> 2.0" in done.stderr
    edit_task(registry_file, "disgusting", loss_weight=1.0)

    checkpoint = best_checkpoint(work)
    written = checkpoint.stat().st_mtime_ns
    out = in_process("eval.py", work, "--out", tmp_path / "eval2")
    assert "disgusting: AP" in out
    # The tool gives the numbers training reported for the same checkpoint.
    trained = json.loads((work / "eval" / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    for task, key in (("disgusting", "ap"), ("thriller", "ap"), ("scene_tags", "map")):
        assert evaluated[task][key] == pytest.approx(trained[task][key], abs=1e-6), task
    assert evaluated["disgusting"]["threshold"] == pytest.approx(trained["disgusting"]["threshold"], abs=1e-6)
    # Outputs: a default folder that has files gets a numbered sibling; a named one is refused
    # unless --overwrite; the checkpoint is written once, by training.
    out = in_process("eval.py", work)
    assert (work / "eval-2" / "thresholds.json").is_file() and str(work / "eval-2") in out
    done = in_process.run("eval.py", work, "--out", tmp_path / "eval2")
    assert done.returncode == 2 and "exists already; pass --overwrite" in done.stderr
    in_process("eval.py", work, "--out", tmp_path / "eval2", "--overwrite")
    assert checkpoint.stat().st_mtime_ns == written and "thresholds" not in load_checkpoint(checkpoint)["meta"].get(
        "waterdrop", {})
    out = in_process("export.py", work, "-o", tmp_path / "model.onnx")
    assert "disgusting.prob" in out and "scene_tags.prob" in out
    assert "thresholds from " + str(work / "eval" / "thresholds.json") in out  # beside the checkpoint
    done = in_process.run("export.py", work, "-o", tmp_path / "model.onnx")
    assert done.returncode == 2 and "model.onnx: the file exists already" in done.stderr
    # eval/ holds the kept checkpoint's thresholds: another checkpoint of the run is not given them.
    other = sorted(work.glob("epoch_*.pth"))[0]
    assert other != checkpoint
    done = in_process.run("export.py", other, "-o", tmp_path / "other.onnx")
    assert done.returncode == 2 and f"holds the thresholds chosen for {checkpoint.name}," in done.stderr
    out = in_process("export.py", work, "--cam")  # beside model.onnx, never over it
    assert (work / "model.cam.onnx").is_file() and not (work / "model.onnx").exists()
    image = sorted((demo_root / "disgusting" / "val").glob("*.jpg"))[0]
    out = _tool("predict.py", tmp_path / "model.onnx", image)
    result = json.loads(out.splitlines()[0])
    assert set(result["tasks"]) == {"disgusting", "thriller", "scene_tags"}


def test_a_run_folder_never_mixes_two_runs_and_must_be_writable(registry_file, tmp_path, monkeypatch):
    work = tmp_path / "run"
    work.mkdir()
    for name in ("best_val_score_epoch_9.pth", "best_val_score_epoch_12.pth"):
        (work / name).write_bytes(b"")
    with pytest.raises(RunFolderError, match="several best checkpoints .*epoch_12.*epoch_9.*pass the checkpoint"):
        best_checkpoint(work)
    with pytest.raises(RunFolderError, match="nothing to resume"):
        check_run_folder(tmp_path / "fresh", resume=True)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RunFolderError, match="a_file/run: cannot write the run folder there"):
        check_run_folder(tmp_path / "a_file" / "run", resume=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 0, 20 * 2**20))
    with pytest.raises(RunFolderError, match="fresh: 20 MiB free on that disk, a run needs about 350 MiB"):
        check_run_folder(tmp_path / "fresh", resume=False, checkpoint_bytes=100 * 2**20)
    done = _run_tool("train.py", registry_file, "--work-dir", work, timeout=300)
    assert done.returncode == 2 and "already holds a run (checkpoints); continue it with --resume" in done.stderr


def test_train_reports_config_errors_cleanly(registry_file, tmp_path):
    registry_file.write_text(registry_file.read_text().replace("backbone: test_resnet", "backbone: 5"))
    done = _run_tool("train.py", registry_file, "--work-dir", tmp_path / "w", timeout=300)
    assert done.returncode == 2
    assert "registry.yaml: key 'model.backbone': got 5 (int); expected a non-empty string" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("launcher, environment, generates", [
    ("none", {"RANK": "1"}, True),  # one process: rank 0, whatever a surrounding launcher set
    ("pytorch", {"RANK": "0"}, True),
    ("pytorch", {"RANK": "1"}, False),
    ("slurm", {"SLURM_PROCID": "2"}, False),
])
def test_the_train_tool_generates_the_demo_data_on_rank_0_alone(registry_file, monkeypatch, capsys, launcher,
                                                                 environment, generates):
    registry = yaml.safe_load(registry_file.read_text())
    registry["demo_data"] = "demo"
    registry_file.write_text(yaml.safe_dump(registry))
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    generated = []
    monkeypatch.setattr("waterdrop.data.demo.ensure_demo_data", lambda folder: generated.append(folder) or True)
    prepare_demo_data = runpy.run_path(str(REPO / "tools" / "train.py"))["prepare_demo_data"]
    prepare_demo_data(str(registry_file), launcher)
    folder = registry_file.parent / "demo"
    assert generated == ([folder] if generates else [])
    assert capsys.readouterr().out == (f"generated the demo data in {folder}\n" if generates else "")


def test_nonfinite_loss_skips_the_step_and_stops_when_it_persists(registry_file):
    model = WaterdropModel(load_registry(registry_file), max_nonfinite_streak=3)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"inputs": torch.full((4, 3, 64, 64), float("nan")), "task_index": torch.tensor([0, 0, 2, 2]),
             "targets": {"disgusting": torch.tensor([0, 1]), "scene_tags": torch.zeros(2, 10)}}
    for _ in range(2):
        assert model.train_step(batch, wrapper) == {"nonfinite_skipped": torch.tensor(1.0)}
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed, f"a skipped NaN batch changed {changed[:3]}"
    assert model.nonfinite_batches == 2
    with pytest.raises(FloatingPointError, match="3 batches in a row.*disgusting.loss_focal"):
        model.train_step(batch, wrapper)


def test_every_recipe_trains_evaluates_and_exports_together(registry_file, demo_root, tmp_path):
    edit_task(registry_file, "disgusting", data={"unlabeled": str(demo_root / "disgusting" / "unlabeled")},
              mean_teacher={"rampup_epochs": 0.5}, head={"pcb": {"size": 1, "stride": 1}},
              loss_prediction={"hidden": 16})
    edit_task(registry_file, "thriller", cascade={"backbone": "test_resnet", "hard_per_batch": 4},
              loss_prediction={"levels": [-2, -1], "detach": False},
              augment={"cutmix": 0.5}, sampler={"type": "balanced", "normal_fraction": 0.67},
              data={"test": str(tmp_path / "thriller_test.jsonl")})
    lines = [json.loads(line) for line in (demo_root / "thriller" / "val.jsonl").read_text().splitlines()]
    with open(tmp_path / "thriller_test.jsonl", "w") as f:
        for item in lines[: len(lines) // 2]:
            f.write(json.dumps({**item, "image": str(demo_root / "thriller" / item["image"])}) + "\n")
    printed = []
    report = run_training(registry_file, tmp_path / "run", printer=lambda *text, **_: printed.extend(text))
    # A task with a test split is reported there, at thresholds chosen on val; the others say in-sample.
    assert report["thriller"]["split"] == "test" and not report["thriller"]["in_sample"]
    assert report["thriller"]["count"] == len(lines) // 2 and report["thriller"]["val_summary"]["count"] == len(lines)
    assert report["disgusting"]["in_sample"] and report["scene_tags"]["split"] == "val"
    summary = "\n".join(printed)
    assert "thriller: on its test split" in summary and "disgusting: IN-SAMPLE" in summary
    with open(tmp_path / "run" / "results.csv") as f:
        columns = next(csv.reader(f))
    for term in ("disgusting.loss_consistency", "disgusting.loss_focal", "thriller.cascade_loss_focal",
                 "disgusting.loss_lossprediction", "thriller.loss_lossprediction"):
        assert term in columns, columns
    # Thriller's test split is scored at the threshold chosen on val, every image once. (Its AP
    # after one epoch is chance, 0.42 at prevalence 4/12 and AUC 0.47, so it is not checked.)
    thriller = report["thriller"]
    test_positives = sum(item["labels"] != ["normal"] for item in lines[: len(lines) // 2])
    assert thriller["positives"] == test_positives
    assert thriller["at_threshold"]["tp"] + thriller["at_threshold"]["fn"] == test_positives
    assert sum(thriller["at_threshold"][k] for k in ("tp", "fp", "fn", "tn")) == thriller["count"]
    # Deploy precision is the val precision with negatives weighted up to the deploy prevalence.
    disgusting = report["disgusting"]
    counts, prevalence = disgusting["at_threshold"], disgusting["deploy"]["prevalence"]
    weight = disgusting["positives"] / (disgusting["count"] - disgusting["positives"]) * (1 - prevalence) / prevalence
    assert disgusting["deploy"]["precision"] == pytest.approx(counts["tp"] / (counts["tp"] + weight * counts["fp"]))
    # The checkpoint stands alone: reordered labels in the live YAML change nothing.
    edit_task(registry_file, "scene_tags", labels=list(reversed(load_registry(registry_file).tasks[2].labels)))
    net, cfg, meta = load_net(best_checkpoint(tmp_path / "run"))
    assert cfg.tasks[2].labels == list(report["scene_tags"]["labels"])
    assert cfg.tasks[2].relations.closure["forest"] == {"tree"}
    features = [task.features for task in cfg.tasks]
    assert features[0]["mean_teacher"].rampup_epochs == 0.5 and features[1]["cascade"].hard_per_batch == 4
    assert features[1]["loss_prediction"].levels == [-2, -1] and not features[1]["loss_prediction"].detach
    with pytest.raises(ValueError, match="differs"):
        load_net(best_checkpoint(tmp_path / "run"), registry_file)
    assert (tmp_path / "run" / "config" / "resolved.json").is_file()
    thresholds = json.loads((tmp_path / "run" / "eval" / "thresholds.json").read_text())
    assert set(thresholds) == {"disgusting", "thriller", "scene_tags"} and "thresholds" not in meta
    assert thriller["threshold"] == pytest.approx(thresholds["thriller"])  # chosen on val, applied to test
    parity = export_onnx(net, cfg, thresholds, tmp_path / "model.onnx")
    assert "thriller.decision" in parity and "disgusting.predicted_loss" in parity and max(parity.values()) <= 1e-4


KILLED_RUN = """
import os, signal, sys
from waterdrop.engine.hooks import WaterdropHook
from waterdrop.engine.train import run_training

original = WaterdropHook.after_train_iter

def die_in_epoch_two(self, runner, batch_idx, data_batch=None, outputs=None):
    original(self, runner, batch_idx, data_batch, outputs)
    if runner.epoch == 1 and batch_idx == 2:
        os.kill(os.getpid(), signal.SIGKILL)

WaterdropHook.after_train_iter = die_in_epoch_two
run_training(sys.argv[1], sys.argv[2], epochs=2)
"""


def test_kill_minus_9_mid_epoch_then_resume_matches_an_uninterrupted_run(registry_file, tmp_path):
    text = yaml.safe_load(registry_file.read_text())
    text["train"]["num_workers"] = 1  # the workers' seeding is part of what must repeat
    registry_file.write_text(yaml.safe_dump(text))
    edit_task(registry_file, "disgusting", head={"dropout": 0.3}, augment={"cutmix": 0.5})
    _tool("train.py", registry_file, "--work-dir", tmp_path / "whole", "--epochs", "2")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN)
    killed = subprocess.run([sys.executable, str(script), str(registry_file), str(tmp_path / "cut")],
                            capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ,
                                                                                       "PYTHONPATH": str(REPO)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "cut" / "epoch_1.pth").is_file() and not (tmp_path / "cut" / "epoch_2.pth").exists()
    _tool("train.py", registry_file, "--work-dir", tmp_path / "cut", "--epochs", "2", "--resume")
    whole = load_checkpoint(tmp_path / "whole" / "epoch_2.pth")["state_dict"]
    cut = load_checkpoint(tmp_path / "cut" / "epoch_2.pth")["state_dict"]
    assert whole.keys() == cut.keys()
    worst = max(float((whole[k].double() - cut[k].double()).abs().max()) for k in whole if whole[k].numel())
    assert worst < 1e-5, worst
    with open(tmp_path / "whole" / "results.csv") as f, open(tmp_path / "cut" / "results.csv") as g:
        rows_whole, rows_cut = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["epoch"] for r in rows_cut] == ["1", "2"]
    assert float(rows_cut[1]["val/score"]) == pytest.approx(float(rows_whole[1]["val/score"]), abs=1e-6)


def test_training_survives_a_bad_input_corpus_and_names_every_skip(registry_file, demo_root, tmp_path):
    good, bad = bad_input_corpus(tmp_path / "odd")
    text = yaml.safe_load(registry_file.read_text())
    text["tasks"] = ["tasks/disgusting.yaml"]  # one task, plain sampler: an epoch visits every image
    registry_file.write_text(yaml.safe_dump(text))
    manifests, demo_lines = {}, {}
    for split in ("train", "val"):
        lines = (demo_root / "disgusting" / f"{split}.jsonl").read_text().splitlines()[:40]
        demo_lines[split] = len(lines)
        lines = [json.dumps({**json.loads(ln), "image": str(demo_root / "disgusting" / json.loads(ln)["image"])})
                 for ln in lines]
        lines += [json.dumps({"image": str(p), "labels": ["normal"]}) for p in good + bad]
        manifests[split] = tmp_path / f"{split}.jsonl"
        manifests[split].write_text("\n".join(lines) + "\n")
    edit_task(registry_file, "disgusting", sampler="plain",
              data={"train": str(manifests["train"]), "val": str(manifests["val"])})
    report = run_training(registry_file, tmp_path / "run", printer=lambda *a, **k: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"]["disgusting"] == sorted(str(p) for p in bad)
    with open(tmp_path / "run" / "results.csv") as f:
        assert int(next(csv.DictReader(f))["skipped_images"]) >= len(bad)
    assert report["disgusting"]["skipped_images"] == sorted(str(p) for p in bad)
    assert report["disgusting"]["count"] == demo_lines["val"] + len(good)  # every image scored once, none twice


def test_a_training_set_of_one_batch_trains_without_a_warm_up(tmp_path):
    from tests.test_noisy import _colour_task

    registry, _ = _colour_task(tmp_path, bad_files=False)
    settings = yaml.safe_load(registry.read_text())
    settings["train"].update(batch_size=256, epochs=1, warmup_epochs=0.5)  # half of one iteration
    registry.write_text(yaml.safe_dump(settings))
    runner = build_runner(load_registry(registry), tmp_path / "run", printer=lambda *a, **k: None)
    runner.train()
    assert (tmp_path / "run" / "epoch_1.pth").is_file()


def test_validation_scores_follow_the_training_labels(tmp_path):
    """One epoch on a task a tiny network learns in one (red vs blue noise), trained on its
    labels and on them inverted. An untrained net already ranks these images perfectly one way
    or the other (val AUC 1.0 at seed 0), so neither run alone shows learning; a pipeline that
    learns from its labels puts the two at opposite ends (observed AUC 1.0 and 0.0 for seeds
    0-5), one that does not gives the same AUC twice. Chance is 0.5; 12 of 24 val images are
    positive."""
    from tests.test_noisy import _colour_task

    auc = {}
    for inverted in (False, True):
        registry, _ = _colour_task(tmp_path / f"inverted_{inverted}", bad_files=False)
        edit_train(registry, epochs=1)
        train = registry.parent / "train.jsonl"
        if inverted:
            lines = [json.loads(line) for line in train.read_text().splitlines()]
            train.write_text("".join(json.dumps({**line, "labels": [] if line["labels"] else ["positive"]}) + "\n"
                                     for line in lines))
        report = run_training(registry, tmp_path / f"run_{inverted}", printer=lambda *a, **k: None)["colour"]
        assert (report["count"], report["positives"]) == (24, 12)
        auc[inverted] = report["roc_auc"]
    assert auc[False] >= 0.9 and auc[True] <= 0.1, auc


@pytest.mark.parametrize("kept", ["last", "best"])
def test_the_kept_checkpoint_is_the_one_evaluated_and_the_report_says_who_chose_it(registry_file, tmp_path, kept):
    edit_train(registry_file, checkpoint=kept)
    printed = []
    run_training(registry_file, tmp_path / "run", epochs=2, printer=lambda *text, **_: printed.extend(text))
    best_files = list((tmp_path / "run").glob("best_*.pth"))
    chosen = best_checkpoint(tmp_path / "run")  # what export and --from read
    if kept == "last":
        assert not best_files and chosen == tmp_path / "run" / "epoch_2.pth"
    else:
        assert best_files == [chosen]
    assert any(str(line).startswith(f"evaluated {chosen.name}") for line in printed)
    # The report claims that validation chose the weights only where it did.
    picked = "the checkpoint and the thresholds" if kept == "best" else "the thresholds"
    assert f"it also picked {picked}; add data.test" in "\n".join(map(str, printed))
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert all(task["val_picked_checkpoint"] == (kept == "best") for task in metrics.values())
    (tmp_path / "run").rename(tmp_path / "moved")  # mmengine's record still names the old folder
    assert best_checkpoint(tmp_path / "moved") == tmp_path / "moved" / chosen.name
