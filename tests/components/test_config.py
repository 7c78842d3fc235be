import shutil

import pytest

from components.config import ParamsError, apply_quick, load_params


@pytest.fixture
def params_file(tmp_path, project_root):
    p = tmp_path / "params.yaml"
    shutil.copy(project_root / "params.yaml", p)
    return p


def test_default_params_load_into_dataclasses(params_file):
    params = load_params(params_file)
    assert set(params.models) >= {"digits-unet", "digits-gpt", "pydoc-gpt"}
    unet = params.model("digits-unet")
    assert unet.family == "diffusion" and unet.backbone == "unet" and unet.dataset == "digits"
    assert isinstance(unet.train.lr, float) and isinstance(unet.unet.channels, list)
    assert params.datasets["digits"].source == "builtin:digits"
    assert params.schedule.cron == "0 3 * * *"


def test_set_overrides_any_key(params_file):
    params = load_params(params_file, ["models.digits-unet.train.max_steps=200",
                                       "datasets.digits.source=imagefolder:/data/my images",
                                       "models.digits-unet.unet.channels=[16, 32, 64]",
                                       "models.pydoc-gpt.train.lr=3e-4"])
    assert params.model("digits-unet").train.max_steps == 200
    assert params.datasets["digits"].source == "imagefolder:/data/my images"
    assert params.model("digits-unet").unet.channels == [16, 32, 64]
    assert params.model("pydoc-gpt").train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("override, message", [
    ("models.digits-unet.train.lr=fast", "models.digits-unet.train.lr: expected float, got 'fast'"),
    ("models.digits-unet.trian.lr=1", "models.digits-unet.trian: unknown key"),
    ("models.digits-unet.train.max_steps=2.5", "models.digits-unet.train.max_steps: expected int"),
    ("models.digits-unet.diffusion.schedule=quadratic", "models.digits-unet.diffusion.schedule: expected one of"),
    ("models.digits-unet.dataset=faces", "models.digits-unet.dataset: unknown dataset 'faces'"),
    ("models.pydoc-gpt.backbone=unet", "models.pydoc-gpt.backbone: unet needs an image dataset"),
    ("datasets.digits.source=digits", "datasets.digits.source: 'digits' is not KIND:VALUE"),
    ("datasets.digits.split.test=1.5", "datasets.digits.split"),
    ("models.digits-unet.train.max_steps", "expected KEY=VALUE"),
    ("models.digits-unet.eval.inpaint_label_completions=0",
     "models.digits-unet.eval.inpaint_label_completions: must be >= 1"),
])
def test_bad_params_name_the_key(params_file, override, message):
    with pytest.raises(ParamsError) as err:
        load_params(params_file, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_broken_files_are_named(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml: not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ParamsError, match="bad.yaml: line 2 is not valid YAML"):
        load_params(bad)


def test_unknown_model_lookup_lists_known(params_file):
    params = load_params(params_file)
    with pytest.raises(ParamsError, match="models.nope: no such model; known: digits-unet"):
        params.model("nope")


def test_quick_shrinks_budgets_only(params_file):
    params = load_params(params_file)
    full = params.model("digits-unet").train.max_seconds
    apply_quick(params)
    m = params.model("digits-unet")
    assert m.train.max_seconds == min(full, params.pipeline.quick.max_seconds)
    assert m.eval.sampler_sweep == params.pipeline.quick.sampler_sweep
    assert m.unet.channels == [32, 64] or m.unet.channels  # the network itself is unchanged


def test_section_hash_changes_with_its_section_only(params_file):
    a = load_params(params_file)
    b = load_params(params_file, ["models.digits-unet.train.max_steps=7"])
    assert a.section_hash("models", "digits-unet") != b.section_hash("models", "digits-unet")
    assert a.section_hash("models", "pydoc-gpt") == b.section_hash("models", "pydoc-gpt")


def test_digits_captions_is_declared_but_a_plain_run_does_not_prepare_it(params_file):
    from flows.preflight import select_models

    params = load_params(params_file)
    dc = params.dataset("digits-captions")
    assert dc.source == "builtin:digits-captions" and dc.kind == "captions"
    assert dc.caption_validation.max_chars == 64 and dc.captions.phrasings == 3
    # the retrain flow prepares the datasets of the models it runs (flows/retrain.prepare_datasets)
    used = {params.model(k).dataset for k in select_models(params, None)}
    assert "digits-captions" not in used and {"digits", "pydoc"} <= used
