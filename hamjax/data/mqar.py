"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023, arXiv 2312.04927), NumPy only.

A row of T tokens over a vocabulary of V:
- positions 0 .. 2N-1: N pairs (key, value); the keys are distinct and drawn from [1, V/2), the values
  distinct and drawn from [V/2, V) (token 0 is never a key, as in Zoology);
- after them, S = (T - 2N) // 2 two-token slots: slot g starts at position 2N + 2g. Each key is
  queried once, alone at the start of its own slot, the slot drawn with probability proportional to
  (g + 1) ** (power_a - 1); keys take their slots in pair order by successive sampling without
  replacement (as numpy's choice(replace=False, p) does in Zoology), so early pairs tend to be
  queried first;
- every other position holds a uniform random token that is not one of the row's keys (Zoology draws
  from the whole vocabulary), so a key's only occurrence after the pairs is its query.

Targets follow the next-token convention of the language model: targets[t] is the token to predict
after reading inputs[t]. At a query it is the key's value (the value itself is not in the inputs);
every other target is IGNORE_INDEX, so each row has exactly N scored positions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hamjax.data.recall import IGNORE_INDEX
from hamjax.ops.validation import check_nonnegative_int, check_positive_float, check_positive_int


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """One MQAR setting; Zoology sweeps (seq_len, num_pairs) over (64, 4), (128, 8), (256, 16), (512, 64)."""

    vocab_size: int = 8192
    seq_len: int = 256
    num_pairs: int = 16
    power_a: float = 0.01  # 1.0 places the queries uniformly over the slots; smaller favours short gaps

    def __post_init__(self):
        check_positive_int("vocab_size", self.vocab_size)
        check_positive_int("seq_len", self.seq_len)
        check_positive_int("num_pairs", self.num_pairs)
        check_positive_float("power_a", self.power_a)
        if self.vocab_size % 2:
            raise ValueError(f"vocab_size must be even (keys and values take one half each), got {self.vocab_size}")
        if self.num_pairs > self.num_keys:
            raise ValueError(
                f"num_pairs={self.num_pairs} exceeds the {self.num_keys} distinct keys [1, {self.vocab_size // 2}) "
                f"of vocab_size={self.vocab_size}"
            )
        if self.seq_len < 4 * self.num_pairs:
            raise ValueError(
                f"seq_len={self.seq_len} is too short for num_pairs={self.num_pairs}: the pairs take 2N tokens "
                f"and the N queries need N two-token slots after them, so seq_len >= 4N = {4 * self.num_pairs}"
            )

    @property
    def num_keys(self) -> int:
        """Distinct keys available: the first half of the vocabulary without token 0."""
        return self.vocab_size // 2 - 1

    @property
    def num_slots(self) -> int:
        """S: two-token query slots after the pairs."""
        return (self.seq_len - 2 * self.num_pairs) // 2

    def slot_probabilities(self) -> np.ndarray:
        """[S] float64: the power law p_g ∝ (g + 1) ** (power_a - 1) of a single query's slot g."""
        p = np.arange(1, self.num_slots + 1, dtype=np.float64) ** (self.power_a - 1)
        return p / p.sum()


def _distinct(rng: np.random.Generator, batch_size: int, n_choices: int, n: int) -> np.ndarray:
    """[B, n] int64: per row, n distinct draws from [0, n_choices) in random order."""
    return rng.permuted(np.tile(np.arange(n_choices), (batch_size, 1)), axis=1)[:, :n]


def _fillers(rng: np.random.Generator, shape: tuple[int, int], vocab_size: int, keys: np.ndarray) -> np.ndarray:
    """[B, L] tokens uniform over [0, vocab_size) minus each row's keys [B, N]."""
    n = keys.shape[1]
    draws = rng.integers(0, vocab_size - n, shape)
    # The j-th allowed token is j + #{i: sorted_key_i - i <= j}.
    thresholds = np.sort(keys, axis=1) - np.arange(n)
    return draws + np.sum(thresholds[:, None, :] <= draws[:, :, None], axis=-1)


def mqar_batch(config: MQARConfig, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (inputs [B, T] int32, targets [B, T] int32), a pure function of its arguments; see the module
    docstring for the layout. targets[t] is the value of the key queried at inputs[t], else IGNORE_INDEX.
    """
    check_positive_int("batch_size", batch_size)
    check_nonnegative_int("seed", seed)
    rng = np.random.default_rng(seed)
    n, half = config.num_pairs, config.vocab_size // 2
    keys = 1 + _distinct(rng, batch_size, config.num_keys, n)
    values = half + _distinct(rng, batch_size, config.vocab_size - half, n)
    # Gumbel top-k: the slots in descending order of log p + Gumbel noise are successive draws without
    # replacement from p, first draw first.
    scores = np.log(config.slot_probabilities()) + rng.gumbel(size=(batch_size, config.num_slots))
    slots = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    query_positions = 2 * n + 2 * slots

    inputs = _fillers(rng, (batch_size, config.seq_len), config.vocab_size, keys)
    inputs[:, 0 : 2 * n : 2] = keys
    inputs[:, 1 : 2 * n : 2] = values
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    targets = np.full((batch_size, config.seq_len), IGNORE_INDEX, np.int64)
    np.put_along_axis(targets, query_positions, values, axis=1)
    return inputs.astype(np.int32), targets.astype(np.int32)
