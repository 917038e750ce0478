"""Flat parameter vectors (bitwise round trip, integer buffers kept aside) and model builders."""

from __future__ import annotations

import pytest
import torch

from robustfl_lib import MLP, SmallCNN, build_model, flatten_state, get_device, load_vector_, set_seed, unflatten_state


def test_round_trip_is_bitwise_with_batchnorm():
    set_seed(0)
    model = SmallCNN((1, 8, 8), 10, batchnorm=True)
    model.train()
    model(torch.rand(16, 1, 8, 8))  # moves running stats and num_batches_tracked
    state = model.state_dict()
    vec = flatten_state(state)
    n_float = sum(v.numel() for v in state.values() if v.is_floating_point())
    assert vec.shape == (n_float,) and vec.dtype == torch.float32
    back = unflatten_state(vec, state)
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape
        assert torch.equal(back[k], state[k]), k
    assert back["1.num_batches_tracked"].dtype == torch.int64 and back["1.num_batches_tracked"].item() == 1
    # The result is a copy, not a view of the vector.
    vec.zero_()
    assert not torch.equal(back["0.weight"], torch.zeros_like(back["0.weight"]))


def test_load_vector_changes_floats_and_keeps_int_buffers():
    model = SmallCNN((1, 8, 8), 10, batchnorm=True)
    model.state_dict()["1.num_batches_tracked"].fill_(5)
    vec = flatten_state(model.state_dict())
    load_vector_(model, vec + 1.0)
    assert torch.equal(flatten_state(model.state_dict()), vec + 1.0)
    assert model.state_dict()["1.num_batches_tracked"].item() == 5


def test_mixed_precision_promotes():
    state = {"a": torch.ones(2, dtype=torch.float16), "b": torch.full((3,), 0.1, dtype=torch.float64), "n": torch.tensor(3)}
    vec = flatten_state(state)
    assert vec.dtype == torch.float64 and vec.numel() == 5
    back = unflatten_state(vec, state)
    assert back["a"].dtype == torch.float16 and torch.equal(back["b"], state["b"]) and back["n"].item() == 3


def test_unflatten_errors():
    state = MLP((1, 8, 8), 10).state_dict()
    with pytest.raises(ValueError, match="entries but the state needs"):
        unflatten_state(torch.zeros(3), state)
    with pytest.raises(ValueError, match="1-D"):
        unflatten_state(torch.zeros(2, 2), state)
    with pytest.raises(ValueError, match="no floating-point"):
        flatten_state({"n": torch.tensor(1)})


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_models_sized_from_shape(name, shape):
    model = build_model(name, shape, 10)
    assert model(torch.rand(4, *shape)).shape == (4, 10)


def test_model_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg16", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="H, W >= 4"):
        SmallCNN((1, 2, 2), 10)
    with pytest.raises(ValueError, match="num_classes"):
        MLP((1, 8, 8), 1)


def test_set_seed_and_device():
    set_seed(3)
    a = torch.rand(3)
    set_seed(3)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ValueError):
        set_seed(-1)
    assert get_device().type in {"cpu", "cuda"}
    assert get_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            get_device("cuda")
