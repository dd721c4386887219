"""Picks the next token of every sequence in a batch from its logits, and reports logprobs.

One call samples one token per row. Rows are processed together wherever the result of a row
cannot depend on the others (temperature, top-k, top-p, min-p are row-wise); only the random draw
of a seeded row is done on its own, from its own generator, so that a seed fixes the tokens
whatever else is in the batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitserve.sampling_params import SamplingParams

# Mass within this of top_p counts as reaching it: a float32 cumulative sum of probabilities that
# add up to exactly top_p on paper (e.g. 0.5 + 0.3 for top_p=0.8) may land an ulp either side.
_TOP_P_TOLERANCE = 1e-6


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one sampled token, from log_softmax of the raw logits (before temperature etc.)."""

    token_id: int
    logprob: float
    rank: int  # 1 + number of tokens with a strictly larger logprob (1 = most likely)
    top: list[tuple[int, float]]  # the n most likely (token_id, logprob), most likely first; [] when n == 0


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # [B] the sampled token of each row
    logprobs: list[TokenLogprobs | None]  # [B] None where the row's params.logprobs is None


@dataclass(frozen=True)
class Verified:
    """What a sequence emits after its proposals were scored (Sampler.verify)."""

    token_ids: list[int]  # the accepted proposals, then one token of the model's own
    logprobs: list[TokenLogprobs | None]  # [len(token_ids)]
    num_accepted: int  # len(token_ids) - 1


class Sampler:
    """Samples one token per row of a batch of logits.

    Invariants:
    - a row whose request has a seed draws only from its own generator, exactly `vocab`
      exponentials per call, so its tokens depend only on its logits, its params and its
      generator's state (not on row order, batch size or the other rows);
    - greedy rows (temperature 0 or top_k 1) take torch.argmax (ties: the lowest id);
    - logprobs come from log_softmax of the raw logits in float32.
    Unseeded rows draw from one generator per device owned by this Sampler.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed  # seeds the shared generators (one per device); None: from the OS
        self._shared: dict[torch.device, torch.Generator] = {}

    def __call__(
        self,
        logits: torch.Tensor,  # [B, vocab] any float dtype
        params: Sequence[SamplingParams],  # [B]
        generators: Sequence[torch.Generator | None],  # [B] the row's own generator, or None (shared)
    ) -> SamplerOutput:
        if logits.dim() != 2 or len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
            raise ValueError(
                f"logits must be [B, vocab] with B == len(params) == len(generators), got "
                f"{tuple(logits.shape)}, {len(params)} params, {len(generators)} generators"
            )
        batch = logits.shape[0]
        logits = logits.float()  # [B, vocab] float32
        greedy = [p.greedy for p in params]
        want_logprobs = [p.logprobs is not None for p in params]
        if all(greedy) and not any(want_logprobs):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * batch)

        token_ids = torch.empty(batch, dtype=torch.long, device=logits.device)  # [B]
        greedy_rows = [i for i in range(batch) if greedy[i]]
        random_rows = [i for i in range(batch) if not greedy[i]]
        # a kind that holds every row reads the logits as they are (an indexed read copies them all)
        if greedy_rows:
            rows = torch.tensor(greedy_rows, device=logits.device)
            token_ids[rows] = (logits if len(greedy_rows) == batch else logits[rows]).argmax(dim=-1)
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            probs = self._probs(logits if len(random_rows) == batch else logits[rows],
                                [params[i] for i in random_rows])
            token_ids[rows] = self._draw(probs, [generators[i] for i in random_rows])
        logprobs = self._logprobs(logits, token_ids, params) if any(want_logprobs) else [None] * batch
        return SamplerOutput(token_ids.tolist(), logprobs)

    def verify(
        self,
        logits: torch.Tensor,  # [k+1, vocab]: row j scores the token after proposal j-1 (row 0: after the last token)
        params: SamplingParams,
        generator: torch.Generator | None,
        proposals: list[int],  # [k]
        proposal_probs: torch.Tensor | None,  # [k, vocab] the proposer's distributions; None: certain proposals
    ) -> Verified:
        """The tokens a sequence emits after a step that scored its k proposals: the accepted
        proposals, then one token drawn by the model (a correction, or the next token when all were
        accepted).

        Greedy: a proposal is accepted while it equals the argmax, so the tokens are exactly those of
        decoding without proposals. Sampled: proposal x at row j is accepted with probability
        min(1, p_j(x) / q_j(x)) (q_j: the proposer's distribution, one-hot for certain proposals);
        the first rejection draws from max(0, p_j - q_j) renormalized, which makes every emitted
        token distributed exactly as the model's p (speculative sampling). p is the distribution
        `__call__` samples from (temperature, top-k, top-p, min-p). A seeded request draws only from
        its generator: reproducible run to run.
        """
        k = len(proposals)
        logits = logits.float()
        if params.greedy:
            targets = logits.argmax(dim=-1).tolist()  # [k+1]
            accepted = next((j for j in range(k) if proposals[j] != targets[j]), k)
            tokens = targets[: accepted + 1]
        else:
            tokens = self._speculative_sample(logits, params, generator, proposals, proposal_probs)
            accepted = len(tokens) - 1
        lps: list[TokenLogprobs | None] = [None] * len(tokens)
        if params.logprobs is not None:
            ids = torch.tensor(tokens, dtype=torch.long, device=logits.device)
            lps = self._logprobs(logits[: len(tokens)], ids, [params] * len(tokens))
        return Verified(tokens, lps, accepted)

    def distribution(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """[R, vocab] the normalized distributions `params` samples from, for rows of logits."""
        probs = self._probs(logits.float(), [params] * logits.shape[0])
        return probs / probs.sum(dim=-1, keepdim=True)

    def draw(self, probs: torch.Tensor, generator: torch.Generator | None) -> int:
        """One token from a [vocab] distribution, by the request's generator (None: the shared one)."""
        gen = generator if generator is not None else self._shared_generator(probs.device)
        return int(self._draw(probs[None], [gen])[0])

    def _speculative_sample(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                            proposals: list[int], proposal_probs: torch.Tensor | None) -> list[int]:
        k = len(proposals)
        probs = self.distribution(logits, params)  # [k+1, vocab]
        gen = generator if generator is not None else self._shared_generator(logits.device)
        uniforms = torch.rand(k, generator=gen, device=logits.device).tolist()  # one draw per proposal
        rows, ids = torch.arange(k, device=logits.device), torch.tensor(proposals, device=logits.device)
        p_x = probs[rows, ids].tolist()  # [k] one copy to the host for all the acceptance tests
        q_x = [1.0] * k if proposal_probs is None else proposal_probs[rows, ids].tolist()
        tokens: list[int] = []
        for j, x in enumerate(proposals):
            if uniforms[j] * q_x[j] < p_x[j]:  # accept with probability min(1, p/q)
                tokens.append(x)
                continue
            if proposal_probs is None:
                residual = probs[j].clone()
                residual[x] = 0.0
            else:
                residual = (probs[j] - proposal_probs[j].to(probs.dtype)).clamp_min_(0.0)
            if not float(residual.sum()) > 0.0:  # p == q: a rejection cannot happen, but stay defined
                residual = probs[j]
            tokens.append(self.draw(residual, gen))
            return tokens
        tokens.append(self.draw(probs[-1], gen))
        return tokens

    def _probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """[R, vocab] float32 probabilities after temperature, top-k, top-p and min-p (not renormalized
        after min-p: the draw does not need it)."""
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)  # [R] float32
        logits = logits / temperature[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            logits = _apply_top_k_top_p(logits, params)
        probs = logits.softmax(dim=-1)  # [R, vocab]
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)  # [R]
            threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # [R, 1]
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """[R] int64: one token per row by the exponential race argmax(probs / q), q ~ Exp(1), which
        picks token j with probability probs[j] / sum(probs) (the Gumbel-max trick)."""
        out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        tiny = torch.finfo(torch.float32).tiny  # q == 0 would give 0/0 = nan for a masked token
        shared_rows = [r for r, g in enumerate(generators) if g is None]
        if shared_rows:
            rows = torch.tensor(shared_rows, device=probs.device)
            sub = probs[rows]
            q = torch.empty_like(sub).exponential_(generator=self._shared_generator(probs.device))
            out[rows] = (sub / q.clamp_min_(tiny)).argmax(dim=-1)
        for r, g in enumerate(generators):
            if g is not None:  # its own draw, of a fixed size: independent of the rest of the batch
                q = torch.empty_like(probs[r]).exponential_(generator=g)  # [vocab]
                out[r] = (probs[r] / q.clamp_min_(tiny)).argmax()
        return out

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._shared.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._shared[device] = gen
        return gen

    @staticmethod
    def _logprobs(
        logits: torch.Tensor,  # [B, vocab] float32, raw
        token_ids: torch.Tensor,  # [B] int64
        params: Sequence[SamplingParams],
    ) -> list[TokenLogprobs | None]:
        rows_list = [i for i, p in enumerate(params) if p.logprobs is not None]
        rows = torch.tensor(rows_list, device=logits.device)
        logprobs = torch.log_softmax(logits[rows], dim=-1)  # [L, vocab]
        sampled = logprobs.gather(1, token_ids[rows][:, None])  # [L, 1]
        ranks = (logprobs > sampled).sum(dim=-1) + 1  # [L]
        n_max = max(params[i].logprobs for i in rows_list)
        top_vals, top_ids = logprobs.topk(n_max, dim=-1) if n_max else (None, None)  # [L, n_max]
        # One device-to-host copy of everything.
        sampled_l, ranks_l = sampled[:, 0].tolist(), ranks.tolist()
        top_vals_l = top_vals.tolist() if n_max else None
        top_ids_l = top_ids.tolist() if n_max else None
        ids_l = token_ids[rows].tolist()
        out: list[TokenLogprobs | None] = [None] * len(params)
        for j, i in enumerate(rows_list):
            n = params[i].logprobs
            top = list(zip(top_ids_l[j][:n], top_vals_l[j][:n])) if n else []
            out[i] = TokenLogprobs(ids_l[j], sampled_l[j], ranks_l[j], top)
        return out


def _apply_top_k_top_p(
    logits: torch.Tensor,  # [R, vocab] float32, after temperature
    params: list[SamplingParams],
) -> torch.Tensor:  # [R, vocab] float32, dropped tokens set to -inf
    """Top-k, then top-p on what top-k kept, for all rows with one sort; rows with both off come back
    bit-identical (so a row's result never depends on whether another row needed the sort)."""
    device, vocab = logits.device, logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, vocab] each
    position = torch.arange(vocab, device=device)[None, :]  # [1, vocab]
    k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)  # [R]
    drop = position >= k[:, None]  # [R, vocab] bool
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # Keep token j (in sorted order) while the mass strictly before it is below top_p; rows with
    # top_p == 1 keep everything (their float cumulative sum may end a hair below 1).
    top_p = [p.top_p - _TOP_P_TOLERANCE if p.top_p < 1.0 else float("inf") for p in params]
    top_p = torch.tensor(top_p, device=device)  # [R] float32
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [R, vocab]
    drop = mass_before >= top_p[:, None]
    drop[:, 0] = False  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
