"""The training schedule holds for runs of every length: PyTorch's OneCycleLR alone divides by zero on a run of
exactly five steps (a keyword-spotting QAT epoch on a small field-mixed set hit it)."""

from __future__ import annotations

import pytest
import torch

from components.train import one_cycle


@pytest.mark.parametrize("total_steps", list(range(1, 13)) + [50])
def test_every_run_length_steps_through_its_schedule_and_peaks_at_the_rate(total_steps):
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=0.003)
    scheduler = one_cycle(optimizer, 0.003, total_steps)
    rates = []
    for step in range(total_steps):  # as fit() does: a scheduler step after every optimizer step but the last
        optimizer.step()
        rates.append(optimizer.param_groups[0]["lr"])
        if step < total_steps - 1:
            scheduler.step()
    assert max(rates) >= 0.8 * 0.003  # it warms up to (about) the rate asked for ...
    assert all(0 < r <= 0.003 * (1 + 1e-9) for r in rates)  # ... and never past it

def test_plain_one_cycle_fails_on_five_steps():  # why one_cycle exists: this is PyTorch's behaviour it avoids
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.003)
    with pytest.raises(ZeroDivisionError):
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.003, total_steps=5, pct_start=0.2)
