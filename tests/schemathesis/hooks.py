"""Schemathesis checks of our own, loaded with SCHEMATHESIS_HOOKS=hooks.

`unauthorized_everywhere`: for the runs without a key, with a wrong one or with a key of the
wrong kind, every operation must answer CONFAB_EXPECT_STATUS (401 unless set) with the one
error shape and one of the codes in CONFAB_EXPECT_401_CODE (`missing_api_key` /
`invalid_api_key`, or `forbidden` for a tenant key on `/admin/v1` and an admin key on `/api`).
"""
import os

import schemathesis

# Comma-separated codes accepted (schemathesis may fill the key header with junk even when we
# send none, so the no-key run accepts both).
EXPECTED_CODE = os.environ.get("CONFAB_EXPECT_401_CODE")
# Comma-separated statuses accepted (the wrong-kind run also sees schemathesis drop the key
# header: 401 `missing_api_key`).
EXPECTED_STATUS = [int(s) for s in os.environ.get("CONFAB_EXPECT_STATUS", "401").split(",")]


@schemathesis.check
def unauthorized_everywhere(ctx, response, case):
    if not EXPECTED_CODE:
        return None
    if response.status_code not in EXPECTED_STATUS:
        raise AssertionError(
            f"expected {EXPECTED_STATUS} {EXPECTED_CODE}, got {response.status_code}: {response.text[:300]}"
        )
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(body) != {"error"}:
        raise AssertionError(f"not the error shape: {response.text[:300]}")
    if error.get("code") not in EXPECTED_CODE.split(","):
        raise AssertionError(f"expected code {EXPECTED_CODE}, got {error.get('code')!r}")
    if not error.get("message") or not isinstance(error.get("details"), dict):
        raise AssertionError(f"message and details required: {response.text[:300]}")
    return None
