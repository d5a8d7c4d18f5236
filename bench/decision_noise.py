"""How often perfkit optimize's decision rule keeps a change, under simulated run-to-run noise.

    python bench/decision_noise.py --seeds 1 2 3 11 12          # 2000 trials a case and seed, ~10 s each

Each trial measures a base and a variant as this 2-core machine gives runs: each run drifts by 3%
(normal), each of its 25 steps by 8% more; 3 interleaved pairs first, more while the interval
straddles the 3% bar (``judge_adaptively``, up to 20 pairs). Printed per seed: the share of trials
that kept a 0% change (false keeps) and a real 6% gain (power). tests/test_trials.py bounds both for
one seed; the README's figures are this script's.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from perfkit.optimizer.trials import Candidate, Measurement, Verdict, judge_adaptively

TRIALS = 2000


def noisy(rng: Any, mean_ms: float, runs: int, steps: int = 25) -> Candidate:
    """Runs as this 2-core machine gives them: each run drifts by a few percent, each step by more."""
    out = []
    for _ in range(runs):
        drift = mean_ms * (1 + rng.normal(0, 0.03))
        samples = list(drift * (1 + rng.normal(0, 0.08, steps)))
        out.append(Measurement(ok=True, step_ms=float(np.median(samples)), loss=4.0, samples_ms=samples))
    return Candidate("x", [], out)


def keep_rate(gain: float, seed: int, trials: int = TRIALS) -> tuple[float, list[Verdict]]:
    """The share of ``trials`` that kept a change of true ``gain``, and their verdicts."""
    rng = np.random.default_rng(seed)
    verdicts = []
    for _ in range(trials):
        base, variant = noisy(rng, 50.0, 3), noisy(rng, 50.0 * (1 - gain), 3)

        def more() -> bool:
            base.runs += noisy(rng, 50.0, 1).runs  # noqa: B023 - measured now, for this trial
            variant.runs += noisy(rng, 50.0 * (1 - gain), 1).runs  # noqa: B023
            return True

        verdicts.append(judge_adaptively(base, variant, 0.03, more, max_pairs=20))
    return sum(v.keep for v in verdicts) / trials, verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 11, 12])
    ap.add_argument("--trials", type=int, default=TRIALS)
    args = ap.parse_args()
    for seed in args.seeds:
        false_keep, _ = keep_rate(0.0, seed, args.trials)
        power, _ = keep_rate(0.06, seed, args.trials)
        print(
            f"seed {seed}: a 0% change kept {false_keep:.2%}, a 6% gain kept {power:.1%} ({args.trials} trials each)"
        )


if __name__ == "__main__":
    main()
