"""keras.distribution on 8 virtual CPU devices, and across two processes.

Each scenario runs in its own process (the device count is fixed when JAX
starts); see tests/distributed/.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

# Each scenario runs in processes of their own (8 virtual devices, or two
# processes): run by `pytest -m slow` (CI).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = "--xla_force_host_platform_device_count=8"


def _scenario(name):
    env = {**os.environ, "XLA_FLAGS": DEVICES}
    result = subprocess.run(
        [sys.executable, "-m", "tests.distributed.scenarios", name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# The weights of `scenarios.Net` (Dense, BatchNorm, Dense), by Flax path.
NET_WEIGHTS = sorted(
    [
        "Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel",
        "BatchNorm_0/bias", "BatchNorm_0/scale",
        "batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var",
    ]
)  # fmt: skip


@pytest.fixture(scope="module")
def data_parallel():
    return _scenario("data_parallel")


def test_data_parallel_matches_one_device(data_parallel):
    result = data_parallel
    assert result["devices"] == 8
    np.testing.assert_allclose(result["losses"], result["single"], rtol=1e-6)
    assert result["max_output_diff"] < 1e-5
    # Inside the compiled train step, the batch is split along its axis.
    assert "('batch',)" in result["input_shardings"]
    assert sorted(result["weights"]) == NET_WEIGHTS
    assert all(w["replicated"] for w in result["weights"].values())


def test_model_parallel_layout_map_on_flax_path_names():
    result = _scenario("model_parallel")
    np.testing.assert_allclose(result["losses"], result["single"], rtol=1e-6)
    kernel = result["weights"]["Dense_0/kernel"]
    assert kernel["spec"] == "(None, 'model')"
    assert kernel["shard"] == [8, 4]  # a quarter of (8, 16) per device
    others = {
        k: w for k, w in result["weights"].items() if k != "Dense_0/kernel"
    }
    assert sorted(others) == [n for n in NET_WEIGHTS if n != "Dense_0/kernel"]
    assert all(w["replicated"] for w in others.values())


def test_optax_state_is_sharded_as_its_weights():
    result = _scenario("optax")
    for run in ("data_parallel", "model_parallel"):
        np.testing.assert_allclose(result[run], result["single"], rtol=1e-6)
    state = result["state"]
    kernel = {k: v for k, v in state.items() if "Dense_0_kernel" in k}
    assert sorted(k.rsplit("_", 2)[-2:][1] for k in kernel) == ["mu", "nu"]
    assert all(v["spec"] == "(None, 'model')" for v in kernel.values())
    others = {k: v for k, v in state.items() if k not in kernel}
    # Two moments for each of the 5 other trainable weights (the batch
    # statistics have none), and the step count: all replicated.
    assert len(others) >= 2 * 5 + 1
    assert all(v["replicated"] for v in others.values())


def test_flax_partitioning_metadata_becomes_the_layout():
    result = _scenario("metadata")
    for case in ("linen", "logical", "given"):
        kernel = result[case]["Dense_0/kernel"]
        assert (kernel["spec"], kernel["shard"]) == ("(None, 'model')", [8, 4])
        assert result[case]["Dense_1/kernel"]["replicated"]
    assert result["nnx"]["kernel"]["shard"] == [8, 4]
    assert result["given_diff"] < 1e-6 and result["nnx_diff"] < 1e-6
    # A LayoutMap entry overrides the metadata.
    assert result["overridden"]["Dense_0/kernel"]["replicated"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_data_parallel_model(tmp_path, data_parallel):
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.distributed.multiprocess",
                str(i),
                str(port),
                str(outs[i]),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=240)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0, 0], logs
    first, second = (np.load(out) for out in outs)
    assert sorted(first.files) == sorted(second.files)
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name])
    np.testing.assert_allclose(
        first["losses"], data_parallel["single"][:2], rtol=1e-6
    )


def test_sharded_initialisation_memory_shards_and_checkpoint():
    """Under ModelParallel (1 x 8), `init` runs with the layouts as its
    output shardings: per device, its output and temporary bytes stay
    within params / 8 + the replicated leaves + the largest leaf."""
    result = _scenario("sharded_init")
    replicated = result["params_bytes"] - result["sharded_bytes"]
    per_device = result["sharded_bytes"] / 8 + replicated
    bound = per_device + result["largest_bytes"]
    assert result["output_bytes"] + result["temp_bytes"] <= bound
    # A whole copy of the parameters on one device would not fit the bound.
    assert result["params_bytes"] > bound
    for i in range(4):
        kernel = result["weights"][f"Dense_{i}/kernel"]
        assert kernel["shard"] == [256, 32] and not kernel["replicated"]
    assert result["weights"]["Dense_4/kernel"]["replicated"]
    # The same values as a one-device build, within float rounding.
    assert result["init_diff"] < 1e-6 and result["output_diff"] < 1e-5
    # The LayoutMap keys that match nothing, each named once.
    assert len(result["warnings"]) == 2
    assert "'.*Dense_7/kernel' matches no weight" in result["warnings"][0]
    assert "'Dense_1/kernel' matches no weight" in result["warnings"][1]
    # The checkpoint: sharded kernels read by slice (8 shards each), the
    # replicated leaves whole; the values exactly the saved ones.
    assert result["whole_reads"] == [
        "Dense_0/bias",
        "Dense_1/bias",
        "Dense_2/bias",
        "Dense_3/bias",
        "Dense_4/bias",
        "Dense_4/kernel",
    ]
    assert result["slice_shapes"] == [[256, 32]] * 32
    assert result["loaded_diff"] == 0.0


def test_an_nnx_module_held_whole_keeps_each_device_to_its_shards():
    """The user made the module whole (on device 0) and still holds it:
    after build it is re-pointed at the sharded arrays, and per device the
    live bytes stay within params / 8 + the replicated leaves + the
    largest leaf, after build, after `fit` (plus Adam's two moments of
    that share) and after `load_safetensors`."""
    result = _scenario("nnx_sharded_memory")
    replicated = result["params_bytes"] - result["sharded_bytes"]
    share = result["sharded_bytes"] / 8 + replicated
    bound = share + result["largest_bytes"]
    assert result["module_kernel_shard"] == [512, 64]
    assert result["built"] <= bound, result
    assert result["fitted"] <= bound + 2 * share, result
    assert result["loaded"] <= bound + 2 * share, result
    # A whole copy on one device would not fit.
    assert result["params_bytes"] > bound


def test_user_copies_survive_a_relayout():
    """Arrays the user holds apart from the layer survive the relayout
    onto the mesh and every Keras call (SPEC 13.1)."""
    cases = ["linen variables", "nnx clone", "flax_variables", "set_weights"]
    result = _scenario("user_copies")
    for distribution in ("model_parallel", "data_parallel"):
        assert result[distribution] == dict.fromkeys(cases, True), result
