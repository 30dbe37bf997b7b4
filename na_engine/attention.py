"""The nested attention operation for one cross-attention layer.

Shapes: B batch rows, N image queries, T context tokens, H heads of width d,
M nested tokens of one subject.  Inputs arrive with heads merged, (B, L, H*d),
as ComfyUI's attn2 replace and diffusers' processors both see them.

For a subject bound to the trigger positions J of a row, the value of each
j in J becomes the query-dependent u(q) = softmax(q K~^T / sqrt(d)) V~, with
strength lam and an optional per-query mask m(q):

    v_j(q) = v_j + lam * m(q) * (u(q) - v_j)

and, with a trigger weight w, the outer attention the trigger positions receive is
multiplied by w(q) = 1 + (w - 1) * m(q): log w(q) is added to their logits before the
softmax, and the other tokens renormalise.  Several subjects on one position multiply.

A decoupled binding (IP-Adapter's way, the baseline) instead adds lam * m(q) *
softmax(q K~^T / sqrt(d)) V~ to every query of its rows, whatever the prompt says.

Four exact evaluations, none materialising a per-query value tensor:

* fused (0 <= lam*m <= 1): drop the trigger positions from the outer softmax
  (or keep them with bias log(1 - lam*m) + log w) and append the M nested keys/values
  as extra entries with the per-query bias
      log(lam*m) + log w + logsumexp_{j in J} l_j(q) - logsumexp_m (q . K~_m / sqrt(d)),
  where l_j is the outer logit of j.  The softmax normaliser is unchanged, so one
  scaled_dot_product_attention call is the answer; the biases ride in two extra
  head dimensions per subject instead of a (B, H, N, T+M) mask.
* closed form (any lam): attn(q, K, V) + lam*m * sum_j p_j(q) (u(q) - v_j),
  with p the outer attention probability.  Differentiable; used for lam outside
  [0, 1], overlapping subjects, and stacking on someone else's attention.
* statistics (CPU inference): the closed form with p_j = exp(l_j - lse), where
  PyTorch's CPU attention kernel returns lse, the log-normaliser, with the output.
* cpu_kernel (fp32 CPU inference, any lam): the closed form as coefficients on
  [V ; V~], computed per block of queries in C++ (cpu_kernel.py), where the logits
  of the block against all T+M keys stay in cache.

Memory is O(B*H*N*(T+M)) in all four.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernel

AttentionFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]


@dataclass
class NestedBinding:
    """One subject in one cross-attention layer."""

    keys: Tensor  # (M, H*d) nested keys K~
    values: Tensor  # (M, H*d) nested values V~
    where: Tensor  # (B, T) bool: the trigger positions of each row
    strength: float = 1.0
    query_mask: Optional[Tensor] = None  # (B or 1, N) in [0, 1]
    trigger_weight: float = 1.0  # multiplies the outer attention of the trigger positions
    decoupled: bool = False  # IP-Adapter's decoupled attention instead of nesting

    def rows(self, index: Tensor) -> "NestedBinding":
        """The binding for a subset of batch rows; ``index`` is a (B,) bool mask or a long index."""
        mask = self.query_mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask[index.to(mask.device)]
        where = self.where[index.to(self.where.device)]
        return replace(self, where=where, query_mask=mask)

    def queries(self, start: int, stop: int) -> "NestedBinding":
        """The binding for the queries start..stop-1 (its query mask cut to them)."""
        mask = None if self.query_mask is None else self.query_mask[:, start:stop]
        return replace(self, query_mask=mask)

    @property
    def weighted(self) -> bool:
        return self.trigger_weight != 1


@dataclass
class SubjectMaps:
    """What a visualisation needs, averaged over heads; rows without the trigger are zero."""

    outer: Tensor  # (B, N) total outer probability of the trigger positions
    token: Tensor  # (B, N) long, argmax of the nested softmax over the M tokens
    entropy: Tensor  # (B, N) entropy of the nested softmax, in nats
    weights: Tensor  # (B, N, M) nested softmax


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Plain attention on merged heads: (B, N, H*d), (B, T, H*d) -> (B, N, H*d)."""
    out = F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads))
    return _merge(out)


METHODS = ("auto", "fused", "cpu_kernel", "statistics", "closed_form")
SMALL_M = 32  # up to this many nested tokens, u(q) is cheaper as explicit logits than as an SDPA call


def nested_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    bindings: Sequence[NestedBinding],
    base_attention: AttentionFn = sdpa_attention,
    method: str = "auto",
) -> Tensor:
    """Cross-attention with each binding's trigger values replaced by nested attention.

    Rows that no binding touches come out bit-identical to ``base_attention``.  Methods,
    all exact; ``auto`` picks the fastest that applies:
      fused        one SDPA with the nested entries appended (strengths in [0, 1]);
      cpu_kernel   the C++ CPU kernel, fp32 inference (auto: when it is built and every
                   row is bound; otherwise the base on the whole batch costs more);
      statistics   PyTorch's CPU SDPA output and logsumexp, then the closed-form change
                   (CPU inference; with another base, on the bound rows only);
      closed_form  base + nested_correction, differentiable, any strength; also chosen
                   for strengths outside [0, 1], for subjects sharing a position, and
                   (by auto) under autograd.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    _check_shapes(q, k, v, heads, bindings)
    active = [b for b in bindings if b.strength != 0 and not b.decoupled]
    decoupled = [b for b in bindings if b.strength != 0 and b.decoupled]
    rows = _bound_rows(active, q.shape[0])
    if not bool(rows.any()):
        out = base_attention(q, k, v, heads)
    else:
        case = Case(q, active, rows, _records_grad(q, k, v, active), k.shape[1])
        out = EVALUATIONS[choose_method(method, case)](q, k, v, heads, active, rows, base_attention)
    return _add_decoupled(out, q, heads, decoupled) if decoupled else out


def _add_decoupled(out: Tensor, q: Tensor, heads: int, bindings: Sequence[NestedBinding]) -> Tensor:
    """out + lam * m(q) * softmax(q K~^T / sqrt(d)) V~ on each decoupled binding's rows (any trigger there)."""
    out = out.clone()
    for bind in bindings:
        rows = bind.where.any(-1).to(q.device)
        if not bool(rows.any()):
            continue
        qh = _split(q[rows], heads)  # (R, H, N, d)
        image = _nested_values(qh, bind, heads)  # (R, H, N, d)
        out[rows] = out[rows] + (_gate(bind.rows(rows), qh) * image).to(out.dtype).transpose(1, 2).flatten(2)
    return out


@dataclass
class Case:
    """What the choice of evaluation depends on."""

    q: Tensor  # (B, N, H*d)
    bindings: Sequence[NestedBinding]  # those with a non-zero strength
    rows: Tensor  # (B,) bool: rows some binding touches
    training: bool  # autograd records through q, k, v or the nested keys/values
    keys: int = 0  # T, the context's length

    @property
    def general(self) -> bool:
        """Only the closed form and the CPU kernel take a strength outside [0, 1] or two subjects on one position."""
        return any(b.strength > 1 or b.strength < 0 for b in self.bindings) or _overlapping(self.bindings)


# The C++ kernel holds a block's logits against all T+M keys in cache: measured against the statistics path it is
# faster up to about a thousand keys (x0.6-0.9 at 77-512) and slower beyond (x1.11 at 1536, a Flux joint sequence).
KERNEL_MAX_KEYS = 1024

# auto takes the first evaluation whose rule holds, so each line is one rule, tested alone:
AUTO = (
    (
        "cpu_kernel",  # every row bound (else SDPA runs anyway), a context short enough for the kernel's cache
        lambda c: bool(c.rows.all()) and c.keys < KERNEL_MAX_KEYS and cpu_kernel.usable(c.q, c.training),
    ),
    ("closed_form", lambda c: c.training or c.general),
    ("statistics", lambda c: _has_statistics_kernel(c.q)),
    ("fused", lambda c: True),
)


def choose_method(method: str, case: Case) -> str:
    """The evaluation that runs: auto's first applicable one, or the one asked for when it can.

    | auto's order | when                                                         |
    |--------------|--------------------------------------------------------------|
    | cpu_kernel   | every row bound, fp32 CPU inference, the kernel built,      |
    |              | fewer than KERNEL_MAX_KEYS context keys                     |
    | closed_form  | under autograd; a strength outside [0, 1]; shared positions |
    | statistics   | CPU inference (PyTorch's CPU kernel returns logsumexp)      |
    | fused        | otherwise (GPU inference)                                   |

    An explicit fused or statistics falls back to the closed form where it cannot express the case."""
    if method == "auto":
        return next(name for name, applies in AUTO if applies(case))
    if case.training and (method in ("statistics", "cpu_kernel") or (method == "fused" and case.q.requires_grad)):
        raise ValueError(
            f"method {method!r} cannot backpropagate here; under autograd use 'closed_form' (or 'auto', which picks it)"
        )
    if method == "cpu_kernel" and not cpu_kernel.usable(case.q):
        raise ValueError("method 'cpu_kernel' needs fp32 CPU tensors and the built kernel (the log says why it is off)")
    if method == "statistics" and not _has_statistics_kernel(case.q):
        raise ValueError("method 'statistics' needs PyTorch's CPU attention kernel")
    return "closed_form" if method in ("fused", "statistics") and case.general else method


def _run_cpu_kernel(q, k, v, heads, bindings, rows, base_attention):
    return _on_rows(cpu_kernel.nested_attention_cpu, q, k, v, heads, bindings, rows, base_attention)


def _run_closed_form(q, k, v, heads, bindings, rows, base_attention):
    out = base_attention(q, k, v, heads).clone()
    delta = nested_correction(q[rows], k[rows], v[rows], heads, [b.rows(rows) for b in bindings])
    out[rows] = out[rows] + delta.to(out.dtype)
    return out


def _run_statistics(q, k, v, heads, bindings, rows, base_attention):
    if base_attention is sdpa_attention:  # one kernel call gives the plain rows and the statistics
        return _with_statistics(q, k, v, heads, bindings, rows)
    return _on_rows(_with_statistics, q, k, v, heads, bindings, rows, base_attention)


def _run_fused(q, k, v, heads, bindings, rows, base_attention):
    return _on_rows(_fused, q, k, v, heads, bindings, rows, base_attention)


EVALUATIONS = {
    "cpu_kernel": _run_cpu_kernel,
    "closed_form": _run_closed_form,
    "statistics": _run_statistics,
    "fused": _run_fused,
}


CORRECTION_ELEMENTS = 2**26  # of one (B, H, n, T) block of outer probabilities (256 MB in fp32): queries beyond
# it are corrected in chunks (Flux's joint attention at 1024 px would hold 1.8 GB per layer at once)


def nested_correction(q: Tensor, k: Tensor, v: Tensor, heads: int, bindings: Sequence[NestedBinding]) -> Tensor:
    """What the bindings change, shape (B, N, H*d); added to plain attention it gives nested attention for any
    strength:  (p' - p) V + sum over bindings of lam*m(q) * sum_j p'_j(q) (u(q) - v_j),
    with p the outer attention and p' the same with the trigger weights (p' = p when they are 1).
    A decoupled binding adds lam*m(q) * u(q) on its rows instead.  Each query's row is its own, so the
    queries go in chunks of at most CORRECTION_ELEMENTS outer probabilities.
    """
    n = q.shape[1]
    step = max(1, CORRECTION_ELEMENTS // (q.shape[0] * heads * k.shape[1]))
    if n <= step:
        return _correction(q, k, v, heads, bindings)
    parts = [
        _correction(q[:, i : i + step], k, v, heads, [b.queries(i, i + step) for b in bindings])
        for i in range(0, n, step)
    ]
    return torch.cat(parts, 1)


def _correction(q: Tensor, k: Tensor, v: Tensor, heads: int, bindings: Sequence[NestedBinding]) -> Tensor:
    qh, kh, vh = _split(q, heads), _split(k, heads), _split(v, heads)
    scale, acc = qh.shape[-1] ** -0.5, _acc_dtype(q)
    p = torch.softmax((qh @ kh.transpose(-1, -2)).to(acc) * scale, dim=-1)  # (B, H, N, T)
    nested = [b for b in bindings if not b.decoupled and b.strength != 0]
    weighted = _reweighted(p, nested, qh) if any(b.weighted for b in nested) else p
    delta = (weighted - p) @ vh.to(acc) if weighted is not p else torch.zeros(qh.shape, dtype=acc, device=q.device)
    for b in bindings:
        u = _nested_values(qh, b, heads).to(acc)  # (B, H, N, d)
        if b.decoupled:
            delta += _gate(b, qh) * u * b.where.any(-1)[:, None, None, None]
            continue
        pj = weighted * b.where[:, None, None, :]  # (B, H, N, T), zero off the trigger
        change = pj.sum(-1, keepdim=True) * u - pj @ vh.to(acc)
        delta += _gate(b, qh) * change
    return _merge(delta).to(q.dtype)


def _reweighted(p: Tensor, bindings: Sequence[NestedBinding], qh: Tensor) -> Tensor:
    """p (B, H, N, T) with each binding's trigger positions weighted by w(q) = 1 + (w - 1) m(q), renormalised."""
    weight = torch.ones((), dtype=p.dtype, device=p.device)
    for b in bindings:
        w = _trigger_weight(b, qh)  # float or (B|1, 1, N, 1)
        weight = weight * (1 + (w - 1) * b.where[:, None, None, :].to(p.dtype))  # (B, 1, N|1, T)
    p = p * weight
    return p / p.sum(-1, keepdim=True)


def _trigger_weight(bind: NestedBinding, qh: Tensor):
    """w(q) = 1 + (w - 1) * m(q): the trigger weight where the subject acts, as a float or (B|1, 1, N, 1)."""
    if bind.query_mask is None or not bind.weighted:
        return float(bind.trigger_weight)
    mask = bind.query_mask.to(device=qh.device, dtype=_acc_dtype(qh))[:, None, :, None]
    return 1 + (bind.trigger_weight - 1) * mask


def subject_maps(q: Tensor, k: Tensor, heads: int, binding: NestedBinding) -> SubjectMaps:
    """The outer trigger probability and nested token choice per query, for previews."""
    qh, kh = _split(q, heads), _split(k, heads)
    scale, acc = qh.shape[-1] ** -0.5, _acc_dtype(q)
    p = torch.softmax((qh @ kh.transpose(-1, -2)).to(acc) * scale, dim=-1)
    outer = (p * binding.where[:, None, None, :]).sum(-1).mean(1)  # (B, N)
    nk = _split(binding.keys[None], heads)  # (1, H, M, d)
    w = torch.softmax((qh @ nk.transpose(-1, -2)).to(acc) * scale, dim=-1).mean(1)  # (B, N, M)
    entropy = -(w * w.clamp_min(1e-12).log()).sum(-1)
    has = binding.where.any(-1)[:, None]
    return SubjectMaps(outer=outer, token=w.argmax(-1), entropy=entropy * has, weights=w * has[..., None])


# -- internals ---------------------------------------------------------------------------


def _on_rows(
    evaluate,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    bindings: Sequence[NestedBinding],
    rows: Tensor,
    base_attention: AttentionFn,
) -> Tensor:
    """``evaluate`` on the bound rows; the other rows are ``base_attention``'s.

    The base runs on the whole batch: attention kernels are not batch-invariant (CPU SDPA
    with few queries splits work differently for 1 and 2 rows), and untouched rows must
    come out bit-identical to what the model computes without the patch."""
    if bool(rows.all()):
        return evaluate(q, k, v, heads, bindings)
    out = base_attention(q, k, v, heads).to(q.dtype).clone()
    out[rows] = evaluate(q[rows], k[rows], v[rows], heads, [b.rows(rows) for b in bindings])
    return out


def _records_grad(q: Tensor, k: Tensor, v: Tensor, bindings: Sequence[NestedBinding]) -> bool:
    tensors = [q, k, v] + [t for b in bindings for t in (b.keys, b.values)]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _has_statistics_kernel(q: Tensor) -> bool:
    """PyTorch's CPU attention kernel also returns each query's log-normaliser; it is not
    differentiable in that output, so it serves inference only (autograd never gets here)."""
    return q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _with_statistics(
    q: Tensor, k: Tensor, v: Tensor, heads: int, bindings: Sequence[NestedBinding], rows: Optional[Tensor] = None
) -> Tensor:
    """Plain SDPA and its logsumexp from one kernel call over the whole batch, so rows outside
    ``rows`` are exactly sdpa_attention's; then each bound row gets the closed-form change
    sum_j lam*m*p_j (u - v_j) = [P*softmax(n), -p] @ [V~ ; v_J], with p_j = exp(l_j - lse),
    as one batched matmul over heads that accumulates into the output in place.

    With trigger weights w the change is [w*lam*m*P*softmax(n), (w - 1 - w*lam*m) p] @ [V~ ; v_J],
    and the row is divided by the new normaliser Z = 1 + sum over bindings of (w - 1) P."""
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = _split(q, heads), _split(k, heads), _split(v, heads)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qh, kh, vh, 0.0, False
    )  # (B, H, N, d), (B, H, N)
    acc = _acc_dtype(q)
    for row in range(b) if rows is None else rows.nonzero()[:, 0].tolist():
        q_row = qh[row]  # (H, N, d), read in place
        normaliser = None  # Z, (H, N, 1), once a binding has a trigger weight
        for bind in bindings:
            j = bind.where[row].nonzero()[:, 0]
            if j.numel() == 0:
                continue
            m = bind.keys.shape[0]
            keys = torch.cat([bind.keys.view(m, heads, d).transpose(0, 1), kh[row, :, j]], 1)  # (H, M+J, d)
            values = torch.cat([bind.values.view(m, heads, d).transpose(0, 1), vh[row, :, j]], 1)
            if m > SMALL_M:  # many tokens: SDPA's kernel computes u(q) faster than explicit softmax
                keys, values = keys[:, m:], values[:, m:]
            logits = (
                torch.bmm(q_row, keys.transpose(1, 2).to(q_row.dtype)).to(acc) * d**-0.5
            )  # (H, N, M+J) or (H, N, J)
            p = torch.exp(logits[..., -j.numel() :] - lse[row][..., None].to(acc))  # (H, N, J)
            gate, weight = _row_gate(bind, row, q), _row_trigger_weight(bind, row, q)
            mass = weight * gate * p.sum(-1, keepdim=True)  # (H, N, 1): what the nested values receive
            if bind.weighted:
                normaliser = (1 if normaliser is None else normaliser) + (weight - 1) * p.sum(-1, keepdim=True)
            if m > SMALL_M:
                u = F.scaled_dot_product_attention(
                    q_row, *(x.view(m, heads, d).transpose(0, 1).to(q_row.dtype) for x in (bind.keys, bind.values))
                )
                out[row] += (u.to(acc) * mass).to(out.dtype)
                coeff = p * (weight - 1 - weight * gate)
            else:
                coeff = torch.cat([torch.softmax(logits[..., :m], -1) * mass, p * (weight - 1 - weight * gate)], -1)
            out[row] += torch.bmm(coeff, values.to(acc)).to(out.dtype)
        if normaliser is not None:
            out[row] /= normaliser.to(out.dtype)
    return _merge(out)


def _row_gate(bind: NestedBinding, row: int, q: Tensor):
    """lam * m(q) for one batch row: a float, or (1, N, 1)."""
    if bind.query_mask is None:
        return float(bind.strength)
    mask = bind.query_mask[row if bind.query_mask.shape[0] > 1 else 0]
    return bind.strength * mask.to(device=q.device, dtype=_acc_dtype(q))[None, :, None]


def _row_trigger_weight(bind: NestedBinding, row: int, q: Tensor):
    """w(q) = 1 + (w - 1) m(q) for one batch row: a float, or (1, N, 1)."""
    if bind.query_mask is None or not bind.weighted:
        return float(bind.trigger_weight)
    mask = bind.query_mask[row if bind.query_mask.shape[0] > 1 else 0]
    return 1 + (bind.trigger_weight - 1) * mask.to(device=q.device, dtype=_acc_dtype(q))[None, :, None]


def _fused(q: Tensor, k: Tensor, v: Tensor, heads: int, bindings: Sequence[NestedBinding]) -> Tensor:
    """One SDPA over [text entries, nested entries of every subject], biases carried in extra dims.

    Each subject adds two coordinates to the head dimension.  A query carries there
    its nested bias log(lam*m) + log w + lse_J(l) - lse_m(n) and its trigger bias log(1 - lam*m) + log w;
    a nested key carries (1, 0), a trigger key (0, 1), any other key (0, 0).  Every
    logit q'.k' is then the logit plus its bias, with no (B, H, N, T+M) mask to build.
    """
    qh, kh, vh = _split(q, heads), _split(k, heads), _split(v, heads)
    b, h, n, d = qh.shape
    t, m_total = kh.shape[2], sum(bind.keys.shape[0] for bind in bindings)
    width = _padded_width(d + 2 * len(bindings), q.device)
    # Laid out (B, N, H, width) like q itself, so that SDPA's output needs no transpose copy.
    qa = qh.new_empty((b, n, h, width)).transpose(1, 2)
    qa[..., d + 2 * len(bindings) :].zero_()
    torch.mul(qh, d**-0.5, out=qa[..., :d])
    ka = kh.new_zeros((b, h, t + m_total, width))
    va = vh.new_zeros((b, h, t + m_total, width))
    ka[:, :, :t, :d] = kh
    va[:, :, :t, :d] = vh
    start = t
    for i, bind in enumerate(bindings):
        nk, nv = _split(bind.keys[None], heads), _split(bind.values[None], heads)  # (1, H, M, d)
        stop = start + nk.shape[2]
        gate, log_weight = _gate(bind, qh), _log(_trigger_weight(bind, qh))  # float or (B|1, 1, N, 1) each
        nested_lse, trigger_lse = _logsumexps(q, nk, kh, bind.where)  # (B, H, N, 1) each
        qa[..., d + 2 * i] = _finite(trigger_lse - nested_lse + _log(gate) + log_weight)[..., 0]
        qa[..., d + 2 * i + 1] = _finite(_log1m(gate) + log_weight + torch.zeros_like(nested_lse))[..., 0]
        ka[:, :, start:stop, :d] = nk
        ka[:, :, start:stop, d + 2 * i] = 1
        ka[..., :t, d + 2 * i + 1] = bind.where[:, None, :].to(ka.dtype)
        va[:, :, start:stop, :d] = nv
        start = stop
    out = F.scaled_dot_product_attention(qa, ka, va, scale=1.0)
    return _merge(out[..., :d])


def _logsumexps(q: Tensor, nk: Tensor, kh: Tensor, where: Tensor) -> Tuple[Tensor, Tensor]:
    """Per query: logsumexp of the scaled nested logits and of the trigger logits, (B, H, N, 1) each.

    One matmul against [K~ ; k_J] gives both; J is padded to the row with most trigger
    positions, and a row without any gets -inf.  q is (B, N, H*d), read in place.
    """
    b, h, _, d = kh.shape
    m = nk.shape[2]
    count = where.sum(-1)  # (B,)
    j = max(int(count.max()), 1)
    order = torch.argsort(where.to(torch.int8), dim=-1, descending=True, stable=True)[:, :j]  # (B, J)
    kj = kh.gather(2, order[:, None, :, None].expand(-1, h, -1, d))  # (B, H, J, d)
    keys = torch.cat([nk.expand(b, -1, -1, -1), kj], 2)  # (B, H, M+J, d)
    logits = torch.einsum("bnhd,bhmd->bhnm", q.view(b, -1, h, d), keys).to(_acc_dtype(kh)) * d**-0.5
    valid = torch.arange(j, device=where.device)[None] < count[:, None]  # (B, J)
    trigger = logits[..., m:].masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.logsumexp(logits[..., :m], -1, keepdim=True), torch.logsumexp(trigger, -1, keepdim=True)


def _padded_width(width: int, device: torch.device) -> int:
    """CUDA kernels want the head width in multiples of 8; zero columns change nothing."""
    return -(-width // 8) * 8 if device.type == "cuda" else width


def _finite(x: Tensor) -> Tensor:
    """-inf biases become -1e4: exp underflows to exactly 0, and 0 * -1e4 stays 0 in q'.k'."""
    return x.clamp_min(-1e4)


def _nested_values(qh: Tensor, bind: NestedBinding, heads: int) -> Tensor:
    nk, nv = _split(bind.keys[None], heads), _split(bind.values[None], heads)
    return F.scaled_dot_product_attention(qh, nk.expand(qh.shape[0], -1, -1, -1), nv.expand(qh.shape[0], -1, -1, -1))


def _gate(bind: NestedBinding, qh: Tensor):
    """lam * m(q), as a float or a (B|1, 1, N, 1) tensor."""
    if bind.query_mask is None:
        return float(bind.strength)
    return bind.strength * bind.query_mask.to(device=qh.device, dtype=_acc_dtype(qh))[:, None, :, None]


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Softmax statistics are kept in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log(x):
    return torch.log(x) if torch.is_tensor(x) else torch.log(torch.tensor(float(x), dtype=torch.float64))


def _log1m(x):
    return torch.log1p(-x) if torch.is_tensor(x) else torch.log1p(torch.tensor(-float(x), dtype=torch.float64))


def _bound_rows(bindings: Sequence[NestedBinding], batch: int) -> Tensor:
    rows = torch.zeros(batch, dtype=torch.bool)
    for b in bindings:
        rows |= b.where.any(-1).cpu()
    return rows


def _overlapping(bindings: Sequence[NestedBinding]) -> bool:
    """Whether two bindings share a trigger position ("man" and "old man"): the fused form
    would multiply their (1 - lam*m) factors, the formula adds their changes."""
    if len(bindings) < 2:
        return False
    return bool((sum(b.where.to(torch.int32) for b in bindings) > 1).any())


def _split(x: Tensor, heads: int) -> Tensor:
    """(B, L, H*d) -> (B, H, L, d)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """(B, H, L, d) -> (B, L, H*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, heads: int, bindings: Sequence[NestedBinding]) -> None:
    b, n, c = q.shape
    if c % heads or k.shape[0] != b or v.shape[:2] != k.shape[:2] or k.shape[2] != c:
        raise ValueError(
            f"nested attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and {heads} heads do not "
            "fit together"
        )
    for bind in bindings:
        if bind.keys.shape[-1] != c or bind.values.shape != bind.keys.shape:
            raise ValueError(
                f"nested attention: nested keys {tuple(bind.keys.shape)} / values {tuple(bind.values.shape)} "
                f"must both be (M, {c}) to match this layer's width {c}"
            )
        if tuple(bind.where.shape) != (b, k.shape[1]):
            raise ValueError(
                f"nested attention: trigger mask {tuple(bind.where.shape)} must be (batch, tokens) = {(b, k.shape[1])}"
            )
        if not bind.trigger_weight >= 0:
            raise ValueError(f"nested attention: the trigger weight must be 0 or more, not {bind.trigger_weight}")
        if bind.query_mask is not None and (bind.query_mask.shape[-1] != n or bind.query_mask.shape[0] not in (1, b)):
            raise ValueError(f"nested attention: query mask {tuple(bind.query_mask.shape)} must be (1 or {b}, {n})")
