"""Engine behaviour on the default model: prefix caching, preemption, seeds, stops, validation."""
from __future__ import annotations

import dataclasses

import pytest

from splitserve import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def text_ids(llm_f32):
    text = (
        "Once upon a time, in a small village at the edge of a great forest, there lived an old "
        "clockmaker who repaired every clock in the valley and never asked for payment. "
        "Children gathered at his window each morning to watch the gears turn."
    )
    ids = llm_f32.tokenizer.encode(text)
    assert len(ids) >= 40
    return ids


def test_prefix_cache_computes_only_the_suffix(llm_f32, text_ids):
    llm = llm_f32.with_config(kv_cache_memory_gb=0.05)
    bm, stats = llm.engine.block_manager, llm.engine.stats
    first = text_ids[:40]  # 2 full blocks of 16 and 8 more tokens
    second = text_ids[:32] + llm_f32.tokenizer.encode(" A different ending follows here.")
    llm.generate([first], GREEDY)
    before_queries, before_hits, before_prompt = bm.stats.queries, bm.stats.hits, stats.prompt_tokens

    (out,) = llm.generate([second], GREEDY)

    assert out.num_cached_tokens == 32
    assert bm.stats.hits - before_hits == 32
    assert bm.stats.queries - before_queries == len(second)
    assert stats.prompt_tokens - before_prompt == len(second) - 32  # only the suffix was computed
    (reference,) = llm_f32.with_config(kv_cache_memory_gb=0.05, enable_prefix_caching=False).generate([second], GREEDY)
    assert out.token_ids == reference.token_ids
    assert out.text == reference.text


def test_fully_cached_prompt_still_computes_last_token(llm_f32, text_ids):
    llm = llm_f32.with_config(kv_cache_memory_gb=0.05)
    prompt = text_ids[:32]  # exactly two blocks
    (a,) = llm.generate([prompt], GREEDY)
    (b,) = llm.generate([prompt], GREEDY)
    # One whole block, then 15 tokens of the second copied from the cached one: only the last
    # token is computed, for its logits.
    assert b.num_cached_tokens == 31
    assert a.token_ids == b.token_ids


def test_prompt_diverging_inside_a_block_reuses_its_shared_tokens(llm_f32, text_ids):
    llm = llm_f32.with_config(kv_cache_memory_gb=0.05)
    stats = llm.engine.stats
    first = text_ids[:40]  # blocks [0, 16) [16, 32) cached, 8 tokens more
    second = text_ids[:27] + llm_f32.tokenizer.encode(" and then something else entirely.")
    assert second[27] != first[27]
    llm.generate([first], GREEDY)
    before = stats.prompt_tokens
    (out,) = llm.generate([second], GREEDY)
    assert out.num_cached_tokens == 27  # block 0 whole, 11 tokens of block 1 copied
    assert stats.prompt_tokens - before == len(second) - 27
    (reference,) = llm_f32.with_config(kv_cache_memory_gb=0.05, enable_prefix_caching=False).generate([second], GREEDY)
    assert out.token_ids == reference.token_ids


def test_preemption_with_small_pool_gives_identical_outputs(llm_f32, text_ids):
    prompts = [text_ids[i : i + 20] for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    big = llm_f32.with_config(kv_cache_memory_gb=0.1)
    reference = big.generate(prompts, params)
    # 16 sequences of 50 tokens need 4 blocks each (64); the pool holds 20.
    block_gb = big.engine.kv_cache.bytes_per_block / 2**30
    small = llm_f32.with_config(kv_cache_memory_gb=20.5 * block_gb)
    assert small.engine.block_manager.num_blocks == 20
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
    assert all(len(o.token_ids) == 30 and o.finish_reason == "length" for o in outs)
    assert small.engine.block_manager.usage == 0.0  # everything freed


def test_continuous_batching_respects_max_num_seqs(llm_f32, text_ids):
    llm = llm_f32.with_config(kv_cache_memory_gb=0.05, max_num_seqs=3, max_num_batched_tokens=64)
    prompts = [text_ids[i : i + 10 + i] for i in range(7)]
    lengths = [3, 9, 5, 2, 7, 4, 6]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == lengths
    assert llm.engine.stats.max_batch_size == 3
    solo = [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    assert [o.token_ids for o in outs] == solo


def test_chunked_prefill_matches_unchunked(llm_f32, text_ids):
    chunked = llm_f32.with_config(kv_cache_memory_gb=0.05, max_num_batched_tokens=16, enable_prefix_caching=False)
    (a,) = chunked.generate([text_ids], GREEDY)
    (b,) = llm_f32.with_config(kv_cache_memory_gb=0.05, enable_prefix_caching=False).generate([text_ids], GREEDY)
    assert a.token_ids == b.token_ids


def test_decode_rows_of_very_different_lengths_match_each_alone(llm_f32, text_ids):
    """One long context among short ones: the CPU decode attention splits the batch into length
    groups (each padded to its own longest); every output equals that prompt generated alone."""
    from splitserve.model.attention import plan_decode_groups

    long_prompt = (text_ids * 20)[:640]
    short = [text_ids[:5], text_ids[3:9], text_ids[7:12], text_ids[1:4]]
    prompts = [short[0], long_prompt, *short[1:]]
    blocks = [-(-len(p) // 16) for p in prompts]
    assert len(plan_decode_groups(blocks)) >= 2  # the case this test is about
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = llm_f32.with_config(enable_prefix_caching=False)
    together = llm.generate(prompts, params)
    alone = [llm.generate([p], params)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_seeded_sampling_is_independent_of_batch(llm_f32, text_ids):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    other = SamplingParams(temperature=1.2, max_tokens=10, ignore_eos=True)
    prompt = text_ids[:20]
    (alone,) = llm_f32.generate([prompt], seeded)
    batch = llm_f32.generate(
        [text_ids[5:30], prompt, text_ids[:7], text_ids[3:40]], [other, seeded, other, GREEDY]
    )
    assert batch[1].token_ids == alone.token_ids
    (again,) = llm_f32.generate([prompt], seeded)
    assert again.token_ids == alone.token_ids
    different = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=4321, max_tokens=16, ignore_eos=True)
    assert llm_f32.generate([prompt], different)[0].token_ids != alone.token_ids


def test_stop_string_cuts_text_exactly(llm_f32, text_ids):
    prompt = text_ids[:24]
    (free,) = llm_f32.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    text = free.text
    assert len(text) > 12
    stop = text[6:10]  # a string the model is known to produce, likely spanning tokens
    (cut,) = llm_f32.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    (kept,) = llm_f32.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    )
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_and_eos(llm_f32):
    msgs = [{"role": "user", "content": "Say hello."}]
    (out,) = llm_f32.chat(msgs, SamplingParams(temperature=0, max_tokens=64))
    eos = next(iter(llm_f32.tokenizer.eos_token_ids))
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos
    assert "<|im_end|>" not in out.text
    target = out.token_ids[2]
    (stopped,) = llm_f32.chat(msgs, SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[target]))
    assert stopped.token_ids == out.token_ids[:3]
    assert stopped.stop_reason == target


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-5), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(logprobs=-1), "logprobs"),
    ],
)
def test_bad_sampling_params_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_bad_prompts_name_the_problem(llm_f32):
    with pytest.raises(ValueError, match="empty"):
        llm_f32.generate([""])
    with pytest.raises(ValueError, match="empty"):
        llm_f32.generate([[]])
    with pytest.raises(ValueError, match="max_model_len"):
        llm_f32.generate([[5] * llm_f32.engine.max_model_len])
    with pytest.raises(ValueError, match="vocabulary"):
        llm_f32.generate([[1, 2, 10**9]])
    with pytest.raises(ValueError, match="sampling_params"):
        llm_f32.generate(["a", "b"], [GREEDY])
    # and the engine keeps serving
    assert llm_f32.generate(["Hello"], GREEDY)[0].finish_reason == "length"
    assert not llm_f32.engine.has_unfinished()


def test_abort_frees_blocks(llm_f32, text_ids):
    llm = llm_f32.with_config(kv_cache_memory_gb=0.05)
    engine = llm.engine
    engine.add_request("r1", text_ids, SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    engine.step()
    assert engine.block_manager.usage > 0
    assert engine.abort_request("r1")
    assert engine.block_manager.usage == 0.0
    assert not engine.has_unfinished()
    assert not engine.abort_request("r1")  # idempotent


def test_import_stops_at_a_damaged_block_and_the_rest_is_recomputed(llm_f32):
    """Blocks shipped from another engine, the second one damaged in transit: the importer keeps the
    first, writes nothing of the damaged one, and the request's output is unchanged (recomputed)."""

    source = llm_f32.with_config(kv_cache_memory_gb=0.05)
    target = llm_f32.with_config(kv_cache_memory_gb=0.05)
    ids = llm_f32.tokenizer.encode("Blocks travel between engines: " + "one two three four five six " * 8)
    assert len(ids) >= 48
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    (ref,) = llm_f32.generate([ids], params)
    source.engine.add_request("src", ids, dataclasses.replace(params, max_tokens=1), export_blocks=True)
    exported = []
    while source.engine.has_unfinished():
        for out in source.engine.step():
            exported += out.exported_blocks
    assert len(exported) >= 3
    header, payload = exported[1]
    damaged = bytearray(payload)
    damaged[100] ^= 0xFF
    blocks = [exported[0], (header, bytes(damaged)), *exported[2:]]
    free_before = target.engine.block_manager.num_free_blocks
    assert target.engine.import_blocks(blocks) == 1
    hashes = [h.block_hash for h, _ in exported]
    assert target.engine.num_local_prefix_blocks(hashes) == 1  # the damaged one (and after) not cached
    assert target.engine.block_manager.num_free_blocks == free_before  # imported blocks are free, cached
    (out,) = target.generate([ids], params)
    assert out.token_ids == ref.token_ids
    assert out.num_cached_tokens == 16  # the one good block served the prefix; the rest was computed


def test_export_skips_the_blocks_the_kvstore_holds(llm_f32):
    """export_skip (what the prefill worker's Contains call found stored) leaves those blocks out
    of exported_blocks, while prompt_block_hashes still names every full prompt block, in order."""
    from splitserve.engine.hashing import block_hashes

    llm = llm_f32.with_config(kv_cache_memory_gb=0.05)
    ids = llm.tokenizer.encode("Only the missing blocks leave the engine: " + "alpha beta gamma delta " * 10)
    hashes = block_hashes(ids, 16, llm.engine.namespace(None))
    assert len(hashes) >= 3
    params = SamplingParams(temperature=0, max_tokens=1)
    outs = []
    for rid, skip in (("all", ()), ("less", frozenset(hashes[:2]))):
        llm.engine.add_request(rid, ids, params, export_blocks=True, export_skip=skip)
        while llm.engine.has_unfinished():
            outs += [o for o in llm.engine.step() if o.finished]
    full, less = outs
    assert full.prompt_block_hashes == less.prompt_block_hashes == hashes
    assert [h.block_hash for h, _ in full.exported_blocks] == hashes
    assert [h.block_hash for h, _ in less.exported_blocks] == hashes[2:]
    assert [p for _, p in less.exported_blocks] == [p for _, p in full.exported_blocks[2:]]


def test_engine_loop_pins_its_team_one_thread_per_core_and_answers_the_same(llm_f32):
    """pin_cores (a worker's --pin-threads auto): the loop thread's OpenMP team, thread i on the i-th
    core, pinned before the first step; the greedy tokens are those of the unpinned engine."""
    import os

    from splitserve.config.cpus import available_cpus
    from splitserve.engine.engine_loop import EngineLoop

    cores = available_cpus()[:2][::-1]  # thread 0 (the loop thread) on the last core
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = [1, 17, 230, 4000, 5, 6, 7]
    ref = llm_f32.generate([prompt], params)[0].token_ids
    before = os.sched_getaffinity(0)
    loop = EngineLoop(llm_f32.engine, num_threads=len(cores), pin_cores=cores).start()
    try:
        ids = [t for out in loop.add_request("pinned", prompt, params) for t in out.new_token_ids]
        assert ids == ref
        tids = loop.pinned_threads
        assert len(tids) == len(cores) and tids[0] == loop._thread.native_id, tids
        assert [os.sched_getaffinity(tid) for tid in tids] == [{c} for c in cores]
    finally:
        loop.stop()
    assert os.sched_getaffinity(0) == before  # the caller's thread was not touched


def test_engine_loop_refuses_past_max_pending_at_once_and_frees_on_abort(llm_f32):
    """The worker's bounded queue: past max_pending a request is refused at once (the servers turn
    QueueFullError into RESOURCE_EXHAUSTED); aborting the held ones frees every block."""
    import time

    from splitserve.engine.engine_loop import EngineLoop, QueueFullError

    llm = llm_f32.with_config(kv_cache_memory_gb=0.05)
    loop = EngineLoop(llm.engine, max_pending=2).start()
    try:
        free = llm.engine.block_manager.num_free_blocks
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        held = [loop.add_request(f"r{i}", [1, 2, 3, 4, 5], params) for i in range(2)]
        t0 = time.monotonic()
        with pytest.raises(QueueFullError, match="full"):
            loop.add_request("r2", [1, 2, 3], params)
        assert time.monotonic() - t0 < 0.5
        for stream in held:
            stream.abort()
        deadline = time.monotonic() + 10
        while (loop.num_pending or llm.engine.block_manager.num_free_blocks != free) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop.num_pending == 0 and llm.engine.block_manager.num_free_blocks == free
        out = loop.add_request("r3", [1, 2, 3], SamplingParams(temperature=0, max_tokens=2))  # room again
        assert sum(len(o.new_token_ids) for o in out) == 2
    finally:
        loop.stop()


def test_a_pinned_export_is_the_copied_one_left_in_its_pages(llm_f32):
    """pin_export: the prefill's blocks stay in their pages, pinned past the sequence's end, and
    encode (on any thread) to exactly the headers and bytes a copied export gives; release gives
    the pages back. Through an EngineLoop the release runs on the loop thread, also for an export
    nobody released (its output dropped: released when collected)."""
    import gc
    import threading
    import time

    from splitserve.engine.engine_loop import EngineLoop

    llm = llm_f32.with_config(kv_cache_memory_gb=0.05)
    bm = llm.engine.block_manager
    ids = llm.tokenizer.encode("Pinned pages leave by the kvstore: " + "north south east west " * 10)
    params = SamplingParams(temperature=0, max_tokens=1)
    outs = {}
    for rid, pin in (("copied", False), ("pinned", True)):
        llm.engine.add_request(rid, ids, params, export_blocks=True, pin_export=pin)
        while llm.engine.has_unfinished():
            outs.update((o.request_id, o) for o in llm.engine.step() if o.finished)
    copied, pinned = outs["copied"], outs["pinned"]
    assert copied.pinned_export is None and pinned.exported_blocks == []
    n = len(ids) // 16
    assert len(pinned.pinned_export) == n == len(copied.exported_blocks) and bm.num_pinned_blocks == n
    free = bm.num_free_blocks
    got = []
    reader = threading.Thread(target=lambda: got.extend(pinned.pinned_export.blocks()))
    reader.start()
    reader.join()
    assert [h for h, _ in got] == [h for h, _ in copied.exported_blocks]
    assert [p.tobytes() for _, p in got] == [p for _, p in copied.exported_blocks]
    pinned.pinned_export.release()
    pinned.pinned_export.release()  # once only
    assert bm.num_pinned_blocks == 0 and bm.num_free_blocks == free + n
    with pytest.raises(RuntimeError, match="released"):
        pinned.pinned_export.blocks()

    loop = EngineLoop(llm.engine).start()
    try:
        for rid in ("loop-released", "loop-dropped"):
            stream = loop.add_request(rid, ids, params, export_blocks=True, pin_export=True)
            out = stream.get(timeout=60)
            assert loop.call(lambda e: e.block_manager.num_pinned_blocks).result(10) == n
            if rid == "loop-released":
                releaser = threading.Thread(target=out.pinned_export.release)
                releaser.start()
                releaser.join()
            del out, stream
            gc.collect()
            deadline = time.monotonic() + 10  # the loop thread may drop its own reference a moment later
            while loop.call(lambda e: e.block_manager.num_pinned_blocks).result(10) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert loop.call(lambda e: e.block_manager.num_pinned_blocks).result(10) == 0
        # A caller that gives up (its stream aborted) with the output queued, or arriving after:
        # nobody reads it, and its pages go back at once (not when a cycle collection finds it).
        stream = loop.add_request("given-up", ids, params, export_blocks=True, pin_export=True)
        deadline = time.monotonic() + 60
        while stream._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.005)
        gc.disable()
        try:
            stream.abort()
            assert loop.call(lambda e: e.block_manager.num_pinned_blocks).result(10) == 0
            other = loop.add_request("late", ids, params, export_blocks=True, pin_export=True)
            out = other.get(timeout=60)
            other.abort()  # finished already: the caller owns the export ...
            assert loop.call(lambda e: e.block_manager.num_pinned_blocks).result(10) == n
            kept = out.pinned_export  # alive: only the drop can release it
            stream._put(out)  # ... handed to an aborted stream: dropped, released
            assert loop.call(lambda e: e.block_manager.num_pinned_blocks).result(10) == 0
            del kept
        finally:
            gc.enable()
    finally:
        loop.stop()


def test_the_loop_trims_the_heap_after_a_long_prefill_step_not_after_decode_steps(llm_f32, monkeypatch):
    """A step of TRIM_AFTER_PROMPT_TOKENS prompt tokens or more hands its freed memory back at once
    (the decode steps that follow would touch its holes page by page); decode steps do not trim
    (one takes a few ms), and a loop gone idle trims as before."""
    import time

    from splitserve import heap
    from splitserve.engine import engine_loop

    trims = []
    llm = llm_f32.with_config(kv_cache_memory_gb=0.05, max_num_batched_tokens=256)
    monkeypatch.setattr(heap, "trim", lambda: trims.append(llm.engine.stats.prompt_tokens) or True)
    loop = engine_loop.EngineLoop(llm.engine).start()
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        out = list(loop.add_request("short", list(range(100, 150)), params))  # 50 prompt tokens
        assert sum(len(o.new_token_ids) for o in out) == 12
        assert trims in ([], [50])  # no step reached the bound (an idle half second trims: a slow machine)
        long = list(range(1000, 1000 + 2 * engine_loop.TRIM_AFTER_PROMPT_TOKENS))  # shares no block
        out = list(loop.add_request("long", long, params))  # two steps of 256 prompt tokens, 11 decodes
        assert sum(len(o.new_token_ids) for o in out) == 12
        after = [t for t in trims if t > 50]
        assert after[:2] == [50 + 256, 50 + 512]  # right after each long step, none after its decodes
        deadline = time.monotonic() + 5
        while len([t for t in trims if t > 50]) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [t for t in trims if t > 50] == [306, 562, 562]  # and once more when idle
    finally:
        loop.stop()
