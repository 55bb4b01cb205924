"""`fit_logistic` must leave a LogisticRegression exactly as `LogisticRegression.fit` does (every probe depends on it)."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from vlmrel_core.analysis.logistic_fit import fit_logistic, mirrors_sklearn
from vlmrel_core.analysis.probes import MAX_ITER, fit_probe_pipeline, make_probe_pipeline
from vlmrel_core.analysis.splits import labels_of
from vlmrel_core.engine.store import RunReader
from vlmrel_core.samples.catalog import sample_catalog


def same_fit(a: LogisticRegression, b: LogisticRegression) -> bool:
    return (np.array_equal(a.coef_, b.coef_) and np.array_equal(a.intercept_, b.intercept_)
            and np.array_equal(a.n_iter_, b.n_iter_) and np.array_equal(a.classes_, b.classes_)
            and a.coef_.dtype == b.coef_.dtype and a.n_iter_.dtype == b.n_iter_.dtype)


@pytest.fixture(scope="module")
def probe_data() -> tuple[np.ndarray, np.ndarray]:
    """Standardised shipped hidden states (the report's own problem), 500 rows."""
    reader = RunReader(sample_catalog().run_dir("late_fusion", "random"))
    X = reader.states("mean_all", [1])[:500, 0].astype(np.float64)
    return StandardScaler().fit_transform(X), labels_of(reader.rows)[:500]


def test_the_installed_scikit_learn_takes_the_mirrored_path(probe_data, monkeypatch):
    """On another scikit-learn, fits go through LogisticRegression.fit (same numbers, slower): the summary says so
    instead of failing a fresh install; on a mirrored one, a probe's fit never falls back."""
    import sklearn

    if not mirrors_sklearn():
        pytest.skip(f"scikit-learn {sklearn.__version__} is not in MIRRORED_SKLEARN: probes fit through "
                    "LogisticRegression.fit (identical numbers, ~1.6x slower)")
    X, y = probe_data
    monkeypatch.setattr(LogisticRegression, "fit", lambda *args, **kwargs: pytest.fail("fell back to LogisticRegression.fit"))
    fitted = fit_logistic(LogisticRegression(C=1.0, max_iter=MAX_ITER), X[:200], y[:200])
    assert fitted.coef_.shape == (1, X.shape[1]) and fitted.n_iter_[0] > 0


def test_warm_started_c_walk_is_bit_identical(probe_data):
    X, y = probe_data
    reference = LogisticRegression(C=1e-3, max_iter=MAX_ITER, warm_start=True)
    fast = LogisticRegression(C=1e-3, max_iter=MAX_ITER, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0):  # the CV's walk: each fit starts where the last ended
            reference.set_params(C=C).fit(X, y)
            fit_logistic(fast.set_params(C=C), X, y)
            assert same_fit(reference, fast), C
    np.testing.assert_array_equal(reference.decision_function(X), fast.decision_function(X))


@pytest.mark.parametrize("seed", range(3))
def test_cold_fits_on_random_problems_are_bit_identical(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(int(rng.integers(30, 300)), int(rng.integers(1, 40))))
    y = (X[:, 0] + rng.normal(size=X.shape[0]) > 0).astype(np.int64)
    for C in (0.01, 1.0, 100.0):
        for max_iter in (3, 2000):  # a capped fit stops at the same step, with the same warning
            with warnings.catch_warnings(record=True) as ref_warnings:
                warnings.simplefilter("always")
                reference = LogisticRegression(C=C, max_iter=max_iter).fit(X, y)
            with warnings.catch_warnings(record=True) as fast_warnings:
                warnings.simplefilter("always")
                fast = fit_logistic(LogisticRegression(C=C, max_iter=max_iter), X, y)
            assert same_fit(reference, fast)
            assert [w.category for w in ref_warnings] == [w.category for w in fast_warnings]


def test_probe_pipeline_equals_the_sklearn_pipeline(probe_data):
    X, y = probe_data
    X = X * 3.0 + 1.0
    reference = make_probe_pipeline(10.0).fit(X, y)
    fast = fit_probe_pipeline(10.0, X, y)
    assert same_fit(reference.named_steps["logreg"], fast.named_steps["logreg"])
    np.testing.assert_array_equal(reference.decision_function(X), fast.decision_function(X))
    np.testing.assert_array_equal(reference.predict_proba(X), fast.predict_proba(X))


def test_float32_states_fit_in_float32_as_sklearn_does(probe_data):
    X, y = probe_data
    X32 = (X * 2.0 + 0.5).astype(np.float32)  # the controls fit raw float32 states (shuffled labels, out-of-fold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in (0.01, 1.0, 100.0):
            reference = LogisticRegression(C=C, max_iter=MAX_ITER).fit(X32, y)
            fast = fit_logistic(LogisticRegression(C=C, max_iter=MAX_ITER), X32, y)
            assert same_fit(reference, fast) and fast.coef_.dtype == np.float32, C
        reference, fast = make_probe_pipeline(10.0).fit(X32, y), fit_probe_pipeline(10.0, X32, y)
    np.testing.assert_array_equal(reference.predict_proba(X32), fast.predict_proba(X32))


def test_other_inputs_go_through_sklearn_itself(probe_data):
    X, y = probe_data
    with pytest.raises(ValueError, match="only one"):  # one class: sklearn's own error
        fit_logistic(LogisticRegression(), X, np.zeros_like(y))
    l1 = LogisticRegression(C=1.0, l1_ratio=1.0, solver="saga", max_iter=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert same_fit(LogisticRegression(C=1.0, l1_ratio=1.0, solver="saga", max_iter=50, random_state=0).fit(X, y),
                        fit_logistic(l1.set_params(random_state=0), X, y))


def test_lbfgsb_driver_equals_scipy_minimize():
    from scipy import optimize

    from vlmrel_core.analysis.logistic_fit import minimize_lbfgsb, mirrors_scipy

    if not mirrors_scipy():
        pytest.skip("this scipy is not in MIRRORED_SCIPY: minimize_lbfgsb calls scipy.optimize.minimize itself")

    def rosenbrock(x, scale):
        return float(optimize.rosen(x) * scale), optimize.rosen_der(x) * scale

    for x0, maxiter in ((np.full(6, -1.2), 15000), (np.linspace(-2, 2, 9), 7), (np.zeros(3), 15000)):
        options = dict(maxiter=maxiter, maxls=50, gtol=1e-6, ftol=64 * np.finfo(float).eps)
        reference = optimize.minimize(rosenbrock, x0, args=(2.0,), method="L-BFGS-B", jac=True, options=options)
        got = minimize_lbfgsb(rosenbrock, x0, (2.0,), **options)
        np.testing.assert_array_equal(got.x, reference.x)
        assert (got.fun, got.nit, got.nfev, got.status, got.message) == (
            reference.fun, reference.nit, reference.nfev, reference.status, reference.message)
