"""`python tests/multihost_worker.py ARGS` is `python -m scgcm.train ARGS` with a cheap stand-in for the
Inception network (about 5 images/s on these CPUs), so that a multi-process test run can compute FIDs.
The stand-in is test_evaluate.py's: Inception's contract ((b, 299, 299, 3) in [-1, 1] → (b, d))."""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class StandIn(eqx.Module):
    w: Float[Array, "3 6"]

    def __call__(self, x: Float[Array, "b 299 299 3"]) -> Float[Array, "b 6"]:
        return jnp.mean(jnp.tanh(4 * x[:, ::13, ::13] @ self.w), axis=(1, 2))


def stand_in() -> StandIn:
    return StandIn(jax.random.normal(jax.random.key(1), (3, 6)))


if __name__ == "__main__":
    from scgcm import train
    from scgcm.eval import inception

    inception.load_inception = stand_in  # what train() builds its FeatureExtractor from
    sys.exit(train.main())
