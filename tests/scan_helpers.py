"""Inputs and checks shared by the recurrence-op tests (tests/ops/test_recurrence.py,
tests/ops/test_native.py): V = 1 arguments in every gate form, gradients of a random linear
function, and the bytes autograd keeps for a backward."""
import torch

from blocks.ops.recurrence.reference import recurrence_reference

from helpers import rel_err

GATES = {"normal": lambda u: -u, "near0": lambda u: -30 - 20 * u,
         "near1": lambda u: -1e-6 * u, "zero": lambda u: -1e4 * (1 + u)}

def grads(fn, args, seed):
    """Gradients of a random linear function of (o, final state) w.r.t. every input (None
    entries, such as no gate, no state or no A, pass through as None)."""
    g = torch.Generator().manual_seed(seed)
    leaves = [None if a is None else a.clone().requires_grad_(True) for a in args]
    o, S = fn(*leaves)
    w1 = torch.randn(o.shape, generator=g, dtype=o.dtype)
    w2 = torch.randn(S.shape, generator=g, dtype=S.dtype)
    ((o * w1).sum() + (S * w2).sum()).backward()
    return [None if x is None else x.grad for x in leaves]

def scan_inputs(B, T, Hk, R, K, dtype, gate="normal", state=True, form="factored"):
    """gated_linear_recurrence arguments of V = 1: q, k (B, T, Hk, K) shared by R heads each,
    v (B, T, H, 1) and the gate in one of four forms; Mamba-1 is ``factored`` with Hk = 1
    (log gate = dt * A), RG-LRU ``scalar`` with K = 1. Returns (q, k, v, log_g, s0, A)."""
    g = torch.Generator().manual_seed(3000 + 11 * T + K + R)
    H = Hk * R
    q = torch.randn(B, T, Hk, K, generator=g, dtype=dtype)
    k = torch.randn(B, T, Hk, K, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, 1, generator=g, dtype=dtype)
    A = None
    if form == "factored":
        scale = {"normal": 1.0, "near0": 60.0, "near1": 1e-6}[gate]
        log_g = torch.rand(B, T, H, generator=g, dtype=dtype) + 0.05           # dt > 0
        A = -scale * (torch.rand(H, K, generator=g, dtype=dtype) + 0.5)
    elif form == "vector":
        log_g = GATES[gate](torch.rand(B, T, H, K, generator=g, dtype=dtype))
    elif form == "scalar":
        log_g = GATES[gate](torch.rand(B, T, H, generator=g, dtype=dtype))
    else:
        log_g = None
    s0 = torch.randn(B, H, K, 1, generator=g, dtype=dtype) if state else None
    return q, k, v, log_g, s0, A

def call(fn, **kw):
    """fn over scan_inputs' tuple, A passed by keyword."""
    return lambda q, k, v, log_g=None, s0=None, A=None: fn(q, k, v, log_g, s0, A=A, **kw)

def matches_reference(fn, args, seed, tol=1e-10):
    """fn (over scan_inputs' tuple) equals the reference on outputs, final state and the
    gradient of every input that has one."""
    o1, S1 = call(recurrence_reference)(*args)
    o2, S2 = fn(*args)
    assert rel_err(o2, o1) < tol and rel_err(S2, S1) < tol
    ref = grads(call(recurrence_reference), args, seed)
    got = grads(fn, args, seed)
    for name, g_ref, g_got in zip("q k v log_g state A".split(), ref, got):
        if g_ref is not None:
            assert rel_err(g_got, g_ref) < tol, name

def saved_bytes(fn, args) -> int:
    """Bytes autograd keeps for the backward of one call (tensors packed by saved-tensor
    hooks; the recomputing backend's checkpoint holds only its inputs, alive anyway)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    leaves = [None if a is None else a.clone().requires_grad_(True) for a in args]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, S = fn(*leaves)
    (o.sum() + S.sum()).backward()
    return total
