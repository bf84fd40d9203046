"""Model structures and usage patterns: every generated step exact, or refused on the allow-list.

Hypothesis draws a model and how it is used (tests/hardening/_structures.py): one or two stacks
(encoder, decoder, encoder-decoder) whose block modules run 1-3 times per forward (a plain loop,
the whole stack looped, blocks interleaved, one stack applied to two inputs); a ``config`` whose
``num_hidden_layers`` agrees or disagrees with the stacks; dropout 0 or 0.1; checkpointing per
block (``torch.utils.checkpoint`` or torch.distributed's ``checkpoint_wrapper``, reentrant or
not), ``checkpoint_sequential``, one region after the embedding or around the whole forward;
and 1-3 regularizers (RAPT at a drawn layer, RAPT-embedding, SMART, R3F) naming their stack by
``prefer=`` or ``blocks=``, with equal or different seeds, their graphs alive at once or each
backpropagated before the next pass.

The reference for each regularizer is the same step (same seeds, same inputs, the same global
seed before the clean pass) without checkpointing and with that regularizer alone installed.
The step's penalties must equal their references and its gradients the clean loss's plus every
reference penalty's, within 1e-9 (float64). A case may instead be refused with a
``RaptRegError`` only where ``ALLOWED`` below says so; a RAPT layer beyond the block calls
that ran must be refused.

To count outcomes without stopping at the first failure (the figures for a release):

    RAPT_STRUCTURES_REPORT=counts.txt pytest tests/hardening/test_structures.py -p no:randomly

writes the counts, broken down by every drawn dimension, to that file and prints them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, seed, settings

from ._profile import SCALE, TALLY, examples
from ._structures import REFUSED_OTHER, Case, Outcome, cases, judge, summary

CASES = 500
REPORT = os.environ.get("RAPT_STRUCTURES_REPORT")
RECORDS: list[tuple[Case, str]] = []  # (case, category) of every case this session played


# -- the allow-list: the only refusals a case may end in -----------------------------------------


def beyond_calls(case: Case) -> bool:
    return any(r.method == "rapt" and r.layer > case.calls(r.target) for r in case.regs)


def smart_in_reentrant(case: Case) -> bool:
    return any(r.method == "smart" and case.first_call_reentrant(r.target) for r in case.regs)


def equal_seeds_alive(case: Case) -> bool:
    seeds = [r.seed for r in case.regs]
    return case.alive and len(set(seeds)) < len(seeds)


ALLOWED = {
    # RAPT's layer is beyond the block calls its forward made: there is no such layer (and
    # such a case MUST be refused).
    "beyond-calls": (beyond_calls, "but the forward ran the blocks of"),
    # SMART's ascent needs d(loss)/d(noise), which a reentrant region (run under no_grad) hides.
    "smart-reentrant": (smart_in_reentrant, "SMART's ascent step needs the gradient"),
    # Two regularizers with one seed, both noisy graphs alive: their noise streams coincide.
    "equal-seeds-alive": (equal_seeds_alive, "drew the same noise-stream seed"),
}


def category(case: Case, outcome: Outcome) -> str:
    """``outcome`` as a row of the counts: a refusal with the allow-list entry it is (one whose
    predicate holds for the case and whose reason the message gives)."""
    if outcome.kind == "refused":
        entries = [
            name
            for name, (holds, reason) in ALLOWED.items()
            if holds(case) and reason in outcome.detail
        ]
        return f"refused ({', '.join(entries)})" if entries else REFUSED_OTHER
    if outcome.kind == "torch-error":
        return f"torch-error ({outcome.detail.split(':')[0]})"
    return outcome.kind


@pytest.mark.promise("structures-exact")
@settings(examples(CASES), derandomize=True)  # no example database: every run draws the same
@seed(17)  # the same draws after an edit of this file (derandomize alone hashes its source)
@given(case=cases())
def test_every_structure_and_usage_is_exact_or_refused_on_the_allow_list(case):
    outcome = judge(case)
    verdict = category(case, outcome)
    RECORDS.append((case, verdict))
    TALLY["structures"] += 1
    TALLY[f"structures {outcome.kind}"] += 1
    if REPORT:
        return
    if beyond_calls(case):
        assert outcome.kind == "refused", f"a layer beyond the calls was not refused: {verdict}"
    passes = verdict == "exact" or (outcome.kind == "refused" and verdict != REFUSED_OTHER)
    assert passes, f"{verdict}: {outcome.detail}"


def test_at_least_500_structures_were_generated(record_property):
    """Runs after the property test (file order): how many cases it played, and how they ended."""
    if not RECORDS:
        pytest.skip("the generated-structures test did not run in this session")
    text = summary(RECORDS)
    print(f"rapt-reg structures: {text}")
    record_property("cases", text.splitlines()[0])
    if REPORT:
        Path(REPORT).write_text(text + "\n")
    assert len(RECORDS) >= round(CASES * SCALE), "fewer cases ran: did the property test fail?"
    assert any(verdict == "exact" for _, verdict in RECORDS)  # not only refusals were drawn
