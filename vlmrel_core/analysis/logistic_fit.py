"""`LogisticRegression.fit` for the probes' one configuration, with scikit-learn's per-iteration overhead removed.

Why: a report fits ~3,000 small logistic regressions (grouped CV over the C grid for ~100 probes) of ~150 L-BFGS
steps each, and on these (n ≤ 2,000, d ≤ 512) problems about 40% of each step was bookkeeping around the loss:
scikit-learn's array-API dispatch and scipy's `ScalarFunction` / `MemoizeJac` wrappers (measured: fits ~1.6×
faster without them). `fit_logistic` runs the *same* computation as scikit-learn 1.9's lbfgs path
(`_logistic_regression_path`): its Cython `HalfBinomialLoss` kernel, the same mean loss + L2 penalty 1/(2·C·n)·‖w‖²,
the same gradient expressions in the same order, the same L-BFGS-B options and warm start, driven by
`minimize_lbfgsb` (scipy 1.17's `_minimize_lbfgsb` loop over the same `setulb` kernel), and leaves the estimator in
the state `fit` would (coef_, intercept_, n_iter_, classes_, n_features_in_). The fitted coefficients are therefore
bit-identical (tests/test_logistic_fit.py checks this against `LogisticRegression.fit`, cold, warm and capped, and
`minimize_lbfgsb` against `scipy.optimize.minimize`). Any other configuration, or a scikit-learn / scipy minor
version not listed in MIRRORED_SKLEARN / MIRRORED_SCIPY, goes through scikit-learn / scipy themselves.
"""

from __future__ import annotations

import numpy as np
import scipy
import sklearn
from scipy import optimize
from sklearn.linear_model import LogisticRegression

try:  # private scikit-learn pieces, used so the loss and the stopping rule stay scikit-learn's own
    from sklearn._loss.loss import HalfBinomialLoss
    from sklearn.linear_model._logistic import _LOGISTIC_SOLVER_CONVERGENCE_MSG
    from sklearn.utils.fixes import _get_additional_lbfgs_options_dict
    from sklearn.utils.optimize import _check_optimize_result
except ImportError:  # pragma: no cover - another scikit-learn layout: always use LogisticRegression.fit
    HalfBinomialLoss = None
try:  # scipy's L-BFGS-B kernel and its messages, driven below as `_minimize_lbfgsb` drives them
    from scipy.optimize import _lbfgsb
    from scipy.optimize._lbfgsb_py import status_messages, task_messages
except ImportError:  # pragma: no cover - another scipy layout: use scipy.optimize.minimize
    _lbfgsb = None

#: scikit-learn minor versions whose lbfgs path this module mirrors (checked bit for bit by the tests).
MIRRORED_SKLEARN = ("1.9",)
#: scipy minor versions whose `_minimize_lbfgsb` loop `minimize_lbfgsb` mirrors (checked by the tests).
MIRRORED_SCIPY = ("1.17",)
_DEFAULTS = dict(penalty="deprecated", dual=False, tol=1e-4, fit_intercept=True, intercept_scaling=1,
                 class_weight=None, solver="lbfgs", l1_ratio=0.0, verbose=0, n_jobs=None)


def mirrors_sklearn() -> bool:
    """Whether this scikit-learn is one whose lbfgs path `fit_logistic` reproduces exactly."""
    return HalfBinomialLoss is not None and sklearn.__version__.startswith(tuple(v + "." for v in MIRRORED_SKLEARN))


def mirrors_scipy() -> bool:
    """Whether this scipy is one whose L-BFGS-B driver loop `minimize_lbfgsb` reproduces exactly."""
    return _lbfgsb is not None and scipy.__version__.startswith(tuple(v + "." for v in MIRRORED_SCIPY))


def minimize_lbfgsb(fun, x0: np.ndarray, args: tuple, *, maxiter: int, maxls: int, gtol: float, ftol: float,
                    maxcor: int = 10, maxfun: int = 15000) -> optimize.OptimizeResult:
    """``scipy.optimize.minimize(fun, x0, args, method="L-BFGS-B", jac=True, options=...)`` without bounds or
    callback: scipy 1.17's `_minimize_lbfgsb` loop over the same `setulb` kernel, with the function evaluated
    once per new point as its `ScalarFunction` / `MemoizeJac` wrappers do, minus their per-step bookkeeping."""
    if not mirrors_scipy():
        return optimize.minimize(fun, x0, args=args, method="L-BFGS-B", jac=True, options={
            "maxiter": maxiter, "maxls": maxls, "gtol": gtol, "ftol": ftol, "maxcor": maxcor, "maxfun": maxfun})
    x0 = np.asarray(x0).ravel()
    n = x0.size
    m, factr = maxcor, ftol / np.finfo(float).eps
    x_dtype = x0.dtype if np.issubdtype(x0.dtype, np.floating) else np.float64  # ScalarFunction: fun sees this dtype
    evaluated_x = x0.astype(x_dtype)  # ScalarFunction evaluates the start point when it is built
    evaluated_f, evaluated_g = fun(np.copy(evaluated_x), *args)
    nfev = 1
    nbd, low_bnd, upper_bnd = np.zeros(n, np.int32), np.zeros(n, np.float64), np.zeros(n, np.float64)
    x, f, g = np.array(x0, dtype=np.float64), np.array(0.0, dtype=np.float64), np.zeros((n,), dtype=np.float64)
    wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, np.float64)
    iwa, task, ln_task = np.zeros(3 * n, dtype=np.int32), np.zeros(2, dtype=np.int32), np.zeros(2, dtype=np.int32)
    lsave, isave, dsave = np.zeros(4, dtype=np.int32), np.zeros(44, dtype=np.int32), np.zeros(29, dtype=np.float64)
    n_iterations = 0
    while True:
        g = g.astype(np.float64)
        _lbfgsb.setulb(m, x, low_bnd, upper_bnd, nbd, f, g, factr, gtol, wa, iwa, task, lsave, isave, dsave, maxls,
                       ln_task)
        if task[0] == 3:  # evaluate f and g at x
            if not (x == evaluated_x).all():  # np.array_equal for same-shape arrays, without its wrapper
                evaluated_x = x.astype(x_dtype)
                evaluated_f, evaluated_g = fun(np.copy(evaluated_x), *args)
                nfev += 1
            f, g = evaluated_f, evaluated_g
        elif task[0] == 1:  # a new iterate
            n_iterations += 1
            if n_iterations >= maxiter:
                task[0], task[1] = 5, 504
            elif nfev > maxfun:
                task[0], task[1] = 5, 502
        else:
            break
    warnflag = 0 if task[0] == 4 else (1 if nfev > maxfun or n_iterations >= maxiter else 2)
    return optimize.OptimizeResult(fun=f, jac=g, nfev=nfev, njev=nfev, nit=n_iterations, status=warnflag,
                                   message=status_messages[task[0]] + ": " + task_messages[task[1]], x=x,
                                   success=warnflag == 0)


def _supported(model: LogisticRegression) -> bool:
    params = model.get_params()
    return mirrors_sklearn() and all(params.get(k, v) == v for k, v in _DEFAULTS.items()) \
        and not hasattr(model, "_skl_callbacks") and float(params["C"]) > 0


def _loss_gradient(coef: np.ndarray, X: np.ndarray, y: np.ndarray, l2_reg_strength: float, closs) -> tuple[float, np.ndarray]:
    """`LinearModelLoss.loss_gradient` (binary, intercept, no sample weights), expression for expression."""
    n_samples, n_features = X.shape
    weights, intercept = coef[:-1], coef[-1]
    raw_prediction = X @ weights + intercept
    loss_out, gradient_out = np.empty_like(y), np.empty_like(raw_prediction)
    closs.loss_gradient(y_true=y, raw_prediction=raw_prediction, sample_weight=None, loss_out=loss_out,
                        gradient_out=gradient_out, n_threads=1)
    loss = float(loss_out.sum() / n_samples)  # ndarray.sum: np.sum's reduction without its Python wrapper
    loss += float(0.5 * l2_reg_strength * (weights @ weights))
    gradient_out /= n_samples
    grad = np.empty_like(coef, dtype=weights.dtype)
    grad[:n_features] = X.T @ gradient_out + l2_reg_strength * weights
    grad[-1] = gradient_out.sum()
    return loss, grad


def fit_logistic(model: LogisticRegression, X: np.ndarray, y: np.ndarray) -> LogisticRegression:
    """``model.fit(X, y)`` with identical results; fast for binary L2 lbfgs with an intercept (the probes' model)."""
    X = np.asarray(X)
    y = np.asarray(y)
    classes = np.unique(y)
    if (not _supported(model) or X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or classes.size != 2
            or X.dtype not in (np.float64, np.float32) or not np.isfinite(X).all()):
        return model.fit(X, y)
    X = np.ascontiguousarray(X)  # float32 stays float32, as in scikit-learn (loss and gradient in float32)
    n_samples, n_features = X.shape
    w0 = np.zeros(n_features + 1, dtype=X.dtype)
    if model.warm_start and getattr(model, "coef_", None) is not None:
        w0[:] = np.concatenate([model.coef_, model.intercept_[:, None]], axis=1)[0]
    target = np.ones(y.shape, dtype=X.dtype)
    target[~(y == classes[1])] = 0.0
    max_iter = int(model.max_iter)
    if _get_additional_lbfgs_options_dict("iprint", -1):  # pragma: no cover - scipy < 1.15 (not mirrored)
        return model.fit(X, y)
    result = minimize_lbfgsb(_loss_gradient, w0, (X, target, 1.0 / (float(model.C) * n_samples),
                                                  HalfBinomialLoss().closs),
                             maxiter=max_iter, maxls=50, gtol=model.tol, ftol=64 * np.finfo(float).eps)
    n_iter = _check_optimize_result("lbfgs", result, max_iter, extra_warning_msg=_LOGISTIC_SOLVER_CONVERGENCE_MSG)
    coef = np.asarray(result.x.copy(order="K"), dtype=X.dtype)
    model.classes_ = classes
    model.n_features_in_ = n_features
    model.n_iter_ = np.asarray([n_iter], dtype=np.int32)
    model.intercept_ = coef[-1:]
    model.coef_ = coef[:-1][None, :]
    return model
