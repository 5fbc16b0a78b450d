import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from securefed.encoding import flatten, unflatten
from securefed.errors import InvalidInput

NUMPY_FLOATS = [np.float16, np.float32, np.float64]
TORCH_FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def parameter(draw):
    shape = draw(array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    if draw(st.booleans()):
        dtype = draw(st.sampled_from(NUMPY_FLOATS))
        return draw(arrays(dtype, shape, elements=st.floats(width=np.dtype(dtype).itemsize * 8)))
    dtype = draw(st.sampled_from(TORCH_FLOATS))
    bits = draw(arrays(np.float64, shape, elements=st.floats(allow_nan=True)))
    return torch.from_numpy(bits).to(dtype)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            torch.nan_to_num(a.double(), nan=7.0), torch.nan_to_num(b.double(), nan=7.0)
        ) and torch.equal(a.isnan(), b.isnan())
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@given(st.lists(parameter(), min_size=1, max_size=6), st.booleans())
def test_flatten_unflatten_is_an_exact_round_trip(params, as_mapping):
    given_params = {f"layer{i}.w": p for i, p in enumerate(params)} if as_mapping else params
    vec, spec = flatten(given_params)
    assert vec.ndim == 1 and vec.size == spec.size == sum(int(np.prod(p.shape)) for p in params)
    back = unflatten(vec, spec)
    if as_mapping:
        assert list(back) == list(given_params)
        back = list(back.values())
    assert all(same(a, b) for a, b in zip(params, back))


def test_flat_dtype_is_float64_only_when_needed():
    assert flatten([np.zeros(2, np.float32), torch.zeros(2, dtype=torch.bfloat16)])[0].dtype == np.float32
    assert flatten([np.zeros(2, np.float32), np.zeros(1, np.float64)])[0].dtype == np.float64


def test_state_dict_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    vec, spec = flatten(model.state_dict())
    back = unflatten(vec, spec)
    for name, t in model.state_dict().items():
        assert torch.equal(back[name], t)


def test_flatten_into_preallocated_buffer():
    out = np.empty(5, np.float32)
    vec, _ = flatten([np.ones(2, np.float32), np.zeros(3, np.float32)], out=out)
    assert vec is out and out.tolist() == [1, 1, 0, 0, 0]


@pytest.mark.parametrize("params", [[], {}, [np.zeros(3, np.int64)], {"steps": torch.tensor(3)}, ["abc"], 3])
def test_bad_parameters_raise_invalid_input(params):
    with pytest.raises(InvalidInput):
        flatten(params)


def test_unflatten_checks_the_vector_length():
    _, spec = flatten([np.zeros(3, np.float32)])
    with pytest.raises(InvalidInput):
        unflatten(np.zeros(4, np.float32), spec)
