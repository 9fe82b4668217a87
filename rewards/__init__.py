"""The paper's composite verifiable reward (our reconstruction): format, thinking length and
conditional accuracy with tool-call matching and answer similarity.

    parse(completion) -> Parsed
    score(completion, target, *, config=None, similarity=None) -> RewardResult
    score_batch(completions, targets, *, config=None, similarity=None) -> list[RewardResult]
    get_similarity(name_or_path=None, *, lexical_ok=False) -> Similarity

See rewards/score.py for the equations, rewards/parse.py for the format checks and
rewards/similarity.py for the similarity backends.
"""

import warnings

# `python -m rewards.score` runs rewards/score.py a second time as __main__ after this package
# imported it; runpy warns about that. The module holds no state, so the double import is harmless.
warnings.filterwarnings("ignore", message=r".*'rewards\.score' found in sys\.modules", category=RuntimeWarning)

from rewards.config import RewardConfig  # noqa: E402
from rewards.parse import FORMAT_CHECKS, Parsed, canonical_json, json_equal, parse  # noqa: E402
from rewards.score import RewardResult, length_reward, score, score_batch, tool_call_match  # noqa: E402
from rewards.similarity import (  # noqa: E402
    BiEncoderSimilarity,
    CrossEncoderSimilarity,
    LexicalSimilarity,
    Similarity,
    SimilarityLoadError,
    get_similarity,
    token_f1,
)

__all__ = [
    "FORMAT_CHECKS", "BiEncoderSimilarity", "CrossEncoderSimilarity", "LexicalSimilarity", "Parsed",
    "RewardConfig", "RewardResult", "Similarity", "SimilarityLoadError", "canonical_json", "get_similarity",
    "json_equal", "length_reward", "parse", "score", "score_batch", "token_f1", "tool_call_match",
]
