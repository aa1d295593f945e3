"""Counting memory on fake tensors: `MemoryTrace` and the hooks that label what FSDP and the forwards allocate."""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections import defaultdict

import torch


def _storages(tensor) -> list:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor._local_tensor
    if tensor.layout != torch.strided:
        return []
    return [tensor.untyped_storage()]


class MemoryTrace:
    """Counts the bytes of every tensor storage alive, by label, and the peak of each phase.

    A `TorchDispatchMode` entered inside a `FakeTensorMode`: it sees every operation's outputs (of
    DTensors: their local tensors), counts each new storage under the current label until the
    storage is freed, follows `UntypedStorage.resize_` (FSDP2 frees and re-allocates gathered
    weights that way), and answers data-dependent reads (`.item()`, `.tolist()`, `bool()`), which
    fake tensors cannot: False or 1 (none of them decides a shape). Storages created before it
    started are counted only once added. With real tensors (`fake_mode` None) it counts the same.

    It also records every collective the traced code issues (`collectives[phase]`): its kind, the
    whole tensor's bytes and dtype, the size of its process group, whose weights (`origin`, set by
    `_labelled_fsdp`) and in which pass (forward with or without gradients, backward).
    """

    def __init__(self, fake_mode):
        self.fake_mode = fake_mode
        self._sizes: dict[int, list] = {}  # id(storage) -> [bytes, label, weakref]
        self.by_label: dict[str, int] = defaultdict(int)
        self.total = 0
        self._labels = ["other"]
        self.phase = None
        self.peaks: dict[str, tuple[int, dict[str, int]]] = {}
        self.marks: dict[str, dict[str, int]] = {}
        self._mode = None
        self._resize = None
        self._outside = 0  # > 0: inside DTensor's sharding propagation
        self._unpatch = None
        self._origins = [("other", "")]
        self.collectives: dict[str, list[dict]] = defaultdict(list)

    # -- counting
    def add(self, tensor, label: str) -> None:
        """Count `tensor`'s storage under `label` (moving it there if already counted)."""
        for storage in _storages(tensor):
            entry = self._sizes.get(id(storage))
            if entry is None:
                self._track(storage, label)
            elif entry[1] != label:
                self.by_label[entry[1]] -= entry[0]
                self.by_label[label] += entry[0]
                entry[1] = label

    def _track(self, storage, label: str) -> None:
        key = id(storage)
        if key in self._sizes:
            return
        size = storage.nbytes()
        ref = weakref.ref(storage, functools.partial(self._freed, key))
        self._sizes[key] = [size, label, ref]
        self.by_label[label] += size
        self.total += size
        self._update_peak()

    def _freed(self, key: int, _ref) -> None:
        entry = self._sizes.pop(key, None)
        if entry is not None:
            self.by_label[entry[1]] -= entry[0]
            self.total -= entry[0]

    def _resized(self, storage) -> None:
        entry = self._sizes.get(id(storage))
        size = storage.nbytes()
        if entry is None:
            if size:  # FSDP2 allocated it before tracing began and re-allocates it now
                self._track(storage, self._labels[-1])
            return
        change = size - entry[0]
        entry[0] = size
        self.by_label[entry[1]] += change
        self.total += change
        self._update_peak()

    def _update_peak(self) -> None:
        if self.phase is None:
            return
        best = self.peaks.get(self.phase)
        if best is None or self.total > best[0]:
            self.peaks[self.phase] = (self.total, {k: v for k, v in self.by_label.items() if v})

    def now(self) -> dict[str, int]:
        return {k: v for k, v in self.by_label.items() if v}

    # -- contexts
    @contextlib.contextmanager
    def labelled(self, label: str):
        self._labels.append(label)
        try:
            yield
        finally:
            self._labels.pop()

    @contextlib.contextmanager
    def origin(self, name: str):
        """Collectives issued inside move `name`'s weights or gradients (the student's, the teacher's), for
        the pass its caller is in: FSDP2 issues them without gradients, so the pass is taken here."""
        if torch._C._current_graph_task_id() != -1:
            step = "backward"
        else:
            step = "forward" if torch.is_grad_enabled() else "forward without gradients"
        self._origins.append((name, step))
        try:
            yield
        finally:
            self._origins.pop()

    @contextlib.contextmanager
    def measuring(self, phase: str):
        """Record the peak of everything alive while inside, as `self.peaks[phase]`, and the collectives
        issued inside, as `self.collectives[phase]`."""
        previous, self.phase = self.phase, phase
        self.peaks.pop(phase, None)
        self.collectives.pop(phase, None)
        self._update_peak()
        try:
            yield
        finally:
            self.phase = previous

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        trace = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return trace._dispatch(func, types, args, kwargs or {})

        original = torch.UntypedStorage.resize_

        @functools.wraps(original)
        def resize_(storage, size):
            result = original(storage, size)
            trace._resized(storage)
            return result

        self._resize = original
        torch.UntypedStorage.resize_ = resize_
        self._unpatch = _outside_count(self)
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        torch.UntypedStorage.resize_ = self._resize
        self._unpatch()
        return False

    def _dispatch(self, func, types, args, kwargs):
        from torch._guards import active_fake_mode
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.distributed.tensor import DTensor
        from torch.utils._pytree import tree_leaves

        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor run its local operations, which come back here
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            # A value fake tensors do not have. False keeps loops going (a decode loop's "all rows
            # stopped"); 1.0 keeps arithmetic finite (AdamW's step count in its bias correction).
            dtype = args[0].dtype
            return False if dtype is torch.bool else (1.0 if dtype.is_floating_point else 1)
        if func is torch.ops._c10d_functional.wait_tensor.default and active_fake_mode() is not None:
            return args[0]  # (its fake implementation returns a new tensor; the real one waits in place)
        if func.namespace in ("c10d", "_c10d_functional") and self.phase is not None:
            self._record_collective(func, args)
        out = func(*args, **kwargs)
        # DTensor's sharding propagation works out output shapes on whole-size fake tensors (in the
        # active fake mode, or in one of its own when there is none): no memory of this process.
        if active_fake_mode() is self.fake_mode and not self._outside:
            label = self._labels[-1]
            if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.nn.Parameter):
                # autocast's copy of a weight in the compute dtype; it caches the copies of weights
                # that train until the autocast region ends (the whole forward)
                label = "weight copies (autocast)"
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    for storage in _storages(leaf):
                        self._track(storage, label)
        return out

    def _record_collective(self, func, args) -> None:
        """One collective: its kind, the bytes of the whole (gathered, or not yet scattered) tensor, its group."""
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group
        from torch.utils._pytree import tree_leaves

        name = func._schema.name  # e.g. c10d::_allgather_base_
        kind = (
            "all-gather"
            if "allgather" in name or "all_gather" in name
            else "reduce-scatter"
            if "reduce_scatter" in name
            else "all-reduce"
            if "allreduce" in name or "all_reduce" in name
            else None
        )
        if kind is None:  # wait_tensor and the like move nothing
            return
        leaves = tree_leaves(args)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not tensors:
            return
        whole = max(tensors, key=lambda t: t.numel())  # all-gather: the output; reduce-scatter: the input
        group = None
        for leaf in leaves:
            if isinstance(leaf, torch.ScriptObject):  # c10d's ops take the process group itself
                with contextlib.suppress(RuntimeError):
                    group = dist.ProcessGroup.unbox(leaf).size()
                    break
            if isinstance(leaf, str) and func.namespace == "_c10d_functional":  # the functional ones its name
                with contextlib.suppress(Exception):
                    group = _resolve_process_group(leaf).size()
                    break
        if group is None:  # all-gather / reduce-scatter: the whole is group x the shard
            group = max(1, whole.numel() // max(1, min(t.numel() for t in tensors)))
        origin, step = self._origins[-1]
        self.collectives[self.phase].append(
            {
                "kind": kind,
                "bytes": whole.numel() * whole.element_size(),
                "dtype": whole.dtype,
                "group": group,
                "origin": origin,
                "pass": step,
            }
        )


def _outside_count(trace: MemoryTrace):
    """While DTensor propagates shardings, tensors are not counted; returns the undo."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    name = "_propagate_tensor_meta_non_cached"
    original = ShardingPropagator.__dict__.get(name)
    if original is None:
        return lambda: None

    @functools.wraps(original)
    def propagate(*args, **kwargs):
        trace._outside += 1
        try:
            return original(*args, **kwargs)
        finally:
            trace._outside -= 1

    setattr(ShardingPropagator, name, propagate)
    return lambda: setattr(ShardingPropagator, name, original)


@contextlib.contextmanager
def _labelled_fsdp(trace: MemoryTrace, modules: dict):
    """Gathering weights (and reducing gradients) of these models' FSDP units counts under its own label,
    and their collectives under the model's name (`modules`: name -> model or None)."""
    from selfdistill.models.distributed import fsdp_units, is_sharded

    patched = []
    for origin, model in modules.items():
        if model is None or not is_sharded(model):
            continue
        for unit in fsdp_units(model):
            group = unit._get_fsdp_state()._fsdp_param_group
            if group is None:
                continue
            for name, label in (
                ("unshard", "gathered weights"),
                ("wait_for_unshard", "gathered weights"),
                ("post_backward", "gradient reduction"),
            ):
                original = getattr(group, name)

                def wrapped(*args, _original=original, _label=label, _origin=origin, **kwargs):
                    with trace.labelled(_label), trace.origin(_origin):
                        return _original(*args, **kwargs)

                setattr(group, name, wrapped)
                patched.append((group, name))
    try:
        yield
    finally:
        for group, name in patched:
            delattr(group, name)


@contextlib.contextmanager
def _labelled_forwards(trace: MemoryTrace, student, teacher_module):
    """The student's forward (with gradients) counts as activations, a teacher's (without) apart."""
    handles = []
    seen = set()
    for model in (student, teacher_module):
        if model is None:
            continue
        decoder = model.get_decoder()
        if id(decoder) in seen:
            continue
        seen.add(id(decoder))
        stack = []

        def pre(module, args, kwargs, _stack=stack):
            label = "activations" if torch.is_grad_enabled() else "teacher forward"
            context = trace.labelled(label)
            context.__enter__()
            _stack.append((context, label))

        def post(module, args, kwargs, output, _stack=stack):
            context, label = _stack.pop()
            context.__exit__(None, None, None)
            if label == "activations":
                trace.marks["after the student's forward"] = trace.now()

        handles.append(decoder.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(decoder.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
