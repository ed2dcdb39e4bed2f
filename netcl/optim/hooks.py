"""torch.optim's optimizer hooks, with torch's call signatures.

Per optimizer (methods of :class:`netcl.optim.Optimizer`):
``register_step_pre_hook(hook)`` — ``hook(optimizer, args, kwargs)`` returns
None or a new ``(args, kwargs)`` for ``step``; ``register_step_post_hook(hook)``
— ``hook(optimizer, args, kwargs)``; ``register_state_dict_pre_hook(hook)`` —
``hook(optimizer)``; ``register_state_dict_post_hook(hook)`` —
``hook(optimizer, state_dict)`` returns None or a state dict to return
instead; ``register_load_state_dict_pre_hook(hook)`` —
``hook(optimizer, state_dict)`` returns None or a state dict to load instead;
``register_load_state_dict_post_hook(hook)`` — ``hook(optimizer)``. The
state-dict hooks take ``prepend=True`` to run before the others. Global step
hooks for every netcl optimizer: :func:`register_optimizer_step_pre_hook` (run
before the optimizer's own pre-hooks), :func:`register_optimizer_step_post_hook`
(run after its own post-hooks), as torch orders them.

Every registration returns a :class:`RemovableHandle`. A
:class:`netcl.amp.GradScaler` step runs the step hooks too (with empty
``args`` and ``kwargs``), as torch's scaler calls ``optimizer.step``.
"""

import itertools

__all__ = ["RemovableHandle", "register_optimizer_step_pre_hook",
           "register_optimizer_step_post_hook"]

_ids = itertools.count()
_global_step_pre_hooks = {}
_global_step_post_hooks = {}


class RemovableHandle:
    """Removes the hook it was returned for: ``handle.remove()``, or leave a
    ``with handle:`` block."""

    def __init__(self, hooks):
        self._hooks = hooks
        self.id = next(_ids)

    def remove(self):
        self._hooks.pop(self.id, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def register(hooks, hook, prepend=False):
    """Add ``hook`` to the ordered dict ``hooks`` (first when ``prepend``)."""
    if not callable(hook):
        raise TypeError(f"hook must be callable, got {type(hook).__name__}")
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    if prepend:
        for key in [key for key in hooks if key != handle.id]:
            hooks[key] = hooks.pop(key)  # move every other hook behind it
    return handle


def register_optimizer_step_pre_hook(hook):
    """A step pre-hook for every netcl optimizer: ``hook(optimizer, args, kwargs)``."""
    return register(_global_step_pre_hooks, hook)


def register_optimizer_step_post_hook(hook):
    """A step post-hook for every netcl optimizer: ``hook(optimizer, args, kwargs)``."""
    return register(_global_step_post_hooks, hook)


def run_step(optimizer, step, args, kwargs):
    """``step(*args, **kwargs)`` between the global and the optimizer's own
    pre- and post-hooks, as torch's ``Optimizer.step`` wrapper runs them."""
    for hook in itertools.chain(list(_global_step_pre_hooks.values()),
                                list(optimizer._step_pre_hooks.values())):
        result = hook(optimizer, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{hook} must return None or a tuple of (new_args, "
                                   f"new_kwargs), but got {result}.")
    out = step(*args, **kwargs)
    # torch runs the optimizer's own post-hooks before the global ones.
    for hook in itertools.chain(list(optimizer._step_post_hooks.values()),
                                list(_global_step_post_hooks.values())):
        hook(optimizer, args, kwargs)
    return out
