import subprocess
import sys

import pytest

from flows.cli import build_parser, main

SUBCOMMANDS = ["run", "stage", "models", "promote", "rollback", "sample", "compare", "schedule", "ui"]


def test_help_lists_every_subcommand():
    text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert f"    {name} " in text


def test_help_does_not_import_heavy_libraries(project_root):
    code = ("import sys; from flows.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'mlflow', 'prefect', 'great_expectations', 'dvc', 'onnxruntime') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=project_root, capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout


def test_bad_set_gives_one_line_and_nonzero_exit(project_root, monkeypatch, capsys):
    monkeypatch.chdir(project_root)
    code = main(["stage", "train", "digits-unet", "--set", "models.digits-unet.train.lr=fast"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == "genflow stage: models.digits-unet.train.lr: expected float, got 'fast'"


def test_unknown_dataset_for_stage(project_root, monkeypatch, capsys):
    monkeypatch.chdir(project_root)
    assert main(["stage", "ingest", "faces"]) == 1
    assert "datasets.faces: no such dataset; known: digits, pydoc" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run", "--only", "nope"], "models.nope: no such model"),
    (["run", "--set", "datasets.digits.source=imagefolder:/no/such/folder"], "imagefolder:/no/such/folder does not exist"),
    (["run", "--set", "storage.dvc_remote=/etc/hostname/remote"],
     "DVC remote storage.dvc_remote (/etc/hostname/remote): /etc/hostname is a file"),
])
def test_run_refuses_bad_input_before_work(project_root, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(project_root)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
