"""Typed config: YAML mapping, unknown keys refused, flag overrides."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import ValidationError

from chameleon.config import ChameleonConfig, MarkerName
from chameleon.core.markers import MARKERS


def test_yaml_sections_and_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("synth:\n  pairs_per_user: 4\nsubspace:\n  site: residual\n")
    cfg = ChameleonConfig.from_yaml(path)
    assert cfg.synth.pairs_per_user == 4 and cfg.subspace.site == "residual"
    assert cfg.subspace.theta_n == "ccs" and cfg.edit.alpha == 1.0  # defaults of DESIGN section 4


def test_unknown_keys_and_bad_values_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("synth:\n  pairs_per_usr: 4\n")
    with pytest.raises(ValidationError, match="pairs_per_usr"):
        ChameleonConfig.from_yaml(path)
    with pytest.raises(ValidationError):
        ChameleonConfig().with_overrides({"subspace.site": "attention"})
    with pytest.raises(ValidationError):
        ChameleonConfig().with_overrides({"synth.pairs_per_user": 0})
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        ChameleonConfig.from_yaml(path)


def test_overrides_skip_none_and_reject_unknown_settings():
    cfg = ChameleonConfig().with_overrides({"groups.n_groups": 4, "job.num_actors": None})
    assert cfg.groups.n_groups == 4 and cfg.job.num_actors == 1
    with pytest.raises(ValueError, match="unknown setting"):
        ChameleonConfig().with_overrides({"groups.k": 4})


def test_every_field_is_documented():
    import ast
    import inspect

    import chameleon.config as module

    tree = ast.parse(inspect.getsource(module))
    for cls in (
        n
        for n in tree.body
        if isinstance(n, ast.ClassDef) and n.name.endswith("Config") and n.name != "ChameleonConfig"
    ):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                documented = isinstance(nxt, ast.Expr) and isinstance(
                    getattr(nxt, "value", None), ast.Constant
                )
                assert documented, f"{cls.name}.{node.target.id} has no docstring"


def test_boolean_settings_are_switches_not_strings():
    """`--calibrate` / `--no-calibrate`: a value such as "false" is an error, never a silent True."""
    import argparse

    from chameleon.evaluation.cli import EVAL_FLAGS
    from chameleon.flags import add_flags, flag_overrides

    p = argparse.ArgumentParser()
    add_flags(p, EVAL_FLAGS, ChameleonConfig())
    assert flag_overrides(p.parse_args(["--calibrate"]), EVAL_FLAGS) == {"edit.calibrate": True}
    assert flag_overrides(p.parse_args(["--no-calibrate"]), EVAL_FLAGS) == {"edit.calibrate": False}
    assert "edit.calibrate" not in flag_overrides(p.parse_args([]), EVAL_FLAGS)  # the config decides
    with pytest.raises(SystemExit):
        p.parse_args(["--calibrate", "false"])


def test_marker_settings_name_known_markers_once():
    assert ChameleonConfig().edit.markers == [], "off: the embedded model carries no marker readably"
    assert set(get_args(MarkerName)) == set(MARKERS), "the config's names are the detector's"
    with pytest.raises(ValidationError, match="emoticon"):
        ChameleonConfig.model_validate({"edit": {"markers": ["caps"]}})
    with pytest.raises(ValidationError, match="listed twice"):
        ChameleonConfig.model_validate({"edit": {"markers": ["hashtag", "hashtag"]}})
    assert ChameleonConfig.model_validate({"edit": {"markers": ["emoticon"]}}).edit.markers == ["emoticon"]
