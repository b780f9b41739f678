import pytest
import yaml

from sppdet.config import CONFIG_DIR, Config, config_from_dict, dump_config, find_config, load_config
from sppdet.utils import SppdetError


def test_defaults_follow_the_paper():
    cfg = Config()
    assert cfg.model.levels == (6, 3, 2, 1) and cfg.model.scales == (688,)
    assert cfg.finetune.fg_fraction == 0.25 and cfg.finetune.bg_iou == (0.1, 0.5)
    assert (cfg.svm.C, cfg.svm.pos_weight, cfg.svm.bias_mult, cfg.svm.target_norm) == (1e-3, 2.0, 10.0, 20.0)
    assert cfg.test.nms == 0.3 and cfg.test.metric == "voc07"


def test_overrides_are_typed():
    cfg = load_config(None, ["svm.C=0.01", "model.scales=[480, 688]", "proposals.resize=null",
                             "data.classes=[apple, pear]", "finetune.lr=1"])
    assert cfg.svm.C == 0.01 and cfg.model.scales == (480, 688) and cfg.proposals.resize is None
    assert cfg.data.classes == ("apple", "pear")
    assert isinstance(cfg.finetune.lr, float)


@pytest.mark.parametrize("item, needle", [
    ("svm.Cx=1", "unknown config key svm.Cx; valid keys under svm: C, pos_weight"),
    ("nope=1", "unknown config key nope; valid keys under the top level: data"),
    ("svm.C=true", "config key svm.C: expected float, got True"),
    ("finetune.batch_size=1.5", "finetune.batch_size: expected int"),
    ("model.scales=688", "model.scales: expected a list"),
    ("finetune.bg_iou=[0.1]", "finetune.bg_iou: expected a list of 2 values"),
    ("model.backbone=lenet", "'lenet' is not one of zf5"),
    ("svm=3", "config key svm: expected a mapping"),
    ("svm.C", "expected key.sub=value"),
])
def test_bad_overrides_name_the_key(item, needle):
    with pytest.raises(SppdetError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [item])


def test_every_shipped_config_loads():
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert "voc07_zf5.yaml" in names and "demo.yaml" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.run.name == name[:-5]


def test_find_by_name_with_or_without_suffix_and_base(tmp_path):
    assert find_config("demo") == find_config("demo.yaml")
    (tmp_path / "base.yaml").write_text("svm:\n  C: 0.5\nmodel:\n  width: 0.5\n")
    (tmp_path / "exp.yaml").write_text("base: base.yaml\nsvm:\n  pos_weight: 3\n")
    cfg = load_config(tmp_path / "exp.yaml", ["model.width=0.25"])
    assert (cfg.svm.C, cfg.svm.pos_weight, cfg.model.width, cfg.run.name) == (0.5, 3.0, 0.25, "exp")
    with pytest.raises(SppdetError, match="config 'missing' not found"):
        load_config("missing")
    (tmp_path / "broken.yaml").write_text("svm: [unclosed\n")
    with pytest.raises(SppdetError, match="broken.yaml: invalid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["data.classes=[a, b]", "model.scales=[480, 576]"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg


@pytest.mark.parametrize("item, needle", [
    ("model.scales=[]", "model.scales: () is not allowed; expected a non-empty list of positive integers"),
    ("finetune.lr=1000", "finetune.lr: 1000.0 is not allowed; expected in (0, 1]"),
    ("finetune.iterations=-5", "finetune.iterations: -5 is not allowed; expected an integer >= 0"),
    ("finetune.batch_size=0", "finetune.batch_size: 0 is not allowed; expected an integer >= 1"),
    ("test.nms=1.5", "test.nms: 1.5 is not allowed; expected in [0, 1]"),
    ("finetune.bg_iou=[0.5,0.1]", "finetune.bg_iou"),
    ("run.device=gpu", "run.device: 'gpu' is not allowed; expected auto, cpu, cuda or cuda:N"),
    ("model.pixel_std=0", "model.pixel_std"),
    ("test.scorer=svn", "'svn' is not one of svm, softmax"),
    ("run.name=a/b", "run.name"),
])
def test_out_of_range_values_are_one_line_naming_the_key(item, needle):
    with pytest.raises(SppdetError) as e:
        load_config(None, [item])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_nested_base_chain_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("svm:\n  C: 0.5\n  pos_weight: 3\nmodel:\n  width: 0.5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nsvm:\n  C: 0.25\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\nmodel:\n  fc_dim: 64\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.svm.C, cfg.svm.pos_weight, cfg.model.width, cfg.model.fc_dim) == (0.25, 3.0, 0.5, 64)
    (tmp_path / "a.yaml").write_text("base: c.yaml\n")
    with pytest.raises(SppdetError, match="circular base: chain"):
        load_config(tmp_path / "c.yaml")


def test_an_unknown_device_fails_before_the_run_writes_anything(tmp_path, monkeypatch):
    import torch

    from sppdet import engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config("demo", [f"run.output_dir={tmp_path}", "run.device=cuda"])
    with pytest.raises(SppdetError, match="no CUDA device"):
        engine.run_training(cfg)
    assert not any(tmp_path.iterdir())
