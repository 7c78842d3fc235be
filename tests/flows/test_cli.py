import os
import subprocess
import sys

import pytest

from flows.cli import build_parser, main

SUBCOMMANDS = ["run", "stage", "models", "promote", "rollback", "sample", "compare", "schedule", "watch", "ui",
               "serve"]


def test_help_lists_every_subcommand():
    text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert f"    {name} " in text


def test_help_does_not_import_heavy_libraries(project_root):
    code = ("import sys; from flows.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'mlflow', 'prefect', 'great_expectations', 'dvc', 'onnxruntime')\n"
            "         if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=project_root, capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout


def test_bad_set_gives_one_line_and_nonzero_exit(project_root, monkeypatch, capsys):
    monkeypatch.chdir(project_root)
    code = main(["stage", "train", "digits-unet", "--set", "models.digits-unet.train.lr=fast"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == "genflow stage: models.digits-unet.train.lr: expected float, got 'fast'"


def test_stage_train_refuses_a_device_this_machine_lacks(project_root, monkeypatch, capsys):
    monkeypatch.chdir(project_root)
    assert main(["stage", "train", "digits-unet", "--set", "models.digits-unet.train.device=cuda:99"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("genflow stage: models.digits-unet.train.device: 'cuda:99', but") and "\n" not in err


def test_unknown_dataset_for_stage(project_root, monkeypatch, capsys):
    monkeypatch.chdir(project_root)
    assert main(["stage", "ingest", "faces"]) == 1
    assert "datasets.faces: no such dataset; known: digits, pydoc" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run", "--only", "nope"], "models.nope: no such model"),
    (["run", "--set", "datasets.digits.source=imagefolder:/no/such/folder"],
     "imagefolder:/no/such/folder does not exist"),
    (["run", "--set", "storage.dvc_remote=/etc/hostname/remote"],
     "DVC remote storage.dvc_remote (/etc/hostname/remote): /etc/hostname is a file"),
    (["run", "--set", "models.digits-gpt.train.precision=fp64"],
     "models.digits-gpt.train.precision: 'fp64' is not a precision; use one of auto, fp32, bf16, fp16"),
    (["run", "--set", "models.digits-gpt.train.device=cuda:99"], "models.digits-gpt.train.device: 'cuda:99', but"),
])
def test_run_refuses_bad_input_before_work(project_root, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(project_root)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# One error root: a GenflowError is one line; anything else is a bug and shows its traceback
# ---------------------------------------------------------------------------

def test_a_genflow_error_is_one_line_and_exit_1(project_root, monkeypatch, capsys):
    from components.errors import ModelError
    from flows import stages

    def refuse(params, stage, key, root):
        raise ModelError("models.digits-unet: cannot train\nsecond line, never printed")

    monkeypatch.chdir(project_root)
    monkeypatch.delenv("GENFLOW_DEBUG", raising=False)
    monkeypatch.setattr(stages, "run_stage", refuse)
    assert main(["stage", "train", "digits-unet"]) == 1
    assert capsys.readouterr().err == "genflow stage: models.digits-unet: cannot train\n"


@pytest.mark.parametrize("bug, last_line", [("1 / 0", "ZeroDivisionError: division by zero"),
                                            ("int('x')", "ValueError: invalid literal for int() with base 10: 'x'")])
def test_a_bug_shows_its_traceback_and_exits_nonzero(project_root, bug, last_line):
    """Not a GenflowError (a plain ValueError included): the traceback is what finds the bug."""
    code = ("import sys\n"
            "from flows import stages\n"
            "def broken(params, stage, key, root):\n"
            f"    return {bug}\n"
            "stages.run_stage = broken\n"
            "from flows.cli import main\n"
            "sys.exit(main(['stage', 'train', 'digits-unet']))\n")
    env = {k: v for k, v in os.environ.items() if k != "GENFLOW_DEBUG"}
    res = subprocess.run([sys.executable, "-c", code], cwd=project_root, env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr and "in broken" in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == last_line
    assert "genflow stage:" not in res.stderr


def test_every_error_class_of_genflow_derives_from_genflow_error():
    """The CLI prints one line only for a GenflowError: an error class outside that root would turn
    a user's mistake into a traceback."""
    import importlib
    import pkgutil

    import components
    from components.errors import GenflowError

    found = []
    for info in pkgutil.walk_packages(components.__path__, "components."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == info.name:
                found.append(obj)
                assert issubclass(obj, GenflowError) or name == "Interrupted", f"{info.name}.{name}"
    assert len(found) >= 20   # the walk saw the code base, not an empty package
