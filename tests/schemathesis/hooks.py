"""Schemathesis checks of our own, loaded with SCHEMATHESIS_HOOKS=hooks.

`unauthorized_everywhere`: for the runs without a key or with a wrong one, every
operation must answer 401 with the one error shape (`missing_api_key` / `invalid_api_key`).
"""
import os

import schemathesis

# Comma-separated codes accepted (schemathesis may fill the key header with junk even when we
# send none, so the no-key run accepts both).
EXPECTED_CODE = os.environ.get("CONFAB_EXPECT_401_CODE")


@schemathesis.check
def unauthorized_everywhere(ctx, response, case):
    if not EXPECTED_CODE:
        return None
    if response.status_code != 401:
        raise AssertionError(f"expected 401 {EXPECTED_CODE}, got {response.status_code}: {response.text[:300]}")
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(body) != {"error"}:
        raise AssertionError(f"not the error shape: {response.text[:300]}")
    if error.get("code") not in EXPECTED_CODE.split(","):
        raise AssertionError(f"expected code {EXPECTED_CODE}, got {error.get('code')!r}")
    if not error.get("message") or not isinstance(error.get("details"), dict):
        raise AssertionError(f"message and details required: {response.text[:300]}")
    return None
