"""define_op: each tltorch op defined once, and reached eagerly and through torch's dispatcher alike.

An op is a schema, its kernels (one per device type), a fake kernel (the
outputs' metadata, for torch.compile and meta tensors) and, when it is differentiable, one autograd
formula: setup_context(ctx, inputs, output) and backward(ctx, *grads). define_op registers them as the
torch.library op tltorch::<name>, each kernel under its device's dispatch key, and returns a function
taking the op's arguments that reaches the same functions by one of three routes:

  torch.ops.tltorch.<name>   while torch.compile traces, under a functorch transform or a dispatch mode
                             (fake tensors, functionalization), for a tensor subclass, or on a device with
                             no kernel here (meta tensors: the fake kernel);
  an autograd.Function       when a gradient is needed: built from the same setup_context and
                             backward, its forward the device's kernel;
  the device's kernel        otherwise.

Calling torch.ops eagerly goes through the dispatcher to Python kernels with boxed arguments (~15 us);
the other two routes cost well under a microsecond more than the kernel, most of a small op's overhead.
A backward formula calls the backward op through its own such function, so eager backward runs kernels
directly and a compiled backward sees torch ops. The function's source is generated (as dataclasses
generate __init__), with the op's own parameters, so that a call is a few attribute reads and no
argument packing.
"""
import linecache
from typing import Callable, Dict, Optional, Sequence

import torch

_is_compiling = torch.compiler.is_compiling
_transforms_active = torch._C._are_functorch_transforms_active
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_grad_enabled = torch.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad
_modes = torch._C._len_torch_dispatch_stack
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_c_apply = torch._C._FunctionBase.__dict__["apply"]


def once_differentiable(fn):
    """torch.autograd.function.once_differentiable, without its cost on the usual path: backward runs
    with grad mode off unless create_graph=True, and only then is the wrapper (an error if the returned
    gradients are differentiated) needed."""
    slow = torch.autograd.function.once_differentiable(fn)

    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            return slow(ctx, *grads)
        return fn(ctx, *grads)
    backward.__doc__ = fn.__doc__
    return backward


class DeviceTable(dict):
    """{torch.device: entry or None}, filled from {device type: entry} as devices are seen: a lookup by
    torch.device costs a fifth of reading device.type."""

    def __init__(self, by_type: Dict[str, object]):
        super().__init__()
        self.by_type = by_type

    def __missing__(self, device):
        entry = self[device] = self.by_type.get(device.type)
        return entry


def by_device(kernels: Dict[str, Callable], device_arg: int = 0) -> Callable:
    """A function calling kernels[<device type of its argument device_arg>] with its arguments."""
    table = DeviceTable(kernels)

    def call(*args):
        device = args[device_arg].device
        kernel = table[device]
        if kernel is None:
            raise ValueError(f"tltorch has no {device.type} kernels; use CPU or CUDA tensors")
        return kernel(*args)
    return call


def _for_dispatcher(fn: Callable, parsed, kept_outputs: int) -> Callable:
    """fn as the dispatcher calls it. The dispatcher leaves out trailing arguments equal to their
    defaults, which fn is given. An op's outputs are a flat tuple of tensors there: the kept outputs
    follow the others, and a None output (not computed) becomes an empty tensor, a distinct one each
    (outputs of a custom op may not alias)."""
    defaults = tuple(a.default_value for a in parsed.arguments)
    several = len(parsed.returns) > 1

    def kernel(*args):
        if len(args) < len(defaults):
            args += defaults[len(args):]
        out = fn(*args)
        if kept_outputs:
            out = (*out[:-1], *out[-1])
        return tuple(args[0].new_empty(0) if t is None else t for t in out) if several else out
    return kernel


def _dispatcher_setup(setup_context: Callable, shown: int) -> Callable:
    """setup_context for the torch.library route, where the kept outputs are outputs of the op: marked
    non-differentiable, no zeros made for their (unread) gradients, and handed to setup_context as one
    tuple, as on the other routes."""
    def setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[shown:])
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, (*output[:shown], output[shown:]))
    return setup


# Whether the kernels can run directly on t: no compiler tracing, no dispatch mode (FakeTensorMode,
# functionalization, make_fx, a FlopCounterMode...), a plain tensor (not a FakeTensor or another
# subclass), no functorch transform; then a device with kernels here.
_DIRECT = "not _is_compiling() and not _modes() and type({t}) in _PLAIN and not _transforms_active()"

_ROUTES = '''\
def {name}({params}):
    _route = _routes[{device}.device] if {direct} else None
    if _route is None:
        return _op({args}){shown}
{grad_route}    return _route[0]({args}){shown}
'''

_GRAD_ROUTE = '''\
    if _grad_enabled() and _any_requires_grad({differentiable}):
        if {wrapped}:
            return _route[2].apply({grad_args}){shown}
        return _route[1]({grad_args}){shown}
'''


def _grad_route(parsed, differentiable: Sequence[str], grad_flags: Dict[str, str], shown: str) -> str:
    """The autograd route's lines. A functorch-wrapped tensor outside a transform (a dead wrapper)
    takes Function.apply, which unwraps it; the others the C apply, without apply's Python preamble."""
    tensors = [a for a in parsed.arguments if "Tensor" in str(a.type)]
    wrapped = " or ".join(f"_is_wrapped({a.name})" if isinstance(a.type, torch.TensorType)
                          else f"({a.name} is not None and _is_wrapped({a.name}))" for a in tensors)
    optional = {a.name for a in tensors if not isinstance(a.type, torch.TensorType)}

    def arg(name):
        t = grad_flags.get(name)
        if t is None:
            return name
        return f"({t} is not None and {t}.requires_grad)" if t in optional else f"{t}.requires_grad"
    return _GRAD_ROUTE.format(differentiable=", ".join(differentiable), wrapped=wrapped, shown=shown,
                              grad_args=", ".join(arg(a.name) for a in parsed.arguments))


def define_op(name: str, schema: str, kernels: Dict[str, Callable], fake: Callable, *,
              setup_context: Optional[Callable] = None, backward: Optional[Callable] = None,
              differentiable: Sequence[str] = (), kept_outputs: int = 0,
              grad_flags: Optional[Dict[str, str]] = None, device_arg: Optional[str] = None) -> Callable:
    """Registers tltorch::<name> and returns the function that calls it (see the module's docstring).

    schema: the op's arguments and returns in torch's schema language, "(Tensor x, ...) -> Tensor";
    the mutated arguments are those annotated Tensor(a!). kernels: {device type: kernel}. A kernel or
    the fake may return None for an output it did not compute; the dispatcher sees an empty tensor
    there. differentiable: the arguments whose requires_grad calls for the autograd route.
    kept_outputs: how many trailing outputs are for backward only: not differentiable, returned by the
    kernels and the fake (and seen by setup_context) as one tuple after the others, which autograd
    passes through untouched (cheaper than marking them non-differentiable outputs); torch.ops returns
    them flat, the function not at all. grad_flags: {bool argument: tensor argument}, flags asking the
    kernel for gradients along with the outputs: on the autograd route, whether the tensor requires
    grad; elsewhere as given. device_arg: the argument whose device picks the kernel on the direct
    routes (the first by default).
    """
    parsed = torch._C.parse_schema(f"tltorch::{name}{schema}")
    mutated = tuple(a.name for a in parsed.arguments if a.alias_info is not None and a.alias_info.is_write)
    op_def = None
    for device, kernel in kernels.items():
        if op_def is None:
            op_def = torch.library.custom_op(f"tltorch::{name}", _for_dispatcher(kernel, parsed, kept_outputs),
                                             mutates_args=mutated, device_types=device, schema=schema)
        else:
            op_def.register_kernel(device, _for_dispatcher(kernel, parsed, kept_outputs))
    op_def.register_fake(_for_dispatcher(fake, parsed, kept_outputs))

    shown = len(parsed.returns) - kept_outputs
    shown_code = "" if not kept_outputs else "[0]" if shown == 1 else f"[:{shown}]"
    routes = {device: (kernel,) for device, kernel in kernels.items()}
    grad_route = ""
    if backward is not None:
        op_def.register_autograd(backward, setup_context=_dispatcher_setup(setup_context, shown)
                                 if kept_outputs else setup_context)
        title = "".join(w.title() for w in name.split("_"))  # grad_fn: <Title>Backward
        for device, kernel in kernels.items():
            function = type(title, (torch.autograd.Function,), dict(
                forward=staticmethod(kernel), setup_context=staticmethod(setup_context),
                backward=staticmethod(once_differentiable(backward))))
            routes[device] = (kernel, _c_apply.__get__(None, function), function)
        grad_route = _grad_route(parsed, differentiable, grad_flags or {}, shown_code)

    device = device_arg or parsed.arguments[0].name
    source = _ROUTES.format(
        name=name, device=device, direct=_DIRECT.format(t=device), grad_route=grad_route, shown=shown_code,
        args=", ".join(a.name for a in parsed.arguments),
        params=", ".join(a.name + (f"={a.default_value!r}" if a.has_default_value() else "")
                         for a in parsed.arguments))
    scope = dict(_is_compiling=_is_compiling, _modes=_modes, _PLAIN=_PLAIN, _transforms_active=_transforms_active,
                 _grad_enabled=_grad_enabled, _any_requires_grad=_any_requires_grad, _is_wrapped=_is_wrapped,
                 _routes=DeviceTable(routes), _op=getattr(torch.ops.tltorch, name))
    filename = f"<tltorch.ops: {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # for tracebacks
    exec(compile(source, filename, "exec"), scope)
    return scope[name]
