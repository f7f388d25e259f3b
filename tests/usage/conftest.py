"""The two forms of the usage readers: with the compiled reading (the top-level scan and the
counts of known shapes) and without it.

``usage_form`` runs a test once per form (tests marked
``pytest.mark.usefixtures("usage_form")``): ``compiled`` where the extension is built (a
skip otherwise; CI fails instead in tests/usage/test_topscan.py), ``pure`` with it
switched off, as ``CREDITGATE_PURE_PYTHON=1`` does.
"""

from __future__ import annotations

import pytest

from gateway.usage import responses, topscan


@pytest.fixture(params=["compiled", "pure"])
def usage_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The form the test runs against (the compiled scan or the pure-Python decode)."""
    form: str = request.param
    if form == "compiled":
        if topscan.scan is None:
            pytest.skip("the C extension gateway.usage._topscan is not built")
        monkeypatch.setattr(responses, "_scan", topscan.scan)
        monkeypatch.setattr(responses, "_counts", topscan.counts)
    else:
        monkeypatch.setattr(responses, "_scan", None)
        monkeypatch.setattr(responses, "_counts", None)
    return form
