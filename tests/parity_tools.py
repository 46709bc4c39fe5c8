"""Helpers shared by the parity tests (test_parity_*.py): host data and comparisons.

Every parity check computes a result on the backend under test and the same
result with the same xpnn code on the NumPy float64 reference backend, from the
same host-generated inputs, and compares them through ``to_numpy``.
"""
import numpy as np

import xpnn

#: The backend every other backend is compared with.
REFERENCE = ("cpu", "float64")


def reference_backend():
    """The NumPy float64 reference backend (not made current)."""
    return xpnn.make_backend(*REFERENCE)


def representable(array, dtype_name):
    """``array`` rounded to ``dtype_name`` and back to float64.

    Feeding these values to both sides means a float32 backend and the float64
    reference see exactly the same inputs, so a difference measures the
    computation, not the rounding of the inputs.
    """
    return np.asarray(array, dtype=np.float64).astype(dtype_name).astype(np.float64)


def parity_error(actual, expected):
    """Largest ``|actual - expected|`` relative to the largest ``|expected|`` (0 for all-zero)."""
    actual = np.asarray(xpnn.to_numpy(actual), dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    difference = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    if scale == 0.0:
        return difference
    return difference / scale


def assert_parity(actual, expected, rtol, what):
    """Assert ``|actual - expected| <= rtol * (|expected| + max|expected|)`` element-wise.

    The ``max|expected|`` term makes the check relative to the array's scale,
    so an entry that is nearly zero by cancellation (a gradient, a centred
    value) is not held to a relative precision no float format has.
    """
    actual_host = xpnn.to_numpy(actual)
    expected_host = np.asarray(expected)
    assert actual_host.shape == expected_host.shape, (
        f"{what}: shape {actual_host.shape} != reference {expected_host.shape}")
    scale = float(np.max(np.abs(expected_host))) if expected_host.size else 0.0
    np.testing.assert_allclose(
        actual_host, expected_host, rtol=rtol, atol=rtol * scale,
        err_msg=f"{what}: relative error {parity_error(actual_host, expected_host):.3g} "
                f"exceeds {rtol:g}")


def assert_backend_array(array, backend, what):
    """Assert ``array`` lives on ``backend`` (library and device) in its float dtype."""
    assert backend.owns(array), f"{what}: not an array of {backend!r} ({type(array).__name__})"
    assert array.dtype == backend.dtype, f"{what}: dtype {array.dtype} != {backend.dtype}"
