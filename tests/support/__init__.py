"""Helpers the test suite shares: real peers and storage, set up idempotently.

Test modules both import these helpers and load them as pytest plugins; registering every module
here for assert rewriting before any is imported keeps pytest from warning that it came too late.
"""

import pkgutil

import pytest

pytest.register_assert_rewrite(*(f"{__name__}.{module.name}" for module in pkgutil.iter_modules(__path__)))
