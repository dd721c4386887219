"""Role flags given through `splitserve up` reach the roles: the shared two-prefill-worker stack
(tests/conftest.py: two_prefill_stack) is started with the gateway's routing weight, its served
model name, a metrics base port and the decode worker's speculative decoding on up's command line,
checked through what the processes serve."""
from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from services_fixture import SERVED_NAME
from splitserve import SamplingParams
from splitserve.client import stream_generate

# A: 141 tokens (8 full blocks of 16, 9 with the partial one); LONG: ~1,700 tokens, a long prefill.
PROMPT_A = "Routing weights decide where a repeated prompt goes. " * 14
LONG = " ".join(f"item{i}" for i in range(450))


def get_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def decisions(stack) -> dict[str, float]:
    """The gateway's routing_decisions{target="prefill"} counters by reason."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(stack.metrics["gateway"], timeout=30) as resp:
        text = resp.read().decode()
    return {s.labels["reason"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "splitserve_routing_decisions_total" and s.labels.get("target") == "prefill"}


@pytest.fixture(scope="module")
def stack(two_prefill_stack):
    return two_prefill_stack


def test_metrics_ports_sit_at_their_offsets_and_match_the_scrape_config(stack, capsys):
    from splitserve.launch.cli import build_parser
    from splitserve.launch.up import cmd_up

    b = stack.base
    ports = {name: int(url.rsplit(":", 1)[1].split("/")[0]) for name, url in stack.metrics.items()}
    http_port = int(stack.http_base.rsplit(":", 1)[1].split("/")[0])
    assert ports == {"gateway": http_port, "kvstore": b, "prefill-0": b + 10, "prefill-1": b + 11, "decode-0": b + 20}
    for url in stack.metrics.values():
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200 and b"splitserve_" in resp.read()
    args = build_parser().parse_args(["up", *stack.flags, "--http-port", str(http_port), "--print-scrape-config"])
    assert cmd_up(args) == 0
    printed = capsys.readouterr().out
    for name, port in ports.items():
        assert f'targets: ["127.0.0.1:{port}"]' in printed and f"process: {name}" in printed


def test_served_model_name_reaches_the_gateway(stack):
    models = get_json(stack.http_base + "/models")
    assert [m["id"] for m in models["data"]] == [SERVED_NAME]
    out = get_json(stack.http_base + "/completions", {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 2})
    assert out["usage"]["completion_tokens"] == 2


def computed(stack) -> dict[str, int]:
    """Prompt tokens each prefill worker has computed so far."""
    return {name: stack.prefill_load(name).prompt_tokens_computed for name in ("prefill-0", "prefill-1")}


@pytest.mark.timeout(300)
def test_overlap_weight_given_to_up_changes_prefill_routing(stack):
    """Prompt A goes to one prefill worker, Pa. A long prompt that starts with A follows it there
    and keeps it busy (~1,700 uncached tokens: ~106 blocks of queued work) when A comes again. With
    the default overlap_weight 1.0, computing A's 9 blocks on the idle worker would be cheaper
    (9 < 1 + 106), so A would go there ("load"); with the 50.0 given to `up`, the 9 blocks cost
    450 > 50 + 106, so A stays on Pa ("prefix") and the other worker computes nothing."""
    body = {"model": SERVED_NAME, "max_tokens": 1, "temperature": 0}
    before, start = decisions(stack), computed(stack)
    get_json(stack.http_base + "/completions", {**body, "prompt": PROMPT_A})
    after_a = computed(stack)
    (pa,) = [name for name in after_a if after_a[name] > start[name]]
    (pb,) = [name for name in after_a if name != pa]
    hits = stack.prefill_load(pa).prefix_cache_hits
    long_done = threading.Event()
    errors: list[BaseException] = []

    def long_request():
        try:
            get_json(stack.http_base + "/completions", {**body, "prompt": PROMPT_A + LONG})
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            errors.append(exc)
        finally:
            long_done.set()

    thread = threading.Thread(target=long_request, daemon=True)
    thread.start()
    seen_busy = False
    while not seen_busy and not long_done.is_set():  # poll until Pa reports the long prefill running
        load = stack.prefill_load(pa)
        seen_busy = bool(load.num_running or load.num_waiting)
    assert seen_busy, f"the long prefill ended before it was seen running on {pa}: {errors}"
    get_json(stack.http_base + "/completions", {**body, "prompt": PROMPT_A})
    thread.join(300)
    assert not errors, errors
    after = decisions(stack)
    delta = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in after}
    assert delta.get("load", 0) == 1 and delta.get("prefix", 0) == 2, delta  # A; then the long prompt and A on Pa
    assert computed(stack)[pb] == after_a[pb], f"{pb} computed a prompt: A did not stay on {pa}"
    assert stack.prefill_load(pa).prefix_cache_hits - hits >= 2 * 8 * 16, "A's blocks were not reused on Pa"


def decode_metric(stack, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(stack.metrics["decode-0"], timeout=30) as resp:
        text = resp.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


SPEC_PROMPTS = ["List the colours again: red, green, blue, yellow, red, green, blue, yellow, red, green,",
                "Count: one two three four five six one two three four five six one two three"]


def test_speculative_decoding_through_up_keeps_greedy_output_and_counts_its_proposals(stack, llm_f32):
    """The decode worker speculates (n-gram, given to `up`): disaggregated greedy answers are those
    of this process without speculation, and its metrics add up."""
    sampling = {"max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    prompts = [llm_f32.tokenizer.encode(p) for p in SPEC_PROMPTS]
    refs = llm_f32.generate(prompts, SamplingParams(**sampling))
    before = decode_metric(stack, "splitserve_spec_decode_num_accepted_tokens_total")
    for prompt, ref in zip(prompts, refs):
        msgs = list(stream_generate(stack.gateway, token_ids=prompt, sampling=sampling, timeout_s=120))
        ids = [t for m in msgs for t in m.token_ids]
        assert ids == ref.token_ids and "".join(m.text for m in msgs) == ref.text
        assert msgs[-1].finish_reason == "length"
        lps = [lp for m in msgs for lp in m.logprobs]  # the target model's, within the served path's last bits
        assert [lp.token_id for lp in lps] == ids
        assert all(abs(a.logprob - b.logprob) < 1e-4 and [t.token_id for t in a.top] == [t for t, _ in b.top]
                   for a, b in zip(lps, ref.logprobs))
    drafted = decode_metric(stack, "splitserve_spec_decode_num_draft_tokens_total")
    accepted = decode_metric(stack, "splitserve_spec_decode_num_accepted_tokens_total")
    per_pos = decode_metric(stack, "splitserve_spec_decode_num_accepted_tokens_per_pos_total")
    assert accepted > before and accepted <= drafted and per_pos == accepted
    assert decode_metric(stack, "splitserve_spec_decode_num_drafts_total") >= 1
