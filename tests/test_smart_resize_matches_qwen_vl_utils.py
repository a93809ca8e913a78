"""Our ``smart_resize`` must size images exactly like qwen-vl-utils, which we cannot import (it imports
torchvision at module level). The test compiles qwen-vl-utils' own resizing functions from its source file
in isolation and compares on many sizes."""

from __future__ import annotations

import ast
import importlib.util
import math
import random
from pathlib import Path

import pytest

from vision.modeling import smart_resize

WANTED = {"round_by_factor", "ceil_by_factor", "floor_by_factor", "smart_resize"}


def _reference():
    spec = importlib.util.find_spec("qwen_vl_utils")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-vl-utils is not installed")
    source = Path(spec.submodule_search_locations[0], "vision_process.py").read_text()
    tree = ast.parse(source)
    keep = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in WANTED]
    keep += [node for node in tree.body if isinstance(node, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
             and isinstance(node.value, (ast.Constant, ast.BinOp))]
    namespace = {"math": math, "Optional": object, "Tuple": object}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "qwen_vl_utils_subset", "exec"), namespace)
    return namespace["smart_resize"]


def test_same_sizes_as_qwen_vl_utils():
    reference = _reference()
    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.randint(28, 3000), rng.randint(28, 3000)
        factor = rng.choice([28, 32])
        lo = factor * factor * rng.randint(1, 16)
        hi = lo * rng.randint(1, 400)
        expected = reference(h, w, factor, lo, hi)
        # Where qwen-vl-utils floors a thin side to 0 pixels (an unusable image), ours keeps one patch row.
        expected = tuple(max(factor, side) for side in expected)
        assert smart_resize(h, w, factor, lo, hi) == expected, (h, w, factor, lo, hi)
