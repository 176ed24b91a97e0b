"""The one set of input rules of the retention ops, shared by the fp32 references (``naive.py``) and the
Triton ops (``chunk.py`` / ``recurrent.py``): a call one path accepts the other accepts, and a call one
refuses the other refuses with the same ``ValueError`` (what was expected, what was received), so code
that runs on CPU does not fail on a GPU, nor the reverse.

The rules, in the order they are checked:

- q, k, v, log_decay are tensors; initial_state and cu_seqlens are None or tensors; all of them dense
  (``torch.strided``, not nested).
- q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, log_decay ``[H]``, head dims K and V in ``[1, MAX_HEAD_DIM]``.
- q, k, v share one dtype, float32, float16 or bfloat16 (the references compute in fp32 either way; the
  kernels exist for these three). log_decay and initial_state are floating point (used as fp32). log_decay's
  values are ln γ <= 0 (read once per tensor); -inf (γ = 0: each token sees only itself) is allowed: the ops
  compute with :func:`usable_log_decay`.
- cu_seqlens: a 1-D integer tensor ``[N + 1]`` (one of :data:`CU_SEQLENS_DTYPES`; B = 1) that starts at 0,
  never decreases and ends at T, and not on meta (its values are read); initial_state ``[B or N, H, K, V]``;
  every tensor on one device.
- scale: None, a finite real number, or a one-element non-bool tensor holding one, not on meta (read once as a
  Python float).
- chunk_size (chunkwise op): an int >= 1.
- Under grad mode neither log_decay nor a tensor scale may require grad: both are constants of the ops
  (the Triton backward gives them none), and a gradient silently left at None would be worse than a refusal.

cu_seqlens' values are checked on the host, and the ops need them there too (the longest sequence, the chunk
tables), which costs a device sync per read. :class:`SharedHostOffsets` reads each cu_seqlens tensor once for
every op call made while it is active: the public ops activate one per call, and ``RetNetModel.forward`` one
per forward, so an L-layer model reads its cu_seqlens once rather than ~3L times. A tensor written in place
since it was read is read (and checked) again.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import math
import numbers
import operator
import weakref

import torch

__all__ = [
    "CU_SEQLENS_DTYPES", "CU_SEQLENS_NAMES", "MAX_HEAD_DIM", "MIN_LOG_DECAY", "SUPPORTED_DTYPES", "HostOffsets",
    "SharedHostOffsets", "check_chunk_size", "check_inputs", "check_scale", "contents_mark", "host_offsets",
    "is_cu_seqlens", "log_decay_tensor", "shares_host_offsets", "unchanged_since", "usable_log_decay",
]

# The paper's presets have V = 2 · K = 512. The kernels tile K and V in at most 128-wide tiles (the recurrent
# kernel holds all of K: a [512, 16] fp32 state slice at 512), and ``python -m retnet.kernels.aot
# --head-dims 512`` compiles every launch's default config for sm_80/sm_90 within shared memory, spilling
# only where it does at 256 (fp32 dq/dk on sm_80, 16 bytes).
MAX_HEAD_DIM = 512
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The integer types cu_seqlens may have: those torch's arithmetic supports on every device. (uint16/32/64 are
# integers too, but subtracting them, as the ops do to form the lengths, is not implemented.)
CU_SEQLENS_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
CU_SEQLENS_NAMES = ", ".join(str(dtype).removeprefix("torch.") for dtype in CU_SEQLENS_DTYPES[:-1]) + (
    f" or {str(CU_SEQLENS_DTYPES[-1]).removeprefix('torch.')}")  # as a refusal lists them
# ln γ at or below this is γ = 0 to fp32 at every distance n >= 1 (e^-104 is below its smallest subnormal),
# and -1e4 · log2(e) · n stays finite for any chunk distance.
MIN_LOG_DECAY = -1e4


def is_cu_seqlens(cu_seqlens) -> bool:
    """Whether ``cu_seqlens`` passes the ops' rule on the offsets' form (their values are read later): a 1-D
    ``torch.Tensor`` of at least one offset, in one of :data:`CU_SEQLENS_DTYPES`. The model and
    ``shard_sequences`` check the same rule before they build on the offsets, so none of them accepts a
    packed row the ops would refuse."""
    return (isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and len(cu_seqlens) > 0
            and cu_seqlens.dtype in CU_SEQLENS_DTYPES)


def usable_log_decay(log_decay: torch.Tensor) -> torch.Tensor:
    """``log_decay`` as fp32 with -inf (γ = 0) and other values below :data:`MIN_LOG_DECAY` raised to it: the
    same γ^n for every n (γ^0 = 1, γ^n = 0 beyond), but ``0 · ln γ`` at distance 0 is then 0, not NaN. The
    recurrent form multiplies by γ = exp(ln γ) and never forms that product; the chunkwise and parallel
    forms do."""
    usable = log_decay.float().clamp(min=MIN_LOG_DECAY)
    # (an op passing it on to another: no second read; not while compiling, where the check is skipped anyway
    # and dynamo cannot trace the version counter: a graph break around every op)
    if not torch.compiler.is_compiling() and _values_checked(log_decay):
        _mark_values_checked(usable)
    return usable


def check_scale(scale, op: str) -> float | None:
    """``scale`` as a finite Python float (None stays None), or a ``ValueError`` naming it."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        # A bool tensor is refused as a Python bool is: True would silently be read as a scale of 1.0.
        if scale.numel() != 1 or scale.is_complex() or scale.dtype == torch.bool:
            raise ValueError(
                f"{op}: scale must be a float or a one-element real tensor; got a {scale.dtype} tensor of shape "
                f"{tuple(scale.shape)}"
            )
        if scale.is_meta:  # (shape-only tracing) .item() below would fail with torch's "no data"
            raise ValueError(f"{op}: scale must hold a value (it is read as a float); got a meta tensor")
        if torch.is_grad_enabled() and scale.requires_grad:
            raise ValueError(
                f"{op}: scale gets no gradient (the ops take it as a constant); got one that requires grad "
                "(pass scale.detach())"
            )
        value = float(scale.item())
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"{op}: scale must be a float or a one-element real tensor; got {type(scale).__name__}")
    else:
        try:
            value = float(scale)
        except OverflowError:  # an int beyond float's range
            raise ValueError(f"{op}: scale must be finite; got an int too large for a float") from None
    # A NaN or infinite scale makes every output NaN or inf: refused rather than computed.
    if not math.isfinite(value):
        raise ValueError(f"{op}: scale must be finite; got {value}")
    return value


def check_chunk_size(chunk_size, op: str) -> int:
    """``chunk_size`` as an int >= 1, or a ``ValueError`` naming it."""
    if isinstance(chunk_size, (bool, float)):
        value = None
    else:
        try:
            value = operator.index(chunk_size)
        except TypeError:
            value = None
    if value is None or value < 1:
        shown = chunk_size if value is None else value
        raise ValueError(f"{op}: chunk_size must be an int >= 1; got {shown!r} ({type(chunk_size).__name__})")
    return value


def check_inputs(op, q, k, v, log_decay, scale=None, initial_state=None, cu_seqlens=None) -> float | None:
    """Apply the module's rules to one call of ``op``; return ``scale`` as a float (or None).

    Raises ``ValueError`` stating what was expected and what was received.
    """
    if cu_seqlens is not None or not _plainly_valid(q, k, v, log_decay, initial_state):
        _check_layout(op, q, k, v, log_decay, initial_state, cu_seqlens)
    if torch.is_grad_enabled() and log_decay.requires_grad:
        raise ValueError(
            f"{op}: log_decay gets no gradient (the ops take it as a constant); got one that requires grad "
            "(pass log_decay.detach())"
        )
    _check_log_decay_values(op, log_decay)
    return check_scale(scale, op)


_STRIDED = torch.strided


def _plainly_valid(q, k, v, log_decay, initial_state) -> bool:
    """Whether an unpacked call meets every rule :func:`_check_layout` applies, tested in a few comparisons: a
    decode step calls an op per layer, and the rules' loops (naming each tensor for the error) cost more than
    its arithmetic there. False sends the call through those rules, which name what is wrong (or accept what
    this test was too narrow for)."""
    tensor = torch.Tensor
    if not (isinstance(q, tensor) and isinstance(k, tensor) and isinstance(v, tensor)
            and isinstance(log_decay, tensor) and (initial_state is None or isinstance(initial_state, tensor))):
        return False
    # Before any shape is read: a (non-jagged) nested tensor's .shape raises torch's "Internal error:
    # NestedTensorImpl doesn't support sizes" instead of the rules' refusal naming it.
    if (q.is_nested or k.is_nested or v.is_nested or log_decay.is_nested
            or q.layout != _STRIDED or k.layout != _STRIDED or v.layout != _STRIDED or log_decay.layout != _STRIDED):
        return False
    if q.dim() != 4 or v.dim() != 4 or k.shape != q.shape:
        return False
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[3]
    device, dtype = q.device, q.dtype
    if (v.shape[0] != batch or v.shape[1] != length or v.shape[2] != heads or log_decay.shape != (heads,)
            or not (1 <= key_dim <= MAX_HEAD_DIM and 1 <= value_dim <= MAX_HEAD_DIM)
            or dtype not in SUPPORTED_DTYPES or k.dtype != dtype or v.dtype != dtype
            or not log_decay.is_floating_point()
            or k.device != device or v.device != device or log_decay.device != device):
        return False
    return initial_state is None or (
        initial_state.is_floating_point() and initial_state.device == device and initial_state.layout == _STRIDED
        and not initial_state.is_nested and initial_state.shape == (batch, heads, key_dim, value_dim))


def _check_layout(op, q, k, v, log_decay, initial_state, cu_seqlens) -> None:
    """The rules on the tensors' types, layouts, shapes, dtypes and devices, and cu_seqlens' values: a
    ``ValueError`` naming the first one broken."""
    for name, x in (("q", q), ("k", k), ("v", v), ("log_decay", log_decay)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor; got {type(x).__name__}")
    for name, x in (("initial_state", initial_state), ("cu_seqlens", cu_seqlens)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor or None; got {type(x).__name__}")
    # Both paths index and flatten their inputs as dense arrays: a sparse or nested one failed deep inside either
    # with torch's own error (each path's different), never the rule's.
    for name, x in (("q", q), ("k", k), ("v", v), ("log_decay", log_decay), ("initial_state", initial_state),
                    ("cu_seqlens", cu_seqlens)):
        if x is not None and (x.layout != torch.strided or x.is_nested):
            layout = "nested" if x.is_nested else str(x.layout)
            raise ValueError(f"{op}: {name} must be a dense (torch.strided) tensor; got a {layout} tensor")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{op}: q, k, v must be [B, T, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape != k.shape:
        raise ValueError(
            f"{op}: q and k must have the same shape [B, T, H, K]; got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must be [B, T, H, V] with q's B, T, H {tuple(q.shape[:3])}; got {tuple(v.shape)}")
    num_heads, key_dim, value_dim = q.shape[2], q.shape[3], v.shape[3]
    if log_decay.shape != (num_heads,):
        raise ValueError(f"{op}: log_decay must be [H] = [{num_heads}]; got {tuple(log_decay.shape)}")
    if not (1 <= key_dim <= MAX_HEAD_DIM and 1 <= value_dim <= MAX_HEAD_DIM):
        raise ValueError(f"{op}: head dims must be in [1, {MAX_HEAD_DIM}]; got K={key_dim}, V={value_dim}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: dtype must be one of float32, float16, bfloat16; got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not log_decay.is_floating_point():
        raise ValueError(f"{op}: log_decay must be floating point (float32); got {log_decay.dtype}")
    if initial_state is not None and not initial_state.is_floating_point():
        raise ValueError(f"{op}: initial_state must be floating point (float32); got {initial_state.dtype}")
    if cu_seqlens is not None and not is_cu_seqlens(cu_seqlens):
        raise ValueError(
            f"{op}: cu_seqlens must be a 1-D integer tensor [N + 1] of {CU_SEQLENS_NAMES}; "
            f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    # Before cu_seqlens is read on the host (a meta or foreign-device tensor would fail there otherwise).
    named = (("q", q), ("k", k), ("v", v), ("log_decay", log_decay), ("initial_state", initial_state),
             ("cu_seqlens", cu_seqlens))
    devices: dict[str, list[str]] = {}
    for name, x in named:
        if x is not None:
            devices.setdefault(str(x.device), []).append(name)
    if len(devices) != 1:  # which tensor is where: "got q, k, v, log_decay on cuda:0; cu_seqlens on cpu"
        placed = "; ".join(f"{', '.join(names)} on {device}" for device, names in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {placed}")
    if cu_seqlens is not None:
        if cu_seqlens.is_meta:  # (shape-only tracing) the host read below would fail with "no data"
            raise ValueError(
                f"{op}: cu_seqlens must hold values (its offsets are read on the host); got a meta tensor"
            )
        if q.shape[0] != 1:
            raise ValueError(f"{op}: with cu_seqlens the batch must be packed into B=1; got B={q.shape[0]}")
        # A decreasing offset would give a kernel a negative length, whose rows it would never write (the
        # output holds whatever memory it was allocated on).
        host_offsets(cu_seqlens).check(op, q.shape[1])
    num_states = q.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
    expected_state = (num_states, num_heads, key_dim, value_dim)
    if initial_state is not None and tuple(initial_state.shape) != expected_state:
        raise ValueError(
            f"{op}: initial_state must be [B or N, H, K, V] = {list(expected_state)}; got {tuple(initial_state.shape)}"
        )


def log_decay_tensor(values, device: torch.device | str | None = None) -> torch.Tensor:
    """ln γ ``[H]`` float32 on ``device`` from host values, checked on the host: the ops then take it as read
    (a model builds one per layer; reading each back on its first call would be a device sync per layer)."""
    values = [float(x) for x in values]
    if not all(x <= 0 for x in values):
        raise ValueError(_log_decay_refusal(values))
    tensor = torch.tensor(values, dtype=torch.float32, device=device)
    if not torch.compiler.is_compiling():  # (see usable_log_decay; a compiled first call leaves one check to do)
        _mark_values_checked(tensor)
    return tensor


def _log_decay_refusal(values: list[float]) -> str:
    return f"log_decay must be ln γ <= 0 (γ in [0, 1]; -inf for γ = 0); got [{', '.join(f'{x:.6g}' for x in values)}]"


# The contents_mark of a log_decay tensor whose values were read and found valid, kept on the tensor itself (under
# a name of its own: a tensor torch.save kept with the older write-counter int would fail to compare).
def _values_checked(log_decay: torch.Tensor) -> bool:
    return unchanged_since(getattr(log_decay, "_retnet_checked_mark", None), log_decay)


def _mark_values_checked(log_decay: torch.Tensor) -> None:
    log_decay._retnet_checked_mark = contents_mark(log_decay)


def _check_log_decay_values(op: str, log_decay: torch.Tensor) -> None:
    """ln γ <= 0 (γ in [0, 1]; -inf is γ = 0): a positive one makes the state grow by γ^T and a NaN spreads, into
    outputs that are inf or NaN with nothing naming why. Its values are read on the host once per tensor (a
    device sync; the model passes the same [H] tensor to every call) and again after an in-place write or a swap of
    its data (:func:`unchanged_since`);
    skipped while compiling or capturing a CUDA graph, where nothing may be read."""
    if log_decay.is_meta or torch.compiler.is_compiling() or (
        log_decay.is_cuda and torch.cuda.is_current_stream_capturing()
    ):
        return
    if _values_checked(log_decay):  # (an inference tensor keeps no version counter: read once)
        return
    if not bool((log_decay <= 0).all()):  # (NaN compares false)
        raise ValueError(f"{op}: {_log_decay_refusal(log_decay.detach().float().cpu().tolist())}")
    _mark_values_checked(log_decay)


def _version(x: torch.Tensor) -> int | None:
    """``x``'s in-place write counter; None for an inference tensor, which keeps none."""
    return None if x.is_inference() else x._version


def contents_mark(x: torch.Tensor) -> tuple:
    """A mark of ``x``'s values as they are now, for :func:`unchanged_since`: its in-place write counter
    (:func:`_version`) and the address of its data. ``x.data = other`` swaps the data without counting a write, and
    ``nn.Module.to()`` / ``.cuda()`` / ``.half()`` do just that to a parameter, keeping the object: by the counter
    alone a ln γ parameter moved or given new values kept the old values' check and, in the recurrent reference, the
    old γ (wrong outputs, or a tensor on the old device). The mark holds the data's storage, so no later allocation
    can take its address while it is kept (a tensor: torch.save refuses a storage beside its own tensor)."""
    address = _address(x)
    return _version(x), address, None if address is None else x.detach()


def unchanged_since(mark, x: torch.Tensor) -> bool:
    """Whether ``x`` holds the data it held when ``mark`` (:func:`contents_mark`, or None) was taken, unwritten."""
    return mark is not None and mark[0] == _version(x) and mark[1] == _address(x)


def _address(x: torch.Tensor) -> int | None:
    try:
        return x.data_ptr()
    except RuntimeError:  # a tensor subclass without storage of its own: its write counter alone
        return None


class HostOffsets:
    """The values of one ``cu_seqlens`` tensor on the host (read once: a device sync) and what the ops derive
    from them, for every op call that names this same tensor while a :class:`SharedHostOffsets` holds it."""

    def __init__(self, cu_seqlens: torch.Tensor):
        self._tensor = weakref.ref(cu_seqlens)
        self._version = _version(cu_seqlens)
        self.offsets: list = cu_seqlens.tolist()  # the one host read
        self._valid_for: set[int] = set()  # the lengths T these offsets were checked against
        # Device tables built from these values (the Triton chunk tables per tile length), kept as long as they hold.
        self.derived: dict = {}

    def describes(self, cu_seqlens: torch.Tensor) -> bool:
        """Whether ``cu_seqlens`` is still the tensor that was read, not written in place since (its version
        counter; an inference tensor keeps none, so within one scope, one forward, it is taken as unchanged)."""
        return self._tensor() is cu_seqlens and self._version == _version(cu_seqlens)

    def check(self, op: str, length: int) -> None:
        """Raise the rule's ``ValueError`` unless the offsets start at 0, never decrease and end at ``length``."""
        if length in self._valid_for:
            return
        offsets = self.offsets
        if offsets[0] != 0 or offsets[-1] != length or any(b < a for a, b in itertools.pairwise(offsets)):
            raise ValueError(f"{op}: cu_seqlens must start at 0, never decrease and end at T={length}; got {offsets}")
        self._valid_for.add(length)

    @property
    def lengths(self) -> list:
        """The N sequence lengths."""
        return [end - start for start, end in itertools.pairwise(self.offsets)]

    @property
    def longest(self):
        """The longest sequence's length (0 without sequences)."""
        return max(self.lengths, default=0)


_ACTIVE: contextvars.ContextVar[SharedHostOffsets | None] = contextvars.ContextVar(
    "retnet_shared_host_offsets", default=None
)


class SharedHostOffsets:
    """One host read per ``cu_seqlens`` tensor for all the op calls made while :meth:`active`: those of one op
    call, or of one model forward (every layer, and a checkpointed layer's recomputation when it enters it
    again). An entry is read again when its tensor was written in place (version counter) or is another object.
    Short-lived on purpose: a write the version counter does not see (through ``.numpy()``, ``.data``, another
    library) is missed only within the scope."""

    def __init__(self):
        self._entries: dict[int, HostOffsets] = {}

    # Host bookkeeping, never traced: dynamo would guard the compiled frame on this dict's entry for the tensor's
    # id(), which every micro-batch's new cu_seqlens misses, recompiling each step up to its recompile limit.
    @torch.compiler.disable
    def get(self, cu_seqlens: torch.Tensor) -> HostOffsets:
        """The host values of ``cu_seqlens``: those read before in this scope while they still describe it."""
        entry = self._entries.get(id(cu_seqlens))
        if entry is None or not entry.describes(cu_seqlens):
            entry = self._entries[id(cu_seqlens)] = HostOffsets(cu_seqlens)
        return entry

    @contextlib.contextmanager
    def active(self):
        """Make this the scope that :func:`host_offsets` reads through (nested op calls find it)."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


@torch.compiler.disable  # a host read (a graph break anyway), kept out of the graph (SharedHostOffsets.get)
def host_offsets(cu_seqlens: torch.Tensor) -> HostOffsets:
    """``cu_seqlens``' values on the host: through the active :class:`SharedHostOffsets`, else a new read.

    Callers check ``cu_seqlens`` is a 1-D integer tensor on a real device first (:func:`check_inputs`)."""
    shared = _ACTIVE.get()
    return HostOffsets(cu_seqlens) if shared is None else shared.get(cu_seqlens)


def shares_host_offsets(op):
    """Decorate a public op so that a call with ``cu_seqlens`` outside any scope gets its own
    :class:`SharedHostOffsets`: its check and its own uses of the offsets then read them once. Without
    ``cu_seqlens`` (or inside a scope) the op runs as it is, so the common path touches no context variable
    (which would break a ``torch.compile`` graph). The signature stays the op's (``inspect`` follows
    ``__wrapped__``)."""
    position = list(inspect.signature(op).parameters).index("cu_seqlens")

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        cu_seqlens = args[position] if len(args) > position else kwargs.get("cu_seqlens")
        if cu_seqlens is None or _ACTIVE.get() is not None:
            return op(*args, **kwargs)
        with SharedHostOffsets().active():
            return op(*args, **kwargs)

    return wrapper
