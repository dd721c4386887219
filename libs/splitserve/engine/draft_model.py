"""The draft model of speculative decoding (method "draft_model"): a smaller model with the target's
vocabulary proposes each sequence's next k tokens, on its own paged KV cache.

For every target sequence that proposes, the draft keeps a shadow `Sequence` (same id) holding the
tokens its cache has seen. Before proposing, the shadow is brought in line with the target's
tokens: what the target emitted since (accepted proposals and the model's own token) replaces the
shadow's proposals, and only the K/V past the tokens both agree on are recomputed. The first
proposal of a sequence computes its whole prompt on the draft (on a decode worker too: nothing of
the draft travels between processes). Then k - 1 more one-token steps, batched over the sequences,
complete the proposals. Greedy requests take the draft's argmax; sampled ones draw from the draft's
own distribution (the target's temperature, top-k, top-p, min-p) and hand that distribution to the
verification, which keeps the target's distribution exact either way.
"""
from __future__ import annotations

import logging

import torch

from splitserve.config.speculative import SpeculativeConfig
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.kv_cache import KVCache
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.scheduler import ScheduledSeq
from splitserve.engine.sequence import Sequence
from splitserve.model.loader import TORCH_DTYPES, load_model
from splitserve.model.paths import resolve_model_path

logger = logging.getLogger(__name__)

CATCH_UP_CHUNK = 512  # most tokens of one shadow computed in one draft call (a long prompt is chunked)


class DraftModel:
    def __init__(self, config: SpeculativeConfig, target) -> None:
        """`target`: the LLMEngine it proposes for (its dtype, device, vocabulary and KV budget)."""
        mc = target.config.model
        try:
            path = resolve_model_path(config.model)
            if path.resolve() == target.model_path.resolve():
                self.model = target.model  # the target as its own draft: no second copy of the weights
            else:
                self.model, _ = load_model(config.model, mc.dtype, mc.device, mc.max_model_len, mc.quantization)
                self.model.set_quantized_matmul(target.quantized_matmul)
        except (OSError, ValueError) as exc:  # a missing or unreadable draft names the key it came from
            raise ValueError(f"speculative_config.model: {exc}") from exc
        args, target_args = self.model.args, target.model.args
        if args.vocab_size != target_args.vocab_size:
            raise ValueError(f"speculative_config.model: the draft's vocabulary has {args.vocab_size} tokens, "
                             f"the model's {target_args.vocab_size}: a draft must share the model's tokenizer")
        block_size = target.config.cache.block_size
        # As many token slots as the target's pool: every running sequence can keep its shadow.
        num_blocks = target.kv_cache.num_blocks
        self.kv_cache = KVCache(args.num_layers, args.num_kv_heads, args.head_dim, block_size, num_blocks,
                                TORCH_DTYPES[mc.dtype], mc.device)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, self.kv_cache, self.block_manager, target.config.triton_enabled)
        self.sampler = target.sampler
        self.block_size = block_size
        self._shadows: dict[str, Sequence] = {}
        self._synced: dict[str, int] = {}  # the target's length at the last sync: tokens before it agree
        logger.info("draft model %s: %d layers, %d blocks of KV (%.1f MiB)", path.name, args.num_layers,
                    num_blocks, num_blocks * self.kv_cache.bytes_per_block / 2**20)

    def forget(self, seq_id: str) -> None:
        self._synced.pop(seq_id, None)
        if self._shadows.pop(seq_id, None) is not None:
            self.block_manager.free(seq_id)

    def _sync(self, seq: Sequence) -> Sequence:
        """The shadow of `seq`, its tokens now the target's and its computed count cut back to the
        tokens both still agree on."""
        shadow = self._shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Sequence(seq.seq_id, seq.prompt_token_ids, seq.params, self.block_size, seq.hash_namespace,
                              seq.generator)  # its hashes are never used: no prefix caching here
            self._shadows[seq.seq_id] = shadow
        # The target only appends, so only what came after the last sync (its accepted proposals
        # and its own token, against the shadow's proposals) is compared and copied: O(k), not O(L).
        agree = self._synced.get(seq.seq_id, 0)
        for a, b in zip(shadow.token_ids[agree:], seq.token_ids[agree:]):
            if a != b:
                break
            agree += 1
        shadow.token_ids[agree:] = seq.token_ids[agree:]
        self._synced[seq.seq_id] = len(seq.token_ids)
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, agree, len(seq.token_ids) - 1)
        return shadow

    @torch.inference_mode()
    def propose(self, wanted: list[tuple[Sequence, int]]) -> None:
        """Sets the proposals (and, for sampled requests, their distributions) of each (sequence, k)."""
        active: list[tuple[Sequence, Sequence, int]] = []
        for seq, k in wanted:
            shadow = self._sync(seq)
            # room for the catch-up and k - 1 proposals computed after it
            if not self.block_manager.allocate_slots(seq.seq_id, seq.num_tokens + k - 1):
                self.forget(seq.seq_id)  # the draft's pool is full: no proposal this time
                continue
            while shadow.num_tokens - shadow.num_computed_tokens > CATCH_UP_CHUNK:  # a long prompt, in chunks
                self.runner.execute([ScheduledSeq(shadow, CATCH_UP_CHUNK)])
                shadow.num_computed_tokens += CATCH_UP_CHUNK
            active.append((seq, shadow, k))
        drafts: dict[str, list[int]] = {seq.seq_id: [] for seq, _, _ in active}
        probs: dict[str, list[torch.Tensor]] = {seq.seq_id: [] for seq, _, _ in active}
        while active:
            batch = sorted(active, key=lambda a: a[1].num_tokens - a[1].num_computed_tokens != 1)  # decodes first
            logits, sampled, _ = self.runner.execute(
                [ScheduledSeq(sh, sh.num_tokens - sh.num_computed_tokens) for _, sh, _ in batch])
            next_active = []
            for row, i in enumerate(sampled):
                seq, shadow, k = batch[i]
                shadow.num_computed_tokens = shadow.num_tokens
                token, p = self._pick(logits[row], seq)
                drafts[seq.seq_id].append(token)
                if p is not None:
                    probs[seq.seq_id].append(p)
                shadow.token_ids.append(token)
                if len(drafts[seq.seq_id]) < k:
                    next_active.append((seq, shadow, k))
            active = next_active
        for seq, _ in wanted:
            if seq.seq_id in drafts:
                seq.draft_token_ids = drafts[seq.seq_id]
                seq.draft_probs = torch.stack(probs[seq.seq_id]) if probs[seq.seq_id] else None

    def _pick(self, logits: torch.Tensor, seq: Sequence) -> tuple[int, torch.Tensor | None]:
        """The draft's next token for `seq`: its argmax for a greedy request, else a draw from its
        distribution (returned, for the verification's acceptance ratio)."""
        if seq.params.greedy:
            return int(logits.argmax()), None
        p = self.sampler.distribution(logits[None], seq.params)[0]
        return self.sampler.draw(p, seq.generator), p
