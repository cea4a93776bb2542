"""loratune/adapters/rows.py: one forward where each row applies its own adapter equals, row by row, the
model with that adapter alone active (and the bare base for rows without one); also through generation with
the KV cache. Adapters of different ranks, targets and a DoRA one, made by PEFT with seeded random weights."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from family_models import MIXED_ADAPTERS, banked_family, load_with_peft_adapters, only_adapter, write_decoder

from loratune.adapters.rows import RowBanks, build_banks, row_banks, rows_applying
from loratune.errors import ConfigError
from loratune.generate import SamplingConfig, generate

RTOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Our Llama-family model holding four PEFT-made adapters, banked."""
    return banked_family(tmp_path_factory.mktemp("rows"))


def _alone(model, name, ids):
    with only_adapter(model, name):
        return model(ids)


def test_each_row_gets_its_own_adapters_logits(served):
    rows = ["a", None, "qonly", "dora", "a", "dora"]
    ids = torch.randint(0, 256, (len(rows), 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with rows_applying(served, rows):
            mixed = served(ids)
        alone = [_alone(served, name, ids[i:i + 1])[0] for i, name in enumerate(rows)]
    for i, name in enumerate(rows):
        assert rel_err(mixed[i], alone[i]) <= RTOL, name
    assert rel_err(alone[0], alone[1]) > 1e-2 and rel_err(alone[2], alone[1]) > 1e-2  # adapters matter
    assert rel_err(alone[3], alone[1]) > 1e-2


def test_greedy_generation_per_row_equals_each_adapter_alone(served):
    rows = ["dora", "a", None, "qonly"]
    prompts = torch.randint(0, 256, (len(rows), 6), generator=torch.Generator().manual_seed(2))
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    with rows_applying(served, rows):
        mixed = generate(served, prompts, cfg)
    for i, name in enumerate(rows):
        with only_adapter(served, name):
            alone = generate(served, prompts[i:i + 1], cfg)
        assert torch.equal(mixed[i], alone[0]), name
    assert len({tuple(r.tolist()) for r in mixed}) == len(rows)  # four different continuations


def test_bad_banks_and_rows_are_clear_errors(served):
    with pytest.raises(ConfigError, match="no adapter named nope"):
        build_banks(served, ["a", "nope"])
    with pytest.raises(ConfigError, match="not banked"):
        with rows_applying(served, ["a", "other"]):
            pass
    with pytest.raises(ConfigError, match="name 2 rows"):
        with torch.no_grad(), rows_applying(served, ["a", None]):
            served(torch.zeros((3, 4), dtype=torch.long))
    with rows_applying(served, ["a"]):
        pass
    assert all(layer.row_slots is None for layer in served.modules() if hasattr(layer, "row_slots"))


def _snapshot(banks):
    return {layer: (bank.A.data_ptr(), bank.B.data_ptr(), bank.A.clone(), bank.B.clone())
            for layer, bank in banks.banks.items()}


def _only_slot_changed(banks, before, slot):
    """Every layer's bank kept its storage, and every slot but ``slot`` its values."""
    others = [s for s in range(banks.capacity + 1) if s != slot]
    for layer, bank in banks.banks.items():
        a_ptr, b_ptr, a, b = before[layer]
        assert (bank.A.data_ptr(), bank.B.data_ptr()) == (a_ptr, b_ptr)
        assert torch.equal(bank.A[others], a[others]) and torch.equal(bank.B[others], b[others])


def test_a_load_writes_one_slot_and_an_evict_empties_it(tmp_path):
    """Loading an adapter writes its slot in every layer and leaves the other slots' tensors as they were (no
    restack); evicting empties that slot alone, and the next adapter reuses it. Rows still equal each adapter
    alone afterwards."""
    model = load_with_peft_adapters(write_decoder("llama", tmp_path / "base"), tmp_path, MIXED_ADAPTERS).eval()
    banks = RowBanks(model, slots=3)
    for name in ["b", "a", "qonly"]:  # rank 8 first: the later ones fit the banks as they are
        banks.write(name)
    before = _snapshot(banks)
    banks.evict("a")
    _only_slot_changed(banks, before, 2)
    assert all(not bank.A[2].any() and not bank.B[2].any() for bank in banks.banks.values())
    before = _snapshot(banks)
    assert banks.write("dora") == 2  # the freed slot
    _only_slot_changed(banks, before, 2)
    assert any(bank.B[2].any() for bank in banks.banks.values())
    assert row_banks(model) is banks and banks.names == ["b", "dora", "qonly"]
    rows = ["dora", None, "b", "qonly"]
    ids = torch.randint(0, 256, (len(rows), 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with banks.applying(rows):
            mixed = model(ids)
        for i, name in enumerate(rows):
            assert rel_err(mixed[i], _alone(model, name, ids[i:i + 1])[0]) <= RTOL, name
    with pytest.raises(ConfigError, match="not banked"), banks.applying(["a"]):
        pass
