"""A convolution whose kernel gradient is one im2col matmul (an opt-in speed lever).

For y = conv(x, W) (NHWC input x [N, H, W, Cin], HWIO kernel W [kh, kw, Cin, Cout],
strides s, explicit padding, no dilation, one feature group) the kernel gradient is

    ∂L/∂W[i, j, c, o] = Σ_{n, p, q} x̃[n, s·p + i, s·q + j, c] · g[n, p, q, o]
                      = (P^T G)[(c, i, j), o],

with x̃ the padded input, G = g reshaped to [N·Ho·Wo, Cout] and P the patch matrix
[N·Ho·Wo, Cin·kh·kw] (``lax.conv_general_dilated_patches``, features ordered
(c, i, j)). XLA:CPU lowers this gradient as a convolution with a batch-sized
"kernel", which is slow for narrow layers; the matmul form is one large GEMM.
The forward pass and the input gradient stay XLA's own.

``conv_kernel_grad(mode)`` selects, while the model is traced, which convolution the
zoo's ordinary convolutions (``common.conv3x3`` / ``conv1x1``) use: "xla" (default) or
"matmul" (this module). Depthwise convolutions always use XLA's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax

MODES = ("xla", "matmul")
_MODE = contextvars.ContextVar("kdjax_conv_kernel_grad", default="xla")
_NHWC = ("NHWC", "HWIO", "NHWC")


def _check(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
           feature_group_count, batch_group_count) -> None:
    """ValueError unless the convolution is the supported kind (module docstring)."""
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    dims = (nhwc if dimension_numbers is None
            else lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers))
    undilated = all(d is None or all(v == 1 for v in d) for d in (lhs_dilation, rhs_dilation))
    if (isinstance(padding, str) or not undilated or dims != nhwc
            or feature_group_count != 1 or batch_group_count != 1):
        raise ValueError("conv_matmul_kernel_grad supports NHWC/HWIO convolutions with "
                         "explicit padding, no dilation and one feature/batch group")


def conv_matmul_kernel_grad(lhs, rhs, window_strides, padding, lhs_dilation=None,
                            rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                            batch_group_count=1, precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` (NHWC/HWIO, explicit padding) with the kernel gradient
    computed as P^T G (module docstring). Same forward result; same gradients up to
    float summation order."""
    del preferred_element_type  # the inputs' dtype, as XLA's default
    _check(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
           feature_group_count, batch_group_count)
    return _matmul_grad_conv(tuple(window_strides), tuple(map(tuple, padding)), precision,
                             lhs, rhs)


def _plain(strides, padding, precision, x, w):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                    precision=precision)


_matmul_grad_conv = jax.custom_vjp(_plain, nondiff_argnums=(0, 1, 2))


def _fwd(strides, padding, precision, x, w):
    return _plain(strides, padding, precision, x, w), (x, w)


def _bwd(strides, padding, precision, residuals, g):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x: _plain(strides, padding, precision, x, w), x)
    kh, kw, cin, cout = w.shape
    patches = lax.conv_general_dilated_patches(x, (kh, kw), strides, padding,
                                               dimension_numbers=_NHWC, precision=precision)
    patches = patches.reshape(-1, cin * kh * kw)                # [N·Ho·Wo, (c, i, j)]
    grad_w = jnp.matmul(patches.T, g.reshape(-1, cout), precision=precision)
    grad_w = grad_w.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)
    return input_vjp(g)[0], grad_w.astype(w.dtype)


_matmul_grad_conv.defvjp(_fwd, _bwd)


def check_mode(mode: str) -> str:
    """``mode`` if valid, else a ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(f"unknown conv_kernel_grad {mode!r}; valid: {', '.join(MODES)}")
    return mode


@contextlib.contextmanager
def conv_kernel_grad(mode: str) -> Iterator[None]:
    """Within the block, models traced use the ``mode`` convolution (module docstring)."""
    token = _MODE.set(check_mode(mode))
    try:
        yield
    finally:
        _MODE.reset(token)


def current_conv():
    """The convolution function ordinary zoo convolutions use now."""
    return conv_matmul_kernel_grad if _MODE.get() == "matmul" else lax.conv_general_dilated
