"""The launchers' configuration (rcllm_jax/settings.py): flags generated from the settings
dataclasses, TOML presets under them, the command line winning, typos and bad values refused."""

import dataclasses

import pytest
from absl import app, flags

from rcllm_jax.settings import (BenchSettings, CatalogSettings, EngineSettings, FineTuneSettings, MeshSettings,
                                ModelSettings, ServingSettings, TrainSettings, define_flags, read)

SERVED = (ModelSettings, CatalogSettings, MeshSettings, EngineSettings, ServingSettings)  # serve.py's
BENCH = (BenchSettings, ModelSettings, CatalogSettings, MeshSettings)  # bench.py's (its own cache budgets)
TRAIN = (TrainSettings, ModelSettings)  # train.py's
FINE_TUNE = (FineTuneSettings, ModelSettings)  # train_label.py's (less the head fields)


def _flags(*classes, argv=(), **defaults):
    fv = flags.FlagValues()
    define_flags(*classes, flag_values=fv, **defaults)
    fv(["prog", *argv])
    return fv


@pytest.mark.parametrize("group", [SERVED, BENCH, TRAIN, FINE_TUNE])
def test_every_field_is_a_flag_with_its_default(group):
    fv = _flags(*group)
    for cls in group:
        got = read(cls, flag_values=fv)
        assert got == cls()  # nothing given: the dataclass defaults
        for f in dataclasses.fields(cls):
            assert fv[f.name].help.endswith(f.metadata["help"])
    if BenchSettings in group:
        assert fv["modes"].value == ["full"] and read(BenchSettings, flag_values=fv).modes == ("full",)
    if group is not SERVED:
        return
    assert set(fv["placement"].parser.enum_values) == {"coaccess", "similarity", "hash"}
    assert fv["serving_step"].parser.enum_values == ["auto", "batched", "serial"]


def test_command_line_values_are_typed_and_bounded():
    fv = _flags(MeshSettings, EngineSettings, argv=["--mesh=items:4", "--replicate=0.25", "--norebuild_on_damage",
                                                    "--user_cache_mb=512"])
    layout, eng = read(MeshSettings, EngineSettings, flag_values=fv)
    assert layout == MeshSettings(mesh="items:4", replicate=0.25)
    assert eng.rebuild_on_damage is False and eng.user_cache_mb == 512.0
    with pytest.raises(flags.IllegalFlagValueError, match="replicate"):
        _flags(MeshSettings, argv=["--replicate=1.5"])
    with pytest.raises(flags.IllegalFlagValueError, match="kv_dtype"):
        _flags(MeshSettings, argv=["--kv_dtype=fp8"])


def test_a_launcher_overrides_a_default_and_leaves_fields_out():
    fv = _flags(EngineSettings, exclude=("mode",), max_candidates=100)
    assert "mode" not in fv
    eng = read(EngineSettings, flag_values=fv)
    assert eng.max_candidates == 100 and eng.mode == "rcllm"  # left out: the dataclass default
    with pytest.raises(ValueError, match="no field"):
        define_flags(EngineSettings, flag_values=flags.FlagValues(), max_candiates=100)


def test_preset_sets_what_the_command_line_does_not(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[mesh]\nmesh = "items:2"\nreplicate = 0\n[catalog]\nhistory_len = 9\nmax_items = 40\n'
                      '[serving]\nmax_batch = 4\nadapt_queue_bound = true\n[model]\nhead = "label"\n')
    fv = _flags(*SERVED, argv=[f"--config={preset}", "--history_len=5"])
    model, catalog, layout, _, srv = read(*SERVED, flag_values=fv)
    assert catalog == CatalogSettings(history_len=5, max_items=40)  # the command line wins
    assert layout.mesh == "items:2" and layout.replicate == 0.0 and isinstance(layout.replicate, float)
    assert srv == ServingSettings(max_batch=4, adapt_queue_bound=True)
    assert model == ModelSettings(head="label")


@pytest.mark.parametrize("text, message", [
    ('[catalog]\nhistory_lenn = 5\n', "unknown key catalog.history_lenn"),
    ('[mesh]\nkv_dtype = "fp8"\n', "mesh.kv_dtype = 'fp8'"),
    ('[serving]\nport = "eighty"\n', "serving.port"),
    ('mesh = "items:2"\n', "must be a [section]"),
    ('[mesh\n', "p.toml"),
])
def test_bad_presets_are_refused_naming_the_key(tmp_path, text, message):
    preset = tmp_path / "p.toml"
    preset.write_text(text)
    fv = _flags(*SERVED, argv=[f"--config={preset}"])
    with pytest.raises(app.UsageError) as e:
        read(ModelSettings, flag_values=fv)
    assert message in str(e.value) and str(preset) in str(e.value)


def test_bench_preset_sets_list_flags(tmp_path):
    preset = tmp_path / "b.toml"
    preset.write_text('[bench]\nmodes = ["full", "rcllm"]\nsweep = ["0.3"]\nnum_users = 7\n')
    fv = _flags(*BENCH, argv=[f"--config={preset}", "--num_candidates=9"])
    bench = read(BenchSettings, flag_values=fv)
    assert bench == BenchSettings(modes=("full", "rcllm"), sweep=("0.3",), num_users=7, num_candidates=9)


def test_the_shipped_training_presets_read(tmp_path):
    """configs/train_cpu.toml and train_gpu.toml set only TrainSettings fields, typed."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for name in ("train_cpu.toml", "train_gpu.toml"):
        fv = _flags(*TRAIN, argv=[f"--config={root / 'configs' / name}"])
        t = read(TrainSettings, flag_values=fv)
        assert isinstance(t.l2, tuple) and all(float(x) > 0 for x in t.l2) and t.validation_position == 4


def test_the_shipped_label_presets_read_and_bad_combinations_are_refused():
    """configs/label_cpu.toml and label_gpu.toml set FineTuneSettings fields (the values written in
    them come back typed); a batch that micro-batches do not divide is a usage error naming both."""
    import tomllib
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for name in ("label_cpu.toml", "label_gpu.toml"):
        path = root / "configs" / name
        fv = _flags(*FINE_TUNE, argv=[f"--config={path}"])
        got = dataclasses.asdict(read(FineTuneSettings, flag_values=fv))
        assert tomllib.loads(path.read_text())["train"].items() <= got.items()
    fv = _flags(*FINE_TUNE, argv=["--batch_size=6", "--micro_batch=4"])
    with pytest.raises(app.UsageError, match="batch_size=6 is not a multiple of micro_batch=4"):
        read(FineTuneSettings, flag_values=fv)
