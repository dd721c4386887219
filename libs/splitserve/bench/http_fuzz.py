"""Fuzzing the gateway's HTTP API from its own OpenAPI document (GET /openapi.json) with
schemathesis: generated requests, valid (positive) and invalid (negative), against a running
gateway, each checked by schemathesis's response checks and tallied by status.

Used by tests/e2e/test_openapi.py (a bounded run in `make test`) and benchmarks/fuzz_http.py (the
10,000-request run). The document is fuzzed as served; `bound` makes each generated request cheap
without changing whether it is valid (a valid request generates a token or two).
"""
from __future__ import annotations

import json
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

FUZZ_MAX_TOKENS = 2  # tokens a valid generated request may ask for (more cost time and test nothing new)
FUZZ_MAX_SEQUENCES = 2  # prompts x n of a valid generated request
MAX_REPORTED = 20  # failures kept with their request, per kind


def fetch_document(base_url: str, timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(base_url.rstrip("/") + "/openapi.json", timeout=timeout) as resp:
        return json.load(resp)


def bound(case, max_tokens: int = FUZZ_MAX_TOKENS, max_sequences: int = FUZZ_MAX_SEQUENCES) -> None:
    """Makes a generated request cheap without changing whether it is valid: a valid (positive)
    one asks for at most `max_tokens` tokens and `max_sequences` sequences (fewer tokens, choices
    and prompts are as valid as more); a request without max_tokens, valid or not, gets it (the
    defaults are 16 tokens, and for chat the rest of the context). Invalid requests are otherwise
    left as generated."""
    body = case.body
    if not isinstance(body, dict) or not case.path.startswith("/v1/"):
        return
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = max_tokens
    if case.meta is None or case.meta.generation.mode.value != "positive":
        return
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), (int, float)) and body[name] > max_tokens:
            body[name] = max_tokens
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        body["prompt"] = prompt = prompt[:max_sequences]
    prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
    if isinstance(body.get("n"), (int, float)) and body["n"] * prompts > max_sequences:
        body["n"] = max(1, max_sequences // prompts)


@dataclass
class Tally:
    """What a fuzzing run saw."""

    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_mode: Counter = field(default_factory=Counter)  # "positive" / "negative" requests sent
    server_errors: list = field(default_factory=list)  # (status, curl command, body excerpt)
    transport_errors: list = field(default_factory=list)  # (error, curl command): the server did not answer
    check_failures: Counter = field(default_factory=Counter)  # failed schemathesis check -> count
    examples: dict = field(default_factory=dict)  # failed check -> (curl command, message), the first ones

    @property
    def num_5xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def merge(self, other: "Tally") -> None:
        self.requests += other.requests
        self.statuses.update(other.statuses)
        self.by_mode.update(other.by_mode)
        self.server_errors += other.server_errors[:MAX_REPORTED]
        self.transport_errors += other.transport_errors[:MAX_REPORTED]
        self.check_failures.update(other.check_failures)
        for name, example in other.examples.items():
            self.examples.setdefault(name, example)

    def summary(self) -> dict:
        return {"requests": self.requests, "statuses": dict(sorted(self.statuses.items())),
                "by_mode": dict(self.by_mode), "5xx": self.num_5xx, "transport_errors": len(self.transport_errors),
                "check_failures": dict(self.check_failures)}


def default_checks() -> list:
    """Every check that applies to a stateless API: no 5xx, documented status codes and content
    types, responses matching their schemas, invalid input refused and valid input accepted."""
    from schemathesis import checks

    return [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
            checks.response_schema_conformance, checks.negative_data_rejection, checks.positive_data_acceptance]


def run(base_url: str, examples: int, seed: int | None = None, checks: list | None = None,
        doc: dict | None = None, timeout_s: float = 60.0) -> Tally:
    """About `examples` generated requests over every operation, positive and negative, against
    `base_url`; every response checked. Never raises for what the server answers: the tally says."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    checks = default_checks() if checks is None else checks
    schema = schemathesis.openapi.from_dict(doc if doc is not None else fetch_document(base_url))
    operations = [result.ok() for result in schema.get_all_operations()]
    # an operation without parameters or body has no invalid form: positive only
    strategies = [op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode
                  if mode == GenerationMode.POSITIVE or list(op.body) or list(op.path_parameters)]
    tally = Tally()

    # generation only: nothing raises (no shrinking), every failure is counted in the tally
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies))
    def one(case) -> None:
        bound(case)
        _call(case, base_url, checks, timeout_s, tally)

    (fixed_seed(seed)(one) if seed is not None else one)()
    return tally


def _call(case, base_url: str, checks: list, timeout_s: float, tally: Tally) -> None:
    from schemathesis.core.failures import FailureGroup

    mode = case.meta.generation.mode.value if case.meta is not None else "unknown"
    tally.requests += 1
    tally.by_mode[mode] += 1
    try:
        response = case.call(base_url=base_url, timeout=timeout_s)
    except Exception as exc:  # the server did not answer at all
        if len(tally.transport_errors) < MAX_REPORTED:
            tally.transport_errors.append((repr(exc)[:300], case.as_curl_command()))
        return
    tally.statuses[response.status_code] += 1
    if response.status_code >= 500 and len(tally.server_errors) < MAX_REPORTED:
        tally.server_errors.append((response.status_code, case.as_curl_command(), response.text[:300]))
    try:
        case.validate_response(response, checks=checks)
    except FailureGroup as group:
        for failure in group.exceptions:
            _record_failure(tally, failure, case, response)
    except AssertionError as failure:
        _record_failure(tally, failure, case, response)


def _record_failure(tally: Tally, failure, case, response) -> None:
    name = getattr(failure, "title", None) or type(failure).__name__
    tally.check_failures[name] += 1
    if name not in tally.examples:
        body = json.dumps(case.body, ensure_ascii=True)[:1500] if case.body is not None else ""
        tally.examples[name] = (f"{case.method} {case.formatted_path} {body}",
                                f"{str(failure)[:600]}\nanswer: {response.status_code} {response.text[:400]}")
