"""Mesh construction, regex sharding rules on converted (annotation-free) parameter trees, and
host batches placed on the mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from parrot_jax import hub, parallel


def test_make_mesh_shapes_and_errors():
    mesh = parallel.make_mesh({"fsdp": 2, "data": -1})
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert parallel.batch_axes(mesh) == ("data", "fsdp")
    for shape, message in [({"data": 3}, "needs 3 devices"), ({"data": -1, "fsdp": -1}, "one"),
                           ({"data": -1, "fsdp": 3}, "not divisible"),
                           ({"batch": 8}, "not among"), ({"data": 0}, "positive")]:
        with pytest.raises(ValueError, match=message):
            parallel.make_mesh(shape)


def test_rules_first_match_wins():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    params = {"embed": {"embedding": jnp.zeros((1000, 64))},
              "block": {"kernel": jnp.zeros((64, 512)), "bias": jnp.zeros((512,))},
              "conv": {"kernel": jnp.zeros((3, 3, 64, 128))},
              "odd": {"kernel": jnp.zeros((257, 127))}}
    rules = [(r"^embed/", "replicate"), (r"odd", "replicate"), (r".*", "fsdp")]
    specs = parallel.param_specs(params, rules, mesh)
    assert specs["embed"]["embedding"] == P()  # first rule, although '.*' -> fsdp also matches
    assert specs["block"]["kernel"] == P(None, "fsdp")  # largest divisible dimension
    assert specs["block"]["bias"] == P()  # below MIN_FSDP_SIZE: stays replicated
    assert specs["conv"]["kernel"] == P(None, None, None, "fsdp")
    assert specs["odd"]["kernel"] == P()
    with pytest.raises(ValueError, match="odd/kernel .* no dimension is divisible"):
        parallel.param_specs(params, [(r".*", "fsdp")], mesh)
    with pytest.raises(ValueError, match="no sharding rule matches parameter block/bias"):
        parallel.param_specs(params, [(r"kernel|embedding", "replicate")], mesh)
    with pytest.raises(ValueError, match="kind must be"):
        parallel.param_specs(params, [(r".*", "shard")], mesh)
    # Flat dicts keyed by '/'-joined paths (the train state's trainable subset) match the same.
    flat = {"block/kernel": params["block"]["kernel"]}
    assert parallel.param_specs(flat, rules, mesh)["block/kernel"] == P(None, "fsdp")


def test_fsdp_rules_on_a_converted_unet(sd1_unet):
    """A diffusers checkpoint carries no annotations: regex rules over its paths shard it."""
    _, params = hub.load_unet(sd1_unet[1])
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    sharded = parallel.shard_params(params, parallel.FSDP_ALL, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(sharded)
    fsdp = [p for p, x in leaves if "fsdp" in x.sharding.spec]
    assert fsdp and all(x.size >= parallel.MIN_FSDP_SIZE for p, x in leaves
                        if "fsdp" in x.sharding.spec)
    for _, x in leaves:  # every shard holds 1/4 of a sharded tensor (replicated over data)
        if "fsdp" in x.sharding.spec:
            assert x.addressable_shards[0].data.size * 4 == x.size
    # Values are untouched by placement.
    ref = jax.tree.leaves(params)
    for a, b in zip(ref, jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_put_batch():
    mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
    batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "k": np.arange(16)}
    placed = parallel.put_batch(batch, mesh)
    assert placed["x"].sharding.spec == P(("data", "fsdp"))
    assert len(placed["x"].addressable_shards) == 8
    assert placed["x"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(placed["x"]), batch["x"])
    with pytest.raises(ValueError, match="divisible by the 8 local devices"):
        parallel.put_batch({"x": np.zeros((12, 2))}, mesh)


def test_replicate_takes_typed_keys():
    """Values equal on every process -> replicated global arrays, typed PRNG keys included
    (multi-process: tests/test_multiprocess.py draws its evaluation keys through it)."""
    mesh = parallel.make_mesh({"data": -1})
    keys = jax.random.split(jax.random.key(3), 2)
    out = parallel.replicate({"keys": keys, "x": np.arange(3.0)}, mesh)
    assert out["keys"].dtype == keys.dtype and out["keys"].sharding.is_fully_replicated
    assert len(out["keys"].sharding.device_set) == 8
    assert (jax.random.key_data(out["keys"]) == jax.random.key_data(keys)).all()
    assert out["x"].sharding.is_fully_replicated and (np.asarray(out["x"]) == np.arange(3)).all()
