"""The original code's checkpoint arrays (experiments/original_tree.json, written from the original's
own init by experiments/original_tree.py) against scgcm's paper model: per network, the same number of
arrays, the same total and the same multiset of sizes, so a one-to-one name-and-shape table between the
two (the converter of issue 22, part 3) exists with every array used once, up to transposes."""

import collections
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import pytest

from scgcm.run.config import TrainConfig, build_model

TREE = json.loads((Path(__file__).parent.parent / "experiments" / "original_tree.json").read_text())


@pytest.fixture(scope="module")
def paper_model():
    return eqx.filter_eval_shape(lambda k: build_model(TrainConfig().model, key=k), jr.key(0))


@pytest.mark.parametrize("part, item, count, numbers", [("torso", "diffusion", 445, 56_395_651),
                                                        ("head", "head", 210, 26_243_715)])
def test_paper_model_arrays_pair_with_the_originals(paper_model, part, item, count, numbers):
    ours = [x for x in jax.tree_util.tree_leaves(getattr(paper_model, part)) if isinstance(x, jax.ShapeDtypeStruct)]
    theirs = TREE[item]["params"]
    assert len(ours) == len(theirs) == count
    sizes = collections.Counter(int(np.prod(x.shape)) for x in ours)
    assert sum(k * v for k, v in sizes.items()) == numbers
    assert sizes == collections.Counter(int(np.prod(shape)) for _, shape, _ in theirs)

