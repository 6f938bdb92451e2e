"""The wait between retries: initial * 2^(attempt-1) plus up to `initial` of jitter, at most
10 s (what tenacity's wait_exponential_jitter gave the router before)."""

from __future__ import annotations

from rlm_orchestrator.router import MAX_RETRY_WAIT, LMClientConfig, _retry_wait


def test_retry_wait_grows_with_jitter_and_a_ceiling() -> None:
    config = LMClientConfig.from_backend(
        "openai", {"model_name": "m", "api_base": "http://x/v1", "retry_initial_delay": 0.5}
    )
    for attempt in (1, 2, 3, 4):
        low = 0.5 * 2 ** (attempt - 1)
        waits = [_retry_wait(config, attempt) for _ in range(200)]
        assert all(low <= w <= min(low + 0.5, MAX_RETRY_WAIT) for w in waits)
        assert len(set(waits)) > 1  # jitter
    assert {_retry_wait(config, 10), _retry_wait(config, 5000)} == {MAX_RETRY_WAIT}
