"""TensorRT-LLM AutoDeploy: graph transforms that put quickllm ops in place of AutoDeploy's canonical ops.

    import quickllm_kernels.integrations.auto_deploy as qk_ad
    gm = torch.export.export(model, args).module()     # or the GraphModule AutoDeploy hands a transform
    reports = qk_ad.retarget_all(gm)                   # {"rope": Report, "rms_norm": ..., "moe": ..., "mla": ...}
    qk_ad.register()                                   # with tensorrt_llm: transforms quickllm_rope, quickllm_rms_norm,
                                                       # quickllm_moe, quickllm_mla for AutoDeploy's config

AutoDeploy (TensorRT-LLM's torch.export path) writes layers as canonical ops of the `auto_deploy`
torch.library namespace; its later transforms swap them for fast kernels. The functions here make
that swap for quickllm: each finds the canonical nodes of a torch.fx.GraphModule, puts quickllm ops in
their place (with the views, transposes, casts and small index tensors the layout needs) and leaves the
graph linted and recompiled. A node whose arguments the quickllm op cannot take exactly is left as it
is and named in the returned Report with the reason; nothing is changed approximately.

    canonical op (TensorRT-LLM, tensorrt_llm/_torch/auto_deploy/custom_ops/)   quickllm
    torch_rope_with_explicit_cos_sin   (rope/torch_rope.py)                    apply_rope, neox
    torch_rope_with_qk_interleaving    (rope/torch_rope.py)                    de-interleave, apply_rope, neox
    torch_rope_with_complex_freqs      (rope/torch_rope.py)                    apply_rope, gptj
    torch_rmsnorm                      (normalization/rms_norm.py)             rms_norm
    torch_moe                          (fused_moe/torch_moe.py)                moe_experts; the softmax / top-k
                                                                               routing that feeds it: moe_route
    torch_mla                          (mla/torch_mla.py)                      mla_decode over the sequence's own
                                                                               latents, weights absorbed

RoPE: the canonical ops carry cos and sin per token, quickllm's apply_rope a table indexed by
positions. The table is built from the given values (rows [cos | sin] of every token of cos's shape,
positions 0, 1, 2, ... over them, broadcast where cos broadcasts): exact, at the cost of one
[tokens, rotary_dim] copy per distinct cos/sin pair (shared by every layer that uses the pair). cos and
sin in the rotate-half form hold each frequency twice (the second half repeats the first); only the
first half reaches the table, so a node is taken only where that repetition is shown from the graph
(cos/sin computed from cat((f, f), -1), or a buffer whose halves are equal), or where the caller
says so (assume_repeated_halves=True, the assumption AutoDeploy's own optimize_rope makes).

Node metadata (node.meta["val"], as torch.export and AutoDeploy's shape propagation leave it) is
required: the checks read shapes and dtypes from it, and the new nodes get theirs. Importing this
module imports neither tensorrt_llm nor anything of AutoDeploy; `register()` imports it when called.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import operator
import sys

import torch
from torch.fx import GraphModule, Node

import quickllm_kernels  # noqa: F401  (defines the torch.ops.quickllm ops)
from quickllm_kernels.mla import mla_absorb

__all__ = ["Report", "retarget_rope", "retarget_rms_norm", "retarget_moe", "retarget_mla", "retarget_all",
           "register", "TRANSFORMS"]

_log = logging.getLogger(__name__)
aten = torch.ops.aten
qops = torch.ops.quickllm

NAMESPACE = "auto_deploy"
# torch_moe's act_fn values that mean SiLU-gated experts: int(ActivationType.Silu), int(ActivationType.Swiglu)
# of tensorrt_llm._torch.utils (4 and 5, the order of TensorRT-LLM's C++ ActivationType); read from
# tensorrt_llm itself when it is already imported.
_SILU_ACT_FNS = (4, 5)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclasses.dataclass
class Report:
    """What one transform did: nodes replaced per canonical op, the nodes left (node name, canonical op,
    why) and notes on costs it chose (e.g. weights restacked in the graph)."""
    replaced: dict = dataclasses.field(default_factory=dict)
    left: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(self.replaced.values())

    def __int__(self) -> int:
        return self.count


class _Left(Exception):
    """A canonical node the quickllm op cannot take; the message says why."""


# ==== graph helpers ===============================================================================


def _qualified_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def _canonical(node: Node) -> str | None:
    """The auto_deploy op a call_function node calls (its name without the namespace), else None."""
    if node.op != "call_function":
        return None
    name = _qualified_name(node.target)
    if name is None or not name.startswith(NAMESPACE + "::"):
        return None
    return name[len(NAMESPACE) + 2:]


def _schema(target):
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target.default
    return target._schema


def _bind(node: Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    out = {}
    for i, arg in enumerate(_schema(node.target).arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            raise _Left(f"argument {arg.name!r} is missing")
    return out


def _is(node, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is target


def _attr(gm: GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _val(node):
    return node.meta.get("val") if isinstance(node, Node) else None


def _tensor(node, what: str) -> torch.Tensor:
    """The node's meta tensor; _Left when the node is not a tensor or has no metadata."""
    if not isinstance(node, Node):
        raise _Left(f"{what} is not a tensor node")
    val = _val(node)
    if not isinstance(val, torch.Tensor):
        raise _Left(f"{what} has no shape metadata (node.meta['val']); run shape propagation first")
    return val


def _same(a, b) -> bool:
    """a == b for sizes known now (ints, or SymInts equal whatever their values)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return bool(statically_known_true(a == b))
    except Exception:  # sizes of different shape environments, or unorderable
        return False


def _norm_dim(dim, rank: int):
    return dim + rank if isinstance(dim, int) and dim < 0 else dim


class _Builder:
    """Emits call_function nodes at the graph's current insertion point, each with node.meta["val"]
    computed by the graph's fake mode from its inputs' metadata."""

    def __init__(self, gm: GraphModule):
        from torch._guards import detect_fake_mode
        self.gm, self.graph = gm, gm.graph
        fakes = [n.meta["val"] for n in gm.graph.nodes
                 if isinstance(n.meta.get("val"), torch._subclasses.FakeTensor)]
        try:
            self.mode = detect_fake_mode(fakes)
        except AssertionError:  # metadata of several propagations: the latest one's
            self.mode = fakes[-1].fake_mode

    def _meta(self, a):
        if isinstance(a, Node):
            val = _val(a)
            if val is None:
                raise LookupError(a.name)
            return val
        if isinstance(a, torch.Tensor) and not isinstance(a, torch._subclasses.FakeTensor):
            return self.mode.from_tensor(a)
        return a

    def __call__(self, target, *args, **kwargs) -> Node:
        node = self.graph.call_function(target, args, kwargs)
        if self.mode is not None:
            try:
                margs, mkwargs = torch.fx.node.map_aggregate((args, kwargs), self._meta)
            except LookupError:
                return node
            with self.mode:
                node.meta["val"] = target(*margs, **mkwargs)
        return node

    def constant(self, tensor: torch.Tensor, hint: str) -> Node:
        """A get_attr node of a new parameter (requires_grad False) on the graph module."""
        name, i = f"_quickllm_{hint}", 0
        while hasattr(self.gm, name):
            i += 1
            name = f"_quickllm_{hint}_{i}"
        self.gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
        node = self.graph.get_attr(name)
        if self.mode is not None:
            node.meta["val"] = self.mode.from_tensor(tensor)
        return node

    def sizes(self, node: Node, dims) -> list:
        """Sizes of node's dims for shape arguments: ints where static, sym_size nodes otherwise."""
        shape = _val(node).shape
        return [shape[d] if isinstance(shape[d], int) else self(aten.sym_size.int, node, d) for d in dims]

    def arange_like(self, t: Node, dtype) -> Node:
        """0, 1, ..., t.shape[0] - 1 on t's device, in dtype (a cumulative sum of ones: no device
        constant in the graph)."""
        ones = self(aten.ones_like.default, self(aten.select.int, t, 1, 0) if _val(t).dim() > 1 else t,
                    dtype=dtype)
        return self(aten.sub.Tensor, self(aten.cumsum.default, ones, 0, dtype=dtype), 1)


def _replace(node: Node, outputs) -> None:
    """Route node's uses to `outputs`: a node for a single result, a tuple for a tuple result (whose
    uses must all be getitem)."""
    if isinstance(outputs, Node):
        node.replace_all_uses_with(outputs)
        return
    for user in list(node.users):
        user.replace_all_uses_with(outputs[user.args[1]])
        node.graph.erase_node(user)


def _tuple_users_ok(node: Node, size: int) -> None:
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)
                and 0 <= user.args[1] < size):
            raise _Left(f"its result is used as a whole by {user.name} (only indexing is rewired)")


def _unobserved_inplace(node: Node, order: dict) -> bool:
    """An in-place aten op (x.div_(...)) on an intermediate that nothing reads after it: erasing it
    changes nothing observable."""
    target = node.args[0] if node.args else None
    schema = getattr(node.target, "_schema", None)
    return (schema is not None and schema.name.startswith("aten::") and schema.name.endswith("_")
            and isinstance(target, Node) and target.op == "call_function"
            and all(order[u] < order[node] for u in target.users if u is not node))


def _erase_dead(gm: GraphModule, nodes) -> None:
    """Erase `nodes` and the inputs they leave unused (pure nodes only); drop parameters whose last
    get_attr went."""
    graph, stack, targets = gm.graph, list(nodes), set()
    order = {n: i for i, n in enumerate(graph.nodes)}
    while stack:
        node = stack.pop()
        if node._erased or node.op not in ("call_function", "get_attr"):
            continue
        if node.users and all(_is(u, aten._assert_tensor_metadata.default) for u in node.users):
            for user in list(node.users):  # export's dtype checks of a value nothing reads any more
                graph.erase_node(user)
        if node.users:
            continue
        if node.is_impure() and not _unobserved_inplace(node, order):
            continue
        inputs = node.all_input_nodes
        if node.op == "get_attr":
            targets.add(node.target)
        graph.erase_node(node)
        stack.extend(inputs)
    alive = {n.target for n in graph.nodes if n.op == "get_attr"}
    for target in targets - alive:
        owner_name, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if isinstance(getattr(owner, name, None), torch.Tensor):
            delattr(owner, name)


def _finish(gm: GraphModule, report: Report) -> Report:
    if report.count:
        gm.graph.lint()
        gm.recompile()
    for name, op, why in report.left:
        _log.info("quickllm: left %s (%s): %s", name, op, why)
    return report


def _run(gm: GraphModule, handlers: dict) -> Report:
    """Call handlers[op](builder, node, args) for each canonical node of those ops; count the ones it
    replaced, report the ones it raised _Left for."""
    report, builder = Report(), _Builder(gm)
    for node in list(gm.graph.nodes):
        op = _canonical(node)
        if op not in handlers or node._erased:
            continue
        try:
            handlers[op](builder, node, _bind(node), report)
        except _Left as why:
            report.left.append((node.name, op, str(why)))
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        _erase_dead(gm, inputs)
        report.replaced[op] = report.replaced.get(op, 0) + 1
    return _finish(gm, report)


# ==== RoPE ========================================================================================

# Ops through which a value's last dim maps element to element (casts, trig, scaling): its halves
# repeat if its inputs' do.
_ELEMENTWISE = {aten.cos.default, aten.sin.default, aten.neg.default, aten.mul.Tensor, aten.mul.Scalar,
                aten.div.Tensor, aten.div.Scalar, aten.add.Tensor, aten.sub.Tensor, aten._to_copy.default,
                aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.clone.default, aten.contiguous.default,
                aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
# Ops that move whole rows of the last dim (the row itself untouched where their dims spare it).
_ROWWISE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
            aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.slice.Tensor, aten.select.int,
            aten.index.Tensor, aten.transpose.int, aten.permute.default}


def _keeps_rows(node: Node, src_rank: int, out_rank: int) -> bool:
    t, a = node.target, node.args
    if t in (aten.slice.Tensor, aten.select.int):
        return _norm_dim(a[1] if len(a) > 1 else 0, src_rank) != src_rank - 1
    if t is aten.unsqueeze.default:
        return _norm_dim(a[1], out_rank) != out_rank - 1
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        dims = a[1] if isinstance(a[1], (list, tuple)) else [a[1]]
        return all(_norm_dim(d, src_rank) != src_rank - 1 for d in dims)
    if t is aten.index.Tensor:
        return len(a[1]) < src_rank
    if t is aten.transpose.int:
        return src_rank - 1 not in (_norm_dim(a[1], src_rank), _norm_dim(a[2], src_rank))
    if t is aten.permute.default:
        return _norm_dim(a[1][-1], src_rank) == src_rank - 1
    return True  # view, reshape, expand: rows kept when the last size is (checked by the caller)


def _repeats_halves(gm: GraphModule, node, depth: int = 0) -> bool:
    """Whether the graph shows that node's last dim is two equal halves, x[..., :R/2] == x[..., R/2:]
    (or that it is constant along the last dim)."""
    val = _val(node)
    if not isinstance(node, Node) or not isinstance(val, torch.Tensor) or depth > 64:
        return False
    if val.dim() == 0 or _same(val.shape[-1], 1):
        return True
    if node.op == "get_attr":
        t = _attr(gm, node.target)
        if not isinstance(t, torch.Tensor) or t.is_meta or t.dim() == 0 or t.shape[-1] % 2:
            return False
        half = t.shape[-1] // 2
        return bool(torch.equal(t[..., :half], t[..., half:]))
    if node.op != "call_function":
        return False
    if node.target is aten.cat.default:
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        return len(parts) == 2 and parts[0] is parts[1] and _norm_dim(dim, val.dim()) == val.dim() - 1
    if node.target in _ELEMENTWISE:
        operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, Node)]
        return bool(operands) and all(_repeats_halves(gm, a, depth + 1) for a in operands)
    if node.target in _ROWWISE:
        src = node.args[0]
        sval = _val(src)
        return (isinstance(sval, torch.Tensor) and sval.dim() > 0 and _same(sval.shape[-1], val.shape[-1])
                and _keeps_rows(node, sval.dim(), val.dim()) and _repeats_halves(gm, src, depth + 1))
    return False


def _rope_layout(q, k, table, unsqueeze_dim, table_last: int):
    """Checks the canonical op's broadcast of cos (or freqs) [tokens..., table_last] unsqueezed at
    unsqueeze_dim against q [.., heads at that dim, .., D]; returns (head axis, q's token axes)."""
    r = q.dim()
    if r not in (3, 4):
        raise _Left(f"q must be 3-D or 4-D, got {list(q.shape)}")
    if k.dim() != r or not _same(k.shape[-1], q.shape[-1]):
        raise _Left(f"k {list(k.shape)} does not match q {list(q.shape)}")
    if not isinstance(unsqueeze_dim, int) or not -r <= unsqueeze_dim < r:
        raise _Left(f"unsqueeze_dim {unsqueeze_dim!r} is not a dim of a {r}-D q")
    head = _norm_dim(unsqueeze_dim, r)
    if head == r - 1:
        raise _Left("unsqueeze_dim puts the heads in the last dim")
    tokens = [i for i in range(r - 1) if i != head]
    if table.dim() != r - 1 or not _same(table.shape[-1], table_last):
        raise _Left(f"cos/freqs {list(table.shape)} must be [tokens..., {table_last}] for q {list(q.shape)}")
    for j, axis in enumerate(tokens):
        if not _same(k.shape[axis], q.shape[axis]):
            raise _Left(f"k {list(k.shape)} and q {list(q.shape)} differ in a token dim")
        if not (_same(table.shape[j], q.shape[axis]) or _same(table.shape[j], 1)):
            raise _Left(f"cos/freqs {list(table.shape)} does not broadcast to q {list(q.shape)} at unsqueeze_dim "
                        f"{unsqueeze_dim}")
    return head, tokens


def _rope_positions(b: _Builder, q: Node, table: Node, cache: Node, tokens) -> Node:
    """Row indices into `cache` (the table's token rows, flattened) with q's token shape: positions
    0..n-1 laid out as the table's token dims, expanded where the table broadcasts."""
    tval = _val(table)
    pos = b.arange_like(cache, torch.int64)
    pos = b(aten.view.default, pos, b.sizes(table, range(tval.dim() - 1)))
    if any(not _same(tval.shape[j], _val(q).shape[axis]) for j, axis in enumerate(tokens)):
        pos = b(aten.expand.default, pos, b.sizes(q, tokens))
    return pos


def _rope_apply(b: _Builder, node: Node, q: Node, k: Node, positions: Node, cache: Node, head: int, tokens,
                is_neox: bool) -> None:
    """apply_rope on q and k moved to [tokens..., heads, D], results moved back."""
    r = _val(q).dim()
    perm = [*tokens, head, r - 1]
    if perm != list(range(r)):
        q, k = b(aten.permute.default, q, perm), b(aten.permute.default, k, perm)
    rot = b(qops.apply_rope.default, q, k, positions, cache, is_neox, False)
    outs = [b(operator.getitem, rot, 0), b(operator.getitem, rot, 1)]
    if perm != list(range(r)):
        inv = [perm.index(i) for i in range(r)]
        outs = [b(aten.permute.default, o, inv) for o in outs]
    _replace(node, tuple(outs))


class _RopeHandlers:
    def __init__(self, assume_repeated_halves: bool):
        self.assume = assume_repeated_halves
        self.tables = {}  # (cos, sin, dtype, token dims) -> (cache, positions), shared across layers

    def _halves(self, b: _Builder, cos: Node, sin: Node) -> None:
        if self.assume:
            return
        for name, t in (("cos", cos), ("sin", sin)):
            if not _repeats_halves(b.gm, t):
                raise _Left(f"{name}: the graph does not show that its second half repeats the first (the "
                            "rotate-half form apply_rope's table assumes); pass assume_repeated_halves=True "
                            "to take it on trust")

    def _cos_sin(self, b, node, args, interleaved: bool) -> None:
        qn, kn, cos, sin = args["q"], args["k"], args["cos"], args["sin"]
        qv, kv, cv, sv = (_tensor(qn, "q"), _tensor(kn, "k"), _tensor(cos, "cos"), _tensor(sin, "sin"))
        d = qv.shape[-1]
        if not isinstance(d, int) or d % 2:
            raise _Left(f"head_dim {d} must be a static even size")
        if qv.dtype not in _FLOATS or kv.dtype != qv.dtype:
            raise _Left(f"q and k must share a float dtype, got {qv.dtype} and {kv.dtype}")
        if list(cv.shape) != list(sv.shape) or not (cv.is_floating_point() and sv.is_floating_point()):
            raise _Left(f"cos {list(cv.shape)} and sin {list(sv.shape)} must be float tensors of one shape")
        if interleaved and (cv.dtype != qv.dtype or sv.dtype != qv.dtype):
            # No cast of cos/sin in this op: another dtype would promote its outputs.
            raise _Left(f"cos/sin ({cv.dtype}/{sv.dtype}) must have q's dtype {qv.dtype}")
        head, tokens = _rope_layout(qv, kv, cv, args["unsqueeze_dim"], d)
        _tuple_users_ok(node, 2)
        self._halves(b, cos, sin)
        with b.graph.inserting_before(node):
            key = ("cos_sin", cos, sin, qv.dtype, head, tuple(map(str, (qv.shape[a] for a in tokens))))
            if key not in self.tables:
                # Only the first halves reach the table; cast to q's dtype first, as the op does.
                half = d // 2
                table = b(aten.cat.default, [b(aten.slice.Tensor, cos, -1, 0, half),
                                             b(aten.slice.Tensor, sin, -1, 0, half)], -1)
                if cv.dtype != qv.dtype:
                    table = b(aten._to_copy.default, table, dtype=qv.dtype)
                cache = b(aten.reshape.default, table, [-1, d])
                self.tables[key] = cache, _rope_positions(b, qn, cos, cache, tokens)
            cache, positions = self.tables[key]
            if interleaved:
                # The op's de-interleave: [x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...] per head.
                def deinterleave(x):
                    sizes = b.sizes(x, range(_val(x).dim() - 1))
                    pairs = b(aten.reshape.default, x, [*sizes, d // 2, 2])
                    return b(aten.reshape.default, b(aten.transpose.int, pairs, -1, -2), [*sizes, d])
                qn, kn = deinterleave(qn), deinterleave(kn)
            _rope_apply(b, node, qn, kn, positions, cache, head, tokens, is_neox=True)

    def explicit(self, b, node, args, report):
        self._cos_sin(b, node, args, interleaved=False)

    def interleaving(self, b, node, args, report):
        self._cos_sin(b, node, args, interleaved=True)

    def complex_freqs(self, b, node, args, report):
        qn, kn, freqs = args["xq"], args["xk"], args["freqs_cis"]
        qv, kv, fv = _tensor(qn, "xq"), _tensor(kn, "xk"), _tensor(freqs, "freqs_cis")
        d = qv.shape[-1]
        if qv.dim() != 4:
            raise _Left(f"xq must be 4-D (the op's flatten(3)), got {list(qv.shape)}")
        if not isinstance(d, int) or d % 2:
            raise _Left(f"head_dim {d} must be a static even size")
        if qv.dtype not in (torch.float32, torch.float16, torch.bfloat16) or kv.dtype != qv.dtype:
            raise _Left(f"xq and xk must share a float32/float16/bfloat16 dtype, got {qv.dtype} and {kv.dtype}")
        if fv.dtype != torch.complex64:
            raise _Left(f"freqs_cis must be complex64 (the op's float32 math), got {fv.dtype}")
        head, tokens = _rope_layout(qv, kv, fv, args["unsqueeze_dim"], d // 2)
        _tuple_users_ok(node, 2)
        with b.graph.inserting_before(node):
            key = ("complex", freqs, head, tuple(map(str, (qv.shape[a] for a in tokens))))
            if key not in self.tables:
                # [..., R/2] complex -> rows [re_0 .. re_{R/2-1}, im_0 .. im_{R/2-1}], float32.
                pairs = b(aten.view_as_real.default, freqs)
                cache = b(aten.reshape.default, b(aten.transpose.int, pairs, -1, -2), [-1, d])
                self.tables[key] = cache, _rope_positions(b, qn, freqs, cache, tokens)
            cache, positions = self.tables[key]
            _rope_apply(b, node, qn, kn, positions, cache, head, tokens, is_neox=False)


def retarget_rope(gm: GraphModule, *, assume_repeated_halves: bool = False) -> Report:
    """auto_deploy::torch_rope_with_explicit_cos_sin, torch_rope_with_qk_interleaving and
    torch_rope_with_complex_freqs nodes -> quickllm::apply_rope.

    Taken: q and k 3-D or 4-D (complex: 4-D) of one float dtype, heads at unsqueeze_dim (any layout:
    bsnd, bnsd, [tokens, heads, D]), cos/sin (or freqs_cis, complex64) with q's token dims or 1 where
    they broadcast, cos/sin halves shown to repeat (see the module docstring) or assumed. The qk
    interleaving op also needs cos/sin in q's dtype (it does not cast them). Results are q and k in
    the node's layout (views of apply_rope's contiguous outputs), in q's dtype; math in float32 (the
    canonical ops round each product to q's dtype: float32 agrees, bfloat16/float16 differ by a
    rounding).
    """
    h = _RopeHandlers(assume_repeated_halves)
    return _run(gm, {"torch_rope_with_explicit_cos_sin": h.explicit,
                     "torch_rope_with_qk_interleaving": h.interleaving,
                     "torch_rope_with_complex_freqs": h.complex_freqs})


# ==== RMSNorm =====================================================================================


def _rms_norm(b: _Builder, node: Node, args: dict, report: Report) -> None:
    x, w, eps = args["input"], args["weight"], args["eps"]
    xv, wv = _tensor(x, "input"), _tensor(w, "weight")
    if xv.dtype not in _FLOATS or xv.dim() < 1:
        raise _Left(f"input must be a float tensor [..., H], got {xv.dtype} {list(xv.shape)}")
    if wv.dim() != 1 or not _same(wv.shape[0], xv.shape[-1]):
        raise _Left(f"weight must be [H] = [{xv.shape[-1]}], got {list(wv.shape)}")
    if wv.dtype != xv.dtype:
        # The op multiplies in the promoted dtype before its cast: another rounding than rms_norm's.
        raise _Left(f"weight dtype {wv.dtype} differs from input dtype {xv.dtype}")
    if not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise _Left(f"eps must be a positive finite number, got {eps!r}")
    with b.graph.inserting_before(node):
        y = b(operator.getitem, b(qops.rms_norm.default, x, w, float(eps), 0.0), 0)
    _replace(node, y)


def retarget_rms_norm(gm: GraphModule) -> Report:
    """auto_deploy::torch_rmsnorm(input, weight, eps) -> quickllm::rms_norm (weight_offset 0, the same
    rounding: normalised in float32, cast to the input's dtype, times the weight). Taken where the
    weight is [H] in the input's dtype and eps > 0; the result is contiguous (the op keeps the input's
    strides), with the same values."""
    return _run(gm, {"torch_rmsnorm": _rms_norm})


# ==== MoE =========================================================================================


def _silu_act_fns() -> tuple:
    utils = sys.modules.get("tensorrt_llm._torch.utils")
    act = getattr(utils, "ActivationType", None)
    if act is not None and hasattr(act, "Silu") and hasattr(act, "Swiglu"):
        return int(act.Silu), int(act.Swiglu)
    return _SILU_ACT_FNS


def _strip_casts(node):
    while _is(node, aten._to_copy.default) or _is(node, aten.to.dtype) or _is(node, aten.to.dtype_layout):
        node = node.args[0]
    return node


def _softmax_logits(probs):
    """The float32 softmax over the last dim that `probs` is: (logits, None), or (None, why)."""
    pv = _val(probs)
    if not isinstance(pv, torch.Tensor) or pv.dtype != torch.float32 or pv.dim() != 2:
        return None, "the top-k does not read float32 [tokens, experts] probabilities"
    if _is(probs, aten.softmax.int) or _is(probs, aten._softmax.default):
        if _norm_dim(probs.args[1], 2) != 1:
            return None, "the softmax is not over the experts"
        logits = probs.args[0]
        if _is(logits, aten._to_copy.default) and logits.kwargs.get("dtype") == torch.float32:
            logits = logits.args[0]  # softmax(x.float()): moe_route's float32 softmax of x
        return logits, None
    return None, "the top-k does not read a softmax"


def _match_routing(ids_node, weights_node):
    """The softmax -> top-k (-> renormalise) routing that produced torch_moe's selected_experts and
    routing_weights: (logits, top_k, renormalize), or (None, why)."""
    ids = _strip_casts(ids_node)
    if not (_is(ids, operator.getitem) and ids.args[1] == 1 and _is(ids.args[0], aten.topk.default)):
        return None, "selected_experts does not come from aten.topk"
    topk = ids.args[0]
    try:
        targs = _bind(topk)
    except _Left as why:
        return None, str(why)
    if not isinstance(targs["k"], int) or not targs["largest"] or _norm_dim(targs["dim"], 2) != 1:
        return None, "the top-k is not the largest k over the experts"
    w = _strip_casts(weights_node)
    renormalize = False
    if _is(w, aten.div.Tensor) or _is(w, aten.div_.Tensor):
        num, den = w.args
        if not (_is(den, aten.sum.dim_IntList) and den.args[0] is num and len(den.args) > 2 and den.args[2]
                and [_norm_dim(d, 2) for d in den.args[1]] == [1]):
            return None, "routing_weights is divided by something other than its sum"
        w, renormalize = num, True
    if not (_is(w, operator.getitem) and w.args[0] is topk and w.args[1] == 0):
        return None, "routing_weights are not the top-k's values"
    logits, why = _softmax_logits(topk.args[0])
    if logits is None:
        return None, why
    lv = _val(logits)
    if not isinstance(lv, torch.Tensor) or lv.dtype not in _FLOATS:
        return None, "the router logits are not a float tensor"
    return (logits, targs["k"], renormalize), None


def _stacked(b: _Builder, groups, hint: str):
    """Expert weights stacked [E, rows, cols] from per-expert lists (w13: cat of each group; w2: the
    single entry): a new parameter made once where every entry is a loaded parameter, else nodes
    that stack them on every call. Returns (node, made_once)."""
    gm = b.gm
    tensors = [[_attr(gm, n.target) if n.op == "get_attr" else None for n in g] for g in groups]
    if all(isinstance(t, torch.Tensor) and not t.is_meta for g in tensors for t in g):
        with torch.no_grad():
            stacked = torch.stack([torch.cat(g, 0) if len(g) > 1 else g[0] for g in tensors]).contiguous()
        return b.constant(stacked, hint), True
    rows = [b(aten.cat.default, list(g), 0) if len(g) > 1 else g[0] for g in groups]
    return b(aten.stack.default, rows), False


def _moe(b: _Builder, node: Node, args: dict, report: Report) -> None:
    x, sel, rw = args["x"], args["selected_experts"], args["routing_weights"]
    w1, w2, w3 = args["w1_weight"], args["w2_weight"], args["w3_weight"]
    if not args["is_gated_mlp"]:
        raise _Left("is_gated_mlp=False (a plain MLP per expert); moe_experts runs gated SiLU experts")
    if args["act_fn"] not in _silu_act_fns():
        raise _Left(f"act_fn {args['act_fn']} is not SiLU-gated (moe_experts' activation)")
    if args["mapping_config"]:
        raise _Left("mapping_config is set (all-to-all expert parallelism)")
    if args["apply_routing_on_input"]:
        raise _Left("apply_routing_on_input=True (weights applied to the input)")
    xv, sv, rv = _tensor(x, "x"), _tensor(sel, "selected_experts"), _tensor(rw, "routing_weights")
    if xv.dtype not in _FLOATS or xv.dim() not in (2, 3):
        raise _Left(f"x must be a float [T, H] or [B, S, H] tensor, got {xv.dtype} {list(xv.shape)}")
    tokens = xv.shape[0] * xv.shape[1] if xv.dim() == 3 else xv.shape[0]
    if sv.dim() != 2 or sv.dtype not in (torch.int32, torch.int64) or not _same(sv.shape[0], tokens):
        raise _Left(f"selected_experts must be int32/int64 [T, top_k] with x's tokens, got {sv.dtype} "
                    f"{list(sv.shape)}")
    if rv.dim() != 2 or not rv.is_floating_point() or list(rv.shape) != list(sv.shape):
        raise _Left(f"routing_weights must be float {list(sv.shape)}, got {rv.dtype} {list(rv.shape)}")
    e = len(w1) if isinstance(w1, (list, tuple)) else 0
    if e == 0 or not all(isinstance(w, (list, tuple)) and len(w) == e for w in (w2, w3)):
        raise _Left("w1_weight, w2_weight and w3_weight must be lists of one weight per expert")
    hidden, inter = xv.shape[-1], _tensor(w1[0], "w1").shape[0]
    for name, ws, want in (("w1", w1, [inter, hidden]), ("w3", w3, [inter, hidden]), ("w2", w2, [hidden, inter])):
        for w in ws:
            wv = _tensor(w, name)
            if wv.dtype != xv.dtype:
                raise _Left(f"{name} dtype {wv.dtype} differs from x's {xv.dtype} (the op casts x to it)")
            if wv.dim() != 2 or not all(_same(a, c) for a, c in zip(wv.shape, want)):
                raise _Left(f"{name} entries must be {want} (H = x's, I = w1[0]'s rows), got {list(wv.shape)}")
    routing, why = _match_routing(sel, rw)
    with b.graph.inserting_before(node):
        w13, once13 = _stacked(b, list(zip(w1, w3)), "moe_w13")
        w2s, once2 = _stacked(b, [[w] for w in w2], "moe_w2")
        if not (once13 and once2):
            report.notes.append(f"{node.name}: expert weights are not all loaded parameters; they are stacked "
                                "in the graph on every call")
        if routing is not None:
            logits, top_k, renormalize = routing
            route = b(qops.moe_route.default, logits, None, top_k, False, renormalize, 0, 0, 1.0)
            weights, ids = b(operator.getitem, route, 0), b(operator.getitem, route, 1)
            if rv.dtype != torch.float32:  # the routing's cast to the activations' dtype, as before
                weights = b(aten._to_copy.default, weights, dtype=rv.dtype)
            report.replaced["moe_route"] = report.replaced.get("moe_route", 0) + 1
        else:
            report.notes.append(f"{node.name}: routing kept as it is ({why})")
            weights, ids = rw, sel
            if sv.dtype != torch.int32:
                ids = b(aten._to_copy.default, ids, dtype=torch.int32)
        x2 = b(aten.reshape.default, x, [-1, hidden]) if xv.dim() == 3 else x
        out = b(qops.moe_experts.default, x2, w13, w2s, weights, ids, "silu", None, None)
        if xv.dim() == 3:
            out = b(aten.reshape.default, out, b.sizes(x, range(3)))
    _replace(node, out)


def retarget_moe(gm: GraphModule) -> Report:
    """auto_deploy::torch_moe nodes -> quickllm::moe_experts, and the routing that feeds them ->
    quickllm::moe_route.

    Taken: gated SiLU experts (is_gated_mlp, act_fn Silu or Swiglu), no all-to-all mapping, routing
    weights applied to the outputs, per-expert weights w1/w3 [I, H] and w2 [H, I] in x's dtype, x
    [T, H] or [B, S, H]. Where every expert weight is a loaded parameter (get_attr of a real tensor)
    they are stacked once into new parameters w13 [E, 2I, H] (w1 rows, then w3's) and w2 [E, H, I] and
    the per-expert ones are dropped; otherwise the graph stacks them on every call (a note says so).
    Expert ids outside [0, E) (skipped by torch_moe) raise on the CPU; on a GPU moe_experts skips
    them too. The routing is replaced where selected_experts and routing_weights come from
    topk(softmax(logits, float32), k) (values renormalised by their sum or not, then cast): the same
    experts and weights, ties at the k-th score broken towards the lower expert id.
    """
    return _run(gm, {"torch_moe": _moe})


# ==== MLA =========================================================================================


def _mla(b: _Builder, node: Node, args: dict, report: Report) -> None:
    qn, qp, ckv, kpe, w = (args[k] for k in ("q_nope", "q_pe", "compressed_kv", "kpe", "kv_b_proj_weight"))
    layout = args["layout"]
    if layout not in ("bsnd", "bnsd"):
        raise _Left(f"layout {layout!r} is neither 'bsnd' nor 'bnsd'")
    qnv, qpv, cv, kv, wv = (_tensor(n, name) for n, name in ((qn, "q_nope"), (qp, "q_pe"), (ckv, "compressed_kv"),
                                                                  (kpe, "kpe"), (w, "kv_b_proj_weight")))
    if len({t.dtype for t in (qnv, qpv, cv, kv, wv)}) != 1 or qnv.dtype not in _FLOATS:
        raise _Left("q_nope, q_pe, compressed_kv, kpe and kv_b_proj_weight must share one float dtype")
    if qnv.dim() != 4 or qpv.dim() != 4 or kv.dim() != 4 or cv.dim() != 3 or wv.dim() != 2:
        raise _Left("q_nope, q_pe, kpe must be 4-D, compressed_kv 3-D, kv_b_proj_weight 2-D")
    seq_axis, head_axis = (1, 2) if layout == "bsnd" else (2, 1)
    bsz, s_q, heads, nope = qnv.shape[0], qnv.shape[seq_axis], qnv.shape[head_axis], qnv.shape[3]
    rope, rank, s_k = qpv.shape[3], cv.shape[2], cv.shape[1]
    if not all(isinstance(v, int) for v in (heads, nope, rope, rank)):
        raise _Left("heads and head dims must be static")
    kv_shape = [bsz, s_k, 1, rope] if layout == "bsnd" else [bsz, 1, s_k, rope]
    q_pe_shape = [bsz, s_q, heads, rope] if layout == "bsnd" else [bsz, heads, s_q, rope]
    if not (all(_same(a, c) for a, c in (*zip(kv.shape, kv_shape), *zip(qpv.shape, q_pe_shape)))
            and _same(cv.shape[0], bsz)):
        raise _Left(f"kpe {list(kv.shape)} / q_pe {list(qpv.shape)} / compressed_kv {list(cv.shape)} do not match "
                    f"q_nope {list(qnv.shape)} in layout {layout}")
    out_features = wv.shape[0]
    if not isinstance(out_features, int) or out_features % heads or out_features // heads <= nope or \
            not _same(wv.shape[1], rank):
        raise _Left(f"kv_b_proj_weight {list(wv.shape)} must be [heads * (qk_nope + v), kv_lora_rank = {rank}]")
    v_dim = out_features // heads - nope
    scale = args["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(nope + rope)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise _Left(f"scale {scale!r} is not a positive finite number (mla_decode's softmax_scale)")
    causal = bool(args["is_causal"])
    if causal and not _same(s_q, s_k):
        if isinstance(s_q, int) and isinstance(s_k, int):
            causal = False  # the op masks only when the lengths are equal
        else:
            raise _Left("is_causal with q and kv lengths not known to be equal or different")
    with b.graph.inserting_before(node):
        bsnd = (lambda t: b(aten.transpose.int, t, 1, 2)) if layout == "bnsd" else (lambda t: t)
        wt = _attr(b.gm, w.target) if w.op == "get_attr" else None
        if isinstance(wt, torch.Tensor) and not wt.is_meta:
            with torch.no_grad():
                w_uk, w_uv = mla_absorb(wt.detach(), heads, nope, v_dim)  # [N, nope, r], [N, r, v], once
            w_uk, w_uv = b.constant(w_uk, "mla_w_uk"), b.constant(w_uv, "mla_w_uv")
        else:
            w3 = b(aten.view.default, w, [heads, nope + v_dim, rank])
            w_uk = b(aten.slice.Tensor, w3, 1, 0, nope)
            w_uv = b(aten.transpose.int, b(aten.slice.Tensor, w3, 1, nope, nope + v_dim), 1, 2)
        # Absorbed query [B, S, N, r + rope]: q_nope @ W_UK per head, then q_pe.
        q_abs = b(aten.transpose.int, b(aten.matmul.default, b(aten.transpose.int, bsnd(qn), 1, 2), w_uk), 1, 2)
        q = b(aten.cat.default, [q_abs, bsnd(qp)], -1)
        # The sequence's own latents as a paged cache: one page of S tokens per sequence.
        cache = b(aten.cat.default, [ckv, b(aten.select.int, bsnd(kpe), 2, 0)], -1)  # [B, S, r + rope]
        rows = b(aten.select.int, cache, 2, 0)  # [B, S]
        block_table = b(aten.unsqueeze.default, b.arange_like(rows, torch.int32), 1)
        seqlens = b(aten.sum.dim_IntList, b(aten.ones_like.default, rows, dtype=torch.int32), [1], False,
                    dtype=torch.int32)
        out = b(operator.getitem, b(qops.mla_decode.default, q, cache, block_table, seqlens, float(scale), rank,
                                    causal), 0)  # [B, S, N, r]
        out = b(aten.matmul.default, b(aten.transpose.int, out, 1, 2), w_uv)  # [B, N, S, v]
        if layout == "bsnd":
            out = b(aten.transpose.int, out, 1, 2)
    _replace(node, out)


def retarget_mla(gm: GraphModule) -> Report:
    """auto_deploy::torch_mla nodes -> quickllm::mla_decode, absorbed.

    torch_mla is AutoDeploy's uncached MLA: attention of each sequence over its own compressed_kv and
    kpe. Here those latents become the paged cache of mla_decode (one page of S tokens per sequence),
    the query is absorbed (q_nope @ W_UK per head, then q_pe) and the latent output is projected with
    W_UV: the same attention, computed as decode kernels compute it (over kv_lora_rank + rope values
    per key instead of expanded heads). Where kv_b_proj_weight is a loaded parameter W_UK and W_UV are
    made once (mla_absorb) and replace it; otherwise they are views of it. Taken: layout bsnd or bnsd,
    one float dtype throughout, scale None (1/sqrt(qk_nope + qk_rope)) or positive; is_causal as the
    op applies it (masked only when q and kv lengths are equal). enable_sharding and layer_type are
    hints of AutoDeploy's sharding and do not change the math.

    AutoDeploy's serving pipeline swaps torch_mla for its cached attention at its cache_init stage;
    a graph retargeted before that keeps no MLA cache, so use this where the graph runs over whole
    sequences (the AutoDeploy transform refuses unless allow_uncached=True).
    """
    return _run(gm, {"torch_mla": _mla})


# ==== all, and AutoDeploy's registry ==============================================================


def retarget_all(gm: GraphModule, *, assume_repeated_halves: bool = False, mla: bool = True) -> dict:
    """retarget_rope, retarget_rms_norm, retarget_moe and (unless mla=False) retarget_mla, in that
    order: {"rope": Report, "rms_norm": ..., "moe": ..., "mla": ...}."""
    reports = {"rope": retarget_rope(gm, assume_repeated_halves=assume_repeated_halves),
               "rms_norm": retarget_rms_norm(gm), "moe": retarget_moe(gm)}
    if mla:
        reports["mla"] = retarget_mla(gm)
    return reports


def register() -> bool:
    """Register quickllm_rope, quickllm_rms_norm, quickllm_moe and quickllm_mla with AutoDeploy's
    TransformRegistry (tensorrt_llm._torch.auto_deploy.transform.interface). Returns False, changing
    nothing, where tensorrt_llm cannot be imported; registering twice is a no-op.

    Each is a BaseTransform whose _apply runs the function of the same name on the graph module and
    returns TransformInfo(num_matches = nodes replaced). Config fields besides AutoDeploy's own
    (stage, enabled, ...): quickllm_rope: assume_repeated_halves (False); quickllm_mla:
    allow_uncached (False: the transform skips, see retarget_mla).
    """
    try:
        from pydantic import Field
        from tensorrt_llm._torch.auto_deploy.transform.interface import (BaseTransform, TransformConfig,
                                                                         TransformInfo, TransformRegistry)
    except ImportError:
        return False

    class RopeConfig(TransformConfig):
        assume_repeated_halves: bool = Field(
            default=False, description="take cos/sin halves as repeated without proof from the graph")

    class MlaConfig(TransformConfig):
        allow_uncached: bool = Field(
            default=False, description="replace torch_mla although AutoDeploy then inserts no MLA cache for it")

    def info(report: Report, skipped: bool = False):
        done = report.count > 0
        return TransformInfo(skipped=skipped or not done, num_matches=report.count, is_clean=not done,
                             has_valid_shapes=not done)

    def make(name: str, config_cls, run):
        class Transform(BaseTransform):
            config: config_cls

            @classmethod
            def get_config_class(cls):
                return config_cls

            def _apply(self, gm, cm, factory, shared_config):
                report = run(self.config, gm)
                if report is None:
                    return gm, info(Report(), skipped=True)
                for node_name, op, why in report.left:
                    _log.warning("%s: left %s (%s): %s", name, node_name, op, why)
                return gm, info(report)

        Transform.__name__ = Transform.__qualname__ = "".join(p.title() for p in name.split("_"))
        TransformRegistry.register(name)(Transform)

    def mla(config, gm):
        if not config.allow_uncached:
            _log.warning("quickllm_mla: skipped; it would take the torch_mla nodes that AutoDeploy's cached MLA "
                         "attention replaces (set allow_uncached: true where the graph keeps no MLA cache)")
            return None
        return retarget_mla(gm)

    runs = {"quickllm_rope": (RopeConfig,
                              lambda c, gm: retarget_rope(gm, assume_repeated_halves=c.assume_repeated_halves)),
            "quickllm_rms_norm": (TransformConfig, lambda c, gm: retarget_rms_norm(gm)),
            "quickllm_moe": (TransformConfig, lambda c, gm: retarget_moe(gm)),
            "quickllm_mla": (MlaConfig, mla)}
    for name, (config_cls, run) in runs.items():
        if not TransformRegistry.has(name):
            make(name, config_cls, run)
    return True


# The AutoDeploy transforms register() adds, and the function each runs.
TRANSFORMS = {"quickllm_rope": retarget_rope, "quickllm_rms_norm": retarget_rms_norm, "quickllm_moe": retarget_moe,
              "quickllm_mla": retarget_mla}
