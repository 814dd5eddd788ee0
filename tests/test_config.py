from dataclasses import dataclass, field

import pytest
import yaml

from cpfean.config import (
    Config,
    ConfigError,
    from_dict,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5  # a float
    steps: list[int] = field(default_factory=lambda: [1, 2])  # a list
    name: str | None = None  # optional


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)  # a section
    flag: bool = False  # a bool
    count: int = 3  # an int


def test_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  rate: 0.1\ncount: 7\n")
    cfg = load_config(path, ["inner.rate=2", "flag=true", "inner.steps=[4, 5]"], cls=Outer)
    assert cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float)
    assert load_config(None, ["inner.rate=2e-3"], cls=Outer).inner.rate == 0.002
    assert cfg.count == 7  # from the file
    assert cfg.flag is True
    assert cfg.inner.steps == [4, 5]
    assert cfg.inner.name is None


def test_unknown_key_names_key_and_suggests():
    expected = r"unknown config key 'inner\.rat'.*did you mean 'inner\.rate'"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["inner.rat=1"], cls=Outer)
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        from_dict(Outer, {"bogus": 1})


@pytest.mark.parametrize(
    "override, key",
    [
        ("count=1.5", "count"),
        ("flag=3", "flag"),
        ("inner.rate=fast", "inner.rate"),
        ("inner.steps=[1, x]", r"inner.steps\[1\]"),
        ("count=true", "count"),
    ],
)
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: expected"):
        load_config(None, [override], cls=Outer)


def test_section_given_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match="inner: expected a mapping"):
        from_dict(Outer, {"inner": 3})


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["count"])
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml", cls=Outer)


def test_frozen():
    cfg = load_config(None, [], cls=Outer)
    with pytest.raises(AttributeError):
        cfg.count = 4


def test_the_real_config_is_frozen_all_the_way_down():
    cfg = load_config(None, ["train.lr_decay_epochs=[3, 5]"])
    assert cfg.train.lr_decay_epochs == (3, 5)  # a tuple: nothing inside can change
    for section, key in ((cfg.model, "topk"), (cfg.train, "epochs"), (cfg.data, "val_limit")):
        with pytest.raises(AttributeError):
            setattr(section, key, 1)


def test_every_bounded_field_refuses_the_value_just_outside_its_range():
    """The range beside each field is the one enforced: one step past it is an error naming
    the key, the bound itself (where allowed) is not."""
    from cpfean.config import _leaves
    from cpfean.fields import bounds_of

    checked = 0
    for key, value, f in _leaves(Config()):
        low, above, below = bounds_of(f)
        step = 1 if isinstance(value, int) else 1e-3
        for bound, outside, allowed in ((low, -step, True), (above, 0, False), (below, 0, False)):
            if bound is None:
                continue
            bad = bound + outside  # the bound itself for the strict ones
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                load_config(None, [f"{key}={bad}"])
            if allowed and not (key == "model.region_heads" or key == "model.embed_dim"):
                load_config(None, [f"{key}={bound}"])
            checked += 1
    assert checked >= 20


def test_frozen_text_layers_are_checked_against_the_encoder_before_any_work():
    """MiniLM has 6 layers: 6 may be frozen, 7 is one error naming the key and the count."""
    assert load_config(None, ["model.text_frozen_layers=6"]).model.text_frozen_layers == 6
    with pytest.raises(ConfigError, match=r"model\.text_frozen_layers: 7 is more than the 6"):
        load_config(None, ["model.text_frozen_layers=7"])
    with pytest.raises(ConfigError, match="the 2 layers of text encoder 'tiny-random'"):
        load_config(None, ["model.text_encoder=tiny-random", "model.text_frozen_layers=3"])


def test_full_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["train.lr=0.001", "model.topk=2", "model.max_words=20"])
    assert isinstance(cfg, Config)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == to_dict(cfg)
    assert again.train.lr == 0.001 and again.model.topk == 2 and again.model.max_words == 20


def test_shipped_yaml_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert configs, "no configs/*.yaml shipped"
    for path in configs:
        load_config(path)


def test_base_chain_and_bad_yaml(tmp_path):
    (tmp_path / "base.yaml").write_text("count: 5\ninner:\n  rate: 0.25\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ninner:\n  name: x\n")
    cfg = load_config(tmp_path / "child.yaml", ["count=6"], cls=Outer)
    assert (cfg.count, cfg.inner.rate, cfg.inner.name) == (6, 0.25, "x")
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml", cls=Outer)
    (tmp_path / "bad.yaml").write_text("count: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml", cls=Outer)


def test_renamed_keys_are_still_read_with_one_note(tmp_path, caplog):
    """Old names (in existing configs and checkpoints) map to the new ones."""
    import logging

    from cpfean.config import Config, from_dict, load_config

    old = tmp_path / "old.yaml"
    old.write_text("train:\n  warmup_epochs: 4\n  prominence_weight: 0.5\n")
    with caplog.at_level(logging.WARNING, logger="cpfean.config"):
        cfg = load_config(old)
    assert cfg.train.all_negatives_epochs == 4 and cfg.train.recurrence_weight == 0.5
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [
        "note: config key 'train.warmup_epochs' is now 'train.all_negatives_epochs'",
        "note: config key 'train.prominence_weight' is now 'train.recurrence_weight'",
    ]
    assert from_dict(Config, {"train": {"warmup_epochs": 2}}).train.all_negatives_epochs == 2
    with pytest.raises(ConfigError, match="both train.warmup_epochs and its new name"):
        load_config(None, ["train.warmup_epochs=1", "train.all_negatives_epochs=2"])
