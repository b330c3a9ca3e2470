"""One JSON writer: strict documents (no NaN / Infinity), tensors and numpy values as plain numbers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from xmodal.cli_util import emit_json
from xmodal.jsonio import dumps, plain


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in {text!r}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_everywhere_in_the_document():
    doc = {"std": float("nan"), "inf": math.inf, "nested": [{"x": -math.inf}], "t": torch.tensor([1.0, float("nan")]),
           "np": np.float32("nan"), "ok": 1.5, ("a", 1): "tuple key", "set": {2, 1}, "path": Path("/x")}
    out = _strict(dumps(doc, sort_keys=True))
    assert out["std"] is None and out["inf"] is None and out["nested"] == [{"x": None}]
    assert out["t"] == [1.0, None] and out["np"] is None and out["ok"] == 1.5
    assert out["set"] == [1, 2] and out["path"] == "/x" and "('a', 1)" in out


def test_emit_json_prints_one_strict_document(capsys):
    emit_json({"mean": 50.0, "std": float("nan")})
    assert _strict(capsys.readouterr().out) == {"mean": 50.0, "std": None}


def test_plain_leaves_plain_values_alone():
    value = {"a": [1, "b", True, None, 2.5]}
    assert plain(value) == value and dumps(value) == json.dumps(value)
