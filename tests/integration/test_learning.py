"""What the strategies learn, on data whose answer we know and on real data.

Margins come from measurements (seed 0, 2 CPU cores): on purely inter-modality synthetic data
IntraOnly scored 0.508 while InterOnly and I2M2 scored >= 0.99; on mfeat all three scored
>= 0.98 after 15 epochs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmlearn.cli import main
from mmlearn.evaluation.compare import run_one

REPO = Path(__file__).resolve().parents[2]

PURE_INTER = [
    "--data.init_args.intra=0.0",
    "--data.init_args.inter=1.5",
    "--data.init_args.n_train=1000",
    "--trainer.max_epochs=15",
]


def test_intra_only_cannot_learn_a_purely_inter_modality_label(tmp_path: Path) -> None:
    acc, runs = {}, {}
    for name in ("inter_only", "intra_only", "i2m2"):
        row = run_one(str(REPO / f"experiments/synthetic/{name}.yaml"), 0, tmp_path, PURE_INTER)
        acc[name], runs[name] = row["test/acc"], Path(row["run_dir"])
    # the label is a parity of per-modality codes: no unimodal expert can see it
    assert 0.42 <= acc["intra_only"] <= 0.58, acc
    assert acc["inter_only"] >= 0.9, acc
    assert acc["i2m2"] >= 0.9, acc
    # and `mmlearn evaluate` shows it: every single modality alone is at chance (K = 2) under
    # every semantics, while the full set is not
    for name in ("inter_only", "i2m2"):
        (ckpt,) = (runs[name] / "checkpoints").glob("best-*.ckpt")
        with pytest.raises(SystemExit) as done:
            main(["evaluate", "--ckpt_path", str(ckpt), "--probes=false"])
        assert done.value.code == 0
        saved = json.loads((runs[name] / "evaluate" / ckpt.stem / "evaluation.json").read_text())
        assert saved["full"]["acc"] >= 0.9, (name, saved["full"])
        singles = [r for r in saved["missing"] if r["size"] == 1 and "acc" in r]
        assert len(singles) == 2 * (4 if name == "i2m2" else 3)
        for r in singles:
            assert abs(r["acc"] - 0.5) <= 0.08, (name, r)


def test_mfeat_reaches_high_accuracy(tmp_path: Path, mfeat_root: Path, monkeypatch) -> None:
    monkeypatch.setenv("MMLEARN_DATA", str(mfeat_root))
    row = run_one(
        str(REPO / "experiments/mfeat/i2m2.yaml"), 0, tmp_path, ["--trainer.max_epochs=5"]
    )
    assert row["test/acc"] >= 0.96, row
    # the unimodal experts are measured too, and the product beats its best single expert
    experts = {k: v for k, v in row.items() if k.startswith("test/acc/")}
    assert set(experts) == {f"test/acc/{v}" for v in ("fou", "fac", "kar", "pix", "zer", "mor")}
    assert row["test/acc"] > max(experts.values())
