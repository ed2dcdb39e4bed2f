"""Float64 NumPy oracles for RMSProp as each framework defines it.

This module imports neither torch nor netcl.  It holds

* one step function per framework, each re-derived from that framework's own
  source with the operation order kept:

  - :func:`torch_rmsprop_step`      torch 2.13 ``_single_tensor_rmsprop``
  - :func:`tf1_rmsprop_step`        ``tf.compat.v1.train.RMSPropOptimizer``
  - :func:`keras_rmsprop_step`      Keras 3 (and tf.keras >= 2.11) ``RMSprop``
  - :func:`timm_rmsprop_tf_step`    timm ``RMSpropTF``
  - :func:`optax_rmsprop_step`      ``optax.rmsprop``

* :func:`netcl_rmsprop_init_state` and :func:`netcl_rmsprop_step`, the single
  generic rule that defines what netcl's ``RMSProp`` computes for every
  combination of its flags, and
* :data:`PRESETS`, netcl keyword arguments that reproduce each framework,
* :class:`Interval` and :func:`either_path_mismatches`, which let a parity
  test against torch accept the rounding of any of torch's CPU dispatch
  paths, and :func:`assert_torch_rmsprop_step`, that check for RMSprop.

Calling convention (all step functions)
----------------------------------------
``f(param, grad, state, step, **hyperparams) -> new_param``

* ``param`` and ``grad`` are float64 arrays; they are never modified.
* ``state`` is a dict.  When it is empty the function fills it with the
  framework's initial slots; afterwards the function *replaces* its entries
  with the new arrays (the dict is updated in place, the old arrays are not
  written to).  Each framework function uses that framework's slot names.
* ``step`` is the 1-based index of the update being made (1 on the first
  call), i.e. the step counter *after* the framework increments it.  Only
  bias correction (optax, netcl) reads it.
* Learning rates are plain floats read at each call, so a caller can pass a
  schedule value per step; this is how ``lr_in_momentum`` becomes observable.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "torch_rmsprop_step",
    "tf1_rmsprop_step",
    "keras_rmsprop_step",
    "timm_rmsprop_tf_step",
    "optax_rmsprop_step",
    "netcl_rmsprop_init_state",
    "netcl_rmsprop_step",
    "NETCL_DEFAULTS",
    "PRESETS",
    "SOURCES",
    "Interval",
    "either_path_mismatches",
    "within_nulp",
    "mirror_buffers",
    "assert_torch_rmsprop_step",
]


def _f64(x):
    if isinstance(x, Interval):  # the rules also run in interval arithmetic
        return x
    return np.asarray(x, dtype=np.float64)


def _torch_lerp(start, end, weight):
    """ATen's scalar ``lerp`` formula (aten/src/ATen/native/Lerp.h).

    For ``|weight| < 0.5`` it evaluates ``start + weight*(end - start)``;
    otherwise ``end - (end - start)*(1 - weight)``.  Both are the same real
    number; only the rounding differs.  (ATen's vectorised CPU path computes the
    same branches with a fused multiply-add, so torch itself is not bit-stable
    across code paths; agreement is expected to ~1e-15 relative, not bitwise.)
    """
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


# ---------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------
def torch_rmsprop_step(param, grad, state, step, *, lr=1e-2, alpha=0.99,
                       eps=1e-8, weight_decay=0.0, momentum=0.0,
                       centered=False, maximize=False):
    """torch.optim.RMSprop, single-tensor path (torch 2.13).

    Source: torch/optim/rmsprop.py, ``_single_tensor_rmsprop`` (installed copy,
    lines ~301-339) and ``RMSprop._init_group`` (state init).

    State (torch names): ``square_avg`` (zeros), ``grad_avg`` (zeros, only if
    centered), ``momentum_buffer`` (zeros, only if momentum > 0).

    Operation order, as the source writes it::

        g = -g if maximize                      # grad if not maximize else -grad
        g = g + wd*p                            # grad.add(param, alpha=wd)
        v = v*alpha + (1-alpha)*g*g             # mul_(alpha).addcmul_(g, g, value=1-alpha)
        m = lerp(m, g, 1-alpha)                 # grad_avg.lerp_(grad, 1-alpha)
        d = sqrt(v - m*m)  or  sqrt(v)          # addcmul(m, m, value=-1).sqrt_()
        d = d + eps                             # avg.add_(eps)   (eps OUTSIDE the root)
        momentum > 0:  b = b*mu + g/d           # buf.mul_(mu).addcdiv_(grad, avg)
                       p = p + (-lr)*b          # param.add_(buf, alpha=-lr)
        else:          p = p + ((-lr)*g)/d      # param.addcdiv_(grad, avg, value=-lr)

    ATen's addcdiv evaluates ``self + (value*t1)/t2`` (checked empirically on
    this torch build: bitwise equal on 1e5 float64 samples).
    """
    p = _f64(param)
    g = _f64(grad)
    if not state:
        state["square_avg"] = np.zeros_like(p)
        if momentum > 0:
            state["momentum_buffer"] = np.zeros_like(p)
        if centered:
            state["grad_avg"] = np.zeros_like(p)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    v = state["square_avg"] * alpha + (1 - alpha) * g * g
    state["square_avg"] = v
    if centered:
        m = _torch_lerp(state["grad_avg"], g, 1 - alpha)
        state["grad_avg"] = m
        avg = np.sqrt(v + (-1) * m * m)
    else:
        avg = np.sqrt(v)
    avg = avg + eps
    if momentum > 0:
        b = state["momentum_buffer"] * momentum + g / avg
        state["momentum_buffer"] = b
        return p + (-lr) * b
    return p + ((-lr) * g) / avg


# ---------------------------------------------------------------------------
# TensorFlow 1
# ---------------------------------------------------------------------------
def tf1_rmsprop_step(param, grad, state, step, *, learning_rate, decay=0.9,
                     momentum=0.0, epsilon=1e-10, centered=False):
    """tf.compat.v1.train.RMSPropOptimizer (dense path).

    Python side: tensorflow/python/training/rmsprop.py
      * ``__init__(learning_rate, decay=0.9, momentum=0.0, epsilon=1e-10,
        use_locking=False, centered=False)`` -- learning_rate has no default.
      * ``_create_slots``: slot ``rms`` is created with ``ones_initializer``
        (``ones_like`` for unknown shapes); ``mg`` (centered) and ``momentum``
        are zero slots.  The momentum slot exists even when momentum == 0.
      * ``_apply_dense`` / ``_resource_apply_dense`` call the C++ ops
        ApplyRMSProp / ApplyCenteredRMSProp.  There is no weight decay.

    Kernel: tensorflow/core/kernels/training_ops.cc,
    ``functor::ApplyRMSProp<CPUDevice, T>`` and
    ``functor::ApplyCenteredRMSProp<CPUDevice, T>``::

        ms  += (grad.square() - ms) * (1 - rho)
        mg  += (grad - mg) * (1 - rho)                        # centered only
        denom = (ms - mg.square()) + epsilon   |  ms + epsilon
        mom = mom * momentum + (grad * lr) / denom.sqrt()
        var -= mom

    i.e. TF updates the averages in the "increment" form ``ms + (g^2-ms)(1-rho)``
    rather than ``rho*ms + (1-rho)*g^2`` (equal in exact arithmetic), puts eps
    inside the root, and folds lr into the momentum accumulator.

    State (TF slot names): ``rms`` (ones), ``mg`` (zeros, centered),
    ``momentum`` (zeros, always).
    """
    p = _f64(param)
    g = _f64(grad)
    if not state:
        state["rms"] = np.ones_like(p)
        if centered:
            state["mg"] = np.zeros_like(p)
        state["momentum"] = np.zeros_like(p)
    one_minus_rho = 1 - decay
    ms = state["rms"] + (g * g - state["rms"]) * one_minus_rho
    state["rms"] = ms
    if centered:
        mg = state["mg"] + (g - state["mg"]) * one_minus_rho
        state["mg"] = mg
        denom = (ms - mg * mg) + epsilon
    else:
        denom = ms + epsilon
    mom = state["momentum"] * momentum + (g * learning_rate) / np.sqrt(denom)
    state["momentum"] = mom
    return p - mom


# ---------------------------------------------------------------------------
# Keras 3 / tf.keras >= 2.11
# ---------------------------------------------------------------------------
def keras_rmsprop_step(param, grad, state, step, *, learning_rate=1e-3,
                       rho=0.9, momentum=0.0, epsilon=1e-7, centered=False,
                       weight_decay=None):
    """keras.optimizers.RMSprop (Keras 3; same formula as tf.keras >= 2.11).

    keras/src/optimizers/rmsprop.py:
      * ``__init__(learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7,
        centered=False, weight_decay=None, ...)``
      * ``build``: ``velocities`` (zeros), ``momentums`` (zeros, only if
        momentum > 0), ``average_gradients`` (zeros, only if centered).
      * ``update_step``::

            velocity = rho*velocity + (1-rho)*square(g)
            centered: average_grad = rho*average_grad + (1-rho)*g
                      denominator = velocity - square(average_grad) + epsilon
            else:     denominator = velocity + epsilon
            increment = (lr*g) / sqrt(denominator)         # eps INSIDE the root
            momentum > 0: momentum = momentum_coef*momentum + increment
                          variable -= momentum              # lr folded in
            else:         variable -= increment

    keras/src/optimizers/base_optimizer.py, ``apply``: gradients are clipped,
    then ``_apply_weight_decay`` runs *before* ``update_step``; it does
    ``variable.assign(variable - variable * wd * lr)`` (decoupled, scaled by the
    current learning rate; skipped when weight_decay is None).

    Variants with the same real-number result but different rounding: the
    torch backend (keras/src/backend/torch/optimizers/torch_rmsprop.py) forms
    ``(velocity + eps) - average_grad**2``; tf.keras 2.11-2.15
    (keras/optimizers/rmsprop.py) uses ``lr * g * rsqrt(denominator)``.

    State (Keras names): ``velocity``, ``average_gradient``, ``momentum``.
    """
    p = _f64(param)
    g = _f64(grad)
    if not state:
        state["velocity"] = np.zeros_like(p)
        if momentum > 0:
            state["momentum"] = np.zeros_like(p)
        if centered:
            state["average_gradient"] = np.zeros_like(p)
    lr = learning_rate
    if weight_decay is not None:
        p = p - p * weight_decay * lr
    velocity = rho * state["velocity"] + (1 - rho) * (g * g)
    state["velocity"] = velocity
    if centered:
        ag = rho * state["average_gradient"] + (1 - rho) * g
        state["average_gradient"] = ag
        denominator = velocity - ag * ag + epsilon
    else:
        denominator = velocity + epsilon
    increment = (lr * g) / np.sqrt(denominator)
    if momentum > 0:
        mom = momentum * state["momentum"] + increment
        state["momentum"] = mom
        return p - mom
    return p - increment


# ---------------------------------------------------------------------------
# timm RMSpropTF
# ---------------------------------------------------------------------------
def timm_rmsprop_tf_step(param, grad, state, step, *, lr=1e-2, alpha=0.9,
                         eps=1e-10, weight_decay=0.0, momentum=0.0,
                         centered=False, decoupled_decay=False,
                         lr_in_momentum=True):
    """timm.optim.RMSpropTF (``caution=False``).

    timm/optim/rmsprop_tf.py, ``RMSpropTF``:
      * ``__init__(lr=1e-2, alpha=0.9, eps=1e-10, weight_decay=0, momentum=0.,
        centered=False, decoupled_decay=False, lr_in_momentum=True,
        caution=False)``
      * state init: ``square_avg = ones_like(p)``; ``momentum_buffer`` zeros
        (momentum > 0); ``grad_avg`` zeros (centered).
      * ``step``::

            wd != 0: decoupled_decay: p.mul_(1 - lr*wd)
                     else:            grad = grad.add(p, alpha=wd)
            square_avg.add_(grad.pow(2) - square_avg, alpha=1-alpha)   # TF order
            centered: grad_avg.add_(grad - grad_avg, alpha=1-alpha)
                      avg = square_avg.addcmul(grad_avg, grad_avg, value=-1)
                                      .add(eps).sqrt_()                # eps inside
            else:     avg = square_avg.add(eps).sqrt_()
            momentum > 0:
                buf.mul_(momentum)
                lr_in_momentum: buf.addcdiv_(grad, avg, value=lr); p.add_(-buf)
                else:           buf.addcdiv_(grad, avg);           p.add_(buf, alpha=-lr)
            else: p.addcdiv_(grad, avg, value=-lr)

    The ``caution`` option (Cautious Optimizers masking of the buffer) is not
    modelled.  State uses torch's names.
    """
    p = _f64(param)
    g = _f64(grad)
    if not state:
        state["square_avg"] = np.ones_like(p)
        if momentum > 0:
            state["momentum_buffer"] = np.zeros_like(p)
        if centered:
            state["grad_avg"] = np.zeros_like(p)
    one_minus_alpha = 1.0 - alpha
    if weight_decay != 0:
        if decoupled_decay:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    sq = state["square_avg"] + one_minus_alpha * (g ** 2 - state["square_avg"])
    state["square_avg"] = sq
    if centered:
        ga = state["grad_avg"] + one_minus_alpha * (g - state["grad_avg"])
        state["grad_avg"] = ga
        avg = np.sqrt((sq + (-1) * ga * ga) + eps)
    else:
        avg = np.sqrt(sq + eps)
    if momentum > 0:
        buf = state["momentum_buffer"] * momentum
        if lr_in_momentum:
            buf = buf + (lr * g) / avg
            state["momentum_buffer"] = buf
            return p + (-buf)
        buf = buf + g / avg
        state["momentum_buffer"] = buf
        return p + (-lr) * buf
    return p + ((-lr) * g) / avg


# ---------------------------------------------------------------------------
# optax
# ---------------------------------------------------------------------------
def optax_rmsprop_step(param, grad, state, step, *, learning_rate, decay=0.9,
                       eps=1e-8, initial_scale=0.0, eps_in_sqrt=True,
                       centered=False, momentum=None, nesterov=False,
                       bias_correction=False):
    """optax.rmsprop followed by optax.apply_updates.

    optax/_src/alias.py, ``rmsprop(learning_rate, decay=0.9, eps=1e-8,
    initial_scale=0.0, eps_in_sqrt=True, centered=False, momentum=None,
    nesterov=False, bias_correction=False)`` builds the chain::

        scale_by_stddev(...) if centered else scale_by_rms(...)
        scale_by_learning_rate(learning_rate)       # multiplies by -lr
        trace(decay=momentum, nesterov=nesterov) if momentum is not None

    so the learning rate is applied *before* the momentum trace (lr folded
    into the buffer, like TF1), and the trace accumulates the *negative* step.

    optax/_src/transform.py:
      * ``scale_by_rms``: ``nu`` starts at ``initial_scale``;
        ``nu = (1-decay)*g**2 + decay*nu`` (tree_update_moment_per_elem_norm);
        if bias_correction: ``nu_hat = nu / (1 - decay**count)`` with
        ``count`` incremented first (so 1 on the first step); the stored
        ``nu`` stays uncorrected;
        scaling = ``rsqrt(nu_hat + eps)`` if eps_in_sqrt else
        ``1/(sqrt(nu_hat) + eps)``; ``updates = scaling * g``.
      * ``scale_by_stddev``: as above plus ``mu = (1-decay)*g + decay*mu``
        (mu starts at 0, corrected by the *same* ``1 - decay**count``);
        scaling = ``rsqrt(nu_hat - abs_sq(mu_hat) + eps)`` or
        ``1/(sqrt(nu_hat - abs_sq(mu_hat)) + eps)``.  No clamp.
    optax/transforms/_accumulation.py, ``trace``::

        f = lambda g, t: g + decay*t
        new_trace = f(updates, trace)
        updates = f(updates, new_trace) if nesterov else new_trace

    ``apply_updates`` adds the updates to the params.

    Note: ``momentum=0.0`` (not None) inserts a trace with decay 0, which is
    the identity; ``momentum=None`` inserts no trace.

    State (optax names): ``nu``, ``mu`` (centered), ``trace`` (momentum is
    not None).  ``count`` is the ``step`` argument.  In stock optax
    (float32 default) ``decay**count`` is evaluated in float32; here float64.
    """
    p = _f64(param)
    g = _f64(grad)
    if not state:
        state["nu"] = np.full_like(p, initial_scale)
        if centered:
            state["mu"] = np.zeros_like(p)
        if momentum is not None:
            state["trace"] = np.zeros_like(p)
    nu = (1 - decay) * (g ** 2) + decay * state["nu"]
    state["nu"] = nu
    if centered:
        mu = (1 - decay) * (g ** 1) + decay * state["mu"]
        state["mu"] = mu
    if bias_correction:
        bc = 1 - decay ** step
        nu_hat = nu / bc
        mu_hat = mu / bc if centered else None
    else:
        nu_hat = nu
        mu_hat = mu if centered else None
    inner = nu_hat - mu_hat * mu_hat if centered else nu_hat
    if eps_in_sqrt:
        scaling = 1.0 / np.sqrt(inner + eps)          # jax.lax.rsqrt
    else:
        scaling = 1 / (np.sqrt(inner) + eps)
    updates = scaling * g
    updates = (-1 * learning_rate) * updates          # scale(m * learning_rate)
    if momentum is not None:
        new_trace = updates + momentum * state["trace"]
        updates = updates + momentum * new_trace if nesterov else new_trace
        state["trace"] = new_trace
    return p + updates


# ---------------------------------------------------------------------------
# netcl
# ---------------------------------------------------------------------------
#: netcl ``RMSProp`` constructor defaults (all new flags at torch behaviour).
NETCL_DEFAULTS = dict(
    lr=1e-2,
    alpha=0.99,
    eps=1e-8,
    weight_decay=0.0,
    momentum=0.0,
    centered=False,
    maximize=False,
    eps_in_sqrt=False,
    initial_scale=0.0,
    lr_in_momentum=False,
    nesterov=False,
    bias_correction=False,
    decoupled_weight_decay=False,
    clamp_variance=False,
)


def netcl_rmsprop_init_state(param, *, centered, momentum, initial_scale):
    """Initial per-parameter state of netcl ``RMSProp`` (torch's slot names).

    * ``square_avg``: filled with ``initial_scale`` (torch: 0, TF1/timm: 1);
    * ``grad_avg``: zeros, present only when ``centered``;
    * ``momentum_buffer``: zeros, present only when ``momentum > 0``.

    ``initial_scale`` must be finite and >= 0 (a negative start value could
    make the non-centered denominator the root of a negative number).
    """
    if not np.isfinite(initial_scale) or initial_scale < 0:
        raise ValueError(f"initial_scale must be finite and >= 0, got {initial_scale}")
    p = _f64(param)
    state = {"square_avg": np.full_like(p, float(initial_scale))}
    if centered:
        state["grad_avg"] = np.zeros_like(p)
    if momentum > 0:
        state["momentum_buffer"] = np.zeros_like(p)
    return state


def netcl_rmsprop_step(param, grad, state, step, *, lr, alpha, eps,
                       weight_decay, momentum, centered, maximize, eps_in_sqrt,
                       initial_scale, lr_in_momentum, nesterov,
                       bias_correction, decoupled_weight_decay,
                       clamp_variance):
    r"""One netcl RMSProp step: the single generic rule behind every flag.

    ``state`` holds ``square_avg`` (v), ``grad_avg`` (m, centered only) and
    ``momentum_buffer`` (b, momentum > 0 only); an empty dict is initialised
    with :func:`netcl_rmsprop_init_state`.  ``initial_scale`` is read only at
    that moment.  ``step`` = t >= 1 is the index of this update (torch's
    ``state["step"]`` after its increment).  Every operation below is
    elementwise; the scalars in brackets are uniform per launch and can be
    computed on the host.  "a*b*c" means ``(a*b)*c``.

    .. math::

        \begin{aligned}
        &(1)\ g \leftarrow -g \quad\text{if maximize} \\
        &(2)\ \text{if } \lambda \ne 0:\ \begin{cases}
              p \leftarrow p\cdot[1-\eta\lambda] & \text{decoupled\_weight\_decay}\\
              g \leftarrow g + \lambda p          & \text{otherwise (L2, torch)}\end{cases}\\
        &(3)\ v \leftarrow v\alpha + [1-\alpha]\,g\,g \\
        &(4)\ \text{centered: } m \leftarrow \operatorname{lerp}(m, g, [1-\alpha]) \\
        &(5)\ \hat v = v / [c_t],\ \hat m = m / [c_t],\quad c_t = 1-\alpha^t
              \quad(\text{only if bias\_correction, else } \hat v=v,\ \hat m=m)\\
        &(6)\ s = \hat v - \hat m\,\hat m \ (\text{centered}) \quad\text{else } s=\hat v;\quad
              \text{centered and clamp\_variance: } s \leftarrow (s<0\ ?\ 0 : s)\\
        &(7)\ d = \sqrt{s+\varepsilon}\ (\text{eps\_in\_sqrt}) \quad\text{else}\quad
              d = \sqrt{s}+\varepsilon \\
        &(8)\ c = [\eta] \text{ if } (\mu = 0 \text{ or lr\_in\_momentum}) \text{ else } 1;
              \quad k = 1 \text{ if } c=\eta \text{ else } [\eta];\quad
              u = (c\,g)/d \\
        &(9)\ \text{if } \mu > 0:\ b \leftarrow b\mu + u;\quad
              q = \begin{cases}\mu b + u & \text{nesterov}\\ b & \text{otherwise}\end{cases}
              \qquad\text{else } q = u \\
        &(10)\ p \leftarrow p - k\,q \quad(\text{with } k = 1:\ p \leftarrow p - q)
        \end{aligned}

    ``lerp(m, g, w)`` is torch's: ``m + w*(g - m)`` when ``w < 0.5``, else
    ``g - (g - m)*(1 - w)`` (w is a uniform scalar, so the branch is free).
    The clamp is written ``s < 0 ? 0 : s`` so that a NaN stays NaN (OpenCL's
    ``fmax(s, 0)`` would turn NaN into 0 and hide a divergence).

    Reduction to torch (all new flags at defaults): step (2) is
    ``g + wd*p``, (3) is ``mul_(alpha).addcmul_(g, g, 1-alpha)``, (4) is
    ``lerp_``, (5) is skipped, (6) is ``addcmul(m, m, value=-1)`` with no clamp,
    (7) is ``sqrt(.) + eps``, and (8)-(10) give ``p - (lr*g)/d`` (= torch's
    ``addcdiv_(g, d, value=-lr)``) without momentum, or ``b = b*mu + g/d;
    p - lr*b`` with momentum -- torch's order.

    Decisions for flag combinations (all documented in wiki/RMSProp.md):

    * bias_correction + centered: v and m are both divided by the same
      ``1 - alpha^t`` (optax ``scale_by_stddev``).  By Cauchy-Schwarz
      ``m_t^2 <= (1-alpha^t) v_t`` when v starts at 0, so s >= 0 in exact
      arithmetic -- with *equality at t = 1* (v_hat = g^2, m_hat = g): the
      first step divides by ``sqrt(eps)`` (eps_in_sqrt) or by ``sqrt(noise) +
      eps`` where noise is the rounding error of ``g^2 - g*g`` and may be
      negative (NaN without the clamp).  This is optax's behaviour too; netcl
      keeps it and recommends ``clamp_variance=True`` plus eps_in_sqrt for
      this combination (or a non-zero initial_scale).
    * bias_correction + initial_scale: the stored v (which still carries
      ``alpha^t * initial_scale``) is divided by ``1 - alpha^t`` -- optax's
      behaviour, even though the correction is only exact for initial_scale=0.
    * nesterov: optax ``trace``: ``b = mu*b + u``, step ``mu*b + u`` with the
      *new* b.  With lr_in_momentum=False the lr multiplies that whole step
      (torch SGD's convention ``p -= lr*(g + mu*b)``); with True, u already
      contains lr (optax: lr is applied before ``trace``).
    * nesterov with momentum == 0: no buffer, q = u, i.e. a no-op flag (optax
      accepts ``momentum=0.0, nesterov=True`` and gives the same result).
    * lr_in_momentum with momentum == 0: no effect (u already carries lr).
      With constant lr, lr_in_momentum=True and False give the same
      trajectory; they differ only when lr changes between steps.
    * clamp_variance without centered: no effect (s = v >= 0 already).
    * decoupled weight decay is applied to p first, before (10), as timm's
      ``decoupled_decay`` and Keras' ``_apply_weight_decay``; it uses the
      current lr, and it ignores ``maximize``.
    * maximize is applied before the L2 term, as torch.

    Returns the new parameter; ``state`` entries are replaced.
    """
    p = _f64(param)
    g = _f64(grad)
    if not state:
        state.update(netcl_rmsprop_init_state(
            p, centered=centered, momentum=momentum,
            initial_scale=initial_scale))
    # (1)
    if maximize:
        g = -g
    # (2)
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    # (3)
    v = state["square_avg"] * alpha + (1 - alpha) * g * g
    state["square_avg"] = v
    # (4)
    if centered:
        m = _torch_lerp(state["grad_avg"], g, 1 - alpha)
        state["grad_avg"] = m
    # (5)
    if bias_correction:
        c_t = 1.0 - alpha ** step
        v_hat = v / c_t
        m_hat = m / c_t if centered else None
    else:
        v_hat = v
        m_hat = m if centered else None
    # (6)
    if centered:
        s = v_hat - m_hat * m_hat
        if clamp_variance:
            s = np.where(s < 0, 0.0, s)
    else:
        s = v_hat
    # (7)
    if eps_in_sqrt:
        d = np.sqrt(s + eps)
    else:
        d = np.sqrt(s) + eps
    # (8)
    lr_inside = (momentum == 0) or lr_in_momentum
    u = (lr * g) / d if lr_inside else g / d
    # (9)
    if momentum > 0:
        b = state["momentum_buffer"] * momentum + u
        state["momentum_buffer"] = b
        q = momentum * b + u if nesterov else b
    else:
        q = u
    # (10)
    return p - q if lr_inside else p - lr * q


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------
def _preset(**kw):
    out = dict(NETCL_DEFAULTS)
    unknown = set(kw) - set(out)
    if unknown:  # pragma: no cover - guards typos in this file
        raise KeyError(sorted(unknown))
    out.update(kw)
    return out


#: Framework name -> full dict of netcl ``RMSProp`` keyword arguments.
#: ``RMSProp.from_preset(name, params, **overrides)`` should start from these.
PRESETS = {
    # torch/optim/rmsprop.py: RMSprop.__init__(lr=1e-2, alpha=0.99, eps=1e-8,
    # weight_decay=0, momentum=0, centered=False, maximize=False); state
    # zeros; eps added after sqrt (avg.add_(eps)); L2 via grad.add(param);
    # buf = mu*buf + g/avg then param -= lr*buf; no clamp before sqrt_().
    "torch": _preset(),
    # tensorflow/python/training/rmsprop.py: RMSPropOptimizer(learning_rate,
    # decay=0.9, momentum=0.0, epsilon=1e-10, centered=False); the "rms" slot
    # uses ones_initializer.  tensorflow/core/kernels/training_ops.cc
    # ApplyRMSProp: mom = mom*momentum + (grad*lr)/sqrt(ms + epsilon) -> eps
    # inside the root and lr inside the momentum accumulator.  TF1 has no
    # default learning rate; 1e-3 is netcl's choice (the value TF's own
    # migration example uses).  No weight decay in TF1 (L2 lives in the loss,
    # i.e. coupled, which is netcl's weight_decay with decoupled=False).
    "tf1": _preset(lr=1e-3, alpha=0.9, eps=1e-10, eps_in_sqrt=True,
                   initial_scale=1.0, lr_in_momentum=True,
                   clamp_variance=True),
    # keras/src/optimizers/rmsprop.py: RMSprop(learning_rate=0.001, rho=0.9,
    # momentum=0.0, epsilon=1e-7, centered=False, weight_decay=None); velocity
    # starts at zeros; increment = lr*g/sqrt(velocity + eps) -> eps inside;
    # momentum = mu*momentum + increment -> lr inside the buffer.
    # keras/src/optimizers/base_optimizer.py _apply_weight_decay:
    # variable - variable*wd*lr before update_step -> decoupled.
    "keras": _preset(lr=1e-3, alpha=0.9, eps=1e-7, eps_in_sqrt=True,
                     initial_scale=0.0, lr_in_momentum=True,
                     decoupled_weight_decay=True, clamp_variance=True),
    # timm/optim/rmsprop_tf.py: RMSpropTF(lr=1e-2, alpha=0.9, eps=1e-10,
    # weight_decay=0, momentum=0., centered=False, decoupled_decay=False,
    # lr_in_momentum=True); square_avg = ones_like(p); avg =
    # square_avg.add(eps).sqrt_() -> eps inside; decoupled_decay:
    # p.mul_(1 - lr*wd).  (timm's optimizer factory passes momentum=0.9 by
    # default; the class default is 0.)
    "timm": _preset(lr=1e-2, alpha=0.9, eps=1e-10, eps_in_sqrt=True,
                    initial_scale=1.0, lr_in_momentum=True,
                    decoupled_weight_decay=False, clamp_variance=True),
    # optax/_src/alias.py: rmsprop(learning_rate, decay=0.9, eps=1e-8,
    # initial_scale=0.0, eps_in_sqrt=True, centered=False, momentum=None,
    # nesterov=False, bias_correction=False); chain = scale_by_rms /
    # scale_by_stddev -> scale_by_learning_rate -> trace, so lr is inside the
    # momentum trace.  optax has no default learning rate; 1e-3 is netcl's
    # choice.  optax.rmsprop has no weight decay (users chain
    # add_decayed_weights *before* it, which is the coupled L2 form).
    "optax": _preset(lr=1e-3, alpha=0.9, eps=1e-8, eps_in_sqrt=True,
                     initial_scale=0.0, lr_in_momentum=True, nesterov=False,
                     bias_correction=False, clamp_variance=True),
}

#: Where each framework's rule was read (repository: path).
SOURCES = {
    "torch": ["pytorch/pytorch: torch/optim/rmsprop.py (torch 2.13, installed copy)"],
    "tf1": ["tensorflow/tensorflow: tensorflow/python/training/rmsprop.py",
            "tensorflow/tensorflow: tensorflow/core/kernels/training_ops.cc"],
    "keras": ["keras-team/keras: keras/src/optimizers/rmsprop.py",
              "keras-team/keras: keras/src/optimizers/base_optimizer.py"],
    "timm": ["huggingface/pytorch-image-models: timm/optim/rmsprop_tf.py"],
    "optax": ["google-deepmind/optax: optax/_src/alias.py",
              "google-deepmind/optax: optax/_src/transform.py",
              "google-deepmind/optax: optax/transforms/_accumulation.py",
              "google-deepmind/optax: optax/tree_utils/_tree_math.py"],
}


# ---------------------------------------------------------------------------
# Rounding intervals: what a rule can give under any rounding placement
# ---------------------------------------------------------------------------
class Interval:
    """Elementwise intervals ``[lo, hi]`` (float64) holding every value that an
    implementation of a rule can produce in ``dtype`` arithmetic.

    Why: torch's CPU kernels do not round the same way on every dispatch path
    (``ATEN_CPU_CAPABILITY``). Its AVX2 and AVX-512 kernels (bit-identical to
    each other for every rule here, measured on an AVX-512 Xeon) evaluate the multiply-add inside
    ``add(other, alpha=)``, ``addcmul`` and ``lerp`` as one fma, and netcl's
    kernels fuse in the same places; its DEFAULT kernels (CPUs without AVX2,
    ``ATEN_CPU_CAPABILITY=default``) round the product first. Both are the
    rule as written, but where the rule cancels -- ``grad + wd*param`` near
    zero and then divided by ``sqrt(v) + eps`` near eps, a ``lerp`` or
    momentum update whose terms are far larger than its result -- that one
    rounding is amplified: measured on 10^6 elements, RMSprop with weight
    decay differs between the two paths by 135 float32 ulp (295 float64 ulp)
    of the array's largest element, Adam by 12, against ~1-3 where nothing
    cancels. No fixed tolerance separates that from a bug, so the parity
    tests evaluate the rule in this arithmetic from the state each side had
    before the step: a value far from torch's must still be one that torch's
    rule yields from netcl's own state under some rounding (see
    :func:`either_path_mismatches`).

    Model: every operation may round (products included, so a fused and an
    unfused multiply-add are both inside) with an error below one ulp
    (relative ``finfo(dtype).eps``; for float64 this also covers rounding the
    endpoints themselves), plus ``finfo(dtype).tiny`` absolute (subnormals,
    flush to zero), and the endpoints are then moved outward by one float64
    ulp. Scalars are rounded to ``dtype`` as both libraries pass them. The
    bounds are first order in the rounding error and do not model the
    correlation of operands (``g / sqrt(c*g*g)`` counts ``g`` twice), so they
    are a little wide, never narrow; where the rule is well-conditioned they
    are a few ulp wide.

    Supports ``+ - * /``, unary minus, ``np.sqrt``, ``np.maximum``,
    ``np.zeros_like`` and ``np.full_like``, which is all the torch rules here
    use, so :func:`torch_rmsprop_step` runs on intervals unchanged.
    """

    __array_priority__ = 1000

    def __init__(self, lo, hi=None, dtype=np.float32):
        self.lo = np.asarray(lo, dtype=np.float64)
        self.hi = self.lo if hi is None else np.asarray(hi, dtype=np.float64)
        self.dtype = np.dtype(dtype)

    def __repr__(self):
        return f"Interval({self.lo!r}, {self.hi!r}, {self.dtype.name})"

    def __getitem__(self, index):
        return Interval(self.lo[index], self.hi[index], self.dtype)

    def contains(self, values):
        """Elementwise: is each value inside (NaN only where the bound is NaN)?"""
        x = np.asarray(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            inside = (self.lo <= x) & (x <= self.hi)
        return inside | (np.isnan(x) & (np.isnan(self.lo) | np.isnan(self.hi)))

    # -- construction
    def _const(self, value):
        if isinstance(value, Interval):
            return value
        value = np.asarray(value, dtype=np.float64)
        if value.ndim == 0:  # a hyperparameter, rounded to dtype as the kernels get it
            value = np.float64(self.dtype.type(value))
        return Interval(value, value, self.dtype)

    def _rounded(self, lo, hi):
        info = np.finfo(self.dtype)
        with np.errstate(invalid="ignore"):
            lo = np.nextafter(lo - info.eps * np.abs(lo) - info.tiny, -np.inf)
            hi = np.nextafter(hi + info.eps * np.abs(hi) + info.tiny, np.inf)
        return Interval(lo, hi, self.dtype)

    # -- arithmetic
    def __neg__(self):
        return Interval(-self.hi, -self.lo, self.dtype)

    def __add__(self, other):
        other = self._const(other)
        return self._rounded(self.lo + other.lo, self.hi + other.hi)

    __radd__ = __add__

    def __sub__(self, other):
        return self + (-self._const(other))

    def __rsub__(self, other):
        return self._const(other) + (-self)

    def __mul__(self, other):
        if other is self:
            return self.square()
        other = self._const(other)
        with np.errstate(invalid="ignore"):
            ends = (self.lo * other.lo, self.lo * other.hi, self.hi * other.lo,
                    self.hi * other.hi)
        lo = np.fmin(np.fmin(ends[0], ends[1]), np.fmin(ends[2], ends[3]))
        hi = np.fmax(np.fmax(ends[0], ends[1]), np.fmax(ends[2], ends[3]))
        return self._rounded(lo, hi)

    __rmul__ = __mul__

    def __truediv__(self, other):
        other = self._const(other)
        with np.errstate(invalid="ignore", divide="ignore"):
            ends = (self.lo / other.lo, self.lo / other.hi, self.hi / other.lo,
                    self.hi / other.hi)
        lo = np.fmin(np.fmin(ends[0], ends[1]), np.fmin(ends[2], ends[3]))
        hi = np.fmax(np.fmax(ends[0], ends[1]), np.fmax(ends[2], ends[3]))
        zero = (other.lo <= 0) & (other.hi >= 0)  # a divisor that may be 0: anything
        lo, hi = np.where(zero, -np.inf, lo), np.where(zero, np.inf, hi)
        return self._rounded(lo, hi)

    def __rtruediv__(self, other):
        return self._const(other) / self

    def square(self):
        low, high = np.abs(self.lo), np.abs(self.hi)
        straddles = (self.lo <= 0) & (self.hi >= 0)
        return self._rounded(np.where(straddles, 0.0, np.minimum(low, high) ** 2),
                             np.maximum(low, high) ** 2)

    def sqrt(self):
        with np.errstate(invalid="ignore"):  # below 0: NaN, as torch gives
            lo = np.where(self.hi < 0, np.nan, np.sqrt(np.maximum(self.lo, 0.0)))
            return self._rounded(lo, np.sqrt(self.hi))

    def maximum(self, other):  # exact
        other = self._const(other)
        return Interval(np.maximum(self.lo, other.lo), np.maximum(self.hi, other.hi), self.dtype)

    # -- NumPy protocols: np.sqrt(i), np.float64(2) * i, np.zeros_like(i), ...
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__" or kwargs:
            return NotImplemented
        args = [self._const(x) for x in inputs]
        unary = {np.sqrt: Interval.sqrt, np.negative: Interval.__neg__,
                 np.square: Interval.square}
        binary = {np.add: Interval.__add__, np.subtract: Interval.__sub__,
                  np.multiply: Interval.__mul__, np.true_divide: Interval.__truediv__,
                  np.maximum: Interval.maximum}
        if ufunc in unary and len(args) == 1:
            return unary[ufunc](args[0])
        if ufunc in binary and len(args) == 2:
            return binary[ufunc](*args)
        return NotImplemented

    def __array_function__(self, func, types, args, kwargs):
        if func is np.zeros_like:
            zeros = np.zeros_like(args[0].lo)
            return Interval(zeros, zeros, self.dtype)
        if func is np.full_like:
            return self._const(np.full_like(args[0].lo, args[1]))
        return NotImplemented


def either_path_mismatches(rule, step, hyper, grad, ours, theirs, close):
    """Compare one step of two implementations of ``rule`` element by element,
    accepting either rounding of torch's dispatch paths (see :class:`Interval`).

    ``ours`` and ``theirs`` are ``(before, after)`` pairs of dicts from buffer
    name (``"param"`` and the rule's state names) to NumPy arrays: each side's
    parameter and state just before and just after the step (a state absent
    before the first step is left out; the rule creates it). ``rule`` is a
    float64 re-derivation such as :func:`torch_rmsprop_step`, called as
    ``rule(param, grad, state, step, **hyper)``. ``close(name, actual,
    expected)`` is the test's usual tolerance, as a boolean mask.

    An element of a buffer passes if ``close`` accepts it, or else if it lies
    in the interval of values the rule gives from *our* state before the
    step under every rounding placement. For the elements that fall back
    like this, torch's own value must lie in the interval computed from *its*
    state -- a check of the model, so an out-of-date rule cannot make the
    fallback pass. Returns a list of messages (empty when all pass) and the
    number of elements that needed the fallback.
    """
    failures, fallbacks = [], 0
    bad = {}
    for name, actual in ours[1].items():
        expected = theirs[1][name]
        if actual.size:
            mask = ~np.asarray(close(name, actual, expected)).ravel()
            if mask.any():
                bad[name] = mask
    if not bad:
        return failures, fallbacks
    index = np.flatnonzero(np.logical_or.reduce(list(bad.values())))
    dtype = ours[1]["param"].dtype
    g = np.asarray(grad).ravel()[index]

    def interval_step(before):
        point = {name: Interval(np.asarray(v).ravel()[index], dtype=dtype)
                 for name, v in before.items()}
        param = point.pop("param")
        new_param = rule(param, Interval(g, dtype=dtype), point, step, **hyper)
        return dict(point, param=new_param)

    mine, model = interval_step(ours[0]), interval_step(theirs[0])
    for name, mask in bad.items():
        rows = mask[index]  # the elements of `index` this buffer fails at
        actual = ours[1][name].ravel()[index][rows]
        expected = theirs[1][name].ravel()[index][rows]
        fallbacks += int(rows.sum())
        where = index[rows]
        inside = model[name][rows].contains(expected)
        if not inside.all():
            k = int(np.argmin(inside))
            failures.append(
                f"{name}: torch's own value {expected[k]!r} at flat index {where[k]} is outside "
                f"[{model[name].lo[rows][k]!r}, {model[name].hi[rows][k]!r}], what the "
                f"reference rule gives from torch's state: the rule is out of date")
        inside = mine[name][rows].contains(actual)
        if not inside.all():
            k = int(np.argmin(inside))
            failures.append(
                f"{name}: flat index {where[k]} is {actual[k]!r}, torch {expected[k]!r}; "
                f"outside the tolerance and outside [{mine[name].lo[rows][k]!r}, "
                f"{mine[name].hi[rows][k]!r}], what torch's rule gives from our previous "
                f"state under any rounding")
    return failures, fallbacks


def within_nulp(actual, expected, nulp=None):
    """tests/conftest.py ``assert_close``'s tolerance, element by element:
    ``nulp`` ulp of each element's magnitude plus ``nulp`` ulp of the array's
    largest expected magnitude (default 8 for float32, 64 for float64)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if nulp is None:
        nulp = 8 if actual.dtype == np.float32 else 64
    eps = np.finfo(actual.dtype).eps
    magnitude = np.maximum(np.abs(actual), np.abs(expected)).astype(np.float64)
    tolerance = nulp * eps * (magnitude + np.max(np.abs(expected)))
    return np.abs(actual.astype(np.float64) - expected.astype(np.float64)) <= tolerance


def _host(value):
    """A host copy of a netcl (pyopencl) array or a torch tensor."""
    if hasattr(value, "detach"):
        return value.detach().numpy().copy()
    return value.get()


def mirror_buffers(opt, topt, mirrors):
    """For each ``conftest.Mirror``: its netcl and torch parameter and state
    (``step`` left out) as host arrays, and its gradient (None when unset)."""
    out = []
    for m in mirrors:
        ours = {k: _host(v) for k, v in opt.state.get(id(m.param), {}).items() if k != "step"}
        theirs = {k: _host(v) for k, v in topt.state.get(m.tensor, {}).items() if k != "step"}
        ours["param"], theirs["param"] = _host(m.param.data), _host(m.tensor)
        grad = None if m.tensor.grad is None else _host(m.tensor.grad)
        out.append((ours, theirs, grad))
    return out


def _unchanged(param, grad, state, step, **hyper):
    """The rule for a parameter without a gradient: nothing moves."""
    return param


_TORCH_RMSPROP_KEYS = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")


def assert_torch_rmsprop_step(opt, topt, mirrors, step, before, nulp=None):
    """netcl's RMSProp against torch.optim.RMSprop after one step, on any of
    torch's CPU dispatch paths.

    ``before`` is :func:`mirror_buffers` taken just before the step. Every
    parameter and state buffer must agree with torch within ``nulp`` (as
    conftest's ``assert_close``); an element that does not must be one that
    torch's rule (:func:`torch_rmsprop_step`) gives from netcl's own previous
    state under some rounding (:func:`either_path_mismatches`). This is what
    keeps the test independent of ``ATEN_CPU_CAPABILITY``: netcl fuses where
    torch's AVX2/AVX-512 kernels do, so there it agrees bit for bit on almost
    every element, while torch's DEFAULT kernels round each product first,
    and after a cancellation (``grad + wd*param`` near 0, then divided by a
    root near eps) the two roundings differ by 10^2 ulp of the array's
    largest element in float32 and float64 alike.
    """
    groups = {id(t): g for g in topt.param_groups for t in g["params"]}
    after = mirror_buffers(opt, topt, mirrors)
    for i, (m, (ours0, theirs0, grad), (ours1, theirs1, _)) in enumerate(
            zip(mirrors, before, after)):
        what = f"step {step} param {i}"
        assert set(ours1) == set(theirs1), f"{what}: state {set(ours1)} != {set(theirs1)}"
        ours_state = opt.state.get(id(m.param), {})
        theirs_state = topt.state.get(m.tensor, {})
        if "step" in theirs_state:
            assert ours_state.get("step") == int(theirs_state["step"].item()), f"{what}: step count"
        for name, value in ours1.items():
            assert value.shape == theirs1[name].shape, f"{what} {name}: shape"
            assert value.dtype == theirs1[name].dtype, f"{what} {name}: dtype"
        hyper = {k: groups[id(m.tensor)][k] for k in _TORCH_RMSPROP_KEYS}
        rule = torch_rmsprop_step if grad is not None else _unchanged
        if grad is None:
            grad = np.zeros_like(ours0["param"])
        failures, _ = either_path_mismatches(
            rule, step, hyper, grad, (ours0, ours1), (theirs0, theirs1),
            lambda name, a, e: within_nulp(a, e, nulp))
        assert not failures, f"{what}: " + "; ".join(failures)
