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
