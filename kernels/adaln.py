"""adaln_modulate and gate_residual: the elementwise halves of a DiT block, each one pass over the rows.

Reference (composed from fmlm.kernels.reference):
    adaln_modulate(x, w, shift, scale) = modulate(layer_norm_ref(x, w), shift, scale)
        = LayerNorm(x) (fp32, no affine, eps 1e-5)·w·(1 + scale) + shift
    gate_residual(x, gate, y)          = x + gate·y
    gate_residual(x, gate, y, w, shift, scale) = (x' = x + gate·y, adaln_modulate(x', w, shift, scale))
shift, scale and gate are per batch row (B, D) — rows of the block's adaLN modulation — and broadcast over L.

Fusing the residual update with the next LayerNorm saves a read of the residual stream: per block the
DiT then does two passes (after attention, after the MLP) of read x (fp32) + y, write x + the modulated
bf16 GEMM input. At B=32, L=1024, D=768 a pass moves 300 MB: ~0.1 ms at 3 TB/s.
All arithmetic is fp32 (fp64 for fp64 inputs on the reference backend); the output is cast once.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as ref
from ._backend import pdl_active, pdl_launch_kwargs, resolve, sm_count, triton_available, with_default_constexprs

EPS = 1e-5          # F.layer_norm's default, used by the published DiT

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gate_residual_adaln_kernel(
        X, Y, GATE, XOUT, W, SHIFT, SCALE, OUT, YBIAS,
        n_rows, L, D, eps,
        stride_x, stride_y, stride_xo, stride_o, stride_gb, stride_mb, stride_ys,
        HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, NUM_Y: tl.constexpr, HAS_YBIAS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False,
    ):
        # y = Σ_{s < NUM_Y} Y[s] (+ YBIAS): NUM_Y > 1 reads the fp32 split-K partials of linear_partials,
        # summed in split order (deterministic), instead of a finished GEMM output
        if USE_PDL:          # programmatic dependent launch: the predecessor's writes first (_backend.pdl_launches)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        r_ok = rows < n_rows
        c_ok = cols < D
        mask = r_ok[:, None] & c_ok[None, :]
        rows64 = rows.to(tl.int64)
        bidx = rows64 // L                       # batch index of each row: the modulation is per batch
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            y_ptrs = Y + rows64[:, None] * stride_y + cols[None, :]
            y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
            for _s in tl.static_range(1, NUM_Y):
                y_ptrs += stride_ys          # pointer steps: 64-bit address math at any S·rows·D
                y += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
            if HAS_YBIAS:
                y += tl.load(YBIAS + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            g = tl.load(GATE + bidx[:, None] * stride_gb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = x + g * y
            tl.store(XOUT + rows64[:, None] * stride_xo + cols[None, :], x.to(XOUT.dtype.element_ty), mask=mask)
        if HAS_NORM:
            mean = tl.sum(x, 1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            var = tl.sum(xc * xc, 1) / D
            rstd = 1.0 / tl.sqrt(var + eps)
            w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
            sh = tl.load(SHIFT + bidx[:, None] * stride_mb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sc = tl.load(SCALE + bidx[:, None] * stride_mb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            out = xc * rstd[:, None] * w[None, :] * (1.0 + sc) + sh
            tl.store(OUT + rows64[:, None] * stride_o + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def _block_r(n_rows: int, block_d: int, device: torch.device) -> int:
    """Rows per program: ~4K elements (4 rows at D = 768), fewer while that leaves SMs without a program. At LM1B
    B=1 (128 rows) 4 rows gave 32 programs, so the 8 split-K partials that gate_residual sums after the second MLP
    GEMM (3.1 MB) were pulled through 32 SMs (the H100 run5 profile: 4.2 µs per call with the triton_small GEMMs,
    ~2.8-3.3 µs in bench_linear's graph replays); one row per program spreads them over 128."""
    if device.type != "cuda":                      # interpreter: few programs
        return max(1, min(64, triton.next_power_of_2(n_rows)))
    block_r = max(1, min(16, 4096 // block_d))
    n_sm = sm_count(device)
    while block_r > 1 and triton.cdiv(n_rows, block_r) < n_sm:
        block_r //= 2
    return block_r


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """(B, L, D) → (B·L, D) view with unit column stride (copies only if it must)."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _row_view(t: torch.Tensor, D: int) -> bool:
    """Whether t (B, L, D) can be viewed as (B·L, D) rows with unit column stride (what the kernel writes)."""
    if t.is_contiguous():             # the common case, without the view's cost
        return True
    try:
        return t.view(-1, D).stride(-1) == 1
    except RuntimeError:
        return False


def _mod(t: torch.Tensor, B: int, D: int) -> torch.Tensor:
    if t.shape != (B, D):
        raise ValueError(f"modulation must be (B, D) = ({B}, {D}), got {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def gate_residual_adaln_fwd(x, gate=None, y=None, weight=None, shift=None, scale=None, eps: float = EPS,
                            x_out=None, out=None, out_dtype=None, y_bias=None, block_r: Optional[int] = None):
    """Triton launcher. x, y (B, L, D), or y (S, B, L, D) split-K partials summed in split order; y_bias
    (D,) added to y; gate/shift/scale (B, D) (strided views into a (B, k·D) modulation are fine); block_r: rows
    per program instead of _block_r's (the benchmark's previous-default row). Returns (x_out or None, out or
    None)."""
    B, L, D = x.shape
    has_res, has_norm = gate is not None, weight is not None
    x2 = _rows(x, D)
    n_y, stride_ys = 1, 0
    if has_res:
        if y.dim() == 4:               # (S, B, L, D) partials
            n_y = y.shape[0]
            y = y if y[0].is_contiguous() else y.contiguous()
            stride_ys = y.stride(0)
            y2 = y[0].view(-1, D)
        else:
            y2 = _rows(y, D)
        gate = _mod(gate, B, D)
        dest = x_out
        if x_out is not None and not _row_view(x_out, D):
            # a destination the kernel cannot address as rows (e.g. a transposed x updated in place): written
            # through a contiguous buffer, copied in at the end (x2 is then already a copy of x, so in place is safe)
            x_out = torch.empty(B, L, D, device=x.device, dtype=x_out.dtype)
        if x_out is None:
            x_out = torch.empty(B, L, D, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        xo2 = x_out.view(-1, D)
    else:
        y2 = xo2 = x2
        gate = x2
    if has_norm:
        shift, scale = _mod(shift, B, D), _mod(scale, B, D)
        if shift.stride(0) != scale.stride(0):
            scale = scale.contiguous()
            shift = shift.contiguous()
        if out is None:
            out = torch.empty(B, L, D, device=x.device, dtype=out_dtype or x.dtype)
        o2 = out.view(-1, D)
        weight = weight.contiguous()
    else:
        o2 = shift = scale = weight = x2
    y_bias = y_bias.contiguous() if (has_res and y_bias is not None) else None
    n_rows = B * L
    block_d = triton.next_power_of_2(D)
    block_r = block_r or _block_r(n_rows, block_d, x.device)
    grid = (triton.cdiv(n_rows, block_r),)
    _gate_residual_adaln_kernel[grid](
        x2, y2, gate, xo2, weight, shift, scale, o2, y_bias if y_bias is not None else x2,
        n_rows, L, D, float(eps),
        x2.stride(0), y2.stride(0), xo2.stride(0), o2.stride(0), gate.stride(0), shift.stride(0), stride_ys,
        HAS_RESIDUAL=has_res, HAS_NORM=has_norm, NUM_Y=n_y, HAS_YBIAS=y_bias is not None,
        BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4 if x.device.type == "cuda" else 1, **pdl_launch_kwargs(pdl_active(x)))
    if has_res and dest is not None and dest is not x_out:
        x_out = dest.copy_(x_out)
    return (x_out if has_res else None), (out if has_norm else None)


def compile_specs() -> list[dict]:
    """Real configs for the sm_90a compile check: fp32 residual stream, bf16 GEMM operands, D = 768."""
    if not triton_available():
        return []
    base = {"X": "*fp32", "Y": "*bf16", "GATE": "*bf16", "XOUT": "*fp32", "W": "*fp32", "SHIFT": "*bf16",
            "SCALE": "*bf16", "OUT": "*bf16", "YBIAS": "*bf16", "eps": "fp32"}
    base.update({n: "i32" for n in ("n_rows", "L", "D", "stride_x", "stride_y", "stride_xo", "stride_o",
                                    "stride_gb", "stride_mb", "stride_ys")})
    names = _gate_residual_adaln_kernel.arg_names
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names
               if base.get(n, "").startswith("*") or n.startswith("stride_") or n == "D"}
    specs = []
    # the last: the "triton_small" GEMM path's consumer of 4 fp32 split-K partials + the GEMM bias
    for res, norm, n_y in ((True, True, 1), (False, True, 1), (True, False, 1), (True, True, 4)):
        sig = dict(base, Y="*fp32") if n_y > 1 else base
        const = dict(HAS_RESIDUAL=res, HAS_NORM=norm, NUM_Y=n_y, HAS_YBIAS=n_y > 1, BLOCK_R=4, BLOCK_D=1024)
        tag = f"{'res' if res else ''}{'+norm' if norm else ''}{f'+{n_y}partials' if n_y > 1 else ''}"
        specs.append(dict(name=f"_gate_residual_adaln_kernel[{tag}]",
                          fn=_gate_residual_adaln_kernel, signature={**sig, **{k: "constexpr" for k in const}},
                          constexprs=const, attrs=aligned, num_warps=4, num_stages=1))
    specs.append(dict(specs[-1], name=specs[-1]["name"][:-1] + ",pdl]",     # the 'pdl' kernel option's launch
                      signature={**specs[-1]["signature"], "USE_PDL": "constexpr"},
                      constexprs={**specs[-1]["constexprs"], "USE_PDL": True}))
    # one row per program (_block_r at ≤ 132 rows per 4: LM1B B=1), after the second MLP GEMM's 8 partials
    one = dict(specs[-2]["constexprs"], NUM_Y=8, BLOCK_R=1)
    specs.append(dict(specs[-2], name="_gate_residual_adaln_kernel[res+norm+8partials,1row]", constexprs=one))
    return with_default_constexprs(specs)


# ---------------------------------------------------------------------------------------------
# References (the spec, composed from reference.py) and a plain-PyTorch backend
# ---------------------------------------------------------------------------------------------
def adaln_modulate_ref(x, weight, shift, scale, eps: float = EPS):
    """modulate(layer_norm_ref(x, w), shift, scale) in x's accumulation dtype (fp32, fp64 for fp64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if eps != EPS:
        y = torch.nn.functional.layer_norm(x.to(acc), [x.shape[-1]], eps=eps) * weight.to(acc)
    else:
        y = ref.layer_norm_ref(x.to(acc), weight.to(acc))
    return ref.modulate(y, shift.to(acc)[:, None], scale.to(acc)[:, None])


def gate_residual_ref(x, gate, y, y_bias=None):
    """x + gate·y; y (S, B, L, D) split-K partials are summed first, y_bias (D,) added to y."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = y.to(acc)
    if y.dim() == x.dim() + 1:
        y = y.sum(0)
    if y_bias is not None:
        y = y + y_bias.to(acc)
    return x.to(acc) + gate.to(acc)[:, None] * y


# ---------------------------------------------------------------------------------------------
# Op registration (opaque to torch.compile) and the functional API
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fmlm::adaln_modulate", mutates_args=())
def _adaln_modulate_op(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    return gate_residual_adaln_fwd(x, weight=weight, shift=shift, scale=scale, eps=eps, out_dtype=out_dtype)[1]


@_adaln_modulate_op.register_fake
def _(x, weight, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("fmlm::gate_residual_adaln", mutates_args=())
def _gate_residual_adaln_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                            shift: torch.Tensor, scale: torch.Tensor, eps: float,
                            out_dtype: torch.dtype, y_bias: Optional[torch.Tensor] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    return gate_residual_adaln_fwd(x, gate, y, weight, shift, scale, eps, out_dtype=out_dtype, y_bias=y_bias)


@_gate_residual_adaln_op.register_fake
def _(x, gate, y, weight, shift, scale, eps, out_dtype, y_bias=None):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32)), x.new_empty(x.shape, dtype=out_dtype)


def _check_norm_args(x, weight, shift, scale) -> None:
    """x (B, L, D), the LayerNorm weight (D,), shift/scale (B, D): a kernel would read past a short weight."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, D), got {tuple(x.shape)}")
    B, D = x.shape[0], x.shape[-1]
    if weight.shape != (D,) or shift.shape != (B, D) or scale.shape != (B, D):
        raise ValueError(f"expected weight ({D},), shift and scale ({B}, {D}); got {tuple(weight.shape)}, "
                         f"{tuple(shift.shape)}, {tuple(scale.shape)}")


def adaln_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   eps: float = EPS, out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> torch.Tensor:
    """LayerNorm(x)·w·(1+scale)+shift: x (B, L, D), w (D,), shift/scale (B, D) → (B, L, D) in out_dtype
    (default x.dtype), computed in fp32."""
    _check_norm_args(x, weight, shift, scale)
    out_dtype = out_dtype or x.dtype
    be = resolve(backend, x.device)
    if be != "triton":
        return adaln_modulate_ref(x, weight, shift, scale, eps).to(out_dtype)
    if torch.compiler.is_compiling():
        return _adaln_modulate_op(x, weight, shift, scale, float(eps), out_dtype)
    return gate_residual_adaln_fwd(x, weight=weight, shift=shift, scale=scale, eps=eps, out_dtype=out_dtype)[1]


def gate_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None, eps: float = EPS,
                  out_dtype: Optional[torch.dtype] = None, x_out: Optional[torch.Tensor] = None,
                  backend: str = "auto", y_bias: Optional[torch.Tensor] = None):
    """x + gate·y (x, y (B, L, D), gate (B, D)) in fp32 (x's dtype if wider). With weight/shift/scale, also
    returns the next adaLN input: (x_new, LayerNorm(x_new)·w·(1+scale)+shift in out_dtype, default y.dtype).
    x_out: optional destination for x_new (may be x itself: in-place residual stream).
    y may also be (S, B, L, D) fp32 split-K partials (kernels/linear.py linear_partials), summed in split
    order, and y_bias (D,) is added to y: the GEMM's bias, for partials that carry none."""
    with_norm = weight is not None
    if with_norm and (shift is None or scale is None):
        raise ValueError("the fused LayerNorm needs weight, shift and scale")
    if with_norm:
        _check_norm_args(x, weight, shift, scale)
    if gate.shape != (x.shape[0], x.shape[-1]):
        raise ValueError(f"gate must be (B, D) = {(x.shape[0], x.shape[-1])}, got {tuple(gate.shape)}")
    if x_out is not None and x_out.shape != x.shape:
        raise ValueError(f"x_out must be x's shape {tuple(x.shape)}, got {tuple(x_out.shape)}")
    partials = y.dim() == x.dim() + 1
    if (y.shape[1:] if partials else y.shape) != x.shape:
        raise ValueError(f"y must be x's shape {tuple(x.shape)} or (S, *x.shape) partials, got {tuple(y.shape)}")
    if y_bias is not None and y_bias.shape != (x.shape[-1],):
        raise ValueError(f"y_bias must be ({x.shape[-1]},), got {tuple(y_bias.shape)}")
    out_dtype = out_dtype or y.dtype
    be = resolve(backend, x.device)
    if be != "triton":
        xn = gate_residual_ref(x, gate, y, y_bias).to(torch.promote_types(x.dtype, torch.float32))
        if x_out is not None:
            xn = x_out.copy_(xn)
        if not with_norm:
            return xn
        return xn, adaln_modulate_ref(xn, weight, shift, scale, eps).to(out_dtype)
    if torch.compiler.is_compiling() and x_out is None and with_norm:
        return _gate_residual_adaln_op(x, gate, y, weight, shift, scale, float(eps), out_dtype, y_bias)
    xn, out = gate_residual_adaln_fwd(x, gate, y, weight, shift, scale, eps, x_out=x_out, out_dtype=out_dtype,
                                      y_bias=y_bias)
    return (xn, out) if with_norm else xn
