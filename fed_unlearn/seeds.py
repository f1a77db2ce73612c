"""Named seed streams: every seed the product derives, in one place.

A client's data order in a round is ``derive_seed(run seed, seed_round, client)``
(:func:`fed_unlearn.training.derive_seed`). Each phase draws its ``seed_round``
from its own stream, ``BASE + r`` for its r-th round (r = 1, 2, ...), so that
two phases of one run do not replay the same order unless stated below.

The values are frozen: changing one changes every seeded result that uses it
(the published benchmark figures among them), though no cached FL phase.

Streams of client data order (``seed_round``):

- ``FL_ROUND`` (0): FL and retrain round r train with ``r``. The unlearning
  rounds of ``mpu`` and ``local_unlearn`` also use ``r``: they run a different
  loss, and the stream is kept so that seeded results stay what they were.
- ``FOUL_LIVE``: FOUL's pseudo-gradient rounds with live clients.
- ``FEDOSD_UNLEARN``, ``FEDOSD_POST``: FedOSD's unlearning and post-training.
- ``FEDERASER``: FedEraser's calibration round j.
- ``PGA``: PGA's ascent round r of the departed clients.
- ``SFU``: SFU's ascent pass of the departed clients (``SFU + 1``).
- ``RECOVERY``: recovery rounds of the remaining clients. A method that also
  repairs after each of its R unlearning rounds (``mpu``'s
  ``interleave_recovery``) uses ``RECOVERY + r`` there, and its final recovery
  rounds continue after them, ``RECOVERY + R + p``.

Other streams:

- ``SAMPLING_SALT``: the strategy's client sampling, ``derive_seed(seed, round,
  SAMPLING_SALT)``.
- ``RELEARN``: the relearning attack's data order.
- ``PROXY_DATA``: the public proxy retain data of the inner losses.
- ``TINY_PEOPLE``: the fictitious people in the tiny model's pre-training
  corpus, ``TINY_PEOPLE + seed`` (never the run's people).
"""

from __future__ import annotations

FL_ROUND = 0
FOUL_LIVE = 10_000
FEDOSD_UNLEARN = 20_000
FEDOSD_POST = 30_000
RECOVERY = 40_000
FEDERASER = 50_000
PGA = 60_000
SFU = 70_000
SAMPLING_SALT = 7919
RELEARN = 31_337
PROXY_DATA = 987_654
TINY_PEOPLE = 10_000

__all__ = [
    "FEDOSD_POST",
    "FEDERASER",
    "FEDOSD_UNLEARN",
    "FL_ROUND",
    "FOUL_LIVE",
    "PGA",
    "PROXY_DATA",
    "RECOVERY",
    "RELEARN",
    "SAMPLING_SALT",
    "SFU",
    "TINY_PEOPLE",
]
