"""Sampling the turns of many episodes with one KV cache kept from turn to turn.

An episode's sequence only grows at its end (`grpo/episode_tokens.py`), so its keys and values
never change once computed: turn k+1 needs only the tokens added since turn k (the last sampled
token, which the decode loop never fed, and the environment's segment) to be run through the
model.  `EpisodeCache` keeps one transformers `DynamicCache` for the live episodes of a rollout
chunk, one row per episode:

    turn k:  extend(new tokens of each row)  -> logits of each row's first token of the turn
             decode_turn(...)                -> the turn's sampled tokens, row by row
    between turns:  keep(rows)  (episodes that ended leave the cache)

The rows share one column axis, so their new tokens are laid out in blocks:

* `extend`: the rows' new tokens right-aligned in one block as wide as the longest (left pads
  in front of the shorter ones);
* a decode step: one column for every row; a row whose turn has already stopped gets a pad.

Pads are columns with attention mask 0: no later query attends to them, and they take no
position (positions count real tokens only, `position_ids` are passed explicitly), so a row's
real tokens see exactly the keys and positions they would see in a single forward over the row
alone.  The causal mask of transformers works on column order, which within a row is the order
of its tokens.  When pads fill more than a quarter of the cache's cells, `compact` moves each
row's real columns to the right end of a narrower cache (order kept; the keys carry their rotary
positions with them), so memory follows the longest episode, not the sum of every block.

Sampling draws what `grpo.rollout.generate` draws for the same prompts: one uniform number per
running row and step, rows in order, stopped rows drawing nothing, and the same stop rules
(`sample_tokens`, stop tokens, stop sequences, min_new_tokens).  The logits differ from
`generate`'s (which re-prefills the whole sequence every turn) only by float rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from grpo.hf_compat import cache_argument
from grpo.rollout import SamplingConfig, _ends_with_stop_sequence, row_generators, sample_tokens

COMPACT_ABOVE = 0.25  # compact when this share of the cache's cells are pads


class EpisodeCache:
    """One DynamicCache for a batch of episodes, grown turn by turn; see the module docstring."""

    def __init__(self, causal_lm: torch.nn.Module, rows: int, pad_token_id: int) -> None:
        from transformers import DynamicCache

        self.causal_lm, self.pad_token_id = causal_lm, pad_token_id
        self.device = next(causal_lm.parameters()).device
        self.cache = DynamicCache(config=causal_lm.config)
        self.mask = torch.zeros((rows, 0), dtype=torch.long, device=self.device)  # [R, W] 1 on real columns
        self.length = torch.zeros(rows, dtype=torch.long, device=self.device)  # [R] real tokens of each row

    @staticmethod
    def supports(causal_lm: torch.nn.Module) -> bool:
        """Full attention in every layer (a sliding window would count the pad columns)."""
        config = causal_lm.config
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return all(layer_type == "full_attention" for layer_type in layer_types)
        return getattr(config, "sliding_window", None) is None

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def _forward(self, ids: Tensor, block_mask: Tensor) -> Tensor:
        """Run a block [R, w] of new columns; logits [R, V] of each row's last column."""
        positions = self.length.unsqueeze(1) + block_mask.cumsum(-1) - 1
        self.mask = torch.cat([self.mask, block_mask], dim=1)
        logits = self.causal_lm(input_ids=ids, attention_mask=self.mask, position_ids=positions.clamp(min=0),
                                **cache_argument(self.causal_lm, self.cache), use_cache=True,
                                logits_to_keep=1).logits[:, -1]
        self.length = self.length + block_mask.sum(-1)
        return logits

    def extend(self, new_tokens: Sequence[Sequence[int]]) -> Tensor:
        """Append each row's new tokens (at least one each); logits [R, V] after each row's last one."""
        if len(new_tokens) != self.rows:
            raise ValueError(f"extend: {len(new_tokens)} token lists for {self.rows} cache rows")
        if any(len(tokens) == 0 for tokens in new_tokens):
            raise ValueError("extend: every row needs at least one new token (its next logits come from it)")
        if self.mask.shape[1] and float((self.mask == 0).float().mean()) > COMPACT_ABOVE:
            self.compact()
        width = max(len(tokens) for tokens in new_tokens)
        ids = torch.full((self.rows, width), self.pad_token_id, dtype=torch.long)
        block_mask = torch.zeros((self.rows, width), dtype=torch.long)
        for row, tokens in enumerate(new_tokens):
            ids[row, width - len(tokens):] = torch.as_tensor(list(tokens), dtype=torch.long)
            block_mask[row, width - len(tokens):] = 1
        return self._forward(ids.to(self.device), block_mask.to(self.device))

    def step(self, tokens: Tensor, running: Tensor) -> Tensor:
        """One decode column: `tokens` [R] (read where `running` [R] bool is set, a pad elsewhere);
        logits [R, V] of the next token (meaningful for the running rows)."""
        ids = torch.where(running, tokens, torch.full_like(tokens, self.pad_token_id)).unsqueeze(1)
        return self._forward(ids, running.long().unsqueeze(1))

    def keep(self, rows: Tensor) -> None:
        """Keep only these rows (indices, in the order given)."""
        rows = rows.to(self.device)
        if rows.numel() == self.rows and bool((rows == torch.arange(self.rows, device=self.device)).all()):
            return
        self.cache.batch_select_indices(rows)
        self.mask, self.length = self.mask[rows], self.length[rows]

    def compact(self) -> None:
        """Move each row's real columns to the right end of a cache as wide as the longest row."""
        width = int(self.length.max())
        # Column c of the compacted row r is the (c - (width - length_r))-th real column of row r.
        order = torch.argsort(self.mask, dim=1, stable=True)[:, self.mask.shape[1] - width:]  # [R, width]
        for layer in self.cache.layers:
            index = order[:, None, :, None]
            layer.keys = layer.keys.gather(2, index.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            layer.values = layer.values.gather(2, index.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))
        self.mask = self.mask.gather(1, order)


def decode_turn(cache: EpisodeCache, logits: Tensor, config: SamplingConfig, *, stop_token_ids: Sequence[int],
                stop_sequences: Sequence[Sequence[int]] = (),
                generator: torch.Generator | Sequence[torch.Generator] | None = None
                ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """Sample one turn for every row of `cache`, starting from `logits` [R, V] (what `extend`
    returned): per row the sampled tokens (the stopping token included, and not fed to the cache),
    their sampling log-probs, and whether the row stopped before config.max_new_tokens.
    `generator`: one for all rows, or one per row (a row draws only from its own while it runs)."""
    rows, device = cache.rows, logits.device
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    stop_tensors = [torch.tensor(list(sequence), dtype=torch.long, device=device) for sequence in stop_sequences]
    longest_stop = max((len(sequence) for sequence in stop_tensors), default=0)
    sampled = torch.full((rows, max(config.max_new_tokens, 1)), cache.pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(sampled.shape, dtype=torch.float32, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    running = torch.ones(rows, dtype=torch.bool, device=device)
    for step in range(config.max_new_tokens):
        active = running.nonzero().squeeze(-1)
        banned = stop_ids if step < config.min_new_tokens and stop_ids.numel() else None
        tokens, token_logprobs = sample_tokens(logits[active], config, row_generators(generator, active), banned)
        sampled[active, step], logprobs[active, step] = tokens, token_logprobs
        lengths[active] += 1
        stopped = torch.isin(tokens, stop_ids) if stop_ids.numel() else torch.zeros_like(tokens, dtype=torch.bool)
        if stop_tensors and step + 1 >= config.min_new_tokens:
            window = sampled[active, max(0, step + 1 - longest_stop):step + 1]
            stopped |= _ends_with_stop_sequence(window, stop_tensors)
        finished[active[stopped]] = True
        running[active[stopped]] = False
        if step + 1 == config.max_new_tokens or not running.any():
            break
        # The rows still running feed their token; the others (stopped, now or earlier) a pad.
        logits = cache.step(sampled[:, step], running)
    return ([sampled[row, :lengths[row]].tolist() for row in range(rows)],
            [logprobs[row, :lengths[row]].tolist() for row in range(rows)], finished.tolist())

